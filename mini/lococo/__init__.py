"""LoCoCo: a fixed-size KV cache whose evicted tokens are folded into learned convex mixtures.

Cai et al., "LoCoCo: Dropping In Convolutions for Long Context Compression", ICML 2024, arXiv
2406.05317 (official code VITA-Group/LoCoCo). Part III, LoCoCo chapter.

- :mod:`mini.lococo.compressor`: :class:`~mini.lococo.compressor.LoCoCoConfig`,
  :class:`~mini.lococo.compressor.ConvCompressor` (one layer: heavy hitters kept, the rest mixed by
  ``W = (1 − η)·R + η·softmax(ReLU(Conv1d([K; V])))``) and
  :class:`~mini.lococo.compressor.LoCoCo`, the cache policy (:class:`mini.lm.kvcache.CachePolicy`).
- :mod:`mini.lococo.kernel`: the fused mixing ``(W·K, W·V)`` (Triton) beside its PyTorch reference.
- :mod:`mini.lococo.train`: chunked training with one-step truncation, the LM frozen or with LoRA
  on q, k, v, o (peft); accuracy of a policy on a long-context task.

Explained in :doc:`/book/lococo/theory`.
"""
from __future__ import annotations

from .compressor import ConvCompressor, LoCoCo, LoCoCoConfig, partition
from .kernel import mix_kv, mix_kv_bytes, mix_kv_reference
from .train import (
    POLICY_NAMES,
    add_lora,
    chunked_loss,
    compare_policies,
    evaluate_policy,
    train_compressor,
)

__all__ = [
    "POLICY_NAMES",
    "ConvCompressor",
    "LoCoCo",
    "LoCoCoConfig",
    "add_lora",
    "chunked_loss",
    "compare_policies",
    "evaluate_policy",
    "mix_kv",
    "mix_kv_bytes",
    "mix_kv_reference",
    "partition",
    "train_compressor",
]
