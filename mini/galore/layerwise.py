"""Per-layer weight updates: step each parameter from its gradient hook and free the gradient.

Part II, GaLore chapter (``book/galore/``); Zhao et al., ICML 2024, arXiv 2403.03507, Sec. 4.3
("per-layer weight updates", after Lv et al., LOMO). A standard step keeps every weight gradient
alive until ``optimizer.step()``: ``Σ_p |G_p|`` bytes. Updating parameter p as soon as backward has
accumulated G_p (``Tensor.register_post_accumulate_grad_hook``) and then dropping G_p keeps only
the gradients whose hooks have not yet run, about ``max_p |G_p|`` for a layered network. Each
parameter gets its own optimizer, so the update is the same as a standard step of the same
optimizer when the optimizer acts per parameter (Adam, GaLore-Adam; not global gradient clipping).

What differs from the official driver (``torchrun_main.py`` with ``--single_gpu``) and why
------------------------------------------------------------------------------------------
- Learning-rate schedules: one scheduler per optimizer, all stepped exactly once per training step
  by :meth:`LayerwiseHandle.scheduler_step` (called by the training loop, not from the hooks).
  The official driver steps its schedulers from inside the hooks and so doubles the schedule and
  the update gap to compensate; here nothing is doubled.
- A :class:`LayerwiseHandle` holds the hooks (``remove()``), one ``state_dict()`` for all the
  optimizers and schedulers, and an optional counter of gradient bytes alive at hook time.

Limits (by construction): each backward is one optimizer step, so gradient accumulation and
global-norm clipping do not apply (:mod:`mini.galore.accumulate` accumulates in the subspace and
steps at the boundary instead); and it is single-process. Under DistributedDataParallel a
parameter's hook fires as soon as its local gradient is accumulated, before DDP's bucketed
all-reduce has finished, so each rank would step on its own gradient and the replicas would drift
apart: :func:`attach_layerwise_updates` raises TypeError on a DDP-wrapped model.

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .adamw import GaLoreAdamW

__all__ = ["attach_layerwise_updates", "LayerwiseHandle"]

OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]


class LayerwiseHandle:
    """The per-parameter optimizers, their hooks and schedulers (returned by :func:`attach_layerwise_updates`).

    Explained in :doc:`/book/galore/theory`.
    """

    def __init__(self, params: list[Tensor], optimizers: list[torch.optim.Optimizer], track_memory: bool) -> None:
        self.params = params
        self.optimizers = optimizers
        self.schedulers: list[Any] = []
        self.track_memory = track_memory
        self.peak_grad_bytes = 0  # max over hook calls of the gradient bytes alive then
        self.n_updates = 0
        self._handles = [p.register_post_accumulate_grad_hook(self._make_hook(i)) for i, p in enumerate(params)]

    def _alive_grad_bytes(self) -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)

    def _make_hook(self, index: int) -> Callable[[Tensor], None]:
        optimizer = self.optimizers[index]

        def hook(p: Tensor) -> None:
            if self.track_memory:
                self.peak_grad_bytes = max(self.peak_grad_bytes, self._alive_grad_bytes())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # free G_p now
            self.n_updates += 1

        return hook

    # ----------------------------------------------------------------------------- schedules
    def add_schedulers(self, factory: Callable[[torch.optim.Optimizer], Any]) -> None:
        """Create ``factory(optimizer)`` (e.g. ``lambda o: LambdaLR(o, f)``) for every optimizer."""
        if self.schedulers:
            raise ValueError("schedulers were already added to this LayerwiseHandle")
        self.schedulers = [factory(opt) for opt in self.optimizers]

    def scheduler_step(self) -> None:
        """Step every scheduler once: call once per training step, after backward."""
        for scheduler in self.schedulers:
            scheduler.step()

    @property
    def lr(self) -> float:
        """The learning rate of the first group of the first optimizer."""
        return self.optimizers[0].param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        """Set the same learning rate in every group of every optimizer."""
        if not value >= 0.0:
            raise ValueError(f"lr must be >= 0, got {value}")
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = value

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Every optimizer's and scheduler's state, in parameter order."""
        return {
            "optimizers": [opt.state_dict() for opt in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
            "n_updates": self.n_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same parameters in the same order)."""
        if len(state["optimizers"]) != len(self.optimizers):
            raise ValueError(
                f"state has {len(state['optimizers'])} optimizers, this handle has {len(self.optimizers)}"
            )
        if len(state["schedulers"]) != len(self.schedulers):
            raise ValueError(
                f"state has {len(state['schedulers'])} schedulers, this handle has {len(self.schedulers)}: "
                "call add_schedulers before load_state_dict"
            )
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)
        for sched, s in zip(self.schedulers, state["schedulers"]):
            sched.load_state_dict(s)
        self.n_updates = int(state.get("n_updates", 0))

    def remove(self) -> None:
        """Remove the hooks (the optimizers keep their state)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def n_svd(self) -> int:
        """SVDs performed by all GaLore projectors."""
        return sum(opt.n_svd() for opt in self.optimizers if hasattr(opt, "n_svd"))


def _per_parameter(
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
    make: OptimizerFactory,
) -> tuple[list[Tensor], list[torch.optim.Optimizer]]:
    """One optimizer per parameter, built by ``make`` from the parameter's group options.

    Shared by the per-layer handles (:func:`attach_layerwise_updates` and
    :func:`mini.galore.accumulate.attach_accumulating_updates`); refuses a parameter listed twice
    and an empty parameter list.
    """
    params: list[Tensor] = []
    optimizers: list[torch.optim.Optimizer] = []
    seen: set[int] = set()
    for group in _split(model_or_params):
        options = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(f"a parameter of shape {tuple(p.shape)} appears twice in model_or_params")
            seen.add(id(p))
            params.append(p)
            optimizers.append(make([{"params": [p], **options}]))
    if not params:
        raise ValueError("model_or_params has no parameter that requires grad")
    return params, optimizers


def _split(model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One group (options, params) list from a module, a parameter list or param groups."""
    if isinstance(model_or_params, nn.Module):
        return [{"params": [p for p in model_or_params.parameters() if p.requires_grad]}]
    items = list(model_or_params)
    if not items:
        raise ValueError("model_or_params is empty")
    if all(isinstance(x, Tensor) for x in items):
        return [{"params": [p for p in items if p.requires_grad]}]
    if all(isinstance(x, dict) for x in items):
        groups = []
        for g in items:
            params = g["params"]
            params = [params] if isinstance(params, Tensor) else list(params)
            groups.append({**g, "params": params})
        return groups
    raise TypeError("model_or_params must be an nn.Module, an iterable of tensors or an iterable of param-group dicts")


def attach_layerwise_updates(
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
    optimizer_factory: OptimizerFactory | None = None,
    *,
    track_memory: bool = False,
    **optimizer_kwargs: Any,
) -> LayerwiseHandle:
    """Give every parameter its own optimizer, stepped from its post-accumulate-grad hook.

    Explained in :doc:`/book/galore/theory`.

    Args:
        model_or_params: a model, its parameters, or param groups in galore-torch's convention
            (e.g. :func:`mini.galore.groups.galore_param_groups`); group options apply to each of the
            group's parameters.
        optimizer_factory: ``factory([group]) -> Optimizer`` for a one-parameter group list;
            default ``GaLoreAdamW([group], **optimizer_kwargs)``.
        track_memory: record in ``handle.peak_grad_bytes`` the gradient bytes alive at each hook.

    After ``loss.backward()`` every parameter has been updated and its ``.grad`` is None; do not
    call an optimizer step yourself. Call ``handle.scheduler_step()`` once per training step.
    Raises TypeError for a model wrapped in DistributedDataParallel (single-process only).
    """
    if isinstance(model_or_params, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "attach_layerwise_updates is single-process: per-layer hook updates would step each rank on its "
            "local gradient before DistributedDataParallel's all-reduce. Use the standard optimizer step under DDP."
        )
    if optimizer_factory is None:

        def optimizer_factory(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return GaLoreAdamW(groups, **optimizer_kwargs)

    elif optimizer_kwargs:
        raise TypeError(f"pass optimizer options either to optimizer_factory or as keywords, not both: {sorted(optimizer_kwargs)}")
    params, optimizers = _per_parameter(model_or_params, optimizer_factory)
    return LayerwiseHandle(params, optimizers, track_memory)
