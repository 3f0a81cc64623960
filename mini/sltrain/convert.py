"""Turning a model into an SLTrain model: every attention and MLP projection becomes a
:class:`~mini.sltrain.layer.SparseLowRankLinear`; embeddings, norms and the head stay dense.

Part II, SLTrain chapter (``book/sltrain/``). As the official ``SpLoRaModel`` (andyjm3/SLTrain,
``splora/splora_model.py``), which replaces every ``nn.Linear`` whose name contains ``attn`` or
``mlp``; here the layers are chosen by the same qualified-name patterns as the book's other
converters (:func:`mini.lm.lowrank.replace_linears`, default: the seven projections
``q, k, v, o, gate, up, down``), so an SLTrain model and the low-rank baseline
(:func:`mini.lm.lowrank.to_low_rank`) replace exactly the same matrices.

Pretraining starts from the new layers' own initialisation (B = 0, random A and S), not from the
replaced weights: the converter is for building a model to train from scratch, like the
official code. The supports and initial values are drawn from ``seed`` (torch's global generator
is forked, so the caller's random state is untouched), so converting a freshly built model with
the same seed gives the same supports: a checkpoint then loads without adopting anything.

Differences from the official code: the rank is capped per layer at ``min(in, out)`` as in
:func:`mini.lm.lowrank.to_low_rank`; the report counts the parameters before and after and the
support entries (int64 buffers, not parameters) separately.

Explained in :doc:`/book/sltrain/theory`.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mini.lm.lowrank import DEFAULT_PATTERNS, ConversionReport, replace_linears
from mini.sltrain.layer import SparseLowRankLinear, _check_density

__all__ = ["SLTrainRecipe", "PAPER_RECIPES", "SLTrainReport", "convert_to_sltrain", "sltrain_layers"]


@dataclass(frozen=True)
class SLTrainRecipe:
    """One of the paper's pretraining recipes (official ``scripts/llm_pretrain/sltrain*.sh``; C4,
    sequence length 256, BF16, cosine schedule).

    Explained in :doc:`/book/sltrain/theory`.
    """

    rank: int  #: r of every projection
    density: float  #: δ, ``--sp_ratio``
    alpha: float  #: α, ``--lora_alpha`` (the product is scaled by α/r)
    steps: int  #: ``--num_training_steps``
    warmup_steps: int  #: ``--warmup_steps``
    lr: float = 0.003  #: ``--lr``
    optimizer: str = "adamw"  #: ``--optimizer`` (``adam8bit`` at 7B)
    weight_decay: float = 0.0  #: ``--weight_decay``
    grad_clip: float | None = None  #: ``--grad_clipping`` (1.0 at 7B)
    total_batch_size: int = 512  #: sequences per step


#: The paper's recipes per model size (keys as :data:`mini.lm.config.PAPER_CONFIGS`).
PAPER_RECIPES: dict[str, SLTrainRecipe] = {
    "llama_60m": SLTrainRecipe(rank=128, density=0.03, alpha=32.0, steps=11_000, warmup_steps=1_100),
    "llama_130m": SLTrainRecipe(rank=256, density=0.03, alpha=16.0, steps=22_000, warmup_steps=2_200),
    "llama_350m": SLTrainRecipe(rank=256, density=0.03, alpha=16.0, steps=65_000, warmup_steps=6_500),
    "llama_1b": SLTrainRecipe(rank=512, density=0.03, alpha=8.0, steps=140_000, warmup_steps=10_000),
    "llama_7b": SLTrainRecipe(rank=1024, density=0.05, alpha=8.0, steps=150_000, warmup_steps=15_000,
                              optimizer="adam8bit", grad_clip=1.0),
}


@dataclass
class SLTrainReport(ConversionReport):
    """:class:`~mini.lm.lowrank.ConversionReport` plus the SLTrain split of the new layers.

    Explained in :doc:`/book/sltrain/theory`.
    """

    index_entries: int = 0  #: support positions stored (int64 buffers; 8 bytes each as stored)
    low_rank_params: int = 0  #: parameters of the factors A and B of all converted layers
    sparse_params: int = 0  #: trained non-zeros of all S (equals index_entries)

    def __str__(self) -> str:
        return (f"{super().__str__()}; low-rank {self.low_rank_params:,} + sparse "
                f"{self.sparse_params:,} parameters in the new layers; {self.index_entries:,} index "
                f"entries ({8 * self.index_entries / 1e6:.2f} MB as int64)")


def sltrain_layers(model: nn.Module) -> list[tuple[str, SparseLowRankLinear]]:
    """The ``(qualified name, layer)`` pairs of every
    :class:`~mini.sltrain.layer.SparseLowRankLinear` in ``model``.

    Explained in :doc:`/book/sltrain/theory`.
    """
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLowRankLinear)]


def convert_to_sltrain(
    model: nn.Module,
    rank: int,
    density: float = 0.03,
    alpha: float = 32.0,
    patterns: str | Sequence[str] = DEFAULT_PATTERNS,
    seed: int = 0,
    backend: str = "auto",
) -> SLTrainReport:
    """Replace, in place, the matching ``nn.Linear`` layers of ``model`` by SLTrain layers.

    Explained in :doc:`/book/sltrain/theory`.

    Args:
        model: any module (a ``LlamaForCausalLM`` from :func:`mini.lm.config.build_model`).
        rank: r of every layer, capped at ``min(in, out)`` per layer.
        density: δ, the fraction of each weight in the sparse support (paper: 0.03; 0.05 at 7B).
        alpha: α; the low-rank product is scaled by α/r (paper: 32 at 60M, 16 at 130M and
            350M, 8 at 1B and 7B).
        patterns: regular expressions searched in qualified module names (default: the
            attention and MLP projections); matching no ``nn.Linear`` is an error.
        seed: seeds the draws of every new layer (initialisation and support), in model order.
        backend: the new layers' kernel backend (see :class:`~mini.sltrain.layer.SparseLowRankLinear`).

    Returns an :class:`SLTrainReport` (parameters before and after, support entries).
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    density = _check_density(density)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")

    def factory(name: str, lin: nn.Linear) -> nn.Module:
        r = min(int(rank), lin.in_features, lin.out_features)
        return SparseLowRankLinear(lin.in_features, lin.out_features, r, density=density, alpha=alpha,
                                   bias=lin.bias is not None, dtype=lin.weight.dtype, backend=backend)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        base = replace_linears(model, factory, patterns)
    new = [model.get_submodule(n) for n in base.replaced]
    return SLTrainReport(
        replaced=base.replaced, params_before=base.params_before, params_after=base.params_after,
        index_entries=sum(m.nnz for m in new),
        low_rank_params=sum(m.A.numel() + m.B.numel() for m in new),
        sparse_params=sum(m.values.numel() for m in new),
    )
