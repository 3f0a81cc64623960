"""Every package a notebook or mini imports is declared in pyproject.toml: the core
dependencies, or the extra the notebooks' %pip line installs (``labs``) / an optional extra."""
from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in reqs}


CORE = _names(PYPROJECT["dependencies"])
EXTRAS = {k: _names(v) for k, v in PYPROJECT["optional-dependencies"].items()}


def _imports(source: str) -> set[str]:
    # IPython magics (%name, %%name) and shell lines (!cmd) become `pass`, keeping the
    # indentation; a continuation line that starts with the % operator is Python
    magic = r"^(\s*)(?:%{1,2}[A-Za-z_]|![^=\s]).*$"
    lines = [re.sub(magic, r"\1pass", line) for line in source.splitlines()]
    tree = ast.parse("\n".join(lines))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def _distributions(modules: set[str]) -> dict[str, set[str]]:
    """Third-party modules and the distributions that provide them (stdlib and mini left out)."""
    provided = md.packages_distributions()
    out = {}
    for m in sorted(modules - set(sys.stdlib_module_names) - {"mini", "tools", "tests", "__future__"}):
        out[m] = {d.lower().replace("_", "-") for d in provided.get(m, [m])}
    return out


def test_every_notebook_import_is_declared_for_the_notebooks():
    modules = set()
    for path in sorted(ROOT.glob("book/**/*.ipynb")) + sorted(ROOT.glob("labs/**/*.ipynb")):
        for cell in json.loads(path.read_text())["cells"]:
            if cell["cell_type"] == "code":
                modules |= _imports("".join(cell["source"]))
    declared = CORE | EXTRAS["labs"]
    missing = {m: d for m, d in _distributions(modules).items() if not d & declared}
    assert not missing, f"imported by notebooks but not in pyproject's dependencies or [labs]: {missing}"


def test_every_mini_import_is_declared():
    modules = set()
    for path in sorted((ROOT / "mini").rglob("*.py")):
        modules |= _imports(path.read_text())
    declared = CORE.union(*EXTRAS.values())
    missing = {m: d for m, d in _distributions(modules).items() if not d & declared}
    assert not missing, f"imported by mini but declared nowhere in pyproject.toml: {missing}"


def test_the_labs_install_line_names_the_labs_extra():
    sys.path.insert(0, str(ROOT / "tools"))
    import repo_links

    assert f"{PYPROJECT['name']}[labs] @ " in repo_links.pip_line(ROOT)
