"""SpinQuant assembled: a rotated, fake-quantised copy of a model, and R1/R2 learned end to end.

Paper: Liu et al., "SpinQuant: LLM quantization with learned rotations", arXiv 2405.16406
(ICLR 2025), Sections 3-4; official code facebookresearch/SpinQuant
(``optimize_rotation.py``, ``eval_utils/main.py``). Part III, SpinQuant chapter.

The quantised model (:func:`quantize_model`)
--------------------------------------------
On a deep copy of a transformers Llama-family model: fuse the RMSNorm scales
(:func:`~mini.spinquant.rotation.fuse_norms`), fold R1 and R2 into the weights
(:func:`~mini.spinquant.rotation.rotate`), add the online Hadamards R4 (before down_proj) and R3
(q and k after RoPE), then insert the fake quantisers of a
:class:`~mini.spinquant.quantizers.QuantConfig`:

- activations, per token, asymmetric (:func:`~mini.spinquant.quantizers.quantize_activation`):
  the inputs of q/k/v, gate/up and o_proj (o_proj's in groups of the head dimension, as the
  official code), and of down_proj after R4; lm_head's input stays in full precision;
- K per head after RoPE and R3, V per head at v_proj's output (``k_bits``, ``v_bits``);
- weights per output channel, symmetric, with the clip search: round to nearest (``"rtn"``) or
  GPTQ from calibration batches (``"gptq"``), run with the activation quantisers in place.

16 bits means "not quantised" for every tensor kind.

Learning R1 and R2 (:func:`learn_rotations`)
--------------------------------------------
R1 (d×d) and one R2 (d_h×d_h) per layer are float32 parameters on the Stiefel manifold, trained
by :class:`~mini.spinquant.cayley.CayleySGD` on the next-token loss of the rotated,
fake-quantised model with everything else frozen. The rotation is not folded during training:
every step builds the rotated weights as functions of R1 and R2 (the same products as
:func:`~mini.spinquant.rotation.rotate`, in float32) and runs the model on them with
``torch.func.functional_call``; weights are fake-quantised there by RTN with a straight-through
gradient (the official recipe; with ``weights="gptq"`` the official rule learns on
``w_bits=16`` and runs GPTQ afterwards, which :func:`learn_rotations` leaves to the caller by
its ``config``). Defaults follow the official script where they fit our scale: lr 1.5, cosine
decay to 0, momentum 0, the initialisation a random Hadamard.

Explained in :doc:`/book/spinquant/theory`.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .cayley import CayleySGD
from .hadamard import random_hadamard, random_orthogonal
from .quantizers import (
    QuantConfig,
    gptq_quantize_model_,
    quantize_activation,
    quantize_weight,
    rtn_quantize_model_,
)
from .rotation import apply_r3, apply_r4, apply_v_quantizer, fuse_norms, rotate

__all__ = [
    "LearnResult",
    "concentrate_outliers",
    "init_rotations",
    "kl_and_ppl",
    "learn_rotations",
    "quantize_model",
    "residual_stats",
]

WEIGHT_METHODS = ("rtn", "gptq")
INITS = ("hadamard", "orthogonal")


def _layers(model: nn.Module) -> Sequence[nn.Module]:
    return model.model.layers


def _head_dim(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _act_quantizer(bits: int, clip: float, groupsize: int | None = None) -> Callable[[Tensor], Tensor] | None:
    if bits >= 16:
        return None
    return partial(quantize_activation, bits=bits, clip_ratio=clip, groupsize=groupsize)


def _pre_hook(quantizer: Callable[[Tensor], Tensor]):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return (quantizer(args[0]),) + tuple(args[1:])

    return hook


class _KQuantOnly(nn.Module):
    """The R3 hook's place without R3: K fake-quantised per head after RoPE, q untouched."""

    def __init__(self, quantizer: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:  # (B, h, T, d_h), (B, h_kv, S, d_h)
        return q, self.quantizer(k)


def _check_config(config: object) -> QuantConfig:
    if isinstance(config, str):
        return QuantConfig.parse(config)
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a QuantConfig or a string such as 'W4A4KV4', got {type(config).__name__}")
    return config


def _prepare(model: nn.Module, config: QuantConfig, r3: bool, r4: bool) -> list:
    """Online Hadamards and activation/KV quantisers on an already fused (and rotated) model."""
    d_h = _head_dim(model)
    act = _act_quantizer(config.a_bits, config.a_clip, config.a_groupsize)
    if r4:
        apply_r4(model, quantizer=act)
    k_q = _act_quantizer(config.k_bits, config.kv_clip)
    if r3:
        apply_r3(model, quantizer=k_q)
    elif k_q is not None:  # K quantised after RoPE through the same hook, without the Hadamard
        apply_r3(model)
        for layer in _layers(model):
            layer.self_attn.spinquant_r3 = _KQuantOnly(k_q)
    v_q = _act_quantizer(config.v_bits, config.kv_clip)
    if v_q is not None:
        apply_v_quantizer(model, v_q)
    handles = []
    if act is not None:
        o_q = _act_quantizer(config.a_bits, config.a_clip, d_h)
        for layer in _layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                handles.append(lin.register_forward_pre_hook(_pre_hook(act)))
            handles.append(attn.o_proj.register_forward_pre_hook(_pre_hook(o_q)))
            if not r4:
                handles.append(mlp.down_proj.register_forward_pre_hook(_pre_hook(act)))
    return handles


def _check_rotations(model: nn.Module, R1: Tensor | None, R2s: Sequence[Tensor] | None) -> None:
    if R1 is None and R2s is not None:
        raise ValueError("R2s given without R1: pass R1 too (torch.eye(d) for none)")


def quantize_model(
    model: nn.Module,
    config: QuantConfig | str,
    R1: Tensor | None = None,
    R2s: Sequence[Tensor] | None = None,
    *,
    r3: bool = True,
    r4: bool = True,
    weights: str = "rtn",
    calib: Tensor | Sequence[Tensor] | None = None,
) -> nn.Module:
    """A rotated, fake-quantised copy of ``model`` (the original is not touched).

    ``config``: a :class:`~mini.spinquant.quantizers.QuantConfig` or a string such as
    ``"W4A4KV4"``; ``R1`` (d×d) and ``R2s`` (one d_h×d_h per layer) orthogonal, or None for no
    rotation; ``r3``/``r4``: the online Hadamards; ``weights``: ``"rtn"`` or ``"gptq"`` (needs
    ``calib``: token ids ``(B, T)`` or a list of them). Returns the model in eval mode.

    Explained in :doc:`/book/spinquant/theory`.
    """
    config = _check_config(config)
    if weights not in WEIGHT_METHODS:
        raise ValueError(f"weights must be one of {WEIGHT_METHODS}, got {weights!r}")
    if weights == "gptq" and calib is None and config.w_bits < 16:
        raise ValueError("weights='gptq' needs calib: calibration token ids (B, T) or a list of them")
    _check_rotations(model, R1, R2s)
    m = copy.deepcopy(model).eval()
    fuse_norms(m)
    if R1 is not None:
        rotate(m, R1, R2s)
    _prepare(m, config, r3, r4)
    if config.w_bits < 16:
        if weights == "rtn":
            rtn_quantize_model_(m, config.w_bits, clip_search=config.w_clip_search)
        else:
            gptq_quantize_model_(m, calib, config.w_bits, clip_search=config.w_clip_search)
    return m


def init_rotations(model: nn.Module, init: str = "hadamard", seed: int = 0) -> tuple[Tensor, list[Tensor]]:
    """R1 (d×d) and one R2 (d_h×d_h) per layer: random Hadamard or random orthogonal, float32.

    Explained in :doc:`/book/spinquant/theory`.
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    gen = torch.Generator().manual_seed(seed)
    make = random_hadamard if init == "hadamard" else random_orthogonal
    d, d_h = model.config.hidden_size, _head_dim(model)
    R1 = make(d, generator=gen, dtype=torch.float32)
    R2s = [make(d_h, generator=gen, dtype=torch.float32) for _ in _layers(model)]
    return R1, R2s


def _rtn_ste(w: Tensor, bits: int, clip_search: bool) -> Tensor:
    """RTN per output channel with a straight-through gradient (forward Q(w), backward identity)."""
    if bits >= 16:
        return w
    with torch.no_grad():
        q = quantize_weight(w.detach(), bits, clip_search=clip_search)
    return w + (q - w).detach()


def _rotated_params(
    base: dict[str, Tensor], R1: Tensor, R2s: Sequence[Tensor], n_layers: int, d_h: int,
    w_bits: int, clip_search: bool, prefix: str,
) -> dict[str, Tensor]:
    """The weights of the fused model rotated by R1, R2 (differentiable in R1, R2), RTN'd."""
    p = prefix
    out = {f"{p}model.embed_tokens.weight": base[f"{p}model.embed_tokens.weight"] @ R1}  # (V, d)
    out[f"{p}lm_head.weight"] = base[f"{p}lm_head.weight"] @ R1  # (V, d), not quantised
    for i in range(n_layers):
        a, mlp = f"{p}model.layers.{i}.self_attn.", f"{p}model.layers.{i}.mlp."
        R2 = R2s[i]
        for name in (a + "q_proj.weight", a + "k_proj.weight", mlp + "gate_proj.weight", mlp + "up_proj.weight"):
            out[name] = _rtn_ste(base[name] @ R1, w_bits, clip_search)  # (out, d)
        v = (base[a + "v_proj.weight"] @ R1).unflatten(0, (-1, d_h))  # (h_kv, d_h, d)
        v = torch.einsum("ji,hjd->hid", R2, v).flatten(0, 1)  # each head block R2ᵀ·W_h
        out[a + "v_proj.weight"] = _rtn_ste(v, w_bits, clip_search)
        if a + "v_proj.bias" in base:  # Qwen2: the bias of each head b_h·R2
            out[a + "v_proj.bias"] = (base[a + "v_proj.bias"].unflatten(0, (-1, d_h)) @ R2).flatten()
        o = R1.T @ base[a + "o_proj.weight"]  # (d, h·d_h)
        o = (o.unflatten(1, (-1, d_h)) @ R2).flatten(1)  # each head block of columns ·R2
        out[a + "o_proj.weight"] = _rtn_ste(o, w_bits, clip_search)
        out[mlp + "down_proj.weight"] = _rtn_ste(R1.T @ base[mlp + "down_proj.weight"], w_bits, clip_search)
        for name in (a + "o_proj.bias", mlp + "down_proj.bias"):
            if name in base:
                out[name] = base[name] @ R1
    return out


@dataclass
class LearnResult:
    """What :func:`learn_rotations` returns: the learned rotations and the loss per step.

    Explained in :doc:`/book/spinquant/theory`.
    """

    R1: Tensor  #: (d, d) float32, orthogonal
    R2s: list[Tensor]  #: one (d_h, d_h) per layer
    losses: list[float] = field(default_factory=list)  #: next-token loss at each step
    seconds: float = 0.0  #: wall-clock time of the steps


def learn_rotations(
    model: nn.Module,
    batches: Iterable[Tensor],
    config: QuantConfig | str,
    *,
    steps: int = 100,
    lr: float = 1.5,
    momentum: float = 0.0,
    init: str | tuple[Tensor, Sequence[Tensor]] = "hadamard",
    seed: int = 0,
    r3: bool = True,
    r4: bool = True,
    exact: bool = True,
    progress: Callable[[int, float], None] | None = None,
) -> LearnResult:
    """Learn R1 and R2 by CayleySGD on the next-token loss of the rotated, fake-quantised model.

    ``batches``: an iterable of token ids ``(B, T + 1)`` (cycled; inputs ``[:, :-1]``, targets
    ``[:, 1:]``); ``config``: the quantisation trained against (RTN weights, straight-through);
    ``init``: ``"hadamard"``, ``"orthogonal"`` or ``(R1, R2s)``; ``lr``, ``momentum``, ``exact``:
    :class:`~mini.spinquant.cayley.CayleySGD`'s, with a cosine decay of lr to 0 over ``steps``.
    The model itself is not changed. ``progress(step, loss)`` is called after every step.

    Explained in :doc:`/book/spinquant/theory`.
    """
    import time

    config = _check_config(config)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one batch of token ids (B, T + 1)")
    m = copy.deepcopy(model).eval()
    fuse_norms(m)
    for p in m.parameters():
        p.requires_grad_(False)
    _prepare(m, config, r3, r4)  # R4 folds H into down_proj here, before R1 is applied around it
    base = {n: p.detach().float() for n, p in m.named_parameters()}
    if isinstance(init, str):
        R1_0, R2_0 = init_rotations(model, init, seed)
    else:
        R1_0, R2_0 = init
    R1 = nn.Parameter(R1_0.detach().float().clone())
    R2s = [nn.Parameter(r.detach().float().clone()) for r in R2_0]
    opt = CayleySGD([R1, *R2s], lr=lr, momentum=momentum, exact=exact)
    n_layers, d_h = len(_layers(m)), _head_dim(m)
    result = LearnResult(R1=R1.detach(), R2s=[r.detach() for r in R2s])
    t0 = time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay to 0 (the official schedule)
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        ids = batches[step % len(batches)]
        params = _rotated_params(base, R1, R2s, n_layers, d_h, config.w_bits, config.w_clip_search, "")
        logits = torch.func.functional_call(m, params, args=(), kwargs={"input_ids": ids[:, :-1]}).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        result.losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, result.losses[-1])
    result.seconds = time.perf_counter() - t0
    result.R1, result.R2s = R1.detach().clone(), [r.detach().clone() for r in R2s]
    return result


@torch.no_grad()
def kl_and_ppl(reference: nn.Module, model: nn.Module, batches: Iterable[Tensor]) -> tuple[float, float]:
    """Mean KL(reference ‖ model) per token (nats) and ``model``'s perplexity on ``batches``.

    ``batches``: token ids ``(B, T + 1)``; both models see ``[:, :-1]``, the perplexity is of
    ``[:, 1:]``.

    Explained in :doc:`/book/spinquant/theory`.
    """
    kl_sum, nll_sum, n = 0.0, 0.0, 0
    for ids in batches:
        x, y = ids[:, :-1], ids[:, 1:]
        lp = F.log_softmax(reference(input_ids=x).logits.double(), -1)  # (B, T, V)
        lq = F.log_softmax(model(input_ids=x).logits.double(), -1)
        kl_sum += float((lp.exp() * (lp - lq)).sum())
        nll_sum += float(F.nll_loss(lq.flatten(0, 1), y.flatten(), reduction="sum"))
        n += y.numel()
    return kl_sum / n, math.exp(nll_sum / n)


def _residual_inputs(model: nn.Module, batches: Iterable[Tensor]) -> Tensor:
    """The residual stream at every block's input and at the final norm, pooled: (N, d)."""
    rows: list[Tensor] = []

    def keep(module: nn.Module, args: tuple) -> None:
        rows.append(args[0].detach().reshape(-1, args[0].shape[-1]).double())

    norms = [layer.input_layernorm for layer in _layers(model)] + [model.model.norm]
    hooks = [n.register_forward_pre_hook(keep) for n in norms]
    try:
        with torch.no_grad():
            for ids in batches:
                model(input_ids=ids[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(rows)  # (N, d)


def residual_stats(model: nn.Module, batches: Iterable[Tensor]) -> dict[str, float]:
    """Outlier statistics of the residual stream: the largest channel's ``max |h|`` over the
    rms of all entries, and the median over tokens of ``max |h| / rms`` (the per-token
    quantiser's view).

    Explained in :doc:`/book/spinquant/theory`.
    """
    X = _residual_inputs(model, batches)  # (N, d)
    rms = X.pow(2).mean().sqrt()
    token = (X.abs().amax(1) / X.pow(2).mean(1).sqrt()).median()
    return {"max_channel_over_rms": float(X.abs().amax(0).max() / rms), "token_max_over_rms": float(token)}


def concentrate_outliers(model: nn.Module, batches: Iterable[Tensor]) -> tuple[nn.Module, Tensor]:
    """A copy of ``model`` whose residual stream has massive channels, computing the same function.

    Real LLMs carry a few residual channels hundreds of times the rms; a small model trained
    briefly may have none. This rotates the residual stream (an R1, so the function is
    unchanged: :func:`~mini.spinquant.rotation.rotate` after
    :func:`~mini.spinquant.rotation.fuse_norms`) into the eigenbasis of its second moment
    ``E[hᵀh]`` over ``batches``, largest eigenvalue first: channel ``i`` then carries the
    ``i``-th principal direction, so the first few channels hold most of the energy of every
    token. Returns the new model and the rotation ``R`` (d×d, float32).

    Explained in :doc:`/book/spinquant/theory`.
    """
    X = _residual_inputs(model, list(batches))  # (N, d)
    lam, V = torch.linalg.eigh(X.T @ X / len(X))  # ascending
    R = V[:, torch.argsort(lam, descending=True)].float()  # (d, d) orthogonal
    out = fuse_norms(copy.deepcopy(model).eval())
    rotate(out, R)
    return out, R
