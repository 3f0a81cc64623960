"""Time SpinQuant's two online kernels: the fast Walsh-Hadamard transform and the fused quantiser.

Part III, SpinQuant chapter (``mini.spinquant.fwht``, ``mini.spinquant.quant_kernel``). Both ops
run on every token at inference (R3/R4 online rotations, the per-token activation quantiser), do
almost no arithmetic per byte and so are bound by memory traffic. The bytes first:

- ``fwht_bytes = 2·T·n·s``: the transform reads ``x`` (T tokens × n, s bytes per element) once and
  writes ``y`` once (:func:`mini.spinquant.fwht.fwht_bytes`). The dense ``x @ hadamard(n)`` moves
  the same activations plus the ``n² s`` bytes of H, and does ``2·T·n²`` flops where the butterfly
  does ``T·n·log₂n`` additions (plus ``T·K²·2^m`` for orders ``n = K·2^m``).
- ``quant_bytes = 2·T·n·s``: the fused quantise-dequantise reads ``x`` once and writes ``x̂``
  once (:func:`mini.spinquant.quant_kernel.quant_bytes`); the unfused PyTorch chain
  (:func:`mini.spinquant.quantizers.quantize_activation`, about ten elementwise and reduction
  ops) reads and writes the activation once per op.

On a GPU the floor of each op is its bytes over the measured copy bandwidth
(:func:`mini.kernels.bench.measured_ceiling`); each Triton row records GB/s and the fraction of
that ceiling.

CPU section (always; one thread by default, medians; the record is marked ``"smoke": true``): for
(tokens, n) in (2048, 128), (2048, 352 = 44·8), (2048, 1024), (4096, 4096) (``--quick``: the
first three, fewer repetitions), float32: ``fwht`` (the reference backend: butterfly plus the K×K
mix) against ``x @ hadamard(n)`` in eager mode and under ``torch.compile`` (skipped with a note
when compiling fails or takes longer than a budget), and ``fused_quantize`` (reference backend)
against ``quantize_activation`` (4 bits). CPU times are no speed claim for the kernels.

GPU section (skipped without CUDA; speed claims come from here only): the same ops with the Triton
backends of ``fwht`` and ``fused_quantize`` next to the PyTorch paths, float32 and bfloat16, at
LLaMA-sized shapes (n = 128 head dim, 4096 hidden, 11008 = 344·32 LLaMA-2-7B intermediate,
14336 = 28·512 LLaMA-3-8B intermediate), the kernels' outputs compared with the references
first.

Writes ``bench/results/spinquant_kernels.json`` (``cpu_rows``; ``gpu_rows`` and ``ceiling`` on a
GPU) through mini.kernels.bench.

    python bench/spinquant_kernels.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from mini.kernels import HAS_TRITON, bench
from mini.spinquant.fwht import fwht, fwht_bytes
from mini.spinquant.hadamard import hadamard, hadamard_base
from mini.spinquant.quant_kernel import fused_quantize, quant_bytes
from mini.spinquant.quantizers import quantize_activation

CPU_SHAPES = [(2048, 128), (2048, 352), (2048, 1024), (4096, 4096)]  # (tokens, n)
GPU_SHAPES = [(8192, 128), (8192, 4096), (8192, 11008), (8192, 14336)]
BITS = 4
COMPILE_BUDGET_S = 60.0  # total seconds torch.compile may spend before the compiled rows are skipped


def _work(T: int, n: int, dtype: torch.dtype) -> dict[str, Any]:
    """Bytes and flops of one row (see the module docstring)."""
    base = hadamard_base(n)
    s = torch.empty((), dtype=dtype).element_size()
    return {"tokens": T, "n": n, "K": base.K, "m": base.m, "dtype": str(dtype).replace("torch.", ""),
            "fwht_bytes": fwht_bytes((T, n), dtype), "quant_bytes": quant_bytes((T, n), dtype),
            "matmul_bytes": fwht_bytes((T, n), dtype) + n * n * s,
            "fwht_flops": float(T * n * base.m + T * base.K**2 * (1 << base.m) * (base.K > 1)),
            "matmul_flops": 2.0 * T * n * n}


def _fwht_cases(x: torch.Tensor, h: torch.Tensor, kernel_backend: str | None) -> dict[str, Callable[[], Any]]:
    """The transform's candidates on ``x`` (T, n) with ``h`` (n, n) = hadamard(n)."""
    cases: dict[str, Callable[[], Any]] = {}
    if kernel_backend is not None:
        cases[f"fwht_{kernel_backend}"] = lambda: fwht(x, backend=kernel_backend)
    cases["fwht_reference"] = lambda: fwht(x, backend="reference")
    cases["matmul_eager"] = lambda: x @ h
    return cases


def _quant_cases(x: torch.Tensor, kernel_backend: str | None) -> dict[str, Callable[[], Any]]:
    """The quantiser's candidates on ``x`` (T, n): the fused op and the unfused PyTorch chain."""
    cases: dict[str, Callable[[], Any]] = {}
    if kernel_backend is not None:
        cases[f"fused_quantize_{kernel_backend}"] = lambda: fused_quantize(x, BITS, backend=kernel_backend)
    cases["fused_quantize_reference"] = lambda: fused_quantize(x, BITS, backend="reference")
    cases["quantize_activation_unfused"] = lambda: quantize_activation(x, BITS)
    return cases


class _Compiled:
    """``torch.compile`` of ``x @ H`` under a total compile-time budget; records why it is skipped."""

    def __init__(self, budget_s: float) -> None:
        self.budget_s, self.spent_s, self.note = budget_s, 0.0, None
        try:
            self.fn = torch.compile(lambda x, h: x @ h, dynamic=False)
        except Exception as err:  # noqa: BLE001 (an old or broken stack)
            self.fn, self.note = None, f"torch.compile failed: {repr(err)[:200]}"

    def prepare(self, x: torch.Tensor, h: torch.Tensor) -> Callable[[], torch.Tensor] | None:
        """Compile for this shape (timed) and return the call, or None with ``self.note`` set."""
        if self.fn is None:
            return None
        if self.spent_s > self.budget_s:
            self.note = f"skipped: torch.compile used {self.spent_s:.0f} s, over the {self.budget_s:.0f} s budget"
            return None
        t0 = time.perf_counter()
        try:
            self.fn(x, h)
        except Exception as err:  # noqa: BLE001
            self.fn, self.note = None, f"torch.compile failed: {repr(err)[:200]}"
            return None
        finally:
            self.spent_s += time.perf_counter() - t0
        return lambda: self.fn(x, h)


def run_cpu(quick: bool, shapes: list[tuple[int, int]] | None = None, compile_budget_s: float = COMPILE_BUDGET_S,
            ) -> tuple[list[dict], dict]:
    """CPU section: reference fwht vs eager / compiled matmul; reference fused_quantize vs unfused."""
    shapes = shapes or (CPU_SHAPES[:3] if quick else CPU_SHAPES)
    comp = _Compiled(compile_budget_s)
    rows = []
    for T, n in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(T, n, generator=g)  # (T, n) float32 activations
        h = hadamard(n)  # (n, n)
        row = _work(T, n, torch.float32)
        big = T * n * n > 2**32  # (4096, 4096): a 1.5 s matmul per call on one thread
        kw = {"warmup": 1, "rep": 2 if big else (3 if quick else 5), "min_time_s": 0.0 if (quick or big) else 0.3}
        ref = fwht(x, backend="reference")
        row["fwht_vs_matmul_max_abs_diff"] = float((ref - x @ h).abs().max())
        cases = _fwht_cases(x, h, None)
        t0 = time.perf_counter()
        call = comp.prepare(x, h)
        if call is not None:
            row["matmul_compile_first_call_s"] = time.perf_counter() - t0
            cases["matmul_compiled"] = call
        else:
            row["matmul_compiled_note"] = comp.note
        cases.update(_quant_cases(x, None))
        for name, fn in cases.items():
            ms = bench.time_op(fn, device="cpu", **kw)
            row[f"{name}_ms"] = ms
            nbytes = row["quant_bytes"] if "quant" in name else row["fwht_bytes"]
            row[f"{name}_GB_s"] = nbytes / ms / 1e6
            print(f"[cpu] T={T:<5d} n={n:<5d} {name:28s} {ms:10.3f} ms  {row[f'{name}_GB_s']:6.2f} GB/s "
                  f"(of {nbytes / 2**20:.1f} MiB)", flush=True)
        row["matmul_over_fwht"] = row["matmul_eager_ms"] / row["fwht_reference_ms"]
        row["unfused_over_fused_reference"] = row["quantize_activation_unfused_ms"] / row["fused_quantize_reference_ms"]
        rows.append(row)
    return rows, {"compile_spent_s": comp.spent_s, "compile_note": comp.note}


def run_gpu(quick: bool, ceiling: dict | None, device: str = "cuda", kernel_backend: str = "triton",
            shapes: list[tuple[int, int]] | None = None, dtypes: tuple[torch.dtype, ...] | None = None,
            with_compile: bool = True) -> list[dict]:
    """GPU section (speed claims come from here only). ``device="cpu", kernel_backend="interpret"``
    with tiny ``shapes`` runs the same code as a smoke test of this script."""
    cuda = device == "cuda"
    shapes = shapes or (GPU_SHAPES[:2] if quick else GPU_SHAPES)
    dtypes = dtypes or (torch.float32, torch.bfloat16)
    comp = _Compiled(COMPILE_BUDGET_S) if with_compile else None
    kw = {} if cuda else {"warmup": 0, "rep": 1, "min_time_s": 0.0}
    rows = []
    for dtype in dtypes:
        for T, n in shapes:
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(T, n, generator=g, device=device).to(dtype)  # (T, n)
            h = hadamard(n, dtype=dtype).to(device)  # (n, n)
            row = _work(T, n, dtype)
            try:  # equivalence first: the kernel against its reference on this device
                y_k = fwht(x, backend=kernel_backend)
                y_r = fwht(x, backend="reference")
                row["fwht_max_abs_err"] = float((y_k.float() - y_r.float()).abs().max())
                q_k = fused_quantize(x, BITS, backend=kernel_backend)
                q_r = fused_quantize(x, BITS, backend="reference")
                row["quant_elements_differing"] = int((q_k != q_r).sum())
            except Exception as err:  # noqa: BLE001 (record, keep timing the others)
                row["check_error"] = repr(err)[:300]
            cases = _fwht_cases(x, h, kernel_backend)
            if comp is not None:
                call = comp.prepare(x, h)
                if call is not None:
                    cases["matmul_compiled"] = call
                else:
                    row["matmul_compiled_note"] = comp.note
            cases.update(_quant_cases(x, kernel_backend))
            for name, fn in cases.items():
                try:
                    ms = bench.time_op(fn, device=device, **kw)
                except Exception as err:  # noqa: BLE001 (e.g. a tile too large for the kernel: record it)
                    row[f"{name}_error"] = repr(err)[:300]
                    continue
                nbytes = row["quant_bytes"] if "quant" in name else row["fwht_bytes"]
                row[f"{name}_ms"] = ms
                row[f"{name}_GB_s"] = nbytes / ms / 1e6
                frac = ""
                if ceiling is not None:
                    row[f"{name}_of_copy_bw"] = row[f"{name}_GB_s"] / ceiling["copy_gbps"]
                    frac = f" ({100 * row[f'{name}_of_copy_bw']:5.1f}% of copy)"
                print(f"[{device}] {row['dtype']:8s} T={T:<5d} n={n:<5d} {name:28s} {ms:9.4f} ms "
                      f"{row[f'{name}_GB_s']:8.1f} GB/s{frac}", flush=True)
            if ceiling is not None:
                row["floor_ms"] = 1e3 * row["fwht_bytes"] / (ceiling["copy_gbps"] * 1e9)
            rows.append(row)
            del x, h
            if cuda:
                torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer and smaller shapes, fewer repetitions")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU section")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    record: dict = {"quick": args.quick, "threads": args.threads, "bits": BITS}
    if hasattr(os, "getloadavg"):  # contention: CPU times on a loaded machine are pessimistic
        record["load_average_at_start"] = os.getloadavg()
    device = "cpu"
    if torch.cuda.is_available() and HAS_TRITON:
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 matmul as float32
        ceiling = bench.measured_ceiling("cuda")
        print(f"[gpu] ceiling: {ceiling}", flush=True)
        record["ceiling"] = ceiling
        record["gpu_rows"] = run_gpu(args.quick, ceiling)
        device = "cuda"
    else:
        print("no CUDA device (or no triton): GPU section skipped (no speed is claimed for the kernels)", flush=True)
    if not args.no_cpu:
        record["cpu_rows"], record["cpu_compile"] = run_cpu(args.quick)
    record["total_s"] = time.perf_counter() - t0
    if hasattr(os, "getloadavg"):
        record["load_average_at_end"] = os.getloadavg()
    path = bench.write_result("spinquant_kernels", record, device=device)
    print(f"wrote {path} ({record['total_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
