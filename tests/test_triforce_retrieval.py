"""TriForce's retrieval cache (mini.triforce.retrieval) on a tiny GQA Llama through
mini.lm.kvcache.ExplicitLM: chunk scores by hand, chunk 0 always kept, rank order, the recent tail,
and logits equal to the full-cache forward restricted to the same slots."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mini.lm.kvcache import ExplicitLM
from mini.triforce import chunk_attention_reference
from mini.triforce.retrieval import build_retrieval_cache, chunk_scores, select_chunks

V = 40


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="eager")
    return ExplicitLM.from_hf(LlamaForCausalLM(cfg).eval())


def _prefill(lm, S, seed=0):
    ids = torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = lm(ids, return_queries=True)
    return ids, out.cache, [q[:, :, -1] for q in out.queries]  # queries (B, H, d) of the last token


def test_chunk_scores_by_hand():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 6, 5, generator=g), torch.randn(2, 3, 19, 5, generator=g)  # G = 2, partial chunk
    got = chunk_scores(q, k, 8)
    assert got.shape == (2, 3, 3)
    for b in range(2):
        for h in range(3):
            for c in range(3):
                mean = k[b, h, 8 * c: min(8 * c + 8, 19)].mean(0)
                want = sum(float(q[b, 2 * h + j] @ mean) for j in range(2))
                assert abs(float(got[b, h, c]) - want) < 1e-5
    with pytest.raises(ValueError, match=r"heads H=6 must be a multiple of the KV heads H_kv=4"):
        chunk_scores(q, torch.randn(2, 4, 8, 5))
    with pytest.raises(ValueError, match=r"query must be \(B, H, d\) and keys \(B, H_kv, S, d\)"):
        chunk_scores(q[0], k)


def test_select_chunks_keeps_chunk_zero_and_ranks():
    scores = torch.tensor([[[-9.0, 1.0, 5.0, 3.0, 4.0]]])
    assert select_chunks(scores, 24).tolist() == [[[0, 2, 4]]]
    assert select_chunks(scores, 80).tolist() == [[[0, 2, 4, 3, 1]]]  # more budget than chunks
    for bad in (20, 8, 0, 24.0):
        with pytest.raises(ValueError, match=r"budget must be a multiple of chunk_size=8 and at least two chunks"):
            select_chunks(scores, bad)


def test_retrieval_cache_matches_attend_on_full_cache(lm):
    S, budget = 61, 32  # 7 whole chunks + 5 recent tokens; 4 chunks kept
    _, full, queries = _prefill(lm, S)
    rc = build_retrieval_cache(full, queries, budget)
    assert rc.tail_start == 56 and rc.cache.length == budget
    for sel, layer in zip(rc.chunks, rc.cache.layers):
        assert sel.shape == (2, 2, 4) and bool((sel[..., 0] == 0).all())
        assert sorted(set(sel[0, 0].tolist())) == sorted(sel[0, 0].tolist())  # distinct
        pos = layer.positions  # chunk 0's positions first, the 5 recent tokens last
        assert pos[..., :8].tolist() == [[list(range(8))] * 2] * 2
        assert pos[..., -5:].tolist() == [[list(range(56, 61))] * 2] * 2
    nxt = torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = lm(nxt, rc.cache, append=False).logits
        b = lm(nxt, full, attend=rc.attend(full), append=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # layer 0 attention of a decode query over the retrieval slots equals the chunk kernel's
    # reference over the same chunks (the 5 recent tokens took slots of the last-ranked chunk)
    L0 = full.layers[0]
    q = torch.randn(2, 4, L0.keys.shape[-1], generator=torch.Generator().manual_seed(2))
    keep = rc.chunks[0][..., :3].contiguous()  # chunk 0 and the two best: untouched by the tail
    want = chunk_attention_reference(q, L0.keys, L0.values, keep, n_tail=5)
    slots = rc.attend(full)[0]
    idx = torch.cat([slots[..., :24], slots[..., -5:]], dim=-1)
    layer = L0.select(idx)
    kr, vr = layer.keys.repeat_interleave(2, 1), layer.values.repeat_interleave(2, 1)
    got = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kr, vr)[:, :, 0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_full_budget_equals_full_cache(lm):
    _, full, queries = _prefill(lm, 48, seed=3)
    rc = build_retrieval_cache(full, queries, 64)  # every chunk kept, in rank order
    nxt = torch.randint(0, V, (2, 2), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a = lm(nxt, rc.cache, append=False).logits
        b = lm(nxt, full, append=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_refresh_after_generation_and_overflow(lm):
    _, full, queries = _prefill(lm, 40, seed=4)
    rc = build_retrieval_cache(full, queries, 24)
    assert rc.cache.layers[0].positions[..., -8:].tolist() != [[list(range(40, 48))] * 2] * 2
    with torch.no_grad():
        full = lm(torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(7)), full).cache
    rc.refresh(full)
    assert rc.cache.length == 24 and rc.cache.seen == 46 and rc.cache.next_position == 46
    assert rc.cache.layers[1].positions[..., -6:].tolist() == [[list(range(40, 46))] * 2] * 2
    assert rc.cache.layers[1].positions[..., :8].tolist() == [[list(range(8))] * 2] * 2
    with torch.no_grad():
        full = lm(torch.zeros(2, 11, dtype=torch.long), full).cache  # 17 recent > 24 − 8
    with pytest.raises(ValueError, match=r"17 recent tokens would overwrite chunk 0 of a retrieval cache of 24 slots"):
        rc.refresh(full)


def test_build_errors(lm):
    _, full, queries = _prefill(lm, 20)
    with pytest.raises(ValueError, match=r"queries has 1 entries; expected one per layer \(2\)"):
        build_retrieval_cache(full, queries[:1], 16)
    with pytest.raises(TypeError, match=r"full must be a KVCache"):
        build_retrieval_cache(full.layers, queries, 16)
    with pytest.raises(ValueError, match=r"chunk_size must be an integer >= 1, got 0"):
        build_retrieval_cache(full, queries, 16, chunk_size=0)
    with pytest.raises(ValueError, match=r"budget must be a multiple of chunk_size=8"):
        build_retrieval_cache(full, queries, 12)
    _, short, q_short = _prefill(lm, 5)
    with pytest.raises(ValueError, match=r"the prompt \(5 tokens\) holds no whole chunk of 8"):
        build_retrieval_cache(short, q_short, 16)
