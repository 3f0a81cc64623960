"""Every mini optimizer on bfloat16 and float16 parameters (issue 15, section 2).

GaLoreAdamW, GaLoreAdamW8bit, QGaLoreAdamW, the per-layer (hook) versions of the first two, and
Int8LayerwiseQGaLore (INT8 weights, a bf16/fp16 bias and activations). Each runs a few steps on a
small regression from the same initial weights as a float32 run: it must not fail, its states must
have the documented dtypes, its loss must go down, and its update must stay close to the float32
run's (relative to the distance travelled). mini has no Adafactor variant.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mini.galore import GaLoreAdamW, GaLoreAdamW8bit, attach_layerwise_updates
from mini.qgalore import Int8LayerwiseQGaLore, Int8Linear, QGaLoreAdamW

STEPS = 6
LOW = [torch.bfloat16, torch.float16]
# update error of a low-precision run against float32, relative to the float32 update: bf16
# keeps 8 significant bits (rounding 2^-9 = 0.2% per operation), fp16 11 bits
UPDATE_TOL = {torch.bfloat16: 0.12, torch.float16: 0.06}  # measured at most 0.062 and 0.028 (QGaLoreAdamW)


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g)
    w = torch.randn(16, 32, generator=g) / 32**0.5
    return x.to(dtype), torch.tanh(x @ w.T).to(dtype)


def _model(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 16)).to(dtype)


def _groups(m: nn.Sequential) -> list[dict]:
    return [{"params": [m[0].bias, m[2].bias]},
            {"params": [m[0].weight, m[2].weight], "rank": 4, "update_proj_gap": 3, "scale": 1.0}]


def _galore(m):
    return GaLoreAdamW(_groups(m), lr=1e-2)


def _galore8(m):
    return GaLoreAdamW8bit(_groups(m), lr=1e-2, weight_decay=0.0, min_8bit_size=64)


def _qgalore(m):
    return QGaLoreAdamW(_groups(m), lr=1e-2)


def _layerwise(cls, **kw):
    def make(m):
        return attach_layerwise_updates(_groups(m), lambda groups: cls(groups, lr=1e-2, **kw))
    return make


OPTIMIZERS = {
    "GaLoreAdamW": _galore,
    "GaLoreAdamW8bit": _galore8,
    "QGaLoreAdamW": _qgalore,
    "layerwise GaLoreAdamW": _layerwise(GaLoreAdamW),
    "layerwise GaLoreAdamW8bit": _layerwise(GaLoreAdamW8bit, weight_decay=0.0, min_8bit_size=64),
}


def _train(make, dtype):
    m = _model(dtype)
    x, y = _data(dtype)
    w0 = [p.detach().float().clone() for p in m.parameters()]
    opt = make(m)
    layerwise = not isinstance(opt, torch.optim.Optimizer)
    losses = []
    for _ in range(STEPS):
        loss = F.mse_loss(m(x).float(), y.float())
        losses.append(loss.item())
        if not layerwise:
            opt.zero_grad()
        loss.backward()
        if not layerwise:
            opt.step()
    with torch.no_grad():
        losses.append(F.mse_loss(m(x).float(), y.float()).item())
    return m, opt, w0, losses


def _states(opt):
    optimizers = opt.optimizers if hasattr(opt, "optimizers") else [opt]
    return [(p, o.state[p]) for o in optimizers for g in o.param_groups for p in g["params"] if p in o.state]


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_runs_on_low_precision_parameters(name, dtype):
    make = OPTIMIZERS[name]
    m, opt, w0, losses = _train(make, dtype)
    ref, _, _, ref_losses = _train(make, torch.float32)
    assert all(p.dtype == dtype for p in m.parameters())
    assert losses[-1] < 0.9 * losses[0], losses  # it trains
    # the update is the float32 run's within the precision of the dtype
    for p, q, p0 in zip(m.parameters(), ref.parameters(), w0):
        moved = (q.detach() - p0).norm()
        err = (p.detach().float() - q.detach()).norm()
        assert float(err / moved) < UPDATE_TOL[dtype], (name, tuple(p.shape), float(err / moved))
    # states: float moments in the parameter's dtype for bf16 (as galore-torch), float32 for fp16
    # (an fp16 second moment underflows); 8-bit codes uint8 with float32 absmax; small 8-bit
    # optimizer moments float32
    eight_bit = "8bit" in name
    for p, state in _states(opt):
        m1, m2 = state["exp_avg"], state["exp_avg_sq"]
        assert m1.dtype == m2.dtype
        if eight_bit:
            if m1.dtype == torch.uint8:
                assert state["exp_avg_absmax"].dtype == torch.float32
            else:
                assert m1.dtype == torch.float32
        else:
            assert m1.dtype == (torch.float32 if dtype == torch.float16 else dtype), (p.shape, m1.dtype)
        projector = state.get("projector")
        if projector is not None:
            assert projector.ortho.dtype == dtype
    if eight_bit:
        assert any(s["exp_avg"].dtype == torch.uint8 for _, s in _states(opt))


@pytest.mark.parametrize("name", ["GaLoreAdamW", "QGaLoreAdamW"])
def test_bfloat16_moments_are_bfloat16_as_galore_torch(name):
    """bf16 keeps galore-torch's behaviour (moments in the gradient's dtype): only fp16 changes."""
    _, opt, _, _ = _train(OPTIMIZERS[name], torch.bfloat16)
    assert {s["exp_avg"].dtype for _, s in _states(opt)} == {torch.bfloat16}


def _int8_model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(Int8Linear.from_linear(nn.Linear(32, 16), group_size=64)).to(dtype)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_int8_layerwise_qgalore_on_low_precision_activations(dtype):
    """model.to(dtype) casts the bias but keeps the INT8 layer's scales float32."""
    m = _int8_model(dtype)
    layer = m[0]
    assert layer.bias.dtype == dtype and layer.scale.dtype == torch.float32 and layer.codes.dtype == torch.uint8
    x, y = _data(dtype)
    opt = Int8LayerwiseQGaLore(m, rank=4, update_proj_gap=3, lr=2e-2, generator=torch.Generator().manual_seed(0))
    ref = _int8_model(torch.float32)
    opt_ref = Int8LayerwiseQGaLore(ref, rank=4, update_proj_gap=3, lr=2e-2, generator=torch.Generator().manual_seed(0))
    w0 = layer.dequantized_weight()
    losses = []
    for _ in range(STEPS):
        loss = F.mse_loss(m(x).float(), y.float())
        losses.append(loss.item())
        loss.backward()
        F.mse_loss(ref(x.float()), y.float()).backward()
    assert m(x).dtype == dtype
    with torch.no_grad():
        assert float(F.mse_loss(m(x).float(), y.float())) < losses[0]
    state = opt.states[0]
    assert state["exp_avg"].dtype == torch.float32 and layer.scale.dtype == torch.float32
    moved = (ref[0].dequantized_weight() - w0).norm()
    err = (layer.dequantized_weight() - ref[0].dequantized_weight()).norm()
    assert float(err / moved) < 0.25, float(err / moved)  # stochastic rounding of 1-code steps dominates
    del opt_ref


def test_int8_linear_to_device_and_half_keeps_float32_scales():
    layer = _int8_model(torch.float32)[0]
    scale = layer.scale.clone()
    layer.half()
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale)
    layer.to(torch.bfloat16)
    assert layer.scale.dtype == torch.float32 and torch.equal(layer.scale, scale)
    assert layer.bias.dtype == torch.bfloat16
    layer.to("meta")
    assert layer.scale.device.type == "meta" and layer.scale.dtype == torch.float32
