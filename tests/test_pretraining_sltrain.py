"""Tests of the ``sltrain`` setup of mini.pretraining (the SLTrain pretraining lab,
``labs/sltrain/pretraining.ipynb``): the model it builds, its optimizer, its state bytes against
the memory estimator, and its errors."""
from __future__ import annotations

import pytest
import torch

from mini.lm import build_model, estimate_memory, synthetic_lm_data, tiny_llama_config, train_lm
from mini.lm.measure import measure_training, state_bytes
from mini.lm.trainer import TrainerConfig
from mini.pretraining import MEMORY_METHOD, PRETRAINING_METHODS, PretrainHParams, run_spec, setup_method
from mini.sltrain import SparseLowRankLinear, convert_to_sltrain, sltrain_layers


@pytest.fixture(scope="module")
def data():
    return synthetic_lm_data(200, seed=0)


def _cfg(data):
    return tiny_llama_config(vocab_size=data.tokenizer.vocab_size, num_hidden_layers=1)


def test_sltrain_is_a_known_method():
    assert "sltrain" in PRETRAINING_METHODS
    assert MEMORY_METHOD["sltrain"] == "sltrain"


def test_setup_builds_the_sltrain_model_and_adamw(data):
    cfg = _cfg(data)
    model = build_model(cfg, seed=0)
    setup = setup_method(model, "sltrain", steps=4, rank=8, density=0.05, sltrain_alpha=16.0, seed=3, lr=1e-3)
    layers = sltrain_layers(setup.model)
    assert len(layers) == 7  # q, k, v, o, gate, up, down of the one layer
    for _, layer in layers:
        assert layer.rank == 8 and layer.alpha == 16.0
        assert layer.nnz == int(0.05 * layer.out_features * layer.in_features)
    # the same supports as the converter with the same seed
    ref = build_model(cfg, seed=0)
    convert_to_sltrain(ref, 8, 0.05, 16.0, seed=3)
    for (_, a), (_, b) in zip(layers, sltrain_layers(ref)):
        assert torch.equal(a.index, b.index)
    opt = setup.optimizer
    assert isinstance(opt, torch.optim.AdamW)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(
        p.numel() for p in setup.model.parameters())
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * setup.scheduler.factor(0))
    info = setup.info()
    assert info["replaced"] == 7
    assert info["index_entries"] == sum(layer.nnz for _, layer in layers)
    # two steps, then the optimizer state equals the estimator's float32 count
    train_lm(setup.model, opt, data, TrainerConfig(steps=2, batch_size=2, seq_len=16, eval_every=2,
                                                     eval_batches=1, grad_clip=None, progress=False),
             scheduler=setup.scheduler)
    est = estimate_memory(cfg, "sltrain", rank=8, density=0.05, weight_bytes=4, state_bytes=4)
    assert state_bytes(opt) == est.state_bytes
    assert sum(p.numel() for p in setup.model.parameters()) == est.n_trainable


def test_run_spec_measures_an_sltrain_run_in_process():
    tc = TrainerConfig(steps=2, batch_size=2, seq_len=16, eval_every=2, eval_batches=1, grad_clip=None,
                       progress=False)
    spec = run_spec("sltrain", tc, model={"num_hidden_layers": 1}, n_documents=100, rank=4, density=0.1)
    assert spec.setup is setup_method and spec.setup_kwargs["density"] == 0.1
    spec.preload = ("torch",)  # the lab's runs preload peft and the GaLore modules too: slow to import here
    result = measure_training(spec)
    assert result.info["replaced"] == 7
    assert len(result.history.val_ppl) == 1 and result.state_bytes > 0
    assert result.n_params == result.n_trainable


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, True, "0.03"])
def test_bad_density(bad):
    with pytest.raises(ValueError, match="density"):
        PretrainHParams(density=bad)
    with pytest.raises(ValueError, match="density"):
        run_spec("sltrain", TrainerConfig(steps=1, progress=False), density=bad)


@pytest.mark.parametrize("bad", [0, -1.0, True])
def test_bad_sltrain_alpha(bad):
    with pytest.raises(ValueError, match="sltrain_alpha"):
        PretrainHParams(sltrain_alpha=bad)


def test_sparse_layers_are_the_librarys():
    model = build_model(tiny_llama_config(num_hidden_layers=1), seed=0)
    setup = setup_method(model, "sltrain", steps=1, rank=4)
    assert all(isinstance(m, SparseLowRankLinear) for _, m in sltrain_layers(setup.model))
    assert all(m.density == 0.03 and m.alpha == 32.0 for _, m in sltrain_layers(setup.model))
