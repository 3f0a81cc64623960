"""Tests of mini.quant.groupwise: group-wise INT4/INT8 quantization, packing, stochastic rounding."""
from __future__ import annotations

import pytest
import torch

from mini.quant.groupwise import (
    GroupQuantized,
    dequantize_groupwise,
    pack_int4,
    quantize_groupwise,
    stochastic_round,
    unpack_int4,
)


def _per_element_scale(qt: GroupQuantized) -> torch.Tensor:
    return qt.scale.repeat_interleave(qt.group_size)[: qt.numel].reshape(qt.shape)


def _cases(gen: torch.Generator) -> list[torch.Tensor]:
    return [
        torch.randn(1000, generator=gen),  # not a multiple of 256 or 64
        torch.randn(7, 13, generator=gen) * 50,
        torch.rand(300, generator=gen) + 1.0,  # one sign, positive, far from 0
        -torch.rand(17, 19, generator=gen) - 3.0,  # one sign, negative
        torch.full((300,), 2.5),  # constant groups
        torch.zeros(100),  # zeros
        torch.tensor([1.0, 2.0]),
        torch.randn(1, generator=gen),  # a single value
    ]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [1, 7, 64, 256, 1000])
def test_within_half_a_step(bits, group_size):
    gen = torch.Generator().manual_seed(bits * 1000 + group_size)
    for x in _cases(gen):
        qt = quantize_groupwise(x, bits=bits, group_size=group_size)
        xh = qt.dequantize()
        assert xh.shape == x.shape and xh.dtype == torch.float32
        step = _per_element_scale(qt)
        err = (xh - x).abs()
        assert bool((err <= step / 2 * (1 + 1e-5) + 1e-7).all()), float((err / step).max())
        codes = qt.codes()
        assert int(codes.max()) <= 2**bits - 1
        # 0 is represented exactly: the zero point is an integer code
        assert bool((qt.zero.long() <= 2**bits - 1).all())


def test_matches_a_float64_reference():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1000, generator=gen) * 0.1 + 0.05
    for bits in (4, 8):
        qt = quantize_groupwise(x, bits=bits, group_size=64)
        L = 2**bits - 1
        xd = torch.cat([x.double(), x.new_zeros(1024 - 1000).double()]).view(16, 64)
        lo = xd.min(1).values.clamp(max=0)
        hi = xd.max(1).values.clamp(min=0)
        s = (hi - lo) / L
        z = torch.floor(-lo / s + 0.5)
        q = torch.clamp(torch.floor(xd / s[:, None] + z[:, None] + 0.5), 0, L).reshape(-1)[:1000]
        torch.testing.assert_close(qt.scale.double(), s, rtol=1e-6, atol=0)
        assert torch.equal(qt.zero.long(), z.long())
        agree = (qt.codes().long() == q.long()).float().mean()
        assert float(agree) > 0.999  # float32 vs float64 can only differ at exact ties


def _official_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The official Q-GaLore formula (one group): the zero point is clamped, so ranges without 0 clip."""
    L = 2**bits - 1
    s = (w.max() - w.min()) / L
    z = torch.clamp(-torch.round(w.min() / s), 0, L)
    q = torch.clamp(torch.round(w / s) + z, 0, L)
    return (q - z) * s


def test_one_sign_group_is_not_clipped_unlike_the_official_code():
    x = torch.tensor([1.0, 2.0])
    official = _official_quantize(x, 4)
    torch.testing.assert_close(official, torch.tensor([1.0, 1.0]))  # the official code clips 2 -> 1
    ours = quantize_groupwise(x, bits=4, group_size=256).dequantize()
    step = 2.0 / 15
    assert bool(((ours - x).abs() <= step / 2 + 1e-7).all()), ours
    assert float(ours[1]) == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [0, 1, 2, 3, 16, 32, "4", 4.0, True, None])
def test_bits_must_be_4_or_8(bad):
    with pytest.raises(ValueError, match=r"bits must be one of \(4, 8\)"):
        quantize_groupwise(torch.randn(10), bits=bad)


@pytest.mark.parametrize("bad", [0, -1, -256, 2.5, True, "256", None])
def test_group_size_must_be_positive_int(bad):
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        quantize_groupwise(torch.randn(10), bits=8, group_size=bad)


def test_other_input_errors():
    with pytest.raises(TypeError, match="x must be a floating-point"):
        quantize_groupwise(torch.arange(10), bits=8)
    with pytest.raises(ValueError, match="x must have at least one element"):
        quantize_groupwise(torch.empty(0), bits=8)
    with pytest.raises(TypeError, match="qt must be a GroupQuantized"):
        dequantize_groupwise(torch.randn(3))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 255, 256, 257, 1001])
def test_pack_unpack_round_trip(n):
    gen = torch.Generator().manual_seed(n)
    q = torch.randint(0, 16, (n,), generator=gen, dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_int4(packed, n), q)
    if n >= 2:  # element 0 in the low nibble, element 1 in the high one
        assert int(packed[0]) == int(q[0]) | (int(q[1]) << 4)


def test_pack_errors():
    with pytest.raises(ValueError, match=r"q must hold INT4 codes in \[0, 15\]"):
        pack_int4(torch.tensor([3, 16], dtype=torch.uint8))
    with pytest.raises(TypeError, match="q must be a uint8"):
        pack_int4(torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="numel must be an int"):
        unpack_int4(torch.zeros(2, dtype=torch.uint8), 5)


def test_nbytes_is_honest():
    x = torch.randn(1000)
    q4 = quantize_groupwise(x, bits=4, group_size=256)
    q8 = quantize_groupwise(x, bits=8, group_size=256)
    assert q4.data.numel() == 500 and q8.data.numel() == 1000
    assert q4.nbytes == 500 + 4 * 4 + 4 * 1  # packed codes + float32 scales + uint8 zero points
    assert q8.nbytes == 1000 + 4 * 4 + 4 * 1
    assert q4.scale.numel() == 4  # last group partial (1000 = 3 * 256 + 232)


def test_dequantize_dtype_and_shape():
    x = torch.randn(6, 50)
    qt = quantize_groupwise(x, bits=8, group_size=64)
    out = dequantize_groupwise(qt, torch.float64)
    assert out.dtype == torch.float64 and out.shape == (6, 50)


def test_stochastic_round_is_unbiased():
    n = 20000
    gen = torch.Generator().manual_seed(0)
    values = torch.tensor([0.3, 2.7, -1.25, 5.0, -0.9])
    x = values.repeat(n, 1)  # (n, 5)
    r = stochastic_round(x, gen)
    assert bool(((r == torch.floor(x)) | (r == torch.ceil(x))).all())
    p = values - torch.floor(values)
    std = torch.sqrt(p * (1 - p) / n)  # binomial std of the mean
    mean = r.mean(0)
    assert bool(((mean - values).abs() <= 5 * std + 1e-12).all()), (mean, values)
    assert torch.equal(r[:, 3], torch.full((n,), 5.0))  # integers are kept


def test_stochastic_round_uses_the_generator():
    x = torch.randn(100) * 10
    a = stochastic_round(x, torch.Generator().manual_seed(1))
    b = stochastic_round(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        stochastic_round(torch.arange(3))


def test_stochastic_quantization_within_one_step_and_unbiased():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, generator=gen)
    draws = []
    for _ in range(400):
        qt = quantize_groupwise(x, bits=4, group_size=64, stochastic=True, generator=gen)
        xh = qt.dequantize()
        assert bool(((xh - x).abs() <= _per_element_scale(qt) * (1 + 1e-5)).all())
        draws.append(xh)
    mean = torch.stack(draws).mean(0)
    step = _per_element_scale(quantize_groupwise(x, bits=4, group_size=64))
    # the mean of 400 draws is within a small fraction of a step (std <= step / 2 / sqrt(400)),
    # except within half a step of a group's ends, where the clamp cuts SR's upper (lower) code
    y = x / step + qt_zero(x)
    interior = (y >= 0) & (y <= 15)
    assert int(interior.sum()) > 250
    assert bool(((mean - x).abs()[interior] <= 0.15 * step[interior]).all())


def qt_zero(x: torch.Tensor) -> torch.Tensor:
    return quantize_groupwise(x, bits=4, group_size=64).zero.float().repeat_interleave(64)[: x.numel()]


def _drift(stochastic: bool, steps: int = 1000, delta: float = 1e-5) -> float:
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(256, generator=gen) * 0.02
    qt = quantize_groupwise(w0, bits=8, group_size=256)
    start = qt.dequantize()
    for _ in range(steps):
        qt = quantize_groupwise(qt.dequantize() + delta, bits=8, group_size=256, stochastic=stochastic, generator=gen)
    return float((qt.dequantize() - start).mean())


def test_nearest_rounding_loses_small_updates_stochastic_keeps_them():
    # The digest's demonstration: 256 INT8 weights ~ N(0, 0.02), one group, +1e-5 per step for
    # 1000 steps, requantized each step. The exact drift is 1e-2; one step is ~4e-4 (40x the
    # update), so nearest rounding maps every update back to the same code.
    exact = 1000 * 1e-5
    sr = _drift(True)
    nearest = _drift(False)
    assert abs(sr - exact) < 0.1 * exact, sr
    assert abs(nearest) < 0.01 * exact, nearest
