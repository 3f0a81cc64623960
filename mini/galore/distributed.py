"""Data-parallel GaLore that communicates in the subspace, and the subspace of row-sharded gradients.

Part II, GaLore chapter (``book/galore/``). Zhao et al., "GaLore: Memory-Efficient LLM Training
by Gradient Low-Rank Projection", ICML 2024, arXiv 2403.03507; sharded and data-parallel GaLore is
what users ask for in jiaweizzhao/GaLore issue #2 ("not compatible with DeepSpeed (perhaps also
FSDP)"), LLaMA-Factory #2926 and ms-swift #1763.

Fact 1: the projection is linear, so the all-reduce commutes with it
--------------------------------------------------------------------
With K ranks holding local mean gradients G_k (m, n) of equal-sized shards of the batch, the
global-batch mean gradient is Ḡ = (1/K) Σ_k G_k. While the projector's basis P is fixed (between
subspace updates, and the same on every rank)::

    project(Ḡ) = Pᵀ Ḡ = (1/K) Σ_k Pᵀ G_k
    (left side; G Pᵀ on the right, Uᵀ G V on "full")

so each rank may project first and all-reduce the r × n (or m × r, r × r) projection instead of
the m × n gradient: min(m, n)/r fewer bytes for "std". At a subspace-update step the new basis is
the SVD of Ḡ, which a projection cannot give, so that step all-reduces the full gradient and
every rank computes the same P from the same Ḡ (the same deterministic SVD on the same input).

Handing the optimizer a pre-projected gradient without changing it
------------------------------------------------------------------
:class:`~mini.galore.adamw.GaLoreAdamW` projects ``p.grad`` itself. So, with R̄ the averaged
projection, :func:`allreduce_gradients_` writes back the back-projection (without the scale α)::

    right: p.grad = R̄ P     (R̄ (m, k), P (k, n))   ->  project(p.grad) = R̄ P Pᵀ = R̄
    left:  p.grad = P R̄     (P (m, k), R̄ (k, n))   ->  project(p.grad) = Pᵀ P R̄ = R̄
    full:  p.grad = U R̄ V   (U (m, k), V (k, n))   ->  Uᵀ U R̄ V Vᵀ = R̄

using P Pᵀ = I_k (rows of Vh) and Pᵀ P = I_k (columns of U): the SVD's singular vectors, and
the identity fallback's unit vectors, are orthonormal. The identity holds to rounding (about
1e-16 relative in float64); ``tests/test_galore_distributed.py`` checks it for every proj_type and
side. The unchanged optimizer then sees exactly the projected global-batch gradient. Projectors
whose basis is not orthonormal (Q-GaLore's INT4-quantized basis) break the identity and are
refused with a TypeError.

Fact 2: right singular vectors of row shards from a sum of Gram matrices
------------------------------------------------------------------------
If G (m, n) is split by rows into shards G_k (m_k, n) then Gᵀ G = Σ_k G_kᵀ G_k (n × n), and with
G = U S Vᵀ, Gᵀ G = V S² Vᵀ: the right singular vectors are the eigenvectors of the all-reduced
Gram matrix, ordered by eigenvalue. :func:`right_singular_basis_from_shards` returns the top r
as rows (r, n), as ``Vh[:r]`` (up to the sign of each row), communicating n² numbers. It squares
the condition number, so directions with σ_i² below ε·σ_1² are not resolved.

Bytes are counted as the payload each rank all-reduces (numel × element size); a ring all-reduce
sends about 2(K − 1)/K times that per rank, for both schemes alike.

Which optimizers each mode supports
-----------------------------------
Per optimizer and distributed mode (standard DDP, which all-reduces full gradients, works with
every optimizer: each rank steps on the same averaged gradient)::

    optimizer          subspace DDP (here)  FSDP2 (mini.galore.fsdp)  per-layer accumulation
    GaLoreAdamW        yes                  yes (FSDPGaLoreAdamW)     yes
    GaLoreAdamW8bit    yes (tested)         refused, TypeError        refused, TypeError
    QGaLoreAdamW       refused, TypeError   refused, TypeError        yes (tested)
    QGaLoreAdamW8bit   refused, TypeError   refused, TypeError        refused, TypeError

8-bit moments under subspace DDP: every rank receives the same averaged projection and quantises
it identically (the trajectory equals the single-process 8-bit run to 2e-16, the same codes).
Q-GaLore under subspace DDP: its INT4 basis is not orthonormal, so the back-projection trick
above does not return the averaged projection. Under FSDP2 (see :mod:`mini.galore.fsdp`) 8-bit
block-wise moments would quantise blocks of the full (m, r) moment that row shards cut, and the
sharded refresh bypasses the adaptive INT4 projector. Per-layer accumulation
(:mod:`mini.galore.accumulate`) re-states GaLoreAdamW's step, which the 8-bit optimizers replace.

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .adamw import GaLoreAdamW
from .projector import GaLoreProjector, check_rank

__all__ = ["CommStats", "allreduce_gradients_", "back_project_unscaled", "right_singular_basis_from_shards"]


@dataclass
class CommStats:
    """Bytes all-reduced per step by :func:`allreduce_gradients_`, beside what standard DDP would send.

    Explained in :doc:`/book/galore/theory`.
    """

    #: Payload bytes all-reduced at each step (projections; full gradients at updates and of plain parameters).
    sent: list[int] = field(default_factory=list)
    #: The bytes of every gradient at full size at each step, as standard DDP all-reduces them.
    full: list[int] = field(default_factory=list)
    #: How many projected parameters all-reduced their full gradient at each step (subspace updates).
    update_steps: list[int] = field(default_factory=list)

    @property
    def total_sent(self) -> int:
        """Bytes sent over all recorded steps."""
        return sum(self.sent)

    @property
    def total_full(self) -> int:
        """Bytes standard DDP would have sent over the same steps."""
        return sum(self.full)

    def ratio(self) -> float:
        """Standard DDP bytes over subspace bytes (> 1 is a saving); nan before any step."""
        return self.total_full / self.total_sent if self.total_sent else float("nan")


def back_project_unscaled(projector: GaLoreProjector, low_rank: Tensor) -> Tensor:
    """Map a low-rank gradient back to (m, n) without the scale α (so ``apply`` recovers it).

    Explained in :doc:`/book/galore/theory`.
    """
    if projector.side == "right":
        return low_rank @ projector.ortho  # (m, k) (k, n)
    if projector.side == "left":
        return projector.ortho @ low_rank  # (m, k) (k, n)
    if projector.side == "full":
        return projector.ortho @ low_rank @ projector.ortho_right  # (m, k) (k, k) (k, n)
    raise RuntimeError("back_project_unscaled called before the projector had a basis")


def _check_process_group(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group "
            "(e.g. backend 'gloo') before allreduce_gradients_ / right_singular_basis_from_shards"
        )
    return dist.get_world_size(group)


def _allreduce_mean_(tensors: list[Tensor], world_size: int, group: Any) -> None:
    """All-reduce (mean) a list of tensors in place, one flat buffer per (dtype, device)."""
    buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.dtype, t.device), []).append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])  # (Σ numel,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world_size)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def allreduce_gradients_(
    optimizer: GaLoreAdamW, stats: CommStats | None = None, group: Any = None
) -> tuple[int, int]:
    """Average every gradient over the ranks, in GaLore's subspace where its basis is fixed.

    Call between ``loss.backward()`` and ``optimizer.step()`` on a model that is *not* wrapped in
    DistributedDataParallel, with the same model and optimizer on every rank. A projected
    parameter whose projector refreshes its basis at this step (or has none yet) all-reduces its
    full gradient (the optimizer then takes the SVD of the averaged gradient, the same on every
    rank); otherwise its projection R is all-reduced and ``p.grad`` becomes the unscaled
    back-projection of the mean R, whose projection is that mean (see the module docstring).
    Plain parameters all-reduce their full gradient. Parameters without a gradient are skipped:
    every rank must have gradients for the same parameters.

    Returns ``(bytes_sent, bytes_full)`` for this step and appends them to ``stats`` if given.

    Explained in :doc:`/book/galore/theory`.
    """
    if not isinstance(optimizer, GaLoreAdamW):
        raise TypeError(
            f"optimizer must be a mini.galore GaLoreAdamW (or GaLoreAdamW8bit), got {type(optimizer).__name__}"
        )
    if optimizer.projector_class is not GaLoreProjector:
        raise TypeError(
            f"optimizer {type(optimizer).__name__} uses projector {optimizer.projector_class.__name__}: subspace "
            "all-reduce needs GaLoreProjector's orthonormal basis (Pᵀ P = I); a quantized basis (Q-GaLore's INT4) "
            "does not give back the averaged projection. Average full gradients instead (DistributedDataParallel)"
        )
    if stats is not None and not isinstance(stats, CommStats):
        raise TypeError(f"stats must be a CommStats or None, got {type(stats).__name__}")
    world_size = _check_process_group(group)
    full_grads: list[Tensor] = []  # all-reduced in full
    projected: list[tuple[Any, GaLoreProjector, Tensor]] = []  # (param, projector, R)
    bytes_full = n_updates = 0
    for param_group in optimizer.param_groups:
        for p in param_group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("allreduce_gradients_ does not support sparse gradients")
            bytes_full += p.grad.numel() * p.grad.element_size()
            state = optimizer.state.get(p, {})
            projector = state.get("projector")
            if "rank" not in param_group:
                full_grads.append(p.grad)
            elif projector is None or projector.needs_update(state.get("step", 0)):
                full_grads.append(p.grad)  # a subspace update: the SVD needs the averaged full gradient
                n_updates += 1
            else:
                projected.append((p, projector, projector.apply(p.grad)))  # (low-rank shape)
    low_rank = [r for _, _, r in projected]
    _allreduce_mean_(full_grads + low_rank, world_size, group)
    for p, projector, r in projected:
        p.grad = back_project_unscaled(projector, r).to(p.grad.dtype)  # (m, n); apply() gives r back
    bytes_sent = sum(t.numel() * t.element_size() for t in full_grads + low_rank)
    if stats is not None:
        stats.sent.append(bytes_sent)
        stats.full.append(bytes_full)
        stats.update_steps.append(n_updates)
    return bytes_sent, bytes_full


@torch.no_grad()
def right_singular_basis_from_shards(local_rows: Tensor, rank: int, group: Any = None) -> Tensor:
    """The top-``rank`` right singular vectors (rank, n) of a matrix whose rows are sharded over ranks.

    Each rank passes its row shard G_k (m_k, n); the Gram matrices G_kᵀ G_k (n, n) are
    all-reduced (summed) and the eigenvectors of the sum with the largest eigenvalues are returned
    as rows, ordered as ``torch.linalg.svd(G).Vh[:rank]`` and equal to it up to each row's sign.
    Without an initialized process group the shard is the whole matrix. Computed in float64 for
    float16/bfloat16/float32 input and returned in the input's dtype.

    Explained in :doc:`/book/galore/theory`.
    """
    if not isinstance(local_rows, Tensor) or local_rows.dim() != 2:
        what = f"a {local_rows.dim()}-D tensor" if isinstance(local_rows, Tensor) else type(local_rows).__name__
        raise ValueError(f"local_rows must be a 2-D tensor (m_k, n), a row shard of the matrix; got {what}")
    rank = check_rank(rank)
    n = local_rows.shape[1]
    if rank > n:
        raise ValueError(f"rank must be at most the number of columns n = {n} of local_rows, got {rank}")
    rows = local_rows.double()  # (m_k, n)
    gram = rows.t() @ rows  # (n, n), G_kᵀ G_k
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(gram, op=dist.ReduceOp.SUM, group=group)  # Gᵀ G
    _, vecs = torch.linalg.eigh(gram)  # ascending eigenvalues; columns are eigenvectors
    return vecs[:, -rank:].flip(-1).t().contiguous().to(local_rows.dtype)  # (rank, n), largest first
