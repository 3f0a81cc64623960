"""Make the checkpoint assets that ship in mini/checkpoints/ (``make assets``).

    python tools/make_assets.py [NAME ...] [--root DIR] [--set KEY=VALUE ...]

Trains each recipe of :data:`mini.assets.RECIPES` (all by default) with one torch thread, the
thread count every notebook runs with (:func:`mini.setup`), saves the model and writes its
``asset.json`` (settings, seed, this command, metrics, versions, sha256 of each file). ``--set``
overrides a setting (the tests run the recipes with ``--set steps=3`` into a temporary folder).
"""
from __future__ import annotations

import argparse
import ast
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mini  # noqa: E402
from mini.assets import ASSET_ROOT, RECIPES, make_asset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help=f"assets to make (default: all of {sorted(RECIPES)})")
    ap.add_argument("--root", type=Path, default=ASSET_ROOT, help="where to write them")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    args = ap.parse_args(argv)
    names = args.names or sorted(RECIPES)
    bad = [n for n in names if n not in RECIPES]
    if bad:
        ap.error(f"unknown asset {bad}; known: {sorted(RECIPES)}")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if not key or not value:
            ap.error(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key] = ast.literal_eval(value)
    mini.setup(seed=0, verbose=False)  # one thread, as in the notebooks
    command = "python tools/make_assets.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    for name in names:
        t0 = time.perf_counter()
        rec = make_asset(name, root=args.root, command=command.strip(), **overrides)
        print(f"{name}: {rec['metrics']} in {time.perf_counter() - t0:.1f} s -> {args.root / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
