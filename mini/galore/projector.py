"""GaLore's gradient projector: an SVD basis of the gradient, refreshed every T steps.

Part II, GaLore chapter (``book/galore/``). Zhao et al., "GaLore: Memory-Efficient LLM Training
by Gradient Low-Rank Projection", ICML 2024, arXiv 2403.03507, Algorithm 2 and Eq. (7)-(10).

The projection
--------------
For a weight gradient ``G`` of shape (m, n) (out × in) and the thin SVD
``G = U diag(s) Vh`` computed in float32 (float64 gradients keep a float64 SVD) at steps
0, T, 2T, … (T = ``update_proj_gap``; the step counter is read before the optimizer increments
it), with ``k = min(r, m, n)`` (a thin SVD has min(m, n) singular vectors):

============  ======================  =====================  ==================  ===========
proj_type     side                    basis P                project R           project_back
============  ======================  =====================  ==================  ===========
std, m ≥ n    right                   Vh[:k]      (k, n)     G Pᵀ      (m, k)    α N P
std, m < n    left                    U[:, :k]    (m, k)     Pᵀ G      (k, n)    α P N
reverse_std   the other side of std
right         right                   Vh[:k]      (k, n)     G Pᵀ      (m, k)    α N P
left          left                    U[:, :k]    (m, k)     Pᵀ G      (k, n)    α P N
full          both                    U[:, :k], Vh[:k]       Uₖᵀ G Vhₖᵀ (k, k)   α Uₖ N Vhₖ
============  ======================  =====================  ==================  ===========

so with "std" the optimizer state has ``r·max(m, n)`` entries and the projector ``r·min(m, n)``.
α (``scale``) multiplies the back-projected update (paper: α = 0.25).

Differences from galore-torch 1.0 (``galore_torch/galore_projector.py``) and why
---------------------------------------------------------------------------------
- The side is decided once, at the SVD, and stored (``side``). galore-torch re-decides it in
  ``project_back`` from the low-rank shape; with "reverse_std" and a rank ≥ m on an m < n
  gradient that picks the wrong side and fails. With the side stored, a rank at or above
  min(m, n) is the full-rank projection and we warn once, naming the shape (galore-torch is
  silent). On the smaller side (always the case for "std") the basis is then square and
  orthogonal, so ``project_back(project(G)) = α G`` for every gradient G: GaLore with SGD is SGD.
  On the larger side a thin SVD has only min(m, n) vectors: the projection is exact for the
  gradient it was computed from, not for later ones (as in galore-torch; the warning says so).
- The SVD is guarded: if the gradient is not finite or is all zeros, or the SVD raises
  ``torch.linalg.LinAlgError``, the previous basis is kept with a warning. If there is no previous
  basis yet (the very first step), the projector falls back to the identity's first k columns
  (rows), i.e. coordinate truncation, with a warning; the next refresh tries the SVD again. Both
  are counted in ``n_fallback``. galore-torch raises on a non-finite gradient (the SVD does not
  converge) and silently takes an arbitrary basis from an all-zero one (all singular values 0).
- ``n_svd`` counts the SVDs performed (Q-GaLore's metric; galore-torch keeps no count).
- ``state_dict()`` holds tensors, ints, floats and strings only, so an optimizer checkpoint loads
  with ``torch.load(weights_only=True)``; galore-torch pickles the projector object.
- The arithmetic of a successful SVD, projection and back-projection is op-for-op that of
  galore-torch, so trajectories agree bitwise in float32 on CPU.

Extension surface (Q-GaLore's adaptive projector subclasses this class)
-----------------------------------------------------------------------
``needs_update(step)`` decides whether to refresh (reads ``update_proj_gap``, so a subclass may
change the gap); ``update_basis(grad)`` runs the guarded SVD through ``compute_basis(grad)`` and
stores the result with ``set_basis``; ``project(grad, step)`` = refresh if needed, then
``apply(grad)``; ``project_back(low_rank)``. Subclasses that add state extend ``state_dict`` /
``load_state_dict`` (call ``super()``; keep values tensors or plain scalars/strings).

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

import warnings
import math
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

__all__ = ["GaLoreProjector", "PROJ_TYPES", "check_rank", "check_update_proj_gap", "check_proj_type", "check_scale"]

#: The projection types of galore-torch 1.0; its tensor/Tucker projector is not ported (broken).
PROJ_TYPES: tuple[str, ...] = ("std", "reverse_std", "left", "right", "full")


def check_rank(rank: Any) -> int:
    """Return ``rank`` as a Python int if it is a positive integer (numpy integers accepted;
    bool and float rejected), else raise naming the value.

    Explained in :doc:`/book/galore/theory`.
    """
    if isinstance(rank, bool) or not isinstance(rank, Integral):
        raise TypeError(f"rank must be a positive integer, got {rank!r} of type {type(rank).__name__}")
    if rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    return int(rank)


def check_update_proj_gap(update_proj_gap: Any) -> int:
    """Return ``update_proj_gap`` as a Python int if it is a positive integer, else raise.

    numpy integers and integral floats (``200.0``, e.g. from a YAML or JSON config) are accepted;
    ``200.5``, bools, strings, NaN and infinities are not.

    Explained in :doc:`/book/galore/theory`.
    """
    allowed = "a positive integer (steps between SVDs; an integral float such as 200.0 is accepted)"
    gap = update_proj_gap
    if isinstance(gap, bool) or not isinstance(gap, Real):
        raise TypeError(f"update_proj_gap must be {allowed}, got {gap!r} of type {type(gap).__name__}")
    if not isinstance(gap, Integral):
        value = float(gap)
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"update_proj_gap must be {allowed}, got {gap!r}")
        gap = int(value)
    if gap <= 0:
        raise ValueError(f"update_proj_gap must be {allowed}, got {update_proj_gap!r}")
    return int(gap)


def check_proj_type(proj_type: Any) -> str:
    """Return ``proj_type`` if it is one of :data:`PROJ_TYPES`, else raise listing them.

    Explained in :doc:`/book/galore/theory`.
    """
    if not isinstance(proj_type, str) or proj_type not in PROJ_TYPES:
        raise ValueError(f"proj_type must be one of {', '.join(map(repr, PROJ_TYPES))}; got {proj_type!r}")
    return proj_type


def check_scale(scale: Any) -> float:
    """Return ``scale`` if it is a finite real number (not bool), else raise.

    Explained in :doc:`/book/galore/theory`.
    """
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"scale must be a finite real number (the paper's alpha, e.g. 0.25), got {scale!r}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite real number (the paper's alpha, e.g. 0.25), got {scale!r}")
    return scale


class GaLoreProjector:
    """Project a 2-D gradient onto its leading singular subspace, refreshed every ``update_proj_gap`` steps.

    Explained in :doc:`/book/galore/theory`.

    Args:
        rank: r, the subspace dimension (positive int). Paper: 128 (60M) … 1024 (7B).
        update_proj_gap: T, steps between SVDs (paper and galore-torch recipes: 200).
        scale: α, multiplies the back-projected update (paper: 0.25; galore-torch's class
            default is 1.0 but every recipe passes 0.25).
        proj_type: one of :data:`PROJ_TYPES` (default "std", as galore-torch).
        name: optional label (e.g. the parameter's name) used in warnings.

    Attributes set at the first SVD: ``side`` ("left", "right" or "full"), ``ortho`` (the left
    factor U[:, :k] (m, k) or the right factor Vh[:k] (k, n)), ``ortho_right`` (Vh[:k] for "full"
    only), ``shape`` (m, n). Counters: ``n_svd`` (SVDs performed), ``n_fallback`` (refreshes that
    kept the old basis or used the identity fallback).
    """

    def __init__(
        self,
        rank: int,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        name: str | None = None,
    ) -> None:
        self.rank = check_rank(rank)
        self.update_proj_gap = check_update_proj_gap(update_proj_gap)
        self.scale = check_scale(scale)
        self.proj_type = check_proj_type(proj_type)
        self.name = name
        self.side: str | None = None
        self.ortho: Tensor | None = None
        self.ortho_right: Tensor | None = None
        self.shape: tuple[int, int] | None = None
        self.n_svd = 0
        self.n_fallback = 0
        self._warned_full_rank = False

    # ----------------------------------------------------------------------------- deciding
    def side_for(self, shape: tuple[int, int]) -> str:
        """The side this proj_type projects a gradient of ``shape`` on (decided once, at the SVD)."""
        m, n = shape
        if self.proj_type == "std":
            return "right" if m >= n else "left"
        if self.proj_type == "reverse_std":
            return "left" if m >= n else "right"
        return self.proj_type  # "left", "right" or "full"

    def needs_update(self, step: int) -> bool:
        """True when the basis must be (re)computed at ``step`` (read before the increment)."""
        return self.ortho is None or step % self.update_proj_gap == 0

    def _describe(self, shape: tuple[int, ...]) -> str:
        label = f"parameter {self.name!r} of shape {tuple(shape)}" if self.name else f"parameter of shape {tuple(shape)}"
        return label

    # ----------------------------------------------------------------------------- the SVD
    def compute_basis(self, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        """Float32 thin SVD of ``grad`` (m, n); return the basis for ``self.side``.

        A float64 gradient keeps a float64 SVD (galore-torch would round it to float32), so that
        identities such as "GaLore at full rank with SGD is SGD" hold to float64 rounding.

        Returns ``(ortho, ortho_right)``: left side (U[:, :k], None), right side (Vh[:k], None),
        full (U[:, :k], Vh[:k]); matrices in ``grad``'s dtype, as galore-torch. Raises
        ``torch.linalg.LinAlgError`` if the SVD does not converge.
        """
        matrix = grad if grad.dtype in (torch.float32, torch.float64) else grad.float()  # (m, n)
        U, s, Vh = torch.linalg.svd(matrix, full_matrices=False)  # (m, q), (q,), (q, n), q = min(m, n)
        r = self.rank
        # Copies (not views): a view would keep the whole U or Vh alive (galore-torch keeps it).
        if self.side == "right":
            return Vh[:r, :].to(grad.dtype, copy=True), None  # (k, n)
        if self.side == "left":
            return U[:, :r].to(grad.dtype, copy=True).contiguous(), None  # (m, k)
        return U[:, :r].to(grad.dtype, copy=True).contiguous(), Vh[:r, :].to(grad.dtype, copy=True)

    def _identity_basis(self, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        m, n = grad.shape
        eye_m = torch.eye(m, dtype=grad.dtype, device=grad.device)  # (m, m)
        eye_n = torch.eye(n, dtype=grad.dtype, device=grad.device)  # (n, n)
        if self.side == "right":
            return eye_n[: min(self.rank, n)].contiguous(), None  # (k, n)
        if self.side == "left":
            return eye_m[:, : min(self.rank, m)].contiguous(), None  # (m, k)
        k = min(self.rank, m, n)
        return eye_m[:, :k].contiguous(), eye_n[:k].contiguous()  # (m, k), (k, n)

    def set_basis(self, ortho: Tensor, ortho_right: Tensor | None = None) -> None:
        """Install a basis (used by ``update_basis``; subclasses may post-process, e.g. quantize)."""
        self.ortho = ortho
        self.ortho_right = ortho_right

    def update_basis(self, grad: Tensor) -> bool:
        """Recompute the basis from ``grad`` (m, n); return True if a new SVD basis was installed.

        On a non-finite or all-zero gradient, or an SVD that does not converge, keep the previous
        basis with a warning (identity fallback when there is none yet) and return False.
        """
        if grad.dim() != 2:
            raise ValueError(
                f"GaLore projects 2-D gradients; got a {self._describe(grad.shape)}. Put 1-D parameters "
                "(biases, norms) in a param group without 'rank'."
            )
        shape = (int(grad.shape[0]), int(grad.shape[1]))
        if self.shape is None:
            self.shape = shape
            self.side = self.side_for(shape)
            q = min(shape)  # singular vectors a thin SVD provides
            side_dim = {"left": shape[0], "right": shape[1], "full": max(shape)}[self.side]
            if self.rank >= q and not self._warned_full_rank:
                self._warned_full_rank = True
                if side_dim == q:
                    what = "the basis is square and orthogonal: the projection is exact, with no memory saving"
                else:
                    what = (
                        f"all {q} singular vectors are kept, but on the {self.side} side ({side_dim}) they span "
                        "only the current gradient's space: exact for that gradient, not for later ones"
                    )
                warnings.warn(
                    f"GaLore rank {self.rank} >= min(m, n) = {q} for the {self._describe(shape)} "
                    f"(proj_type {self.proj_type!r}, {self.side} side): full rank; {what}",
                    stacklevel=3,
                )
        elif shape != self.shape:
            raise ValueError(f"gradient shape changed from {self.shape} to {shape} for the {self._describe(shape)}")

        reason = None
        if not bool(torch.isfinite(grad).all()):
            reason = "the gradient is not finite"
        elif not bool(grad.any()):
            reason = "the gradient is all zeros"
        else:
            try:
                ortho, ortho_right = self.compute_basis(grad)
            except torch.linalg.LinAlgError as err:  # SVD did not converge
                reason = f"the SVD did not converge ({err})"
        if reason is None:
            self.n_svd += 1
            self.set_basis(ortho, ortho_right)
            return True
        self.n_fallback += 1
        if self.ortho is None:
            warnings.warn(
                f"GaLore: {reason} for the {self._describe(shape)} and there is no previous basis; "
                "using the identity's leading coordinates until the next refresh",
                stacklevel=3,
            )
            self.set_basis(*self._identity_basis(grad))
        else:
            warnings.warn(f"GaLore: {reason} for the {self._describe(shape)}; keeping the previous basis", stacklevel=3)
        return False

    # ----------------------------------------------------------------------------- projecting
    def apply(self, grad: Tensor) -> Tensor:
        """Project with the current basis (no refresh): (m, n) -> low-rank shape."""
        if self.side == "right":
            return torch.matmul(grad, self.ortho.t())  # (m, n) (n, k) -> (m, k)
        if self.side == "left":
            return torch.matmul(self.ortho.t(), grad)  # (k, m) (m, n) -> (k, n)
        if self.side == "full":
            return torch.matmul(self.ortho.t(), grad) @ self.ortho_right.t()  # (k, k)
        raise RuntimeError("GaLoreProjector.apply called before any basis was computed")

    def project(self, grad: Tensor, step: int) -> Tensor:
        """Refresh the basis if ``needs_update(step)``, then project ``grad`` (m, n)."""
        if self.needs_update(step):
            self.update_basis(grad)
        return self.apply(grad)

    def project_back(self, low_rank: Tensor) -> Tensor:
        """Map a low-rank update back to (m, n), times ``scale``, on the stored side."""
        if self.side == "right":
            full = torch.matmul(low_rank, self.ortho)  # (m, k) (k, n)
        elif self.side == "left":
            full = torch.matmul(self.ortho, low_rank)  # (m, k) (k, n)
        elif self.side == "full":
            full = torch.matmul(self.ortho, low_rank) @ self.ortho_right  # (m, k) (k, k) (k, n)
        else:
            raise RuntimeError("GaLoreProjector.project_back called before any basis was computed")
        return full * self.scale

    def basis(self) -> tuple[Tensor | None, Tensor | None]:
        """The current ``(ortho, ortho_right)`` (None before the first SVD)."""
        return self.ortho, self.ortho_right

    def rotation(self, old: tuple[Tensor | None, Tensor | None]) -> tuple[Tensor | None, Tensor | None]:
        """Matrices carrying low-rank coordinates from basis ``old`` to the current basis.

        A low-rank tensor X in the old coordinates stands for the full matrix ``back(X)``; its
        coordinates in the new basis are ``apply(back(X))`` =
        right: ``X C_r`` with ``C_r = P_old P_newᵀ`` (k, k); left: ``C_l X`` with
        ``C_l = P_newᵀ P_old`` (k, k); full: ``C_l X C_r``. Returns ``(C_l, C_r)`` (None where
        unused).
        """
        old_ortho, old_right = old
        if self.side == "right":
            return None, old_ortho @ self.ortho.t()
        if self.side == "left":
            return self.ortho.t() @ old_ortho, None
        return self.ortho.t() @ old_ortho, old_right @ self.ortho_right.t()

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Tensors, ints, floats and strings only (loads with ``torch.load(weights_only=True)``)."""
        state: dict[str, Any] = {
            "rank": self.rank,
            "update_proj_gap": self.update_proj_gap,
            "scale": self.scale,
            "proj_type": self.proj_type,
            "n_svd": self.n_svd,
            "n_fallback": self.n_fallback,
        }
        if self.side is not None:
            state["side"] = self.side
            state["shape"] = list(self.shape)
            state["ortho"] = self.ortho
            if self.ortho_right is not None:
                state["ortho_right"] = self.ortho_right
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (tensors are used as given: move them beforehand)."""
        self.rank = check_rank(state["rank"])
        self.update_proj_gap = check_update_proj_gap(state["update_proj_gap"])
        self.scale = check_scale(state["scale"])
        self.proj_type = check_proj_type(state["proj_type"])
        self.n_svd = int(state["n_svd"])
        self.n_fallback = int(state.get("n_fallback", 0))
        self.side = state.get("side")
        self.shape = tuple(state["shape"]) if "shape" in state else None
        self.ortho = state.get("ortho")
        self.ortho_right = state.get("ortho_right")
        self._warned_full_rank = self.shape is not None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rank={self.rank}, update_proj_gap={self.update_proj_gap}, "
            f"scale={self.scale}, proj_type={self.proj_type!r}, side={self.side!r}, n_svd={self.n_svd})"
        )
