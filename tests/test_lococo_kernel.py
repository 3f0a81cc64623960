"""The fused mixing (W·K, W·V) of mini.lococo.kernel: the Triton kernel under the interpreter against
the reference (sizes not multiples of the blocks, poisoned outputs, fp32/fp16/bf16), errors, and
a compile for CUDA (sm_80)."""
from __future__ import annotations

import pytest
import torch

from mini.kernels.dispatch import HAS_TRITON
from mini.kernels.testing import check_against_reference
from mini.lococo import kernel as Kn
from mini.lococo.kernel import mix_kv, mix_kv_bytes, mix_kv_reference
from tests.triton_aot import compile_ptx

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the Triton interpreter needs triton")

# (N, m, s′, d): one element; odd everything; a block of m plus one; several d blocks; s′ over 2 tiles
SIZES = [(1, 1, 1, 1), (3, 5, 37, 12), (2, 17, 65, 8), (1, 4, 30, 130), (2, 16, 129, 64)]


def _inputs(size, gen, dtype=torch.float32):
    n, m, s, d = size
    w = torch.rand(n, m, s, generator=gen)
    w = (w / w.sum(-1, keepdim=True)).to(dtype)  # convex rows, as LoCoCo's W
    k = torch.randn(n, s, d, generator=gen).to(dtype)
    v = torch.randn(n, s, d, generator=gen).to(dtype)
    return (w, k, v)


# --------------------------------------------------------------------------- reference
def test_reference_is_two_matmuls_in_float64_and_differentiable():
    w, k, v = _inputs((2, 3, 7, 5), torch.Generator().manual_seed(0), torch.float64)
    mk, mv = mix_kv_reference(w, k, v)
    assert torch.equal(mk, w @ k) and torch.equal(mv, w @ v)
    w32 = w.float().requires_grad_(True)
    a, b = mix_kv_reference(w32, k.float(), v.float())
    (a.sum() + b.sum()).backward()
    torch.testing.assert_close(w32.grad, (k.sum(-1) + v.sum(-1)).float()[:, None, :].expand(2, 3, 7))
    out = (torch.full((2, 3, 5), float("nan"), dtype=torch.float64), torch.empty(2, 3, 5, dtype=torch.float64))
    got = mix_kv_reference(w, k, v, out=out)
    assert got[0] is out[0] and torch.equal(out[1], w @ v)


def test_reference_half_precision_runs_in_float32():
    w, k, v = _inputs((2, 4, 9, 6), torch.Generator().manual_seed(1))
    for dtype in (torch.float16, torch.bfloat16):
        mk, _ = mix_kv_reference(w.to(dtype), k.to(dtype), v.to(dtype))
        assert mk.dtype == dtype
        assert torch.equal(mk, (w.to(dtype).float() @ k.to(dtype).float()).to(dtype))


# --------------------------------------------------------------------------- kernel (interpreter)
@needs_triton
def test_kernel_matches_reference_float32_poisoned():
    report = check_against_reference(mix_kv, mix_kv_reference, lambda size, g: _inputs(size, g),
                                      SIZES, atol=1e-5, rtol=1e-5)
    assert len(report) == len(SIZES)


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_kernel_half_precision(dtype, tol):
    check_against_reference(mix_kv, mix_kv_reference, lambda size, g: _inputs(size, g, dtype),
                            SIZES[1:3], atol=tol, rtol=tol)


@needs_triton
def test_kernel_returns_pair_and_empty_sizes():
    w, k, v = _inputs((2, 3, 11, 4), torch.Generator().manual_seed(2))
    a, b = mix_kv(w, k, v, backend="interpret")
    torch.testing.assert_close(a, w @ k) and torch.testing.assert_close(b, w @ v)
    z = mix_kv(torch.zeros(2, 3, 0), torch.zeros(2, 0, 4), torch.zeros(2, 0, 4), backend="interpret")
    assert torch.equal(z[0], torch.zeros(2, 3, 4))
    assert mix_kv(torch.zeros(0, 3, 5), torch.zeros(0, 5, 4), torch.zeros(0, 5, 4),
                  backend="interpret")[1].shape == (0, 3, 4)


@needs_triton
def test_kernel_errors_dtype_layout_device():
    w, k, v = _inputs((2, 3, 11, 4), torch.Generator().manual_seed(3))
    with pytest.raises(TypeError, match=r"weights must have dtype torch.float32 or torch.float16 or "
                                        r"torch.bfloat16, got torch.float64"):
        mix_kv(w.double(), k.double(), v.double(), backend="interpret")
    with pytest.raises(ValueError, match=r"keys must be contiguous"):
        mix_kv(w, k.transpose(1, 2).contiguous().transpose(1, 2), v, backend="interpret")
    with pytest.raises(ValueError, match=r"backend 'triton' runs compiled kernels on CUDA tensors"):
        mix_kv(w, k, v, backend="triton")
    mk, _ = mix_kv(w.double(), k.double(), v.double(), backend="reference")  # the reference takes fp64
    assert mk.dtype == torch.float64


def test_bad_shapes_dtypes_devices_are_named():
    w, k, v = _inputs((2, 3, 11, 4), torch.Generator().manual_seed(4))
    with pytest.raises(TypeError, match=r"weights must be a torch.Tensor, got list"):
        mix_kv([1.0], k, v)
    with pytest.raises(ValueError, match=r"weights must be 3-dimensional, got shape \(3, 11\)"):
        mix_kv(w[0], k, v)
    with pytest.raises(ValueError, match=r"keys must have shape \(2, 11, d\) to match weights \(2, 3, 11\)"):
        mix_kv(w, k[:, :10], v)
    with pytest.raises(ValueError, match=r"values must have shape \(2, 11, 4\), got \(2, 11, 5\)"):
        mix_kv(w, k, torch.zeros(2, 11, 5))
    with pytest.raises(TypeError, match=r"keys must have dtype torch.float32, got torch.float16"):
        mix_kv(w, k.half(), v)
    with pytest.raises(TypeError, match=r"weights must have dtype .*got torch.int64"):
        mix_kv(w.long(), k, v)
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got weights on cpu, keys on meta"):
        mix_kv(w, k.to("meta"), v)
    with pytest.raises(TypeError, match=r"out must be a pair of tensors"):
        mix_kv(w, k, v, out=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"out\[1\] must have shape \(2, 3, 4\), got \(2, 3, 5\)"):
        mix_kv(w, k, v, out=(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)))
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'"):
        mix_kv(w, k, v, backend="gpu")


def test_mix_kv_bytes_fused_reads_w_once():
    fused = mix_kv_bytes(8, 16, 100, 64, torch.float16)
    assert fused == 2 * 8 * (16 * 100 + 2 * 100 * 64 + 2 * 16 * 64)
    assert mix_kv_bytes(8, 16, 100, 64, torch.float16, fused=False) - fused == 2 * 8 * 16 * 100
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype, got 'fp16'"):
        mix_kv_bytes(1, 1, 1, 1, "fp16")
    with pytest.raises(ValueError, match=r"s must be a non-negative integer, got -1"):
        mix_kv_bytes(1, 1, -1, 1, torch.float32)


def test_blocks_fit_the_register_tile():
    for m, s, d in [(1, 1, 1), (256, 4000, 128), (5, 37, 12), (16, 3, 256)]:
        bm, bs, bd, _ = Kn._blocks(m, s, d)
        assert bm * bs * bd <= Kn.MAX_TILE and all(b & (b - 1) == 0 for b in (bm, bs, bd))


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_kernel_on_gpu_matches_reference():  # pragma: no cover - runs where a GPU is lent
    w, k, v = (t.cuda() for t in _inputs((64, 256, 1500, 128), torch.Generator().manual_seed(5)))
    a, b = mix_kv(w, k, v, backend="triton")
    ra, rb = mix_kv_reference(w.double(), k.double(), v.double())
    assert float((a.double() - ra).abs().max()) < 1e-4 and float((b.double() - rb).abs().max()) < 1e-4


# --------------------------------------------------------------------------- compile for CUDA
@needs_triton
@pytest.mark.parametrize("dtype, bm, bs, bd, warps", [("fp32", 16, 4, 64, 4), ("bf16", 4, 8, 8, 1)])
def test_kernel_compiles_for_sm80(dtype, bm, bs, bd, warps, tmp_path, monkeypatch):
    sig = {"w_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "ok_ptr": f"*{dtype}",
           "ov_ptr": f"*{dtype}", "m": "i32", "s": "i32", "d": "i32",
           "BLOCK_M": "constexpr", "BLOCK_S": "constexpr", "BLOCK_D": "constexpr"}
    ptx = compile_ptx(Kn._mix_kv_kernel, sig, {"BLOCK_M": bm, "BLOCK_S": bs, "BLOCK_D": bd}, warps,
                      tmp_path, monkeypatch, arch=80)
    assert ".target sm_80" in ptx and "st.global" in ptx
