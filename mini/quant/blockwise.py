"""Block-wise 8-bit quantization with the dynamic maps of 8-bit optimizers.

Part II of the book, GaLore chapter (``book/galore/``): the 8-bit optimizer states of 8-bit
GaLore (:class:`mini.galore.adamw8bit.GaLoreAdamW8bit`) are stored with these functions.

Paper: Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization",
ICLR 2022, arXiv 2110.02861 (Section 2: block-wise quantization, dynamic quantization). The map
itself comes from Dettmers, "8-Bit Approximations for Parallelism in Deep Learning", ICLR 2016,
arXiv 1511.04561. Used for 8-bit GaLore in Zhao et al., arXiv 2403.03507.

The dynamic map
---------------
An 8-bit code is a sorted table ``Q`` of 256 float32 values in [-1, 1] (signed) or [0, 1]
(unsigned). The dynamic data type spends its bits on a decimal exponent and a linear fraction:
for exponent ``i = 0 .. 6`` the values ``10^(i-6) · (b_k + b_{k+1}) / 2``, with ``b`` the
``2^(i)+1`` (signed) or ``2^(i+1)+1`` (unsigned, the sign bit becomes a fraction bit) points of
``linspace(0.1, 1, ·)``, plus 0 and 1 (:func:`dynamic_map`, equal to
``bitsandbytes.functional.create_dynamic_map`` value for value). So it covers seven orders of
magnitude, from about ``3e-7`` to 1, with a relative resolution that degrades slowly towards
zero instead of vanishing (a linear map's relative error is 100% below half its first step).

Block-wise quantization (paper, Section 2, as in bitsandbytes' ``quantize_blockwise``): split the flattened tensor into blocks of ``B``
(default 256) values, and in block ``b``::

    N_b   = max_{i in b} |x_i|                       (absmax, float32, one per block)
    q_i   = argmin_j | Q_j - x_i / N_b |            (nearest code, uint8)
    x̂_i   = Q[q_i] · N_b                            (dequantization)

A block's outlier only coarsens its own block, not the whole tensor. The last block may be
partial (``n`` need not be a multiple of ``B``); a block of zeros has ``N_b = 0`` and the codes
of the value 0.

Why a signed map for Adam's first moment and an unsigned one for the second: ``m`` takes both
signs and ``v = E[g²] ≥ 0`` does not, so the unsigned map puts all 256 codes on [0, 1] (the
sign bit becomes a fraction bit: twice as many codes per decade). And why a *dynamic* (not
linear) map for ``v``: ``v`` spans many orders of magnitude inside a block (it is a square), and
a linear map with step ``N_b/255`` rounds every ``v_i < N_b/510`` to 0, after which Adam divides
by ``√v + ε ≈ ε`` and takes a huge step. The dynamic map keeps every ``v_i`` between
``1e-5·N_b`` and ``1e-3·N_b`` non-zero, with a median relative error of about 6% (28% at worst)
where the linear map makes all of them 0 (``tests/test_quant_blockwise.py`` measures both).

Nearest-code search
-------------------
Both the reference and the kernel compare against the 255 midpoints ``t_j = (Q_j + Q_{j+1})/2``
(float32) and return ``q = #{j : t_j < s}`` for the scaled value ``s = clamp(x / N_b, -1, 1)``:
that is ``torch.bucketize(s, t, right=False)``, the index of the nearest code, a tie (``s``
exactly on a midpoint) going to the lower code. The reference gets the same count, bit for bit,
from a table on the float's top 16 bits plus one compare (:func:`nearest_code_index`; about 13×
cheaper than ``bucketize`` on one CPU thread, which made the 8-bit optimizer step 10× AdamW's;
``bench/results/galore8bit_cpu.json``). The kernel finds the count with a branch-free
binary search (binary lifting): ``q = 0``, then for ``k = 128, 64, ..., 1``:
``q = q + k if t[q + k - 1] < s``; eight gathers from a 1 KB table that stays in L1, instead of
255 comparisons per element. The division is IEEE round-to-nearest (``tl.math.div_rn``; Triton's
``/`` on float32 compiles to an approximate division on NVIDIA GPUs), so the compiled kernel
computes the reference's scaled values and codes exactly (the tests lower it for sm_90 and check
for ``div.rn.f32``; ``bench/quant8.py`` counts differing codes on a GPU). One program handles one
block (``block_size`` values padded to a power of two with a mask), with 1 to 8 warps by size.

Differences from bitsandbytes
-----------------------------
- The reference gives exactly the codes and absmax of bitsandbytes' PyTorch implementation of
  ``quantize_blockwise`` (its "default" backend: ``bucketize`` on the same midpoints); the test
  checks it bit for bit. bitsandbytes' CPU C library (what ``bitsandbytes.functional.
  quantize_blockwise`` runs for float32 CPU tensors) uses an approximate binary search: on
  inputs with many small values (a Gaussian times a uniform to the fourth power) about 10% of
  its codes, all for values well below the absmax where the dynamic codes are dense, are not
  the nearest code (on plain Gaussian inputs, 0.2% to 0.3%). The test bounds that: the absmax is identical, our
  error ``|x̂ - x|`` is never larger than the library's, and the two dequantized values differ
  by at most one largest code gap (0.0141 signed, 0.0070 unsigned) times the absmax.
- bitsandbytes accepts block sizes 64 ... 4096 (powers of two; 32 on some GPUs); here any
  positive ``block_size`` works, in the reference and in the kernel (the kernel pads a block to
  the next power of two with a mask, up to ``MAX_KERNEL_BLOCK`` = 16384 values per block).
- No nested (double) quantization of ``absmax``; the absmax stays float32 (4 bytes per
  ``B`` values: 1.6% of the 8-bit state at ``B = 256``).

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from mini.kernels.dispatch import HAS_TRITON, check_same_device, check_tensor, kernel_op

__all__ = [
    "dynamic_map",
    "linear_map",
    "code_midpoints",
    "nearest_code_index",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_blockwise_reference",
    "dequantize_blockwise_reference",
    "n_blocks",
    "MAX_KERNEL_BLOCK",
    "FLOAT_DTYPES",
]

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL_BLOCK = 16384  # largest block the Triton kernels hold in one program


# ---------------------------------------------------------------------------------------------
# Quantization maps
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _dynamic_map_values(signed: bool, max_exponent_bits: int, total_bits: int) -> tuple[float, ...]:
    # Same arithmetic as bitsandbytes.functional.create_dynamic_map (float32 linspace and means,
    # then a Python float times a power of ten), so the result matches it value for value.
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0.0)
    data.append(1.0)
    data += [0.0] * (2**total_bits - len(data))
    data.sort()
    return tuple(data)


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256-entry dynamic quantization map (float32, sorted ascending, on CPU).

    ``signed=True``: values in [-0.993, 1] for Adam's first moment; ``signed=False``: values in
    [0, 1] with one more fraction bit, for the second moment. Equal to
    ``bitsandbytes.functional.create_dynamic_map(signed=signed)``.

    Explained in :doc:`/book/galore/theory`.
    """
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__} {signed!r}")
    return torch.tensor(_dynamic_map_values(signed, 7, 8), dtype=torch.float32)  # (256,)


def linear_map(signed: bool = True) -> torch.Tensor:
    """A linear 8-bit map (256 evenly spaced values on [-1, 1] or [0, 1]), for comparison only.

    Explained in :doc:`/book/galore/theory`.
    """
    if not isinstance(signed, bool):
        raise TypeError(f"signed must be a bool, got {type(signed).__name__} {signed!r}")
    return torch.linspace(-1.0 if signed else 0.0, 1.0, 256, dtype=torch.float32)  # (256,)


def code_midpoints(code: torch.Tensor) -> torch.Tensor:
    """The 255 decision thresholds ``(Q_j + Q_{j+1}) / 2`` of a sorted 256-entry map (float32).

    Explained in :doc:`/book/galore/theory`.
    """
    return (code[:-1] + code[1:]) / 2  # (255,)


def n_blocks(numel: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` values (the last one may be partial).

    Explained in :doc:`/book/galore/theory`.
    """
    return -(-numel // block_size)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _quantize_blockwise_kernel(
        x_ptr,  # (n,) float32 / float16 / bfloat16 input, flattened
        mid_ptr,  # (255,) float32 midpoints of the sorted code, (Q_j + Q_{j+1}) / 2
        q_ptr,  # (n,) uint8 out: code indices
        absmax_ptr,  # (n_blocks,) float32 out: max |x| of each block
        n,  # number of elements
        block_size,  # elements per quantization block (any positive integer)
        BLOCK: tl.constexpr,  # power of two >= block_size: the tile one program holds
    ):
        pid = tl.program_id(0)  # one program per quantization block
        lane = tl.arange(0, BLOCK)
        offs = pid.to(tl.int64) * block_size + lane
        mask = (lane < block_size) & (offs < n)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        amax = tl.max(tl.abs(x), axis=0)  # scalar N_b
        tl.store(absmax_ptr + pid, amax)
        denom = tl.where(amax > 0.0, amax, 1.0)  # a zero block: every x is 0, codes of 0
        s = tl.math.div_rn(x, tl.zeros_like(x) + denom)  # IEEE division, as the reference
        s = tl.minimum(tl.maximum(s, -1.0), 1.0)
        # Branch-free binary search: idx = #{j : mid[j] < s}, the nearest code (ties go down).
        idx = tl.zeros((BLOCK,), dtype=tl.int32)
        for level in tl.static_range(8):  # unrolled at compile time: steps 128, 64, ..., 1
            cand = idx + (128 >> level)
            t = tl.load(mid_ptr + cand - 1)
            idx = tl.where(t < s, cand, idx)
        tl.store(q_ptr + offs, idx.to(tl.uint8), mask=mask)

    @triton.jit
    def _dequantize_blockwise_kernel(
        q_ptr,  # (n,) uint8 code indices
        absmax_ptr,  # (n_blocks,) float32 block absmax
        code_ptr,  # (256,) float32 code values
        out_ptr,  # (n,) float32 / float16 / bfloat16 out
        n,  # number of elements
        block_size,  # elements per quantization block
        BLOCK: tl.constexpr,  # power of two >= block_size
    ):
        pid = tl.program_id(0)  # one program per quantization block
        lane = tl.arange(0, BLOCK)
        offs = pid.to(tl.int64) * block_size + lane
        mask = (lane < block_size) & (offs < n)
        q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)  # (BLOCK,)
        amax = tl.load(absmax_ptr + pid)
        val = tl.load(code_ptr + q, mask=mask, other=0.0) * amax  # Q[q] · N_b in float32
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Argument checks (shared by reference and kernel)
# ---------------------------------------------------------------------------------------------
def _check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    return block_size


def _check_code(code: torch.Tensor, validate: bool = True) -> None:
    check_tensor("code", code, dtypes=(torch.float32,), shape=(256,))
    if validate and bool((code[1:] < code[:-1]).any()):  # reads a value: synchronizes a GPU
        raise ValueError("code must be sorted ascending (as dynamic_map returns it)")


def _check_quant_inputs(x, code, block_size, out, contiguous: bool, validate: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
    check_tensor("x", x, dtypes=FLOAT_DTYPES, contiguous=contiguous)
    _check_code(code, validate)
    _check_block_size(block_size)
    check_same_device(x=x, code=code)
    if out is None:
        return None
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        raise TypeError("out must be a tuple (q, absmax)")
    q, absmax = out
    check_tensor("out[0] (q)", q, dtypes=(torch.uint8,), shape=tuple(x.shape))
    check_tensor("out[1] (absmax)", absmax, dtypes=(torch.float32,), shape=(n_blocks(x.numel(), block_size),))
    check_same_device(x=x, q=q, absmax=absmax)
    return q, absmax


def _check_dequant_inputs(q, absmax, code, block_size, shape, dtype, out, contiguous: bool, validate: bool = True):
    check_tensor("q", q, dtypes=(torch.uint8,), contiguous=contiguous)
    _check_code(code, validate)
    _check_block_size(block_size)
    check_tensor("absmax", absmax, dtypes=(torch.float32,), shape=(n_blocks(q.numel(), block_size),))
    check_same_device(q=q, absmax=absmax, code=code)
    shape = tuple(q.shape) if shape is None else tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    if numel != q.numel():
        raise ValueError(f"shape {shape} holds {numel} elements, q has {q.numel()}")
    if out is not None:
        dtype = out.dtype if dtype is None else dtype
    dtype = torch.float32 if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype}")
    if out is not None:
        check_tensor("out", out, dtypes=(dtype,), shape=shape)
        check_same_device(q=q, out=out)
    return shape, dtype


# ---------------------------------------------------------------------------------------------
# Exact nearest-code search on CPU: a table on the float's top 16 bits
# ---------------------------------------------------------------------------------------------
_MAX_TABLE_STEPS = 8  # more midpoints than this in one 16-bit interval: use bucketize instead
_TABLES: dict[tuple[bytes, torch.device], tuple[torch.Tensor, torch.Tensor, int]] = {}


def _code_table(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(lo, padded midpoints, steps)`` for :func:`nearest_code_index`, cached per map and device.

    Each of the 65,536 values of a float32's top 16 bits (sign, exponent, 7 mantissa bits)
    covers an interval of floats; ``lo[key]`` is ``#{j : t_j < min of the interval}`` and
    ``steps`` the most midpoints inside one interval (1 for the dynamic and linear maps).
    NaN keys get 255, what ``torch.bucketize`` returns for NaN.
    """
    cpu = code.detach().to("cpu", torch.float32).contiguous()
    key = (cpu.numpy().tobytes(), code.device)
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    mid = code_midpoints(cpu)  # (255,)
    k = torch.arange(65536, dtype=torch.int64)
    low = ((k << 16) - ((k >= 0x8000).long() << 32)).to(torch.int32).view(torch.float32)  # (65536,)
    high = (((k << 16) | 0xFFFF) - ((k >= 0x8000).long() << 32)).to(torch.int32).view(torch.float32)
    neg = k >= 0x8000  # sign bit: the interval runs from high (most negative) to low
    vmin, vmax = torch.where(neg, high, low), torch.where(neg, low, high)
    special = ~(torch.isfinite(vmin) & torch.isfinite(vmax))  # inf / NaN keys
    lo = torch.bucketize(vmin, mid, right=False)  # (65536,) int64
    hi = torch.bucketize(vmax, mid, right=False)
    lo[special] = 255
    hi[special] = 255
    steps = int((hi - lo).max())
    padded = torch.cat([mid, torch.full((steps,), float("inf"))])  # (255 + steps,)
    out = (lo.to(code.device), padded.to(code.device), steps)
    _TABLES[key] = out
    return out


def nearest_code_index(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``torch.bucketize(scaled, code_midpoints(code), right=False)``, bit for bit, faster on CPU.

    ``scaled``: float32 values (any shape, contiguous or not); returns int64 of the same shape:
    the index of the nearest code, a tie going to the lower code. The table on the top 16 bits
    gives a lower bound; ``steps`` compares (one for the dynamic maps) finish the count.
    ``torch.bucketize`` runs a branchy binary search per element; this is one gather and one
    compare-and-add pass, about 13× cheaper on one CPU thread (``bench/galore8bit_cpu.py``).

    Explained in :doc:`/book/galore/theory`.
    """
    check_tensor("scaled", scaled, dtypes=(torch.float32,), contiguous=False)
    lo, padded, steps = _code_table(code)
    if steps > _MAX_TABLE_STEPS:  # a map with clustered codes: the plain search is cheaper
        return torch.bucketize(scaled, padded[:255], right=False)
    s = scaled.contiguous()
    key = (s.view(torch.int32) >> 16).long().bitwise_and_(0xFFFF)  # top 16 bits, (…,) int64
    idx = lo.index_select(0, key.reshape(-1)).reshape(s.shape)  # lower bound of the count
    for _ in range(steps):
        idx += padded.index_select(0, idx.reshape(-1)).reshape(s.shape) < s
    return idx


# ---------------------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_blockwise_reference(
    x: torch.Tensor,
    code: torch.Tensor,
    block_size: int = 256,
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise quantization in PyTorch: ``(q uint8 shaped like x, absmax float32 (n_blocks,))``.

    Explained in :doc:`/book/galore/theory`.
    """
    bufs = _check_quant_inputs(x, code, block_size, out, contiguous=False, validate=validate)
    n = x.numel()
    nb = n_blocks(n, block_size)
    flat = x.reshape(-1).float()  # (n,)
    if n % block_size:  # pad the last block with zeros (they change neither absmax nor codes)
        padded = torch.zeros(nb * block_size, device=x.device, dtype=torch.float32)
        padded[:n] = flat
    else:
        padded = flat
    blocks = padded.view(nb, block_size)  # (nb, B)
    absmax = blocks.abs().amax(dim=1) if n else torch.zeros(0, device=x.device)  # (nb,)
    denom = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # zero block -> codes of 0
    scaled = (blocks / denom[:, None]).clamp_(-1.0, 1.0).reshape(-1)[:n]  # (n,)
    idx = nearest_code_index(scaled, code)  # (n,) int64: #{j : t_j < s}, ties down
    if bufs is None:
        return idx.to(torch.uint8).reshape(x.shape), absmax
    bufs[0].copy_(idx.reshape(x.shape))  # int64 -> uint8, as .to(torch.uint8)
    bufs[1].copy_(absmax)
    return bufs[0], bufs[1]


@torch.no_grad()
def dequantize_blockwise_reference(
    q: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    block_size: int = 256,
    shape: Optional[Sequence[int]] = None,
    dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
    validate: bool = True,
) -> torch.Tensor:
    """``Q[q] · absmax[block]`` in float32, cast to ``dtype`` (default float32), shaped ``shape``.

    Explained in :doc:`/book/galore/theory`.
    """
    shape, dtype = _check_dequant_inputs(q, absmax, code, block_size, shape, dtype, out, contiguous=False, validate=validate)
    n = q.numel()
    val = code.index_select(0, q.reshape(-1).long())  # (n,) float32 Q[q]
    full = n // block_size  # whole blocks; a partial last block is scaled apart
    val[: full * block_size].view(full, block_size).mul_(absmax[:full, None])  # Q[q] · N_b
    if full * block_size < n:
        val[full * block_size:].mul_(absmax[full])
    res = val.to(dtype).reshape(shape)
    if out is None:
        return res
    out.copy_(res)
    return out


# ---------------------------------------------------------------------------------------------
# Launchers and dispatchers
# ---------------------------------------------------------------------------------------------
def _kernel_tile(block_size: int) -> tuple[int, int]:
    if block_size > MAX_KERNEL_BLOCK:
        raise ValueError(
            f"block_size {block_size} is larger than the Triton kernels hold in one program "
            f"({MAX_KERNEL_BLOCK}); use backend='reference'"
        )
    tile = max(16, 1 << (block_size - 1).bit_length())
    num_warps = 1 if tile <= 128 else (2 if tile <= 512 else (4 if tile <= 2048 else 8))
    return tile, num_warps


@kernel_op(reference=quantize_blockwise_reference, name="quantize_blockwise")
def _quantize_op(jit, x, code, block_size=256, out=None, validate=True):
    bufs = _check_quant_inputs(x, code, block_size, out, contiguous=True, validate=validate)
    n = x.numel()
    nb = n_blocks(n, block_size)
    if bufs is None:
        bufs = (
            torch.empty(x.shape, device=x.device, dtype=torch.uint8),
            torch.empty(nb, device=x.device, dtype=torch.float32),
        )
    if nb == 0:
        return bufs
    tile, num_warps = _kernel_tile(block_size)
    mid = code_midpoints(code).contiguous()  # (255,)
    jit(_quantize_blockwise_kernel)[(nb,)](x, mid, bufs[0], bufs[1], n, block_size, BLOCK=tile, num_warps=num_warps)
    return bufs[0], bufs[1]


@kernel_op(reference=dequantize_blockwise_reference, name="dequantize_blockwise")
def _dequantize_op(jit, q, absmax, code, block_size=256, shape=None, dtype=None, out=None, validate=True):
    shape, dtype = _check_dequant_inputs(q, absmax, code, block_size, shape, dtype, out, contiguous=True, validate=validate)
    check_tensor("absmax", absmax, dtypes=(torch.float32,))
    if out is None:
        out = torch.empty(shape, device=q.device, dtype=dtype)
    else:
        check_tensor("out", out, dtypes=(dtype,))
    n = q.numel()
    nb = n_blocks(n, block_size)
    if nb == 0:
        return out
    tile, num_warps = _kernel_tile(block_size)
    jit(_dequantize_blockwise_kernel)[(nb,)](q, absmax, code, out, n, block_size, BLOCK=tile, num_warps=num_warps)
    return out


def quantize_blockwise(
    x: torch.Tensor,
    code: torch.Tensor,
    block_size: int = 256,
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    backend: str = "auto",
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` block-wise to 8-bit indices into ``code`` (see the module docstring).

    Explained in :doc:`/book/galore/theory`.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape (contiguous for the kernel).
        code: sorted (256,) float32 map, e.g. ``dynamic_map(signed=True)``, on x's device.
        block_size: values per block sharing one absmax; any positive integer (the kernel:
            up to ``MAX_KERNEL_BLOCK``). Default 256, the 8-bit optimizers' block.
        out: optional ``(q, absmax)`` buffers: uint8 shaped like ``x``, float32 (n_blocks,).
        backend: ``"auto"`` (Triton on CUDA, the reference on CPU), ``"triton"``, ``"interpret"``
            or ``"reference"``.
        validate: check that ``code`` is sorted (reads values: a GPU synchronization); pass
            False in a loop that reuses a map already checked (the optimizer does).

    Returns ``(q, absmax)``: q uint8 shaped like x, absmax float32 of shape (ceil(n / block_size),).
    """
    return _quantize_op(x, code, block_size=block_size, out=out, backend=backend, validate=validate)


def dequantize_blockwise(
    q: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    block_size: int = 256,
    shape: Optional[Sequence[int]] = None,
    dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
    validate: bool = True,
) -> torch.Tensor:
    """Undo :func:`quantize_blockwise`: ``x̂ = code[q] · absmax[block]``.

    ``shape`` defaults to q's shape, ``dtype`` to float32 (or ``out``'s dtype); the product is
    formed in float32 and then cast. ``validate``: as in :func:`quantize_blockwise`.

    Explained in :doc:`/book/galore/theory`.
    """
    return _dequantize_op(q, absmax, code, block_size=block_size, shape=shape, dtype=dtype, out=out,
                          backend=backend, validate=validate)
