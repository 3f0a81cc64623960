"""Cayley SGD: gradient descent on the orthogonal group, for SpinQuant's learned rotations.

Paper: Liu et al., "SpinQuant: LLM quantization with learned rotations", arXiv 2405.16406
(ICLR 2025), Section 3.2 (Cayley SGD on the Stiefel manifold, after Li, Fuxin and Todorovic,
"Efficient Riemannian optimization on the Stiefel manifold via the Cayley transform", ICLR 2020,
arXiv 2002.01113); official code facebookresearch/SpinQuant ``train_utils/optimizer.py``
(``SGDG``).

The step
--------
For a square orthogonal ``R`` with Euclidean gradient ``G``, the skew matrix

    A = ½(RᵀG − GᵀR)                                   (Aᵀ = −A)

is the gradient in the Lie algebra: ``R·A`` is the Riemannian gradient on O(n) (the projection
of ``G`` onto the tangent space at ``R``). The Cayley transform of a skew matrix is orthogonal,
so

    R ← R·(I − α/2·A)·(I + α/2·A)⁻¹,     α = min(lr, 1/‖A‖₁)

keeps ``RᵀR = I`` exactly (up to rounding); ``‖A‖₁`` is the largest absolute column sum, which
bounds the spectral radius, so ``α/2·‖A‖ ≤ ½`` and ``I + α/2·A`` is well conditioned. To first
order, ``R ← R − α·R·A``: the Riemannian gradient step. ``exact=True`` solves the linear system
(``torch.linalg.solve``); ``exact=False`` uses the official fixed-point iteration for the
transposed form ``Y = Rᵀ_new = (I − α/2·A)⁻¹(I + α/2·A)·Rᵀ``:

    Y ← Rᵀ + α/2·A·(Rᵀ + Y)          (5 iterations, contraction factor ≤ ½)

started at the first-order point ``Y₀ = (I + α·A)·Rᵀ``. (The official start is ``Rᵀ − α·Gᵀ``,
which also carries the gradient's normal component; the fixed point is the same, ours starts
closer to it. The official code also renormalises rows every step and re-orthonormalises by QR
with probability 1/101; we do neither, and the tests measure the drift.)

Momentum
--------
The official ``SGDG`` allocates a momentum buffer and never writes it back, so only momentum 0
behaves as intended. Here the buffer lives in the Lie algebra (skew matrices), where tangent
vectors at different points are comparable (``R·M`` at ``R`` is carried to ``R'·M`` at ``R'``):

    M ← μ·M + A,     step with M in place of A (α = min(lr, 1/‖M‖₁)).

Explained in :doc:`/book/spinquant/theory`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["CayleySGD", "cayley_step"]

#: Fixed-point iterations of the approximate step (official ``Cayley_loop``).
FIXED_POINT_ITERS = 5


def _norm_one(A: Tensor) -> Tensor:
    """‖A‖₁: the largest absolute column sum."""
    return A.abs().sum(dim=0).max()


def cayley_step(
    R: Tensor, A: Tensor, lr: float, exact: bool = True
) -> tuple[Tensor, float]:
    """One Cayley step ``R·(I − α/2·A)(I + α/2·A)⁻¹`` along skew ``A``.

    Returns (new R, α) with ``α = min(lr, 1/‖A‖₁)``. ``exact=False``: the official
    5-iteration fixed point instead of a linear solve. Computes in R's dtype.

    Explained in :doc:`/book/spinquant/theory`.
    """
    n = R.shape[0]
    a1 = float(_norm_one(A))
    alpha = lr if a1 == 0.0 else min(lr, 1.0 / a1)
    eye = torch.eye(n, dtype=R.dtype, device=R.device)
    half = 0.5 * alpha * A  # (n, n), skew
    if exact:
        # R_new = R (I − αA/2)(I + αA/2)⁻¹  ⇔  (I + αA/2)ᵀ R_newᵀ = (R (I − αA/2))ᵀ
        rhs = (R @ (eye - half)).T
        return torch.linalg.solve((eye + half).T, rhs).T, alpha
    Rt = R.T
    Y = Rt + alpha * (A @ Rt)  # first-order start
    for _ in range(FIXED_POINT_ITERS):
        Y = Rt + half @ (Rt + Y)
    return Y.T, alpha


class CayleySGD(torch.optim.Optimizer):
    """SGD on square orthogonal matrices by Cayley steps, with momentum that accumulates.

    Each parameter must be a square 2-D tensor (an orthogonal rotation); its dtype is kept (the
    step is computed in float64: in float32 RᵀR drifts by about 2e-5 in 100 steps, in float64
    by the float32 storage rounding only, about 4e-7). ``lr`` is capped per step by ``1/‖A‖₁``. Momentum
    ``μ`` accumulates in the tangent space: ``M ← μ·M + A`` with ``A = ½(RᵀG − GᵀR)``, and the
    step uses ``M`` (the official buffer is never written). ``exact=False`` swaps the linear
    solve for the official fixed-point approximation (5 iterations).

    Explained in :doc:`/book/spinquant/theory`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float,
        momentum: float = 0.0,
        exact: bool = True,
    ) -> None:
        _check_hparams(lr, momentum, exact)
        super().__init__(params, {"lr": lr, "momentum": momentum, "exact": exact})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking its hyper-parameters and that every tensor is square 2-D."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hparams(group["lr"], group["momentum"], group["exact"])
        for i, p in enumerate(group["params"]):
            if p.ndim != 2 or p.shape[0] != p.shape[1]:
                raise ValueError(
                    f"CayleySGD: params[{i}] has shape {tuple(p.shape)}; only square 2-D (orthogonal) "
                    "matrices are allowed"
                )
            if not p.is_floating_point():
                raise TypeError(
                    f"CayleySGD: params[{i}] has dtype {p.dtype}; a floating dtype is required"
                )

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Cayley step for every parameter with a gradient; returns closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                # rotations are small (d×d): float64 keeps RᵀR = I over many steps
                ct = torch.float64
                R = p.detach().to(ct)  # (n, n)
                G = p.grad.detach().to(ct)  # (n, n)
                A = 0.5 * (R.T @ G - G.T @ R)  # (n, n), skew
                state = self.state[p]
                if mu > 0:
                    # stored in the parameter's dtype, as Optimizer.load_state_dict casts it so:
                    # a resumed run then reads exactly what the original one read
                    buf = state.get("momentum_buffer")
                    A = A if buf is None else mu * buf.to(ct) + A  # (n, n), skew
                    state["momentum_buffer"] = A.to(p.dtype)
                R_new, alpha = cayley_step(R, A, group["lr"], group["exact"])
                state["alpha"] = alpha
                p.copy_(R_new.to(p.dtype))
        return loss


def _check_hparams(lr: object, momentum: object, exact: object) -> None:
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
        raise ValueError(f"CayleySGD: lr={lr!r} must be a number > 0")
    if (
        not isinstance(momentum, (int, float))
        or isinstance(momentum, bool)
        or not 0.0 <= momentum < 1.0
    ):
        raise ValueError(f"CayleySGD: momentum={momentum!r} must be in [0, 1)")
    if not isinstance(exact, bool):
        raise TypeError(f"CayleySGD: exact={exact!r} must be a bool")
