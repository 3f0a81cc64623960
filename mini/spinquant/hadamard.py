"""Hadamard matrices of every order n = K·2^m that Sylvester doubling or a Paley construction gives.

SpinQuant (Liu et al., arXiv 2405.16406) starts its rotations R1, R2 from a *random Hadamard*
``diag(±1)·H/√n`` and applies fixed Hadamards online (R3 on queries and keys, R4 before
``down_proj``). A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``, so
``H/√n`` is orthogonal and every entry has the same magnitude ``1/√n``: it spreads one large
coordinate evenly over all ``n`` (what makes outliers harmless). Orders other than 1 and 2 are
multiples of 4. Three constructions cover the sizes of real models:

- **Sylvester doubling**: ``H_{2n} = [[H, H], [H, -H]] = H_2 ⊗ H_n``; from ``H_1 = [1]`` this gives
  every power of two, and ``(H_{2^m})_{ij} = (-1)^{popcount(i & j)}`` (the Walsh matrix in natural
  order, ``scipy.linalg.hadamard``), the matrix :mod:`mini.spinquant.fwht` applies fast.
- **Paley I** (q a prime power, q ≡ 3 mod 4, order q + 1): with χ the quadratic character of
  GF(q) and the Jacobsthal matrix ``Q_ab = χ(a - b)`` (antisymmetric, ``Q Qᵀ = qI - J``,
  ``QJ = 0``), ``S = [[0, 1ᵀ], [-1, Q]]`` is skew with ``S Sᵀ = qI``, so ``H = I + S`` has
  ``H Hᵀ = I + S Sᵀ = (q + 1) I``.
- **Paley II** (q a prime power, q ≡ 1 mod 4, order 2(q + 1)): ``Q`` is symmetric, the conference
  matrix ``C = [[0, 1ᵀ], [1, Q]]`` has ``C Cᵀ = qI``, and ``H = C ⊗ [[1, 1], [1, -1]] +
  I ⊗ [[1, -1], [-1, -1]]``.

For ``n = c·2^t`` (c odd) the base is the smallest ``K = c·2^j`` that one of these gives, and
``H_n = H_K ⊗ H_{2^m}`` (m = t - j): the Kronecker product of Hadamards is a Hadamard, and with
``H_K`` on the *left* a row of ``x`` splits into K contiguous blocks of ``2^m`` on which the fast
transform runs before a K×K mix (``x·(A ⊗ B) = Aᵀ X B`` for ``X`` = x reshaped ``(K, 2^m)``).
GF(p^k) arithmetic is done exactly with integer polynomials modulo an irreducible polynomial
found by search, so prime powers work (the official K = 28 is Paley I with q = 27 = 3³, or Paley
II with q = 13; K = 52 needs Paley II with q = 25 = 5²).

The official code (``utils/hadamard_utils.py``) stores the matrices for K ∈ {12, 20, 28, 36, 40,
44, 52, 60, 108, 140, 156, 172} and asserts for any other odd part (its issue #33: Qwen sizes).
These constructions give all of them but **156 and 172** (155, 171 are not prime powers, nor are
77, 85, and 78, 86 are not multiples of 4): those two come from tables (Williamson-type
matrices), and n = 39·2^m, 43·2^m stay unsupported here (:func:`hadamard` raises ``ValueError``
with the nearest supported sizes). The sizes of real small models work: 352 = 44·8 (our tiny
Llama's MLP width), 576 = 36·16, 896 = 28·32, 1536 = 12·128, 4864 = 76·64 (Paley II, q = 37).

The ±1 pattern is built exactly in integers and cached per n; the result is that pattern times
``1/√n`` rounded once to ``dtype``, equal to the float64 matrix cast to ``dtype``.

Explained in :doc:`/book/spinquant/theory`.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = [
    "OFFICIAL_K",
    "HadamardBase",
    "hadamard",
    "hadamard_base",
    "hadamard_signs",
    "nearest_supported",
    "random_hadamard",
    "random_orthogonal",
    "supported",
]

OFFICIAL_K: tuple[int, ...] = (12, 20, 28, 36, 40, 44, 52, 60, 108, 140, 156, 172)
"""Base orders the official SpinQuant code stores as tables (``utils/hadamard_utils.py``)."""


@dataclass(frozen=True)
class HadamardBase:
    """How ``n = K · 2^m`` is built: ``construction`` ∈ {"sylvester", "paley1", "paley2"} gives
    the base ``H_K`` (from the prime power ``q``; None for Sylvester, where K = 1).

    Explained in :doc:`/book/spinquant/theory`.
    """

    n: int  #: the order, K · 2^m
    K: int  #: the base order (1 for a power of two)
    m: int  #: the number of Sylvester doublings
    construction: str  #: "sylvester", "paley1" or "paley2"
    q: int | None = None  #: the prime power of a Paley construction (None for Sylvester)


# ---------------------------------------------------------------------------------------------
# Number theory
# ---------------------------------------------------------------------------------------------
def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k``, p prime and k ≥ 1, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)  # smallest prime factor
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _base_construction(K: int) -> tuple[str, int | None] | None:
    """The construction that gives order K directly, or None (Paley I preferred to Paley II)."""
    if K == 1:
        return ("sylvester", None)
    if K % 4 == 0 and _prime_power(K - 1) is not None and (K - 1) % 4 == 3:
        return ("paley1", K - 1)
    if K % 4 == 0 and (K // 2 - 1) % 4 == 1 and _prime_power(K // 2 - 1) is not None:
        return ("paley2", K // 2 - 1)
    return None


def _check_n(n: object, name: str = "n") -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{name} must be a positive integer, got {n!r} ({type(n).__name__})")
    return n


def _find_base(n: int) -> HadamardBase | None:
    c, t = n, 0
    while c % 2 == 0:
        c //= 2
        t += 1
    if c == 1:
        return HadamardBase(n=n, K=1, m=t, construction="sylvester")
    for j in range(t + 1):  # smallest K = c·2^j first: the largest fast (power-of-two) part
        found = _base_construction(c << j)
        if found is not None:
            return HadamardBase(n=n, K=c << j, m=t - j, construction=found[0], q=found[1])
    return None


def supported(n: int) -> bool:
    """True if :func:`hadamard` can build order ``n`` (a K·2^m with K from Sylvester or Paley).

    Explained in :doc:`/book/spinquant/theory`.
    """
    return _find_base(_check_n(n)) is not None


def nearest_supported(n: int) -> tuple[int | None, int]:
    """The largest supported order below ``n`` (None for n = 1) and the smallest above it.

    Explained in :doc:`/book/spinquant/theory`.
    """
    n = _check_n(n)
    below = next((k for k in range(n - 1, 0, -1) if _find_base(k) is not None), None)
    above = next(k for k in range(n + 1, 2 * n + 2) if _find_base(k) is not None)  # 2^⌈log₂ n⌉ ≤ 2n
    return below, above


def hadamard_base(n: int) -> HadamardBase:
    """How order ``n`` decomposes: ``n = K·2^m`` and the construction of ``H_K``.

    Raises ``ValueError`` naming n and the nearest supported orders if none applies.

    Explained in :doc:`/book/spinquant/theory`.
    """
    n = _check_n(n)
    base = _find_base(n)
    if base is None:
        below, above = nearest_supported(n)
        raise ValueError(
            f"no Hadamard matrix of order n={n} here: n = K·2^m needs a base K that Sylvester "
            "doubling, Paley I (q+1, q ≡ 3 mod 4 a prime power) or Paley II (2(q+1), q ≡ 1 mod 4) "
            f"gives; nearest supported sizes: {below} below and {above} above"
        )
    return base


# ---------------------------------------------------------------------------------------------
# Finite fields GF(p^k) and the Paley constructions (exact, in integers)
# ---------------------------------------------------------------------------------------------
def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of a by monic f over GF(p); coefficients lowest degree first."""
    a = [c % p for c in a]
    k = len(f) - 1
    for i in range(len(a) - 1, k - 1, -1):
        c = a[i]
        if c:
            for j in range(k + 1):
                a[i - k + j] = (a[i - k + j] - c * f[j]) % p
    return (a[:k] + [0] * k)[:k]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p) (lowest degree first)."""
    if k == 1:
        return [0, 1]
    for code in range(p**k):
        f = [(code // p**i) % p for i in range(k)] + [1]
        reducible = False
        for d in range(1, k // 2 + 1):  # a factor of degree d ≤ k/2 exists iff reducible
            for gcode in range(p**d):
                g = [(gcode // p**i) % p for i in range(d)] + [1]
                if not any(_poly_mod(f, g, p)[:d]):
                    reducible = True
                    break
            if reducible:
                break
        if not reducible:
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # pragma: no cover


def _quadratic_character(q: int) -> torch.Tensor:
    """χ over GF(q) as an int64 table indexed by element code (base-p digits): 0, +1 or -1."""
    p, k = _prime_power(q)  # type: ignore[misc]
    f = _irreducible(p, k)
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    for x in range(1, q):
        digits = [(x // p**i) % p for i in range(k)]
        square = [0] * (2 * k - 1)
        for i, a in enumerate(digits):
            for j, b in enumerate(digits):
                square[i + j] += a * b
        r = _poly_mod(square, f, p)
        chi[sum(c * p**i for i, c in enumerate(r))] = 1
    return chi


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q_ab = χ(a - b)`` over GF(q), (q, q) int64."""
    p, k = _prime_power(q)  # type: ignore[misc]
    chi = _quadratic_character(q)
    elems = torch.arange(q)
    digits = torch.stack([(elems // p**i) % p for i in range(k)], dim=1)  # (q, k)
    diff = (digits[:, None, :] - digits[None, :, :]) % p  # (q, q, k): a - b digit by digit
    weights = torch.tensor([p**i for i in range(k)])
    return chi[(diff * weights).sum(-1)]  # (q, q)


def _paley1(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    S = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + torch.eye(q + 1, dtype=torch.int64)  # (q+1, q+1)


def _paley2(q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)
    C[0, 1:] = 1
    C[1:, 0] = 1
    C[1:, 1:] = Q
    one = torch.tensor([[1, 1], [1, -1]])
    zero = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(C, one) + torch.kron(torch.eye(q + 1, dtype=torch.int64), zero)  # (2q+2, 2q+2)


def _sylvester(size: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.int8)
    while H.shape[0] < size:  # H_{2n} = [[H, H], [H, -H]]
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


@functools.lru_cache(maxsize=64)
def _base_signs(K: int, construction: str, q: int | None) -> torch.Tensor:
    if construction == "sylvester":
        return torch.ones(1, 1, dtype=torch.int8)
    H = _paley1(q) if construction == "paley1" else _paley2(q)  # type: ignore[arg-type]
    assert H.shape == (K, K)
    return H.to(torch.int8)


@functools.lru_cache(maxsize=8)
def _signs_cached(n: int) -> torch.Tensor:
    base = hadamard_base(n)
    HK = _base_signs(base.K, base.construction, base.q)  # (K, K)
    HP = _sylvester(1 << base.m)  # (P, P)
    # H_K ⊗ H_P: entry ((a, i), (b, j)) = HK[a, b] · HP[i, j]
    return (HK[:, None, :, None] * HP[None, :, None, :]).reshape(n, n)  # (n, n) int8


def hadamard_signs(n: int) -> torch.Tensor:
    """The unnormalised Hadamard matrix of order n (entries ±1, int8, ``H Hᵀ = n I``).

    A fresh copy (the cache is not exposed); raises ``ValueError`` as :func:`hadamard`.

    Explained in :doc:`/book/spinquant/theory`.
    """
    return _signs_cached(_check_n(n)).clone()


def _check_dtype(dtype: object) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    return dtype


def _check_generator(generator: object) -> torch.Generator | None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")
    return generator


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The normalised Hadamard matrix ``H/√n`` of order n (orthogonal, entries ±1/√n), on CPU.

    ``H = H_K ⊗ H_{2^m}`` as :func:`hadamard_base` says; for ``n = 2^m`` the Sylvester (Walsh)
    matrix. Raises ``ValueError`` naming n and the nearest supported orders if no construction
    applies (e.g. n = 6 or 156).

    Explained in :doc:`/book/spinquant/theory`.
    """
    n = _check_n(n)
    dtype = _check_dtype(dtype)
    scale = torch.tensor(1.0 / math.sqrt(n), dtype=torch.float64).to(dtype)  # rounded once
    return _signs_cached(n).to(dtype) * scale  # (n, n): ±1 · fl(1/√n) is exact


def random_hadamard(n: int, generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``diag(s)·H/√n`` with random signs ``s ∈ {±1}^n`` drawn from ``generator`` (the official
    SpinQuant initialisation of R1 and R2).

    Explained in :doc:`/book/spinquant/theory`.
    """
    n = _check_n(n)
    dtype = _check_dtype(dtype)
    generator = _check_generator(generator)
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1  # (n,)
    return hadamard(n, dtype) * signs.to(dtype)[:, None]  # (n, n): row i times s_i


def random_orthogonal(n: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A Haar-distributed orthogonal n×n matrix: QR of a standard Gaussian (float64) with the
    sign fix ``Q·diag(sign(diag R))``.

    Without the fix the result depends on the QR routine's sign convention (LAPACK's makes
    ``R_00`` have the opposite sign of ``A_00``) and is not Haar (Mezzadri, arXiv math-ph/0609050).

    Explained in :doc:`/book/spinquant/theory`.
    """
    n = _check_n(n)
    dtype = _check_dtype(dtype)
    generator = _check_generator(generator)
    A = torch.randn(n, n, generator=generator, dtype=torch.float64)  # (n, n)
    Q, R = torch.linalg.qr(A)
    d = torch.sign(torch.diagonal(R))
    d[d == 0] = 1.0  # probability zero, but keep Q orthogonal
    return (Q * d[None, :]).to(dtype)  # (n, n): column j times sign(R_jj)
