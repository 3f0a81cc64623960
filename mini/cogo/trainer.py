"""Train many seeds of the modular-addition network at once: full batch, Adam, closed-form grads.

Paper: Yuandong Tian, "Composing Global Optimizers to Reasoning Tasks via Algebraic Objects in
Neural Nets", arXiv 2410.01779 (2024). The book's Part I trains with this module in
``labs/cogo/`` and compares what gradient descent finds with the constructions of
``book/cogo/theory.ipynb``.

What is trained. S independent networks (seeds), each ``o = Wc (Wa e_a + Wb e_b)^2`` with
``Wa, Wb`` (q, d), ``Wc`` (d, q), on the d² pairs (a, b) with target ``(a + b) mod d``. Each seed
has its own 90/10 split of the pairs (``mask[s]`` = 1 on its training pairs) and its own loss

    L_s = (1 / n_s) Σ_{(a,b) in train_s} ||P⊥ (o_ab - e_y)||²,   P⊥ = I - 1 1ᵀ / d.

The optimizer minimises ``Σ_s L_s``, one step for all seeds at once. Gradients come in closed
form from :func:`mini.cogo.kernel.fused_loss_and_grads` (the Triton kernel on CUDA, the
PyTorch reference ``loss_and_grads_reference`` on CPU; the derivation is in that module); they
are written into ``.grad`` and ``torch.optim.Adam`` steps.

Speed on a CPU. The closed form writes into the same ``.grad`` buffers and scratch buffers every
step (fresh multi-megabyte temporaries cost a page fault per 4 KB page), and Adam runs its fused
kernel (``fused=True``: one pass over each tensor). At d = 11, q = 128, 10 seeds, one thread, a
step takes about 0.6 ms on our 2-core machine (``bench/cogo_step.py``). Threads: with two torch
threads on two cores that another process also uses, each parallel region waits for the
descheduled thread, and a step can take several times as long as on one thread (the notebooks
run on one; see :mod:`mini.runtime`).

Design choices, and why:

- **Seeds' losses are summed, never averaged.** Averaging would multiply each seed's gradient by
  1/S while Adam's coupled L2 term ``wd · W`` keeps its size, so the effective weight decay
  would grow with S, and a run's result would depend on how many seeds ran beside it. With the
  sum, seed s sees exactly the gradient it would see alone: a single-seed run equals the same
  seed inside a batch (tested).
- **Adam with ``weight_decay`` (coupled L2), not AdamW.** That is what the official code runs
  (``torch.optim.Adam(..., weight_decay=wd)``): the decay ``wd · W`` is added to the gradient
  *before* Adam's normalisation, so it acts as an L2 penalty ``wd/2 ||W||²`` on the loss, the
  regulariser under which the paper argues lower-order solutions win. AdamW's decoupled decay
  is a different regulariser with a different optimum scale.
- Adam is elementwise, so one optimizer over the (S, ...) tensors is S independent optimizers.
- Initialisation as ``nn.Linear``'s default, uniform in ±1/sqrt(fan_in): ``Wa, Wb`` ~ U(±1/√d),
  ``Wc`` ~ U(±1/√q); seed s draws from a generator seeded with ``config.seed + s``, and its split
  from one seeded with ``SPLIT_SEED_OFFSET + config.seed + s``: both independent of S.

Defaults are those of the official sweep behind the paper (lr 0.01, weight decay 5e-5, 10% test,
10,000 full-batch epochs); d = 11, q = 128 is the book's small setting (seconds per run on CPU).
Differences from the official code: it trains one seed at a time with ``nn.Linear`` layers and
autograd, in float32; :func:`train_per_seed_autograd` is that loop, kept for the benchmark and
for the test that both give the same trajectory.

Explained in :doc:`/labs/cogo/gd_solutions`.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mini.cogo.kernel import fused_loss_and_grads, loss_and_grads_reference
from mini.kernels.dispatch import resolve_backend

__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "train_per_seed_autograd",
    "init_weights",
    "make_masks",
    "evaluate",
    "SPLIT_SEED_OFFSET",
]

SPLIT_SEED_OFFSET = 1_000_003  # the split generator of seed s is seeded with this + seed + s


@dataclass
class TrainConfig:
    """Configuration of :func:`train` (defaults: the official sweep; d, q: the book's small run).

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """

    d: int = 11  #: modulus; the pairs are Z_d × Z_d
    q: int = 128  #: hidden width
    seeds: int = 10  #: number of independent networks trained at once
    steps: int = 10_000  #: full-batch Adam steps (the official code's epochs)
    lr: float = 0.01  #: Adam learning rate (the sweep's; the README's 0.002 is not what it ran)
    weight_decay: float = 5e-5  #: Adam's coupled L2 coefficient
    test_fraction: float = 0.1  #: share of the d² pairs held out per seed
    seed: int = 0  #: seed s uses generators seeded by seed + s (init) and the split offset
    dtype: torch.dtype = torch.float32  #: float32 (kernel path on CUDA) or float64 (reference)
    device: str = "cpu"  #: "cpu" or "cuda"
    progress: bool = True  #: show a tqdm progress bar
    log_every: int = 100  #: record loss and accuracies every this many steps (and at the end)
    backend: str = "auto"  #: the backend of the gradient kernel, "auto" (Triton on CUDA), "triton", "interpret" or "reference"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``TypeError``/``ValueError`` naming the field for an invalid value."""

        def integer(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"TrainConfig.{name} must be an integer >= {lo}, got {v!r}")
            if v < lo:
                raise ValueError(f"TrainConfig.{name} must be an integer >= {lo}, got {v}")

        def real(name: str) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
                raise TypeError(f"TrainConfig.{name} must be a finite real number, got {v!r}")
            return float(v)

        integer("d", 2)
        integer("q", 1)
        integer("seeds", 1)
        integer("steps", 0)
        integer("seed", 0)
        integer("log_every", 1)
        if real("lr") <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if real("weight_decay") < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        tf = real("test_fraction")
        if not 0 <= tf < 1:
            raise ValueError(f"TrainConfig.test_fraction must satisfy 0 <= test_fraction < 1, got {tf}")
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"TrainConfig.dtype must be torch.float32 or torch.float64, got {self.dtype}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"TrainConfig.device must name a torch device, got {self.device!r}") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"TrainConfig.device is {self.device!r} but CUDA is not available here; use 'cpu'")
        from mini.kernels.dispatch import BACKENDS

        if self.backend not in BACKENDS:
            raise ValueError(f"TrainConfig.backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclass
class TrainResult:
    """Final weights (float64, CPU), masks, history and timing of :func:`train`.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """

    Wa: torch.Tensor  #: (S, q, d)
    Wb: torch.Tensor  #: (S, q, d)
    Wc: torch.Tensor  #: (S, d, q)
    mask: torch.Tensor  #: (S, d, d) bool, True on seed s's training pairs
    history: dict[str, np.ndarray]  #: "step" (T,), "train_loss", "train_acc", "test_acc" (T, S)
    elapsed_s: float  #: wall-clock seconds of the training loop
    config: TrainConfig = field(repr=False)  #: the configuration it was trained with
    steps_done: int = 0  #: Adam steps behind these weights, those of a resumed run included
    optimizer_state: dict[str, Any] | None = field(default=None, repr=False)  #: Adam's state_dict (CPU), for ``train(resume=...)``

    def weights(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Seed s's ``(Wa (q, d), Wb (q, d), Wc (d, q))``."""
        return self.Wa[s], self.Wb[s], self.Wc[s]


def init_weights(config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """nn.Linear-style uniform init, seed s from ``torch.Generator().manual_seed(seed + s)``.

    Drawn in float64 on the CPU (Wa, then Wb, then Wc), then cast: independent of S, dtype
    and device. Returns ``Wa, Wb`` (S, q, d) and ``Wc`` (S, d, q).

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    d, q = config.d, config.q
    Wa, Wb, Wc = [], [], []
    for s in range(config.seeds):
        g = torch.Generator().manual_seed(config.seed + s)
        Wa.append((torch.rand(q, d, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(d))
        Wb.append((torch.rand(q, d, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(d))
        Wc.append((torch.rand(d, q, generator=g, dtype=torch.float64) * 2 - 1) / math.sqrt(q))
    cast = lambda xs: torch.stack(xs).to(device=config.device, dtype=config.dtype)  # noqa: E731
    return cast(Wa), cast(Wb), cast(Wc)


def make_masks(config: TrainConfig) -> torch.Tensor:
    """(S, d, d) bool: True on each seed's training pairs, ``floor(test_fraction · d²)`` held out.

    Seed s permutes the d² pairs (index ``a · d + b``) with a generator seeded by
    ``SPLIT_SEED_OFFSET + seed + s``; the first ``n_test`` of the permutation are the test pairs.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    d = config.d
    n_test = int(config.test_fraction * d * d)
    masks = torch.ones(config.seeds, d * d, dtype=torch.bool)
    for s in range(config.seeds):
        g = torch.Generator().manual_seed(SPLIT_SEED_OFFSET + config.seed + s)
        perm = torch.randperm(d * d, generator=g)
        masks[s, perm[:n_test]] = False
    return masks.reshape(config.seeds, d, d)


@torch.no_grad()
def evaluate(Wa: torch.Tensor, Wb: torch.Tensor, Wc: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-seed train loss, train accuracy and test accuracy (NaN without test pairs).

    ``Wa, Wb`` (S, q, d), ``Wc`` (S, d, q), ``mask`` (S, d, d) bool or 0/1. One seed at a time,
    so the (d, d, q) intermediate stays small.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    S, q, d = Wa.shape
    ar = torch.arange(d, device=Wa.device)
    y = (ar[:, None] + ar[None, :]) % d  # (d, d)
    onehot = torch.nn.functional.one_hot(y, d).to(Wa.dtype)  # (d, d, d)
    out = {k: np.empty(S) for k in ("train_loss", "train_acc", "test_acc")}
    for s in range(S):
        h = Wa[s].T[:, None, :] + Wb[s].T[None, :, :]  # (d, d, q)
        o = (h * h) @ Wc[s].T  # (d, d, d)
        correct = (o.argmax(dim=-1) == y).double()
        train_m = mask[s].double()
        test_m = 1.0 - train_m
        u = o - onehot
        per_pair = (u - u.mean(dim=-1, keepdim=True)).pow(2).sum(-1).double()  # (d, d)
        n_train, n_test = float(train_m.sum()), float(test_m.sum())
        out["train_loss"][s] = float((per_pair * train_m).sum()) / n_train
        out["train_acc"][s] = float((correct * train_m).sum()) / n_train
        out["test_acc"][s] = float((correct * test_m).sum()) / n_test if n_test > 0 else float("nan")
    return out


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False, mininterval=2.0)


def _log_steps(config: TrainConfig) -> set[int]:
    return set(range(0, config.steps + 1, config.log_every)) | {config.steps}


def _finish(params, mask, hist, elapsed, config, steps_done=None, opt=None) -> TrainResult:
    history = {k: np.asarray(v) for k, v in hist.items()}
    Wa, Wb, Wc = (p.detach().to(device="cpu", dtype=torch.float64).clone() for p in params)
    state = None
    if opt is not None:
        state = opt.state_dict()
        for st in state["state"].values():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    st[k] = v.detach().to("cpu").clone()
    return TrainResult(
        Wa=Wa, Wb=Wb, Wc=Wc, mask=mask.cpu(), history=history, elapsed_s=elapsed, config=config,
        steps_done=config.steps if steps_done is None else steps_done, optimizer_state=state,
    )


def _start_weights(config: TrainConfig, init: Any, resume: TrainResult | None) -> tuple[torch.Tensor, ...]:
    """The starting ``(Wa, Wb, Wc)`` on the config's device and dtype: init, resume or fresh."""
    S, q, d = config.seeds, config.q, config.d
    if init is not None and resume is not None:
        raise ValueError("pass at most one of init and resume, got both")
    if resume is not None:
        if not isinstance(resume, TrainResult):
            raise TypeError(f"resume must be a TrainResult of an earlier train(), got {type(resume).__name__}")
        if resume.optimizer_state is None:
            raise ValueError("resume has no optimizer_state: it did not come from train()")
        init = (resume.Wa, resume.Wb, resume.Wc)
    if init is None:
        return init_weights(config)
    if not isinstance(init, (tuple, list)) or len(init) != 3:
        raise TypeError(f"init must be a tuple (Wa, Wb, Wc), got {type(init).__name__}")
    out = []
    for name, w, shape in zip(("Wa", "Wb", "Wc"), init, ((S, q, d), (S, q, d), (S, d, q))):
        if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
            raise TypeError(f"init {name} must be a real floating torch.Tensor, got {type(w).__name__}")
        if tuple(w.shape) != shape:
            what = "resume" if resume is not None else "init"
            raise ValueError(
                f"{what} {name} has shape {tuple(w.shape)}, the config needs (seeds, q, d) = {shape}"
                if name != "Wc" else
                f"{what} {name} has shape {tuple(w.shape)}, the config needs (seeds, d, q) = {shape}"
            )
        out.append(w.detach().to(device=config.device, dtype=config.dtype).clone())
    return tuple(out)


def _resolve_config(config: TrainConfig | None, overrides: dict[str, Any]) -> TrainConfig:
    """``config`` with ``overrides`` applied (a fresh default one when None), validated."""
    if config is None:
        return TrainConfig(**overrides)
    if overrides:
        return dataclasses.replace(config, **overrides)  # replace re-runs __post_init__'s checks
    config.validate()
    return config


Callback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Any]


def train(
    config: TrainConfig | None = None,
    *,
    init: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    resume: TrainResult | None = None,
    callback: Callback | None = None,
    callback_every: int | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``config.seeds`` networks at once; ``train(d=7, steps=200)`` overrides fields.

    Full batch, ``torch.optim.Adam(lr, weight_decay)`` on the sum of the seeds' losses,
    gradients in closed form (:func:`mini.cogo.kernel.fused_loss_and_grads`).

    - ``init``: start from these weights, ``Wa, Wb`` (S, q, d) and ``Wc`` (S, d, q), instead of
      :func:`init_weights` (the split is still :func:`make_masks`'s).
    - ``resume``: a :class:`TrainResult` of an earlier call; its weights, Adam state and split
      carry on for ``config.steps`` more steps (step numbers continue from its ``steps_done``).
      Training N steps, then resuming for M, gives the same weights as N + M steps at once.
    - ``callback(step, Wa, Wb, Wc)``: called with the current weights (read-only views on the
      training device) at step 0 and every ``callback_every`` steps (default ``log_every``),
      and after the last step; e.g. to record how the potentials evolve.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    config = _resolve_config(config, overrides)
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    every = config.log_every if callback_every is None else callback_every
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"callback_every must be an integer >= 1, got {callback_every!r}")
    device = torch.device(config.device)
    backend = config.backend
    if backend == "auto" and config.dtype != torch.float32:
        backend = "reference"  # the kernel is float32-only
    Wa, Wb, Wc = _start_weights(config, init, resume)
    offset = 0 if resume is None else int(resume.steps_done)
    if resume is not None:
        mask_bool = resume.mask.to(device=device, dtype=torch.bool)
    else:
        mask_bool = make_masks(config).to(device)
    mask = mask_bool.to(config.dtype)  # (S, d, d)
    params = [torch.nn.Parameter(w) for w in (Wa, Wb, Wc)]
    # On a CPU, Adam's fused kernel: one pass over each tensor instead of one per operation
    # (0.06 against 0.16 ms at d = 11, q = 128, 10 seeds); the same update up to rounding
    # (tested against the per-seed loop).
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay,
                           fused=True if device.type == "cpu" else None)
    if resume is not None:
        state = resume.optimizer_state
        opt.load_state_dict(state)
        for group in opt.param_groups:  # this config's hyper-parameters, not the earlier run's
            group["lr"], group["weight_decay"] = config.lr, config.weight_decay
    log_at = _log_steps(config)
    hist: dict[str, list[Any]] = {"step": [], "train_loss": [], "train_acc": [], "test_acc": []}

    def log(step: int) -> None:
        ev = evaluate(params[0].detach(), params[1].detach(), params[2].detach(), mask_bool)
        hist["step"].append(offset + step)
        for k in ("train_loss", "train_acc", "test_acc"):
            hist[k].append(ev[k])
        bar.set_postfix(loss=f"{float(np.mean(ev['train_loss'])):.3g}", acc=f"{float(np.mean(ev['train_acc'])):.3f}", refresh=False)

    def call(step: int) -> None:
        if callback is not None:
            callback(offset + step, *(p.detach() for p in params))

    weights = [p.detach() for p in params]
    reference = resolve_backend(backend, device) == "reference"
    if reference:  # the closed form writes into the .grad buffers and reuses its scratch buffers
        loss_buf = torch.empty(config.seeds, device=device, dtype=config.dtype)
        grads = (loss_buf, *(torch.empty_like(w) for w in weights))  # (loss, dWa, dWb, dWc)
        for p, g in zip(params, grads[1:]):
            p.grad = g
        workspace: dict[str, torch.Tensor] = {}

    bar = _progress(config.steps, config.progress, f"cogo d={config.d} q={config.q} S={config.seeds}")
    t0 = time.perf_counter()
    try:
        for step in range(config.steps):
            if step in log_at:
                log(step)
            if step % every == 0:
                call(step)
            if reference:
                loss_and_grads_reference(
                    *weights, mask, out=grads, validate=(step == 0), workspace=workspace
                )
            else:
                _, dWa, dWb, dWc = fused_loss_and_grads(*weights, mask, backend=backend, validate=(step == 0))
                for p, g in zip(params, (dWa, dWb, dWc)):
                    p.grad = g
            opt.step()
            bar.update(1)
        log(config.steps)
        call(config.steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    return _finish(params, mask_bool, hist, elapsed, config, steps_done=offset + config.steps, opt=opt)


def train_per_seed_autograd(config: TrainConfig | None = None, **overrides: Any) -> TrainResult:
    """The paper's training loop: one network at a time, ``nn.Linear`` layers, autograd, Adam.

    Same init (:func:`init_weights`), split (:func:`make_masks`) and hyper-parameters as
    :func:`train`, so both give the same trajectory; the loss is written as the official "mse"
    ``Σ_g (o_g - ō)² - 2 (o_y - ō) + 1 - 1/d`` per example, averaged over the training pairs.
    Kept as the benchmark's baseline and as a test of :func:`train`.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    config = _resolve_config(config, overrides)
    d, q = config.d, config.q
    device = torch.device(config.device)
    Wa0, Wb0, Wc0 = init_weights(config)
    masks = make_masks(config).to(device)
    log_at = _log_steps(config)
    hist_seeds: list[dict[str, list[Any]]] = []
    final: list[tuple[torch.Tensor, ...]] = []
    bar = _progress(config.steps * config.seeds, config.progress, f"cogo autograd d={d} q={q}")
    t0 = time.perf_counter()
    try:
        for s in range(config.seeds):
            layera = torch.nn.Linear(d, q, bias=False, device=device, dtype=config.dtype)
            layerb = torch.nn.Linear(d, q, bias=False, device=device, dtype=config.dtype)
            layerc = torch.nn.Linear(q, d, bias=False, device=device, dtype=config.dtype)
            with torch.no_grad():
                layera.weight.copy_(Wa0[s])
                layerb.weight.copy_(Wb0[s])
                layerc.weight.copy_(Wc0[s])
            pairs = masks[s].flatten().nonzero().flatten()  # training pair indices a·d + b
            a, b = pairs // d, pairs % d
            y = (a + b) % d
            xa = torch.nn.functional.one_hot(a, d).to(config.dtype)  # (n, d)
            xb = torch.nn.functional.one_hot(b, d).to(config.dtype)
            modules = (layera, layerb, layerc)
            opt = torch.optim.Adam([m.weight for m in modules], lr=config.lr, weight_decay=config.weight_decay)
            hist: dict[str, list[Any]] = {"step": [], "train_loss": [], "train_acc": [], "test_acc": []}
            for step in range(config.steps + 1):
                if step in log_at:
                    ev = evaluate(layera.weight.detach()[None], layerb.weight.detach()[None],
                                  layerc.weight.detach()[None], masks[s][None])
                    hist["step"].append(step)
                    for k in ("train_loss", "train_acc", "test_acc"):
                        hist[k].append(ev[k][0])
                if step == config.steps:
                    break
                o = layerc((layera(xa) + layerb(xb)) ** 2)  # (n, d)
                ob = o.mean(dim=1, keepdim=True)
                per_example = ((o - ob) ** 2).sum(1) - 2 * (o.gather(1, y[:, None]) - ob).squeeze(1) + 1 - 1 / d
                loss = per_example.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
            hist_seeds.append(hist)
            final.append(tuple(m.weight.detach() for m in modules))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    params = [torch.stack([f[i] for f in final]) for i in range(3)]
    history: dict[str, Any] = {"step": hist_seeds[0]["step"]}
    for k in ("train_loss", "train_acc", "test_acc"):
        history[k] = np.stack([np.asarray(h[k]) for h in hist_seeds], axis=1)  # (T, S)
    return _finish(params, masks, history, elapsed, config)
