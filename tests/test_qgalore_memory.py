"""Int8Linear saves no dense weight for backward (issue 15): only the input is saved, the weight is
dequantized again in backward, with the same gradients bit for bit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mini.lm import build_model, tiny_llama_config
from mini.lm.measure import training_step_bytes
from mini.qgalore import Int8Linear


def _layer(in_f=40, out_f=30, bias=True, group_size=64, seed=0) -> Int8Linear:
    torch.manual_seed(seed)
    return Int8Linear.from_linear(nn.Linear(in_f, out_f, bias=bias), group_size=group_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_equal_the_dense_formula_bitwise(dtype):
    layer = _layer(bias=False)
    x = torch.randn(3, 5, 40, dtype=dtype, requires_grad=True)
    y = layer(x)  # (3, 5, 30)
    g = torch.randn_like(y)
    y.backward(g)
    w = layer.dequantized_weight(dtype)  # (30, 40): what the old forward saved for backward
    assert torch.equal(y, x.detach().matmul(w.t()))
    assert torch.equal(x.grad, g.matmul(w))
    assert torch.equal(layer.weight_grad, g.reshape(-1, 30).t().matmul(x.detach().reshape(-1, 40)))


def test_gradients_under_autocast_equal_the_dense_formula_bitwise():
    layer = _layer()
    x = torch.randn(6, 40, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)  # (6, 30) bfloat16
    g = torch.randn_like(y)
    y.backward(g)
    w = layer.dequantized_weight(torch.bfloat16)
    assert torch.equal(x.grad, g.matmul(w).float())
    assert torch.equal(layer.weight_grad, g.t().matmul(x.detach().bfloat16()))


def test_only_the_input_is_saved_for_backward():
    layer = _layer()
    x = torch.randn(4, 40, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert len(saved) == 1 and saved[0] is x  # no (30, 40) float weight among them
    y.sum().backward()
    assert layer.weight_grad.shape == (30, 40)


def test_int8_model_saves_no_more_than_the_float_model():
    """``training_step_bytes`` of a LLaMA whose projections are Int8Linear: its saved activations
    equal the float model's (the old forward saved 4 more bytes per projected weight)."""
    cfg = tiny_llama_config(vocab_size=64, hidden_size=64, intermediate_size=160)
    model = build_model(cfg, seed=0)
    torch.manual_seed(0)
    batch = (torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    float_saved = training_step_bytes(model, batch)["saved activations"]

    def swap(m: nn.Module) -> None:
        for name, child in list(m.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                setattr(m, name, Int8Linear.from_linear(child, group_size=64))
            else:
                swap(child)

    swap(model)
    n_int8 = sum(m.codes.numel() for m in model.modules() if isinstance(m, Int8Linear))
    assert n_int8 > 0
    assert training_step_bytes(model, batch)["saved activations"] == float_saved


def test_weight_changed_between_forward_and_backward_raises():
    layer = _layer()
    x = torch.randn(4, 40, requires_grad=True)
    y = layer(x)
    layer.apply_update_(torch.full((30, 40), 1e-2))
    with pytest.raises(RuntimeError, match="updated between this call's forward and its backward"):
        y.sum().backward()
    # without an input gradient there is nothing to recompute: the weight gradient still comes
    layer.weight_grad = None
    y = layer(x.detach())
    layer.set_weight_(torch.zeros(30, 40))
    y.sum().backward()
    assert layer.weight_grad is not None
