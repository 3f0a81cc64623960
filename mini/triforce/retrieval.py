"""TriForce's retrieval KV cache: the middle level's fixed-size view of a long prompt.

Built once, at the last prompt token, per layer and KV head (the official ``init_graph_cache``):

1. split the prompt's keys (after RoPE) into chunks of ``C = 8`` tokens; a partial last chunk is
   scored over the tokens it has;
2. score each chunk by the last query against the chunk's mean key, ``s_c = q_last · mean(K_c)``
   (no softmax, no scaling); with GQA (``H = g·H_kv``) the g query heads of a KV group share its
   chunks, so their scores are summed, ``s_c = (Σ_h q_h) · mean(K_c)``;
3. keep chunk 0 (the attention sinks) always, and the ``budget/C − 1`` other chunks of highest
   score, stored in rank order: chunk 0, then by decreasing score.

During generation the budget stays fixed: the keys and values of the ``n`` tokens generated so far
overwrite the last ``n`` slots (:meth:`RetrievalCache.refresh`), the lowest-ranked chunks first,
as the official ``update_graph_cache`` does; so the recent tokens are always attended to.

The selected chunk indices per layer are also what :func:`mini.triforce.kernel.chunk_attention`
takes to attend to the same chunks in place, in the full cache.

Explained in :doc:`/book/triforce/theory`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mini.lm.kvcache import KVCache
from mini.triforce.kernel import CHUNK

__all__ = ["RetrievalCache", "build_retrieval_cache", "chunk_scores", "select_chunks"]


def _check_chunk_size(chunk_size: int) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return chunk_size


def chunk_scores(query: Tensor, keys: Tensor, chunk_size: int = CHUNK) -> Tensor:
    """``(Σ_{h in group} q_h) · mean(K_chunk)`` for every chunk: ``(B, H_kv, ceil(S/C))`` float32.

    Args:
        query: ``(B, H, d)`` the last prompt token's queries (after RoPE), ``H = g·H_kv``.
        keys: ``(B, H_kv, S, d)`` the prompt's keys (after RoPE).
        chunk_size: C.

    Explained in :doc:`/book/triforce/theory`.
    """
    _check_chunk_size(chunk_size)
    if query.dim() != 3 or keys.dim() != 4 or query.shape[0] != keys.shape[0] or query.shape[2] != keys.shape[3]:
        raise ValueError(f"query must be (B, H, d) and keys (B, H_kv, S, d) with the same B and d, got "
                         f"{tuple(query.shape)} and {tuple(keys.shape)}")
    B, H, d = query.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"query's heads H={H} must be a multiple of the KV heads H_kv={Hkv} (GQA)")
    if S == 0:
        raise ValueError("keys hold no token (S = 0): nothing to retrieve")
    n = -(-S // chunk_size)
    k = keys.float()
    pad = n * chunk_size - S
    if pad:
        k = torch.cat([k, k.new_zeros(B, Hkv, pad, d)], dim=2)
    sums = k.reshape(B, Hkv, n, chunk_size, d).sum(dim=3)  # (B, H_kv, n, d)
    counts = torch.full((n,), float(chunk_size), device=keys.device)
    counts[-1] = chunk_size - pad
    means = sums / counts[:, None]
    qg = query.float().reshape(B, Hkv, H // Hkv, d).sum(dim=2)  # (B, H_kv, d)
    return torch.einsum("bkd,bknd->bkn", qg, means)


def select_chunks(scores: Tensor, budget: int, chunk_size: int = CHUNK) -> Tensor:
    """Chunk 0, then the ``budget/C − 1`` other chunks of highest score, in rank order:
    ``(B, H_kv, budget/C)`` long (fewer where the prompt has fewer chunks).

    Explained in :doc:`/book/triforce/theory`.
    """
    _check_chunk_size(chunk_size)
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 2 * chunk_size or budget % chunk_size:
        raise ValueError(f"budget must be a multiple of chunk_size={chunk_size} and at least two chunks "
                         f"({2 * chunk_size}), got {budget!r}")
    n = scores.shape[-1]
    k = min(budget // chunk_size, n) - 1
    rest = scores[..., 1:]
    top = torch.topk(rest, k, dim=-1, sorted=True).indices + 1  # (B, H_kv, k) by decreasing score
    zero = torch.zeros(scores.shape[:-1] + (1,), dtype=torch.long, device=scores.device)
    return torch.cat([zero, top], dim=-1)


def _slots(chunks: Tensor, chunk_size: int) -> Tensor:
    """Cache slots ``(B, H_kv, n_sel·C)`` of whole chunks, in the chunks' (rank) order."""
    B, Hkv, n = chunks.shape
    offs = torch.arange(chunk_size, device=chunks.device)
    return (chunks[..., None] * chunk_size + offs).reshape(B, Hkv, n * chunk_size)


@dataclass
class RetrievalCache:
    """The middle level's cache: ``cache`` holds ``budget`` slots per layer and KV head (fewer for
    a short prompt), gathered from the full cache in rank order, its last slots overwritten by the
    recent tokens; ``chunks`` per layer ``(B, H_kv, n_sel)`` the selected chunk indices;
    ``tail_start`` the first full-cache slot not in a whole prompt chunk.

    Explained in :doc:`/book/triforce/theory`.
    """

    #: The gathered cache the middle model decodes with (``budget`` slots per layer and KV head).
    cache: KVCache
    #: Per layer, the selected chunk indices ``(B, H_kv, n_sel)``, chunk 0 first, then by score.
    chunks: list[Tensor]
    #: Per layer, the full-cache slots of the selected chunks ``(B, H_kv, n_sel·C)``, rank order.
    slots: list[Tensor]
    #: Slots per layer and KV head.
    budget: int
    #: The first full-cache slot not in a whole prompt chunk; slots from here on are recent tokens.
    tail_start: int
    #: Tokens per chunk (C).
    chunk_size: int = CHUNK

    def refresh(self, full: KVCache) -> RetrievalCache:
        """Put the recent tokens in the tail (in place; returns self).

        The ``n = len(full) − tail_start`` recent tokens (the prompt's last ``S mod C`` tokens,
        then the generated ones) take the last ``n`` slots, lowest-ranked chunks first, in order.
        ``n`` may not reach chunk 0's slots.
        """
        n = full.length - self.tail_start
        size = self.slots[0].shape[-1]
        if n < 0:
            raise ValueError(f"full cache has {full.length} slots, fewer than tail_start={self.tail_start}")
        if n > size - self.chunk_size:
            raise ValueError(f"{n} recent tokens would overwrite chunk 0 of a retrieval cache of "
                             f"{size} slots; rebuild the cache or raise budget={self.budget}")
        layers = [fl.select(idx) for idx, fl in zip(self.attend(full), full.layers)]
        self.cache = KVCache(layers, full.seen, full.next_position)
        return self

    def attend(self, full: KVCache) -> list[Tensor]:
        """Per layer, the full-cache slots the retrieval cache holds after :meth:`refresh` with
        ``full`` (``ExplicitLM.forward``'s ``attend`` on the full cache)."""
        n = full.length - self.tail_start
        out = []
        for sl in self.slots:
            idx = sl.clone()
            size = sl.shape[-1]
            idx[..., size - n:] = torch.arange(self.tail_start, full.length, device=sl.device)
            out.append(idx)
        return out


@torch.no_grad()
def build_retrieval_cache(full: KVCache, queries: list[Tensor], budget: int,
                          chunk_size: int = CHUNK) -> RetrievalCache:
    """The retrieval cache of a prefilled prompt.

    Args:
        full: the prompt's full cache (``ExplicitLM.prefill``); its length is the prompt length.
        queries: per layer the last prompt token's queries ``(B, H, d)`` after RoPE
            (``forward(..., return_queries=True)`` gives ``(B, H, T, d)``: take ``[:, :, -1]``).
        budget: slots per layer and KV head, a multiple of ``chunk_size``, at least two chunks.
        chunk_size: C (TriForce: 8).

    Explained in :doc:`/book/triforce/theory`.
    """
    if not isinstance(full, KVCache):
        raise TypeError(f"full must be a KVCache, got {type(full).__name__}")
    if len(queries) != len(full.layers):
        raise ValueError(f"queries has {len(queries)} entries; expected one per layer ({len(full.layers)})")
    _check_chunk_size(chunk_size)
    tail_start = (full.length // chunk_size) * chunk_size  # whole chunks only; the rest is recent
    if tail_start == 0:
        raise ValueError(f"the prompt ({full.length} tokens) holds no whole chunk of {chunk_size}")
    chunks, slots = [], []
    for lc, q in zip(full.layers, queries):
        sc = chunk_scores(q, lc.keys[:, :, :tail_start], chunk_size)  # (B, H_kv, n_chunks)
        sel = select_chunks(sc, budget, chunk_size)  # (B, H_kv, n_sel) chunk 0 first, then by score
        chunks.append(sel)
        slots.append(_slots(sel, chunk_size))
    rc = RetrievalCache(full, chunks, slots, budget, tail_start, chunk_size)
    return rc.refresh(full)
