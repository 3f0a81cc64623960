"""Partial solutions on one frequency, and global optimizers composed from them.

Paper: Yuandong Tian, "Composing Global Optimizers to Reasoning Tasks via Algebraic Objects in
Neural Nets", 2024, arXiv:2410.01779 (the composition section: the partial solutions z_ν, z_4c, z_syn,
z_syn,αβ, z_ξ; the global constructions z_F6 and z_F4/6; perfect memorization has
order d²). The book's chapter ``book/cogo/theory.ipynb`` (Part I, CoGO theory) checks each claim.

Partial solutions, coefficients at +k (−k gets the conjugates, every other frequency 0;
ω₃ = e^{2πi/3}; ν, ξ, α, β of modulus 1):

    name     order  a                 b                  c               vanishes
    nu       2      [1, ν]            [1, −ν]            [1, −ν⁻²]       a²c, b²c
    4c       2      [1, i]            [1, −i]            [1, 1]          ābc, ab̄c, all of R*
    syn      3      [1, ω₃, ω₃²]      same               same            R_c but abc, R_n, ā²c, b̄²c
    syn_ab   3      [1, αω₃, βω₃²]    [1, ᾱω₃, β̄ω₃²]     [1, ω₃, ω₃²]    abc̄, āb̄c, R_n
    xi       2      [1, ξ]            [1, −iξ̄]           [1, i]          abc̄, āb̄c (not R_n)

Global constructions (odd d >= 3, blocks on k = 1 … (d−1)/2; each block's potentials are
multiplied by the block scale κ with ``κ Σabc = 1/(2d)``, i.e. its weights by ``κ^{1/3}``
(:func:`mini.cogo.semiring.scale`), so that ``r̃_kkk = 1``; κ is not the weight decay λ;
built with :mod:`mini.cogo.semiring`):

- ``"F6"``: Σ_k z_ν·z_syn, 3(d−1) nodes, ν = e^{iπ/3} by default (any unit ν works; we avoid
  ν = ±i, which is z_4c, and ν = e^{±iπ/4}, e^{±3iπ/4}, whose c-ratio −ν⁻² = ±i reads as z_ξ).
  Zero loss: z_ν kills a²c, b²c; z_syn kills the rest except abc; products of homomorphisms.
- ``"F6_ab"``: Σ_k z_4c·z_syn,αβ, 3(d−1) nodes, α = e^{0.5i}, β = e^{−i} by default. Zero loss.
- ``"F4"``: Σ_k z_4c·z_ξ, 2(d−1) nodes, ξ = e^{iπ/6} by default (generic: at ξ = e^{iπ/4}, z_ξ
  coincides with z_ν at ν = e^{iπ/4}, since then −iξ̄ = −ξ and −ξ⁻² = i). NOT global: everything vanishes except R_n.
  Per node ``|a| = |b| = κ^{1/3}`` and ``Σ_nodes c = κ^{1/3}(1+1)(1+i)``, so
  ``Σ(|a|²+|b|²)c = 4κ(1+i) = (1+i)/(2d)``
  and the m = 0 term is S̃ = 2d·2·(1+i)/(2d) = 2(1+i), ``¼|S̃|² = 2``. Hence ℓ_k = −2 + 1 + 2 = 1 for
  every k ≠ 0 and ``ℓ = (d−1)/d + (d−1)/d = 2(d−1)/d``, twice the zero network's (d−1)/d.
- ``"F4/6"``: order-4 blocks z_4c·z_ξ on every k ≠ k0 ((d−3)/2 of them) and one order-6 block
  z_ν·z_syn at k0 (default 1), whose output weights get extra coefficients ``x_k ∈ C⁶`` at each
  other frequency k solving the 9×6 linear system: the 8 bilinear forms ``Σ_j v_j x_j`` with
  v ∈ {ab, āb, ab̄, āb̄, a², b², ā², b̄²} (coefficients at k0) vanish, so no off-diagonal r̃ or
  ``R*`` term appears at output k; and ``Σ_j (|a_j|²+|b_j|²) x_j = −Σ_{block k}(|a|²+|b|²)c``
  cancels the order-4 block's R_n residual. For z_ν·z_syn the first 8 forms span
  C²⊗s ⊕ C²⊗s̄ ⊕ [1,−1]⊗1 (s = [1, ω₃, ω₃²]) while ``|a|²+|b|² = 2κ^{2/3}·1``, so the solution is a
  constant over the 6 nodes. 2d nodes, zero loss. At d = 3 there is no other frequency: F4/6
  is then the single order-6 block, i.e. F6 (6 = 2d nodes); we return it and say so here.
- :func:`memorization`: d² nodes, node (a0, b0) reads ``[a = a0] + [b = b0]`` and writes
  ``e_{a0+b0}/2``; then ``o = e_{a+b} + 1`` and ``P⊥ 1 = 0``: zero loss for any d >= 2.

Differences from the official code: the official repository checks constructions in notebooks
by hand; the exact form of the paper's z_F4/6 bias channel is not published as code, so ours is
the linear-system version described above (it matches the digest's description).

Explained in :doc:`/book/cogo/theory`.
"""
from __future__ import annotations

import cmath
import math
from typing import Any

import numpy as np
import torch

from .fourier import coefficients, constraint_sets, from_coefficients
from .model import check_d
from .semiring import Weights, add, mul, scale, zero

__all__ = [
    "PARTIALS",
    "CONSTRUCTIONS",
    "DEFAULT_PARAMS",
    "partial_coefficients",
    "partial",
    "partial_constraints",
    "construct",
    "n_nodes",
    "memorization",
]

PARTIALS = ("nu", "4c", "syn", "syn_ab", "xi")
CONSTRUCTIONS = ("F6", "F6_ab", "F4", "F4/6")
DEFAULT_PARAMS: dict[str, complex] = {
    "nu": cmath.exp(1j * math.pi / 3),
    "alpha": cmath.exp(0.5j),
    "beta": cmath.exp(-1.0j),
    "xi": cmath.exp(1j * math.pi / 6),
}
_PARAMS = {"nu": ("nu",), "4c": (), "syn": (), "syn_ab": ("alpha", "beta"), "xi": ("xi",)}
_W3 = cmath.exp(2j * math.pi / 3)


def _unit(name: str, value: Any) -> complex:
    if isinstance(value, bool) or not isinstance(value, (int, float, complex, np.number)):
        raise TypeError(f"{name} must be a complex number of modulus 1, got {value!r}")
    v = complex(value)
    if not math.isfinite(abs(v)) or abs(abs(v) - 1.0) > 1e-9:
        raise ValueError(f"{name} must have modulus 1, got {v!r} with |{name}| = {abs(v):.6g}")
    return v


def partial_coefficients(name: str, **params: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The +k coefficient rows ``(a, b, c)`` (complex128, one entry per node) of a partial.

    Explained in :doc:`/book/cogo/theory`.
    """
    if name not in PARTIALS:
        raise ValueError(f"name must be one of {PARTIALS}, got {name!r}")
    extra = set(params) - set(_PARAMS[name])
    if extra:
        raise ValueError(
            f"partial {name!r} takes parameters {_PARAMS[name]}, got unexpected {sorted(extra)}"
        )
    p = {k: _unit(k, params.get(k, DEFAULT_PARAMS[k])) for k in _PARAMS[name]}
    w, w2 = _W3, _W3**2
    if name == "nu":
        nu = p["nu"]
        a, b, c = [1, nu], [1, -nu], [1, -(nu**-2)]
    elif name == "4c":
        a, b, c = [1, 1j], [1, -1j], [1, 1]
    elif name == "syn":
        a = b = c = [1, w, w2]
    elif name == "syn_ab":
        al, be = p["alpha"], p["beta"]
        a = [1, al * w, be * w2]
        b = [1, al.conjugate() * w, be.conjugate() * w2]
        c = [1, w, w2]
    else:  # xi
        xi = p["xi"]
        a, b, c = [1, xi], [1, -1j * xi.conjugate()], [1, 1j]
    return tuple(np.asarray(x, dtype=np.complex128) for x in (a, b, c))  # type: ignore[return-value]


def _check_k(k: Any, d: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer frequency, got {k!r}")
    k = int(k)
    if not 1 <= k <= (d - 1) // 2:
        raise ValueError(f"k must be in 1..(d-1)/2 = 1..{(d - 1) // 2} for d = {d}, got {k}")
    return k


def _on_frequency(d: int, k: int, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> Weights:
    """Real weights whose coefficients are (a, b, c) at +k, conjugates at −k, 0 elsewhere."""
    n = len(a)
    zs = []
    for row in (a, b, c):
        z = torch.zeros(d, n, dtype=torch.complex128)  # (d, n)
        z[k] = torch.from_numpy(np.asarray(row, dtype=np.complex128))
        z[d - k] = z[k].conj()
        zs.append(z)
    return from_coefficients(*zs)


def partial(name: str, d: int, k: int, **params: Any) -> Weights:
    """Real float64 weights of a partial solution living on frequency ±k (odd d >= 3).

    Explained in :doc:`/book/cogo/theory`.
    """
    d = check_d(d, odd=True)
    k = _check_k(k, d)
    return _on_frequency(d, k, *partial_coefficients(name, **params))


def partial_constraints(name: str, **params: Any) -> dict[str, dict[str, complex]]:
    """Constraint-set values (R_c, R_n, R*) of a partial solution, unscaled.

    Explained in :doc:`/book/cogo/theory`.
    """
    return constraint_sets(*partial_coefficients(name, **params))


def _sum_abc(x: Weights, k: int) -> complex:
    za, zb, zc = coefficients(*x)
    return complex((za[k] * zb[k] * zc[k]).sum())


def _block(d: int, k: int, n1: str, n2: str, params: dict[str, Any]) -> Weights:
    """z_{n1}·z_{n2} on frequency ±k, scaled so that r̃_kkk = 1 (block scale κ Σabc = 1/(2d))."""
    p1 = {key: params[key] for key in _PARAMS[n1]}
    p2 = {key: params[key] for key in _PARAMS[n2]}
    x = mul(partial(n1, d, k, **p1), partial(n2, d, k, **p2))
    s = _sum_abc(x, k)
    if abs(s.imag) > 1e-9 * abs(s) or s.real <= 0:
        raise ValueError(f"block {n1}·{n2} has Σabc = {s}, not a positive real; cannot scale")
    return scale(x, 1.0 / (2 * d * s.real))


def n_nodes(name: str, d: int) -> int:
    """Number of hidden nodes of a construction: 3(d−1) for F6, F6_ab; 2(d−1) for F4; 2d for F4/6.

    Explained in :doc:`/book/cogo/theory`.
    """
    _check_name(name)
    d = check_d(d, odd=True)
    return {"F6": 3 * (d - 1), "F6_ab": 3 * (d - 1), "F4": 2 * (d - 1), "F4/6": 2 * d}[name]


def _check_name(name: Any) -> None:
    if name not in CONSTRUCTIONS:
        raise ValueError(f"name must be one of the known constructions {CONSTRUCTIONS}, got {name!r}")


def construct(name: str, d: int, **params: Any) -> Weights:
    """Weights ``(Wa, Wb, Wc)`` (float64) of a named construction for odd ``d >= 3``.

    ``name`` in ``CONSTRUCTIONS``; ``params`` may override ``nu``, ``alpha``, ``beta``,
    ``xi`` (unit complex numbers) and, for ``"F4/6"``, ``k0`` (the order-6 frequency, default 1).
    ``"F4"`` is deliberately not global (loss 2(d−1)/d); the others have zero loss.

    Explained in :doc:`/book/cogo/theory`.
    """
    _check_name(name)
    d = check_d(d, odd=True)
    allowed = {"nu", "alpha", "beta", "xi"} | ({"k0"} if name == "F4/6" else set())
    extra = set(params) - allowed
    if extra:
        raise ValueError(f"construct({name!r}) takes parameters {sorted(allowed)}, got {sorted(extra)}")
    p = {key: params.get(key, DEFAULT_PARAMS[key]) for key in DEFAULT_PARAMS}
    ks = range(1, (d - 1) // 2 + 1)
    out = zero(d)
    if name in ("F6", "F6_ab", "F4"):
        n1, n2 = {"F6": ("nu", "syn"), "F6_ab": ("4c", "syn_ab"), "F4": ("4c", "xi")}[name]
        for k in ks:
            out = add(out, _block(d, k, n1, n2, p))
        return out
    # F4/6
    k0 = _check_k(params.get("k0", 1), d)
    six = _block(d, k0, "nu", "syn", p)
    za, zb, zc = coefficients(*six)  # (d, 6)
    a, b = za[k0], zb[k0]  # (6,)
    forms = torch.stack(
        [a * b, a.conj() * b, a * b.conj(), (a * b).conj(), a * a, b * b, (a * a).conj(),
         (b * b).conj(), a.abs() ** 2 + b.abs() ** 2]
    )  # (9, 6): bilinear forms Σ_j v_j x_j
    fours = zero(d)
    for k in ks:
        if k == k0:
            continue
        four = _block(d, k, "4c", "xi", p)
        fours = add(fours, four)
        fa, fb, fc = coefficients(*four)
        rn = complex(((fa[k].abs() ** 2 + fb[k].abs() ** 2) * fc[k]).sum())  # R_n residual
        rhs = torch.zeros(9, 1, dtype=torch.complex128)
        rhs[8, 0] = -rn
        x = torch.linalg.lstsq(forms, rhs, driver="gelsd").solution[:, 0]  # (6,)
        res = float((forms @ x - rhs[:, 0]).abs().max())
        if res > 1e-10 * max(abs(rn), 1.0):
            raise RuntimeError(f"F4/6: bias channel at k = {k} not solvable (residual {res:.3g})")
        zc[k] = x
        zc[d - k] = x.conj()
    six = from_coefficients(za, zb, zc)
    return add(six, fours)


def memorization(d: int) -> Weights:
    """Perfect memorization with d² nodes (order d²): zero loss for any d >= 2, float64.

    Explained in :doc:`/book/cogo/theory`.
    """
    d = check_d(d)
    q = d * d
    Wa = torch.zeros(q, d, dtype=torch.float64)
    Wb = torch.zeros(q, d, dtype=torch.float64)
    Wc = torch.zeros(d, q, dtype=torch.float64)
    n = torch.arange(q)
    a0, b0 = n // d, n % d
    Wa[n, a0] = 1.0
    Wb[n, b0] = 1.0
    Wc[(a0 + b0) % d, n] = 0.5
    return Wa, Wb, Wc
