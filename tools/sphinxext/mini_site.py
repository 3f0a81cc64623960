"""Two fixes to the theme and extensions Jupyter Book 1 pins, found with ``make check-site``.

Jupyter Book loads this from ``_config.yml`` (``sphinx.local_extensions``).

- **One search field.** sphinx-book-theme puts its search field in the primary sidebar and
  empties the header's ``navbar_persistent``; pydata-sphinx-theme 0.17 ignores the inherited
  (empty) value unless the user sets it, and adds a second search field in a header bar of its
  own. Setting it explicitly to ``[]`` keeps the sidebar's field and drops the empty header.
- **No ``THEBE_JS_URL`` error.** Sphinx 7.4 writes an inline script added after the builder
  started (``app.add_js_file(None, body=...)``, as sphinx-thebe and sphinx-togglebutton do)
  twice: once from the builder and once from the registry, which it re-adds with filename
  ``''`` instead of ``None``. sphinx-thebe's script declares ``const THEBE_JS_URL``, so the
  second copy throws "Identifier 'THEBE_JS_URL' has already been declared" on every page.
  Identical inline scripts are written once; the Colab launch button does not use them.
"""
from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx
from sphinx.config import Config


def keep_one_search_field(app: Sphinx, config: Config) -> None:
    """Set ``navbar_persistent`` to ``[]`` unless ``_config.yml`` sets it."""
    options = config.html_theme_options
    if "navbar_persistent" not in options:
        options["navbar_persistent"] = []


def dedup_inline_scripts(scripts: list[Any]) -> list[Any]:
    """``scripts`` without repeated inline scripts (same body and attributes), order kept."""
    seen, out = set(), []
    for js in scripts:
        filename = getattr(js, "filename", js)
        attributes = getattr(js, "attributes", {})
        if not filename and attributes.get("body"):
            key = tuple(sorted((k, str(v)) for k, v in attributes.items()))
            if key in seen:
                continue
            seen.add(key)
        out.append(js)
    return out


def _page_context(app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any) -> None:
    scripts = context.get("script_files")
    if isinstance(scripts, list):
        scripts[:] = dedup_inline_scripts(scripts)  # the builder's list: it restores it per page


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("config-inited", keep_one_search_field)
    app.connect("html-page-context", _page_context, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
