"""Tests of mini.spinquant.quant_kernel: the fused quantise-dequantise kernel against its reference.

The kernel runs under the Triton interpreter on CPU tensors, into NaN-poisoned output buffers, at
row counts and lengths that are not multiples of its tiles; the reference is the math of
``quantize_activation`` (tested by hand in tests/test_spinquant_quantizers.py).
"""
from __future__ import annotations

import pytest
import torch

from mini.kernels import HAS_TRITON, check_against_reference
from mini.spinquant.quant_kernel import (
    fused_quantize,
    fused_quantize_reference,
    quant_bytes,
)
from mini.spinquant.quantizers import quantize_activation
from tests.triton_aot import compile_ptx

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the Triton interpreter needs triton")

# (rows, row length): 1 row, odd lengths, lengths above and below a power of two, many short rows
SHAPES = [(1, 1), (5, 37), (3, 7, 100), (130, 24), (2, 1000), (4, 5000)]


def test_reference_is_quantize_activation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g)
    for bits, clip, gs in ((4, 1.0, None), (3, 0.9, 8), (8, 0.5, 20)):
        assert torch.equal(fused_quantize_reference(x, bits, clip, gs), quantize_activation(x, bits, clip, gs))
    assert torch.equal(fused_quantize(x, 4, backend="reference"), quantize_activation(x, 4))  # CPU auto: reference


@needs_triton
@pytest.mark.parametrize("bits", [2, 4, 8, 15])
def test_kernel_matches_reference_float32_exactly(bits):
    def make(shape, g):
        x = torch.randn(*shape, generator=g) * 3
        return (x, bits), {"clip_ratio": 0.9}

    check_against_reference(fused_quantize, fused_quantize_reference, make, SHAPES, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("groupsize", [8, 12])
def test_kernel_groups_one_sign_rows_and_zero_rows(groupsize):
    def make(shape, g):
        x = torch.randn(*shape, generator=g)
        x[0] = x[0].abs()  # an all-positive row
        x[-1] = -x[-1].abs()  # an all-negative row
        x[1, :groupsize] = 0.0  # a zero group
        x[1, groupsize] = 0.5 * groupsize  # ties of round-half-even land inside this group
        return (x, 4), {"groupsize": groupsize}

    check_against_reference(fused_quantize, fused_quantize_reference, make, [(3, 48), (17, 96)], atol=0, rtol=0)


@needs_triton
def test_kernel_rounds_half_to_even():
    x = torch.tensor([[0.5, 1.5, 2.5, 3.0], [-0.5, -1.5, -2.5, -3.0]])  # s = 1: exact ties
    got = fused_quantize(x, 2, backend="interpret")
    assert torch.equal(got, torch.tensor([[0.0, 2.0, 2.0, 3.0], [0.0, -2.0, -2.0, -3.0]]))
    assert torch.equal(got, fused_quantize_reference(x, 2))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_precision(dtype):
    # float16 matches exactly; the interpreter casts float32 -> bfloat16 by truncation where torch
    # rounds to nearest even: one bfloat16 step (2^-7 relative) at most
    tol = 2.0**-7 if dtype == torch.bfloat16 else 0.0

    def make(shape, g):
        return (torch.randn(*shape, generator=g).to(dtype), 4), {}

    check_against_reference(fused_quantize, fused_quantize_reference, make, SHAPES[:4], atol=0, rtol=tol)


@needs_triton
def test_sixteen_bits_copies():
    x = torch.randn(3, 9)
    out = torch.full_like(x, float("nan"))
    assert torch.equal(fused_quantize(x, 16, out=out, backend="interpret"), x)


def test_kernel_bad_inputs():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="backend 'triton' runs compiled kernels on CUDA tensors"):
        fused_quantize(x, 4, backend="triton")
    if HAS_TRITON:
        with pytest.raises(TypeError, match=r"x must have dtype torch.float32 or torch.float16 or torch.bfloat16, got torch.float64"):
            fused_quantize(x.double(), 4, backend="interpret")
        with pytest.raises(ValueError, match="x must be contiguous"):
            fused_quantize(x.t(), 4, backend="interpret")
        with pytest.raises(ValueError, match="all tensors must be on one device, got x on cpu, out on meta"):
            fused_quantize(x, 4, out=torch.empty(4, 8, device="meta"), backend="interpret")
        with pytest.raises(TypeError, match="out must have dtype torch.float32, got torch.float16"):
            fused_quantize(x, 4, out=torch.empty(4, 8, dtype=torch.float16), backend="interpret")
        with pytest.raises(ValueError, match=r"the kernel holds rows \(groups\) of at most 16384 values, got 20000"):
            fused_quantize(torch.randn(1, 20000), 4, backend="interpret")
    with pytest.raises(ValueError, match=r"bits must be an integer in 2\.\.16.*got 1"):
        fused_quantize(x, 1, backend="reference")
    with pytest.raises(ValueError, match=r"groupsize=3 must divide the last dimension 8"):
        fused_quantize(x, 4, groupsize=3, backend="reference")
    with pytest.raises(ValueError, match=r"clip_ratio must be a number in \(0, 1\], got 2"):
        fused_quantize(x, 4, clip_ratio=2, backend="reference")


def test_quant_bytes():
    assert quant_bytes((4, 4096), torch.bfloat16) == 2 * 4 * 4096 * 2
    assert quant_bytes((3, 5, 7), torch.float32) == 2 * 105 * 4
    assert quant_bytes((), torch.float16) == 4
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype, got torch.int8"):
        quant_bytes((4,), torch.int8)
    with pytest.raises(ValueError, match=r"shape must hold non-negative integers, got \(4, -1\)"):
        quant_bytes((4, -1), torch.float32)


@needs_triton
def test_kernel_compiles_for_cuda(tmp_path, monkeypatch):
    import mini.spinquant.quant_kernel as K

    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "rows": "i32", "n": "i32", "maxq": "fp32", "clip": "fp32",
           "BLOCK_R": "constexpr", "BLOCK_N": "constexpr"}
    ptx = compile_ptx(K._asym_qdq_kernel, sig, {"BLOCK_R": 4, "BLOCK_N": 1024}, 4, tmp_path, monkeypatch)
    assert "div.rn.f32" in ptx  # IEEE divisions, as the reference
    assert "div.full.f32" not in ptx and "div.approx" not in ptx
    assert "fma." not in ptx  # no contraction of c·max − c·min or the rounding: float32 stays bit-exact
