"""Do freshly executed notebooks print what the committed ones print (wall-clock times aside)?

    python tools/compare_outputs.py DIR [--strict]

DIR holds executed copies of the notebooks at their paths in the repository (``make book``
stages them in ``_build/src``). For each code cell the printed text (stdout and the plain-text
form of results, stderr and images aside) is compared with the committed cell's, after every
duration (a number followed by s, ms, min, it/s or s/it) is masked. Prints one line a notebook
and the first lines that differ; ``--strict`` exits 1 when any cell differs.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.timing import notebooks  # noqa: E402

DURATION = re.compile(r"\d+(?:[.,]\d+)*\s*(?:ms|µs|us|min|s/it|it/s|s)\b")


def printed(cell: dict) -> str:
    """A cell's printed text: its stdout, then the plain text of its results, durations masked.

    The two are kept apart because nbval merges a cell's stream outputs into one, placed where
    the first stream output was, while Jupyter keeps them interleaved with displayed results.
    """
    stdout, results = [], []
    for o in cell.get("outputs", []):
        if o.get("output_type") == "stream" and o.get("name") == "stdout":
            stdout.append("".join(o.get("text", "")))
        elif "data" in o and "text/plain" in o["data"] and "image/png" not in o["data"]:
            results.append("".join(o["data"]["text/plain"]))
    return DURATION.sub("<time>", "".join(stdout) + "\n--- results ---\n" + "\n".join(results))


def diff_lines(committed: str, fresh: str) -> list[str]:
    """The lines that differ, "-" committed and "+" fresh."""
    return [l for l in difflib.unified_diff(committed.splitlines(), fresh.splitlines(), lineterm="", n=0)
            if l[:1] in "+-" and not l.startswith(("+++", "---"))]


def compare(committed: Path, fresh: Path) -> list[str]:
    a = [c for c in json.loads(committed.read_text())["cells"] if c["cell_type"] == "code"]
    b = [c for c in json.loads(fresh.read_text())["cells"] if c["cell_type"] == "code"]
    if len(a) != len(b):
        return [f"{len(a)} code cells committed, {len(b)} executed"]
    diffs = []
    for i, (ca, cb) in enumerate(zip(a, b)):
        pa, pb = printed(ca), printed(cb)
        if pa != pb:
            d = diff_lines(pa, pb)
            diffs.append(f"cell {i}: " + " | ".join(d[:4]))
    return diffs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fresh_root", type=Path)
    ap.add_argument("--strict", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the counts to this file")
    args = ap.parse_args(argv)
    differing, cells = 0, {}
    for nb in notebooks():
        rel = nb.relative_to(ROOT)
        fresh = args.fresh_root / rel
        if not fresh.exists():
            print(f"missing   {rel}")
            differing += 1
            continue
        diffs = compare(nb, fresh)
        differing += bool(diffs)
        cells[rel.as_posix()] = len(diffs)
        print(f"{'identical' if not diffs else 'DIFFERS  '} {rel}")
        for d in diffs[:5]:
            print(f"    {d[:300]}")
    print(f"{differing} notebook(s) print other numbers than the committed ones (durations masked)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"notebooks_differing": differing, "cells_differing": cells},
                                        indent=1) + "\n")
    return 1 if (args.strict and differing) else 0


if __name__ == "__main__":
    sys.exit(main())
