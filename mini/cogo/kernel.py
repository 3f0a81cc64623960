"""Fused loss and gradients of S independent quadratic networks on the whole addition table.

Part I of the book (``book/cogo/theory.ipynb``, labs in ``labs/cogo/``) trains the network of
Yuandong Tian, "Composing Global Optimizers to Reasoning Tasks via Algebraic Objects in Neural
Nets" (arXiv 2410.01779, 2024), many seeds at once. This module computes, for a batch of S
networks, every training pair's forward pass, the loss and the three weight gradients in closed
form: a Triton kernel for CUDA, the same kernel under the interpreter for tests, and a PyTorch
reference (also the trainer's CPU path).

Convention (the paper's model; official code: layers ``layera``, ``layerb``, ``layerc``):
real weights ``Wa, Wb`` of shape (q, d) and ``Wc`` of shape (d, q), output
``o = Wc (Wa e_a + Wb e_b)^2`` (elementwise square), per-example loss ``||P⊥ (o - e_y)||^2`` with
``y = (a + b) mod d`` and ``P⊥ = I - 1 1ᵀ / d``.

Derivation of the closed form
-----------------------------
With one-hot inputs the first layer is a gather: ``h_ab = Wa[:, a] + Wb[:, b]`` (q,). Then
``o_ab = Wc (h_ab ⊙ h_ab)`` (d,). Seed s's loss, with ``m_ab`` its training mask and
``n_s = Σ_ab m_ab``, is ::

    L_s = (1/n_s) Σ_ab m_ab ||P⊥ (o_ab - e_y)||².

P⊥ is symmetric and idempotent, so ``∂||P⊥u||²/∂u = 2 P⊥ u``. Define the residual
``r_ab = (m_ab / n_s) P⊥ (o_ab - e_y)`` (d,); then ``∂L_s/∂o_ab = 2 r_ab =: G_ab``, and

    dWc = Σ_ab G_ab (h_ab ⊙ h_ab)ᵀ                      (d, q)
    dh_ab = 2 h_ab ⊙ (Wcᵀ G_ab) = 4 h_ab ⊙ (Wcᵀ r_ab)   (q,)
    dWa[:, a] = Σ_b dh_ab,    dWb[:, b] = Σ_a dh_ab.

Both factors 2 (the squared norm's and the square activation's) are checked against autograd in
``tests/test_cogo_train.py``. The gradient returned is that of ``Σ_s L_s``: the seeds do not
interact, so seed s's gradient is that of its own ``L_s`` (see :mod:`mini.cogo.trainer` for why
the seeds' losses are summed, not averaged). Weight decay is not included; the optimizer adds it.

The Triton kernel: two launches, no atomics, deterministic
----------------------------------------------------------
1. ``_cogo_residual_kernel``, grid (S, d): program (s, a) holds all b at once (a BLOCK_D × BLOCK_D
   tile, b × g) and loops over q in tiles of BLOCK_Q: ``h = Wa[:, a] + Wb[:, b]``,
   ``o += h² @ Wc_tileᵀ`` (tl.dot). Then it forms ``G = 2 r`` (the projection, the one-hot target
   and the mask applied in registers), writes G[s, a] (d × d) to a scratch buffer and writes its
   share of the loss to ``loss_part[s, a]``.
2. ``_cogo_grad_kernel``, grid (S, ceil(q / BLOCK_Q)): program (s, j-tile) loops over a: it
   recomputes h for its columns, ``dh = 2 h ⊙ (G[s, a] @ Wc_tile)``, writes the column sum
   ``dWa[j, a]`` directly, and accumulates ``dWb`` (Σ over a) and ``dWc += G[s, a]ᵀ @ h²`` in
   registers, written once at the end.

Every output element has exactly one writer, so there are no atomics and the result is
bit-for-bit reproducible (a single-seed run equals the same seed inside a batch). The one-kernel
alternative (program per (s, a) with atomic adds into dWb and dWc) makes d programs contend on
the same (d + d)·q addresses and is non-deterministic; the scratch G costs S·d³ floats
(d = 23: 49 KB per seed, d = 127: 8 MB per seed), which stays in L2 (50 MB on an H100) for
a few seeds at the largest d of the paper.
The gradient kernel runs with num_stages=2: three pipeline stages of the 128 × 128 G tile would
need 144 KB of shared memory at d > 64 (two need 80 KB; checked by lowering for sm_80/sm_90).
Padding: BLOCK_D = max(16, next power of two ≥ d) (tl.dot needs ≥ 16); masked loads give zeros,
padded rows/columns of G are zero, so they contribute nothing. tl.dot runs with
``input_precision="ieee"`` (true float32, no TF32) to match the reference to ~1e-6.

Work per step (S seeds): FLOPs ≈ 6 S d³ q in matrix products (forward o, G @ Wc, Gᵀ @ h²; each
2 S d³ q) plus O(S d² q) elementwise. Compulsory DRAM bytes ≈ 4 · (2 · 3 S d q [weights read
by both kernels] + 3 S d q [gradients written] + S d² [mask] + 2 S d³ [G written and read]).
:func:`work_counts` gives these numbers (the bench turns them into GB/s and TFLOP/s):
(S, q, d) = (5, 512, 23): 0.2 GFLOP, 2.6 MB; (5, 2048, 127): 127 GFLOP, 129 MB. Arithmetic
intensity is ~75 to ~1000 FLOP/byte, so the kernel is compute-bound (float32 FMA, no tensor
cores with "ieee"), and at d = 23 so small that launch latency and the serial loops inside a
program (q / BLOCK_Q tiles, d values of a) dominate: S·d and S·q/BLOCK_Q programs only.

The reference (:func:`loss_and_grads_reference`) does the same algebra with broadcasting and
batched matmuls over (S, d, d, q) intermediates; on a CPU it walks the seeds in chunks of about
``REFERENCE_CPU_CHUNK_ELEMS`` elements of (d, d, q) so they stay in cache (at d = 23, q = 512,
one seed per chunk: ~1.1 ms per seed-step single-threaded, vs ~8 ms for 5 seeds in one batch).

Differences from the official code: it runs one seed at a time through ``nn.Linear`` layers and
autograd; the result is the same (the tests check it against autograd, and the trainer against
the paper-style loop :func:`mini.cogo.trainer.train_per_seed_autograd`).

Explained in :doc:`/labs/cogo/gd_solutions`.
"""
from __future__ import annotations

from typing import Optional

import torch

from mini.kernels.dispatch import HAS_TRITON, check_same_device, check_tensor, kernel_op

__all__ = ["fused_loss_and_grads", "loss_and_grads_reference", "work_counts"]

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _cogo_residual_kernel(
        Wa_ptr,  # (S, q, d) float32, input weights of operand a
        Wb_ptr,  # (S, q, d) float32, input weights of operand b
        Wc_ptr,  # (S, d, q) float32, output weights
        mask_ptr,  # (S, d, d) float32, 1 for a training pair (a, b)
        inv_n_ptr,  # (S,) float32, 1 / number of training pairs of each seed
        G_ptr,  # (S, d, d, d) float32 out: G[s, a, b, :] = dL_s / do_ab = 2 r_ab
        loss_part_ptr,  # (S, d) float32 out: Σ_b of seed s's loss terms with first operand a
        q,  # hidden width
        d,  # modulus
        BLOCK_D: tl.constexpr,  # power of two >= max(d, 16): rows b, columns g
        BLOCK_Q: tl.constexpr,  # hidden units per tile
    ):
        s = tl.program_id(0)
        a = tl.program_id(1)
        offs_b = tl.arange(0, BLOCK_D)
        offs_g = tl.arange(0, BLOCK_D)
        bmask = offs_b < d
        gmask = offs_g < d
        wa_base = Wa_ptr + s * q * d
        wb_base = Wb_ptr + s * q * d
        wc_base = Wc_ptr + s * d * q
        o = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)  # (b, g)
        for j0 in range(0, q, BLOCK_Q):
            offs_j = j0 + tl.arange(0, BLOCK_Q)
            jmask = offs_j < q
            wa = tl.load(wa_base + offs_j * d + a, mask=jmask, other=0.0)  # (Q,) = Wa[j, a]
            wb = tl.load(
                wb_base + offs_j[None, :] * d + offs_b[:, None],
                mask=bmask[:, None] & jmask[None, :],
                other=0.0,
            )  # (B, Q) = Wb[j, b]
            h = wb + wa[None, :]  # (B, Q)
            wct = tl.load(
                wc_base + offs_g[None, :] * q + offs_j[:, None],
                mask=jmask[:, None] & gmask[None, :],
                other=0.0,
            )  # (Q, G) = Wc[g, j]
            o += tl.dot(h * h, wct, input_precision="ieee")  # (B, G)
        y = (a + offs_b) % d  # (B,) target class of (a, b)
        onehot = tl.where(offs_g[None, :] == y[:, None], 1.0, 0.0)  # (B, G)
        u = tl.where(gmask[None, :], o - onehot, 0.0)  # o - e_y, zero on padded g
        mean = tl.sum(u, axis=1) / d  # (B,)
        pu = tl.where(gmask[None, :], u - mean[:, None], 0.0)  # P⊥ (o - e_y)
        m = tl.load(mask_ptr + s * d * d + a * d + offs_b, mask=bmask, other=0.0)  # (B,)
        inv_n = tl.load(inv_n_ptr + s)
        w = m * inv_n  # (B,)
        part = tl.sum(w * tl.sum(pu * pu, axis=1), axis=0)
        tl.store(loss_part_ptr + s * d + a, part)
        g = pu * (2.0 * w)[:, None]  # (B, G) = 2 r
        tl.store(
            G_ptr + ((s * d + a) * d + offs_b[:, None]) * d + offs_g[None, :],
            g,
            mask=bmask[:, None] & gmask[None, :],
        )

    @triton.jit
    def _cogo_grad_kernel(
        Wa_ptr,  # (S, q, d) float32
        Wb_ptr,  # (S, q, d) float32
        Wc_ptr,  # (S, d, q) float32
        G_ptr,  # (S, d, d, d) float32, from _cogo_residual_kernel
        dWa_ptr,  # (S, q, d) float32 out
        dWb_ptr,  # (S, q, d) float32 out
        dWc_ptr,  # (S, d, q) float32 out
        q,  # hidden width
        d,  # modulus
        BLOCK_D: tl.constexpr,  # power of two >= max(d, 16)
        BLOCK_Q: tl.constexpr,  # hidden units owned by this program
    ):
        s = tl.program_id(0)
        jt = tl.program_id(1)
        offs_j = jt * BLOCK_Q + tl.arange(0, BLOCK_Q)
        jmask = offs_j < q
        offs_b = tl.arange(0, BLOCK_D)
        offs_g = tl.arange(0, BLOCK_D)
        bmask = offs_b < d
        gmask = offs_g < d
        wa_base = Wa_ptr + s * q * d
        wb_base = Wb_ptr + s * q * d
        wc_base = Wc_ptr + s * d * q
        wb = tl.load(
            wb_base + offs_j[None, :] * d + offs_b[:, None],
            mask=bmask[:, None] & jmask[None, :],
            other=0.0,
        )  # (B, Q) = Wb[j, b]
        wc = tl.load(
            wc_base + offs_g[:, None] * q + offs_j[None, :],
            mask=gmask[:, None] & jmask[None, :],
            other=0.0,
        )  # (G, Q) = Wc[g, j]
        dwb = tl.zeros((BLOCK_D, BLOCK_Q), dtype=tl.float32)  # (b, j)
        dwc = tl.zeros((BLOCK_D, BLOCK_Q), dtype=tl.float32)  # (g, j)
        for a in range(0, d):
            wa = tl.load(wa_base + offs_j * d + a, mask=jmask, other=0.0)  # (Q,)
            h = wb + wa[None, :]  # (B, Q)
            g = tl.load(
                G_ptr + ((s * d + a) * d + offs_b[:, None]) * d + offs_g[None, :],
                mask=bmask[:, None] & gmask[None, :],
                other=0.0,
            )  # (B, G); padded rows are 0, so padded b adds nothing below
            gh = tl.dot(g, wc, input_precision="ieee")  # (B, Q) = (Wcᵀ G_ab)_j
            dh = 2.0 * h * gh  # (B, Q)
            tl.store(dWa_ptr + s * q * d + offs_j * d + a, tl.sum(dh, axis=0), mask=jmask)
            dwb += dh
            dwc += tl.dot(tl.trans(g), h * h, input_precision="ieee")  # (G, Q)
        tl.store(
            dWb_ptr + s * q * d + offs_j[None, :] * d + offs_b[:, None],
            dwb,
            mask=bmask[:, None] & jmask[None, :],
        )
        tl.store(
            dWc_ptr + s * d * q + offs_g[:, None] * q + offs_j[None, :],
            dwc,
            mask=gmask[:, None] & jmask[None, :],
        )


def _validate(Wa, Wb, Wc, mask, dtypes, check_mask: bool) -> tuple[int, int, int]:
    check_tensor("Wa", Wa, dtypes=dtypes, ndim=3)
    S, q, d = Wa.shape
    check_tensor("Wb", Wb, dtypes=dtypes, shape=(S, q, d))
    check_tensor("Wc", Wc, dtypes=dtypes, shape=(S, d, q))
    check_tensor("mask", mask, dtypes=dtypes, shape=(S, d, d))
    check_same_device(Wa=Wa, Wb=Wb, Wc=Wc, mask=mask)
    if not (Wa.dtype == Wb.dtype == Wc.dtype == mask.dtype):
        raise TypeError(
            f"Wa, Wb, Wc, mask must share one dtype, got {Wa.dtype}, {Wb.dtype}, {Wc.dtype}, {mask.dtype}"
        )
    if S < 1 or q < 1 or d < 2:
        raise ValueError(f"need S >= 1 seeds, q >= 1 hidden units, d >= 2; got Wa of shape {(S, q, d)}")
    if check_mask:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("mask must hold only 0 (test pair) and 1 (training pair)")
        counts = mask.sum(dim=(1, 2))
        if bool((counts == 0).any()):
            empty = torch.nonzero(counts == 0).flatten().tolist()
            raise ValueError(f"mask of seed(s) {empty} has no training pair")
    return S, q, d


def _check_out(out, S, q, d, device, dtype):
    if out is None:
        return None
    if not isinstance(out, (tuple, list)) or len(out) != 4:
        raise TypeError("out must be a tuple (loss, dWa, dWb, dWc)")
    for name, t, shape in zip(("out[0] (loss)", "out[1] (dWa)", "out[2] (dWb)", "out[3] (dWc)"), out,
                              ((S,), (S, q, d), (S, q, d), (S, d, q))):
        check_tensor(name, t, dtypes=(dtype,), shape=shape)
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, the weights on {device}")
    return tuple(out)


def loss_and_grads_reference(
    Wa: torch.Tensor,
    Wb: torch.Tensor,
    Wc: torch.Tensor,
    mask: torch.Tensor,
    out: Optional[tuple[torch.Tensor, ...]] = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form per-seed loss and gradients, in PyTorch (broadcasting + batched matmuls).

    Shapes: ``Wa, Wb`` (S, q, d), ``Wc`` (S, d, q), ``mask`` (S, d, d) with 1 for a training
    pair. Returns ``(loss (S,), dWa, dWb, dWc)``: each seed's mean loss over its training pairs
    and the gradients of their sum. float32 or float64. No autograd, no index gather.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    S, q, d = _validate(Wa, Wb, Wc, mask, (torch.float32, torch.float64), validate)
    out = _check_out(out, S, q, d, Wa.device, Wa.dtype)
    if out is None:
        out = (
            torch.empty(S, device=Wa.device, dtype=Wa.dtype),
            torch.empty_like(Wa),
            torch.empty_like(Wb),
            torch.empty_like(Wc),
        )
    # On a CPU, chunks of seeds whose (d, d, q) intermediates fit in cache run faster than one
    # large batch; on a GPU one batch keeps the launches few.
    chunk = S if Wa.device.type != "cpu" else max(1, min(S, REFERENCE_CPU_CHUNK_ELEMS // (d * d * q)))
    for s0 in range(0, S, chunk):
        sl = slice(s0, min(S, s0 + chunk))
        _reference_chunk(Wa[sl], Wb[sl], Wc[sl], mask[sl], tuple(o[sl] for o in out))
    return out  # type: ignore[return-value]


REFERENCE_CPU_CHUNK_ELEMS = 1 << 18  # seeds per CPU chunk: this many elements of (d, d, q)


@torch.no_grad()
def _reference_chunk(Wa, Wb, Wc, mask, out) -> None:
    """The closed form for a chunk of seeds, written into ``out`` = (loss, dWa, dWb, dWc)."""
    S, q, d = Wa.shape
    A = Wa.transpose(1, 2)  # (S, d, q): row a is Wa[:, a]
    B = Wb.transpose(1, 2)  # (S, d, q)
    h = A[:, :, None, :] + B[:, None, :, :]  # (S, d_a, d_b, q)
    h2 = h * h
    o = torch.matmul(h2.reshape(S, d * d, q), Wc.transpose(1, 2))  # (S, d², d)
    ar = torch.arange(d, device=Wa.device)
    y = (ar[:, None] + ar[None, :]) % d  # (d, d)
    target = (ar[None, None, :] == y[:, :, None]).to(Wa.dtype).reshape(1, d * d, d)
    u = o - target
    pu = u - u.mean(dim=-1, keepdim=True)  # P⊥ (o - e_y), (S, d², d)
    n = mask.sum(dim=(1, 2))  # (S,)
    w = (mask / n[:, None, None]).reshape(S, d * d, 1)  # m_ab / n_s
    torch.sum(w * pu * pu, dim=(1, 2), out=out[0])  # L_s
    G = 2.0 * w * pu  # dL/do_ab = 2 r_ab, (S, d², d)
    torch.matmul(G.transpose(1, 2), h2.reshape(S, d * d, q), out=out[3])  # dWc (S, d, q)
    dh = torch.matmul(2.0 * G, Wc).reshape(S, d, d, q).mul_(h)  # 2 h ⊙ (Wcᵀ G), (S, d_a, d_b, q)
    out[1].copy_(dh.sum(dim=2).transpose(1, 2))  # dWa[:, a] = Σ_b dh_ab, (S, q, d)
    out[2].copy_(dh.sum(dim=1).transpose(1, 2))  # dWb[:, b] = Σ_a dh_ab


def _blocks(q: int, d: int) -> tuple[int, int, int, int]:
    """BLOCK_D, BLOCK_Q of the residual kernel, BLOCK_Q of the gradient kernel, num_warps.

    The gradient kernel's grid is (S, q / BLOCK_Q): smaller tiles there buy more programs at
    small S. Register budget at d = 127 (BLOCK_D = 128): a 128 × 128 float32 tile of o (or G)
    plus four 128 × 16 tiles, over 8 warps.
    """
    block_d = max(16, 1 << (d - 1).bit_length())
    block_q1 = 64 if block_d <= 32 else (32 if block_d <= 64 else 16)
    block_q2 = 32 if block_d <= 64 else 16
    num_warps = 4 if block_d <= 64 else 8
    return block_d, block_q1, block_q2, num_warps


def _reference_for_op(Wa, Wb, Wc, mask, out=None, validate=True):
    return loss_and_grads_reference(Wa, Wb, Wc, mask, out=out, validate=validate)


@kernel_op(reference=_reference_for_op, name="cogo_fused_loss_and_grads")
def _fused_op(jit, Wa, Wb, Wc, mask, out=None, validate=True):
    S, q, d = _validate(Wa, Wb, Wc, mask, (torch.float32,), validate)
    out = _check_out(out, S, q, d, Wa.device, Wa.dtype)
    if out is None:
        out = (
            torch.empty(S, device=Wa.device, dtype=torch.float32),
            torch.empty_like(Wa),
            torch.empty_like(Wb),
            torch.empty_like(Wc),
        )
    loss, dWa, dWb, dWc = out
    inv_n = 1.0 / mask.sum(dim=(1, 2))  # (S,)
    G = torch.empty(S, d, d, d, device=Wa.device, dtype=torch.float32)  # scratch, fully written
    loss_part = torch.empty(S, d, device=Wa.device, dtype=torch.float32)
    block_d, block_q1, block_q2, num_warps = _blocks(q, d)
    jit(_cogo_residual_kernel)[(S, d)](
        Wa, Wb, Wc, mask, inv_n, G, loss_part, q, d, BLOCK_D=block_d, BLOCK_Q=block_q1, num_warps=num_warps
    )
    jit(_cogo_grad_kernel)[(S, triton.cdiv(q, block_q2))](
        Wa, Wb, Wc, G, dWa, dWb, dWc, q, d, BLOCK_D=block_d, BLOCK_Q=block_q2, num_warps=num_warps,
        num_stages=2,  # 3 stages of the (BLOCK_D, BLOCK_D) G tile need 144 KB of shared memory at d > 64
    )
    torch.sum(loss_part, dim=1, out=loss)
    return loss, dWa, dWb, dWc


def fused_loss_and_grads(
    Wa: torch.Tensor,
    Wb: torch.Tensor,
    Wc: torch.Tensor,
    mask: torch.Tensor,
    backend: str = "auto",
    out: Optional[tuple[torch.Tensor, ...]] = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-seed loss ``(S,)`` and gradients ``dWa, dWb, dWc`` of ``Σ_s L_s`` for S networks.

    ``backend``: ``"auto"`` (compiled Triton on CUDA, the reference on CPU, unless
    ``use_backend``/``$MINI_BACKEND`` say otherwise), ``"triton"``, ``"interpret"`` or
    ``"reference"``. ``out``: optional ``(loss, dWa, dWb, dWc)`` buffers to write into.
    ``validate=False`` skips the mask-value check (it synchronizes a GPU); the trainer checks
    once and then turns it off. Kernel backends need float32.

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    return _fused_op(Wa, Wb, Wc, mask, backend=backend, out=out, validate=validate)


def work_counts(S: int, q: int, d: int) -> dict[str, float]:
    """FLOPs and compulsory DRAM bytes of one call of the Triton path (see the module docstring).

    Explained in :doc:`/labs/cogo/gd_solutions`.
    """
    flops = 6.0 * S * d**3 * q + 8.0 * S * d * d * q
    weights = 3.0 * S * d * q
    bytes_ = 4.0 * (2 * weights + weights + S * d * d + 2.0 * S * d**3 + S * d + S)
    return {"flops": flops, "bytes": bytes_}
