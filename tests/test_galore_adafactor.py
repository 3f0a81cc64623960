"""Tests of mini.galore.adafactor.GaLoreAdafactor: bitwise against galore-torch's GaLoreAdafactor,
state_dict round trip with weights_only loading, and the error paths (issue 18)."""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import types

import pytest
import torch
from torch import nn

from mini.galore.adafactor import ADAFACTOR_DEFAULTS, GaLoreAdafactor
from mini.galore.projector import PROJ_TYPES

_SPEC = importlib.util.find_spec("galore_torch")
needs_galore_torch = pytest.mark.skipif(_SPEC is None, reason="galore-torch is not installed")


def _reference_cls() -> type[torch.optim.Optimizer]:
    """galore-torch's GaLoreAdafactor, loaded without the package's ``__init__``.

    ``import galore_torch`` imports bitsandbytes for its 8-bit optimizer (about 7 s here); the
    Adafactor module needs only its projector and transformers' version check. The same source
    file is loaded under a private package name, so ``sys.modules["galore_torch"]`` is untouched.
    """
    if "galore_torch" in sys.modules:
        return sys.modules["galore_torch"].GaLoreAdafactor
    name = "_galore_torch_adafactor_only"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = list(_SPEC.submodule_search_locations)
        sys.modules[name] = pkg
    return importlib.import_module(f"{name}.adafactor").Adafactor


# ----------------------------------------------------------------------------- helpers
def _mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Projected: (20, 12) (m ≥ n) and (7, 16) (m < n); plain: a (16, 20) matrix and the biases."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 7))
    with torch.no_grad():
        model[2].bias.zero_()  # RMS(W) = 0 < eps2: the step size's float branch
    return model.to(dtype)


def _groups(model: nn.Sequential, proj_type: str = "std", rank: int = 4, gap: int = 7) -> list[dict]:
    projected = [model[0].weight, model[4].weight]
    plain = [model[0].bias, model[2].weight, model[2].bias, model[4].bias]
    return [
        {"params": plain},
        {"params": projected, "rank": rank, "update_proj_gap": gap, "scale": 0.25, "proj_type": proj_type},
    ]


def _data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=gen), torch.randn(n, 7, generator=gen)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    X, Y = _data(seed=seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        opt.zero_grad()
        ((model(X.to(dtype)).float() - Y) ** 2).mean().backward()
        opt.step()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


CONFIGS = {
    "relative_step": {},  # galore-torch's defaults: lr None, no first moment
    "fixed_lr_beta1_wd": {"lr": 3e-2, "relative_step": False, "scale_parameter": False, "beta1": 0.9,
                          "weight_decay": 0.1},
    "warmup_scaled_beta1": {"warmup_init": True, "beta1": 0.5, "weight_decay": 0.01, "clip_threshold": 0.5},
}


# ----------------------------------------------------------------------------- against galore-torch
@needs_galore_torch
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_trajectory_and_state_match_galore_torch_bitwise(proj_type, config):
    """20 steps, SVDs at steps 0, 7, 14: bitwise the same parameters and optimizer statistics."""
    runs = []
    for cls in (_reference_cls(), GaLoreAdafactor):
        model = _mlp()
        opt = cls(_groups(model, proj_type), **CONFIGS[config])
        _train(model, opt, 20)
        runs.append((model, opt))
    (ref_model, ref_opt), (model, opt) = runs
    _assert_equal(_params(ref_model), _params(model))
    for p_ref, p in zip(ref_model.parameters(), model.parameters()):
        ref_state, state = ref_opt.state[p_ref], opt.state[p]
        assert set(ref_state) == set(state) and state["step"] == 20
        for key in set(state) - {"projector", "step"}:
            torch.testing.assert_close(state[key], ref_state[key], rtol=0, atol=0)
    assert opt.n_svd() == 2 * 3
    if config == "fixed_lr_beta1_wd":  # the plain (16, 20) matrix is factored, the biases are not
        assert set(opt.state[model[2].weight]) >= {"exp_avg_sq_row", "exp_avg_sq_col"}
        assert "exp_avg_sq" in opt.state[model[2].bias]


@needs_galore_torch
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_match_galore_torch_bitwise(dtype):
    """Half-precision parameters: float32 statistics and update, rounded into the parameter."""
    runs = []
    for cls in (_reference_cls(), GaLoreAdafactor):
        model = _mlp(dtype=dtype)
        opt = cls(_groups(model), beta1=0.9)
        _train(model, opt, 12)
        runs.append((model, opt))
    _assert_equal(_params(runs[0][0]), _params(runs[1][0]))
    assert runs[1][1].state[runs[1][0][0].weight]["exp_avg_sq_row"].dtype == torch.float32


@needs_galore_torch
def test_defaults_are_galore_torchs():
    ref = inspect.signature(_reference_cls().__init__).parameters
    ours = inspect.signature(GaLoreAdafactor.__init__).parameters
    assert list(ref) == list(ours)
    for name, value in ADAFACTOR_DEFAULTS.items():
        assert ref[name].default == ours[name].default == value


# ----------------------------------------------------------------------------- the state
def test_projected_statistics_are_low_rank_and_counted():
    model = _mlp()
    opt = GaLoreAdafactor(_groups(model, rank=4), beta1=0.9)
    _train(model, opt, 1)
    s0, s4 = opt.state[model[0].weight], opt.state[model[4].weight]
    assert s0["exp_avg_sq_row"].shape == (20,) and s0["exp_avg_sq_col"].shape == (4,)  # right side (20, 4)
    assert s4["exp_avg_sq_row"].shape == (4,) and s4["exp_avg_sq_col"].shape == (16,)  # left side (4, 16)
    assert s0["exp_avg"].shape == (20, 4) and s4["exp_avg"].shape == (4, 16)
    stats = (20 + 4 + 80) + (4 + 16 + 64) + (16 + 20 + 320) + 2 * (20 + 16 + 7)  # row, col, M; biases V, M
    basis = 4 * 12 + 7 * 4  # Vh[:4] (4, 12), U[:, :4] (7, 4)
    assert opt.state_bytes() == 4 * (stats + basis)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_weights_only_resumes_bitwise(tmp_path, dtype):
    """Save after 8 steps (SVDs at 0 and 7), load with weights_only=True, 10 more steps: bitwise."""
    kwargs = {"beta1": 0.9, "weight_decay": 0.01}
    ref = _mlp(dtype=dtype)
    opt = GaLoreAdafactor(_groups(ref, "full"), **kwargs)
    _train(ref, opt, 8)
    torch.save({"model": ref.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(ref, opt, 10, seed=2)

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = _mlp(seed=123, dtype=dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = GaLoreAdafactor(_groups(resumed, "full"), **kwargs)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.n_svd() == 2 * 2
    state = opt2.state[resumed[0].weight]
    assert state["step"] == 8 and state["exp_avg_sq_row"].dtype == torch.float32
    assert state["projector"].side == "full" and state["projector"].ortho_right.shape == (4, 12)
    _train(resumed, opt2, 10, seed=2)
    _assert_equal(_params(ref), _params(resumed))
    assert opt2.n_svd() == opt.n_svd() == 2 * 3


def test_missing_group_keys_take_galoreadamw_defaults():
    model = _mlp()
    opt = GaLoreAdafactor([{"params": [model[0].weight], "rank": 2}])
    group = opt.param_groups[0]
    assert (group["update_proj_gap"], group["scale"], group["proj_type"]) == (200, 0.25, "std")
    assert group["eps"] == (1e-30, 1e-3) and group["lr"] is None


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"lr": 1e-3}, ValueError, r"lr=0.001 cannot be combined with relative_step=True"),
        ({"relative_step": False}, ValueError, r"lr=None requires relative_step=True"),
        ({"lr": -1.0, "relative_step": False}, ValueError, r"lr must be None or a finite real number >= 0, got -1.0"),
        ({"lr": 1e-3, "relative_step": False, "warmup_init": True}, ValueError,
         r"warmup_init=True requires relative_step=True"),
        ({"eps": (1e-30,)}, ValueError, r"eps must be two finite real numbers >= 0.*got \(1e-30,\)"),
        ({"eps": (-1.0, 1e-3)}, ValueError, r"eps must be two .*got \(-1.0, 0.001\)"),
        ({"clip_threshold": 0.0}, ValueError, r"clip_threshold must be a finite real number > 0, got 0.0"),
        ({"decay_rate": 0.8}, ValueError, r"decay_rate must be a finite real number <= 0.*got 0.8"),
        ({"beta1": 1.0}, ValueError, r"beta1 must be None \(no first moment\) or a number in \[0, 1\), got 1.0"),
        ({"weight_decay": -0.1}, ValueError, r"weight_decay must be a finite real number >= 0, got -0.1"),
        ({"weight_decay": float("nan")}, ValueError, r"weight_decay must be .*got nan"),
        ({"scale_parameter": 1}, TypeError, r"scale_parameter must be True or False, got 1"),
        ({"relative_step": "yes"}, TypeError, r"relative_step must be True or False, got 'yes'"),
    ],
)
def test_bad_hyperparameters_name_argument_value_and_range(kwargs, error, match):
    with pytest.raises(error, match=match):
        GaLoreAdafactor(_mlp().parameters(), **kwargs)


def test_bad_hyperparameter_in_a_group_is_rejected():
    model = _mlp()
    with pytest.raises(ValueError, match=r"lr=0.1 cannot be combined with relative_step=True"):
        GaLoreAdafactor([{"params": [model[0].bias], "lr": 0.1}])


@pytest.mark.parametrize(
    ("group", "error", "match"),
    [
        ({"rank": 0}, ValueError, r"rank must be a positive integer, got 0"),
        ({"rank": 2.5}, TypeError, r"rank must be a positive integer, got 2.5"),
        ({"rank": 2, "update_proj_gap": 0}, ValueError, r"update_proj_gap must be a positive integer"),
        ({"rank": 2, "proj_type": "diag"}, ValueError, r"proj_type must be one of 'std'.*got 'diag'"),
        ({"rank": 2, "scale": float("inf")}, ValueError, r"scale must be a finite real number"),
    ],
)
def test_bad_projected_group_keys(group, error, match):
    model = _mlp()
    with pytest.raises(error, match=match):
        GaLoreAdafactor([{"params": [model[0].weight], **group}])


def test_1d_parameter_or_set_in_projected_group():
    model = _mlp()
    with pytest.raises(ValueError, match=r"parameter '0.bias' of shape \(20,\): only 2-D weight matrices"):
        GaLoreAdafactor([{"params": [("0.bias", model[0].bias)], "rank": 2}])
    with pytest.raises(TypeError, match=r"params must be an ordered collection \(a list\), not a set"):
        GaLoreAdafactor([{"params": {model[0].weight}, "rank": 2}])
