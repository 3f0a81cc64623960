"""The semiring of networks: weights ``(Wa, Wb, Wc)`` with add = concatenation, mul = Khatri–Rao.

Paper: Yuandong Tian, "Composing Global Optimizers to Reasoning Tasks via Algebraic Objects in
Neural Nets", 2024, arXiv:2410.01779 (the algebraic-structure section: the weights form a commutative
semiring and every potential is a ring homomorphism). The book's chapter
``book/cogo/theory.ipynb`` (Part I, CoGO theory) proves it and runs :func:`symbolic_homomorphism_check`.

Operations, in Fourier coefficients ``z_{p,k,j}`` (see :mod:`mini.cogo.fourier`):

- ``add(x, y)``: concatenate hidden nodes, ``q = q_x + q_y``. Every potential is a sum over
  nodes, so ``r(x + y) = r(x) + r(y)``.
- ``mul(x, y)``: one node per pair (j1, j2), ``z_{p,k,(j1,j2)} = z_{p,k,j1}(x) z_{p,k,j2}(y)``
  for every p ∈ {a, b, c} and every frequency k (a column-wise Kronecker = Khatri–Rao product),
  ``q = q_x q_y``. Then ``r_{k1k2k}(x·y) = Σ_{j1,j2} (a a')(b b')(c c') = r_{k1k2k}(x) r_{k1k2k}(y)``:
  the UNSCALED potentials r, r_a, r_b multiply elementwise. (The scaled ``r̃ = 2d·r`` of
  :func:`mini.cogo.fourier.potentials` obeys ``r̃(x·y) = r̃(x) ⊙ r̃(y) / (2d)``.) In real space
  this is, per node pair, a circular convolution divided by d:
  ``Wa(x·y)[(j1,j2), :] = (1/d) Wa(x)[j1] ⊛ Wa(y)[j2]`` (same for Wb, and for the columns of Wc).
  Products of conjugate-symmetric coefficients are conjugate-symmetric, so the result is real.
- ``zero(d)``: no nodes (q = 0), all potentials 0. ``one(d)``: one node whose coefficients are 1
  at every frequency (including 0), i.e. ``Wa = Wb = d e_0ᵀ``, ``Wc = d e_0``; all unscaled
  potentials are 1, the identity of ``mul``.
- ``scale(x, lam)``: multiplies every potential by the real ``lam`` by multiplying Wa, Wb, Wc by
  ``cbrt(lam)`` (balanced, so the three layers keep equal norms).

Differences from the official code: the official repository has no semiring code (the paper's
constructions are checked in notebooks); this module is ours.

Explained in :doc:`/book/cogo/theory`.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .fourier import coefficients, from_coefficients
from .model import as_weights, check_d

__all__ = ["Weights", "add", "mul", "zero", "one", "scale", "symbolic_homomorphism_check"]

Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _w(x: Any, name: str) -> Weights:
    if not isinstance(x, (tuple, list)) or len(x) != 3:
        raise TypeError(f"{name} must be a triple (Wa, Wb, Wc), got {type(x).__name__}")
    Wa, Wb, Wc = as_weights(*x)
    return Wa, Wb, Wc


def _same_d(x: Weights, y: Weights) -> int:
    dx, dy = x[0].shape[1], y[0].shape[1]
    if dx != dy:
        raise ValueError(f"x and y must share d, got d = {dx} for x and d = {dy} for y")
    return dx


def add(x: Weights, y: Weights) -> Weights:
    """Concatenate hidden nodes: ``r(x + y) = r(x) + r(y)`` for r, r_a, r_b.

    Explained in :doc:`/book/cogo/theory`.
    """
    x, y = _w(x, "x"), _w(y, "y")
    _same_d(x, y)
    dt = torch.promote_types(x[0].dtype, y[0].dtype)
    return (
        torch.cat([x[0].to(dt), y[0].to(dt)], dim=0),  # (qx+qy, d)
        torch.cat([x[1].to(dt), y[1].to(dt)], dim=0),  # (qx+qy, d)
        torch.cat([x[2].to(dt), y[2].to(dt)], dim=1),  # (d, qx+qy)
    )


def _khatri_rao(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Column-wise Kronecker product: (d, q1), (d, q2) -> (d, q1*q2), column j1*q2 + j2."""
    return (z1[:, :, None] * z2[:, None, :]).reshape(z1.shape[0], -1)


def mul(x: Weights, y: Weights) -> Weights:
    """Khatri–Rao product of Fourier coefficients: ``r(x·y) = r(x) ⊙ r(y)``, unscaled.

    Returns real float64 weights with ``q_x * q_y`` nodes, node ``(j1, j2)`` at index
    ``j1 * q_y + j2``.

    Explained in :doc:`/book/cogo/theory`.
    """
    x, y = _w(x, "x"), _w(y, "y")
    _same_d(x, y)
    zx, zy = coefficients(*x), coefficients(*y)
    z = [_khatri_rao(a, b) for a, b in zip(zx, zy)]  # 3 x (d, qx*qy)
    return from_coefficients(*z)


def zero(d: int) -> Weights:
    """The additive identity: the empty network (q = 0), float64.

    Explained in :doc:`/book/cogo/theory`.
    """
    d = check_d(d)
    e = torch.zeros(0, d, dtype=torch.float64)
    return e, e.clone(), torch.zeros(d, 0, dtype=torch.float64)


def one(d: int) -> Weights:
    """The multiplicative identity: one node with every Fourier coefficient 1 (frequency 0 too).

    Explained in :doc:`/book/cogo/theory`.
    """
    d = check_d(d)
    Wa = torch.zeros(1, d, dtype=torch.float64)
    Wa[0, 0] = d  # Σ_k ω^{kg} = d δ_{g0}
    return Wa, Wa.clone(), Wa.T.clone()


def scale(x: Weights, lam: float) -> Weights:
    """Multiply every potential by the real ``lam`` (weights times ``cbrt(lam)``).

    Explained in :doc:`/book/cogo/theory`.
    """
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
        raise TypeError(f"lam must be a finite real number, got {lam!r}")
    Wa, Wb, Wc = _w(x, "x")
    lam = float(lam)
    s = math.copysign(abs(lam) ** (1.0 / 3.0), lam)
    return Wa * s, Wb * s, Wc * s


def symbolic_homomorphism_check(n1: int = 2, n2: int = 2) -> bool:
    """Check with sympy that add and mul are homomorphisms for r, r_a, r_b at one frequency triple.

    Two generic networks x (n1 nodes) and y (n2 nodes) are given symbolic coefficients
    ``a_{k1}, a_{k2}, b_{k1}, b_{k2}, c_k`` per node (what the potentials at (k1, k2, k) read);
    their sum and product are formed exactly as :func:`add` (concatenate) and :func:`mul`
    (multiply per node pair) form them. Asserts ``expand(lhs − rhs) == 0`` for
    ``r(x+y) = r(x)+r(y)`` and ``r(x·y) = r(x) r(y)`` and the same for r_a, r_b; returns True.

    Explained in :doc:`/book/cogo/theory`.
    """
    import sympy as sp

    for n, name in ((n1, "n1"), (n2, "n2")):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")

    keys = ("a1", "a2", "b1", "b2", "c")  # a at k1, a at k2, b at k1, b at k2, c at k

    def net(tag: str, n: int) -> list[dict[str, Any]]:
        return [{key: sp.Symbol(f"{key}_{tag}{j}") for key in keys} for j in range(n)]

    def pots(nodes: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "r": sum((v["a1"] * v["b2"] * v["c"] for v in nodes), sp.Integer(0)),
            "r_a": sum((v["a1"] * v["a2"] * v["c"] for v in nodes), sp.Integer(0)),
            "r_b": sum((v["b1"] * v["b2"] * v["c"] for v in nodes), sp.Integer(0)),
        }

    x, y = net("x", n1), net("y", n2)
    xy_sum = x + y  # add: concatenation
    xy_mul = [{key: u[key] * v[key] for key in keys} for u in x for v in y]  # mul: Khatri–Rao
    px, py, ps, pm = pots(x), pots(y), pots(xy_sum), pots(xy_mul)
    for name in ("r", "r_a", "r_b"):
        assert sp.expand(ps[name] - (px[name] + py[name])) == 0, f"add fails for {name}"
        assert sp.expand(pm[name] - px[name] * py[name]) == 0, f"mul fails for {name}"
    return True
