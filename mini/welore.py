"""WeLore: one-shot, data-agnostic low-rank compression by a global threshold on normalised spectra.

Part II, WeLore chapter (``book/welore/``). Jaiswal, Yin, Zhang, Liu, Zhao, Tian, Wang, "From
GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients", arXiv
2407.11239 (2024); the ICML 2025 version is titled "From Low Rank Gradient Subspace Stabilization
to Low-Rank Weights: Observations, Theories, and Applications". Official code: VITA-Group/WeLore.

**The method.**
For every projection matrix ``W`` (m × n, out × in) of every decoder layer (by default the
attention ``q, k, v, o`` and MLP ``gate, up, down`` projections,
:data:`~mini.lm.lowrank.DEFAULT_PATTERNS`), with its singular values in descending order and
``r = min(m, n)``::

    (1)  W = U diag(s) Vᵀ,                 s₁ ≥ s₂ ≥ … ≥ s_r ≥ 0
    (2)  s̃ᵢ = (sᵢ − s_r) / (s₁ − s_r)       min-max normalisation, s̃ ∈ [0, 1]
    (3)  k_pruned(τ) = #{i : s̃ᵢ < τ},       k = r − k_pruned   (the kept rank)
    (4)  ρ(τ) = Σ_W k_pruned,W(τ) / Σ_W r_W  (the model's effective rank reduction)

One threshold τ serves the whole model, so a matrix with a heavy-tailed spectrum (a few large
values, many small ones) loses many directions and a matrix with a flat spectrum loses few: the
rank reduction is non-uniform across layers. A matrix whose factorisation pays off becomes a
**Low-Rank Component** (LRC), replaced by its two SVD factors, trainable::

    (5)  LRC  ⇔  k (m + n) < m n  ⇔  k < m n / (m + n)      (the break-even rank)
    (6)  W_k = U_k diag(s_k) V_kᵀ = B A,
         B = U_k diag(√s_k) (m × k),   A = diag(√s_k) V_kᵀ (k × n)

(:class:`LowRankComponent`: ``up.weight = B``, ``down.weight = A``, ``y = x Aᵀ Bᵀ``); every other
matrix is a **Non-Low-Rank Component** (N-LRC), kept dense and frozen. Fine-tuning then trains
only the LRC factors (:func:`freeze_for_lrc_finetuning`); embeddings, head and N-LRCs stay
frozen. The numbers (1)-(6) are this module's own labels, not the paper's; the chapter relates
them to the paper's text and to the official scripts.

The paper's thesis, which the chapter tests: the matrices whose gradients become low rank early
in training (GaLore's observation, :mod:`mini.lm.spectra`) are the ones whose weights become low
rank, so they are the LRCs.

**Merging back, and LoRA.**
An LRC is a plain product of two linears: :meth:`LowRankComponent.merge` returns the
``nn.Linear`` whose weight is ``B A`` (``= W_k`` right after compression), and
:func:`merge_lrcs` does it for a whole model. Unlike LoRA (Hu et al., 2022), which adds a
trainable ``ΔW = B A`` (``B = 0`` at start) to a frozen dense ``W``, an LRC *replaces* ``W`` by its
rank-k truncation: the discarded part ``W − W_k`` is gone, the factors start at the SVD (not at
zero), and training them moves the layer within rank k, with fewer parameters than ``W`` itself.

**Saving and loading.** :func:`save_compressed` writes a directory that :func:`load_pretrained`
reads back bit for bit and that transformers' ``from_pretrained`` refuses with an error naming
:func:`load_pretrained` (a plain ``save_pretrained`` directory reopened with ``from_pretrained``
re-initialises every LRC at random); :func:`load_compressed` loads a compressed state dict into
a fresh uncompressed model of the same config.

**What differs from the official code, and why.**

- **τ by bisection, not a lookup table.** The official scripts read τ from per-model tables keyed
  by the target reduction (and two of them disagree for LLaMA-2-7B at 10%). Here
  :func:`threshold_for_reduction` bisects τ on the model at hand. ρ(τ) is a step function
  (non-decreasing, constant between consecutive distinct s̃ values), so a target is hit only up to
  the step granularity: the function returns the τ whose ρ is **closest** to the target; when two
  levels are equally close it takes the **smaller** reduction (it never removes more than asked
  on a tie), and it reports the achieved ρ. The returned τ is moved to the middle of the interval
  of thresholds that give that ρ, so a reader's recomputation is not at the mercy of rounding.
- **Break-even rule, not ``min_ratio``.** The official code makes a matrix an LRC when
  ``k_pruned / r > min_ratio``, with ``min_ratio = 0`` in the compression script (any pruned
  direction means factorisation, even when the factors are larger than ``W``) and ``0.4999`` in
  the fine-tuning scripts (the break-even point of a *square* matrix). Rule (5) is the break-even
  point of any m × n matrix (for the tiny Llama's 352 × 128 MLP matrices it is k < 93.9, i.e.
  ``k_pruned / r ≳ 0.27``, not 0.5). Pass ``min_ratio=`` to :func:`compress` to use the official
  rule instead.
- **N-LRCs keep their full dense weight** (``nlrc="dense"``, the default), as in the official
  ``do_rank_reduction``: a matrix that does not become an LRC is left untouched and frozen, its
  would-be-pruned directions are *not* removed, and the official "reduction ratio" counts only the
  LRCs' pruned ranks. The report therefore gives both the **attempted** reduction (4) (what τ
  asks for) and the **achieved** one (what the compressed model applies, N-LRCs at full rank).
  For comparisons at equal total rank, ``nlrc="truncate"`` replaces an N-LRC's weight by its
  rank-k truncation stored dense (frozen; no parameter saving): the achieved reduction then equals
  the attempted one. ``min_ratio=0.0`` (every pruned matrix an LRC) does the same with factors.
- **Rank-deficient matrices.** The rank in (3)-(4) is ``r = min(m, n)``, as in the official code,
  and (2) normalises over all r values. When the smallest value is zero (or numerically tiny, as
  float32 SVD leaves it), (2) becomes ``s̃ = s / s₁``: its continuous limit, so nothing jumps as a
  matrix approaches rank deficiency. The (numerically) zero directions get ``s̃ ≈ 0`` and are the
  first pruned at any τ > 0, which is right: dropping them costs at most their own size. We do
  not switch to the numerical rank, which would make the rule jump between "tiny" and "zero".
  The one case (2) cannot handle is a flat spectrum (``s₁ − s_r ≤ 100·eps·s₁``: the zero matrix,
  a scaled orthogonal matrix): no direction is less important than another, so ``s̃ ≡ 1`` and
  nothing is pruned for any τ ≤ 1. τ lives in [0, 1]; since ``s̃₁ = 1``, at least one direction of
  every matrix is always kept.
- **Uniform baseline.** The official ``uniform_rank_pruning`` removes ``floor(ρ r)`` directions
  of every matrix, which undershoots ρ. :func:`uniform_pruned_ranks` removes ``floor(ρ r)`` or one
  more (largest remainders first, Hamilton's method), so the total is ``round(ρ Σ r)``: the
  comparison with WeLore is at equal total rank.
- **Precision and devices.** SVDs run in float32 (float64 for a float64 model) on the weight's
  device; :func:`analyze_spectra` caches them in :class:`Spectra`, so a sweep over targets
  computes them once; the factors are cast to the weight's dtype. :func:`compress` without
  ``spectra`` keeps singular values only and factorises one matrix at a time (caching every
  factor costs about 3× the bf16 weights: 41 GB at 7B). The official code hard-codes ``cuda:0``, bfloat16 and
  absolute paths.
- **Fine-tuning set.** :func:`freeze_for_lrc_finetuning` trains the LRC factors only; the official
  continual fine-tuning script also leaves the RMSNorm weights trainable (it freezes only the
  embeddings, the head and the N-LRCs): ``train_norms=True`` reproduces that.

Explained in :doc:`/book/welore/theory`.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from mini.lm.lowrank import DEFAULT_PATTERNS, ConversionReport, check_rank_for, replace_linears
from mini.lm.spectra import singular_values

__all__ = [
    "MatrixSpectrum",
    "Spectra",
    "analyze_spectra",
    "normalized_singular_values",
    "pruned_ranks",
    "effective_rank_reduction",
    "Threshold",
    "threshold_for_reduction",
    "uniform_pruned_ranks",
    "break_even_rank",
    "pays_off",
    "LowRankComponent",
    "MatrixReport",
    "CompressionReport",
    "compress",
    "lrc_parameters",
    "freeze_for_lrc_finetuning",
    "lrc_ranks",
    "merge_lrcs",
    "load_compressed",
    "save_compressed",
    "load_pretrained",
    "METHODS",
    "NLRC_MODES",
]

#: Rank-selection methods of :func:`compress`.
METHODS: tuple[str, ...] = ("welore", "uniform")
#: What :func:`compress` does with a Non-Low-Rank Component that τ would prune.
NLRC_MODES: tuple[str, ...] = ("dense", "truncate")

_FLAT_EPS = 100.0  # a spectrum is flat when s₁ − s_r ≤ _FLAT_EPS · eps(dtype) · s₁
_TIE_TOL = 1e-12  # two reduction levels this close to equally far from the target are a tie


# ----------------------------------------------------------------------------- input checks
def _check_target(target: Any) -> float:
    if isinstance(target, bool) or not isinstance(target, numbers.Real):
        raise TypeError(f"target must be a real number in (0, 1), got {type(target).__name__} {target!r}")
    t = float(target)
    if not 0.0 < t < 1.0:  # also rejects NaN
        raise ValueError(
            f"target must be an effective rank reduction strictly between 0 and 1 "
            f"(e.g. 0.5 for 50%), got {target!r}"
        )
    return t


def _check_tau(tau: Any) -> float:
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not math.isfinite(float(tau)):
        raise ValueError(f"tau must be a finite real number, got {tau!r}")
    return float(tau)


def _check_spectra(spectra: Any) -> "Spectra":
    if not isinstance(spectra, Spectra):
        raise TypeError(f"spectra must be a Spectra (from analyze_spectra), got {type(spectra).__name__}")
    return spectra


def _as_spectra(spectra: Any) -> "Spectra":
    """A :class:`Spectra`, or one built from a mapping ``name → s`` or a sequence of ``s`` (named "0", "1", …)."""
    if isinstance(spectra, Spectra):
        return spectra
    allowed = ("spectra must be a Spectra (from analyze_spectra), a mapping name -> 1-D tensor of singular "
               "values, or a non-empty sequence of such tensors")
    if isinstance(spectra, Mapping):
        if not spectra:
            raise ValueError(f"{allowed}; got an empty mapping")
        return Spectra.from_singular_values(spectra)
    if isinstance(spectra, Sequence) and not isinstance(spectra, (str, bytes)):
        if not spectra:
            raise ValueError(f"{allowed}; got an empty {type(spectra).__name__}")
        return Spectra.from_singular_values({str(i): s for i, s in enumerate(spectra)})
    raise TypeError(f"{allowed}; got {type(spectra).__name__}")


# ----------------------------------------------------------------------------- spectra
def normalized_singular_values(s: Tensor) -> Tensor:
    """Equation (2): ``s̃ = (s − min s) / (max s − min s)`` in float64; ``s̃ ≡ 1`` for a flat spectrum.

    ``s`` is a 1-D tensor of singular values (any order). A spectrum is flat when
    ``max s − min s ≤ 100·eps·max s`` (eps of ``s``'s dtype): the zero matrix or a scaled
    orthogonal matrix, where no direction is less important than another.

    Explained in :doc:`/book/welore/theory`.
    """
    if not isinstance(s, Tensor):
        raise TypeError(f"s must be a torch.Tensor, got {type(s).__name__}")
    if s.ndim != 1 or s.numel() == 0:
        raise ValueError(f"s must be a non-empty 1-D tensor of singular values, got shape {tuple(s.shape)}")
    eps = torch.finfo(s.dtype).eps if s.dtype.is_floating_point else torch.finfo(torch.float32).eps
    x = s.detach().double()
    top, low = float(x.max()), float(x.min())
    if low < 0 or not math.isfinite(top) or not math.isfinite(low):
        raise ValueError(f"s must hold finite non-negative singular values, got min {low}, max {top}")
    spread = top - low
    if top == 0.0 or spread <= _FLAT_EPS * eps * top:
        return torch.ones_like(x)
    return (x - low) / spread  # (r,) in [0, 1]


@dataclass
class MatrixSpectrum:
    """The SVD of one projection matrix: name, shape (out, in), singular values and the factors.

    ``s`` is descending, float32 (float64 for a float64 weight), of length ``r = min(out, in)``.
    ``U`` (out × r) and ``Vh`` (r × in) are kept for :func:`compress`, or None (recomputed then).

    Explained in :doc:`/book/welore/theory`.
    """

    name: str  #: qualified module name, e.g. ``model.layers.0.self_attn.q_proj``
    shape: tuple[int, int]  #: (out_features, in_features) = (m, n)
    s: Tensor  #: (r,) singular values, descending
    U: Tensor | None = None  #: (m, r) left singular vectors
    Vh: Tensor | None = None  #: (r, n) right singular vectors, transposed
    _s_tilde: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.s, Tensor):
            raise TypeError(f"s of {self.name} must be a torch.Tensor, got {type(self.s).__name__}")
        if self.s.ndim != 1 or self.s.numel() == 0:
            raise ValueError(
                f"s of {self.name} must be a non-empty 1-D tensor of singular values, got shape "
                f"{tuple(self.s.shape)} (spectra are computed from 2-D matrices)"
            )
        shape = tuple(int(d) for d in self.shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape of {self.name} must be (out, in) of a 2-D matrix, got {self.shape!r}")
        if self.s.numel() != min(shape):
            raise ValueError(
                f"{self.name}: a {shape[0]} x {shape[1]} matrix has min(out, in) = {min(shape)} "
                f"singular values, got {self.s.numel()}"
            )
        self.shape = (shape[0], shape[1])
        s_sorted = torch.sort(self.s.detach(), descending=True).values
        if not torch.equal(s_sorted, self.s.detach()):
            raise ValueError(f"s of {self.name} must be sorted in descending order")

    @classmethod
    def from_matrix(cls, name: str, matrix: Tensor, keep_factors: bool = True) -> "MatrixSpectrum":
        """Equation (1) for a 2-D ``matrix`` (out × in), float32 (float64 stays float64)."""
        if not isinstance(matrix, Tensor):
            raise TypeError(f"matrix {name} must be a torch.Tensor, got {type(matrix).__name__}")
        if matrix.ndim != 2:
            raise ValueError(f"matrix {name} must be 2-D (out x in), got shape {tuple(matrix.shape)}")
        if not keep_factors:
            return cls(name, tuple(matrix.shape), singular_values(matrix))
        w = matrix.detach()
        w = w.double() if w.dtype == torch.float64 else w.float()
        U, s, Vh = torch.linalg.svd(w, full_matrices=False)  # (m, r), (r,), (r, n)
        return cls(name, tuple(matrix.shape), s, U, Vh)

    @property
    def full_rank(self) -> int:
        """``r = min(out, in)``, the rank of (3)-(4)."""
        return int(self.s.numel())

    @property
    def numerical_rank(self) -> int:
        """Number of singular values above ``r · eps · s₁`` (NumPy's ``matrix_rank`` rule); for reports."""
        tol = self.full_rank * torch.finfo(self.s.dtype).eps * float(self.s[0])
        return int((self.s > tol).sum())

    @property
    def s_tilde(self) -> np.ndarray:
        """Equation (2), float64, descending like ``s`` (computed once)."""
        if self._s_tilde is None:
            self._s_tilde = normalized_singular_values(self.s).cpu().numpy()
        return self._s_tilde

    def pruned(self, tau: float) -> int:
        """Equation (3): ``k_pruned = #{i : s̃ᵢ < τ}``."""
        return int(np.count_nonzero(self.s_tilde < _check_tau(tau)))

    def frobenius_sq(self) -> float:
        """``Σ sᵢ² = ‖W‖_F²``, used to check that a spectrum belongs to a weight."""
        return float((self.s.double() ** 2).sum())


class Spectra:
    """The spectra of a model's projection matrices (an ordered mapping name → :class:`MatrixSpectrum`).

    Built by :func:`analyze_spectra` (from a model) or :meth:`from_singular_values` (from bare
    spectra, e.g. random ones in a test or a chapter cell).

    Explained in :doc:`/book/welore/theory`.
    """

    def __init__(self, matrices: Sequence[MatrixSpectrum]) -> None:
        items = list(matrices)
        if not items:
            raise ValueError("spectra must hold at least one matrix")
        self.matrices: dict[str, MatrixSpectrum] = {}
        for m in items:
            if not isinstance(m, MatrixSpectrum):
                raise TypeError(f"spectra must hold MatrixSpectrum objects, got {type(m).__name__}")
            if m.name in self.matrices:
                raise ValueError(f"spectra holds the name {m.name!r} twice")
            self.matrices[m.name] = m
        self._sorted: np.ndarray | None = None

    @classmethod
    def from_singular_values(
        cls, values: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, int]] | None = None
    ) -> "Spectra":
        """Spectra from ``name → s`` (1-D, any order: sorted here); ``shapes`` default to square."""
        if not isinstance(values, Mapping):
            raise TypeError(f"values must be a mapping name -> 1-D tensor, got {type(values).__name__}")
        out = []
        for name, s in values.items():
            if not isinstance(s, Tensor):
                try:
                    s = torch.as_tensor(s)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"values[{name!r}] must be a 1-D tensor of singular values, got "
                                    f"{type(s).__name__}") from None
            if s.ndim != 1:
                raise ValueError(
                    f"values[{name!r}] must be a 1-D tensor of singular values, got shape {tuple(s.shape)}"
                )
            s = torch.sort(s.detach(), descending=True).values
            shape = tuple(shapes[name]) if shapes is not None and name in shapes else (s.numel(), s.numel())
            out.append(MatrixSpectrum(str(name), shape, s))
        return cls(out)

    # mapping interface
    def names(self) -> list[str]:
        """Matrix names, in model order."""
        return list(self.matrices)

    def __getitem__(self, name: str) -> MatrixSpectrum:
        return self.matrices[name]

    def __contains__(self, name: object) -> bool:
        return name in self.matrices

    def __iter__(self) -> Iterator[MatrixSpectrum]:
        return iter(self.matrices.values())

    def __len__(self) -> int:
        return len(self.matrices)

    def __repr__(self) -> str:
        return f"Spectra({len(self)} matrices, total rank {self.total_rank})"

    @property
    def total_rank(self) -> int:
        """``Σ r``, the denominator of (4)."""
        return sum(m.full_rank for m in self)

    def singular_values(self) -> dict[str, Tensor]:
        """``name → s`` (descending), for plots."""
        return {m.name: m.s for m in self}

    def normalized(self) -> dict[str, np.ndarray]:
        """``name → s̃`` of (2), for plots."""
        return {m.name: m.s_tilde for m in self}

    def sorted_normalized(self) -> np.ndarray:
        """Every s̃ of every matrix in one ascending float64 array (the breakpoints of ρ(τ))."""
        if self._sorted is None:
            self._sorted = np.sort(np.concatenate([m.s_tilde for m in self]))
        return self._sorted


def _matching_linears(model: nn.Module, patterns: str | Sequence[str]) -> list[tuple[str, nn.Linear]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Sequence) or len(patterns) == 0:
        raise ValueError(f"patterns must be a non-empty sequence of regular expressions, got {patterns!r}")
    regexes = []
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"patterns must hold strings, got {type(p).__name__}")
        try:
            regexes.append(re.compile(p))
        except re.error as e:
            raise ValueError(f"patterns holds an invalid regular expression {p!r}: {e}") from None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    found = [(n, m) for n, m in linears if any(r.search(n) for r in regexes)]
    if not found:
        names = [n for n, _ in linears]
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(
            f"patterns {list(patterns)} match no nn.Linear of the model; its linear layers are: "
            f"{shown or 'none'}"
        )
    return found


def analyze_spectra(
    model: nn.Module,
    patterns: str | Sequence[str] = DEFAULT_PATTERNS,
    keep_factors: bool = True,
    progress: bool = False,
) -> Spectra:
    """Equation (1) for every ``nn.Linear`` whose qualified name matches ``patterns``.

    Patterns are regular expressions searched in the module name (default: the attention and MLP
    projections, :data:`~mini.lm.lowrank.DEFAULT_PATTERNS`); matching nothing is an error. SVDs
    run in float32 (float64 for float64 weights) on the weight's device; with ``keep_factors``
    the ``U``, ``Vh`` factors are cached for :func:`compress`.

    Explained in :doc:`/book/welore/theory`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = _matching_linears(model, patterns)
    from tqdm.auto import tqdm

    out = []
    for name, lin in tqdm(targets, desc="SVD", disable=not progress, leave=False):
        out.append(MatrixSpectrum.from_matrix(name, lin.weight, keep_factors=keep_factors))
    return Spectra(out)


# ----------------------------------------------------------------------------- thresholds
def pruned_ranks(spectra: Spectra | Mapping[str, Tensor] | Sequence[Tensor], tau: float) -> dict[str, int]:
    """Equation (3) for every matrix: ``name → k_pruned(τ)``.

    ``spectra``: a :class:`Spectra`, a mapping ``name → s`` or a sequence of ``s`` (named "0", "1", …).

    Explained in :doc:`/book/welore/theory`.
    """
    spectra = _as_spectra(spectra)
    tau = _check_tau(tau)
    return {m.name: m.pruned(tau) for m in spectra}


def effective_rank_reduction(spectra: Spectra | Mapping[str, Tensor] | Sequence[Tensor], tau: float) -> float:
    """Equation (4): ``ρ(τ) = Σ k_pruned / Σ r``, non-decreasing in τ, 0 at τ = 0.

    ``spectra`` as in :func:`pruned_ranks`.

    Explained in :doc:`/book/welore/theory`.
    """
    spectra = _as_spectra(spectra)
    return sum(pruned_ranks(spectra, tau).values()) / spectra.total_rank


class Threshold(NamedTuple):
    """What :func:`threshold_for_reduction` found: ``tau, achieved = threshold_for_reduction(...)``.

    Explained in :doc:`/book/welore/theory`.
    """

    tau: float  #: the global threshold τ ∈ [0, 1]
    achieved: float  #: ρ(τ), the attempted effective rank reduction (4) at that τ


def _count_below(sorted_values: np.ndarray, tau: float) -> int:
    return int(np.searchsorted(sorted_values, tau, side="left"))  # #{s̃ < τ}


def _closest_level(values: np.ndarray, target: float, count: Callable[[float], int], total: int) -> float:
    """τ whose level ``count(τ) / total`` is closest to ``target`` (the smaller on a tie).

    ``count`` is a non-decreasing step function of τ that changes only at the ascending
    breakpoints ``values`` (it depends on τ through ``#{s̃ < τ}`` per matrix). Bisection on [0, 1]
    keeps ``level(lo) < target ≤ level(hi)`` until ``lo`` and ``hi`` are adjacent floats; the τ
    returned is the middle of the interval of thresholds that give the chosen level.
    """
    def level(t: float) -> float:
        return count(t) / total

    lo, hi = 0.0, 1.0
    if level(hi) < target:
        chosen = hi
    else:
        # invariant: level(lo) < target <= level(hi); level(0) = 0 < target
        while True:
            mid = 0.5 * (lo + hi)
            if mid <= lo or mid >= hi:
                break
            if level(mid) < target:
                lo = mid
            else:
                hi = mid
        below, above = level(lo), level(hi)
        # the closer level wins; a tie (within rounding of the float target) goes to the
        # smaller one
        chosen = hi if (above - target) < (target - below) - _TIE_TOL else lo
    n_below = _count_below(values, chosen)
    # every τ in (values[n-1], values[n]] gives this level: take its middle
    if n_below == 0:
        return 0.0  # s̃ ≥ 0, so nothing is below 0
    if n_below == values.size:  # pragma: no cover - τ ≤ 1 and max s̃ = 1
        return chosen
    a, b = float(values[n_below - 1]), float(values[n_below])
    tau = 0.5 * (a + b)
    if not a < tau <= b:  # a and b adjacent floats
        tau = b
    return tau


def threshold_for_reduction(
    spectra: Spectra | Mapping[str, Tensor] | Sequence[Tensor], target: float
) -> Threshold:
    """The one global τ whose reduction ρ(τ) of (4) is closest to ``target`` ∈ (0, 1).

    ``spectra``: a :class:`Spectra`, a mapping ``name → s`` (1-D singular values, any
    order) or a sequence of ``s``. Bisection on [0, 1] keeps ``ρ(lo) < target ≤
    ρ(hi)`` until ``lo`` and ``hi`` are adjacent floats, so they straddle one step of
    ρ; the closer of the two levels wins, the smaller one on a tie (distances equal
    within 1e-12, so that 0.1 between 34/350 and 36/350 is a tie although the float
    0.1 is slightly above one tenth). A target above ρ(1) (every matrix keeps only its
    top direction, or its ties at the top) returns τ = 1's level. The τ returned is
    moved to the middle of the interval of thresholds that give the chosen level. This
    is the *attempted* reduction; what :func:`compress` applies can be less (N-LRCs
    keep their rank), see its ``exact_target``.

    Explained in :doc:`/book/welore/theory`.
    """
    spectra = _as_spectra(spectra)
    target = _check_target(target)
    values = spectra.sorted_normalized()  # ascending s̃ of every matrix
    total = spectra.total_rank
    tau = _closest_level(values, target, lambda t: _count_below(values, t), total)
    return Threshold(tau=float(tau), achieved=_count_below(values, tau) / total)


def _applied_threshold(spectra: Spectra, target: float, min_ratio: float | None, nlrc: str) -> float:
    """τ whose *applied* reduction under :func:`compress`'s rule is closest to ``target``.

    Applied: ``Σ k_pruned`` over the matrices that lose their pruned directions (the LRCs, and
    with ``nlrc="truncate"`` every matrix) over ``Σ r``; non-decreasing in τ (a matrix's
    ``k_pruned`` grows with τ, and once its factors pay off they keep paying off), constant
    between breakpoints, so :func:`_closest_level` applies.
    """
    mats = [(np.sort(m.s_tilde), m.full_rank, m.shape) for m in spectra]

    def count(t: float) -> int:
        total = 0
        for s_tilde, r, (m, n) in mats:
            kp = _count_below(s_tilde, t)
            if nlrc == "truncate" or (kp > 0 and (pays_off(r - kp, m, n) if min_ratio is None else kp / r > min_ratio)):
                total += kp
        return total

    return _closest_level(spectra.sorted_normalized(), target, count, spectra.total_rank)


def uniform_pruned_ranks(spectra: Spectra | Mapping[str, Tensor] | Sequence[Tensor], target: float) -> dict[str, int]:
    """The uniform baseline: remove the fraction ``target`` of every matrix's rank.

    Each matrix loses ``floor(target · r)`` directions or one more, the extra ones going to the
    largest remainders (model order on ties), so the total is ``round(target · Σ r)`` and the
    reduction matches WeLore's at equal total rank. At least one direction of each matrix is kept.
    ``spectra`` as in :func:`pruned_ranks`.

    Explained in :doc:`/book/welore/theory`.
    """
    spectra = _as_spectra(spectra)
    target = _check_target(target)
    ms = list(spectra)
    exact = [target * m.full_rank for m in ms]
    pruned = [min(int(math.floor(x)), m.full_rank - 1) for x, m in zip(exact, ms)]
    goal = int(round(target * spectra.total_rank))
    order = sorted(range(len(ms)), key=lambda i: -(exact[i] - math.floor(exact[i])))
    extra = goal - sum(pruned)
    for i in order:
        if extra <= 0:
            break
        if pruned[i] + 1 <= ms[i].full_rank - 1:
            pruned[i] += 1
            extra -= 1
    return {m.name: k for m, k in zip(ms, pruned)}


# ----------------------------------------------------------------------------- break-even rule
def break_even_rank(out_features: int, in_features: int) -> float:
    """``m n / (m + n)``: below this kept rank the two factors of (6) hold fewer numbers than ``W``.

    Explained in :doc:`/book/welore/theory`.
    """
    for name, v in (("out_features", out_features), ("in_features", in_features)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    m, n = int(out_features), int(in_features)
    return m * n / (m + n)


def pays_off(rank: int, out_features: int, in_features: int) -> bool:
    """Rule (5): ``rank · (m + n) < m · n`` (exact integer arithmetic).

    Explained in :doc:`/book/welore/theory`.
    """
    break_even_rank(out_features, in_features)  # validates the sizes
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 0:
        raise ValueError(f"rank must be a non-negative integer, got {rank!r}")
    m, n = int(out_features), int(in_features)
    return int(rank) * (m + n) < m * n


# ----------------------------------------------------------------------------- the LRC layer
class LowRankComponent(nn.Module):
    """A Low-Rank Component: ``y = up(down(x)) + b``, the trainable factors of (6).

    ``down.weight`` (rank × in) ``= diag(√s_k) V_kᵀ`` and ``up.weight`` (out × rank)
    ``= U_k diag(√s_k)`` after :meth:`from_svd`; the official code calls them ``V`` and ``U``.
    A bias, if any, is kept as a parameter that :func:`freeze_for_lrc_finetuning` freezes.

    Explained in :doc:`/book/welore/theory`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.rank = check_rank_for(rank, self.in_features, self.out_features)
        kw = {"dtype": dtype, "device": device}
        self.down = nn.Linear(self.in_features, self.rank, bias=False, **kw)  # weight (k, in)
        self.up = nn.Linear(self.rank, self.out_features, bias=False, **kw)  # weight (out, k)
        self.bias = nn.Parameter(torch.zeros(self.out_features, **kw)) if bias else None

    @classmethod
    def from_svd(
        cls,
        U: Tensor,
        s: Tensor,
        Vh: Tensor,
        rank: int,
        bias: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> "LowRankComponent":
        """The LRC of rank ``k`` from an SVD ``U`` (m × r), ``s`` (r,), ``Vh`` (r × n).

        As in (6). The factors are computed in ``U``'s precision and stored in ``dtype``
        (default ``U``'s).
        """
        for n_, t, nd in (("U", U, 2), ("s", s, 1), ("Vh", Vh, 2)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{n_} must be a torch.Tensor, got {type(t).__name__}")
            if t.ndim != nd:
                raise ValueError(f"{n_} must be {nd}-D, got shape {tuple(t.shape)}")
        m, r = U.shape
        if s.shape[0] != r or Vh.shape[0] != r:
            raise ValueError(
                f"U (m x r), s (r,), Vh (r x n) must agree on r, got {tuple(U.shape)}, "
                f"{tuple(s.shape)}, {tuple(Vh.shape)}"
            )
        n = Vh.shape[1]
        k = check_rank_for(rank, n, m)
        dtype = dtype or U.dtype
        root = s[:k].sqrt()  # (k,)
        lrc = cls(n, m, k, bias=bias is not None, dtype=dtype, device=U.device)
        with torch.no_grad():
            lrc.up.weight.copy_(U[:, :k] * root)  # (m, k) = U_k diag(√s_k)
            lrc.down.weight.copy_(root[:, None] * Vh[:k])  # (k, n) = diag(√s_k) V_kᵀ
            if bias is not None:
                lrc.bias.copy_(bias.detach())
        return lrc

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int) -> "LowRankComponent":
        """The LRC of rank ``k`` of an ``nn.Linear`` (float32 SVD, float64 for float64 weights)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        spec = MatrixSpectrum.from_matrix("linear", linear.weight)
        return cls.from_svd(spec.U, spec.s, spec.Vh, rank, bias=linear.bias, dtype=linear.weight.dtype)

    def dense_weight(self) -> Tensor:
        """``B A = up.weight @ down.weight`` (out × in): the matrix this layer applies."""
        return self.up.weight @ self.down.weight

    def merge(self) -> nn.Linear:
        """The equivalent dense ``nn.Linear`` (weight ``B A``, same bias): merging back for inference."""
        w = self.up.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=w.dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        """``y = x Aᵀ Bᵀ + b`` (under ``torch.autocast`` the bias is added in the output's dtype, as
        ``nn.Linear`` does)."""
        y = self.up(self.down(x))  # (..., k) -> (..., out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")


# ----------------------------------------------------------------------------- the report
@dataclass
class MatrixReport:
    """One row of a :class:`CompressionReport`: what happened to one matrix.

    Explained in :doc:`/book/welore/theory`.
    """

    name: str  #: qualified module name
    shape: tuple[int, int]  #: (out, in) = (m, n)
    full_rank: int  #: r = min(m, n)
    pruned: int  #: k_pruned the selection asked for (τ's, or the uniform baseline's)
    kept_rank: int  #: rank the layer applies now (r for an untouched dense N-LRC)
    is_lrc: bool  #: replaced by a LowRankComponent
    params_before: int  #: m·n (bias not counted)
    params_after: int  #: k(m + n) for an LRC, m·n for an N-LRC
    trainable: bool  #: whether its weights train under LRC-only fine-tuning

    @property
    def break_even(self) -> float:
        """``m n / (m + n)``."""
        return break_even_rank(*self.shape)


@dataclass
class CompressionReport:
    """What :func:`compress` did, per matrix and in total; ``rows()`` feeds a table or DataFrame.

    Explained in :doc:`/labs/welore/compression`.
    """

    method: str  #: "welore" or "uniform"
    target: float  #: the requested effective rank reduction
    tau: float | None  #: the global threshold (None for the uniform baseline)
    nlrc: str  #: "dense" or "truncate"
    min_ratio: float | None  #: the official rule's minimum ratio, or None for the break-even rule (5)
    matrices: list[MatrixReport] = field(default_factory=list)  #: in model order
    params_before: int = 0  #: all parameters of the model before
    params_after: int = 0  #: all parameters after
    exact_target: bool = False  #: τ chosen for the applied (not the attempted) reduction

    @property
    def total_rank(self) -> int:
        """``Σ r`` over the analysed matrices."""
        return sum(m.full_rank for m in self.matrices)

    @property
    def kept_rank(self) -> int:
        """``Σ`` of the ranks the compressed model applies (N-LRCs at full rank with ``nlrc="dense"``)."""
        return sum(m.kept_rank for m in self.matrices)

    @property
    def attempted_reduction(self) -> float:
        """What the selection asked for, ``Σ k_pruned / Σ r`` ((4) at τ for WeLore)."""
        return sum(m.pruned for m in self.matrices) / self.total_rank

    @property
    def achieved_reduction(self) -> float:
        """What the compressed model applies, ``1 − Σ kept / Σ r`` (the official "reduction ratio")."""
        return (self.total_rank - self.kept_rank) / self.total_rank

    @property
    def lrc_names(self) -> list[str]:
        """Names of the matrices that became LRCs."""
        return [m.name for m in self.matrices if m.is_lrc]

    @property
    def n_lrc(self) -> int:
        """Number of LRCs."""
        return sum(m.is_lrc for m in self.matrices)

    @property
    def lrc_parameter_count(self) -> int:
        """Parameters in the LRC factors (what LRC-only fine-tuning trains)."""
        return sum(m.params_after for m in self.matrices if m.is_lrc)

    @property
    def ratio(self) -> float:
        """``params_after / params_before`` of the whole model."""
        return self.params_after / self.params_before

    def ranks(self) -> dict[str, int]:
        """``name → kept rank`` of every LRC (what :func:`load_compressed` rebuilds)."""
        return {m.name: m.kept_rank for m in self.matrices if m.is_lrc}

    def rows(self) -> list[dict[str, Any]]:
        """One dict per matrix (name, out, in, rank, pruned, kept, break_even, lrc, params...)."""
        return [
            {"name": m.name, "out": m.shape[0], "in": m.shape[1], "rank": m.full_rank,
             "pruned": m.pruned, "kept": m.kept_rank, "break_even": round(m.break_even, 1),
             "lrc": m.is_lrc, "params_before": m.params_before, "params_after": m.params_after,
             "trainable": m.trainable}
            for m in self.matrices
        ]

    def to_table(self, short_names: bool = True) -> str:
        """A Markdown table of :meth:`rows` (``model.layers.`` dropped from names by default)."""
        rows = self.rows()
        cols = list(rows[0]) if rows else []
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in rows:
            cells = []
            for c in cols:
                v = r[c]
                if c == "name" and short_names:
                    v = str(v).replace("model.layers.", "")
                cells.append("yes" if v is True else "no" if v is False else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def __str__(self) -> str:
        tau = "" if self.tau is None else f", tau {self.tau:.4f}"
        return (f"{self.method}{tau}: target {self.target:.1%}, attempted {self.attempted_reduction:.1%}, "
                f"achieved {self.achieved_reduction:.1%} rank reduction; {self.n_lrc}/{len(self.matrices)} "
                f"LRCs; parameters {self.params_before:,} -> {self.params_after:,} ({self.ratio:.1%})")


# ----------------------------------------------------------------------------- compress
def _check_spectra_match(model: nn.Module, spectra: Spectra) -> dict[str, nn.Linear]:
    modules = dict(model.named_modules())
    out: dict[str, nn.Linear] = {}
    for m in spectra:
        lin = modules.get(m.name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(
                f"spectra do not match the model: {m.name!r} is not an nn.Linear of the model "
                f"(got {type(lin).__name__ if lin is not None else 'nothing'}); was it compressed already?"
            )
        if tuple(lin.weight.shape) != m.shape:
            raise ValueError(
                f"spectra do not match the model: {m.name} has shape {tuple(lin.weight.shape)}, "
                f"its spectrum {m.shape}"
            )
        fro = float(lin.weight.detach().double().pow(2).sum())
        ref = m.frobenius_sq()
        if not math.isclose(fro, ref, rel_tol=1e-4, abs_tol=1e-12):
            raise ValueError(
                f"spectra do not match the model's weights: ‖{m.name}‖_F² = {fro:.6g} but Σ s² = "
                f"{ref:.6g}; recompute them with analyze_spectra(model)"
            )
        out[m.name] = lin
    return out


def compress(
    model: nn.Module,
    target: float,
    *,
    method: str = "welore",
    spectra: Spectra | None = None,
    patterns: str | Sequence[str] = DEFAULT_PATTERNS,
    min_ratio: float | None = None,
    nlrc: str = "dense",
    exact_target: bool = False,
) -> CompressionReport:
    """Compress ``model`` in place to an effective rank reduction ``target`` ∈ (0, 1).

    ``method="welore"``: the global τ of :func:`threshold_for_reduction`, ranks by (3).
    ``method="uniform"``: the same fraction of every matrix (:func:`uniform_pruned_ranks`).
    A matrix becomes a :class:`LowRankComponent` (trainable) when rule (5) says its factors pay
    off (or, with ``min_ratio``, when ``k_pruned / r > min_ratio``, the official rule); the others
    are frozen and keep their dense weight (``nlrc="dense"``, official) or its rank-k truncation
    (``nlrc="truncate"``). Other parameters (embeddings, norms, head) are not touched: see
    :func:`freeze_for_lrc_finetuning`. ``spectra`` (from :func:`analyze_spectra` on this model or
    an identical copy) avoids recomputing SVDs in a sweep; ``patterns`` is used only without it.
    To keep the original, compress a ``copy.deepcopy(model)``. To compare methods at equal total
    rank, use ``nlrc="truncate"`` (or ``min_ratio=0.0``) so that every matrix applies its kept rank.

    ``target`` is the *attempted* reduction by default (τ from :func:`threshold_for_reduction`):
    with rule (5) and dense N-LRCs the model then applies less (39-41% for 0.5 on the labs'
    tiny Llama), because a matrix whose factors would not pay off keeps its full rank.
    ``exact_target=True`` is the paper's reading of a target, the reduction the compressed model
    applies (its "reduction ratio" counts the LRCs' pruned ranks): τ is chosen so that
    :attr:`CompressionReport.achieved_reduction` is closest to ``target`` under the same rule and
    ``nlrc`` (bisection on the applied reduction, a step function of τ). The official compression
    script gets there another way, ``min_ratio=0.0`` (every pruned matrix factorised, even where
    the factors are larger than W, so attempted = applied); ``exact_target`` keeps rule (5) and
    raises τ instead. The labs use the default.

    With ``spectra=None`` the SVDs are computed here one matrix at a time, keeping the singular
    values only (the factors of an LRC are recomputed when it is built, then dropped): peak
    memory is one matrix's SVD, not the float32 factors of every matrix at once.

    Explained in :doc:`/book/welore/theory`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    target = _check_target(target)
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if nlrc not in NLRC_MODES:
        raise ValueError(f"nlrc must be one of {list(NLRC_MODES)}, got {nlrc!r}")
    if min_ratio is not None:
        if isinstance(min_ratio, bool) or not isinstance(min_ratio, numbers.Real) or not 0.0 <= float(min_ratio) < 1.0:
            raise ValueError(f"min_ratio must be None (break-even rule) or a number in [0, 1), got {min_ratio!r}")
        min_ratio = float(min_ratio)
    if not isinstance(exact_target, bool):
        raise TypeError(f"exact_target must be a bool, got {exact_target!r}")
    if exact_target and method != "welore":
        raise ValueError(f"exact_target=True needs method='welore' (the uniform baseline removes a fixed share of "
                         f"every matrix's rank); got method={method!r}")
    if spectra is None:
        spectra = _singular_values_only(model, patterns)
    _check_spectra(spectra)
    linears = _check_spectra_match(model, spectra)

    if method == "welore":
        if exact_target:
            tau: float | None = _applied_threshold(spectra, target, min_ratio, nlrc)
        else:
            tau = threshold_for_reduction(spectra, target).tau
        pruned = pruned_ranks(spectra, tau)
    else:
        tau = None
        pruned = uniform_pruned_ranks(spectra, target)

    report = CompressionReport(method=method, target=target, tau=tau, nlrc=nlrc, min_ratio=min_ratio,
                               params_before=sum(p.numel() for p in model.parameters()),
                               exact_target=exact_target)
    plan: dict[str, int] = {}  # name -> kept rank of each LRC
    for spec in spectra:
        m, n = spec.shape
        r, kp = spec.full_rank, pruned[spec.name]
        k = r - kp
        if min_ratio is None:
            is_lrc = kp > 0 and pays_off(k, m, n)
        else:
            is_lrc = kp / r > min_ratio
        lin = linears[spec.name]
        if is_lrc:
            plan[spec.name] = k
            kept, after = k, k * (m + n)
        else:
            for p in lin.parameters():
                p.requires_grad_(False)
            kept, after = r, m * n
            if nlrc == "truncate" and kp > 0:
                U, s, Vh = _factors(spec, lin)
                with torch.no_grad():
                    w_k = (U[:, :k] * s[:k]) @ Vh[:k]  # (m, n) = U_k diag(s_k) V_kᵀ
                    lin.weight.copy_(w_k.to(lin.weight.dtype))
                del U, s, Vh, w_k  # one matrix's factors at a time
                kept = k
        report.matrices.append(MatrixReport(
            name=spec.name, shape=(m, n), full_rank=r, pruned=kp, kept_rank=kept, is_lrc=is_lrc,
            params_before=m * n, params_after=after, trainable=is_lrc,
        ))

    if plan:
        def factory(name: str, lin: nn.Linear) -> nn.Module:
            U, s, Vh = _factors(spectra[name], lin)
            return LowRankComponent.from_svd(U, s, Vh, plan[name], bias=lin.bias, dtype=lin.weight.dtype)

        replace_linears(model, factory, [rf"^{re.escape(name)}$" for name in plan])
    report.params_after = sum(p.numel() for p in model.parameters())
    return report


def _singular_values_only(model: nn.Module, patterns: str | Sequence[str]) -> Spectra:
    """:func:`analyze_spectra` without the factors: each matrix's SVD is taken (the same
    ``torch.linalg.svd`` as with factors, so the singular values are bitwise those of
    ``analyze_spectra(model)``) and its U, Vh dropped before the next one."""
    out = []
    for name, lin in _matching_linears(model, patterns):
        full = MatrixSpectrum.from_matrix(name, lin.weight)
        out.append(MatrixSpectrum(name, full.shape, full.s))
        del full  # U (m × r) and Vh (r × n) go now
    return Spectra(out)


def _factors(spec: MatrixSpectrum, lin: nn.Linear) -> tuple[Tensor, Tensor, Tensor]:
    """The cached SVD of ``spec``, or a fresh one of ``lin.weight`` when the factors were not kept."""
    if spec.U is not None and spec.Vh is not None:
        return spec.U, spec.s, spec.Vh
    fresh = MatrixSpectrum.from_matrix(spec.name, lin.weight)
    return fresh.U, fresh.s, fresh.Vh


# ----------------------------------------------------------------------------- fine-tuning, merging, loading
def _lrcs(model: nn.Module) -> list[tuple[str, LowRankComponent]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LowRankComponent)]


def lrc_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The factors (``down.weight``, ``up.weight``) of every LRC of ``model``, in model order.

    Explained in :doc:`/book/welore/theory`.
    """
    return [p for _, m in _lrcs(model) for p in (m.down.weight, m.up.weight)]


def lrc_ranks(model: nn.Module) -> dict[str, int]:
    """``name → rank`` of every LRC of ``model``.

    Explained in :doc:`/book/welore/theory`.
    """
    return {n: m.rank for n, m in _lrcs(model)}


def freeze_for_lrc_finetuning(model: nn.Module, train_norms: bool = False) -> list[nn.Parameter]:
    """Freeze everything but the LRC factors; return the parameters to give the optimizer.

    Embeddings, head, N-LRCs and biases get ``requires_grad=False``. ``train_norms=True`` also
    trains the normalisation weights (RMSNorm/LayerNorm), as the official continual fine-tuning
    script does. A model without LRCs is an error (nothing would train).

    Explained in :doc:`/book/welore/theory`.
    """
    lrcs = _lrcs(model)
    if not lrcs:
        raise ValueError(
            "model has no LowRankComponent: compress it first (or raise target, or pass "
            "min_ratio=0.0 so that every pruned matrix becomes an LRC)"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    train: list[nn.Parameter] = []
    for _, m in lrcs:
        for p in (m.down.weight, m.up.weight):
            p.requires_grad_(True)
            train.append(p)
    if train_norms:
        for mod in model.modules():
            if isinstance(mod, nn.LayerNorm) or type(mod).__name__.endswith("RMSNorm"):
                for p in mod.parameters(recurse=False):
                    p.requires_grad_(True)
                    train.append(p)
    return train


def merge_lrcs(model: nn.Module) -> list[str]:
    """Replace, in place, every LRC by its merged ``nn.Linear`` (:meth:`LowRankComponent.merge`).

    The forward is unchanged up to rounding; the merged weights are trainable (``nn.Linear``'s
    default). Returns the merged names.

    Explained in :doc:`/book/welore/theory`.
    """
    lrcs = _lrcs(model)
    for name, lrc in lrcs:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, lrc.merge())
    return [n for n, _ in lrcs]


def load_compressed(
    model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True
) -> ConversionReport:
    """Load the ``state_dict`` of a compressed model into an uncompressed ``model`` of the same config.

    Each ``nn.Linear`` named ``X`` for which the state dict holds ``X.down.weight`` (k × in) and
    ``X.up.weight`` (out × k) is first replaced by an empty :class:`LowRankComponent` of rank k
    (no SVD), then the state dict is loaded (``strict`` as in ``load_state_dict``). Trainable
    flags are not in a state dict: call :func:`freeze_for_lrc_finetuning` before training.

    Explained in :doc:`/labs/welore/finetuning`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    ranks: dict[str, int] = {}
    for name, mod in model.named_modules():
        down, up = state_dict.get(f"{name}.down.weight"), state_dict.get(f"{name}.up.weight")
        if isinstance(mod, nn.Linear) and down is not None and up is not None:
            ranks[name] = int(down.shape[0])
    if not ranks:
        raise ValueError("state_dict holds no LowRankComponent factors (keys '<name>.down.weight') "
                         "for any nn.Linear of the model")

    def factory(name: str, lin: nn.Linear) -> nn.Module:
        return LowRankComponent(lin.in_features, lin.out_features, ranks[name],
                                bias=lin.bias is not None, dtype=lin.weight.dtype)

    report = replace_linears(model, factory, [rf"^{re.escape(n)}$" for n in ranks])
    model.load_state_dict(dict(state_dict), strict=strict)
    return report


# ----------------------------------------------------------------------------- saving a compressed model
#: What ``config.json`` of a directory :func:`save_compressed` writes holds in place of the dtype,
#: so that transformers' own loaders refuse it, naming mini's loader.
_REFUSAL = ("mini.welore: a WeLore-compressed model; open it with mini.welore.load_pretrained(path). "
           "transformers' from_pretrained would re-initialise the compressed layers")
_WEIGHTS = "mini_welore_model.pt"
_FORMAT = 1


def save_compressed(model: nn.Module, directory: str | Any) -> None:
    """Write a compressed transformers model to ``directory``: :func:`load_pretrained` reads it back exactly.

    Why not ``save_pretrained``: a directory it writes opens with ``from_pretrained``, which builds
    the dense architecture, finds no ``q_proj.weight`` for an LRC and re-initialises it at random
    (with a warning in a long log): a silently different model. Here ``config.json`` is the
    model's config with its dtype replaced by a sentence naming :func:`load_pretrained`
    so ``AutoConfig``, ``AutoModelForCausalLM`` and ``LlamaForCausalLM``'s
    ``from_pretrained`` fail with that sentence in the error; the config proper, the LRC ranks
    and the dtype sit under the key ``"mini_welore"``, and the weights in ``mini_welore_model.pt``
    (a state dict, loadable with ``torch.load(weights_only=True)``), not under a name transformers
    looks for.

    Explained in :doc:`/labs/welore/finetuning`.
    """
    import json
    from pathlib import Path

    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"model must be a transformers model (with a .config), got {type(model).__name__}; "
                        "for a plain module save model.state_dict() and reload it with load_compressed")
    ranks = lrc_ranks(model)
    if not ranks:
        raise ValueError("model has no LowRankComponent: save an uncompressed model with save_pretrained")
    params = list(model.parameters())
    dtype = str(params[0].dtype).replace("torch.", "") if params else "float32"
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    record = {"format": _FORMAT, "loader": "mini.welore.load_pretrained", "ranks": ranks, "dtype": dtype,
              "config": dict(cfg)}
    cfg.update(dtype=_REFUSAL, torch_dtype=_REFUSAL, mini_welore=record)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    torch.save(model.state_dict(), folder / _WEIGHTS)


def load_pretrained(directory: str | Any, device: str | torch.device = "cpu") -> nn.Module:
    """The model :func:`save_compressed` wrote, bit for bit: the architecture from its config,
    each LRC rebuilt at its rank (:func:`load_compressed`), then every tensor loaded (strict).

    Trainable flags are not saved: call :func:`freeze_for_lrc_finetuning` before training.

    Explained in :doc:`/labs/welore/finetuning`.
    """
    import json
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(directory)
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a directory mini.welore.save_compressed wrote")
    record = json.loads(cfg_file.read_text()).get("mini_welore")
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        raise ValueError(f"{cfg_file} was not written by mini.welore.save_compressed (format {_FORMAT}); "
                         "a plain save_pretrained directory opens with transformers' from_pretrained")
    config_dict = dict(record["config"])
    model_type = config_dict.pop("model_type")
    for key in ("dtype", "torch_dtype", "transformers_version", "architectures"):
        config_dict.pop(key, None)
    config = AutoConfig.for_model(model_type, **config_dict)
    dtype = getattr(torch, record["dtype"])
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    state = torch.load(folder / _WEIGHTS, map_location="cpu", weights_only=True)
    load_compressed(model, state, strict=True)
    if lrc_ranks(model) != record["ranks"]:  # pragma: no cover - the keys decide the ranks
        raise ValueError(f"{folder}: the weights' LRC ranks differ from the config's record")
    return model.to(device).eval()
