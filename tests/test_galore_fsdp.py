"""mini.galore.fsdp: GaLore on FSDP2 (fully_shard) row shards, two gloo CPU processes.

References: single-process GaLoreAdamW with proj_type="right" on the full batch (mean loss),
float64; with galore-torch's default (moments kept at a switch) the reference's SVD basis gets
the same sign convention (:func:`canonical_signs`); with ``project_moments=True`` the plain
GaLoreAdamW is the reference (the rotation cancels the signs).
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mini.galore import GaLoreAdamW, GaLoreProjector
from mini.galore.twoproc import data, mlp, spawn_gloo, train_steps

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
)

fsdp_mod = pytest.importorskip("mini.galore.fsdp")
FSDPGaLoreAdamW, canonical_signs, local_state_bytes = (
    fsdp_mod.FSDPGaLoreAdamW, fsdp_mod.canonical_signs, fsdp_mod.local_state_bytes)

_STEPS, _RANK, _GAP = 12, 4, 5  # subspace updates at steps 0, 5 and 10
_WORLD = 2
_CONFIGS = (False, True)  # project_moments
# twoproc's MLP: W1 (48, 32) has m >= n, where "std" picks the right side too; W2 (24, 48) has
# m < n, forced to the right side (reverse_std)




def _groups(model: nn.Sequential, project_moments: bool, proj_type: str | None = None) -> list[dict]:
    projected = {"params": [model[0].weight, model[2].weight], "rank": _RANK, "update_proj_gap": _GAP,
                 "scale": 0.25, "project_moments": project_moments}
    if proj_type is not None:
        projected["proj_type"] = proj_type
    return [{"params": [model[0].bias, model[2].bias]}, projected]


class _CanonicalProjector(GaLoreProjector):
    """The SVD basis with canonical signs, as FSDPGaLoreAdamW's eigenvector basis."""

    def compute_basis(self, grad):
        ortho, right = super().compute_basis(grad)
        return canonical_signs(ortho), right


class _CanonicalGaLoreAdamW(GaLoreAdamW):
    projector_class = _CanonicalProjector


def _shard(model: nn.Sequential, mesh) -> None:
    """FSDP2 on each linear layer, then on the whole model (rows of every weight split over ranks)."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=_WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (_WORLD,))
        X, Y = data(16)
        half = X.shape[0] // _WORLD
        Xr, Yr = X[rank * half:(rank + 1) * half], Y[rank * half:(rank + 1) * half]  # this rank's half
        result: dict = {}
        for project_moments in _CONFIGS:
            model = mlp()
            _shard(model, mesh)
            opt = FSDPGaLoreAdamW(_groups(model, project_moments), lr=1e-2, weight_decay=0.01)
            train_steps(model, opt, Xr, Yr, _STEPS)  # FSDP2 reduce-scatters the mean gradient
            result[project_moments] = {
                "params": [p.full_tensor().detach().clone() for p in model.parameters()],
                "local_shapes": [tuple(p.to_local().shape) for p in model.parameters()],
                "moment_shapes": [tuple(opt.state[p]["exp_avg"].shape) for p in model.parameters()],
                "state_bytes": local_state_bytes(opt), "n_svd": opt.n_svd(),
            }
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _run_two_processes(tmp_path, timeout: float = 90.0) -> list[dict]:
    """Spawn the two workers with the library's launcher (deadline, survivors terminated)."""
    return spawn_gloo(_worker, nprocs=_WORLD, timeout=timeout)


def _reference(project_moments: bool) -> tuple[list[torch.Tensor], int, int]:
    model = mlp()
    cls = GaLoreAdamW if project_moments else _CanonicalGaLoreAdamW
    opt = cls(_groups(model, project_moments, proj_type="right"), lr=1e-2, weight_decay=0.01)
    X, Y = data(16)
    train_steps(model, opt, X, Y, _STEPS)
    return [p.detach() for p in model.parameters()], opt.n_svd(), local_state_bytes(opt)


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    return _run_two_processes(tmp_path_factory.mktemp("galore_fsdp"))


@pytest.mark.parametrize("project_moments", _CONFIGS)
def test_fsdp_trajectory_equals_single_process_right_side(two_process_results, project_moments):
    ref, ref_svd, _ = _reference(project_moments)
    assert ref_svd == 2 * 3
    for res in two_process_results:
        got = res[project_moments]
        assert got["n_svd"] == ref_svd
        err = max((a - b).abs().max().item() for a, b in zip(got["params"], ref))
        print(f"\nproject_moments={project_moments}: max |W_fsdp - W_single| = {err:.3g}")
        assert err < 1e-9, f"project_moments={project_moments}: max |W_fsdp - W_single| = {err:.3g}"


def test_fsdp_state_is_local_and_about_half_per_rank(two_process_results):
    _, _, ref_bytes = _reference(False)
    r0, r1 = (res[False] for res in two_process_results)
    # W1 (48, 32) -> rows 24 + 24; b1 48 -> 24 + 24; W2 (24, 48) -> 12 + 12; b2 24 -> 12 + 12
    assert r0["local_shapes"] == [(24, 32), (24,), (12, 48), (12,)]
    assert r0["moment_shapes"] == [(24, _RANK), (24,), (12, _RANK), (12,)]  # (m_k, r): row-local moments
    item = 8
    moments = 2 * item * (24 * _RANK + 24 + 12 * _RANK + 12)  # exp_avg + exp_avg_sq on one rank
    bases = item * _RANK * (32 + 48)  # P (r, n) replicated
    assert r0["state_bytes"] == r1["state_bytes"] == moments + bases
    assert ref_bytes == 2 * item * (48 * _RANK + 48 + 24 * _RANK + 24) + bases
    # W2 (24, 48) forced right: 24·r per moment unsharded (std's left side would be r·48), 12·r per rank
    print(f"\nper-rank optimizer state {r0['state_bytes']} B vs single process {ref_bytes} B "
          f"(ratio {r0['state_bytes'] / ref_bytes:.3f}; moments alone 0.5)")
    assert 0.5 <= r0["state_bytes"] / ref_bytes < 0.7


def test_canonical_signs_is_sign_invariant():
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    flipped = rows * torch.tensor([[-1.0], [1.0], [-1.0]], dtype=torch.float64)
    torch.testing.assert_close(canonical_signs(rows), canonical_signs(flipped), rtol=0, atol=0)
    c = canonical_signs(rows)
    assert bool((c.gather(1, c.abs().argmax(1, keepdim=True)) > 0).all())


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def one_rank_mesh(tmp_path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg1'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_fsdp_rejects_column_shards_plain_tensors_other_sides_and_1d(one_rank_mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    col = nn.Parameter(distribute_tensor(torch.randn(8, 6, dtype=torch.float64), one_rank_mesh, [Shard(1)]))
    with pytest.raises(ValueError, match=r"shape \(8, 6\) with placements \(Shard\(dim=1\),\).*row shards"):
        FSDPGaLoreAdamW([{"params": [col], "rank": 2}])
    rep = nn.Parameter(distribute_tensor(torch.randn(8, 6, dtype=torch.float64), one_rank_mesh, [Replicate()]))
    with pytest.raises(ValueError, match="placements.*Replicate"):
        FSDPGaLoreAdamW([{"params": [("w", rep)], "rank": 2}])
    with pytest.raises(TypeError, match="holds a parameter of type Parameter: expected a DTensor"):
        FSDPGaLoreAdamW([{"params": [nn.Parameter(torch.randn(8, 6))], "rank": 2}])
    row = nn.Parameter(distribute_tensor(torch.randn(8, 6, dtype=torch.float64), one_rank_mesh, [Shard(0)]))
    with pytest.raises(ValueError, match="proj_type must be 'right' for FSDPGaLoreAdamW, got 'std'.*reverse_std"):
        FSDPGaLoreAdamW([{"params": [row], "rank": 2, "proj_type": "std"}])
    bias = nn.Parameter(distribute_tensor(torch.randn(8, dtype=torch.float64), one_rank_mesh, [Shard(0)]))
    with pytest.raises(ValueError, match=r"shape \(8,\): only 2-D weight matrices can be projected"):
        FSDPGaLoreAdamW([{"params": [bias], "rank": 2}])
    FSDPGaLoreAdamW([{"params": [bias]}, {"params": (p for p in [row]), "rank": 2}])  # a generator is fine


def test_fsdp_one_rank_equals_galore_right(one_rank_mesh):
    """World size 1: the shard is the matrix; one subspace, so no sign convention is needed."""
    from torch.distributed.tensor import Shard, distribute_tensor

    gen = torch.Generator().manual_seed(4)
    w0 = torch.randn(6, 10, generator=gen, dtype=torch.float64)  # m < n: forced right
    grads = [torch.randn(6, 10, generator=gen, dtype=torch.float64) for _ in range(4)]
    w_ref = nn.Parameter(w0.clone())
    w = nn.Parameter(distribute_tensor(w0.clone(), one_rank_mesh, [Shard(0)]))
    ref = GaLoreAdamW([{"params": [w_ref], "rank": 3, "update_proj_gap": 100, "proj_type": "right"}], lr=1e-2)
    opt = FSDPGaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 100}], lr=1e-2)
    for g in grads:
        w_ref.grad = g.clone()
        w.grad = distribute_tensor(g.clone(), one_rank_mesh, [Shard(0)])
        ref.step()
        opt.step()
    torch.testing.assert_close(w.full_tensor(), w_ref.detach(), rtol=0, atol=1e-12)
    assert opt.state[w]["exp_avg"].shape == (6, 3)


# ----------------------------------------------------------------------------- DCP checkpoint, exact resume
_SAVE_AT = 7  # saved after step 7; the resumed run refreshes the subspace at step 10
try:
    from torch.distributed.fsdp import fully_shard as _fully_shard  # noqa: F401  (torch >= 2.6)

    _HAS_FSDP2 = True
except ImportError:  # older torch: fully_shard lives elsewhere or not at all
    _HAS_FSDP2 = False
_needs_fsdp2 = pytest.mark.skipif(not _HAS_FSDP2, reason="torch.distributed.fsdp.fully_shard is unavailable")


def _resume_worker(rank: int, init: str, out: str) -> None:
    """Uninterrupted 12 steps vs 7 steps, DCP save, fresh model + optimizer, DCP load, 5 more steps."""
    from pathlib import Path

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=_WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (_WORLD,))
        X, Y = data(16)
        half = X.shape[0] // _WORLD
        Xr, Yr = X[rank * half:(rank + 1) * half], Y[rank * half:(rank + 1) * half]

        def build(project_moments: bool):
            model = mlp()
            _shard(model, mesh)
            return model, FSDPGaLoreAdamW(_groups(model, project_moments), lr=1e-2, weight_decay=0.01)

        result: dict = {}
        for project_moments in _CONFIGS:
            model, opt = build(project_moments)
            train_steps(model, opt, Xr, Yr, _STEPS)
            straight = [p.full_tensor().detach().clone() for p in model.parameters()]

            model, opt = build(project_moments)
            train_steps(model, opt, Xr, Yr, _SAVE_AT)
            ckpt = Path(out).parent / f"ckpt_{project_moments}"
            fsdp_mod.save_checkpoint(model, opt, ckpt)
            del model, opt
            torch.manual_seed(1234)  # a fresh process would have other RNG state: the resume must not use it
            model, opt = build(project_moments)
            assert not opt.state
            fsdp_mod.load_checkpoint(model, opt, ckpt)
            svd_after_load = opt.n_svd()
            train_steps(model, opt, Xr, Yr, _STEPS - _SAVE_AT)
            result[project_moments] = {
                "straight": straight,
                "resumed": [p.full_tensor().detach().clone() for p in model.parameters()],
                "svd_after_load": svd_after_load, "svd_end": opt.n_svd(),
                "steps": [opt.state[p]["step"] for p in model.parameters()],
            }
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@_needs_fsdp2
def test_dcp_checkpoint_resumes_bitwise_across_a_subspace_update():
    results = spawn_gloo(_resume_worker, nprocs=_WORLD, timeout=90.0)
    for res in results:
        for project_moments in _CONFIGS:
            got = res[project_moments]
            assert got["svd_after_load"] == 2 * 2  # updates at steps 0 and 5 restored with the projectors
            assert got["svd_end"] == 2 * 3  # the refresh at step 10 happened after the resume
            assert got["steps"] == [_STEPS] * 4
            err = max((a - b).abs().max().item() for a, b in zip(got["resumed"], got["straight"]))
            print(f"\nproject_moments={project_moments}: max |W_resumed - W_uninterrupted| = {err:.3g}")
            for a, b in zip(got["resumed"], got["straight"]):
                assert torch.equal(a, b)  # bitwise


@_needs_fsdp2
def test_checkpoint_round_trip_one_rank_and_bad_input(one_rank_mesh, tmp_path):
    from torch.distributed.fsdp import fully_shard

    model = mlp()
    fully_shard(model, mesh=one_rank_mesh)
    opt = FSDPGaLoreAdamW(_groups(model, False), lr=1e-2)
    X, Y = data(16)
    train_steps(model, opt, X, Y, 2)
    fsdp_mod.save_checkpoint(model, opt, tmp_path / "ck")
    fresh = mlp()
    fully_shard(fresh, mesh=one_rank_mesh)
    opt2 = FSDPGaLoreAdamW(_groups(fresh, False), lr=5.0)
    fsdp_mod.load_checkpoint(fresh, opt2, tmp_path / "ck")
    assert opt2.param_groups[1]["lr"] == 1e-2  # hyperparameters restored
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p.to_local(), q.to_local())
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])
    w = fresh[0].weight
    assert torch.equal(opt2.state[w]["projector"].ortho, opt.state[model[0].weight]["projector"].ortho)
    assert opt2.state[w]["projector"].n_svd == 1 and opt2.state[w]["step"] == 2

    with pytest.raises(TypeError, match="optimizer must be an FSDPGaLoreAdamW, got GaLoreAdamW"):
        fsdp_mod.save_checkpoint(model, GaLoreAdamW(mlp().parameters()), tmp_path / "x")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module.*got list"):
        fsdp_mod.save_checkpoint([], opt, tmp_path / "x")
    with pytest.raises(TypeError, match="path must be a str or os.PathLike.*got int"):
        fsdp_mod.save_checkpoint(model, opt, 3)
    with pytest.raises(ValueError, match="not a parameter of model"):
        fsdp_mod.save_checkpoint(fresh, opt, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="holds no torch.distributed.checkpoint checkpoint"):
        fsdp_mod.load_checkpoint(fresh, opt2, tmp_path / "empty")


def test_fsdp_refuses_8bit_moments_and_qgalore_projector(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    from mini.galore.adamw8bit import GaLoreAdamW8bit

    row = nn.Parameter(distribute_tensor(torch.randn(8, 6, dtype=torch.float64), one_rank_mesh, [Shard(0)]))

    class FSDP8bit(FSDPGaLoreAdamW, GaLoreAdamW8bit):
        pass

    with pytest.raises(TypeError, match="FSDP8bit mixes FSDPGaLoreAdamW with 8-bit block-wise moments.*FSDP2"):
        FSDP8bit([{"params": [row], "rank": 2}])
    projector = pytest.importorskip("mini.qgalore.projector")

    class FSDPQGaLore(FSDPGaLoreAdamW):
        projector_class = projector.AdaptiveProjector

    with pytest.raises(TypeError, match="FSDPQGaLore uses projector AdaptiveProjector: unsupported under FSDP2"):
        FSDPQGaLore([{"params": [row], "rank": 2}])
