"""Per-layer GaLore updates that respect gradient accumulation: accumulate in the subspace, step at the boundary.

Part II, GaLore chapter (``book/galore/``); Zhao et al., ICML 2024, arXiv 2403.03507, Sec. 4.3
(per-layer weight updates) and Algorithm 2. The bug this fixes is jiaweizzhao/GaLore issue #78
(also LLaMA-Factory #5887): the official per-layer hook calls ``optimizer.step()`` on every
backward, so "gradient accumulation 4" gives four Adam steps on quarter-scaled losses instead of
one step on their sum. :func:`mini.galore.layerwise.attach_layerwise_updates` has the same limit
by construction (one backward is one step).

Why the subspace is enough
--------------------------
A standard loop with accumulation k runs ``loss_i.backward()`` for i = 1…k (the user's loss is
already scaled, e.g. divided by k), so ``p.grad = G = Σᵢ Gᵢ``, then one step. Between subspace
updates the projector's basis P is fixed and the projection is linear::

    Pᵀ G = Pᵀ Σᵢ Gᵢ = Σᵢ Pᵀ Gᵢ        (left side; G Pᵀ = Σᵢ Gᵢ Pᵀ on the right side)

so each hook may project its micro-batch gradient Gᵢ (m, n) at once, add it to an accumulator of
the low-rank shape (r, n) or (m, r), and free Gᵢ. At the k-th backward the accumulated R = Pᵀ G
goes through GaLoreAdamW's Adam update and ``project_back``; nothing divides it (dividing is the
loss's job, as in the standard loop). The result equals the standard GaLore step on the summed
gradient up to floating-point reassociation (float64: within 1e-10 in ``tests/test_galore_accumulate.py``).

The subspace-update step (the one place the full gradient is needed)
--------------------------------------------------------------------
At a step t with ``t mod T = 0`` (and the very first step) the standard step computes the SVD of
the *summed* gradient G; the SVD is not linear, so neither the projections Pᵀ Gᵢ nor the Gram
matrices Gᵢᵀ Gᵢ (``Gᵀ G ≠ Σ Gᵢᵀ Gᵢ``: cross terms) of the micro-batches suffice. So for that window
only, the parameter accumulates its full gradient (m, n) in ``p.grad`` (the hook leaves it there and
autograd adds each Gᵢ in place, as in a standard loop), and at the boundary the summed G goes
through the unmodified ``GaLoreAdamW.step`` (SVD, optional moment transfer, projection, update):
bit for bit the standard step's code path. The decision is taken at the window's first gradient,
from the projector's ``needs_update(state["step"])`` (the step counter does not move within a window).

Memory (gradient bytes alive, the quantity ``track_memory`` records): a standard accumulation loop
holds every full gradient for the whole window, Σ_p m_p n_p. Here, in a subspace window, the
accumulators hold Σ_p r·max(m_p, n_p) ("std") plus the plain parameters in full, and at most one
(m, n) gradient is alive at a hook (the one being projected) as in per-layer updates. In a refresh
window (once every T steps, all projected matrices at once when they share T) the gradients are
kept in full: Σ_p m_p n_p, exactly the standard loop's memory, for those k micro-batches only
(measured: a 4-layer float64 MLP, 2920 parameters, rank 4, k = 3: 23,360 bytes in a refresh window,
as the standard loop; 13,120 in a subspace window, of which 4,928 are accumulated sums and 8,192 the one
32 × 32 gradient being projected; the weights' accumulators are 4,096 bytes, the biases' full
sums 832).

Limits: a parameter that received a gradient in some micro-batches of a window is stepped at the
window's end of backward even if the last micro-batch did not reach it (as the standard step would
step its partial sum); the boundary is counted in backward passes that reach at least one hooked
parameter (the engine's end-of-backward callback, as DDP and FSDP use). The optimizer must be
GaLoreAdamW itself (or a subclass that keeps its ``step``): GaLoreAdamW has no public entry point
for an already-projected gradient, so the subspace step here re-states GaLoreAdamW.step's
per-parameter body through its extension surface (``adam_direction``, ``step_size``,
``project_back``). GaLoreAdamW8bit (its own step: weight decay and rounding placed differently)
is refused with a TypeError; QGaLoreAdamW keeps the step and works (tested).
Single-process, as :mod:`mini.galore.layerwise`.

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from numbers import Integral
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import Variable

from .adamw import GaLoreAdamW
from .layerwise import LayerwiseHandle, _per_parameter

__all__ = ["AccumulatingHandle", "attach_accumulating_updates", "check_accumulation_steps"]


def check_accumulation_steps(accumulation_steps: Any) -> int:
    """Return ``accumulation_steps`` as a Python int if it is an integer >= 1 (numpy ints accepted), else raise ValueError.

    Explained in :doc:`/book/galore/theory`.
    """
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, Integral) or accumulation_steps < 1:
        raise ValueError(
            f"accumulation_steps must be an integer >= 1 (micro-batches per optimizer step), "
            f"got {accumulation_steps!r} of type {type(accumulation_steps).__name__}"
        )
    return int(accumulation_steps)


class AccumulatingHandle(LayerwiseHandle):
    """Per-parameter GaLoreAdamW optimizers stepped once every ``accumulation_steps`` backward passes.

    Returned by :func:`attach_accumulating_updates`. Schedules, ``lr``, ``remove()`` and
    ``n_svd()`` work as in :class:`~mini.galore.layerwise.LayerwiseHandle`; call
    ``scheduler_step()`` once per optimizer step (when ``micro_step % accumulation_steps == 0``).

    Counters: ``micro_step`` (backward passes seen), ``n_steps`` (boundaries), ``n_updates``
    (parameter updates). With ``track_memory``: ``peak_grad_bytes`` (max over hooks of the full
    gradients plus accumulators alive), and ``peak_bytes_by_window`` = {"subspace": …, "refresh": …}
    split by whether any projected matrix accumulated its full gradient for an SVD in that window.

    Explained in :doc:`/book/galore/theory`.
    """

    def __init__(
        self, params: list[Tensor], optimizers: list[GaLoreAdamW], accumulation_steps: int, track_memory: bool
    ) -> None:
        self.accumulation_steps = accumulation_steps
        self.micro_step = 0
        self.n_steps = 0
        self.peak_bytes_by_window = {"subspace": 0, "refresh": 0}
        self._acc: list[Tensor | None] = [None] * len(params)  # (r, n) or (m, r), subspace windows only
        self._full: list[bool] = [False] * len(params)  # this window accumulates the full gradient in p.grad
        self._pending: list[bool] = [False] * len(params)  # received a gradient in the current window
        self._window_refresh = False
        self._window_peak = 0
        self._callback_queued = False
        super().__init__(params, optimizers, track_memory)

    # ----------------------------------------------------------------------------- memory
    def _alive_grad_bytes(self) -> int:
        grads = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        return grads + self.accumulator_bytes()

    def accumulator_bytes(self) -> int:
        """Bytes of the low-rank accumulators alive now (0 at a boundary; full windows accumulate in ``p.grad``)."""
        return sum(a.numel() * a.element_size() for a in self._acc if a is not None)

    # ----------------------------------------------------------------------------- the hooks
    def _starts_full(self, index: int) -> bool:
        """True if parameter ``index`` must accumulate its full gradient this window (plain, or SVD due)."""
        opt = self.optimizers[index]
        group = opt.param_groups[0]
        if "rank" not in group:
            return True
        state = opt.state[self.params[index]]
        projector = state.get("projector")
        refresh = projector is None or projector.needs_update(state.get("step", 0))
        self._window_refresh |= refresh
        return refresh

    def _make_hook(self, index: int) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            if not self._callback_queued:  # once per backward: count it and close the window if due
                Variable._execution_engine.queue_callback(self._end_of_backward)
                self._callback_queued = True
            if self.track_memory:
                alive = self._alive_grad_bytes()
                self.peak_grad_bytes = max(self.peak_grad_bytes, alive)
                self._window_peak = max(self._window_peak, alive)
            if not self._pending[index]:  # the window's first gradient of p decides how it accumulates
                self._pending[index] = True
                self._full[index] = self._starts_full(index)
            if not self._full[index]:
                with torch.no_grad():
                    low = self._projector(index).apply(p.grad)  # G_i (m, n) -> (r, n) or (m, r)
                    p.grad = None  # free G_i now
                    acc = self._acc[index]
                    if acc is None:
                        self._acc[index] = low
                    else:
                        acc.add_(low)  # Σ Pᵀ G_i = Pᵀ Σ G_i
            # full windows keep p.grad: autograd adds the next G_i into it in place, as in a standard loop
            if self.micro_step % self.accumulation_steps == self.accumulation_steps - 1:
                self._step(index)

        return hook

    def _projector(self, index: int) -> Any:
        return self.optimizers[index].state[self.params[index]]["projector"]

    def _end_of_backward(self) -> None:
        """Engine callback after each backward: count it; at a boundary step what the hooks left."""
        self._callback_queued = False
        boundary = self.micro_step % self.accumulation_steps == self.accumulation_steps - 1
        self.micro_step += 1
        if not boundary:
            return
        for index, pending in enumerate(self._pending):
            if pending:  # got gradients earlier in the window, none in the last micro-batch
                self._step(index)
        self.n_steps += 1
        kind = "refresh" if self._window_refresh else "subspace"
        self.peak_bytes_by_window[kind] = max(self.peak_bytes_by_window[kind], self._window_peak)
        self._window_refresh = False
        self._window_peak = 0

    @torch.no_grad()
    def _step(self, index: int) -> None:
        """One GaLoreAdamW step of parameter ``index`` from its accumulator, which is then freed."""
        p, opt, acc = self.params[index], self.optimizers[index], self._acc[index]
        self._acc[index] = None
        self._pending[index] = False
        if self._full[index]:  # plain parameter, or an SVD is due: the unmodified standard step on p.grad = Σ G_i
            opt.step()
        else:
            _subspace_step(opt, p, acc)
        p.grad = None
        self.n_updates += 1

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Optimizers, schedulers and counters; only at a boundary (accumulators are not saved)."""
        if any(self._pending):
            raise RuntimeError(
                f"AccumulatingHandle.state_dict() called inside an accumulation window (micro_step {self.micro_step}, "
                f"accumulation_steps {self.accumulation_steps}): save after the k-th backward of a window"
            )
        return {**super().state_dict(), "micro_step": self.micro_step, "n_steps": self.n_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (same parameters in the same order)."""
        super().load_state_dict(state)
        self.micro_step = int(state.get("micro_step", 0))
        self.n_steps = int(state.get("n_steps", 0))
        self._acc = [None] * len(self.params)
        self._pending = [False] * len(self.params)


def _subspace_step(opt: GaLoreAdamW, p: Tensor, low_rank: Tensor) -> None:
    """GaLoreAdamW.step's per-parameter body for an already-projected gradient (no SVD due).

    Equals ``_prepare`` (minus the projection: ``low_rank`` is Pᵀ G) followed by the step's update.
    """
    group = opt.param_groups[0]
    state = opt.state[p]
    projector = state["projector"]
    if "exp_avg" not in state:  # unreachable after a refresh window, kept for loaded partial states
        opt.init_state(p, group, state, low_rank)
    state["step"] += 1
    direction = opt.adam_direction(p, group, state, low_rank)  # N, low-rank shape
    p.add_(projector.project_back(direction), alpha=-opt.step_size(group, state["step"]))  # (m, n), α included
    if group["weight_decay"] > 0.0:
        p.add_(p, alpha=(-group["lr"] * group["weight_decay"]))


def _check_optimizer_class(optimizer_class: Any) -> type[GaLoreAdamW]:
    """GaLoreAdamW or a subclass keeping its step (the subspace step re-states that step)."""
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, GaLoreAdamW)):
        raise TypeError(
            f"optimizer_class must be GaLoreAdamW (or a subclass that keeps its step), got {optimizer_class!r}: "
            "accumulating in the subspace needs GaLore's projector; for other optimizers use a standard loop "
            "(or attach_layerwise_updates without accumulation)"
        )
    # unwrap: torch.optim wraps each class's step in a profiling hook when its first instance is made
    same = all(inspect.unwrap(getattr(optimizer_class, name)) is inspect.unwrap(getattr(GaLoreAdamW, name))
               for name in ("step", "_prepare"))
    if not same:
        raise TypeError(
            f"optimizer_class {optimizer_class.__name__} overrides GaLoreAdamW.step or _prepare (e.g. GaLoreAdamW8bit "
            "orders weight decay and rounding differently): the subspace step of attach_accumulating_updates "
            "would not be its step. Supported: GaLoreAdamW and subclasses that only change the extension surface"
        )
    return optimizer_class


def attach_accumulating_updates(
    model_or_params: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
    accumulation_steps: int,
    *,
    optimizer_class: type[GaLoreAdamW] = GaLoreAdamW,
    track_memory: bool = False,
    **optimizer_kwargs: Any,
) -> AccumulatingHandle:
    """Per-parameter GaLoreAdamW updates stepped once every ``accumulation_steps`` backward passes.

    Explained in :doc:`/book/galore/theory`.

    Args:
        model_or_params: a model, its parameters, or param groups in galore-torch's convention
            (e.g. :func:`mini.galore.groups.galore_param_groups`); groups with ``"rank"`` are
            projected and accumulate in the subspace, the others accumulate in full.
        accumulation_steps: k >= 1, backward passes per optimizer step; scale the loss yourself
            (e.g. ``loss / k``) as in a standard loop.
        optimizer_class: GaLoreAdamW (default) or a subclass that keeps its ``step``.
        track_memory: record gradient and accumulator bytes at each hook (see
            :class:`AccumulatingHandle`).
        **optimizer_kwargs: GaLoreAdamW's options (lr, betas, eps, weight_decay, project_moments, …).

    After each ``loss.backward()`` every ``.grad`` is None; after the k-th, every parameter has been
    updated exactly as ``opt.step()`` on the summed gradients would. Raises ValueError for a bad
    ``accumulation_steps``, TypeError for a non-GaLore optimizer class or a DDP-wrapped model.
    """
    accumulation_steps = check_accumulation_steps(accumulation_steps)
    if isinstance(model_or_params, nn.parallel.DistributedDataParallel):
        raise TypeError(
            "attach_accumulating_updates is single-process: hooks would step each rank on its local gradient "
            "before DistributedDataParallel's all-reduce (see mini.galore.distributed for subspace DDP)"
        )
    if "optimizer_factory" in optimizer_kwargs:
        raise TypeError(
            "attach_accumulating_updates takes no optimizer_factory: the subspace step needs GaLoreAdamW's "
            "projector, so every parameter gets optimizer_class (GaLoreAdamW); mixing GaLore groups with a "
            "non-GaLore optimizer is not supported (put plain parameters in a group without 'rank')"
        )
    optimizer_class = _check_optimizer_class(optimizer_class)
    params, optimizers = _per_parameter(
        model_or_params, lambda groups: optimizer_class(groups, **optimizer_kwargs))
    return AccumulatingHandle(params, optimizers, accumulation_steps, track_memory)
