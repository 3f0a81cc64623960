"""A memory-traffic model of long-context decoding: bytes read per forward pass at each level.

At batch 1 a decode step is memory-bound: its time is close to the bytes it must read from GPU
memory divided by the bandwidth, and those bytes are the weights plus the KV cache it attends to:

    bytes(pass) = n_params · b  +  S · 2 · L · H_kv · d_h · b

(``b`` bytes per value, ``S`` cached tokens attended, ``L`` layers, ``H_kv`` KV heads, ``d_h`` head
dim; the factor 2 counts keys and values). At Llama2-7B-128K sizes in fp16 the weights are 13.5 GB
and each cached token 0.5 MiB, so a full-cache pass over a 120K-token prompt reads 77.9 GB (the
KV cache is 83% of it), a pass over a 4K-token retrieval cache 15.6 GB, and the 68M draft with a
256-slot StreamingLLM cache 0.14 GB (TriForce's 78/16/0.14 GB).

:func:`modelled_speedup` turns counts of forward passes into a modelled speedup over
autoregressive decoding of the same number of tokens (one full pass per token):

    speedup = tokens · B_full / (n_target · B_full + n_middle · B_retrieval + n_draft · B_draft)

The bandwidth cancels. This is a *model*, never a timing: it ignores compute, kernel launches,
the verification pass's extra tokens (γ + 1 queries instead of 1, still memory-bound) and
sampling overheads; the paper measured 2.31× on an A100 for Llama2-7B-128K.

Explained in :doc:`/book/triforce/theory`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "LLAMA2_7B_128K",
    "LLAMA_68M",
    "TrafficModel",
    "TransformerSizes",
    "modelled_speedup",
]


@dataclass(frozen=True)
class TransformerSizes:
    """The sizes of a Llama-style decoder that decide its memory traffic.

    Explained in :doc:`/book/triforce/theory`.
    """

    #: Decoder layers L.
    layers: int
    #: Model width d.
    hidden: int
    #: Query heads H.
    heads: int
    #: Key/value heads H_kv (GQA; = H for Llama2-7B).
    kv_heads: int
    #: Head dimension d_h.
    head_dim: int
    #: MLP width d_ff (SwiGLU has three matrices of this width).
    intermediate: int
    #: Vocabulary size V.
    vocab: int
    #: Whether the output head shares the embedding matrix.
    tied: bool = False

    def n_params(self) -> int:
        """Parameters: embedding (+ head unless tied), per layer q/k/v/o, SwiGLU MLP and 2 norms,
        and the final norm."""
        d, dh = self.hidden, self.head_dim
        attn = d * self.heads * dh * 2 + d * self.kv_heads * dh * 2  # q, o and k, v
        mlp = 3 * d * self.intermediate
        per_layer = attn + mlp + 2 * d
        emb = self.vocab * d * (1 if self.tied else 2)
        return emb + self.layers * per_layer + d

    def kv_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Keys and values of one token over all layers: 2 · L · H_kv · d_h · b."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_value

    def pass_bytes(self, cached_tokens: int, bytes_per_value: int = 2) -> int:
        """Bytes one decode pass reads: the weights plus the KV of ``cached_tokens`` tokens."""
        if isinstance(cached_tokens, bool) or not isinstance(cached_tokens, int) or cached_tokens < 0:
            raise ValueError(f"cached_tokens must be an int >= 0, got {cached_tokens!r}")
        if isinstance(bytes_per_value, bool) or not isinstance(bytes_per_value, int) or bytes_per_value < 1:
            raise ValueError(f"bytes_per_value must be an int >= 1, got {bytes_per_value!r}")
        return (self.n_params() * bytes_per_value
                + cached_tokens * self.kv_bytes_per_token(bytes_per_value))


#: The sizes of Llama2-7B, which Llama2-7B-128K and LWM-Text-Chat-128K share (6.74 B parameters).
LLAMA2_7B_128K = TransformerSizes(layers=32, hidden=4096, heads=32, kv_heads=32, head_dim=128,
                                  intermediate=11008, vocab=32000)
#: The sizes of TriForce's draft JackFram/llama-68m (2 layers, width 768, 12 heads; 68 M parameters).
LLAMA_68M = TransformerSizes(layers=2, hidden=768, heads=12, kv_heads=12, head_dim=64,
                             intermediate=3072, vocab=32000)


@dataclass(frozen=True)
class TrafficModel:
    """Bytes per forward pass of TriForce's three levels.

    Defaults: Llama2-7B-128K target over a 120K-token prompt (122,880 tokens, the paper's prompt
    length on the 128K model; 131,072 gives 82.2 GB per full pass), retrieval budget 4096, the
    68M draft with a 256-slot cache, fp16.

    Explained in :doc:`/book/triforce/theory`.
    """

    #: The sizes of the target model (the middle level uses its weights too).
    target: TransformerSizes = LLAMA2_7B_128K
    #: The sizes of the draft model.
    draft: TransformerSizes = LLAMA_68M
    #: Tokens in the target's full cache.
    context: int = 122_880
    #: Retrieval-cache tokens of the middle level.
    budget: int = 4096
    #: Draft cache tokens (StreamingLLM).
    draft_cache: int = 256
    #: Bytes per weight and per cached value, 2 for fp16.
    bytes_per_value: int = 2

    def target_full_bytes(self) -> int:
        """A target pass over the full cache."""
        return self.target.pass_bytes(self.context, self.bytes_per_value)

    def target_retrieval_bytes(self) -> int:
        """A middle pass: the target's weights over the retrieval cache."""
        return self.target.pass_bytes(self.budget, self.bytes_per_value)

    def draft_bytes(self) -> int:
        """A draft pass."""
        return self.draft.pass_bytes(self.draft_cache, self.bytes_per_value)

    def table(self) -> dict[str, float]:
        """GB (1e9 bytes) per pass at each level."""
        return {"target_full": self.target_full_bytes() / 1e9,
                "target_retrieval": self.target_retrieval_bytes() / 1e9,
                "draft": self.draft_bytes() / 1e9}


def _count(counts: Mapping[str, float], name: str) -> float:
    for key in (name, f"{name}_passes"):
        if key in counts:
            v = counts[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"counts[{key!r}] must be a number >= 0, got {v!r}")
            return float(v)
    return 0.0


def modelled_speedup(counts: Mapping[str, float], model: TrafficModel | None = None) -> float:
    """Modelled speedup over autoregressive decoding from pass counts (a model, not a timing).

    Args:
        counts: ``tokens`` (generated tokens, required) and the forward passes ``target``,
            ``middle``, ``draft`` (missing = 0); the ``*_passes`` keys of
            :meth:`mini.triforce.hierarchy.TriForce.summary` are accepted too.
        model: the :class:`TrafficModel` (default: Llama2-7B-128K sizes).

    Returns:
        ``tokens · B_full / (n_target · B_full + n_middle · B_retrieval + n_draft · B_draft)``.

    Explained in :doc:`/book/triforce/theory`.
    """
    model = model if model is not None else TrafficModel()
    if not isinstance(model, TrafficModel):
        raise TypeError(f"model must be a TrafficModel, got {type(model).__name__}")
    tokens = _count(counts, "tokens")
    if tokens <= 0:
        raise ValueError(f"counts must give tokens > 0 (generated tokens), got {counts.get('tokens')!r}")
    full = model.target_full_bytes()
    cost = (_count(counts, "target") * full + _count(counts, "middle") * model.target_retrieval_bytes()
            + _count(counts, "draft") * model.draft_bytes())
    if cost <= 0:
        raise ValueError("counts must hold at least one forward pass (target, middle or draft)")
    return tokens * full / cost
