"""Print CHANGELOG.md's section for a version, after checking that the release agrees.

    python tools/release_notes.py 0.1.0 --out release-notes.md   # .github/workflows/release.yml

A release tag ``vX.Y.Z`` publishes pyproject.toml's version: this refuses (exit 1, saying
what disagrees) unless the tag's version equals ``[project] version``, ``mini.__version__``
(read from mini/__init__.py without importing torch) and a ``## [X.Y.Z]`` section of
CHANGELOG.md, whose body becomes the GitHub release's notes.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SECTION_RE = re.compile(r"^## \[(?P<version>[^\]]+)\][^\n]*\n(?P<body>.*?)(?=^## |^\[[^\]]+\]: |\Z)", re.MULTILINE | re.DOTALL)


def changelog_section(version: str, root: Path = ROOT) -> str:
    """The body of CHANGELOG.md's ``## [version]`` section (ValueError names what is there)."""
    text = (root / "CHANGELOG.md").read_text()
    sections = {m["version"]: m["body"].strip() for m in SECTION_RE.finditer(text)}
    if version not in sections or not sections[version]:
        raise ValueError(f"CHANGELOG.md has no non-empty section for version={version!r}; "
                         f"sections: {sorted(sections)}")
    return sections[version]


def package_versions(root: Path = ROOT) -> dict[str, str]:
    """The version as pyproject.toml and mini/__init__.py state it."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    init = (root / "mini" / "__init__.py").read_text()
    m = re.search(r'^__version__ = "([^"]+)"', init, re.MULTILINE)
    return {"pyproject.toml": project["version"], "mini.__version__": m.group(1) if m else "?"}


def release_notes(version: str, root: Path = ROOT) -> str:
    """Check the release of ``version`` agrees everywhere, and return its notes."""
    if not re.fullmatch(r"\d+\.\d+\.\d+(?:(?:a|b|rc)\d+)?", version):
        raise ValueError(f"version={version!r} is not X.Y.Z (a tag vX.Y.Z releases it)")
    for where, found in package_versions(root).items():
        if found != version:
            raise ValueError(f"version={version!r} but {where} says {found!r}: bump it first")
    return changelog_section(version, root) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("version", help="the version released, X.Y.Z (the tag without its v)")
    ap.add_argument("--out", type=Path, help="write the notes here (default: print them)")
    args = ap.parse_args(argv)
    try:
        notes = release_notes(args.version)
    except ValueError as err:
        print(f"release_notes: {err}", file=sys.stderr)
        return 1
    if args.out:
        args.out.write_text(notes)
    else:
        print(notes, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
