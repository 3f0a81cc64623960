"""Tests of the device plumbing of Part II: ``device=`` of mini.lm's trainer and evaluation, of
mini.pretraining's setups and run specs, and the shared check :func:`mini.runtime.resolve_device`.

CI has no GPU, so the device path is tested two ways: on the ``meta`` device (tensors with shapes
and no data: a run goes through forward, backward and the optimizer step there and stops at the
first number it must read), and with a recording forward on ``device="cpu"`` given explicitly.
"""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from mini.lm import (
    TrainerConfig,
    build_model,
    eval_batches,
    evaluate_lm,
    synthetic_lm_data,
    tiny_llama_config,
    train_lm,
)
from mini.lm.measure import RunSpec, measure_training, training_step_bytes
from mini.pretraining import run_spec, setup_method
from mini.runtime import resolve_device

FAST = {"steps": 3, "batch_size": 2, "seq_len": 16, "eval_every": 3, "eval_batches": 1, "grad_clip": None,
        "progress": False}
META_ITEM = "cannot be called on meta tensors"  # torch's error where a meta tensor must become a number


@pytest.fixture(scope="module")
def data():
    return synthetic_lm_data(100, seed=0)


@pytest.fixture(scope="module")
def cfg(data):
    return tiny_llama_config(vocab_size=data.tokenizer.vocab_size)


class TinyLM(nn.Module):
    """A stand-in causal LM (embedding, linear head) whose forward runs on the meta device:
    transformers' Llama reads its attention mask's values, so on meta it stops in the forward."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)
        self.seen: list[torch.device] = []  # the device of every batch the model got

    def forward(self, input_ids: torch.Tensor) -> types.SimpleNamespace:
        self.seen.append(input_ids.device)
        return types.SimpleNamespace(logits=self.head(self.embed(input_ids)))  # (B, T, V)


def record_inputs(model: nn.Module) -> list[torch.device]:
    """Wrap ``model.forward`` so that the device of each ``input_ids`` it gets is recorded."""
    seen: list[torch.device] = []
    forward = model.forward

    def recording(*args, **kwargs):
        seen.append(kwargs["input_ids"].device)
        return forward(*args, **kwargs)

    model.forward = recording
    return seen


def devices_of(model: nn.Module) -> set[str]:
    return {t.device.type for t in [*model.parameters(), *model.buffers()]}


# --------------------------------------------------------------------------- resolve_device


@pytest.mark.parametrize("device, expected", [(None, None), ("cpu", torch.device("cpu")),
                                              (torch.device("cpu"), torch.device("cpu")),
                                              ("meta", torch.device("meta"))])
def test_resolve_device(device, expected):
    assert resolve_device(device) == expected


@pytest.mark.parametrize("device", ["gpu", "CPU", "cuda:x", "mps", "xpu", ""])
def test_resolve_device_bad_value(device):
    with pytest.raises(ValueError, match=r"device must be one of 'cpu', 'cuda', 'cuda:<index>' or 'meta'.*got "
                                         + repr(device).replace("\\", "\\\\")):
        resolve_device(device)


def test_resolve_device_bad_type():
    with pytest.raises(TypeError, match="device must be None, a str or a torch.device, got int 0"):
        resolve_device(0)


def test_resolve_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(ValueError, match=r"device=.*cuda.* needs CUDA, which is not available here"):
            resolve_device(device)


def test_resolve_device_cuda_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # nothing is allocated
    with pytest.raises(ValueError, match=r"device='cuda:2' names CUDA device 2, but this machine has 1"):
        resolve_device("cuda:2")


# --------------------------------------------------------------------------- every entry point checks


def test_entry_points_refuse_a_bad_device(cfg, data, monkeypatch):
    model = build_model(cfg, seed=0)
    opt = torch.optim.AdamW(model.parameters())
    val = eval_batches(data.val_ids, 2, 16, 1)
    calls = {
        "train_lm": lambda d: train_lm(model, opt, data, TrainerConfig(**FAST), device=d),
        "evaluate_lm": lambda d: evaluate_lm(model, val, device=d),
        "setup_method": lambda d: setup_method(model, "adamw", 3, device=d),
        "run_spec": lambda d: run_spec("adamw", TrainerConfig(**FAST), device=d, mmap_threshold=None),
        "RunSpec": lambda d: RunSpec("x", None, device=d, mmap_threshold=None),
        "training_step_bytes": lambda d: training_step_bytes(model, val[0], device=d),
    }
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for call in calls.values():
        with pytest.raises(ValueError, match=r"device must be one of .* got 'gpu'"):
            call("gpu")
        with pytest.raises(ValueError, match=r"device='cuda' needs CUDA"):
            call("cuda")
    assert devices_of(model) == {"cpu"}  # refused before anything moved


def test_memory_runs_stay_on_the_cpu(monkeypatch):
    """Peak RSS is host memory: a run on another device must say its memory is not read."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda' keeps the run's tensors outside host memory.*"
                                         r"mmap_threshold=None"):
        run_spec("adamw", TrainerConfig(**FAST), device="cuda")
    spec = run_spec("adamw", TrainerConfig(**FAST), device=torch.device("cuda"), mmap_threshold=None)
    assert spec.device == "cuda"  # a plain string, for the child
    assert run_spec("adamw", TrainerConfig(**FAST), device="cpu").device == "cpu"  # memory on the CPU: fine


# --------------------------------------------------------------------------- the meta device


def test_train_lm_on_meta_runs_the_step_there(data):
    """Forward, backward, the gradients and the optimizer step happen on meta; the run stops at
    the first number it reads back, the step's loss."""
    model = TinyLM(data.tokenizer.vocab_size).to("meta")  # the optimizer is built after the move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    grads: list[set[str]] = []
    with pytest.raises(RuntimeError, match=META_ITEM) as err:
        train_lm(model, opt, data, TrainerConfig(**FAST), device="meta",
                 on_gradients=lambda step, m: grads.append({p.grad.device.type for p in m.parameters()}))
    assert devices_of(model) == {"meta"}
    assert model.seen == [torch.device("meta")]  # the first training batch, moved to meta
    assert grads == [{"meta"}]
    assert {t.device.type for s in opt.state.values() for k, t in s.items() if k != "step"} == {"meta"}
    where = [e for e in err.traceback if e.name == "train_lm"][-1]
    assert ".item()" in str(where.statement)  # stopped where the loss is read, not earlier


def test_train_lm_moves_the_model_to_meta(data):
    """Without an optimizer (per-layer hook updates) train_lm itself moves the model."""
    model = TinyLM(data.tokenizer.vocab_size)
    with pytest.raises(RuntimeError, match=META_ITEM):
        train_lm(model, None, data, TrainerConfig(**FAST), device="meta")
    assert devices_of(model) == {"meta"} and model.seen == [torch.device("meta")]


def test_train_lm_refuses_an_optimizer_left_behind(data):
    """Module.to("meta") makes new parameter objects: an optimizer built before holds the old ones."""
    model = TinyLM(data.tokenizer.vocab_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match=r"device='meta': moving the model there replaced its parameter objects.*"
                                         r"build the optimizer after moving the model"):
        train_lm(model, opt, data, TrainerConfig(**FAST), device="meta")
    assert model.seen == []  # refused before the first step


def test_evaluate_lm_on_meta(data):
    model = TinyLM(data.tokenizer.vocab_size)
    with pytest.raises(RuntimeError, match=META_ITEM):
        evaluate_lm(model, eval_batches(data.val_ids, 2, 16, 2), device="meta")
    assert devices_of(model) == {"meta"} and model.seen == [torch.device("meta")]


def test_llama_gets_its_batch_on_meta(cfg, data):
    """The real model: moved to meta, and the batch reaches its forward there (transformers then
    reads a mask value, the first real number of a Llama forward)."""
    s = setup_method(build_model(cfg, seed=0), "adamw", FAST["steps"], device="meta")
    seen = record_inputs(s.model)
    with pytest.raises(RuntimeError, match=META_ITEM):
        train_lm(s.model, s.optimizer, data, TrainerConfig(**FAST), scheduler=s.scheduler, device="meta")
    assert devices_of(s.model) == {"meta"} and seen == [torch.device("meta")]


@pytest.mark.parametrize("method", ["adamw", "low_rank", "sltrain", "galore"])
def test_setup_method_on_meta(cfg, method):
    s = setup_method(build_model(cfg, seed=0), method, 10, device="meta")
    assert devices_of(s.model) == {"meta"}  # converted layers included


def test_qgalore_int8_refuses_meta(cfg):
    model = build_model(cfg, seed=0)
    with pytest.raises(ValueError, match=r"device must be 'cpu' or 'cuda' for method 'qgalore_int8', got 'meta'"):
        setup_method(model, "qgalore_int8", 10, device="meta")


def test_training_step_bytes_refuses_meta(cfg, data):
    batch = eval_batches(data.val_ids, 2, 16, 1)[0]
    with pytest.raises(ValueError, match=r"device must not be 'meta' here \(got 'meta'"):
        training_step_bytes(build_model(cfg, seed=0), batch, device="meta")


# --------------------------------------------------------------------------- device=None and "cpu": today's numbers


def reference_losses(model, opt, data, tc):
    """Today's loop by hand: seed, the seeded batch stream, loss, backward, step."""
    from mini.lm import BatchStream, lm_loss

    torch.manual_seed(tc.seed)
    stream = BatchStream(data.train_ids, tc.batch_size, tc.seq_len, seed=tc.seed)
    losses = []
    for _ in range(tc.steps):
        x, y = next(stream)
        loss = lm_loss(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_cpu_results_are_bitwise_today_s(cfg, data):
    tc = TrainerConfig(**FAST)
    runs = {}
    for device in ("reference", None, "cpu", torch.device("cpu")):
        model = build_model(cfg, seed=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if device == "reference":
            losses = reference_losses(model, opt, data, tc)
        else:
            seen = record_inputs(model)
            h = train_lm(model, opt, data, tc, device=device)
            losses = h.train_loss
            assert set(seen) == {torch.device("cpu")} and len(seen) == tc.steps + 1  # 3 steps, 1 evaluation
        runs[str(device)] = (losses, torch.cat([p.detach().flatten() for p in model.parameters()]))
    ref_losses, ref_params = runs.pop("reference")
    for device, (losses, params) in runs.items():
        assert losses == ref_losses, device
        assert torch.equal(params, ref_params), device
    val = eval_batches(data.val_ids, 2, 16, 2)
    model = build_model(cfg, seed=1)
    assert evaluate_lm(model, val) == evaluate_lm(model, val, device="cpu")


def test_measure_training_on_the_cpu(data):
    tc = TrainerConfig(**{**FAST, "steps": 2, "eval_every": 2})
    a = measure_training(run_spec("adamw", tc, n_documents=100, mmap_threshold=None))
    b = measure_training(run_spec("adamw", tc, n_documents=100, mmap_threshold=None, device="cpu"))
    assert a.device == b.device == "cpu"
    assert a.history.train_loss == b.history.train_loss and a.history.val_loss == b.history.val_loss
