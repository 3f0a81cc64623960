"""Tests of the faster 8-bit reference path and of the fused 8-bit Adam kernel.

- ``mini.quant.blockwise.nearest_code_index`` (a table on the float's top 16 bits) against
  ``torch.bucketize`` on every midpoint, its neighbouring floats and every table interval's ends;
- the quantize / dequantize references and a GaLoreAdamW8bit trajectory against the previous
  implementation (kept below), bit for bit: the labs' numbers do not change;
- ``mini.quant.adam8bit.adam8bit_update``: its reference against GaLoreAdamW8bit's step (bit for
  bit) and the Triton kernel under the interpreter against the reference.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

import mini.quant.blockwise as bw
from mini.galore.adamw8bit import GaLoreAdamW8bit
from mini.kernels import HAS_TRITON
from mini.quant.adam8bit import adam8bit_update, adam8bit_update_reference
from mini.quant.blockwise import (
    code_midpoints,
    dequantize_blockwise_reference,
    dynamic_map,
    linear_map,
    n_blocks,
    nearest_code_index,
    quantize_blockwise_reference,
)
from tests.triton_aot import compile_ptx

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
MAPS = {"dynamic signed": lambda: dynamic_map(True), "dynamic unsigned": lambda: dynamic_map(False),
        "linear signed": lambda: linear_map(True), "linear unsigned": lambda: linear_map(False)}


# ---------------------------------------------------------------------------------------------
# The previous implementation (bucketize; a block index per element), the bit-for-bit target
# ---------------------------------------------------------------------------------------------
def _old_quantize(x: torch.Tensor, code: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.numel()
    nb = n_blocks(n, block_size)
    padded = torch.zeros(nb * block_size, dtype=torch.float32)
    padded[:n] = x.reshape(-1).float()
    blocks = padded.view(nb, block_size)
    absmax = blocks.abs().amax(dim=1) if n else torch.zeros(0)
    denom = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    scaled = (blocks / denom[:, None]).clamp_(-1.0, 1.0).reshape(-1)[:n]
    idx = torch.bucketize(scaled, code_midpoints(code), right=False)
    return idx.to(torch.uint8).reshape(x.shape), absmax


def _old_dequantize(q, absmax, code, block_size=256, shape=None, dtype=None, out=None, validate=True):
    shape, dtype = bw._check_dequant_inputs(q, absmax, code, block_size, shape, dtype, out, contiguous=False,
                                            validate=validate)
    block_of = torch.arange(q.numel()) // block_size
    res = (code[q.reshape(-1).long()] * absmax[block_of]).to(dtype).reshape(shape)
    if out is None:
        return res
    out.copy_(res)
    return out


class _OldGaLoreAdamW8bit(GaLoreAdamW8bit):
    def adam_direction(self, p, group, state, grad):  # the previous adam_direction, verbatim
        beta1, beta2 = group["betas"]
        g = grad.float()
        moments = self.load_moments(state)
        m, v = moments["exp_avg"], moments["exp_avg_sq"]
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        c2 = math.sqrt(1.0 - beta2 ** state["step"]) if group["correct_bias"] else 1.0
        direction = m / (v.sqrt() / c2 + group["eps"])
        self.store_moments(state, moments)
        return direction


def _hard_values(n: int, g: torch.Generator) -> torch.Tensor:
    """Signs, zeros, 70 decades of magnitude, float32 extremes, exact ties with the block max."""
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4
    x = x * 10.0 ** torch.randint(-35, 35, (n,), generator=g).float()
    x[torch.rand(n, generator=g) < 0.05] = 0.0
    if n > 8:
        x[:4] = torch.tensor([3.4e38, -3.4e38, 1.2e-38, -1e-45])
        x[4:8] = 1.0
    return x


# ---------------------------------------------------------------------------------------------
# Nearest-code search
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MAPS))
def test_nearest_code_index_equals_bucketize_on_every_boundary(name):
    code = MAPS[name]()
    mid = code_midpoints(code)
    k = torch.arange(65536, dtype=torch.int64)
    sign = (k >= 0x8000).long() << 32
    ends = torch.cat([((k << 16) - sign), (((k << 16) | 0xFFFF) - sign)]).to(torch.int32).view(torch.float32)
    ends = ends[torch.isfinite(ends)].clamp(-1.0, 1.0)  # every table interval's two ends
    s = torch.cat([
        mid,  # ties: exactly on a midpoint (goes to the lower code)
        torch.nextafter(mid, torch.tensor(2.0)),
        torch.nextafter(mid, torch.tensor(-2.0)),
        code, ends,
        torch.tensor([float("nan"), -float("nan"), 0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45]),
        torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1,
    ])
    assert torch.equal(nearest_code_index(s, code), torch.bucketize(s, mid, right=False))
    s2 = s[: 2 * 255].reshape(2, 255).t()  # non-contiguous, 2-D
    assert torch.equal(nearest_code_index(s2, code), torch.bucketize(s2.contiguous(), mid, right=False))


def test_nearest_code_index_clustered_map_falls_back():
    """A map with many codes inside one 16-bit interval: the plain search, still exact."""
    code = torch.cat([torch.linspace(-1, 0.5, 156), 0.5 + torch.arange(1, 101) * 1e-6]).float()  # sorted
    s = torch.rand(10_000, generator=torch.Generator().manual_seed(1)) * 2 - 1
    s = torch.cat([s, code_midpoints(code), 0.5 + torch.rand(1000) * 1e-4])
    assert bw._code_table(code)[2] > bw._MAX_TABLE_STEPS
    assert torch.equal(nearest_code_index(s, code), torch.bucketize(s, code_midpoints(code), right=False))


def test_nearest_code_index_argument_errors():
    with pytest.raises(TypeError, match="scaled"):
        nearest_code_index(torch.zeros(3, dtype=torch.float64), dynamic_map(True))


# ---------------------------------------------------------------------------------------------
# Reference (de)quantization and the optimizer: bit for bit as before
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MAPS))
@pytest.mark.parametrize("block_size", [1, 7, 64, 256])
def test_reference_quantize_dequantize_equal_previous(name, block_size):
    code = MAPS[name]()
    g = torch.Generator().manual_seed(block_size)
    for n in (0, 1, block_size - 1, block_size, 3 * block_size + 5, 5000):
        x = _hard_values(n, g)
        if "unsigned" in name:
            x = x.abs()
        q0, a0 = _old_quantize(x, code, block_size)
        q1, a1 = quantize_blockwise_reference(x, code, block_size)
        assert torch.equal(q0, q1) and torch.equal(a0, a1), n
        q, a = torch.full((n,), 77, dtype=torch.uint8), torch.full_like(a0, float("nan"))
        quantize_blockwise_reference(x, code, block_size, out=(q, a))
        assert torch.equal(q, q0) and torch.equal(a, a0)
        d0 = _old_dequantize(q0, a0, code, block_size)
        assert torch.equal(dequantize_blockwise_reference(q0, a0, code, block_size), d0)
        for dtype in (torch.bfloat16, torch.float16):
            assert torch.equal(dequantize_blockwise_reference(q0, a0, code, block_size, dtype=dtype),
                               _old_dequantize(q0, a0, code, block_size, dtype=dtype))
    # a 2-D input into 2-D buffers
    x = torch.randn(40, 30, generator=g)
    qbuf = torch.empty(40, 30, dtype=torch.uint8)
    abuf = torch.empty(n_blocks(1200, block_size))
    quantize_blockwise_reference(x, code, block_size, out=(qbuf, abuf))
    assert torch.equal(qbuf, _old_quantize(x, code, block_size)[0])


@pytest.mark.parametrize("projected", [True, False])
def test_optimizer_trajectory_equals_previous_path(monkeypatch, projected):
    """Six steps (weights, codes, absmax) of GaLoreAdamW8bit equal the previous implementation's."""
    def run(old: bool):
        g = torch.Generator().manual_seed(3)
        W = torch.nn.Parameter(0.1 * torch.randn(96, 160, generator=g))
        b = torch.nn.Parameter(0.1 * torch.randn(40, generator=g))
        group = {"params": [W], "rank": 48, "update_proj_gap": 4, "scale": 0.25} if projected else {"params": [W]}
        cls = _OldGaLoreAdamW8bit if old else GaLoreAdamW8bit
        opt = cls([group, {"params": [b]}], lr=1e-2, weight_decay=0.01, block_size=100)
        for _ in range(6):
            W.grad = torch.randn(W.shape, generator=g) * (1 + 3 * torch.rand(W.shape, generator=g))
            b.grad = torch.randn(b.shape, generator=g)
            opt.step()
        return W.detach().clone(), b.detach().clone(), {k: v.clone() for k, v in opt.state[W].items()
                                                         if isinstance(v, torch.Tensor)}

    new = run(False)
    with monkeypatch.context() as mp:
        mp.setattr(bw, "nearest_code_index", lambda s, code: torch.bucketize(s, code_midpoints(code), right=False))
        mp.setattr(bw._dequantize_op, "reference", _old_dequantize)
        old = run(True)
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    assert new[2].keys() == old[2].keys() and all(torch.equal(new[2][k], old[2][k]) for k in new[2])
    assert new[2]["exp_avg"].dtype == torch.uint8


# ---------------------------------------------------------------------------------------------
# The fused 8-bit Adam update
# ---------------------------------------------------------------------------------------------
def _fused_inputs(n: int, block_size: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cm, cv = dynamic_map(True), dynamic_map(False)
    qm, am = quantize_blockwise_reference(torch.randn(n, generator=g) * 1e-2, cm, block_size)
    qv, av = quantize_blockwise_reference(torch.rand(n, generator=g) ** 4 * 1e-4, cv, block_size)
    if n > 2 * block_size:  # one block of zero moments (absmax 0)
        qm[:block_size], am[0] = 127, 0.0
        qv[:block_size], av[0] = 0, 0.0
    grads = [(torch.randn(n, generator=g) * 1e-2 * (1 + 3 * torch.rand(n, generator=g))).to(dtype) for _ in range(3)]
    return (qm, am, qv, av, cm, cv), grads


def test_fused_reference_is_the_optimizer_step():
    """adam8bit_update_reference gives GaLoreAdamW8bit's codes, absmax and -step_size · direction, bit for bit."""
    W = torch.nn.Parameter(torch.zeros(50, 120))
    opt = GaLoreAdamW8bit([W], lr=1e-2, weight_decay=0.0, block_size=100)
    seen: list[torch.Tensor] = []
    direction = opt.adam_direction
    opt.adam_direction = lambda *a: seen.append(direction(*a).clone()) or seen[-1]
    g = torch.Generator().manual_seed(5)
    for step in range(1, 5):
        grad = torch.randn(W.shape, generator=g)
        state = opt.state[W]
        if step > 1:
            before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax")}
        W.grad = grad
        opt.step()
        if step == 1:
            continue
        group = opt.param_groups[0]
        c2 = math.sqrt(1 - 0.999**step)
        upd = adam8bit_update_reference(grad, before["exp_avg"], before["exp_avg_absmax"], before["exp_avg_sq"],
                                        before["exp_avg_sq_absmax"], opt.code(True, W.device), opt.code(False, W.device),
                                        100, betas=group["betas"], eps=group["eps"], c2=c2,
                                        step_size=opt.step_size(group, step))
        for k in before:
            assert torch.equal(before[k], state[k]), k
        assert torch.equal(seen[-1].mul(-opt.step_size(group, step)), upd)


@needs_triton
@pytest.mark.parametrize("n, block_size", [(1, 256), (255, 256), (1024, 256), (1000, 256), (777, 100), (4097, 64)])
def test_fused_kernel_matches_reference_interpreter(n, block_size):
    """Three steps under the interpreter against the reference; output poisoned with NaN first."""
    state, grads = _fused_inputs(n, block_size, seed=n)
    ref = [t.clone() for t in state[:4]]
    ker = [t.clone() for t in state[:4]]
    for step, grad in enumerate(grads, start=1):
        kw = dict(block_size=block_size, betas=(0.9, 0.999), eps=1e-8, c2=math.sqrt(1 - 0.999**step),
                  step_size=1e-3 / (1 - 0.9**step))
        u_ref = adam8bit_update_reference(grad, *ref, *state[4:], **kw)
        out = torch.full((n,), float("nan"))
        u_ker = adam8bit_update(grad, *ker, *state[4:], out=out, backend="interpret", **kw)
        assert u_ker.data_ptr() == out.data_ptr() and not torch.isnan(out).any()
        for i in range(4):  # codes and absmax: bit for bit (the moments are rounded as torch's)
            assert torch.equal(ker[i], ref[i]), (step, i)
        # the update: torch's CPU float32 sqrt is not correctly rounded (1 ulp off on ~17% of
        # values in torch 2.13's AVX-512 build), the kernel's sqrt_rn is: a few ulp apart
        torch.testing.assert_close(u_ker, u_ref, rtol=1e-6, atol=0)


@needs_triton
def test_fused_kernel_half_gradients_interpreter():
    n, block_size = 600, 128
    for dtype in (torch.bfloat16, torch.float16):
        state, grads = _fused_inputs(n, block_size, seed=9, dtype=dtype)
        ref, ker = [t.clone() for t in state[:4]], [t.clone() for t in state[:4]]
        u_ref = adam8bit_update_reference(grads[0], *ref, *state[4:], block_size=block_size)
        u_ker = adam8bit_update(grads[0], *ker, *state[4:], block_size=block_size, backend="interpret")
        assert all(torch.equal(x, y) for x, y in zip(ker, ref)), dtype
        torch.testing.assert_close(u_ker, u_ref, rtol=1e-6, atol=0)


def test_fused_auto_on_cpu_is_the_reference():
    state, grads = _fused_inputs(300, 128, seed=2)
    a, b = [t.clone() for t in state[:4]], [t.clone() for t in state[:4]]
    u1 = adam8bit_update(grads[0], *a, *state[4:], block_size=128)
    u0 = adam8bit_update_reference(grads[0], *b, *state[4:], block_size=128)
    assert torch.equal(u1, u0) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "change, exc, match",
    [
        ({"betas": (0.9,)}, ValueError, "betas must be a pair"),
        ({"betas": (1.0, 0.999)}, ValueError, r"betas must lie in \[0, 1\)"),
        ({"c2": 0.0}, ValueError, "c2 must be positive"),
        ({"eps": float("nan")}, ValueError, "eps must be a finite number"),
        ({"step_size": "1e-3"}, ValueError, "step_size must be a finite number"),
        ({"block_size": 0}, ValueError, "block_size must be a positive integer"),
        ({"out": torch.zeros(5)}, ValueError, "out"),
    ],
)
def test_fused_argument_errors(change, exc, match):
    state, grads = _fused_inputs(300, 128, seed=3)
    kw = dict(block_size=128)
    kw.update(change)
    with pytest.raises(exc, match=match):
        adam8bit_update(grads[0], *state, **kw)


def test_fused_state_shape_errors():
    state, grads = _fused_inputs(300, 128, seed=4)
    qm, am, qv, av, cm, cv = state
    with pytest.raises((ValueError, TypeError), match="q_v"):
        adam8bit_update(grads[0], qm, am, qv[:10], av, cm, cv, block_size=128)
    with pytest.raises((ValueError, TypeError), match="absmax_m"):
        adam8bit_update(grads[0], qm, am[:1], qv, av, cm, cv, block_size=128)


def test_bench_script_quick(tmp_path, monkeypatch):
    """bench/galore8bit_cpu.py --quick runs on CPU, writes its JSON, records before and after."""
    import importlib.util
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("on a GPU the quick run also times the kernel; run the script by hand")
    monkeypatch.setenv("MINI_BENCH_RESULTS", str(tmp_path))
    path = Path(__file__).resolve().parents[1] / "bench" / "galore8bit_cpu.py"
    spec = importlib.util.spec_from_file_location("bench_galore8bit_cpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        mod.main(["--quick", "--threads", str(threads)])
    finally:
        torch.set_num_threads(threads)
    record = json.loads((tmp_path / "galore8bit_cpu.json").read_text())
    assert record["smoke"] is True and record["gpu"] is None
    names = {r["optimizer"] for r in record["cpu_rows"]}
    assert {"torch AdamW", "mini GaLoreAdamW8bit", "mini GaLoreAdamW8bit (before: bucketize)"} <= names
    assert bw.nearest_code_index.__name__ == "nearest_code_index"  # the swap was undone
    if HAS_TRITON:  # the GPU section's code, on CPU under the interpreter
        rows = mod.run_gpu(True, device="cpu", sizes=[700], backend="interpret")
        assert len(rows) == 2 and all(r["codes_m_differing"] == 0 and r["codes_v_differing"] == 0
                                      and r["absmax_m_differing"] == 0 for r in rows)


@needs_triton
def test_fused_kernel_compiles_for_cuda_without_a_gpu(tmp_path, monkeypatch):
    """Lower the fused kernel to PTX for sm_90 (no GPU needed): IEEE division and square root,
    no local-memory spills. Skipped where this triton lacks the ahead-of-time API or ptxas.
    """
    import mini.quant.adam8bit as A

    ptrs = {"g_ptr": "*bf16", "qm_ptr": "*u8", "am_ptr": "*fp32", "qv_ptr": "*u8", "av_ptr": "*fp32",
            "code_m_ptr": "*fp32", "code_v_ptr": "*fp32", "mid_m_ptr": "*fp32", "mid_v_ptr": "*fp32",
            "out_ptr": "*fp32"}
    scalars = {"n": "i32", "block_size": "i32", "beta1": "fp32", "beta2": "fp32",
               "one_minus_beta1": "fp32", "one_minus_beta2": "fp32", "eps": "fp32", "c2": "fp32",
               "step_size": "fp32", "BLOCK": "constexpr"}
    tile, nw = bw._kernel_tile(256)
    ptx = compile_ptx(A._adam8bit_kernel, {**ptrs, **scalars}, {"BLOCK": tile}, nw, tmp_path, monkeypatch)
    assert ptx.count(".local") == 0
    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx
