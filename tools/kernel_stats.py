"""Registers, spills and stack of the CoGO Triton kernels, from ptxas: no GPU needed.

Triton lowers each kernel ahead of time for a CUDA target (``triton.compile`` with a
``GPUTarget("cuda", 80 or 90, 32)``); ptxas, which triton ships, then reports what the compiled
kernel uses (``ptxas -v``): registers per thread, bytes of stack frame, and bytes of spill stores
and loads (registers that did not fit, moved to local memory: the thing to avoid). Counting
``.local`` in the PTX cannot see spills: ptxas allocates registers after the PTX is written.

The machine code depends on d only through the tile sizes (``mini.cogo.kernel._blocks(q, d)``)
and on whether d and q are multiples of 16 (triton specializes such integer arguments), so one
compile per distinct (tile sizes, d % 16 == 0) covers every d: :func:`config_classes` lists
them for d = 2 … 127.

    python tools/kernel_stats.py                     # the working tree's kernel, label "after"
    git show <rev>:mini/cogo/kernel.py > /tmp/k.py
    python tools/kernel_stats.py --source /tmp/k.py --label before --rev <rev>

Each run replaces its label's rows in bench/results/cogo_kernel_ptxas.json and keeps the others.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = "cogo_kernel_ptxas"
KERNELS = ("_cogo_residual_kernel", "_cogo_grad_kernel")
ARCHS = (80, 90)
D_SHOWN = (11, 23, 71, 127)  # the paper's moduli and a small one: always in the table


class ToolchainMissing(RuntimeError):
    """Triton, its CUDA backend or its ptxas is not available here."""


def toolchain() -> None:
    """Raise :class:`ToolchainMissing` (with the reason) unless triton can compile for CUDA here."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise ToolchainMissing("TRITON_INTERPRET=1: triton was imported in interpreter mode")
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler.compiler import ASTSource  # noqa: F401
    except ImportError as err:
        raise ToolchainMissing(f"triton with its CUDA backend is not importable: {err}") from err
    for arch in ARCHS:
        try:
            path = get_ptxas(arch).path
        except Exception as err:  # knobs raise when the binary is missing
            raise ToolchainMissing(f"no ptxas for sm_{arch}: {err}") from err
        if not path or not Path(path).exists():
            raise ToolchainMissing(f"no ptxas for sm_{arch} at {path!r}")


def load_kernel_module(source: str | None = None) -> ModuleType:
    """``mini.cogo.kernel``, or the module in file ``source`` (e.g. an older revision of it)."""
    if source is None:
        import mini.cogo.kernel as K

        return K
    spec = importlib.util.spec_from_file_location("cogo_kernel_under_test", source)
    if spec is None or spec.loader is None:
        raise ValueError(f"source must be a Python file, got {source!r}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def launch_config(mod: ModuleType, kernel: str, q: int, d: int) -> tuple[dict, dict]:
    """(constexprs, options) with which ``mod``'s ``_fused_op`` launches ``kernel`` at (q, d)."""
    blk = mod._blocks(q, d)
    if hasattr(blk, "block_b1"):  # the tiled kernel (issue 14 on)
        if kernel == KERNELS[0]:
            consts = {"BLOCK_D": blk.block_d, "BLOCK_B": blk.block_b1, "BLOCK_Q": blk.block_q1}
        else:
            consts = {"BLOCK_D": blk.block_d, "BLOCK_B": blk.block_b2, "BLOCK_G": blk.block_g,
                      "BLOCK_Q": blk.block_q2}
            return consts, {"num_warps": blk.num_warps, "num_stages": blk.num_stages2}
        return consts, {"num_warps": blk.num_warps}
    bd, bq1, bq2, nw = blk  # the untiled kernel: (BLOCK_D, BLOCK_Q of each kernel, warps)
    if kernel == KERNELS[0]:
        return {"BLOCK_D": bd, "BLOCK_Q": bq1}, {"num_warps": nw}
    return {"BLOCK_D": bd, "BLOCK_Q": bq2}, {"num_warps": nw, "num_stages": 2}


def config_classes(mod: ModuleType, q: int, d_max: int = 127) -> dict[int, list[int]]:
    """Representative d → every d in 2..d_max compiled to the same code (same tiles, d % 16).

    The d of ``D_SHOWN`` represent their class; a class without one is represented by its largest d.
    """
    groups: dict[str, list[int]] = {}
    for d in range(2, d_max + 1):
        key = repr([launch_config(mod, k, q, d) for k in KERNELS] + [d % 16 == 0])
        groups.setdefault(key, []).append(d)
    out = {}
    for ds in groups.values():
        for d in [d for d in D_SHOWN if d in ds] or [ds[-1]]:
            out[d] = ds
    return dict(sorted(out.items()))


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_stats(ptx: str, arch: int) -> dict[str, int]:
    """Run triton's ptxas with triton's own flags and ``-v`` on ``ptx``; parse its statistics."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(log)
        if m is None:
            raise RuntimeError(f"ptxas printed no {key!r} for sm_{arch}:\n{log}")
        out[key] = int(m.group(1))
    out["spill_bytes"] = out["spill_store_bytes"] + out["spill_load_bytes"]
    return out


@functools.cache
def _compile_stats(mod: ModuleType, kernel: str, arch: int, consts_key: str, opts_key: str,
                   q16: bool, d16: bool) -> dict[str, int]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource

    consts, opts = json.loads(consts_key), json.loads(opts_key)
    fn = getattr(mod, kernel)
    fn = triton.runtime.jit.JITFunction(getattr(fn, "fn", fn))  # whatever mode triton is in
    sig: dict[str, str] = {}
    attrs: dict[tuple[int], list] = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        else:
            sig[name] = "i32"
            if {"q": q16, "d": d16}[name]:  # triton specializes ints that are multiples of 16
                attrs[(i,)] = [["tt.divisibility", 16]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # triton 3.9's note on TRITON_DEFAULT_FP_FUSION
        compiled = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=opts)
    return ptxas_stats(compiled.asm["ptx"], arch)


def kernel_stats(kernel: str, arch: int, q: int, d: int,
                 mod: ModuleType | None = None) -> dict[str, Any]:
    """ptxas statistics of ``kernel`` as launched at (q, d), compiled for sm_``arch``.

    Returns ``registers``, ``stack_bytes``, ``spill_store_bytes``, ``spill_load_bytes``,
    ``spill_bytes`` (their sum) and the launch ``config``. Raises :class:`ToolchainMissing`
    where triton or ptxas is not available.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    toolchain()
    mod = mod if mod is not None else load_kernel_module()
    consts, opts = launch_config(mod, kernel, q, d)
    stats = _compile_stats(mod, kernel, arch, json.dumps(consts, sort_keys=True),
                           json.dumps(opts, sort_keys=True), q % 16 == 0, d % 16 == 0)
    return {**stats, "config": {**consts, **opts}}


def measure(mod: ModuleType, label: str, q: int) -> list[dict[str, Any]]:
    """One row per (representative d, kernel, arch), with the d values it stands for
    (``d_covered``: every d that compiles to the same code)."""
    rows = []
    for d, ds in config_classes(mod, q).items():
        for arch in ARCHS:
            for kernel in KERNELS:
                st = kernel_stats(kernel, arch, q, d, mod)
                rows.append({"label": label, "kernel": kernel.strip("_"), "arch": f"sm_{arch}",
                             "q": q, "d": d, "d_covered": ds, **st})
                print(f"[{label}] sm_{arch} d={d:3d} ({len(ds)} d) {kernel:24s} "
                      f"{st['registers']:3d} regs, {st['stack_bytes']:5d} B stack, "
                      f"{st['spill_bytes']:5d} B spilled", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=None, help="kernel module file (default: mini.cogo.kernel)")
    ap.add_argument("--label", default="after", help="row label, e.g. before / after")
    ap.add_argument("--rev", default=None, help="git revision the source came from (recorded)")
    ap.add_argument("--q", type=int, default=512, help="hidden width (only q %% 16 matters)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from mini.kernels import bench

    toolchain()
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    mod = load_kernel_module(args.source)
    rows = measure(mod, args.label, args.q)
    path = bench.results_dir() / f"{RESULT}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    kept = [r for r in old.get("rows", []) if r["label"] != args.label]
    sources = {**old.get("sources", {}), args.label: args.rev or "working tree"}
    record = {
        "what": "ptxas -v statistics of the CoGO kernels compiled for CUDA (no GPU used)",
        "smoke": False,
        "ptxas": {f"sm_{a}": subprocess.run([get_ptxas(a).path, "--version"], capture_output=True,
                                             text=True, check=True).stdout.strip().splitlines()[-1] for a in ARCHS},
        "triton_compiler": triton.__version__,
        "sources": sources,
        "rows": kept + rows,
    }
    print(f"wrote {bench.write_result(RESULT, record)}")


if __name__ == "__main__":
    main()
