"""Norm fusion and R1-R4 on tiny transformers Llama, Qwen2 and Mistral models, in float64.

Reference: the model's own logits before the edit. transformers' stock RMSNorm computes in float32
even for a float64 model (about 5e-6 of logit error), so the exact tests patch its forward with
the same formula in the input's dtype (``exact_norm``); one test keeps the stock norm at 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

from mini.spinquant.rotation import (
    HadamardInputLinear,
    apply_r3,
    apply_r4,
    apply_v_quantizer,
    fuse_norms,
    rotate,
)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
D, DH, LAYERS, VOCAB, DFF = 64, 16, 2, 50, 128


def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.weight * (
        x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    )


@pytest.fixture
def exact_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stock RMSNorm formula without its float32 round trip."""
    for mod, cls in (
        (modeling_llama, "LlamaRMSNorm"),
        (modeling_qwen2, "Qwen2RMSNorm"),
        (modeling_mistral, "MistralRMSNorm"),
    ):
        monkeypatch.setattr(getattr(mod, cls), "forward", _norm_forward)


def _model(
    family: str,
    tied: bool,
    kv_heads: int = 2,
    seed: int = 0,
    dtype=torch.float64,
    **extra,
) -> nn.Module:
    """A tiny model with random norm scales and biases, so that every fold is exercised."""
    cfg_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=DFF,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=DH,
        tie_word_embeddings=tied,
        **extra,
    )
    model = model_cls(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def _orth(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, Rr = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(Rr))


IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


CASES = [
    ("llama", False),
    ("llama", True),
    ("qwen2", False),
    ("qwen2", True),
    ("mistral", False),
]


@pytest.mark.parametrize(("family", "tied"), CASES)
def test_fuse_rotate_r4_r3_keep_logits(
    exact_norm: None, family: str, tied: bool
) -> None:
    model = _model(family, tied)
    if family == "qwen2":
        assert model.model.layers[0].self_attn.v_proj.bias is not None
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    ref = _logits(model)

    assert fuse_norms(model) is model
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    for name, p in model.named_parameters():
        if "norm" in name:
            assert bool((p == 1).all()), name
    assert (_logits(model) - ref).abs().max().item() < 1e-10

    E0 = model.model.embed_tokens.weight.detach().clone()
    R1 = _orth(D, 1)
    assert rotate(model, R1, [_orth(DH, 2 + i) for i in range(LAYERS)]) is model
    assert (
        model.model.embed_tokens.weight - E0 @ R1
    ).abs().max().item() < 1e-12  # it did rotate
    assert (_logits(model) - ref).abs().max().item() < 1e-10

    assert apply_r4(model) is model
    assert isinstance(model.model.layers[0].mlp.down_proj, HadamardInputLinear)
    assert (_logits(model) - ref).abs().max().item() < 1e-10

    assert apply_r3(model) is model
    assert model.config._attn_implementation == "mini_spinquant_sdpa"
    assert (_logits(model) - ref).abs().max().item() < 1e-10


def test_untied_model_keeps_weights_untied_after_tie_weights(exact_norm: None) -> None:
    model = _model("llama", tied=True)
    fuse_norms(model)
    model.tie_weights()
    assert model.lm_head.weight is not model.model.embed_tokens.weight


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_r2_exact_without_gqa_and_with_one_kv_head(
    exact_norm: None, kv_heads: int
) -> None:
    model = _model("qwen2", tied=False, kv_heads=kv_heads)
    ref = _logits(model)
    fuse_norms(model)
    rotate(
        model,
        torch.eye(D, dtype=torch.float64),
        [_orth(DH, 7 + i) for i in range(LAYERS)],
    )
    assert (_logits(model) - ref).abs().max().item() < 1e-10


def test_output_side_biases_rotate(exact_norm: None) -> None:
    # Llama with o_proj and down_proj biases: b ← b·R1 keeps the function.
    model = _model("llama", tied=False, attention_bias=True, mlp_bias=True)
    assert model.model.layers[0].self_attn.o_proj.bias is not None
    assert model.model.layers[0].mlp.down_proj.bias is not None
    ref = _logits(model)
    fuse_norms(model)
    rotate(model, _orth(D, 3), [_orth(DH, 4), _orth(DH, 5)])
    apply_r4(model)
    apply_r3(model)
    assert (_logits(model) - ref).abs().max().item() < 1e-10


def test_tied_fresh_model_rotates_shared_weight_once(exact_norm: None) -> None:
    # Norm scales all 1 at init: rotate accepts the tied model and rotates the shared matrix once.
    _, model_cls = FAMILIES["llama"]
    torch.manual_seed(0)
    model = (
        model_cls(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=D,
                intermediate_size=DFF,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=DH,
                tie_word_embeddings=True,
            )
        )
        .double()
        .eval()
    )
    ref = _logits(model)
    rotate(model, _orth(D, 1))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (_logits(model) - ref).abs().max().item() < 1e-10


def test_stock_float32_norm_within_1e5() -> None:
    # Without the patch the stock norm rounds to float32: the invariance holds only to ~1e-6.
    model = _model("llama", tied=False)
    ref = _logits(model)
    fuse_norms(model)
    rotate(model, _orth(D, 1), [_orth(DH, 2), _orth(DH, 3)])
    apply_r4(model)
    err = (_logits(model) - ref).abs().max().item()
    assert 1e-12 < err < 1e-5


def test_r3_eager_and_incremental_decoding_with_cache(exact_norm: None) -> None:
    model = _model("qwen2", tied=False, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    ref = _logits(model)
    fuse_norms(model)
    rotate(model, _orth(D, 1), [_orth(DH, 2), _orth(DH, 3)])
    apply_r4(model)
    apply_r3(model)
    assert model.config._attn_implementation == "mini_spinquant_eager"
    with torch.no_grad():
        assert (model(IDS).logits - ref).abs().max().item() < 1e-10
        # prefix, then one token at a time through the KV cache (which stores keys before R3)
        out = model(IDS[:, :6], use_cache=True)
        steps = [out.logits]
        past = out.past_key_values
        for t in range(6, IDS.shape[1]):
            out = model(IDS[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
    assert (torch.cat(steps, 1) - ref).abs().max().item() < 1e-10


def test_quantizer_hooks_see_rotated_tensors_and_change_output(
    exact_norm: None,
) -> None:
    model = _model("llama", tied=False)
    fuse_norms(model)
    rotate(model, _orth(D, 1))
    ref = _logits(model)
    seen: dict[str, list[tuple[int, ...]]] = {"r4": [], "k": [], "v": []}

    def rec(key: str):
        def q(x: torch.Tensor) -> torch.Tensor:
            seen[key].append(tuple(x.shape))
            return x

        return q

    keys = set(model.state_dict())
    apply_r4(model, quantizer=rec("r4"))
    apply_r3(model, quantizer=rec("k"))
    apply_v_quantizer(model, rec("v"))
    # wrappers share parameters, Hadamards are not saved
    assert set(model.state_dict()) == keys
    assert (_logits(model) - ref).abs().max().item() < 1e-10
    B, T = IDS.shape
    assert seen == {
        "r4": [(B, T, DFF)] * LAYERS,
        "k": [(B, 2, T, DH)] * LAYERS,
        "v": [(B, T, 2, DH)] * LAYERS,
    }

    # the R4 quantiser receives x·H: a hook on the wrapper's input shows it
    down = model.model.layers[0].mlp.down_proj
    got: list[torch.Tensor] = []
    inp: list[torch.Tensor] = []
    down.quantizer = lambda x: (got.append(x), x)[1]
    h = down.register_forward_pre_hook(lambda m, a: inp.append(a[0]))
    _logits(model)
    h.remove()
    H = down.hadamard.signs.double() * DFF**-0.5
    assert (got[0] - inp[0] @ H).abs().max().item() < 1e-12

    # a coarse rounding quantiser on K changes the logits (the hook is on the live path)
    for layer in model.model.layers:
        layer.self_attn.spinquant_r3.quantizer = lambda k: torch.round(k * 2) / 2
    assert (_logits(model) - ref).abs().max().item() > 1e-3


def test_bfloat16_model_keeps_dtype() -> None:
    model = _model("llama", tied=True, dtype=torch.bfloat16)
    fuse_norms(model)
    rotate(model, _orth(D, 1).float(), [_orth(DH, 2).float()] * LAYERS)
    apply_r4(model)
    apply_r3(model)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.isfinite(_logits(model).float()).all()


def test_embedding_mean_centring_is_not_an_invariance(exact_norm: None) -> None:
    # The official fuse step subtracts each embedding row's mean (a LayerNorm leftover): on a
    # Llama it changes the logits by a large relative amount.
    model = _model("llama", tied=False)
    fuse_norms(model)
    ref = _logits(model)
    with torch.no_grad():
        E = model.model.embed_tokens.weight
        E.sub_(E.mean(dim=1, keepdim=True))
    rel = ((_logits(model) - ref).norm() / ref.norm()).item()
    assert rel > 0.01


# ------------------------------------------------------------------------------ errors


def test_non_orthogonal_and_wrong_size_rotations_raise(exact_norm: None) -> None:
    model = fuse_norms(_model("llama", tied=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"R1 is not orthogonal: max \|RᵀR − I\| = 0.0201 > 0.001"
    ):
        rotate(model, 1.01 * torch.eye(D, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"R1 must be a square matrix, got shape \(64, 32\)"
    ):
        rotate(model, torch.zeros(D, 32, dtype=torch.float64))
    with pytest.raises(
        ValueError, match=r"R1 has shape \(32, 32\); this model needs \(64, 64\)"
    ):
        rotate(model, torch.eye(32))
    with pytest.raises(TypeError, match=r"R1 must be a torch.Tensor, got list"):
        rotate(model, [[1.0]])
    with pytest.raises(ValueError, match=r"R2s must be a list of 2 matrices"):
        rotate(model, torch.eye(D), [torch.eye(DH)])
    bad = _orth(DH, 0).clone()
    bad[0, 0] += 0.01
    with pytest.raises(ValueError, match=r"R2s\[1\] is not orthogonal"):
        rotate(model, torch.eye(D), [torch.eye(DH), bad])
    with pytest.raises(
        ValueError, match=r"R2s\[0\] has shape \(8, 8\); this model needs \(16, 16\)"
    ):
        rotate(model, torch.eye(D), [torch.eye(8), torch.eye(8)])
    # the refused calls changed nothing (all checks run before the first fold)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rotate_requires_fused_norms() -> None:
    model = _model("llama", tied=False)
    with pytest.raises(
        ValueError,
        match=r"norm 'model.layers.0.input_layernorm' has a scale.*call fuse_norms",
    ):
        rotate(model, torch.eye(D))


def test_layernorm_with_bias_cannot_be_fused() -> None:
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=16)
    )
    with pytest.raises(
        ValueError,
        match=r"norm module 'transformer.h.0.ln_1' is a LayerNorm with a bias",
    ):
        fuse_norms(gpt2)

    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Module()
            self.model.norm = nn.LayerNorm(8)

    with pytest.raises(ValueError, match=r"'model.norm' is a LayerNorm with a bias"):
        rotate(Custom(), torch.eye(8))


def test_unknown_norm_type_and_layout_raise() -> None:
    class FancyRMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))

    m = nn.Module()
    m.norm = FancyRMSNorm()
    with pytest.raises(
        ValueError, match=r"'norm' is a FancyRMSNorm of an unsupported type"
    ):
        fuse_norms(m)
    with pytest.raises(
        TypeError, match=r"model of type Linear is not a Llama-family causal LM"
    ):
        apply_r4(nn.Linear(3, 3))


def test_online_ops_refuse_twice_and_other_attention() -> None:
    model = _model("llama", tied=False)
    apply_r4(model)
    with pytest.raises(
        ValueError, match=r"model.layers.0.mlp.down_proj already carries R4"
    ):
        apply_r4(model)
    apply_r3(model)
    with pytest.raises(
        ValueError, match=r"already uses the R3 attention 'mini_spinquant_sdpa'"
    ):
        apply_r3(model)
    other = _model("llama", tied=False)
    other.config._attn_implementation = "flex_attention"
    with pytest.raises(
        ValueError, match=r"attention implementation 'flex_attention' is not supported"
    ):
        apply_r3(other)
    with pytest.raises(TypeError, match=r"quantizer must be callable, got int"):
        apply_v_quantizer(other, 3)
    apply_v_quantizer(other, lambda v: v)
    with pytest.raises(ValueError, match=r"v_proj is already quantised"):
        apply_v_quantizer(other, lambda v: v)
