"""Fourier coefficients, the potentials r, r_a, r_b, and the exact loss decomposition.

Paper: Yuandong Tian, "Composing Global Optimizers to Reasoning Tasks via Algebraic Objects in
Neural Nets", 2024, arXiv:2410.01779 (the Fourier-basis section: the loss decomposition into potentials, the
sufficient conditions and the constraint sets R_c, R_n, R*). The book's chapter
``book/cogo/theory.ipynb`` (Part I, CoGO theory) derives all of it.

Convention. ``ω = e^{2πi/d}``, nodes ``j = 1..q``:

    z_{a,k,j} = (1/d) Σ_g Wa[j, g] ω^{-kg}      (same for b),
    z_{c,k,j} = (1/d) Σ_g Wc[g, j] ω^{+kg},

so ``Wa[j, g] = Σ_k z_{a,k,j} ω^{kg}`` and ``Wc[g, j] = Σ_k z_{c,k,j} ω^{-kg}``; real weights
⇔ ``z_{p,-k} = conj(z_{p,k})``.

Potentials. ``r_{k1 k2 k} = Σ_j z_{a,k1,j} z_{b,k2,j} z_{c,k,j}`` and
``r_{p,k1 k2 k} = Σ_j z_{p,k1,j} z_{p,k2,j} z_{c,k,j}`` for p ∈ {a, b}. We return the scaled
``r̃ = 2d · r``, whose target diagonal is ``r̃_{kkk} = 1``.

Derivation of the decomposition. Expanding ``h² = (Σ z_a ω^{k1 a} + Σ z_b ω^{k2 b})²`` and
``Wc`` in Fourier, the output's coefficient at ``ω^{-kg}`` is the function of (a, b)

    f_k(a, b) = Σ_{k1,k2} 2 r_{k1k2k} ω^{k1 a + k2 b} + Σ_m S_{a,m,k} ω^{ma} + Σ_m S_{b,m,k} ω^{mb},
    S_{p,m,k} = Σ_{k'} r_{p,k',m-k',k},

while the target ``e_{a+b}`` has ``(1/d) ω^{k(a+b)}``. ``P⊥`` removes k = 0; Parseval over g
(factor d) and over the d×d grid of (a, b) (mean = sum of squared 2-D coefficients) give, when
``z_{a,0} = z_{b,0} = 0`` (so that ``r_{m,0,k} = r_{0,m,k} = 0`` and the 2-D coefficients at
(m, 0) and (0, m) are S_a and S_b alone)::

    ℓ = d⁻¹ Σ_{k≠0} ℓ_k + (d−1)/d,
    ℓ_k = −2 Re r̃_{kkk} + Σ_{k1,k2≠0} |r̃_{k1k2k}|²
          + ¼ Σ_{m≠0} Σ_p |S̃_{p,m,k}|² + ¼ |S̃_{a,0,k} + S̃_{b,0,k}|²

with ``S̃ = 2d·S``. The constants are the digest's; we verified them to ~1e-15 relative error in
float64 (tests/test_cogo_core.py). Without centring the identity fails: ``r_{m,0,k}`` mixes with
``S_{a,m,k}``. :func:`center` removes the frequency-0 part (row means of Wa, Wb); that changes
the network (and its loss), so centre before analysing, or compare centred with centred.

Differences from the official code: the official notebooks compute the same coefficients with
an explicit DFT matrix; we use ``torch.fft`` in complex128 and return whole (d, d, d) tensors.

Explained in :doc:`/book/cogo/theory`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .model import as_weights, check_weights

__all__ = [
    "coefficients",
    "from_coefficients",
    "center",
    "potentials",
    "per_frequency_loss",
    "loss_from_potentials",
    "sufficient_conditions",
    "constraint_sets",
]


def coefficients(Wa: Any, Wb: Any, Wc: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fourier coefficients ``(za, zb, zc)``, complex128 of shape ``(d, q)`` indexed ``[k, j]``.

    Computed on detached CPU float64 copies: for analysis, not for gradients.

    Explained in :doc:`/book/cogo/theory`.
    """
    Wa, Wb, Wc = as_weights(Wa, Wb, Wc)
    Wa, Wb, Wc = (w.detach().to("cpu", torch.float64) for w in (Wa, Wb, Wc))
    q, d = Wa.shape
    if q == 0:  # the empty network (MKL's FFT rejects empty batches)
        e = torch.zeros(d, 0, dtype=torch.complex128)
        return e, e.clone(), e.clone()
    za = torch.fft.fft(Wa, dim=1).T / d  # (d, q): (1/d) Σ_g Wa[j,g] ω^{-kg}
    zb = torch.fft.fft(Wb, dim=1).T / d  # (d, q)
    zc = torch.fft.ifft(Wc, dim=0)  # (d, q): (1/d) Σ_g Wc[g,j] ω^{+kg}
    return za.contiguous(), zb.contiguous(), zc.contiguous()


def _check_coeffs(za: Any, zb: Any, zc: Any) -> tuple[torch.Tensor, ...]:
    zs = []
    for z, n in zip((za, zb, zc), ("za", "zb", "zc")):
        if isinstance(z, np.ndarray):
            z = torch.from_numpy(np.asarray(z, dtype=np.complex128))
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{n} must be a torch.Tensor or numpy.ndarray, got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"{n} must be 2-D (d, q), got shape {tuple(z.shape)}")
        zs.append(z.to(torch.complex128))
    if not (zs[0].shape == zs[1].shape == zs[2].shape):
        raise ValueError(
            f"za, zb, zc must share the shape (d, q), got {[tuple(z.shape) for z in zs]}"
        )
    if zs[0].shape[0] < 2:
        raise ValueError(f"za has shape {tuple(zs[0].shape)}: d (first dimension) must be >= 2")
    return tuple(zs)


def from_coefficients(
    za: Any, zb: Any, zc: Any, rtol: float = 1e-9
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`coefficients`: real float64 ``(Wa, Wb, Wc)``.

    Raises ValueError unless every ``z[-k] = conj(z[k])`` to ``rtol`` times the largest modulus.

    Explained in :doc:`/book/cogo/theory`.
    """
    za, zb, zc = _check_coeffs(za, zb, zc)
    d = za.shape[0]
    neg = (-torch.arange(d)) % d
    for z, n in zip((za, zb, zc), ("za", "zb", "zc")):
        if z.numel():
            err = float((z[neg] - z.conj()).abs().max())
            scale = max(float(z.abs().max()), 1e-300)
            if err > rtol * scale:
                raise ValueError(
                    f"{n} is not conjugate-symmetric (z[-k] = conj(z[k])): max violation {err:.3g}"
                    f" vs allowed {rtol:g} x {scale:.3g}; it does not describe real weights"
                )
    if za.shape[1] == 0:
        return (torch.zeros(0, d, dtype=torch.float64), torch.zeros(0, d, dtype=torch.float64),
                torch.zeros(d, 0, dtype=torch.float64))
    Wa = (torch.fft.ifft(za, dim=0) * d).real.T.contiguous()  # (q, d): Σ_k z ω^{kg}
    Wb = (torch.fft.ifft(zb, dim=0) * d).real.T.contiguous()  # (q, d)
    Wc = torch.fft.fft(zc, dim=0).real.contiguous()  # (d, q): Σ_k z ω^{-kg}
    return Wa, Wb, Wc


def center(Wa: Any, Wb: Any, Wc: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove the frequency-0 part of ``Wa`` and ``Wb`` (their row means); ``Wc`` unchanged.

    After centring ``z_{a,0} = z_{b,0} = 0``, the hypothesis of the loss decomposition.

    Explained in :doc:`/book/cogo/theory`.
    """
    Wa, Wb, Wc = as_weights(Wa, Wb, Wc)
    return Wa - Wa.mean(dim=1, keepdim=True), Wb - Wb.mean(dim=1, keepdim=True), Wc


def _triple(x: torch.Tensor, y: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,kj,lj->ikl", x, y, c)  # (d, d, d)


def potentials(Wa: Any, Wb: Any, Wc: Any) -> dict[str, torch.Tensor]:
    """Scaled potentials ``r̃ = 2d·r``: keys ``"r"``, ``"r_a"``, ``"r_b"``, each (d, d, d) complex128.

    ``r[k1, k2, k] = 2d Σ_j z_{a,k1,j} z_{b,k2,j} z_{c,k,j}`` and
    ``r_p[k1, k2, k] = 2d Σ_j z_{p,k1,j} z_{p,k2,j} z_{c,k,j}``; the target is ``r[k, k, k] = 1``.

    Explained in :doc:`/book/cogo/theory`.
    """
    za, zb, zc = coefficients(Wa, Wb, Wc)
    d = za.shape[0]
    s = 2.0 * d
    return {
        "r": s * _triple(za, zb, zc),
        "r_a": s * _triple(za, za, zc),
        "r_b": s * _triple(zb, zb, zc),
    }


def _check_pots(pots: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(pots, dict) or not {"r", "r_a", "r_b"} <= set(pots):
        raise TypeError(
            "potentials must be the dict returned by potentials() with keys 'r', 'r_a', 'r_b'"
        )
    r, ra, rb = (torch.as_tensor(pots[k]).to(torch.complex128) for k in ("r", "r_a", "r_b"))
    d = r.shape[0]
    for t, n in zip((r, ra, rb), ("r", "r_a", "r_b")):
        if tuple(t.shape) != (d, d, d):
            raise ValueError(f"potentials[{n!r}] must have shape (d, d, d), got {tuple(t.shape)}")
    return r, ra, rb


def _sums(rp: torch.Tensor) -> torch.Tensor:
    """``S[m, k] = Σ_{k'} rp[k', (m - k') mod d, k]``, shape (d, d)."""
    d = rp.shape[0]
    kp = torch.arange(d)[:, None]  # (d, 1) k'
    m = torch.arange(d)[None, :]  # (1, d)
    return rp[kp, (m - kp) % d, :].sum(dim=0)  # (d(m), d(k))


def per_frequency_loss(pots: dict[str, torch.Tensor]) -> torch.Tensor:
    """``ℓ_k`` of the decomposition for every k: float64, shape ``(d,)``; entry 0 is 0.

    Exact only for centred weights (``z_{a,0} = z_{b,0} = 0``); see the module
    docstring.

    Explained in :doc:`/book/cogo/theory`.
    """
    r, ra, rb = _check_pots(pots)
    d = r.shape[0]
    k = torch.arange(d)
    diag = r[k, k, k].real  # (d,)
    off = (r[1:, 1:, :].abs() ** 2).sum(dim=(0, 1))  # (d,) Σ_{k1,k2≠0} |r̃|²
    Sa, Sb = _sums(ra), _sums(rb)  # (d(m), d(k))
    quad = 0.25 * ((Sa[1:].abs() ** 2).sum(0) + (Sb[1:].abs() ** 2).sum(0))  # (d,)
    zero = 0.25 * (Sa[0] + Sb[0]).abs() ** 2  # (d,)
    lk = -2 * diag + off + quad + zero
    lk[0] = 0.0
    return lk


def loss_from_potentials(pots: dict[str, torch.Tensor]) -> torch.Tensor:
    """``ℓ = d⁻¹ Σ_{k≠0} ℓ_k + (d−1)/d``, a 0-dim float64 tensor (exact for centred weights).

    Explained in :doc:`/book/cogo/theory`.
    """
    lk = per_frequency_loss(pots)
    d = lk.shape[0]
    return lk[1:].sum() / d + (d - 1) / d


def sufficient_conditions(Wa: Any, Wb: Any, Wc: Any, atol: float = 1e-8) -> dict[str, Any]:
    """Max violation of each sufficient condition for zero loss, and whether it holds.

    Keys: ``"diag"`` ``max_k |r̃_kkk − 1|``; ``"off_diag"`` ``max |r̃_{k1k2k}|`` over (k1, k2) ≠ (k, k),
    k1, k2 ≠ 0; ``"R_star"`` ``max |Σ_k' r̃_{p,k',m−k',k}|`` over p, m ≠ 0; ``"R_n"``
    ``max |Σ_p Σ_k' r̃_{p,k',−k',k}|`` (all over k ≠ 0); ``"ok_<name>"`` each ``<= atol``; ``"ok"``
    all of them. ``"centred"`` says whether ``z_{a,0} = z_{b,0} = 0`` (to atol).

    Explained in :doc:`/book/cogo/theory`.
    """
    if not isinstance(atol, (int, float)) or isinstance(atol, bool) or atol < 0:
        raise ValueError(f"atol must be a non-negative number, got {atol!r}")
    check_weights(Wa, Wb, Wc)
    za, zb, _ = coefficients(Wa, Wb, Wc)
    pots = potentials(Wa, Wb, Wc)
    r, ra, rb = _check_pots(pots)
    d = r.shape[0]
    k = torch.arange(1, d)
    diag = float((r[k, k, k] - 1).abs().max())
    rr = r[1:, 1:, 1:].clone()  # (d-1, d-1, d-1) indices shifted by 1
    kk = torch.arange(d - 1)
    rr[kk, kk, kk] = 0
    off = float(rr.abs().max())
    Sa, Sb = _sums(ra), _sums(rb)
    rstar = float(torch.cat([Sa[1:, 1:], Sb[1:, 1:]]).abs().max()) if d > 1 else 0.0
    rn = float((Sa[0, 1:] + Sb[0, 1:]).abs().max())
    out: dict[str, Any] = {"diag": diag, "off_diag": off, "R_star": rstar, "R_n": rn}
    for n in ("diag", "off_diag", "R_star", "R_n"):
        out["ok_" + n] = out[n] <= atol
    out["ok"] = all(out["ok_" + n] for n in ("diag", "off_diag", "R_star", "R_n"))
    z0 = torch.cat([za[0], zb[0]]).abs()  # (2q,)
    out["centred"] = bool(z0.numel() == 0 or float(z0.max()) <= atol)
    return out


def constraint_sets(a: Any, b: Any, c: Any) -> dict[str, dict[str, complex]]:
    """Constraint-set values of nodes living on one frequency ±k, from their +k coefficients.

    ``a, b, c``: 1-D complex sequences (one entry per node). Keys use ``*`` for the complex
    conjugate of the letter before it: ``{"R_c": {"abc", "a*bc", "ab*c", "abc*", "a*b*c"},
    "R_n": {"|a|^2c", "|b|^2c"}, "R*": {"a^2c", "b^2c", "a*^2c", "b*^2c"}}`` (sums over nodes,
    e.g. ``"a*bc"`` = Σ_j ā_j b_j c_j). For a global solution, after scaling ``abc`` = 1/(2d),
    the rest of R_c and all of R* vanish and the two R_n values sum to zero (summed over every
    block that feeds output frequency k).

    Explained in :doc:`/book/cogo/theory`.
    """
    arrs = []
    for x, n in zip((a, b, c), ("a", "b", "c")):
        x = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
        if x.ndim != 1:
            raise ValueError(f"{n} must be 1-D (one coefficient per node), got shape {x.shape}")
        arrs.append(x.astype(np.complex128))
    a, b, c = arrs
    if not (a.shape == b.shape == c.shape):
        raise ValueError(f"a, b, c must have the same length, got {a.shape}, {b.shape}, {c.shape}")
    ac, bc, cc = a.conj(), b.conj(), c.conj()

    def s(x: np.ndarray) -> complex:
        return complex(x.sum())

    return {
        "R_c": {
            "abc": s(a * b * c),
            "a*bc": s(ac * b * c),
            "ab*c": s(a * bc * c),
            "abc*": s(a * b * cc),
            "a*b*c": s(ac * bc * c),
        },
        "R_n": {"|a|^2c": s(np.abs(a) ** 2 * c), "|b|^2c": s(np.abs(b) ** 2 * c)},
        "R*": {"a^2c": s(a * a * c), "b^2c": s(b * b * c), "a*^2c": s(ac * ac * c), "b*^2c": s(bc * bc * c)},
    }
