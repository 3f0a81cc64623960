"""mini.galore: GaLore, memory-efficient training by gradient low-rank projection.

Part II, GaLore chapter (``book/galore/``). Zhao et al., "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", ICML 2024, arXiv 2403.03507. A gradient G (m, n) is projected onto
the span of its top-r singular vectors (recomputed every T steps), Adam runs on the r-dimensional
projection, and the update is projected back with a scale α::

    R = Pᵀ G  or  G Pᵀ,   N = Adam(R),   W ← W − η α · (P N  or  N P)

- :class:`~mini.galore.projector.GaLoreProjector` (:mod:`mini.galore.projector`): the SVD basis,
  projection types std / reverse_std / left / right / full, state as tensors.
- :class:`~mini.galore.adamw.GaLoreAdamW` (:mod:`mini.galore.adamw`): a drop-in for galore-torch's
  optimizer.
- :class:`~mini.galore.adamw8bit.GaLoreAdamW8bit` (:mod:`mini.galore.adamw8bit`): the same with
  8-bit blockwise moments.
- :func:`~mini.galore.groups.galore_param_groups` (:mod:`mini.galore.groups`): the Hugging Face
  Trainer convention.
- :func:`~mini.galore.layerwise.attach_layerwise_updates` (:mod:`mini.galore.layerwise`): per-layer
  weight updates from gradient hooks (single process).
- :func:`~mini.galore.accumulate.attach_accumulating_updates` (:mod:`mini.galore.accumulate`):
  per-layer updates that respect gradient accumulation, accumulating in the subspace.
- :class:`~mini.galore.adafactor.GaLoreAdafactor` (:mod:`mini.galore.adafactor`): galore-torch's
  Adafactor variant, bit for bit.
- :class:`~mini.galore.fsdp.FSDPGaLoreAdamW` (:mod:`mini.galore.fsdp`): GaLore on FSDP2's row
  shards, right-side projection, the subspace from all-reduced Gram matrices.
- :func:`~mini.galore.distributed.allreduce_gradients_` (:mod:`mini.galore.distributed`): data
  parallel GaLore that all-reduces the projected gradients between subspace updates.

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

from .accumulate import AccumulatingHandle, attach_accumulating_updates
from .adafactor import GaLoreAdafactor
from .adamw import GALORE_GROUP_DEFAULTS, GaLoreAdamW
from .adamw8bit import GaLoreAdamW8bit
from .distributed import CommStats, allreduce_gradients_
from .fsdp import FSDPGaLoreAdamW
from .groups import GaLoreConfig, galore_param_groups
from .layerwise import LayerwiseHandle, attach_layerwise_updates
from .projector import PROJ_TYPES, GaLoreProjector

__all__ = [
    "GaLoreProjector",
    "PROJ_TYPES",
    "GaLoreAdamW",
    "GALORE_GROUP_DEFAULTS",
    "GaLoreAdamW8bit",
    "GaLoreAdafactor",
    "attach_accumulating_updates",
    "AccumulatingHandle",
    "allreduce_gradients_",
    "CommStats",
    "FSDPGaLoreAdamW",
    "GaLoreConfig",
    "galore_param_groups",
    "attach_layerwise_updates",
    "LayerwiseHandle",
]
