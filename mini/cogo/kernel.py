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
1. ``_cogo_residual_kernel``, grid (S, d, ceil(d / BLOCK_B)): program (s, a, b-tile) holds a
   (BLOCK_B, BLOCK_D) tile of o (its b × all g) and loops over q in steps of BLOCK_Q:
   ``h = Wa[:, a] + Wb[:, b]``, ``o += h² @ Wc_tileᵀ`` (tl.dot). Then it forms ``G = 2 r`` (the
   projection, the one-hot target and the mask applied in registers), writes its rows of
   G[s, a] to a scratch buffer and its share of the loss to ``loss_part[s, a, b-tile]``.
2. ``_cogo_grad_kernel``, grid (S, ceil(q / BLOCK_Q), 1 + ceil(d / BLOCK_G)): program
   (s, j-tile, role) owns hidden units j. Role 0 loops over tiles of b, then a, then tiles of
   g: it recomputes h, forms ``dh = 2 h ⊙ (Wcᵀ G_ab)_j`` (the product summed over g tiles),
   accumulates ``dWb`` of the b tile (stored after the loop over a) and ``dWa`` of all a (a
   (BLOCK_D, BLOCK_Q) tile whose row a receives each column sum through a select: registers
   cannot be indexed by a loop variable). Role 1 + t owns rows g of tile t of ``dWc`` and
   accumulates ``G[s, a, b-tile, g-tile]ᵀ @ h²`` over b tiles and a.

Every output element has exactly one writer, so there are no atomics and the result is
bit-for-bit reproducible (a single-seed run equals the same seed inside a batch). The one-kernel
alternative (program per (s, a) with atomic adds into dWb and dWc) makes d programs contend on
the same (d + d)·q addresses and is non-deterministic; the scratch G costs S·d³ floats
(d = 23: 49 KB per seed, d = 127: 8 MB per seed), which stays in L2 (50 MB on an H100) for
a few seeds at the largest d of the paper.

Tiling over d (``_blocks``): no tile is BLOCK_D × BLOCK_D and every product's reduction
length K is 16. tl.dot in true float32 runs on the FMA units and each thread holds its share of
both operands over the whole K, so K sets the register count: the first version (a 128 × 128 G
tile, K = 128 at d = 127) used 255 registers and a 1,608-byte stack on sm_90 (spilling), the
tiled one has no spill and no stack at any d ≤ 127 on sm_80 and sm_90 (ptxas statistics of the
compiled kernels: ``tools/kernel_stats.py``, ``bench/results/cogo_kernel_ptxas.json``; tested in
``tests/test_cogo_kernel_stats.py``). Padding: BLOCK_D = max(16, next power of two ≥ d) (tl.dot
needs ≥ 16); masked loads give zeros, padded rows/columns of G are zero, so they contribute
nothing. tl.dot runs with ``input_precision="ieee"`` (true float32, no TF32) to match the
reference to ~1e-6.

Work per step (S seeds): FLOPs ≈ 6 S d³ q in matrix products (forward o, Wcᵀ G, Gᵀ h²; each
2 S d³ q) plus O(S d² q) elementwise. The floor of this two-launch design is
4 · (2 · 3 S d q [weights read by both kernels] + 3 S d q [gradients written] + S d² [mask] +
2 S d³ [G written and read]) bytes; the kernels move far more, because every residual program
re-reads Wc and every gradient program re-reads G for its q-tile. :func:`work_counts` counts
both over the grids and loops (the bench turns them into GB/s and TFLOP/s): (S, q, d) =
(5, 512, 23): 0.2 GFLOP, 41 MB moved, 2.6 MB floor; (5, 2048, 127): 127 GFLOP, 19.6 GB moved,
129 MB floor, about 6.5 FLOP per byte moved (mostly L2 hits). No tensor cores with "ieee".

The reference (:func:`loss_and_grads_reference`) does the same algebra with broadcasting and
batched matmuls over (S, d², q) intermediates; it is the trainer's CPU path, and three things
set its speed there (measured on a 2-core AMD EPYC, MKL, ``bench/cogo_step.py``):

- **Allocation.** Fresh multi-megabyte temporaries each call are mapped and unmapped by the C
  allocator, a page fault per 4 KB page (~150 to ~4,000 faults a call at d = 23, q = 512, at
  about 2 µs each in a VM, and how many depends on the allocator's history in the process).
  The intermediates go to a ``workspace`` the caller keeps (the trainer does): none then.
- **Layout.** MKL multiplies ``Wc @ h²ᵀ`` (d rows) 1.6-2x faster than ``h² @ Wcᵀ`` (d columns),
  and reading or writing a transposed view costs 5-10x a contiguous one at these shapes, so
  the output is formed as oᵀ (S, d, d²) and every operand is contiguous.
- **Chunks.** On a CPU the seeds go in chunks of ``REFERENCE_CPU_CHUNK_ELEMS`` elements of
  (d, d, q), so one chunk's intermediates stay in cache, but at least one seed per thread
  (``bmm`` splits its batch over the threads): at d = 11, q = 128 all 10 seeds at once; at
  d = 23, q = 512 one seed a chunk on one thread, two on two threads.

Single-threaded, a seed's result is the same bit for bit alone and inside any batch (``bmm``
computes each batch entry alone). With two threads MKL splits a one-entry float32 product
over both threads and a many-entry one over its entries, so a seed alone and in a batch can
then differ in the last bits.

Differences from the official code: it runs one seed at a time through ``nn.Linear`` layers and
autograd; the result is the same (the tests check it against autograd, and the trainer against
the paper-style loop :func:`mini.cogo.trainer.train_per_seed_autograd`).

Explained in :doc:`/labs/cogo/gd_solutions`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

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
        loss_part_ptr,  # (S, d, n_btiles) float32 out: seed s's loss terms of (a, b-tile)
        q,  # hidden width
        d,  # modulus
        BLOCK_D: tl.constexpr,  # power of two >= max(d, 16): all output classes g
        BLOCK_B: tl.constexpr,  # rows b per program (a tile of the second operand)
        BLOCK_Q: tl.constexpr,  # hidden units per step of the loop over q
    ):
        s = tl.program_id(0)
        a = tl.program_id(1)
        bt = tl.program_id(2)
        offs_b = bt * BLOCK_B + tl.arange(0, BLOCK_B)
        offs_g = tl.arange(0, BLOCK_D)
        bmask = offs_b < d
        gmask = offs_g < d
        wa_base = Wa_ptr + s * q * d
        wb_base = Wb_ptr + s * q * d
        wc_base = Wc_ptr + s * d * q
        o = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)  # (b, g)
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
            )  # (Q, D) = Wc[g, j]
            o += tl.dot(h * h, wct, input_precision="ieee")  # (B, D)
        y = (a + offs_b) % d  # (B,) target class of (a, b)
        onehot = tl.where(offs_g[None, :] == y[:, None], 1.0, 0.0)  # (B, D)
        u = tl.where(gmask[None, :], o - onehot, 0.0)  # o - e_y, zero on padded g
        mean = tl.sum(u, axis=1) / d  # (B,)
        pu = tl.where(gmask[None, :], u - mean[:, None], 0.0)  # P⊥ (o - e_y)
        m = tl.load(mask_ptr + s * d * d + a * d + offs_b, mask=bmask, other=0.0)  # (B,)
        inv_n = tl.load(inv_n_ptr + s)
        w = m * inv_n  # (B,), zero on padded b
        part = tl.sum(w * tl.sum(pu * pu, axis=1), axis=0)
        tl.store(loss_part_ptr + (s * d + a) * tl.num_programs(2) + bt, part)
        g = pu * (2.0 * w)[:, None]  # (B, D) = 2 r
        tl.store(
            G_ptr + ((s * d + a) * d + offs_b[:, None]) * d + offs_g[None, :],
            g,
            mask=bmask[:, None] & gmask[None, :],
        )

    # kernel-start: _cogo_grad_kernel
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
        BLOCK_D: tl.constexpr,  # power of two >= max(d, 16): all a (rows of dWa's tile)
        BLOCK_B: tl.constexpr,  # rows b of a G tile (the K of dWc's product)
        BLOCK_G: tl.constexpr,  # columns g of a G tile (the K of Wcᵀ G's product)
        BLOCK_Q: tl.constexpr,  # hidden units owned by this program
    ):
        # Program (s, j-tile, role): role 0 writes dWa, dWb of its j columns;
        # role 1 + t writes dWc of its j columns and g tile t. One writer each.
        s = tl.program_id(0)
        jt = tl.program_id(1)
        role = tl.program_id(2)
        offs_j = jt * BLOCK_Q + tl.arange(0, BLOCK_Q)
        jmask = offs_j < q
        wa_base = Wa_ptr + s * q * d
        wb_base = Wb_ptr + s * q * d
        g_base = G_ptr + s * d * d * d
        if role == 0:
            offs_a = tl.arange(0, BLOCK_D)
            dwa = tl.zeros((BLOCK_D, BLOCK_Q), dtype=tl.float32)  # (a, j)
            for b0 in range(0, d, BLOCK_B):
                offs_b = b0 + tl.arange(0, BLOCK_B)
                bmask = offs_b < d
                wb = tl.load(
                    wb_base + offs_j[None, :] * d + offs_b[:, None],
                    mask=bmask[:, None] & jmask[None, :],
                    other=0.0,
                )  # (B, Q) = Wb[j, b]
                dwb = tl.zeros((BLOCK_B, BLOCK_Q), dtype=tl.float32)  # (b, j)
                for a in range(d):
                    wa = tl.load(wa_base + offs_j * d + a, mask=jmask, other=0.0)  # (Q,)
                    h = wb + wa[None, :]  # (B, Q) = h_ab[j]
                    gh = tl.zeros((BLOCK_B, BLOCK_Q), dtype=tl.float32)  # (Wcᵀ G_ab)_j
                    for g0 in range(0, d, BLOCK_G):
                        offs_g = g0 + tl.arange(0, BLOCK_G)
                        gmask = offs_g < d
                        g = tl.load(
                            g_base + (a * d + offs_b[:, None]) * d + offs_g[None, :],
                            mask=bmask[:, None] & gmask[None, :],
                            other=0.0,
                        )  # (B, G) = G[s, a, b, g]; zero on padded b, g
                        wc = tl.load(
                            Wc_ptr + s * d * q + offs_g[:, None] * q + offs_j[None, :],
                            mask=gmask[:, None] & jmask[None, :],
                            other=0.0,
                        )  # (G, Q) = Wc[g, j]
                        gh += tl.dot(g, wc, input_precision="ieee")  # (B, Q)
                    dh = 2.0 * h * gh  # (B, Q)
                    dwb += dh
                    # row a of dWa gets this b tile's column sum (a select: no
                    # dynamic index into registers)
                    dwa += tl.where(offs_a[:, None] == a, tl.sum(dh, axis=0)[None, :], 0.0)
                tl.store(
                    dWb_ptr + s * q * d + offs_j[None, :] * d + offs_b[:, None],
                    dwb,
                    mask=bmask[:, None] & jmask[None, :],
                )
            tl.store(
                dWa_ptr + s * q * d + offs_j[None, :] * d + offs_a[:, None],
                dwa,
                mask=(offs_a < d)[:, None] & jmask[None, :],
            )
        else:
            offs_g = (role - 1) * BLOCK_G + tl.arange(0, BLOCK_G)
            gmask = offs_g < d
            dwc = tl.zeros((BLOCK_G, BLOCK_Q), dtype=tl.float32)  # (g, j)
            for b0 in range(0, d, BLOCK_B):
                offs_b = b0 + tl.arange(0, BLOCK_B)
                bmask = offs_b < d
                wb = tl.load(
                    wb_base + offs_j[None, :] * d + offs_b[:, None],
                    mask=bmask[:, None] & jmask[None, :],
                    other=0.0,
                )  # (B, Q)
                for a in range(d):
                    wa = tl.load(wa_base + offs_j * d + a, mask=jmask, other=0.0)  # (Q,)
                    h = wb + wa[None, :]  # (B, Q)
                    g = tl.load(
                        g_base + (a * d + offs_b[:, None]) * d + offs_g[None, :],
                        mask=bmask[:, None] & gmask[None, :],
                        other=0.0,
                    )  # (B, G); padded rows are 0, so padded b adds nothing
                    dwc += tl.dot(tl.trans(g), h * h, input_precision="ieee")  # (G, Q)
            tl.store(
                dWc_ptr + s * d * q + offs_g[:, None] * q + offs_j[None, :],
                dwc,
                mask=gmask[:, None] & jmask[None, :],
            )

    # kernel-end: _cogo_grad_kernel


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
    workspace: dict[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed-form per-seed loss and gradients, in PyTorch (broadcasting + batched matmuls).

    Shapes: ``Wa, Wb`` (S, q, d), ``Wc`` (S, d, q), ``mask`` (S, d, d) with 1 for a training
    pair. Returns ``(loss (S,), dWa, dWb, dWc)``: each seed's mean loss over its training pairs
    and the gradients of their sum. float32 or float64. No autograd, no index gather.
    ``workspace``: a dict the caller keeps from call to call (the trainer does); the scratch
    buffers live there and are reused while the shapes stay, so a step allocates nothing
    (fresh multi-megabyte buffers cost a page fault per 4 KB page on every call).

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
    if workspace is not None and not isinstance(workspace, dict):
        raise TypeError(f"workspace must be a dict kept between calls, or None; got {type(workspace).__name__}")
    ws: dict[str, torch.Tensor] = {} if workspace is None else workspace
    n = mask.sum(dim=(1, 2))  # (S,) training pairs per seed
    w2 = (mask * (2.0 / n)[:, None, None]).reshape(S, 1, d * d)  # 2 m_ab / n_s
    # On a CPU, chunks of seeds whose (d, d, q) intermediates fit in cache run faster than one
    # large batch, but at least one seed per thread (bmm splits its batch over the threads);
    # on a GPU one batch keeps the launches few.
    chunk = S
    if Wa.device.type == "cpu":
        chunk = max(1, min(S, max(torch.get_num_threads(), REFERENCE_CPU_CHUNK_ELEMS // (d * d * q))))
    if chunk == S:  # no slicing: a few microseconds a call at the labs' size
        _reference_chunk(Wa, Wb, Wc, w2, out, ws, chunk)
        return out  # type: ignore[return-value]
    for s0 in range(0, S, chunk):
        sl = slice(s0, min(S, s0 + chunk))
        _reference_chunk(Wa[sl], Wb[sl], Wc[sl], w2[sl], tuple(o[sl] for o in out), ws, chunk)
    return out  # type: ignore[return-value]


REFERENCE_CPU_CHUNK_ELEMS = 1 << 18  # seeds per CPU chunk: this many elements of (d, d, q)


def _scratch(ws: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """``ws[name]``, (re)allocated when its shape, dtype or device differ from those asked."""
    t = ws.get(name)
    if t is None or tuple(t.shape) != shape or t.dtype != like.dtype or t.device != like.device:
        t = ws[name] = torch.empty(shape, dtype=like.dtype, device=like.device)
    return t


@torch.no_grad()
def _reference_chunk(Wa, Wb, Wc, w2, out, ws, cmax) -> None:
    """The closed form for a chunk of c <= cmax seeds, written into ``out`` = (loss, dWa, dWb, dWc).

    ``w2`` (c, 1, d²) = 2 m_ab / n_s. Every intermediate is written with ``out=`` or in place
    into ``ws``'s buffers (sized for cmax seeds). Layouts are those MKL multiplies fastest at
    these small shapes: the output as oᵀ (c, g, ab) = Wc h²ᵀ (d rows, not d columns), and
    contiguous operands (reading or writing a transposed view costs 5-10x more here).
    """
    c, q, d = Wa.shape
    dd = d * d
    A = _scratch(ws, "A", (cmax, d, q), Wa)[:c]  # row a is Wa[:, a]
    B = _scratch(ws, "B", (cmax, d, q), Wa)[:c]
    h = _scratch(ws, "h", (cmax, dd, q), Wa)[:c]  # row a·d + b is h_ab
    h2 = _scratch(ws, "h2", (cmax, dd, q), Wa)[:c]  # h ⊙ h, later dh
    pu = _scratch(ws, "pu", (cmax, d, dd), Wa)[:c]  # oᵀ, then P⊥ (o - e_y) (column ab)
    G = _scratch(ws, "G", (cmax, d, dd), Wa)[:c]  # Gᵀ: column ab is dL/do_ab = 2 r_ab
    mean = _scratch(ws, "mean", (cmax, 1, dd), Wa)[:c]
    red = _scratch(ws, "red", (cmax, d, q), Wa)[:c]
    target = ws.get("target")  # (1, g, ab): e_y with y = (a + b) mod d, column ab
    if target is None or target.shape != (1, d, dd) or target.dtype != Wa.dtype or target.device != Wa.device:
        ar = torch.arange(d, device=Wa.device)
        y = ((ar[:, None] + ar[None, :]) % d).reshape(dd)  # (d²,)
        target = ws["target"] = (ar[:, None] == y[None, :]).to(Wa.dtype)[None]
    A.copy_(Wa.transpose(1, 2))
    B.copy_(Wb.transpose(1, 2))
    torch.add(A[:, :, None, :], B[:, None, :, :], out=h.view(c, d, d, q))  # h_ab = Wa[:, a] + Wb[:, b]
    torch.mul(h, h, out=h2)
    torch.bmm(Wc, h2.transpose(1, 2), out=pu)  # oᵀ = Wc h²ᵀ, (c, d, d²)
    pu.sub_(target)
    torch.mean(pu, dim=1, keepdim=True, out=mean)
    pu.sub_(mean)  # P⊥ (o - e_y)
    torch.mul(pu, w2, out=G)  # G = 2 r = (2 m / n) P⊥ (o - e_y)
    torch.sum(pu.mul_(G), dim=(1, 2), out=out[0]).mul_(0.5)  # L_s = Σ (m / n) ||P⊥ (o - e_y)||²
    torch.bmm(G, h2, out=out[3])  # dWc = Σ_ab G_ab (h_ab ⊙ h_ab)ᵀ, (c, d, q)
    torch.bmm(G.mul_(2.0).transpose(1, 2), Wc, out=h2)  # 2 Wcᵀ G_ab, (c, d², q)
    dh = h2.mul_(h).view(c, d, d, q)  # dh_ab = 2 h_ab ⊙ (Wcᵀ G_ab), (c, d_a, d_b, q)
    out[1].copy_(torch.sum(dh, dim=2, out=red).transpose(1, 2))  # dWa[:, a] = Σ_b dh_ab, (c, q, d)
    out[2].copy_(torch.sum(dh, dim=1, out=red).transpose(1, 2))  # dWb[:, b] = Σ_a dh_ab


class _Blocks(NamedTuple):
    """Tile sizes and warps of the two kernels for one (q, d)."""

    block_d: int  # power of two >= max(d, 16): the full extent of a, g (tl.dot needs >= 16)
    block_b1: int  # rows b of the residual kernel's o and G tiles (one program each)
    block_q1: int  # hidden units per step of the residual kernel's loop over q (K of its dot)
    block_b2: int  # rows b of a G tile in the gradient kernel (K of dWc's product)
    block_g: int  # columns g of a G tile in the gradient kernel (K of Wcᵀ G's product)
    block_q2: int  # hidden units owned by one program of the gradient kernel
    num_warps: int
    num_stages2: int  # software-pipeline stages of the gradient kernel's loads


def _blocks(q: int, d: int) -> _Blocks:
    """Tile sizes of both kernels: no tile is BLOCK_D × BLOCK_D, and every product's K is 16.

    tl.dot in true float32 (``input_precision="ieee"``) runs on the FMA units, and each thread
    holds its rows and columns of both operands over the whole K: K sets the register count.
    With K = 16 and 4 warps, ptxas reports no spills at any d ≤ 127 for sm_80 and sm_90
    (``tools/kernel_stats.py``, which writes ``bench/results/cogo_kernel_ptxas.json``). The
    residual kernel's o tile is (32, BLOCK_D): 32 registers a thread at d = 127. Measured and
    rejected: a gradient-kernel BLOCK_Q of 32 spills on sm_90, and so does its default of
    three pipeline stages at 33 ≤ d ≤ 63 on sm_80 (two stages do not).
    """
    block_d = max(16, 1 << (d - 1).bit_length())
    return _Blocks(block_d, min(block_d, 32), 16, 16, 16, 16, 4, 2)

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
    blk = _blocks(q, d)
    n_bt = triton.cdiv(d, blk.block_b1)  # tiles of b in the residual kernel
    loss_part = torch.empty(S, d, n_bt, device=Wa.device, dtype=torch.float32)
    jit(_cogo_residual_kernel)[(S, d, n_bt)](
        Wa, Wb, Wc, mask, inv_n, G, loss_part, q, d,
        BLOCK_D=blk.block_d, BLOCK_B=blk.block_b1, BLOCK_Q=blk.block_q1, num_warps=blk.num_warps,
    )
    jit(_cogo_grad_kernel)[(S, triton.cdiv(q, blk.block_q2), 1 + triton.cdiv(d, blk.block_g))](
        Wa, Wb, Wc, G, dWa, dWb, dWc, q, d,
        BLOCK_D=blk.block_d, BLOCK_B=blk.block_b2, BLOCK_G=blk.block_g, BLOCK_Q=blk.block_q2,
        num_warps=blk.num_warps, num_stages=blk.num_stages2,
    )
    torch.sum(loss_part, dim=(1, 2), out=loss)
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
    """FLOPs and bytes of one call of the Triton path, counted over its grids and tile loops.

    ``bytes``: what the two kernels load and store, element by element (masked lanes move
    nothing), as they run: each residual program re-reads all of Wc, and the gradient kernel
    reads G once per (q-tile, role) program, so this is L2 traffic more than DRAM traffic.
    ``bytes_read`` and ``bytes_written`` split it; ``bytes_compulsory`` is the floor of the
    two-launch design (each kernel reads the weights once, G written once and read once, the
    mask read and the outputs written once). ``flops``: the useful arithmetic (6 S d³ q in the
    three products, 8 S d² q elementwise), not the padded work of the tiles.

    Explained in :doc:`/labs/cogo/kernel`.
    """
    for name, v, lo in (("S", S, 1), ("q", q, 1), ("d", d, 2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    blk = _blocks(q, d)
    nb1, nq2 = -(-d // blk.block_b1), -(-q // blk.block_q2)
    nb2, ng = -(-d // blk.block_b2), -(-d // blk.block_g)
    # residual kernel, grid (S, d, nb1); program (s, a, b-tile) loops over q: Wa[:, a] (q),
    # Wb rows of its b (Σ over b-tiles: d q), all of Wc (d q), its mask row and inv_n
    res_read = S * d * (nb1 * q + d * q + nb1 * d * q + d + nb1)
    res_write = S * d * (d * d + nb1)  # G[s, a] and one loss part per program
    # gradient kernel, grid (S, nq2, 1 + ng); Σ over the q-tiles of their width is q
    #   role 0: per b-tile Wb (d q), per (b-tile, a) Wa (nb2 d q), per (b-tile, a, g-tile)
    #           G (d³ per q-tile) and Wc (nb2 d² q); writes dWa, dWb (2 d q)
    #   role 1 + t: per b-tile Wb, per (b-tile, a) Wa, per (b-tile, a) G[:, :, g-tile]
    #           (d³ per q-tile over all t); writes dWc (d q)
    grad_read = S * (
        d * q + nb2 * d * q + nq2 * d**3 + nb2 * d * d * q  # role 0
        + ng * (d * q + nb2 * d * q) + nq2 * d**3  # roles 1 … ng
    )
    grad_write = S * 3 * d * q
    read = 4.0 * (res_read + grad_read)
    written = 4.0 * (res_write + grad_write)
    compulsory = 4.0 * (2 * 3 * S * d * q + S * d * d + 2 * S * d**3 + 3 * S * d * q + S * d + S)
    flops = 6.0 * S * d**3 * q + 8.0 * S * d * d * q
    return {"flops": flops, "bytes": read + written, "bytes_read": read, "bytes_written": written,
            "bytes_compulsory": compulsory}
