"""Norm fusion and the rotations R1-R4 of SpinQuant, on transformers Llama-family models.

Paper: Liu et al., "SpinQuant: LLM quantization with learned rotations", arXiv 2405.16406
(ICLR 2025), Section 3 and Figure 1; official code facebookresearch/SpinQuant
(``utils/fuse_norm_utils.py``, ``eval_utils/rotation_utils.py``). Models: ``LlamaForCausalLM``,
``Qwen2ForCausalLM`` (q/k/v biases), ``MistralForCausalLM``, tied or untied embeddings, GQA or not.

Conventions: torch stores a linear's weight as ``W`` of shape (out, in) and computes
``y = x·Wᵀ + b`` for a row vector ``x``; ``h`` is the residual stream (row, width ``d``).

Computational invariance
------------------------
RMSNorm without its scale, ``n(h) = h / rms(h)``, commutes with any orthogonal ``R``:
``‖h·R‖ = ‖h‖`` so ``n(h·R) = n(h)·R``. Its scale ``g`` does not commute, so it is first fused
into the linears that read the norm (:func:`fuse_norms`): ``(n ⊙ g)·Wᵀ = n·(W·diag g)ᵀ``, i.e.
column ``j`` of ``W`` is multiplied by ``g_j`` and ``g ← 1``. Then with ``h' = h·R1`` everywhere
in the residual stream (:func:`rotate`):

* embedding ``E ← E·R1`` (the stream starts rotated);
* readers of the stream (q, k, v, gate, up, lm_head): ``W ← W·R1``, since
  ``n(h·R1)·(W·R1)ᵀ = n(h)·R1·R1ᵀ·Wᵀ = n(h)·Wᵀ``; their biases are unchanged;
* writers to the stream (o_proj, down_proj): ``W ← R1ᵀ·W`` and ``b ← b·R1``, so that
  ``x·(R1ᵀW)ᵀ + b·R1 = (x·Wᵀ + b)·R1``.

R2 (one ``d_h × d_h`` matrix per layer) rotates the value → output path of each head: every head
block ``v_j`` (rows ``j·d_h … (j+1)·d_h`` of v_proj) becomes ``v_j·R2`` (``W_j ← R2ᵀ·W_j``,
``b_j ← b_j·R2``); attention mixes tokens, not features, so each head's output is rotated too,
and each head block of o_proj's columns becomes ``W_i ← W_i·R2``. Under GQA (v has ``n_kv``
blocks, o has ``n_h``), head ``i`` reads kv block ``i // (n_h/n_kv)``: one R2 shared by all heads
of a layer keeps this exact.

R3 (online Hadamard ``H`` over the head dimension) multiplies q and k after RoPE:
``(q·H)(k·H)ᵀ = q·kᵀ``, so attention is unchanged while the keys that a KV cache stores (and
quantises) are spread evenly over their channels. R3 needs a hook between RoPE and attention:
:func:`apply_r3` registers an attention function in transformers' attention registry
(``AttentionInterface``, or the ``ALL_ATTENTION_FUNCTIONS`` dict it replaced) that receives q and
k after RoPE, applies the module's :class:`QKHadamard` and calls the stock eager/sdpa function.
No transformers source is edited. Lowest transformers version: 4.48 (the first where Llama,
Qwen2 and Mistral call their attention through that registry).

R4 (online Hadamard over the MLP width before down_proj): ``x ← x·H`` online and ``W ← W·H``
offline, ``(x·H)(W·H)ᵀ = x·Wᵀ`` (:func:`apply_r4`, :class:`HadamardInputLinear`).

Each online op takes an optional ``quantizer`` callable (identity by default) applied right
after its Hadamard: down_proj's input after R4, K after RoPE and R3; and :func:`apply_v_quantizer`
quantises V per head at v_proj's output. The quantised model is built by passing fake quantisers.

Differences from the official code: no embedding mean-centring (the official ``fuse_layer_norms``
subtracts each embedding row's mean, a LayerNorm leftover that changes a Llama's function,
official issue #14; ``tests/test_spinquant_rotation.py`` shows it changes the logits); rotations
are folded in float64 and cast back to each weight's dtype; the R3 hook goes through the
attention registry instead of a patched copy of the attention module.

Explained in :doc:`/book/spinquant/theory`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .hadamard import hadamard

__all__ = [
    "HadamardInputLinear",
    "HeadQuantLinear",
    "QKHadamard",
    "apply_r3",
    "apply_r4",
    "apply_v_quantizer",
    "fuse_norms",
    "rotate",
]


#: RMSNorm classes that compute ``x / rms(x) · g`` with no bias and no offset (Gemma's ``1 + g``
#: would fuse wrongly, so unknown norms are refused rather than guessed).
_RMSNORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"})

#: Tolerance of the orthogonality check ``max |RᵀR − I|`` (the issue's 1e-3).
ORTHOGONALITY_TOL = 1e-3


def _identity(x: Tensor) -> Tensor:
    return x


def _hadamard(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Normalised n×n Hadamard (:func:`mini.spinquant.hadamard.hadamard`; ValueError if none)."""
    return hadamard(n, dtype=dtype)


# --------------------------------------------------------------------------- structure checks


def _check_norms(model: nn.Module, caller: str) -> None:
    """Refuse a model with a norm that cannot be fused (LayerNorm, bias, unknown RMSNorm)."""
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls in _RMSNORMS:
            if getattr(module, "bias", None) is not None:
                raise ValueError(
                    f"{caller}: norm module {name!r} ({cls}) has a bias; only RMSNorm without bias can "
                    "be fused into the linears that read it"
                )
            continue
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in cls.lower():
            bias = getattr(module, "bias", None)
            what = "with a bias" if bias is not None else "of an unsupported type"
            raise ValueError(
                f"{caller}: norm module {name!r} is a {cls} {what}; SpinQuant's rotations need "
                f"RMSNorm without bias ({', '.join(sorted(_RMSNORMS))}), whose scale can be fused "
                "into the following linears (a LayerNorm subtracts the mean, which no rotation commutes with)"
            )


def _base(model: nn.Module, caller: str) -> nn.Module:
    """The decoder (``model.model``) of a Llama-family causal LM, after checking its layout."""
    _check_norms(model, caller)
    base = getattr(model, "model", None)
    ok = (
        base is not None
        and hasattr(model, "lm_head")
        and all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm"))
    )
    if not ok:
        raise TypeError(
            f"{caller}: model of type {type(model).__name__} is not a Llama-family causal LM "
            "(expected .model.embed_tokens, .model.layers, .model.norm and .lm_head, as in "
            "LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM)"
        )
    return base


def _check_orthogonal(name: str, R: object, n: int) -> None:
    """Raise unless ``R`` is an n×n tensor with ``max |RᵀR − I| ≤ 1e-3``."""
    if not isinstance(R, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(R).__name__}")
    if R.ndim != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(R.shape)}")
    if R.shape[0] != n:
        raise ValueError(
            f"{name} has shape {tuple(R.shape)}; this model needs ({n}, {n})"
        )
    R64 = R.detach().to(torch.float64)
    err = (
        (R64.T @ R64 - torch.eye(n, dtype=torch.float64, device=R.device))
        .abs()
        .max()
        .item()
    )
    if not err <= ORTHOGONALITY_TOL:  # also catches NaN
        raise ValueError(
            f"{name} is not orthogonal: max |RᵀR − I| = {err:.3g} > {ORTHOGONALITY_TOL}"
        )


def _norms(base: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for i, layer in enumerate(base.layers):
        out.append((f"model.layers.{i}.input_layernorm", layer.input_layernorm))
        out.append(
            (
                f"model.layers.{i}.post_attention_layernorm",
                layer.post_attention_layernorm,
            )
        )
    out.append(("model.norm", base.norm))
    return out


# --------------------------------------------------------------------------- offline folding


def _set(weight: Tensor, value64: Tensor) -> None:
    """Write a float64 result into ``weight`` in place, cast back to its dtype."""
    weight.copy_(value64.to(device=weight.device, dtype=weight.dtype))


def _untie(model: nn.Module) -> None:
    """Give lm_head its own copy of a tied embedding matrix and record it in the config."""
    emb = model.model.embed_tokens.weight
    head = model.lm_head.weight
    if head is emb or head.data_ptr() == emb.data_ptr():
        model.lm_head.weight = nn.Parameter(
            emb.detach().clone(), requires_grad=emb.requires_grad
        )
    model.config.tie_word_embeddings = False
    text_config = getattr(model.config, "get_text_config", None)
    if text_config is not None:
        text_config().tie_word_embeddings = False


@torch.no_grad()
def _fuse(norm: nn.Module, linears: list[nn.Linear]) -> None:
    g = norm.weight.detach().to(torch.float64)  # (d,)
    for lin in linears:
        # (out, d)·diag g: column j scaled by g_j
        _set(
            lin.weight, lin.weight.detach().to(torch.float64) * g.to(lin.weight.device)
        )
    norm.weight.fill_(1.0)


@torch.no_grad()
def fuse_norms(model: nn.Module) -> nn.Module:
    """Fuse every RMSNorm scale into the linears that read it and set the scale to 1, in place.

    input_layernorm → q, k, v; post_attention_layernorm → gate, up; final norm → lm_head (tied
    embeddings are untied first: lm_head gets a clone, ``config.tie_word_embeddings = False``).
    The function is unchanged; afterwards every norm commutes with an orthogonal R1. No
    embedding mean-centring (it is not an invariance of a Llama). Raises ValueError naming the
    module for a norm that cannot be fused (LayerNorm, a bias, an unknown type).

    Explained in :doc:`/book/spinquant/theory`.
    """
    base = _base(model, "fuse_norms")
    _untie(model)
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fuse(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fuse(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    _fuse(base.norm, [model.lm_head])
    return model


def _head_dim(attn: nn.Module) -> int:
    return int(attn.head_dim)


@torch.no_grad()
def rotate(model: nn.Module, R1: Tensor, R2s: list[Tensor] | None = None) -> nn.Module:
    """Fold R1 (d×d) and optionally R2 (one d_h×d_h per layer) into the weights, in place.

    R1 rotates the residual stream: E, q, k, v, gate, up, lm_head ``W ← W·R1``; o_proj and
    down_proj ``W ← R1ᵀ·W``, ``b ← b·R1``. R2 rotates each head's value: v_proj head blocks
    ``W_j ← R2ᵀ·W_j``, ``b_j ← b_j·R2``; o_proj head column blocks ``W_i ← W_i·R2`` (exact under
    GQA). Folding is done in float64 and cast back to each weight's dtype. Needs fused norms
    (every norm scale 1: call :func:`fuse_norms` first); a weight shared by embedding and head
    is rotated once. Raises ValueError for a matrix that is not square, not the right size, or
    not orthogonal to 1e-3.

    Explained in :doc:`/book/spinquant/theory`.
    """
    base = _base(model, "rotate")
    d = base.embed_tokens.weight.shape[1]
    _check_orthogonal("R1", R1, d)
    layers = list(base.layers)
    if R2s is not None:
        if not isinstance(R2s, (list, tuple)) or len(R2s) != len(layers):
            got = len(R2s) if isinstance(R2s, (list, tuple)) else type(R2s).__name__
            raise ValueError(
                f"R2s must be a list of {len(layers)} matrices (one per layer) or None, got {got}"
            )
        for i, (layer, R2) in enumerate(zip(layers, R2s)):
            _check_orthogonal(f"R2s[{i}]", R2, _head_dim(layer.self_attn))
    for name, norm in _norms(base):
        w = norm.weight.detach()
        if not bool((w == 1).all()):
            dev = (w.to(torch.float64) - 1).abs().max().item()
            raise ValueError(
                f"rotate: norm {name!r} has a scale that is not all ones (max |g − 1| = {dev:.3g}); "
                "call fuse_norms(model) first: R1 commutes with RMSNorm only once its scale is fused"
            )

    R = R1.detach().to(torch.float64)  # (d, d)
    done: set[int] = set()

    def right(w: Tensor) -> None:  # W ← W·R1, each parameter once (tied weights)
        if id(w) in done:
            return
        done.add(id(w))
        _set(w, w.detach().to(torch.float64) @ R.to(w.device))

    def left(lin: nn.Linear) -> None:  # W ← R1ᵀ·W, b ← b·R1
        Rd = R.to(lin.weight.device)
        _set(lin.weight, Rd.T @ lin.weight.detach().to(torch.float64))  # (d, d)(d, in)
        if lin.bias is not None:
            _set(lin.bias, lin.bias.detach().to(torch.float64) @ Rd)  # (d,)

    right(base.embed_tokens.weight)  # (vocab, d)
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            right(lin.weight)  # (out, d)
        left(attn.o_proj)
        left(mlp.down_proj)
    right(model.lm_head.weight)  # (vocab, d)

    if R2s is not None:
        for layer, R2 in zip(layers, R2s):
            _rotate_heads(layer.self_attn, R2.detach().to(torch.float64))
    return model


def _rotate_heads(attn: nn.Module, R2: Tensor) -> None:
    """v_proj head blocks ``W_j ← R2ᵀ·W_j`` (and bias), o_proj column blocks ``W_i ← W_i·R2``."""
    dh = _head_dim(attn)
    v, o = attn.v_proj, attn.o_proj
    R2 = R2.to(v.weight.device)
    Wv = v.weight.detach().to(torch.float64)  # (n_kv·d_h, d)
    Wv = Wv.unflatten(0, (-1, dh))  # (n_kv, d_h, d)
    _set(v.weight, torch.matmul(R2.T, Wv).flatten(0, 1))
    if v.bias is not None:
        bv = v.bias.detach().to(torch.float64).unflatten(0, (-1, dh))  # (n_kv, d_h)
        _set(v.bias, (bv @ R2).flatten())
    Wo = o.weight.detach().to(torch.float64).unflatten(1, (-1, dh))  # (d, n_h, d_h)
    _set(o.weight, (Wo @ R2).flatten(1))


# --------------------------------------------------------------------------- online R4


class _OnlineHadamard(nn.Module):
    """``x ↦ x·H`` along the last dimension for a normalised Hadamard H (entries ±1/√n).

    Stores the ±1 signs, exact in every dtype (so ``model.to(torch.bfloat16)`` cannot round
    them), as a non-persistent buffer, and applies 1/√n as a Python float; computes in at least
    float32 and casts back to the input's dtype.
    """

    def __init__(self, hadamard: Tensor) -> None:
        super().__init__()
        n = hadamard.shape[0]
        signs = torch.round(hadamard.detach().to(torch.float64) * n**0.5)  # (n, n), ±1
        self.register_buffer("signs", signs, persistent=False)
        self.scale = n**-0.5

    def forward(self, x: Tensor) -> Tensor:  # (..., n) -> (..., n)
        ct = torch.promote_types(x.dtype, torch.float32)
        return ((x.to(ct) @ self.signs.to(device=x.device, dtype=ct)) * self.scale).to(
            x.dtype
        )


class HadamardInputLinear(nn.Linear):
    """A linear that multiplies its input by a Hadamard H online: ``y = q(x·H)·Wᵀ + b``.

    Built from an existing linear whose weight already holds ``W·H`` (:func:`apply_r4`); shares
    its parameters, so the state_dict keys are those of the wrapped linear. ``quantizer``
    (identity by default) acts on ``x·H``, the input the weight sees. H is a non-persistent
    buffer of ±1 signs; the product is computed in at least float32, cast back to the input's dtype.

    Explained in :doc:`/book/spinquant/theory`.
    """

    def __init__(
        self, linear: nn.Linear, hadamard: Tensor, quantizer: Callable[[Tensor], Tensor] | None = None
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.hadamard = _OnlineHadamard(hadamard)
        self.quantizer = quantizer if quantizer is not None else _identity

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., out)
        return F.linear(self.quantizer(self.hadamard(x)), self.weight, self.bias)


@torch.no_grad()
def apply_r4(model: nn.Module, quantizer: Callable[[Tensor], Tensor] | None = None) -> nn.Module:
    """R4: an online Hadamard before every down_proj, ``W ← W·H`` folded offline; in place.

    The function is unchanged (``(x·H)(W·H)ᵀ = x·Wᵀ``); down_proj becomes a
    :class:`HadamardInputLinear` whose ``quantizer`` (identity by default) sees ``x·H``.
    Raises ValueError if R4 was already applied.

    Explained in :doc:`/book/spinquant/theory`.
    """
    base = _base(model, "apply_r4")
    for i, layer in enumerate(base.layers):
        down = layer.mlp.down_proj
        already = isinstance(down, HadamardInputLinear)
        if already:  # applying it twice would fold H twice into the weight
            raise ValueError(
                f"apply_r4: model.layers.{i}.mlp.down_proj already carries R4"
            )
        H = _hadamard(down.in_features, torch.float64).to(down.weight.device)  # (f, f)
        _set(down.weight, down.weight.detach().to(torch.float64) @ H)  # (d, d_ff)
        layer.mlp.down_proj = HadamardInputLinear(down, H, quantizer)
    return model


# --------------------------------------------------------------------------- online R3 and V


class QKHadamard(nn.Module):
    """R3: ``q ← q·H``, ``k ← quantizer(k·H)`` over the head dimension, after RoPE.

    Attention scores are unchanged, ``(q·H)(k·H)ᵀ = q·kᵀ``. Attached to an attention module as
    ``spinquant_r3`` by :func:`apply_r3`; ``quantizer`` (identity by default) is where a per-head
    K fake quantiser goes.

    Explained in :doc:`/book/spinquant/theory`.
    """

    def __init__(self, head_dim: int, quantizer: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.hadamard = _OnlineHadamard(_hadamard(head_dim, torch.float64))
        self.quantizer = quantizer if quantizer is not None else _identity

    def forward(
        self, q: Tensor, k: Tensor
    ) -> tuple[Tensor, Tensor]:  # (B, h, T, d_h), (B, h_kv, S, d_h)
        """``(q·H, quantizer(k·H))``, both along the head dimension."""
        return self.hadamard(q), self.quantizer(self.hadamard(k))


#: Attention implementations that R3 can wrap, and the registry names it registers for them.
_R3_BASES = ("eager", "sdpa")
_R3_PREFIX = "mini_spinquant_"


def _r3_attention(base_name: str) -> Callable:
    """An attention function: apply the module's R3 to q, k (post-RoPE), then the stock one."""

    def attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask,
        *args,
        **kwargs,
    ):
        r3 = getattr(module, "spinquant_r3", None)
        if r3 is not None:
            query, key = r3(query, key)  # (B, h, T, d_h), (B, h_kv, S, d_h)
        if base_name == "eager":
            fn = sys.modules[type(module).__module__].eager_attention_forward
        else:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            fn = ALL_ATTENTION_FUNCTIONS[base_name]
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"{_R3_PREFIX}{base_name}_attention"
    return attention


def _register_r3(base_name: str) -> str:
    """Register the R3 attention (and its mask format) under ``mini_spinquant_<base>``."""
    name = _R3_PREFIX + base_name
    fn = _r3_attention(base_name)
    try:  # transformers >= 4.50: a class-wide registry
        from transformers.modeling_utils import AttentionInterface

        AttentionInterface.register(name, fn)
    except ImportError:  # 4.48-4.49: a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[name] = fn
    try:  # transformers >= 4.53 builds masks by implementation name: reuse the base's format
        from transformers.masking_utils import (
            ALL_MASK_ATTENTION_FUNCTIONS,
            AttentionMaskInterface,
        )

        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    except ImportError:  # older versions give an unknown name the 4-D additive mask, which both bases accept
        pass
    return name


def apply_r3(model: nn.Module, quantizer: Callable[[Tensor], Tensor] | None = None) -> nn.Module:
    """R3: online Hadamard on q and k after RoPE in every attention layer; in place.

    Attaches a :class:`QKHadamard` as ``self_attn.spinquant_r3`` and switches the model to an
    attention function registered in transformers' attention registry (``mini_spinquant_eager``
    or ``mini_spinquant_sdpa``, wrapping the model's current eager/sdpa one): it receives q and
    k after RoPE, so no transformers source is edited. The key cache stores keys before R3; K is
    rotated and quantised on every call (a per-token quantiser gives the same result). Needs
    transformers >= 4.48. Raises ValueError for another attention implementation or if R3 was
    already applied.

    Explained in :doc:`/book/spinquant/theory`.
    """
    import transformers

    release = tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    if release < (4, 48):
        raise RuntimeError(
            f"apply_r3 needs transformers >= 4.48 (attention through a registry), found "
            f"{transformers.__version__}"
        )
    base = _base(model, "apply_r3")
    current = model.config._attn_implementation
    if isinstance(current, str) and current.startswith(_R3_PREFIX):
        raise ValueError(
            f"apply_r3: the model already uses the R3 attention {current!r}"
        )
    if current not in _R3_BASES:
        raise ValueError(
            f"apply_r3: attention implementation {current!r} is not supported; use one of {_R3_BASES} "
            "(model.set_attn_implementation('sdpa'))"
        )
    name = _register_r3(current)
    for layer in base.layers:
        attn = layer.self_attn
        attn.spinquant_r3 = QKHadamard(_head_dim(attn), quantizer).to(
            attn.q_proj.weight.device
        )
    model.config._attn_implementation = name
    return model


class HeadQuantLinear(nn.Linear):
    """A linear whose output is fake-quantised per head: ``y = q(x·Wᵀ + b)`` in groups of d_h.

    Used for V at v_proj's output (the values a KV cache stores, rotated by R2). Shares the
    wrapped linear's parameters; ``quantizer`` receives a (..., heads, d_h) tensor.

    Explained in :doc:`/book/spinquant/theory`.
    """

    def __init__(self, linear: nn.Linear, head_dim: int, quantizer: Callable[[Tensor], Tensor]) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.head_dim = head_dim
        self.quantizer = quantizer

    def forward(self, x: Tensor) -> Tensor:  # (..., in) -> (..., heads·d_h)
        y = F.linear(x, self.weight, self.bias)  # (..., heads·d_h)
        y = y.unflatten(-1, (-1, self.head_dim))  # (..., heads, d_h)
        return self.quantizer(y).flatten(-2)


def apply_v_quantizer(model: nn.Module, quantizer: Callable[[Tensor], Tensor]) -> nn.Module:
    """Quantise V per head at every v_proj's output with ``quantizer``; in place.

    Explained in :doc:`/book/spinquant/theory`.
    """
    if not callable(quantizer):
        raise TypeError(f"quantizer must be callable, got {type(quantizer).__name__}")
    base = _base(model, "apply_v_quantizer")
    for i, layer in enumerate(base.layers):
        attn = layer.self_attn
        already = isinstance(attn.v_proj, HeadQuantLinear)
        if already:
            raise ValueError(
                f"apply_v_quantizer: model.layers.{i}.self_attn.v_proj is already quantised"
            )
        attn.v_proj = HeadQuantLinear(attn.v_proj, _head_dim(attn), quantizer)
    return model
