"""The book's own Sphinx extension: source links, dataclass entries and author-year references.

Jupyter Book loads it from ``_config.yml`` (``sphinx.local_extensions``). It does three things:

- **Source links.** Every API entry gets a ``[source]`` link to its lines on GitHub
  (``sphinx.ext.linkcode``), built from ``repository.url`` and ``repository.branch`` of
  ``_config.yml`` (which Jupyter Book passes to the theme), e.g.
  ``https://github.com/OWNER/NAME/blob/main/mini/galore/projector.py#L70-L120``.
- **Dataclasses documented once.** A dataclass's fields are its attribute entries, each with its
  ``#:`` comment; the ``Parameters`` list that ``autodoc_typehints = "description"`` would add
  from the generated ``__init__`` (the same names again, without descriptions) is dropped.
  Names with a leading underscore are never documented.
- **Author-year references.** A pybtex style ``authoryear`` whose labels read like the in-text
  citations of ``bibtex_reference_style: author_year`` ("Tian, 2024", "Zhao et al., 2024",
  "Kingma and Ba, 2015"), sorted by author and year, each entry ending with its links: arXiv
  (``eprint``), DOI, and the ``url`` where it is not the arXiv page already linked.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import inspect
import re
from collections import Counter
from pathlib import Path
from typing import Any

import latexcodec  # noqa: F401  (registers the "latex" codec pybtex uses)
from pybtex.plugin import register_plugin
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting.author_year_title import SortingStyle as AuthorYearTitleSorting
from pybtex.style.template import field, href, join, optional, sentence

# --------------------------------------------------------------------------- source links


def _unwrap(obj: Any) -> Any:
    """The function whose source a reader wants: past properties, wrappers and partials."""
    if isinstance(obj, property):
        obj = obj.fget
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    if isinstance(obj, functools.partial):
        obj = obj.func
    return inspect.unwrap(obj) if callable(obj) else obj


def _assignment_lines(source: str, name: str, within: tuple[int, int] | None) -> tuple[int, int] | None:
    """Lines (1-based, inclusive) of the statement assigning ``name``, inside ``within`` if given."""
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
            continue
        if within and not within[0] <= node.lineno <= within[1]:
            continue
        return node.lineno, node.end_lineno or node.lineno
    return None


def source_lines(modname: str, fullname: str) -> tuple[str, int, int] | None:
    """(file relative to the repository root, first line, last line) of ``modname.fullname``."""
    try:
        module = importlib.import_module(modname)
    except Exception:
        return None
    root = Path(importlib.import_module(modname.split(".")[0]).__file__).resolve().parents[1]
    parts = fullname.split(".")
    obj: Any = module
    owner: Any = module
    for part in parts:
        owner = obj
        try:
            obj = inspect.getattr_static(obj, part)
        except AttributeError:
            obj = None
            break
    target = _unwrap(obj) if obj is not None else None
    try:
        path = Path(inspect.getsourcefile(target)).resolve()  # functions, classes, methods
        lines, start = inspect.getsourcelines(target)
        return path.relative_to(root).as_posix(), start, start + len(lines) - 1
    except (TypeError, OSError, ValueError):
        pass
    # Data and attributes: find the assignment in the module, or in the class that owns it.
    try:
        path = Path(inspect.getsourcefile(owner if inspect.isclass(owner) else module)).resolve()
        source = path.read_text()
        within = None
        if inspect.isclass(owner):
            lines, start = inspect.getsourcelines(owner)
            within = (start, start + len(lines) - 1)
        found = _assignment_lines(source, parts[-1], within)
    except (TypeError, OSError, ValueError, SyntaxError):
        return None
    rel = path.relative_to(root).as_posix()
    return (rel, *found) if found else (rel, *within) if within else None


def make_linkcode_resolve(url: str, branch: str):
    """``linkcode_resolve`` for sphinx.ext.linkcode, pointing at ``url``'s ``branch``."""

    def linkcode_resolve(domain: str, info: dict[str, str]) -> str | None:
        if domain != "py" or not info.get("module"):
            return None
        found = source_lines(info["module"], info["fullname"])
        if found is None:
            return None
        path, start, end = found
        lines = f"L{start}" if start == end else f"L{start}-L{end}"
        return f"{url}/blob/{branch}/{path}#{lines}"

    return linkcode_resolve


def _config_inited(app, config) -> None:
    options = config.html_theme_options or {}
    url, branch = options.get("repository_url"), options.get("repository_branch") or "main"
    if not url or not re.fullmatch(r"https://github\.com/[^/\s]+/[^/\s]+", url.rstrip("/")):
        raise ValueError(f"_config.yml repository.url must be https://github.com/OWNER/NAME for the API's "
                         f"source links; got {url!r}")
    config.linkcode_resolve = make_linkcode_resolve(url.rstrip("/"), branch)


# --------------------------------------------------------------------------- autodoc


def _skip_private(app, what, name, obj, skip, options):
    """Names with a leading underscore (dunders aside) stay out of the reference."""
    if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
        return True
    return None


def _drop_dataclass_parameters(app, what, name, obj, options, signature, return_annotation):
    """A dataclass's (or NamedTuple's) fields are documented as its attributes: no second, bare
    Parameters list from the generated ``__init__``."""
    is_namedtuple = isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")
    if what == "class" and (dataclasses.is_dataclass(obj) or is_namedtuple):
        app.env.temp_data.get("annotations", {}).pop(name, None)


# --------------------------------------------------------------------------- references


def _plain(latex: str) -> str:
    """``Cand{\\`e}s`` -> ``Candès``."""
    return latex.encode("utf-8").decode("latex").replace("{", "").replace("}", "")


class AuthorYearLabelStyle(BaseLabelStyle):
    """Labels as the in-text author-year citations read: "Tian, 2024", "Zhao et al., 2024"."""

    def format_label(self, entry) -> str:
        persons = entry.persons.get("author") or entry.persons.get("editor") or []
        names = [_plain(" ".join(p.prelast_names + p.last_names)) for p in persons]
        if not names:
            who = _plain(entry.fields.get("title", entry.key))
        elif len(names) == 1:
            who = names[0]
        elif len(names) == 2:
            who = f"{names[0]} and {names[1]}"
        else:
            who = f"{names[0]} et al."
        return f"{who}, {entry.fields.get('year', 'n.d.')}"

    def format_labels(self, sorted_entries):
        labels = [self.format_label(e) for e in sorted_entries]
        counts, seen = Counter(labels), Counter()
        for label in labels:
            if counts[label] > 1:  # "Zhang et al., 2024a", "... 2024b"
                seen[label] += 1
                label += "abcdefghijklmnopqrstuvwxyz"[seen[label] - 1]
            yield label


class AuthorYearStyle(UnsrtStyle):
    """unsrt's entries, author-year labels and order, and one link of each kind per entry."""

    default_label_style = AuthorYearLabelStyle
    default_sorting_style = AuthorYearTitleSorting

    def format_web_refs(self, e):
        eprint, doi, url = (e.fields.get(k, "") for k in ("eprint", "doi", "url"))
        # the url only where it adds a page: not the arXiv abstract or the DOI already linked
        repeats = (eprint and "arxiv.org" in url and eprint in url) or (doi and url.endswith(doi))
        return sentence[
            optional[self.format_eprint(e)],
            optional[self.format_doi(e)],
            optional[self.format_url(e)] if url and not repeats else "",
        ]

    def format_url(self, e):
        """The link, shown as its site (``openreview.net``, ``proceedings.mlr.press``)."""
        url = e.fields["url"]
        site = re.sub(r"^https?://(www\.)?", "", url).split("/")[0]
        return href(field("url", raw=True))[site]

    def format_eprint(self, e):
        url = join["https://arxiv.org/abs/", field("eprint", raw=True)]
        return href(url)[join["arXiv:", field("eprint", raw=True)]]


register_plugin("pybtex.style.labels", "authoryear", AuthorYearLabelStyle)
register_plugin("pybtex.style.formatting", "authoryear", AuthorYearStyle)


def setup(app) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.linkcode")
    app.connect("config-inited", _config_inited)
    app.connect("autodoc-skip-member", _skip_private)
    app.connect("autodoc-process-signature", _drop_dataclass_parameters, priority=600)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}


__all__ = ["AuthorYearLabelStyle", "AuthorYearStyle", "make_linkcode_resolve", "source_lines", "setup"]
