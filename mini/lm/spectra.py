"""Spectra of weights and gradients: singular values, stable rank, energy, and a recorder for training.

Used by Part II: the GaLore chapter (``book/galore/``, gradients become low rank), its gradient
rank lab (``labs/galore/gradient_rank.ipynb``), and the WeLore chapter (``book/welore/``, which
weights become low rank).

The **stable rank** of a matrix G with singular values σ₁ ≥ σ₂ ≥ … is ::

    sr(G) = ‖G‖_F² / ‖G‖_2² = Σᵢ σᵢ² / σ₁²

a smooth lower bound of its rank (1 ≤ sr(G) ≤ rank(G); equal to the rank when all non-zero
singular values are equal, close to 1 when one direction dominates). The **energy captured by
the top r directions** is ::

    e_r(G) = Σ_{i ≤ r} σᵢ² / Σᵢ σᵢ² = ‖U_rᵀ G‖_F² / ‖G‖_F²

which is exactly the share of the gradient's squared norm that GaLore's rank-r projection keeps
at the step its basis is computed (Zhao et al., GaLore, arXiv 2403.03507, Eq. (7)). Zhao et al.
(Lemma 3.3) show that the gradients of reversible networks trained by SGD drift to low stable
rank; the GaLore lab measures both quantities on the tiny Llama. Singular values are computed
in float32 (float64 when given float64), as GaLore's projector does.

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from mini.lm.config import PROJECTED_MODULES, is_projected_name

__all__ = [
    "singular_values",
    "stable_rank",
    "cumulative_energy",
    "layer_and_module",
    "GradientSpectrumRecorder",
]

_LAYER_MODULE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:.*\.)?(" + "|".join(PROJECTED_MODULES) + r")\.weight$")


def _check_matrix(name: str, m: Any) -> Tensor:
    if not isinstance(m, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(m.shape)}")
    if m.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(m.shape)}")
    return m


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values of a 2-D tensor, descending, in float32 (float64 stays float64).

    Explained in :doc:`/book/galore/theory`.
    """
    m = _check_matrix("matrix", matrix).detach()
    m = m.double() if m.dtype == torch.float64 else m.float()
    return torch.linalg.svdvals(m)  # (min(m, n),)


def _stable_rank_of(s: Tensor) -> float:
    top = float(s[0])
    if top == 0.0:
        return math.nan
    return float((s.double() ** 2).sum() / top**2)


def stable_rank(matrix: Tensor) -> float:
    """``‖M‖_F² / ‖M‖_2²`` of a 2-D tensor; NaN for the zero matrix (no direction at all).

    Explained in :doc:`/book/galore/theory`.
    """
    return _stable_rank_of(singular_values(matrix))


def cumulative_energy(x: Tensor) -> Tensor:
    """``e_r = Σ_{i≤r} σᵢ² / Σ σᵢ²`` for r = 1 … min(m, n), float64 (entry ``r - 1`` is e_r).

    ``x``: a 2-D matrix, or the 1-D tensor of its singular values (any order; they are sorted).
    All NaN for the zero matrix.

    Explained in :doc:`/labs/galore/gradient_rank`.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim == 1:
        if x.numel() == 0:
            raise ValueError("x must not be empty")
        if bool((x < 0).any()):
            raise ValueError("x holds negative values: singular values are non-negative")
        s = torch.sort(x.detach().double(), descending=True).values
    elif x.ndim == 2:
        s = singular_values(x).double()
    else:
        raise ValueError(f"x must be a 2-D matrix or 1-D singular values, got shape {tuple(x.shape)}")
    energy = s**2  # (q,)
    total = float(energy.sum())
    if total == 0.0:
        return torch.full_like(energy, math.nan)
    return torch.cumsum(energy, 0) / total


def layer_and_module(name: str) -> tuple[int, str] | None:
    """``(layer index, module)`` of a projection weight's name, e.g.
    ``"model.layers.2.mlp.up_proj.weight" -> (2, "up_proj")``; None for other names.

    Explained in :doc:`/book/galore/theory`.
    """
    m = _LAYER_MODULE.search(name)
    return (int(m.group(1)), m.group(2)) if m else None


class GradientSpectrumRecorder:
    """Records the stable rank (and optionally the spectrum) of selected gradients during training.

    Pass it as ``on_gradients`` to :func:`~mini.lm.trainer.train_lm`; at step 1 and every
    ``every`` steps it reads ``p.grad`` of each 2-D parameter whose name ``select(name)`` accepts
    (by default the attention and MLP projection weights,
    :func:`~mini.lm.config.is_projected_name`).

    After training: ``steps`` (the recorded steps), ``stable_ranks[name]`` (one value per
    recorded step, aligned with ``steps``; NaN where that parameter had no gradient) and, with
    ``keep_spectra=True``, ``spectra[name]`` (one float32 tensor of singular values per recorded
    step; an empty tensor where there was no gradient).

    Explained in :doc:`/book/galore/theory`.
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
        self.shapes: dict[str, tuple[int, int]] = {}

    def __call__(self, step: int, model: nn.Module) -> None:
        if step % self.every != 0 and step != 1:
            return
        index = len(self.steps)
        self.steps.append(int(step))
        for name, p in model.named_parameters():
            if p.ndim != 2 or not self.select(name):
                continue
            if name not in self.stable_ranks:  # first seen now: earlier steps had no gradient
                self.stable_ranks[name] = [math.nan] * index
                self.shapes[name] = (int(p.shape[0]), int(p.shape[1]))
                if self.keep_spectra:
                    self.spectra[name] = [torch.empty(0)] * index
            if p.grad is None:
                sr, s = math.nan, torch.empty(0)
            else:
                s = singular_values(p.grad)  # (min(m, n),)
                sr = _stable_rank_of(s)
            self.stable_ranks[name].append(sr)
            if self.keep_spectra:
                self.spectra[name].append(s.cpu().clone())
        for name, values in self.stable_ranks.items():  # a parameter that vanished from the model
            if len(values) < index + 1:
                values.append(math.nan)
                if self.keep_spectra:
                    self.spectra[name].append(torch.empty(0))

    def names(self) -> list[str]:
        """The recorded parameter names, in model order."""
        return list(self.stable_ranks)

    def summary(self, names: Iterable[str] | None = None) -> dict[str, tuple[float, float]]:
        """``name -> (first, last)`` stable rank, for a table of how far each gradient collapsed."""
        if not self.steps:
            raise ValueError("nothing was recorded: pass the recorder to train_lm as on_gradients")
        keys = list(names) if names is not None else self.names()
        for k in keys:
            if k not in self.stable_ranks:
                raise ValueError(f"names holds {k!r}, which was not recorded; recorded: {self.names()[:4]} ...")
        return {k: (self.stable_ranks[k][0], self.stable_ranks[k][-1]) for k in keys}

    def grid(self, index: int = -1, modules: Sequence[str] = PROJECTED_MODULES) -> np.ndarray:
        """Stable ranks at recorded step ``steps[index]`` as a (layers, modules) array.

        Rows are layer indices 0 … L−1, columns ``modules`` (default q, k, v, o, gate, up,
        down); NaN where nothing was recorded. Names that are not a layer's projection weight
        are left out.
        """
        if not self.steps:
            raise ValueError("nothing was recorded: pass the recorder to train_lm as on_gradients")
        if isinstance(index, bool) or not isinstance(index, int) or not -len(self.steps) <= index < len(self.steps):
            raise ValueError(f"index must be an int in [-{len(self.steps)}, {len(self.steps)}), got {index!r}")
        modules = list(modules)
        unknown = [m for m in modules if m not in PROJECTED_MODULES]
        if unknown:
            raise ValueError(f"modules must be drawn from {list(PROJECTED_MODULES)}, got {unknown}")
        found = {name: layer_and_module(name) for name in self.stable_ranks}
        layers = [lm[0] for lm in found.values() if lm is not None]
        out = np.full((max(layers) + 1 if layers else 0, len(modules)), np.nan)
        for name, lm in found.items():
            if lm is not None and lm[1] in modules:
                out[lm[0], modules.index(lm[1])] = self.stable_ranks[name][index]
        return out
