"""Tests of mini.galore.adamw8bit.GaLoreAdamW8bit.

References, all on CPU: bitsandbytes' AdamW8bit (its CPU 8-bit blockwise update runs here),
galore-torch's GaLoreAdamW8bit (run on CPU by making its ``torch.cuda.synchronize()`` a no-op),
and the float32 GaLoreAdamW. Where bitsandbytes quantizes with its CPU library (an approximate
nearest-code search, see mini.quant.blockwise) a test swaps in bitsandbytes' own exact PyTorch
quantizer, so the comparison is exact; one test keeps the library and bounds the difference.
"""
from __future__ import annotations

import io

import pytest
import torch

from mini.galore.adamw import GaLoreAdamW
from mini.galore.adamw8bit import GaLoreAdamW8bit, optimizer_state_bytes
from mini.kernels import HAS_TRITON

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.backends.cpu.ops as bnb_cpu_ops  # noqa: E402

M, N, LEN_B, STEPS = 96, 128, 100, 24


@pytest.fixture
def exact_bnb_quantizer(monkeypatch):
    """Make bitsandbytes' CPU 8-bit optimizer requantize with its exact PyTorch quantizer."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

    def exact(A, code, absmax_out, out_uint8, blocksize):
        q, absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, A, code, blocksize)
        out_uint8.copy_(q.reshape(out_uint8.shape))
        absmax_out.copy_(absmax)

    monkeypatch.setattr(bnb_cpu_ops, "_quant_blockwise_fp32_direct", exact)


@pytest.fixture
def galore_torch_on_cpu(monkeypatch):
    galore_torch = pytest.importorskip("galore_torch")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    return galore_torch


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W0 = 0.1 * torch.randn(M, N, generator=g)
    b0 = 0.1 * torch.randn(LEN_B, generator=g)
    # gradients with a spread of magnitudes, plus a term that depends on the weights
    grads = [(torch.randn(M, N, generator=g) * (1 + 3 * torch.rand(M, N, generator=g)), torch.randn(LEN_B, generator=g))
             for _ in range(STEPS)]
    return W0, b0, grads


def _run(make, seed: int = 0, steps: int = STEPS, feedback: bool = True):
    """``feedback``: W's gradient depends on W (gW + W), so tiny differences grow."""
    W0, b0, grads = _problem(seed)
    W = torch.nn.Parameter(W0.clone())
    b = torch.nn.Parameter(b0.clone())
    opt = make(W, b)
    for gW, gb in grads[:steps]:
        W.grad = gW + W.detach() if feedback else gW.clone()
        b.grad = gb.clone()
        opt.step()
    return W.detach().clone(), b.detach().clone(), opt, W0


def _groups(W, b, proj_type="std", rank=64, gap=10):
    return [{"params": [b]}, {"params": [W], "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": proj_type}]


@pytest.mark.parametrize("weight_decay", [0.0, 1e-2])
def test_plain_groups_match_bitsandbytes_adamw8bit(exact_bnb_quantizer, weight_decay):
    """W (12288 values) has 8-bit states, b (100 values) 32-bit ones, in both optimizers."""
    Wb, bb, ob, _ = _run(lambda W, b: bnb.optim.AdamW8bit([W, b], lr=1e-2, weight_decay=weight_decay))
    Wm, bm, om, _ = _run(lambda W, b: GaLoreAdamW8bit([W, b], lr=1e-2, weight_decay=weight_decay))
    torch.testing.assert_close(Wm, Wb, atol=2e-7, rtol=0)
    torch.testing.assert_close(bm, bb, atol=2e-7, rtol=0)
    sb = ob.state[ob.param_groups[0]["params"][0]]
    sm = om.state[om.param_groups[0]["params"][0]]
    assert torch.equal(sm["exp_avg"], sb["state1"]) and torch.equal(sm["exp_avg_sq"], sb["state2"])
    torch.testing.assert_close(sm["exp_avg_absmax"], sb["absmax1"], atol=0, rtol=1e-6)
    assert om.state[om.param_groups[0]["params"][1]]["exp_avg"].dtype == torch.float32
    assert ob.state[ob.param_groups[0]["params"][1]]["state1"].dtype == torch.float32


def test_plain_group_close_to_bitsandbytes_cpu_library():
    """With bitsandbytes' approximate CPU search the trajectories differ by much less than they move."""
    Wb, _, _, W0 = _run(lambda W, b: bnb.optim.AdamW8bit([W, b], lr=1e-2, weight_decay=1e-2))
    Wm, _, _, _ = _run(lambda W, b: GaLoreAdamW8bit([W, b], lr=1e-2, weight_decay=1e-2))
    rel = float((Wm - Wb).norm() / (Wb - W0).norm())
    assert rel < 0.03, rel  # measured ~0.004


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_projected_groups_match_galore_torch_8bit(exact_bnb_quantizer, galore_torch_on_cpu, proj_type):
    kw = dict(lr=1e-2, weight_decay=1e-2)
    # gradients that do not depend on W: the SVDs (steps 0, 10, 20) see the same matrices, so the
    # bases and the codes agree and only the order of a few float32 products differs
    Wg, bg, og, W0 = _run(lambda W, b: galore_torch_on_cpu.GaLoreAdamW8bit(_groups(W, b, proj_type), **kw), feedback=False)
    Wm, bm, om, _ = _run(lambda W, b: GaLoreAdamW8bit(_groups(W, b, proj_type), **kw), feedback=False)
    torch.testing.assert_close(Wm, Wg, atol=1e-6, rtol=0)
    torch.testing.assert_close(bm, bg, atol=2e-7, rtol=0)
    assert float((Wm - W0).abs().max()) > 1e-2  # it moved
    assert om.n_svd() == 3
    # gradients that depend on W: float32 rounding differences of 1e-8 move the next SVD's
    # singular vectors by ~1e-5 (close singular values), which flips a few codes; the
    # trajectories stay within a small fraction of the distance travelled
    Wg, _, _, _ = _run(lambda W, b: galore_torch_on_cpu.GaLoreAdamW8bit(_groups(W, b, proj_type), **kw))
    Wm, _, _, _ = _run(lambda W, b: GaLoreAdamW8bit(_groups(W, b, proj_type), **kw))
    rel = float((Wm - Wg).norm() / (Wg - W0).norm())
    assert rel < 0.01, rel


def test_close_to_float32_galore_trajectory():
    """8-bit moments move the trajectory about as much as they move bitsandbytes' own Adam.

    Yardstick: bitsandbytes' AdamW8bit against its 32-bit AdamW on the plain problem (measured
    relative deviation ~0.019). 8-bit GaLore against float32 GaLore with the same gradients:
    ~0.017 (std and reverse_std). With W-dependent gradients the subspace switches amplify small
    differences (the SVD of a slightly different matrix): ~0.045 (std), ~0.017 (reverse_std).
    """
    W8, _, _, W0 = _run(lambda W, b: bnb.optim.AdamW8bit([W, b], lr=1e-2, weight_decay=1e-2), feedback=False)
    W32, _, _, _ = _run(lambda W, b: bnb.optim.AdamW([W, b], lr=1e-2, weight_decay=1e-2), feedback=False)
    yardstick = float((W8 - W32).norm() / (W32 - W0).norm())
    assert 0.002 < yardstick < 0.05, yardstick
    kw = dict(lr=1e-2, weight_decay=1e-2, eps=1e-8)
    for proj_type in ("std", "reverse_std"):
        for feedback, bound in ((False, 2 * yardstick), (True, 0.1)):
            Wf, bf, _, W0 = _run(lambda W, b: GaLoreAdamW(_groups(W, b, proj_type), **kw), feedback=feedback)
            Wm, bm, _, _ = _run(lambda W, b: GaLoreAdamW8bit(_groups(W, b, proj_type), **kw), feedback=feedback)
            rel = float((Wm - Wf).norm() / (Wf - W0).norm())
            assert rel < bound, (proj_type, feedback, rel, bound)
            # 32-bit states for b: only where ε and the weight decay sit differ (lr²·λ per step)
            torch.testing.assert_close(bm, bf, atol=5e-5, rtol=0)


def test_training_loss_close_to_float32():
    """Least squares with a projected weight: 8-bit and float32 GaLore reach the same loss."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(256, 96, generator=g)
    target = X @ torch.randn(96, 80, generator=g) / 10

    def train(cls):
        W = torch.nn.Parameter(torch.zeros(96, 80))
        opt = cls([{"params": [W], "rank": 48, "update_proj_gap": 20, "scale": 1.0, "proj_type": "std"}],
                  lr=3e-2, weight_decay=0.0, eps=1e-8)
        losses = []
        for _ in range(80):
            loss = ((X @ W - target) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    f32, q8 = train(GaLoreAdamW), train(GaLoreAdamW8bit)
    assert q8[-1] < 0.2 * q8[0]
    assert abs(q8[-1] - f32[-1]) < 0.15 * f32[-1], (q8[-1], f32[-1])


def test_state_layout_min_8bit_size_and_bytes():
    _, _, opt, _ = _run(lambda W, b: GaLoreAdamW8bit(_groups(W, b, "std"), lr=1e-2), steps=2)
    W = opt.param_groups[1]["params"][0]
    st = opt.state[W]
    # std on (96, 128): m < n, left projection, moments (64, 128) = 8192 values >= 4096 -> 8-bit
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg"].shape == (64, 128)
    assert st["exp_avg_absmax"].shape == (32,) and st["exp_avg_sq_absmax"].dtype == torch.float32
    assert GaLoreAdamW8bit.is_8bit(st)
    assert not GaLoreAdamW8bit.is_8bit(opt.state[opt.param_groups[0]["params"][0]])  # 100 values
    sizes = opt.state_bytes()
    assert sizes == {"moments_8bit": 2 * 8192, "absmax": 2 * 32 * 4, "moments_32bit": 2 * 100 * 4,
                     "projector": 96 * 64 * 4, "total": 16384 + 256 + 800 + 24576}
    assert optimizer_state_bytes(opt) == sizes["total"]
    # a larger min_8bit_size keeps everything in float32; a smaller block makes more absmax
    _, _, opt32, _ = _run(lambda W, b: GaLoreAdamW8bit(_groups(W, b), lr=1e-2, min_8bit_size=10**6), steps=1)
    assert opt32.state_bytes()["moments_8bit"] == 0 and opt32.state_bytes()["moments_32bit"] == 4 * 2 * (8192 + 100)
    _, _, opt64, _ = _run(lambda W, b: GaLoreAdamW8bit(_groups(W, b), lr=1e-2, block_size=64), steps=1)
    assert opt64.state[opt64.param_groups[1]["params"][0]]["exp_avg_absmax"].shape == (128,)
    # against float Adam on the same parameters: 8-bit moments take about a quarter of the bytes
    _, _, adam, _ = _run(lambda W, b: torch.optim.AdamW([W, b], lr=1e-2), steps=1)
    _, _, adam8, _ = _run(lambda W, b: GaLoreAdamW8bit([W, b], lr=1e-2), steps=1)
    assert optimizer_state_bytes(adam) == 2 * 4 * (M * N + LEN_B)
    assert optimizer_state_bytes(adam8) == 2 * (M * N) + 2 * 4 * (M * N // 256) + 2 * 4 * LEN_B


def test_state_dict_roundtrip_weights_only():
    W0, b0, grads = _problem(1)

    def make(W, b):
        return GaLoreAdamW8bit(_groups(W, b, "std", gap=5), lr=1e-2, weight_decay=1e-2, project_moments=True)

    W = torch.nn.Parameter(W0.clone())
    b = torch.nn.Parameter(b0.clone())
    opt = make(W, b)
    for gW, gb in grads[:7]:
        W.grad, b.grad = gW + W.detach(), gb.clone()
        opt.step()
    buf = io.BytesIO()
    torch.save({"W": W.detach(), "b": b.detach(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    W2 = torch.nn.Parameter(ckpt["W"].clone())
    b2 = torch.nn.Parameter(ckpt["b"].clone())
    opt2 = make(W2, b2)
    opt2.load_state_dict(ckpt["opt"])
    st2 = opt2.state[W2]
    assert st2["exp_avg"].dtype == torch.uint8 and st2["exp_avg_absmax"].dtype == torch.float32
    assert st2["projector"].n_svd == opt.state[W]["projector"].n_svd == 2
    for gW, gb in grads[7:16]:  # crosses the switches at steps 10 and 15 (moments carried)
        for P, Bp, o in ((W, b, opt), (W2, b2, opt2)):
            P.grad, Bp.grad = gW + P.detach(), gb.clone()
            o.step()
    assert torch.equal(W, W2) and torch.equal(b, b2)
    assert torch.equal(opt.state[W]["exp_avg_sq"], opt2.state[W2]["exp_avg_sq"])


def test_bfloat16_params_keep_float32_states_on_load():
    W = torch.nn.Parameter(torch.randn(64, 80).to(torch.bfloat16))
    b = torch.nn.Parameter(torch.randn(10).to(torch.bfloat16))
    opt = GaLoreAdamW8bit([W, b], lr=1e-2)
    for _ in range(2):
        W.grad = torch.randn_like(W)
        b.grad = torch.randn_like(b)
        opt.step()
    sd = opt.state_dict()
    opt2 = GaLoreAdamW8bit([W, b], lr=1e-2)
    opt2.load_state_dict(sd)
    assert opt2.state[W]["exp_avg_absmax"].dtype == torch.float32
    assert torch.equal(opt2.state[W]["exp_avg_absmax"], opt.state[W]["exp_avg_absmax"])
    assert opt2.state[b]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt2.state[b]["exp_avg_sq"], opt.state[b]["exp_avg_sq"])


def test_project_moments_close_to_float32_carry():
    """Carrying the moments across switches: 8-bit follows the float32 GaLoreAdamW doing the same."""
    kw = dict(lr=1e-2, weight_decay=0.0, eps=1e-8, project_moments=True)
    Wf, _, _, W0 = _run(lambda W, b: GaLoreAdamW(_groups(W, b, "std", gap=5), **kw))
    Wq, _, oq, _ = _run(lambda W, b: GaLoreAdamW8bit(_groups(W, b, "std", gap=5), **kw))
    Ws, _, _, _ = _run(lambda W, b: GaLoreAdamW8bit(_groups(W, b, "std", gap=5), **{**kw, "project_moments": False}))
    st = oq.state[oq.param_groups[1]["params"][0]]
    assert GaLoreAdamW8bit.is_8bit(st) and st["exp_avg"].shape == (64, N) and st["projector"].n_svd == 5
    rel = float((Wq - Wf).norm() / (Wf - W0).norm())
    assert rel < 0.05, rel
    assert float((Ws - Wq).norm()) > 10 * float((Wq - Wf).norm())  # the carry matters more than 8 bits


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_backend_gives_the_reference_step():
    W0 = torch.randn(64, 64)

    def run(backend):
        W = torch.nn.Parameter(W0.clone())
        opt = GaLoreAdamW8bit([W], lr=1e-2, backend=backend)
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            W.grad = torch.randn(64, 64, generator=g)
            opt.step()
        return W.detach(), opt.state[W]

    (Wr, sr), (Wi, si) = run("reference"), run("interpret")
    assert torch.equal(Wr, Wi)
    assert torch.equal(sr["exp_avg"], si["exp_avg"]) and torch.equal(sr["exp_avg_sq_absmax"], si["exp_avg_sq_absmax"])


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"block_size": 0}, ValueError, "block_size must be a positive integer"),
        ({"block_size": 2.0}, ValueError, "block_size must be a positive integer"),
        ({"min_8bit_size": -1}, ValueError, "min_8bit_size must be a non-negative integer"),
        ({"lr": -1.0}, ValueError, "lr"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        GaLoreAdamW8bit([torch.nn.Parameter(torch.randn(4, 4))], **kwargs)


def test_group_errors_inherited():
    W = torch.nn.Parameter(torch.randn(8, 8))
    with pytest.raises((TypeError, ValueError), match="rank must be a positive integer"):
        GaLoreAdamW8bit([{"params": [W], "rank": 0}])
    with pytest.raises(ValueError, match="only 2-D weight matrices"):
        GaLoreAdamW8bit([{"params": [torch.nn.Parameter(torch.randn(8))], "rank": 2}])
    with pytest.raises(ValueError, match="CUDA-only"):
        opt = GaLoreAdamW8bit([W], backend="triton", min_8bit_size=0)
        W.grad = torch.randn(8, 8)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_projected_params_follow_galore_torch_8bit(exact_bnb_quantizer, galore_torch_on_cpu, dtype):
    """bf16/fp16 projected parameters (the paper's setting) step as galore-torch's 8-bit optimizer.

    Both compute the update in float32 from 8-bit moments, round the low-rank update to the
    parameter's dtype and project it back in that dtype; mini used to fail here (a float32
    update against a bf16 basis).
    """
    g = torch.Generator().manual_seed(3)
    W0 = (0.1 * torch.randn(M, N, generator=g)).to(dtype)
    b0 = torch.randn(LEN_B, generator=g).to(dtype)
    grads = [(torch.randn(M, N, generator=g).to(dtype), torch.randn(LEN_B, generator=g).to(dtype)) for _ in range(12)]

    def run(cls):
        W, b = torch.nn.Parameter(W0.clone()), torch.nn.Parameter(b0.clone())
        opt = cls(_groups(W, b), lr=1e-2, weight_decay=1e-2)
        for gW, gb in grads:
            W.grad, b.grad = gW.clone(), gb.clone()
            opt.step()
        return W.detach().float(), b.detach().float(), opt

    Wg, bg, _ = run(galore_torch_on_cpu.GaLoreAdamW8bit)
    Wm, bm, om = run(GaLoreAdamW8bit)
    moved = float((Wg - W0.float()).norm())
    assert moved > 0.1
    assert float((Wm - Wg).norm()) / moved < 0.02  # measured 0.0 to 0.01: rounding of the basis products
    eps = float(torch.finfo(dtype).eps)
    torch.testing.assert_close(bm, bg, atol=4 * eps, rtol=4 * eps)  # plain group: a few units in the last place
    state = om.state[om.param_groups[1]["params"][0]]
    assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg_absmax"].dtype == torch.float32
    assert state["projector"].ortho.dtype == dtype
