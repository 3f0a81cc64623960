"""Group-wise asymmetric INT4/INT8 quantization whose range always includes 0, INT4 packing,
and stochastic rounding.

Q-GaLore (Zhang et al., "Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive
Low-Rank Gradients", arXiv 2407.08296, 2024) stores GaLore's projection matrices in INT4 and the
weights in INT8, each with one scale and one zero point per group of ``group_size`` consecutive
values (256 in the paper and the official code, VITA-Group/Q-GaLore), and requantizes the weights
after every update with stochastic rounding. The book explains it in Part II, GaLore chapter
(``book/galore/``); :mod:`mini.qgalore` builds on this module.

Quantization (b bits, one group x_1..x_G, L = 2^b - 1 levels above 0)
-----------------------------------------------------------------------
::

    lo = min(min_i x_i, 0),   hi = max(max_i x_i, 0)          # the range always contains 0
    s  = (hi - lo) / L        (s = 1 for an all-zero group)   # scale
    z  = floor(-lo / s + 1/2)  ∈ {0, ..., L}                  # integer zero point
    q_i = clamp(floor(x_i / s + z + 1/2), 0, L)               # nearest rounding
    x̂_i = (q_i - z) s                                         # dequantization

Because ``lo/s + z ∈ (-1/2, 1/2]``, ``x_i/s + z`` lies in ``(-1/2, L + 1/2]`` and the clamp only
ever moves a value that sits exactly half a step outside; so **every dequantized value lies
within half a quantization step of the original**, ``|x̂_i - x_i| ≤ s/2``, and 0 is represented
exactly (``q = z``).

Stochastic rounding
-------------------
``SR(y) = floor(y) + [u < y - floor(y)]`` with ``u ~ U[0, 1)``: it returns ``ceil(y)`` with
probability ``p = y - floor(y)`` and ``floor(y)`` otherwise, so
``E[SR(y)] = floor(y) + p = y`` (for integer y it returns y). It is unbiased: an update smaller
than half a step survives in expectation, where nearest rounding maps it back to the same code
every time and the update is lost (the tests and the lab show the drift of both). With
``stochastic=True`` the codes are ``clamp(SR(x/s + z), 0, L)``: each value lies within one step
of the original. Values within half a step of a group's ends (``y = x/s + z`` above L or below
0) are the only place SR is biased: the clamp cuts the code beyond the end, a bias of at most
half a step, on the group's extreme values only.

Storage
-------
:class:`GroupQuantized` holds ``data`` (uint8; INT4 codes packed two per byte by
:func:`pack_int4`, low nibble first), ``scale`` (float32, one per group), ``zero`` (uint8, one
per group), the original ``shape``, ``bits`` and ``group_size``. Groups run over the flattened
(row-major) tensor; the last group may be partial. ``nbytes`` counts all of it.

Differences from the official code (VITA-Group/Q-GaLore, ``utils/quantization.py``)
-------------------------------------------------------------------------------------
- It spends one byte per INT4 value; here two INT4 values share a byte.
- Its zero point ``z = clamp(-round(min/s), 0, L)`` with ``s = (max - min)/L`` clips groups whose
  values share one sign (INT4 ``[1, 2]`` dequantizes to ``[1, 1]``: ``z`` is clamped to 0); here
  the range includes 0, which costs at most one bit of resolution for one-sign groups and clips
  nothing.
- Rounding of half-integers is half-up (``floor(y + 1/2)``) rather than torch's half-to-even, so
  the Triton update kernel of :mod:`mini.qgalore.int8_linear` and its reference round alike.

Explained in :doc:`/book/qgalore/theory`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "GroupQuantized",
    "quantize_groupwise",
    "dequantize_groupwise",
    "pack_int4",
    "unpack_int4",
    "stochastic_round",
    "ALLOWED_BITS",
]

ALLOWED_BITS: tuple[int, ...] = (4, 8)


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in ALLOWED_BITS:
        raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {bits!r}")
    return bits


def _check_group_size(group_size: object) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    return group_size


@dataclass(eq=False)
class GroupQuantized:
    """A tensor quantized group-wise: codes, one scale and one zero point per group.

    It dequantizes as ``x̂ = (q - zero) * scale``, group by group.

    Explained in :doc:`/book/qgalore/theory`.
    """

    data: torch.Tensor  #: uint8 codes, ``(ceil(numel/2),)`` packed for 4 bits, ``(numel,)`` for 8
    scale: torch.Tensor  #: float32 ``(n_groups,)``
    zero: torch.Tensor  #: uint8 ``(n_groups,)``
    shape: tuple[int, ...]  #: the original shape
    bits: int  #: 4 or 8
    group_size: int  #: elements per group of the flattened tensor

    @property
    def numel(self) -> int:
        """Elements of the original tensor."""
        n = 1
        for s in self.shape:
            n *= int(s)
        return n

    @property
    def nbytes(self) -> int:
        """The size in bytes of the codes, scales and zero points."""
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero))

    def codes(self) -> torch.Tensor:
        """The unpacked integer codes, uint8 ``(numel,)``."""
        return unpack_int4(self.data, self.numel) if self.bits == 4 else self.data

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The tensor back in ``dtype`` and its original shape (:func:`dequantize_groupwise`)."""
        return dequantize_groupwise(self, dtype)

    def to(self, device: torch.device | str) -> "GroupQuantized":
        """A copy with codes, scales and zero points on ``device``."""
        return GroupQuantized(self.data.to(device), self.scale.to(device), self.zero.to(device),
                              tuple(self.shape), self.bits, self.group_size)


def stochastic_round(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``floor(x)`` or ``ceil(x)``, the latter with probability ``x - floor(x)``: ``E[SR(x)] = x``.

    Explained in :doc:`/book/qgalore/theory`.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return _sr_with(x, u)


def _sr_with(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Stochastic rounding with given uniforms ``u`` in [0, 1) (shared with the kernel reference)."""
    f = torch.floor(y)
    return f + (u < (y - f)).to(y.dtype)


def _group_view(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, int]:
    """Flatten, pad the last group with zeros (zeros never widen a range that includes 0)."""
    flat = x.reshape(-1)
    n = flat.numel()
    n_groups = max(1, -(-n // group_size))
    pad = n_groups * group_size - n
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(n_groups, group_size), n  # (n_groups, group_size)


def _scale_zero(g: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and integer zero point (as float) of a range that includes 0."""
    lo = torch.clamp(g.amin(dim=1), max=0.0)  # (n_groups,)
    hi = torch.clamp(g.amax(dim=1), min=0.0)
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.floor(-lo / scale + 0.5)
    return scale, zero


def quantize_groupwise(
    x: torch.Tensor,
    bits: int = 4,
    group_size: int = 256,
    stochastic: bool = False,
    generator: Optional[torch.Generator] = None,
) -> GroupQuantized:
    """Quantize ``x`` to ``bits`` ∈ {4, 8} per group of ``group_size`` flattened values.

    Nearest rounding (``|x̂ - x| ≤ scale/2``) or, with ``stochastic=True``, unbiased stochastic
    rounding drawing its uniforms from ``generator``. The last group may be partial.

    Explained in :doc:`/book/qgalore/theory`.
    """
    bits = _check_bits(bits)
    group_size = _check_group_size(group_size)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.numel() == 0:
        raise ValueError("x must have at least one element, got an empty tensor")
    levels = 2**bits - 1
    shape = tuple(x.shape)
    g, n = _group_view(x.detach().float(), group_size)  # (n_groups, group_size)
    scale, zero = _scale_zero(g, levels)
    y = g / scale[:, None] + zero[:, None]
    if stochastic:
        u = torch.rand(y.shape, generator=generator, device=y.device, dtype=y.dtype)
        q = _sr_with(y, u)
    else:
        q = torch.floor(y + 0.5)
    q = q.clamp_(0, levels).to(torch.uint8).reshape(-1)[:n]
    data = pack_int4(q) if bits == 4 else q.contiguous()
    return GroupQuantized(data, scale.contiguous(), zero.to(torch.uint8), shape, bits, group_size)


def dequantize_groupwise(qt: GroupQuantized, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero) * scale`` group by group, reshaped to ``qt.shape``, in ``dtype``.

    Explained in :doc:`/book/qgalore/theory`.
    """
    if not isinstance(qt, GroupQuantized):
        raise TypeError(f"qt must be a GroupQuantized, got {type(qt).__name__}")
    n = qt.numel
    q = qt.codes().float()  # (n,)
    n_groups = qt.scale.numel()
    pad = n_groups * qt.group_size - n
    if pad:
        q = torch.cat([q, q.new_zeros(pad)])
    q = q.view(n_groups, qt.group_size)
    w = (q - qt.zero.float()[:, None]) * qt.scale[:, None]  # (n_groups, group_size)
    return w.reshape(-1)[:n].reshape(qt.shape).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack uint8 values in [0, 15] two per byte (element 2i in the low nibble, 2i+1 high).

    Returns uint8 ``(ceil(numel/2),)``; an odd count leaves the last high nibble 0.

    Explained in :doc:`/book/qgalore/theory`.
    """
    if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8:
        raise TypeError(f"q must be a uint8 torch.Tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    flat = q.reshape(-1)
    if flat.numel() and int(flat.max()) > 15:
        raise ValueError(f"q must hold INT4 codes in [0, 15], got a maximum of {int(flat.max())}")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)  # (ceil(n/2), 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: the first ``numel`` INT4 codes as uint8 ``(numel,)``.

    Explained in :doc:`/book/qgalore/theory`.
    """
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 torch.Tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0 or numel > 2 * packed.numel():
        raise ValueError(f"numel must be an int in [0, {2 * packed.numel()}] for {packed.numel()} packed bytes, got {numel!r}")
    flat = packed.reshape(-1)
    out = torch.stack([flat & 0x0F, flat >> 4], dim=1).reshape(-1)  # (2 * bytes,)
    return out[:numel].contiguous()
