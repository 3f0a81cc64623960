"""The fused 8-bit Adam update: dequantize, update the moments, requantize, write the update.

Part II of the book, GaLore chapter (``book/galore/``). The step of
:class:`mini.galore.adamw8bit.GaLoreAdamW8bit` is, per (projected) gradient ``g``, a dequantize
kernel for each moment, about eight float32 passes (the two moment updates, ``√V``, the
division) and a quantize kernel for each moment; bitsandbytes (Dettmers et al., "8-bit
Optimizers via Block-wise Quantization", ICLR 2022, arXiv 2110.02861, Section 2) fuses it all
into one kernel that reads the codes once and writes them once. This module is that kernel,
with the PyTorch reference beside it (same signature, same arithmetic op by op)::

    m = Q_m[q_m] · N_m[b],   v = Q_v[q_v] · N_v[b]           (dequantize, float32)
    m = β1·m + (1-β1)·g,     v = β2·v + (1-β2)·g²            (moments)
    N_m[b] = max_b |m|,  q_m = nearest code of m / N_m[b]    (requantize; v alike)
    u = -step_size · m / (√v / c2 + ε)                       (the update)

with ``c2 = √(1-β2ᵗ)`` and ``step_size = lr / (1-β1ᵗ)`` (bitsandbytes' Adam, as
``GaLoreAdamW8bit``). The codes and absmax are updated in place; ``u`` (float32, the low-rank
shape) is returned, for the caller to project back and apply (GaLore) or add to ``p``.

Kernel design
-------------
The requantization needs each block's new absmax before any code of the block can be written,
a reduction over the block. So one program owns one whole quantization block (``block_size``
values, padded to a power of two with a mask, as the blockwise kernels): it loads the block's
gradient, both code arrays (uint8) and both absmax (two floats), dequantizes through the two
256-entry maps (gathers from 1 KB tables that stay in L1), updates the moments in registers,
reduces ``max |m|`` and ``max |v|`` inside the program (``tl.max``), finds the nearest codes by
the same branch-free binary search over the midpoints as :mod:`mini.quant.blockwise`, and writes
codes, absmax and the update: per element 1 read of ``g`` (2-4 bytes), 2 code reads and 2 code
writes (1 byte each), 1 float32 write; the unfused path moves about 40 bytes per element. No
program touches another's block, so the in-place update is race free.

Arithmetic: the moments are rounded as torch rounds them (``m·β1`` rounded, then one fused
multiply-add with ``1-β1`` as ``add_(g, alpha=1-β1)`` does; ``v·β2`` rounded, then
``fma((1-β2)·g, g, ·)`` as ``addcmul_``; the ``1-β`` computed in float64 on the host and rounded
once, as torch rounds ``alpha``), and the division and square root are IEEE round-to-nearest
(``tl.math.div_rn``, ``tl.math.sqrt_rn``; Triton's ``/`` and ``tl.sqrt`` are approximate on
NVIDIA GPUs; the sm_90 PTX is checked for ``div.rn`` / ``sqrt.rn``). Under the interpreter the
codes and absmax equal the reference's bit for bit over several steps; the update differs by an
ulp or two, because torch's float32 ``sqrt`` on CPU is not correctly rounded (1 ulp off on
about 17% of values in torch 2.13's AVX-512 build), while ``sqrt_rn`` is
(``tests/test_adam8bit.py``). So :class:`~mini.galore.adamw8bit.GaLoreAdamW8bit` keeps its
unfused path for now (on CPU the dispatch would run the reference anyway): wiring the kernel in
waits for a GPU run that shows it bit for bit equal to the unfused CUDA path
(``bench/galore8bit_cpu.py``'s GPU section counts the differing codes and updates). Its speed
is claimed from a GPU run only.

Explained in :doc:`/book/galore/theory`.
"""
from __future__ import annotations

import math

import torch

from mini.kernels.dispatch import HAS_TRITON, check_same_device, check_tensor, kernel_op

from .blockwise import (
    FLOAT_DTYPES,
    _check_block_size,
    _kernel_tile,
    code_midpoints,
    dequantize_blockwise_reference,
    n_blocks,
    quantize_blockwise_reference,
)

__all__ = ["adam8bit_update", "adam8bit_update_reference"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _adam8bit_kernel(
        g_ptr,  # (n,) float32 / float16 / bfloat16 gradient, flattened
        qm_ptr,  # (n,) uint8 codes of m, updated in place
        am_ptr,  # (n_blocks,) float32 absmax of m, updated in place
        qv_ptr,  # (n,) uint8 codes of v, updated in place
        av_ptr,  # (n_blocks,) float32 absmax of v, updated in place
        code_m_ptr,  # (256,) float32 signed map
        code_v_ptr,  # (256,) float32 unsigned map
        mid_m_ptr,  # (255,) float32 midpoints of the signed map
        mid_v_ptr,  # (255,) float32 midpoints of the unsigned map
        out_ptr,  # (n,) float32 out: the update -step_size · m / (√v / c2 + ε)
        n,
        block_size,
        beta1,
        beta2,
        one_minus_beta1,  # 1 - beta1 (rounded from float64, as torch's alpha)
        one_minus_beta2,
        eps,
        c2,
        step_size,
        BLOCK: tl.constexpr,  # power of two >= block_size
    ):
        pid = tl.program_id(0)  # one program per quantization block
        lane = tl.arange(0, BLOCK)
        offs = pid.to(tl.int64) * block_size + lane
        mask = (lane < block_size) & (offs < n)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
        qm = tl.load(qm_ptr + offs, mask=mask, other=0).to(tl.int32)
        qv = tl.load(qv_ptr + offs, mask=mask, other=0).to(tl.int32)
        m = tl.load(code_m_ptr + qm) * tl.load(am_ptr + pid)  # dequantize
        v = tl.load(code_v_ptr + qv) * tl.load(av_ptr + pid)
        # moments, as torch's CPU kernels round them: m·β1 rounded, then fma(g, 1-β1, ·)
        # (add_ with alpha); v·β2 rounded, then fma((1-β2)·g, g, ·) (addcmul_). The 1-β are
        # computed in float64 on the host and rounded once, as torch rounds alpha / value.
        # Padding lanes: g = 0, masked below.
        m = tl.fma(g, one_minus_beta1, m * beta1)
        v = tl.fma(one_minus_beta2 * g, g, v * beta2)
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
        amax_m = tl.max(tl.abs(m), axis=0)  # the block's new absmax: a reduction in the program
        amax_v = tl.max(tl.abs(v), axis=0)
        tl.store(am_ptr + pid, amax_m)
        tl.store(av_ptr + pid, amax_v)
        den_m = tl.where(amax_m > 0.0, amax_m, 1.0)
        den_v = tl.where(amax_v > 0.0, amax_v, 1.0)
        sm = tl.math.div_rn(m, tl.zeros_like(m) + den_m)
        sv = tl.math.div_rn(v, tl.zeros_like(v) + den_v)
        sm = tl.minimum(tl.maximum(sm, -1.0), 1.0)
        sv = tl.minimum(tl.maximum(sv, -1.0), 1.0)
        im = tl.zeros((BLOCK,), dtype=tl.int32)  # binary search: #{j : mid[j] < s}
        iv = tl.zeros((BLOCK,), dtype=tl.int32)
        for level in tl.static_range(8):  # steps 128, 64, ..., 1
            cm = im + (128 >> level)
            cv = iv + (128 >> level)
            im = tl.where(tl.load(mid_m_ptr + cm - 1) < sm, cm, im)
            iv = tl.where(tl.load(mid_v_ptr + cv - 1) < sv, cv, iv)
        tl.store(qm_ptr + offs, im.to(tl.uint8), mask=mask)
        tl.store(qv_ptr + offs, iv.to(tl.uint8), mask=mask)
        den = tl.math.div_rn(tl.math.sqrt_rn(v), tl.zeros_like(v) + c2) + eps
        upd = tl.math.div_rn(m, den) * (-step_size)
        tl.store(out_ptr + offs, upd, mask=mask)


def _check(grad, q_m, absmax_m, q_v, absmax_v, code_m, code_v, block_size, betas, eps, c2, step_size, out,
           contiguous: bool) -> tuple[float, float]:
    check_tensor("grad", grad, dtypes=FLOAT_DTYPES, contiguous=contiguous)
    shape = tuple(grad.shape)
    _check_block_size(block_size)
    nb = n_blocks(grad.numel(), block_size)
    for name, q in (("q_m", q_m), ("q_v", q_v)):
        check_tensor(name, q, dtypes=(torch.uint8,), shape=shape, contiguous=contiguous)
    for name, a in (("absmax_m", absmax_m), ("absmax_v", absmax_v)):
        check_tensor(name, a, dtypes=(torch.float32,), shape=(nb,))
    for name, c in (("code_m", code_m), ("code_v", code_v)):
        check_tensor(name, c, dtypes=(torch.float32,), shape=(256,))
    if out is not None:
        check_tensor("out", out, dtypes=(torch.float32,), shape=shape)
    check_same_device(grad=grad, q_m=q_m, absmax_m=absmax_m, q_v=q_v, absmax_v=absmax_v,
                      code_m=code_m, code_v=code_v, **({} if out is None else {"out": out}))
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1, beta2 = (float(b) for b in betas)
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
    for name, value in (("eps", eps), ("c2", c2), ("step_size", step_size)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if c2 <= 0:
        raise ValueError(f"c2 must be positive (sqrt(1 - beta2**step)), got {c2!r}")
    return beta1, beta2


@torch.no_grad()
def adam8bit_update_reference(
    grad: torch.Tensor,
    q_m: torch.Tensor,
    absmax_m: torch.Tensor,
    q_v: torch.Tensor,
    absmax_v: torch.Tensor,
    code_m: torch.Tensor,
    code_v: torch.Tensor,
    block_size: int = 256,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    c2: float = 1.0,
    step_size: float = 1e-3,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The 8-bit Adam step in PyTorch: updates codes and absmax in place, returns the update.

    The same operations as :meth:`GaLoreAdamW8bit.adam_direction
    <mini.galore.adamw8bit.GaLoreAdamW8bit.adam_direction>` followed by ``mul_(-step_size)``.

    Explained in :doc:`/book/galore/theory`.
    """
    beta1, beta2 = _check(grad, q_m, absmax_m, q_v, absmax_v, code_m, code_v, block_size,
                          betas, eps, c2, step_size, out, contiguous=False)
    g = grad.float()
    m = dequantize_blockwise_reference(q_m, absmax_m, code_m, block_size, validate=False)  # (shape) f32
    v = dequantize_blockwise_reference(q_v, absmax_v, code_v, block_size, validate=False)
    m.mul_(beta1).add_(g, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    quantize_blockwise_reference(m, code_m, block_size, out=(q_m, absmax_m), validate=False)
    quantize_blockwise_reference(v, code_v, block_size, out=(q_v, absmax_v), validate=False)
    den = v.sqrt_().div_(c2).add_(eps)  # √v / c2 + ε, in v's buffer
    upd = torch.div(m, den, out=m).mul_(-step_size)  # (shape) float32
    if out is None:
        return upd
    out.copy_(upd)
    return out


@kernel_op(reference=adam8bit_update_reference, name="adam8bit_update")
def _adam8bit_op(jit, grad, q_m, absmax_m, q_v, absmax_v, code_m, code_v, block_size=256,
                 betas=(0.9, 0.999), eps=1e-8, c2=1.0, step_size=1e-3, out=None):
    beta1, beta2 = _check(grad, q_m, absmax_m, q_v, absmax_v, code_m, code_v, block_size,
                          betas, eps, c2, step_size, out, contiguous=True)
    if out is None:
        out = torch.empty(grad.shape, device=grad.device, dtype=torch.float32)
    nb = n_blocks(grad.numel(), block_size)
    if nb == 0:
        return out
    tile, num_warps = _kernel_tile(block_size)
    mid_m = code_midpoints(code_m).contiguous()  # (255,)
    mid_v = code_midpoints(code_v).contiguous()
    jit(_adam8bit_kernel)[(nb,)](
        grad, q_m, absmax_m, q_v, absmax_v, code_m, code_v, mid_m, mid_v, out,
        grad.numel(), block_size, beta1, beta2, 1.0 - beta1, 1.0 - beta2, float(eps), float(c2), float(step_size),
        BLOCK=tile, num_warps=num_warps,
    )
    return out


def adam8bit_update(
    grad: torch.Tensor,
    q_m: torch.Tensor,
    absmax_m: torch.Tensor,
    q_v: torch.Tensor,
    absmax_v: torch.Tensor,
    code_m: torch.Tensor,
    code_v: torch.Tensor,
    block_size: int = 256,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    c2: float = 1.0,
    step_size: float = 1e-3,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One fused 8-bit Adam step on block-wise quantized moments (see the module docstring).

    Explained in :doc:`/book/galore/theory`.

    Args:
        grad: the (projected) gradient, float32 / float16 / bfloat16, any shape (contiguous
            for the kernel).
        q_m, q_v: uint8 codes of the moments, shaped like ``grad``; updated in place.
        absmax_m, absmax_v: float32 (n_blocks,) block absmax; updated in place.
        code_m, code_v: the (256,) float32 maps, ``dynamic_map(True)`` and ``dynamic_map(False)``.
        block_size: values per block (default 256).
        betas, eps: Adam's hyperparameters.
        c2: ``√(1 − β2ᵗ)`` (1 without bias correction).
        step_size: ``lr / (1 − β1ᵗ)`` (``lr`` without bias correction).
        out: optional float32 buffer shaped like ``grad`` for the update.
        backend: ``"auto"`` (Triton on CUDA, the reference on CPU), ``"triton"``,
            ``"interpret"`` or ``"reference"``.

    Returns the update ``-step_size · m / (√v / c2 + ε)``, float32, shaped like ``grad``.
    """
    return _adam8bit_op(grad, q_m, absmax_m, q_v, absmax_v, code_m, code_v, block_size=block_size,
                        betas=betas, eps=eps, c2=c2, step_size=step_size, out=out, backend=backend)
