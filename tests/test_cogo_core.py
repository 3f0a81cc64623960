"""Tests of mini.cogo's model, fourier, semiring, constructions and analyze modules.

References: a plain numpy per-pair loop for the loss, float64 numerics for the decomposition and
the homomorphisms, sympy for the algebra. The whole file runs in seconds on one CPU thread.
"""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch

from mini.cogo import constructions as cons
from mini.cogo import fourier as fo
from mini.cogo import model as mo
from mini.cogo import semiring as sr

# mini.cogo re-exports the function analyze(), which shadows the submodule's attribute name
an = importlib.import_module("mini.cogo.analysis")

ODD_D = (3, 5, 7, 11, 23)


def rand_weights(q: int, d: int, seed: int = 0, centred: bool = False):
    g = torch.Generator().manual_seed(seed)
    Wa = torch.randn(q, d, generator=g, dtype=torch.float64)
    Wb = torch.randn(q, d, generator=g, dtype=torch.float64)
    Wc = torch.randn(d, q, generator=g, dtype=torch.float64)
    if centred:
        Wa, Wb, Wc = fo.center(Wa, Wb, Wc)
    return Wa, Wb, Wc


def numpy_loss(Wa, Wb, Wc) -> float:
    """The "few lines of numpy" reference: a loop over all pairs."""
    Wa, Wb, Wc = (np.asarray(w, dtype=np.float64) for w in (Wa, Wb, Wc))
    d = Wa.shape[1]
    P = np.eye(d) - np.ones((d, d)) / d
    total = 0.0
    for a in range(d):
        for b in range(d):
            o = Wc @ (Wa[:, a] + Wb[:, b]) ** 2
            e = np.zeros(d)
            e[(a + b) % d] = 1.0
            total += float(np.sum((P @ (o - e)) ** 2))
    return total / d**2


# ----------------------------------------------------------------------------- model


@pytest.mark.parametrize("d", [2, 3, 4, 7])
def test_loss_matches_numpy_loop(d):
    Wa, Wb, Wc = rand_weights(5, d, seed=d)
    ref = numpy_loss(Wa, Wb, Wc)
    got = mo.loss(Wa, Wb, Wc)
    assert got.dim() == 0 and got.dtype == torch.float64
    assert abs(float(got) - ref) <= 1e-12 * max(1.0, ref)
    got_np = mo.loss(Wa.numpy(), Wb.numpy(), Wc.numpy())  # numpy in, torch float64 out
    assert isinstance(got_np, torch.Tensor) and got_np.dtype == torch.float64
    assert abs(float(got_np) - ref) <= 1e-12 * max(1.0, ref)


def test_forward_shape_and_zero_network_loss():
    d = 7
    Wa, Wb, Wc = sr.zero(d)
    assert mo.forward(Wa, Wb, Wc).shape == (d, d, d)
    assert float(mo.loss(Wa, Wb, Wc)) == pytest.approx((d - 1) / d, abs=1e-15)
    Wa, Wb, Wc = rand_weights(4, d)
    o = mo.forward(Wa, Wb, Wc)
    assert torch.allclose(o[2, 5], Wc @ (Wa[:, 2] + Wb[:, 5]) ** 2)


def test_loss_gradient_finite_and_matches_finite_difference():
    Wa, Wb, Wc = (w.requires_grad_() for w in rand_weights(6, 5, seed=1))
    ell = mo.loss(Wa, Wb, Wc)
    ell.backward()
    for w in (Wa, Wb, Wc):
        assert w.grad is not None and torch.isfinite(w.grad).all()
    eps = 1e-6
    with torch.no_grad():
        W2 = Wa.detach().clone()
        W2[2, 3] += eps
        fd = (float(mo.loss(W2, Wb.detach(), Wc.detach())) - float(ell)) / eps
    assert fd == pytest.approx(float(Wa.grad[2, 3]), rel=1e-4, abs=1e-6)


def test_accuracy():
    d = 5
    W = cons.construct("F6", d)
    assert mo.accuracy(*W) == 1.0
    mask = torch.zeros(d, d, dtype=torch.bool)
    mask[0, :2] = True
    assert mo.accuracy(*W, mask=mask) == 1.0
    assert mo.accuracy(*sr.zero(d)) == pytest.approx(1 / d)  # argmax of zeros is 0
    with pytest.raises(ValueError, match="mask"):
        mo.accuracy(*W, mask=torch.zeros(d, d + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        mo.accuracy(*W, mask=torch.zeros(d, d))
    with pytest.raises(ValueError, match="no pairs"):
        mo.accuracy(*W, mask=torch.zeros(d, d, dtype=torch.bool))


def test_memorization_zero_loss():
    for d in (2, 4, 5):
        W = cons.memorization(d)
        assert W[0].shape == (d * d, d)
        assert float(mo.loss(*W)) < 1e-28


def test_check_weights_errors():
    Wa, Wb, Wc = rand_weights(3, 5)
    assert mo.check_weights(Wa, Wb, Wc) == (3, 5)
    assert mo.check_weights(Wa, Wb, Wc, d=5) == (3, 5)
    with pytest.raises(ValueError, match=r"d .*>= 2.*got 1"):
        mo.loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"Wb must have the shape of Wa"):
        mo.loss(Wa, Wb[:2], Wc)
    with pytest.raises(ValueError, match=r"Wc must have shape \(d, q\) = \(5, 3\)"):
        mo.loss(Wa, Wb, Wc.T)
    with pytest.raises(ValueError, match="2-D"):
        mo.loss(Wa[None], Wb, Wc)
    with pytest.raises(ValueError, match="d = 7 disagrees"):
        mo.check_weights(Wa, Wb, Wc, d=7)
    with pytest.raises(TypeError, match="Wa must be a torch.Tensor or numpy.ndarray"):
        mo.loss(Wa.tolist(), Wb, Wc)
    with pytest.raises(TypeError, match="Wc must be a real floating"):
        mo.loss(Wa, Wb, Wc.to(torch.complex128))
    with pytest.raises(TypeError, match="Wb must be a real floating"):
        mo.loss(Wa, Wb.to(torch.int64), Wc)
    with pytest.raises(TypeError, match="Wa must be a real floating array"):
        mo.loss(np.zeros((3, 5), dtype=np.int64), Wb, Wc)


def test_check_d_errors():
    assert mo.check_d(5) == 5 and mo.check_d(np.int64(4)) == 4
    assert mo.check_d(7, odd=True) == 7
    for bad in (5.0, True, "5", None):
        with pytest.raises(TypeError, match="d must be an integer"):
            mo.check_d(bad)
    for bad in (1, 0, -3):
        with pytest.raises(ValueError, match=f"got {bad}"):
            mo.check_d(bad)
    with pytest.raises(ValueError, match="self-conjugate frequency d/2"):
        mo.check_d(6, odd=True)
    with pytest.raises(ValueError, match="odd integer >= 3"):
        mo.check_d(2, odd=True)
    with pytest.raises(TypeError, match="m must be an integer"):
        mo.check_d(2.5, name="m")


# ----------------------------------------------------------------------------- fourier


@pytest.mark.parametrize("d", [3, 4, 7, 8])
def test_coefficients_round_trip_and_convention(d):
    Wa, Wb, Wc = rand_weights(4, d, seed=d)
    za, zb, zc = fo.coefficients(Wa, Wb, Wc)
    assert za.shape == (d, 4) and za.dtype == torch.complex128
    w = np.exp(2j * np.pi / d)
    g = np.arange(d)
    k, j = 1, 2
    assert complex(za[k, j]) == pytest.approx((Wa[j].numpy() * w ** (-k * g)).sum() / d)
    assert complex(zc[k, j]) == pytest.approx((Wc[:, j].numpy() * w ** (k * g)).sum() / d)
    back = fo.from_coefficients(za, zb, zc)
    for x, y in zip(back, (Wa, Wb, Wc)):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-12)
    za2 = za.clone()
    za2[1, 0] += 0.5j
    with pytest.raises(ValueError, match="za is not conjugate-symmetric"):
        fo.from_coefficients(za2, zb, zc)
    with pytest.raises(ValueError, match="share the shape"):
        fo.from_coefficients(za, zb[:, :2], zc)


@pytest.mark.parametrize("d", [3, 4, 7, 11])
def test_loss_decomposition_centred(d):
    W = rand_weights(9, d, seed=10 + d, centred=True)
    pots = fo.potentials(*W)
    ell = float(mo.loss(*W))
    dec = float(fo.loss_from_potentials(pots))
    assert abs(dec - ell) / ell < 1e-10
    lk = fo.per_frequency_loss(pots)
    assert lk.shape == (d,) and float(lk[0]) == 0.0
    assert float(lk[1:].sum() / d + (d - 1) / d) == pytest.approx(ell, rel=1e-10)


def test_loss_decomposition_fails_uncentred():
    d = 7
    Wa, Wb, Wc = rand_weights(9, d, seed=3)  # random rows have non-zero means
    ell = float(mo.loss(Wa, Wb, Wc))
    dec = float(fo.loss_from_potentials(fo.potentials(Wa, Wb, Wc)))
    assert abs(dec - ell) / ell > 1e-3
    assert not fo.sufficient_conditions(Wa, Wb, Wc)["centred"]


def test_potentials_target_and_sufficient_conditions():
    d = 7
    W = cons.construct("F6", d)
    pots = fo.potentials(*W)
    k = torch.arange(1, d)
    torch.testing.assert_close(pots["r"][k, k, k], torch.ones(d - 1, dtype=torch.complex128))
    sc = fo.sufficient_conditions(*W, atol=1e-10)
    assert sc["ok"] and sc["centred"]
    sc4 = fo.sufficient_conditions(*cons.construct("F4", d), atol=1e-10)
    assert sc4["ok_diag"] and sc4["ok_off_diag"] and sc4["ok_R_star"] and not sc4["ok_R_n"]
    assert sc4["R_n"] == pytest.approx(2 * math.sqrt(2))  # |S̃| = |2(1+i)|
    with pytest.raises(ValueError, match="atol"):
        fo.sufficient_conditions(*W, atol=-1.0)


def test_constraint_sets_of_partials():
    tol = 1e-12
    cs = cons.partial_constraints("4c")
    assert abs(cs["R_c"]["a*bc"]) < tol and abs(cs["R_c"]["ab*c"]) < tol
    assert all(abs(v) < tol for v in cs["R*"].values())
    cs = cons.partial_constraints("syn")
    assert cs["R_c"]["abc"] == pytest.approx(3)
    assert all(abs(v) < tol for key, v in cs["R_c"].items() if key != "abc")
    assert all(abs(v) < tol for v in cs["R_n"].values())
    assert abs(cs["R*"]["a*^2c"]) < tol and abs(cs["R*"]["b*^2c"]) < tol
    assert cs["R*"]["a^2c"] == pytest.approx(3) and cs["R*"]["b^2c"] == pytest.approx(3)
    cs = cons.partial_constraints("nu", nu=np.exp(0.7j))
    assert abs(cs["R*"]["a^2c"]) < tol and abs(cs["R*"]["b^2c"]) < tol
    cs = cons.partial_constraints("syn_ab", alpha=np.exp(0.3j), beta=np.exp(2.0j))
    assert abs(cs["R_c"]["abc*"]) < tol and abs(cs["R_c"]["a*b*c"]) < tol
    assert all(abs(v) < tol for v in cs["R_n"].values())
    cs = cons.partial_constraints("xi", xi=np.exp(1.1j))
    assert abs(cs["R_c"]["abc*"]) < tol and abs(cs["R_c"]["a*b*c"]) < tol
    assert abs(cs["R_n"]["|a|^2c"] + cs["R_n"]["|b|^2c"]) > 1  # R_n is not zero
    with pytest.raises(ValueError, match="a, b, c must have the same length"):
        fo.constraint_sets([1, 2], [1], [1, 2])


# ----------------------------------------------------------------------------- semiring


def test_homomorphism_numeric():
    d = 7
    x = rand_weights(3, d, seed=1)
    y = rand_weights(2, d, seed=2)
    px, py = fo.potentials(*x), fo.potentials(*y)
    ps, pm = fo.potentials(*sr.add(x, y)), fo.potentials(*sr.mul(x, y))
    s = 2 * d  # potentials() returns r̃ = 2d r; mul multiplies the unscaled r
    assert sr.mul(x, y)[0].shape == (6, d) and sr.add(x, y)[2].shape == (d, 5)
    for key in ("r", "r_a", "r_b"):
        torch.testing.assert_close(ps[key], px[key] + py[key], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(pm[key], px[key] * py[key] / s, rtol=1e-12, atol=1e-10)
    p1 = fo.potentials(*sr.one(d))
    for key in ("r", "r_a", "r_b"):
        torch.testing.assert_close(p1[key], torch.full((d, d, d), s, dtype=torch.complex128))
    pxo = fo.potentials(*sr.mul(x, sr.one(d)))
    pz = fo.potentials(*sr.mul(x, sr.zero(d)))
    px3 = fo.potentials(*sr.scale(x, -3.0))
    for key in ("r", "r_a", "r_b"):
        torch.testing.assert_close(pxo[key], px[key], rtol=1e-12, atol=1e-10)
        assert float(pz[key].abs().max()) == 0.0
        torch.testing.assert_close(px3[key], -3.0 * px[key], rtol=1e-12, atol=1e-10)


def test_homomorphism_symbolic():
    assert sr.symbolic_homomorphism_check(2, 2)
    assert sr.symbolic_homomorphism_check(1, 3)
    with pytest.raises(ValueError, match="n1 must be an integer >= 1"):
        sr.symbolic_homomorphism_check(0, 2)


def test_semiring_errors():
    with pytest.raises(ValueError, match="x and y must share d"):
        sr.add(rand_weights(2, 5), rand_weights(2, 7))
    with pytest.raises(TypeError, match="x must be a triple"):
        sr.mul(torch.zeros(3), rand_weights(2, 5))
    with pytest.raises(TypeError, match="kappa must be a finite real"):
        sr.scale(rand_weights(2, 5), 1j)


# ----------------------------------------------------------------------------- constructions


@pytest.mark.parametrize("name", ["F6", "F6_ab", "F4/6"])
@pytest.mark.parametrize("d", ODD_D)
def test_global_constructions_zero_loss(name, d):
    W = cons.construct(name, d)
    assert all(w.dtype == torch.float64 for w in W)
    assert W[0].shape == (cons.n_nodes(name, d), d)
    assert float(mo.loss(*W)) < 1e-20
    assert mo.accuracy(*W) == 1.0


@pytest.mark.parametrize("d", ODD_D)
def test_f4_is_not_global(d):
    W = cons.construct("F4", d)
    assert W[0].shape == (2 * (d - 1), d)
    assert float(mo.loss(*W)) == pytest.approx(2 * (d - 1) / d, rel=1e-12)
    assert float(mo.loss(*sr.zero(d))) == pytest.approx((d - 1) / d, rel=1e-12)
    lk = fo.per_frequency_loss(fo.potentials(*W))
    torch.testing.assert_close(lk[1:], torch.ones(d - 1, dtype=torch.float64))


def test_construction_params_and_partials():
    d = 11
    for nu in (np.exp(0.7j), 1.0, -1j):
        assert float(mo.loss(*cons.construct("F6", d, nu=nu))) < 1e-20
    W = cons.construct("F4/6", d, k0=3, xi=np.exp(2.0j))
    assert float(mo.loss(*W)) < 1e-20
    Wa, Wb, Wc = cons.partial("syn", d, 2)
    za, _, zc = fo.coefficients(Wa, Wb, Wc)
    assert float(za[[0, 1, 3, 4, 5, 6, 7, 8, 10]].abs().max()) < 1e-14  # only ±2 present
    torch.testing.assert_close(za[9], za[2].conj())
    with pytest.raises(ValueError, match="nu must have modulus 1"):
        cons.partial("nu", d, 1, nu=0.5)
    with pytest.raises(ValueError, match=r"k must be in 1..\(d-1\)/2 = 1..5"):
        cons.partial("4c", d, 6)
    with pytest.raises(ValueError, match="name must be one of"):
        cons.partial("foo", d, 1)
    with pytest.raises(ValueError, match="takes parameters"):
        cons.partial("4c", d, 1, xi=1.0)
    with pytest.raises(ValueError, match="takes parameters"):
        cons.construct("F6", d, k0=2)


def test_construct_errors():
    for d in (4, 6, 10):  # even d: a self-conjugate frequency d/2 the constructions do not handle
        with pytest.raises(ValueError, match="odd integer >= 3.*self-conjugate"):
            cons.construct("F6", d)
    for d in (1, 2):
        with pytest.raises(ValueError, match="d must be"):
            cons.construct("F4/6", d)
    with pytest.raises(TypeError, match="d must be an integer"):
        cons.construct("F6", 5.0)
    with pytest.raises(ValueError, match=r"known constructions \('F6', 'F6_ab', 'F4', 'F4/6'\)"):
        cons.construct("F8", 5)
    with pytest.raises(ValueError, match="known constructions"):
        cons.n_nodes("F8", 5)
    assert [cons.n_nodes(n, 7) for n in cons.CONSTRUCTIONS] == [18, 18, 12, 14]


# ----------------------------------------------------------------------------- analyze


def scramble(W, seed: int, n_dead: int = 3):
    """Permute nodes, flip random nodes (a, b, c) -> (-a, -b, c), add tiny dead nodes."""
    g = torch.Generator().manual_seed(seed)
    Wa, Wb, Wc = W
    q, d = Wa.shape
    s = torch.where(torch.rand(q, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)  # (q,)
    Wa, Wb = Wa * s[:, None], Wb * s[:, None]
    tiny = [1e-3 * torch.randn(n_dead, d, generator=g, dtype=torch.float64) for _ in range(3)]
    Wa, Wb = torch.cat([Wa, tiny[0]]), torch.cat([Wb, tiny[1]])
    Wc = torch.cat([Wc, tiny[2].T], dim=1)
    p = torch.randperm(q + n_dead, generator=g)
    return Wa[p], Wb[p], Wc[:, p]


@pytest.mark.parametrize(
    "name, d, types",
    [
        ("F6", 5, {"nu·syn": 2}),
        ("F6", 11, {"nu·syn": 5}),
        ("F6_ab", 7, {"4c·syn_ab": 3}),
        ("F6_ab", 11, {"4c·syn_ab": 5}),
        ("F4/6", 11, {"nu·syn": 1, "4c·xi": 4}),
        ("F4/6", 23, {"nu·syn": 1, "4c·xi": 10}),
        ("F4/6", 3, {"nu·syn": 1}),
    ],
)
def test_analyzer_recognises_constructions(name, d, types):
    W = scramble(cons.construct(name, d), seed=d)
    assert float(mo.loss(*W)) < 1e-5  # the tiny dead nodes perturb the loss a little
    A = an.analyze(*W)
    assert A.share_named == 1.0 and A.share_factorable_46 == 1.0
    assert A.counts == types
    assert A.n_dead == 3 and A.n_freq0 == 0
    s = A.summary()
    assert s["n_live"] == cons.n_nodes(name, d)


def test_analyzer_params_of_f6():
    nu = np.exp(0.7j)
    A = an.analyze(*cons.construct("F6", 7, nu=nu))
    for k, p in A.params.items():
        assert p["factors"] == ("nu", "syn")
        # the 2-node factor is read up to orientation and the sign symmetry
        assert min(abs(p["nu"] - v) for v in (nu, -nu, 1 / nu, -1 / nu)) < 1e-8


def test_analyzer_rejects_random_network():
    A = an.analyze(*rand_weights(40, 11, seed=5))
    assert A.share_named < 0.5
    assert not any(t in an.NAMED_TYPES for t in A.types.values())


def test_analyze_batch_and_pooled():
    d = 7
    Ws = [scramble(cons.construct("F6", d), seed=1), scramble(cons.construct("F6_ab", d), seed=2)]
    Wa, Wb, Wc = (torch.stack([W[i] for W in Ws]) for i in range(3))
    res = an.analyze_batch(Wa, Wb, Wc)
    assert [a.counts for a in res] == [{"nu·syn": 3}, {"4c·syn_ab": 3}]
    pooled = an.pooled_summary(res)
    assert pooled["order_hist"] == {6: 6}
    assert pooled["share_named"] == 1.0 and pooled["share_factorable_46"] == 1.0
    with pytest.raises(ValueError, match="3-D"):
        an.analyze_batch(Wa[0], Wb[0], Wc[0])
    with pytest.raises(TypeError, match="non-empty list"):
        an.pooled_summary([])


def test_analyze_errors():
    W = rand_weights(6, 8)
    with pytest.raises(ValueError, match="odd integer >= 3.*self-conjugate"):
        an.analyze(*W)
    W = rand_weights(6, 7)
    with pytest.raises(ValueError, match="threshold must be a positive"):
        an.analyze(*W, threshold=0)
    with pytest.raises(ValueError, match="factor_tol must be a positive"):
        an.analyze(*W, factor_tol=-0.1)
    with pytest.raises(ValueError, match=r"rule must be one of \('scaled', 'absolute'\), got 'max'"):
        an.analyze(*W, rule="max")
    with pytest.raises(ValueError, match="threshold must be a positive finite number, got inf"):
        an.dead_cut(7, float("inf"))
    with pytest.raises(ValueError, match="odd integer >= 3"):
        an.node_scale(8)
    with pytest.raises(ValueError, match="q even"):
        an.factorize_block(np.ones((3, 5)))


def f6_from_coefficients(d: int):
    """The exact F6 (z_ν·z_syn on every k, r̃_kkk = 1) built straight from its coefficients.

    Same nodes as ``cons.construct("F6", d)`` (checked at d = 23), but in one inverse FFT, so
    that d = 701 (2100 nodes) builds in milliseconds.
    """
    X, Y = cons.partial_coefficients("nu"), cons.partial_coefficients("syn")
    block = [np.kron(x, y) for x, y in zip(X, Y)]  # a, b, c of the 6 nodes: Khatri–Rao
    lam = (2 * d * (block[0] * block[1] * block[2]).sum().real) ** (-1 / 3)
    half = (d - 1) // 2
    zs = []
    for row in block:
        z = torch.zeros(d, 6 * half, dtype=torch.complex128)  # (d, q)
        for k in range(1, half + 1):
            z[k, 6 * (k - 1): 6 * k] = torch.from_numpy(lam * row)
            z[d - k, 6 * (k - 1): 6 * k] = z[k, 6 * (k - 1): 6 * k].conj()
        zs.append(z)
    return fo.from_coefficients(*zs)


def test_dead_cut_scales_with_d():
    # the official absolute cut at the book's d = 11; the same share of the node scale at every d
    assert an.dead_cut(11) == pytest.approx(an.OFFICIAL_THRESHOLD, rel=1e-3)
    assert an.dead_cut(11, rule="absolute") == an.dead_cut(701, rule="absolute") == 0.05
    for d in (5, 23, 701):
        assert an.dead_cut(d) == pytest.approx(0.14 * (2 * d) ** (-1 / 3))
        assert an.dead_cut(d, 0.2) / an.node_scale(d) == pytest.approx(0.2)
    W23 = f6_from_coefficients(23)
    ref = cons.construct("F6", 23)
    mags = [np.sort(fo.coefficients(*W)[0].abs().max(0).values.numpy()) for W in (W23, ref)]
    np.testing.assert_allclose(mags[0], mags[1], rtol=1e-12)  # the same nodes as construct
    assert float(mo.loss(*W23)) < 1e-20


def test_exact_f6_at_large_d_has_no_dead_node():
    d = 701
    W = f6_from_coefficients(d)
    za = fo.coefficients(*W)[0]
    m = za.abs().max(0).values  # (q,): every node's largest |z_a|
    # a node of an order-6 block: (2d · 6)^(-1/3) = 0.55 node scales, 0.049 at d = 701
    torch.testing.assert_close(m, torch.full_like(m, (12 * d) ** (-1 / 3)))
    A = an.analyze(*W)
    assert A.n_dead == 0 and A.counts == {"nu·syn": (d - 1) // 2}
    assert A.share_named == 1.0 and A.rule == "scaled"
    # the official absolute cut 0.05 reads the exact construction as a dead network
    B = an.analyze(*W, rule="absolute")
    assert B.n_dead == B.q == 3 * (d - 1) and B.counts == {} and B.threshold == 0.05
    # tiny nodes stay dead at large d (1e-3 weights: |z_a| about 1e-3 / sqrt(d) << the cut)
    C = an.analyze(*scramble(W, seed=1))
    assert C.n_dead == 3 and C.counts == {"nu·syn": (d - 1) // 2}


def test_zero_network_has_no_live_node():
    # weights of 1e-3 (what too much weight decay leaves) are dead at every d: the cut follows
    # the scale the task sets, not the largest node
    for d in (11, 23, 101):
        A = an.analyze(*(1e-3 * w for w in rand_weights(64, d, seed=d)))
        assert A.n_dead == 64 and A.counts == {}


def noisy_f6(eps: float, d: int = 11, seed: int = 0):
    """F6 with every coefficient moved by complex noise of relative size ``eps``."""
    g = torch.Generator().manual_seed(seed)
    noisy = []
    for z in fo.coefficients(*cons.construct("F6", d)):
        n = torch.complex(*(torch.randn(z.shape, generator=g, dtype=torch.float64) for _ in range(2)))
        n = n * z.abs() * eps  # (d, q)
        for k in range(1, (d - 1) // 2 + 1):
            n[d - k] = n[k].conj()  # real weights
        noisy.append(z + n)
    return fo.from_coefficients(*noisy)


def test_tolerance_behaviour():
    tols = (0.02, 0.05, 0.1, 0.2)
    exact = [an.analyze(*cons.construct("F6", 11), factor_tol=t) for t in tols]
    assert all(a.share_named == 1.0 for a in exact)  # an exact construction at every tolerance
    # noise of 5% per coefficient: factorable from 0.05 on, named from the official 0.1 on
    A = [an.analyze(*noisy_f6(0.05), factor_tol=t) for t in tols]
    assert [a.share_factorable_46 for a in A] == [0.0, 1.0, 1.0, 1.0]
    assert [a.share_named for a in A] == [0.0, 0.0, 1.0, 1.0]
    assert A[1].counts == {"other": 5} and A[0].counts == {"not factorable": 5}
    # shares never fall as the tolerance grows
    for eps in (0.01, 0.03, 0.1):
        sh = [an.analyze(*noisy_f6(eps), factor_tol=t) for t in tols]
        for lo, hi in zip(sh, sh[1:]):
            assert lo.share_named <= hi.share_named
            assert lo.share_factorable_46 <= hi.share_factorable_46


def test_factorize_block_exact_khatri_rao():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3, 2)) + 1j * rng.normal(size=(3, 2))
    Y = rng.normal(size=(3, 3)) + 1j * rng.normal(size=(3, 3))
    F = (X[:, :, None] * Y[:, None, :]).reshape(3, 6)[:, rng.permutation(6)]
    F[:2, 1] *= -1  # node symmetry
    err, Xf, Yf = an.factorize_block(F)
    assert err < 1e-12
