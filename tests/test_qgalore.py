"""Tests of mini.qgalore: the INT8 linear layer, the fused SR update kernel, the adaptive projector."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mini.galore.adamw import GaLoreAdamW
from mini.galore.projector import GaLoreProjector
from mini.kernels.dispatch import HAS_TRITON
from mini.qgalore import (
    AdaptiveProjector,
    Int8LayerwiseQGaLore,
    Int8Linear,
    QGaLoreAdamW,
    QGaLoreAdamW8bit,
    quantize_groupwise,
    sr_update,
    sr_update_reference,
)
from tests.triton_aot import compile_ptx

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the Triton interpreter needs triton")


# --------------------------------------------------------------------------- Int8Linear
def _layer_and_float(in_f=40, out_f=30, bias=True, group_size=64, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    layer = Int8Linear.from_linear(lin, group_size=group_size)
    ref = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantized_weight())
        if bias:
            ref.bias.copy_(layer.bias)
    return lin, layer, ref


def test_from_linear_is_within_half_a_step():
    lin, layer, _ = _layer_and_float(in_f=40, out_f=30, group_size=64)  # 1200 = 18 * 64 + 48
    w = layer.dequantized_weight()
    step = layer.scale.repeat_interleave(64)[:1200].view(30, 40)
    assert bool(((w - lin.weight.detach()).abs() <= step / 2 * (1 + 1e-5)).all())
    assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (30, 40)
    assert layer.nbytes == 1200 + 19 * 5


@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_match_autograd(bias):
    _, layer, ref = _layer_and_float(bias=bias)
    x = torch.randn(3, 5, 40, dtype=torch.float32, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y_ref = ref(x_ref)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight_grad, ref.weight.grad)
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref.bias.grad)
    # a second backward accumulates, like .grad
    layer(x.detach()).backward(g)
    torch.testing.assert_close(layer.weight_grad, 2 * ref.weight.grad)


def test_weight_grad_delivered_without_any_input_requiring_grad():
    _, layer, ref = _layer_and_float(bias=False)
    x = torch.randn(4, 40)
    layer(x).sum().backward()
    ref(x).sum().backward()
    torch.testing.assert_close(layer.weight_grad, ref.weight.grad)


def test_weight_grad_hook():
    _, layer, ref = _layer_and_float()
    seen = []
    handle = layer.register_weight_grad_hook(lambda mod, g: seen.append((mod, g.clone())))
    x = torch.randn(6, 40)
    layer(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    assert len(seen) == 1 and seen[0][0] is layer
    torch.testing.assert_close(seen[0][1], ref.weight.grad)
    assert layer.weight_grad is None  # a hook takes the gradient instead
    handle.remove()
    layer(x).sum().backward()
    assert len(seen) == 1 and layer.weight_grad is not None
    with pytest.raises(TypeError, match="fn must be callable"):
        layer.register_weight_grad_hook(3)


def test_layer_argument_errors():
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        Int8Linear(4, 4, group_size=0)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        Int8Linear(0, 4)
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        Int8Linear.from_linear(nn.Conv1d(2, 2, 1))
    layer = Int8Linear(8, 4, group_size=16)
    with pytest.raises(ValueError, match="x must have last dimension 8"):
        layer(torch.randn(2, 7))


def test_apply_update_errors():
    layer = Int8Linear(8, 4, group_size=16)
    with pytest.raises(ValueError, match=r"delta must have shape \(4, 8\)"):
        layer.apply_update_(torch.zeros(8, 4))
    with pytest.raises(TypeError, match="delta must have dtype torch.float32"):
        layer.apply_update_(torch.zeros(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="delta is on meta"):
        layer.apply_update_(torch.zeros(4, 8, device="meta"))
    with pytest.raises(TypeError, match="delta must be a torch.Tensor"):
        layer.apply_update_([[0.0] * 8] * 4)


def test_apply_update_is_within_one_step_with_fresh_scales():
    _, layer, _ = _layer_and_float(group_size=64)
    gen = torch.Generator().manual_seed(0)
    w = layer.dequantized_weight()
    delta = torch.randn(30, 40, generator=gen) * 0.05
    layer.apply_update_(delta, gen)
    w_new = layer.dequantized_weight()
    target = w + delta
    step = layer.scale.repeat_interleave(64)[:1200].view(30, 40)
    assert bool(((w_new - target).abs() <= step * (1 + 1e-5)).all())
    # fresh scales: each group's new scale is its range (0 included) over 255
    t = torch.cat([target.reshape(-1), target.new_zeros(19 * 64 - 1200)]).view(19, 64)
    t[-1, 1200 - 18 * 64:] = 0
    expected = (t.amax(1).clamp(min=0) - t.amin(1).clamp(max=0)) / 255
    torch.testing.assert_close(layer.scale, expected)


def test_sr_update_keeps_small_updates_nearest_loses_them():
    # 256 INT8 weights ~ N(0, 0.02), one group of 256, +1e-5 per step for 1000 steps
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, 16, generator=gen) * 0.02)
    layer = Int8Linear.from_linear(lin, group_size=256)
    w0 = layer.dequantized_weight()
    delta = torch.full((16, 16), 1e-5)
    for _ in range(1000):
        layer.apply_update_(delta, gen)
    drift_sr = float((layer.dequantized_weight() - w0).mean())
    nearest = quantize_groupwise(w0, bits=8, group_size=256)
    for _ in range(1000):
        nearest = quantize_groupwise(nearest.dequantize() + 1e-5, bits=8, group_size=256)
    drift_nearest = float((nearest.dequantize() - w0).mean())
    assert abs(drift_sr - 1e-2) < 1e-3, drift_sr
    assert abs(drift_nearest) < 1e-4, drift_nearest


# --------------------------------------------------------------------------- the fused kernel
def _update_inputs(shape, group_size, gen):
    n = shape[0] * shape[1]
    n_groups = -(-n // group_size)
    w = torch.randn(shape, generator=gen) * 0.05
    qt = quantize_groupwise(w, bits=8, group_size=group_size)
    codes = qt.data.view(shape).clone()
    delta = torch.randn(shape, generator=gen) * 0.01
    rand = torch.rand(shape, generator=gen)
    assert qt.scale.numel() == n_groups
    return codes, qt.scale.clone(), qt.zero.clone(), delta, rand


@needs_triton
@pytest.mark.parametrize("shape,group_size", [((16, 16), 64), ((20, 15), 64), ((25, 40), 256),
                                              ((20, 15), 256), ((1, 5), 256), ((16, 16), 256), ((7, 11), 10)])
def test_kernel_matches_reference_with_poisoned_outputs(shape, group_size):
    gen = torch.Generator().manual_seed(shape[0] * 100 + group_size)
    codes, scale, zero, delta, rand = _update_inputs(shape, group_size, gen)
    exp = sr_update_reference(codes, scale, zero, delta, rand, group_size)
    # two poisons for the integer outputs: an element the kernel does not write cannot equal the
    # reference under both
    for poison in (0, 255):
        out = (torch.full_like(codes, poison), torch.full_like(scale, float("nan")), torch.full_like(zero, poison))
        got = sr_update(codes, scale, zero, delta, rand, group_size, out=out, backend="interpret")
        assert all(g.data_ptr() == o.data_ptr() for g, o in zip(got, out))
        assert torch.equal(got[0], exp[0])
        assert torch.equal(got[1], exp[1])
        assert torch.equal(got[2], exp[2])
    # in place (out = the inputs) equals out of place
    inplace = (codes.clone(), scale.clone(), zero.clone())
    sr_update(*inplace, delta, rand, group_size, out=inplace, backend="interpret")
    assert all(torch.equal(a, b) for a, b in zip(inplace, exp))


def test_reference_matches_float64_formula():
    gen = torch.Generator().manual_seed(1)
    codes, scale, zero, delta, rand = _update_inputs((20, 15), 64, gen)
    out = sr_update_reference(codes, scale, zero, delta, rand, 64)
    n = 300
    q = torch.cat([codes.reshape(-1).double(), torch.zeros(20, dtype=torch.float64)]).view(5, 64)
    d = torch.cat([delta.reshape(-1).double(), torch.zeros(20, dtype=torch.float64)]).view(5, 64)
    w = (q - zero.double()[:, None]) * scale.double()[:, None] + d
    w[-1, n - 4 * 64:] = 0
    s = (w.amax(1).clamp(min=0) - w.amin(1).clamp(max=0)) / 255
    torch.testing.assert_close(out[1].double(), s, rtol=1e-5, atol=0)
    deq = ((out[0].reshape(-1).double() - out[2].double().repeat_interleave(64)[:n]) * s.repeat_interleave(64)[:n])
    assert bool(((deq - w.reshape(-1)[:n]).abs() <= s.repeat_interleave(64)[:n] * 1.0001).all())


def test_sr_update_errors():
    gen = torch.Generator().manual_seed(2)
    codes, scale, zero, delta, rand = _update_inputs((4, 8), 16, gen)
    with pytest.raises(TypeError, match="codes must have dtype torch.uint8"):
        sr_update(codes.float(), scale, zero, delta, rand, 16)
    with pytest.raises(ValueError, match=r"delta must have the weight's shape \(4, 8\)"):
        sr_update(codes, scale, zero, delta.view(8, 4), rand, 16)
    with pytest.raises(ValueError, match=r"scale must have shape \(2\)"):
        sr_update(codes, scale[:1], zero, delta, rand, 16)
    with pytest.raises(TypeError, match="delta must have dtype torch.float32"):
        sr_update(codes, scale, zero, delta.double(), rand, 16)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        sr_update(codes, scale, zero, delta, rand, 0)
    error, match = (ValueError, "backend 'triton' runs compiled kernels on CUDA")
    if not HAS_TRITON:  # without triton installed the same call names the missing package
        error, match = RuntimeError, "needs triton"
    with pytest.raises(error, match=match):
        sr_update(codes, scale, zero, delta, rand, 16, backend="triton")


# --------------------------------------------------------------------------- AdaptiveProjector
def _low_rank(m, n, r, gen):
    U = torch.linalg.qr(torch.randn(m, r, generator=gen))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=gen))[0]
    return U @ torch.diag(torch.linspace(10.0, 2.0, r)) @ V.T


def test_stable_subspace_doubles_the_gap_and_saves_svds():
    gen = torch.Generator().manual_seed(0)
    base = _low_rank(64, 48, 4, gen)
    adaptive = AdaptiveProjector(4, update_proj_gap=2)
    plain = GaLoreProjector(4, update_proj_gap=2)
    for step in range(200):
        G = base + 0.01 * torch.randn(64, 48, generator=gen)
        adaptive.project(G, step)
        plain.project(G, step)
    assert plain.n_svd == 100
    assert adaptive.n_svd < plain.n_svd // 4, adaptive.n_svd
    # the queue is never cleared (official behaviour): once full and stable, every SVD doubles T
    assert adaptive.update_proj_gap >= 2 * 2**3 and adaptive.n_gap_increases >= 3
    assert len(adaptive.queue) == 5 and min(adaptive.queue) > 0.9


def test_rotating_gradient_keeps_the_gap():
    gen = torch.Generator().manual_seed(1)
    p = AdaptiveProjector(4, update_proj_gap=2)
    for step in range(100):
        p.project(torch.randn(64, 48, generator=gen), step)
    assert p.update_proj_gap == 2 and p.n_svd == 50 and p.n_gap_increases == 0
    assert sum(p.queue) / len(p.queue) < 0.4


def test_sign_flip_counts_as_the_same_subspace():
    gen = torch.Generator().manual_seed(2)
    G = _low_rank(32, 24, 3, gen)
    p = AdaptiveProjector(3, update_proj_gap=1, queue_size=2)
    p.update_basis(G)
    first = p.ortho.clone()
    # an SVD may return the same subspace with the signs of its singular vectors flipped
    plain = GaLoreProjector.compute_basis
    p.compute_basis = lambda grad: tuple(None if t is None else -t for t in plain(p, grad))
    p.update_basis(G)
    p.update_basis(G)
    signed = float(first[0] @ (-first[0])) / float(first[0].norm() ** 2)
    assert signed == pytest.approx(-1.0)  # what the official (signed) cosine would read
    assert p.queue == pytest.approx([1.0, 1.0], abs=1e-2)  # |cos|: the same subspace
    assert p.update_proj_gap == 2 and p.n_svd == 3


def test_int4_projector_relative_error():
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(512, 1376, generator=gen)
    U, _, _ = torch.linalg.svd(A, full_matrices=False)
    p = AdaptiveProjector(128)
    p.update_basis(A)
    assert p.side == "left"
    P = U[:, :128]
    rel = float((p.ortho - P).norm() / P.norm())
    assert 0.05 < rel < 0.2, rel  # the digest: about 0.11
    assert p.basis_nbytes == 512 * 128 // 2 + 256 * 5  # INT4 packed + scale and zero per group
    p8 = AdaptiveProjector(128, proj_bits=8)
    p8.update_basis(A)
    assert float((p8.ortho - P).norm() / P.norm()) < rel / 8


def test_projection_close_to_galore_with_8_bits():
    gen = torch.Generator().manual_seed(4)
    G = torch.randn(40, 70, generator=gen)
    a = AdaptiveProjector(8, proj_bits=8, proj_group_size=64)
    b = GaLoreProjector(8)
    ra, rb = a.project(G, 0), b.project(G, 0)
    torch.testing.assert_close(ra, rb, atol=0.05, rtol=0.02)
    torch.testing.assert_close(a.project_back(ra), b.project_back(rb), atol=0.05, rtol=0.05)


def test_state_dict_round_trip_weights_only():
    gen = torch.Generator().manual_seed(5)
    base = _low_rank(64, 48, 4, gen)
    p = AdaptiveProjector(4, update_proj_gap=2, name="w")
    for step in range(30):
        p.project(base + 0.01 * torch.randn(64, 48, generator=gen), step)
    buf = io.BytesIO()
    torch.save(p.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    q = AdaptiveProjector(1)
    q.load_state_dict(state)
    assert (q.update_proj_gap, q.n_svd, q.queue, q.n_gap_increases, q.side) == \
        (p.update_proj_gap, p.n_svd, p.queue, p.n_gap_increases, p.side)
    assert torch.equal(q.ortho, p.ortho)
    # both continue identically
    for step in range(30, 80):
        G = base + 0.01 * torch.randn(64, 48, generator=gen)
        torch.testing.assert_close(p.project(G, step), q.project(G, step), atol=0, rtol=0)
    assert q.n_svd == p.n_svd and q.update_proj_gap == p.update_proj_gap


@pytest.mark.parametrize("kwargs,match", [
    ({"proj_bits": 3}, r"proj_bits must be one of \(4, 8\)"),
    ({"proj_bits": 16}, r"proj_bits must be one of \(4, 8\)"),
    ({"proj_group_size": 0}, "proj_group_size must be a positive int"),
    ({"queue_size": 0}, "queue_size must be a positive int"),
    ({"gamma": 0.5}, "gamma must be a real number >= 1"),
    ({"cos_threshold": 1.5}, r"cos_threshold must be a real number in \[0, 1\]"),
    ({"update_proj_gap": 0}, "update_proj_gap must be a positive integer"),
])
def test_projector_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaptiveProjector(4, **kwargs)


def test_projector_rejects_1d_gradients():
    with pytest.raises(ValueError, match="2-D"):
        AdaptiveProjector(4).project(torch.randn(10), 0)


# --------------------------------------------------------------------------- optimizers


def _regression(seed=0, n=64, d_in=24, d_out=32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    w_true = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    return x, x @ w_true.T


def _float_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32, bias=True))


def _groups(model, **extra):
    return [{"params": [model[0].bias]},
            {"params": [model[0].weight], "rank": 4, "update_proj_gap": 5, "scale": 1.0, "proj_type": "std", **extra}]


def test_qgalore_adamw_follows_galore_with_8bit_projector():
    x, y = _regression()
    a, b = _float_model(), _float_model()
    w0 = a[0].weight.detach().clone()
    opt_a = QGaLoreAdamW(_groups(a, proj_bits=8, proj_group_size=32), lr=1e-2)
    opt_b = GaLoreAdamW(_groups(b), lr=1e-2)
    for _ in range(15):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    # The INT8 basis is within 0.5% of the float one, but Adam normalizes each low-rank
    # coordinate, so coordinates near zero amplify the difference: compare the whole update's
    # direction (cosine 0.96 measured) and the loss, not elementwise.
    da, db = (a[0].weight - w0).detach().flatten(), (b[0].weight - w0).detach().flatten()
    assert float(da @ db / (da.norm() * db.norm())) > 0.9
    la, lb = float(F.mse_loss(a(x), y).detach()), float(F.mse_loss(b(x), y).detach())
    assert abs(la - lb) < 0.02 * lb, (la, lb)
    assert isinstance(opt_a.projectors()[0], AdaptiveProjector) and opt_a.projectors()[0].proj_bits == 8
    assert opt_a.param_groups[1]["cos_threshold"] == 0.4 and opt_a.param_groups[1]["queue_size"] == 5


def test_qgalore_adamw_state_dict_resumes_bitwise():
    x, y = _regression(1)

    def run(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    a = _float_model(1)
    opt_a = QGaLoreAdamW(_groups(a), lr=1e-2)
    run(a, opt_a, 12)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    b = _float_model(1)
    b.load_state_dict(a.state_dict())
    opt_b = QGaLoreAdamW(_groups(b), lr=1e-2)
    opt_b.load_state_dict(torch.load(buf, weights_only=True))
    run(a, opt_a, 8)
    run(b, opt_b, 8)
    assert torch.equal(a[0].weight, b[0].weight)
    pa, pb = opt_a.projectors()[0], opt_b.projectors()[0]
    assert (pa.n_svd, pa.update_proj_gap, pa.queue) == (pb.n_svd, pb.update_proj_gap, pb.queue)


def _int8_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(Int8Linear.from_linear(nn.Linear(24, 32), group_size=64))


def test_layerwise_step_matches_a_manual_step():
    x, y = _regression(2)
    model = _int8_model(2)
    layer = model[0]
    gen = torch.Generator().manual_seed(7)
    opt = Int8LayerwiseQGaLore(model, rank=4, update_proj_gap=5, scale=0.5, lr=1e-2, weight_decay=0.1, generator=gen,
                               optim_bits=32)
    # the manual step, from a float copy of the dequantized weight
    w0 = layer.dequantized_weight()
    ref = nn.Linear(24, 32)
    with torch.no_grad():
        ref.weight.copy_(w0)
        ref.bias.copy_(layer.bias)
    F.mse_loss(ref(x), y).backward()
    proj = AdaptiveProjector(4, update_proj_gap=5, scale=0.5)
    low = proj.project(ref.weight.grad, 0)
    m, v = 0.1 * low, 0.001 * low * low
    d0 = -1e-2 * (0.001**0.5 / 0.1) * proj.project_back(m / (v.sqrt() + 1e-6))
    delta = d0 - 1e-2 * 0.1 * (w0 + d0)
    rand = torch.rand(32, 24, generator=torch.Generator().manual_seed(7))
    codes, scale, zero = sr_update_reference(layer.codes, layer.scale, layer.zero, delta, rand, 64)
    F.mse_loss(model(x), y).backward()  # the hook updates the layer
    assert layer.weight_grad is None
    step = scale.repeat_interleave(64)[: 32 * 24].view(32, 24)
    torch.testing.assert_close(layer.scale, scale)
    got = layer.dequantized_weight()
    expected = (codes.float().view(-1) - zero.float().repeat_interleave(64)[:768]).view(32, 24) * step
    assert float((layer.codes == codes).float().mean()) > 0.99
    assert bool(((got - expected).abs() <= step * 1.0001).all())
    assert opt.n_svd() == 1 and opt.states[0]["step"] == 1


def test_layerwise_8bit_moments_are_qgalore_adamw8bit_state():
    """The default per-layer path keeps the paper's 8-bit moments: one hook step leaves the same
    codes and absmax as QGaLoreAdamW8bit's step on a float copy of the layer, and moves the
    weight by that step's update within one INT8 rounding step; float32 moments (optim_bits=32)
    hold the same values within the 8-bit quantization error."""
    torch.manual_seed(5)
    lin = nn.Linear(128, 96)
    layer = Int8Linear.from_linear(lin, group_size=64)
    x = torch.randn(32, 128)
    y = torch.randn(32, 96)
    ref = nn.Linear(128, 96)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantized_weight())
        ref.bias.copy_(layer.bias)
    w0 = ref.weight.detach().clone()
    kw = dict(rank=48, update_proj_gap=5, scale=0.5, lr=1e-2)
    opt = Int8LayerwiseQGaLore([layer], generator=torch.Generator().manual_seed(0), **kw)
    ref_opt = QGaLoreAdamW8bit([{"params": [ref.weight], "rank": 48, "update_proj_gap": 5, "scale": 0.5}],
                               lr=1e-2, eps=1e-6, weight_decay=0.0)
    F.mse_loss(layer(x), y).backward()
    F.mse_loss(ref(x), y).backward()
    ref_opt.step()
    got, want = opt.states[0], ref_opt.state[ref.weight]
    assert got["exp_avg"].dtype == torch.uint8 and got["exp_avg"].numel() >= 4096  # 8-bit, not the fallback
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(got[key], want[key]), key
        torch.testing.assert_close(got[key + "_absmax"], want[key + "_absmax"])
    step = layer.scale.repeat_interleave(64)[: 96 * 128].view(96, 128)
    assert bool(((layer.dequantized_weight() - ref.weight.detach()).abs() <= step * 1.0001).all())
    assert float((ref.weight.detach() - w0).abs().max()) > 0  # the step moved the weight
    # float32 moments: the same values, up to the 8-bit codes' error
    layer32 = Int8Linear.from_linear(lin, group_size=64)
    opt32 = Int8LayerwiseQGaLore([layer32], generator=torch.Generator().manual_seed(0), optim_bits=32, **kw)
    F.mse_loss(layer32(x), y).backward()
    m8 = opt.moments.load_moments(got)["exp_avg"]
    m32 = opt32.states[0]["exp_avg"]
    assert m32.dtype == torch.float32 and opt32.moments is None
    assert float((m8 - m32).norm() / m32.norm()) < 0.05
    with pytest.raises(ValueError, match="optim_bits must be 8 .* or 32 .*, got 16"):
        Int8LayerwiseQGaLore([layer], rank=2, optim_bits=16)


def test_layerwise_training_reduces_the_loss_and_resumes_exactly():
    x, y = _regression(3)
    model = _int8_model(3)
    bias_opt = torch.optim.Adam([model[0].bias], lr=1e-2)
    opt = Int8LayerwiseQGaLore(model, rank=8, update_proj_gap=10, scale=1.0, lr=2e-2,
                               generator=torch.Generator().manual_seed(0))

    def run(model, bias_opt, steps):
        losses = []
        for _ in range(steps):
            bias_opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            bias_opt.step()
            losses.append(float(loss.detach()))
        return losses

    first = run(model, bias_opt, 40)
    assert first[-1] < 0.5 * first[0], (first[0], first[-1])
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "model": model.state_dict(), "bias_opt": bias_opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    clone = _int8_model(99)
    clone.load_state_dict(saved["model"])
    clone_bias_opt = torch.optim.Adam([clone[0].bias], lr=1e-2)
    clone_bias_opt.load_state_dict(saved["bias_opt"])
    clone_opt = Int8LayerwiseQGaLore(clone, rank=8, update_proj_gap=10, scale=1.0, lr=2e-2,
                                     generator=torch.Generator().manual_seed(123))
    clone_opt.load_state_dict(saved["opt"])
    run(model, bias_opt, 15)
    run(clone, clone_bias_opt, 15)
    assert torch.equal(model[0].codes, clone[0].codes) and torch.equal(model[0].scale, clone[0].scale)
    opt.remove()
    model(x).sum().backward()
    assert model[0].weight_grad is not None


def test_layerwise_errors():
    ddp = nn.parallel.DistributedDataParallel.__new__(nn.parallel.DistributedDataParallel)  # isinstance only
    with pytest.raises(TypeError, match="single-process"):
        Int8LayerwiseQGaLore(ddp, rank=2)
    with pytest.raises(ValueError, match="at least one Int8Linear"):
        Int8LayerwiseQGaLore(nn.Sequential(nn.Linear(3, 3)), rank=2)
    with pytest.raises(TypeError, match="unknown projector argument"):
        Int8LayerwiseQGaLore(_int8_model(), rank=2, proj_bitz=4)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        Int8LayerwiseQGaLore(_int8_model(), rank=0)
    with pytest.raises(ValueError, match=r"proj_bits must be one of \(4, 8\)"):
        opt = Int8LayerwiseQGaLore(_int8_model(), rank=2, proj_bits=2)
        x, y = _regression()
        F.mse_loss(opt.layers[0](x), y).backward()


# --------------------------------------------------------------------------- validation at construction (issue 15)
@pytest.mark.parametrize("key,value,match", [
    ("proj_bits", 3, r"proj_bits must be one of \(4, 8\), got 3"),
    ("proj_group_size", 0, "proj_group_size must be a positive int, got 0"),
    ("queue_size", 2.5, "queue_size must be a positive int, got 2.5"),
    ("gamma", 0.5, "gamma must be a real number >= 1"),
    ("cos_threshold", 1.5, r"cos_threshold must be a real number in \[0, 1\], got 1.5"),
    ("update_proj_gap", 10.5, "update_proj_gap must be a positive integer"),
    ("scale", float("nan"), "scale must be a finite real number"),
    ("proj_type", "diag", "proj_type must be one of"),
])
def test_qgalore_adamw_validates_groups_when_constructed(key, value, match):
    model = _float_model()
    with pytest.raises((TypeError, ValueError), match=match):
        QGaLoreAdamW(_groups(model, **{key: value}))


def test_qgalore_adamw_normalises_numpy_and_float_options():
    np = pytest.importorskip("numpy")
    model = _float_model()
    opt = QGaLoreAdamW(_groups(model, rank=np.int64(4), update_proj_gap=5.0, queue_size=np.int32(3), proj_bits=np.int64(8)))
    group = opt.param_groups[1]
    assert [type(group[k]) for k in ("rank", "update_proj_gap", "queue_size", "proj_bits")] == [int] * 4
    x, y = _regression()
    F.mse_loss(model(x), y).backward()
    opt.step()
    assert opt.projectors()[0].proj_bits == 8


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"proj_bits": 2}, ValueError, r"proj_bits must be one of \(4, 8\), got 2"),
    ({"scale": "0.25"}, TypeError, "scale must be a finite real number"),
    ({"proj_type": "diag"}, ValueError, "proj_type must be one of"),
    ({"update_proj_gap": 0.5}, ValueError, "update_proj_gap must be a positive integer"),
    ({"gamma": 0.9}, ValueError, "gamma must be a real number >= 1"),
    ({"lr": -1.0}, ValueError, "lr must be a real number >= 0, got -1.0"),
    ({"betas": (0.9,)}, ValueError, r"betas must be two numbers in \[0, 1\)"),
    ({"generator": 7}, TypeError, "generator must be a torch.Generator or None, got int"),
])
def test_int8_layerwise_validates_when_constructed_not_in_backward(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Int8LayerwiseQGaLore(_int8_model(), rank=2, **kwargs)


def test_int8_layerwise_accepts_numpy_rank_and_float_gap():
    np = pytest.importorskip("numpy")
    opt = Int8LayerwiseQGaLore(_int8_model(), rank=np.int64(4), update_proj_gap=10.0)
    assert opt.hparams["rank"] == 4 and type(opt.hparams["update_proj_gap"]) is int
    x, y = _regression()
    F.mse_loss(opt.layers[0](x), y).backward()
    assert opt.states[0]["step"] == 1


def test_int8_layerwise_generator_must_live_on_the_layers_device():
    with pytest.raises(ValueError, match="generator is on cpu, the Int8Linear layers on meta"):
        Int8LayerwiseQGaLore(_int8_model().to("meta"), rank=2, generator=torch.Generator())


# --------------------------------------------------------------------------- one-sign groups (issue 15)
def _one_sign_inputs(group_size=64, seed=5):
    """Groups whose values share one sign (all in [0.5, 1.5], all in [-1.5, -0.5], all zero), and a
    partial last group: the case a kernel that drops "the range includes 0" gets wrong (its zero
    point leaves [0, 255] and the codes wrap)."""
    gen = torch.Generator().manual_seed(seed)
    n_full = 5
    n = n_full * group_size + group_size // 2  # (5.5 groups)
    w = torch.empty(n)
    for g, sign in enumerate([1.0, -1.0, 1.0, 0.0, -1.0, 1.0]):
        lo, hi = g * group_size, min((g + 1) * group_size, n)
        w[lo:hi] = sign * (0.5 + torch.rand(hi - lo, generator=gen))
    w = w.view(1, -1)  # (1, n)
    qt = quantize_groupwise(w, bits=8, group_size=group_size)
    codes = qt.data.view(w.shape).clone()
    w_deq = qt.dequantize()
    # an update that keeps every group on its side of 0
    delta = torch.randn(w.shape, generator=gen) * 0.01 * w.sign()
    rand = torch.rand(w.shape, generator=gen)
    return codes, qt.scale.clone(), qt.zero.clone(), delta, rand, w_deq + delta


def _check_one_sign(out, target, group_size):
    codes, scale, zero = out
    n = codes.numel()
    s = scale.repeat_interleave(group_size)[:n]
    z = zero.float().repeat_interleave(group_size)[:n]
    deq = (codes.reshape(-1).float() - z) * s
    err = (deq - target.reshape(-1)).abs()
    # stochastic rounding moves each value by less than one step s of its group, and 0 is exact
    assert bool((err <= s * 1.0001).all()), float((err / s).max())
    assert float(err.max()) < 0.01  # one step of a range [0, 1.5] is 0.006; a wrapped code costs ~1
    assert bool((deq[target.reshape(-1) == 0] == 0).all())


def test_sr_update_reference_keeps_one_sign_groups_within_one_step():
    codes, scale, zero, delta, rand, target = _one_sign_inputs()
    out = sr_update_reference(codes, scale, zero, delta, rand, 64)
    _check_one_sign(out, target, 64)
    # the range includes 0: a positive group's zero point is 0, a negative group's 255
    assert zero.tolist()[:2] == [0, 255] and out[2].tolist()[:2] == [0, 255]


@needs_triton
@pytest.mark.parametrize("group_size", [64, 10])
def test_sr_update_kernel_keeps_one_sign_groups_within_one_step(group_size):
    codes, scale, zero, delta, rand, target = _one_sign_inputs(group_size)
    exp = sr_update_reference(codes, scale, zero, delta, rand, group_size)
    got = sr_update(codes, scale, zero, delta, rand, group_size, backend="interpret")
    _check_one_sign(got, target, group_size)
    assert all(torch.equal(a, b) for a, b in zip(got, exp))


@needs_triton
def test_sr_update_kernel_divides_exactly_when_compiled(tmp_path, monkeypatch):
    """Lower the kernel for sm_90 (no GPU needed): its divisions are IEEE round-to-nearest
    (``div.rn.f32``), as the reference's and the blockwise quantizer's, never the approximate
    ``div.full.f32`` Triton's ``/`` emits; so compiled kernel and reference pick the same codes."""
    import mini.qgalore.int8_linear as K

    sig = {"codes_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*u8", "delta_ptr": "*fp32", "rand_ptr": "*fp32",
           "codes_out_ptr": "*u8", "scale_out_ptr": "*fp32", "zero_out_ptr": "*u8", "n": "i32", "group_size": "i32",
           "BLOCK": "constexpr"}
    ptx = compile_ptx(K._sr_update_kernel, sig, {"BLOCK": 256}, 4, tmp_path, monkeypatch)
    assert "div.rn.f32" in ptx
    assert "div.full.f32" not in ptx and "div.approx" not in ptx


# --------------------------------------------------------------------------- lazy-update rules
def _flipping(p: AdaptiveProjector) -> None:
    """Make every other SVD return the same basis with its signs flipped (a CPU SVD's coin flip)."""
    plain = GaLoreProjector.compute_basis
    calls = [0]

    def compute(grad):
        calls[0] += 1
        sign = -1.0 if calls[0] % 2 == 0 else 1.0
        return tuple(None if t is None else sign * t for t in plain(p, grad))

    p.compute_basis = compute


def test_signed_rule_recomputes_on_sign_flips_abs_rule_does_not():
    gen = torch.Generator().manual_seed(3)
    base = _low_rank(64, 48, 4, gen)
    stream = [base + 0.01 * torch.randn(64, 48, generator=gen) for _ in range(200)]
    counts = {}
    for rule in ("abs", "signed"):
        p = AdaptiveProjector(4, update_proj_gap=2, cos_rule=rule)
        _flipping(p)
        for step, G in enumerate(stream):
            p.project(G, step)
        counts[rule] = (p.n_svd, p.update_proj_gap, list(p.queue))
    n_abs, gap_abs, q_abs = counts["abs"]
    n_signed, gap_signed, q_signed = counts["signed"]
    # each SVD's sign differs from the previous one's: every signed cosine reads -1 ("moved")
    assert n_signed == 100 and gap_signed == 2 and max(q_signed) < -0.9
    assert n_abs < 25 and gap_abs >= 16 and min(q_abs) > 0.9  # the same subspace: T doubles


def test_signed_rule_compares_with_the_float_previous_vector():
    gen = torch.Generator().manual_seed(4)
    G = _low_rank(64, 48, 4, gen)
    signed = AdaptiveProjector(4, update_proj_gap=1, cos_rule="signed", proj_bits=4)
    absolute = AdaptiveProjector(4, update_proj_gap=1, proj_bits=4)
    for p in (signed, absolute):
        for _ in range(3):
            p.update_basis(G)
    # the same gradient gives the same float SVD: exactly the previous float vector (cos 1), while
    # the |cos| rule reads the INT4-dequantized previous basis (cos < 1)
    assert signed.queue == pytest.approx([1.0, 1.0], abs=1e-6)
    assert max(absolute.queue) < 1 - 1e-4 and min(absolute.queue) > 0.9
    lead = signed.compute_basis(G)[0][0].float()  # right side: first row (48,)
    assert signed.past_leading.shape == (48,) and torch.equal(signed.past_leading, lead)


def test_cos_rule_state_dict_and_errors():
    gen = torch.Generator().manual_seed(5)
    G = _low_rank(32, 24, 3, gen)
    p = AdaptiveProjector(3, update_proj_gap=1, cos_rule="signed")
    p.update_basis(G)
    state = p.state_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    q = AdaptiveProjector(3)
    q.load_state_dict(torch.load(buf, weights_only=True))
    assert q.cos_rule == "signed" and torch.equal(q.past_leading, p.past_leading)
    legacy = {k: v for k, v in AdaptiveProjector(3).state_dict().items() if k != "cos_rule"}
    r = AdaptiveProjector(3, cos_rule="signed")
    r.load_state_dict(legacy)  # checkpoints saved before the option: the |cos| rule
    assert r.cos_rule == "abs" and r.past_leading is None
    with pytest.raises(ValueError, match=r"cos_rule must be one of \('abs', 'signed'\).*got 'official'"):
        AdaptiveProjector(3, cos_rule="official")
    w = nn.Parameter(torch.randn(16, 12))
    with pytest.raises(ValueError, match="cos_rule must be one of"):
        QGaLoreAdamW([{"params": [w], "rank": 2, "cos_rule": 1}])
    opt = QGaLoreAdamW([{"params": [w], "rank": 2, "cos_rule": "signed"}])
    w.grad = torch.randn(16, 12)
    opt.step()
    assert opt.state[w]["projector"].cos_rule == "signed"
    layer = Int8Linear(16, 12, bias=False, group_size=64)
    with pytest.raises(ValueError, match="cos_rule must be one of"):
        Int8LayerwiseQGaLore(layer.modules(), rank=2, cos_rule="ABS")
    lw = Int8LayerwiseQGaLore([layer], rank=2, cos_rule="signed")
    layer(torch.randn(3, 16)).sum().backward()
    assert lw.states[0]["projector"].cos_rule == "signed"


def test_sr_reference_in_chunks_equals_one_pass(monkeypatch):
    """The reference runs over chunks of groups (bounded temporaries); the result is the same as
    one pass over every group, a short last group included (300 x 701 weights, groups of 256)."""
    import mini.qgalore.int8_linear as il

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(300, 701, generator=gen)
    qt = quantize_groupwise(w, bits=8, group_size=256)
    codes = qt.codes().view(300, 701).clone()
    delta = 0.01 * torch.randn(300, 701, generator=gen)
    rand = torch.rand(300, 701, generator=gen)
    chunked = il.sr_update_reference(codes, qt.scale, qt.zero, delta, rand, 256)
    monkeypatch.setattr(il, "_SR_CHUNK", 1 << 30)
    whole = il.sr_update_reference(codes, qt.scale, qt.zero, delta, rand, 256)
    assert 300 * 701 > 3 * (1 << 16) and (300 * 701) % 256
    for a, b in zip(chunked, whole):
        assert torch.equal(a, b)
