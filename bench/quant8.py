"""Time block-wise 8-bit quantize / dequantize (mini.quant.blockwise): Triton vs PyTorch vs torch.compile.

The storage of 8-bit GaLore's Adam moments (Part II, GaLore chapter, ``book/galore/``). Both
ops are memory-bound: per float32 element, quantize reads 4 bytes and writes 1 (plus 4 bytes of
absmax per block), dequantize reads 1 and writes 4. Compulsory DRAM bytes for n elements at
block B: quantize ``4n + n + 4n/B``, dequantize ``n + 4n/B + 4n`` (the 1 KB code table stays in
cache). The floor is those bytes over the measured copy bandwidth
(:func:`mini.kernels.bench.measured_ceiling`); the script reports each candidate's GB/s and its
fraction of that bandwidth.

(a) GPU (when CUDA is available): the compiled Triton kernels vs the PyTorch reference vs
    ``torch.compile`` of the reference, at 64M and 128M float32 elements (256 and 512 MB of
    input) and block 256, for the signed and the unsigned dynamic map; the Triton codes are
    checked against the reference's first (count of differing codes recorded).
(b) CPU smoke (no GPU, or ``--quick``): small sizes, the reference and the interpreter, to check
    the script; CPU times are not the book's figures.

Writes ``bench/results/quant8.json`` through mini.kernels.bench.

    python bench/quant8.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import sys

import torch

from mini.kernels import HAS_TRITON, bench
from mini.quant.blockwise import (
    dequantize_blockwise,
    dequantize_blockwise_reference,
    dynamic_map,
    quantize_blockwise,
    quantize_blockwise_reference,
)


def work_bytes(n: int, block_size: int) -> dict[str, float]:
    """Compulsory DRAM bytes of one quantize and one dequantize of n float32 values."""
    absmax = 4.0 * (-(-n // block_size))
    return {"quantize_bytes": 4.0 * n + n + absmax, "dequantize_bytes": n + absmax + 4.0 * n}


def _candidates(x, code, block_size, device, quick):
    q_ref, a_ref = quantize_blockwise_reference(x, code, block_size)
    n = x.numel()
    qbuf = torch.empty_like(q_ref)
    abuf = torch.empty_like(a_ref)
    obuf = torch.empty(n, device=device, dtype=torch.float32)
    quant = {"reference": lambda: quantize_blockwise_reference(x, code, block_size, validate=False)}
    dequant = {"reference": lambda: dequantize_blockwise_reference(q_ref, a_ref, code, block_size, validate=False)}
    if device == "cuda":
        quant["triton"] = lambda: quantize_blockwise(x, code, block_size, out=(qbuf, abuf), backend="triton", validate=False)
        dequant["triton"] = lambda: dequantize_blockwise(q_ref, a_ref, code, block_size, out=obuf, backend="triton", validate=False)
        cq = torch.compile(quantize_blockwise_reference)
        cd = torch.compile(dequantize_blockwise_reference)
        quant["torch_compile"] = lambda: cq(x, code, block_size, validate=False)
        dequant["torch_compile"] = lambda: cd(q_ref, a_ref, code, block_size, validate=False)
    elif HAS_TRITON:
        quant["interpret"] = lambda: quantize_blockwise(x, code, block_size, out=(qbuf, abuf), backend="interpret", validate=False)
        dequant["interpret"] = lambda: dequantize_blockwise(q_ref, a_ref, code, block_size, out=obuf, backend="interpret", validate=False)
    return q_ref, a_ref, quant, dequant


def run(device: str, sizes: list[int], block_size: int, quick: bool, copy_gbps: float | None) -> list[dict]:
    rows = []
    for n in sizes:
        for signed in (True, False):
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(n, device=device, generator=g)
            x = x if signed else x.square()  # a second moment is a square: non-negative
            code = dynamic_map(signed).to(device)
            q_ref, a_ref, quant, dequant = _candidates(x, code, block_size, device, quick)
            work = work_bytes(n, block_size)
            row: dict = {"n": n, "input_mb": 4 * n / 1e6, "block_size": block_size, "signed": signed, **work}
            if "triton" in quant or "interpret" in quant:
                name = "triton" if "triton" in quant else "interpret"
                q, a = quant[name]()
                row[f"{name}_codes_differing"] = int((q != q_ref).sum())
                row[f"{name}_absmax_max_abs_err"] = float((a - a_ref).abs().max())
                y = dequant[name]()
                row[f"{name}_dequant_max_abs_err"] = float((y - dequantize_blockwise_reference(q_ref, a_ref, code, block_size)).abs().max())
            kw = dict(warmup=1, rep=3, min_time_s=0.0) if device == "cpu" else {}
            for op_name, cands, bytes_ in (("quantize", quant, work["quantize_bytes"]), ("dequantize", dequant, work["dequantize_bytes"])):
                for name, fn in cands.items():
                    try:
                        ms = bench.time_op(fn, device=device, **kw)
                    except Exception as err:  # torch.compile can fail on an old stack: record it
                        row[f"{op_name}_{name}_error"] = repr(err)[:300]
                        continue
                    gbps = bytes_ / (ms * 1e-3) / 1e9
                    row[f"{op_name}_{name}_ms"] = ms
                    row[f"{op_name}_{name}_gbps"] = gbps
                    if copy_gbps:
                        row[f"{op_name}_{name}_fraction_of_copy"] = gbps / copy_gbps
                    print(f"[{device}] {op_name:10s} n={n:>11,d} signed={signed!s:5s} {name:13s} "
                          f"{ms:9.3f} ms {gbps:8.1f} GB/s", flush=True)
            rows.append(row)
            del x, q_ref, a_ref
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smallest sizes only, to check the script")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--block-size", type=int, default=256)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record: dict = {"block_size": args.block_size, "quick": args.quick}
    if torch.cuda.is_available() and HAS_TRITON:
        ceiling = bench.measured_ceiling("cuda")
        print(f"[gpu] ceiling: {ceiling}", flush=True)
        record["ceiling"] = ceiling
        sizes = [1 << 24] if args.quick else [1 << 26, 1 << 27]  # 64M, 128M floats: 256, 512 MB
        record["rows"] = run("cuda", sizes, args.block_size, args.quick, ceiling["copy_gbps"])
        device = "cuda"
    else:
        print("no GPU: CPU smoke run (reference and interpreter; times are not the book's figures)", flush=True)
        sizes = [4097] if args.quick else [4097, 1 << 16]
        record["rows"] = run("cpu", sizes, args.block_size, args.quick, None)
        device = "cpu"
    path = bench.write_result("quant8", record, device=device)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
