"""Decoding with an explicit KV cache: our own forward over Llama / Qwen2 weights, and cache policies.

Used by Part III, LoCoCo (``book/lococo/``) and TriForce (``book/triforce/``). Both papers work on
the KV cache of long contexts: LoCoCo compresses it to a fixed number of slots, TriForce attends to a
retrieved subset of it. Transformers' own cache classes change between versions (Colab's differs
from our pin), so the cache here is a plain object of our own, and the forward pass that reads and
writes it is written out: token embedding, then per layer RMSNorm → attention (``q, k, v`` with
Qwen2's biases, rotary positions, grouped-query heads) → residual → RMSNorm → SwiGLU MLP → residual,
then the final RMSNorm and the output head. It *shares* the weights of a transformers
``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (the modules are looked up at every call, so LoRA
adapters that ``peft`` puts on ``q_proj`` etc. are used), and its logits equal transformers' to
1e-5 in float32 on a full cache (tested), so everything built on it is tested against the
ecosystem's model.

The contract (LoCoCo's and TriForce's code relies on it):

- :class:`LayerCache`, one layer's cache for all heads: ``keys``, ``values`` ``(B, H_kv, S, d_h)``,
  keys stored **after** RoPE (as both papers store them); ``positions`` ``(B, H_kv, S)`` long, the
  absolute position each slot's key was rotated with; ``last_scores`` ``(B, H_kv, S)``, the attention
  mass each slot received from the *last* forward call (column sums of the probabilities, summed
  over the query heads of the KV group and over the call's query tokens); ``acc_scores``, the same
  accumulated over every call since the slot was inserted (H2O's statistic). ``len(cache)`` is
  ``S``; :meth:`LayerCache.select` gathers slots per batch row and KV head (scores kept),
  :meth:`LayerCache.reindex` moves keys to new positions by rotating them by the difference (RoPE
  rotations compose), :meth:`LayerCache.truncate` drops trailing slots, :meth:`LayerCache.overwrite`
  writes new slots in place of chosen ones (TriForce's retrieval cache).
- :class:`KVCache`: ``layers`` (one :class:`LayerCache` per layer), ``seen`` (tokens consumed so
  far) and ``next_position`` (the position the next token is rotated with; equal to ``seen``
  unless a policy re-indexed positions), ``length`` (slots per layer and head).
  :meth:`KVCache.compress` applies a policy to every layer; :meth:`KVCache.rollback` removes the
  last ``n`` tokens (rejected speculative tokens); :meth:`KVCache.detach` cuts the graph.
- :class:`CachePolicy`: ``budget`` (``M`` slots per layer and KV head, ``None`` = unbounded) and
  ``compress(layer_idx, cache) -> LayerCache`` with exactly ``min(S, budget)`` slots; a policy
  with ``reindex = True`` renumbers positions, and :meth:`KVCache.compress` then continues at
  ``max(position) + 1``. Here: :class:`FullCache`, :class:`StreamingLLM` (sinks + recent window,
  Xiao et al. 2023), :class:`H2O` (accumulated attention, Zhang et al. 2023, optionally with a
  recent window), :class:`TopLatest` (top-``M`` by the last call's attention, LoCoCo's heavy
  hitters). LoCoCo's compressor (:mod:`mini.lococo`) implements the same protocol.
- :class:`ExplicitLM`: ``ExplicitLM.from_hf(model)``; ``forward(input_ids, cache=None, *,
  attend=None, return_attn=False, return_queries=False, append=True) -> LMOutput``. ``attend`` is
  ``None`` (all slots) or, per layer, a ``(B, H_kv, S_sel)`` long tensor of cached slots to attend
  to; the new tokens always attend to themselves causally. ``return_attn`` gives, per layer, the
  probabilities ``(B, H, T, S + T)`` over every cached slot (zero where not attended) then the new
  tokens. ``append=False`` leaves the cache untouched (scores included). ``prefill`` runs a prompt
  in chunks, compressing before each chunk when the cache holds more than ``budget + slack``
  slots; ``decode`` and ``generate_greedy`` are the decode helpers.

Batches are unpadded (every row has the same length); positions are shared by the rows.

Explained in :doc:`/book/lococo/theory`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "H2O",
    "CachePolicy",
    "ExplicitLM",
    "FullCache",
    "KVCache",
    "LMOutput",
    "LayerCache",
    "Rotary",
    "StreamingLLM",
    "TopLatest",
    "rotate_half",
]

_SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM")


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] → [-x2, x1]`` on the last dimension (transformers' RoPE convention).

    Explained in :doc:`/book/lococo/theory`.
    """
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Rotary:
    """Rotary position tables of one model: ``inv_freq`` (d_h/2,) and the cos/sin scaling.

    ``apply`` rotates vectors to absolute positions exactly as transformers does (float32 angles,
    cos/sin cast to the input's dtype); ``rotate`` turns vectors by a position *difference*
    (``R(p') = R(p' - p) R(p)``), which moves a post-RoPE key from ``p`` to ``p'``.

    Explained in :doc:`/book/lococo/theory`.
    """

    def __init__(self, inv_freq: Tensor, attention_scaling: float = 1.0) -> None:
        self.inv_freq = inv_freq.float()  # (d_h/2,)
        self.attention_scaling = float(attention_scaling)

    @classmethod
    def from_config(cls, config) -> Rotary:
        """Tables from a Llama/Qwen2 config: ``rope_theta`` and ``rope_scaling`` 'linear' (or none)."""
        params = dict(getattr(config, "rope_parameters", None) or {})
        theta = float(params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))
        scaling = getattr(config, "rope_scaling", None) or params
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        if rope_type == "linear":
            inv_freq = inv_freq / float(scaling["factor"])
        elif rope_type != "default":
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; allowed: "
                             "'default' (none) or 'linear'")
        return cls(inv_freq)

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin of shape ``positions.shape + (d_h,)``, scaled, in ``dtype``."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)  # (..., d_h/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., d_h)
        return ((emb.cos() * self.attention_scaling).to(dtype),
                (emb.sin() * self.attention_scaling).to(dtype))

    def apply(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` (..., d_h) to ``positions`` (broadcast to ``x.shape[:-1]``)."""
        cos, sin = self.cos_sin(positions, x.dtype)
        return x * cos + rotate_half(x) * sin

    def rotate(self, x: Tensor, delta: Tensor) -> Tensor:
        """Turn ``x`` (..., d_h) by ``delta`` positions (no scaling: a pure rotation)."""
        freqs = delta[..., None].float() * self.inv_freq.to(delta.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype)


def _gather_slots(x: Tensor, index: Tensor) -> Tensor:
    """``x`` (B, H_kv, S, ...) gathered at ``index`` (B, H_kv, S') along the slot axis."""
    idx = index.reshape(index.shape + (1,) * (x.dim() - 3)).expand(index.shape + x.shape[3:])
    return x.gather(2, idx)


@dataclass
class LayerCache:
    """One layer's KV cache, all batch rows and KV heads; see the module docstring for the fields.

    Explained in :doc:`/book/lococo/theory`.
    """

    #: Keys after RoPE, shape (B, H_kv, S, d_h).
    keys: Tensor
    #: Values, shape (B, H_kv, S, d_h).
    values: Tensor
    #: The absolute position each slot's key was rotated with, shape (B, H_kv, S), long.
    positions: Tensor
    #: Attention mass each slot received from the last forward call (column sums of the
    #: probabilities over the KV group's query heads and the call's queries), (B, H_kv, S) float32.
    last_scores: Tensor | None = None
    #: The same, accumulated over every call since the slot was inserted (H2O), (B, H_kv, S).
    acc_scores: Tensor | None = None
    #: The model's RoPE tables, needed by :meth:`reindex` (set by :class:`ExplicitLM`).
    rotary: Rotary | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.keys.shape[2]

    @classmethod
    def empty(cls, batch: int, num_kv_heads: int, head_dim: int, *, dtype: torch.dtype,
              device: torch.device | str = "cpu", rotary: Rotary | None = None) -> LayerCache:
        """A cache with no slots."""
        kv = torch.zeros(batch, num_kv_heads, 0, head_dim, dtype=dtype, device=device)
        z = torch.zeros(batch, num_kv_heads, 0, dtype=torch.float32, device=device)
        return cls(kv, kv.clone(), torch.zeros(batch, num_kv_heads, 0, dtype=torch.long,
                                               device=device), z, z.clone(), rotary)

    def select(self, index: Tensor) -> LayerCache:
        """Slots ``index`` (B, H_kv, S') of every row and KV head, scores and positions kept."""
        def g(t: Tensor | None) -> Tensor | None:
            return None if t is None else _gather_slots(t, index)
        return LayerCache(g(self.keys), g(self.values), g(self.positions), g(self.last_scores),
                          g(self.acc_scores), self.rotary)

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> LayerCache:
        """New slots at the end (scores of the new slots start at zero)."""
        def pad(t: Tensor | None) -> Tensor:
            old = t if t is not None else keys.new_zeros(self.positions.shape, dtype=torch.float32)
            return torch.cat([old, old.new_zeros(positions.shape)], dim=2)
        return LayerCache(torch.cat([self.keys, keys], 2), torch.cat([self.values, values], 2),
                          torch.cat([self.positions, positions], 2), pad(self.last_scores),
                          pad(self.acc_scores), self.rotary)

    def truncate(self, length: int) -> LayerCache:
        """The first ``length`` slots."""
        def t(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[:, :, :length]
        return LayerCache(t(self.keys), t(self.values), t(self.positions), t(self.last_scores),
                          t(self.acc_scores), self.rotary)

    def overwrite(self, slots: Tensor, keys: Tensor, values: Tensor,
                  positions: Tensor) -> LayerCache:
        """A copy with slots ``slots`` (B, H_kv, n) replaced by ``keys``/``values`` (B, H_kv, n, d_h)
        at ``positions`` (B, H_kv, n); their scores restart at zero."""
        idx = slots[..., None].expand(keys.shape)
        out_k = self.keys.scatter(2, idx, keys)
        out_v = self.values.scatter(2, idx, values)
        out_p = self.positions.scatter(2, slots, positions)
        zeros = torch.zeros(slots.shape, dtype=torch.float32, device=slots.device)
        ls = None if self.last_scores is None else self.last_scores.scatter(2, slots, zeros)
        acc = None if self.acc_scores is None else self.acc_scores.scatter(2, slots, zeros)
        return LayerCache(out_k, out_v, out_p, ls, acc, self.rotary)

    def reindex(self, new_positions: Tensor) -> LayerCache:
        """Keys moved to ``new_positions`` (B, H_kv, S) by rotating each by ``new - old``.

        Equal (to rounding) to recomputing the keys at the new positions, since RoPE rotations
        compose. Needs ``rotary`` (set by :class:`ExplicitLM`).
        """
        if self.rotary is None:
            raise ValueError("reindex needs LayerCache.rotary (the model's RoPE tables); got None")
        new_positions = new_positions.to(self.positions)
        if new_positions.shape != self.positions.shape:
            raise ValueError(f"new_positions has shape {tuple(new_positions.shape)}; expected "
                             f"{tuple(self.positions.shape)} (B, H_kv, S)")
        keys = self.rotary.rotate(self.keys, new_positions - self.positions)
        return replace(self, keys=keys, positions=new_positions)

    def detach(self) -> LayerCache:
        """The same cache cut from the autograd graph."""
        def d(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.detach()
        return LayerCache(d(self.keys), d(self.values), self.positions, d(self.last_scores),
                          d(self.acc_scores), self.rotary)


@dataclass
class KVCache:
    """The cache of every layer plus the token counters; see the module docstring.

    Explained in :doc:`/book/lococo/theory`.
    """

    #: One :class:`LayerCache` per decoder layer.
    layers: list[LayerCache]
    #: Number of tokens consumed so far.
    seen: int = 0
    #: The position the next token is rotated with (``seen`` unless positions were re-indexed).
    next_position: int = 0

    @property
    def length(self) -> int:
        """Slots per layer and KV head (0 for an empty cache)."""
        return len(self.layers[0]) if self.layers else 0

    def compress(self, policy: CachePolicy) -> KVCache:
        """Apply ``policy`` to every layer (in place; returns ``self``)."""
        self.layers = [policy.compress(i, layer) for i, layer in enumerate(self.layers)]
        if getattr(policy, "reindex", False):
            self.next_position = 1 + max((int(layer.positions.max()) for layer in self.layers
                                          if len(layer) > 0), default=-1)
        return self

    def rollback(self, n: int) -> KVCache:
        """Remove the last ``n`` slots of every layer (in place), e.g. rejected draft tokens."""
        if not 0 <= n <= self.length:
            raise ValueError(f"rollback n={n} must be in [0, length={self.length}]")
        self.layers = [layer.truncate(len(layer) - n) for layer in self.layers]
        self.seen -= n
        self.next_position -= n
        return self

    def detach(self) -> KVCache:
        """A copy cut from the autograd graph (LoCoCo's one-step truncation)."""
        return KVCache([layer.detach() for layer in self.layers], self.seen, self.next_position)

    def clone(self) -> KVCache:
        """A shallow copy: new lists, same tensors (every operation here is out of place)."""
        return KVCache(list(self.layers), self.seen, self.next_position)


@dataclass
class LMOutput:
    """The result of :meth:`ExplicitLM.forward`.

    Explained in :doc:`/book/lococo/theory`.
    """

    #: Next-token logits (B, T, V), float32.
    logits: Tensor
    #: The cache after the call (the input cache when ``append=False``).
    cache: KVCache
    #: With ``return_attn``, per layer the probabilities (B, H, T, S + T), float32.
    attentions: list[Tensor] | None = None
    #: With ``return_queries``, per layer the queries after RoPE (B, H, T, d_h).
    queries: list[Tensor] | None = None


@runtime_checkable
class CachePolicy(Protocol):
    """A fixed budget of ``budget`` slots per layer and KV head (``None``: unbounded).

    ``compress`` returns exactly ``min(len(cache), budget)`` slots.

    Explained in :doc:`/book/lococo/theory`.
    """

    budget: int | None

    def compress(self, layer_idx: int, cache: LayerCache) -> LayerCache: ...


def _check_budget(budget: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget={budget!r} must be an int >= 1 (slots per layer and KV head)")
    return budget


def _sorted_select(cache: LayerCache, index: Tensor) -> LayerCache:
    """Select ``index`` (B, H_kv, M) in slot order (the cache keeps its order)."""
    return cache.select(index.sort(dim=-1).values)


class FullCache:
    """Keep everything (the ceiling).

    Explained in :doc:`/book/lococo/theory`.
    """

    budget: int | None = None
    reindex: bool = False

    def compress(self, layer_idx: int, cache: LayerCache) -> LayerCache:
        return cache


class StreamingLLM:
    """The ``sinks`` earliest positions plus the most recent ``budget - sinks`` (Xiao et al., 2023).

    ``reindex=True`` renumbers the kept slots 0..M-1 (keys rotated to match), as TriForce's draft
    does, so positions never exceed the budget.

    Explained in :doc:`/book/lococo/theory`.
    """

    def __init__(self, budget: int, sinks: int = 4, *, reindex: bool = False) -> None:
        _check_budget(budget)
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks={sinks!r} must be an int >= 0")
        if budget < sinks:
            raise ValueError(f"budget={budget} is below sinks={sinks}: the budget must hold the "
                             "sink tokens (budget >= sinks)")
        self.budget, self.sinks, self.reindex = budget, sinks, reindex

    def compress(self, layer_idx: int, cache: LayerCache) -> LayerCache:
        s = len(cache)
        if s > self.budget:
            order = cache.positions.argsort(dim=-1)  # (B, H_kv, S) slots by position
            recent = self.budget - self.sinks
            keep = torch.cat([order[..., :self.sinks], order[..., s - recent:]], dim=-1)
            cache = _sorted_select(cache, keep)
        if self.reindex and len(cache) > 0:
            rank = cache.positions.argsort(dim=-1).argsort(dim=-1)  # (B, H_kv, M) 0..M-1
            cache = cache.reindex(rank)
        return cache


class H2O:
    """Heavy hitters by *accumulated* attention (Zhang et al., 2023), plus ``recent`` newest slots.

    Explained in :doc:`/book/lococo/theory`.
    """

    reindex = False

    def __init__(self, budget: int, recent: int = 0) -> None:
        _check_budget(budget)
        if isinstance(recent, bool) or not isinstance(recent, int) or not 0 <= recent <= budget:
            raise ValueError(f"recent={recent!r} must be an int in [0, budget={budget}]")
        self.budget, self.recent = budget, recent

    def compress(self, layer_idx: int, cache: LayerCache) -> LayerCache:
        s = len(cache)
        if s <= self.budget:
            return cache
        if cache.acc_scores is None:
            raise ValueError("H2O needs LayerCache.acc_scores; got None")
        scores = cache.acc_scores.clone()  # (B, H_kv, S)
        if self.recent:
            newest = cache.positions.argsort(dim=-1)[..., s - self.recent:]
            scores.scatter_(-1, newest, math.inf)
        return _sorted_select(cache, scores.topk(self.budget, dim=-1).indices)


class TopLatest:
    """Top-``budget`` slots by the last call's attention (LoCoCo's heavy hitters, not accumulated).

    Explained in :doc:`/book/lococo/theory`.
    """

    reindex = False

    def __init__(self, budget: int) -> None:
        self.budget = _check_budget(budget)

    def compress(self, layer_idx: int, cache: LayerCache) -> LayerCache:
        if len(cache) <= self.budget:
            return cache
        if cache.last_scores is None:
            raise ValueError("TopLatest needs LayerCache.last_scores; got None")
        return _sorted_select(cache, cache.last_scores.topk(self.budget, dim=-1).indices)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as transformers computes it (float32 statistics)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _check_ids(input_ids: Tensor) -> None:
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        desc = (f"shape {tuple(input_ids.shape)}, dtype {input_ids.dtype}"
                if isinstance(input_ids, Tensor) else type(input_ids).__name__)
        raise ValueError(f"input_ids must be a 2-D (batch, tokens) torch.long tensor; got {desc}")


class ExplicitLM(nn.Module):
    """Our forward pass over a transformers Llama / Qwen2 causal LM, with an explicit KV cache.

    Shares the weights (``self.hf`` is the wrapped model). See the module docstring for the
    contract.

    Explained in :doc:`/book/lococo/theory`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        cfg = model.config
        if getattr(cfg, "use_sliding_window", False):
            raise ValueError("use_sliding_window=True is not supported (full attention only)")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={cfg.hidden_act!r} is not supported; allowed: 'silu'")
        self.hf = model
        self.config = cfg
        self.num_heads: int = cfg.num_attention_heads
        self.num_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.groups = self.num_heads // self.num_kv_heads
        self.eps = float(cfg.rms_norm_eps)
        self.rotary = Rotary.from_config(cfg)

    @classmethod
    def from_hf(cls, model: nn.Module) -> ExplicitLM:
        """Wrap a ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` (or a peft model around one)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        names = {c.__name__ for c in type(base).__mro__}
        if not names & set(_SUPPORTED):
            raise TypeError(f"model of class {type(base).__name__} is not supported; allowed: "
                            f"{', '.join(_SUPPORTED)}")
        return cls(base)

    @property
    def num_layers(self) -> int:
        return len(self.hf.model.layers)

    def new_cache(self, batch: int) -> KVCache:
        """An empty cache for ``batch`` rows, on the model's device and dtype."""
        w = self.hf.model.embed_tokens.weight
        return KVCache([LayerCache.empty(batch, self.num_kv_heads, self.head_dim, dtype=w.dtype,
                                         device=w.device, rotary=self.rotary)
                        for _ in range(self.num_layers)])

    def _attention(self, layer_idx: int, attn: nn.Module, x: Tensor, cache: LayerCache,
                   positions: Tensor, attend: Tensor | None, need_probs: bool
                   ) -> tuple[Tensor, LayerCache, Tensor, Tensor]:
        """One attention block; returns output (B, T, D), the updated cache, the probabilities
        over all slots (B, H_kv, G, T, S + T) and the rotated queries (B, H, T, d_h)."""
        b, t, _ = x.shape
        hq, hk, d, g = self.num_heads, self.num_kv_heads, self.head_dim, self.groups
        q = attn.q_proj(x).view(b, t, hq, d).transpose(1, 2)  # (B, H, T, d)
        k = attn.k_proj(x).view(b, t, hk, d).transpose(1, 2)  # (B, H_kv, T, d)
        v = attn.v_proj(x).view(b, t, hk, d).transpose(1, 2)
        q = self.rotary.apply(q, positions[None, None])
        k = self.rotary.apply(k, positions[None, None])
        s = len(cache)
        if attend is None:
            ck, cv = cache.keys, cache.values  # (B, H_kv, S, d)
        else:
            attend = attend.to(device=x.device, dtype=torch.long)
            if attend.dim() != 3 or attend.shape[:2] != (b, hk):
                raise ValueError(f"attend[{layer_idx}] has shape {tuple(attend.shape)}; expected "
                                 f"({b}, {hk}, S_sel) slot indices")
            ck, cv = _gather_slots(cache.keys, attend), _gather_slots(cache.values, attend)
        keys = torch.cat([ck, k], dim=2)  # (B, H_kv, S_sel + T, d)
        values = torch.cat([cv, v], dim=2)
        qg = q.view(b, hk, g, t, d)  # query head h uses KV head h // G
        logits = torch.einsum("bkgtd,bksd->bkgts", qg, keys) * d ** -0.5  # (B, H_kv, G, T, S_sel+T)
        s_sel = ck.shape[2]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        mask = torch.cat([causal.new_ones(t, s_sel), causal], dim=1)  # (T, S_sel + T)
        logits = logits.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.einsum("bkgts,bksd->bkgtd", probs, values)  # (B, H_kv, G, T, d)
        out = out.reshape(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d)
        full = probs.float()
        if attend is not None and need_probs:
            full = probs.new_zeros(b, hk, g, t, s + t, dtype=torch.float32)
            idx = attend[:, :, None, None, :].expand(b, hk, g, t, s_sel)
            full[..., :s].scatter_add_(-1, idx, probs[..., :s_sel].float())
            full[..., s:] = probs[..., s_sel:].float()
        new_cache = cache.append(k, v, positions.expand(b, hk, t))
        return attn.o_proj(out), new_cache, full, q

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, *,
                attend: list[Tensor] | None = None, return_attn: bool = False,
                return_queries: bool = False, append: bool = True) -> LMOutput:
        """Run ``input_ids`` (B, T) after the cached tokens; returns logits (B, T, V) and the cache.

        The new tokens get positions ``cache.next_position + 0..T-1``. With ``append`` the new
        keys/values are stored and every slot's ``last_scores``/``acc_scores`` updated; without,
        the returned cache is the input one.
        """
        _check_ids(input_ids)
        b, t = input_ids.shape
        if cache is None:
            cache = self.new_cache(b)
        if attend is not None and len(attend) != self.num_layers:
            raise ValueError(f"attend has {len(attend)} entries; expected one per layer "
                             f"({self.num_layers})")
        need_probs = append or return_attn
        positions = torch.arange(t, device=input_ids.device) + cache.next_position  # (T,)
        hf = self.hf.model
        h = hf.embed_tokens(input_ids)  # (B, T, D)
        layers_out, attns, queries = [], [], []
        for i, layer in enumerate(hf.layers):
            lc = cache.layers[i]
            a, new_lc, probs, q = self._attention(
                i, layer.self_attn, _rms_norm(h, layer.input_layernorm.weight, self.eps), lc,
                positions, None if attend is None else attend[i], need_probs)
            h = h + a
            m = layer.mlp
            x = _rms_norm(h, layer.post_attention_layernorm.weight, self.eps)
            h = h + m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x))
            if append:
                col = probs.sum(dim=(2, 3))  # (B, H_kv, S + T)
                acc = new_lc.acc_scores
                new_lc = replace(new_lc, last_scores=col, acc_scores=col if acc is None else acc + col)
                layers_out.append(new_lc)
            if return_attn:
                attns.append(probs.reshape(b, self.num_heads, t, -1))
            if return_queries:
                queries.append(q)
        logits = self.hf.lm_head(_rms_norm(h, hf.norm.weight, self.eps)).float()
        if append:
            cache = KVCache(layers_out, cache.seen + t, cache.next_position + t)
        return LMOutput(logits, cache, attns if return_attn else None,
                        queries if return_queries else None)

    def prefill(self, input_ids: Tensor, cache: KVCache | None = None, *, chunk_size: int,
                policy: CachePolicy | None = None, compress_slack: int = 0
                ) -> tuple[Tensor, KVCache]:
        """Read a prompt (B, T) in chunks of ``chunk_size``; before each chunk, if a policy is
        given and the cache holds more than ``budget + compress_slack`` slots, compress it to the
        budget (LoCoCo: slack 16). Returns the logits (B, T, V) and the cache (not compressed
        after the last chunk)."""
        _check_ids(input_ids)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1")
        if compress_slack < 0:
            raise ValueError(f"compress_slack={compress_slack!r} must be >= 0")
        out = []
        for start in range(0, input_ids.shape[1], chunk_size):
            cache = self.maybe_compress(cache, policy, compress_slack)
            res = self.forward(input_ids[:, start:start + chunk_size], cache)
            out.append(res.logits)
            cache = res.cache
        if cache is None:
            cache = self.new_cache(input_ids.shape[0])
        logits = torch.cat(out, dim=1) if out else input_ids.new_zeros(
            input_ids.shape[0], 0, self.config.vocab_size, dtype=torch.float32)
        return logits, cache

    @staticmethod
    def maybe_compress(cache: KVCache | None, policy: CachePolicy | None,
                       slack: int = 0) -> KVCache | None:
        """Compress ``cache`` by ``policy`` when it holds more than ``budget + slack`` slots."""
        if cache is None or policy is None or policy.budget is None:
            return cache
        if cache.length > policy.budget + slack:
            cache = cache.clone().compress(policy)
        return cache

    def decode(self, token_ids: Tensor, cache: KVCache, *, attend: list[Tensor] | None = None,
               append: bool = True) -> tuple[Tensor, KVCache]:
        """Run one or several new tokens (B, k) after the cache; logits (B, k, V) and the cache."""
        res = self.forward(token_ids, cache, attend=attend, append=append)
        return res.logits, res.cache

    @torch.no_grad()
    def generate_greedy(self, input_ids: Tensor, max_new_tokens: int, *, chunk_size: int,
                        policy: CachePolicy | None = None, compress_slack: int = 0
                        ) -> tuple[Tensor, KVCache]:
        """Greedy continuation (B, max_new_tokens) with the cache kept within the policy's budget
        (+ slack) before every step."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be >= 0")
        logits, cache = self.prefill(input_ids, chunk_size=chunk_size, policy=policy,
                                     compress_slack=compress_slack)
        tokens = []
        nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        for step in range(max_new_tokens):
            tokens.append(nxt)
            if step + 1 == max_new_tokens:
                break
            cache = self.maybe_compress(cache, policy, compress_slack)
            logits, cache = self.decode(nxt, cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        return (torch.cat(tokens, dim=1) if tokens else input_ids.new_zeros(input_ids.shape[0], 0),
                cache)
