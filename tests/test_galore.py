"""Tests of mini.galore: projector, GaLoreAdamW (against galore-torch), param groups, per-layer
updates, DDP, state_dict round trip and the error paths of issue 6."""
from __future__ import annotations

import importlib.util
import re
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mini.galore import GaLoreAdamW, GaLoreProjector
from mini.galore.groups import GaLoreConfig, galore_param_groups
from mini.galore.layerwise import attach_layerwise_updates
from mini.galore.projector import PROJ_TYPES

HAS_GALORE_TORCH = importlib.util.find_spec("galore_torch") is not None


def _galore_torch():
    """galore-torch, imported on use (it imports bitsandbytes: slow, and not needed by DDP workers)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import galore_torch
    return galore_torch


needs_galore_torch = pytest.mark.skipif(not HAS_GALORE_TORCH, reason="galore-torch is not installed")


# ----------------------------------------------------------------------------- helpers
def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 7))


def _data(n: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=gen), torch.randn(n, 7, generator=gen)


def _groups(model: nn.Sequential, rank: int = 4, gap: int = 10, proj_type: str = "std", scale: float = 0.25):
    projected = [model[0].weight, model[2].weight]
    regular = [model[0].bias, model[2].bias]
    return [
        {"params": regular},
        {"params": projected, "rank": rank, "update_proj_gap": gap, "scale": scale, "proj_type": proj_type},
    ]


def _train(model, opt, X, Y, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        ((model(X) - Y) ** 2).mean().backward()
        opt.step()


def _params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _assert_equal(a, b) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ----------------------------------------------------------------------------- against galore-torch
@needs_galore_torch
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
def test_trajectory_matches_galore_torch(proj_type):
    """25 steps, SVDs at steps 0, 10, 20, weight decay on: bitwise the same parameters."""
    X, Y = _data()
    runs = []
    for cls in (_galore_torch().GaLoreAdamW, GaLoreAdamW):
        model = _mlp()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # galore-torch's deprecation warning
            opt = cls(_groups(model, proj_type=proj_type), lr=1e-2, weight_decay=0.01)
        _train(model, opt, X, Y, 25)
        runs.append(_params(model))
    _assert_equal(*runs)
    assert sum(p.n_svd for p in opt.projectors()) == 2 * 3


# ----------------------------------------------------------------------------- projector
@pytest.mark.parametrize("proj_type", PROJ_TYPES)
@pytest.mark.parametrize("shape", [(5, 8), (8, 5), (6, 6)])
def test_full_rank_projection(proj_type, shape):
    """At rank ≥ min(m, n): project_back(project(G)) = α G for the SVD's own gradient, and for every
    gradient when the projected side is the smaller one (square orthogonal basis: GaLore-SGD is SGD)."""
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=gen)
    proj = GaLoreProjector(rank=max(shape), proj_type=proj_type, scale=0.5)
    with pytest.warns(UserWarning, match=re.escape(f"shape {tuple(shape)}") + ".*full rank"):
        R = proj.project(G, 0)
    tol = {"rtol": 1e-5, "atol": 1e-5}  # the SVD runs in float32, as galore-torch's
    torch.testing.assert_close(proj.project_back(R), 0.5 * G, **tol)
    H = torch.randn(*shape, generator=gen)  # a later gradient, same basis
    H_back = proj.project_back(proj.project(H, 1))
    m, n = shape
    square = {"left": m <= n, "right": n <= m, "full": m == n}[proj.side]
    if square:
        torch.testing.assert_close(H_back, 0.5 * H, **tol)
    else:  # a thin SVD spans only min(m, n) of the larger side's directions
        assert (H_back - 0.5 * H).abs().max() > 0.1


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_low_rank_projection_sides_and_truncated_svd(proj_type):
    m, n, r = 9, 6, 3
    G = torch.randn(m, n, generator=torch.Generator().manual_seed(1))
    proj = GaLoreProjector(rank=r, proj_type=proj_type, scale=1.0)
    R = proj.project(G, 0)
    side = {"std": "right", "reverse_std": "left", "left": "left", "right": "right", "full": "full"}[proj_type]
    assert proj.side == side
    assert R.shape == {"left": (r, n), "right": (m, r), "full": (r, r)}[side]
    U, s, Vh = torch.linalg.svd(G, full_matrices=False)
    best = U[:, :r] @ torch.diag(s[:r]) @ Vh[:r]  # Eckart–Young: every side gives the rank-r SVD
    torch.testing.assert_close(proj.project_back(R), best, rtol=1e-5, atol=1e-5)


def test_side_is_stored_reverse_std_full_rank():
    """galore-torch re-decides the side from the low-rank shape and fails here; we store it."""
    G = torch.randn(4, 10)
    proj = GaLoreProjector(rank=4, proj_type="reverse_std", scale=1.0)
    with pytest.warns(UserWarning, match=r"\(4, 10\)"):
        R = proj.project(G, 0)
    assert proj.side == "right" and R.shape == (4, 4)
    torch.testing.assert_close(proj.project_back(R), G, rtol=1e-5, atol=1e-5)
    if HAS_GALORE_TORCH:
        _galore_torch()
        from galore_torch.galore_projector import GaLoreProjector as OfficialProjector

        official = OfficialProjector(4, proj_type="reverse_std")
        with pytest.raises(RuntimeError):
            official.project_back(official.project(G, 0))


def test_svd_schedule_and_count():
    proj = GaLoreProjector(rank=2, update_proj_gap=3)
    gen = torch.Generator().manual_seed(0)
    bases = []
    for step in range(7):
        proj.project(torch.randn(5, 4, generator=gen), step)
        bases.append(proj.ortho.clone())
    assert proj.n_svd == 3  # steps 0, 3, 6
    assert torch.equal(bases[0], bases[2]) and not torch.equal(bases[2], bases[3])


def test_svd_failure_keeps_previous_basis(monkeypatch):
    proj = GaLoreProjector(rank=2, update_proj_gap=1)
    proj.project(torch.randn(5, 4), 0)
    old = proj.ortho.clone()
    with pytest.warns(UserWarning, match="not finite.*keeping the previous basis"):
        proj.project(torch.full((5, 4), float("nan")), 1)
    assert torch.equal(proj.ortho, old)

    def no_convergence(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", no_convergence)
    with pytest.warns(UserWarning, match="did not converge.*keeping the previous basis"):
        R = proj.project(torch.randn(5, 4), 2)
    assert torch.equal(proj.ortho, old) and R.shape == (5, 2)
    assert proj.n_svd == 1 and proj.n_fallback == 2


def test_zero_gradient_without_basis_falls_back_to_identity():
    proj = GaLoreProjector(rank=2, update_proj_gap=1, scale=1.0)
    with pytest.warns(UserWarning, match="all zeros.*identity"):
        R = proj.project(torch.zeros(3, 5), 0)
    assert proj.side == "left" and torch.equal(proj.ortho, torch.eye(3)[:, :2]) and not R.any()
    proj.project(torch.randn(3, 5), 1)  # a real SVD at the next refresh
    assert proj.n_svd == 1


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("rank", [0, -3, 2.0, True, "4", None])
def test_rank_must_be_positive_int(rank):
    with pytest.raises((TypeError, ValueError), match="rank"):
        GaLoreProjector(rank=rank)
    model = _mlp()
    with pytest.raises((TypeError, ValueError), match="rank"):
        GaLoreAdamW(_groups(model, rank=rank))
    with pytest.raises((TypeError, ValueError), match="rank"):
        galore_param_groups(model, rank=rank, target_modules=("0",))


@pytest.mark.parametrize("gap", [0, -1])
def test_update_proj_gap_must_be_positive(gap):
    with pytest.raises(ValueError, match="update_proj_gap"):
        GaLoreProjector(rank=2, update_proj_gap=gap)
    with pytest.raises(ValueError, match="update_proj_gap"):
        GaLoreAdamW(_groups(_mlp(), gap=gap))


def test_unknown_proj_type_lists_known():
    for make in (lambda: GaLoreProjector(rank=2, proj_type="diag"), lambda: GaLoreAdamW(_groups(_mlp(), proj_type="diag"))):
        with pytest.raises(ValueError, match="proj_type") as info:
            make()
        assert all(repr(t) in str(info.value) for t in PROJ_TYPES) and "'diag'" in str(info.value)


def test_1d_parameter_in_projected_group():
    model = _mlp()
    with pytest.raises(ValueError, match=r"shape \(20,\)"):
        GaLoreAdamW([{"params": [model[0].weight, model[0].bias], "rank": 4}])
    with pytest.raises(ValueError, match=r"'0.bias' of shape \(20,\)"):
        GaLoreAdamW([{"params": list(model.named_parameters()), "rank": 4}])


# ----------------------------------------------------------------------------- Adam and rotations
def test_full_rank_galore_adam_is_adam_in_rotated_coordinates():
    """With a fixed full-rank basis P (n×n orthogonal), α = 1: GaLore-Adam on W is Adam on X = W Pᵀ.

    And it is *not* Adam on W (elementwise normalisation is not rotation invariant)."""
    X, Y = _data()
    model = _mlp()
    W0 = model[0].weight.detach().clone()
    opt = GaLoreAdamW([{"params": [model[0].weight], "rank": 12, "update_proj_gap": 1000, "scale": 1.0,
                        "proj_type": "right"}], lr=1e-2)
    with pytest.warns(UserWarning, match="full rank"):
        _train(model, opt, X, Y, 8)
    P = opt.state[model[0].weight]["projector"].ortho  # (12, 12)

    rot = _mlp()  # same init; train X = W Pᵀ with plain (non-projected) GaLoreAdamW = HF AdamW
    x = nn.Parameter(W0 @ P.t())
    opt_x = GaLoreAdamW([x], lr=1e-2)
    adam = _mlp()
    opt_w = GaLoreAdamW([adam[0].weight], lr=1e-2)
    for _ in range(8):
        for net, o, param in ((rot, opt_x, x), (adam, opt_w, None)):
            o.zero_grad()
            if param is not None:
                h = torch.tanh(X @ (param @ P).t() + net[0].bias)
                loss = ((net[2](h) - Y) ** 2).mean()
            else:
                loss = ((net(X) - Y) ** 2).mean()
            loss.backward()
            o.step()
    torch.testing.assert_close(model[0].weight.detach(), x.detach() @ P, rtol=1e-5, atol=1e-6)
    assert (model[0].weight - adam[0].weight).abs().max() > 1e-3


def test_project_moments_changes_trajectory_after_switch():
    X, Y = _data()
    results = []
    for carry in (False, True):
        model = _mlp()
        opt = GaLoreAdamW(_groups(model, rank=3, gap=5), lr=1e-2, project_moments=carry)
        _train(model, opt, X, Y, 5)
        results.append(_params(model))  # before any switch: identical
        _train(model, opt, X, Y, 7)
        results.append(_params(model))
    _assert_equal(results[0], results[2])
    assert max((a - b).abs().max() for a, b in zip(results[1], results[3])) > 1e-6


def test_project_moments_changes_nothing_when_basis_is_unchanged():
    """A linear loss has a constant gradient, so every SVD returns the same basis: bitwise equal."""
    C = torch.randn(9, 6, generator=torch.Generator().manual_seed(3))
    out = []
    for carry in (False, True):
        w = nn.Parameter(torch.randn(9, 6, generator=torch.Generator().manual_seed(4)))
        opt = GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": 3}], lr=1e-2, project_moments=carry)
        for _ in range(10):
            opt.zero_grad()
            (w * C).sum().backward()
            opt.step()
        out.append(w.detach().clone())
        assert opt.n_svd() == 4
    _assert_equal(out[0], out[1])


@pytest.mark.parametrize("proj_type", ["left", "right", "full"])
def test_transfer_moments_preserves_first_moment_at_full_rank(proj_type):
    """At full rank the rotation is orthogonal: back(M) is unchanged, and V stays ≥ 0."""
    gen = torch.Generator().manual_seed(5)
    opt = GaLoreAdamW([nn.Parameter(torch.zeros(1))])
    proj = GaLoreProjector(rank=6, proj_type=proj_type, scale=1.0)
    with pytest.warns(UserWarning):
        R = proj.project(torch.randn(6, 6, generator=gen), 0)
    state = {"exp_avg": torch.randn(R.shape, generator=gen),
             "exp_avg_sq": torch.rand(R.shape, generator=gen)}
    before = proj.project_back(state["exp_avg"])
    old = proj.basis()
    proj.update_basis(torch.randn(6, 6, generator=gen))
    opt.transfer_moments(state, proj, old)
    torch.testing.assert_close(proj.project_back(state["exp_avg"]), before, rtol=1e-5, atol=1e-5)
    assert (state["exp_avg_sq"] >= 0).all()


# ----------------------------------------------------------------------------- state_dict
def test_state_dict_round_trip_weights_only_bitwise(tmp_path):
    X, Y = _data()
    ref = _mlp()
    opt = GaLoreAdamW(_groups(ref, rank=3, gap=5), lr=1e-2, weight_decay=0.01, project_moments=True)
    _train(ref, opt, X, Y, 12)
    torch.save({"model": ref.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(ref, opt, X, Y, 13)

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = _mlp(seed=123)  # new parameters, then loaded
    resumed.load_state_dict(ckpt["model"])
    opt2 = GaLoreAdamW(_groups(resumed, rank=3, gap=5), lr=1e-2, weight_decay=0.01, project_moments=True)
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.n_svd() == 2 * 3  # steps 0, 5, 10
    _train(resumed, opt2, X, Y, 13)
    _assert_equal(_params(ref), _params(resumed))
    assert opt2.n_svd() == opt.n_svd() == 2 * 5


# ----------------------------------------------------------------------------- HF-style groups
def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_galore_param_groups_on_tiny_llama():
    model = _tiny_llama()
    groups = galore_param_groups(model, rank=8, update_proj_gap=2)
    names = {id(p): n for n, p in model.named_parameters()}
    projected = [names[id(p)] for p in groups[1]["params"]]
    regular = [names[id(p)] for p in groups[0]["params"]]
    assert len(projected) == 2 * 7 and all(("self_attn" in n or "mlp" in n) and n.endswith("weight") for n in projected)
    assert any("embed_tokens" in n for n in regular) and any("lm_head" in n for n in regular)
    assert any("norm" in n for n in regular)
    assert sorted(projected + regular) == sorted(names.values())
    assert groups[1]["rank"] == 8 and groups[1]["proj_type"] == "std"

    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    start = _params(model)
    runs = []
    classes = [GaLoreAdamW] + ([_galore_torch().GaLoreAdamW] if HAS_GALORE_TORCH else [])
    for cls in classes:  # the same groups drive galore-torch: switching is a change of import
        with torch.no_grad():
            for p, s in zip(model.parameters(), start):
                p.copy_(s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = cls(galore_param_groups(model, rank=8, update_proj_gap=2), lr=1e-3)
        for _ in range(3):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        runs.append(_params(model))
    if len(runs) == 2:
        _assert_equal(*runs)
    with pytest.raises(ValueError, match="matched no"):
        galore_param_groups(model, rank=8, target_modules=("nonexistent",))
    by_config = GaLoreConfig(rank=8, update_proj_gap=2).param_groups(model)
    assert [len(g["params"]) for g in by_config] == [len(g["params"]) for g in groups]
    with pytest.raises(ValueError, match="proj_type"):
        GaLoreConfig(proj_type="tucker")


# ----------------------------------------------------------------------------- per-layer updates
def test_layerwise_equals_standard_step_with_schedule(tmp_path):
    X, Y = _data()
    sched = lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda t: 1.0 / (1 + t))  # noqa: E731
    std = _mlp()
    opt = GaLoreAdamW(_groups(std, rank=3, gap=5), lr=1e-2)
    s = sched(opt)
    for _ in range(12):
        opt.zero_grad()
        ((std(X) - Y) ** 2).mean().backward()
        opt.step()
        s.step()

    lw = _mlp()
    handle = attach_layerwise_updates(_groups(lw, rank=3, gap=5), lr=1e-2, track_memory=True)
    handle.add_schedulers(sched)
    for step in range(12):
        ((lw(X) - Y) ** 2).mean().backward()
        assert all(p.grad is None for p in lw.parameters())
        handle.scheduler_step()
        if step == 5:
            torch.save(handle.state_dict(), tmp_path / "lw.pt")
    torch.testing.assert_close(_params(std), _params(lw), rtol=1e-6, atol=1e-7)
    assert handle.n_updates == 12 * 4 and handle.n_svd() == 2 * 3
    assert handle.lr == pytest.approx(opt.param_groups[0]["lr"])

    all_grad_bytes = sum(p.numel() * p.element_size() for p in lw.parameters())
    largest = max(p.numel() * p.element_size() for p in lw.parameters())
    assert handle.peak_grad_bytes == largest < all_grad_bytes  # 560 of 1068 bytes here

    handle.remove()  # hooks gone: backward leaves gradients and changes nothing
    before = _params(lw)
    ((lw(X) - Y) ** 2).mean().backward()
    assert all(p.grad is not None for p in lw.parameters())
    _assert_equal(before, _params(lw))

    fresh = _mlp()
    h2 = attach_layerwise_updates(_groups(fresh, rank=3, gap=5), lr=1e-2)
    h2.add_schedulers(sched)
    h2.load_state_dict(torch.load(tmp_path / "lw.pt", weights_only=True))
    assert h2.n_updates == 6 * 4 and h2.n_svd() == 2 * 2


def test_layerwise_with_factory_and_lr_setter():
    """Any per-parameter optimizer works: SGD from hooks equals a standard SGD step."""
    X, Y = _data()
    std = _mlp()
    opt = torch.optim.SGD(std.parameters(), lr=0.1, momentum=0.9)
    lw = _mlp()
    handle = attach_layerwise_updates(lw, lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9))
    for step in range(4):
        if step == 2:
            opt.param_groups[0]["lr"] = handle.lr = 0.05
        _train(std, opt, X, Y, 1)
        ((lw(X) - Y) ** 2).mean().backward()
    torch.testing.assert_close(_params(std), _params(lw), rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="not both"):
        attach_layerwise_updates(lw, lambda groups: torch.optim.SGD(groups, lr=0.1), lr=0.1)


def test_layerwise_rejects_ddp(tmp_path):
    init = f"file://{tmp_path / 'pg'}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(_mlp())
        with pytest.raises(TypeError, match="single-process"):
            attach_layerwise_updates(ddp, lr=1e-2)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- DDP
_DDP_STEPS = 12


def _ddp_groups(model):
    return _groups(model, rank=3, gap=5)


def _ddp_worker(rank: int, world_size: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size)
    try:
        model = _mlp()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = GaLoreAdamW(_ddp_groups(model), lr=1e-2, weight_decay=0.01)
        X, Y = _data()
        half = X.shape[0] // world_size
        Xr, Yr = X[rank * half:(rank + 1) * half], Y[rank * half:(rank + 1) * half]
        for _ in range(_DDP_STEPS):
            opt.zero_grad()
            ((ddp(Xr) - Yr) ** 2).mean().backward()  # DDP averages: the global-batch mean gradient
            opt.step()
        if rank == 0:
            torch.save([p.detach() for p in model.parameters()], out)
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_match_single_process(tmp_path):
    out = str(tmp_path / "ddp_params.pt")
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'pg'}", out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    model = _mlp()
    opt = GaLoreAdamW(_ddp_groups(model), lr=1e-2, weight_decay=0.01)
    X, Y = _data()
    _train(model, opt, X, Y, _DDP_STEPS)
    assert opt.n_svd() == 2 * 3  # the run switched subspaces (steps 0, 5, 10)
    for a, b in zip(got, _params(model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- numpy and float inputs (issue 15)
def test_numpy_ranks_and_integral_float_gaps_are_accepted_and_normalised():
    np = pytest.importorskip("numpy")
    proj = GaLoreProjector(rank=np.int64(4), update_proj_gap=200.0)
    assert (proj.rank, proj.update_proj_gap) == (4, 200)
    assert type(proj.rank) is int and type(proj.update_proj_gap) is int
    model = _mlp()
    opt = GaLoreAdamW(_groups(model, rank=np.int32(4), gap=np.float64(10.0)))
    group = opt.param_groups[1]
    assert (group["rank"], group["update_proj_gap"]) == (4, 10)
    assert type(group["rank"]) is int and type(group["update_proj_gap"]) is int
    groups = galore_param_groups(model, rank=np.int64(4), update_proj_gap=np.int16(50), target_modules=("0",))
    assert type(groups[1]["rank"]) is int and groups[1]["update_proj_gap"] == 50
    assert GaLoreConfig(rank=np.int64(8), update_proj_gap=100.0).update_proj_gap == 100


@pytest.mark.parametrize("gap", [200.5, True, "200", float("nan"), float("inf"), None, 0.0])
def test_update_proj_gap_still_refuses_non_integers(gap):
    with pytest.raises((TypeError, ValueError), match="update_proj_gap") as info:
        GaLoreProjector(rank=2, update_proj_gap=gap)
    assert repr(gap) in str(info.value) or str(gap) in str(info.value)
    with pytest.raises((TypeError, ValueError), match="update_proj_gap"):
        GaLoreAdamW(_groups(_mlp(), gap=gap))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), True, "0.25"])
def test_scale_must_be_a_finite_real(scale):
    with pytest.raises((TypeError, ValueError), match="scale"):
        GaLoreProjector(rank=2, scale=scale)


@pytest.mark.parametrize("kwargs,match", [
    ({"lr": "0.1"}, r"lr must be a real number >= 0, got '0.1'"),
    ({"lr": -1.0}, r"lr must be a real number >= 0, got -1.0"),
    ({"betas": 0.9}, r"betas must be two numbers in \[0, 1\), got 0.9"),
    ({"betas": (0.9, 1.0)}, r"betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"),
    ({"betas": (0.9, "x")}, r"betas must be two numbers"),
    ({"eps": float("nan")}, r"eps must be a real number >= 0, got nan"),
    ({"weight_decay": None}, r"weight_decay must be a real number >= 0, got None"),
])
def test_adam_hyperparameters_name_argument_value_and_range(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        GaLoreAdamW(_groups(_mlp()), **kwargs)
