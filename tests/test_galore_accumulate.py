"""Tests of mini.galore.accumulate: per-layer GaLore updates with gradient accumulation in the subspace
(issue 18; GaLore issue #78) against a standard GaLoreAdamW accumulation loop in float64."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mini.galore import GaLoreAdamW, GaLoreAdamW8bit
from mini.galore.accumulate import attach_accumulating_updates
from mini.galore.layerwise import attach_layerwise_updates
from mini.qgalore.optimizer import QGaLoreAdamW

TOL = 1e-10  # float64; observed differences are ~1e-15 (reassociation of Σ Pᵀ G_i vs Pᵀ Σ G_i)
GAP = 3  # subspace updates at steps 0, 3, 6
STEPS = 7  # optimizer steps (boundaries) per run


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 8)
    ).double()


def _groups(model: nn.Sequential, proj_type: str = "std") -> list[dict]:
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return [
        {"params": [m.bias for m in linears]},
        {"params": [m.weight for m in linears], "rank": 4, "update_proj_gap": GAP, "scale": 0.25, "proj_type": proj_type},
    ]


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 16, generator=gen, dtype=torch.float64), torch.randn(6, 8, generator=gen, dtype=torch.float64))
            for _ in range(n)]


def _loss(model, batch, k: int) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean() / k  # scaled by the user, as in a standard accumulation loop


def _standard(k: int, batches, proj_type: str = "std", **kw) -> tuple[nn.Sequential, int]:
    """A standard loop: backward on each micro-batch, opt.step() every k; returns the peak gradient bytes."""
    model = _model()
    opt = GaLoreAdamW(_groups(model, proj_type), **kw)
    peak = 0
    for i, batch in enumerate(batches):
        _loss(model, batch, k).backward()
        peak = max(peak, sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None))
        if i % k == k - 1:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return model, peak


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("project_moments", [False, True])
def test_equals_standard_accumulation_loop(k, project_moments):
    kw = {"lr": 1e-2, "weight_decay": 0.01, "project_moments": project_moments}
    batches = _batches(k * STEPS)
    ref, _ = _standard(k, batches, **kw)
    model = _model()
    handle = attach_accumulating_updates(_groups(model), k, **kw)
    for i, batch in enumerate(batches):
        _loss(model, batch, k).backward()
        if (i + 1) % k == 0:  # at a boundary everything was stepped and freed
            assert all(p.grad is None for p in model.parameters())
        assert handle.n_steps == (i + 1) // k
    assert handle.micro_step == k * STEPS and handle.n_updates == 8 * STEPS
    assert handle.n_svd() == 4 * 3  # 4 matrices × SVDs at steps 0, 3, 6
    assert _max_diff(ref, model) <= TOL
    assert _max_diff(ref, _model()) > 1e-3  # it trained


@pytest.mark.parametrize("proj_type", ["reverse_std", "full"])
def test_other_projection_sides(proj_type):
    batches = _batches(3 * STEPS)
    ref, _ = _standard(3, batches, proj_type, lr=1e-2)
    model = _model()
    attach_accumulating_updates(_groups(model, proj_type), 3, lr=1e-2)
    for batch in batches:
        _loss(model, batch, 3).backward()
    assert _max_diff(ref, model) <= TOL


def test_qgalore_subclass_keeping_the_step_is_supported():
    """QGaLoreAdamW keeps GaLoreAdamW's step and _prepare (its projector differs): accepted and exact."""
    k = 3
    batches = _batches(k * STEPS)
    ref = _model()
    opt = QGaLoreAdamW(_groups(ref), lr=1e-2)
    for i, batch in enumerate(batches):
        _loss(ref, batch, k).backward()
        if i % k == k - 1:
            opt.step()
            opt.zero_grad(set_to_none=True)
    model = _model()
    handle = attach_accumulating_updates(_groups(model), k, optimizer_class=QGaLoreAdamW, lr=1e-2)
    for batch in batches:
        _loss(model, batch, k).backward()
    assert handle.n_svd() == opt.n_svd()
    assert _max_diff(ref, model) <= TOL


def test_stepping_every_micro_batch_is_galore_issue_78():
    """The per-layer hook of GaLore #78 (attach_layerwise_updates) takes k steps per window: not the same run."""
    k = 4
    batches = _batches(k * STEPS)
    ref, _ = _standard(k, batches, lr=1e-2)
    per_micro = _model()
    attach_layerwise_updates(_groups(per_micro), lr=1e-2)
    for batch in batches:
        _loss(per_micro, batch, k).backward()
    assert _max_diff(ref, per_micro) > 1e-3  # four Adam steps on quarter-scaled losses per window


def test_memory_below_full_accumulation():
    k = 3
    batches = _batches(k * STEPS)
    _, standard_peak = _standard(k, batches, lr=1e-2)
    model = _model()
    handle = attach_accumulating_updates(_groups(model), k, lr=1e-2, track_memory=True)
    for i, batch in enumerate(batches):
        _loss(model, batch, k).backward()
        if i == k:  # first micro-batch of step 1 (no SVD due): weights live only in their low-rank accumulators
            assert all(p.grad is None for p in model.parameters() if p.dim() == 2)
            # weights 32×16, 32×32, 32×32 on the right side (32×4 each), 8×32 on the left (4×32)
            assert handle.accumulator_bytes() == 4 * 128 * 8 == 4096
            # the biases (plain AdamW) accumulate in full in p.grad: 104 numbers
            assert sum(p.grad.numel() for p in model.parameters() if p.dim() == 1) == 104
    all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert standard_peak == all_bytes == 23360  # every full gradient alive for the whole window
    by_window = handle.peak_bytes_by_window
    # subspace windows: accumulators and bias gradients (4928 bytes) plus the one 32×32 gradient being projected
    assert by_window["subspace"] == (4 * 128 + 104) * 8 + 32 * 32 * 8 == 13120 < standard_peak
    # refresh windows (steps 0, 3, 6) keep the full sums in p.grad for the SVD: the standard loop's memory
    assert by_window["refresh"] == standard_peak
    assert handle.peak_grad_bytes == standard_peak and handle.accumulator_bytes() == 0


def test_plain_parameters_and_missing_gradient_in_last_micro_batch():
    """A parameter reached in some micro-batches only is stepped with its partial sum, as a standard step."""
    k = 2
    torch.manual_seed(0)
    ref = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]).double()
    model = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)]).double()
    model.load_state_dict(ref.state_dict())
    def groups(m: nn.ModuleList) -> list[dict]:
        return [{"params": [m[0].bias, m[1].bias]},
                {"params": [m[0].weight, m[1].weight], "rank": 2, "update_proj_gap": 2}]

    opt = GaLoreAdamW(groups(ref), lr=1e-2)
    handle = attach_accumulating_updates(groups(model), k, lr=1e-2)
    x = torch.randn(4, 8, dtype=torch.float64)
    for step in range(5):
        for micro in range(k):
            use_second = micro == 0  # the second layer gets no gradient in the last micro-batch
            for net in (ref, model):
                out = net[0](x)
                if use_second:
                    out = net[1](out)
                out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert handle.n_steps == 5
    assert _max_diff(ref, model) <= TOL


def test_state_dict_round_trip_and_refused_inside_a_window(tmp_path):
    k = 2
    batches = _batches(k * STEPS)
    ref, _ = _standard(k, batches, lr=1e-2)
    model = _model()
    handle = attach_accumulating_updates(_groups(model), k, lr=1e-2)
    for batch in batches[: k * 4]:
        _loss(model, batch, k).backward()
    torch.save({"model": model.state_dict(), "handle": handle.state_dict()}, tmp_path / "acc.pt")
    _loss(model, batches[k * 4], k).backward()
    with pytest.raises(RuntimeError, match="inside an accumulation window"):
        handle.state_dict()

    saved = torch.load(tmp_path / "acc.pt", weights_only=True)
    resumed = _model(seed=5)
    resumed.load_state_dict(saved["model"])
    h2 = attach_accumulating_updates(_groups(resumed), k, lr=1e-2)
    h2.load_state_dict(saved["handle"])
    assert h2.micro_step == k * 4 and h2.n_steps == 4 and h2.n_svd() == 4 * 2
    for batch in batches[k * 4:]:
        _loss(resumed, batch, k).backward()
    assert _max_diff(ref, resumed) <= TOL


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "2", None])
def test_accumulation_steps_must_be_int_at_least_one(bad):
    with pytest.raises(ValueError, match=r"accumulation_steps must be an integer >= 1.*got"):
        attach_accumulating_updates(_groups(_model()), bad, lr=1e-2)


def test_numpy_accumulation_steps_accepted():
    handle = attach_accumulating_updates(_groups(_model()), np.int64(3), lr=1e-2)
    assert handle.accumulation_steps == 3 and type(handle.accumulation_steps) is int


def test_non_galore_optimizers_are_refused():
    with pytest.raises(TypeError, match="optimizer_class must be GaLoreAdamW"):
        attach_accumulating_updates(_groups(_model()), 2, optimizer_class=torch.optim.SGD, lr=1e-2)
    GaLoreAdamW8bit(_model().parameters())  # an instance makes torch wrap the class's step: still detected
    with pytest.raises(TypeError, match="GaLoreAdamW8bit overrides"):
        attach_accumulating_updates(_groups(_model()), 2, optimizer_class=GaLoreAdamW8bit, lr=1e-2)
    with pytest.raises(TypeError, match="no optimizer_factory.*mixing GaLore groups with a non-GaLore optimizer"):
        attach_accumulating_updates(_groups(_model()), 2, optimizer_factory=lambda g: torch.optim.SGD(g, lr=0.1))


def test_rejects_ddp_and_empty(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is unavailable")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match="single-process"):
            attach_accumulating_updates(nn.parallel.DistributedDataParallel(_model()), 2, lr=1e-2)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="empty"):
        attach_accumulating_updates([], 2)
