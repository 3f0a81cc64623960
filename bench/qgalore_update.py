"""Time Q-GaLore's fused INT8 weight update (dequantize, add, requantize with stochastic rounding).

``mini.qgalore.int8_linear.sr_update`` on the compiled Triton kernel vs its PyTorch reference vs
``torch.compile`` of the reference, on a GPU, at several hundred MB of traffic per call. Bytes
per call from ``update_bytes`` (codes read and written, Δ and the uniforms read, two scales and
zero points per group: about 10 bytes per weight) turn times into GB/s, shown next to the
measured copy bandwidth of ``mini.kernels.bench.measured_ceiling``. The uniforms are drawn
before timing (the layer draws them with torch from its generator; that is one more pass of
4 bytes per weight, not part of the kernel).

Without CUDA the script times the reference on a small size (a smoke test of the script, not a
figure for the book). ``--quick`` runs the smallest case only. Writes
bench/results/qgalore_update.json through mini.kernels.bench.

    python bench/qgalore_update.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse

import torch

from mini.kernels import bench
from mini.qgalore.int8_linear import sr_update, sr_update_reference, update_bytes
from mini.quant.groupwise import quantize_groupwise


def make_inputs(numel: int, group_size: int, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(numel, device=device, generator=gen) * 0.02
    qt = quantize_groupwise(w, bits=8, group_size=group_size)
    delta = torch.randn(numel, device=device, generator=gen) * 1e-4
    rand = torch.rand(numel, device=device, generator=gen)
    return qt.data.clone(), qt.scale.clone(), qt.zero.clone(), delta, rand


def row(name: str, ms: float, numel: int, group_size: int, copy_gbps: float | None) -> dict:
    nbytes = update_bytes(numel, group_size)
    gbps = nbytes / (ms * 1e-3) / 1e9
    out = {"impl": name, "numel": numel, "group_size": group_size, "mbytes": nbytes / 1e6, "ms": ms, "gbps": gbps}
    if copy_gbps:
        out["fraction_of_copy"] = gbps / copy_gbps
    print(f"{name:>12s}  n={numel:>11,d}  g={group_size:>4d}  {nbytes / 1e6:9.1f} MB  {ms:9.3f} ms  {gbps:8.1f} GB/s"
          + (f"  ({gbps / copy_gbps:.0%} of copy)" if copy_gbps else ""))
    return out


def cpu_part(quick: bool) -> list[dict]:
    rows = []
    for numel in ([1 << 16] if quick else [1 << 16, 1 << 20]):
        args = make_inputs(numel, 256, "cpu")
        kw = dict(warmup=1 if quick else 3, rep=3 if quick else 10, min_time_s=0.0 if quick else 0.5)
        ms = bench.time_op(lambda: sr_update_reference(*args, 256), device="cpu", **kw)
        rows.append(row("reference", ms, numel, 256, None))
    return rows


def gpu_part(quick: bool) -> tuple[dict, list[dict]]:
    ceiling = bench.measured_ceiling("cuda", copy_mib=256 if quick else 1024)
    copy = ceiling["copy_gbps"]
    print(f"measured copy bandwidth: {copy:.0f} GB/s")
    compiled = None
    try:
        compiled = torch.compile(sr_update_reference)
    except Exception as err:  # pragma: no cover - depends on the machine
        print(f"torch.compile unavailable: {err}")
    rows = []
    sizes = [(1 << 22, 256)] if quick else [(1 << 24, 256), (1 << 26, 256), (1 << 26, 64)]
    for numel, group in sizes:
        args = make_inputs(numel, group, "cuda")
        # correctness on this GPU: codes equal, or one apart where the division rounds differently
        ref = sr_update_reference(*args, group)
        got = sr_update(*args, group, backend="triton")
        diff = (got[0].int() - ref[0].int()).abs()
        check = {"max_code_diff": int(diff.max()), "frac_codes_equal": float((diff == 0).float().mean()),
                 "max_scale_rel_diff": float(((got[1] - ref[1]).abs() / ref[1]).max())}
        print(f"  check vs reference: {check}")
        out = (torch.empty_like(args[0]), torch.empty_like(args[1]), torch.empty_like(args[2]))
        r = row("triton", bench.time_op(lambda: sr_update(*args, group, out=out, backend="triton"), device="cuda"), numel, group, copy)
        r["check"] = check
        rows.append(r)
        rows.append(row("reference", bench.time_op(lambda: sr_update_reference(*args, group), device="cuda"), numel, group, copy))
        if compiled is not None:
            try:
                compiled(*args, group)
                rows.append(row("compile", bench.time_op(lambda: compiled(*args, group), device="cuda"), numel, group, copy))
            except Exception as err:  # pragma: no cover
                print(f"torch.compile failed: {type(err).__name__}: {err}")
                compiled = None
        del args, ref, got, out
        torch.cuda.empty_cache()
    return ceiling, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smallest case only (checks the script)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    record: dict = {"quick": args.quick}
    if torch.cuda.is_available():
        device = "cuda"
        ceiling, rows = gpu_part(args.quick)
        record.update(ceiling=ceiling, rows=rows)
    else:
        device = "cpu"
        print("no CUDA device: timing the PyTorch reference on CPU (a smoke test, not a book figure)")
        record["cpu_rows"] = cpu_part(args.quick)
    path = bench.write_result("qgalore_update", record, device=device)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
