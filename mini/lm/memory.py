"""Analytic training-memory estimator: weights, gradients, optimizer states and projectors.

Used by Part II, GaLore chapter (``book/galore/``), for its memory tables up to LLaMA-7B, and
SLTrain chapter (``book/sltrain/``).

Papers: Zhao et al., "GaLore" (ICML 2024, arXiv 2403.03507), Sec. 4 and Table 1; Zhang et al.,
"Q-GaLore" (arXiv 2407.08296). The estimator counts tensors from a ``LlamaConfig`` (or a name
of :data:`~mini.lm.config.PAPER_CONFIGS`) without building a model; units are **decimal GB
(10⁹ bytes)**. Activations, the KV cache, temporary buffers and allocator overheads are not
counted: this is the paper's "weights + optimizer states" view plus gradients.

Per tensor of shape m×n (out × in) with an effective rank ``r' = min(r, min(m, n))``:

- ``adam``: weights, gradients and two moments of N elements: ``N·w + N·g + 2·N·s`` bytes
  (``w = weight_bytes``, ``g = grad_bytes``, ``s = state_bytes``; all 2 for BF16 by default,
  the paper's accounting: Adam states of the 60M model are 2 × 58.1M × 2 B = 0.232 GB).
- ``adam8bit``: moments of 1 byte per element plus one float32 absmax per block of 256
  (bitsandbytes' blockwise 8-bit optimizers); a tensor under ``min_8bit_size`` = 4096 elements
  keeps float32 moments, as bitsandbytes does. The two 256-entry quantization maps (2 KB per
  optimizer) are not counted.
- ``galore``: projected matrices (the attention and MLP projections) keep moments of the
  projected gradient, ``2·r'·max(m, n)`` elements, and a projector of ``r'·min(m, n)`` elements
  (``proj_bits``, 16 by default); so **GaLore state / Adam state = r'/min(m, n)** per matrix.
  Embeddings, head and norms use full Adam.
- ``galore8bit``: as ``galore`` with every moment in blockwise 8 bits (rules of ``adam8bit``,
  applied to the low-rank moment tensors).
- ``qgalore``: as ``galore8bit``, with the projected matrices' weights in INT8 and projectors in
  INT4 (packed two per byte), each with a scale and a zero point per group of ``group_size`` =
  256 elements (``group_param_bytes`` = 2 each, BF16). Other weights stay in ``weight_bytes``.
  The official Q-GaLore code stores an INT4 value per byte: its projectors take twice ours.
- ``lora``: the base model frozen in ``weight_bytes``; on every projected matrix trainable
  adapters ``B (m×r)``, ``A (r×n)`` with gradients and Adam moments; embeddings, head and norms
  trainable with full Adam (``lora_train_other``; the paper's pretraining baseline trains them).
- ``low_rank``: the factorized model of the paper's baseline: each projected matrix replaced by
  ``B A`` (``r·(m + n)`` trainable elements), everything trained with Adam.
- ``sltrain``: SLTrain (Han et al., NeurIPS 2024, arXiv 2406.02214; :mod:`mini.sltrain`): each
  projected matrix becomes ``(α/r)·B A + S`` with ``r'·(m + n) + ⌊δ·m·n⌋`` trainable elements
  (``density`` δ: :data:`SLTRAIN_DENSITIES` for a paper name, 0.03 otherwise), all with
  gradients and Adam moments; the support's positions cost ``index_bytes`` per non-zero (8: the
  official int64 buffer; 4: int32, enough below 2³¹ positions; 0: regenerated from a seed
  instead of stored), counted in the weights and reported as ``index_bytes``. The transient
  dense weight and weight gradient of one layer during its forward/backward are not counted
  (at most ``max m·n`` elements, smaller than the embedding's gradient in every paper config).
- ``sltrain8bit``: as ``sltrain`` with blockwise 8-bit moments (rules of ``adam8bit``, per
  tensor: A, B, the values and the dense tensors); with ``per_layer_updates=True`` this is the
  paper's "8-bit SLTrain with per-layer updates" (its 7B figure).
- ``per_layer_updates=True``: each weight is updated in its gradient hook and its gradient freed,
  so only one gradient is alive at a time: the gradient bytes become those of the largest
  trainable tensor (the paper's "layer-wise weight updates").

Checked against the digest's figures (``tests/test_lm.py``): LLaMA-60M has 58.1M parameters
(25.3M in the projected matrices); BF16 Adam states 0.232 GB, GaLore (r = 128) states 0.156 GB
plus 0.007 GB of projectors; LLaMA-1B 1339M parameters, Adam states 5.356 GB against GaLore
(r = 512) 1.733 GB + 0.352 GB. SLTrain's trainable counts (``tests/test_sltrain.py``; 60M
r = 128, 130M and 350M r = 256, 1B r = 512, δ = 0.03): 43.5M, 96.5M, 194.3M, 645.5M, against
42.8M, 94.0M, 185.2M, 609.3M for low-rank only. The papers' model-level figures (e.g. Table
1's 0.36G / 0.24G for 60M) are *not* reproduced exactly: they mix weights and states with unstated units and
embedding accounting; the book sets them side by side and explains the gap.

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

from transformers import LlamaConfig

from mini.lm.config import PAPER_CONFIGS, is_projected_name, parameter_shapes, resolve_config

__all__ = [
    "METHODS",
    "DEFAULT_RANKS",
    "SLTRAIN_DENSITIES",
    "GB",
    "TensorMemory",
    "MemoryReport",
    "tensor_breakdown",
    "estimate_memory",
    "memory_table",
    "format_memory_table",
]

#: Methods the estimator knows.
METHODS: tuple[str, ...] = ("adam", "adam8bit", "lora", "low_rank", "galore", "galore8bit", "qgalore",
                            "sltrain", "sltrain8bit")
_RANKED = {"lora", "low_rank", "galore", "galore8bit", "qgalore", "sltrain", "sltrain8bit"}
_GALORE = {"galore", "galore8bit", "qgalore"}
_SLTRAIN = {"sltrain", "sltrain8bit"}
_EIGHT_BIT_STATES = {"adam8bit", "galore8bit", "qgalore", "sltrain8bit"}

#: The GaLore paper's ranks per model size (Table 2; the 1B scripts use 1024).
DEFAULT_RANKS: dict[str, int] = {
    "llama_60m": 128, "llama_130m": 256, "llama_350m": 256, "llama_1b": 512, "llama_7b": 1024,
}

#: The SLTrain paper's support densities δ per model size (its scripts; 0.03 for any other config).
SLTRAIN_DENSITIES: dict[str, float] = {
    "llama_60m": 0.03, "llama_130m": 0.03, "llama_350m": 0.03, "llama_1b": 0.03, "llama_7b": 0.05,
}

GB = 1e9  #: decimal gigabyte, the unit of every GB figure here


@dataclass(frozen=True)
class TensorMemory:
    """Bytes one parameter tensor costs under a method.

    Explained in :doc:`/book/galore/theory`.
    """

    name: str  #: the parameter's qualified name
    shape: tuple[int, ...]  #: the parameter's shape
    projected: bool  #: an attention/MLP projection (low-rank treated by GaLore / LoRA)
    trainable: int  #: trainable elements this tensor contributes (adapters for LoRA)
    weights: float  #: bytes of the weight (and adapters, codes or support it carries)
    grads: float  #: bytes of its gradient
    states: float  #: bytes of its optimizer states
    projector: float  #: bytes of its GaLore projection matrix
    state_elements: int  #: optimizer-state elements (both moments)
    index: float = 0.0  #: bytes of a sparse support's positions (SLTrain), included in ``weights``


@dataclass(frozen=True)
class MemoryReport:
    """Memory of one method on one model, in bytes (``*_gb`` properties: decimal GB).

    Explained in :doc:`/book/galore/theory`.
    """

    config: str  #: paper name, or "custom"
    method: str  #: one of :data:`METHODS`
    rank: int | None  #: the rank r of a low-rank method (None for the others)
    n_params: int  #: parameters of the model
    n_projected: int  #: parameters in the attention and MLP projections
    n_trainable: int  #: trainable elements (differs from n_params for LoRA / low_rank)
    n_state: int  #: optimizer-state elements
    weight_bytes: float  #: weights (with adapters, quantization scales or sparse support)
    grad_bytes: float  #: gradients (the largest one alone with per-layer updates)
    state_bytes: float  #: optimizer states
    projector_bytes: float  #: GaLore projection matrices
    options: dict[str, Any] = field(default_factory=dict)  #: the byte sizes and switches used
    index_bytes: float = 0.0  #: SLTrain support positions; part of ``weight_bytes``

    @property
    def total_bytes(self) -> float:
        """Weights, gradients, optimizer states and projectors together."""
        return self.weight_bytes + self.grad_bytes + self.state_bytes + self.projector_bytes

    weights_gb = property(lambda self: self.weight_bytes / GB, doc="``weight_bytes`` in decimal GB.")
    grads_gb = property(lambda self: self.grad_bytes / GB, doc="``grad_bytes`` in decimal GB.")
    states_gb = property(lambda self: self.state_bytes / GB, doc="``state_bytes`` in decimal GB.")
    projectors_gb = property(lambda self: self.projector_bytes / GB, doc="``projector_bytes`` in decimal GB.")
    total_gb = property(lambda self: self.total_bytes / GB, doc="``total_bytes`` in decimal GB.")
    index_gb = property(lambda self: self.index_bytes / GB, doc="``index_bytes`` in decimal GB.")

    def as_row(self) -> dict[str, Any]:
        """A flat dict for a table: counts in millions, memory in decimal GB."""
        return {
            "config": self.config, "method": self.method, "rank": self.rank,
            "params_M": self.n_params / 1e6, "trainable_M": self.n_trainable / 1e6,
            "weights_GB": self.weights_gb, "grads_GB": self.grads_gb,
            "states_GB": self.states_gb, "projectors_GB": self.projectors_gb,
            "total_GB": self.total_gb, "index_GB": self.index_gb,
        }


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return int(v)


def _positive_number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not v > 0:
        raise ValueError(f"{name} must be a positive number, got {v!r}")
    return float(v)


def _eight_bit_bytes(n: int, block: int, absmax_bytes: float, min_8bit_size: int) -> float:
    """Bytes of one blockwise 8-bit state tensor of n elements (float32 when small)."""
    if n < min_8bit_size:
        return 4.0 * n
    return n + math.ceil(n / block) * absmax_bytes


def _quantized_bytes(n: int, bits: int, group: int, group_param_bytes: float) -> float:
    """Bytes of n values at ``bits`` (packed) with a scale and zero point per group."""
    return math.ceil(n * bits / 8) + math.ceil(n / group) * 2 * group_param_bytes


def tensor_breakdown(
    config: str | LlamaConfig,
    method: str,
    *,
    rank: int | None = None,
    weight_bytes: float = 2,
    grad_bytes: float | None = None,
    state_bytes: float = 2,
    proj_bits: int | None = None,
    weight_bits: int = 8,
    block_size: int = 256,
    absmax_bytes: float = 4,
    min_8bit_size: int = 4096,
    group_size: int = 256,
    group_param_bytes: float = 2,
    lora_train_other: bool = True,
    density: float | None = None,
    index_bytes: float = 8,
) -> list[TensorMemory]:
    """Per-tensor bytes of :func:`estimate_memory` (same arguments, without per-layer updates).

    Explained in :doc:`/book/galore/theory`.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    cfg = resolve_config(config)
    if method in _RANKED:
        if rank is None:
            if isinstance(config, str) and config in DEFAULT_RANKS:
                rank = DEFAULT_RANKS[config]
            else:
                raise ValueError(f"rank must be given for method {method!r} on a custom config")
        rank = _positive_int("rank", rank)
    weight_bytes = _positive_number("weight_bytes", weight_bytes)
    grad_bytes = weight_bytes if grad_bytes is None else _positive_number("grad_bytes", grad_bytes)
    state_bytes = _positive_number("state_bytes", state_bytes)
    if proj_bits is None:
        proj_bits = 4 if method == "qgalore" else 16
    proj_bits = _positive_int("proj_bits", proj_bits)
    if method == "qgalore" and proj_bits not in (4, 8, 16):
        raise ValueError(f"proj_bits must be 4, 8 or 16 for qgalore, got {proj_bits!r}")
    if weight_bits not in (4, 8):
        raise ValueError(f"weight_bits must be 4 or 8, got {weight_bits!r}")
    block_size = _positive_int("block_size", block_size)
    group_size = _positive_int("group_size", group_size)
    min_8bit_size = int(min_8bit_size)
    if method in _SLTRAIN:
        density = _sltrain_density(config, density)
        if isinstance(index_bytes, bool) or not isinstance(index_bytes, numbers.Real) or index_bytes < 0:
            raise ValueError(f"index_bytes must be a non-negative number (8: int64, 4: int32, 0: "
                             f"regenerated from a seed), got {index_bytes!r}")

    def moments(n: int) -> float:  # bytes of the two Adam moments of n elements
        if method in _EIGHT_BIT_STATES:
            return 2 * _eight_bit_bytes(n, block_size, absmax_bytes, min_8bit_size)
        return 2 * n * state_bytes

    out = []
    for name, shape in parameter_shapes(cfg).items():
        n = math.prod(shape)
        projected = len(shape) == 2 and is_projected_name(name)
        if projected and method in _RANKED:
            m, k = shape
            r = min(rank, m, k)
            if method in _SLTRAIN:  # (α/r) B A + S: A (r×k), B (m×r), values (nnz)
                nnz = int(density * m * k)
                train = r * (m + k) + nnz
                idx = nnz * float(index_bytes)
                st = moments(r * k) + moments(m * r) + moments(nnz)
                out.append(TensorMemory(name, shape, True, train, train * weight_bytes + idx,
                                        train * grad_bytes, st, 0.0, 2 * train, idx))
                continue
            if method in _GALORE:
                low = r * max(m, k)  # moments of the projected gradient
                proj = r * min(m, k)
                if method == "qgalore":
                    w = _quantized_bytes(n, weight_bits, group_size, group_param_bytes)
                    p = (_quantized_bytes(proj, proj_bits, group_size, group_param_bytes)
                         if proj_bits < 16 else proj * proj_bits / 8)
                else:
                    w, p = n * weight_bytes, proj * proj_bits / 8
                out.append(TensorMemory(name, shape, True, n, w, n * grad_bytes, moments(low), p, 2 * low))
            else:  # lora / low_rank: adapters B (m×r), A (r×n) trained
                adapters = rank * (m + k)
                w = (n + adapters) * weight_bytes if method == "lora" else adapters * weight_bytes
                out.append(TensorMemory(name, shape, True, adapters, w, adapters * grad_bytes,
                                        moments(adapters), 0.0, 2 * adapters))
            continue
        trainable = not (method == "lora" and not lora_train_other)
        if trainable:
            out.append(TensorMemory(name, shape, projected, n, n * weight_bytes, n * grad_bytes,
                                    moments(n), 0.0, 2 * n))
        else:
            out.append(TensorMemory(name, shape, projected, 0, n * weight_bytes, 0.0, 0.0, 0.0, 0))
    return out


def _sltrain_density(config: Any, density: Any) -> float:
    if density is None:
        return SLTRAIN_DENSITIES.get(config, 0.03) if isinstance(config, str) else 0.03
    if isinstance(density, bool) or not isinstance(density, numbers.Real) or not 0 < density <= 1:
        raise ValueError(f"density must be a number in (0, 1], got {density!r}")
    return float(density)


def estimate_memory(
    config: str | LlamaConfig,
    method: str,
    *,
    rank: int | None = None,
    weight_bytes: float = 2,
    grad_bytes: float | None = None,
    state_bytes: float = 2,
    proj_bits: int | None = None,
    weight_bits: int = 8,
    block_size: int = 256,
    absmax_bytes: float = 4,
    min_8bit_size: int = 4096,
    group_size: int = 256,
    group_param_bytes: float = 2,
    lora_train_other: bool = True,
    per_layer_updates: bool = False,
    density: float | None = None,
    index_bytes: float = 8,
) -> MemoryReport:
    """Bytes of weights, gradients, optimizer states and projectors of training ``config``.

    ``config``: a ``LlamaConfig`` or a name of ``PAPER_CONFIGS``; ``method``: one of
    :data:`METHODS`; ``rank``: for the low-rank methods (default: :data:`DEFAULT_RANKS` for a
    paper name); byte sizes per element of weights (2: BF16), gradients (as weights) and Adam
    moments (2); ``proj_bits``: projector precision (16, or 4 for ``qgalore``); the remaining
    options are described in the module docstring (``density`` and ``index_bytes``: SLTrain).

    Explained in :doc:`/book/galore/theory`.
    """
    tensors = tensor_breakdown(
        config, method, rank=rank, weight_bytes=weight_bytes, grad_bytes=grad_bytes,
        state_bytes=state_bytes, proj_bits=proj_bits, weight_bits=weight_bits,
        block_size=block_size, absmax_bytes=absmax_bytes, min_8bit_size=min_8bit_size,
        group_size=group_size, group_param_bytes=group_param_bytes,
        lora_train_other=lora_train_other, density=density, index_bytes=index_bytes,
    )
    if per_layer_updates:
        grads = max((t.grads for t in tensors), default=0.0)  # one gradient alive at a time
    else:
        grads = sum(t.grads for t in tensors)
    options: dict[str, Any] = {"per_layer_updates": per_layer_updates, "weight_bytes": weight_bytes,
                               "state_bytes": state_bytes, "proj_bits": proj_bits}
    if method in _SLTRAIN:
        options.update(density=_sltrain_density(config, density), index_bytes=index_bytes)
    used_rank = None
    if method in _RANKED:
        used_rank = rank if rank is not None else DEFAULT_RANKS[config]  # validated above
    return MemoryReport(
        config=config if isinstance(config, str) else "custom",
        method=method,
        rank=used_rank,
        n_params=sum(math.prod(t.shape) for t in tensors),
        n_projected=sum(math.prod(t.shape) for t in tensors if t.projected),
        n_trainable=sum(t.trainable for t in tensors),
        n_state=sum(t.state_elements for t in tensors),
        weight_bytes=sum(t.weights for t in tensors),
        grad_bytes=grads,
        state_bytes=sum(t.states for t in tensors),
        projector_bytes=sum(t.projector for t in tensors),
        options=options,
        index_bytes=sum(t.index for t in tensors),
    )


def memory_table(
    methods: tuple[str, ...] | list[str] = METHODS,
    configs: tuple[str, ...] | list[str] = tuple(PAPER_CONFIGS),
    ranks: dict[str, int] | None = None,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Rows of :meth:`MemoryReport.as_row` for every (config, method), config-major.

    ``ranks`` maps config names to ranks (default :data:`DEFAULT_RANKS`); ``kwargs`` go to
    :func:`estimate_memory` (e.g. ``per_layer_updates=True``).

    Explained in :doc:`/labs/galore/memory_tables`.
    """
    ranks = DEFAULT_RANKS if ranks is None else ranks
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods must be drawn from {list(METHODS)}, got {m!r}")
    rows = []
    for c in configs:
        if c not in PAPER_CONFIGS:
            raise ValueError(f"configs must be names in {sorted(PAPER_CONFIGS)}, got {c!r}")
        for m in methods:
            rank = ranks.get(c) if m in _RANKED else None
            rows.append(estimate_memory(c, m, rank=rank, **kwargs).as_row())
    return rows


def format_memory_table(rows: list[dict[str, Any]], digits: int = 3) -> str:
    """A Markdown table of :func:`memory_table` rows (GB to ``digits`` decimals).

    Explained in :doc:`/labs/galore/memory_tables`.
    """
    cols = ["config", "method", "rank", "params_M", "trainable_M", "weights_GB", "grads_GB",
            "states_GB", "projectors_GB", "total_GB"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            if c.endswith("_M"):
                cells.append(f"{v:.1f}")
            elif isinstance(v, float):
                cells.append(f"{v:.{digits}f}")
            else:
                cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
