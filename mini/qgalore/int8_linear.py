"""A linear layer with INT8 group-wise weights and a fused stochastic-rounding update kernel.

Q-GaLore (Zhang et al., arXiv 2407.08296, 2024) keeps the weights in INT8 with one scale and
one zero point per group of 256 values, computes the dense weight gradient in the layer's
backward, hands it to a per-layer optimizer hook, and writes the update back as ::

    W  = (q - z) s                     dequantize (per group)
    W' = W + Δ                         Δ: the optimizer's update (GaLore's back-projection)
    lo = min(min W', 0), hi = max(max W', 0)
    s' = (hi - lo) / 255,  z' = floor(-lo/s' + 1/2)      fresh scale and zero point
    q' = clamp(SR(W'/s' + z'), 0, 255)
    SR(y) = floor(y) + [u < y - floor(y)],  u ~ U[0, 1)   stochastic rounding

Stochastic rounding is what makes this work: ``E[q'] = W'/s' + z'`` (see
:mod:`mini.quant.groupwise` for the proof), so updates smaller than half a quantization step
accumulate in expectation; rounding to nearest throws them away (the paper: perplexity rises by
7.86 at 60M without it). The book explains this in Part II, Q-GaLore chapter (``book/qgalore/``).

The update, fused
-----------------
:func:`sr_update` does all of it in one Triton kernel, one program per group: load the group's
codes, scale and zero point, dequantize, add Δ, reduce the new min/max (0 included), compute the
new scale and zero point, stochastically round with the uniforms ``rand`` and store the codes,
the scale and the zero point (in place when ``out`` is the layer's own buffers: a program reads
its whole group before it writes). The uniforms come in as a tensor drawn by torch from the
caller's generator, so the kernel and :func:`sr_update_reference` see the same random numbers.
Its divisions are IEEE round-to-nearest (``tl.math.div_rn``, as the blockwise quantizer's;
Triton's ``/`` on float32 is an approximate division on NVIDIA GPUs) and it is compiled without
FMA contraction (``(q − z)·s + Δ`` rounded twice, as in PyTorch), so it computes the reference's
operations in the same order and rounding: they agree exactly on the interpreter, and the tests
lower the kernel for sm_90 to check the divisions. The tests include groups whose values share
one sign, where dropping "the range includes 0" would wrap the zero point. Bytes moved per weight: 1 (codes) + 4 (Δ, float32) + 4 (uniforms) + 1 (codes out),
plus 2 × 5 per group: about 10 bytes per weight; the bench compares that with the copy bandwidth.

Gradients
---------
The weight is not an ``nn.Parameter``: a custom autograd Function computes ``y = x Wᵀ + b`` with
``W`` dequantized, and in backward returns ``∂L/∂x = g W`` and the dense ``∂L/∂W = gᵀ x`` (and
the bias's gradient through the ordinary ``bias`` Parameter). It saves only ``x`` and dequantizes
``W`` from the codes again in backward, as the official ``W8Linear`` does: a saved dense copy
would hold 4 bytes per weight for the whole backward, more than the bf16 weight the INT8 codes
replace. The weight must therefore not change between a call's forward and its backward (a
layer called twice in one forward while a per-layer hook updates it in backward): backward
raises a RuntimeError then rather than use the new weight. The dense weight gradient goes to
every hook registered with :meth:`Int8Linear.register_weight_grad_hook` (``fn(layer, grad)``,
Q-GaLore's per-layer optimizer step); with no hook it is accumulated into ``layer.weight_grad``
(like ``.grad``: summed over backward calls until set to None).

Differences from the official code: the codes are stored as uint8 with an integer zero point
(asymmetric INT8, the official code's layout), but the range of every group includes 0 (the
official zero point is clamped, which clips one-sign groups), the rounding is half-up, and the
dequantize-add-requantize runs in one kernel instead of several PyTorch ops.

Explained in :doc:`/book/qgalore/theory`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from mini.kernels.dispatch import HAS_TRITON, check_same_device, check_tensor, kernel_op
from mini.runtime import autocast_dtype
from mini.quant.groupwise import quantize_groupwise

__all__ = ["Int8Linear", "sr_update", "sr_update_reference", "update_bytes"]

LEVELS = 255  # 8-bit codes 0..255

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _sr_update_kernel(
        codes_ptr,  # (n,) uint8 codes in
        scale_ptr,  # (n_groups,) float32 scales in
        zero_ptr,  # (n_groups,) uint8 zero points in
        delta_ptr,  # (n,) float32 update Δ
        rand_ptr,  # (n,) float32 uniforms in [0, 1)
        codes_out_ptr,  # (n,) uint8 codes out (may alias codes_ptr)
        scale_out_ptr,  # (n_groups,) float32 scales out (may alias scale_ptr)
        zero_out_ptr,  # (n_groups,) uint8 zero points out (may alias zero_ptr)
        n,  # number of weights
        group_size,  # values per group (the last group may be partial)
        BLOCK: tl.constexpr,  # power of two >= group_size
    ):
        gid = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        idx = gid * group_size + offs
        mask = (offs < group_size) & (idx < n)
        q = tl.load(codes_ptr + idx, mask=mask, other=0).to(tl.float32)
        s = tl.load(scale_ptr + gid)
        z = tl.load(zero_ptr + gid).to(tl.float32)
        d = tl.load(delta_ptr + idx, mask=mask, other=0.0)
        u = tl.load(rand_ptr + idx, mask=mask, other=0.0)
        w = (q - z) * s + d  # dequantize and update
        lo = tl.minimum(tl.min(tl.where(mask, w, 0.0), axis=0), 0.0)  # range includes 0
        hi = tl.maximum(tl.max(tl.where(mask, w, 0.0), axis=0), 0.0)
        # IEEE round-to-nearest divisions (Triton's `/` on float32 is approximate on NVIDIA GPUs),
        # so the compiled kernel computes the reference's scales, zero points and codes
        s_new = tl.math.div_rn(hi - lo, 255.0)
        s_new = tl.where(s_new > 0.0, s_new, 1.0)
        z_new = tl.floor(tl.math.div_rn(-lo, s_new) + 0.5)
        y = tl.math.div_rn(w, tl.zeros_like(w) + s_new) + z_new
        f = tl.floor(y)
        r = f + tl.where(u < y - f, 1.0, 0.0)  # stochastic rounding
        r = tl.minimum(tl.maximum(r, 0.0), 255.0)
        tl.store(codes_out_ptr + idx, r.to(tl.uint8), mask=mask)
        tl.store(scale_out_ptr + gid, s_new)
        tl.store(zero_out_ptr + gid, z_new.to(tl.uint8))


def _check_update_args(codes, scale, zero, delta, rand, group_size):
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    check_tensor("codes", codes, dtypes=(torch.uint8,))
    n = codes.numel()
    n_groups = -(-n // group_size)
    check_tensor("scale", scale, dtypes=(torch.float32,), shape=(n_groups,))
    check_tensor("zero", zero, dtypes=(torch.uint8,), shape=(n_groups,))
    check_tensor("delta", delta, dtypes=(torch.float32,))
    if tuple(delta.shape) != tuple(codes.shape):
        raise ValueError(f"delta must have the weight's shape {tuple(codes.shape)}, got {tuple(delta.shape)}")
    check_tensor("rand", rand, dtypes=(torch.float32,))
    if tuple(rand.shape) != tuple(codes.shape):
        raise ValueError(f"rand must have the weight's shape {tuple(codes.shape)}, got {tuple(rand.shape)}")
    check_same_device(codes=codes, scale=scale, zero=zero, delta=delta, rand=rand)
    return n, n_groups


def _outputs(out, codes, scale, zero):
    if out is None:
        return torch.empty_like(codes), torch.empty_like(scale), torch.empty_like(zero)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        raise TypeError("out must be a tuple (codes, scale, zero)")
    for name, t, like in zip(("out[0] (codes)", "out[1] (scale)", "out[2] (zero)"), out, (codes, scale, zero)):
        check_tensor(name, t, dtypes=(like.dtype,), shape=tuple(like.shape))
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device}, the weights on {like.device}")
    return tuple(out)


@torch.no_grad()
def sr_update_reference(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    delta: torch.Tensor,
    rand: torch.Tensor,
    group_size: int,
    out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PyTorch reference of the fused update: returns ``(codes', scale', zero')``.

    ``codes`` uint8 (any shape, groups over the flattened weight), ``scale`` float32 and
    ``zero`` uint8 ``(n_groups,)``, ``delta`` and ``rand`` float32 of the weight's shape.

    Groups are independent, so the reference runs over chunks of groups (about 64K weights
    each): its float32 temporaries stay a few chunks' worth instead of several copies of the
    weight, which matters on the CPU, where this is what ``sr_update`` runs inside backward.

    Explained in :doc:`/book/qgalore/theory`.
    """
    n, n_groups = _check_update_args(codes, scale, zero, delta, rand, group_size)
    out = _outputs(out, codes, scale, zero)
    q_all, d_all, u_all = codes.reshape(-1), delta.reshape(-1), rand.reshape(-1)
    out_codes = out[0].view(-1)
    chunk = max(1, _SR_CHUNK // group_size)  # groups per chunk
    for g0 in range(0, n_groups, chunk):
        g1 = min(n_groups, g0 + chunk)
        a, b = g0 * group_size, min(n, g1 * group_size)
        r, s_new, z_new = _sr_groups(q_all[a:b], d_all[a:b], u_all[a:b], zero[g0:g1], scale[g0:g1], group_size)
        out_codes[a:b].copy_(r)
        out[1][g0:g1].copy_(s_new)
        out[2][g0:g1].copy_(z_new)
    return out  # type: ignore[return-value]


_SR_CHUNK = 1 << 16  # weights per chunk of the reference


def _sr_groups(
    codes: torch.Tensor, delta: torch.Tensor, rand: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk of whole groups (the last may be short): new uint8 codes (n,), scales, zeros."""
    n_groups = zero.numel()
    n = codes.numel()
    pad = n_groups * group_size - n
    q = codes.float()
    d, u = delta, rand
    valid = torch.ones(n, dtype=torch.bool, device=codes.device)
    if pad:
        q = torch.cat([q, q.new_zeros(pad)])
        d = torch.cat([d, d.new_zeros(pad)])
        u = torch.cat([u, u.new_zeros(pad)])
        valid = torch.cat([valid, valid.new_zeros(pad)])
    q, d, u, valid = (t.view(n_groups, group_size) for t in (q, d, u, valid))
    w = (q - zero.float()[:, None]) * scale[:, None] + d  # (n_groups, group_size)
    wz = torch.where(valid, w, torch.zeros_like(w))
    lo = torch.clamp(wz.amin(dim=1), max=0.0)
    hi = torch.clamp(wz.amax(dim=1), min=0.0)
    s_new = (hi - lo) / 255.0
    s_new = torch.where(s_new > 0, s_new, torch.ones_like(s_new))
    z_new = torch.floor(-lo / s_new + 0.5)
    y = w / s_new[:, None] + z_new[:, None]
    f = torch.floor(y)
    r = (f + (u < y - f).float()).clamp_(0.0, 255.0)
    return r.reshape(-1)[:n].to(torch.uint8), s_new, z_new.to(torch.uint8)


@kernel_op(reference=sr_update_reference, name="sr_update")
def _sr_update_op(jit, codes, scale, zero, delta, rand, group_size, out=None):
    n, n_groups = _check_update_args(codes, scale, zero, delta, rand, group_size)
    for name, t in (("codes", codes), ("delta", delta), ("rand", rand)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    out = _outputs(out, codes, scale, zero)
    block = max(16, triton.next_power_of_2(group_size))
    jit(_sr_update_kernel)[(n_groups,)](
        codes, scale, zero, delta, rand, out[0], out[1], out[2], n, group_size, BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
        enable_fp_fusion=False,  # (q − z)·s + Δ rounded twice, as the reference (no FMA)
    )
    return out


def sr_update(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    delta: torch.Tensor,
    rand: torch.Tensor,
    group_size: int,
    out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dequantize, add ``delta``, requantize with fresh scales and stochastic rounding (fused).

    Same arguments as :func:`sr_update_reference`; ``out=(codes, scale, zero)`` may be the input
    buffers (in place). ``backend``: ``"auto"`` (Triton on CUDA, the reference on CPU),
    ``"triton"``, ``"interpret"`` or ``"reference"``.

    Explained in :doc:`/labs/qgalore/rounding`.
    """
    return _sr_update_op(codes, scale, zero, delta, rand, group_size, backend=backend, out=out)


def update_bytes(numel: int, group_size: int) -> int:
    """Compulsory DRAM bytes of one fused update of ``numel`` weights.

    Explained in :doc:`/book/qgalore/theory`.
    """
    n_groups = -(-numel // group_size)
    return numel * (1 + 4 + 4 + 1) + n_groups * 2 * (4 + 1)


class _Int8LinearFn(torch.autograd.Function):
    """``y = x Wᵀ + b`` with ``W`` dequantized from the layer's INT8 codes in forward and again in
    backward: only ``x`` is saved, never a dense copy of ``W`` (as the official ``W8Linear``)."""

    @staticmethod
    def forward(ctx, x, bias, anchor, layer, dtype):  # x (..., in)
        weight = layer.dequantized_weight(dtype)  # (out, in), a temporary: not saved
        ctx.save_for_backward(x)
        ctx.layer, ctx.dtype, ctx.version = layer, dtype, layer._weight_version()
        ctx.has_bias = bias is not None
        y = x.matmul(weight.t())  # (..., out)
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, g):  # g (..., out)
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        gx = None
        if ctx.needs_input_grad[0]:
            if layer._weight_version() != ctx.version:
                raise RuntimeError(
                    "Int8Linear's weight was updated between this call's forward and its backward "
                    "(e.g. the layer was called twice in one forward while a per-layer optimizer hook "
                    "updates it in backward); the layer keeps no dense copy of the old weight, so "
                    "call it once per forward/backward, or update it after backward")
            weight = layer.dequantized_weight(ctx.dtype)  # (out, in), dequantized again
            gx = g.matmul(weight.to(g.dtype))  # (..., in)
        gw = g.reshape(-1, g.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]).to(g.dtype))  # (out, in)
        layer._deliver_weight_grad(gw)
        gb = g.reshape(-1, g.shape[-1]).sum(0) if ctx.has_bias else None
        return gx, gb, None, None, None


class _HookHandle:
    """The handle :meth:`~mini.qgalore.int8_linear.Int8Linear.register_weight_grad_hook` returns;
    :meth:`remove` detaches the hook."""

    def __init__(self, hooks: dict, key: int):
        self._hooks, self._key = hooks, key

    def remove(self) -> None:
        self._hooks.pop(self._key, None)


class Int8Linear(nn.Module):
    """``y = x Wᵀ + b`` with ``W`` stored as INT8 codes, one scale and zero point per group.

    Buffers: ``codes`` uint8 ``(out, in)``, ``scale`` float32 and ``zero`` uint8 ``(n_groups,)``,
    groups of ``group_size`` over the flattened weight (256: the paper's). ``bias`` is an
    ordinary float Parameter. The dense weight gradient goes to the hooks of
    :meth:`register_weight_grad_hook`, else into ``weight_grad``.

    Explained in :doc:`/labs/qgalore/rounding`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, group_size: int = 256,
                 device: torch.device | str | None = None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features), ("group_size", group_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        w = torch.empty(out_features, in_features, device=device)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5))  # nn.Linear's initialisation
        n_groups = -(-w.numel() // group_size)
        self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.ones(n_groups, device=device))
        self.register_buffer("zero", torch.zeros(n_groups, dtype=torch.uint8, device=device))
        self._updates = 0  # weight writes by set_weight_ / apply_update_ (see _weight_version)
        self.bias = nn.Parameter(torch.empty(out_features, device=device)) if bias else None
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.set_weight_(w)
        self.weight_grad: Optional[torch.Tensor] = None
        self._hooks: dict[int, Callable[["Int8Linear", torch.Tensor], None]] = {}
        self._next_hook = 0

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 256) -> "Int8Linear":
        """Quantize an ``nn.Linear``'s weight (nearest rounding); the bias is copied."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    group_size=group_size, device=linear.weight.device)
        layer.set_weight_(linear.weight.detach())
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias.detach().float())
        return layer

    @torch.no_grad()
    def set_weight_(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (out, in) into the layer with nearest rounding."""
        check_tensor("weight", weight, shape=(self.out_features, self.in_features), contiguous=False)
        qt = quantize_groupwise(weight.float(), bits=8, group_size=self.group_size)
        self._updates = getattr(self, "_updates", 0) + 1
        self.codes.copy_(qt.data.view(self.out_features, self.in_features))
        self.scale.copy_(qt.scale)
        self.zero.copy_(qt.zero)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight ``(out, in)``: ``(q - zero) * scale`` per group."""
        n = self.codes.numel()
        n_groups = self.scale.numel()
        q = self.codes.reshape(-1).float()
        pad = n_groups * self.group_size - n
        if pad:
            q = torch.cat([q, q.new_zeros(pad)])
        w = (q.view(n_groups, self.group_size) - self.zero.float()[:, None]) * self.scale[:, None]
        return w.reshape(-1)[:n].view(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        """``y = x Wᵀ + b`` with ``W`` dequantized; the weight gradient goes to the hooks.

        Under ``torch.autocast`` (as ``nn.Linear``): input, dequantized weight and bias in
        autocast's dtype, output in that dtype; the weight gradient delivered is in that dtype
        too, the bias's gradient in the bias's own dtype.
        """
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have last dimension {self.in_features}, got shape {tuple(x.shape)}")
        dtype = autocast_dtype(x)
        if dtype is not None:  # torch.autocast: compute in its dtype, as nn.Linear does
            bias = None if self.bias is None else self.bias.to(dtype)  # differentiable cast
            with torch.autocast(x.device.type, enabled=False):
                return self._linear(x.to(dtype), bias)
        return self._linear(x, self.bias)

    def _linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = x.dtype if x.is_floating_point() else torch.float32
        # A fresh empty leaf that requires grad, so backward runs (and the weight's gradient is
        # delivered) even when neither x nor the bias requires grad.
        anchor = torch.empty(0, device=x.device, requires_grad=torch.is_grad_enabled())
        return _Int8LinearFn.apply(x, bias, anchor, self, dtype)

    def _weight_version(self) -> tuple[int, ...]:
        """Changes whenever the weight does: the layer's update counter (the Triton kernel writes
        through pointers, which torch's version counters do not see) and the buffers' versions."""
        return (getattr(self, "_updates", 0), self.codes._version, self.scale._version, self.zero._version)

    def register_weight_grad_hook(self, fn: Callable[["Int8Linear", torch.Tensor], None]) -> _HookHandle:
        """Call ``fn(layer, grad)`` with the dense weight gradient ``(out, in)`` in every backward.

        While a hook is registered ``weight_grad`` is not filled. Returns a handle with ``remove()``.
        """
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        key = self._next_hook
        self._next_hook += 1
        self._hooks[key] = fn
        return _HookHandle(self._hooks, key)

    def _deliver_weight_grad(self, grad: torch.Tensor) -> None:
        if self._hooks:
            for fn in list(self._hooks.values()):
                fn(self, grad)
        elif self.weight_grad is None:
            self.weight_grad = grad.detach().clone()
        else:
            self.weight_grad += grad.detach()

    @torch.no_grad()
    def apply_update_(self, delta: torch.Tensor, generator: Optional[torch.Generator] = None,
                      backend: str = "auto") -> None:
        """``W ← requantize_SR(W + delta)`` with fresh per-group scales, in one fused kernel.

        ``delta``: float32 ``(out, in)`` on the layer's device; uniforms drawn from ``generator``
        (which must live on that device, as torch requires).
        """
        if not isinstance(delta, torch.Tensor):
            raise TypeError(f"delta must be a torch.Tensor, got {type(delta).__name__}")
        if tuple(delta.shape) != (self.out_features, self.in_features):
            raise ValueError(f"delta must have shape {(self.out_features, self.in_features)}, got {tuple(delta.shape)}")
        if delta.dtype != torch.float32:
            raise TypeError(f"delta must have dtype torch.float32, got {delta.dtype}")
        if delta.device != self.codes.device:
            raise ValueError(f"delta is on {delta.device}, the layer on {self.codes.device}")
        rand = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32)
        self._updates = getattr(self, "_updates", 0) + 1
        sr_update(self.codes, self.scale, self.zero, delta.contiguous(), rand, self.group_size,
                  out=(self.codes, self.scale, self.zero), backend=backend)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        """``nn.Module._apply`` (``.to``, ``.half``, ``.cuda`` …) that moves ``scale`` but keeps it float32.

        ``model.to(torch.bfloat16)`` casts every floating buffer; a bfloat16 scale would lose 16
        bits of every group's step and the update kernel needs float32. The bias follows ``fn``.
        """
        original = self.scale  # float32 (n_groups,)
        super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:  # fn cast it: take its device, not its dtype
            self._buffers["scale"] = original.to(device=self.scale.device, dtype=torch.float32)
        return self

    @property
    def nbytes(self) -> int:
        """The size in bytes of the quantized weight (codes, scales, zero points; bias excluded)."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group_size={self.group_size}")
