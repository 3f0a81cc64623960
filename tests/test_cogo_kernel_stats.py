"""The CoGO kernels as compiled for CUDA (ptxas statistics, no GPU) and their memory traffic.

Spills are measured from the compiled kernel: ``tools/kernel_stats.py`` lowers each kernel for
sm_80 and sm_90 with ``triton.compile`` and reads ``ptxas -v`` (registers, stack frame, spill
stores and loads). Counting ``.local`` in the PTX cannot see spills: ptxas allocates registers
after the PTX is written. The traffic test counts loads and stores by hand over the grids and
tile loops of the two kernels and compares with :func:`mini.cogo.kernel.work_counts`.
"""
from __future__ import annotations

import pytest
import torch

import mini.cogo.kernel as K
from mini.kernels import HAS_TRITON


def _toolchain_or_skip():
    if not HAS_TRITON:
        pytest.skip("triton is not installed: the kernels cannot be compiled")
    from tools.kernel_stats import ToolchainMissing, toolchain

    try:
        toolchain()
    except ToolchainMissing as err:
        pytest.skip(f"cannot compile for CUDA here: {err}")


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_do_not_spill_at_the_papers_sizes(arch):
    """0 spill bytes for both kernels at d = 23, 71, 127 (q = 512), compiled for sm_``arch``.

    Runs after an interpreted call in the same process: compiling must still work (the
    interpreter must leave triton.language untouched).
    """
    _toolchain_or_skip()
    from tools.kernel_stats import KERNELS, kernel_stats

    gen = torch.Generator().manual_seed(3)
    args = [torch.rand(1, 8, 5, generator=gen), torch.rand(1, 8, 5, generator=gen),
            torch.rand(1, 5, 8, generator=gen), torch.ones(1, 5, 5)]
    K.fused_loss_and_grads(*args, backend="interpret")
    for d in (23, 71, 127):
        for kernel in KERNELS:
            st = kernel_stats(kernel, arch, 512, d)
            assert st["spill_bytes"] == 0 and st["stack_bytes"] == 0, (kernel, arch, d, st)
            assert 0 < st["registers"] <= 255


def test_kernel_stats_argument_errors():
    from tools.kernel_stats import kernel_stats

    with pytest.raises(ValueError, match="kernel must be one of"):
        kernel_stats("_cogo_kernel", 90, 512, 23)
    with pytest.raises(ValueError, match="arch must be one of"):
        kernel_stats("_cogo_grad_kernel", 75, 512, 23)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _valid(n: int, block: int, t: int) -> int:
    """Unmasked lanes of tile t of a length-n axis cut in tiles of ``block``."""
    return max(0, min(block, n - t * block))


def _hand_count(S: int, q: int, d: int) -> tuple[int, int]:
    """Elements loaded and stored by the two kernels, summed over their grids and loops."""
    blk = K._blocks(q, d)
    B1, Q1, B2, BG, Q2 = blk.block_b1, blk.block_q1, blk.block_b2, blk.block_g, blk.block_q2
    loads = stores = 0
    # _cogo_residual_kernel: grid (S, d, cdiv(d, B1)), program (s, a, b-tile)
    for bt in range(_cdiv(d, B1)):
        vb = _valid(d, B1, bt)
        per = 0
        for jt in range(_cdiv(q, Q1)):  # the loop over q
            vj = _valid(q, Q1, jt)
            per += vj + vb * vj + vj * d  # Wa[j, a], Wb[j, b], Wc[g, j]
        per += vb + 1  # mask[s, a, b], inv_n[s]
        loads += S * d * per  # the same for every (s, a)
        stores += S * d * (vb * d + 1)  # G[s, a, b, :], loss_part[s, a, b-tile]
    # _cogo_grad_kernel: grid (S, cdiv(q, Q2), 1 + cdiv(d, BG)), program (s, j-tile, role)
    for jt in range(_cdiv(q, Q2)):
        vj = _valid(q, Q2, jt)
        # role 0: dWa and dWb of columns j
        for bt in range(_cdiv(d, B2)):
            vb = _valid(d, B2, bt)
            loads += S * vb * vj  # Wb[j, b]
            for gt in range(_cdiv(d, BG)):  # inside the loop over a (d times)
                vg = _valid(d, BG, gt)
                loads += S * d * (vb * vg + vg * vj)  # G[s, a, b, g], Wc[g, j]
            loads += S * d * vj  # Wa[j, a], once per a
            stores += S * vb * vj  # dWb[j, b]
        stores += S * d * vj  # dWa[j, :]
        # role 1 + t: dWc of columns j, rows g of tile t
        for t in range(_cdiv(d, BG)):
            vg = _valid(d, BG, t)
            for bt in range(_cdiv(d, B2)):
                vb = _valid(d, B2, bt)
                loads += S * (vb * vj + d * (vj + vb * vg))  # Wb; per a: Wa, G[s, a, b, g]
            stores += S * vg * vj  # dWc[g, j]
    return loads, stores


@pytest.mark.parametrize("S,q,d", [(2, 20, 37), (5, 512, 23), (5, 2048, 127)])
def test_work_counts_match_a_hand_count(S, q, d):
    loads, stores = _hand_count(S, q, d)
    w = K.work_counts(S, q, d)
    assert w["bytes_read"] == 4 * loads and w["bytes_written"] == 4 * stores
    assert w["bytes"] == 4 * (loads + stores)
    # the floor: weights read by each kernel, G written and read once, outputs written once
    assert w["bytes_compulsory"] == 4 * (9 * S * d * q + S * d * d + 2 * S * d**3 + S * d + S)
    assert w["bytes"] > w["bytes_compulsory"]
    assert w["flops"] == 6 * S * d**3 * q + 8 * S * d * d * q


def test_work_counts_at_the_largest_size_are_dominated_by_re_reads():
    """At d = 127, q = 2048 the kernels move over 100× the compulsory bytes (G and Wc re-reads)."""
    w = K.work_counts(5, 2048, 127)
    assert w["bytes"] / w["bytes_compulsory"] > 100


@pytest.mark.parametrize("name,value", [("S", 0), ("q", 0), ("d", 1), ("d", 2.5), ("S", True)])
def test_work_counts_errors(name, value):
    args = {"S": 1, "q": 8, "d": 5, name: value}
    with pytest.raises(ValueError, match=f"{name} must be an int"):
        K.work_counts(**args)
