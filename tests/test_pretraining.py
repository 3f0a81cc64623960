"""Tests of mini.pretraining: every method's setup trains, its measured optimizer-state bytes equal
the analytic estimate, the schedule, and the errors."""
from __future__ import annotations

import math

import pytest
import torch

from mini.galore import GaLoreAdamW
from mini.lm import TrainerConfig, build_model, estimate_memory, synthetic_lm_data, tiny_llama_config
from mini.lm.measure import RunSpec, measure_training
from mini.pretraining import (
    MEMORY_METHOD,
    PRETRAINING_METHODS,
    CosineSchedule,
    PretrainHParams,
    run_memory,
    run_spec,
    setup_method,
)
from mini.qgalore import Int8Linear

# Wide enough that the MLP's low-rank moments (r * 96 >= 4096 elements at r = 48) go 8-bit.
SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2)
RANK = 48
FAST = TrainerConfig(steps=4, batch_size=2, seq_len=16, eval_every=2, eval_batches=1, grad_clip=None,
                     progress=False)


@pytest.fixture(scope="module")
def data():
    return synthetic_lm_data(60, seed=0)


@pytest.fixture(scope="module")
def cfg(data):
    return tiny_llama_config(vocab_size=data.tokenizer.vocab_size, **SMALL)


@pytest.fixture(scope="module")
def results():
    return {m: measure_training(run_spec(m, FAST, model=SMALL, n_documents=60, rank=RANK, update_proj_gap=2))
            for m in PRETRAINING_METHODS}


def test_every_method_trains(results):
    for m, r in results.items():
        assert r.history.step == [1, 2, 3, 4], m
        assert all(math.isfinite(v) for v in r.history.train_loss), m
        assert r.final_val_ppl < 60, m  # vocabulary ~ 40: not diverged
    for m in ("galore", "galore_pm", "galore8bit", "qgalore", "qgalore_int8"):
        assert results[m].info["n_svd"] == 2 * 14, m  # SVDs at steps 0 and 2, 14 matrices
    assert results["low_rank"].info["replaced"] == 14 and results["qgalore_int8"].info["replaced"] == 14


def test_state_bytes_equal_the_estimate(results, cfg):
    """The measured state tensors are what mini.lm.memory counts (float32 states and projectors)."""
    for m in ("adamw", "galore", "galore_pm", "low_rank", "lora", "galore8bit"):
        est = estimate_memory(cfg, MEMORY_METHOD[m], rank=RANK, weight_bytes=4, state_bytes=4, proj_bits=32)
        assert results[m].state_bytes == est.state_bytes + est.projector_bytes, m
        assert results[m].n_trainable == est.n_trainable, m
    assert results["galore8bit"].state_bytes < results["galore"].state_bytes  # some moments are 8-bit
    # Q-GaLore, both paths: the paper's 8-bit moments (float32 below 4096 elements), the basis
    # INT4 (packed) with a float32 scale and a uint8 zero point per group of 256
    qg = estimate_memory(cfg, "qgalore", rank=RANK, weight_bytes=4, state_bytes=4, proj_bits=4,
                         group_param_bytes=2.5)  # (4 + 1) / 2 per group
    assert results["qgalore"].state_bytes == qg.state_bytes + qg.projector_bytes
    assert results["qgalore_int8"].state_bytes == results["qgalore"].state_bytes  # rounding RNG not counted
    assert results["qgalore"].state_bytes < results["galore8bit"].state_bytes  # INT4 bases
    # the INT8 weights: codes, a float32 scale and a uint8 zero point per group, as counted
    int8 = qg.weight_bytes - estimate_memory(cfg, "galore", rank=RANK, weight_bytes=4).weight_bytes + sum(
        4 * p.numel() for n, p in build_model(cfg).named_parameters() if n.endswith("proj.weight"))
    assert results["qgalore_int8"].info["int8_weight_bytes"] == int8


def test_trainable_sets(results, cfg):
    n_all = results["adamw"].n_params
    assert results["galore"].n_trainable == n_all
    assert results["low_rank"].n_params == results["low_rank"].n_trainable != n_all
    assert results["lora"].n_trainable < results["lora"].n_params  # frozen base + adapters
    n_projected = sum(p.numel() for n, p in build_model(cfg).named_parameters() if n.endswith("proj.weight"))
    assert results["qgalore_int8"].n_trainable == n_all - n_projected  # INT8 weights are buffers
    assert results["qgalore_int8"].info["int8_weight_bytes"] < n_projected * 4 / 3


def test_project_moments_changes_the_run(results):
    a, b = results["galore"].history.train_loss, results["galore_pm"].history.train_loss
    assert a[:3] == b[:3]  # identical up to the switch at step 2 (applied in step 3's update)
    assert a[3] != b[3]


def test_setup_objects(cfg):
    s = setup_method(build_model(cfg, 0), "galore_pm", steps=10, lr=0.01, rank=8)
    assert isinstance(s.optimizer, GaLoreAdamW) and s.optimizer.defaults["project_moments"]
    assert s.optimizer.param_groups[1]["rank"] == 8 and isinstance(s.scheduler, CosineSchedule)
    assert s.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 / 1)  # warmup of 1 step: peak at once
    s = setup_method(build_model(cfg, 0), "qgalore_int8", steps=10, rank=8)
    assert sum(isinstance(m, Int8Linear) for m in s.model.modules()) == 14
    assert len(s.state_holders) == 2 and len(s.scheduler.targets) == 2


def test_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [], "lr": 2.0}], lr=1.0)

    class Hooked:
        lr = 0.5

    hooked = Hooked()
    sched = CosineSchedule([opt, hooked], total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(10):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:3] == pytest.approx([0.5, 1.0, 1.0])  # (s + 1) / w, then the peak
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lrs[10] == pytest.approx(0.1)  # the end of the cosine
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert opt.param_groups[1]["lr"] == pytest.approx(0.2) and hooked.lr == pytest.approx(0.05)
    assert sched.get_last_lr() == pytest.approx([0.1, 0.05])
    other = CosineSchedule([torch.optim.SGD([p], lr=1.0)], 10, 2)
    other.load_state_dict(sched.state_dict())
    assert other.targets[0].param_groups[0]["lr"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        CosineSchedule([opt], 0, 0)
    with pytest.raises(ValueError, match=r"warmup_steps must be an integer in \[0, total_steps\)"):
        CosineSchedule([opt], 5, 5)
    with pytest.raises(TypeError, match="targets must be optimizers or objects with an lr"):
        CosineSchedule([object()], 5, 1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), "lr must be a positive number"),
    (dict(scale=-1.0), "scale must be a positive number"),
    (dict(rank=0), "rank must be a positive integer"),
    (dict(update_proj_gap=1.5), "update_proj_gap must be a positive integer"),
    (dict(warmup=1.0), r"warmup must be a share of the steps in \[0, 1\)"),
    (dict(min_lr_ratio=2.0), r"min_lr_ratio must be in \[0, 1\]"),
    (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
])
def test_hparams_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PretrainHParams(**kwargs)


def test_method_errors(cfg):
    with pytest.raises(ValueError, match="method must be one of"):
        setup_method(build_model(cfg, 0), "relora", steps=5)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        setup_method("model", "adamw", steps=5)
    with pytest.raises(ValueError, match="method must be one of .* or None"):
        run_spec("sgd", FAST)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        run_spec("galore", FAST, rank=-2)  # validated in the parent, before any child starts
    assert run_spec(None, FAST).setup is None and run_spec(None, FAST).name == "baseline"
    assert run_spec("adamw", FAST).mmap_threshold == RunSpec("x", None).mmap_threshold > 0  # measured by default
    assert run_spec("adamw", FAST, mmap_threshold=None).mmap_threshold is None


def test_lora_setup_is_seeded(cfg):
    """peft draws the adapters' init from the global generator: the setup seeds it with hp.seed."""
    torch.manual_seed(1)
    a = setup_method(build_model(cfg, 0), "lora", steps=2, rank=4)
    torch.manual_seed(2)
    b = setup_method(build_model(cfg, 0), "lora", steps=2, rank=4)
    c = setup_method(build_model(cfg, 0), "lora", steps=2, rank=4, seed=5)
    pa, pb, pc = (dict(s.model.named_parameters()) for s in (a, b, c))
    name = next(n for n in pa if "lora_A" in n)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert not torch.equal(pa[name], pc[name])


def test_run_memory_counts_what_the_runs_hold(results, cfg):
    """run_memory's state is every run's measured state, byte for byte; its weights are the INT8
    path's codes and the float model's otherwise; its gradients are the INT8 path's peak."""
    for m in ("adamw", "galore", "galore8bit", "low_rank", "lora", "qgalore", "qgalore_int8"):
        assert run_memory(cfg, m, RANK)["state"] == results[m].state_bytes, m
    n_float = 4 * results["adamw"].n_params
    full = run_memory(cfg, "adamw", RANK)
    assert full["weights"] == full["grads"] == n_float and full["weights_added"] == 0
    assert run_memory(cfg, "qgalore", RANK)["weights_added"] == 0  # float weights, INT4 bases
    int8 = run_memory(cfg, "qgalore_int8", RANK)
    assert int8["weights_added"] == results["qgalore_int8"].info["int8_weight_bytes"] - 4 * sum(
        p.numel() for n, p in build_model(cfg).named_parameters() if n.endswith("proj.weight"))
    shapes = {n: p.shape for n, p in build_model(cfg).named_parameters()}
    kept = sum(4 * math.prod(s) for n, s in shapes.items() if not n.endswith("proj.weight"))
    largest = max(4 * math.prod(s) for n, s in shapes.items() if n.endswith("proj.weight"))
    assert int8["grads"] == kept + largest
    assert run_memory(cfg, "low_rank", 8)["weights_added"] < 0 < run_memory(cfg, "lora", 8)["weights_added"]
    with pytest.raises(ValueError, match="method must be one of .* got 'adam'"):
        run_memory(cfg, "adam", RANK)
