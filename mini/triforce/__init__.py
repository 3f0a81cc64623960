"""TriForce: lossless acceleration of long-sequence generation by hierarchical speculative decoding.

Sun et al., "TriForce: Lossless Acceleration of Long Sequence Generation with Hierarchical
Speculative Decoding", arXiv 2404.11912; official code Infini-AI-Lab/TriForce. Part III,
TriForce chapter.

- :mod:`mini.triforce.sampling`: speculative sampling (accept with min(1, p/q), resample from the
  residual, bonus token), two- and three-level rounds over model-agnostic callables, their exact
  laws by enumeration, χ² and total-variation helpers, pass counters.
- :mod:`mini.triforce.kernel`: decode attention over a gathered subset of KV chunks (the
  retrieval cache), a Triton kernel beside its PyTorch reference.
- :mod:`mini.triforce.retrieval`: the retrieval KV cache (chunks of 8 scored by the last query
  against their mean key, chunk 0 kept, recent tokens in the tail) over :mod:`mini.lm.kvcache`.
- :mod:`mini.triforce.hierarchy`: the hierarchy over real models (draft with a StreamingLLM
  cache → target weights over the retrieval cache → full-cache target), its baselines, counters,
  exact first-token laws and Monte Carlo sampling from one prefilled prompt.
- :mod:`mini.triforce.traffic`: the memory-traffic model (bytes per forward pass at each level,
  Llama2-7B-128K sizes) turning pass counts into modelled speedups.

Explained in :doc:`/book/triforce/theory`.
"""
from __future__ import annotations

from .hierarchy import MODES, TriForce, TriForceConfig
from .kernel import CHUNK, chunk_attention, chunk_attention_reference
from .retrieval import (
    RetrievalCache,
    build_retrieval_cache,
    chunk_scores,
    select_chunks,
)
from .sampling import (
    ChiSquareResult,
    PassCounter,
    SamplingConfig,
    SpeculativeDecoder,
    VerifyResult,
    accept_or_resample,
    check_gamma,
    chi_square_test,
    expected_tokens_per_pass,
    process_logits,
    residual_distribution,
    total_variation,
    verify,
)
from .traffic import (
    LLAMA2_7B_128K,
    TrafficModel,
    TransformerSizes,
    modelled_speedup,
)

__all__ = [
    "CHUNK",
    "LLAMA2_7B_128K",
    "MODES",
    "ChiSquareResult",
    "PassCounter",
    "RetrievalCache",
    "SamplingConfig",
    "SpeculativeDecoder",
    "TrafficModel",
    "TransformerSizes",
    "TriForce",
    "TriForceConfig",
    "VerifyResult",
    "accept_or_resample",
    "build_retrieval_cache",
    "check_gamma",
    "chi_square_test",
    "chunk_attention",
    "chunk_attention_reference",
    "chunk_scores",
    "expected_tokens_per_pass",
    "modelled_speedup",
    "process_logits",
    "residual_distribution",
    "select_chunks",
    "total_variation",
    "verify",
]
