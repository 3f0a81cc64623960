"""Llama model configurations: the tiny CPU model and the GaLore paper's five sizes.

Used by Part II, GaLore chapter (``book/galore/``), and by every later LLM chapter.

The model is Hugging Face's ``LlamaForCausalLM`` (Touvron et al., 2023, arXiv 2302.13971): token
embedding, ``L`` decoder layers of RMSNorm → multi-head attention (``q, k, v, o`` projections,
rotary positions) → RMSNorm → SwiGLU MLP (``gate, up, down``), a final RMSNorm and an untied
output head. For a hidden size ``h``, intermediate size ``f``, vocabulary ``V`` and ``L`` layers
(no biases, ``k, v`` as wide as ``q``), the parameter count is

    N = 2·V·h  +  L·(4·h² + 3·h·f + 2·h)  +  h,

embedding and head, then per layer the attention and MLP matrices and two norm vectors, then the
final norm. :func:`parameter_shapes` writes this out per named tensor (with grouped-query
attention and biases when a config asks for them), and :func:`count_parameters` sums it; a test
checks it against an instantiated model.

``PAPER_CONFIGS`` are the LLaMA configurations of the GaLore paper (Zhao et al., ICML 2024,
arXiv 2403.03507), copied from the official repository's ``configs/llama_*.json``: vocabulary
32000 (the T5 tokenizer's, as in the paper's C4 runs), untied head, RMSNorm eps 1e-6. Their
``max_sequence_length`` field is kept as ``max_position_embeddings`` (the paper trains at 256).
The memory estimator (:mod:`mini.lm.memory`) reads them without instantiating a model.

The projected matrices of GaLore are the seven attention and MLP projections of each layer
(:data:`PROJECTED_MODULES`); embeddings, head and norms stay with plain Adam.

Explained in :doc:`/book/part2`.
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

__all__ = [
    "PAPER_CONFIGS",
    "PROJECTED_MODULES",
    "TINY_DEFAULTS",
    "tiny_llama_config",
    "paper_config",
    "resolve_config",
    "build_model",
    "parameter_shapes",
    "count_parameters",
    "linear_parameter_names",
    "is_projected_name",
]

#: Module names of the matrices GaLore projects, attention q, k, v, o and MLP gate, up, down.
PROJECTED_MODULES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)

#: The tiny model's defaults, the book's choice. About 0.8M parameters with a 64-symbol
#: vocabulary; a training step of batch 8 × 64 tokens takes tens of milliseconds on one CPU core.
TINY_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 352,  # ≈ 8/3 · 128 rounded to a multiple of 32, as in LLaMA's MLPs
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_cache": False,
}

_PAPER_COMMON: dict[str, Any] = {"vocab_size": 32000, "rms_norm_eps": 1e-6}

#: The GaLore paper's LLaMA sizes (official repository ``configs/llama_<name>.json``).
PAPER_CONFIGS: dict[str, dict[str, Any]] = {
    "llama_60m": {"hidden_size": 512, "intermediate_size": 1376, "num_attention_heads": 8,
                  "num_hidden_layers": 8, "max_position_embeddings": 1024, **_PAPER_COMMON},
    "llama_130m": {"hidden_size": 768, "intermediate_size": 2048, "num_attention_heads": 12,
                   "num_hidden_layers": 12, "max_position_embeddings": 1024, **_PAPER_COMMON},
    "llama_350m": {"hidden_size": 1024, "intermediate_size": 2736, "num_attention_heads": 16,
                   "num_hidden_layers": 24, "max_position_embeddings": 1024, **_PAPER_COMMON},
    "llama_1b": {"hidden_size": 2048, "intermediate_size": 5461, "num_attention_heads": 32,
                 "num_hidden_layers": 24, "max_position_embeddings": 1024, **_PAPER_COMMON},
    "llama_7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                 "num_hidden_layers": 32, "max_position_embeddings": 2048, **_PAPER_COMMON},
}


def tiny_llama_config(vocab_size: int = 64, **overrides: Any) -> LlamaConfig:
    """The tiny Llama of the book's labs (:data:`TINY_DEFAULTS`), with any field overridden.

    Pass ``vocab_size=tokenizer.vocab_size``; the head is untied from the embedding, as in the
    paper configs.

    Explained in :doc:`/book/part2`.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    fields = {**TINY_DEFAULTS, "vocab_size": int(vocab_size), **overrides}
    return LlamaConfig(**fields)


def paper_config(name: str) -> LlamaConfig:
    """The ``LlamaConfig`` of one of the GaLore paper's sizes (a key of :data:`PAPER_CONFIGS`).

    Explained in :doc:`/book/part2`.
    """
    if name not in PAPER_CONFIGS:
        raise ValueError(
            f"name must be one of {sorted(PAPER_CONFIGS)}, got {name!r}"
        )
    return LlamaConfig(**PAPER_CONFIGS[name], tie_word_embeddings=False, use_cache=False)


def resolve_config(config: str | LlamaConfig) -> LlamaConfig:
    """A ``LlamaConfig`` from itself or from a name of :data:`PAPER_CONFIGS`.

    Explained in :doc:`/book/part2`.
    """
    if isinstance(config, str):
        return paper_config(config)
    if isinstance(config, LlamaConfig):
        return config
    raise TypeError(
        f"config must be a LlamaConfig or a name in {sorted(PAPER_CONFIGS)}, "
        f"got {type(config).__name__}"
    )


def build_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM``, the same for the same ``seed`` on any machine.

    The global torch generator is left as it was (the initialisation runs in a forked RNG).

    Explained in :doc:`/book/part2`.
    """
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"config must be a LlamaConfig, got {type(config).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = LlamaForCausalLM(config)
    return model


def _head_dim(config: LlamaConfig) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else config.hidden_size // config.num_attention_heads


def parameter_shapes(config: str | LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Name → shape of every parameter of ``LlamaForCausalLM(config)``, without building it.

    Names are those of ``model.named_parameters()``; a tied head is listed once (as the
    embedding), as ``named_parameters`` does.

    Explained in :doc:`/book/part2`.
    """
    cfg = resolve_config(config)
    h, f, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd = _head_dim(cfg)
    n_q = cfg.num_attention_heads * hd
    n_kv = (cfg.num_key_value_heads or cfg.num_attention_heads) * hd
    attn_bias = bool(getattr(cfg, "attention_bias", False))
    mlp_bias = bool(getattr(cfg, "mlp_bias", False))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, (out_f, in_f), bias in (
            ("self_attn.q_proj", (n_q, h), attn_bias),
            ("self_attn.k_proj", (n_kv, h), attn_bias),
            ("self_attn.v_proj", (n_kv, h), attn_bias),
            ("self_attn.o_proj", (h, n_q), attn_bias),
            ("mlp.gate_proj", (f, h), mlp_bias),
            ("mlp.up_proj", (f, h), mlp_bias),
            ("mlp.down_proj", (h, f), mlp_bias),
        ):
            shapes[p + name + ".weight"] = (out_f, in_f)  # (out, in), as nn.Linear stores it
            if bias:
                shapes[p + name + ".bias"] = (out_f,)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, h)
    return shapes


def count_parameters(config_or_model: str | LlamaConfig | torch.nn.Module) -> int:
    """Number of parameters: analytic from a config (or paper name), counted from a model.

    Explained in :doc:`/book/part2`.
    """
    if isinstance(config_or_model, torch.nn.Module):
        return sum(p.numel() for p in config_or_model.parameters())
    return sum(math.prod(s) for s in parameter_shapes(config_or_model).values())


def is_projected_name(name: str) -> bool:
    """Whether a parameter name is the weight of an attention or MLP projection.

    Explained in :doc:`/book/part2`.
    """
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in PROJECTED_MODULES


def linear_parameter_names(model_or_config: torch.nn.Module | str | LlamaConfig) -> list[str]:
    """Names of the attention and MLP projection weights (the matrices GaLore projects).

    Works on a model (its ``named_parameters``) or on a config (its :func:`parameter_shapes`),
    in model order; use them to build the projected parameter group.

    Explained in :doc:`/book/part2`.
    """
    if isinstance(model_or_config, torch.nn.Module):
        names = [n for n, _ in model_or_config.named_parameters()]
    else:
        names = list(parameter_shapes(model_or_config))
    return [n for n in names if is_projected_name(n)]
