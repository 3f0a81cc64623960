"""The memory estimator against what mini's optimizers allocate, and the 7B facts the memory lab
asserts (labs/galore/memory_tables.ipynb; book/galore/theory.ipynb, memory accounting)."""
from __future__ import annotations

import warnings

import pytest
import torch

from mini.galore import GaLoreAdamW, GaLoreAdamW8bit, attach_layerwise_updates, galore_param_groups
from mini.galore.adamw8bit import optimizer_state_bytes
from mini.lm import (DEFAULT_RANKS, build_model, estimate_memory, lm_loss, synthetic_lm_data,
                     tiny_llama_config)

RANK = 32  # half the width: the MLP moments (32×176) are 8-bit, the attention ones (32×64) float32
FP32 = dict(weight_bytes=4, state_bytes=4, proj_bits=32)  # the estimator in float32 units
OPTIMIZERS = {
    "adam": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "adam8bit": lambda m: GaLoreAdamW8bit(m.parameters(), lr=1e-3),
    "galore": lambda m: GaLoreAdamW(galore_param_groups(m, rank=RANK), lr=1e-3),
    "galore8bit": lambda m: GaLoreAdamW8bit(galore_param_groups(m, rank=RANK), lr=1e-3),
}


@pytest.fixture(scope="module")
def setup():
    data = synthetic_lm_data(100, seed=0)
    # width 64 keeps the test fast; with RANK = 32 both the 8-bit path (>= 4096 entries) and the
    # float32 small-tensor path of the 8-bit optimizers are exercised
    cfg = tiny_llama_config(vocab_size=data.tokenizer.vocab_size, hidden_size=64,
                            intermediate_size=176, num_hidden_layers=2)
    x = data.train_ids[: 4 * 33].view(4, 33)  # (B, T + 1)
    return cfg, x


@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_estimator_matches_optimizer_state_bytes(setup, method):
    cfg, x = setup
    model = build_model(cfg, seed=0)
    opt = OPTIMIZERS[method](model)
    lm_loss(model, x[:, :-1], x[:, 1:]).backward()
    grad_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
    est = estimate_memory(cfg, method, rank=RANK if "galore" in method else None, **FP32)
    assert optimizer_state_bytes(opt) == est.state_bytes + est.projector_bytes
    assert grad_bytes == est.grad_bytes
    assert sum(p.numel() * 4 for p in model.parameters()) == est.weight_bytes
    if isinstance(opt, GaLoreAdamW8bit):
        sb = opt.state_bytes()
        assert sb["projector"] == est.projector_bytes and sb["total"] == optimizer_state_bytes(opt)


def test_per_layer_peak_gradient_is_the_largest_tensor(setup):
    cfg, x = setup
    model = build_model(cfg, seed=0)
    handle = attach_layerwise_updates(galore_param_groups(model, rank=RANK), track_memory=True, lr=1e-3)
    lm_loss(model, x[:, :-1], x[:, 1:]).backward()
    est = estimate_memory(cfg, "galore", rank=RANK, per_layer_updates=True, **FP32)
    assert handle.n_updates == len(list(model.parameters()))
    assert handle.peak_grad_bytes == est.grad_bytes
    assert est.grad_bytes == max(p.numel() for p in model.parameters()) * 4


def test_total_ordering_and_7b_figures():
    for plu in (False, True):
        for c in DEFAULT_RANKS:
            tot = {m: estimate_memory(c, m, per_layer_updates=plu).total_bytes
                   for m in ("adam", "galore", "qgalore")}
            assert tot["adam"] > tot["galore"] > tot["qgalore"], (c, plu)
    state = {m: estimate_memory("llama_7b", m) for m in ("adam", "galore")}
    saving = 1 - (state["galore"].state_bytes + state["galore"].projector_bytes) / state["adam"].state_bytes
    assert abs(100 * saving - 65.5) < 1  # the paper's 65.5%; ours 65.1%
    g8 = estimate_memory("llama_7b", "galore8bit", per_layer_updates=True).total_bytes
    assert abs(100 * (1 - g8 / estimate_memory("llama_7b", "adam").total_bytes) - 63.3) < 1.5
    assert estimate_memory("llama_7b", "qgalore", per_layer_updates=True).total_gb < 16
