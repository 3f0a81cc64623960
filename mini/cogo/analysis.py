"""Read a trained network as a sum of per-frequency blocks and name their factorizations.

Paper: Yuandong Tian, "Composing Global Optimizers to Reasoning Tasks via Algebraic Objects in
Neural Nets", 2024, arXiv:2410.01779 (the experiments section and its factorization table: gradient descent finds
order-4 blocks z_4c·z_ξ and order-6 blocks z_ν·z_syn, z_4c·z_syn,αβ). The book's chapter
``book/cogo/theory.ipynb`` (Part I, CoGO theory) explains the procedure; the Part I lab applies
it to trained networks.

Procedure (the official analysis, facebookresearch/luckmatters ssl/real-dataset/cogo/
factorize_sol.py at e76471a):

1. Node frequency. With the 1/d-normalised coefficients ``z_{a,k,j}`` of
   :func:`mini.cogo.fourier.coefficients`, node j's frequency is
   ``argmax_{k = 0 … (d−1)/2} |z_{a,k,j}|`` (frequency 0 is considered; such nodes are counted
   in ``n_freq0`` and belong to no block). The node is dead, and dropped, when that maximum
   ``m_j`` is at most a cut (:func:`dead_cut`). The official code cuts at the absolute value
   0.05 (``factorize_sol.py`` line 156: ``best_freqs_max > 0.05``; ``rule="absolute"`` here).
   That value fits the paper's d = 23 but not every d: the weights of a network that fits
   shrink like d^{-1/3}. A balanced node (``|a| = |b| = |c| = m``) on frequency k adds
   ``2d m³`` to the diagonal potential r̃_kkk, whose target is 1, so the task sets the scale
   ``u(d) = (2d)^{-1/3}``: one node of that size carries the whole potential, a node of an
   order-q_k block of a construction has ``m = u(d) q_k^{-1/3}`` (0.55 u at order 6, 0.63 u at
   order 4) at every d. At d = 701 that is 0.049 for F6, below the official 0.05, which marks
   every node of the exact construction dead. The default ``rule="scaled"`` cuts at
   ``threshold · u(d)`` with ``threshold = 0.14`` (:data:`SCALED_THRESHOLD`): a node counts
   when it could carry at least 0.14³ ≈ 0.3% of a diagonal potential. That is the official
   cut at the book's d = 11 to within 0.1% (0.14 · 22^{-1/3} = 0.04996), 0.039 at the paper's
   d = 23 and 0.0125 at d = 701. In trained networks (d = 11 and 23, weight decay 5e-5 to 1e-2) live
   nodes have ``m ≥ 0.24 u`` and decaying ones ``m ≤ 0.05 u``, so the cut sits in a wide gap.
   We do not cut relative to the largest node: that rule cannot see the zero network (every
   weight about 1e-3 after too much weight decay), whose nodes are all alike and would all
   count as live. Like the official rule this reads ``|z_a|`` only, so it assumes balanced
   nodes (weight decay balances them; the constructions are balanced); a network rescaled by
   the symmetry (a, b, c) → (s a, s b, c / s²) is read as a different one. Without weight
   decay no node decays and any cut, the official one included, is a convention.
2. The order of frequency k is the number of live nodes assigned to it. For order 4 or 6 the
   block ``F = [A_k; B_k; C_k]`` (3 × q_k, the +k coefficients of a, b, c) is tested for a
   Khatri–Rao factorization into a 2-node and a q_k/2-node factor: nodes are split into q_k/2
   ordered pairs (first, second); per row p the ratios ``F[p, second] / F[p, first]`` must be
   one constant (the 2-node factor ``[1, ρ_p]``). We search every pairing, orientation and,
   per pair, the node symmetry (a, b, c) → (−a, −b, c) (it flips ρ_a, ρ_b of that pair), and keep
   the smallest error ``‖ρ − rowmean(ρ)‖_F``. The block factors if that error is
   ``<= factor_tol · √(3 q_k)``. A block can have several factorizations within tolerance (e.g.
   z_ν·z_syn at ν = e^{iπ/3}, whose six a-coefficients are all sixth roots of unity, also splits
   as z_{ν=−1}·(unnamed)); we take, in order of error, the first that is a named type, and the
   smallest-error one otherwise.
3. Factor types, after normalising each column by the principal cube root of its product
   (tolerance ``factor_tol``, default 0.1: the official code's ``thres = 0.1`` in
   ``check_component``, line 97, and its bound ``0.1·√(3 q_k)``, line 195; one knob sets
   both here, and smaller values give lower shares): 2-node factors are "xi" (c ≈ ±i), "4c" (c ≈ 1, a ≈ ±i), "nu"
   (a + b ≈ 0); 3-node factors (first column scaled to 1, a node flipped when Re a > 0, the
   whole factor conjugated when Im c₁ < 0) are "syn" (both columns ≈ ω₃·1 and ω̄₃·1) or
   "syn_ab" (c ≈ [ω₃, ω̄₃]). Block types: "4c·xi", "nu·syn", "4c·syn_ab" (which includes
   4c·syn, as the official tally does), "other" (factorable, unnamed), "not factorable", and
   "order n" for blocks whose order is not 4 or 6.

Summaries over many analyses, for the lab's tables and figures: :func:`off_frequency_energy`
(the share of a block's output-weight energy at other frequencies: a bias channel's signature),
:func:`factor_parameters` (the parameters ν, ξ, α, β that the paper's Fig. 5 histograms),
:func:`factorization_errors` and :func:`factorization_table` (the paper's Table 2).

Differences from the official code: the official search permutes nodes to match only the c-row
ratios and then fixes signs with a 0.2 threshold; we minimise the full 3-row ratio error jointly
over pairings, orientations and sign flips (never worse, and deterministic). We also report
β = a₂/ω̄₃ (the official divides by ω₃ for both α and β). The dead-node cut scales with d
(step 1); ``rule="absolute"`` restores the official one.

Explained in :doc:`/labs/cogo/gd_solutions`.
"""
from __future__ import annotations

import cmath
import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .fourier import coefficients
from .model import check_d, check_weights

__all__ = [
    "NAMED_TYPES",
    "DEAD_RULES",
    "OFFICIAL_THRESHOLD",
    "SCALED_THRESHOLD",
    "node_scale",
    "dead_cut",
    "Analysis",
    "factorize_block",
    "classify_factor",
    "analyze",
    "analyze_batch",
    "pooled_summary",
    "off_frequency_energy",
    "factor_parameters",
    "factorization_errors",
    "factorization_table",
]

NAMED_TYPES = ("4c·xi", "nu·syn", "4c·syn_ab")
DEAD_RULES = ("scaled", "absolute")
OFFICIAL_THRESHOLD = 0.05
"""The official dead-node cut, an absolute ``|z_a|`` (``factorize_sol.py`` line 156)."""
SCALED_THRESHOLD = 0.14
"""The default cut in units of :func:`node_scale` (the official 0.05 at d = 11)."""
_W3 = cmath.exp(2j * math.pi / 3)


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def node_scale(d: int) -> float:
    """``(2d)^{-1/3}``: the ``|z|`` of one balanced node that alone carries ``r̃_kkk = 1``.

    A node with ``|a| = |b| = |c| = m`` adds ``2d m³`` to the diagonal potential, so the
    weights of every network that fits shrink like this with d (a construction's order-q_k
    nodes have ``m = node_scale(d) · q_k^{-1/3}``). See the module docstring.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    d = check_d(d, odd=True)
    return (2 * d) ** (-1.0 / 3.0)


def dead_cut(d: int, threshold: float | None = None, rule: str = "scaled") -> float:
    """The absolute ``|z_a|`` at or below which a node is dead, for modulus ``d``.

    ``rule="scaled"`` (default): ``threshold · node_scale(d)``, ``threshold`` defaulting to
    :data:`SCALED_THRESHOLD` (0.14); the same share of a fitted network's weights at every d.
    ``rule="absolute"``: ``threshold`` itself, defaulting to :data:`OFFICIAL_THRESHOLD` (0.05,
    the official code's), which suits the paper's d = 23 and marks every node of the exact F6
    dead once ``(12d)^{-1/3} <= 0.05``, i.e. from d = 667 on.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    if rule not in DEAD_RULES:
        raise ValueError(f"rule must be one of {DEAD_RULES}, got {rule!r}")
    if threshold is None:
        threshold = SCALED_THRESHOLD if rule == "scaled" else OFFICIAL_THRESHOLD
    threshold = _check_positive("threshold", threshold)
    return threshold * node_scale(d) if rule == "scaled" else threshold


@dataclass
class Analysis:
    """Result of :func:`analyze` for one network; k = 1 … (d−1)/2 indexes the frequencies.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """

    d: int  #: the modulus
    q: int  #: hidden nodes
    threshold: float  #: the dead-node cut, a node being dead when its largest ``|z_a|`` is at most this
    factor_tol: float  #: largest factorization error for a block to be named
    assignment: list[int]  #: node j's frequency (0 … (d−1)/2), or −1 when dead
    orders: dict[int, int]  #: live nodes on frequency k (0 included)
    types: dict[int, str]  #: block type of frequency k ("empty" when its order is 0)
    #: factorization error of an order-4/6 block (of the chosen factorization; the smallest one
    #: when none fits)
    errors: dict[int, float] = field(default_factory=dict)
    #: factor names and parameters of a factorable block
    params: dict[int, dict[str, Any]] = field(default_factory=dict)
    rule: str = "scaled"  #: how the cut was set, "scaled" or "absolute" (see :func:`dead_cut`)

    @property
    def n_dead(self) -> int:
        """Nodes whose largest ``|z_a|`` is at most the cut ``threshold``."""
        return sum(1 for k in self.assignment if k < 0)

    @property
    def n_freq0(self) -> int:
        """Live nodes whose largest ``|z_a|`` is at frequency 0 (belong to no block)."""
        return sum(1 for k in self.assignment if k == 0)

    @property
    def counts(self) -> dict[str, int]:
        """Number of frequencies of each block type (live frequencies only)."""
        return dict(Counter(t for t in self.types.values() if t != "empty"))

    @property
    def order_hist(self) -> dict[int, int]:
        """Number of frequencies of each order, over k = 1 … (d−1)/2 (order 0 included)."""
        return dict(sorted(Counter(self.orders.values()).items()))

    def _n46(self) -> tuple[int, int]:
        blocks = [k for k, o in self.orders.items() if o in (4, 6)]
        fact = [k for k in blocks if self.types[k] != "not factorable"]
        return len(fact), len(blocks)

    @property
    def share_factorable_46(self) -> float:
        """Share of order-4 and order-6 frequencies whose block factors (nan when there are none)."""
        f, n = self._n46()
        return f / n if n else float("nan")

    @property
    def share_named(self) -> float:
        """Share of live frequencies whose block is one of NAMED_TYPES (nan when none is live)."""
        live = [t for t in self.types.values() if t != "empty"]
        return sum(t in NAMED_TYPES for t in live) / len(live) if live else float("nan")

    def summary(self) -> dict[str, Any]:
        """Plain dict of the counts and shares (for tables and printing)."""
        return {
            "d": self.d,
            "q": self.q,
            "n_live": self.q - self.n_dead,
            "n_dead": self.n_dead,
            "n_freq0": self.n_freq0,
            "order_hist": self.order_hist,
            "counts": self.counts,
            "share_factorable_46": self.share_factorable_46,
            "share_named": self.share_named,
        }


def _cube_root_normalise(A: np.ndarray) -> np.ndarray:
    p = A.prod(axis=0, keepdims=True)  # (1, n)
    return A / np.power(p.astype(np.complex128), 1.0 / 3.0)


def classify_factor(A: np.ndarray, tol: float = 0.1) -> tuple[str, dict[str, complex]]:
    """Name a 2- or 3-node factor ``A`` (3 × n, first column ones); see the module doc.

    Returns ``(name, params)``, name in {"xi", "4c", "nu", "syn", "syn_ab", "unknown"}.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    A = np.array(A, dtype=np.complex128)
    if A.ndim != 2 or A.shape[0] != 3 or A.shape[1] not in (2, 3):
        raise ValueError(f"A must have shape (3, 2) or (3, 3), got {A.shape}")
    if not np.all(np.isfinite(A)) or np.any(A.prod(axis=0) == 0):
        return "unknown", {}
    A = _cube_root_normalise(A)
    if A.shape[1] == 2:
        a, b, c = A[:, 1]
        if abs(c - 1j) < tol or abs(c + 1j) < tol:
            return "xi", {"xi": complex(a)}
        if abs(c - 1) < tol and (abs(a - 1j) < tol or abs(a + 1j) < tol):
            return "4c", {"nu": complex(a)}
        if abs(a + b) < tol:
            return "nu", {"nu": complex(a)}
        return "unknown", {}
    for i in (1, 2):
        if A[0, i].real > 0:
            A[:2, i] *= -1  # the node symmetry (a, b, c) -> (-a, -b, c)
    if A[2, 1].imag < 0:
        A = A.conj()
    w = _W3
    if (np.linalg.norm(A[:, 1] - w) < tol * math.sqrt(3)
            and np.linalg.norm(A[:, 2] - w.conjugate()) < tol * math.sqrt(3)):
        return "syn", {}
    if abs(A[2, 1] - w) < tol and abs(A[2, 2] - w.conjugate()) < tol:
        alpha, beta = complex(A[0, 1] / w), complex(A[0, 2] / w.conjugate())
        return "syn_ab", {"alpha": alpha, "beta": beta}
    return "unknown", {}


def _matchings(items: tuple[int, ...]) -> list[list[tuple[int, int]]]:
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for i, other in enumerate(rest):
        for m in _matchings(rest[:i] + rest[i + 1:]):
            out.append([(first, other)] + m)
    return out


def _candidates(F: np.ndarray) -> tuple[np.ndarray, list[tuple[int, Any]]]:
    """Errors of all (pairing, orientation, sign) candidates, ascending; builders."""
    F = np.asarray(F, dtype=np.complex128)
    if F.ndim != 2 or F.shape[0] != 3 or F.shape[1] < 2 or F.shape[1] % 2:
        raise ValueError(f"F must have shape (3, q), q even >= 2, got {F.shape}")
    q = F.shape[1]
    h = q // 2
    firsts, seconds = [], []
    for m in _matchings(tuple(range(q))):
        for orient in itertools.product((0, 1), repeat=h):
            firsts.append([p[o] for p, o in zip(m, orient)])
            seconds.append([p[1 - o] for p, o in zip(m, orient)])
    fi, se = np.array(firsts), np.array(seconds)  # (M, h)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = F[:, se] / F[:, fi]  # (3, M, h)
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=h)))  # (S, h)
        shape = (3, ratio.shape[1], len(signs), h)
        rs = np.broadcast_to(ratio[:, :, None, :], shape).copy()  # (3, M, S, h)
        rs[:2] *= signs[None, None]  # flip rho_a, rho_b: (a, b, c) -> (-a, -b, c)
        dev = rs - rs.mean(axis=-1, keepdims=True)
        err = np.sqrt((np.abs(dev) ** 2).sum(axis=(0, 3)))  # (M, S)
    err = np.where(np.isfinite(err), err, np.inf).ravel()
    order = np.argsort(err, kind="stable")

    def build(flat: int) -> tuple[np.ndarray, np.ndarray]:
        mi, si = np.unravel_index(int(flat), (len(fi), len(signs)))
        rho = rs[:, mi, si].mean(axis=-1)  # (3,)
        X = np.stack([np.ones(3, dtype=np.complex128), rho], axis=1)  # (3, 2)
        sec1 = F[:, fi[mi]]  # (3, h)
        with np.errstate(divide="ignore", invalid="ignore"):
            Y = sec1 / sec1[:, :1]  # (3, h), first column ones
        return X, Y

    return err[order], [(int(i), build) for i in order]  # type: ignore[misc]


def factorize_block(F: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Best Khatri–Rao factorization of a 3 × q block (q even) into 2-node and q/2-node factors.

    Returns ``(err, X, Y)``: the smallest ratio error, the 2-node factor ``X = [1, ρ]`` (3 × 2)
    and the q/2-node factor ``Y`` (3 × q/2, first column ones). Searches pairings, orientations
    and per-pair sign flips (a, b, c) → (−a, −b, c).

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    errs, cands = _candidates(F)
    flat, build = cands[0]
    X, Y = build(flat)
    return float(errs[0]), X, Y


def _block_type(q: int, n1: str, n2: str) -> str:
    names = tuple(sorted((n1, n2)))
    if q == 4 and names == ("4c", "xi"):
        return "4c·xi"
    if q == 6 and names == ("nu", "syn"):
        return "nu·syn"
    if q == 6 and names in (("4c", "syn"), ("4c", "syn_ab")):
        return "4c·syn_ab"
    return "other"


def analyze(
    Wa: Any,
    Wb: Any,
    Wc: Any,
    threshold: float | None = None,
    factor_tol: float = 0.1,
    rule: str = "scaled",
) -> Analysis:
    """Assign nodes to frequencies, count orders, factor and name order-4/6 blocks (odd d >= 3).

    ``threshold`` and ``rule`` set the dead-node cut (:func:`dead_cut`: by default 0.14 times
    ``(2d)^{-1/3}``; ``rule="absolute"`` with the default threshold is the official 0.05);
    ``factor_tol`` the factorization and naming tolerance (0.1, the official value).

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    q, d = check_weights(Wa, Wb, Wc)
    check_d(d, odd=True)
    factor_tol = _check_positive("factor_tol", factor_tol)
    cut = dead_cut(d, threshold, rule)
    za, zb, zc = (z.numpy() for z in coefficients(Wa, Wb, Wc))  # (d, q) each
    half = (d - 1) // 2
    mag = np.abs(za[: half + 1])  # (half+1, q)
    if q:
        kbest, mbest = mag.argmax(axis=0), mag.max(axis=0)
        assignment = [int(k) if m > cut else -1 for k, m in zip(kbest, mbest)]
    else:
        assignment = []
    orders, types, errors, params = {}, {}, {}, {}
    for k in range(1, half + 1):
        idx = [j for j, kk in enumerate(assignment) if kk == k]
        qk = len(idx)
        orders[k] = qk
        if qk == 0:
            types[k] = "empty"
            continue
        if qk not in (4, 6):
            types[k] = f"order {qk}"
            continue
        F = np.stack([za[k, idx], zb[k, idx], zc[k, idx]])  # (3, qk)
        errs, cands = _candidates(F)
        limit = factor_tol * math.sqrt(3 * qk)
        errors[k] = float(errs[0])
        if not errs[0] <= limit:
            types[k] = "not factorable"
            continue
        chosen = None
        for e, (flat, build) in zip(errs, cands):
            if e > limit:
                break
            X, Y = build(flat)
            n1, p1 = classify_factor(X, factor_tol)
            n2, p2 = classify_factor(Y, factor_tol)
            t = _block_type(qk, n1, n2)
            if chosen is None or t in NAMED_TYPES:
                chosen = (t, float(e), n1, n2, p1, p2)
            if t in NAMED_TYPES:
                break
        t, e, n1, n2, p1, p2 = chosen  # type: ignore[misc]
        types[k] = t
        errors[k] = e
        params[k] = {"factors": tuple(sorted((n1, n2))), **p1, **p2}
    return Analysis(d, q, cut, float(factor_tol), assignment, orders, types, errors, params, rule)


def analyze_batch(
    Wa: Any,
    Wb: Any,
    Wc: Any,
    threshold: float | None = None,
    factor_tol: float = 0.1,
    rule: str = "scaled",
) -> list[Analysis]:
    """:func:`analyze` for a stack of S networks: ``Wa, Wb`` (S, q, d), ``Wc`` (S, d, q).

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    ws = []
    for w, n in zip((Wa, Wb, Wc), ("Wa", "Wb", "Wc")):
        if isinstance(w, np.ndarray):
            w = torch.from_numpy(np.asarray(w, dtype=np.float64))
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor or numpy.ndarray, got {type(w).__name__}")
        if w.dim() != 3:
            raise ValueError(f"{n} must be 3-D (S, ...) for analyze_batch, got shape {tuple(w.shape)}")
        ws.append(w.detach().cpu())
    if not (ws[0].shape[0] == ws[1].shape[0] == ws[2].shape[0]):
        raise ValueError(f"Wa, Wb, Wc must share the batch size S, got {[w.shape[0] for w in ws]}")
    return [analyze(ws[0][s], ws[1][s], ws[2][s], threshold, factor_tol, rule)
            for s in range(ws[0].shape[0])]


def pooled_summary(analyses: list[Analysis]) -> dict[str, Any]:
    """Pool analyses (e.g. over seeds): order histogram and type counts summed, shares of the totals.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    if not analyses or not all(isinstance(a, Analysis) for a in analyses):
        raise TypeError("analyses must be a non-empty list of Analysis")
    hist: Counter = Counter()
    counts: Counter = Counter()
    f46 = n46 = named = live = 0
    for a in analyses:
        hist.update(a.order_hist)
        counts.update(a.counts)
        f, n = a._n46()
        f46, n46 = f46 + f, n46 + n
        lv = [t for t in a.types.values() if t != "empty"]
        live += len(lv)
        named += sum(t in NAMED_TYPES for t in lv)
    return {
        "n_networks": len(analyses),
        "d": sorted({a.d for a in analyses}),
        "order_hist": dict(sorted(hist.items())),
        "counts": dict(counts),
        "n_dead": sum(a.n_dead for a in analyses),
        "share_factorable_46": f46 / n46 if n46 else float("nan"),
        "share_named": named / live if live else float("nan"),
    }


def _as_analyses(analyses: Any) -> list[Analysis]:
    if isinstance(analyses, Analysis):
        return [analyses]
    if (isinstance(analyses, (str, bytes)) or not hasattr(analyses, "__iter__")):
        raise TypeError(f"analyses must be an Analysis or a list of them, got {type(analyses).__name__}")
    out = list(analyses)
    if not out or not all(isinstance(a, Analysis) for a in out):
        raise TypeError("analyses must be an Analysis or a non-empty list of Analysis")
    return out


def off_frequency_energy(Wc: Any, analysis: Analysis) -> dict[int, float]:
    """Share of each block's output-weight energy that lies at frequencies other than its own.

    ``Wc`` (d, q) is the output layer of the network that ``analysis`` (:func:`analyze`) read.
    For each frequency k with live nodes J_k, by Parseval ``Σ_g Wc[g, j]² = d Σ_{k'} |z_{c,k',j}|²``;
    the share is ``1 − Σ_{j∈J_k} (|z_{c,k,j}|² + |z_{c,−k,j}|²) / Σ_{j∈J_k} Σ_{k'} |z_{c,k',j}|²``
    (frequency 0 counts as another frequency). A block that lives on ±k only, such as every
    block of ``F6`` and the order-4 blocks of ``F4/6``, has share 0; the order-6 block of
    ``F4/6`` is a bias channel with output coefficients at every other frequency. Returns
    ``{k: share}`` for every k = 1 … (d−1)/2 with at least one live node.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    if not isinstance(analysis, Analysis):
        raise TypeError(f"analysis must be an Analysis (from analyze), got {type(analysis).__name__}")
    if isinstance(Wc, np.ndarray):
        Wc = torch.from_numpy(np.asarray(Wc, dtype=np.float64))
    if not isinstance(Wc, torch.Tensor):
        raise TypeError(f"Wc must be a torch.Tensor or numpy.ndarray, got {type(Wc).__name__}")
    if tuple(Wc.shape) != (analysis.d, analysis.q):
        raise ValueError(
            f"Wc must have shape (d, q) = ({analysis.d}, {analysis.q}) of the analysed network, "
            f"got {tuple(Wc.shape)}"
        )
    W = Wc.detach().cpu().to(torch.float64).numpy()  # (d, q)
    power = np.abs(np.fft.fft(W, axis=0)) ** 2  # (d, q): |d·z_{c,∓k',j}|², both signs present
    d = analysis.d
    out = {}
    for k in range(1, (d - 1) // 2 + 1):
        idx = [j for j, kk in enumerate(analysis.assignment) if kk == k]
        if not idx:
            continue
        total = float(power[:, idx].sum())
        own = float(power[[k, d - k]][:, idx].sum())
        out[k] = max(0.0, 1.0 - own / total) if total > 0 else float("nan")
    return out


def factor_parameters(analyses: Analysis | list[Analysis]) -> dict[str, np.ndarray]:
    """The parameters of the named factors over every block, as the paper's Fig. 5 histograms them.

    Following the official script (``factorize_sol.py`` lines 298–415 at e76471a), after the
    cube-root normalisation of :func:`classify_factor`:

    - ``"xi"``: ξ of every ``4c·xi`` block (z_{ν=i} · z_ξ);
    - ``"nu"``: ν of every ``nu·syn`` block and of every ``4c·syn`` block (ν ≈ ±i there);
    - ``"alpha"``, ``"beta"``: α and β of every ``4c·syn_ab`` block whose 3-node factor is
      z_{syn,αβ}, and 1 for those whose factor is z_syn itself (the official script counts
      those as angle 0). Our β divides by ω̄₃ (the official by ω₃, see the module docstring).

    Values are complex (their angles are what the paper plots; their moduli should be near 1).

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    out: dict[str, list[complex]] = {"xi": [], "nu": [], "alpha": [], "beta": []}
    for a in _as_analyses(analyses):
        for k, t in a.types.items():
            p = a.params.get(k)
            if p is None:
                continue
            if t == "4c·xi":
                out["xi"].append(p["xi"])
            elif t == "nu·syn" or (t == "4c·syn_ab" and p["factors"] == ("4c", "syn")):
                out["nu"].append(p["nu"])
            if t == "4c·syn_ab":
                out["alpha"].append(p.get("alpha", 1.0 + 0j))
                out["beta"].append(p.get("beta", 1.0 + 0j))
    return {n: np.array(v, dtype=np.complex128) for n, v in out.items()}


def factorization_errors(analyses: Analysis | list[Analysis], order: int) -> np.ndarray:
    """Factorization errors of every order-``order`` block, divided by ``√(3 q_k)``.

    On that scale the factorable cut is ``factor_tol`` (0.1, the official) for both orders. For
    a factorable block the error is that of the factorization it was named by, for the others
    the smallest one found (:attr:`Analysis.errors`).

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    if order not in (4, 6):
        raise ValueError(f"order must be 4 or 6, got {order!r}")
    errs = [e for a in _as_analyses(analyses) for k, e in a.errors.items() if a.orders[k] == order]
    return np.array(errs, dtype=np.float64) / math.sqrt(3 * order)


def factorization_table(analyses: Analysis | list[Analysis]) -> dict[str, float]:
    """The quantities of the paper's Table 2 for a pool of networks (e.g. one batch of seeds).

    As the official script computes them (``factorize_sol.py`` lines 240–270 at e76471a):
    per order 4 and 6, the number of blocks (``n_4``, ``n_6``), the share of them that does
    not factor (``non_factorable_4``, ``_6``) and the mean error of those that do (``err_4``,
    ``err_6``, unnormalised as the official prints them); among all factorable order-4/6 blocks,
    the shares of each type (``4c·xi``, ``nu·syn``, ``4c·syn_ab``, ``other``); and
    ``non_46``: frequencies per network whose order is neither 4 nor 6 (empty ones included).
    Counts and shares are pooled over the networks (the official averages per seed).

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    an = _as_analyses(analyses)
    row: dict[str, float] = {}
    fact: Counter = Counter()
    for q in (4, 6):
        blocks = [(a, k) for a in an for k, o in a.orders.items() if o == q]
        nf = [(a, k) for a, k in blocks if a.types[k] == "not factorable"]
        ok = [(a, k) for a, k in blocks if a.types[k] != "not factorable"]
        fact.update(a.types[k] for a, k in ok)
        row[f"n_{q}"] = len(blocks)
        row[f"non_factorable_{q}"] = len(nf) / len(blocks) if blocks else float("nan")
        row[f"err_{q}"] = float(np.mean([a.errors[k] for a, k in ok])) if ok else float("nan")
    n_fact = sum(fact.values())
    for t in (*NAMED_TYPES, "other"):
        row[t] = fact.get(t, 0) / n_fact if n_fact else float("nan")
    row["non_46"] = float(np.mean([sum(o not in (4, 6) for o in a.orders.values()) for a in an]))
    return row
