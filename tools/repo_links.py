"""Generate or check every link that depends on the repository's URL and branch.

The one setting is ``repository.url`` and ``repository.branch`` in ``_config.yml``. From it come:

- each lab's "Open in Colab" badge, which must point at the notebook's own path on that branch;
- the ``%pip install "mini[labs] @ git+URL@BRANCH"`` line in each lab's and each notebook
  chapter's first code cell (the ``labs``
  extra of pyproject.toml declares what the notebooks import beyond mini's core);
- the Colab links and the install line in README.md and in the book's Markdown pages;
- Jupyter Book's launch buttons (read by Jupyter Book itself from the same section).

``python tools/repo_links.py --write`` rewrites them all; ``--check`` lists what disagrees and
exits 1 (``make book`` and the tests run the check).
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
COLAB_RE = re.compile(
    r"https://colab\.research\.google\.com/github/[^/\s)\"']+/[^/\s)\"']+/blob/[^/\s)\"']+/"
    r"(?P<path>[^\s)\"']+\.ipynb)"
)
PIP_RE = re.compile(r"git\+https://[^\s\"'@]+(?:@[^\s\"']+)?")
BADGE_IMG = "https://colab.research.google.com/assets/colab-badge.svg"


def repository(root: Path = ROOT) -> tuple[str, str, str]:
    """(url, branch, "owner/name") from _config.yml's repository section."""
    config = yaml.safe_load((root / "_config.yml").read_text())
    repo = config.get("repository") or {}
    url, branch = repo.get("url"), repo.get("branch")
    m = re.fullmatch(r"https://github\.com/([^/\s]+)/([^/\s]+?)/?", str(url))
    if not m or not branch:
        raise ValueError(f"_config.yml repository.url must be https://github.com/OWNER/NAME and "
                         f"repository.branch set; got url={url!r}, branch={branch!r}")
    return url.rstrip("/"), str(branch), f"{m.group(1)}/{m.group(2)}"


def colab_url(path: str, root: Path = ROOT) -> str:
    _, branch, slug = repository(root)
    return f"https://colab.research.google.com/github/{slug}/blob/{branch}/{path}"


def badge(path: str, root: Path = ROOT) -> str:
    return f"[![Open In Colab]({BADGE_IMG})]({colab_url(path, root)})"


def pip_target(root: Path = ROOT) -> str:
    url, branch, _ = repository(root)
    return f"git+{url}@{branch}"


def pip_line(root: Path = ROOT) -> str:
    return f'%pip install -q "mini[labs] @ {pip_target(root)}"'


def _fix_text(text: str, root: Path, own_path: str | None) -> str:
    text = COLAB_RE.sub(lambda m: colab_url(own_path or m.group("path"), root), text)
    return PIP_RE.sub(pip_target(root), text)


def lab_notebooks(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in (root / "labs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def chapter_notebooks(root: Path = ROOT) -> list[Path]:
    """The theory chapters that are notebooks (their launch button opens them on Colab too)."""
    return sorted(p for p in (root / "book").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def problems(root: Path = ROOT, write: bool = False) -> list[str]:
    """Every disagreement with the setting; with ``write`` the files are fixed instead."""
    found: list[str] = []
    labs = lab_notebooks(root)
    for nb_path in labs + chapter_notebooks(root):
        rel = nb_path.relative_to(root).as_posix()
        is_lab = nb_path in labs
        nb = nbformat.read(nb_path, as_version=4)
        changed = False
        has_badge = has_pip = False
        for cell in nb.cells:
            new = _fix_text(cell.source, root, rel if cell.cell_type == "markdown" else None)
            has_badge |= cell.cell_type == "markdown" and badge(rel, root) in new
            has_pip |= cell.cell_type == "code" and pip_line(root) in new
            if new != cell.source:
                found.append(f"{rel}: a {cell.cell_type} cell disagrees with _config.yml")
                cell.source, changed = new, True
        if is_lab and not has_badge:  # chapters open on Colab from the book's launch button
            found.append(f"{rel}: no Colab badge `{badge(rel, root)}`")
        if not has_pip:
            found.append(f"{rel}: no setup line `{pip_line(root)}`")
        if write and changed:
            nbformat.write(nb, nb_path)
    pages = [root / "README.md", *sorted((root / "book").rglob("*.md"))]
    for page in pages:
        if not page.exists():
            continue
        text = page.read_text()
        new = _fix_text(text, root, None)
        if new != text:
            found.append(f"{page.relative_to(root)}: a link disagrees with _config.yml")
            if write:
                page.write_text(new)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", action="store_true", help="list disagreements, exit 1 if any")
    group.add_argument("--write", action="store_true", help="rewrite links from _config.yml")
    args = parser.parse_args(argv)
    found = problems(write=args.write)
    url, branch, _ = repository()
    if args.check and found:
        print(f"links disagree with _config.yml ({url} @ {branch}):", *found, sep="\n  ")
        print("run `make links` to regenerate them")
        return 1
    print(f"links {'written' if args.write else 'agree'}: {url} @ {branch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
