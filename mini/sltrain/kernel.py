"""Triton kernels of the SLTrain layer: the weight ``W = (α/r) B A + S`` built tile by tile, and
the gather of a dense gradient on the sparse support.

Part II, SLTrain chapter (``book/sltrain/``); the layer that calls these is
:class:`mini.sltrain.layer.SparseLowRankLinear`. Paper: Han, Li, Huang, Hong, Takeda, Jawanpuria,
Mishra, "SLTrain: a sparse plus low-rank approach for parameter and memory efficient
pretraining", NeurIPS 2024, arXiv 2406.02214 (Section 3, the weight W = BA + S of eq. (2) with
the LoRA-style scale α/r of the official code).

The sparse factor ``S`` lives on a fixed support Ω of ``nnz`` entries, given as ``index``: the
flat row-major positions ``p = i·n + j`` of Ω in the ``m × n`` (out × in) weight, sorted
ascending, int64; ``values[k]`` is the entry at ``index[k]``.

Building W: :func:`sparse_lowrank_weight`
-----------------------------------------
One program per ``BLOCK_M × BLOCK_N`` tile of W (rows ``i0 .. i0+BLOCK_M``, columns
``j0 .. j0+BLOCK_N``):

1. ``acc = B[rows, :] @ A[:, cols]`` with ``tl.dot`` over the rank in chunks of ``BLOCK_K``
   (masked: r need not be a multiple of the chunk, nor m, n of the tile), then ``acc *= α/r``;
2. the tile's sparse entries are added in registers. Because ``index`` is sorted row-major, the
   entries of row ``i`` with a column in ``[j0, j0 + BLOCK_N)`` are one contiguous run of
   ``index``; its bounds are read from a small table, :func:`tile_offsets`,
   ``offsets[i, c] = #{k : index[k] < i·n + min(c·BLOCK_N, n)}`` (one ``torch.searchsorted``,
   ``m × (⌈n/BLOCK_N⌉ + 1)`` int32 values, computed once per support and cached by the layer).
   Each row of the tile then walks its own run: at step ``t`` every row ``i`` loads its
   ``t``-th entry (column ``c_i``, value ``v_i``; masked where the run is shorter) and adds
   ``v_i`` where the tile's column equals ``c_i``. The loop runs ``max_i (run length)`` steps,
   about 6 at δ = 0.03 and ``BLOCK_N = 64`` (the mean run is δ·BLOCK_N ≈ 1.9); the entries are
   distinct, so each position receives at most one value.
3. One store of the finished tile: W is written once, never read back.

The sum is formed as ``(α/r)·(B A) + S`` in float32 whatever the input dtype (float32, float16 or
bfloat16), then cast to it. float32 dots run with ``input_precision="ieee"`` (true float32, the
precision of ``torch.matmul`` with TF32 off) unless ``torch.backends.cuda.matmul.allow_tf32`` is
on, in which case they use TF32 as torch's matmuls then do.

The reference (:func:`sparse_lowrank_weight_reference`) is the official code's formula:
``W = (α/r)·B A``, then ``W.view(-1).index_add_(0, index, values)``.

Gathering a gradient: :func:`gather_support`
--------------------------------------------
``grad_values[k] = G_W.view(-1)[index[k]]``: the gradient of the loss with respect to the
sparse values is the dense weight gradient read on the support. One program per ``BLOCK``
consecutive non-zeros; reads ``index`` (8 bytes each) and one scattered value of ``G_W`` each.

Work per call (for the bench): building W does ``2·m·n·r`` FLOPs and moves ``(m·r + r·n)·s``
bytes of factors (read once per tile row/column from L2, once from DRAM), ``nnz·(8 + s)`` of the
support and ``m·n·s`` of W written (``s`` bytes per element); the gather moves
``nnz·(8 + 2s)`` bytes. :func:`weight_work` and :func:`gather_work` return these counts.

Tests (``tests/test_sltrain.py``) run both kernels under the Triton interpreter against the
references with poisoned outputs, in float32 and float16, at sizes below, at and above the tile
and ranks below and above the chunk; bfloat16 only on a GPU (the interpreter's ``tl.dot`` on
bfloat16 operands returns wrong values: numpy has no bfloat16), where ``bench/sltrain_layer.py``
compares the kernel's W and gradients with the reference's before timing.

Differences from the official code: the official C++ extension materialises ``B·(A·α/r)`` with
a matmul and then scatter-adds the values (two passes over W, the second a scattered
read-modify-write); this kernel adds the sparse values to the tile in registers before its only
store. Backward is the same algebra (see :mod:`mini.sltrain.layer`).

Explained in :doc:`/book/sltrain/theory`.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch

from mini.kernels.dispatch import HAS_TRITON, check_same_device, check_tensor, kernel_op

__all__ = [
    "KERNEL_DTYPES",
    "BLOCK_M",
    "BLOCK_N",
    "BLOCK_K",
    "GATHER_BLOCK",
    "tile_offsets",
    "sparse_lowrank_weight",
    "sparse_lowrank_weight_reference",
    "gather_support",
    "gather_support_reference",
    "weight_work",
    "gather_work",
]

#: dtypes the kernels take (the references also take float64).
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES: tuple[torch.dtype, ...] = KERNEL_DTYPES + (torch.float64,)
BLOCK_M = 64  #: rows of W per program of the weight kernel
BLOCK_N = 64  #: columns of W per program (the tile width :func:`tile_offsets` is built for)
BLOCK_K = 32  #: rank chunk of each ``tl.dot``
GATHER_BLOCK = 1024  #: non-zeros per program of the gather kernel

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _sparse_lowrank_weight_kernel(
        b_ptr,  # (m, r) B, contiguous; float32 / float16 / bfloat16
        a_ptr,  # (r, n) A, contiguous; same dtype
        val_ptr,  # (nnz,) values of S, in the order of index; same dtype
        idx_ptr,  # (nnz,) int64 sorted flat positions i*n + j of the support
        off_ptr,  # (m, n_col_tiles + 1) int32: off[i, c] = #{k : index[k] < i*n + min(c*BLOCK_N, n)}
        w_ptr,  # (m, n) out: W = scale * B A + S, contiguous; same dtype
        m,  # rows of W (out_features)
        n,  # columns of W (in_features)
        r,  # rank
        off_stride,  # row stride of the offsets table: n_col_tiles + 1
        scale,  # float: alpha / r
        BLOCK_M: tl.constexpr,  # tile rows (>= 16, tl.dot's minimum)
        BLOCK_N: tl.constexpr,  # tile columns (>= 16); the offsets table is built for it
        BLOCK_K: tl.constexpr,  # rank chunk of each tl.dot (>= 16)
        DOT_PRECISION: tl.constexpr,  # "ieee" (true float32) or "tf32"
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
        rmask = rows < m
        cmask = cols < n
        rows64 = rows.to(tl.int64)
        # (1) the low-rank tile, B[rows, :] @ A[:, cols], over the rank in chunks
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, r, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            kmask = ks < r
            b = tl.load(b_ptr + rows64[:, None] * r + ks[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0)  # (BM, BK)
            a = tl.load(a_ptr + ks[:, None].to(tl.int64) * n + cols[None, :],
                        mask=kmask[:, None] & cmask[None, :], other=0.0)  # (BK, BN)
            acc += tl.dot(b, a, input_precision=DOT_PRECISION)
        acc = acc * scale
        # (2) the tile's sparse entries: row i's run is index[start_i : stop_i]
        start = tl.load(off_ptr + rows64 * off_stride + pid_n, mask=rmask, other=0)  # (BM,)
        stop = tl.load(off_ptr + rows64 * off_stride + pid_n + 1, mask=rmask, other=0)
        count = stop - start  # (BM,) 0 for rows past m
        longest = tl.max(count, axis=0)
        for t in range(0, longest):
            has = t < count  # (BM,)
            pos = start + t
            flat = tl.load(idx_ptr + pos, mask=has, other=0)  # (BM,) int64
            v = tl.load(val_ptr + pos, mask=has, other=0.0).to(tl.float32)  # (BM,)
            col = flat - rows64 * n  # (BM,) the entry's column j
            hit = (col[:, None] == cols[None, :]) & has[:, None]  # (BM, BN)
            acc = tl.where(hit, acc + v[:, None], acc)
        # (3) one store of the finished tile
        tl.store(w_ptr + rows64[:, None] * n + cols[None, :], acc.to(w_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])

    @triton.jit
    def _gather_support_kernel(
        g_ptr,  # (m * n,) dense gradient G_W, contiguous, flattened row-major
        idx_ptr,  # (nnz,) int64 flat positions of the support
        out_ptr,  # (nnz,) out: G_W.view(-1)[index]; same dtype as g
        nnz,  # number of non-zeros
        BLOCK: tl.constexpr,  # non-zeros per program
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < nnz
        p = tl.load(idx_ptr + offs, mask=mask, other=0)  # (BLOCK,) int64
        v = tl.load(g_ptr + p, mask=mask, other=0.0)
        tl.store(out_ptr + offs, v, mask=mask)


# ---------------------------------------------------------------------------------------------
# Argument checks (shared by the references and the launchers)
# ---------------------------------------------------------------------------------------------
def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number (alpha / rank), got {type(scale).__name__} {scale!r}")
    return float(scale)


def _n_col_tiles(n: int, block_n: int = BLOCK_N) -> int:
    return -(-n // block_n)


def _check_weight_args(B, A, values, index, scale, offsets, out, dtypes, contiguous: bool):
    check_tensor("B", B, dtypes=dtypes, ndim=2, contiguous=contiguous)
    m, r = B.shape
    check_tensor("A", A, dtypes=(B.dtype,), ndim=2, contiguous=contiguous)
    if A.shape[0] != r:
        raise ValueError(f"A must have shape ({r}, in_features) to match B {tuple(B.shape)}, got {tuple(A.shape)}")
    n = A.shape[1]
    check_tensor("values", values, dtypes=(B.dtype,), ndim=1, contiguous=contiguous)
    check_tensor("index", index, dtypes=(torch.int64,), shape=(values.shape[0],), contiguous=contiguous)
    scale = _check_scale(scale)
    check_same_device(B=B, A=A, values=values, index=index)
    if offsets is not None:
        check_tensor("tile_offsets", offsets, dtypes=(torch.int32,), shape=(m, _n_col_tiles(n) + 1))
        check_same_device(B=B, tile_offsets=offsets)
    if out is not None:
        check_tensor("out", out, dtypes=(B.dtype,), shape=(m, n))
        check_same_device(B=B, out=out)
    return m, n, r, scale


def _check_gather_args(grad_weight, index, out, dtypes, contiguous: bool):
    check_tensor("grad_weight", grad_weight, dtypes=dtypes, ndim=2, contiguous=contiguous)
    check_tensor("index", index, dtypes=(torch.int64,), ndim=1, contiguous=contiguous)
    check_same_device(grad_weight=grad_weight, index=index)
    if out is not None:
        check_tensor("out", out, dtypes=(grad_weight.dtype,), shape=(index.shape[0],))
        check_same_device(grad_weight=grad_weight, out=out)


def tile_offsets(index: torch.Tensor, out_features: int, in_features: int,
                 block_n: int = BLOCK_N) -> torch.Tensor:
    """The run bounds of the weight kernel: ``(out_features, ⌈in_features/block_n⌉ + 1)`` int32.

    ``offsets[i, c]`` is the number of support positions before ``i·n + min(c·block_n, n)``, so
    the entries of row ``i`` in column tile ``c`` are ``index[offsets[i, c] : offsets[i, c+1]]``
    (``index`` sorted ascending). On ``index``'s device.

    Explained in :doc:`/book/sltrain/theory`.
    """
    check_tensor("index", index, dtypes=(torch.int64,), ndim=1, contiguous=False)
    m, n = int(out_features), int(in_features)
    cols = torch.clamp(torch.arange(_n_col_tiles(n, block_n) + 1, device=index.device) * block_n, max=n)
    queries = torch.arange(m, device=index.device)[:, None] * n + cols[None, :]  # (m, tiles + 1)
    return torch.searchsorted(index, queries.reshape(-1), out_int32=True).view(m, -1)


_run_table = tile_offsets  # the launchers' name for it (their argument is called tile_offsets)


def _dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


# ---------------------------------------------------------------------------------------------
# PyTorch references
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def sparse_lowrank_weight_reference(
    B: torch.Tensor,
    A: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    scale: float = 1.0,
    tile_offsets: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``W = scale · B A + S`` (out × in) with ``S.view(-1)[index] = values``, in PyTorch.

    ``B`` (m, r), ``A`` (r, n), ``values`` (nnz,) of one floating dtype (float64 included),
    ``index`` (nnz,) int64 sorted distinct flat positions; ``tile_offsets`` is the kernel's
    table (checked, not needed here). Writes into ``out`` (m, n) when given.

    Explained in :doc:`/book/sltrain/theory`.
    """
    m, n, r, scale = _check_weight_args(B, A, values, index, scale, tile_offsets, out, FLOAT_DTYPES, False)
    w = torch.mm(B, A, out=out) if out is not None else B @ A  # (m, n)
    w.mul_(scale)
    w.view(-1).index_add_(0, index, values)  # distinct positions: a plain add at each
    return w


@torch.no_grad()
def gather_support_reference(grad_weight: torch.Tensor, index: torch.Tensor,
                             out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``grad_weight.view(-1)[index]`` (nnz,), in PyTorch; into ``out`` when given.

    Explained in :doc:`/book/sltrain/theory`.
    """
    _check_gather_args(grad_weight, index, out, FLOAT_DTYPES, False)
    flat = grad_weight.reshape(-1)
    if out is None:
        return flat[index]
    return torch.index_select(flat, 0, index, out=out)


# ---------------------------------------------------------------------------------------------
# Launchers and dispatchers
# ---------------------------------------------------------------------------------------------
@kernel_op(reference=sparse_lowrank_weight_reference, name="sparse_lowrank_weight")
def _weight_op(jit, B, A, values, index, scale=1.0, tile_offsets=None, out=None):
    m, n, r, scale = _check_weight_args(B, A, values, index, scale, tile_offsets, out, KERNEL_DTYPES, True)
    if tile_offsets is None:
        tile_offsets = _run_table(index, m, n)
    if out is None:
        out = torch.empty(m, n, device=B.device, dtype=B.dtype)
    if m == 0 or n == 0:
        return out
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    jit(_sparse_lowrank_weight_kernel)[grid](
        B, A, values, index, tile_offsets, out, m, n, r, tile_offsets.shape[1], scale,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PRECISION=_dot_precision(B.dtype),
        num_warps=4,
    )
    return out


@kernel_op(reference=gather_support_reference, name="gather_support")
def _gather_op(jit, grad_weight, index, out=None):
    _check_gather_args(grad_weight, index, out, KERNEL_DTYPES, True)
    nnz = index.shape[0]
    if out is None:
        out = torch.empty(nnz, device=grad_weight.device, dtype=grad_weight.dtype)
    if nnz == 0:
        return out
    jit(_gather_support_kernel)[(triton.cdiv(nnz, GATHER_BLOCK),)](
        grad_weight, index, out, nnz, BLOCK=GATHER_BLOCK, num_warps=4,
    )
    return out


def sparse_lowrank_weight(
    B: torch.Tensor,
    A: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    scale: float = 1.0,
    tile_offsets: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """The SLTrain weight ``W = scale · B A + S`` (out × in), built tile by tile.

    Explained in :doc:`/book/sltrain/theory`.

    Args:
        B: (out, r) and A: (r, in), the low-rank factors; values: (nnz,) the non-zeros of S;
            one dtype (the kernel: float32, float16 or bfloat16; the reference also float64).
        index: (nnz,) int64, the sorted distinct flat positions ``i·in + j`` of S's support.
        scale: ``alpha / rank``.
        tile_offsets: the kernel's run table (:func:`tile_offsets`); computed when omitted, pass
            it to skip the ``searchsorted`` when the support is fixed (the layer caches it).
        out: optional (out, in) buffer of the factors' dtype.
        backend: ``"auto"`` (Triton on CUDA, the reference on CPU), ``"triton"``, ``"interpret"``
            or ``"reference"``.
    """
    return _weight_op(B, A, values, index, scale=scale, tile_offsets=tile_offsets, out=out, backend=backend)


def gather_support(grad_weight: torch.Tensor, index: torch.Tensor, out: Optional[torch.Tensor] = None,
                   backend: str = "auto") -> torch.Tensor:
    """``grad_weight.view(-1)[index]``: the dense weight gradient read on the support (nnz,).

    ``grad_weight`` (out, in), contiguous for the kernel; ``index`` (nnz,) int64; ``backend`` as
    in :func:`sparse_lowrank_weight`.

    Explained in :doc:`/book/sltrain/theory`.
    """
    return _gather_op(grad_weight, index, out=out, backend=backend)


def weight_work(m: int, n: int, r: int, nnz: int, elem_bytes: int = 4) -> dict[str, float]:
    """FLOPs and compulsory DRAM bytes of one :func:`sparse_lowrank_weight` call.

    Explained in :doc:`/book/sltrain/theory`.
    """
    return {"flops": 2.0 * m * n * r + nnz,
            "bytes": float(elem_bytes * (m * r + r * n + nnz + m * n) + 8 * nnz + 4 * m * (_n_col_tiles(n) + 1))}


def gather_work(nnz: int, elem_bytes: int = 4) -> dict[str, float]:
    """Compulsory DRAM bytes of one :func:`gather_support` call (no FLOPs).

    Explained in :doc:`/book/sltrain/theory`.
    """
    return {"flops": 0.0, "bytes": float(nnz * (8 + 2 * elem_bytes))}
