"""Tests of mini.cogo.nodes: node purity and layer balance, against hand-computed cases.

References: Parseval for the energies, the exact constructions (single-frequency, balanced
nodes) and perfect memorization (a node spread evenly: purity 2/d), the node symmetry
(a, b, c) -> (t a, t b, c / t²) for the balance ratio. Runs in well under a second.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mini import cogo
from mini.cogo import nodes


@pytest.mark.parametrize("d", [5, 8, 11])
def test_energy_columns_sum_to_the_norms_over_d(d):
    g = torch.Generator().manual_seed(d)
    Wa, Wb = torch.randn(7, d, generator=g, dtype=torch.float64), torch.randn(7, d, generator=g, dtype=torch.float64)
    Wc = torch.randn(d, 7, generator=g, dtype=torch.float64)
    E = nodes.node_energy(Wa, Wb, Wc)  # (d // 2 + 1, q)
    assert E.shape == (d // 2 + 1, 7)
    norms = (Wa**2).sum(1) + (Wb**2).sum(1) + (Wc**2).sum(0)  # (q,)
    np.testing.assert_allclose(E.sum(axis=0), norms.numpy() / d, rtol=1e-12)


@pytest.mark.parametrize("name", ["F6", "F6_ab"])
def test_construction_nodes_are_pure_and_balanced(name):
    W = cogo.construct(name, 11)
    p = nodes.node_purity(*W)
    np.testing.assert_allclose(p, 1.0, atol=1e-12)
    assert nodes.balance_ratio(*W) == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize("d", [5, 11])
def test_memorization_nodes_have_purity_two_over_d(d):
    # a = e_a0, b = e_b0, c = e_y / 2: each spreads evenly over the d frequency indices
    p = nodes.node_purity(*cogo.memorization(d))
    np.testing.assert_allclose(p, 2 / d, rtol=1e-12)


def test_purity_of_a_mixed_node():
    d, k = 11, 3
    g = np.arange(d)
    cos = np.cos(2 * math.pi * k * g / d)  # energy at ±k only
    Wa = np.stack([cos, cos + 1.0])  # node 1 adds a constant: energy at frequency 0
    Wb = np.stack([cos, cos])
    Wc = np.stack([cos, cos], axis=1)  # (d, 2)
    p = nodes.node_purity(Wa, Wb, Wc)
    e_k = 3 * (cos**2).sum()  # the ±k energy of node 1 times d, as of node 0
    assert p[0] == pytest.approx(1.0, abs=1e-12)
    assert p[1] == pytest.approx(e_k / (e_k + d), rel=1e-12)


def test_zero_node_has_nan_purity():
    Wa = np.zeros((2, 5))
    Wa[1, 1] = 1.0
    p = nodes.node_purity(Wa, np.zeros((2, 5)), np.zeros((5, 2)))
    assert math.isnan(p[0]) and p[1] == pytest.approx(2 / 5)


@pytest.mark.parametrize("t", [0.5, 1.3])
def test_balance_ratio_follows_the_node_symmetry(t):
    Wa, Wb, Wc = cogo.construct("F6", 7)
    # (a, b, c) -> (t a, t b, c / t²): same output, A -> t² A, C -> C / t⁴, ratio 2 t⁶
    assert nodes.balance_ratio(t * Wa, t * Wb, Wc / t**2) == pytest.approx(2 * t**6, rel=1e-12)
    A, C = nodes.layer_norms(Wa, Wb, Wc)
    assert A.shape == C.shape == (Wa.shape[0],)
    assert nodes.balance_ratio(Wa, Wb, Wc, nodes=[0, 2]) == pytest.approx(
        (A[0] + A[2]) / (C[0] + C[2])
    )


def test_balance_ratio_edge_cases_and_bad_nodes():
    W = cogo.construct("F6", 7)
    assert math.isnan(nodes.balance_ratio(*W, nodes=[]))
    q = W[0].shape[0]
    with pytest.raises(ValueError, match="nodes must be indices"):
        nodes.balance_ratio(*W, nodes=[q])
    with pytest.raises(ValueError, match="nodes must be indices"):
        nodes.balance_ratio(*W, nodes=[-1])
    with pytest.raises(ValueError, match="Wc must have shape"):
        nodes.node_purity(W[0], W[1], W[2].T)
