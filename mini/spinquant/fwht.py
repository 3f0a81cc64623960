"""The fast Walsh-Hadamard transform along the last dimension: ``y = x · H_n · scale``.

SpinQuant's online rotations (R3 on queries and keys after RoPE, R4 on the input of
``down_proj``; Liu et al., arXiv 2405.16406, Section 3) multiply activations by a Hadamard matrix
at run time. A dense ``x @ H`` costs ``2n²`` flops per row; the butterfly costs ``n log₂ n``
additions, because the Sylvester matrix factors: ``H_{2n} = H_2 ⊗ H_n``, so ``x·H_{2^m}`` is m
stages, stage ``h = 1, 2, 4, …, 2^{m-1}`` replacing each pair ``(x_i, x_{i+h})`` (bit h of i clear)
by ``(x_i + x_{i+h}, x_i - x_{i+h})``. With ``scale = 1/√n`` (the default) the transform is
orthonormal and, the Sylvester ``H`` being symmetric, its own inverse: ``fwht(fwht(x)) = x`` for
``n = 2^m`` (and for Paley II bases, which are symmetric; a Paley I base is skew, ``H_K + H_Kᵀ =
2I``, and there the inverse is ``x·Hᵀ``).

Orders ``n = K·2^m`` (K > 1 from a Paley construction, :mod:`mini.spinquant.hadamard`): with
``H_n = H_K ⊗ H_{2^m}`` and ``X`` the row reshaped ``(K, 2^m)``, ``x·H_n = H_Kᵀ · X · H_{2^m}``:
a butterfly on each of the K contiguous blocks and a K×K mix across blocks (``K²·2^m`` flops
instead of ``n²``). The official code does the same (``matmul_hadU``: butterfly, then the stored
``had_K``). The transform equals ``x @ hadamard(n)`` for every supported n.

The Triton kernel
-----------------
One program takes ``ROWS`` rows (a power of two; the last program's extra rows masked) and holds
them whole in registers as a ``(ROWS, KPAD, P)`` tile (``P = 2^m``, ``KPAD`` = K rounded up to a
power of two, padding rows zero). The K×K mix is a loop over the K blocks: load block ``i`` of
each row ``(ROWS, P)`` from memory and accumulate ``H_K[i, :] ⊗ block`` into the tile, so ``x``
is read once. The butterfly then runs in registers on the tile viewed as ``(ROWS·KPAD, P)``,
in Good's constant-geometry form ``H_{2^m} = M^m`` (I. J. Good, 1958), where one stage ``M`` maps
a block to ``(x_0 + x_1, x_2 + x_3, … | x_0 - x_1, x_2 - x_3, …)``: reshape to ``(·, P/2, 2)``,
pick ``a`` and ``b`` with two size-2 reductions (``tl.sum(·, axis=2)``), and write ``a + b`` and
``a - b`` into the two halves with ``tl.where``; every stage has the same shapes, so nothing
depends on the stage index. Only ``reshape``, ``sum``, ``where``
and broadcasting are used (no ``split``/``join``/``permute``), so the same code runs in the
interpreter and compiles for CUDA (checked for sm_80 on triton 3.9). Arithmetic is float32 whatever the input dtype (float32, float16, bfloat16); the result is
cast to the input's dtype. A tile holds at most ``MAX_KERNEL_TILE`` = 16384 values
(``KPAD·P``; every power of two up to 8192 fits, with ``ROWS`` chosen so ``ROWS·KPAD·P ≈ 4096``
when rows are short); larger rows raise ``ValueError`` pointing to ``backend='reference'``.

Bytes: the transform reads and writes ``x`` once (:func:`fwht_bytes`), the floor a copy kernel
sets on a GPU; the ``K²`` floats of ``H_K`` are negligible and stay in cache.

Explained in :doc:`/book/spinquant/theory`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mini.kernels.dispatch import HAS_TRITON, check_same_device, check_tensor, kernel_op
from mini.spinquant.hadamard import _base_signs, hadamard_base

__all__ = [
    "FLOAT_DTYPES",
    "MAX_KERNEL_TILE",
    "fwht",
    "fwht_bytes",
    "fwht_reference",
]

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
MAX_KERNEL_TILE = 16384  # KPAD · P values of one row held in one program's registers


# ---------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _fwht_kernel(
        x_ptr,  # (rows, K·P) float32 / float16 / bfloat16, contiguous
        hk_ptr,  # (K, K) float32 entries ±1: the base H_K (1×1 [1] for powers of two)
        out_ptr,  # (rows, K·P) same dtype as x
        rows,  # number of rows
        K,  # base order (runtime loop count)
        scale,  # float: 1/√n for the orthonormal transform
        P: tl.constexpr,  # 2^m, the butterfly length
        LOG_P: tl.constexpr,  # m
        KPAD: tl.constexpr,  # K rounded up to a power of two
        ROWS: tl.constexpr,  # rows per program (power of two)
    ):
        pid = tl.program_id(0)
        r = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) row indices
        rmask = r < rows
        kk = tl.arange(0, KPAD)  # (KPAD,) output block index
        jj = tl.arange(0, P)  # (P,) position inside a block
        n = K * P
        row_off = r[:, None] * n + jj[None, :]  # (ROWS, P) offsets of block 0
        # K×K mix: acc[r, k, j] = Σ_i H_K[i, k] · x[r, i·P + j]
        acc = tl.zeros((ROWS, KPAD, P), dtype=tl.float32)
        for i in range(K):
            xi = tl.load(x_ptr + row_off + i * P, mask=rmask[:, None], other=0.0).to(tl.float32)
            hrow = tl.load(hk_ptr + i * K + kk, mask=kk < K, other=0.0)  # (KPAD,) H_K[i, :]
            acc += hrow[None, :, None] * xi[:, None, :]  # (ROWS, KPAD, P)
        # Butterfly on every block of P, in Good's constant-geometry form H_P = M^m: one stage
        # maps a block (x_0, ..., x_{P-1}) to (x_0 + x_1, x_2 + x_3, ... | x_0 - x_1, x_2 - x_3, ...).
        lane = tl.arange(0, 2)
        y = tl.reshape(acc, (ROWS * KPAD, P))
        for _ in tl.static_range(LOG_P):
            y3 = tl.reshape(y, (ROWS * KPAD, P // 2, 2))  # adjacent pairs (x_2j, x_2j+1)
            a = tl.sum(tl.where(lane[None, None, :] == 0, y3, 0.0), axis=2)  # (ROWS·KPAD, P/2)
            b = tl.sum(tl.where(lane[None, None, :] == 1, y3, 0.0), axis=2)
            z = tl.where(lane[None, :, None] == 0, (a + b)[:, None, :], (a - b)[:, None, :])
            y = tl.reshape(z, (ROWS * KPAD, P))  # sums in the first half, differences after
        out = tl.reshape(y, (ROWS, KPAD, P)) * scale
        offs = r[:, None, None] * n + kk[None, :, None] * P + jj[None, None, :]  # (ROWS, KPAD, P)
        mask = rmask[:, None, None] & (kk < K)[None, :, None]
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Checks, reference
# ---------------------------------------------------------------------------------------------
def _check_inputs(x: torch.Tensor, scale: float | None, out: torch.Tensor | None,
                  dtypes: Sequence[torch.dtype], contiguous: bool) -> tuple[int, float]:
    check_tensor("x", x, dtypes=dtypes, contiguous=contiguous)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the transform runs along the last), got a scalar")
    n = x.shape[-1]
    if n == 0:
        raise ValueError(f"x's last dimension must be a positive Hadamard order, got shape {tuple(x.shape)}")
    hadamard_base(n)  # ValueError naming n and the nearest supported sizes
    if scale is None:
        scale = 1.0 / math.sqrt(n)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None (1/√n), got {scale!r}")
    if out is not None:
        check_tensor("out", out, dtypes=(x.dtype,), shape=tuple(x.shape))
        check_same_device(x=x, out=out)
    return n, float(scale)


def _butterfly(x: torch.Tensor) -> torch.Tensor:
    """``x · H_P`` (unnormalised Sylvester) along the last dim, P a power of two; same dtype."""
    P = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < P:
        y = x.reshape(*lead, P // (2 * h), 2, h)  # (..., groups, 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).reshape(*lead, P)
        h *= 2
    return x


@torch.no_grad()
def fwht_reference(x: torch.Tensor, scale: float | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ hadamard(n) · (scale·√n)`` in PyTorch: butterfly plus the K×K mix, float32 for
    half-precision inputs (float64 stays float64), cast back to x's dtype.

    Explained in :doc:`/book/spinquant/theory`.
    """
    n, scale = _check_inputs(x, scale, out, FLOAT_DTYPES, contiguous=False)
    base = hadamard_base(n)
    work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    P = 1 << base.m
    X = work.reshape(*x.shape[:-1], base.K, P)  # (..., K, P)
    Y = _butterfly(X)  # (..., K, P): X · H_P
    if base.K > 1:
        HK = _base_signs(base.K, base.construction, base.q).to(device=x.device, dtype=work.dtype)
        Y = torch.einsum("ik,...ip->...kp", HK, Y)  # H_Kᵀ · X · H_P
    res = (Y.reshape(x.shape) * scale).to(x.dtype)
    if out is None:
        return res
    out.copy_(res)
    return out


# ---------------------------------------------------------------------------------------------
# Launcher and public function
# ---------------------------------------------------------------------------------------------
def _tile(n: int) -> tuple[int, int, int, int, int]:
    """``(K, P, KPAD, ROWS, num_warps)`` for rows of n (``ValueError`` beyond one program)."""
    base = hadamard_base(n)
    P = 1 << base.m
    kpad = 1 << (base.K - 1).bit_length()
    tile = kpad * P
    if tile > MAX_KERNEL_TILE:
        raise ValueError(
            f"x's last dimension n={n} (K={base.K} padded to {kpad}, times 2^{base.m}) needs "
            f"{tile} values per row, more than the Triton kernel holds in one program "
            f"({MAX_KERNEL_TILE}); use backend='reference'"
        )
    rows = max(1, 4096 // tile)
    num_warps = 1 if rows * tile <= 256 else (4 if rows * tile <= 4096 else 8)
    return base.K, P, kpad, rows, num_warps


@kernel_op(reference=fwht_reference, name="fwht")
def _fwht_op(jit, x, scale=None, out=None):
    n, scale = _check_inputs(x, scale, out, KERNEL_DTYPES, contiguous=True)
    K, P, kpad, rows_per, num_warps = _tile(n)
    if out is None:
        out = torch.empty_like(x)
    else:
        check_tensor("out", out, dtypes=(x.dtype,))
    rows = x.numel() // n
    if rows == 0:
        return out
    base = hadamard_base(n)
    hk = _base_signs(base.K, base.construction, base.q).to(device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(rows, rows_per),)
    jit(_fwht_kernel)[grid](x, hk.contiguous(), out, rows, K, scale, P=P, LOG_P=P.bit_length() - 1,
                            KPAD=kpad, ROWS=rows_per, num_warps=num_warps)
    return out


def fwht(x: torch.Tensor, scale: float | None = None, out: torch.Tensor | None = None,
         backend: str = "auto") -> torch.Tensor:
    """``x @ hadamard(n)`` along the last dimension (orthonormal by default), fast.

    Args:
        x: float tensor ``(..., n)``, n any order :func:`mini.spinquant.hadamard.hadamard`
            supports (powers of two, K·2^m). The kernel takes float32, float16, bfloat16
            (contiguous; rows up to ``MAX_KERNEL_TILE`` values after padding K), the reference
            also float64.
        scale: multiplies the unnormalised transform; None means ``1/√n`` (orthonormal; its
            own inverse for n = 2^m).
        out: optional output buffer shaped and typed like x.
        backend: ``"auto"`` (Triton on CUDA, the reference on CPU), ``"triton"``,
            ``"interpret"`` or ``"reference"``.

    Explained in :doc:`/book/spinquant/theory`.
    """
    return _fwht_op(x, scale=scale, out=out, backend=backend)


def fwht_bytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes the transform must move: read ``x`` once and write ``y`` once (the copy floor).

    Explained in :doc:`/book/spinquant/theory`.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    numel = 1
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ValueError(f"shape must hold non-negative integers, got {tuple(shape)!r}")
        numel *= s
    return 2 * numel * torch.empty(0, dtype=dtype).element_size()
