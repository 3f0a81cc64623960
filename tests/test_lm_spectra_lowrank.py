"""Tests of mini.lm.spectra (singular values, stable rank, energy, the gradient recorder) and
mini.lm.lowrank (LowRankLinear, replace_linears, to_low_rank, apply_lora), and of train_lm's
on_gradients callback."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mini.lm import (
    DEFAULT_PATTERNS,
    PROJECTED_MODULES,
    LowRankLinear,
    TrainerConfig,
    apply_lora,
    build_model,
    linear_parameter_names,
    replace_linears,
    synthetic_lm_data,
    tiny_llama_config,
    to_low_rank,
    train_lm,
)
from mini.lm.spectra import (
    GradientSpectrumRecorder,
    cumulative_energy,
    layer_and_module,
    singular_values,
    stable_rank,
)

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2)
FAST = dict(batch_size=2, seq_len=16, eval_every=5, eval_batches=1, progress=False)


@pytest.fixture(scope="module")
def data():
    return synthetic_lm_data(60, seed=0)


@pytest.fixture()
def model(data):
    return build_model(tiny_llama_config(vocab_size=data.tokenizer.vocab_size, **SMALL), seed=0)


# --------------------------------------------------------------------------- spectra


def _stable_rank_float64(m: torch.Tensor) -> float:
    m = m.double()
    fro2 = float((m * m).sum())
    spec = float(torch.linalg.matrix_norm(m, ord=2))
    return fro2 / spec**2


@pytest.mark.parametrize("shape", [(7, 5), (5, 9), (16, 16)])
def test_stable_rank_matches_float64_formula(shape):
    g = torch.Generator().manual_seed(sum(shape))
    m = torch.randn(*shape, generator=g)
    assert stable_rank(m) == pytest.approx(_stable_rank_float64(m), rel=1e-5)
    assert stable_rank(m.double()) == pytest.approx(_stable_rank_float64(m), rel=1e-12)
    s = singular_values(m)
    assert s.dtype == torch.float32 and s.shape == (min(shape),)
    assert bool((s[:-1] >= s[1:]).all())
    assert singular_values(m.double()).dtype == torch.float64
    assert 1.0 <= stable_rank(m) <= min(shape) + 1e-5


def test_stable_rank_extremes():
    u = torch.randn(6, 1, dtype=torch.float64)
    v = torch.randn(1, 4, dtype=torch.float64)
    assert stable_rank(u @ v) == pytest.approx(1.0, abs=1e-12)  # rank one
    q, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))
    assert stable_rank(q) == pytest.approx(3.0, abs=1e-10)  # equal singular values: the rank
    assert math.isnan(stable_rank(torch.zeros(3, 4)))
    assert stable_rank(torch.randn(4, 4, dtype=torch.bfloat16)) >= 1.0  # low precision is upcast


def test_spectra_errors():
    with pytest.raises(TypeError, match="matrix must be a torch.Tensor"):
        stable_rank([[1.0, 2.0]])
    with pytest.raises(ValueError, match="2-D"):
        stable_rank(torch.ones(3))
    with pytest.raises(ValueError, match="empty"):
        singular_values(torch.ones(0, 3))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        cumulative_energy(np.ones((2, 2)))
    with pytest.raises(ValueError, match="negative"):
        cumulative_energy(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="2-D matrix or 1-D"):
        cumulative_energy(torch.ones(2, 2, 2))


def test_cumulative_energy():
    m = torch.randn(9, 6, dtype=torch.float64)
    e = cumulative_energy(m)
    assert e.shape == (6,) and e.dtype == torch.float64
    assert float(e[-1]) == pytest.approx(1.0, abs=1e-12)
    assert bool((e[1:] >= e[:-1]).all())
    # e_r is the share of ||G||_F^2 kept by projecting on the top-r left singular vectors
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    for r in (1, 3):
        kept = float((u[:, :r].t() @ m).pow(2).sum() / m.pow(2).sum())
        assert float(e[r - 1]) == pytest.approx(kept, rel=1e-12)
    torch.testing.assert_close(cumulative_energy(s.flip(0)), e)  # from singular values, any order
    assert bool(torch.isnan(cumulative_energy(torch.zeros(2, 3))).all())


def test_layer_and_module():
    assert layer_and_module("model.layers.2.mlp.up_proj.weight") == (2, "up_proj")
    assert layer_and_module("model.layers.11.self_attn.q_proj.weight") == (11, "q_proj")
    assert layer_and_module("base_model.model.model.layers.0.self_attn.k_proj.base_layer.weight") is None
    assert layer_and_module("model.embed_tokens.weight") is None
    assert layer_and_module("model.layers.0.mlp.up_proj.bias") is None


def test_recorder_through_train_lm(model, data):
    rec = GradientSpectrumRecorder(every=3, keep_spectra=True)
    train_lm(model, torch.optim.AdamW(model.parameters(), lr=1e-3), data,
             TrainerConfig(steps=7, **FAST), on_gradients=rec)
    assert rec.steps == [1, 3, 6]
    names = linear_parameter_names(model)
    assert rec.names() == names and len(names) == 2 * len(PROJECTED_MODULES)
    shapes = dict((n, p.shape) for n, p in model.named_parameters())
    for n in names:
        assert len(rec.stable_ranks[n]) == 3
        assert all(1.0 <= v <= min(shapes[n]) + 1e-4 for v in rec.stable_ranks[n])
        assert [s.shape[0] for s in rec.spectra[n]] == [min(shapes[n])] * 3
        assert rec.shapes[n] == tuple(shapes[n])
        # the recorded value is the stable rank of the spectrum it kept
        s = rec.spectra[n][-1].double()
        assert rec.stable_ranks[n][-1] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-12)
    first, last = rec.summary()[names[0]]
    assert first == rec.stable_ranks[names[0]][0] and last == rec.stable_ranks[names[0]][-1]
    grid = rec.grid(-1)
    assert grid.shape == (2, len(PROJECTED_MODULES)) and not np.isnan(grid).any()
    assert grid[1, PROJECTED_MODULES.index("down_proj")] == rec.stable_ranks["model.layers.1.mlp.down_proj.weight"][-1]
    assert rec.grid(0, modules=["q_proj"]).shape == (2, 1)


def test_recorder_matches_direct_gradient(model, data):
    """The recorder sees the gradient before the optimizer step (and before clipping)."""
    seen = {}

    def grab(step, m):
        seen[step] = m.get_submodule("model.layers.0.mlp.up_proj").weight.grad.clone()

    rec = GradientSpectrumRecorder(every=1, select=lambda n: n == "model.layers.0.mlp.up_proj.weight")

    def both(step, m):
        grab(step, m)
        rec(step, m)

    train_lm(model, torch.optim.SGD(model.parameters(), lr=0.1), data,
             TrainerConfig(steps=2, grad_clip=1e-3, **FAST), on_gradients=both)
    assert rec.names() == ["model.layers.0.mlp.up_proj.weight"]
    assert rec.stable_ranks[rec.names()[0]] == pytest.approx([stable_rank(seen[1]), stable_rank(seen[2])], rel=1e-6)


def test_recorder_nan_for_missing_gradient():
    lin = nn.Linear(4, 3, bias=False)
    model = nn.Module()
    model.q_proj = lin
    rec = GradientSpectrumRecorder(every=1, select=lambda n: True, keep_spectra=True)
    rec(1, model)  # no gradient yet
    lin.weight.grad = torch.randn(3, 4)
    rec(2, model)
    assert math.isnan(rec.stable_ranks["q_proj.weight"][0]) and not math.isnan(rec.stable_ranks["q_proj.weight"][1])
    assert rec.spectra["q_proj.weight"][0].numel() == 0
    assert rec.grid().shape == (0, len(PROJECTED_MODULES))  # no "layers.i." names


def test_recorder_errors():
    with pytest.raises(ValueError, match="every must be a positive integer"):
        GradientSpectrumRecorder(every=0)
    with pytest.raises(ValueError, match="every"):
        GradientSpectrumRecorder(every=2.0)
    with pytest.raises(TypeError, match="select must be callable"):
        GradientSpectrumRecorder(select="q_proj")
    rec = GradientSpectrumRecorder()
    with pytest.raises(ValueError, match="nothing was recorded"):
        rec.summary()
    with pytest.raises(ValueError, match="nothing was recorded"):
        rec.grid()
    rec.steps.append(1)
    with pytest.raises(ValueError, match="index must be an int"):
        rec.grid(5)
    with pytest.raises(ValueError, match="modules must be drawn"):
        rec.grid(0, modules=["lm_head"])
    with pytest.raises(ValueError, match="not recorded"):
        rec.summary(["nope"])


def test_train_lm_on_gradients_errors(model, data):
    with pytest.raises(TypeError, match="on_gradients must be callable"):
        train_lm(model, torch.optim.SGD(model.parameters(), lr=0.1), data, TrainerConfig(steps=1, **FAST),
                 on_gradients="record")
    with pytest.raises(ValueError, match="on_gradients must be None when optimizer is None"):
        train_lm(model, None, data, TrainerConfig(steps=1, grad_clip=None, **FAST),
                 on_gradients=GradientSpectrumRecorder())


# --------------------------------------------------------------------------- LowRankLinear


def test_low_rank_linear_forward_is_dense_product():
    torch.manual_seed(0)
    layer = LowRankLinear(7, 5, rank=3)
    x = torch.randn(2, 4, 7)
    w = layer.B @ layer.A  # (5, 7)
    torch.testing.assert_close(layer(x), x @ w.t() + layer.bias)
    torch.testing.assert_close(layer.dense_weight(), w)
    assert torch.linalg.matrix_rank(layer.B.double() @ layer.A.double()) == 3
    nobias = LowRankLinear(7, 5, rank=2, bias=False)
    assert nobias.bias is None
    torch.testing.assert_close(nobias(x), x @ nobias.dense_weight().t())
    # gradients reach both factors, as for the dense product
    layer(x).sum().backward()
    assert layer.A.grad.shape == (3, 7) and layer.B.grad.shape == (5, 3)
    assert "rank=3" in repr(layer)


def test_low_rank_linear_init_and_placement():
    torch.manual_seed(0)
    layer = LowRankLinear(256, 256, rank=64, dtype=torch.float64)
    assert layer.A.dtype == layer.B.dtype == layer.bias.dtype == torch.float64
    assert float(layer.A.detach().abs().max()) <= 1 / 16 and float(layer.B.detach().abs().max()) <= 1 / 8
    var = float(layer.dense_weight().detach().var())
    assert var == pytest.approx(1 / (9 * 256), rel=0.1)  # the docstring's 1/(9 in)


@pytest.mark.parametrize("kwargs, match", [
    (dict(in_features=0, out_features=3, rank=1), "in_features"),
    (dict(in_features=3, out_features=2.5, rank=1), "out_features"),
    (dict(in_features=4, out_features=3, rank=4), r"rank must be in \[1, min\(in_features, out_features\)\] = \[1, 3\]"),
    (dict(in_features=4, out_features=3, rank=0), "rank"),
    (dict(in_features=4, out_features=3, rank=True), "rank must be a positive integer"),
])
def test_low_rank_linear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankLinear(**kwargs)


# --------------------------------------------------------------------------- conversion


def _linear_shapes(model):
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in PROJECTED_MODULES}


def test_to_low_rank_parameter_counts(model):
    shapes = _linear_shapes(model)
    before = sum(p.numel() for p in model.parameters())
    rank = 8
    report = to_low_rank(model, rank)
    assert report.replaced == list(shapes)
    assert report.params_before == before
    expected = before - sum(m * n for m, n in shapes.values()) + sum(rank * (m + n) for m, n in shapes.values())
    assert report.params_after == expected == sum(p.numel() for p in model.parameters())
    assert report.ratio == pytest.approx(expected / before)
    assert "replaced 14 linear layers" in str(report)
    for name in shapes:
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear) and layer.rank == rank and layer.bias is None
    assert isinstance(model.lm_head, nn.Linear)  # embeddings and head stay dense
    x = torch.randint(0, model.config.vocab_size, (2, 5))
    assert model(input_ids=x).logits.shape == (2, 5, model.config.vocab_size)


def test_to_low_rank_caps_rank_and_is_seeded(data):
    cfg = tiny_llama_config(vocab_size=data.tokenizer.vocab_size, **SMALL)
    a, b = build_model(cfg, 0), build_model(cfg, 0)
    state = torch.get_rng_state()
    to_low_rank(a, 1000, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    to_low_rank(b, 1000, seed=3)
    layer = a.get_submodule("model.layers.0.mlp.up_proj")
    assert layer.rank == 32  # min(in, out) of a 64 x 32 weight
    torch.testing.assert_close(layer.A, b.get_submodule("model.layers.0.mlp.up_proj").A)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        to_low_rank(a, 0)


def test_replace_linears_patterns_and_errors(model):
    report = replace_linears(model, lambda name, lin: LowRankLinear(lin.in_features, lin.out_features, 2,
                                                                    bias=False), patterns=r"\.q_proj$")
    assert report.replaced == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert isinstance(model.get_submodule("model.layers.0.self_attn.k_proj"), nn.Linear)
    with pytest.raises(ValueError, match=r"match no nn.Linear of the model; its linear layers are: .*k_proj"):
        replace_linears(model, lambda n, lin: lin, patterns=[r"\.w_in$"])
    with pytest.raises(ValueError, match="non-empty sequence"):
        replace_linears(model, lambda n, lin: lin, patterns=[])
    with pytest.raises(ValueError, match="invalid regular expression"):
        replace_linears(model, lambda n, lin: lin, patterns=["(unclosed"])
    with pytest.raises(TypeError, match="patterns must hold strings"):
        replace_linears(model, lambda n, lin: lin, patterns=[3])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        replace_linears("model", lambda n, lin: lin)
    with pytest.raises(TypeError, match="factory must be callable"):
        replace_linears(model, None)
    with pytest.raises(TypeError, match="factory must return an nn.Module"):
        replace_linears(model, lambda n, lin: 3, patterns=DEFAULT_PATTERNS)


# --------------------------------------------------------------------------- LoRA


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_apply_lora_trainable_sets(data):
    cfg = tiny_llama_config(vocab_size=data.tokenizer.vocab_size, **SMALL)
    pretrain = apply_lora(build_model(cfg, 0), rank=4)
    tune = apply_lora(build_model(cfg, 0), rank=4, train_other=False)
    lora_names = {n for n in _trainable(tune)}
    assert lora_names and all("lora_A" in n or "lora_B" in n for n in lora_names)
    assert len(lora_names) == 2 * 2 * len(PROJECTED_MODULES)  # A and B, 2 layers, 7 projections
    other = _trainable(pretrain) - lora_names
    assert any(n.endswith("embed_tokens.weight") for n in other)
    assert any(n.endswith("lm_head.weight") for n in other)
    assert any("layernorm" in n for n in other) and any(n.endswith("model.norm.weight") for n in other)
    frozen = {n for n, p in pretrain.named_parameters() if not p.requires_grad}
    assert len(frozen) == 2 * len(PROJECTED_MODULES) and all(".base_layer.weight" in n for n in frozen)
    # counts: adapters r (m + n) per projection, plus everything outside the projections
    shapes = _linear_shapes(build_model(cfg, 0))
    n_adapters = sum(4 * (m + n) for m, n in shapes.values())
    n_other = sum(p.numel() for n, p in build_model(cfg, 0).named_parameters()
                  if n.rsplit(".", 2)[-2] not in PROJECTED_MODULES)
    assert sum(p.numel() for p in pretrain.parameters() if p.requires_grad) == n_adapters + n_other
    # LoRA starts at the base model (B = 0) and its scale is alpha / r = 2 by default
    x = torch.randint(0, cfg.vocab_size, (1, 6))
    torch.testing.assert_close(pretrain(input_ids=x).logits, build_model(cfg, 0)(input_ids=x).logits)
    layer = pretrain.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert layer.scaling["default"] == pytest.approx(2.0)


def test_apply_lora_trains_only_its_set(data):
    cfg = tiny_llama_config(vocab_size=data.tokenizer.vocab_size, **SMALL)
    model = apply_lora(build_model(cfg, 0), rank=2, alpha=4.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    train_lm(model, torch.optim.AdamW(params, lr=1e-2), data, TrainerConfig(steps=2, **FAST))
    for n, p in model.named_parameters():
        changed = not torch.equal(before[n], p.detach())
        assert changed == p.requires_grad, n


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(rank=0), ValueError, "rank must be a positive integer"),
    (dict(rank=2, alpha=0.0), ValueError, "alpha must be a positive number"),
    (dict(rank=2, dropout=1.0), ValueError, r"dropout must be a number in \[0, 1\)"),
    (dict(rank=2, target_modules="q_proj"), TypeError, "target_modules must be a sequence"),
    (dict(rank=2, target_modules=["q_proj", "w_in"]), ValueError, r"target_modules \['w_in'\] name no nn.Linear"),
])
def test_apply_lora_errors(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        apply_lora(model, **kwargs)


def test_apply_lora_model_type():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        apply_lora("model", rank=2)


def test_best_rank_approximation_is_the_truncated_svd():
    from mini.lm.lowrank import best_rank_approximation

    torch.manual_seed(0)
    W = torch.randn(12, 7)
    s = torch.linalg.svdvals(W.double())  # (7,)
    for r in (1, 3, 7):
        Wr = best_rank_approximation(W, r)
        assert Wr.shape == (12, 7) and Wr.dtype == torch.float64
        assert torch.linalg.matrix_rank(Wr).item() == r
        # Eckart-Young: the error is the energy of the dropped singular values
        torch.testing.assert_close(torch.linalg.norm(W.double() - Wr), s[r:].pow(2).sum().sqrt(), atol=1e-10, rtol=0)
    torch.testing.assert_close(best_rank_approximation(W, 7), W.double(), atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="rank"):
        best_rank_approximation(W, 0)
    with pytest.raises(ValueError, match="rank"):
        best_rank_approximation(W, 8)
    with pytest.raises(ValueError, match="weight must be a 2-D tensor"):
        best_rank_approximation(torch.randn(3), 1)
