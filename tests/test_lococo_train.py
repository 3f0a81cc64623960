"""Training LoCoCo (mini.lococo.train): the chunked loss equals the full forward's without
compression, a few steps reduce the loss (compressor alone and with LoRA), the ExplicitLM sees
peft's adapters, evaluation of policies, and errors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from mini.lm.kvcache import ExplicitLM, FullCache, StreamingLLM, TopLatest
from mini.lm.longctx import (
    IGNORE_INDEX,
    LongContextVocab,
    MajorityTask,
    NeedleTask,
    TaskBatch,
)
from mini.lococo import (
    POLICY_NAMES,
    LoCoCo,
    add_lora,
    chunked_loss,
    compare_policies,
    evaluate_policy,
    train_compressor,
)

V = LongContextVocab().vocab_size  # the tasks' token ids


def _model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_theta=500.0, attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


def _corpus_batch(seed: int = 0) -> TaskBatch:
    """A needle batch with next-token labels everywhere (a corpus-like loss in every chunk)."""
    b = NeedleTask(context_len=48, n_pairs=2).sample(8, seed)
    labels = torch.cat([b.input_ids[:, 1:], torch.full((8, 1), IGNORE_INDEX)], dim=1)
    return TaskBatch(b.input_ids, labels, b.answer_pos, b.answer)


def test_chunked_loss_without_compression_is_the_full_forward_loss():
    model = _model()
    lm = ExplicitLM.from_hf(model)
    b = _corpus_batch()
    with torch.no_grad():
        want = F.cross_entropy(model(b.input_ids).logits.reshape(-1, V), b.labels.reshape(-1),
                               ignore_index=IGNORE_INDEX)
        for policy in (None, FullCache()):
            got = chunked_loss(lm, policy, b.input_ids, b.labels, chunk_size=12)
            assert abs(got - float(want)) < 1e-5


def test_a_few_steps_reduce_the_loss_compressor_alone():
    lm = ExplicitLM.from_hf(_model())
    b = _corpus_batch()
    pol = LoCoCo.for_model(lm, 8, kernel_size=5, init_gain=1.0)
    before = [p.detach().clone() for p in lm.hf.parameters()]
    res = train_compressor(lm, pol, lambda step: b, steps=30, chunk_size=12, lr=0.2)
    assert res["losses"][-1] < res["losses"][0] - 5e-3
    assert all(torch.equal(p, q) for p, q in zip(before, lm.hf.parameters()))  # the LM is frozen
    assert res["lora_params"] == 0 and len(res["etas"]) == 2 and res["etas"] != [0.5, 0.5]
    assert not pol.training


def test_joint_training_with_lora_reduces_the_loss_and_truncates_per_chunk():
    """Labels in every chunk: a cache not detached between chunks would make the second
    backward run through the first chunk's freed graph and fail."""
    lm = ExplicitLM.from_hf(_model())
    b = _corpus_batch()
    pol = LoCoCo.for_model(lm, 8, kernel_size=5)
    res = train_compressor(lm, pol, lambda step: b, steps=15, chunk_size=12, lora_rank=4, lora_lr=1e-2)
    assert res["lora_params"] == 2 * (2 * 4 * (32 + 32) + 2 * 4 * (32 + 16))  # layers × (q, o + k, v)
    assert res["losses"][-1] < res["losses"][0] - 0.05


def test_explicit_lm_uses_peft_adapters():
    model = _model()
    lm = ExplicitLM.from_hf(model)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = lm(ids).logits
        peft_model = add_lora(lm, rank=2, alpha=4.0)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
        adapted = lm(ids).logits
        ref = peft_model(input_ids=ids).logits
    assert float((adapted - base).abs().max()) > 1e-3
    torch.testing.assert_close(adapted, ref, atol=1e-5, rtol=0)
    lm2 = ExplicitLM.from_hf(peft_model)  # built from the peft wrapper: the same base
    assert lm2.hf is lm.hf


def test_evaluate_policy_same_examples_for_every_policy():
    lm = ExplicitLM.from_hf(_model())
    task = MajorityTask(context_len=48, n_votes=6)
    accs = {name: evaluate_policy(lm, pol, task, chunk_size=12, n_examples=16, batch_size=8)
            for name, pol in [("full", None), ("top", TopLatest(8)), ("stream", StreamingLLM(8, 2)),
                              ("lococo", LoCoCo.for_model(lm, 8, kernel_size=5))]}
    assert all(0.0 <= a <= 1.0 for a in accs.values())
    assert evaluate_policy(lm, None, task, chunk_size=48, n_examples=16, batch_size=8) == accs["full"]


def test_compare_policies_runs_every_policy_on_the_same_examples():
    lm = ExplicitLM.from_hf(_model())
    task = MajorityTask(context_len=48, n_votes=6)
    acc, trained = compare_policies(lm, task, 8, steps=2, seed=3, n_examples=16, chunk_size=12, batch_size=4)
    assert tuple(acc) == POLICY_NAMES and all(0.0 <= a <= 1.0 for a in acc.values())
    assert set(trained) == {"LoCoCo trained", "uniform trained"}
    assert trained["uniform trained"].config.mixing == "uniform"
    # the same examples (seed 100 + seed) as evaluate_policy
    assert acc["TopLatest"] == evaluate_policy(lm, TopLatest(8), task, chunk_size=12, n_examples=16, seed=103)
    only, none = compare_policies(lm, task, 8, seed=3, n_examples=16, chunk_size=12, policies=("full",))
    assert only == {"full": acc["full"]} and none == {}
    with pytest.raises(ValueError, match=r"policies must be a non-empty tuple of names from .*got \('top',\)"):
        compare_policies(lm, task, 8, policies=("top",))
    with pytest.raises(ValueError, match=r"budget must be an integer >= 1, got 0"):
        compare_policies(lm, task, 0)


def test_errors_are_named():
    lm = ExplicitLM.from_hf(_model())
    b = _corpus_batch()
    pol = LoCoCo.for_model(lm, 8, kernel_size=5)
    with pytest.raises(ValueError, match=r"T=48 must be a multiple of chunk_size=10"):
        chunked_loss(lm, pol, b.input_ids, b.labels, chunk_size=10)
    with pytest.raises(ValueError, match=r"chunk_size must be an integer >= 1, got 0"):
        chunked_loss(lm, pol, b.input_ids, b.labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"labels must have input_ids' shape \(8, 48\)"):
        chunked_loss(lm, pol, b.input_ids, b.labels[:, :12], chunk_size=12)
    with pytest.raises(ValueError, match=r"labels hold no position to predict"):
        chunked_loss(lm, pol, b.input_ids, torch.full_like(b.labels, IGNORE_INDEX), chunk_size=12)
    with pytest.raises(TypeError, match=r"lm must be an ExplicitLM .*got LlamaForCausalLM"):
        chunked_loss(lm.hf, pol, b.input_ids, b.labels, chunk_size=12)
    with pytest.raises(TypeError, match=r"policy must be a trainable cache policy .*got TopLatest"):
        train_compressor(lm, TopLatest(8), lambda s: b, steps=1, chunk_size=12)
    with pytest.raises(ValueError, match=r"steps must be an integer >= 1, got 0"):
        train_compressor(lm, pol, lambda s: b, steps=0, chunk_size=12)
    with pytest.raises(ValueError, match=r"lr must be a positive finite number, got -1.0"):
        train_compressor(lm, pol, lambda s: b, steps=1, chunk_size=12, lr=-1.0)
    with pytest.raises(TypeError, match=r"data must be a task with .sample"):
        train_compressor(lm, pol, 3, steps=1, chunk_size=12)
    frozen = LoCoCo.for_model(lm, 8, mixing="uniform", eta_mode="fixed")
    with pytest.raises(ValueError, match=r"nothing to train"):
        train_compressor(lm, frozen, lambda s: b, steps=1, chunk_size=12)
    with pytest.raises(ValueError, match=r"rank must be an integer >= 1, got 0"):
        add_lora(ExplicitLM.from_hf(copy.deepcopy(lm.hf)), rank=0)
