"""Checks of the CoGO chapter's derivations (book/cogo/theory.ipynb) that the core tests do not make.

- The constraint sets R_c, R_n, R* of :func:`mini.cogo.fourier.constraint_sets` are entries of the
  potentials: each value equals one ``r̃_{±k,±k,k} / 2d`` (or ``r̃_{p,±k,±k,k} / 2d``) to 1e-14.
- :func:`mini.cogo.semiring.symbolic_homomorphism_check` checks the library's ``add`` and ``mul``
  against their sympy definitions: a planted bug in either is caught.
- The semiring laws hold up to the order of hidden nodes, and potentials do not see that order.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mini import cogo
from mini.cogo import fourier as fo
from mini.cogo import semiring as sr


def rand_weights(q: int, d: int, seed: int) -> sr.Weights:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(q, d, generator=g, dtype=torch.float64),  # (q, d)
        torch.randn(q, d, generator=g, dtype=torch.float64),  # (q, d)
        torch.randn(d, q, generator=g, dtype=torch.float64),  # (d, q)
    )


def on_frequency(d: int, k: int, n: int, seed: int) -> sr.Weights:
    """n nodes living on ±k with random complex coefficients (a block of order n)."""
    rng = np.random.default_rng(seed)
    zs = []
    for _ in range(3):
        z = torch.zeros(d, n, dtype=torch.complex128)  # (d, n)
        row = rng.normal(size=n) + 1j * rng.normal(size=n)
        z[k] = torch.from_numpy(row)
        z[d - k] = z[k].conj()
        zs.append(z)
    return fo.from_coefficients(*zs)


def potential_entries(W: sr.Weights, k: int) -> dict[str, dict[str, complex]]:
    """The potentials that the constraint sets of output frequency k name, unscaled (r̃ / 2d)."""
    d = W[0].shape[1]
    p = fo.potentials(*W)
    r, ra, rb = (p[key] / (2 * d) for key in ("r", "r_a", "r_b"))
    m = (d - k) % d  # the index of -k

    def c(t: torch.Tensor, i: int, j: int) -> complex:
        return complex(t[i, j, k])

    return {
        "R_c": {
            "abc": c(r, k, k),
            "a*bc": c(r, m, k),
            "ab*c": c(r, k, m),
            "abc*": complex(r[k, k, m]),
            "a*b*c": c(r, m, m),
        },
        "R_n": {"|a|^2c": c(ra, m, k), "|b|^2c": c(rb, m, k)},
        "R*": {"a^2c": c(ra, k, k), "b^2c": c(rb, k, k), "a*^2c": c(ra, m, m), "b*^2c": c(rb, m, m)},
    }


def assert_sets_match(W: sr.Weights, k: int, tol: float = 1e-14) -> float:
    za, zb, zc = cogo.coefficients(*W)
    sets = cogo.constraint_sets(za[k], zb[k], zc[k])
    want = potential_entries(W, k)
    worst = 0.0
    for group, values in sets.items():
        assert set(values) == set(want[group]), group
        for key, v in values.items():
            err = abs(v - want[group][key])
            assert err <= tol * max(1.0, abs(v)), (group, key, v, want[group][key])
            worst = max(worst, err)
    return worst


# ----------------------------------------------------------------------------- constraint sets


@pytest.mark.parametrize("d,k,n,seed", [(5, 1, 2, 0), (7, 3, 4, 1), (11, 2, 6, 2), (23, 7, 3, 3)])
def test_constraint_sets_are_potentials_random_block(d, k, n, seed):
    assert_sets_match(on_frequency(d, k, n, seed), k)


@pytest.mark.parametrize("d,q,seed", [(5, 8, 0), (11, 16, 1)])
def test_constraint_sets_are_potentials_any_network(d, q, seed):
    # the identity is the definition of r̃ read at (±k, ±k, k): it needs no single-frequency block
    W = cogo.center(*rand_weights(q, d, seed))
    for k in range(1, d):
        assert_sets_match(W, k)


@pytest.mark.parametrize("name", cogo.PARTIALS)
def test_constraint_sets_are_potentials_partials(name):
    d, k = 11, 3
    assert_sets_match(cogo.partial(name, d, k), k)
    # and partial_constraints reads the same numbers from the +k rows
    pc = cogo.partial_constraints(name)
    want = potential_entries(cogo.partial(name, d, k), k)
    for group, values in pc.items():
        for key, v in values.items():
            assert abs(v - want[group][key]) <= 1e-14 * max(1.0, abs(v))


@pytest.mark.parametrize("name", cogo.CONSTRUCTIONS)
def test_constraint_sets_are_potentials_constructions(name):
    d = 11
    W = cogo.construct(name, d)
    for k in range(1, d):
        assert_sets_match(W, k)


def test_single_frequency_block_sums_are_the_sets():
    # what the chapter derives: for a block on ±k, the R_n sum S̃_{a,0,k} + S̃_{b,0,k} is
    # 2d · 2 (Σ|a|²c + Σ|b|²c), and S̃_{p,2k,k} = 2d Σ p²c (the other k' contribute nothing)
    d, k = 11, 2
    W = on_frequency(d, k, 5, seed=7)
    za, zb, zc = cogo.coefficients(*W)
    sets = cogo.constraint_sets(za[k], zb[k], zc[k])
    p = fo.potentials(*W)
    Sa, Sb = fo._sums(p["r_a"]), fo._sums(p["r_b"])  # (d(m), d(k))
    rn = sets["R_n"]["|a|^2c"] + sets["R_n"]["|b|^2c"]
    assert abs(complex(Sa[0, k] + Sb[0, k]) - 2 * d * 2 * rn) < 1e-13
    assert abs(complex(Sa[2 * k, k]) - 2 * d * sets["R*"]["a^2c"]) < 1e-13
    assert abs(complex(Sb[(d - 2 * k) % d, k]) - 2 * d * sets["R*"]["b*^2c"]) < 1e-13


# ----------------------------------------------------------------------------- the sympy check


def test_symbolic_check_passes():
    assert sr.symbolic_homomorphism_check(2, 2)
    assert sr.symbolic_homomorphism_check(3, 1, d=7, seed=3)


def _mul_conj_c(x, y):
    zx, zy = fo.coefficients(*x), fo.coefficients(*y)
    a = sr._khatri_rao(zx[0], zy[0])
    b = sr._khatri_rao(zx[1], zy[1])
    c = sr._khatri_rao(zx[2], zy[2].conj())  # planted: conjugates y's output coefficients
    return fo.from_coefficients(a, b, c)


def _mul_misaligned(x, y):
    W = sr.__dict__["_orig_mul"](x, y)
    return W[0], W[1], W[2].roll(1, dims=1)  # planted: output weights one node off


def _mul_drops_node(x, y):
    W = sr.__dict__["_orig_mul"](x, y)
    return W[0][:-1], W[1][:-1], W[2][:, :-1]


def _add_swapped_c(x, y):
    Wa, Wb, _ = sr.__dict__["_orig_add"](x, y)
    return Wa, Wb, torch.cat([y[2], x[2]], dim=1)  # planted: output columns in the wrong order


@pytest.mark.parametrize(
    "target,bug",
    [("mul", _mul_conj_c), ("mul", _mul_misaligned), ("mul", _mul_drops_node),
     ("add", _add_swapped_c)],
)
def test_symbolic_check_catches_planted_bugs(monkeypatch, target, bug):
    monkeypatch.setitem(sr.__dict__, "_orig_mul", sr.mul)
    monkeypatch.setitem(sr.__dict__, "_orig_add", sr.add)
    monkeypatch.setattr(sr, target, bug)
    with pytest.raises(AssertionError, match=f"library {target}"):
        sr.symbolic_homomorphism_check(2, 3)


def test_symbolic_check_errors():
    with pytest.raises(ValueError, match="n2 must be an integer >= 1, got 0"):
        sr.symbolic_homomorphism_check(2, 0)
    with pytest.raises(ValueError, match="d must be an integer >= 2, got 1"):
        sr.symbolic_homomorphism_check(2, 2, d=1)
    with pytest.raises(TypeError, match="seed must be an integer, got 0.5"):
        sr.symbolic_homomorphism_check(2, 2, seed=0.5)


# ----------------------------------------------------------------------------- node order


def permute(W: sr.Weights, perm: torch.Tensor) -> sr.Weights:
    """Reorder hidden nodes: new node i is old node perm[i]."""
    return W[0][perm], W[1][perm], W[2][:, perm]


def assert_same(x: sr.Weights, y: sr.Weights) -> None:
    for u, v in zip(x, y):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)


def test_semiring_holds_up_to_node_order():
    d = 7
    x, y, z = (rand_weights(q, d, s) for q, s in ((3, 0), (2, 1), (4, 2)))
    qx, qy, qz = 3, 2, 4
    # add: commutative up to moving y's nodes first
    assert not torch.equal(sr.add(x, y)[0], sr.add(y, x)[0])
    swap = torch.cat([torch.arange(qx, qx + qy), torch.arange(qx)])
    assert_same(permute(sr.add(x, y), swap), sr.add(y, x))
    # mul: commutative up to (j1, j2) -> (j2, j1)
    xy, yx = sr.mul(x, y), sr.mul(y, x)
    assert float((xy[0] - yx[0]).abs().max()) > 1e-3
    j2, j1 = torch.meshgrid(torch.arange(qy), torch.arange(qx), indexing="ij")
    assert_same(permute(xy, (j1 * qy + j2).reshape(-1)), yx)
    # mul: associative exactly; add: associative exactly
    assert_same(sr.mul(sr.mul(x, y), z), sr.mul(x, sr.mul(y, z)))
    assert_same(sr.add(sr.add(x, y), z), sr.add(x, sr.add(y, z)))
    # distributive up to order: x(y + z) lists (j1, j') row-major, xy + xz all (j1, j2) first
    left, right = sr.mul(x, sr.add(y, z)), sr.add(sr.mul(x, y), sr.mul(x, z))
    order = []
    for j1 in range(qx):
        order += [j1 * qy + j2 for j2 in range(qy)]
        order += [qx * qy + j1 * qz + j3 for j3 in range(qz)]
    assert_same(permute(right, torch.tensor(order)), left)


def test_potentials_do_not_see_node_order():
    d = 11
    W = cogo.construct("F4/6", d)
    perm = torch.randperm(W[0].shape[0], generator=torch.Generator().manual_seed(0))
    p, pp = fo.potentials(*W), fo.potentials(*permute(W, perm))
    for key in ("r", "r_a", "r_b"):
        torch.testing.assert_close(p[key], pp[key], rtol=0, atol=1e-14)
    assert float(cogo.loss(*permute(W, perm))) < 1e-20


def test_scale_takes_kappa():
    d = 5
    x = rand_weights(2, d, 0)
    kappa = -2.5
    for got in (sr.scale(x, kappa), sr.scale(x, kappa=kappa)):
        p, px = fo.potentials(*got), fo.potentials(*x)
        torch.testing.assert_close(p["r"], kappa * px["r"], rtol=1e-12, atol=1e-12)
    with pytest.raises(TypeError, match=r"kappa must be a finite real number, got nan"):
        sr.scale(x, math.nan)
