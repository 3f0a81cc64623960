"""Time the 8-bit GaLore step on CPU (reference path) against AdamW; the fused kernel on a GPU.

Part II (``mini.galore.adamw8bit``, ``mini.quant.blockwise``, ``mini.quant.adam8bit``).

CPU section (one thread by default, medians): for the book's tiny and small Llama models, with
fixed random gradients and ``update_proj_gap`` larger than the run (steady steps, no SVD), one
step of ``torch.optim.AdamW`` (all parameters), ``mini.galore.GaLoreAdamW`` and
``mini.galore.GaLoreAdamW8bit`` (the same GaLore param groups), and GaLoreAdamW8bit with the
previous reference path swapped back in (``torch.bucketize`` on the midpoints for the
nearest-code search, the ``arange // block_size`` dequantization): "before" and "after" in the
same run. Then the parts of one 8-bit step on a (128, 1376) moment: dequantize, the moment
update, quantize, and the nearest-code search alone (bucketize against the 16-bit table).

GPU section (skipped without CUDA; speed claims come from here only): the fused
``adam8bit_update`` kernel against the unfused path (two dequantize kernels, the torch moment
update, two quantize kernels) on a few sizes, with the same inputs.

Writes ``bench/results/galore8bit_cpu.json`` (and ``galore8bit_gpu.json`` on a GPU).

    python bench/galore8bit_cpu.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import contextlib
import math
import time
from typing import Iterator

import torch

import mini.quant.blockwise as bw
from mini.galore import GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
from mini.kernels import bench
from mini.lm import build_model, tiny_llama_config
from mini.quant.adam8bit import adam8bit_update
from mini.quant.blockwise import (
    code_midpoints,
    dequantize_blockwise,
    dequantize_blockwise_reference,
    dynamic_map,
    quantize_blockwise,
    quantize_blockwise_reference,
)

SIZES = {  # name: LlamaConfig overrides (as bench/galore_step.py)
    "tiny (0.8M)": {},
    "small (13M)": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
}


def _bucketize_search(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(scaled, code_midpoints(code), right=False)  # the previous search


def _arange_dequantize(q, absmax, code, block_size=256, shape=None, dtype=None, out=None, validate=True):
    """The previous dequantization reference (a block index per element)."""
    shape, dtype = bw._check_dequant_inputs(q, absmax, code, block_size, shape, dtype, out, contiguous=False,
                                            validate=validate)
    block_of = torch.arange(q.numel(), device=q.device) // block_size  # (n,)
    res = (code[q.reshape(-1).long()] * absmax[block_of]).to(dtype).reshape(shape)
    if out is None:
        return res
    out.copy_(res)
    return out


@contextlib.contextmanager
def previous_reference() -> Iterator[None]:
    """Swap the previous (bucketize, arange) reference path back in, for a before/after run."""
    old_search, old_deq = bw.nearest_code_index, bw._dequantize_op.reference
    bw.nearest_code_index, bw._dequantize_op.reference = _bucketize_search, _arange_dequantize
    try:
        yield
    finally:
        bw.nearest_code_index, bw._dequantize_op.reference = old_search, old_deq


def run_cpu(quick: bool) -> tuple[list[dict], list[dict]]:
    kw = dict(warmup=2, rep=5 if quick else 15, min_time_s=0.0 if quick else 1.0)
    rows = []
    for size, overrides in list(SIZES.items())[: 1 if quick else None]:
        model = build_model(tiny_llama_config(vocab_size=64, **overrides), seed=0)
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in model.parameters()]
        rank = 32 if size.startswith("tiny") else 128

        def groups():
            return galore_param_groups(model, rank=rank, update_proj_gap=10**9, scale=0.25, proj_type="std")

        makers = {
            "torch AdamW": (lambda: torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0), None),
            "mini GaLoreAdamW": (lambda: GaLoreAdamW(groups(), lr=1e-3), None),
            "mini GaLoreAdamW8bit (before: bucketize)": (
                lambda: GaLoreAdamW8bit(groups(), lr=1e-3, weight_decay=0.0), previous_reference),
            "mini GaLoreAdamW8bit": (lambda: GaLoreAdamW8bit(groups(), lr=1e-3, weight_decay=0.0), None),
        }
        for name, (make, ctx) in makers.items():
            opt = make()

            def step():
                for p, g in zip(model.parameters(), grads):
                    p.grad = g
                opt.step()

            with (ctx() if ctx else contextlib.nullcontext()):
                ms = bench.time_op(step, device="cpu", **kw)
            rows.append({"model": size, "rank": rank, "optimizer": name, "step_ms": ms})
            print(f"[cpu] {size:12s} r={rank:<4d} {name:42s} {ms:8.2f} ms/step", flush=True)
        base = next(r["step_ms"] for r in rows if r["model"] == size and r["optimizer"] == "torch AdamW")
        for r in rows:
            if r["model"] == size:
                r["vs_adamw"] = r["step_ms"] / base

    parts = []
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 1376, generator=g) * 1e-2  # one projected moment of the small model
    code = dynamic_map(True)
    q, a = quantize_blockwise_reference(x, code, validate=False)
    s = (x / x.abs().max()).reshape(-1)
    m, v = x.clone(), x * x

    def moments():
        m.mul_(0.9).add_(x, alpha=0.1)
        v.mul_(0.999).addcmul_(x, x, value=0.001)
        return m / (v.sqrt() / 0.5 + 1e-8)

    cases = {
        "dequantize (after)": lambda: dequantize_blockwise_reference(q, a, code, validate=False),
        "dequantize (before: arange)": lambda: _arange_dequantize(q, a, code, validate=False),
        "moment update + direction": moments,
        "quantize (after)": lambda: quantize_blockwise_reference(x, code, validate=False),
        "nearest code: 16-bit table (after)": lambda: bw.nearest_code_index(s, code),
        "nearest code: bucketize (before)": lambda: _bucketize_search(s, code),
    }
    for name, fn in cases.items():
        ms = bench.time_op(fn, device="cpu", **kw)
        parts.append({"part": name, "shape": [128, 1376], "ms": ms})
        print(f"[cpu] part {name:36s} {ms:8.3f} ms", flush=True)
    with previous_reference():
        ms = bench.time_op(lambda: quantize_blockwise_reference(x, code, validate=False), device="cpu", **kw)
    parts.append({"part": "quantize (before: bucketize)", "shape": [128, 1376], "ms": ms})
    print(f"[cpu] part {'quantize (before: bucketize)':36s} {ms:8.3f} ms", flush=True)
    return rows, parts


def run_gpu(quick: bool, device: str = "cuda", sizes: list[int] | None = None, backend: str = "auto") -> list[dict]:
    """Fused kernel against the unfused path on CUDA (speed claims come from here only).

    ``device="cpu", backend="interpret"`` with small ``sizes`` runs the same code as a smoke test.
    """
    dev = torch.device(device)
    cm, cv = dynamic_map(True).to(dev), dynamic_map(False).to(dev)
    rows = []
    if sizes is None:
        sizes = [1 << 20] if quick else [1 << 18, 1 << 22, 1 << 25]
    for n in sizes:
        g = torch.Generator(device=dev).manual_seed(0)
        grad = torch.randn(n, device=dev, generator=g) * 1e-2
        qm, am = quantize_blockwise(grad.clone(), cm)
        qv, av = quantize_blockwise(grad * grad, cv)
        out = torch.empty(n, device=dev)
        c2, ss = math.sqrt(1 - 0.999**10), 1e-3 / (1 - 0.9**10)

        def fused():
            adam8bit_update(grad, qm, am, qv, av, cm, cv, c2=c2, step_size=ss, out=out, backend=backend)

        def unfused():
            m = dequantize_blockwise(qm, am, cm, validate=False)
            v = dequantize_blockwise(qv, av, cv, validate=False)
            m.mul_(0.9).add_(grad, alpha=1 - 0.9)  # GaLoreAdamW8bit.adam_direction's ops
            v.mul_(0.999).addcmul_(grad, grad, value=1 - 0.999)
            quantize_blockwise(m, cm, out=(qm, am), validate=False)
            quantize_blockwise(v, cv, out=(qv, av), validate=False)
            return torch.div(m, v.sqrt_().div_(c2).add_(1e-8), out=m).mul_(-ss)

        # equivalence on this GPU, from one state: what wiring the kernel into the optimizer needs
        saved = [t.clone() for t in (qm, am, qv, av)]
        u_unfused = unfused().clone()
        after_unfused = [t.clone() for t in (qm, am, qv, av)]
        for t, s0 in zip((qm, am, qv, av), saved):
            t.copy_(s0)
        fused()
        equal = {"codes_m_differing": int((qm != after_unfused[0]).sum()),
                 "absmax_m_differing": int((am != after_unfused[1]).sum()),
                 "codes_v_differing": int((qv != after_unfused[2]).sum()),
                 "absmax_v_differing": int((av != after_unfused[3]).sum()),
                 "update_differing": int((out != u_unfused).sum())}
        print(f"[gpu] n={n:<10d} fused vs unfused differing: {equal}", flush=True)

        for name, fn in (("fused adam8bit_update", fused), ("unfused (2 dequant + torch + 2 quant)", unfused)):
            ms = bench.time_op(fn, device=dev, warmup=5 if dev.type == "cuda" else 0, rep=20 if quick else 100,
                               min_time_s=0.0)
            rows.append({"n": n, "path": name, "ms": ms, "GB_s_min_traffic": n * 9 / ms / 1e6, **equal})
            print(f"[gpu] n={n:<10d} {name:40s} {ms:8.4f} ms", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the tiny model only, few repetitions")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU section")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if not args.no_cpu:
        rows, parts = run_cpu(args.quick)
        path = bench.write_result("galore8bit_cpu", {"quick": args.quick, "threads": args.threads,
                                                     "cpu_rows": rows, "cpu_parts": parts,
                                                     "total_s": time.perf_counter() - t0}, device="cpu")
        print(f"wrote {path}")
    if torch.cuda.is_available():
        rows = run_gpu(args.quick)
        path = bench.write_result("galore8bit_gpu", {"quick": args.quick, "gpu_rows": rows}, device="cuda")
        print(f"wrote {path}")
    else:
        print("no CUDA device: GPU section skipped (no speed is claimed for the fused kernel)")


if __name__ == "__main__":
    main()
