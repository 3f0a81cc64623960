"""Every mini layer behaves like nn.Linear under torch.autocast (CPU, bfloat16) (issue 15, section 2).

For float32 and bfloat16 inputs to float32 layers: forward and backward run, the output has the
dtype nn.Linear gives (bfloat16), the input gradient has the input's dtype, every parameter's
gradient is float32 (autocast's casts are differentiable), and output and gradients match the
float32 computation within bfloat16's precision. Layers: SLTrain's SparseLowRankLinear, Q-GaLore's
Int8Linear (whose weight gradient goes to its hook or ``weight_grad``), WeLore's
LowRankComponent, and mini.lm's LowRankLinear (the low-rank baseline).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mini.lm.lowrank import LowRankLinear
from mini.qgalore import Int8Linear
from mini.sltrain import SparseLowRankLinear
from mini.welore import LowRankComponent

IN, OUT = 48, 40
BF16_TOL = 3e-2  # relative to the largest |value|: a few bfloat16 roundings (2^-8 each)


def _layers() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    sl = SparseLowRankLinear(IN, OUT, 6, density=0.1, seed=0)
    with torch.no_grad():
        sl.B.normal_(0, 0.1)  # B = 0 at initialisation: give the low-rank part a gradient path
    return {
        "nn.Linear": nn.Linear(IN, OUT),
        "SparseLowRankLinear": sl,
        "Int8Linear": Int8Linear(IN, OUT, group_size=64),
        "LowRankComponent": LowRankComponent.from_linear(nn.Linear(IN, OUT), 8),
        "LowRankLinear": LowRankLinear(IN, OUT, 8),
    }


def _grads(layer: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    if isinstance(layer, Int8Linear):
        out["weight_grad"] = layer.weight_grad
    return out


def _run(layer: nn.Module, x: torch.Tensor, autocast: bool):
    layer.zero_grad(set_to_none=True)
    if isinstance(layer, Int8Linear):
        layer.weight_grad = None
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, OUT)).sum().backward()
    return y, x.grad, _grads(layer)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.detach().float(), b.detach().float()
    scale = float(b.abs().max()) or 1.0
    err = float((a - b).abs().max()) / scale
    assert err < BF16_TOL, (what, err)


# mini.lm.lowrank.LowRankLinear casts its float32 bias to the product's dtype, so under autocast
# its output is bfloat16 as nn.Linear's is (adding the float32 bias used to promote it)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["SparseLowRankLinear", "Int8Linear", "LowRankComponent",
                                  "LowRankLinear"])
def test_layer_under_cpu_bf16_autocast_behaves_like_nn_linear(name, x_dtype):
    layers = _layers()
    layer = layers[name]
    x = torch.randn(6, 5, IN, generator=torch.Generator().manual_seed(1)).to(x_dtype)
    y_lin, _, _ = _run(layers["nn.Linear"], x, autocast=True)
    y, gx, grads = _run(layer, x, autocast=True)
    assert y.dtype == y_lin.dtype == torch.bfloat16, (name, y.dtype)
    assert y.shape == (6, 5, OUT)
    assert gx.dtype == x_dtype
    assert grads and all(g is not None for g in grads.values())
    for n, g in grads.items():
        if n != "weight_grad":
            assert g.dtype == torch.float32, (name, n, g.dtype)  # the parameters' dtype, as nn.Linear
    # the float32 computation, without autocast
    y32, gx32, grads32 = _run(layer, x.float(), autocast=False)
    _close(y, y32, f"{name} output")
    _close(gx, gx32, f"{name} input gradient")
    for n in grads32:
        _close(grads[n], grads32[n], f"{name} {n} gradient")


@pytest.mark.parametrize("name", ["SparseLowRankLinear", "Int8Linear", "LowRankComponent", "LowRankLinear"])
def test_layer_without_autocast_is_unchanged(name):
    """Outside autocast nothing is cast: float32 in, float32 out, bitwise the layer's own forward."""
    layer = _layers()[name]
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        y = layer(x)
    assert y.dtype == torch.float32
    assert torch.equal(y, layer(x))
