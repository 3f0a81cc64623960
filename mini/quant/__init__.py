"""Quantization shared by the methods of Parts II-IV (GaLore chapter first, ``book/galore/``).

- :mod:`mini.quant.blockwise`: block-wise 8-bit quantization with the dynamic maps of 8-bit
  optimizers (Dettmers et al., ICLR 2022, arXiv 2110.02861), Triton kernels with a PyTorch
  reference; the storage of :class:`mini.galore.adamw8bit.GaLoreAdamW8bit`'s Adam moments.
- :mod:`mini.quant.adam8bit`: the fused 8-bit Adam update (dequantize, update the moments,
  requantize, write the update) as one Triton kernel beside its PyTorch reference.
- :mod:`mini.quant.groupwise`: group-wise asymmetric INT4 / INT8 quantization, INT4 packing and
  stochastic rounding (Q-GaLore, Zhang et al., arXiv 2407.08296).

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

from .blockwise import (
    MAX_KERNEL_BLOCK,
    code_midpoints,
    dequantize_blockwise,
    dequantize_blockwise_reference,
    dynamic_map,
    linear_map,
    n_blocks,
    nearest_code_index,
    quantize_blockwise,
    quantize_blockwise_reference,
)
from .adam8bit import adam8bit_update, adam8bit_update_reference

from .groupwise import (
    GroupQuantized,
    dequantize_groupwise,
    pack_int4,
    quantize_groupwise,
    stochastic_round,
    unpack_int4,
)

__all__ = [
    "dynamic_map",
    "linear_map",
    "code_midpoints",
    "nearest_code_index",
    "adam8bit_update",
    "adam8bit_update_reference",
    "n_blocks",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_blockwise_reference",
    "dequantize_blockwise_reference",
    "MAX_KERNEL_BLOCK",
    "quantize_groupwise",
    "dequantize_groupwise",
    "pack_int4",
    "unpack_int4",
    "stochastic_round",
    "GroupQuantized",
]
