"""Decode attention over a gathered subset of KV chunks: TriForce's retrieval-cache attention.

The middle level of TriForce attends, for each layer and KV head, only to the prompt chunks
(of ``C = 8`` tokens) that the retrieval scores selected, plus the recent tokens. Rather than
copying those chunks into a separate buffer, :func:`chunk_attention` reads them in place from
the full cache: for one decode token,

    out[b, h] = softmax_j(q[b, h] · K[b, h_kv, j] / √d) · V[b, h_kv, j]   over j ∈ slots(b, h_kv),

with ``h_kv = h // g`` (GQA, ``H = g·H_kv``; query heads ``h_kv·g … h_kv·g + g − 1`` share KV
head ``h_kv``, the layout of transformers' ``repeat_kv``), and

    slots(b, h_kv) = {c·C + i : c ∈ chunks[b, h_kv, :], 0 ≤ i < C, c·C + i < S − n_tail}
                     ∪ {S − n_tail, …, S − 1}.

Design choice, the tail: the last ``n_tail`` positions of the cache (the tokens generated since
the retrieval cache was built, and the current round's proposals) are extra slots every head
attends to, and chunk positions at or beyond ``S − n_tail`` (or ``S``: a partial last chunk) are
masked, so a token is never counted twice. Chunk indices must be distinct and in
``[0, ceil(S / C))`` (checked); the caller keeps chunk 0 (the sinks) among them.

How the decode kernel works
---------------------------
One program per ``(b, h_kv)`` serves the g query heads of the group (``BLOCK_G`` = g rounded up
to a power of two, padding rows masked), so each selected K/V row is read once for the group.
It walks the selected chunks ``BLOCK_T / C`` at a time (a tile of ``BLOCK_T`` token slots, each
slot's chunk index loaded from the index tensor), then the tail ``BLOCK_T`` positions at a time,
with the online softmax (running max ``m``, normaliser ``l``, accumulator ``acc``) in float32.
Products are broadcast-and-``tl.sum`` (no ``tl.dot``: g and the tile are small at decode), so the
same code runs in the interpreter and compiles for CUDA (checked for sm_80 on triton 3.9).
Inputs float32, float16 or bfloat16; the output has q's dtype.

Limitation: the grid is ``B·H_kv`` programs, each walking all ``n_sel·C + n_tail`` slots. At
batch 1 with 8 KV heads that is 8 programs, too few to fill a GPU at TriForce's budgets (4096
slots); splitting the slots over programs and merging the partial softmaxes (flash-decoding)
would fix it. Not timed on a GPU yet.

Explained in :doc:`/book/triforce/theory`.
"""
from __future__ import annotations

import math

import torch

from mini.kernels.dispatch import HAS_TRITON, check_same_device, check_tensor, kernel_op

__all__ = [
    "CHUNK",
    "FLOAT_DTYPES",
    "KERNEL_DTYPES",
    "chunk_attention",
    "chunk_attention_reference",
    "chunk_slots",
]

CHUNK = 8  # TriForce's chunk size
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _chunk_attn_kernel(
        q_ptr,  # (B, H, D) contiguous
        k_ptr,  # (B, Hkv, S, D) contiguous
        v_ptr,  # (B, Hkv, S, D) contiguous
        idx_ptr,  # (B, Hkv, n_sel) int32/int64 chunk indices
        out_ptr,  # (B, H, D) q's dtype
        S,  # cache length
        n_sel,  # chunks selected per (b, h_kv)
        n_tail,  # recent positions [S - n_tail, S) always attended
        G,  # query heads per KV head
        D,  # head dimension
        scale,  # 1/√D
        C: tl.constexpr,  # chunk size
        BLOCK_G: tl.constexpr,  # G rounded up to a power of two
        BLOCK_T: tl.constexpr,  # token slots per tile (a multiple of C)
        BLOCK_D: tl.constexpr,  # D rounded up to a power of two
    ):
        pid = tl.program_id(0).to(tl.int64)  # b·Hkv + h_kv
        gg = tl.arange(0, BLOCK_G)
        dd = tl.arange(0, BLOCK_D)
        tt = tl.arange(0, BLOCK_T)
        gmask = gg < G
        dmask = dd < D
        q_off = (pid * G + gg)[:, None] * D + dd[None, :]  # (BLOCK_G, BLOCK_D)
        q = tl.load(q_ptr + q_off, mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        kv_base = pid * S * D
        limit = S - n_tail  # chunk positions at or past it belong to the tail (or do not exist)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        lsum = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        n_slots = n_sel * C + n_tail
        for t0 in range(0, n_slots, BLOCK_T):
            t = t0 + tt  # (BLOCK_T,) slot numbers: chunk slots first, then the tail
            is_chunk = t < n_sel * C
            sel = tl.load(idx_ptr + pid * n_sel + t // C, mask=is_chunk, other=0).to(tl.int64)
            pos_chunk = sel * C + t % C
            pos_tail = (limit + (t - n_sel * C)).to(tl.int64)
            pos = tl.where(is_chunk, pos_chunk, pos_tail)  # (BLOCK_T,)
            valid = tl.where(is_chunk, pos_chunk < limit, t < n_slots)
            kv_off = kv_base + pos[:, None] * D + dd[None, :]  # (BLOCK_T, BLOCK_D)
            kvmask = valid[:, None] & dmask[None, :]
            k = tl.load(k_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # (BLOCK_G, BLOCK_T)
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no valid slot
            alpha = tl.exp(m - m_safe)
            p = tl.exp(s - m_safe[:, None])  # (BLOCK_G, BLOCK_T)
            v = tl.load(v_ptr + kv_off, mask=kvmask, other=0.0).to(tl.float32)
            lsum = lsum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        out = acc / lsum[:, None]
        tl.store(out_ptr + q_off, out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


# ---------------------------------------------------------------------------------------------
# Checks, reference
# ---------------------------------------------------------------------------------------------
def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: torch.Tensor,
                  n_tail: int, chunk_size: int, out: torch.Tensor | None,
                  dtypes: tuple[torch.dtype, ...], contiguous: bool) -> tuple[int, int, int, int, int, int]:
    """``(B, H, Hkv, S, D, G)`` after checking every argument (messages name it)."""
    check_tensor("q", q, dtypes=dtypes, ndim=3, contiguous=contiguous)
    check_tensor("k", k, dtypes=(q.dtype,), ndim=4, contiguous=contiguous)
    B, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    check_tensor("k", k, shape=(B, None, None, D), contiguous=contiguous)
    check_tensor("v", v, dtypes=(q.dtype,), shape=tuple(k.shape), contiguous=contiguous)
    check_tensor("chunks", chunks, dtypes=INDEX_DTYPES, ndim=3, contiguous=contiguous)
    check_tensor("chunks", chunks, shape=(B, Hkv, None), contiguous=contiguous)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"q's heads H={H} must be a multiple of k's KV heads H_kv={Hkv} (GQA)")
    if isinstance(n_tail, bool) or not isinstance(n_tail, int) or not 0 <= n_tail <= S:
        raise ValueError(f"n_tail must be an integer in [0, S={S}], got {n_tail!r}")
    n_sel = chunks.shape[2]
    if n_sel == 0 and n_tail == 0:
        raise ValueError("nothing to attend to: chunks selects 0 chunks and n_tail=0")
    if D == 0 or B == 0:
        raise ValueError(f"q must have non-empty batch and head dimensions, got shape {tuple(q.shape)}")
    check_same_device(q=q, k=k, v=v, chunks=chunks)
    if n_sel:
        n_chunks = -(-S // chunk_size)
        lo, hi = int(chunks.min()), int(chunks.max())
        if lo < 0 or hi >= n_chunks:
            raise ValueError(f"chunks must hold chunk indices in [0, {n_chunks}) (S={S}, chunk_size="
                             f"{chunk_size}), got values in [{lo}, {hi}]")
    if out is not None:
        check_tensor("out", out, dtypes=(q.dtype,), shape=tuple(q.shape))
        check_same_device(q=q, out=out)
    return B, H, Hkv, S, D, H // Hkv


def chunk_slots(chunks: torch.Tensor, S: int, n_tail: int = 0,
                chunk_size: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache positions a (b, h_kv) attends to, and which are valid: ``(B, Hkv, n_sel·C + n_tail)``
    each (positions clamped into ``[0, S)`` where invalid).

    Explained in :doc:`/book/triforce/theory`.
    """
    B, Hkv, n_sel = chunks.shape
    offs = torch.arange(chunk_size, device=chunks.device)
    pos = (chunks.long()[..., None] * chunk_size + offs).reshape(B, Hkv, n_sel * chunk_size)
    valid = pos < S - n_tail
    tail = torch.arange(S - n_tail, S, device=chunks.device).expand(B, Hkv, n_tail)
    pos = torch.cat([pos, tail], dim=-1)  # (B, Hkv, n_sel·C + n_tail)
    valid = torch.cat([valid, torch.ones_like(tail, dtype=torch.bool)], dim=-1)
    return pos.clamp(0, max(S - 1, 0)), valid


@torch.no_grad()
def chunk_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: torch.Tensor,
                              n_tail: int = 0, chunk_size: int = CHUNK,
                              out: torch.Tensor | None = None) -> torch.Tensor:
    """Gather the selected slots, then softmax attention with scale ``1/√d``, in PyTorch
    (float32 for half-precision inputs, float64 stays float64; cast to q's dtype).

    Explained in :doc:`/book/triforce/theory`.
    """
    B, H, Hkv, S, D, G = _check_inputs(q, k, v, chunks, n_tail, chunk_size, out, FLOAT_DTYPES, False)
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    pos, valid = chunk_slots(chunks, S, n_tail, chunk_size)  # (B, Hkv, T)
    gidx = pos[..., None].expand(B, Hkv, pos.shape[-1], D)
    ks = torch.gather(k.to(work), 2, gidx)  # (B, Hkv, T, D)
    vs = torch.gather(v.to(work), 2, gidx)
    qg = q.to(work).reshape(B, Hkv, G, D)  # query heads of one KV group together
    scores = torch.einsum("bkgd,bktd->bkgt", qg, ks) / math.sqrt(D)  # (B, Hkv, G, T)
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    res = torch.einsum("bkgt,bktd->bkgd", probs, vs).reshape(B, H, D).to(q.dtype)
    if out is None:
        return res
    out.copy_(res)
    return out


# ---------------------------------------------------------------------------------------------
# Launcher and public function
# ---------------------------------------------------------------------------------------------
def _blocks(G: int, D: int, chunk_size: int) -> tuple[int, int, int, int]:
    """``(BLOCK_G, BLOCK_T, BLOCK_D, num_warps)``: the (G, T, D) product tile near 8192 values."""
    bg = 1 << (G - 1).bit_length()
    bd = 1 << (D - 1).bit_length()
    bt = max(1 << (chunk_size - 1).bit_length(), 8192 // (bg * bd))
    bt = min(bt, 128)
    while bt % chunk_size:  # chunk_size not a power of two: C must divide the tile
        bt += 1
    warps = 4 if bg * bt * bd >= 4096 else 1
    return bg, bt, bd, warps


@kernel_op(reference=chunk_attention_reference, name="chunk_attention")
def _chunk_attention_op(jit, q, k, v, chunks, n_tail=0, chunk_size=CHUNK, out=None):
    B, _, Hkv, S, D, G = _check_inputs(q, k, v, chunks, n_tail, chunk_size, out, KERNEL_DTYPES, True)
    bg, bt, bd, warps = _blocks(G, D, chunk_size)
    if bt & (bt - 1):
        raise ValueError(f"chunk_size={chunk_size} gives a tile of {bt} slots, not a power of two; "
                         "the kernel needs a power-of-two chunk size (use backend='reference')")
    if out is None:
        out = torch.empty_like(q)
    grid = (B * Hkv,)
    jit(_chunk_attn_kernel)[grid](q, k, v, chunks, out, S, chunks.shape[2], n_tail, G, D,
                                  1.0 / math.sqrt(D), C=chunk_size, BLOCK_G=bg, BLOCK_T=bt,
                                  BLOCK_D=bd, num_warps=warps)
    return out


def chunk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: torch.Tensor,
                    n_tail: int = 0, chunk_size: int = CHUNK, out: torch.Tensor | None = None,
                    backend: str = "auto") -> torch.Tensor:
    """Attention of one decode token over selected KV chunks plus the recent tail.

    Args:
        q: ``(B, H, d)`` queries of the decode token (after RoPE).
        k, v: ``(B, H_kv, S, d)`` the full cache (keys after RoPE), q's dtype; ``H = g·H_kv``.
        chunks: ``(B, H_kv, n_sel)`` int32/int64 distinct chunk indices in ``[0, ceil(S/C))``.
        n_tail: the last ``n_tail`` positions are attended by every head (chunk positions there
            are masked, so nothing counts twice).
        chunk_size: C (TriForce: 8); the kernel needs a power of two.
        out: optional ``(B, H, d)`` buffer of q's dtype.
        backend: ``"auto"``, ``"triton"``, ``"interpret"`` or ``"reference"``.

    Returns:
        ``(B, H, d)`` in q's dtype.

    Explained in :doc:`/book/triforce/theory`.
    """
    return _chunk_attention_op(q, k, v, chunks, n_tail=n_tail, chunk_size=chunk_size, out=out,
                               backend=backend)
