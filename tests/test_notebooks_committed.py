"""Notebooks are committed executed, with their outputs, so GitHub and Colab show results."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from tools.timing import notebooks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = notebooks()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_notebook_is_committed_executed(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    assert code, "no code cells"
    unexecuted = [i for i, c in enumerate(code) if c.execution_count is None]
    assert not unexecuted, f"code cells {unexecuted} have not been executed: run `make execute`"
    counts = [c.execution_count for c in code]
    assert counts == sorted(counts), "cells were executed out of order: re-run the whole notebook"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"committed with an error output: {errors[0].get('ename')}"
    has_plot = any("plt." in c.source for c in code)
    images = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert images or not has_plot, "plots in the code but no image in the outputs (a non-inline backend?)"
    for c in code:  # figures carry alt text for the rendered book
        if any("image/png" in o.get("data", {}) for o in c.outputs):
            alt = c.metadata.get("mystnb", {}).get("image", {}).get("alt", "")
            assert len(alt) > 20, f"a figure cell without alt text: {c.source.splitlines()[0]!r}"


def test_notebook_code_fits_the_column():
    """Code cells are formatted (ruff, line length 88) and no line is wider than the column."""
    import subprocess
    import sys
    from pathlib import Path

    from tools.fit_notebooks import LIMIT, long_lines, notebooks

    long = {str(p): lines for p in notebooks() if (lines := long_lines(p))}
    assert not long, f"code lines longer than {LIMIT} characters (run tools/fit_notebooks.py): {long}"
    ruff = Path(sys.executable).with_name("ruff")
    res = subprocess.run(
        [str(ruff), "format", "--check", *map(str, notebooks())], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _literalincludes():
    """(notebook, path, pyobject) of every ``literalinclude`` of library code in a chapter."""
    import re

    pattern = re.compile(r"```\{literalinclude\}\s+(\S+)\s*\n(?:[^`]*?):pyobject:\s*(\S+)")
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                for rel, obj in pattern.findall(cell.source):
                    yield path, (path.parent / rel).resolve(), obj


def test_included_library_code_fits_the_column():
    """Functions shown in a chapter (``literalinclude``) exist and fit 88 characters."""
    import ast

    found = list(_literalincludes())
    assert found, "the chapters include no library code"
    for nb_path, src_path, obj in found:
        assert src_path.is_file(), f"{nb_path.name}: {src_path} does not exist"
        source = src_path.read_text()
        node = ast.parse(source)
        for part in obj.split("."):
            node = next((n for n in ast.iter_child_nodes(node)
                         if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
            assert node is not None, f"{nb_path.name}: {obj} not found in {src_path.name}"
        lines = source.splitlines()[node.lineno - 1 - len(node.decorator_list): node.end_lineno]
        wide = [ln for ln in lines if len(ln) > 88]
        assert not wide, f"{obj} ({src_path.name}), shown in {nb_path.name}, has lines over 88: {wide}"
