"""Execute the book's notebooks, two at a time with one thread each, longest first.

    python tools/run_notebooks.py [--inplace | --out DIR] [--jobs 2] [NOTEBOOK ...]

Used by ``make execute`` (``--inplace``: the committed outputs) and by ``make book``
(``--out _build/src``: a staged copy that the site is built from). Each notebook runs in its own
``jupyter execute`` process with ``MINI_THREADS=1`` (the thread count every route pins, see
:mod:`mini.runtime`), ``MINI_CPUS`` = cores / jobs (so a lab that starts processes of its own
does not oversubscribe the machine) and ``OMP_NUM_THREADS=1``. Writes each notebook's time to
``_build/timing/<name>.json`` (``--timing-name``). Runs with ``FULL=1`` in the environment (a lab's
paper-scale settings) also merge their times into ``bench/results/timing_full.json``, the
separate record of ``FULL=1`` times:

    FULL=1 python tools/run_notebooks.py --out _build/full labs/welore/finetuning.ipynb
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.timing import expected_seconds, notebooks, part_of  # noqa: E402


def _env(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    cores = os.cpu_count() or 1
    env.update(MINI_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MINI_CPUS=str(max(1, cores // jobs)), PYTHONHASHSEED="0")
    return env


def run_one(src: Path, dst: Path, env: dict[str, str], timeout: int) -> dict:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.resolve() != dst.resolve():
        shutil.copyfile(src, dst)
    cmd = [sys.executable, "-m", "jupyter", "execute", "--inplace", f"--timeout={timeout}",
           "--kernel_name=python3", str(dst)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=dst.parent, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    return {"path": src.relative_to(ROOT).as_posix(), "seconds": round(seconds, 1),
            "ok": proc.returncode == 0, "log": proc.stderr[-4000:] if proc.returncode else ""}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--inplace", action="store_true", help="write the outputs into the notebooks")
    where.add_argument("--out", type=Path, help="copy each notebook under this folder and execute the copy")
    ap.add_argument("--jobs", type=int, default=2, help="notebooks at a time (default 2)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell (default 900)")
    ap.add_argument("--timing-name", default="execute", help="_build/timing/<name>.json")
    ap.add_argument("paths", nargs="*", type=Path, help="notebooks (default: every one in the book)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be a positive integer, got {args.jobs}")
    if args.out is not None:
        args.out = args.out.resolve()  # jupyter runs in the copy's folder: a relative path breaks
    paths = [p.resolve() for p in args.paths] or notebooks()
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        ap.error(f"no such notebook: {missing}")
    paths.sort(key=lambda p: -expected_seconds(p.relative_to(ROOT).as_posix()))  # longest first
    env = _env(args.jobs)
    t0 = time.perf_counter()
    results = []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, p, p if args.inplace else args.out / p.relative_to(ROOT), env,
                               args.timeout) for p in paths]
        for fut in futures:
            r = fut.result()
            results.append(r)
            print(f"{r['seconds']:7.1f} s  {'ok' if r['ok'] else 'FAILED':6s}  {r['path']}", flush=True)
            if not r["ok"]:
                print(r["log"], file=sys.stderr)
    wall = time.perf_counter() - t0
    print(f"{wall:7.1f} s  wall clock, {len(results)} notebooks, {args.jobs} at a time")
    out = ROOT / "_build" / "timing" / f"{args.timing_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "route": "jupyter execute", "jobs": args.jobs, "wall_s": round(wall, 1),
        "notebooks": {r["path"]: {"seconds": r["seconds"], "ok": r["ok"], "part": part_of(r["path"])}
                      for r in sorted(results, key=lambda r: r["path"])},
    }, indent=1) + "\n")
    if os.environ.get("FULL") == "1":
        _merge_full_record(results, wall)
    return 0 if all(r["ok"] for r in results) else 1


def _merge_full_record(results: list[dict], wall: float) -> None:
    """Merge FULL=1 times into bench/results/timing_full.json (one entry a notebook, the latest)."""
    from datetime import datetime, timezone

    from mini.runtime import cpu_model

    path = ROOT / "bench" / "results" / "timing_full.json"
    record = json.loads(path.read_text()) if path.exists() else {"notebooks": {}}
    when = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    for r in results:
        if r["ok"]:
            record["notebooks"][r["path"]] = {"seconds": r["seconds"], "written_utc": when,
                                              "cpu": cpu_model(), "cores": os.cpu_count(),
                                              "notebooks_side_by_side": min(len(results), 2)}
    path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(f"FULL=1 times merged into {path.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
