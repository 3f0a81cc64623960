"""Spectra of weights and gradients: singular values, stable rank, and a recorder for training.

Used by Part II: the GaLore chapter (``book/galore/``, gradients become low rank), its gradient
rank lab, and the WeLore chapter (``book/welore/``, which weights become low rank).

The **stable rank** of a matrix G is ``‖G‖_F² / ‖G‖_2² = Σ σᵢ² / σ₁²``: a smooth lower bound of
its rank (it equals the rank when all non-zero singular values are equal, and tends to 1 when
one direction dominates). Zhao et al. (GaLore, arXiv 2403.03507, Lemma 3.3) show that the
gradients of reversible networks trained by SGD drift to low stable rank; the GaLore lab measures
it on the tiny Llama. Singular values are computed in float32 (float64 when given float64), as
GaLore's projector does.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from mini.lm.config import is_projected_name

__all__ = ["singular_values", "stable_rank", "GradientSpectrumRecorder"]


def _check_matrix(name: str, m: Any) -> Tensor:
    if not isinstance(m, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(m.shape)}")
    if m.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(m.shape)}")
    return m


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values of a 2-D tensor, descending, in float32 (float64 stays float64)."""
    m = _check_matrix("matrix", matrix).detach()
    m = m.double() if m.dtype == torch.float64 else m.float()
    return torch.linalg.svdvals(m)  # (min(m, n),)


def stable_rank(matrix: Tensor) -> float:
    """``‖M‖_F² / ‖M‖_2²`` of a 2-D tensor; NaN for the zero matrix (no direction at all)."""
    s = singular_values(matrix)
    top = float(s[0])
    if top == 0.0:
        return math.nan
    return float((s.double() ** 2).sum() / top**2)


class GradientSpectrumRecorder:
    """Records the stable rank (and optionally the spectrum) of selected gradients during training.

    Pass it as ``on_gradients`` to :func:`~mini.lm.trainer.train_lm`; every ``every`` steps it reads
    ``p.grad`` of each parameter whose name ``select(name)`` accepts (by default the attention and
    MLP projection weights, :func:`~mini.lm.config.is_projected_name`).

    After training: ``steps`` (list of steps), ``stable_ranks[name]`` (one value per recorded
    step) and, with ``keep_spectra=True``, ``spectra[name]`` (one float32 tensor per step).
    """

    def __init__(
        self,
        every: int = 10,
        select: Callable[[str], bool] | None = None,
        keep_spectra: bool = False,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if select is not None and not callable(select):
            raise TypeError(f"select must be callable or None, got {type(select).__name__}")
        self.every = every
        self.select = select or is_projected_name
        self.keep_spectra = bool(keep_spectra)
        self.steps: list[int] = []
        self.stable_ranks: dict[str, list[float]] = {}
        self.spectra: dict[str, list[Tensor]] = {}

    def __call__(self, step: int, model: nn.Module) -> None:
        if step % self.every != 0 and step != 1:
            return
        self.steps.append(int(step))
        for name, p in model.named_parameters():
            if p.grad is None or p.grad.ndim != 2 or not self.select(name):
                continue
            s = singular_values(p.grad)
            top = float(s[0])
            sr = math.nan if top == 0.0 else float((s.double() ** 2).sum() / top**2)
            self.stable_ranks.setdefault(name, []).append(sr)
            if self.keep_spectra:
                self.spectra.setdefault(name, []).append(s.clone())

    def names(self) -> list[str]:
        """The recorded parameter names, in model order."""
        return list(self.stable_ranks)

    def summary(self, names: Iterable[str] | None = None) -> dict[str, tuple[float, float]]:
        """``name -> (first, last)`` stable rank, for a table of how far each gradient collapsed."""
        keys = list(names) if names is not None else self.names()
        return {k: (self.stable_ranks[k][0], self.stable_ranks[k][-1]) for k in keys}
