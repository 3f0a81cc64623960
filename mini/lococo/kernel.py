"""LoCoCo's hot path, fused: the mixed slots ``K̃ = W·K`` and ``Ṽ = W·V`` over the evicted tokens.

At each compression step LoCoCo (Cai et al., ICML 2024, arXiv 2406.05317) replaces the ``s′``
tokens it evicts from a layer's cache by ``m`` slots, each a convex mixture of the evicted keys
and values: with ``W`` the ``(m, s′)`` mixing matrix of one (batch, KV head) row,
``K̃ = W K`` and ``Ṽ = W V``. Two separate matmuls would read ``W`` twice; this kernel reads each
tile of ``W`` once and applies it to the keys and to the values in the same pass.

How the mixing kernel works
---------------------------
Inputs are flattened to ``N = B·H_kv`` rows: ``W (N, m, s′)``, ``K, V (N, s′, d)``. The grid is
``(N, ⌈m / BLOCK_M⌉, ⌈d / BLOCK_D⌉)``; one program holds two float32 accumulators
``(BLOCK_M, BLOCK_D)`` and walks the evicted tokens in tiles of ``BLOCK_S``: it loads the
``(BLOCK_M, BLOCK_S)`` tile of ``W`` and the ``(BLOCK_S, BLOCK_D)`` tiles of ``K`` and ``V`` and
adds ``Σ_s W[i, s]·K[s, j]`` (a broadcast product reduced by ``tl.sum(·, axis=1)``; no
``tl.dot``, whose minimum tile of 16 and TF32 default differ across triton versions). Sizes that
are not multiples of the blocks are masked. The three block sizes are powers of two with
``BLOCK_M·BLOCK_S·BLOCK_D ≤ 4096`` so the product tile fits in registers. Arithmetic is float32
whatever the input dtype (float32, float16, bfloat16); results are cast to the input's dtype.

The mixing is memory-bound (``2·m·s′·d`` multiply-adds against ``(m + 2d)·s′`` values read), so
the gain of fusing is the one read of ``W`` (:func:`mix_kv_bytes`).

Training uses :func:`mix_kv_reference` (plain ``torch.matmul``, differentiable); inference may
use the kernel (``backend="auto"`` picks it for CUDA tensors).

Explained in :doc:`/book/lococo/theory`.
"""
from __future__ import annotations

import torch

from mini.kernels.dispatch import HAS_TRITON, check_same_device, check_tensor, kernel_op

__all__ = ["FLOAT_DTYPES", "KERNEL_DTYPES", "mix_kv", "mix_kv_bytes", "mix_kv_reference"]

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
MAX_TILE = 4096  # BLOCK_M · BLOCK_S · BLOCK_D values of the product tile


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _mix_kv_kernel(
        w_ptr,  # (N, m, s) float32 / float16 / bfloat16, contiguous
        k_ptr,  # (N, s, d) same dtype
        v_ptr,  # (N, s, d)
        ok_ptr,  # (N, m, d) output K̃
        ov_ptr,  # (N, m, d) output Ṽ
        m,  # mixed slots
        s,  # evicted tokens
        d,  # head dimension
        BLOCK_M: tl.constexpr,
        BLOCK_S: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1)
        pid_d = tl.program_id(2)
        ii = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) mixed slot index
        jj = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BD,) feature index
        imask = ii < m
        jmask = jj < d
        w_base = w_ptr + row * m * s
        k_base = k_ptr + row * s * d
        v_base = v_ptr + row * s * d
        acc_k = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        acc_v = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for s0 in range(0, s, BLOCK_S):
            ss = s0 + tl.arange(0, BLOCK_S)  # (BS,) evicted token index
            smask = ss < s
            w = tl.load(w_base + ii[:, None] * s + ss[None, :], mask=imask[:, None] & smask[None, :],
                        other=0.0).to(tl.float32)  # (BM, BS), read once for K and V
            kv_off = ss[:, None] * d + jj[None, :]  # (BS, BD)
            kv_mask = smask[:, None] & jmask[None, :]
            kt = tl.load(k_base + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            vt = tl.load(v_base + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            acc_k += tl.sum(w[:, :, None] * kt[None, :, :], axis=1)  # (BM, BD)
            acc_v += tl.sum(w[:, :, None] * vt[None, :, :], axis=1)
        out_off = row * m * d + ii[:, None] * d + jj[None, :]  # (BM, BD)
        out_mask = imask[:, None] & jmask[None, :]
        tl.store(ok_ptr + out_off, acc_k.to(ok_ptr.dtype.element_ty), mask=out_mask)
        tl.store(ov_ptr + out_off, acc_v.to(ov_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------
# Checks, reference
# ---------------------------------------------------------------------------------------------
def _check_inputs(weights: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  out: tuple[torch.Tensor, torch.Tensor] | None, dtypes: tuple[torch.dtype, ...],
                  contiguous: bool) -> tuple[int, int, int, int]:
    check_tensor("weights", weights, dtypes=dtypes, ndim=3, contiguous=contiguous)
    n, m, s = weights.shape
    check_tensor("keys", keys, dtypes=(weights.dtype,), contiguous=contiguous)
    if keys.dim() != 3 or keys.shape[0] != n or keys.shape[1] != s:
        raise ValueError(f"keys must have shape ({n}, {s}, d) to match weights {tuple(weights.shape)} "
                         f"(N, m, s′), got {tuple(keys.shape)}")
    d = keys.shape[2]
    check_tensor("values", values, dtypes=(weights.dtype,), shape=(n, s, d), contiguous=contiguous)
    check_same_device(weights=weights, keys=keys, values=values)
    if out is not None:
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"out must be a pair of tensors (mixed keys, mixed values), got {type(out).__name__}")
        for name, o in zip(("out[0]", "out[1]"), out):
            check_tensor(name, o, dtypes=(weights.dtype,), shape=(n, m, d))
            check_same_device(weights=weights, **{name.replace("[", "").replace("]", ""): o})
    return n, m, s, d


def mix_kv_reference(weights: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W·K, W·V)`` in PyTorch, differentiable (float32 arithmetic for half inputs, cast back).

    Shapes: ``weights (N, m, s′)``, ``keys, values (N, s′, d)`` → two ``(N, m, d)``.

    Explained in :doc:`/book/lococo/theory`.
    """
    _check_inputs(weights, keys, values, out, FLOAT_DTYPES, contiguous=False)
    work = torch.float64 if weights.dtype == torch.float64 else torch.float32
    w = weights.to(work)
    mk = torch.matmul(w, keys.to(work)).to(weights.dtype)  # (N, m, d)
    mv = torch.matmul(w, values.to(work)).to(weights.dtype)
    if out is None:
        return mk, mv
    out[0].copy_(mk)
    out[1].copy_(mv)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------
# Launcher and public function
# ---------------------------------------------------------------------------------------------
def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _blocks(m: int, s: int, d: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_S, BLOCK_D, num_warps)``: powers of two, product ≤ ``MAX_TILE``."""
    bd = min(_pow2(d), 64)
    bm = min(_pow2(m), 16)
    bs = max(1, min(_pow2(s), MAX_TILE // (bm * bd), 64))
    num_warps = 1 if bm * bs * bd <= 512 else 4
    return bm, bs, bd, num_warps


@kernel_op(reference=mix_kv_reference, name="mix_kv")
def _mix_kv_op(jit, weights, keys, values, out=None):
    n, m, s, d = _check_inputs(weights, keys, values, out, KERNEL_DTYPES, contiguous=True)
    if out is None:
        out = (weights.new_empty((n, m, d)), weights.new_empty((n, m, d)))
    if n == 0 or m == 0 or d == 0:
        return out[0], out[1]
    if s == 0:  # no evicted tokens: an empty sum
        out[0].zero_()
        out[1].zero_()
        return out[0], out[1]
    bm, bs, bd, num_warps = _blocks(m, s, d)
    grid = (n, triton.cdiv(m, bm), triton.cdiv(d, bd))
    jit(_mix_kv_kernel)[grid](weights, keys, values, out[0], out[1], m, s, d,
                              BLOCK_M=bm, BLOCK_S=bs, BLOCK_D=bd, num_warps=num_warps)
    return out[0], out[1]


def mix_kv(weights: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
           out: tuple[torch.Tensor, torch.Tensor] | None = None,
           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The mixed slots ``(K̃, Ṽ) = (W·K, W·V)``, fused in one pass over ``W``.

    Args:
        weights: ``(N, m, s′)`` mixing weights (N = batch · KV heads; rows of a LoCoCo ``W`` are
            convex, but any values work).
        keys, values: ``(N, s′, d)``, same dtype and device as ``weights``.
        out: optional pair of ``(N, m, d)`` buffers for ``K̃`` and ``Ṽ``.
        backend: ``"auto"`` (Triton on CUDA, the reference on CPU), ``"triton"``, ``"interpret"``
            or ``"reference"``. The kernel takes float32, float16, bfloat16 (contiguous); the
            reference also float64 and is the one to differentiate through.

    Returns ``(K̃, Ṽ)``, each ``(N, m, d)`` in the input's dtype.

    Explained in :doc:`/book/lococo/theory`.
    """
    return _mix_kv_op(weights, keys, values, out=out, backend=backend)


def mix_kv_bytes(n: int, m: int, s: int, d: int, dtype: torch.dtype, fused: bool = True) -> int:
    """Bytes the mixing moves: ``W`` read once (fused) or twice (two matmuls), ``K`` and ``V``
    read once, ``K̃`` and ``Ṽ`` written once.

    Explained in :doc:`/book/lococo/theory`.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    for name, v in (("n", n), ("m", m), ("s", s), ("d", d)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    size = torch.empty(0, dtype=dtype).element_size()
    w_reads = 1 if fused else 2
    return size * n * (w_reads * m * s + 2 * s * d + 2 * m * d)
