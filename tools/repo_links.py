"""Generate or check every link that depends on the repository's URL and branch.

The one setting is ``repository.url`` and ``repository.branch`` in ``_config.yml``. From it come:

- each lab's "Open in Colab" badge, which must point at the notebook's own path on that branch;
- the ``%pip install "mini-book[labs] @ git+URL@BRANCH"`` line in each lab's and each notebook
  chapter's first code cell (``mini-book`` is pyproject.toml's distribution name, the import
  name stays ``mini``; the ``labs`` extra declares what the notebooks import beyond the core).
  It installs from the repository, not the package index, so that a lab always gets the
  library of the branch it was opened from, published or not;
- the site's address, ``https://OWNER.github.io/NAME/`` (GitHub Pages, deployed by
  ``.github/workflows/site.yml``): the "Read online" links of README.md and book/intro.md
  (required there) and any other link into the site;
- pyproject.toml's ``[project.urls]`` (Homepage = the site, Source, Issues, Changelog);
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
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
COLAB_RE = re.compile(
    r"https://colab\.research\.google\.com/github/[^/\s)\"']+/[^/\s)\"']+/blob/[^/\s)\"']+/"
    r"(?P<path>[^\s)\"']+\.ipynb)"
)
PIP_RE = re.compile(r"git\+https://[^\s\"'@]+(?:@[^\s\"']+)?")
# The distribution name in front of a git install target: `NAME[extras] @ git+https://...`
PIP_NAME_RE = re.compile(r"(?<![\w.-])[A-Za-z0-9][A-Za-z0-9._-]*(?=(?:\[[^\]\s]*\])? @ git\+https://)")
# The book's own address: the "Read online ... <URL>" link and the citation's `url = {...}` on
# github.io. Other projects' github.io pages (papers' sites) are left alone.
SITE_LINK_RE = re.compile(r"(?P<pre>Read online\b[^<\n]*<)https://[^>\s]+(?P<post>>)")
CITE_URL_RE = re.compile(r"(?P<pre>^\s*url\s*=\s*\{)https://[^}\s]+\.github\.io/[^}\s]*(?P<post>\})", re.MULTILINE)
# The pages that must carry the "Read online" link
SITE_PAGES = ("README.md", "book/intro.md")
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


def dist_name(root: Path = ROOT) -> str:
    """The distribution name of pyproject.toml (what ``pip install`` takes; the import is ``mini``).

    A root without its own pyproject.toml (a partial copy, as the tests make) uses this
    repository's.
    """
    path = root / "pyproject.toml" if (root / "pyproject.toml").exists() else ROOT / "pyproject.toml"
    return tomllib.loads(path.read_text())["project"]["name"]


def site_url(root: Path = ROOT) -> str:
    """The GitHub Pages address of the book: ``https://OWNER.github.io/NAME/``.

    Pages serves a project site under the repository's name on the owner's lower-case host;
    a repository named ``OWNER.github.io`` is the owner's root site.
    """
    _, _, slug = repository(root)
    owner, name = slug.split("/")
    host = f"{owner.lower()}.github.io"
    return f"https://{host}/" if name.lower() == host else f"https://{host}/{name}/"


def project_urls(root: Path = ROOT) -> dict[str, str]:
    """pyproject.toml's [project.urls], as they follow from the repository setting."""
    url, branch, _ = repository(root)
    return {"Homepage": site_url(root), "Source": url, "Issues": f"{url}/issues",
            "Changelog": f"{url}/blob/{branch}/CHANGELOG.md"}


def pip_target(root: Path = ROOT) -> str:
    url, branch, _ = repository(root)
    return f"git+{url}@{branch}"


def pip_line(root: Path = ROOT) -> str:
    return f'%pip install -q "{dist_name(root)}[labs] @ {pip_target(root)}"'


def _fix_text(text: str, root: Path, own_path: str | None) -> str:
    text = COLAB_RE.sub(lambda m: colab_url(own_path or m.group("path"), root), text)
    text = PIP_NAME_RE.sub(dist_name(root), text)
    return PIP_RE.sub(pip_target(root), text)


def _fix_site_links(text: str, root: Path) -> str:
    """The "Read online" links and the citation's url, from the repository setting."""
    for pattern in (SITE_LINK_RE, CITE_URL_RE):
        text = pattern.sub(lambda m: m["pre"] + site_url(root) + m["post"], text)
    return text


def _fix_project_urls(text: str, root: Path) -> str:
    for key, value in project_urls(root).items():
        text = re.sub(rf'(?m)^{key} = "[^"]*"$', f'{key} = "{value}"', text)
    return text


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
        new = _fix_site_links(_fix_text(text, root, None), root)
        if new != text:
            found.append(f"{page.relative_to(root)}: a link disagrees with _config.yml")
            if write:
                page.write_text(new)
                text = new
        rel = page.relative_to(root).as_posix()
        if rel in SITE_PAGES and site_url(root) not in text:
            found.append(f"{rel}: no \"Read online\" link to {site_url(root)}")
    pyproject = root / "pyproject.toml"
    if not pyproject.exists():
        return found
    text = pyproject.read_text()
    urls = tomllib.loads(text)["project"].get("urls") or {}
    for key, value in project_urls(root).items():
        if urls.get(key) != value:
            found.append(f"pyproject.toml: [project.urls] {key} = {urls.get(key)!r}, expected {value!r}")
    new = _fix_project_urls(text, root)
    if write and new != text:
        pyproject.write_text(new)
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
