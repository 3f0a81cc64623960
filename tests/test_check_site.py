"""The pure-Python parts of ``make check-site`` (tools/check_site.py), without a browser: the
allow-list, the detectors, link resolution and the verdict; and the Sphinx fix that writes an
inline script once (tools/sphinxext/mini_site.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tools" / "sphinxext"))
import check_site as cs
import mini_site


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "allow.yml"
    path.write_text(text)
    return path


def test_the_committed_allow_list_loads_and_every_entry_has_a_reason():
    allow = cs.load_allow(cs.DEFAULT_ALLOW)
    assert all(a.reason.strip() for a in allow.scroll + allow.math)


def test_allow_list_entries_match_page_glob_kind_and_first_line(tmp_path):
    allow = cs.load_allow(_write(tmp_path, """
scroll:
  - page: labs/*/pretraining.html
    kind: output
    first_line: "method   "
    reason: a wide results table printed as text
math:
  - page: book/intro.html
    text: "US$"
    reason: a price
"""))
    entry = allow.scroll[0]
    assert entry.matches("labs/galore/pretraining.html", "output", "  method    loss  ppl")
    assert not entry.matches("labs/galore/pretraining.html", "input", "method    loss")
    assert not entry.matches("book/galore/theory.html", "output", "method    loss")
    assert allow.math[0].matches("book/intro.html", "costs US$ 5")
    assert cs.load_allow(tmp_path / "missing.yml") == cs.Allow()


@pytest.mark.parametrize("text, message", [
    ("scroll:\n  - {page: a.html, first_line: x}\n", "missing key(s) ['reason']"),
    ("scroll:\n  - {page: a.html, first_line: x, reason: ' '}\n", "is empty"),
    ("scroll:\n  - {page: a.html, first_line: x, reason: r, colour: red}\n", "unknown key(s) ['colour']"),
    ("scroll:\n  - {page: a.html, first_line: x, reason: r, kind: cell}\n", "kind='cell'"),
    ("tables: []\n", "unknown section(s) ['tables']"),
    ("scroll: {page: a.html}\n", "section 'scroll' must be a list"),
    ("- 1\n", "expected a mapping"),
])
def test_a_bad_allow_list_names_the_entry_and_what_is_allowed(tmp_path, text, message):
    with pytest.raises(ValueError, match="allow-list") as err:
        cs.load_allow(_write(tmp_path, text))
    assert message in str(err.value)


def test_pipe_table_rows_need_a_separator():
    raw = "| method | loss |\n|---|---:|\n| GaLore | 3.1 |"
    assert cs.pipe_table_rows(raw) == ["| method | loss |", "|---|---:|", "| GaLore | 3.1 |"]
    assert cs.pipe_table_rows("| a | b | |:--|--| | 1 | 2 |")  # newlines lost: still found
    assert cs.pipe_table_rows("|dW|/|W0| stays small") == []  # norms, not a table
    assert cs.pipe_table_rows("a | b | c") == []


def test_math_leftovers_find_every_delimiter_with_its_context():
    found = cs.math_leftovers(r"the loss $L$ and \(x\) or \[y\] here")
    assert [f["token"] for f in found] == ["$", "$", "\\(", "\\)", "\\[", "\\]"]
    assert "loss $L$" in found[0]["context"]
    assert cs.math_leftovers("no math here, 5 % of 3 | 4") == []


def test_equation_and_figure_numbers_in_link_text():
    assert cs.shows_equation_number("(3)") and cs.shows_equation_number("eq. (2.3)")
    assert not cs.shows_equation_number("equation-loss") and not cs.shows_equation_number("(a)")
    assert cs.shows_figure_number("Fig. 4") and cs.shows_figure_number("Fig. 2.1")
    assert not cs.shows_figure_number("the loss curve")


def test_resolve_href_keeps_local_pages_and_anchors():
    origin = "http://127.0.0.1:8000"
    base = f"{origin}/book/galore/theory.html"
    assert cs.resolve_href(base, "../../labs/x.html#claim-a", origin) == ("labs/x.html", "claim-a")
    assert cs.resolve_href(base, "#equation-loss", origin) == ("book/galore/theory.html", "equation-loss")
    assert cs.resolve_href(base, "../api/", origin) == ("book/api/index.html", "")
    assert cs.resolve_href(base, "https://arxiv.org/abs/2403.03507", origin) is None
    assert cs.resolve_href(base, "mailto:a@b.c", origin) is None


def test_redirect_pages_and_page_list(tmp_path):
    assert cs.redirect_target('<meta http-equiv="Refresh" content="0; url=book/intro.html" />') == "book/intro.html"
    assert cs.redirect_target("<html><body>a page</body></html>") is None
    for name in ("index.html", "book/a.html", "_static/x.html", "_sources/y.html"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("<html></html>")
    assert cs.list_pages(tmp_path) == ["book/a.html", "index.html"]


def _page(**kw):
    base = {"pres": [], "page_overflow": 0, "blocks": [], "merrors": [], "untypeset": [], "math_count": 0,
            "search_fields": 1, "links": [], "icons": ["_static/favicon.svg"], "ids": [], "figures": [],
            "equations": [], "images": [], "mathjax_ran": True, "console": [], "pageerrors": [],
            "failed": [], "bad_status": []}
    return {**base, **kw}


def test_analyse_and_verdict_on_recorded_page_data(tmp_path):
    origin = "http://127.0.0.1:1"
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "favicon.svg").write_text("<svg/>")
    for name in ("a.html", "b.html"):
        (tmp_path / name).write_text("<html></html>")
    wide = {"kind": "output", "scroll_width": 900, "client_width": 700, "visible": True, "first_line": "method  loss"}
    data = {
        "a.html": _page(
            pres=[wide, {**wide, "kind": "input", "first_line": "x = 1"}],
            links=[{"href": "b.html#fig-loss", "text": "the figure", "headerlink": False, "in_article": True},
                   {"href": "b.html#nowhere", "text": "x", "headerlink": False, "in_article": True},
                   {"href": "#equation-e1", "text": "(1)", "headerlink": False, "in_article": True}],
            ids=["equation-e1"], equations=[{"id": "equation-e1", "number": "(1)"}],
            blocks=[{"where": "p", "text": "price $5 | a |\n|---|"}]),
        "b.html": _page(ids=["fig-loss"], figures=[{"ids": ["fig-loss"], "number": "Fig. 1", "caption": "loss"}],
                        pageerrors=["Identifier 'X' has already been declared"]),
    }
    allow = cs.Allow(scroll=[cs.AllowScroll("a.html", "method", "a wide table", "output")])
    checks = cs.analyse(data, origin, tmp_path, allow)
    assert checks["scroll_output"]["allowed"][0]["overflow_px"] == 200
    assert [f["first_line"] for f in checks["scroll_input"]["failures"]] == ["x = 1"]
    assert [f["problem"] for f in checks["links"]["failures"]] == ["no #nowhere on b.html"]
    assert checks["fig_refs"]["failures"][0]["text"] == "the figure"
    assert not checks["eq_refs"]["failures"]
    assert len(checks["tables"]["failures"]) == 1 and len(checks["math"]["failures"]) == 1
    assert checks["console"]["failures"][0]["page"] == "b.html"
    ok, failing = cs.verdict(checks, max_scroll=0)
    assert not ok and "scroll_input" in failing and "console" in failing
    _, failing = cs.verdict(checks, max_scroll=1)
    assert "scroll_input" not in failing
    assert cs.counts(data)["numbered_figures"] == 1
    report = {"checks": checks, "counts": cs.counts(data), "pages": 2, "html": str(tmp_path), "json": "r.json", "mathjax": True,
              "seconds": 1.0, "ok": ok, "failing": failing, "max_scroll": 1}
    text = cs.summary(report)
    assert "a wide table" in text and "check-site: FAILED" in text


def test_cli_rejects_a_negative_max_scroll(capsys):
    with pytest.raises(SystemExit):
        cs.main(["--max-scroll", "-1"])
    assert "--max-scroll=-1" in capsys.readouterr().err


def test_inline_scripts_are_written_once():
    from sphinx.builders.html._assets import _JavaScript

    thebe = "const THEBE_JS_URL = 'x'"
    scripts = [_JavaScript("doctools.js"), _JavaScript(None, body=thebe), _JavaScript("a.js"),
               _JavaScript("", body=thebe), _JavaScript(None, body="var t = 1")]
    out = mini_site.dedup_inline_scripts(scripts)
    assert [(s.filename, s.attributes.get("body")) for s in out] == [
        ("doctools.js", None), (None, thebe), ("a.js", None), (None, "var t = 1")]
