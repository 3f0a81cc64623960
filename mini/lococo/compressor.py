"""LoCoCo's compressor: a fixed budget of M cache slots per layer and KV head, the tokens it cannot
keep replaced by learned convex mixtures.

Cai et al., "LoCoCo: Dropping In Convolutions for Long Context Compression", ICML 2024, arXiv
2406.05317 (official code VITA-Group/LoCoCo, ``llama/memory_compressor.py``). When a layer's cache
holds ``S > M`` slots (keys after RoPE, values, and the attention mass each slot received from
the previous chunk's queries, ``last_scores``), one compression step does, per batch row and KV
head:

1. keep the ``M − m`` slots with the largest score as they are (``m = ⌊M·(1 − hh_keep_rate)⌋``
   mixed slots, half the budget by default), in slot order;
2. take the other ``s′ = S − (M − m)`` slots, the evicted ones, in slot order; stack
   ``X = [K ; V]`` along features (``2·d_h`` channels, length ``s′``);
3. ``Z = ReLU(Conv1d(X))`` with ``m`` output channels (kernel 21, padding 10: the output is as
   long as the input), ``A = softmax(Z)`` over the ``s′`` positions: row ``i`` of ``A`` is a
   distribution over the evicted tokens;
4. ``R`` is the one-hot ``(m, s′)`` choice of the ``m`` evicted tokens with the largest score, in
   position order (row ``i`` picks the ``i``-th of them);
5. ``W = (1 − η)·R + η·A`` with a learnable ``η ∈ [0, 1]``: each row is convex (non-negative,
   sums to one), and ``η = 0`` is plain eviction;
6. ``K̃ = W·K``, ``Ṽ = W·V`` (:func:`mini.lococo.kernel.mix_kv`); the new cache is
   ``[kept ; mixed]``, exactly ``M`` slots.

With ``η = 0`` step 5 keeps the ``M − m`` best and then the ``m`` best of the rest, i.e. the top
``M`` slots by the latest scores: the policy is exactly :class:`mini.lm.kvcache.TopLatest` (up to
slot order, which attention does not see since keys carry their rotation).

Choices where the official code is silent or unsafe (the digest's pitfalls):

- ``η`` is kept in ``[0, 1]``: ``eta_mode="sigmoid"`` (default; ``η = σ(θ)``), ``"clamp"``
  (``η = clamp(θ, 0, 1)``, exact 0 and 1 reachable) or ``"fixed"`` (a buffer, not trained). The
  official ``normalizer`` is an unconstrained scalar, so ``W`` can leave the simplex.
- The convolution starts small: weights ``N(0, init_gain² / fan_in)``, bias 0, so ``A`` starts
  near uniform and its softmax is not saturated (the official ``N(0, 1)`` init gives logits of
  size ``√fan_in`` and one-hot rows with vanishing gradients).
- GQA: the compressor runs per KV head on the cache's ``last_scores``, already summed over the
  query heads of each KV group, so keys, values and scores share one partition (the official
  code takes per-query-head scores and breaks on grouped heads).
- One compressor per layer, shared across KV heads and batch rows (as the official code).
- Position of a mixed slot: the position of its largest weight (for ``η < ½`` that is the token
  ``R`` picks; at ``η = 0`` exactly the evicted token kept). Positions are bookkeeping only: keys
  are stored after RoPE, so attention never re-rotates them.
- Scores of a mixed slot: ``W·scores`` (convex), for ``last_scores`` and ``acc_scores`` alike;
  the next forward call overwrites ``last_scores`` anyway.
- The inputs are detached (one-step truncation): gradients reach the convolution and ``η`` only
  through the slots this step writes.

Ablations: ``mixing="uniform"`` (``A`` uniform over the evicted tokens: every mixed slot blends
the one-hot choice with the plain mean), an untrained compressor (a fresh
:class:`LoCoCo`), and ``eta_mode="fixed"`` (η held at ``eta_init``).

Explained in :doc:`/book/lococo/theory`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mini.kernels.dispatch import BACKENDS
from mini.lococo.kernel import mix_kv, mix_kv_reference

__all__ = [
    "ETA_MODES",
    "MIXINGS",
    "Compressed",
    "ConvCompressor",
    "LoCoCo",
    "LoCoCoConfig",
    "partition",
]

ETA_MODES: tuple[str, ...] = ("sigmoid", "clamp", "fixed")
MIXINGS: tuple[str, ...] = ("conv", "uniform")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class LoCoCoConfig:
    """The compressor's setting (defaults from the paper's code: rate 0.5, kernel 21, η = 0.5).

    ``mix_slots`` (m), ``keep_slots`` (M − m) and ``padding`` are derived. See the module
    docstring for ``eta_mode`` and ``mixing``.

    Explained in :doc:`/book/lococo/theory`.
    """

    budget: int  #: M, cache slots per layer and KV head after each compression
    head_dim: int  #: d_h of the model (the convolution reads 2·d_h channels)
    hh_keep_rate: float = 0.5  #: share of the budget kept as heavy hitters, in [0, 1)
    kernel_size: int = 21  #: odd width of the 1-D convolution over positions
    eta_init: float = 0.5  #: η at initialisation, in [0, 1] ((0, 1) for the sigmoid mode)
    eta_mode: str = "sigmoid"  #: how η stays in [0, 1], "sigmoid", "clamp" or "fixed" (not trained)
    mixing: str = "conv"  #: "conv" (the paper) or "uniform" (the ablation, A uniform over the evicted)
    init_gain: float = 0.1  #: standard deviation of the convolution weights times √fan_in
    n_kv_heads: int | None = None  #: if set, caches must have this many KV heads

    def __post_init__(self) -> None:
        if not _is_int(self.budget) or self.budget < 1:
            raise ValueError(f"budget must be a positive integer (cache slots per layer and KV head), got {self.budget!r}")
        if not _is_int(self.head_dim) or self.head_dim < 1:
            raise ValueError(f"head_dim must be a positive integer, got {self.head_dim!r}")
        rate = self.hh_keep_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"hh_keep_rate must be a number in [0, 1) (share of the budget kept as heavy "
                             f"hitters; 1 would leave no mixed slot), got {rate!r}")
        if self.mix_slots < 1:
            raise ValueError(f"budget={self.budget} with hh_keep_rate={rate} leaves m = ⌊M·(1 − rate)⌋ = "
                             f"{self.mix_slots} mixed slots; LoCoCo needs at least one: raise the budget to "
                             f"≥ {math.ceil(1.0 / (1.0 - rate) - 1e-9)} or lower hh_keep_rate")
        if not _is_int(self.kernel_size) or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer (the output keeps the input's "
                             f"length with padding kernel_size // 2), got {self.kernel_size!r}")
        if self.eta_mode not in ETA_MODES:
            raise ValueError(f"eta_mode must be one of {ETA_MODES}, got {self.eta_mode!r}")
        eta = self.eta_init
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta_init must be a number in [0, 1], got {eta!r}")
        if self.eta_mode == "sigmoid" and not 0.0 < eta < 1.0:
            raise ValueError(f"eta_init must be in (0, 1) with eta_mode='sigmoid' (σ never reaches 0 or 1), "
                             f"got {eta!r}; use eta_mode='clamp' or 'fixed' for exact 0 or 1")
        if self.mixing not in MIXINGS:
            raise ValueError(f"mixing must be one of {MIXINGS}, got {self.mixing!r}")
        g = self.init_gain
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ValueError(f"init_gain must be a finite number ≥ 0, got {g!r}")
        if self.n_kv_heads is not None and (not _is_int(self.n_kv_heads) or self.n_kv_heads < 1):
            raise ValueError(f"n_kv_heads must be a positive integer or None, got {self.n_kv_heads!r}")

    @property
    def mix_slots(self) -> int:
        """The number m of mixed slots, ``⌊M·(1 − hh_keep_rate)⌋`` (as the official ``int(...)``)."""
        return int(self.budget * (1.0 - self.hh_keep_rate) + 1e-9)

    @property
    def keep_slots(self) -> int:
        """M − m, the heavy hitters kept as they are."""
        return self.budget - self.mix_slots

    @property
    def padding(self) -> int:
        """``kernel_size // 2`` (10 for the default 21): the convolution keeps the length s′."""
        return self.kernel_size // 2


class Compressed(NamedTuple):
    """One compression step's result.

    Explained in :doc:`/book/lococo/theory`.
    """

    keys: Tensor  #: (B, H_kv, M, d_h), kept slots then mixed ones
    values: Tensor  #: (B, H_kv, M, d_h)
    positions: Tensor  #: (B, H_kv, M) long; a mixed slot takes its dominant token's position
    last_scores: Tensor  #: (B, H_kv, M); a mixed slot's is W·scores
    acc_scores: Tensor | None  #: (B, H_kv, M) or None, as the input
    weights: Tensor  #: W, (B, H_kv, m, s′) float32 (m = 0 when nothing was compressed)


def partition(scores: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """Slot indices ``(kept, evicted)``, each ascending: the ``keep`` largest ``scores`` and the rest.

    ``scores (B, H, S)`` → ``kept (B, H, keep)``, ``evicted (B, H, S − keep)``.

    Explained in :doc:`/book/lococo/theory`.
    """
    S = scores.shape[-1]
    if not 0 <= keep <= S:
        raise ValueError(f"keep must be in [0, {S}] (slots of the cache), got {keep}")
    mask = torch.zeros_like(scores, dtype=torch.int8)
    if keep:
        mask.scatter_(-1, torch.topk(scores, keep, dim=-1).indices, 1)
    order = torch.sort(mask, dim=-1, stable=True).indices  # evicted (0) first, each in slot order
    return order[..., S - keep:], order[..., :S - keep]


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    """``t (B, H, S, ...)`` at slot indices ``idx (B, H, S')`` → ``(B, H, S', ...)``."""
    if t.dim() == 3:
        return torch.gather(t, 2, idx)
    return torch.gather(t, 2, idx.unsqueeze(-1).expand(*idx.shape, t.shape[-1]))


class ConvCompressor(nn.Module):
    """One layer's compressor (shared across KV heads): the convolution and η.

    :meth:`forward` takes one layer's cache as tensors and returns exactly ``budget`` slots.
    ``generator`` draws the convolution's initial weights (the global RNG if None).

    Explained in :doc:`/book/lococo/theory`.
    """

    def __init__(self, config: LoCoCoConfig, backend: str = "auto", generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(config, LoCoCoConfig):
            raise TypeError(f"config must be a LoCoCoConfig, got {type(config).__name__}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config = config
        self.backend = backend  # for the mixing outside autograd (inference)
        c = config
        if c.mixing == "conv":
            self.conv: nn.Conv1d | None = nn.Conv1d(2 * c.head_dim, c.mix_slots, c.kernel_size, padding=c.padding)
            fan_in = 2 * c.head_dim * c.kernel_size
            with torch.no_grad():
                self.conv.weight.normal_(0.0, c.init_gain / math.sqrt(fan_in), generator=generator)
                self.conv.bias.zero_()
        else:
            self.conv = None
        if c.eta_mode == "sigmoid":
            self.eta_param = nn.Parameter(torch.tensor(math.log(c.eta_init / (1.0 - c.eta_init))))
        elif c.eta_mode == "clamp":
            self.eta_param = nn.Parameter(torch.tensor(float(c.eta_init)))
        else:
            self.register_buffer("eta_param", torch.tensor(float(c.eta_init)))

    @property
    def eta(self) -> Tensor:
        """η in ``[0, 1]`` (a 0-d tensor, differentiable unless ``eta_mode="fixed"``)."""
        mode = self.config.eta_mode
        if mode == "sigmoid":
            return torch.sigmoid(self.eta_param)
        if mode == "clamp":
            return self.eta_param.clamp(0.0, 1.0)
        return self.eta_param

    def attention_weights(self, keys: Tensor, values: Tensor) -> Tensor:
        """A = softmax(ReLU(Conv1d([K ; V]))) over positions.

        ``keys, values (B, H, s′, d)`` → ``(B, H, m, s′)``.
        """
        B, H, s, d = keys.shape
        m = self.config.mix_slots
        if self.conv is None:  # the uniform ablation
            return keys.new_full((B, H, m, s), 1.0 / s, dtype=torch.float32)
        x = torch.cat([keys, values], dim=-1)  # (B, H, s′, 2d)
        x = x.reshape(B * H, s, 2 * d).transpose(1, 2)  # (BH, 2d, s′)
        z = F.relu(self.conv(x.to(self.conv.weight.dtype)))  # (BH, m, s′)
        return torch.softmax(z.float(), dim=-1).reshape(B, H, m, s)

    def mixing_weights(self, keys: Tensor, values: Tensor, scores: Tensor) -> Tensor:
        """W = (1 − η)·R + η·A for the evicted slots.

        ``keys, values (B, H, s′, d)``, ``scores (B, H, s′)`` → ``(B, H, m, s′)``.
        """
        m = self.config.mix_slots
        s = keys.shape[2]
        if s < m:
            raise ValueError(f"the evicted slots ({s}) must be at least "
                             f"m = {m} (mixed slots)")
        pick = torch.topk(scores, m, dim=-1).indices.sort(dim=-1).values  # (B, H, m)
        R = scores.new_zeros(*scores.shape[:2], m, s, dtype=torch.float32)  # (B,H,m,s′)
        R.scatter_(-1, pick.unsqueeze(-1), 1.0)  # one-hot rows, in position order
        eta = self.eta.float()
        if not eta.requires_grad and float(eta) == 0.0:  # plain eviction: W = R exactly
            return R
        return (1.0 - eta) * R + eta * self.attention_weights(keys, values)

    def forward(self, keys: Tensor, values: Tensor, positions: Tensor, last_scores: Tensor,
                acc_scores: Tensor | None = None) -> Compressed:
        """Compress one layer's cache to exactly ``budget`` slots (unchanged if it has no more).

        Shapes: ``keys, values (B, H_kv, S, d_h)``, ``positions, last_scores, acc_scores
        (B, H_kv, S)``. The inputs are detached first (one-step truncation).

        Explained in :doc:`/book/lococo/theory`.
        """
        c = self.config
        self._check(keys, values, positions, last_scores, acc_scores)
        keys, values, last_scores = keys.detach(), values.detach(), last_scores.detach()
        acc_scores = None if acc_scores is None else acc_scores.detach()
        B, H, S, d = keys.shape
        if S <= c.budget:
            W = keys.new_zeros((B, H, 0, S), dtype=torch.float32)
            return Compressed(keys, values, positions, last_scores, acc_scores, W)
        kept, evicted = partition(last_scores, c.keep_slots)  # (B, H, M − m), (B, H, s′)
        ke, ve, se = _gather(keys, evicted), _gather(values, evicted), _gather(last_scores, evicted)
        W = self.mixing_weights(ke, ve, se.float())  # (B, H, m, s′) float32
        m, s = W.shape[2], W.shape[3]
        Wd = W.to(keys.dtype).reshape(B * H, m, s)
        flat = (Wd, ke.reshape(B * H, s, d), ve.reshape(B * H, s, d))
        if torch.is_grad_enabled() and Wd.requires_grad:
            mk, mv = mix_kv_reference(*flat)  # differentiable
        else:
            mk, mv = mix_kv(*(t.contiguous() for t in flat), backend=self.backend)
        mk, mv = mk.reshape(B, H, m, d), mv.reshape(B, H, m, d)
        pos_e = _gather(positions, evicted)  # (B, H, s′)
        mixed_pos = torch.gather(pos_e, 2, W.argmax(dim=-1))  # (B, H, m): the dominant token's
        mixed_last = torch.einsum("bhms,bhs->bhm", W.detach(), se.float()).to(last_scores.dtype)
        new_acc = None
        if acc_scores is not None:
            ae = _gather(acc_scores, evicted).float()
            mixed_acc = torch.einsum("bhms,bhs->bhm", W.detach(), ae).to(acc_scores.dtype)
            new_acc = torch.cat([_gather(acc_scores, kept), mixed_acc], dim=2)
        return Compressed(
            keys=torch.cat([_gather(keys, kept), mk], dim=2),
            values=torch.cat([_gather(values, kept), mv], dim=2),
            positions=torch.cat([_gather(positions, kept), mixed_pos], dim=2),
            last_scores=torch.cat([_gather(last_scores, kept), mixed_last], dim=2),
            acc_scores=new_acc,
            weights=W,
        )

    def _check(self, keys: Tensor, values: Tensor, positions: Tensor, last_scores: Tensor | None,
               acc_scores: Tensor | None) -> None:
        c = self.config
        if not isinstance(keys, Tensor) or keys.dim() != 4:
            raise ValueError(f"keys must be a (B, H_kv, S, d_h) tensor, got "
                             f"{tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__}")
        B, H, S, d = keys.shape
        if d != c.head_dim:
            raise ValueError(f"keys' head dimension must be head_dim={c.head_dim} (the config), got {d}")
        if c.n_kv_heads is not None and H != c.n_kv_heads:
            raise ValueError(f"keys must have n_kv_heads={c.n_kv_heads} KV heads (the config), got {H}")
        if not isinstance(values, Tensor) or values.shape != keys.shape:
            raise ValueError(f"values must have the keys' shape {tuple(keys.shape)}, got "
                             f"{tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__}")
        if last_scores is None:
            if S <= c.budget:
                return
            raise ValueError("last_scores is None: LoCoCo ranks slots by the attention of the previous "
                             "forward call; run a forward pass over the cache before compressing it")
        for name, t in (("positions", positions), ("last_scores", last_scores), ("acc_scores", acc_scores)):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (B, H, S)):
                raise ValueError(f"{name} must have shape {(B, H, S)} (B, H_kv, S), got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")


class LoCoCo(nn.Module):
    """LoCoCo as a cache policy (:class:`mini.lm.kvcache.CachePolicy`): one
    :class:`ConvCompressor` per layer; ``compress`` returns exactly ``budget`` slots.

    Args:
        config: the compressor setting (budget, head_dim, rate, η, mixing).
        n_layers: layers of the model (one compressor each).
        backend: kernel backend for the mixing outside autograd.
        seed: seeds the convolutions' initial weights (layer after layer from one generator),
            so a policy is reproducible whatever the global RNG; ``None`` uses the global RNG.

    Explained in :doc:`/book/lococo/theory`.
    """

    def __init__(self, config: LoCoCoConfig, n_layers: int, backend: str = "auto", seed: int | None = 0):
        super().__init__()
        if not _is_int(n_layers) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive integer, got {n_layers!r}")
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
        self.config = config
        self.budget = config.budget
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        self.compressors = nn.ModuleList(ConvCompressor(config, backend=backend, generator=gen)
                                         for _ in range(n_layers))
        self.last_weights: dict[int, Tensor] = {}
        self.record = False  # keep each layer's last W in ``last_weights`` (for figures)

    @classmethod
    def for_model(cls, model: Any, budget: int, **kwargs: Any) -> LoCoCo:
        """A policy sized for ``model`` (an ExplicitLM or a transformers model: its config's
        head dimension, KV heads and layers); ``backend`` and ``seed`` go to the constructor, the
        other ``kwargs`` to :class:`LoCoCoConfig`.

        Explained in :doc:`/book/lococo/theory`.
        """
        cfg = getattr(model, "config", None)
        if cfg is None:
            raise TypeError(f"model must have a .config (an ExplicitLM or a transformers model), got {type(model).__name__}")
        n_heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        backend = kwargs.pop("backend", "auto")
        seed = kwargs.pop("seed", 0)
        config = LoCoCoConfig(budget=budget, head_dim=head_dim, n_kv_heads=n_kv, **kwargs)
        return cls(config, cfg.num_hidden_layers, backend=backend, seed=seed)

    @property
    def etas(self) -> list[float]:
        """η of each layer."""
        return [float(c.eta.detach()) for c in self.compressors]

    def compress(self, layer_idx: int, cache: Any) -> Any:
        """The layer's cache (a ``LayerCache``) compressed to ``min(S, budget)`` slots.

        Explained in :doc:`/book/lococo/theory`.
        """
        if not _is_int(layer_idx) or not 0 <= layer_idx < len(self.compressors):
            raise ValueError(f"layer_idx must be in [0, {len(self.compressors)}), got {layer_idx!r}")
        if len(cache) <= self.budget:
            return cache
        out = self.compressors[layer_idx](cache.keys, cache.values, cache.positions, cache.last_scores,
                                          getattr(cache, "acc_scores", None))
        if self.record:
            self.last_weights[layer_idx] = out.weights.detach()
        return dataclasses.replace(cache, keys=out.keys, values=out.values, positions=out.positions,
                                   last_scores=out.last_scores, acc_scores=out.acc_scores)
