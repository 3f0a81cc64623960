"""Decode attention over gathered KV chunks (mini.triforce.kernel): the reference against a
per-head loop in float64 and against full attention, the Triton kernel under the interpreter
against the reference (sizes not multiples of the tile, GQA, the tail, poisoned outputs, half
precision), errors, and a compile for CUDA (sm_80)."""
from __future__ import annotations

import math

import pytest
import torch

from mini.kernels.dispatch import HAS_TRITON
from mini.triforce import kernel as KM
from mini.triforce.kernel import chunk_attention, chunk_attention_reference, chunk_slots
from tests.triton_aot import compile_ptx

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="the Triton interpreter needs triton")


def _inputs(B, Hkv, G, S, D, n_sel, dtype=torch.float32, seed=0, idx_dtype=torch.int64, C=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * G, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64).to(dtype)
    n_chunks = -(-S // C)
    chunks = torch.stack([torch.randperm(n_chunks, generator=g)[:n_sel] for _ in range(B * Hkv)])
    return q, k, v, chunks.reshape(B, Hkv, n_sel).to(idx_dtype)


def _loop_reference(q, k, v, chunks, n_tail, C=8):
    """Per (b, h): list the slots by hand, softmax attention in float64."""
    B, H, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    out = torch.empty(B, H, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = h // G
            slots = [c * C + i for c in chunks[b, kh].tolist() for i in range(C) if c * C + i < S - n_tail]
            slots += list(range(S - n_tail, S))
            kk, vv = k[b, kh, slots].double(), v[b, kh, slots].double()
            w = torch.softmax(kk @ q[b, h].double() / math.sqrt(D), dim=0)
            out[b, h] = w @ vv
    return out


# --------------------------------------------------------------------------- reference
@pytest.mark.parametrize("S, n_tail", [(45, 0), (45, 5), (64, 12), (9, 9)])
def test_reference_matches_per_head_loop(S, n_tail):
    q, k, v, chunks = _inputs(2, 3, 2, S, 12, min(3, -(-S // 8)), torch.float64, seed=S)
    got = chunk_attention_reference(q, k, v, chunks, n_tail=n_tail)
    torch.testing.assert_close(got, _loop_reference(q, k, v, chunks, n_tail), rtol=0, atol=1e-13)


def test_reference_all_chunks_is_full_attention():
    q, k, v, _ = _inputs(1, 2, 4, 40, 16, 1, torch.float64)
    chunks = torch.arange(5).expand(1, 2, 5).contiguous()
    got = chunk_attention_reference(q, k, v, chunks)
    kr = k.repeat_interleave(4, dim=1)  # (B, H, S, D): transformers' repeat_kv layout
    vr = v.repeat_interleave(4, dim=1)
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kr, vr)[:, :, 0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
    # a tail overlapping selected chunks is counted once
    torch.testing.assert_close(chunk_attention_reference(q, k, v, chunks, n_tail=13), want, rtol=0, atol=1e-13)


def test_chunk_slots():
    pos, valid = chunk_slots(torch.tensor([[[0, 2]]]), S=20, n_tail=3)
    assert pos.tolist() == [[list(range(8)) + [16, 17, 18, 19, 19, 19, 19, 19] + [17, 18, 19]]]
    assert valid.tolist() == [[[True] * 8 + [True] * 1 + [False] * 7 + [True] * 3]]


# --------------------------------------------------------------------------- kernel (interpreter)
@needs_triton
@pytest.mark.parametrize("B, Hkv, G, S, D, n_sel, n_tail", [
    (1, 1, 1, 8, 16, 1, 0),  # one chunk, MHA
    (2, 3, 2, 45, 12, 3, 5),  # partial last chunk, D not a power of two, the tail
    (1, 2, 4, 203, 20, 17, 7),  # more chunks than one tile holds, GQA 4
    (2, 1, 3, 70, 8, 0, 6),  # tail only, g = 3 (padded to 4)
    (1, 2, 1, 130, 64, 9, 0),  # no tail, d = 64
])
def test_kernel_matches_reference_float32(B, Hkv, G, S, D, n_sel, n_tail):
    q, k, v, chunks = _inputs(B, Hkv, G, S, D, n_sel, seed=S)
    out = torch.full_like(q, float("nan"))
    got = chunk_attention(q, k, v, chunks, n_tail=n_tail, out=out, backend="interpret")
    assert got is out and not bool(torch.isnan(got).any())
    want = _loop_reference(q, k, v, chunks, n_tail)
    assert float((got.double() - want).abs().max()) < 2e-6
    ref = chunk_attention_reference(q, k, v, chunks, n_tail=n_tail)
    assert float((got - ref).abs().max()) < 2e-6


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_half_precision(dtype):
    q, k, v, chunks = _inputs(2, 2, 3, 77, 24, 4, dtype, seed=3, idx_dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    got = chunk_attention(q, k, v, chunks, n_tail=4, out=out, backend="interpret")
    assert got.dtype == dtype and not bool(torch.isnan(got).any())
    want = chunk_attention_reference(q, k, v, chunks, n_tail=4)  # float32 arithmetic, one rounding
    eps = torch.finfo(dtype).eps
    assert float((got.float() - want.float()).abs().max()) <= 2 * eps * float(want.abs().max().float())


@needs_triton
def test_kernel_extreme_scores_are_stable():
    """Large logits: the online softmax's running max keeps exp finite."""
    q, k, v, chunks = _inputs(1, 1, 2, 50, 16, 4, seed=5)
    q = q * 40.0
    got = chunk_attention(q, k, v, chunks, n_tail=3, backend="interpret")
    want = _loop_reference(q, k, v, chunks, 3)
    assert not bool(torch.isnan(got).any())
    assert float((got.double() - want).abs().max()) < 1e-4


# --------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    q, k, v, chunks = _inputs(1, 2, 2, 30, 8, 2)
    with pytest.raises(ValueError, match=r"q must be 3-dimensional, got shape \(4, 8\)"):
        chunk_attention(q[0], k, v, chunks)
    with pytest.raises(ValueError, match=r"k must have shape \(1, \*, \*, 8\), got \(1, 2, 30, 6\)"):
        chunk_attention(q, k[..., :6], v, chunks)
    with pytest.raises(ValueError, match=r"v must have shape \(1, 2, 30, 8\), got \(1, 2, 29, 8\)"):
        chunk_attention(q, k, v[:, :, :29].contiguous(), chunks)
    with pytest.raises(ValueError, match=r"heads H=3 must be a multiple of k's KV heads H_kv=2"):
        chunk_attention(q[:, :3].contiguous(), k, v, chunks)
    with pytest.raises(ValueError, match=r"chunks must have shape \(1, 2, \*\), got \(1, 1, 2\)"):
        chunk_attention(q, k, v, chunks[:, :1])
    with pytest.raises(TypeError, match=r"chunks must have dtype torch.int32 or torch.int64, got torch.float32"):
        chunk_attention(q, k, v, chunks.float())
    with pytest.raises(TypeError, match=r"k must have dtype torch.float32, got torch.float16"):
        chunk_attention(q, k.half(), v, chunks)
    with pytest.raises(TypeError, match=r"q must have dtype .*got torch.int64"):
        chunk_attention(q.long(), k, v, chunks)
    with pytest.raises(ValueError, match=r"chunks must hold chunk indices in \[0, 4\) \(S=30, chunk_size=8\), "
                                         r"got values in \[0, 4\]"):
        chunk_attention(q, k, v, torch.full_like(chunks, 4).index_fill_(2, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match=r"n_tail must be an integer in \[0, S=30\], got 31"):
        chunk_attention(q, k, v, chunks, n_tail=31)
    with pytest.raises(ValueError, match=r"nothing to attend to"):
        chunk_attention(q, k, v, chunks[:, :, :0])
    with pytest.raises(ValueError, match=r"chunk_size must be an integer >= 1, got 0"):
        chunk_attention(q, k, v, chunks, chunk_size=0)
    with pytest.raises(ValueError, match=r"out must have shape \(1, 4, 8\), got \(1, 4, 7\)"):
        chunk_attention(q, k, v, chunks, out=torch.empty(1, 4, 7))
    with pytest.raises(ValueError, match=r"all tensors must be on one device, got q on cpu, k on meta"):
        chunk_attention(q, k.to("meta"), v, chunks)
    with pytest.raises(ValueError, match=r"backend 'triton' runs compiled kernels on CUDA tensors"):
        chunk_attention(q, k, v, chunks, backend="triton")


@needs_triton
def test_kernel_only_errors():
    q, k, v, chunks = _inputs(1, 2, 2, 30, 8, 2, torch.float64)
    with pytest.raises(TypeError, match=r"q must have dtype torch.float32 or torch.float16 or torch.bfloat16, "
                                        r"got torch.float64"):
        chunk_attention(q, k, v, chunks, backend="interpret")
    assert chunk_attention(q, k, v, chunks, backend="reference").dtype == torch.float64
    q, k, v, chunks = _inputs(1, 2, 2, 30, 8, 2)
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)  # same values, not contiguous
    with pytest.raises(ValueError, match=r"k must be contiguous"):
        chunk_attention(q, kt, v, chunks, backend="interpret")
    torch.testing.assert_close(chunk_attention(q, kt, v, chunks, backend="reference"),
                               chunk_attention_reference(q, k, v, chunks))
    with pytest.raises(ValueError, match=r"chunk_size=6 gives a tile of .* not a power of two"):
        chunk_attention(q, k, v, chunks, chunk_size=6, backend="interpret")


# --------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_cuda(dtype):
    q, k, v, chunks = _inputs(2, 8, 4, 4099, 128, 64, dtype, seed=1)
    q, k, v, chunks = (t.cuda() for t in (q, k, v, chunks))
    got = chunk_attention(q, k, v, chunks, n_tail=37, backend="triton")
    want = chunk_attention_reference(q, k, v, chunks, n_tail=37)
    tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert float((got.float() - want.float()).abs().max()) <= tol * max(1.0, float(want.abs().max()))


@needs_triton
@pytest.mark.parametrize("dtype, idx, G, D", [("fp32", "i64", 1, 128), ("bf16", "i32", 4, 128), ("fp16", "i64", 8, 64)])
def test_kernel_compiles_for_sm80(dtype, idx, G, D, tmp_path, monkeypatch):
    bg, bt, bd, warps = KM._blocks(G, D, 8)
    sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "idx_ptr": f"*{idx}",
           "out_ptr": f"*{dtype}", "S": "i32", "n_sel": "i32", "n_tail": "i32", "G": "i32", "D": "i32",
           "scale": "fp32", "C": "constexpr", "BLOCK_G": "constexpr", "BLOCK_T": "constexpr",
           "BLOCK_D": "constexpr"}
    consts = {"C": 8, "BLOCK_G": bg, "BLOCK_T": bt, "BLOCK_D": bd}
    ptx = compile_ptx(KM._chunk_attn_kernel, sig, consts, warps, tmp_path, monkeypatch, arch=80)
    assert ".target sm_80" in ptx and "st.global" in ptx
