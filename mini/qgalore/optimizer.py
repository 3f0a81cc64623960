"""Q-GaLore's optimizers: GaLoreAdamW with the adaptive INT4 projector, and per-layer updates of
INT8 weights with stochastic rounding.

Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
Gradients", arXiv 2407.08296 (2024), Algorithm 1; official code VITA-Group/Q-GaLore. Part II, Q-GaLore
chapter (:doc:`/book/qgalore/theory`; GaLore itself: :doc:`/book/galore/theory`).

:class:`QGaLoreAdamW` is :class:`mini.galore.adamw.GaLoreAdamW` (same param-group convention,
same arithmetic) whose projected groups use :class:`~mini.qgalore.projector.AdaptiveProjector`:
an INT4 basis and lazy subspace updates. A projected group may carry ``cos_threshold`` (0.4),
``gamma`` (2), ``queue_size`` (5), ``proj_bits`` (4) and ``proj_group_size`` (256), the official
defaults, and ``cos_rule`` (``"abs"``; ``"signed"`` is the official code's lazy-update rule).
Its moments are float32; :class:`QGaLoreAdamW8bit` is the same projector on
:class:`mini.galore.adamw8bit.GaLoreAdamW8bit`'s block-wise 8-bit moments, the paper's setting
and what :func:`mini.lm.memory.estimate_memory` counts for ``"qgalore"`` (tested byte for byte).

:class:`Int8LayerwiseQGaLore` is the paper's training path for INT8 weights: each
:class:`~mini.qgalore.int8_linear.Int8Linear` gets a weight-gradient hook that, as soon as the
layer's dense gradient G exists (during backward; it is never stored), runs ::

    R = project(G)                             (adaptive INT4 projector)
    M = β1 M + (1 − β1) R,  V = β2 V + (1 − β2) R²  (stored in 8 bits)
    N = M / (√V / c2 + ε),  η = lr / c1      c1 = 1 − β1ᵗ, c2 = √(1 − β2ᵗ)
    W' = (W − η · project_back(N)) (1 − lr λ)  (GaLoreAdamW's order: update, decay)
    W ← SR-requantize(W + (W' − W))            (Int8Linear.apply_update_'s kernel)

M and V are stored as bitsandbytes' 8-bit block-wise codes, as the official per-layer path
does with bitsandbytes' 8-bit Adam (CUDA only); here the same state
(:class:`~mini.galore.adamw8bit.BlockwiseMoments`) runs on CPU too, and ``optim_bits=32``
keeps float32 moments with GaLoreAdamW's form ``η = lr·c2/c1``, ``N = M / (√V + ε)``. It is
single-process: the hooks update weights during backward, which does not combine with
DistributedDataParallel's gradient all-reduce.

Explained in :doc:`/book/qgalore/theory`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mini.galore.adamw import GaLoreAdamW, check_adam_hparams
from mini.galore.adamw8bit import BlockwiseMoments, GaLoreAdamW8bit
from mini.galore.projector import (
    GaLoreProjector,
    check_proj_type,
    check_rank,
    check_scale,
    check_update_proj_gap,
)

from .int8_linear import Int8Linear
from .projector import AdaptiveProjector, check_adaptive_options

__all__ = ["QGaLoreAdamW", "QGaLoreAdamW8bit", "Int8LayerwiseQGaLore", "QGALORE_GROUP_DEFAULTS"]

#: Adaptive-projector settings of a projected group (official Q-GaLore defaults).
QGALORE_GROUP_DEFAULTS: dict[str, Any] = {
    "cos_threshold": 0.4,
    "gamma": 2.0,
    "queue_size": 5,
    "proj_bits": 4,
    "proj_group_size": 256,
    "cos_rule": "abs",  # mini's |cos|; "signed": the official code's rule
}


class _QGaLoreGroups:
    """The projected groups of Q-GaLore: the adaptive, INT4-stored projector and its options
    (mixed into a GaLore optimizer before it in the bases)."""

    projector_class = AdaptiveProjector

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Fill a projected group's missing Q-GaLore keys with their defaults, validate, add it."""
        if "rank" in param_group:
            for key, value in QGALORE_GROUP_DEFAULTS.items():
                param_group.setdefault(key, value)
        super().add_param_group(param_group)  # type: ignore[misc]

    def check_group(self, param_group: dict[str, Any]) -> None:
        """Validate (and store as plain values) the adaptive projector's keys of a projected group."""
        options = check_adaptive_options(**{key: param_group[key] for key in QGALORE_GROUP_DEFAULTS})
        param_group.update(options)

    def make_projector(self, p: Tensor, group: dict[str, Any]) -> GaLoreProjector:
        return AdaptiveProjector(
            group["rank"],
            update_proj_gap=group["update_proj_gap"],
            scale=group["scale"],
            proj_type=group["proj_type"],
            name=self._param_names.get(id(p)),  # type: ignore[attr-defined]
            # .get: groups restored from a checkpoint saved before a key existed use its default
            **{key: group.get(key, value) for key, value in QGALORE_GROUP_DEFAULTS.items()},
        )


class QGaLoreAdamW(_QGaLoreGroups, GaLoreAdamW):
    """GaLoreAdamW whose projected groups use Q-GaLore's adaptive, INT4-stored projector.

    Same arguments and param-group convention as :class:`~mini.galore.adamw.GaLoreAdamW`; a
    projected group may also set the keys of :data:`QGALORE_GROUP_DEFAULTS`. Its Adam moments
    are float32; :class:`QGaLoreAdamW8bit` has the paper's 8-bit moments.

    Explained in :doc:`/book/qgalore/theory`.
    """


class QGaLoreAdamW8bit(_QGaLoreGroups, GaLoreAdamW8bit):
    """Q-GaLore with the paper's 8-bit Adam moments: the adaptive INT4 projector of
    :class:`QGaLoreAdamW` on :class:`~mini.galore.adamw8bit.GaLoreAdamW8bit`'s block-wise 8-bit
    state (its arguments, defaults and arithmetic; bitsandbytes' AdamW8bit in the official code).

    Its state is what :func:`mini.lm.memory.estimate_memory` counts for ``"qgalore"``: 8-bit
    moments with a float32 absmax per block (float32 below ``min_8bit_size``) and the INT4
    basis with a float32 scale and a uint8 zero point per group (``group_param_bytes=2.5``).

    Explained in :doc:`/book/qgalore/theory`.
    """

    def state_bytes(self) -> dict[str, int]:
        """:meth:`GaLoreAdamW8bit.state_bytes <mini.galore.adamw8bit.GaLoreAdamW8bit.state_bytes>`
        with the bases counted as stored (quantized), not as dequantized on read."""
        out = super().state_bytes()
        out["projector"] = sum(s["projector"].basis_nbytes for s in self.state.values()
                               if isinstance(s.get("projector"), AdaptiveProjector))
        out["total"] = sum(v for k, v in out.items() if k != "total")
        return out


class Int8LayerwiseQGaLore:
    """Per-layer Q-GaLore updates of every ``Int8Linear`` in ``model`` from its gradient hook.

    The layers are :class:`~mini.qgalore.int8_linear.Int8Linear`.

    Explained in :doc:`/labs/galore/pretraining`.

    Args:
        model: a module (its ``Int8Linear`` submodules are trained) or an iterable of ``Int8Linear``.
        rank, update_proj_gap, scale, proj_type: GaLore's (r, T, α, projection type).
        lr, betas, eps, weight_decay: Adam's (official per-layer path: betas (0.9, 0.999)).
        generator: the source of the stochastic-rounding uniforms (on the layers' device);
            its state is saved in :meth:`state_dict` so a resumed run draws the same numbers.
        optim_bits: 8 (default, the paper's): the moments are stored block-wise in 8 bits with
            bitsandbytes' arithmetic (:class:`~mini.galore.adamw8bit.BlockwiseMoments`, the
            state of :class:`~mini.galore.adamw8bit.GaLoreAdamW8bit`); 32: float32 moments and
            GaLoreAdamW's arithmetic.
        block_size, min_8bit_size, backend: the 8-bit state's (as ``GaLoreAdamW8bit``'s).
        projector_kwargs: ``cos_threshold``, ``gamma``, ``queue_size``, ``proj_bits``,
            ``proj_group_size``, ``cos_rule`` of :class:`~mini.qgalore.projector.AdaptiveProjector`.

    Every argument is validated here (numpy integers and integral float gaps accepted), not at
    the first backward where the hooks run. The biases and every other float parameter are not
    touched: train them with an ordinary optimizer. Call :meth:`remove` to detach the hooks.

    What this per-layer path does not support, because each layer's weight is updated inside
    backward the moment its gradient exists (that is where its memory saving comes from: no
    dense gradient outlives its layer's backward):

    - gradient accumulation: every backward call is one optimizer step (accumulate by using a
      larger batch, or use :class:`QGaLoreAdamW` on float weights);
    - DistributedDataParallel: the hooks would update each rank from its local gradient before
      the all-reduce, so a wrapped model raises TypeError (use :class:`QGaLoreAdamW` with the
      standard optimizer step under DDP);
    - global gradient clipping or any rule that needs all gradients at once;
    - a layer called twice in one forward (its weight changes between the two backward calls:
      :class:`~mini.qgalore.int8_linear.Int8Linear` raises RuntimeError).
    """

    def __init__(
        self,
        model: nn.Module | Iterable[Int8Linear],
        rank: int,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        generator: Optional[torch.Generator] = None,
        optim_bits: int = 8,
        block_size: int = 256,
        min_8bit_size: int = 4096,
        backend: str = "auto",
        **projector_kwargs: Any,
    ) -> None:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError(
                "Int8LayerwiseQGaLore is single-process: its hooks would update each rank's weights from the "
                "local gradient during backward, before DistributedDataParallel's all-reduce. Use QGaLoreAdamW "
                "with the standard optimizer step under DDP."
            )
        # every argument is checked here, not at the first backward (where the hooks run)
        rank = check_rank(rank)
        update_proj_gap = check_update_proj_gap(update_proj_gap)
        check_scale(scale)
        check_proj_type(proj_type)
        check_adam_hparams(lr, betas, eps, weight_decay)
        if isinstance(optim_bits, bool) or optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 (block-wise 8-bit moments) or 32 (float32), got {optim_bits!r}")
        moments = BlockwiseMoments(block_size, min_8bit_size, backend) if optim_bits == 8 else None
        projector_kwargs = check_adaptive_options(**{**QGALORE_GROUP_DEFAULTS, **projector_kwargs})
        if not isinstance(model, nn.Module):
            try:
                model = list(model)
            except TypeError:
                raise TypeError(f"model must be an nn.Module or an iterable of Int8Linear, got {type(model).__name__}") from None
        layers = [m for m in model.modules() if isinstance(m, Int8Linear)] if isinstance(model, nn.Module) else model
        if not layers or not all(isinstance(m, Int8Linear) for m in layers):
            raise ValueError("model must contain (or be an iterable of) at least one Int8Linear, and only those")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
            devices = sorted({str(m.codes.device) for m in layers})
            if any(torch.device(d).type != generator.device.type for d in devices):
                raise ValueError(f"generator is on {generator.device}, the Int8Linear layers on {', '.join(devices)}: "
                                 "the stochastic-rounding uniforms are drawn on the layers' device "
                                 f"(torch.Generator(device={devices[0]!r}))")
        self.layers = layers
        self.hparams = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
        self.projector_kwargs = projector_kwargs
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(betas), float(eps), float(weight_decay)
        self.generator = generator
        self.optim_bits = int(optim_bits)
        self.moments = moments
        self.states: list[dict[str, Any]] = [{"step": 0} for _ in layers]
        self._index = {id(m): i for i, m in enumerate(layers)}
        self._handles = [m.register_weight_grad_hook(self._hook) for m in layers]

    def _projector(self) -> AdaptiveProjector:
        return AdaptiveProjector(**self.hparams, **self.projector_kwargs)

    @torch.no_grad()
    def _hook(self, layer: Int8Linear, grad: Tensor) -> None:
        state = self.states[self._index[id(layer)]]
        if "projector" not in state:
            state["projector"] = self._projector()
        projector: AdaptiveProjector = state["projector"]
        low = projector.project(grad.float(), state["step"])  # (low-rank shape)
        beta1, beta2 = self.betas
        if self.moments is not None:  # 8-bit codes (float32 below min_8bit_size), bitsandbytes' form
            if "exp_avg" not in state:
                self.moments.init_moments(state, low)
            state["step"] += 1
            n = self.moments.update_moments(state, low, self.betas, self.eps, state["step"])
            direction = projector.project_back(n)  # (out, in), α included
            step_size = self.lr / (1.0 - beta1 ** state["step"])
        else:  # float32 moments, GaLoreAdamW's form
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(low)
                state["exp_avg_sq"] = torch.zeros_like(low)
            state["step"] += 1
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(beta1).add_(low, alpha=1.0 - beta1)
            v.mul_(beta2).addcmul_(low, low, value=1.0 - beta2)
            direction = projector.project_back(m / (v.sqrt() + self.eps))  # (out, in), α included
            step_size = self.lr * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        delta = direction.mul_(-step_size)
        if self.weight_decay > 0.0:
            w = layer.dequantized_weight()
            delta.sub_((w + delta).mul_(self.lr * self.weight_decay))
        layer.apply_update_(delta.contiguous(), self.generator)

    def n_svd(self) -> int:
        """SVDs performed by all projectors."""
        return sum(s["projector"].n_svd for s in self.states if "projector" in s)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain scalars only (``torch.load(weights_only=True)`` works)."""
        states = [{**s, "projector": s["projector"].state_dict()} if "projector" in s else dict(s) for s in self.states]
        out: dict[str, Any] = {"states": states}
        if self.generator is not None:
            out["generator"] = self.generator.get_state()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, for an optimizer over the same layers."""
        if len(state["states"]) != len(self.states):
            raise ValueError(f"state has {len(state['states'])} layers, this optimizer {len(self.states)}")
        for i, saved in enumerate(state["states"]):
            s = dict(saved)
            if "projector" in s:
                projector = self._projector()
                projector.load_state_dict(s["projector"])
                s["projector"] = projector
            self.states[i] = s
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])

    def remove(self) -> None:
        """Detach the hooks (the layers then fill ``weight_grad`` again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
