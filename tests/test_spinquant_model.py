"""mini.spinquant.model: the assembled SpinQuant pipeline on a tiny transformers Llama.

At 16 bits the rotated model computes the original function; the rotated weights that rotation
learning builds from R1/R2 are the weights rotate() folds; learning keeps R orthogonal and lowers
its loss; the quantised model's KL is positive and rotations lower it on an outlier model."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mini.spinquant.model import (
    _rotated_params,
    concentrate_outliers,
    init_rotations,
    kl_and_ppl,
    learn_rotations,
    quantize_model,
    residual_stats,
)
from mini.spinquant.quantizers import QuantConfig
from mini.spinquant.rotation import fuse_norms, rotate


def _model(seed=0, kv_heads=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16,
                      max_position_embeddings=64, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms that are not 1, so that fusing them matters
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


def _ids(seed=0, b=3, t=17):
    return torch.randint(0, 40, (b, t), generator=torch.Generator().manual_seed(seed))


def test_sixteen_bits_with_rotations_keeps_the_function():
    m = _model()
    x = _ids()[:, :-1]
    R1, R2s = init_rotations(m, "orthogonal", seed=1)
    q = quantize_model(m, "W16A16KV16", R1, R2s)
    with torch.no_grad():
        diff = (m(input_ids=x).logits - q(input_ids=x).logits).abs().max()
    assert float(diff) < 1e-4
    assert not any(isinstance(p, torch.Tensor) and p is q.lm_head.weight for p in m.parameters())


def test_learning_builds_the_weights_rotate_folds():
    m = _model()
    R1, R2s = init_rotations(m, "orthogonal", seed=2)
    fused = fuse_norms(__import__("copy").deepcopy(m))
    base = {n: p.detach().float() for n, p in fused.named_parameters()}
    got = _rotated_params(base, R1, R2s, 2, 16, 16, True, "")
    folded = dict(rotate(fused, R1, R2s).named_parameters())
    for name, value in got.items():
        torch.testing.assert_close(value, folded[name].detach(), atol=2e-5, rtol=1e-5)
    assert {n for n in folded if not n.endswith("norm.weight")} == set(got)


def test_learn_rotations_stays_orthogonal_and_lowers_the_loss():
    m = _model(3)
    batches = [_ids(s, b=4, t=17) for s in range(2)]
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    res = learn_rotations(m, batches, QuantConfig.parse("W4A4KV4"), steps=12, lr=1.0, seed=0)
    eye = torch.eye(64)
    assert float((res.R1.T @ res.R1 - eye).abs().max()) < 1e-4
    assert all(float((r.T @ r - torch.eye(16)).abs().max()) < 1e-4 for r in res.R2s)
    first, last = sum(res.losses[:2]) / 2, sum(res.losses[-2:]) / 2
    assert last < first, res.losses
    # the model itself is untouched (its norms are not fused, its weights not rotated)
    assert all(torch.equal(p, before[n]) for n, p in m.named_parameters())


def test_quantised_model_has_positive_kl_and_errors():
    m = _model(4)
    batches = [_ids(9, b=2, t=17)]
    q = quantize_model(m, "W4A4KV4")
    kl, ppl = kl_and_ppl(m, q, batches)
    kl0, _ = kl_and_ppl(m, quantize_model(m, "W16A16KV16"), batches)
    assert kl > 1e-5 and kl0 < 1e-10 and ppl > 1  # random init: near-uniform logits, small KL
    gq = quantize_model(m, "W4A16KV16", weights="gptq", calib=[_ids(5, b=2, t=16)])
    assert kl_and_ppl(m, gq, batches)[0] > 0
    with pytest.raises(ValueError, match="weights must be one of"):
        quantize_model(m, "W4A4KV4", weights="awq")
    with pytest.raises(ValueError, match="weights='gptq' needs calib"):
        quantize_model(m, "W4A4KV4", weights="gptq")
    # K quantised without R3: the hook quantises K alone; with R3 the result differs
    no_r3 = kl_and_ppl(m, quantize_model(m, "W16A16KV4", r3=False, r4=False), batches)[0]
    with_r3 = kl_and_ppl(m, quantize_model(m, "W16A16KV4", r3=True, r4=False), batches)[0]
    assert no_r3 > 0 and with_r3 > 0 and no_r3 != with_r3
    with pytest.raises(TypeError, match="config must be a QuantConfig"):
        quantize_model(m, 4)
    with pytest.raises(ValueError, match="init must be one of"):
        init_rotations(m, "identity")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        learn_rotations(m, batches, "W4A4KV4", steps=0)


def test_concentrate_outliers_keeps_the_function_and_makes_massive_channels():
    m = _model(6)
    batches = [_ids(s, b=4, t=17) for s in range(3)]
    om, R = concentrate_outliers(m, batches)
    assert float((R.T @ R - torch.eye(64)).abs().max()) < 1e-5
    with torch.no_grad():
        x = batches[0][:, :-1]
        assert float((om(input_ids=x).logits - m(input_ids=x).logits).abs().max()) < 1e-4
    before, after = residual_stats(m, batches), residual_stats(om, batches)
    assert after["max_channel_over_rms"] > 1.5 * before["max_channel_over_rms"], (before, after)


def test_the_loading_path_by_name_on_a_tiny_model_saved_locally(tmp_path):
    """The lab's "real checkpoint" path (mini.assets.load_model, as for a Hub name) on a tiny
    model saved with save_pretrained: it loads, rotates and quantises like the built one."""
    from mini.assets import load_model

    m = _model(7)
    m.save_pretrained(tmp_path / "tiny")
    loaded = load_model(tmp_path / "tiny")
    loaded.config._attn_implementation = "eager"
    x = _ids(11)[:, :-1]
    R1, R2s = init_rotations(loaded, "hadamard", seed=0)
    q16 = quantize_model(loaded, "W16A16KV16", R1, R2s)
    with torch.no_grad():
        assert float((q16(input_ids=x).logits - m(input_ids=x).logits).abs().max()) < 1e-4
    kl, _ = kl_and_ppl(loaded, quantize_model(loaded, "W4A4KV4", R1, R2s), [_ids(11)])
    assert kl > 0
