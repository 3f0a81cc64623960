"""TriForce's hierarchy over real models (mini.triforce.hierarchy): the law of the first emitted
tokens equals the processed target's by exact enumeration (float64 tiny random Llamas, V = 6) for
every mode, the released middle sampler does not; a Monte Carlo χ² over one prefilled prompt;
greedy output equals the target's greedy output; counters add up; caches consistent after
rollback; errors."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mini.lm.kvcache import ExplicitLM
from mini.triforce import (
    SamplingConfig,
    TriForce,
    TriForceConfig,
    chi_square_test,
    total_variation,
)

V = 6


def _lm(hidden: int, layers: int, seed: int, vocab: int = V) -> ExplicitLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval().double()
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)  # spread the laws over several tokens
    return ExplicitLM.from_hf(model)


@pytest.fixture(scope="module")
def models():
    return _lm(32, 2, 0), _lm(16, 1, 1)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, V, (1, 45), generator=torch.Generator().manual_seed(0))


def _cfg(**kw) -> TriForceConfig:
    base = {"budget": 16, "chunk_size": 4, "draft_budget": 12, "draft_sinks": 4, "gamma": 1,
            "sampling": SamplingConfig(0.6, 0.9)}
    base.update(kw)
    return TriForceConfig(**base)


@pytest.mark.parametrize("mode", ["autoregressive", "draft", "retrieval", "triforce"])
def test_first_two_tokens_exact_by_enumeration(models, prompt, mode):
    tf = TriForce(*models, _cfg(), mode=mode)
    law = tf.first_tokens_law(prompt, 2)
    assert abs(sum(law.values()) - 1.0) < 1e-12
    assert total_variation(law, tf.target_law(prompt, 2)) < 1e-12


def test_first_token_exact_at_temperature_one_gamma_two(models, prompt):
    tf = TriForce(*models, _cfg(gamma=2, sampling=SamplingConfig(1.0, 0.9)))
    ref = tf.target_law(prompt, 1)
    assert len(ref) >= 5
    assert total_variation(tf.first_tokens_law(prompt, 1), ref) < 1e-12


def test_released_middle_sampler_is_not_exact(models, prompt):
    tf = TriForce(*models, _cfg(released=True))
    tv = total_variation(tf.first_tokens_law(prompt, 1), tf.target_law(prompt, 1))
    assert tv > 0.05  # measured 0.117


def test_monte_carlo_chi_square_one_prefilled_prompt(models, prompt):
    tf = TriForce(*models, _cfg())
    counts = tf.sample_first_tokens(prompt, 3000, 2, torch.Generator().manual_seed(0))
    assert sum(counts.values()) == 3000
    res = chi_square_test(counts, tf.target_law(prompt, 2))
    assert res.p_value > 1e-3
    plain = tf.sample_first_tokens(prompt, 40, 2, torch.Generator().manual_seed(1), memo=False)
    assert sum(plain.values()) == 40


def test_greedy_equals_target_greedy(models, prompt):
    target, draft = models
    want, _ = target.generate_greedy(prompt, 12, chunk_size=64)
    for mode in ("autoregressive", "draft", "retrieval", "triforce"):
        tf = TriForce(target, draft, _cfg(gamma=3, sampling=SamplingConfig(greedy=True)), mode=mode)
        got = tf.generate(prompt, 12)
        assert got.tolist() == want.tolist(), mode


def test_counters_add_up_and_caches_consistent(models, prompt):
    target, draft = models
    tf = TriForce(target, draft, _cfg(gamma=3, sampling=SamplingConfig(1.0, 1.0), draft_budget=None))
    out = tf.generate(prompt, 12, torch.Generator().manual_seed(3))
    assert out.shape == (1, 12)
    c = tf.counters
    # each target pass verifies and emits accepted + 1 tokens
    assert c["target"].accepted + c["target"].passes == tf.tokens >= 12
    assert tf.tokens_per_target_pass() * c["target"].passes == pytest.approx(tf.tokens)
    assert c["middle"].proposed == c["target"].proposed >= 3 * c["target"].passes
    assert c["draft"].proposed <= c["draft"].passes + c["target"].passes
    assert 0.0 <= c["draft"].acceptance <= 1.0
    state = tf.last_state
    seq = state.seq
    ids = torch.tensor([seq])
    for name, lm in (("target", target), ("draft", draft)):
        lv = state.levels[name]
        lv.rollback_to(seq[:-1])
        (law,) = lv.laws_after(seq, len(seq))  # feeds what rollback removed, reads the law
        fresh = tf.config.sampling.probs(lm(ids).logits[0, -1].double())
        assert torch.allclose(law, fresh, atol=1e-10), name
        full = lm(ids).cache
        assert lv.cache.length == len(seq)
        for a, b in zip(lv.cache.layers, full.layers):
            assert torch.allclose(a.keys, b.keys, atol=1e-10) and torch.equal(a.positions, b.positions)
    ar = TriForce(target, None, _cfg(sampling=SamplingConfig(1.0, 1.0)), mode="autoregressive")
    ar.generate(prompt, 7, torch.Generator().manual_seed(0))
    assert ar.counters["target"].passes == ar.tokens - 1 == 6  # the first law comes from the prefill


def test_draft_streaming_cache_stays_within_budget(models, prompt):
    tf = TriForce(*models, _cfg(gamma=2, sampling=SamplingConfig(1.0, 1.0)), mode="draft")
    tf.generate(prompt, 8, torch.Generator().manual_seed(0))
    d = tf.last_state.levels["draft"].cache
    assert d.length <= 12 + 2 + 2
    assert int(d.layers[0].positions.max()) < d.length  # re-indexed positions


def test_errors(models, prompt):
    target, draft = models
    with pytest.raises(ValueError, match=r"gamma \(proposals per round\) must be an integer >= 1, got 0"):
        _cfg(gamma=0)
    with pytest.raises(ValueError, match=r"temperature must be a finite float > 0 when sampling"):
        _cfg(sampling=SamplingConfig(0.0, 0.9))
    with pytest.raises(ValueError, match=r"budget=18 must be a multiple of chunk_size=4"):
        _cfg(budget=18)
    with pytest.raises(ValueError, match=r"budget=4 must be a multiple of chunk_size=4 and at least two"):
        _cfg(budget=4)
    with pytest.raises(ValueError, match=r"draft_budget=4 must exceed draft_sinks=4"):
        _cfg(draft_budget=4)
    with pytest.raises(ValueError, match=r"different vocabulary sizes: draft 7, target 6"):
        TriForce(target, _lm(16, 1, 2, vocab=7), _cfg())
    with pytest.raises(ValueError, match=r"mode='beam' is not allowed"):
        TriForce(target, draft, _cfg(), mode="beam")
    with pytest.raises(TypeError, match=r"mode='triforce' needs draft"):
        TriForce(target, None, _cfg())
    with pytest.raises(ValueError, match=r"released=True .* needs mode='triforce'"):
        TriForce(target, draft, _cfg(released=True), mode="draft")
    tf = TriForce(target, draft, _cfg())
    with pytest.raises(ValueError, match=r"prompt_ids has T=20 tokens; the retrieval cache \(budget=16\)"):
        tf.generate(prompt[:, :20], 4)
    with pytest.raises(ValueError, match=r"max_new_tokens=40 does not fit the retrieval cache's tail"):
        tf.generate(prompt, 40)
    with pytest.raises(ValueError, match=r"prompt_ids must be a \(1, T\) torch.long tensor"):
        tf.generate(prompt.float(), 4)
    short = TriForce(target, draft, _cfg(), mode="draft")  # no retrieval cache: short prompts work
    assert short.generate(prompt[:, :20], 4, torch.Generator().manual_seed(0)).shape == (1, 4)
