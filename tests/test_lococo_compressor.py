"""LoCoCo's compressor (mini.lococo.compressor): η = 0 is eviction by the latest scores (TopLatest),
convex mixing rows, exactly M slots, GQA through the explicit-cache LM, gradients to the
convolution and η, and errors on bad settings."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mini.kernels.dispatch import HAS_TRITON
from mini.lm.kvcache import ExplicitLM, LayerCache, TopLatest
from mini.lococo.compressor import ConvCompressor, LoCoCo, LoCoCoConfig, partition


def _cache(B: int = 2, H: int = 2, S: int = 20, d: int = 8, seed: int = 0, acc: bool = True) -> LayerCache:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, H, S, d, generator=g)
    values = torch.randn(B, H, S, d, generator=g)
    positions = torch.arange(S).expand(B, H, S).clone()
    scores = torch.rand(B, H, S, generator=g)  # distinct with probability 1
    return LayerCache(keys, values, positions, scores, torch.rand(B, H, S, generator=g) if acc else None)


def _by_position(c: LayerCache) -> LayerCache:
    return c.select(c.positions.argsort(dim=-1))


def _lm(seed: int = 0) -> ExplicitLM:
    """Tiny GQA Llama: 4 query heads, 2 KV heads, head_dim 8, 2 layers."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=500.0, attn_implementation="eager")
    return ExplicitLM.from_hf(LlamaForCausalLM(cfg).eval())


# --------------------------------------------------------------------------- η = 0 is eviction
@pytest.mark.parametrize("mode", ["fixed", "clamp"])
@pytest.mark.parametrize("budget, rate", [(8, 0.5), (8, 0.0), (7, 0.25), (12, 0.75)])
def test_eta_zero_equals_top_latest(mode, budget, rate):
    cache = _cache()
    pol = LoCoCo(LoCoCoConfig(budget=budget, head_dim=8, hh_keep_rate=rate, eta_init=0.0,
                              eta_mode=mode, kernel_size=5), n_layers=1)
    got = _by_position(pol.compress(0, cache))
    want = _by_position(TopLatest(budget).compress(0, cache))
    assert len(got) == budget
    assert torch.equal(got.positions, want.positions)
    assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    assert torch.equal(got.last_scores, want.last_scores) and torch.equal(got.acc_scores, want.acc_scores)


@torch.no_grad()
def test_eta_zero_prefill_matches_top_latest_logits():
    lm = _lm()
    ids = torch.randint(0, 40, (2, 50), generator=torch.Generator().manual_seed(3))
    pol = LoCoCo.for_model(lm, 12, eta_init=0.0, eta_mode="fixed", kernel_size=5)
    a, ca = lm.prefill(ids, chunk_size=10, policy=pol)
    b, cb = lm.prefill(ids, chunk_size=10, policy=TopLatest(12))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # same slots, another order
    for la, lb in zip(ca.layers, cb.layers):
        assert torch.equal(la.positions.sort(-1).values, lb.positions.sort(-1).values)


# --------------------------------------------------------------------------- the step itself
@pytest.mark.parametrize("mixing", ["conv", "uniform"])
def test_mixing_rows_are_convex_and_the_slots_are_what_they_should_be(mixing):
    cache = _cache(S=33)
    cfg = LoCoCoConfig(budget=10, head_dim=8, kernel_size=5, mixing=mixing, init_gain=3.0)
    comp = ConvCompressor(cfg)
    out = comp(cache.keys, cache.values, cache.positions, cache.last_scores, cache.acc_scores)
    W = out.weights  # (B, H, m, s′)
    m, keep = cfg.mix_slots, cfg.keep_slots
    assert (m, keep) == (5, 5) and W.shape == (2, 2, m, 33 - keep)
    assert bool((W >= 0).all())
    torch.testing.assert_close(W.sum(-1), torch.ones(2, 2, m), atol=1e-6, rtol=0)
    assert out.keys.shape == (2, 2, 10, 8) and out.positions.shape == (2, 2, 10)
    kept, evicted = partition(cache.last_scores, keep)
    # the kept slots are the top M − m by score, in slot order, untouched
    assert torch.equal(out.keys[:, :, :keep], torch.gather(cache.keys, 2, kept[..., None].expand(-1, -1, -1, 8)))
    top = cache.last_scores.topk(keep, dim=-1).indices.sort(-1).values
    assert torch.equal(kept, top)
    # the mixed slots are W times the evicted keys and values
    ke = torch.gather(cache.keys, 2, evicted[..., None].expand(-1, -1, -1, 8))
    ve = torch.gather(cache.values, 2, evicted[..., None].expand(-1, -1, -1, 8))
    torch.testing.assert_close(out.keys[:, :, keep:], W @ ke, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.values[:, :, keep:], W @ ve, atol=1e-6, rtol=1e-6)
    # a mixed slot's position is its dominant token's; its scores are W-weighted
    pe = torch.gather(cache.positions, 2, evicted)
    assert torch.equal(out.positions[:, :, keep:], torch.gather(pe, 2, W.argmax(-1)))
    se = torch.gather(cache.last_scores, 2, evicted)
    torch.testing.assert_close(out.last_scores[:, :, keep:], (W @ se[..., None])[..., 0])


def test_uniform_ablation_and_eta_one():
    cache = _cache(S=30)
    cfg = LoCoCoConfig(budget=8, head_dim=8, kernel_size=3, mixing="uniform", eta_init=1.0, eta_mode="fixed")
    out = ConvCompressor(cfg)(cache.keys, cache.values, cache.positions, cache.last_scores)
    s = 30 - cfg.keep_slots
    torch.testing.assert_close(out.weights, torch.full((2, 2, 4, s), 1.0 / s))
    assert out.acc_scores is None


def test_clamp_keeps_eta_in_unit_interval():
    comp = ConvCompressor(LoCoCoConfig(budget=8, head_dim=8, kernel_size=3, eta_mode="clamp"))
    with torch.no_grad():
        comp.eta_param.fill_(1.7)
    assert float(comp.eta.detach()) == 1.0
    cache = _cache()
    W = comp(cache.keys, cache.values, cache.positions, cache.last_scores).weights
    assert bool((W >= 0).all()) and torch.allclose(W.sum(-1), torch.ones(()), atol=1e-6)
    with torch.no_grad():
        comp.eta_param.fill_(-0.3)
    assert float(comp.eta.detach()) == 0.0


@pytest.mark.parametrize("S", [1, 8, 9, 40])
def test_exactly_min_s_budget_slots(S):
    cache = _cache(S=S)
    pol = LoCoCo(LoCoCoConfig(budget=8, head_dim=8, kernel_size=21), n_layers=3)
    out = pol.compress(2, cache)
    assert len(out) == min(S, 8) and out.keys.shape == (2, 2, min(S, 8), 8)
    if S <= 8:
        assert out is cache


def test_small_init_does_not_saturate_the_softmax():
    """The official N(0, 1) init gives near one-hot rows; ours starts near uniform."""
    cache = _cache(S=60, d=16)
    comp = ConvCompressor(LoCoCoConfig(budget=8, head_dim=16, eta_init=0.5))
    A = comp.attention_weights(cache.keys[:, :, :56], cache.values[:, :, :56])
    assert float(A.detach().max()) < 0.2  # uniform is 1/56 ≈ 0.018
    with torch.no_grad():
        comp.conv.weight.normal_(0.0, 1.0)
    assert float(comp.attention_weights(cache.keys[:, :, :56], cache.values[:, :, :56]).detach().max()) > 0.9


# --------------------------------------------------------------------------- GQA and gradients
def test_gqa_per_kv_head_partition_through_the_lm():
    lm = _lm()
    ids = torch.randint(0, 40, (2, 40), generator=torch.Generator().manual_seed(1))
    pol = LoCoCo.for_model(lm, 10, kernel_size=5)
    assert pol.config.n_kv_heads == 2 and pol.config.head_dim == 8 and len(pol.compressors) == 2
    with torch.no_grad():
        _, cache = lm.prefill(ids[:, :30], chunk_size=15)  # scores from the second chunk's queries
        out = pol.compress(0, cache.layers[0])
    assert out.keys.shape == (2, 2, 10, 8) and out.last_scores.shape == (2, 2, 10)
    kept = out.positions[:, :, :pol.config.keep_slots]
    want = cache.layers[0].last_scores.topk(pol.config.keep_slots, -1).indices.sort(-1).values
    assert torch.equal(kept, want)  # slot = position in a fresh cache
    assert not torch.equal(kept[:, 0], kept[:, 1])  # each KV head chose its own heavy hitters
    with torch.no_grad():
        logits, cache = lm.prefill(ids, chunk_size=10, policy=pol)
    assert logits.shape == (2, 40, 40) and cache.length == 20  # 10 compressed + the last chunk
    assert bool(torch.isfinite(logits).all())


def test_gradients_reach_conv_and_eta_through_one_chunk_and_not_the_inputs():
    lm = _lm()
    for p in lm.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 40, (2, 30), generator=torch.Generator().manual_seed(2))
    pol = LoCoCo.for_model(lm, 8, kernel_size=5)
    _, cache = lm.prefill(ids[:, :20], chunk_size=20)
    leaf = cache.layers[0].keys.clone().requires_grad_(True)
    cache.layers[0].keys = leaf
    cache = cache.compress(pol)
    out = lm(ids[:, 20:], cache)
    out.logits.logsumexp(-1).mean().backward()
    for comp in pol.compressors:
        assert comp.conv.weight.grad is not None and float(comp.conv.weight.grad.abs().sum()) > 0
        assert comp.eta_param.grad is not None and float(comp.eta_param.grad.abs()) > 0
    assert leaf.grad is None  # the stored cache is detached (one-step truncation)


def test_fixed_eta_is_not_a_parameter():
    pol = LoCoCo(LoCoCoConfig(budget=8, head_dim=4, eta_mode="fixed", kernel_size=3), n_layers=2)
    names = [n for n, _ in pol.named_parameters()]
    assert not any("eta" in n for n in names) and any("conv.weight" in n for n in names)
    assert pol.etas == [0.5, 0.5]
    uni = LoCoCo(LoCoCoConfig(budget=8, head_dim=4, mixing="uniform", eta_mode="fixed"), n_layers=1)
    assert list(uni.parameters()) == []


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 0}, r"budget must be a positive integer .*got 0"),
    ({"budget": 8.0}, r"budget must be a positive integer .*got 8.0"),
    ({"hh_keep_rate": 1.0}, r"hh_keep_rate must be a number in \[0, 1\).*got 1.0"),
    ({"hh_keep_rate": -0.1}, r"hh_keep_rate must be a number in \[0, 1\).*got -0.1"),
    ({"budget": 1}, r"budget=1 with hh_keep_rate=0.5 leaves m = .* = 0 mixed slots.*≥ 2"),
    ({"budget": 3, "hh_keep_rate": 0.9}, r"budget=3 with hh_keep_rate=0.9 .*≥ 10"),
    ({"kernel_size": 4}, r"kernel_size must be a positive odd integer.*got 4"),
    ({"eta_init": 1.5}, r"eta_init must be a number in \[0, 1\], got 1.5"),
    ({"eta_init": 0.0}, r"eta_init must be in \(0, 1\) with eta_mode='sigmoid'"),
    ({"eta_mode": "tanh"}, r"eta_mode must be one of .*got 'tanh'"),
    ({"mixing": "mean"}, r"mixing must be one of .*got 'mean'"),
    ({"head_dim": 0}, r"head_dim must be a positive integer, got 0"),
    ({"init_gain": -1.0}, r"init_gain must be a finite number ≥ 0, got -1.0"),
    ({"n_kv_heads": 0}, r"n_kv_heads must be a positive integer or None, got 0"),
])
def test_bad_config_is_named(kwargs, match):
    args = {"budget": 8, "head_dim": 8} | kwargs
    with pytest.raises(ValueError, match=match):
        LoCoCoConfig(**args)


def test_bad_cache_and_layer_are_named():
    pol = LoCoCo(LoCoCoConfig(budget=8, head_dim=8, kernel_size=3, n_kv_heads=2), n_layers=2)
    cache = _cache()
    with pytest.raises(ValueError, match=r"layer_idx must be in \[0, 2\), got 2"):
        pol.compress(2, cache)
    with pytest.raises(ValueError, match=r"last_scores is None: LoCoCo ranks slots"):
        pol.compress(0, LayerCache(cache.keys, cache.values, cache.positions, None, None))
    with pytest.raises(ValueError, match=r"head dimension must be head_dim=8 .*got 4"):
        pol.compress(0, _cache(d=4))
    with pytest.raises(ValueError, match=r"must have n_kv_heads=2 KV heads .*got 3"):
        pol.compress(0, _cache(H=3))
    with pytest.raises(ValueError, match=r"last_scores must have shape \(2, 2, 20\)"):
        pol.compress(0, LayerCache(cache.keys, cache.values, cache.positions, cache.last_scores[..., :5], None))
    with pytest.raises(ValueError, match=r"n_layers must be a positive integer, got 0"):
        LoCoCo(LoCoCoConfig(budget=8, head_dim=8), n_layers=0)
    with pytest.raises(TypeError, match=r"config must be a LoCoCoConfig, got dict"):
        ConvCompressor({"budget": 8})
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'gpu'"):
        ConvCompressor(LoCoCoConfig(budget=8, head_dim=8), backend="gpu")
    with pytest.raises(TypeError, match=r"model must have a .config"):
        LoCoCo.for_model(object(), 8)


@pytest.mark.skipif(not HAS_TRITON, reason="the Triton interpreter needs triton")
def test_inference_mixing_through_the_kernel_equals_the_autograd_path():
    cache = _cache(S=29)
    cfg = LoCoCoConfig(budget=8, head_dim=8, kernel_size=5, init_gain=2.0)
    ref = ConvCompressor(cfg, backend="reference")
    ker = ConvCompressor(cfg, backend="interpret")
    ker.load_state_dict(ref.state_dict())
    train_out = ref(cache.keys, cache.values, cache.positions, cache.last_scores)  # autograd path
    assert train_out.keys.requires_grad
    with torch.no_grad():
        got = ker(cache.keys, cache.values, cache.positions, cache.last_scores)  # the Triton kernel
    torch.testing.assert_close(got.keys, train_out.keys.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.values, train_out.values.detach(), atol=1e-6, rtol=1e-6)


def test_seed_makes_the_init_reproducible():
    cfg = LoCoCoConfig(budget=8, head_dim=4, kernel_size=3)
    a, b = LoCoCo(cfg, 2, seed=3), LoCoCo(cfg, 2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.compressors[0].conv.weight, a.compressors[1].conv.weight)
    assert not torch.equal(a.compressors[0].conv.weight, LoCoCo(cfg, 2, seed=4).compressors[0].conv.weight)
    with pytest.raises(ValueError, match=r"seed must be a non-negative integer or None, got -1"):
        LoCoCo(cfg, 2, seed=-1)
