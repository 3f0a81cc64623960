"""Tests of mini.quant.blockwise: the dynamic maps and block-wise 8-bit (de)quantization.

References: bitsandbytes (its CPU library and its PyTorch "default" implementation, both run on
CPU here) and the PyTorch reference; the Triton kernels run under the interpreter.
"""
from __future__ import annotations

import pytest
import torch

from mini.kernels import HAS_TRITON, check_against_reference
from mini.quant import (
    dequantize_blockwise,
    dequantize_blockwise_reference,
    dynamic_map,
    linear_map,
    n_blocks,
    quantize_blockwise,
    quantize_blockwise_reference,
)
from tests.triton_aot import compile_ptx

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
SIZES = [1, 255, 256, 1000, 4097]


def _heavy_tailed(n: int, g: torch.Generator, signed: bool = True) -> torch.Tensor:
    """Values over several orders of magnitude inside a block, like Adam moments."""
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g) ** 4
    return x if signed else x.abs()


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_bitsandbytes(signed):
    code = dynamic_map(signed=signed)
    assert code.shape == (256,) and code.dtype == torch.float32
    assert torch.equal(code, BF.create_dynamic_map(signed=signed))
    assert bool((code[1:] >= code[:-1]).all())
    assert float(code.max()) == 1.0
    assert (float(code.min()) < 0) == signed
    assert int((code == 0).sum()) == 1


def _bnb_default_quantize(x, code, block_size):
    """bitsandbytes' PyTorch implementation ("default" backend), bypassing its CPU library."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x, code, block_size)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("block_size", [64, 256, 4096])
def test_reference_matches_bitsandbytes_pytorch_exactly(signed, block_size):
    g = torch.Generator().manual_seed(1)
    code = dynamic_map(signed)
    for n in SIZES + [20000]:
        x = _heavy_tailed(n, g, signed)
        q, absmax = quantize_blockwise_reference(x, code, block_size)
        q_bnb, absmax_bnb = _bnb_default_quantize(x, code, block_size)
        assert torch.equal(absmax, absmax_bnb)
        assert torch.equal(q, q_bnb.reshape(q.shape))
        # and dequantization equals the bitsandbytes library's, bit for bit
        state = BF.QuantState(absmax=absmax, code=code, blocksize=block_size, dtype=torch.float32)
        assert torch.equal(dequantize_blockwise_reference(q, absmax, code, block_size), BF.dequantize_blockwise(q, state))


@pytest.mark.parametrize("signed", [True, False])
def test_reference_against_bitsandbytes_cpu_library_bounded(signed):
    """The CPU library's search is approximate: same absmax, never a better code, within a gap."""
    g = torch.Generator().manual_seed(2)
    code = dynamic_map(signed)
    max_gap = float((code[1:] - code[:-1]).max())  # 0.0141 signed, 0.0070 unsigned
    n = 50000
    x = _heavy_tailed(n, g, signed)
    q, absmax = quantize_blockwise_reference(x, code, 256)
    q_lib, state = BF.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(absmax, state.absmax)
    y = dequantize_blockwise_reference(q, absmax, code, 256)
    y_lib = BF.dequantize_blockwise(q_lib, state)
    scale = absmax.repeat_interleave(256)[:n]
    assert bool(((y - x).abs() <= (y_lib - x).abs() + 1e-12).all())  # ours is the nearest code
    assert bool(((y - y_lib).abs() <= max_gap * scale * (1 + 1e-5)).all())
    frac_same = float((q == q_lib).float().mean())
    assert frac_same > 0.8, frac_same
    # on plain Gaussian inputs the codes agree but for a few tenths of a percent
    xg = torch.randn(20000, generator=g)
    xg = xg if signed else xg.abs()
    same = quantize_blockwise_reference(xg, code, 256)[0] == BF.quantize_blockwise(xg, code=code, blocksize=256)[0]
    assert float(same.float().mean()) > 0.99


def test_roundtrip_error_and_partial_block():
    g = torch.Generator().manual_seed(3)
    code = dynamic_map(True)
    x = torch.randn(3, 333, generator=g)  # 999 values: 3 full blocks and one of 231
    q, absmax = quantize_blockwise(x, code)
    assert q.shape == x.shape and q.dtype == torch.uint8 and absmax.shape == (4,)
    torch.testing.assert_close(absmax[-1], x.flatten()[768:].abs().max())
    y = dequantize_blockwise(q, absmax, code, shape=x.shape)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float(((y - x).abs() / absmax.repeat_interleave(256)[:999].view(3, 333)).max()) <= 0.0071
    # the absmax itself is exact (code 1.0 or -0.993 times absmax) and a zero block stays zero
    z = torch.zeros(300)
    z[:10] = torch.randn(10, generator=g)
    qz, az = quantize_blockwise(z, code)
    assert float(az[1]) == 0.0
    assert torch.equal(dequantize_blockwise(qz, az, code)[256:], torch.zeros(44))
    # half precision in, half precision out
    xb = x.to(torch.bfloat16)
    qb, ab = quantize_blockwise(xb, code)
    assert torch.equal(qb, quantize_blockwise(xb.float(), code)[0])
    assert dequantize_blockwise(qb, ab, code, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_any_block_size_in_reference():
    g = torch.Generator().manual_seed(4)
    code = dynamic_map(False)
    x = torch.rand(1001, generator=g)
    for bs in (1, 7, 100, 1001, 5000):
        q, absmax = quantize_blockwise(x, code, block_size=bs)
        assert absmax.shape == (n_blocks(1001, bs),)
        y = dequantize_blockwise(q, absmax, code, block_size=bs)
        assert float((y - x).abs().max()) <= 0.0036 * float(x.max()) + 1e-7
    q1, a1 = quantize_blockwise(x, code, block_size=1)  # every value is its own absmax
    torch.testing.assert_close(dequantize_blockwise(q1, a1, code, block_size=1), x, rtol=0, atol=0)


def test_linear_map_wipes_out_small_second_moments():
    """v = E[g²] spans orders of magnitude in a block: a linear 8-bit map rounds the small ones to 0."""
    g = torch.Generator().manual_seed(5)
    grad = torch.randn(256 * 64, generator=g) * torch.exp(2.0 * torch.randn(256 * 64, generator=g))
    v = grad**2  # a second moment after one step (up to 1 - beta2)
    errs = {}
    for name, code in (("linear", linear_map(signed=False)), ("dynamic", dynamic_map(signed=False))):
        q, absmax = quantize_blockwise(v, code)
        v_hat = dequantize_blockwise(q, absmax, code)
        block_max = absmax.repeat_interleave(256)
        small = (v < 1e-3 * block_max) & (v > 1e-5 * block_max)  # a third of the values here
        rel = ((v_hat - v).abs() / v)[small]
        errs[name] = (float(rel.median()), float(rel.max()), float((v_hat[small] == 0).float().mean()))
    assert errs["linear"][2] == 1.0, errs  # every small v becomes exactly 0: relative error 100%
    assert errs["linear"][0] == 1.0, errs
    assert errs["dynamic"][2] == 0.0, errs  # none does under the dynamic map
    assert errs["dynamic"][0] < 0.1 and errs["dynamic"][1] < 0.3, errs  # median ~6%, worst ~28%


# ---------------------------------------------------------------------------------------------
# Triton kernels under the interpreter
# ---------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_kernel_matches_reference(signed):
    def make(n, g):
        return (_heavy_tailed(n, g, signed), dynamic_map(signed)), {"block_size": 256}

    # uint8 outputs cannot hold testing.SENTINEL_INT: unwritten codes are caught by the
    # two-poison test below; absmax is compared here
    check_against_reference(quantize_blockwise, quantize_blockwise_reference, make, SIZES, atol=0, rtol=0, poison=None)


@needs_triton
@pytest.mark.parametrize("block_size", [64, 100, 256])
def test_quantize_kernel_writes_every_output(block_size):
    """Run into buffers poisoned with 0 and with 255: unwritten codes would differ between runs."""
    g = torch.Generator().manual_seed(6)
    code = dynamic_map(True)
    for n in (1, block_size - 1, block_size, 1000, 4097):
        x = torch.randn(n, generator=g)
        q_ref, a_ref = quantize_blockwise_reference(x, code, block_size)
        for fill in (0, 255):
            q = torch.full((n,), fill, dtype=torch.uint8)
            a = torch.full_like(a_ref, float("nan"))
            got = quantize_blockwise(x, code, block_size, out=(q, a), backend="interpret")
            assert got[0].data_ptr() == q.data_ptr() and got[1].data_ptr() == a.data_ptr()
            assert torch.equal(q, q_ref), (n, fill)
            assert torch.equal(a, a_ref), (n, fill)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_kernel_matches_reference(dtype):
    # float32 and float16 agree exactly; the interpreter casts float32 -> bfloat16 by truncation,
    # torch (and compiled Triton) round to nearest even: one bfloat16 step apart (2^-7 relative)
    tol = 2.0**-7 if dtype == torch.bfloat16 else 0.0

    def make(n, g):
        code = dynamic_map(False)
        q, absmax = quantize_blockwise_reference(torch.rand(n, generator=g), code, 100)
        return (q, absmax, code), {"block_size": 100, "dtype": dtype}

    check_against_reference(dequantize_blockwise, dequantize_blockwise_reference, make, [1, 99, 100, 1000, 4097], atol=0, rtol=tol)


@needs_triton
def test_quantize_kernel_half_inputs():
    def make(n, g):
        return (torch.randn(n, generator=g).to(torch.bfloat16), dynamic_map(True)), {"block_size": 128}

    check_against_reference(quantize_blockwise, quantize_blockwise_reference, make, [1, 127, 1000], atol=0, rtol=0, poison=None)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [0, -256, 2.5, True])
def test_block_size_must_be_positive_int(block_size):
    code = dynamic_map()
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        quantize_blockwise(torch.randn(10), code, block_size=block_size)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        dequantize_blockwise(torch.zeros(10, dtype=torch.uint8), torch.ones(1), code, block_size=block_size)


@needs_triton
def test_kernel_block_size_limit():
    with pytest.raises(ValueError, match="block_size 32768"):
        quantize_blockwise(torch.randn(10), dynamic_map(), block_size=32768, backend="interpret")


def test_dtype_errors():
    code = dynamic_map()
    with pytest.raises(TypeError, match="x must have dtype"):
        quantize_blockwise(torch.arange(10), code)
    with pytest.raises(TypeError, match="code must have dtype"):
        quantize_blockwise(torch.randn(10), code.double())
    with pytest.raises(ValueError, match="code must have shape"):
        quantize_blockwise(torch.randn(10), code[:128])
    with pytest.raises(ValueError, match="code must be sorted"):
        quantize_blockwise(torch.randn(10), code.flip(0))
    q, absmax = quantize_blockwise(torch.randn(10), code)
    with pytest.raises(TypeError, match="q must have dtype"):
        dequantize_blockwise(q.int(), absmax, code)
    with pytest.raises(ValueError, match="absmax must have shape"):
        dequantize_blockwise(q, torch.ones(2), code)
    with pytest.raises(TypeError, match="dtype must be one of"):
        dequantize_blockwise(q, absmax, code, dtype=torch.int32)
    with pytest.raises(ValueError, match="shape"):
        dequantize_blockwise(q, absmax, code, shape=(3, 4))
    with pytest.raises(TypeError, match="signed must be a bool"):
        dynamic_map("yes")


@needs_triton
def test_triton_backend_refuses_cpu_and_interpreter_needs_contiguous():
    code = dynamic_map()
    with pytest.raises(ValueError, match="CUDA-only"):
        quantize_blockwise(torch.randn(10), code, backend="triton")
    with pytest.raises(ValueError, match="x must be contiguous"):
        quantize_blockwise(torch.randn(10, 4).t(), code, backend="interpret")


@needs_triton
def test_kernels_compile_for_cuda_without_a_gpu(tmp_path, monkeypatch):
    """The compiled path type-checks: lower both kernels to PTX/cubin for sm_90 (no GPU needed),
    after an interpreted run in the same process. Best effort: skipped where this triton lacks
    the ahead-of-time API used here (< 3.3) or a CUDA toolchain.
    """
    import mini.quant.blockwise as K

    quantize_blockwise(torch.randn(300), dynamic_map(), backend="interpret")
    sigs = {
        K._quantize_blockwise_kernel: {"x_ptr": "*fp32", "mid_ptr": "*fp32", "q_ptr": "*u8", "absmax_ptr": "*fp32"},
        K._dequantize_blockwise_kernel: {"q_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": "*bf16"},
    }
    tile, nw = K._kernel_tile(256)
    for kern, ptrs in sigs.items():
        sig = {**ptrs, "n": "i32", "block_size": "i32", "BLOCK": "constexpr"}
        ptx = compile_ptx(kern, sig, {"BLOCK": tile}, nw, tmp_path, monkeypatch)
        assert ptx.count(".local") == 0
        if "quantize_blockwise_kernel" in kern.__name__ and "dequant" not in kern.__name__:
            assert "div.rn.f32" in ptx  # IEEE division, as the reference


@needs_triton
def test_bench_script_quick_smoke(tmp_path, monkeypatch):
    """bench/quant8.py --quick runs (CPU smoke: reference and interpreter) and writes its JSON."""
    import importlib.util
    import json
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("on a GPU the quick run times real sizes; run the script by hand")
    monkeypatch.setenv("MINI_BENCH_RESULTS", str(tmp_path))
    path = Path(__file__).resolve().parents[1] / "bench" / "quant8.py"
    spec = importlib.util.spec_from_file_location("bench_quant8", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--quick"]) == 0
    record = json.loads((tmp_path / "quant8.json").read_text())
    assert record["smoke"] is True and record["gpu"] is None
    assert all(row["interpret_codes_differing"] == 0 for row in record["rows"])
    assert mod.work_bytes(1024, 256) == {"quantize_bytes": 5 * 1024 + 16.0, "dequantize_bytes": 5 * 1024 + 16.0}
