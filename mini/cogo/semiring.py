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
- ``scale(x, kappa)``: multiplies every potential by the real block scale ``kappa`` (κ in the
  chapter; not the weight decay λ) by multiplying Wa, Wb, Wc by ``cbrt(kappa)`` (balanced, so
  the three layers keep equal norms).

Up to the order of hidden nodes. A network's output, and so every potential, is a sum over its
nodes, so reordering the nodes changes the weights but no potential. ``add`` and ``mul`` are
commutative and distributive only up to such a reordering: ``add(y, x)`` lists y's nodes first,
``mul(y, x)`` numbers node ``(j1, j2)`` as ``j2 * q_x + j1``. ``mul`` is associative exactly
(node ``(j1, j2, j3)`` sits at ``(j1 q_y + j2) q_z + j3`` either way), ``add`` too.

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


def scale(x: Weights, kappa: float) -> Weights:
    """Multiply every potential by the real block scale ``kappa`` (weights times ``cbrt(kappa)``).

    Explained in :doc:`/book/cogo/theory`.
    """
    if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real) or not math.isfinite(kappa):
        raise TypeError(f"kappa must be a finite real number, got {kappa!r}")
    Wa, Wb, Wc = _w(x, "x")
    kappa = float(kappa)
    s = math.copysign(abs(kappa) ** (1.0 / 3.0), kappa)
    return Wa * s, Wb * s, Wc * s


def symbolic_homomorphism_check(n1: int = 2, n2: int = 2, d: int = 5, seed: int = 0) -> bool:
    """Check with sympy that add and mul are homomorphisms, and that the library's add and mul
    build the networks the definitions describe.

    1. *The algebra.* Two generic networks x (n1 nodes) and y (n2 nodes) get symbolic
       coefficients ``a_{k1}, a_{k2}, b_{k1}, b_{k2}, c_k`` per node (what the potentials at
       (k1, k2, k) read). Their sum is formed from its definition (the list of x's nodes, then
       y's) and their product too (one node per pair, coefficients multiplied); sympy asserts
       ``expand(lhs − rhs) == 0`` for ``r(x+y) = r(x)+r(y)``, ``r(x·y) = r(x) r(y)`` and the same
       for r_a, r_b.
    2. *The library.* Random real networks x, y with n1, n2 nodes at modulus ``d`` (seeded by
       ``seed``) go through the module's :func:`add` and :func:`mul` (looked up when called, so
       a replaced or broken function is what gets checked). The sympy expressions of the
       definitions' potentials, evaluated at x's and y's Fourier coefficients for every index
       triple (k1, k2, k), must equal :func:`mini.cogo.fourier.potentials` of the library's
       results (over 2d) to 1e-12, and the node counts must be ``n1 + n2`` and ``n1 n2``.

    Potentials are sums over nodes, so part 2 sees the networks only up to the order of their
    nodes, which is all the semiring promises. Raises AssertionError naming what failed;
    returns True.

    Explained in :doc:`/book/cogo/theory`.
    """
    import sympy as sp

    from .fourier import potentials

    for n, name in ((n1, "n1"), (n2, "n2")):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    d = check_d(d)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")

    keys = ("a1", "a2", "b1", "b2", "c")  # a at k1, a at k2, b at k1, b at k2, c at k
    # which potential reads which coefficients of a node
    reads = {"r": ("a1", "b2", "c"), "r_a": ("a1", "a2", "c"), "r_b": ("b1", "b2", "c")}

    def net(tag: str, n: int) -> list[dict[str, Any]]:
        return [{key: sp.Symbol(f"{key}_{tag}{j}") for key in keys} for j in range(n)]

    def pots(nodes: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            name: sum((v[u] * v[w] * v[t] for v in nodes), sp.Integer(0))
            for name, (u, w, t) in reads.items()
        }

    x, y = net("x", n1), net("y", n2)
    xy_sum = x + y  # the definition of add: concatenation
    xy_mul = [{key: u[key] * v[key] for key in keys} for u in x for v in y]  # Khatri–Rao
    px, py, ps, pm = pots(x), pots(y), pots(xy_sum), pots(xy_mul)
    for name in reads:
        assert sp.expand(ps[name] - (px[name] + py[name])) == 0, f"add fails for {name}"
        assert sp.expand(pm[name] - px[name] * py[name]) == 0, f"mul fails for {name}"

    # part 2: the library's add and mul against the definitions, at numbers
    gen = torch.Generator().manual_seed(seed)

    def rand_net(q: int) -> Weights:
        def u(rows: int, cols: int) -> torch.Tensor:
            return 2 * torch.rand(rows, cols, generator=gen, dtype=torch.float64) - 1

        return u(q, d), u(q, d), u(d, q)  # (q, d), (q, d), (d, q)

    wx, wy = rand_net(n1), rand_net(n2)
    lib = {"add": add(wx, wy), "mul": mul(wx, wy)}  # module globals: what a caller gets
    for op, want_q in (("add", n1 + n2), ("mul", n1 * n2)):
        got_q = lib[op][0].shape[0]
        assert got_q == want_q, f"library {op} returns {got_q} nodes, the definition {want_q}"

    k1, k2, k = torch.meshgrid(torch.arange(d), torch.arange(d), torch.arange(d), indexing="ij")
    values: dict[Any, torch.Tensor] = {}
    for tag, w, nodes in (("x", wx, x), ("y", wy, y)):
        za, zb, zc = coefficients(*w)  # (d, n) each
        for j, v in enumerate(nodes):
            coeff = {"a1": za[k1, j], "a2": za[k2, j], "b1": zb[k1, j], "b2": zb[k2, j],
                     "c": zc[k, j]}  # each (d, d, d)
            for key in keys:
                values[v[key]] = coeff[key]
    symbols = list(values)
    for op, defined in (("add", ps), ("mul", pm)):
        got = potentials(*lib[op])  # scaled r̃ = 2d r, (d, d, d) each
        for name in reads:
            f = sp.lambdify(symbols, defined[name], modules="numpy")
            want = torch.as_tensor(f(*[values[s].numpy() for s in symbols]))
            err = float((got[name] / (2 * d) - want).abs().max())
            assert err < 1e-12, (
                f"library {op} disagrees with its definition for {name}: max error {err:.3g}"
            )
    return True
