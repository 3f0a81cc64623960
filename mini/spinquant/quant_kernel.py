"""Fused per-token asymmetric quantise-dequantise: one Triton kernel, one pass over the data.

Part III, SpinQuant chapter. The activation quantiser of SpinQuant (Liu et al., arXiv 2405.16406;
official ``ActQuantizer`` in facebookresearch/SpinQuant ``utils/quant_utils.py``) runs on every
linear's input at every step: in PyTorch it is a chain of about ten elementwise and reduction ops,
each reading and writing the whole activation. Here one program loads ``BLOCK_R`` rows (tokens, or
groups of a token) of up to ``BLOCK_N`` values into registers, finds each row's min and max,
computes the scale and zero point, and writes ``x̂``: the data cross memory once each way
(:func:`quant_bytes`). The math is :func:`mini.spinquant.quantizers.asym_quantize_reference`, the
reference of this op::

    m⁺ = c · max(max_j x_j, 0)      m⁻ = c · min(min_j x_j, 0)
    (a zero row: m⁻ = −1, m⁺ = 1)
    s  = (m⁺ − m⁻) / (2^b − 1)      z = round(−m⁻ / s)
    x̂  = s · (clamp(round(x / s) + z, 0, 2^b − 1) − z)

in float32 whatever the input dtype (float32, float16, bfloat16), the result cast back. Exactness:
the divisions are IEEE round-to-nearest (``tl.math.div_rn``; Triton's ``/`` compiles to an
approximate division on NVIDIA GPUs) and ``round`` is round-half-to-even by the float32 "magic
number" ``(y + 1.5·2^23) − 1.5·2^23``, exact for ``|y| < 2^22`` (``y`` is clamped to ``±2^22``
first, which changes nothing after the final clamp to ``[0, 2^b − 1]``); so float32 results equal
the reference bit for bit. Masked lanes load 0, which cannot move a min or max whose range already
contains 0.

Not done here: fusing the normalised Hadamard transform into the same pass (the online R3/R4 before
the quantiser); :mod:`mini.spinquant.fwht` has the transform as its own kernel.

Explained in :doc:`/book/spinquant/theory`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mini.kernels.dispatch import HAS_TRITON, check_same_device, check_tensor, kernel_op
from mini.spinquant.quantizers import (
    _check_bits,
    _check_clip,
    _check_groupsize,
    asym_quantize_reference,
)

__all__ = ["KERNEL_DTYPES", "MAX_ROW", "fused_quantize", "fused_quantize_reference", "quant_bytes"]

KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
MAX_ROW = 16384  # longest row (group) one program holds in registers
_TILE = 4096  # values per program: BLOCK_R rows of BLOCK_N


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _asym_qdq_kernel(
        x_ptr,  # (rows, n) float32 / float16 / bfloat16 input, contiguous
        out_ptr,  # (rows, n) out: x̂ in the input's dtype
        rows,  # number of rows (tokens or groups)
        n,  # row length (group size)
        maxq,  # float32 2^b - 1
        clip,  # float32 clip ratio in (0, 1]
        BLOCK_R: tl.constexpr,  # rows per program
        BLOCK_N: tl.constexpr,  # power of two >= n
    ):
        pid = tl.program_id(0)
        r = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
        c = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        mask = (r[:, None] < rows) & (c[None, :] < n)  # (BLOCK_R, BLOCK_N)
        offs = r[:, None] * n + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_N)
        hi = tl.maximum(tl.max(x, axis=1), 0.0) * clip  # (BLOCK_R,) range contains 0
        lo = tl.minimum(tl.min(x, axis=1), 0.0) * clip
        empty = (hi == 0.0) & (lo == 0.0)  # a zero row: range [-1, 1]
        hi = tl.where(empty, 1.0, hi)
        lo = tl.where(empty, -1.0, lo)
        s = tl.math.div_rn(hi - lo, tl.zeros_like(hi) + maxq)  # (BLOCK_R,) scale
        magic = 12582912.0  # 1.5 * 2^23: (y + magic) - magic rounds y half to even
        z = tl.math.div_rn(-lo, s)
        z = (z + magic) - magic  # zero point, an integer in [0, maxq]
        y = tl.math.div_rn(x, tl.zeros_like(x) + s[:, None])
        y = tl.minimum(tl.maximum(y, -4194304.0), 4194304.0)  # |y| <= 2^22: the rounding stays exact
        q = (y + magic) - magic + z[:, None]
        q = tl.minimum(tl.maximum(q, 0.0), maxq)
        val = s[:, None] * (q - z[:, None])
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Reference, checks, launcher
# ---------------------------------------------------------------------------------------------
def _check_args(x: torch.Tensor, bits: int, clip_ratio: float, groupsize: int | None,
                out: torch.Tensor | None, kernel: bool) -> int:
    check_tensor("x", x, dtypes=KERNEL_DTYPES if kernel else None, contiguous=kernel)
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the token's features), got a scalar")
    _check_bits("bits", bits)
    _check_clip("clip_ratio", clip_ratio)
    g = _check_groupsize("groupsize", groupsize, x.shape[-1]) or x.shape[-1]
    if kernel and g > MAX_ROW:
        raise ValueError(f"the kernel holds rows (groups) of at most {MAX_ROW} values, got {g}; pass groupsize")
    if out is not None:
        check_tensor("out", out, dtypes=(x.dtype,), shape=tuple(x.shape), contiguous=True)
        check_same_device(x=x, out=out)
    return g


def fused_quantize_reference(x: torch.Tensor, bits: int, clip_ratio: float = 1.0,
                             groupsize: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of ``fused_quantize`` (the math of ``quantize_activation``, no autograd).

    Explained in :doc:`/book/spinquant/theory`.
    """
    _check_args(x, bits, clip_ratio, groupsize, out, kernel=False)
    y = asym_quantize_reference(x, bits, clip_ratio, groupsize)
    if out is None:
        return y
    out.copy_(y)
    return out


@kernel_op(reference=fused_quantize_reference, name="fused_quantize")
def fused_quantize(jit, x: torch.Tensor, bits: int, clip_ratio: float = 1.0,
                   groupsize: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token (or per-group) asymmetric quantise-dequantise of ``x`` (..., d) in one pass.

    ``bits`` in 2..16 (16 copies ``x``), ``clip_ratio`` in (0, 1], ``groupsize`` dividing ``d``
    (None: one group per row). ``backend="auto" | "triton" | "interpret" | "reference"`` as every
    :class:`~mini.kernels.dispatch.KernelOp`. No gradient: use
    :func:`~mini.spinquant.quantizers.quantize_activation` inside training.

    Explained in :doc:`/book/spinquant/theory`.
    """
    g = _check_args(x, bits, clip_ratio, groupsize, out, kernel=True)
    if out is None:
        out = torch.empty_like(x)
    if bits == 16 or x.numel() == 0:
        out.copy_(x)
        return out
    rows = x.numel() // g
    block_n = _next_pow2(g)
    block_r = max(1, min(_TILE // block_n, _next_pow2(rows)))
    num_warps = 4 if block_r * block_n <= 4096 else 8
    grid = (triton.cdiv(rows, block_r),)
    jit(_asym_qdq_kernel)[grid](x, out, rows, g, float(2**bits - 1), float(clip_ratio),
                                BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps)
    return out


def quant_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes the fused quantiser must move: read ``x`` once and write ``x̂`` once.

    The floor a bandwidth-bound kernel is timed against (scales and zero points stay in
    registers: nothing else crosses memory).

    Explained in :doc:`/book/spinquant/theory`.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    numel = 1
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"shape must hold non-negative integers, got {tuple(shape)!r}")
        numel *= s
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * numel * itemsize
