"""Two gloo CPU processes for the lab "GaLore on two processes" (``labs/galore/distributed.ipynb``).

The workers must be importable for ``torch.multiprocessing``'s spawn start method, so they live
here rather than in the notebook. Each of two ranks trains the same small float64 MLP on its half
of one batch in three ways: (a) standard data parallelism (all-reduce of every full gradient, then
GaLoreAdamW), (b) subspace DDP (:func:`mini.galore.distributed.allreduce_gradients_`) and (c)
FSDP2 (``fully_shard``) with :class:`mini.galore.fsdp.FSDPGaLoreAdamW`; :func:`single_process`
runs the reference on the whole batch. The pattern (FileStore rendezvous, a deadline, terminate
any survivor in ``finally``) is that of ``tests/test_galore_distributed.py``.

Explained in :doc:`/book/galore/theory` and :doc:`/labs/galore/distributed`.
"""
from __future__ import annotations

import datetime
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from .adamw import GaLoreAdamW

__all__ = ["TwoProcConfig", "data", "mlp", "param_groups", "run_two_processes", "single_process", "spawn_gloo",
           "train_steps"]

WORLD = 2


@dataclass(frozen=True)
class TwoProcConfig:
    """The lab's settings: steps, GaLore rank r, subspace gap T, batch size (split over 2 ranks).

    Explained in :doc:`/labs/galore/distributed`.
    """

    #: Optimizer steps of every run.
    steps: int = 12
    #: GaLore rank r of the two projected weight matrices.
    rank: int = 4
    #: Subspace update gap T (updates at steps 0, T, 2T, ...).
    gap: int = 5
    #: Rows of the whole batch; each of the two ranks trains on half of them.
    batch: int = 16
    #: Learning rate of every run.
    lr: float = 1e-2


def mlp() -> nn.Sequential:
    """The float64 MLP: W1 (48, 32), W2 (24, 48), seeded so every rank builds the same one.

    Explained in :doc:`/labs/galore/distributed`.
    """
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 24)).double()


def data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed regression batch: inputs (n, 32), targets (n, 24).

    Explained in :doc:`/labs/galore/distributed`.
    """
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 32, generator=gen, dtype=torch.float64)  # (n, 32)
    y = torch.randn(n, 24, generator=gen, dtype=torch.float64)  # (n, 24)
    return x, y


def param_groups(model: nn.Sequential, cfg: TwoProcConfig, **projected: Any) -> list[dict]:
    """Biases plain, the two weight matrices projected (rank r, gap T, scale 0.25).

    Explained in :doc:`/labs/galore/distributed`.
    """
    group = {"params": [model[0].weight, model[2].weight], "rank": cfg.rank,
             "update_proj_gap": cfg.gap, "scale": 0.25, **projected}
    return [{"params": [model[0].bias, model[2].bias]}, group]


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                steps: int, sync: Callable[[], Any] | None = None) -> None:
    """``steps`` steps of the mean squared error on ``(x, y)``; ``sync`` runs between backward and step.

    ``sync`` is where a data-parallel run communicates (a full all-reduce, or
    :func:`~mini.galore.distributed.allreduce_gradients_`). GaLore's warnings are silenced.

    Explained in :doc:`/labs/galore/distributed`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if sync is not None:
                sync()
            opt.step()


def single_process(cfg: TwoProcConfig, **projected: Any) -> tuple[list[torch.Tensor], int]:
    """The reference: GaLoreAdamW on the whole batch; returns the weights and state bytes.

    Explained in :doc:`/labs/galore/distributed`.
    """
    from .fsdp import local_state_bytes

    model = mlp()
    opt = GaLoreAdamW(param_groups(model, cfg, **projected), lr=cfg.lr, weight_decay=0.01)
    x, y = data(cfg.batch)
    train_steps(model, opt, x, y, cfg.steps)
    return [p.detach().clone() for p in model.parameters()], local_state_bytes(opt)


def _worker(rank: int, init: str, out: str, cfg_dict: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .distributed import CommStats, allreduce_gradients_
    from .fsdp import FSDPGaLoreAdamW, local_state_bytes

    cfg = TwoProcConfig(**cfg_dict)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        x, y = data(cfg.batch)
        half = cfg.batch // WORLD
        xr, yr = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]  # this half
        result: dict = {}

        # (a) standard data parallelism: all-reduce (mean) every full gradient
        model = mlp()
        opt = GaLoreAdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=0.01)
        sent: list[int] = []

        def full_allreduce() -> None:
            n = 0
            for p in model.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
                p.grad.div_(WORLD)
                n += p.grad.numel() * p.grad.element_size()
            sent.append(n)

        train_steps(model, opt, xr, yr, cfg.steps, full_allreduce)
        result["standard"] = {"params": [p.detach().clone() for p in model.parameters()],
                              "sent": sent}

        # (b) subspace DDP: all-reduce the projections R between subspace updates
        model = mlp()
        opt = GaLoreAdamW(param_groups(model, cfg), lr=cfg.lr, weight_decay=0.01)
        stats = CommStats()
        train_steps(model, opt, xr, yr, cfg.steps, lambda: allreduce_gradients_(opt, stats))
        result["subspace"] = {"params": [p.detach().clone() for p in model.parameters()],
                              "sent": stats.sent, "full": stats.full}

        # (c) FSDP2: row shards, right-side projection, moments rotated at a switch
        mesh = init_device_mesh("cpu", (WORLD,))
        model = mlp()
        fully_shard(model[0], mesh=mesh)
        fully_shard(model[2], mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = FSDPGaLoreAdamW(param_groups(model, cfg, project_moments=True), lr=cfg.lr,
                              weight_decay=0.01)
        train_steps(model, opt, xr, yr, cfg.steps)
        result["fsdp"] = {"params": [p.full_tensor().detach().clone() for p in model.parameters()],
                          "state_bytes": local_state_bytes(opt)}
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def spawn_gloo(worker: Callable[..., None], *args: Any, nprocs: int = WORLD, timeout: float = 120.0) -> list[dict]:
    """Run ``worker(rank, store_url, out, *args)`` in ``nprocs`` spawned processes and return
    what each saved to ``f"{out}.{rank}"`` (``torch.save``); a FileStore in a temporary folder,
    a deadline, and any survivor terminated (never a process left behind).

    ``worker`` must be importable (a module-level function), as spawn requires.

    Explained in :doc:`/labs/galore/distributed`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result")
        ctx = mp.start_processes(worker, args=(f"file://{Path(tmp) / 'pg'}", out, *args),
                                 nprocs=nprocs, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the {nprocs} gloo workers did not finish within {timeout} s")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.terminate()
                    proc.join(5)
        return [torch.load(f"{out}.{r}", weights_only=True) for r in range(nprocs)]


def run_two_processes(cfg: TwoProcConfig, timeout: float = 120.0) -> list[dict]:
    """Spawn the two gloo workers of the lab (:func:`spawn_gloo`); per-rank results.

    Explained in :doc:`/labs/galore/distributed`.
    """
    return spawn_gloo(_worker, asdict(cfg), timeout=timeout)
