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
