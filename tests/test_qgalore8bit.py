"""QGaLoreAdamW8bit: Q-GaLore's adaptive INT4 projector on 8-bit GaLore's block-wise 8-bit
moments, so that its measured state equals the memory estimator's for "qgalore" (issue 15)."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mini.galore import galore_param_groups
from mini.galore.adamw8bit import GaLoreAdamW8bit
from mini.lm import build_model, estimate_memory, tiny_llama_config
from mini.lm.measure import state_bytes
from mini.qgalore import AdaptiveProjector, QGaLoreAdamW, QGaLoreAdamW8bit


@pytest.mark.parametrize("overrides", [{}, {"hidden_size": 256, "intermediate_size": 688}])
def test_state_bytes_equal_the_estimator(overrides):
    cfg = tiny_llama_config(vocab_size=64, **overrides)
    model = build_model(cfg, seed=0)
    opt = QGaLoreAdamW8bit(galore_param_groups(model, rank=32, update_proj_gap=10, scale=0.25), lr=1e-2)
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    est = estimate_memory(cfg, "qgalore", rank=32, weight_bytes=4, proj_bits=4, group_param_bytes=2.5)
    expected = est.state_bytes + est.projector_bytes
    by_kind = opt.state_bytes()
    assert by_kind["moments_8bit"] > 0 and by_kind["absmax"] > 0
    assert by_kind["total"] == expected == state_bytes(opt)
    assert by_kind["projector"] == est.projector_bytes
    # the float-moment QGaLoreAdamW holds about four times the moments
    float_opt = QGaLoreAdamW(galore_param_groups(model, rank=32, update_proj_gap=10, scale=0.25), lr=1e-2)
    float_opt.step()
    assert state_bytes(float_opt) > 3 * est.state_bytes


def _regression(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 24, generator=gen)
    return x, x @ (torch.randn(32, 24, generator=gen) / 24**0.5).T


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(24, 32))


def _groups(model, **extra):
    return [{"params": [model[0].bias]},
            {"params": [model[0].weight], "rank": 4, "update_proj_gap": 5, "scale": 1.0, **extra}]


def _run(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def test_follows_galore8bit_with_an_8bit_projector_and_resumes_bitwise():
    x, y = _regression()
    a, b = _model(), _model()
    w0 = a[0].weight.detach().clone()
    kw = {"lr": 1e-2, "min_8bit_size": 0}  # 8-bit moments even for these small tensors
    opt_a = QGaLoreAdamW8bit(_groups(a, proj_bits=8, proj_group_size=32), **kw)
    opt_b = GaLoreAdamW8bit(_groups(b), **kw)
    _run(a, opt_a, x, y, 15)
    _run(b, opt_b, x, y, 15)
    da, db = (a[0].weight - w0).detach().flatten(), (b[0].weight - w0).detach().flatten()
    assert float(da @ db / (da.norm() * db.norm())) > 0.9
    assert isinstance(opt_a.projectors()[0], AdaptiveProjector)
    assert opt_a.state[a[0].weight]["exp_avg"].dtype == torch.uint8
    # resume from a state dict: the same trajectory, bit for bit
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    c = _model()
    c.load_state_dict(a.state_dict())
    opt_c = QGaLoreAdamW8bit(_groups(c, proj_bits=8, proj_group_size=32), **kw)
    opt_c.load_state_dict(torch.load(buf, weights_only=True))
    _run(a, opt_a, x, y, 8)
    _run(c, opt_c, x, y, 8)
    assert torch.equal(a[0].weight, c[0].weight)


def test_validates_its_groups():
    w = nn.Parameter(torch.randn(16, 12))
    with pytest.raises(ValueError, match=r"cos_threshold must be a real number in \[0, 1\], got 2"):
        QGaLoreAdamW8bit([{"params": [w], "rank": 2, "cos_threshold": 2}])
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        QGaLoreAdamW8bit([{"params": [w], "rank": 2}], block_size=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_on_half_precision_parameters(dtype):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(64, 48, dtype=dtype))
    b = nn.Parameter(torch.randn(48, dtype=dtype))
    w0 = w.detach().clone()
    opt = QGaLoreAdamW8bit([{"params": [b]}, {"params": [w], "rank": 8}], min_8bit_size=0)
    for _ in range(3):
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
        opt.step()
    assert w.dtype == dtype and bool(torch.isfinite(w.float()).all()) and not torch.equal(w, w0)
    assert opt.state[w]["exp_avg"].dtype == torch.uint8
