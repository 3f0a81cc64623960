"""The summaries of mini.cogo.analysis that the gd_solutions lab plots and tabulates.

Each is checked on constructed networks, where the answer is known, and against an independent
computation (an explicit DFT sum, a hand count of block types).
"""
from __future__ import annotations

import cmath
import math

import numpy as np
import pytest
import torch

from mini.cogo import analysis as an
from mini.cogo import constructions as cons


def explicit_off_frequency(Wc: torch.Tensor, nodes: list[int], k: int) -> float:
    """1 − (energy at ±k) / (total energy) of the nodes' output weights, by an explicit DFT sum."""
    d = Wc.shape[0]
    W = Wc.numpy()
    own = total = 0.0
    for j in nodes:
        for kk in range(d):
            z = sum(W[g, j] * cmath.exp(2j * math.pi * kk * g / d) for g in range(d)) / d
            total += abs(z) ** 2
            if kk in (k, d - k):
                own += abs(z) ** 2
    return 1.0 - own / total


def nodes_of(A: an.Analysis, k: int) -> list[int]:
    return [j for j, kk in enumerate(A.assignment) if kk == k]


@pytest.mark.parametrize("d", [7, 11])
def test_off_frequency_energy_of_f6_is_zero(d):
    W = cons.construct("F6", d)
    A = an.analyze(*W)
    shares = an.off_frequency_energy(W[2], A)
    assert sorted(shares) == list(range(1, (d - 1) // 2 + 1))
    assert max(shares.values()) < 1e-12


@pytest.mark.parametrize("d", [7, 11, 23])
def test_off_frequency_energy_of_f46_bias_channel(d):
    W = cons.construct("F4/6", d)
    A = an.analyze(*W)
    shares = an.off_frequency_energy(W[2], A)
    k0 = 1  # the order-6 frequency of construct("F4/6")
    assert A.orders[k0] == 6
    for k, s in shares.items():
        if k != k0:
            assert A.orders[k] == 4 and s < 1e-12  # order-4 blocks live on ±k only
    # the bias channel carries output energy at every other frequency: compare an explicit DFT
    ref = explicit_off_frequency(W[2], nodes_of(A, k0), k0)
    assert ref > 0.3
    assert abs(shares[k0] - ref) < 1e-10


def test_off_frequency_energy_matches_explicit_dft_on_a_perturbed_network():
    d = 11
    Wa, Wb, Wc = cons.construct("F6", d)
    g = torch.Generator().manual_seed(3)
    Wc = Wc + 0.02 * torch.randn(Wc.shape, generator=g, dtype=Wc.dtype)  # (d, q)
    A = an.analyze(Wa, Wb, Wc)
    shares = an.off_frequency_energy(Wc.numpy(), A)  # numpy input too
    for k, s in shares.items():
        assert 0 < s < 0.5
        assert abs(s - explicit_off_frequency(Wc, nodes_of(A, k), k)) < 1e-10


def test_off_frequency_energy_errors():
    W = cons.construct("F6", 7)
    A = an.analyze(*W)
    with pytest.raises(TypeError, match="analysis must be an Analysis"):
        an.off_frequency_energy(W[2], {"d": 7})
    with pytest.raises(ValueError, match=r"Wc must have shape \(d, q\) = \(7, 18\).*got \(18, 7\)"):
        an.off_frequency_energy(W[2].T, A)
    with pytest.raises(TypeError, match="Wc must be a torch.Tensor or numpy.ndarray, got list"):
        an.off_frequency_energy(W[2].tolist(), A)


def test_factor_parameters_of_constructions():
    d = 11
    nu, xi = cmath.exp(0.7j), cmath.exp(0.3j)
    alpha, beta = cmath.exp(0.5j), cmath.exp(-1.0j)
    A = [
        an.analyze(*cons.construct("F6", d, nu=nu)),
        an.analyze(*cons.construct("F6_ab", d, alpha=alpha, beta=beta)),
        an.analyze(*cons.construct("F4/6", d, xi=xi)),
    ]
    p = an.factor_parameters(A)
    half = (d - 1) // 2
    # hand count: F6 has half nu·syn blocks, F4/6 one more; F6_ab half 4c·syn_ab; F4/6 half-1 4c·xi
    assert {n: len(v) for n, v in p.items()} == {
        "xi": half - 1, "nu": half + 1, "alpha": half, "beta": half,
    }
    for v in p.values():
        assert np.allclose(np.abs(v), 1.0, atol=1e-8)  # unit parameters after normalisation
    # read up to the factor's orientation and the node symmetry (a, b, c) -> (-a, -b, c)
    for got in p["nu"][:half]:
        assert min(abs(got - v) for v in (nu, -nu, 1 / nu, -1 / nu)) < 1e-8
    for got in p["xi"]:
        assert min(abs(got - v) for v in (xi, -xi, 1 / xi, -1 / xi)) < 1e-8
    assert all(isinstance(v, np.ndarray) and v.dtype == np.complex128 for v in p.values())
    assert an.factor_parameters(A[0])["nu"].shape == (half,)  # one Analysis is accepted


def test_factorization_table_counts_by_hand():
    d = 11
    f6 = an.analyze(*cons.construct("F6", d))  # 5 nu·syn
    f46 = an.analyze(*cons.construct("F4/6", d))  # 1 nu·syn, 4 4c·xi
    # a scrambled copy of F6: rolling each node's output weights keeps the orders, breaks the
    # Khatri–Rao structure (the lab's null check)
    Wa, Wb, Wc = cons.construct("F6", d)
    shift = torch.arange(Wc.shape[1]) % (d - 1) + 1  # (q,)
    rows = (torch.arange(d)[:, None] - shift[None, :]) % d  # (d, q)
    rolled = an.analyze(Wa, Wb, torch.gather(Wc, 0, rows))
    assert set(rolled.orders.values()) == {6}
    n_nf = sum(t == "not factorable" for t in rolled.types.values())
    assert n_nf >= 1
    row = an.factorization_table([f6, f46, rolled])
    n_fact = 5 + 5 + (5 - n_nf)
    assert row["n_4"] == 4 and row["n_6"] == 5 + 1 + 5
    assert row["non_factorable_4"] == 0.0
    assert row["non_factorable_6"] == pytest.approx(n_nf / 11)
    assert row["4c·xi"] == pytest.approx(4 / n_fact)
    n_nusyn = 6 + sum(t == "nu·syn" for t in rolled.types.values())
    assert row["nu·syn"] == pytest.approx(n_nusyn / n_fact)
    assert row["4c·xi"] + row["nu·syn"] + row["4c·syn_ab"] + row["other"] == pytest.approx(1.0)
    assert row["err_4"] < 1e-12 and row["non_46"] == 0.0
    # the errors: constructions far below the cut, the rejected rolled blocks above it
    e6 = an.factorization_errors([f6, rolled], 6)
    assert e6.shape == (10,)
    assert np.all(e6[:5] < 1e-12)
    assert np.sum(e6[5:] > 0.1) == n_nf  # on the √(3 q_k) scale the cut is factor_tol
    assert an.factorization_errors(f46, 4).shape == (4,)


def test_factorization_table_empty_orders_and_errors():
    A = an.analyze(*cons.construct("F6", 7))
    row = an.factorization_table(A)
    assert row["n_4"] == 0 and math.isnan(row["non_factorable_4"]) and math.isnan(row["err_4"])
    assert an.factorization_errors(A, 4).shape == (0,)
    with pytest.raises(ValueError, match="order must be 4 or 6, got 5"):
        an.factorization_errors(A, 5)
    with pytest.raises(TypeError, match="non-empty list of Analysis"):
        an.factorization_table([])
    with pytest.raises(TypeError, match="analyses must be an Analysis or a list of them, got int"):
        an.factor_parameters(3)
