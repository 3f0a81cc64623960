"""Per-node measures of a trained network: how single-frequency each node is, how balanced.

The analysis of :mod:`mini.cogo.analysis` assigns every live node to the frequency where its
input coefficient ``|z_a|`` is largest, whatever the node's other frequencies carry. Two
questions it does not ask, which the weight-decay lab needs:

- **Purity.** What share of a node's weight norm sits at that one frequency pair ±k? With the
  1/d-normalised coefficients of :func:`mini.cogo.fourier.coefficients`, Parseval gives
  ``Σ_k |z_{a,k,j}|² = ‖a_j‖² / d`` for each layer, so the node's energy at frequency index k,
  ``E_kj = |z_{a,k,j}|² + |z_{b,k,j}|² + |z_{c,k,j}|²``, weighs the three layers alike and sums
  to ``(‖a_j‖² + ‖b_j‖² + ‖c_j‖²) / d``. The energy of the pair ±k is ``E_kj + E_{d−k,j}``
  (frequency 0 alone); a node's purity is the largest pair energy over k = 1 … (d−1)/2
  divided by its total energy, frequency 0 included. A node of a construction has purity 1.
- **Balance.** The node symmetry ``(a, b, c) → (t a, t b, c / t²)`` leaves the output unchanged,
  and among its orbit the squared norm ``t² A + C / t⁴`` (``A = ‖a‖² + ‖b‖²``, ``C = ‖c‖²``) is
  smallest at ``A = 2C`` (the chapter's section on weight decay). At a stationary point of
  ``loss + λ/2 ‖w‖²`` with ``λ > 0`` every node sits there, so ``Σ A / Σ C`` over the live
  nodes measures how close training came to that optimum.

Explained in :doc:`/labs/cogo/weight_decay`.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .fourier import coefficients
from .model import as_weights

__all__ = ["node_energy", "node_purity", "layer_norms", "balance_ratio"]


def node_energy(Wa: Any, Wb: Any, Wc: Any) -> np.ndarray:
    """Energy of each node at each frequency pair, ``(half + 1, q)`` with ``half = (d − 1) // 2``.

    Row 0 is frequency 0, row k the pair ±k (both signs summed; for even d the Nyquist
    frequency d/2 is the last row, alone). Each column sums to the node's
    ``(‖a‖² + ‖b‖² + ‖c‖²) / d`` (Parseval). See the module docstring.

    Explained in :doc:`/labs/cogo/weight_decay`.
    """
    za, zb, zc = (z.numpy() for z in coefficients(Wa, Wb, Wc))  # (d, q) each
    d = za.shape[0]
    E = np.abs(za) ** 2 + np.abs(zb) ** 2 + np.abs(zc) ** 2  # (d, q): index k = 0 … d − 1
    half = d // 2
    pairs = np.empty((half + 1, E.shape[1]))  # (half + 1, q)
    pairs[0] = E[0]
    for k in range(1, half + 1):
        pairs[k] = E[k] + E[d - k] if 2 * k != d else E[k]
    return pairs


def node_purity(Wa: Any, Wb: Any, Wc: Any) -> np.ndarray:
    """Share ``(q,)`` of each node's energy at its dominant frequency pair ±k (k >= 1).

    1 for a node on a single frequency (every node of a construction), ``2/d`` or so for a
    node spread evenly over all frequencies; NaN for a node whose weights are all zero.

    Explained in :doc:`/labs/cogo/weight_decay`.
    """
    E = node_energy(Wa, Wb, Wc)  # (half + 1, q)
    total = E.sum(axis=0)  # (q,)
    best = E[1:].max(axis=0) if E.shape[0] > 1 else np.zeros_like(total)  # (q,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, best / np.where(total > 0, total, 1.0), np.nan)


def layer_norms(Wa: Any, Wb: Any, Wc: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-node squared norms ``A = ‖a‖² + ‖b‖²`` (input layers) and ``C = ‖c‖²``, each ``(q,)``.

    Explained in :doc:`/labs/cogo/weight_decay`.
    """
    Wa, Wb, Wc = (w.detach().cpu().double().numpy() for w in as_weights(Wa, Wb, Wc))
    A = (Wa**2).sum(axis=1) + (Wb**2).sum(axis=1)  # (q,)
    C = (Wc**2).sum(axis=0)  # (q,)
    return A, C


def balance_ratio(Wa: Any, Wb: Any, Wc: Any, nodes: Sequence[int] | None = None) -> float:
    """``Σ A / Σ C`` over ``nodes`` (default: all): 2 for nodes balanced as weight decay balances them.

    ``nodes`` are hidden-node indices (e.g. the live ones, those an
    :class:`~mini.cogo.analysis.Analysis` assigns to a frequency); NaN when they carry no
    output norm (no node, or ``Σ C = 0``).

    Explained in :doc:`/labs/cogo/weight_decay`.
    """
    A, C = layer_norms(Wa, Wb, Wc)
    if nodes is not None:
        idx = np.asarray(list(nodes), dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= A.size):
            raise ValueError(f"nodes must be indices in 0 … {A.size - 1}, got {list(nodes)!r}")
        A, C = A[idx], C[idx]
    c = float(C.sum())
    return float(A.sum()) / c if c > 0 else float("nan")
