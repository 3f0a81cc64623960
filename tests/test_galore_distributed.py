"""mini.galore.distributed: subspace all-reduce on two gloo CPU processes, and the shard Gram basis.

The reference is a single-process GaLoreAdamW run on the concatenated batch (mean loss), float64.
"""
from __future__ import annotations

import datetime
from functools import partial

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mini.galore import GaLoreAdamW, GaLoreProjector
from mini.galore.distributed import (
    CommStats,
    allreduce_gradients_,
    back_project_unscaled,
    right_singular_basis_from_shards,
)
from mini.galore.twoproc import data, mlp, spawn_gloo, train_steps

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is unavailable"
)

_STEPS, _RANK, _GAP = 12, 4, 5  # subspace updates at steps 0, 5 and 10
_PROJ_TYPES = ("std", "reverse_std", "full")  # std/reverse_std put each matrix on both sides
_WORLD = 2




def _optimizer(model: nn.Sequential, proj_type: str) -> GaLoreAdamW:
    groups = [
        {"params": [model[0].bias, model[2].bias]},
        {"params": [model[0].weight, model[2].weight], "rank": _RANK, "update_proj_gap": _GAP, "scale": 0.25,
         "proj_type": proj_type},
    ]
    return GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01)


def _optimizer_8bit(model: nn.Sequential) -> GaLoreAdamW:
    """GaLoreAdamW8bit with every moment in 8 bits (min_8bit_size=0), blocks of 64."""
    from mini.galore.adamw8bit import GaLoreAdamW8bit

    groups = [
        {"params": [model[0].bias, model[2].bias]},
        {"params": [model[0].weight, model[2].weight], "rank": _RANK, "update_proj_gap": _GAP, "scale": 0.25},
    ]
    return GaLoreAdamW8bit(groups, lr=1e-2, weight_decay=0.01, block_size=64, min_8bit_size=0)


def _gram_matrix() -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(10, 6, generator=gen, dtype=torch.float64))  # (10, 6)
    v, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))  # (6, 6)
    return u @ torch.diag(torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)) @ v.t()  # (10, 6)


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=_WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        X, Y = data(16)
        half = X.shape[0] // _WORLD
        Xr, Yr = X[rank * half:(rank + 1) * half], Y[rank * half:(rank + 1) * half]  # this rank's half
        result: dict = {}
        for proj_type in _PROJ_TYPES:
            model = mlp()
            opt = _optimizer(model, proj_type)
            stats = CommStats()
            train_steps(model, opt, Xr, Yr, _STEPS, partial(allreduce_gradients_, opt, stats))
            result[proj_type] = {
                "params": [p.detach().clone() for p in model.parameters()],
                "sent": stats.sent, "full": stats.full, "update_steps": stats.update_steps, "n_svd": opt.n_svd(),
            }
        model = mlp()  # 8-bit GaLore: a deterministic function of the (identical) averaged gradient
        opt = _optimizer_8bit(model)
        train_steps(model, opt, Xr, Yr, _STEPS, partial(allreduce_gradients_, opt))
        result["8bit"] = {"params": [p.detach().clone() for p in model.parameters()],
                          "codes": opt.state[model[0].weight]["exp_avg"].clone()}
        G = _gram_matrix()
        rows = G.shape[0] // _WORLD
        result["gram_basis"] = right_singular_basis_from_shards(G[rank * rows:(rank + 1) * rows], rank=3)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _run_two_processes(tmp_path, timeout: float = 90.0) -> list[dict]:
    """Spawn the two workers with the library's launcher (deadline, survivors terminated)."""
    return spawn_gloo(_worker, nprocs=_WORLD, timeout=timeout)


def _reference(proj_type: str) -> tuple[list[torch.Tensor], int]:
    model = mlp()
    opt = _optimizer(model, proj_type)
    X, Y = data(16)
    train_steps(model, opt, X, Y, _STEPS)
    return [p.detach() for p in model.parameters()], opt.n_svd()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> list[dict]:
    return _run_two_processes(tmp_path_factory.mktemp("galore_dist"))


@pytest.mark.parametrize("proj_type", _PROJ_TYPES)
def test_subspace_allreduce_equals_single_process_on_concatenated_batch(two_process_results, proj_type):
    ref, ref_svd = _reference(proj_type)
    assert ref_svd == 2 * 3  # two matrices, subspace updates at steps 0, 5, 10
    for res in two_process_results:
        assert res[proj_type]["n_svd"] == ref_svd
        err = max((a - b).abs().max().item() for a, b in zip(res[proj_type]["params"], ref))
        assert err < 1e-10, f"{proj_type}: max |W_ddp - W_single| = {err:.3g}"
    # both replicas hold the same weights
    for a, b in zip(two_process_results[0][proj_type]["params"], two_process_results[1][proj_type]["params"]):
        assert (a - b).abs().max().item() < 1e-12


def test_bytes_per_step_projected_versus_full_allreduce(two_process_results):
    res = two_process_results[0]["std"]
    item = 8  # float64
    shapes = [(48, 32), (24, 48)]  # std: W1 right side R (48, r), W2 left side R (r, 48)
    biases = 48 + 24
    full = (sum(m * n for m, n in shapes) + biases) * item
    projected = (sum(_RANK * max(m, n) for m, n in shapes) + biases) * item
    assert res["full"] == [full] * _STEPS
    expected = [full if t % _GAP == 0 else projected for t in range(_STEPS)]
    assert res["sent"] == expected
    assert res["update_steps"] == [2 if t % _GAP == 0 else 0 for t in range(_STEPS)]
    # per matrix the saving is min(m, n) / r: 32/4 = 8 and 24/4 = 6
    matrix_ratio = sum(m * n for m, n in shapes) / sum(_RANK * max(m, n) for m, n in shapes)
    assert matrix_ratio == pytest.approx((48 * 32 + 24 * 48) / (4 * 48 * 2))
    assert full / projected > 5.0
    print(f"\nbytes/step full {full}, projected {projected} (ratio {full / projected:.2f}; matrices only "
          f"{matrix_ratio:.2f}); 12 steps: {sum(res['sent'])} vs {sum(res['full'])} "
          f"({sum(res['full']) / sum(res['sent']):.2f}x)")


def test_gram_basis_of_row_shards_equals_svd_right_vectors(two_process_results):
    _, _, vh = torch.linalg.svd(_gram_matrix(), full_matrices=False)  # (6, 6)
    for res in two_process_results:
        basis = res["gram_basis"]  # (3, 6)
        signs = torch.sign((basis * vh[:3]).sum(dim=1, keepdim=True))  # (3, 1)
        torch.testing.assert_close(basis * signs, vh[:3], rtol=0, atol=1e-12)


def test_gram_basis_single_process_and_simulated_shards():
    G = _gram_matrix()  # (10, 6)
    _, _, vh = torch.linalg.svd(G, full_matrices=False)
    gram = sum(s.t() @ s for s in G.split(3))  # Σ_k G_kᵀ G_k over four row shards
    torch.testing.assert_close(gram, G.t() @ G, rtol=0, atol=1e-12)
    basis = right_singular_basis_from_shards(G, rank=4)  # no process group: the shard is the matrix
    signs = torch.sign((basis * vh[:4]).sum(dim=1, keepdim=True))
    torch.testing.assert_close(basis * signs, vh[:4], rtol=0, atol=1e-12)
    assert right_singular_basis_from_shards(G.float(), rank=2).dtype == torch.float32


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("shape", [(12, 7), (7, 12)])
def test_back_projection_is_recovered_by_the_projection(proj_type, shape):
    """apply(back(R)) = R because the basis is orthonormal: the identity the write-back relies on."""
    gen = torch.Generator().manual_seed(3)
    proj = GaLoreProjector(rank=3, update_proj_gap=5, scale=0.25, proj_type=proj_type)
    proj.update_basis(torch.randn(*shape, generator=gen, dtype=torch.float64))
    low = proj.apply(torch.randn(*shape, generator=gen, dtype=torch.float64))
    err = (proj.apply(back_project_unscaled(proj, low)) - low).abs().max().item()
    assert err < 1e-14, f"{proj_type} {proj.side} {shape}: {err:.3g}"


def test_8bit_galore_under_subspace_ddp_equals_single_process(two_process_results):
    """GaLoreAdamW8bit is supported: every rank quantises the same averaged projection."""
    model = mlp()
    opt = _optimizer_8bit(model)
    X, Y = data(16)
    train_steps(model, opt, X, Y, _STEPS)
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.uint8  # really 8-bit
    for res in two_process_results:
        err = max((a - b).abs().max().item() for a, b in zip(res["8bit"]["params"], model.parameters()))
        codes = (res["8bit"]["codes"].int() - opt.state[model[0].weight]["exp_avg"].int()).abs().max().item()
        print(f"\n8-bit: max |W_ddp - W_single| = {err:.3g}, max code difference {codes}")
        assert err < 1e-9
    torch.testing.assert_close(two_process_results[0]["8bit"]["params"], two_process_results[1]["8bit"]["params"],
                               rtol=0, atol=0)  # the ranks agree bitwise


# ----------------------------------------------------------------------------- bad input
def test_allreduce_rejects_other_optimizers_and_quantized_projectors(tmp_path):
    model = mlp()
    with pytest.raises(TypeError, match="optimizer must be a mini.galore GaLoreAdamW.*SGD"):
        allreduce_gradients_(torch.optim.SGD(model.parameters(), lr=0.1))
    qgalore = pytest.importorskip("mini.qgalore.optimizer")
    opt = qgalore.QGaLoreAdamW([{"params": [model[0].weight], "rank": 2}], lr=1e-2)
    with pytest.raises(TypeError, match="AdaptiveProjector.*orthonormal"):
        allreduce_gradients_(opt)
    opt8 = qgalore.QGaLoreAdamW8bit([{"params": [model[0].weight], "rank": 2}], lr=1e-2)
    with pytest.raises(TypeError, match="QGaLoreAdamW8bit uses projector AdaptiveProjector.*orthonormal"):
        allreduce_gradients_(opt8)
    with pytest.raises(TypeError, match="stats must be a CommStats or None, got dict"):
        allreduce_gradients_(_optimizer(model, "std"), stats={})


def test_allreduce_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialized.*init_process_group"):
        allreduce_gradients_(_optimizer(mlp(), "std"))


def test_allreduce_single_rank_group_is_a_mean_over_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg1'}", rank=0, world_size=1)
    try:
        model = mlp()
        opt = _optimizer(model, "std")
        X, Y = data(16)
        ((model(X) - Y) ** 2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        sent, full = allreduce_gradients_(opt)
        assert sent == full  # first step: a subspace update, everything in full
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def test_gram_basis_rejects_bad_input():
    with pytest.raises(ValueError, match="local_rows must be a 2-D tensor.*1-D"):
        right_singular_basis_from_shards(torch.ones(4), rank=1)
    with pytest.raises(ValueError, match="local_rows must be a 2-D tensor.*list"):
        right_singular_basis_from_shards([[1.0]], rank=1)
    with pytest.raises(ValueError, match="rank must be at most the number of columns n = 3.*got 4"):
        right_singular_basis_from_shards(torch.ones(5, 3), rank=4)
    with pytest.raises((ValueError, TypeError), match="rank"):
        right_singular_basis_from_shards(torch.ones(5, 3), rank=0)
