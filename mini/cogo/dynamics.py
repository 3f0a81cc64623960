"""Training dynamics of the modular-addition network: widths, trajectories of the potentials.

Paper: Yuandong Tian, "Composing Global Optimizers to Reasoning Tasks via Algebraic Objects in
Neural Nets", arXiv 2410.01779 (2024), section 6 (gradient dynamics): over-parameterization
asymptotically decouples the training dynamics of the frequencies and is beneficial. The lab
``labs/cogo/dynamics.ipynb`` measures both sides of that statement with these helpers:

- :func:`width_sweep` trains the same seeds at several widths ``q`` (one :func:`~mini.cogo.trainer.train` call per
  width, all seeds batched) and returns per-seed outcomes: success (train and test accuracy 1),
  final loss, and the first logged step at which the training loss falls below a cut.
- :class:`PotentialRecorder` is a ``callback`` for :func:`mini.cogo.trainer.train`: at chosen
  steps it records, per seed and per frequency k = 1 … (d−1)/2, the diagonal potential
  ``r̃_kkk`` (target 1), the off-target mass ``off_k`` (below), the order (live nodes, the rule
  of :func:`mini.cogo.analysis.analyze`) and the coefficient energy.
- :func:`settle_steps` reads, from such a trajectory, the step from which a condition holds to
  the end; :func:`spearman` ranks how well a quantity at initialisation orders them.

The off-target mass. For centred weights the loss of output frequency k is, by the
decomposition of :mod:`mini.cogo.fourier`, ``ℓ_k = −2 Re r̃_kkk + Σ_{k1,k2≠0} |r̃_{k1k2k}|² + …``;
adding 1 and completing the square, ::

    ℓ_k + 1 = |r̃_kkk − 1|² + off_k,

where ``off_k ≥ 0`` collects every other potential at output k: the off-diagonal
``|r̃_{k1k2k}|²`` and the R*/R_n sums. ``off_k`` is computed on the centred network
(:func:`mini.cogo.fourier.center`), where the identity is exact.

Explained in :doc:`/labs/cogo/dynamics`.
"""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .analysis import dead_cut
from .fourier import center, per_frequency_loss, potentials
from .model import check_d
from .trainer import TrainConfig, train

__all__ = [
    "frequency_orders",
    "log_steps",
    "PotentialRecorder",
    "settle_steps",
    "spearman",
    "WidthSweep",
    "width_sweep",
    "sweep_to_json",
    "sweep_from_json",
    "width_summary",
    "stage_steps",
]


def _check_batch(Wa: Any, Wb: Any, Wc: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ws = []
    for w, n in zip((Wa, Wb, Wc), ("Wa", "Wb", "Wc")):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() != 3:
            raise ValueError(f"{n} must be 3-D (S, ...), got shape {tuple(w.shape)}")
        ws.append(w.detach().to("cpu", torch.float64))
    Wa, Wb, Wc = ws
    S, q, d = Wa.shape
    if tuple(Wb.shape) != (S, q, d) or tuple(Wc.shape) != (S, d, q):
        raise ValueError(
            "Wa, Wb must be (S, q, d) and Wc (S, d, q), got "
            f"{tuple(Wa.shape)}, {tuple(Wb.shape)}, {tuple(Wc.shape)}"
        )
    return Wa, Wb, Wc


def frequency_orders(
    Wa: torch.Tensor, Wb: torch.Tensor, Wc: torch.Tensor, threshold: float | None = None,
    rule: str = "scaled",
) -> np.ndarray:
    """Order (live nodes) of each frequency k = 1 … (d−1)/2 of S networks: int array (S, K).

    The rule of :func:`mini.cogo.analysis.analyze` without its factorization (so it is cheap
    enough to call during training): node j belongs to ``argmax_{k ≤ (d−1)/2} |z_{a,k,j}|`` when
    that maximum exceeds :func:`mini.cogo.analysis.dead_cut`. ``Wa, Wb`` (S, q, d), ``Wc`` (S, d, q).

    Explained in :doc:`/labs/cogo/dynamics`.
    """
    Wa, Wb, Wc = _check_batch(Wa, Wb, Wc)
    S, q, d = Wa.shape
    check_d(d, odd=True)
    cut = dead_cut(d, threshold, rule)
    K = (d - 1) // 2
    za = torch.fft.fft(Wa, dim=2) / d  # (S, q, d): z_{a,k,j} at [s, j, k]
    mag = za[:, :, : K + 1].abs()  # (S, q, K+1)
    best, kbest = mag.max(dim=2)  # (S, q)
    live = best > cut  # (S, q)
    out = np.zeros((S, K), dtype=np.int64)
    for k in range(1, K + 1):
        out[:, k - 1] = ((kbest == k) & live).sum(dim=1).numpy()
    return out


def log_steps(steps: int, n: int = 60, first: int = 10) -> list[int]:
    """About ``n`` distinct steps from 0 to ``steps``, log-spaced from ``first`` (0 and ``steps`` included).

    Training changes fast at first and slowly later: the recorder samples accordingly.

    Explained in :doc:`/labs/cogo/dynamics`.
    """
    for name, v, lo in (("steps", steps, 1), ("n", n, 2), ("first", first, 1)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if first >= steps:
        return [0, int(steps)]
    grid = np.geomspace(first, steps, n - 1)
    return sorted({0, int(steps), *(int(round(x)) for x in grid)})


@dataclass
class PotentialRecorder:
    """A ``callback`` for :func:`mini.cogo.trainer.train` recording per-frequency trajectories.

    At each step of ``steps`` (call the trainer with ``callback_every=1``, or with any divisor
    of the wanted steps) it stores, for every seed s and frequency k = 1 … K, K = (d−1)/2:
    ``diag[t, s, k-1]`` = ``r̃_kkk`` (complex), ``off[t, s, k-1]`` = the off-target mass
    ``off_k`` (module docstring), ``orders[t, s, k-1]`` (:func:`frequency_orders`) and
    ``energy[t, s, k-1]`` = ``Σ_j |z_{a,k,j}|² + |z_{b,k,j}|² + |z_{c,k,j}|²``. Potentials and
    ``off`` are those of the centred network; orders and energy read the weights as they are.
    Other steps return at once, so the cost is that of the recorded steps only.

    Explained in :doc:`/labs/cogo/dynamics`.
    """

    steps: Sequence[int]  #: the steps to record
    threshold: float | None = None  #: dead-node cut passed to :func:`frequency_orders`
    rule: str = "scaled"  #: its rule
    recorded: list[int] = field(default_factory=list, init=False)  #: the steps recorded so far
    seconds: float = field(default=0.0, init=False)  #: time spent recording
    _rows: list[tuple[np.ndarray, ...]] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        steps = list(self.steps)
        if not steps or any(
            isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in steps
        ):
            raise ValueError(f"steps must be a non-empty sequence of integers >= 0, got {self.steps!r}")
        self._want = set(int(s) for s in steps)
        dead_cut(11, self.threshold, self.rule)  # validates threshold and rule early

    def __call__(self, step: int, Wa: torch.Tensor, Wb: torch.Tensor, Wc: torch.Tensor) -> None:
        if step not in self._want or (self.recorded and step <= self.recorded[-1]):
            return
        t0 = time.perf_counter()
        Wa, Wb, Wc = _check_batch(Wa, Wb, Wc)
        S, q, d = Wa.shape
        K = (d - 1) // 2
        ks = torch.arange(1, K + 1)
        diag = np.empty((S, K), dtype=np.complex128)
        off = np.empty((S, K))
        energy = np.empty((S, K))
        for s in range(S):
            Wcen = center(Wa[s], Wb[s], Wc[s])
            pots = potentials(*Wcen)
            lk = per_frequency_loss(pots)  # (d,)
            r = pots["r"][ks, ks, ks]  # (K,) r̃_kkk
            diag[s] = r.numpy()
            off[s] = (lk[ks] + 1 - (r - 1).abs() ** 2).numpy()  # ℓ_k + 1 = |r̃_kkk − 1|² + off_k
            za = torch.fft.fft(Wa[s], dim=1)[:, 1 : K + 1] / d  # (q, K)
            zb = torch.fft.fft(Wb[s], dim=1)[:, 1 : K + 1] / d  # (q, K)
            zc = torch.fft.ifft(Wc[s], dim=0)[1 : K + 1]  # (K, q)
            energy[s] = (
                (za.abs() ** 2).sum(0) + (zb.abs() ** 2).sum(0) + (zc.abs() ** 2).sum(1)
            ).numpy()
        orders = frequency_orders(Wa, Wb, Wc, self.threshold, self.rule)
        self.recorded.append(int(step))
        self._rows.append((diag, off, orders, energy))
        self.seconds += time.perf_counter() - t0

    def _stack(self, i: int) -> np.ndarray:
        if not self._rows:
            raise ValueError("nothing recorded yet: pass the recorder to train(callback=...)")
        return np.stack([row[i] for row in self._rows])

    @property
    def step(self) -> np.ndarray:
        """(T,) the recorded steps."""
        return np.asarray(self.recorded)

    @property
    def diag(self) -> np.ndarray:
        """(T, S, K) complex ``r̃_kkk``."""
        return self._stack(0)

    @property
    def off(self) -> np.ndarray:
        """(T, S, K) the off-target mass ``off_k``."""
        return self._stack(1)

    @property
    def orders(self) -> np.ndarray:
        """(T, S, K) live nodes on frequency k."""
        return self._stack(2)

    @property
    def energy(self) -> np.ndarray:
        """(T, S, K) coefficient energy at frequency k."""
        return self._stack(3)


def settle_steps(steps: Any, ok: Any) -> np.ndarray:
    """The first step from which ``ok`` holds at every later recorded step; NaN if not at the end.

    ``steps`` (T,), ``ok`` (T, ...) bool; returns float (...) (NaN where ``ok[-1]`` is False).
    E.g. ``settle_steps(rec.step, abs(rec.diag - 1) <= 0.05)``.

    Explained in :doc:`/labs/cogo/dynamics`.
    """
    steps = np.asarray(steps, dtype=float)
    ok = np.asarray(ok)
    if steps.ndim != 1 or ok.ndim < 1 or ok.shape[0] != steps.shape[0] or ok.dtype != bool:
        raise ValueError(
            f"steps must be (T,) and ok a bool array (T, ...), got {steps.shape} and "
            f"{ok.shape} {ok.dtype}"
        )
    bad_after = np.flip(np.logical_or.accumulate(np.flip(~ok, 0), axis=0), 0)  # (T, ...)
    # first index t with no failure at t or later
    good = ~bad_after
    first = np.argmax(good, axis=0)
    out = steps[first].astype(float)
    out[~good[-1]] = np.nan
    return out


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation of two 1-D samples (average ranks for ties); NaN if one is constant.

    Explained in :doc:`/labs/cogo/dynamics`.
    """
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"x and y must have the same size >= 2, got {x.size} and {y.size}")

    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(v.size)
        r[order] = np.arange(v.size, dtype=float)
        for u in np.unique(v):  # ties share their mean rank
            m = v == u
            r[m] = r[m].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    sx, sy = rx.std(), ry.std()
    if sx == 0 or sy == 0:
        return float("nan")
    return float(((rx - rx.mean()) * (ry - ry.mean())).mean() / (sx * sy))


@dataclass
class WidthSweep:
    """Per-seed outcomes of :func:`width_sweep`; arrays are (W, S): widths by seeds.

    Explained in :doc:`/labs/cogo/dynamics`.
    """

    widths: list[int]  #: the widths q, in the order trained
    seeds: list[int]  #: the seeds (network s of every width uses seed ``seeds[s]``)
    final_loss: np.ndarray  #: training loss after the last step
    train_acc: np.ndarray  #: final training accuracy
    test_acc: np.ndarray  #: final test accuracy
    fit_step: np.ndarray  #: first logged step with training loss below ``loss_cut`` (NaN if never)
    loss_cut: float  #: the cut of ``fit_step``
    seconds: list[float]  #: training time per width
    #: per width, the logged steps (T,) and training losses (T, S)
    curves: dict[int, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)

    @property
    def success(self) -> np.ndarray:
        """Boolean array of shape (W, S), True where training and test accuracy are both 1."""
        return (self.train_acc == 1.0) & (self.test_acc == 1.0)

    def rate(self, seeds: Sequence[int] | None = None) -> np.ndarray:
        """(W,) share of successful seeds, over ``seeds`` (default: all)."""
        idx = self._idx(seeds)
        return self.success[:, idx].mean(axis=1)

    def _idx(self, seeds: Sequence[int] | None) -> list[int]:
        if seeds is None:
            return list(range(len(self.seeds)))
        pos = {s: i for i, s in enumerate(self.seeds)}
        missing = [s for s in seeds if s not in pos]
        if missing:
            raise ValueError(f"seeds {missing} were not trained; trained: {self.seeds}")
        return [pos[s] for s in seeds]


def width_sweep(
    config: TrainConfig, widths: Sequence[int], loss_cut: float = 1e-3, progress: bool = False
) -> WidthSweep:
    """Train ``config`` at every width in ``widths`` (seeds batched): per-seed outcomes.

    Seed s of every width uses the trainer's seed ``config.seed + s``, so a width's networks
    differ from another's only by the width (the generator draws the first rows alike but the
    shapes differ, so they are not nested networks). ``loss_cut`` sets :attr:`WidthSweep.fit_step`.

    Explained in :doc:`/labs/cogo/dynamics`.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    widths = list(widths)
    if not widths or any(
        isinstance(q, bool) or not isinstance(q, numbers.Integral) or q < 1 for q in widths
    ):
        raise ValueError(f"widths must be a non-empty sequence of integers >= 1, got {widths!r}")
    if isinstance(loss_cut, bool) or not isinstance(loss_cut, (int, float)) or not (
        loss_cut > 0 and math.isfinite(loss_cut)
    ):
        raise ValueError(f"loss_cut must be a positive finite number, got {loss_cut!r}")
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ("loss", "tr", "te", "fit")}
    seconds, curves = [], {}
    from tqdm import tqdm

    for q in tqdm(widths, desc="widths", disable=not progress, leave=False):
        res = train(config, q=int(q), progress=False)
        h = res.history
        steps, loss = np.asarray(h["step"], dtype=float), np.asarray(h["train_loss"])  # (T,), (T, S)
        below = loss < loss_cut
        fit = np.where(below.any(axis=0), steps[np.argmax(below, axis=0)], np.nan)  # (S,)
        rows["loss"].append(loss[-1])
        rows["tr"].append(np.asarray(h["train_acc"])[-1])
        rows["te"].append(np.asarray(h["test_acc"])[-1])
        rows["fit"].append(fit)
        seconds.append(res.elapsed_s)
        curves[int(q)] = (steps, loss)
    return WidthSweep(
        widths=[int(q) for q in widths],
        seeds=list(range(config.seed, config.seed + config.seeds)),
        final_loss=np.stack(rows["loss"]),
        train_acc=np.stack(rows["tr"]),
        test_acc=np.stack(rows["te"]),
        fit_step=np.stack(rows["fit"]),
        loss_cut=float(loss_cut),
        seconds=seconds,
        curves=curves,
    )


def _plain(a: np.ndarray) -> Any:
    """A JSON-ready nested list (NaN as None)."""
    return [_plain(x) for x in a] if isinstance(a, np.ndarray) and a.ndim else (
        None if not np.isfinite(float(a)) else float(a)
    )


def sweep_to_json(sweep: WidthSweep) -> dict[str, Any]:
    """The per-seed arrays of a :class:`WidthSweep` as plain JSON (NaN as null), curves left out.

    :func:`sweep_from_json` reads it back (the lab's ``FULL=1`` results file).

    Explained in :doc:`/labs/cogo/dynamics`.
    """
    if not isinstance(sweep, WidthSweep):
        raise TypeError(f"sweep must be a WidthSweep, got {type(sweep).__name__}")
    out: dict[str, Any] = {"widths": sweep.widths, "seeds": sweep.seeds, "loss_cut": sweep.loss_cut}
    for k in ("final_loss", "train_acc", "test_acc", "fit_step"):
        out[k] = _plain(np.asarray(getattr(sweep, k), dtype=float))
    out["seconds"] = [round(float(s), 2) for s in sweep.seconds]
    return out


def sweep_from_json(data: dict[str, Any]) -> WidthSweep:
    """Inverse of :func:`sweep_to_json` (null back to NaN).

    Explained in :doc:`/labs/cogo/dynamics`.
    """
    need = {"widths", "seeds", "loss_cut", "final_loss", "train_acc", "test_acc", "fit_step"}
    if not isinstance(data, dict) or not need <= set(data):
        raise ValueError(f"data must be a dict with keys {sorted(need)}")
    arr = lambda k: np.array(  # noqa: E731
        [[np.nan if v is None else v for v in row] for row in data[k]], dtype=float
    )
    return WidthSweep(
        widths=list(data["widths"]), seeds=list(data["seeds"]), final_loss=arr("final_loss"),
        train_acc=arr("train_acc"), test_acc=arr("test_acc"), fit_step=arr("fit_step"),
        loss_cut=float(data["loss_cut"]), seconds=list(data.get("seconds", [])),
    )


def width_summary(sweep: WidthSweep, d: int, batches: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Per-batch measures of over-parameterization from a sweep at modulus ``d``.

    With ``q_max`` the largest width, ``q_below`` the largest below ``2d`` (the nodes of F4/6) and
    ``2d``, ``3(d−1)`` (F6's) among the widths, for each batch (a list of seeds): ``"fit_max"``,
    ``"fit_below"`` the share of networks whose final loss is below the cut at ``q_max``,
    ``q_below``; ``"speed"`` the median step to fit at ``q_max`` over that at ``3(d−1)``;
    ``"loss_ratio"`` the median final loss at ``2d`` over that at ``q_max``. Also the widths.

    Explained in :doc:`/labs/cogo/dynamics`.
    """
    d = check_d(d, odd=True)
    w = sweep.widths
    q46, q6 = 2 * d, 3 * (d - 1)
    if q46 not in w or q6 not in w or not any(q < q46 for q in w):
        raise ValueError(f"widths must include 2d = {q46}, 3(d-1) = {q6} and one below 2d, got {w}")
    i_max, i46, i6 = w.index(max(w)), w.index(q46), w.index(q6)
    i_below = w.index(max(q for q in w if q < q46))
    fitted = sweep.final_loss < sweep.loss_cut
    out: dict[str, Any] = {"q_max": w[i_max], "q_below": w[i_below], "q_F46": q46, "q_F6": q6}
    cols = {k: [] for k in ("fit_max", "fit_below", "speed", "loss_ratio")}
    for b in batches:
        idx = sweep._idx(b)
        cols["fit_max"].append(float(fitted[i_max, idx].mean()))
        cols["fit_below"].append(float(fitted[i_below, idx].mean()))
        f_max, f6 = sweep.fit_step[i_max, idx], sweep.fit_step[i6, idx]
        ok = np.isfinite(f_max).any() and np.isfinite(f6).any()
        cols["speed"].append(float(np.nanmedian(f_max) / np.nanmedian(f6)) if ok else float("nan"))
        loss = sweep.final_loss
        cols["loss_ratio"].append(float(np.median(loss[i46, idx]) / np.median(loss[i_max, idx])))
    return out | cols


def stage_steps(rec: PotentialRecorder, diag_tol: float = 0.05, off_cut: float = 1e-3) -> dict[str, np.ndarray]:
    """When each frequency of each network passes the stages of training: arrays (S, K).

    ``"half"``: the first recorded step with ``Re r̃_kkk ≥ 0.5``; ``"diag"``: from which
    ``|r̃_kkk − 1| ≤ diag_tol`` to the end; ``"off"``: from which ``off_k ≤ off_cut``; ``"order"``:
    from which the order equals its final value (NaN where a stage is not reached).

    Explained in :doc:`/labs/cogo/dynamics`.
    """
    steps, diag, off, orders = rec.step, rec.diag, rec.off, rec.orders
    reached = diag.real >= 0.5  # (T, S, K)
    half = np.where(reached.any(0), steps[np.argmax(reached, axis=0)], np.nan)
    return {
        "half": half.astype(float),
        "diag": settle_steps(steps, np.abs(diag - 1) <= diag_tol),
        "off": settle_steps(steps, off <= off_cut),
        "order": settle_steps(steps, orders == orders[-1][None]),
    }
