"""Fit notebook code to the book's code column: ``ruff format`` plus what ruff leaves long.

    python tools/fit_notebooks.py [paths]   # default: every notebook of the book
    python tools/fit_notebooks.py --check   # list the lines still longer than the limit

The rendered code column holds about 90 characters at 1400 px, so notebook code is formatted
to 88 (``[tool.ruff] line-length`` in pyproject.toml). ``ruff format`` does not split string
literals or comments; this tool splits a long one-line string literal into adjacent literals
at spaces outside ``{...}`` fields (the same string: Python joins adjacent literals) and wraps
long full-line comments, then runs ``ruff format`` again, which lays the pieces out. The
printed text does not change, so the committed outputs stay valid.
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import re
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 88
_PREFIX = re.compile(r"^([rRbBfFuU]{0,2})(['\"])(.*)\2$", re.S)


def notebooks() -> list[Path]:
    return sorted(ROOT.glob("book/**/*.ipynb")) + sorted(ROOT.glob("labs/**/*.ipynb"))


def _split_points(body: str) -> list[int]:
    """Indices just after a space at brace depth 0 (never inside an f-string field)."""
    points, depth, i = [], 0, 0
    while i < len(body):
        ch = body[i]
        if ch in "{}" and body[i : i + 2] in ("{{", "}}"):
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == " " and depth == 0 and 0 < i < len(body) - 1:
            points.append(i + 1)
        elif ch == "\\":
            i += 1  # keep an escape sequence whole
        i += 1
    return points


def split_literal(token: str, width: int) -> list[str] | None:
    """``f"a b c"`` -> ``['f"a b "', '"c"']`` with pieces of at most ``width`` characters."""
    m = _PREFIX.match(token)
    if not m or token.endswith(("'''", '"""')) or "\n" in token:
        return None
    prefix, quote, body = m.groups()
    fmt = "f" in prefix.lower()
    points = _split_points(body) if fmt else [i + 1 for i, c in enumerate(body[:-1]) if c == " " and i]
    pieces, start, last = [], 0, 0
    for p in points + [len(body)]:
        if p - start + len(prefix) + 2 > width and last > start:
            pieces.append(body[start:last])
            start = last
        last = p
    pieces.append(body[start:])
    if len(pieces) < 2:
        return None
    out = []
    for piece in pieces:
        pre = prefix
        if fmt and "{" not in piece.replace("{{", "").replace("}}", ""):
            pre = prefix.replace("f", "").replace("F", "")
            piece = piece.replace("{{", "{").replace("}}", "}")
        out.append(f"{pre}{quote}{piece}{quote}")
    return out


def fit_source(src: str, limit: int = LIMIT) -> str:
    """Split long one-line string literals and wrap long full-line comments of a cell."""
    lines = src.split("\n")
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return src
    edits = []  # (row, col0, col1, replacement)
    for tok in tokens:
        (r0, c0), (r1, c1) = tok.start, tok.end
        if r0 != r1 or r0 > len(lines) or len(lines[r0 - 1]) <= limit:
            continue  # only one-line tokens on a line over the limit
        line = lines[r0 - 1]
        if tok.type == tokenize.STRING:
            indent = len(line) - len(line.lstrip())
            pieces = split_literal(tok.string, max(24, limit - indent - 12))
            if pieces:
                edits.append((r0, c0, c1, " ".join(pieces)))
        elif tok.type == tokenize.COMMENT and line.lstrip().startswith("#"):
            indent = line[: len(line) - len(line.lstrip())]
            text = tok.string.lstrip("#").strip()
            wrapped = textwrap.wrap(text, limit - len(indent) - 2, break_long_words=False)
            edits.append((r0, 0, len(line), "\n".join(f"{indent}# {w}" for w in wrapped)))
    for r, c0, c1, rep in sorted(edits, reverse=True):
        line = lines[r - 1]
        lines[r - 1] = line[:c0] + rep + line[c1:]
    return "\n".join(lines)


def lift_trailing_comments(src: str) -> str:
    """Move a trailing comment that made ruff split a statement onto its own line above it.

    ``x = f(\n    a\n)  # why`` becomes ``# why\nx = f(a)`` once ruff joins the statement
    again; a multi-line ``def`` header's comment becomes the body's first line.
    """
    try:
        tree = ast.parse(_mask_magics(src))
        tokens = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (SyntaxError, tokenize.TokenError, IndentationError):
        return src
    comments = {t.start[0]: t for t in tokens if t.type == tokenize.COMMENT}
    lines = src.split("\n")
    moves = []  # (comment line, target line, indent)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            header_end = node.body[0].lineno - 1
            while header_end > node.lineno and not lines[header_end - 1].strip():
                header_end -= 1
            if header_end > node.lineno and header_end in comments:
                body = lines[node.body[0].lineno - 1]
                moves.append((header_end, node.body[0].lineno, body[: len(body) - len(body.lstrip())]))
        elif isinstance(node, ast.stmt) and not hasattr(node, "body"):
            end = node.end_lineno
            tok = comments.get(end)
            if end > node.lineno and tok and tok.start[1] >= node.end_col_offset:
                first = lines[node.lineno - 1]
                moves.append((end, node.lineno, first[: len(first) - len(first.lstrip())]))
    for line, target, indent in sorted(moves, reverse=True):
        tok = comments[line]
        lines[line - 1] = lines[line - 1][: tok.start[1]].rstrip()
        lines.insert(target - 1, f"{indent}{tok.string}")
    return "\n".join(lines)


def _mask_magics(src: str) -> str:
    return re.sub(r"(?m)^(\s*)[%!].*$", r"\1pass", src)


def long_lines(path: Path, limit: int = LIMIT) -> list[tuple[int, str]]:
    nb = json.loads(path.read_text())
    out = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            out += [(i, ln) for ln in "".join(cell["source"]).split("\n") if len(ln) > limit]
    return out


def _ruff(paths: list[Path]) -> None:
    ruff = Path(sys.executable).with_name("ruff")
    subprocess.run([str(ruff), "format", "-q", *map(str, paths)], cwd=ROOT, check=True)


def fit(paths: list[Path]) -> None:
    _ruff(paths)
    for path in paths:
        text = path.read_text()
        nb = json.loads(text)
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                src = "".join(cell["source"])
                new = fit_source(lift_trailing_comments(src))
                if new != src:
                    parts = new.split("\n")
                    cell["source"] = [p + "\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
        new_text = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
        if new_text != text:
            path.write_text(new_text)
    _ruff(paths)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", type=Path)
    ap.add_argument("--check", action="store_true", help="list lines longer than the limit")
    args = ap.parse_args(argv)
    paths = [p.resolve() for p in args.paths] or notebooks()
    if not args.check:
        fit(paths)
    bad = {p: long_lines(p) for p in paths}
    for p, lines in bad.items():
        for i, ln in lines:
            print(f"{p.relative_to(ROOT)} cell {i}: {len(ln)} chars: {ln.strip()[:60]}")
    n = sum(map(len, bad.values()))
    print(f"{n} notebook code lines longer than {LIMIT} characters")
    return 1 if (args.check and n) else 0


if __name__ == "__main__":
    sys.exit(main())
