"""Tests of mini.lm.kvcache: the explicit-cache forward against transformers, scores, policies."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from mini.lm.kvcache import (
    H2O,
    CachePolicy,
    ExplicitLM,
    FullCache,
    KVCache,
    LayerCache,
    Rotary,
    StreamingLLM,
    TopLatest,
)

V = 50


def _model(kind: str, **extra) -> torch.nn.Module:
    """A tiny GQA model (4 query heads, 2 KV heads) with random nonzero biases (Qwen2)."""
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  attn_implementation="eager", **extra)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():
        for p in model.parameters():  # make norms and biases non-trivial
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request) -> tuple[torch.nn.Module, ExplicitLM]:
    model = _model(request.param, rope_theta=500.0)
    return model, ExplicitLM.from_hf(model)


def _ids(b: int = 2, t: int = 21, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_full_forward_matches_transformers(pair) -> None:
    model, lm = pair
    ids = _ids()
    ref = model(ids).logits
    out = lm(ids)
    assert out.logits.shape == (2, 21, V)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    assert out.cache.seen == 21 and out.cache.length == 21 and out.cache.next_position == 21
    layer = out.cache.layers[0]
    assert layer.keys.shape == (2, 2, 21, 8) and layer.positions[0, 0].tolist() == list(range(21))


@torch.no_grad()
def test_rope_tables_match_transformers(pair) -> None:
    model, lm = pair
    torch.testing.assert_close(lm.rotary.inv_freq, model.model.rotary_emb.inv_freq.float())


@torch.no_grad()
def test_chunked_prefill_then_decode_matches_transformers(pair) -> None:
    model, lm = pair
    ids = _ids(t=25)
    ref = model(ids).logits
    logits, cache = lm.prefill(ids[:, :13], chunk_size=5)
    pieces = [logits]
    for t in range(13, 17):  # token by token
        lg, cache = lm.decode(ids[:, t:t + 1], cache)
        pieces.append(lg)
    lg, cache = lm.decode(ids[:, 17:], cache)  # several tokens at once
    pieces.append(lg)
    torch.testing.assert_close(torch.cat(pieces, 1), ref, atol=1e-5, rtol=0)
    assert cache.seen == 25 and cache.length == 25


@torch.no_grad()
def test_linear_rope_scaling_matches_transformers() -> None:
    model = _model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    ids = _ids(t=17)
    torch.testing.assert_close(ExplicitLM.from_hf(model)(ids).logits, model(ids).logits,
                               atol=1e-5, rtol=0)


@torch.no_grad()
def test_append_false_leaves_cache_and_matches(pair) -> None:
    _, lm = pair
    ids = _ids(t=12)
    _, cache = lm.prefill(ids[:, :8], chunk_size=8)
    a = lm(ids[:, 8:], cache, append=False)
    b = lm(ids[:, 8:], cache)
    assert a.cache is cache and cache.length == 8
    torch.testing.assert_close(a.logits, b.logits)


def _manual_probs(lm: ExplicitLM, cache: KVCache, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Probabilities (B, H, T, S + T) of ``layer`` by hand: softmax(q kᵀ/√d) with the causal mask,
    from the layer's rotated queries and the keys stored in the cache."""
    t, s = ids.shape[1], cache.length
    res = lm(ids, cache, return_queries=True)
    q = res.queries[layer]  # (B, H, T, d)
    keys = res.cache.layers[layer].keys.repeat_interleave(lm.groups, dim=1)  # (B, H, S + T, d)
    logits = q @ keys.transpose(-1, -2) / lm.head_dim ** 0.5
    mask = torch.ones(t, s + t, dtype=torch.bool)
    mask[:, s:] = torch.ones(t, t, dtype=torch.bool).tril()
    pos = res.cache.layers[layer].positions[0, 0, s:]
    assert pos.tolist() == list(range(cache.next_position, cache.next_position + t))
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)


@torch.no_grad()
def test_attention_probs_and_scores_by_hand(pair) -> None:
    _, lm = pair
    ids = _ids(t=15)
    _, cache = lm.prefill(ids[:, :9], chunk_size=4)
    before = [layer.acc_scores.clone() for layer in cache.layers]
    out = lm(ids[:, 9:], cache, return_attn=True)
    for i in range(lm.num_layers):
        probs = _manual_probs(lm, cache, ids[:, 9:], i)
        torch.testing.assert_close(out.attentions[i], probs, atol=1e-5, rtol=0)
        col = probs.view(2, 2, 2, 6, 15).sum(dim=(2, 3))  # (B, H_kv, S + T): group + queries
        layer = out.cache.layers[i]
        torch.testing.assert_close(layer.last_scores, col, atol=1e-5, rtol=0)
        acc = torch.cat([before[i], torch.zeros(2, 2, 6)], -1) + col
        torch.testing.assert_close(layer.acc_scores, acc, atol=1e-5, rtol=0)
    # after a one-chunk prefill the accumulated score equals the last one
    _, fresh = lm.prefill(ids, chunk_size=15)
    torch.testing.assert_close(fresh.layers[0].acc_scores, fresh.layers[0].last_scores)
    # every query's probabilities sum to 1, so the column sums add up to G·T per KV head
    torch.testing.assert_close(fresh.layers[1].last_scores.sum(-1), torch.full((2, 2), 2.0 * 15))


@torch.no_grad()
def test_attend_subset_matches_masked_reference(pair) -> None:
    _, lm = pair
    ids = _ids(t=16)
    _, cache = lm.prefill(ids[:, :12], chunk_size=6)
    gen = torch.Generator().manual_seed(3)
    attend = [torch.stack([torch.stack([torch.randperm(12, generator=gen)[:5].sort().values
                                        for _ in range(2)]) for _ in range(2)])
              for _ in range(lm.num_layers)]  # (B, H_kv, 5) per layer
    out = lm(ids[:, 12:], cache, attend=attend, return_attn=True)
    # reference: the cache reduced to each (row, head)'s subset by select()
    sub = KVCache([layer.select(idx) for layer, idx in zip(cache.layers, attend)], cache.seen,
                  cache.next_position)
    ref = lm(ids[:, 12:], sub, return_attn=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    for i in range(lm.num_layers):
        a = out.attentions[i]  # (B, H, T, 12 + 4), zero off the subset
        idx = attend[i].repeat_interleave(lm.groups, dim=1)[:, :, None, :].expand(2, 4, 4, 5)
        torch.testing.assert_close(a[..., :12].gather(-1, idx), ref.attentions[i][..., :5])
        torch.testing.assert_close(a[..., 12:], ref.attentions[i][..., 5:])
        assert torch.allclose(a[..., :12].sum(-1) + a[..., 12:].sum(-1), torch.ones(2, 4, 4))
        off = torch.ones(2, 2, 12, dtype=torch.bool).scatter(-1, attend[i], False)
        assert (out.cache.layers[i].last_scores[..., :12][off] == 0).all()
    # the full subset equals no subset
    every = [torch.arange(12).expand(2, 2, 12) for _ in range(lm.num_layers)]
    torch.testing.assert_close(lm(ids[:, 12:], cache, attend=every).logits,
                               lm(ids[:, 12:], cache).logits, atol=1e-6, rtol=0)


@torch.no_grad()
def test_attend_masked_reference_by_large_negative_keys(pair) -> None:
    """A second reference: attention with -inf added on unselected columns, by hand at layer 0."""
    _, lm = pair
    ids = _ids(t=10)
    _, cache = lm.prefill(ids[:, :7], chunk_size=7)
    sel = torch.tensor([[[0, 3, 6], [1, 2, 5]], [[2, 4, 5], [0, 1, 6]]])
    attend = [sel, torch.arange(7).expand(2, 2, 7)]
    out = lm(ids[:, 7:], cache, attend=attend, return_attn=True, return_queries=True)
    full = lm(ids[:, 7:], cache, return_queries=True)
    q = full.queries[0]  # layer-0 queries do not depend on the subset
    keys = full.cache.layers[0].keys.repeat_interleave(2, dim=1)  # (B, H, 10, d)
    logits = q @ keys.transpose(-1, -2) / lm.head_dim ** 0.5  # (B, H, 3, 10)
    allowed = torch.zeros(2, 2, 10, dtype=torch.bool)
    allowed[..., :7].scatter_(-1, sel, True)
    allowed = allowed.repeat_interleave(2, dim=1)[:, :, None, :].expand(2, 4, 3, 10).clone()
    allowed[..., 7:] = torch.ones(3, 3, dtype=torch.bool).tril()
    ref = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
    torch.testing.assert_close(out.attentions[0], ref, atol=1e-5, rtol=0)


def _layer(scores_last: list[float] | None = None, scores_acc: list[float] | None = None,
           positions: list[int] | None = None) -> LayerCache:
    """A (1, 1, S, 2) cache whose key values equal the slot's position (easy to read back)."""
    s = len(positions if positions is not None else (scores_last or scores_acc))
    pos = torch.tensor(positions if positions is not None else list(range(s))).view(1, 1, s)
    keys = pos.float()[..., None].expand(1, 1, s, 2).clone()
    last = None if scores_last is None else torch.tensor(scores_last).view(1, 1, s)
    acc = None if scores_acc is None else torch.tensor(scores_acc).view(1, 1, s)
    return LayerCache(keys, -keys, pos, last, acc)


def test_streaming_llm_keeps_sinks_and_recent() -> None:
    layer = _layer(positions=list(range(10)))
    out = StreamingLLM(budget=5, sinks=2).compress(0, layer)
    assert len(out) == 5 and out.positions.flatten().tolist() == [0, 1, 7, 8, 9]
    assert out.keys[0, 0, :, 0].tolist() == [0, 1, 7, 8, 9]
    assert out.values[0, 0, :, 1].tolist() == [0, -1, -7, -8, -9]
    assert StreamingLLM(budget=12, sinks=2).compress(0, layer) is layer  # under budget
    assert StreamingLLM(4, 4).compress(0, layer).positions.flatten().tolist() == [0, 1, 2, 3]
    assert StreamingLLM(3, 0).compress(0, layer).positions.flatten().tolist() == [7, 8, 9]


def test_h2o_keeps_accumulated_heavy_hitters_and_recent() -> None:
    acc = [5.0, 0.1, 0.2, 9.0, 0.3, 0.4, 7.0, 0.5, 0.05, 0.01]
    last = [0.0] * 5 + [9.0] * 5  # ignored by H2O
    layer = _layer(scores_last=last, scores_acc=acc)
    out = H2O(budget=3).compress(0, layer)
    assert len(out) == 3 and out.positions.flatten().tolist() == [0, 3, 6]
    assert out.acc_scores.flatten().tolist() == [5.0, 9.0, 7.0]
    out = H2O(budget=4, recent=2).compress(0, layer)
    assert out.positions.flatten().tolist() == [3, 6, 8, 9]


def test_top_latest_keeps_last_scores() -> None:
    layer = _layer(scores_last=[0.1, 3.0, 0.2, 0.3, 2.0, 0.0, 1.0], scores_acc=[9.0] * 7)
    out = TopLatest(budget=3).compress(0, layer)
    assert out.positions.flatten().tolist() == [1, 4, 6]
    assert FullCache().compress(0, layer) is layer


def test_policies_per_head_and_row() -> None:
    """Each (row, KV head) chooses its own slots."""
    s = 8
    last = torch.arange(s, dtype=torch.float32).expand(2, 3, s).clone()
    last[1, 2] = last[1, 2].flip(-1)  # this head prefers the early slots
    pos = torch.arange(s).expand(2, 3, s)
    kv = torch.randn(2, 3, s, 4)
    layer = LayerCache(kv, kv, pos, last, last.clone())
    for policy in (TopLatest(3), H2O(3)):
        out = policy.compress(0, layer)
        assert out.keys.shape == (2, 3, 3, 4)
        assert out.positions[0, 0].tolist() == [5, 6, 7]
        assert out.positions[1, 2].tolist() == [0, 1, 2]
        torch.testing.assert_close(out.keys[1, 2], kv[1, 2, :3])


@torch.no_grad()
@pytest.mark.parametrize("policy", [StreamingLLM(6, 2), H2O(6, recent=2), TopLatest(6),
                                    StreamingLLM(6, 2, reindex=True)])
def test_prefill_with_policy_holds_budget(pair, policy: CachePolicy) -> None:
    _, lm = pair
    ids = _ids(t=20)
    logits, cache = lm.prefill(ids, chunk_size=4, policy=policy)
    assert logits.shape == (2, 20, V) and cache.seen == 20
    assert cache.length == 6 + 4  # compressed to 6 before the last chunk of 4
    cache.compress(policy)
    assert all(len(layer) == 6 for layer in cache.layers)
    # with slack 4 the cache is compressed only when it exceeds 10 slots
    _, slack = lm.prefill(ids[:, :12], chunk_size=4, policy=policy, compress_slack=4)
    assert slack.length == 12
    assert isinstance(policy, CachePolicy)


@torch.no_grad()
def test_streaming_positions_and_reindex(pair) -> None:
    _, lm = pair
    ids = _ids(t=20)
    _, cache = lm.prefill(ids, chunk_size=4, policy=StreamingLLM(6, 2))
    assert cache.layers[0].positions[0, 0].tolist() == [0, 1, 12, 13, 14, 15, 16, 17, 18, 19]
    _, re = lm.prefill(ids, chunk_size=4, policy=StreamingLLM(6, 2, reindex=True))
    assert re.layers[0].positions[0, 0].tolist() == list(range(10))
    assert re.next_position == 10 and re.seen == 20


def test_reindex_equals_recomputed_keys() -> None:
    torch.manual_seed(0)
    rot = Rotary(1.0 / (500.0 ** (torch.arange(0, 8, 2).float() / 8)))
    raw = torch.randn(2, 3, 5, 8)  # keys before RoPE
    old = torch.randint(0, 200, (2, 3, 5))
    new = torch.randint(0, 200, (2, 3, 5))
    layer = LayerCache(rot.apply(raw, old), raw, old, rotary=rot)
    moved = layer.reindex(new)
    torch.testing.assert_close(moved.keys, rot.apply(raw, new), atol=1e-5, rtol=0)
    assert moved.positions.tolist() == new.tolist()
    with pytest.raises(ValueError, match="rotary"):
        LayerCache(raw, raw, old).reindex(new)


@torch.no_grad()
def test_reindexed_cache_equals_fresh_run_at_new_positions(pair) -> None:
    """Keys re-indexed from positions p to p - 5 give the logits of a run that started at 0."""
    _, lm = pair
    ids = _ids(t=9)
    fresh = lm(ids)
    shifted = lm.new_cache(2)
    shifted.next_position = 5  # the same tokens rotated to positions 5..
    out = lm(ids[:, :6], shifted).cache
    out.layers = [layer.reindex(layer.positions - 5) for layer in out.layers]
    out.next_position = 6
    torch.testing.assert_close(lm(ids[:, 6:], out).logits, fresh.logits[:, 6:], atol=1e-5,
                               rtol=0)


@torch.no_grad()
def test_rollback_and_overwrite_and_greedy(pair) -> None:
    _, lm = pair
    ids = _ids(t=12)
    _, cache = lm.prefill(ids, chunk_size=12)
    back = cache.clone().rollback(3)
    assert back.length == 9 and back.seen == 9 and back.next_position == 9
    ref = lm(ids).logits
    torch.testing.assert_close(lm(ids[:, 9:], back).logits, ref[:, 9:], atol=1e-5, rtol=0)
    layer = cache.layers[0]
    slots = torch.tensor([0, 2]).expand(2, 2, 2)
    k = torch.zeros(2, 2, 2, lm.head_dim)
    w = layer.overwrite(slots, k, k + 1, torch.full((2, 2, 2), 99))
    assert w.positions[0, 0, :3].tolist() == [99, 1, 99] and (w.values[:, :, 2] == 1).all()
    assert (w.last_scores[:, :, 0] == 0).all() and len(w) == 12
    toks, gcache = lm.generate_greedy(ids, 4, chunk_size=5, policy=StreamingLLM(8, 2))
    assert toks.shape == (2, 4) and gcache.seen == 15 and gcache.length <= 9
    full_toks, _ = lm.generate_greedy(ids, 3, chunk_size=5)
    seq = ids
    for _ in range(3):
        seq = torch.cat([seq, lm(seq).logits[:, -1:].argmax(-1)], 1)
    assert full_toks.tolist() == seq[:, 12:].tolist()


@torch.no_grad()
def test_peft_lora_adapters_are_used() -> None:
    """LoRA put on q, k, v, o by peft (LoCoCo's post-training tuning) is seen by the forward."""
    from peft import LoraConfig, get_peft_model

    model = _model("llama")
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj"])).eval()
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.normal_()  # non-zero adapters
    ids = _ids(t=9)
    lm = ExplicitLM.from_hf(peft_model)
    torch.testing.assert_close(lm(ids).logits, peft_model(input_ids=ids).logits, atol=1e-5,
                               rtol=0)


def test_detach_cuts_graph(pair) -> None:
    _, lm = pair
    _, cache = lm.prefill(_ids(t=6), chunk_size=3)
    assert cache.layers[0].keys.requires_grad
    assert not cache.detach().layers[0].keys.requires_grad


# ---- errors ----

def test_errors_budget_and_sinks() -> None:
    with pytest.raises(ValueError, match="budget=4.*sinks=8"):
        StreamingLLM(budget=4, sinks=8)
    for bad in (0, -1):
        for make in (lambda b: StreamingLLM(b, 0), H2O, TopLatest):
            with pytest.raises(ValueError, match=f"budget={bad}"):
                make(bad)
    with pytest.raises(ValueError, match="sinks=-1"):
        StreamingLLM(4, -1)
    with pytest.raises(ValueError, match="recent=5"):
        H2O(4, recent=5)


def test_errors_chunk_size_and_ids(pair) -> None:
    _, lm = pair
    ids = _ids(t=6)
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"chunk_size={bad}"):
            lm.prefill(ids, chunk_size=bad)
    with pytest.raises(ValueError, match="input_ids.*2-D.*long"):
        lm(ids[0])
    with pytest.raises(ValueError, match="input_ids.*float32"):
        lm(ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        lm.prefill(ids.int(), chunk_size=2)
    with pytest.raises(ValueError, match="attend has 1 entries"):
        lm(ids, attend=[torch.zeros(2, 2, 0, dtype=torch.long)])
    with pytest.raises(ValueError, match="rollback n=7"):
        lm(ids).cache.rollback(7)


def test_errors_unsupported_model() -> None:
    with pytest.raises(TypeError, match="Linear.*LlamaForCausalLM, Qwen2ForCausalLM"):
        ExplicitLM.from_hf(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="rope_scaling type 'dynamic'"):
        Rotary.from_config(LlamaConfig(hidden_size=32, num_attention_heads=4,
                                       rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
