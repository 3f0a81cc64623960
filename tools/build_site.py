"""Build the site with warnings as errors (``-W -n``), from committed or freshly executed notebooks.

    python tools/build_site.py             # the committed notebooks as they are (make test)
    python tools/build_site.py --execute   # execute every notebook first (make book)

Without ``--execute`` the pages show the committed outputs and the build takes about a minute:
``make test`` runs it, so a docstring or a page that breaks the book fails CI early. With
``--execute`` the sources are staged in ``_build/src``, every notebook there is executed two at
a time with one thread each (``tools/run_notebooks.py``), ``tools/compare_outputs.py`` reports
whether they print what the committed notebooks print, and the site is built from the staged
copy. Either way the HTML lands in ``_build/html``. The claims page is regenerated from the
notebooks the site is built from (``tools/claims_page.py``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
STAGE = BUILD / "src"
START = time.time()
STAGED = ["_config.yml", "_toc.yml", "references.bib", "book", "labs", "mini"]  # mini: literalinclude


def _config_without_execution(dst: Path) -> Path:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    # Jupyter Book resolves local extensions' paths against the config file's folder: the
    # generated config lives elsewhere, so give it the repository's paths.
    local = (config.get("sphinx") or {}).get("local_extensions") or {}
    for name, path in local.items():
        local[name] = str((ROOT / path).resolve())
    out = dst / "_config.yml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


def _jupyter_book(source: Path, config: Path) -> int:
    html = BUILD / "html"
    if html.exists():
        shutil.rmtree(html)
    doctrees = BUILD / ".doctrees"
    if doctrees.exists():
        shutil.rmtree(doctrees)  # Sphinx would otherwise reuse old outputs of unchanged pages
    cmd = [str(Path(sys.executable).with_name("jupyter-book")), "build", str(source), "--config", str(config),
           "--path-output", str(ROOT), "-W", "-n", "--keep-going", "-q", "--builder", "html"]
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--execute", action="store_true", help="execute every notebook before building")
    ap.add_argument("--jobs", type=int, default=2, help="notebooks executed at a time (default 2)")
    ap.add_argument("--start", type=float, help="epoch seconds when make book started (its timing)")
    args = ap.parse_args(argv)
    py = sys.executable
    if not args.execute:
        rc = subprocess.run([py, "tools/claims_page.py", "--check"], cwd=ROOT).returncode
        if rc:
            return rc
        return _jupyter_book(ROOT, _config_without_execution(BUILD / "config"))
    if STAGE.exists():
        shutil.rmtree(STAGE)
    STAGE.mkdir(parents=True)
    for name in STAGED:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copyfile)(src, STAGE / name)
    rc = subprocess.run([py, "tools/run_notebooks.py", "--out", str(STAGE), "--jobs", str(args.jobs),
                         "--timing-name", "book"], cwd=ROOT).returncode
    if rc:
        return rc
    report = BUILD / "timing" / "book_compare.json"
    subprocess.run([py, "tools/compare_outputs.py", str(STAGE), "--json", str(report)], cwd=ROOT)  # a report
    rc = subprocess.run([py, "tools/claims_page.py", "--root", str(STAGE), "--write"], cwd=ROOT).returncode
    if rc:
        return rc
    _config_without_execution(STAGE)
    rc = _jupyter_book(STAGE, STAGE / "_config.yml")
    total = time.time() - (args.start or START)
    (BUILD / "timing" / "book_total.json").write_text(json.dumps({"total_s": round(total, 1), "ok": rc == 0}) + "\n")
    print(f">> site: _build/html/index.html; make book took {total:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
