"""The API reference and the references page as readers meet them.

Every public module, class and function of mini names the chapter that explains it (a ``:doc:``
link to a page of the book), the reference pages cover every module, dataclass fields are
documented once each, and the book's Sphinx extension (tools/sphinxext/mini_book.py) resolves
source links and gives the References page author-year labels and links. The built HTML is
checked by the site build itself (``-W -n``: a link to a missing page fails it).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import mini

ROOT = Path(__file__).resolve().parents[1]
DOC_ROLE = re.compile(r":doc:`(?:[^`<]*<)?(/[^`>]+)>?`")


def _modules() -> list[str]:
    return ["mini"] + sorted(m.name for m in pkgutil.walk_packages(mini.__path__, "mini."))


def _public(module) -> list[tuple[str, object]]:
    """The classes and functions a module defines and exports (what autodoc documents)."""
    out = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name, None)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and obj.__module__ == module.__name__:
            out.append((name, obj))
    return out


def _toc_pages() -> set[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = {toc["root"]}

    def walk(entries):
        for e in entries or []:
            if "file" in e:
                pages.add(e["file"])
            walk(e.get("sections"))

    for part in toc["parts"]:
        walk(part["chapters"])
    return pages


@pytest.mark.parametrize("name", _modules())
def test_every_public_symbol_links_the_chapter_that_explains_it(name):
    module = importlib.import_module(name)
    pages = _toc_pages()
    for label, doc in [(name, module.__doc__)] + [(f"{name}.{n}", o.__doc__) for n, o in _public(module)]:
        targets = DOC_ROLE.findall(doc or "")
        assert targets, f"{label}: its docstring links no chapter (add 'Explained in :doc:`/book/...`.')"
        for t in targets:
            assert t.lstrip("/") in pages, f"{label}: :doc:`{t}` is not a page of the book (_toc.yml)"


def test_reference_pages_document_every_module_once():
    text = "\n".join(p.read_text() for p in sorted((ROOT / "book" / "api").glob("*.md")))
    documented = re.findall(r"^\.\. automodule:: (\S+)", text, flags=re.M)
    assert sorted(documented) == _modules(), "book/api/*.md: one automodule per module of mini"
    assert not re.search(r"^\.\. auto\w+:: \S*\._", text, flags=re.M), "private names are not documented"


def test_autodoc_options_are_the_intended_ones():
    # autodoc switches an option on whatever its value: "undoc-members: false" documents every
    # undocumented member (empty entries), "private-members: false" every private one.
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    options = config["sphinx"]["config"]["autodoc_default_options"]
    assert set(options) <= {"members", "show-inheritance", "member-order"}, options


def _fields(cls) -> list[str]:
    """The fields the class itself declares (inherited ones are documented on their class)."""
    own = cls.__dict__.get("__annotations__", {})
    names = [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else list(cls._fields)
    return [n for n in names if n in own]


@pytest.mark.parametrize("name", _modules())
def test_dataclass_fields_are_documented_once(name):
    """Each field has a ``#:`` comment (its attribute entry); napoleon would read a first line
    ``text: more`` as ``type: description``, so none starts that way."""
    pytest.importorskip("sphinx")
    from sphinx.ext.napoleon import Config
    from sphinx.ext.napoleon.docstring import GoogleDocstring
    from sphinx.pycode import ModuleAnalyzer

    module = importlib.import_module(name)
    docs = ModuleAnalyzer.for_module(name).find_attr_docs()
    for cname, cls in _public(module):
        if not inspect.isclass(cls) or not (dataclasses.is_dataclass(cls) or hasattr(cls, "_fields")):
            continue
        for field in _fields(cls):
            if field.startswith("_"):
                continue
            lines = docs.get((cname, field))
            assert lines and "".join(lines).strip(), f"{name}.{cname}.{field}: no '#:' comment"
            parsed = str(GoogleDocstring(list(lines), Config(), what="attribute", name=field))
            assert ":type:" not in parsed, f"{name}.{cname}.{field}: first line read as 'type: text'"


# --------------------------------------------------------------------------- the extension


@pytest.fixture(scope="module")
def mini_book():
    pytest.importorskip("pybtex")
    sys.path.insert(0, str(ROOT / "tools" / "sphinxext"))
    try:
        import mini_book
    finally:
        sys.path.remove(str(ROOT / "tools" / "sphinxext"))
    return mini_book


@pytest.mark.parametrize("module, fullname, text", [
    ("mini.galore.projector", "GaLoreProjector", "class GaLoreProjector"),
    ("mini.galore.projector", "GaLoreProjector.project", "def project"),
    ("mini", "setup", "def setup"),  # re-exported: the defining file
    ("mini.runtime", "Setup.seed", "seed:"),  # a dataclass field
    ("mini.galore.projector", "PROJ_TYPES", "PROJ_TYPES"),  # module data
])
def test_source_links_point_at_the_lines(mini_book, module, fullname, text):
    resolve = mini_book.make_linkcode_resolve("https://github.com/owner/name", "main")
    url = resolve("py", {"module": module, "fullname": fullname})
    m = re.fullmatch(r"https://github\.com/owner/name/blob/main/(mini/[\w/]+\.py)#L(\d+)(?:-L(\d+))?", url or "")
    assert m, url
    start, end = int(m.group(2)), int(m.group(3) or m.group(2))
    assert start <= end, url
    lines = (ROOT / m.group(1)).read_text().splitlines()[start - 1: end]
    assert text in lines[0] or (text.startswith(("def", "class")) and any(text in ln for ln in lines[:3])), lines[:3]
    assert resolve("py", {"module": "mini", "fullname": "no_such_name"}) is None
    assert resolve("c", {"module": module, "fullname": fullname}) is None


def test_bad_repository_url_is_a_clear_error(mini_book):
    config = SimpleNamespace(html_theme_options={"repository_url": "not-a-url"})
    with pytest.raises(ValueError, match="repository.url.*not-a-url"):
        mini_book._config_inited(None, config)


def test_references_have_links_and_author_year_labels(mini_book):
    from pybtex.database import parse_file
    from pybtex.plugin import find_plugin

    bib = parse_file(ROOT / "references.bib")
    for key, entry in bib.entries.items():
        assert entry.fields.get("url", "").startswith("https://"), f"{key}: no https url"
        if "eprint" in entry.fields:
            assert entry.fields.get("archivePrefix") == "arXiv", f"{key}: eprint without archivePrefix"
    style = find_plugin("pybtex.style.formatting", "authoryear")()
    formatted = {e.key: e for e in style.format_entries(bib.entries.values())}
    assert formatted["tian2024cogo"].label == "Tian, 2024"
    assert formatted["kingma2015adam"].label == "Kingma and Ba, 2015"
    assert formatted["zhao2024galore"].label == "Zhao et al., 2024"
    assert formatted["candes2011robust"].label == "Candès et al., 2011"
    for key, e in formatted.items():
        assert "<a href=" in e.text.render_as("html"), f"{key}: shows no link"
    galore = formatted["zhao2024galore"].text.render_as("html")
    assert "https://arxiv.org/abs/2403.03507" in galore and "proceedings.mlr.press" in galore


def test_labels_disambiguate_same_author_and_year(mini_book):
    from pybtex.database import parse_string

    bib = parse_string("""
        @misc{a, author = {Tian, Yuandong}, title = {A}, year = {2024}, url = {https://a.org}}
        @misc{b, author = {Tian, Yuandong}, title = {B}, year = {2024}, url = {https://b.org}}
    """, "bibtex")
    labels = list(mini_book.AuthorYearLabelStyle().format_labels(bib.entries.values()))
    assert labels == ["Tian, 2024a", "Tian, 2024b"]
