"""SLTrain: pretraining with sparse plus low-rank weights, ``W = (α/r)·B A + S``.

Han, Li, Huang, Hong, Takeda, Jawanpuria, Mishra, "SLTrain: a sparse plus low-rank approach for
parameter and memory efficient pretraining", NeurIPS 2024, arXiv 2406.02214; official code
andyjm3/SLTrain. Part II, SLTrain chapter (``book/sltrain/``).

Every attention and MLP weight of a Llama is replaced by a scaled rank-r product plus a sparse
matrix on a support of ``⌊δ m n⌋`` positions drawn once at random and then fixed; ``A``, ``B`` and
the support's values are trained with a plain optimizer. Per matrix ``r (m + n) + ⌊δ m n⌋``
parameters instead of ``m n``; the int64 support costs 8 bytes per non-zero as stored (the
memory estimator, :mod:`mini.lm.memory` methods ``"sltrain"`` and ``"sltrain8bit"``, counts it
with ``index_bytes``).

- :mod:`mini.sltrain.layer`: :class:`~mini.sltrain.layer.SparseLowRankLinear` (the layer, its
  checkpoint checks, :meth:`~mini.sltrain.layer.SparseLowRankLinear.from_state_dict`),
  :func:`~mini.sltrain.layer.sparse_lowrank_linear` (the functional form with the hand-written
  backward that recomputes W), :func:`~mini.sltrain.layer.random_support`,
  :func:`~mini.sltrain.layer.top_magnitude_index`,
  :func:`~mini.sltrain.layer.load_sltrain_state_dict`.
- :mod:`mini.sltrain.kernel`: the Triton kernels and their PyTorch references:
  :func:`~mini.sltrain.kernel.sparse_lowrank_weight` (W built tile by tile, sparse entries added
  in registers) and :func:`~mini.sltrain.kernel.gather_support` (the dense gradient read on the
  support).
- :mod:`mini.sltrain.convert`: :func:`~mini.sltrain.convert.convert_to_sltrain`, the model
  converter (through :func:`mini.lm.lowrank.replace_linears`), its report, and the paper's
  recipes (:data:`~mini.sltrain.convert.PAPER_RECIPES`).

Explained in :doc:`/book/sltrain/theory`.
"""
from __future__ import annotations

from .convert import PAPER_RECIPES, SLTrainRecipe, SLTrainReport, convert_to_sltrain, sltrain_layers
from .kernel import (
    gather_support,
    gather_support_reference,
    sparse_lowrank_weight,
    sparse_lowrank_weight_reference,
    tile_offsets,
)
from .layer import (
    SparseLowRankLinear,
    check_support,
    load_sltrain_state_dict,
    n_nonzeros,
    random_support,
    sparse_lowrank_linear,
    top_magnitude_index,
)

__all__ = [
    "SparseLowRankLinear",
    "sparse_lowrank_linear",
    "n_nonzeros",
    "random_support",
    "top_magnitude_index",
    "check_support",
    "load_sltrain_state_dict",
    "convert_to_sltrain",
    "SLTrainReport",
    "SLTrainRecipe",
    "PAPER_RECIPES",
    "sltrain_layers",
    "sparse_lowrank_weight",
    "sparse_lowrank_weight_reference",
    "gather_support",
    "gather_support_reference",
    "tile_offsets",
]
