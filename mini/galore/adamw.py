"""GaLoreAdamW: Adam in a rank-r gradient subspace, a drop-in for galore-torch's GaLoreAdamW.

Part II, GaLore chapter (``book/galore/``). Zhao et al., "GaLore: Memory-Efficient LLM Training
by Gradient Low-Rank Projection", ICML 2024, arXiv 2403.03507, Algorithm 2.

The update (one projected parameter W (m, n), step t = 1, 2, …)
-----------------------------------------------------------------
With the projector of :mod:`mini.galore.projector` (basis P refreshed by an SVD of the gradient
whenever ``(t − 1) mod T = 0``)::

    R_t = project(G_t)                      # G Pᵀ (m, r) or Pᵀ G (r, n)         Eq. (7)
    M_t = β1 M_{t−1} + (1 − β1) R_t
    V_t = β2 V_{t−1} + (1 − β2) R_t²
    N_t = M_t / (√V_t + ε)                                                        Eq. (8)
    η_t = lr · √(1 − β2ᵗ) / (1 − β1ᵗ)       # bias correction folded into the step size
    W_t = W_{t−1} − η_t · α · project_back(N_t)                                  Eq. (9)
    W_t = W_t − lr · λ · W_t                # decoupled weight decay, after the update

Groups without a ``"rank"`` key run the same Hugging Face-style AdamW without projection. The
moments of a projected parameter live in the low-rank shape, so their memory is
r·max(m, n) per moment instead of m·n.

Param groups follow galore-torch: ``[{"params": regular}, {"params": projected, "rank": r,
"update_proj_gap": T, "scale": α, "proj_type": "std"}]``; replace
``from galore_torch import GaLoreAdamW`` with ``from mini.galore import GaLoreAdamW``. See
:func:`mini.galore.groups.galore_param_groups` for the Hugging Face Trainer convention (one rank
for every targeted matrix).

Differences from galore-torch 1.0 (``galore_torch/adamw.py``) and why
---------------------------------------------------------------------
- Same arithmetic, op for op: on CPU in float32 the trajectories agree bitwise
  (``tests/test_galore.py``).
- The state holds no Python objects in ``state_dict()``: the projector is saved as a dict of
  tensors/ints/strings and rebuilt on ``load_state_dict``, so checkpoints load with
  ``torch.load(weights_only=True)`` and resume bitwise.
- Inputs are validated when a group is added: the rank must be a positive int, the gap a
  positive int, the proj_type known, and every parameter of a projected group 2-D (galore-torch
  fails deep inside the step, or not at all).
- Missing ``update_proj_gap`` / ``scale`` / ``proj_type`` in a projected group default to
  200 / 0.25 / "std" (the paper's values; galore-torch raises KeyError).
- ``project_moments=True`` (off by default, which is galore-torch's behaviour) carries the
  moments into the new subspace when it switches, see :meth:`GaLoreAdamW.transfer_moments`.
  galore-torch keeps the old coordinates (stale moments read in a new basis).
- No deprecation warning, and no dependency on transformers or bitsandbytes.
- float16 parameters get float32 moments (:func:`moment_dtype`): a float16 second moment
  underflows and the step explodes. float32 and bfloat16 keep galore-torch's moments in the
  gradient's dtype.

Carrying the moments across a switch (``project_moments=True``)
---------------------------------------------------------------
The first moment M (low-rank coordinates in the old basis) stands for the full matrix
``back(M)``; its coordinates in the new basis are ``C_l M C_r`` with ``C_r = P_old P_newᵀ`` (right
side) or ``C_l = P_newᵀ P_old`` (left side), the projection of the old full-space moment onto the
new subspace (exact when the two subspaces coincide, e.g. at full rank; skipped when the new basis
is bitwise the old one, where Pᵀ P = I would only add rounding). The second moment is not
a linear object: it estimates E[R²] per coordinate. If the old coordinates were uncorrelated with
variances V, a new coordinate ``Σ_j C_jk R_j`` has variance ``Σ_j C_jk² V_j``: so V is carried by
the *elementwise square* of the rotation, ``(C_l∘C_l) V (C_r∘C_r)``. That is non-negative by
construction (rotating V by C itself can go negative and would need clamping), exact when C is a
signed permutation (an unchanged basis up to the SVD's sign choices), and it shrinks V in the
directions the new subspace did not share with the old one, as M is shrunk.

Extension surface (8-bit GaLore builds on this class)
-----------------------------------------------------
``init_state(p, group, state, low_rank_grad)`` creates the moments; ``adam_direction(p, group,
state, grad)`` updates them and returns N_t (step counter already incremented);
``transfer_moments(state, projector, old_basis)`` rotates them at a switch; ``make_projector(p,
group)`` builds a projector (class attribute ``projector_class``).

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from .projector import (
    GaLoreProjector,
    check_proj_type,
    check_rank,
    check_scale,
    check_update_proj_gap,
)

__all__ = ["GaLoreOptimizer", "GaLoreAdamW", "GALORE_GROUP_DEFAULTS", "moment_dtype"]

#: The defaults of a projected group missing these keys, as in the paper (T = 200, α = 0.25)
#: and galore-torch ("std").
GALORE_GROUP_DEFAULTS: dict[str, Any] = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std"}


Basis = tuple[Tensor | None, Tensor | None]  # (ortho, ortho_right) of a projector


def moment_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of Adam's float moments for a gradient of ``dtype``: float32 for float16, else ``dtype``.

    float32 and bfloat16 gradients keep moments of their own dtype, as galore-torch and
    ``torch.optim.AdamW`` do (bfloat16 has float32's exponent range). A float16 second moment
    underflows: ``(1 − β2) R²`` is below float16's smallest subnormal (6e-8) for ``|R| < 8e-3``,
    so ``√V + ε ≈ ε`` and the step explodes (a five-step fp16 run's loss went from 1.0 to 3.3); so
    float16 parameters get float32 moments and a float16 direction N.

    Explained in :doc:`/book/galore/theory`.
    """
    return torch.float32 if dtype == torch.float16 else dtype


def check_adam_hparams(lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """Validate Adam's hyperparameters (shared by the GaLore and Q-GaLore optimizers).

    Each error names the argument, its value and what is allowed.

    Explained in :doc:`/book/galore/theory`.
    """
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"{name} must be a real number >= 0, got {value!r} of type {type(value).__name__}")
        if not value >= 0.0 or not math.isfinite(float(value)):  # also rejects NaN
            raise ValueError(f"{name} must be a real number >= 0, got {value!r}")
    ok = isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
        isinstance(b, Real) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas
    )
    if not ok:
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")


def _same_basis(a: Basis, b: Basis) -> bool:
    """True when two bases are bitwise equal (nothing to carry: Pᵀ P is I only up to rounding)."""
    return all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in zip(a, b)
    )


class GaLoreOptimizer(torch.optim.Optimizer):
    """What every GaLore optimizer shares: projected groups validated when added, one projector
    per projected parameter, and a state dict that holds the projectors as tensors and ints
    (``torch.load(weights_only=True)`` loads it). :class:`GaLoreAdamW` and
    :class:`~mini.galore.adafactor.GaLoreAdafactor` subclass it.

    Explained in :doc:`/book/galore/theory`.
    """

    projector_class: type[GaLoreProjector] = GaLoreProjector
    #: state tensors whose saved dtype a load keeps (torch casts them to the parameter's dtype)
    dtype_kept_keys: tuple[str, ...] = ()

    def __init__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], defaults: dict[str, Any]) -> None:
        self._param_names: dict[int, str] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Validate a projected group (rank, gap, scale, proj_type, 2-D parameters), then add it."""
        if "rank" in param_group:
            for key, value in GALORE_GROUP_DEFAULTS.items():
                param_group.setdefault(key, value)
            # stored as plain Python values (a numpy rank or a float gap from a config becomes an int)
            param_group["rank"] = check_rank(param_group["rank"])
            param_group["update_proj_gap"] = check_update_proj_gap(param_group["update_proj_gap"])
            check_scale(param_group["scale"])
            check_proj_type(param_group["proj_type"])
            self.check_group(param_group)
            params = param_group["params"]
            if isinstance(params, set):
                raise TypeError("params must be an ordered collection (a list), not a set: the order fixes the state_dict")
            params = [params] if isinstance(params, Tensor) else list(params)
            param_group["params"] = params
            for item in params:  # tensors, or (name, tensor) pairs as from named_parameters()
                name, p = item if isinstance(item, tuple) else (None, item)
                if isinstance(p, Tensor) and p.dim() != 2:
                    label = f"parameter {name!r}" if name else "a parameter"
                    raise ValueError(
                        f"a param group with 'rank' (GaLore projection) holds {label} of shape "
                        f"{tuple(p.shape)}: only 2-D weight matrices can be projected; put biases, norms "
                        "and other non-2-D parameters in a group without 'rank'"
                    )
        super().add_param_group(param_group)

    def check_group(self, param_group: dict[str, Any]) -> None:
        """Validate a projected group's extra keys when it is added (subclasses: Q-GaLore's projector keys)."""

    # ----------------------------------------------------------------------------- extension surface
    def make_projector(self, p: Tensor, group: dict[str, Any]) -> GaLoreProjector:
        """A projector for parameter ``p`` with its group's hyperparameters (named for warnings)."""
        name = self._param_names.get(id(p))
        if name is None and "param_names" in group:  # torch >= 2.6 keeps names given as (name, tensor)
            name = next((n for n, q in zip(group["param_names"], group["params"]) if q is p), None)
        return self.projector_class(
            group["rank"],
            update_proj_gap=group["update_proj_gap"],
            scale=group["scale"],
            proj_type=group["proj_type"],
            name=name,
        )

    def set_param_names(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Optional: remember parameter names so projector warnings name them."""
        for name, p in named_parameters:
            self._param_names[id(p)] = name


    def state_dict(self) -> dict[str, Any]:
        """torch's state dict with each projector replaced by its tensor/int/str state."""
        sd = super().state_dict()
        sd["state"] = {
            k: (
                {**v, "projector": v["projector"].state_dict()}
                if isinstance(v.get("projector"), GaLoreProjector)
                else v
            )
            for k, v in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load torch's state dict, keep the saved dtypes of ``dtype_kept_keys``, and rebuild the
        projectors from their saved state.

        The projector dicts are set aside before torch's loader runs (it would turn their
        strings into generators) and restored afterwards, their tensors moved to the
        parameter's device.
        """
        saved_state = state_dict["state"]
        saved_projectors = {k: v["projector"] for k, v in saved_state.items() if isinstance(v.get("projector"), dict)}
        stripped = {
            **state_dict,
            "state": {k: {kk: vv for kk, vv in v.items() if kk != "projector"} for k, v in saved_state.items()},
        }
        super().load_state_dict(stripped)
        # torch casts every floating state tensor to its parameter's dtype: float32 moments of a
        # float16 parameter (see moment_dtype) would come back float16
        params = [p for group in self.param_groups for p in group["params"]]
        for key, p in zip([i for g in state_dict["param_groups"] for i in g["params"]], params):
            for name in self.dtype_kept_keys:
                saved = saved_state.get(key, {}).get(name)
                if isinstance(saved, Tensor) and name in self.state[p] and self.state[p][name].dtype != saved.dtype:
                    self.state[p][name] = saved.to(device=p.device, copy=True)
        index = 0  # torch numbers the parameters across groups in order (the keys of "state")
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        for group in self.param_groups:
            for p in group["params"]:
                key = saved_ids[index]
                index += 1
                if key not in saved_projectors:
                    continue
                saved = dict(saved_projectors[key])
                for name in ("ortho", "ortho_right"):
                    if isinstance(saved.get(name), Tensor):
                        saved[name] = saved[name].to(device=p.device, copy=True)
                projector = self.make_projector(p, group)
                projector.load_state_dict(saved)
                self.state[p]["projector"] = projector

    def projectors(self) -> list[GaLoreProjector]:
        """The projectors created so far (one per projected parameter that received a gradient)."""
        return [s["projector"] for s in self.state.values() if isinstance(s.get("projector"), GaLoreProjector)]

    def n_svd(self) -> int:
        """Total SVDs performed by all projectors."""
        return sum(proj.n_svd for proj in self.projectors())


class GaLoreAdamW(GaLoreOptimizer):
    """AdamW with GaLore's low-rank gradient projection for groups that carry ``"rank"``.

    Explained in :doc:`/book/galore/theory`.

    Args:
        params: parameters or param groups; a group with ``"rank"`` (and optionally
            ``"update_proj_gap"``, ``"scale"``, ``"proj_type"``) is projected.
        lr: learning rate (galore-torch default 1e-3).
        betas: Adam's (β1, β2) (default (0.9, 0.999)).
        eps: ε added to √V (galore-torch 1e-6; the paper's text says 1e-8).
        weight_decay: decoupled weight decay λ, applied after the update (default 0).
        correct_bias: fold Adam's bias correction into the step size (default True).
        project_moments: carry the moments into the new subspace at a switch (default False,
            galore-torch's behaviour).
        no_deprecation_warning: accepted and ignored (galore-torch's signature; no warning here).
    """

    dtype_kept_keys = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        project_moments: bool = False,
        no_deprecation_warning: bool = True,
    ) -> None:
        del no_deprecation_warning  # galore-torch's argument, accepted so its call sites work unchanged
        check_adam_hparams(lr, betas, eps, weight_decay)
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": bool(correct_bias),
            "project_moments": bool(project_moments),
        }
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------- groups
    def init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any], grad: Tensor) -> None:
        """Create the moments in the (low-rank) shape of ``grad``, in :func:`moment_dtype`."""
        dtype = moment_dtype(grad.dtype)
        state["exp_avg"] = torch.zeros_like(grad, dtype=dtype)  # M
        state["exp_avg_sq"] = torch.zeros_like(grad, dtype=dtype)  # V

    def adam_direction(self, p: Tensor, group: dict[str, Any], state: dict[str, Any], grad: Tensor) -> Tensor:
        """Update the moments with ``grad`` (low-rank shape) and return N = M / (√V + ε).

        Called after ``state["step"]`` was incremented (t ≥ 1). N has ``grad``'s dtype (the
        arithmetic runs in the moments' dtype: float32 for float16 gradients).
        """
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        g = grad if grad.dtype == exp_avg.dtype else grad.to(exp_avg.dtype)
        beta1, beta2 = group["betas"]
        exp_avg.mul_(beta1).add_(g, alpha=(1.0 - beta1))
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        direction = exp_avg / denom
        return direction if direction.dtype == grad.dtype else direction.to(grad.dtype)

    def transfer_moments(self, state: dict[str, Any], projector: GaLoreProjector, old_basis: Basis) -> None:
        """Carry M by the rotation and V by its elementwise square into the new basis (see module doc)."""
        c_left, c_right = projector.rotation(old_basis)
        for key, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
            x = state[key]  # low-rank shape
            if c_left is not None:
                c = c_left.to(x.dtype)  # (k, k); float32 moments of a float16 basis
                x = (c if power == 1 else c * c) @ x
            if c_right is not None:
                c = c_right.to(x.dtype)
                x = x @ (c if power == 1 else c * c)
            state[key].copy_(x)

    def step_size(self, group: dict[str, Any], step: int) -> float:
        """η_t = lr·√(1 − β2ᵗ)/(1 − β1ᵗ) (or lr without bias correction)."""
        step_size = group["lr"]
        if group["correct_bias"]:
            beta1, beta2 = group["betas"]
            step_size = step_size * math.sqrt(1.0 - beta2**step) / (1.0 - beta1**step)
        return step_size

    # ----------------------------------------------------------------------------- the step
    def _prepare(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> tuple[Tensor, Any]:
        """The shared first half of a step for one parameter (subclasses reuse it).

        Creates the state, refreshes the projector's basis when due (carrying the moments into
        the new subspace with ``project_moments``, unless the basis did not change), projects the
        gradient, creates the moments and increments ``state["step"]``. Returns the (low-rank)
        gradient and the projector (None in a plain group).
        """
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        if "step" not in state:
            state["step"] = 0
        projector = None
        if "rank" in group:
            if "projector" not in state:
                state["projector"] = self.make_projector(p, group)
            projector = state["projector"]
            if projector.needs_update(state["step"]):
                old_basis = projector.basis()
                switched = projector.update_basis(grad)
                if (
                    switched
                    and group["project_moments"]
                    and old_basis[0] is not None
                    and "exp_avg" in state
                    and not _same_basis(old_basis, projector.basis())
                ):
                    self.transfer_moments(state, projector, old_basis)
            grad = projector.apply(grad)  # (low-rank shape)
        if "exp_avg" not in state:
            self.init_state(p, group, state, grad)
        state["step"] += 1
        return grad, projector

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One GaLore-AdamW step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad, projector = self._prepare(p, group, state)
                norm_grad = self.adam_direction(p, group, state, grad)
                if projector is not None:
                    # (m, n), the scale included
                    norm_grad = projector.project_back(norm_grad)
                p.add_(norm_grad, alpha=-self.step_size(group, state["step"]))
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=(-group["lr"] * group["weight_decay"]))
        return loss

    # ----------------------------------------------------------------------------- state
