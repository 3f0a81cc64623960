"""The fast Walsh-Hadamard transform (mini.spinquant.fwht): reference against the dense matrix in
float64, the Triton kernel under the interpreter against the reference (rows not a multiple of
the block, poisoned outputs), errors, and a compile for CUDA (sm_80)."""
from __future__ import annotations

import math

import pytest
import torch

from mini.kernels.dispatch import HAS_TRITON
from mini.spinquant import fwht as F
from mini.spinquant.fwht import MAX_KERNEL_TILE, fwht, fwht_bytes, fwht_reference
from mini.spinquant.hadamard import hadamard, hadamard_signs
from tests.triton_aot import compile_ptx

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the Triton interpreter needs triton")

POWERS = [2**m for m in range(11)]  # 1 ... 1024
K_SIZES = [12, 40, 352, 576]  # K·2^m: K = 12, 20·2, 44·8, 36·16


def _x(shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# --------------------------------------------------------------------------- reference
@pytest.mark.parametrize("n", POWERS + [2048, 8192] + K_SIZES + [896, 1536, 4864])
def test_reference_is_the_dense_hadamard_product_in_float64(n):
    x = _x((3, n))
    S = hadamard_signs(n)  # (n, n) int8; in row chunks so 8192 needs no 512 MB float64 matrix
    want = sum(x[:, i:i + 1024] @ S[i:i + 1024].double() for i in range(0, n, 1024)) / math.sqrt(n)
    assert float((fwht_reference(x) - want).abs().max()) < 1e-12


def test_reference_scale_leading_dims_and_involution():
    x = _x((2, 3, 64))
    y = fwht_reference(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    assert float((fwht_reference(y) - x).abs().max()) < 1e-13  # H/√n is symmetric and orthogonal
    unscaled = fwht_reference(x, scale=1.0)
    assert float((unscaled - 8.0 * y).abs().max()) < 1e-12  # √64 = 8
    z = _x((5, 352))  # K = 44 (Paley I, skew): not an involution, but orthogonal: (z H) Hᵀ = z
    H = hadamard(352, torch.float64)
    assert not torch.allclose(H, H.T)
    assert float((fwht_reference(z) @ H.T - z).abs().max()) < 1e-12


def test_reference_half_precision_runs_in_float32():
    x = _x((4, 256), torch.float32)
    for dtype in (torch.float16, torch.bfloat16):
        got = fwht_reference(x.to(dtype))
        assert got.dtype == dtype
        want = fwht_reference(x.to(dtype).float()).to(dtype)  # float32 arithmetic, one rounding
        assert torch.equal(got, want)


def test_reference_out_buffer():
    x = _x((3, 32))
    out = torch.full_like(x, float("nan"))
    assert fwht_reference(x, out=out) is out
    assert torch.equal(out, fwht_reference(x))


# --------------------------------------------------------------------------- errors
def test_unsupported_last_dimension_names_n_and_nearest_sizes():
    with pytest.raises(ValueError, match=r"order n=6\b.*4 below and 8 above"):
        fwht(torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"order n=156\b.*152 below and 160 above"):
        fwht(torch.zeros(2, 156), backend="reference")


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        fwht([1.0, 2.0])
    with pytest.raises(TypeError, match=r"x must have dtype .*got torch.int64"):
        fwht(torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"at least one dimension"):
        fwht(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"last dimension must be a positive Hadamard order"):
        fwht(torch.zeros(3, 0))
    with pytest.raises(TypeError, match=r"scale must be a finite float or None \(1/√n\), got 'a'"):
        fwht(torch.zeros(2, 8), scale="a")
    with pytest.raises(TypeError, match=r"scale must be a finite float or None \(1/√n\), got inf"):
        fwht(torch.zeros(2, 8), scale=math.inf)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 8\), got \(2, 4\)"):
        fwht(torch.zeros(2, 8), out=torch.zeros(2, 4))
    with pytest.raises(TypeError, match=r"out must have dtype torch.float32, got torch.float64"):
        fwht(torch.zeros(2, 8), out=torch.zeros(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"unknown backend 'gpu'"):
        fwht(torch.zeros(2, 8), backend="gpu")


def test_fwht_bytes_counts_one_read_and_one_write():
    assert fwht_bytes((4, 1024), torch.float32) == 2 * 4 * 1024 * 4
    assert fwht_bytes((3, 5, 352), torch.bfloat16) == 2 * 3 * 5 * 352 * 2
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype, got 'float32'"):
        fwht_bytes((4, 8), "float32")
    with pytest.raises(ValueError, match=r"shape must hold non-negative integers, got \(4, -1\)"):
        fwht_bytes((4, -1), torch.float32)


# --------------------------------------------------------------------------- kernel (interpreter)
@needs_triton
@pytest.mark.parametrize("n", POWERS + K_SIZES)
def test_kernel_matches_reference_float32(n):
    """Row counts that are not a multiple of the rows per program; a NaN-poisoned out buffer."""
    rows_per = F._tile(n)[3]
    rows = rows_per + 3 if rows_per > 1 else 5
    x = _x((rows, n), torch.float32, seed=n)
    out = torch.full_like(x, float("nan"))
    got = fwht(x, out=out, backend="interpret")
    assert got is out
    want = fwht_reference(x.double())  # float64 truth
    tol = 1e-6 * math.log2(2 * n) * float(x.abs().max())  # float32 sums of n log n terms / √n
    assert not bool(torch.isnan(got).any())
    assert float((got.double() - want).abs().max()) < tol


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [128, 40])
def test_kernel_half_precision_rounds_the_float32_result(dtype, n):
    x = _x((7, 2, n), torch.float32, seed=1).to(dtype)  # leading dims flatten to 14 rows
    out = torch.full_like(x, float("nan"))
    got = fwht(x, out=out, backend="interpret")
    want = fwht_reference(x)  # float32 arithmetic, rounded once to dtype
    eps = torch.finfo(dtype).eps
    assert got.dtype == dtype and not bool(torch.isnan(got).any())
    assert float((got.float() - want.float()).abs().max()) <= eps * float(want.abs().max())


@needs_triton
def test_kernel_involution_and_scale():
    x = _x((9, 256), torch.float32, seed=2)
    y = fwht(x, backend="interpret")
    assert float((fwht(y, backend="interpret") - x).abs().max()) < 1e-5
    assert float((fwht(x, scale=1.0, backend="interpret") - 16.0 * y).abs().max()) < 1e-4


@needs_triton
def test_kernel_no_rows_and_fp64_and_layout_errors():
    x = torch.zeros(0, 64)
    assert fwht(x, backend="interpret").shape == (0, 64)
    with pytest.raises(TypeError, match=r"x must have dtype torch.float32 or torch.float16 or torch.bfloat16, "
                                        r"got torch.float64"):
        fwht(torch.zeros(2, 8, dtype=torch.float64), backend="interpret")
    with pytest.raises(ValueError, match=r"x must be contiguous"):
        fwht(torch.zeros(8, 4).T, backend="interpret")
    assert torch.equal(fwht(torch.eye(8).T, backend="reference"), hadamard(8))  # the reference takes views


@needs_triton
def test_kernel_rows_too_long_for_one_program():
    n = 6144  # 12·512: KPAD 16 · 512 = 8192 fits; 12·2048 = 24576 → 16·2048 = 32768 does not
    assert F._tile(n)[2] * 512 <= MAX_KERNEL_TILE
    with pytest.raises(ValueError, match=r"n=24576 .* more than the Triton kernel holds .*backend='reference'"):
        fwht(torch.zeros(1, 24576), backend="interpret")


@needs_triton
def test_kernel_rejects_cpu_tensors_for_compiled_triton():
    with pytest.raises(ValueError, match=r"backend 'triton' runs compiled kernels on CUDA tensors"):
        fwht(torch.zeros(2, 8), backend="triton")


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_kernel_on_gpu_matches_reference():  # pragma: no cover - runs where a GPU is lent
    for n in (64, 352, 8192, 4864):
        x = torch.randn(37, n, device="cuda")
        want = fwht_reference(x.double())
        got = fwht(x, backend="triton")
        assert float((got.double() - want).abs().max()) < 1e-5 * math.log2(2 * n) * float(x.abs().max())


# --------------------------------------------------------------------------- compile for CUDA
@needs_triton
@pytest.mark.parametrize("dtype, P, kpad, rows, warps", [
    ("fp32", 8192, 1, 1, 8),  # the largest power of two
    ("bf16", 8, 64, 8, 4),  # 352 = 44·8
    ("fp16", 1, 1, 4096, 8),  # n = 1: no butterfly stage
])
def test_kernel_compiles_for_sm80(dtype, P, kpad, rows, warps, tmp_path, monkeypatch):
    sig = {"x_ptr": f"*{dtype}", "hk_ptr": "*fp32", "out_ptr": f"*{dtype}", "rows": "i32", "K": "i32",
           "scale": "fp32", "P": "constexpr", "LOG_P": "constexpr", "KPAD": "constexpr", "ROWS": "constexpr"}
    consts = {"P": P, "LOG_P": P.bit_length() - 1, "KPAD": kpad, "ROWS": rows}
    ptx = compile_ptx(F._fwht_kernel, sig, consts, warps, tmp_path, monkeypatch, arch=80)
    assert ".target sm_80" in ptx and "st.global" in ptx
