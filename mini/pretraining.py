"""The pretraining comparison of Part II: one setup per method, the same model, data and steps.

Used by the GaLore chapter's pretraining lab (``labs/galore/pretraining.ipynb``, Part II,
``book/galore/``). Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", ICML 2024, arXiv 2403.03507, Table 2, pre-train LLaMA models with full-rank Adam,
GaLore, a low-rank factorized model, LoRA and ReLoRA at equal steps; Table 4 adds 8-bit GaLore.
Zhang et al., "Q-GaLore", arXiv 2407.08296, Table 1, adds Q-GaLore. Each method here is a
*setup*: a function of the freshly built tiny Llama that returns the
:class:`~mini.lm.measure.TrainSetup` (converted model, optimizer, schedule) that
:func:`mini.lm.measure.measure_training` trains and measures, in a fresh process.

=================  =========================================================================
method             what trains, and with what
=================  =========================================================================
``adamw``          every weight, ``torch.optim.AdamW`` (the full-rank baseline)
``adamw_alpha``    a control: full-rank AdamW with GaLore's learning rates, ``lr`` for
                   embeddings, norms and head and ``scale · lr`` for the attention and MLP
                   matrices (what GaLore's α does to their step), without any projection
``galore``         every weight; attention and MLP matrices through
                   :class:`~mini.galore.adamw.GaLoreAdamW` (rank r, gap T, scale α), the rest
                   plain AdamW in the same optimizer (the paper's param groups)
``galore_pm``      as ``galore`` with ``project_moments=True``: the Adam moments are carried
                   into the new subspace at each switch instead of being read in the new basis
``low_rank``       the projections replaced by ``B A`` of rank r
                   (:func:`~mini.lm.lowrank.to_low_rank`), everything trained with AdamW
``lora``           LoRA adapters of rank r on the frozen random projections
                   (:func:`~mini.lm.lowrank.apply_lora`); embeddings, norms, head trained
``galore8bit``     as ``galore`` with 8-bit block-wise moments
                   (:class:`~mini.galore.adamw8bit.GaLoreAdamW8bit`)
``qgalore``        as ``galore8bit`` with Q-GaLore's projector: INT4 basis and lazy
                   (adaptive) subspace updates, 8-bit moments
                   (:class:`~mini.qgalore.optimizer.QGaLoreAdamW8bit`); float weights
``qgalore_int8``   Q-GaLore's INT8 path: the projections become
                   :class:`~mini.qgalore.int8_linear.Int8Linear` (INT8 group-wise weights)
                   updated in their gradient hooks by
                   :class:`~mini.qgalore.optimizer.Int8LayerwiseQGaLore` (INT4 adaptive
                   projector, 8-bit moments, stochastic rounding); embeddings, norms, head
                   with 8-bit AdamW (:class:`~mini.galore.adamw8bit.GaLoreAdamW8bit`)
``sltrain``        the projections replaced by ``(α/r)·B A + S`` with S on a random fixed
                   support of density δ (:func:`~mini.sltrain.convert.convert_to_sltrain`;
                   Han et al., "SLTrain", NeurIPS 2024, arXiv 2406.02214; SLTrain chapter,
                   ``book/sltrain/``), everything trained with AdamW
=================  =========================================================================

Every method gets the same schedule, the GaLore paper's: linear warmup over ``warmup`` of the
steps, then cosine decay to ``min_lr_ratio`` of the peak (:class:`CosineSchedule`). Gradient
clipping is left to the trainer's config; the lab turns it off for every method, because the
INT8 path updates its weights inside backward, where a global norm cannot be taken.

Differences from the papers, and why: the models are tiny (0.8M parameters), and ReLoRA is not
included. ``qgalore`` and ``qgalore_int8`` keep the paper's 8-bit moments, so their measured
state is what :func:`mini.lm.memory.estimate_memory` counts for ``"qgalore"``.

Explained in :doc:`/labs/galore/pretraining`.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mini.galore import GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
from mini.lm.lowrank import apply_lora, replace_linears, to_low_rank
from mini.lm.measure import DEFAULT_MMAP_THRESHOLD, RunSpec, TrainSetup
from mini.lm.memory import tensor_breakdown
from mini.lm.trainer import TrainerConfig, place_model
from mini.qgalore import Int8LayerwiseQGaLore, Int8Linear, QGaLoreAdamW8bit
from mini.sltrain import convert_to_sltrain

__all__ = [
    "PRETRAINING_METHODS",
    "MEMORY_METHOD",
    "PRELOAD",
    "PretrainHParams",
    "CosineSchedule",
    "setup_method",
    "run_spec",
    "run_memory",
]

#: The methods :func:`setup_method` knows, in the lab's order.
PRETRAINING_METHODS: tuple[str, ...] = (
    "adamw", "galore", "galore_pm", "low_rank", "lora", "galore8bit", "qgalore", "qgalore_int8",
    "adamw_alpha", "sltrain",
)

#: The :data:`mini.lm.memory.METHODS` entry that models each method's memory (the analytic
#: column of the lab's table); ``qgalore`` and ``qgalore_int8`` are the paper's Q-GaLore (8-bit
#: moments, INT4 bases; ``qgalore_int8`` also has the INT8 weights the estimator counts).
MEMORY_METHOD: dict[str, str] = {
    "adamw": "adam", "galore": "galore", "galore_pm": "galore", "low_rank": "low_rank",
    "lora": "lora", "galore8bit": "galore8bit", "qgalore": "qgalore", "qgalore_int8": "qgalore",
    "adamw_alpha": "adam", "sltrain": "sltrain",
}


#: What every run's process imports first (the baseline too, so its peak memory carries them).
PRELOAD: tuple[str, ...] = ("mini", "torch", "transformers", "peft", "mini.lm", "mini.galore", "mini.qgalore",
                            "mini.pretraining")


@dataclass(frozen=True)
class PretrainHParams:
    """Hyperparameters of one method's run (defaults: the lab's tiny-model choices).

    ``lr`` is the peak learning rate; GaLore's ``scale`` α multiplies the projected updates, so
    the paper pairs α = 0.25 with a larger lr (0.01 against 0.001 for its baselines).

    Explained in :doc:`/labs/galore/pretraining`.
    """

    lr: float = 3e-3  #: peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)  #: Adam's (β1, β2), the same for every method
    eps: float = 1e-8  #: Adam's ε (torch and bitsandbytes default; the paper's text)
    weight_decay: float = 0.0  #: decoupled weight decay (the paper's runs use none)
    rank: int = 32  #: r, the rank of GaLore, of the low-rank factors and of LoRA; r/min(m, n) = 1/4 here
    update_proj_gap: int = 50  #: T, steps between subspace updates (the paper's is 200)
    scale: float = 0.25  #: GaLore's α (paper)
    lora_alpha: float | None = None  #: LoRA's α (None means 2 r)
    warmup: float = 0.1  #: share of the steps with linear warmup (the paper's 10%)
    min_lr_ratio: float = 0.1  #: the cosine ends at this share of the peak (the paper's 10%)
    seed: int = 0  #: seeds the low-rank factors' and LoRA's init and the INT8 path's rounding
    density: float = 0.03  #: SLTrain's δ, the sparse support's share of each matrix (the paper's 0.03)
    sltrain_alpha: float = 32.0  #: SLTrain's α; the product B A is scaled by α/r (the paper's 32 at 60M)

    def __post_init__(self) -> None:
        for name in ("lr", "scale", "sltrain_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        for name in ("rank", "update_proj_gap"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be a share of the steps in [0, 1), got {self.warmup!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if isinstance(self.density, bool) or not isinstance(self.density, numbers.Real) or not 0 < self.density <= 1:
            raise ValueError(f"density must be a number in (0, 1], got {self.density!r}")
        if not self.weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


class CosineSchedule:
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` of it (the GaLore paper's).

    Multiplies the initial ``lr`` of every param group of each optimizer in ``targets``, and the
    ``lr`` attribute of any other target (per-layer hook optimizers), by ::

        f(s) = (s + 1) / w                                   for s < w
        f(s) = ρ + (1 − ρ) · (1 + cos(π (s − w) / (S − w))) / 2   after

    at step ``s`` (0-based), ``w`` warmup steps, ``S`` steps, ``ρ = min_lr_ratio``. Call
    :meth:`step` once per training step (the trainer does).

    Explained in :doc:`/labs/galore/pretraining`.
    """

    def __init__(self, targets: Iterable[Any], total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.1):
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Integral) or not (
            0 <= warmup_steps < total_steps
        ):
            raise ValueError(f"warmup_steps must be an integer in [0, total_steps), got {warmup_steps!r}")
        self.targets = list(targets)
        for t in self.targets:
            if not isinstance(t, torch.optim.Optimizer) and not hasattr(t, "lr"):
                raise TypeError(f"targets must be optimizers or objects with an lr attribute, got {type(t).__name__}")
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.min_lr_ratio = float(min_lr_ratio)
        self.base = [
            [g["lr"] for g in t.param_groups] if isinstance(t, torch.optim.Optimizer) else float(t.lr)
            for t in self.targets
        ]
        self.last_step = 0
        self._apply()

    def factor(self, step: int) -> float:
        """f(step): the multiplier of the peak learning rate at 0-based ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        f = self.factor(self.last_step)
        for t, base in zip(self.targets, self.base):
            if isinstance(t, torch.optim.Optimizer):
                for g, lr in zip(t.param_groups, base):
                    g["lr"] = lr * f
            else:
                t.lr = base * f

    def step(self) -> None:
        """Advance one step and set the targets' learning rates (call after the optimizer's step)."""
        self.last_step += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The current learning rate of each target (its first group's, for an optimizer)."""
        f = self.factor(self.last_step)
        return [(b[0] if isinstance(b, list) else b) * f for b in self.base]

    def state_dict(self) -> dict[str, Any]:
        """The step count, all a resumed run needs."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the saved step and set the learning rates for it."""
        self.last_step = int(state["last_step"])
        self._apply()


def run_memory(config: Any, method: str, rank: int, **options: Any) -> dict[str, float]:
    """What :mod:`mini.lm.memory` counts for one run of ``method`` in this module's setups, in bytes.

    Keys: ``weights`` (float32 weights; LoRA's adapters and the low-rank factors as built;
    INT8 codes with a float32 scale and a uint8 zero point per group of 256 for the projections
    of ``qgalore_int8``), ``weights_added`` (``weights`` minus the float32 model a baseline
    process holds: negative where a method replaces dense weights), ``grads`` (alive at the
    peak: all of them, except for ``qgalore_int8``, whose projections' gradients live one at a
    time inside backward while the other parameters' are kept for the optimizer's step),
    ``state`` (moments and projection bases as the optimizers store them: float32, 8-bit
    codes with a float32 absmax per block of 256, INT4 bases with a float32 scale and a uint8
    zero point per group). ``options`` go to :func:`~mini.lm.memory.tensor_breakdown` (for
    example SLTrain's ``density``).

    Explained in :doc:`/labs/galore/pretraining`.
    """
    if method not in MEMORY_METHOD:
        raise ValueError(f"method must be one of {list(MEMORY_METHOD)}, got {method!r}")
    mm = MEMORY_METHOD[method]
    kw: dict[str, Any] = dict(weight_bytes=4, state_bytes=4, proj_bits=32)
    if mm == "qgalore":  # INT4 bases: float32 scale + uint8 zero point = 2.5 bytes per group parameter
        kw.update(proj_bits=4, group_param_bytes=2.5)
    kw.update(options)
    tensors = tensor_breakdown(config, mm, rank=rank if mm != "adam" else None, **kw)
    float_model = {t.name: t.weights for t in tensor_breakdown(config, "adam", weight_bytes=4)}
    weights = 0.0
    for t in tensors:  # the float path of Q-GaLore keeps float32 weights
        weights += float_model[t.name] if method == "qgalore" else t.weights
    if method == "qgalore_int8":
        grads = sum(t.grads for t in tensors if not t.projected) + max(t.grads for t in tensors if t.projected)
    else:
        grads = sum(t.grads for t in tensors)
    return {"weights": weights, "weights_added": weights - sum(float_model.values()), "grads": grads,
            "state": sum(t.states + t.projector for t in tensors)}


class _MomentsAndBases:
    """The per-layer optimizer's state without its rounding generator (5 KB of RNG state that is
    not optimizer state in the papers' sense): what :func:`~mini.lm.measure.state_bytes` counts."""

    def __init__(self, layerwise: Int8LayerwiseQGaLore) -> None:
        self.layerwise = layerwise

    def state_dict(self) -> dict[str, Any]:
        return {"states": self.layerwise.state_dict()["states"]}


def _adam_kwargs(hp: PretrainHParams) -> dict[str, Any]:
    return {"lr": hp.lr, "betas": hp.betas, "eps": hp.eps, "weight_decay": hp.weight_decay}


def _galore_groups(model: nn.Module, hp: PretrainHParams) -> list[dict[str, Any]]:
    return galore_param_groups(model, rank=hp.rank, update_proj_gap=hp.update_proj_gap, scale=hp.scale,
                               proj_type="std")


def setup_method(
    model: nn.Module, method: str, steps: int, *, device: str | torch.device | None = None, **hparams: Any
) -> TrainSetup:
    """The :class:`~mini.lm.measure.TrainSetup` of ``method`` (one of :data:`PRETRAINING_METHODS`)
    for ``model``, with a :class:`CosineSchedule` over ``steps``; ``hparams`` are
    :class:`PretrainHParams` fields. The model may be converted in place (low-rank, LoRA, INT8).

    ``device`` (:func:`mini.runtime.resolve_device`): the model is moved there first, so the
    converted layers, the optimizer's state and the INT8 path's rounding generator live there
    too; None leaves the model where it is and builds everything beside it.

    Explained in :doc:`/labs/galore/pretraining`.
    """
    if method not in PRETRAINING_METHODS:
        raise ValueError(f"method must be one of {list(PRETRAINING_METHODS)}, got {method!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    hp = PretrainHParams(**hparams)
    dev = place_model(model, device)
    if method == "qgalore_int8" and dev.type == "meta":
        raise ValueError(f"device must be 'cpu' or 'cuda' for method 'qgalore_int8', got {device!r} (model on "
                         f"{dev}): its stochastic rounding needs a generator, which the meta device has not")
    holders: list[Any] = []
    info = None
    if method == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), **_adam_kwargs(hp))
    elif method == "adamw_alpha":
        regular, projected = _galore_groups(model, hp)
        optimizer = torch.optim.AdamW(
            [regular, {"params": projected["params"], "lr": hp.lr * hp.scale}], **_adam_kwargs(hp))
    elif method in ("galore", "galore_pm"):
        optimizer = GaLoreAdamW(_galore_groups(model, hp), project_moments=method == "galore_pm", **_adam_kwargs(hp))
        info = lambda: {"n_svd": optimizer.n_svd()}  # noqa: E731
    elif method == "galore8bit":
        optimizer = GaLoreAdamW8bit(_galore_groups(model, hp), **_adam_kwargs(hp))
        info = lambda: {"n_svd": optimizer.n_svd()}  # noqa: E731
    elif method == "qgalore":
        optimizer = QGaLoreAdamW8bit(_galore_groups(model, hp), **_adam_kwargs(hp))
        info = lambda: {"n_svd": optimizer.n_svd()}  # noqa: E731
    elif method == "low_rank":
        report = to_low_rank(model, hp.rank, seed=hp.seed)
        optimizer = torch.optim.AdamW(model.parameters(), **_adam_kwargs(hp))
        info = lambda: {"replaced": len(report.replaced)}  # noqa: E731
    elif method == "sltrain":
        sl_report = convert_to_sltrain(model, hp.rank, hp.density, hp.sltrain_alpha, seed=hp.seed)
        optimizer = torch.optim.AdamW(model.parameters(), **_adam_kwargs(hp))
        info = lambda: {"replaced": len(sl_report.replaced), "index_entries": sl_report.index_entries}  # noqa: E731
    elif method == "lora":
        with torch.random.fork_rng(devices=[]):  # peft draws A's init from the global generator
            torch.manual_seed(hp.seed)
            model = apply_lora(model, hp.rank, alpha=hp.lora_alpha, train_other=True)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **_adam_kwargs(hp))
    else:  # qgalore_int8
        report = replace_linears(model, lambda name, lin: Int8Linear.from_linear(lin, group_size=256))
        generator = torch.Generator(device=dev).manual_seed(hp.seed)  # on the layers' device
        layerwise = Int8LayerwiseQGaLore(model, rank=hp.rank, update_proj_gap=hp.update_proj_gap, scale=hp.scale,
                                         generator=generator, **_adam_kwargs(hp))
        optimizer = GaLoreAdamW8bit([p for p in model.parameters() if p.requires_grad], **_adam_kwargs(hp))
        holders = [optimizer, _MomentsAndBases(layerwise)]
        int8_bytes = sum(m.nbytes for m in model.modules() if isinstance(m, Int8Linear))
        info = lambda: {"n_svd": layerwise.n_svd(), "int8_weight_bytes": int8_bytes,  # noqa: E731
                        "replaced": len(report.replaced)}
    warmup = int(round(hp.warmup * steps))
    targets = [optimizer] + ([layerwise] if method == "qgalore_int8" else [])
    schedule = CosineSchedule(targets, steps, warmup, hp.min_lr_ratio)
    return TrainSetup(model=model, optimizer=optimizer, state_holders=holders or [optimizer], scheduler=schedule,
                      info=info)


def run_spec(
    method: str | None,
    trainer: TrainerConfig,
    model: dict[str, Any] | None = None,
    n_documents: int = 2000,
    data_seed: int = 0,
    model_seed: int = 0,
    threads: int | None = None,
    mmap_threshold: int | None = DEFAULT_MMAP_THRESHOLD,
    device: str | torch.device | None = None,
    **hparams: Any,
) -> RunSpec:
    """The :class:`~mini.lm.measure.RunSpec` of ``method`` (None: the baseline that trains nothing).

    ``mmap_threshold=None`` leaves the child's allocator at glibc's (faster) default, for runs
    whose peak memory is not read (see :func:`mini.lm.measure.fix_malloc_thresholds`).
    ``device``: where the child trains (:func:`mini.runtime.resolve_device`). Peak memory is
    measured on the CPU only (it is the process's resident set): a run on ``"cuda"`` needs
    ``mmap_threshold=None``, else :class:`~mini.lm.measure.RunSpec` raises ValueError.

    Every run preloads the libraries of all methods (peft, mini.galore, mini.qgalore), so the
    baseline's peak memory carries the same imports.

    Explained in :doc:`/labs/galore/pretraining`.
    """
    if method is not None and method not in PRETRAINING_METHODS:
        raise ValueError(f"method must be one of {list(PRETRAINING_METHODS)} or None, got {method!r}")
    if method is not None:
        PretrainHParams(**hparams)  # validate here, not in the child
    return RunSpec(
        name=method or "baseline",
        setup=setup_method if method is not None else None,
        setup_kwargs={"method": method, "steps": trainer.steps, **hparams} if method is not None else {},
        model=dict(model or {}),
        model_seed=model_seed,
        n_documents=n_documents,
        data_seed=data_seed,
        trainer=trainer,
        preload=PRELOAD,
        threads=threads,
        mmap_threshold=mmap_threshold,
        device=device,
    )
