"""Q-GaLore: GaLore with an INT4 projection, INT8 weights updated by stochastic rounding, and
layer-adaptive (lazy) subspace updates.

Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
Gradients", arXiv 2407.08296 (2024); official code VITA-Group/Q-GaLore. Part II, Q-GaLore chapter
(:doc:`/book/qgalore/theory`; GaLore itself: :doc:`/book/galore/theory`).

- :mod:`mini.qgalore.projector`: :class:`~mini.qgalore.projector.AdaptiveProjector`, GaLore's
  projector with the lazy update rule (queue of ``|cos|``, or with ``cos_rule="signed"`` the
  official signed cosine, of successive leading singular vectors,
  the gap multiplied by γ when their mean reaches the threshold), ``n_svd``, and the basis stored
  INT4 group-wise.
- :mod:`mini.qgalore.int8_linear`: :class:`~mini.qgalore.int8_linear.Int8Linear`, a linear layer
  with INT8 group-wise weights whose dense weight gradient goes to a per-layer hook, and
  :func:`~mini.qgalore.int8_linear.sr_update`, the fused
  dequantize-add-requantize-with-stochastic-rounding Triton kernel (with its reference).
- :mod:`mini.qgalore.optimizer`: :class:`~mini.qgalore.optimizer.QGaLoreAdamW` (GaLoreAdamW with
  the adaptive INT4 projector), :class:`~mini.qgalore.optimizer.QGaLoreAdamW8bit` (the same with
  the paper's 8-bit moments) and :class:`~mini.qgalore.optimizer.Int8LayerwiseQGaLore` (per-layer
  Adam-in-subspace updates of INT8 weights from their gradient hooks, written back by stochastic
  rounding).
- The quantizer itself lives in :mod:`mini.quant.groupwise` (re-exported here).

Explained in :doc:`/book/qgalore/theory`.
"""
from __future__ import annotations

from mini.quant.groupwise import (
    GroupQuantized,
    dequantize_groupwise,
    pack_int4,
    quantize_groupwise,
    stochastic_round,
    unpack_int4,
)

from .int8_linear import Int8Linear, sr_update, sr_update_reference, update_bytes
from .optimizer import (
    QGALORE_GROUP_DEFAULTS,
    Int8LayerwiseQGaLore,
    QGaLoreAdamW,
    QGaLoreAdamW8bit,
)
from .projector import AdaptiveProjector

__all__ = [
    "AdaptiveProjector",
    "QGaLoreAdamW",
    "QGaLoreAdamW8bit",
    "Int8LayerwiseQGaLore",
    "QGALORE_GROUP_DEFAULTS",
    "Int8Linear",
    "sr_update",
    "sr_update_reference",
    "update_bytes",
    "GroupQuantized",
    "quantize_groupwise",
    "dequantize_groupwise",
    "pack_int4",
    "unpack_int4",
    "stochastic_round",
]
