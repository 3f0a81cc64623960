"""SpinQuant: learned rotations that make 4-bit weights, activations and KV cache work.

Liu et al., "SpinQuant: LLM quantization with learned rotations", arXiv 2405.16406 (ICLR 2025);
official code facebookresearch/SpinQuant. Part III, SpinQuant chapter.

- :mod:`mini.spinquant.hadamard`: Hadamard matrices of every order K·2^m that Sylvester doubling
  and the Paley constructions give, random Hadamard and random orthogonal initialisations.
- :mod:`mini.spinquant.fwht`: the fast Walsh-Hadamard transform (x·H along the last dimension),
  a Triton kernel beside its PyTorch reference.
- :mod:`mini.spinquant.quantizers`: the setting (:class:`~mini.spinquant.quantizers.QuantConfig`,
  "W4A4KV4"), fake quantisers with straight-through gradients, RTN and GPTQ.
- :mod:`mini.spinquant.quant_kernel`: fused per-token asymmetric quantise-dequantise (Triton).
- :mod:`mini.spinquant.rotation`: norm fusion and the rotations R1-R4 on transformers Llama-family
  models (computational invariance).
- :mod:`mini.spinquant.cayley`: :class:`~mini.spinquant.cayley.CayleySGD`, SGD on the orthogonal
  group by the Cayley transform.
- :mod:`mini.spinquant.model`: the quantised model assembled, rotations learned end to end.

Explained in :doc:`/book/spinquant/theory`.
"""
from __future__ import annotations

from .cayley import CayleySGD
from .hadamard import (
    hadamard,
    hadamard_base,
    random_hadamard,
    random_orthogonal,
    supported,
)
from .model import init_rotations, kl_and_ppl, learn_rotations, quantize_model
from .quantizers import QuantConfig, quantize_activation, quantize_kv, quantize_weight
from .rotation import apply_r3, apply_r4, apply_v_quantizer, fuse_norms, rotate

__all__ = [
    "CayleySGD",
    "QuantConfig",
    "apply_r3",
    "apply_r4",
    "apply_v_quantizer",
    "fuse_norms",
    "hadamard",
    "hadamard_base",
    "init_rotations",
    "kl_and_ppl",
    "learn_rotations",
    "quantize_activation",
    "quantize_kv",
    "quantize_model",
    "quantize_weight",
    "random_hadamard",
    "random_orthogonal",
    "rotate",
    "supported",
]
