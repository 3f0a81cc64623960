"""Time the SLTrain layer's forward + backward (mini.sltrain): Triton vs PyTorch vs torch.compile.

Part II, SLTrain chapter (``book/sltrain/``). One training step of one layer
``y = x ((α/r) B A + S)ᵀ + b`` at LLaMA-1B sizes (q/k/v/o 2048 × 2048, gate/up 5461 × 2048, down
2048 × 5461; r = 512, δ = 0.03, 4096 tokens): forward, then backward with a fixed upstream
gradient, W recomputed in backward and never stored.

Work of one step (``T`` tokens, ``m`` out, ``n`` in, rank ``r``, ``nnz`` non-zeros, ``s`` bytes
per element; :func:`step_work`):

- FLOPs: ``6·T·m·n`` (y = x Wᵀ, ∂x = g W, G_W = gᵀ x: the dense layer's own work) plus
  ``2 × 2·m·n·r`` (W built twice) plus ``2 × 2·m·n·r`` (∂B = G_W Aᵀ, ∂A = Bᵀ G_W): the
  SLTrain overhead over a dense layer is ``8 m n r / (6 T m n) = 4r / (3T)``, 17% at r = 512,
  T = 4096.
- Compulsory DRAM bytes: read x, g, A, B, values, index, bias; write y, ∂x, ∂A, ∂B, ∂values,
  ∂b. As implemented, W is also written and read twice and G_W written once and read three
  times (``implemented_bytes``).

The floor is ``max(FLOPs / measured float32 matmul rate, compulsory bytes / measured copy
bandwidth)`` (:func:`mini.kernels.bench.measured_ceiling`, TF32 off: the book's float32
kernels run ``input_precision="ieee"``); each candidate's time is reported next to it.

(a) GPU (when CUDA and triton are available): the layer on the compiled Triton kernels vs the
    same layer on the PyTorch reference ops vs ``torch.compile`` of the reference step, a dense
    ``nn.Linear`` of the same shape (what the extra work costs) and the naive autograd version
    that materialises and saves W; float32, plus a bfloat16 row per shape; the kernel's W and
    gradients are compared with the reference's first, and the peak memory of each is recorded.
(b) CPU: the reference step against a dense ``nn.Linear`` step of the same shape, at LLaMA-60M
    sizes (512 × 512, 1376 × 512, 512 × 1376, r = 128) and 512 tokens (``--quick``: one shape,
    fewer tokens), with the bytes of the tensors autograd saves for backward in each. CPU times
    are not the book's GPU figures (the record is marked ``"smoke": true``).

Writes ``bench/results/sltrain_layer.json`` through mini.kernels.bench.

    python bench/sltrain_layer.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

from mini.kernels import HAS_TRITON, bench
from mini.sltrain import SparseLowRankLinear, sparse_lowrank_linear, sparse_lowrank_weight, sparse_lowrank_weight_reference

GPU_SHAPES = [(2048, 2048), (5461, 2048), (2048, 5461)]  # (out, in) of LLaMA-1B's q/k/v/o, gate/up, down
CPU_SHAPES = [(512, 512), (1376, 512), (512, 1376)]  # LLaMA-60M


def step_work(T: int, m: int, n: int, r: int, nnz: int, elem_bytes: int = 4) -> dict[str, float]:
    """FLOPs and bytes of one forward + backward of the layer (see the module docstring)."""
    s = elem_bytes
    flops = 6.0 * T * m * n + 8.0 * m * n * r + 2.0 * nnz + T * m
    params = (r * n + m * r + nnz + m) * s + 8 * nnz
    compulsory = params + (T * n + T * m) * s + (T * m + T * n) * s + (r * n + m * r + nnz + m) * s
    implemented = compulsory + 2 * (2 * m * n * s) + 4 * m * n * s
    return {"flops": flops, "compulsory_bytes": float(compulsory), "implemented_bytes": float(implemented),
            "dense_flops": 6.0 * T * m * n}


def _saved_bytes(fn, leaves) -> int:
    """Bytes of the tensors autograd saves for ``fn()``'s backward beyond ``leaves`` (the input and
    the parameters, which exist anyway): the memory a step holds between forward and backward."""
    total = 0
    owned = {t.untyped_storage().data_ptr() for t in leaves}

    def pack(t):
        nonlocal total
        if t.untyped_storage().data_ptr() not in owned:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total


def _make(m, n, r, density, T, device, dtype, seed=0):
    layer = SparseLowRankLinear(n, m, r, density=density, alpha=8.0, seed=seed, device=device, dtype=dtype)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():  # B = 0 at init would skip no work but hide errors in B's terms
        layer.B.copy_(torch.randn(m, r, generator=g, device=device, dtype=torch.float32).to(dtype) / r**0.5)
    x = torch.randn(T, n, generator=g, device=device, dtype=torch.float32).to(dtype).requires_grad_(True)
    gy = torch.randn(T, m, generator=g, device=device, dtype=torch.float32).to(dtype)
    dense = nn.Linear(n, m, device=device, dtype=dtype)
    return layer, x, gy, dense


def _steps(layer, x, gy, dense, kernel_backend):
    params = [x, layer.A, layer.B, layer.values, layer.bias]

    def run(backend):
        def step():
            layer.backend = backend
            y = layer(x)
            return torch.autograd.grad(y, params, gy)
        return step

    def dense_step():
        y = dense(x)
        return torch.autograd.grad(y, [x, dense.weight, dense.bias], gy)

    def naive_step():  # autograd through a materialised W: saves W for backward
        y = x @ layer.dense_weight().t() + layer.bias
        return torch.autograd.grad(y, params, gy)

    steps = {"reference": run("reference"), "dense nn.Linear": dense_step, "naive autograd (W saved)": naive_step}
    if kernel_backend is not None:  # "triton" on a GPU ("interpret" to check this script on a CPU)
        steps = {kernel_backend: run(kernel_backend), **steps}

        def ref_fn(x, A, B, values, bias):
            return sparse_lowrank_linear(x, A, B, values, layer.index, bias, layer.scale, backend="reference")

        compiled = torch.compile(ref_fn)

        def compiled_step():
            y = compiled(x, layer.A, layer.B, layer.values, layer.bias)
            return torch.autograd.grad(y, params, gy)

        steps["torch_compile(reference)"] = compiled_step
    return steps


def _check(layer, steps, kernel_backend) -> dict[str, float]:
    """Largest differences of the kernel step from the reference step (W, then the gradients)."""
    out = {}
    w_t = sparse_lowrank_weight(layer.B.detach(), layer.A.detach(), layer.values.detach(), layer.index,
                                layer.scale, backend=kernel_backend)
    w_r = sparse_lowrank_weight_reference(layer.B.detach(), layer.A.detach(), layer.values.detach(), layer.index,
                                          layer.scale)
    out["weight_max_abs_err"] = float((w_t.float() - w_r.float()).abs().max())
    out["weight_max_abs"] = float(w_r.float().abs().max())
    g_t, g_r = steps[kernel_backend](), steps["reference"]()
    for name, a, b in zip(("x", "A", "B", "values", "bias"), g_t, g_r):
        out[f"grad_{name}_max_rel_err"] = float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
    return out


def run_gpu(quick: bool, ceiling: dict, device: str = "cuda", kernel_backend: str = "triton",
            shapes: list | None = None, tokens: int | None = None, rank: int = 512) -> list[dict]:
    """Part (a). ``device``/``kernel_backend``/``shapes``/``tokens`` exist to dry-run this on a CPU
    with the interpreter at tiny sizes; the book's run uses the defaults on a GPU."""
    rows = []
    T, r, density = tokens or (1024 if quick else 4096), rank, 0.03
    shapes = shapes or (GPU_SHAPES[:1] if quick else GPU_SHAPES)
    cuda = device == "cuda"
    for dtype in (torch.float32, torch.bfloat16):
        for (m, n) in shapes:
            layer, x, gy, dense = _make(m, n, r, density, T, device, dtype)
            steps = _steps(layer, x, gy, dense, kernel_backend)
            s = torch.finfo(dtype).bits // 8
            work = step_work(T, m, n, r, layer.nnz, s)
            row = {"out": m, "in": n, "rank": r, "density": density, "nnz": layer.nnz, "tokens": T,
                   "dtype": str(dtype).replace("torch.", ""), **work}
            try:
                row.update(_check(layer, steps, kernel_backend))
            except Exception as err:  # record, keep timing the others
                row["check_error"] = repr(err)[:300]
            floor_ms = 1e3 * max(work["flops"] / (ceiling["matmul_fp32_tflops"] * 1e12),
                                 work["compulsory_bytes"] / (ceiling["copy_gbps"] * 1e9))
            if dtype == torch.float32:
                row["floor_ms"] = floor_ms
            for name, fn in steps.items():
                try:
                    if cuda:
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        base = torch.cuda.memory_allocated()
                        fn()
                        torch.cuda.synchronize()
                        row[f"{name}_peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
                    ms = bench.time_op(fn, device=device, **({} if cuda else dict(warmup=1, rep=2, min_time_s=0.0)))
                except Exception as err:  # torch.compile can fail on an old stack: record it
                    row[f"{name}_error"] = repr(err)[:300]
                    continue
                row[f"{name}_ms"] = ms
                row[f"{name}_tflops"] = work["flops"] / (ms * 1e-3) / 1e12
                floor = f" (floor {floor_ms:.3f} ms)" if dtype == torch.float32 else ""
                print(f"[{device}] {row['dtype']:8s} {m:>5d}x{n:<5d} T={T} {name:26s} {ms:9.3f} ms "
                      f"{row[f'{name}_tflops']:6.1f} TFLOP/s{floor}", flush=True)
            rows.append(row)
            del layer, x, gy, dense, steps
            if cuda:
                torch.cuda.empty_cache()
    return rows


def run_cpu(quick: bool) -> list[dict]:
    rows = []
    T, r, density = (256 if quick else 512), 128, 0.03
    for (m, n) in (CPU_SHAPES[:1] if quick else CPU_SHAPES):
        layer, x, gy, dense = _make(m, n, r, density, T, "cpu", torch.float32)
        steps = _steps(layer, x, gy, dense, None)
        work = step_work(T, m, n, r, layer.nnz)
        row = {"out": m, "in": n, "rank": r, "density": density, "nnz": layer.nnz, "tokens": T,
               "dtype": "float32", **work}
        leaves = [x, *layer.parameters(), *layer.buffers(), *dense.parameters()]
        row["saved_extra_bytes_sltrain"] = _saved_bytes(lambda: layer(x), leaves)
        row["saved_extra_bytes_dense"] = _saved_bytes(lambda: dense(x), leaves)
        row["saved_extra_bytes_naive"] = _saved_bytes(lambda: x @ layer.dense_weight().t() + layer.bias, leaves)
        kw = dict(warmup=2, rep=5 if quick else 10, min_time_s=0.0 if quick else 0.5)
        for name, fn in steps.items():
            ms = bench.time_op(fn, device="cpu", **kw)
            row[f"{name}_ms"] = ms
            print(f"[cpu] {m:>5d}x{n:<5d} T={T} r={r} {name:26s} {ms:9.2f} ms", flush=True)
        row["reference_over_dense"] = row["reference_ms"] / row["dense nn.Linear_ms"]
        row["flops_ratio_over_dense"] = work["flops"] / work["dense_flops"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one shape, fewer tokens, to check the script")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    record: dict = {"quick": args.quick}
    if hasattr(os, "getloadavg"):  # contention: CPU times on a loaded machine are pessimistic
        record["load_average_at_start"] = os.getloadavg()
    if torch.cuda.is_available() and HAS_TRITON:
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 throughout, as the kernels' "ieee"
        ceiling = bench.measured_ceiling("cuda")
        print(f"[gpu] ceiling: {ceiling}", flush=True)
        record["ceiling"] = ceiling
        record["gpu_rows"] = run_gpu(args.quick, ceiling)
        device = "cuda"
    else:
        print("no GPU: CPU run (the reference step vs a dense nn.Linear; times are not the book's GPU figures)",
              flush=True)
        device = "cpu"
    record["cpu_rows"] = run_cpu(args.quick) if device == "cpu" else []
    record["total_s"] = time.perf_counter() - t0
    if hasattr(os, "getloadavg"):
        record["load_average_at_end"] = os.getloadavg()
    path = bench.write_result("sltrain_layer", record, device=device)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
