"""Fake quantisers of SpinQuant: activations, KV cache and weights (RTN and GPTQ).

Paper: Liu et al., "SpinQuant: LLM quantization with learned rotations", arXiv 2405.16406 (ICLR
2025), Section 4 and Appendix; official code facebookresearch/SpinQuant (``utils/quant_utils.py``
for the quantisers, ``eval_utils/gptq_utils.py`` for GPTQ and RTN, both taken from QuaRot and the
GPTQ repository). GPTQ: Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate post-training
quantization for generative pre-trained transformers", arXiv 2210.17323 (ICLR 2023).

Every quantiser here is a *fake* quantiser: it returns the dequantised value ``x̂`` in the input's
dtype, so a model runs with the rounding error of ``b``-bit numbers but in floating point. The
backward pass is the straight-through estimator (the identity), as in the official
``STEQuantize``/``AsymSTEQuantize``: rounding has zero gradient almost everywhere, and the rotation
training of SpinQuant needs the gradient of the loss with respect to the *unrounded* values.
``bits = 16`` means "not quantised" everywhere (the official convention).

Activations and KV (asymmetric, dynamic, per token)
---------------------------------------------------
For each token (a row of the last dimension, or a group of ``g`` entries of it) with clip ratio
``c``::

    m⁺ = c · max(max_j x_j, 0)      m⁻ = c · min(min_j x_j, 0)       (the range contains 0)
    s  = (m⁺ − m⁻) / (2^b − 1)      z = round(−m⁻ / s)
    q  = clamp(round(x / s) + z, 0, 2^b − 1)        x̂ = s · (q − z)

A group of zeros would give ``s = 0``; as in the official code its range becomes ``[−1, 1]``
(``x̂ = 0`` exactly, no NaN). Because the range contains 0 and ``z`` is an integer, 0 is always a
grid point: ``x = 0`` gives ``q = z`` and ``x̂ = 0``, also for a one-sign group (an all-positive
group has ``m⁻ = 0``, ``z = 0``). ``round`` is round-half-to-even (``torch.round``). Computed in
float32 (float64 for float64 inputs) and cast back. K and V are quantised per head: groups of
``head_dim`` along the last dimension (:func:`quantize_kv`). Difference from the official code: its
*grouped* activation path (``find_params_per_token_groupwise``, used for the o_proj input) does
not clamp the range to contain 0; here every path does.

Weights (symmetric, per output channel, clip search)
----------------------------------------------------
Row ``i`` of an ``nn.Linear`` weight ``W`` (out × in) has levels ``−2^{b−1} … 2^{b−1}−1``::

    s_i(p) = p · max(max_j |W_ij|, 1e−5) / (2^{b−1} − 1)
    Q(W_ij) = s_i · clamp(round(W_ij / s_i), −2^{b−1}, 2^{b−1} − 1)

With the clip search (the official ``w_clip``, GPTQ's ``mse=True``: ``grid=100, maxshrink=0.8,
norm=2.4``) ``p`` runs over ``1 − k/100`` for ``k = 0 … 79`` (1.00, 0.99, …, 0.21) and each row
keeps the first ``p`` that minimises ``Σ_j |Q(W_ij) − W_ij|^2.4`` (strictly smaller error wins,
so ties keep the larger ``p``). Without it ``p = 1`` (round to nearest, "RTN").

GPTQ
----
For a linear layer with inputs ``x`` (rows of ``X``, ``N`` of them) GPTQ minimises the output error
``||X Wᵀ − X Ŵᵀ||²`` column by column: with ``H = 2 XᵀX / N`` (:class:`HessianAccumulator`),
damped by ``λ = 1% · mean(diag H)``, the columns are quantised left to right and the error of
column ``i``, divided by ``[H_F⁻¹]_ii``, is spread over the not-yet-quantised columns ``F`` through
row ``i`` of ``H_F⁻¹`` (the OBS update). Removing column ``i`` from ``H_F⁻¹`` is one step of Gaussian
elimination, so row ``i`` of the upper Cholesky factor ``U`` of ``H⁻¹`` already holds every update
(``U_ij / U_ii = [H_F⁻¹]_ij / [H_F⁻¹]_ii``). Updates inside a block of 128 columns are applied at
once per column; the accumulated errors update the columns right of the block in one matrix
product ("lazy batch updates"). A column whose input is always zero (``H_ii = 0``, "dead") gets
``H_ii = 1`` and weight 0. The per-row scales are fixed before the loop from the original weight
(with the clip search), as in the official code. The official accumulator divides by the number of
*sequences*, here by the number of *rows* (tokens); GPTQ's result does not depend on a scalar
factor of ``H``. :func:`gptq_quantize_model_` quantises every decoder-layer linear of a
transformers Llama-family model in the official order (q/k/v, then o, then gate/up, then down),
each group's Hessians taken from a forward pass through the already-quantised earlier groups and
layers; ``lm_head`` and embeddings stay in full precision.

Explained in :doc:`/book/spinquant/theory`.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "CLIP_GRID",
    "CLIP_MAXSHRINK",
    "CLIP_NORM",
    "GPTQ_SEQUENTIAL",
    "HessianAccumulator",
    "QuantConfig",
    "asym_quantize_reference",
    "gptq_quantize_linear_",
    "gptq_quantize_model_",
    "gptq_quantize_weight",
    "quantize_activation",
    "quantize_kv",
    "quantize_weight",
    "quantize_weight_with_scale",
    "rtn_quantize_linear_",
    "rtn_quantize_model_",
    "weight_scale",
]

CLIP_GRID = 100  # the official clip search: p = 1 - k / CLIP_GRID ...
CLIP_MAXSHRINK = 0.8  # ... for k = 0 .. int(CLIP_MAXSHRINK * CLIP_GRID) - 1: p = 1.00 .. 0.21
CLIP_NORM = 2.4  # error Σ |Q(w) - w|^CLIP_NORM per row

#: The official sub-layer order of GPTQ inside one decoder layer (eval_utils/gptq_utils.py).
GPTQ_SEQUENTIAL: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("o_proj",),
    ("gate_proj", "up_proj"),
    ("down_proj",),
)


# ---------------------------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------------------------
def _check_bits(name: str, bits: Any) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{name} must be an integer in 2..16 (16 means not quantised), got {bits!r}")
    return bits


def _check_clip(name: str, clip: Any) -> float:
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0.0 < float(clip) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {clip!r}")
    return float(clip)


def _check_groupsize(name: str, groupsize: Any, width: int | None = None) -> int | None:
    if groupsize is None:
        return None
    if isinstance(groupsize, bool) or not isinstance(groupsize, int) or groupsize <= 0:
        raise ValueError(f"{name} must be None (one group per token) or a positive integer, got {groupsize!r}")
    if width is not None and width % groupsize != 0:
        raise ValueError(f"{name}={groupsize} must divide the last dimension {width}")
    return groupsize


def _check_float_tensor(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
_SETTING = re.compile(r"^W(\d+)A(\d+)(?:KV(\d+)|K(\d+)V(\d+))$")


@dataclasses.dataclass
class QuantConfig:
    """Bit widths and options of one SpinQuant setting, such as W4A4KV4 (16 bits: not quantised).

    Clip ratios: the official default is 1.0; users reproduce the paper better with 0.9 for
    activations and 0.95 for K/V (official issue #5).

    Explained in :doc:`/book/spinquant/theory`.
    """

    w_bits: int = 16  #: weight bits (per output channel, symmetric)
    a_bits: int = 16  #: activation bits (per token, asymmetric)
    k_bits: int = 16  #: key bits (per head, after RoPE and R3)
    v_bits: int = 16  #: value bits (per head, at v_proj's output)
    a_clip: float = 1.0  #: clip ratio of the activations' range
    kv_clip: float = 1.0  #: clip ratio of the K and V ranges
    w_clip_search: bool = True  #: search the weights' clip ratio per row (official "mse")
    a_groupsize: int | None = None  #: activation group size; None means one group per token

    def __post_init__(self) -> None:
        for field in ("w_bits", "a_bits", "k_bits", "v_bits"):
            _check_bits(field, getattr(self, field))
        self.a_clip = _check_clip("a_clip", self.a_clip)
        self.kv_clip = _check_clip("kv_clip", self.kv_clip)
        if not isinstance(self.w_clip_search, bool):
            raise TypeError(f"w_clip_search must be a bool, got {self.w_clip_search!r}")
        _check_groupsize("a_groupsize", self.a_groupsize)

    @classmethod
    def parse(cls, setting: str, **options: Any) -> QuantConfig:
        """``QuantConfig.parse("W4A4KV4")``; also ``"W4A4K4V8"``; options as keyword arguments.

        Explained in :doc:`/book/spinquant/theory`.
        """
        if not isinstance(setting, str):
            raise TypeError(f"setting must be a str such as 'W4A4KV4', got {type(setting).__name__}")
        m = _SETTING.match(setting.strip().upper())
        if m is None:
            raise ValueError(
                f"setting {setting!r} is not of the form 'W<bits>A<bits>KV<bits>' or "
                "'W<bits>A<bits>K<bits>V<bits>' (for example 'W4A4KV4', 'W4A16KV16', 'W16A4KV4')"
            )
        w, a, kv, k, v = m.groups()
        k, v = (kv, kv) if kv is not None else (k, v)
        return cls(w_bits=int(w), a_bits=int(a), k_bits=int(k), v_bits=int(v), **options)

    def __str__(self) -> str:
        kv = f"KV{self.k_bits}" if self.k_bits == self.v_bits else f"K{self.k_bits}V{self.v_bits}"
        return f"W{self.w_bits}A{self.a_bits}{kv}"


# ---------------------------------------------------------------------------------------------
# Straight-through estimator
# ---------------------------------------------------------------------------------------------
class _StraightThrough(torch.autograd.Function):
    """Forward: the given quantise-dequantise function; backward: the identity."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Activations and KV: asymmetric, per token (or group)
# ---------------------------------------------------------------------------------------------
def asym_quantize_reference(x: torch.Tensor, bits: int, clip_ratio: float = 1.0,
                            groupsize: int | None = None) -> torch.Tensor:
    """Asymmetric per-token quantise-dequantise along the last dim, without autograd.

    The math of :func:`quantize_activation` (and the reference of the fused Triton
    kernel in :mod:`mini.spinquant.quant_kernel`): groups of ``groupsize`` (default:
    the whole last dimension), range clamped to contain 0, computed in float32
    (float64 for float64 input).

    Explained in :doc:`/book/spinquant/theory`.
    """
    _check_float_tensor("x", x)
    _check_bits("bits", bits)
    clip_ratio = _check_clip("clip_ratio", clip_ratio)
    if x.dim() == 0:
        raise ValueError(
            "x must have at least one dimension (the token's features), got a scalar"
        )
    width = x.shape[-1]
    g = _check_groupsize("groupsize", groupsize, width) or width
    if bits == 16 or x.numel() == 0:
        return x.clone()
    maxq = float(2**bits - 1)
    xg = x.to(_compute_dtype(x)).reshape(-1, g)  # (groups, g)
    zero = torch.zeros((), dtype=xg.dtype, device=xg.device)
    hi = torch.maximum(xg.amax(dim=1, keepdim=True), zero) * clip_ratio  # (groups, 1)
    lo = torch.minimum(xg.amin(dim=1, keepdim=True), zero) * clip_ratio  # (groups, 1)
    empty = (hi == 0) & (lo == 0)  # a group of zeros: range [-1, 1], x̂ = 0
    hi = torch.where(empty, torch.ones_like(hi), hi)
    lo = torch.where(empty, -torch.ones_like(lo), lo)
    s = (hi - lo) / maxq  # (groups, 1)
    z = torch.round(-lo / s)  # (groups, 1) integer zero point in [0, maxq]
    q = torch.clamp(torch.round(xg / s) + z, 0.0, maxq)  # (groups, g)
    return (s * (q - z)).reshape(x.shape).to(x.dtype)


def quantize_activation(x: torch.Tensor, bits: int, clip_ratio: float = 1.0,
                        groupsize: int | None = None) -> torch.Tensor:
    """Fake-quantise activations per token (asymmetric, dynamic), straight-through gradient.

    ``x`` (..., d): each row of the last dimension (or each group of ``groupsize`` entries of it)
    gets its own scale and zero point; ``bits=16`` returns ``x``.

    Explained in :doc:`/book/spinquant/theory`.
    """
    _check_float_tensor("x", x)
    _check_bits("bits", bits)
    _check_clip("clip_ratio", clip_ratio)
    if x.dim() == 0:
        raise ValueError(
            "x must have at least one dimension (the token's features), got a scalar"
        )
    _check_groupsize("groupsize", groupsize, x.shape[-1])
    if bits == 16:
        return x
    return _StraightThrough.apply(x, lambda t: asym_quantize_reference(t, bits, clip_ratio, groupsize))


def quantize_kv(x: torch.Tensor, bits: int, head_dim: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """Fake-quantise keys or values per token and head: groups of ``head_dim`` along the last dim.

    ``x`` is (..., n_heads · head_dim) or (..., head_dim) (for example (batch, heads, seq,
    head_dim)); asymmetric like :func:`quantize_activation`. Keys are quantised after RoPE and R3.

    Explained in :doc:`/book/spinquant/theory`.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
    _check_float_tensor("x", x)
    if x.dim() == 0 or x.shape[-1] % head_dim != 0:
        raise ValueError(
            f"the last dimension of x (shape {tuple(x.shape)}) must be a multiple of head_dim={head_dim}"
        )
    return quantize_activation(x, bits, clip_ratio, groupsize=head_dim)


# ---------------------------------------------------------------------------------------------
# Weights: symmetric, per output channel
# ---------------------------------------------------------------------------------------------
def _check_weight(w: Any) -> torch.Tensor:
    _check_float_tensor("w", w)
    if w.dim() != 2:
        raise ValueError(f"w must be a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    return w


def quantize_weight_with_scale(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``s · clamp(round(w / s), −2^{b−1}, 2^{b−1}−1)`` with a given scale (broadcast against w).

    Explained in :doc:`/book/spinquant/theory`.
    """
    maxq = float(2 ** (bits - 1) - 1)
    return scale * torch.clamp(torch.round(w / scale), -(maxq + 1.0), maxq)


def weight_scale(w: torch.Tensor, bits: int, clip_search: bool = True) -> torch.Tensor:
    """Per-row scale (out, 1) of the symmetric weight quantiser, with the official clip search.

    Computed in float32 (float64 for float64 weights). See the module docstring for the search
    grid ``p = 1.00, 0.99, …, 0.21`` and the error ``Σ |Q(w) − w|^2.4``.

    Explained in :doc:`/book/spinquant/theory`.
    """
    _check_weight(w)
    _check_bits("bits", bits)
    maxq = float(2 ** (bits - 1) - 1)
    wc = w.detach().to(_compute_dtype(w))  # (out, in)
    xmax = wc.abs().amax(dim=1).clamp(min=1e-5)  # (out,)
    scale = xmax / maxq
    if clip_search:
        best = torch.full_like(xmax, float("inf"))
        for k in range(int(CLIP_MAXSHRINK * CLIP_GRID)):
            p = 1 - k / CLIP_GRID
            s1 = (p * xmax) / maxq  # (out,)
            err = (quantize_weight_with_scale(wc, s1[:, None], bits) - wc).abs().pow(CLIP_NORM).sum(dim=1)
            better = err < best
            best = torch.where(better, err, best)
            scale = torch.where(better, s1, scale)
    return scale[:, None]  # (out, 1)


def quantize_weight(w: torch.Tensor, bits: int, clip_search: bool = True) -> torch.Tensor:
    """Fake-quantise a weight (out, in) per output channel, symmetric; straight-through gradient.

    ``bits=16`` returns ``w``.

    Explained in :doc:`/book/spinquant/theory`.
    """
    _check_weight(w)
    _check_bits("bits", bits)
    if bits == 16:
        return w

    def fn(t: torch.Tensor) -> torch.Tensor:
        tc = t.to(_compute_dtype(t))
        return quantize_weight_with_scale(tc, weight_scale(tc, bits, clip_search), bits).to(t.dtype)

    return _StraightThrough.apply(w, fn)


def _check_linear(linear: Any) -> nn.Linear:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
    return linear


@torch.no_grad()
def rtn_quantize_linear_(linear: nn.Linear, bits: int, clip_search: bool = True) -> nn.Linear:
    """Round its weight to the nearest grid point in place (per-row scales); bias untouched.

    Explained in :doc:`/book/spinquant/theory`.
    """
    _check_linear(linear)
    _check_bits("bits", bits)
    if bits < 16:
        linear.weight.copy_(quantize_weight(linear.weight.detach(), bits, clip_search))
    return linear


# ---------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------
class HessianAccumulator:
    """Running ``H = 2 XᵀX / N`` of a linear layer's inputs (rows of X), over calibration batches.

    ``acc.add_batch(x)`` with ``x`` (..., in_features); ``handle = acc.hook(linear)`` registers a
    forward hook that adds each input the module sees (``handle.remove()`` when done).

    Explained in :doc:`/book/spinquant/theory`.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)  # (in, in)
        self.nsamples = 0

    @classmethod
    def from_hessian(cls, H: torch.Tensor, nsamples: int = 1) -> HessianAccumulator:
        """Wrap a given (in, in) matrix, e.g. the identity in a test.

        Explained in :doc:`/book/spinquant/theory`.
        """
        _check_float_tensor("H", H)
        if H.dim() != 2 or H.shape[0] != H.shape[1]:
            raise ValueError(f"H must be a square matrix, got shape {tuple(H.shape)}")
        acc = cls(H.shape[0], dtype=torch.float64 if H.dtype == torch.float64 else torch.float32, device=H.device)
        acc.H.copy_(H)
        acc.nsamples = nsamples
        return acc

    @torch.no_grad()
    def add_batch(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (..., in_features) to the running average.

        Explained in :doc:`/book/spinquant/theory`.
        """
        _check_float_tensor("x", x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension in_features={self.in_features}, got shape {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features).to(self.H.dtype).to(self.H.device)  # (n, in)
        n = rows.shape[0]
        if n == 0:
            return
        total = self.nsamples + n
        self.H.mul_(self.nsamples / total)
        self.H.addmm_(rows.T, rows, alpha=2.0 / total)  # H += 2/N · XᵀX
        self.nsamples = total

    def hook(self, module: nn.Module) -> Any:
        """Register a forward hook on ``module`` adding its first input; returns the handle.

        Explained in :doc:`/book/spinquant/theory`.
        """
        return module.register_forward_hook(lambda _m, inputs, _out: self.add_batch(inputs[0]))


def _check_positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
    return v


@torch.no_grad()
def gptq_quantize_weight(w: torch.Tensor, H: torch.Tensor, bits: int, blocksize: int = 128,
                         percdamp: float = 0.01, clip_search: bool = True) -> torch.Tensor:
    """GPTQ-quantised copy of ``w`` (out, in) for the input Hessian ``H`` (in, in), dtype of w.

    The per-row scales come from ``w`` (with the clip search) before the loop; dead columns
    (``H_ii = 0``) become 0; damping ``percdamp · mean(diag H)``; blocks of ``blocksize`` columns
    (the last one may be partial). Computed in float32 (float64 for a float64 ``w``).

    Explained in :doc:`/book/spinquant/theory`.
    """
    _check_weight(w)
    _check_bits("bits", bits)
    _check_positive_int("blocksize", blocksize)
    if isinstance(percdamp, bool) or not isinstance(percdamp, (int, float)) or not percdamp >= 0:
        raise ValueError(f"percdamp must be a non-negative number, got {percdamp!r}")
    _check_float_tensor("H", H)
    cols = w.shape[1]
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"H must have shape ({cols}, {cols}) for w of shape {tuple(w.shape)}, got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H has non-finite entries")
    if bits == 16:
        return w.detach().clone()
    cdt = _compute_dtype(w)
    W = w.detach().to(cdt).clone()  # (out, in)
    scale = weight_scale(W, bits, clip_search)  # (out, 1), fixed before the loop
    H = H.detach().to(device=W.device, dtype=cdt).clone()  # (in, in)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    idx = torch.arange(cols, device=W.device)
    H[idx, idx] += percdamp * torch.mean(torch.diagonal(H))
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise ValueError(
            f"H + damping is not positive definite (percdamp={percdamp}); increase percdamp or check H"
        )
    U = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # H⁻¹ = UᵀU, (in, in)
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (out, B) the block, updated as its columns are quantised
        E1 = torch.zeros_like(W1)  # (out, B) scaled errors, for the lazy update of later blocks
        U1 = U[i1:i2, i1:i2]  # (B, B)
        for i in range(i2 - i1):
            col = W1[:, i]  # (out,)
            q = quantize_weight_with_scale(col, scale[:, 0], bits)  # (out,)
            Q[:, i1 + i] = q
            err = (col - q) / U1[i, i]  # (out,)
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]  # lazy batch update of the columns right of the block
    return Q.to(w.dtype)


@torch.no_grad()
def gptq_quantize_linear_(linear: nn.Linear, calib: HessianAccumulator | torch.Tensor, bits: int,
                          blocksize: int = 128, percdamp: float = 0.01, clip_search: bool = True) -> nn.Linear:
    """GPTQ in place: ``calib`` is a :class:`HessianAccumulator` or the layer's inputs (..., in).

    Explained in :doc:`/book/spinquant/theory`.
    """
    _check_linear(linear)
    if isinstance(calib, HessianAccumulator):
        H = calib.H
    elif isinstance(calib, torch.Tensor):
        acc = HessianAccumulator(linear.in_features, dtype=_compute_dtype(linear.weight), device=linear.weight.device)
        acc.add_batch(calib)
        H = acc.H
    else:
        raise TypeError(f"calib must be a HessianAccumulator or a tensor of inputs, got {type(calib).__name__}")
    linear.weight.copy_(gptq_quantize_weight(linear.weight, H, bits, blocksize, percdamp, clip_search))
    return linear


# ---------------------------------------------------------------------------------------------
# Whole models (transformers Llama family: model.model.layers)
# ---------------------------------------------------------------------------------------------
def _decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"model ({type(model).__name__}) must be a transformers Llama-family causal LM with "
            "decoder layers at model.model.layers (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, ...)"
        )
    return layers


def _layer_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """The linears of one decoder layer, keyed by their role (q_proj, ..., down_proj).

    A linear wrapped by another module (an online-Hadamard wrapper, say) is found by the role name
    anywhere in its path; a linear with no known role is refused.
    """
    roles = {r for group in GPTQ_SEQUENTIAL for r in group}
    found: dict[str, nn.Linear] = {}
    for name, mod in layer.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        role = [part for part in name.split(".") if part in roles]
        if len(role) != 1 or role[0] in found:
            raise ValueError(f"decoder layer has a linear {name!r} with no single known role among {sorted(roles)}")
        found[role[0]] = mod
    return found


@torch.no_grad()
def rtn_quantize_model_(model: nn.Module, bits: int, clip_search: bool = True) -> nn.Module:
    """RTN for every linear of every decoder layer in place; lm_head and embeddings untouched.

    Explained in :doc:`/book/spinquant/theory`.
    """
    _check_bits("bits", bits)
    for layer in _decoder_layers(model):
        for lin in _layer_linears(layer).values():
            rtn_quantize_linear_(lin, bits, clip_search)
    return model


class _StopForward(Exception):
    """Raised by a hook at the end of the decoder layer being calibrated: later layers are not run."""


def _calibration_batches(calib: Any) -> list[torch.Tensor]:
    if isinstance(calib, torch.Tensor):
        calib = [calib]
    if not isinstance(calib, Iterable):
        raise TypeError(f"calib must be a LongTensor of token ids (batch, seq) or a list of them, got {type(calib).__name__}")
    batches = list(calib)
    if not batches:
        raise ValueError("calib must hold at least one batch of token ids")
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dtype != torch.long or b.dim() != 2:
            raise ValueError(f"calib batch {i} must be a LongTensor of shape (batch, seq), got "
                             f"{type(b).__name__}{'' if not isinstance(b, torch.Tensor) else f' {b.dtype} {tuple(b.shape)}'}")
    return batches


@torch.no_grad()
def gptq_quantize_model_(model: nn.Module, calib: torch.Tensor | Sequence[torch.Tensor], bits: int,
                         blocksize: int = 128, percdamp: float = 0.01, clip_search: bool = True) -> nn.Module:
    """GPTQ for every decoder-layer linear of a transformers Llama-family model, in place.

    ``calib``: token ids (batch, seq) or a list of such batches. For each layer and each group of
    :data:`GPTQ_SEQUENTIAL` (q/k/v, o, gate/up, down), the calibration batches run through the
    model as it is at that moment (earlier layers and groups already quantised) up to the end of
    that layer, hooks accumulate each linear's Hessian, then GPTQ quantises the group. lm_head and
    the embeddings stay in full precision. Calibrate before any activation fake-quantisation is
    switched on (the official code does).

    Explained in :doc:`/book/spinquant/theory`.
    """
    _check_bits("bits", bits)
    batches = _calibration_batches(calib)
    layers = _decoder_layers(model)
    if bits == 16:
        return model
    was_training = model.training
    model.eval()
    try:
        for layer in layers:
            linears = _layer_linears(layer)

            def stop(*_: Any) -> None:
                raise _StopForward

            for group in GPTQ_SEQUENTIAL:
                members = {r: linears[r] for r in group if r in linears}
                if not members:
                    continue
                accs = {r: HessianAccumulator(lin.in_features, dtype=_compute_dtype(lin.weight), device=lin.weight.device)
                        for r, lin in members.items()}
                handles = [accs[r].hook(lin) for r, lin in members.items()]
                handles.append(layer.register_forward_hook(stop))
                try:
                    for ids in batches:
                        try:
                            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
                        except _StopForward:
                            pass
                finally:
                    for h in handles:
                        h.remove()
                for r, lin in members.items():
                    gptq_quantize_linear_(lin, accs[r], bits, blocksize, percdamp, clip_search)
    finally:
        model.train(was_training)
    return model
