"""GaLoreAdafactor: Adafactor in a rank-r gradient subspace, a drop-in for galore-torch's GaLoreAdafactor.

Part II, GaLore chapter (``book/galore/``). Zhao et al., "GaLore: Memory-Efficient LLM Training
by Gradient Low-Rank Projection", ICML 2024, arXiv 2403.03507 (Algorithm 2, with Adafactor as the
inner optimizer, as galore-torch ships it); Shazeer and Stern, "Adafactor: Adaptive Learning
Rates with Sublinear Memory Cost", ICML 2018, arXiv 1804.04235 (Algorithms 4 and 5), in the
form of Hugging Face ``transformers.Adafactor`` that galore-torch copies.

The update (one parameter W, step t = 1, 2, …)
----------------------------------------------
With the projector of :mod:`mini.galore.projector` for groups with ``"rank"`` (basis refreshed
by an SVD whenever ``(t − 1) mod T = 0``), the raw gradient otherwise::

    R_t  = project(G_t)              # G Pᵀ (m, r) or Pᵀ G (r, n); G in plain groups
    ρ_t  = min(10⁻², 1/√t)  (relative_step; min(10⁻⁶ t, 1/√t) with warmup_init; else lr)
    η_t  = max(ε₂, RMS(W_{t−1})) · ρ_t         (scale_parameter; else ρ_t)
    β̂_t  = 1 − t^c                              # c = decay_rate = −0.8, so β̂_1 = 0
    Q    = R_t² + ε₁
    factored (R is a matrix (a, b)):
        r_t = β̂_t r_{t−1} + (1 − β̂_t) mean_cols(Q)        # (a,)   row statistics
        c_t = β̂_t c_{t−1} + (1 − β̂_t) mean_rows(Q)        # (b,)   column statistics
        U   = R_t / √(r_t c_tᵀ / mean(r_t))                 # (a, b) rank-1 estimate of E[R²]
    unfactored (a vector): V_t = β̂_t V_{t−1} + (1 − β̂_t) Q,   U = R_t / √V_t
    U    = η_t · U / max(1, RMS(U) / d)       # update clipping, d = clip_threshold = 1
    U    = M_t = β₁ M_{t−1} + (1 − β₁) U      # only with beta1 (Hugging Face: after η_t)
    W_t  = W_{t−1} − η_t λ W_{t−1} − project_back(U)     # α (scale) in project_back

so a projected (m, n) matrix keeps r + max(m, n) second-moment values (m + n for a plain one)
instead of Adam's 2·m·n, plus r·max(m, n) for M when ``beta1`` is set.

Param groups follow galore-torch and :class:`mini.galore.adamw.GaLoreAdamW`: ``[{"params":
regular}, {"params": projected, "rank": r, "update_proj_gap": T, "scale": α, "proj_type":
"std"}]``; replace ``from galore_torch import GaLoreAdafactor`` with ``from mini.galore.adafactor
import GaLoreAdafactor``.

Differences from galore-torch 1.0 (``galore_torch/adafactor.py``) and why
-------------------------------------------------------------------------
- Same arithmetic, op for op, including its quirks (η_t is a 0-d tensor when RMS(W) > ε₂ and a
  Python float otherwise, which costs a device sync per parameter; weight decay scaled by η_t
  and applied before the update): on CPU in float32 the trajectories agree bitwise
  (``tests/test_galore_adafactor.py``).
- The projector is mini's: stored side, guarded SVD, ``n_svd``; its state is tensors, ints and
  strings, so ``state_dict()`` loads with ``torch.load(weights_only=True)`` and resumes bitwise.
  Moments of bfloat16/float16 parameters stay float32 through a round trip (torch's loader
  would cast them to the parameter's dtype).
- Inputs are validated when a group is added (each error names the argument, its value and
  what is allowed): the group keys as GaLoreAdamW (rank, gap, scale, proj_type, 2-D
  parameters; missing keys default to 200 / 0.25 / "std", where galore-torch raises KeyError),
  and Adafactor's own: ``lr`` given with ``relative_step=True``, or missing without it (galore-torch
  fails inside the first step), ``warmup_init`` without ``relative_step``, ``eps``,
  ``clip_threshold``, ``decay_rate``, ``beta1``, ``weight_decay``, the three flags.
- No dependency on transformers.

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from .adamw import GaLoreOptimizer
from .projector import (
    GaLoreProjector,
)

__all__ = ["ADAFACTOR_DEFAULTS", "GaLoreAdafactor", "check_adafactor_hparams"]

#: galore-torch's (= ``transformers.Adafactor``'s) defaults; ε = (ε₁, ε₂), decay_rate = c.
ADAFACTOR_DEFAULTS: dict[str, Any] = {
    "lr": None,
    "eps": (1e-30, 1e-3),
    "clip_threshold": 1.0,
    "decay_rate": -0.8,
    "beta1": None,
    "weight_decay": 0.0,
    "scale_parameter": True,
    "relative_step": True,
    "warmup_init": False,
}

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_adafactor_hparams(group: dict[str, Any]) -> None:
    """Validate Adafactor's hyperparameters in ``group`` (defaults already merged).

    Each error names the argument, its value and what is allowed.

    Explained in :doc:`/book/galore/theory`.
    """
    for name in ("scale_parameter", "relative_step", "warmup_init"):
        if not isinstance(group[name], bool):
            raise TypeError(f"{name} must be True or False, got {group[name]!r}")
    lr = group["lr"]
    if lr is not None and not (_is_real(lr) and lr >= 0.0):
        raise ValueError(f"lr must be None or a finite real number >= 0, got {lr!r}")
    if lr is not None and group["relative_step"]:
        raise ValueError(
            f"lr={lr!r} cannot be combined with relative_step=True (the step size is then "
            "min(1e-2, 1/sqrt(t))); pass lr=None, or relative_step=False with an lr"
        )
    if lr is None and not group["relative_step"]:
        raise ValueError("lr=None requires relative_step=True; with relative_step=False pass an lr >= 0")
    if group["warmup_init"] and not group["relative_step"]:
        raise ValueError("warmup_init=True requires relative_step=True, got relative_step=False")
    eps = group["eps"]
    ok = isinstance(eps, (tuple, list)) and len(eps) == 2 and all(_is_real(e) and e >= 0.0 for e in eps)
    if not ok:
        raise ValueError(f"eps must be two finite real numbers >= 0 (eps1 for R², eps2 for RMS(W)), got {eps!r}")
    clip = group["clip_threshold"]
    if not (_is_real(clip) and clip > 0.0):
        raise ValueError(f"clip_threshold must be a finite real number > 0, got {clip!r}")
    decay = group["decay_rate"]
    if not (_is_real(decay) and decay <= 0.0):
        raise ValueError(f"decay_rate must be a finite real number <= 0 (beta2_t = 1 - t**decay_rate), got {decay!r}")
    beta1 = group["beta1"]
    if beta1 is not None and not (_is_real(beta1) and 0.0 <= beta1 < 1.0):
        raise ValueError(f"beta1 must be None (no first moment) or a number in [0, 1), got {beta1!r}")
    wd = group["weight_decay"]
    if not (_is_real(wd) and wd >= 0.0):
        raise ValueError(f"weight_decay must be a finite real number >= 0, got {wd!r}")


class GaLoreAdafactor(GaLoreOptimizer):
    """Adafactor with GaLore's low-rank gradient projection for groups that carry ``"rank"``.

    Explained in :doc:`/book/galore/theory`.

    Args:
        params: parameters or param groups; a group with ``"rank"`` (and optionally
            ``"update_proj_gap"``, ``"scale"``, ``"proj_type"``) is projected.
        lr: external step size; None (default) with ``relative_step=True``.
        eps: (ε₁, ε₂): added to R², and the floor of RMS(W) in the step size (1e-30, 1e-3).
        clip_threshold: d, the update's RMS is clipped to it (1.0).
        decay_rate: c in β̂_t = 1 − t^c (−0.8).
        beta1: first-moment decay; None (default) keeps no first moment.
        weight_decay: λ, applied as ``W −= η_t λ W`` before the update (0).
        scale_parameter: multiply the step by max(ε₂, RMS(W)) (True).
        relative_step: step size min(1e-2, 1/√t) instead of ``lr`` (True).
        warmup_init: with relative_step, min(1e-6 t, 1/√t) (False).

    State per parameter (keys of galore-torch's): ``step`` (int), ``RMS`` (RMS(W) at the last
    step), ``exp_avg_sq_row`` (a,) and ``exp_avg_sq_col`` (b,) for a matrix (low-rank shape
    (a, b) in projected groups) or ``exp_avg_sq`` for a vector, ``exp_avg`` with beta1, and
    ``projector`` in projected groups.
    """

    dtype_kept_keys = (*_MOMENT_KEYS, "RMS")  # float32 statistics of a bf16/fp16 parameter

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        eps: tuple[float, float] = (1e-30, 1e-3),
        clip_threshold: float = 1.0,
        decay_rate: float = -0.8,
        beta1: float | None = None,
        weight_decay: float = 0.0,
        scale_parameter: bool = True,
        relative_step: bool = True,
        warmup_init: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "eps": tuple(eps) if isinstance(eps, list) else eps,
            "clip_threshold": clip_threshold,
            "decay_rate": decay_rate,
            "beta1": beta1,
            "weight_decay": weight_decay,
            "scale_parameter": scale_parameter,
            "relative_step": relative_step,
            "warmup_init": warmup_init,
        }
        check_adafactor_hparams(defaults)
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate Adafactor's hyperparameters, then the projected group as every GaLore
        optimizer does (:meth:`GaLoreOptimizer.add_param_group <mini.galore.adamw.GaLoreOptimizer.add_param_group>`)."""
        check_adafactor_hparams({**self.defaults, **param_group})
        super().add_param_group(param_group)

    # ----------------------------------------------------------------------------- the arithmetic
    @staticmethod
    def _rms(x: Tensor) -> Tensor:
        """‖x‖₂ / √numel, a 0-d tensor."""
        return x.norm(2) / (x.numel() ** 0.5)

    @staticmethod
    def step_size(group: dict[str, Any], step: int, rms: Tensor) -> float | Tensor:
        """η_t = max(ε₂, RMS(W)) · ρ_t (a 0-d tensor when RMS(W) > ε₂, as galore-torch's)."""
        rel_step = group["lr"]
        if group["relative_step"]:
            min_step = 1e-6 * step if group["warmup_init"] else 1e-2
            rel_step = min(min_step, 1.0 / math.sqrt(step))
        param_scale = 1.0
        if group["scale_parameter"]:
            param_scale = max(group["eps"][1], rms)  # float ε₂ or the tensor RMS (one device sync)
        return param_scale * rel_step

    @staticmethod
    def _approx_sq_grad(row: Tensor, col: Tensor) -> Tensor:
        """1 / √(r cᵀ / mean(r)): the inverse root of the rank-1 estimate of E[R²] (a, b)."""
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)  # (a, 1)
        c_factor = col.unsqueeze(-2).rsqrt()  # (1, b)
        return torch.mul(r_factor, c_factor)  # (a, b)

    def init_state(self, group: dict[str, Any], state: dict[str, Any], grad: Tensor) -> None:
        """Create the statistics in the (low-rank) shape of ``grad`` (a, b) or (a,)."""
        shape = grad.shape
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros_like(grad)  # M, grad's shape
        if grad.dim() >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1]).to(grad)  # (a,)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:]).to(grad)  # (b,)
        else:
            state["exp_avg_sq"] = torch.zeros_like(grad)  # (a,)
        state["RMS"] = 0

    def adafactor_update(self, group: dict[str, Any], state: dict[str, Any], grad: Tensor, lr: float | Tensor) -> Tensor:
        """Update the statistics with ``grad`` (low-rank shape) and return η_t · clip(U) (or M_t).

        Called after ``state["step"]`` was incremented (t ≥ 1).
        """
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        update = (grad**2) + group["eps"][0]  # Q = R² + ε₁
        if grad.dim() >= 2:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]  # (a,), (b,)
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=(1.0 - beta2t))
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=(1.0 - beta2t))
            update = self._approx_sq_grad(row, col)  # (a, b)
            update.mul_(grad)
        else:
            exp_avg_sq = state["exp_avg_sq"]  # (a,)
            exp_avg_sq.mul_(beta2t).add_(update, alpha=(1.0 - beta2t))
            update = exp_avg_sq.rsqrt().mul_(grad)
        update.div_((self._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["beta1"] is not None:
            exp_avg = state["exp_avg"]
            exp_avg.mul_(group["beta1"]).add_(update, alpha=(1 - group["beta1"]))
            update = exp_avg
        return update

    # ----------------------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One GaLore-Adafactor step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.dtype in (torch.float16, torch.bfloat16):
                    grad = grad.float()
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                projector = None
                if "rank" in group:
                    if "projector" not in state:
                        state["projector"] = self.make_projector(p, group)
                    projector = state["projector"]
                    grad = projector.project(grad, state["step"])  # (m, n) -> low-rank shape
                if "RMS" not in state:
                    self.init_state(group, state, grad)
                else:  # a checkpoint loaded on another device or dtype
                    for key in _MOMENT_KEYS:
                        if key in state:
                            state[key] = state[key].to(grad)
                w = p.float() if p.dtype in (torch.float16, torch.bfloat16) else p  # (m, n) float32 copy or p
                state["step"] += 1
                state["RMS"] = self._rms(w)
                lr = self.step_size(group, state["step"], state["RMS"])
                update = self.adafactor_update(group, state, grad, lr)
                if projector is not None:
                    update = projector.project_back(update)  # (m, n), the scale included
                if group["weight_decay"] != 0:
                    w.add_(w, alpha=(-group["weight_decay"] * lr))
                w.sub_(update)  # exactly galore-torch's add_(-update)
                if w is not p:
                    p.copy_(w)
        return loss

    # ----------------------------------------------------------------------------- state
    def state_bytes(self) -> int:
        """Bytes of the optimizer statistics and projector bases (what GaLore + Adafactor save)."""
        total = 0
        for s in self.state.values():
            for key in _MOMENT_KEYS:
                if isinstance(s.get(key), Tensor):
                    total += s[key].numel() * s[key].element_size()
            proj = s.get("projector")
            if isinstance(proj, GaLoreProjector):
                for basis in proj.basis():
                    if basis is not None:
                        total += basis.numel() * basis.element_size()
        return total
