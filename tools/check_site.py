"""Check every page of the built site in a headless browser (``make check-site``).

    python tools/check_site.py                  # _build/html, strict apart from the allow-list
    python tools/check_site.py --max-scroll 5   # tolerate up to 5 unlisted scrolling blocks

Serves ``_build/html`` on a free localhost port, opens every page (``**/*.html`` outside
``_static``, ``_sources`` and ``_images``) in Debian's Chromium driven by Playwright at
1400 x 900 px, and checks what a reader would see:

- **scroll**: code inputs (``div.cell_input pre``), text outputs (``div.cell_output pre``) and
  other code blocks (``div.highlight pre``) whose ``pre`` scrolls horizontally, and pages that
  scroll horizontally as a whole. Listed, justified exceptions live in
  ``tools/check_site_allow.yml``;
- **tables**: Markdown pipe-table rows left as text (outside ``pre``/``code``);
- **math**: ``$``, ``\\(``, ``\\)``, ``\\[``, ``\\]`` left in visible text outside code and math
  containers, and MathJax errors. MathJax 3 is served from a local copy (``--mathjax``, which
  ``make check-site`` installs with npm) in place of the CDN, so the page is checked after
  typesetting; without it the check is static and says so;
- **links**: every local ``href`` exists, and its ``#anchor`` exists on the target page;
- **numbering**: every link to an equation shows a number such as ``(3)`` or ``(2.3)``; every
  figure has a caption number and every link to a figure reads "Fig. N"; numbered figures and
  equations that nothing links to are reported as information;
- **images**: every local ``img`` loads (``naturalWidth > 0``); external images cannot load
  offline and are listed as information;
- **favicon** and **search**: every page links an existing favicon and shows one search field
  outside its article (the theme once added a second one in a header bar);
- **console**: uncaught errors and console errors of the site's own scripts, and local
  requests that fail or answer 4xx/5xx. Requests to other hosts are blocked (no network) and
  listed as information.

It writes ``_build/check_site.json`` and prints a summary; the exit status is 1 when a check
fails. The pure-Python parts (allow-list, detectors, link resolution, verdict) are tested in
``tests/test_check_site.py`` without a browser.
"""
from __future__ import annotations

import argparse
import fnmatch
import functools
import http.server
import json
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HTML = ROOT / "_build" / "html"
DEFAULT_JSON = ROOT / "_build" / "check_site.json"
DEFAULT_ALLOW = ROOT / "tools" / "check_site_allow.yml"
DEFAULT_MATHJAX = ROOT / "_build" / "check_site" / "node_modules" / "mathjax"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 900}
SKIP_DIRS = {"_static", "_sources", "_images"}
SCROLL_KINDS = ("input", "output", "code")
# The CDN address Sphinx gives MathJax 3; requests under it are answered from the local copy.
MATHJAX_CDN = re.compile(r"^https://cdn\.jsdelivr\.net/npm/mathjax@3(?:\.[\d.]+)?/(?P<rest>es5/.*)$")

# ------------------------------------------------------------------------------ allow-list


@dataclass(frozen=True)
class AllowScroll:
    """A code block allowed to scroll: its page (a glob), the start of its first line, why."""

    page: str
    first_line: str
    reason: str
    kind: str | None = None  # input, output or code; None matches any

    def matches(self, page: str, kind: str, first_line: str) -> bool:
        return (fnmatch.fnmatchcase(page, self.page) and (self.kind is None or self.kind == kind)
                and first_line.strip().startswith(self.first_line.strip()))


@dataclass(frozen=True)
class AllowMath:
    """A real dollar sign or backslash-paren in prose: its page (a glob), the text around it, why."""

    page: str
    text: str
    reason: str

    def matches(self, page: str, context: str) -> bool:
        return fnmatch.fnmatchcase(page, self.page) and self.text in context


@dataclass
class Allow:
    scroll: list[AllowScroll] = field(default_factory=list)
    math: list[AllowMath] = field(default_factory=list)


_ALLOW_KEYS = {"scroll": ({"page", "first_line", "reason"}, {"kind"}),
               "math": ({"page", "text", "reason"}, set())}


def load_allow(path: Path | None) -> Allow:
    """Read the allow-list YAML (sections ``scroll`` and ``math``); a missing file allows nothing.

    Every entry needs its keys and a non-empty reason: an exception nobody justified is not one.
    """
    if path is None or not Path(path).exists():
        return Allow()
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"allow-list {path}: expected a mapping with sections {sorted(_ALLOW_KEYS)}, "
                         f"got {type(data).__name__}")
    unknown = set(data) - set(_ALLOW_KEYS)
    if unknown:
        raise ValueError(f"allow-list {path}: unknown section(s) {sorted(unknown)}; "
                         f"allowed: {sorted(_ALLOW_KEYS)}")
    out = Allow()
    for section, (required, optional) in _ALLOW_KEYS.items():
        entries = data.get(section) or []
        if not isinstance(entries, list):
            raise ValueError(f"allow-list {path}: section {section!r} must be a list, "
                             f"got {type(entries).__name__}")
        for i, entry in enumerate(entries):
            where = f"allow-list {path}: {section}[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where} must be a mapping with keys {sorted(required)}, got {entry!r}")
            missing = required - set(entry)
            extra = set(entry) - required - optional
            if missing or extra:
                raise ValueError(f"{where}: missing key(s) {sorted(missing)}, unknown key(s) "
                                 f"{sorted(extra)}; allowed keys: {sorted(required | optional)}")
            values = {k: str(v) for k, v in entry.items()}
            if not values["reason"].strip():
                raise ValueError(f"{where}: reason={entry['reason']!r} is empty; say why it is allowed")
            if section == "scroll":
                kind = entry.get("kind")
                if kind is not None and kind not in SCROLL_KINDS:
                    raise ValueError(f"{where}: kind={kind!r}; allowed: {list(SCROLL_KINDS)} or none")
                out.scroll.append(AllowScroll(values["page"], values["first_line"], values["reason"], kind))
            else:
                out.math.append(AllowMath(values["page"], values["text"], values["reason"]))
    return out


# ------------------------------------------------------------------------------ detectors

# A pipe-table separator (|---|:--:|) anywhere in a text, and a row: a line from | to | with a
# cell boundary in between.
_SEPARATOR = re.compile(r"\|\s*:?-+:?\s*(?:\|\s*:?-+:?\s*)*\|")
_ROW = re.compile(r"^\s*\|[^|\n]*\|.*\|\s*$")


def pipe_table_rows(text: str) -> list[str]:
    """Lines of ``text`` that look like Markdown pipe-table rows or separators left unrendered.

    A pipe table needs its separator line (``|---|---|``): without one, lines such as
    ``|dW|/|W0|`` are norms, not a table, and nothing is reported.
    """
    if not _SEPARATOR.search(text):
        return []
    rows = []
    for line in text.splitlines():
        if _SEPARATOR.search(line) or _ROW.match(line):
            rows.append(line.strip())
    return rows


_MATH_TOKEN = re.compile(r"\$|\\\(|\\\)|\\\[|\\\]")


def math_leftovers(text: str, width: int = 30) -> list[dict[str, str]]:
    """Each math delimiter (``$``, ``\\(``, ``\\)``, ``\\[``, ``\\]``) in ``text``, with context."""
    found = []
    for m in _MATH_TOKEN.finditer(text):
        a, b = max(0, m.start() - width), min(len(text), m.end() + width)
        found.append({"token": m.group(), "context": " ".join(text[a:b].split())})
    return found


_EQ_NUMBER = re.compile(r"\(\d+(?:\.\d+)*\)")
_FIG_NUMBER = re.compile(r"\bFig(?:ure|\.)?\s*\d+(?:\.\d+)*", re.IGNORECASE)


def shows_equation_number(text: str) -> bool:
    """Whether a link's text shows an equation number such as ``(3)`` or ``(2.3)``."""
    return bool(_EQ_NUMBER.search(text))


def shows_figure_number(text: str) -> bool:
    """Whether a link's text shows a figure number such as ``Fig. 3`` or ``Fig. 2.1``."""
    return bool(_FIG_NUMBER.search(text))


def resolve_href(base_url: str, href: str, origin: str) -> tuple[str, str] | None:
    """The site path (relative to the HTML root, ``index.html`` for folders) and the anchor of a
    link on the page at ``base_url``; None for links to other hosts and non-page schemes."""
    href = href.strip()
    if not href or href.startswith(("mailto:", "javascript:", "tel:", "data:")):
        return None
    url = urljoin(base_url, href)
    parts = urlsplit(url)
    if f"{parts.scheme}://{parts.netloc}" != origin:
        return None
    path = unquote(parts.path).lstrip("/")
    if path == "" or path.endswith("/"):
        path += "index.html"
    return path, unquote(parts.fragment)


_REFRESH = re.compile(r"""<meta\s+http-equiv=["']refresh["']\s+content=["']\d+;\s*url=([^"']+)["']""", re.IGNORECASE)


def redirect_target(source: str) -> str | None:
    """The target of a redirect page (a ``<meta http-equiv="refresh">`` and nothing else)."""
    m = _REFRESH.search(source)
    return m.group(1).strip() if m and len(source) < 2000 else None


def _redirect_data(target: str) -> dict[str, Any]:
    """What a redirect page contributes to the checks: one link, to its target."""
    empty: dict[str, Any] = {k: [] for k in ("pres", "blocks", "merrors", "untypeset", "ids", "figures", "equations",
                                             "images", "console", "pageerrors", "failed", "bad_status")}
    link = {"href": target, "text": "", "headerlink": False, "in_article": False}
    return {**empty, "links": [link], "icons": None, "math_count": 0, "search_fields": 1,
            "page_overflow": 0, "mathjax_ran": False, "title": "redirect",
            "seconds": 0.0, "redirect": target}


def list_pages(html: Path) -> list[str]:
    """Every HTML page of the built site, relative to its root, outside the asset folders."""
    pages = []
    for p in sorted(html.rglob("*.html")):
        rel = p.relative_to(html)
        if rel.parts[0] not in SKIP_DIRS:
            pages.append(rel.as_posix())
    return pages


# ------------------------------------------------------------------------------ the browser side

# Runs in each page after load: opens toggles, waits for MathJax and images, and returns what
# the checks need (measured sizes, texts that could hold leftovers, links, ids, numbers).
_PAGE_JS = r"""
async (mathjax) => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  document.querySelectorAll('details').forEach((d) => { d.open = true; });
  let mathjaxRan = false;
  if (mathjax && window.MathJax && MathJax.startup && MathJax.startup.promise) {
    mathjaxRan = await Promise.race([MathJax.startup.promise.then(() => true), sleep(20000).then(() => false)]);
  }
  const imgs = [...document.images];
  imgs.forEach((i) => { i.loading = 'eager'; });
  await Promise.all(imgs.map((i) => i.complete ? null : new Promise((r) => {
    i.addEventListener('load', r); i.addEventListener('error', r); setTimeout(r, 5000); })));
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));

  const root = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const firstLine = (t) => ((t || '').split('\n').find((l) => l.trim()) || '').trim().slice(0, 120);
  const pres = [...root.querySelectorAll('pre')].map((p) => ({
    kind: p.closest('div.cell_input') ? 'input' : p.closest('div.cell_output') ? 'output'
        : p.closest('div.highlight') ? 'code' : 'pre',
    scroll_width: p.scrollWidth, client_width: p.clientWidth,
    visible: p.getClientRects().length > 0 && p.clientWidth > 0,
    first_line: firstLine(p.textContent),
  }));
  const doc = document.documentElement;
  const page_overflow = doc.scrollWidth - doc.clientWidth;

  // code, signatures (regex defaults such as '\\.q_proj$'), rendered math, scripts
  const EXCL = 'pre, code, kbd, samp, script, style, noscript, textarea, dt.sig, .sig-param, '
    + '.default_value, mjx-container, .MathJax, mjx-assistive-mml, .headerlink' + (mathjaxRan ? '' : ', .math');
  const BLOCK = 'p, li, dt, dd, td, th, h1, h2, h3, h4, h5, h6, figcaption, caption, blockquote, '
    + 'summary, div, section, article, table';
  const texts = new Map();
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    const el = n.parentElement;
    if (!el || el.closest(EXCL)) continue;
    const block = el.closest(BLOCK) || root;
    texts.set(block, (texts.get(block) || '') + n.textContent);
  }
  const blocks = [];
  for (const [el, text] of texts) {
    if (/[|$\\]/.test(text)) {
      const sec = el.closest('section[id]');
      blocks.push({where: el.tagName.toLowerCase() + (sec ? ' in #' + sec.id : ''), text: text});
    }
  }
  const maths = [...root.querySelectorAll('.math')];
  const untypeset = mathjaxRan ? maths.filter((m) => !m.querySelector('mjx-container'))
    .map((m) => m.textContent.trim().slice(0, 80)) : [];
  const visible = (e) => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden';
  // the header's and sidebars' search fields (the search page has one more, in its article)
  const search_fields = [...document.querySelectorAll('.search-button-field, form.bd-search')]
    .filter((e) => visible(e) && !root.contains(e)).length;
  const merrors = [...root.querySelectorAll('mjx-merror')]
    .map((e) => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 200));

  const links = [...document.querySelectorAll('a[href]')].map((a) => ({
    href: a.getAttribute('href'), text: a.textContent.trim().replace(/\s+/g, ' ').slice(0, 80),
    headerlink: a.classList.contains('headerlink'), in_article: root.contains(a),
  }));
  const icons = [...document.querySelectorAll('link[rel~="icon"][href]')].map((l) => l.getAttribute('href'));
  const ids = [...document.querySelectorAll('[id]')].map((e) => e.id)
    .concat([...document.querySelectorAll('a[name]')].map((e) => e.getAttribute('name')));
  const figures = [...root.querySelectorAll('figure, div.figure')].map((f) => ({
    ids: [f.id, ...[...f.querySelectorAll('[id]')].map((e) => e.id)].filter((x) => x),
    number: f.querySelector('.caption-number') ? f.querySelector('.caption-number').textContent.trim() : null,
    caption: firstLine((f.querySelector('figcaption, .caption') || {}).textContent || ''),
  }));
  const equations = [...root.querySelectorAll('[id^="equation-"]')].map((e) => ({
    id: e.id, number: e.querySelector('.eqno') ? e.querySelector('.eqno').textContent.replace('#', '').trim() : null,
  }));
  const images = imgs.map((i) => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0,
                                   alt: (i.alt || '').slice(0, 60)}));
  return {pres, page_overflow, blocks, merrors, untypeset, math_count: maths.length, search_fields,
          links, icons, ids, figures, equations, images,
          mathjax_ran: mathjaxRan, title: document.title};
}
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # the browser dropped a preload
            super().handle_error(request, client_address)


def _serve(html: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve ``html`` on a free localhost port in a daemon thread; returns the server and origin."""
    handler = functools.partial(_QuietHandler, directory=str(html))
    server = _QuietServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def visit_pages(html: Path, pages: list[str], chromium: str, mathjax: Path | None,
                timeout_s: float = 60.0) -> tuple[str, dict[str, dict[str, Any]]]:
    """Open every page in Chromium and collect what ``_PAGE_JS`` returns plus console and network
    events. Returns the origin the site was served at and the data of each page."""
    from playwright.sync_api import sync_playwright  # installed by make check-site only

    server, origin = _serve(html)
    data: dict[str, dict[str, Any]] = {}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)

            def route(r: Any) -> None:
                url = r.request.url
                if url.startswith(origin):
                    r.continue_()
                    return
                m = MATHJAX_CDN.match(url)
                if mathjax is not None and m and (mathjax / m["rest"]).is_file():
                    r.fulfill(path=str(mathjax / m["rest"]))
                else:
                    r.abort("internetdisconnected")  # no network: fail fast, listed as external

            for name in pages:
                target = redirect_target((html / name).read_text(errors="replace"))
                if target is not None:
                    data[name] = _redirect_data(target)
                    continue
                events: dict[str, list[Any]] = {"console": [], "pageerrors": [], "failed": [], "bad_status": []}
                # a fresh context per page: a first-time reader, no localStorage from other pages
                context = browser.new_context(viewport=VIEWPORT)
                context.route("**/*", route)
                page = context.new_page()
                page.on("console", lambda m, ev=events: ev["console"].append(
                    {"type": m.type, "text": m.text[:300], "url": (m.location or {}).get("url", "")})
                    if m.type == "error" else None)
                page.on("pageerror", lambda e, ev=events: ev["pageerrors"].append(str(e)[:300]))
                page.on("requestfailed", lambda r, ev=events: ev["failed"].append(
                    {"url": r.url, "failure": r.failure}))
                page.on("response", lambda r, ev=events: ev["bad_status"].append(
                    {"url": r.url, "status": r.status}) if r.status >= 400 else None)
                t0 = time.time()
                try:
                    page.goto(f"{origin}/{name}", wait_until="load", timeout=timeout_s * 1000)
                    result = page.evaluate(_PAGE_JS, mathjax is not None)
                    page.wait_for_timeout(100)  # late console messages
                except Exception as err:  # a page that cannot be checked fails, the others go on
                    result = {**_redirect_data(""), "links": [], "redirect": None}
                    events["pageerrors"].append(f"check-site could not check the page: {err}"[:300])
                result.update(events, seconds=round(time.time() - t0, 2))
                data[name] = result
                context.close()
            browser.close()
    finally:
        server.shutdown()
    return origin, data


# ------------------------------------------------------------------------------ the checks


def _check(failures: list | None = None, info: list | None = None, allowed: list | None = None) -> dict:
    return {"failures": failures or [], "info": info or [], "allowed": allowed or []}


def analyse(data: dict[str, dict[str, Any]], origin: str, html: Path, allow: Allow) -> dict[str, Any]:
    """Turn the per-page data into checks: each with failures, information and allowed items."""
    checks: dict[str, dict] = {}
    used_allow: set[AllowScroll] = set()

    # horizontal scroll
    for kind in SCROLL_KINDS:
        checks[f"scroll_{kind}"] = _check()
    checks["page_overflow"] = _check()
    hidden = 0
    for page, d in data.items():
        for p in d["pres"]:
            if not p["visible"]:
                hidden += 1
                continue
            over = p["scroll_width"] - p["client_width"]
            if over <= 0:
                continue
            kind = p["kind"] if p["kind"] in SCROLL_KINDS else "code"
            item = {"page": page, "kind": kind, "first_line": p["first_line"], "overflow_px": over}
            hit = next((a for a in allow.scroll if a.matches(page, kind, p["first_line"])), None)
            if hit is not None:
                used_allow.add(hit)
                checks[f"scroll_{kind}"]["allowed"].append({**item, "reason": hit.reason})
            else:
                checks[f"scroll_{kind}"]["failures"].append(item)
        if d["page_overflow"] > 0:
            checks["page_overflow"]["failures"].append({"page": page, "overflow_px": d["page_overflow"]})
    stale = [asdict(a) for a in allow.scroll if a not in used_allow]
    checks["scroll_input"]["info"] = [{"hidden_pre_blocks": hidden}] + [{"unused_allow": s} for s in stale]

    # unrendered tables, math leftovers and MathJax errors
    checks["tables"], checks["math"], checks["math_errors"] = _check(), _check(), _check()
    for page, d in data.items():
        for b in d["blocks"]:
            for row in pipe_table_rows(b["text"]):
                checks["tables"]["failures"].append({"page": page, "where": b["where"], "row": row[:120]})
            for m in math_leftovers(b["text"]):
                item = {"page": page, "where": b["where"], **m}
                hit = next((a for a in allow.math if a.matches(page, m["context"])), None)
                if hit is not None:
                    checks["math"]["allowed"].append({**item, "reason": hit.reason})
                else:
                    checks["math"]["failures"].append(item)
        for e in d["merrors"]:
            checks["math_errors"]["failures"].append({"page": page, "error": e})
        for t in d["untypeset"]:
            checks["math_errors"]["failures"].append({"page": page, "error": "not typeset", "math": t})
    ran = sum(1 for d in data.values() if d["mathjax_ran"])
    with_math = sum(1 for d in data.values() if d["math_count"])
    checks["math"]["info"].append({"pages_with_math": with_math, "pages_typeset_by_mathjax": ran,
                                   "math_elements": sum(d["math_count"] for d in data.values())})
    if not ran:
        checks["math"]["info"].append("MathJax did not run: math containers were skipped, not typeset")

    # one search field per page (the theme can add a second one in the header)
    checks["search"] = _check()
    for page, d in data.items():
        if d["search_fields"] != 1:
            checks["search"]["failures"].append({"page": page, "visible_search_fields": d["search_fields"]})

    # links and anchors
    ids = {page: set(d["ids"]) for page, d in data.items()}
    checks["links"] = _check()
    external = set()
    targets: dict[tuple[str, str], list[dict]] = {}
    for page, d in data.items():
        seen = set()
        for a in d["links"]:
            res = resolve_href(f"{origin}/{page}", a["href"], origin)
            if res is None:
                if a["href"].startswith("http"):
                    external.add(a["href"])
                continue
            path, anchor = res
            targets.setdefault((path, anchor), []).append({"page": page, **a})
            if (path, anchor) in seen:
                continue
            seen.add((path, anchor))
            file = html / path
            if not file.is_file():
                checks["links"]["failures"].append({"page": page, "href": a["href"], "problem": "no such file"})
            elif anchor and path.endswith(".html"):
                known = ids.get(path)
                if known is None:  # a page not visited (an asset folder's HTML): read its ids
                    known = set(re.findall(r'\bid="([^"]+)"', file.read_text(errors="replace")))
                    ids[path] = known
                if anchor not in known:
                    checks["links"]["failures"].append({"page": page, "href": a["href"],
                                                        "problem": f"no #{anchor} on {path}"})
    checks["links"]["info"].append({"external_links": len(external)})

    # a favicon on every page (redirect pages aside), and it exists
    checks["favicon"] = _check()
    for page, d in data.items():
        if d["icons"] is None:
            continue
        if not d["icons"]:
            checks["favicon"]["failures"].append({"page": page, "problem": "no <link rel=icon>"})
        for href in d["icons"]:
            res = resolve_href(f"{origin}/{page}", href, origin)
            if res is not None and not (html / res[0]).is_file():
                checks["favicon"]["failures"].append({"page": page, "href": href, "problem": "no such file"})

    # numbering: equations and figures
    checks["eq_refs"], checks["figures"], checks["fig_refs"] = _check(), _check(), _check()
    for page, d in data.items():
        for a in d["links"]:
            if ("#equation-" in a["href"] and not a["headerlink"] and a["in_article"]
                    and not shows_equation_number(a["text"])):
                checks["eq_refs"]["failures"].append({"page": page, "href": a["href"], "text": a["text"]})
        for e in d["equations"]:
            refs = targets.get((page, e["id"]), [])
            if not any(not r["headerlink"] for r in refs):
                checks["eq_refs"]["info"].append({"page": page, "equation": e["id"], "number": e["number"],
                                                  "note": "numbered, not referenced"})
        for f in d["figures"]:
            if not f["number"]:
                checks["figures"]["failures"].append({"page": page, "ids": f["ids"], "caption": f["caption"]})
            refs = [r for i in f["ids"] for r in targets.get((page, i), []) if not r["headerlink"]]
            for r in refs:
                if not shows_figure_number(r["text"]):
                    checks["fig_refs"]["failures"].append({"page": r["page"], "href": r["href"], "text": r["text"]})
            if f["number"] and not refs:
                checks["figures"]["info"].append({"page": page, "figure": f["number"], "caption": f["caption"],
                                                  "note": "numbered, not referenced"})

    # images
    checks["images"] = _check()
    for page, d in data.items():
        for i in d["images"]:
            if i["ok"]:
                continue
            local = i["src"].startswith(origin)
            (checks["images"]["failures"] if local else checks["images"]["info"]).append(
                {"page": page, "src": i["src"].replace(origin, ""), "alt": i["alt"]})

    # console errors and failed requests
    checks["console"] = _check()
    for page, d in data.items():
        for e in d["pageerrors"]:
            checks["console"]["failures"].append({"page": page, "error": e})
        requested = {r["url"] for r in d["failed"] + d["bad_status"]}
        for c in d["console"]:
            if c["text"].startswith("Failed to load resource"):
                if c["url"].startswith(origin) and c["url"] not in requested:  # the browser's own,
                    checks["console"]["failures"].append(  # e.g. /favicon.ico
                        {"page": page, "url": c["url"].replace(origin, ""), "problem": c["text"]})
                continue  # page requests are reported below, local or external
            own = c["url"].startswith(origin) or not c["url"]
            (checks["console"]["failures"] if own else checks["console"]["info"]).append(
                {"page": page, "error": c["text"], "source": c["url"].replace(origin, "")})
        for r in d["failed"] + d["bad_status"]:
            item = {"page": page, "url": r["url"].replace(origin, ""),
                    "problem": r.get("failure") or f"HTTP {r.get('status')}"}
            (checks["console"]["failures"] if r["url"].startswith(origin) else checks["console"]["info"]).append(item)
    return checks


def counts(data: dict[str, dict[str, Any]]) -> dict[str, int]:
    """What was looked at, over all pages: a check that finds nothing among nothing is no check."""
    def total(key: str) -> int:
        return sum(len(d[key]) for d in data.values())
    figures = [f for d in data.values() for f in d["figures"]]
    return {"code_blocks": total("pres"), "math_elements": sum(d["math_count"] for d in data.values()),
            "links": total("links"), "figures": len(figures),
            "numbered_figures": sum(1 for f in figures if f["number"]),
            "labelled_equations": total("equations"), "images": total("images")}


def verdict(checks: dict[str, dict], max_scroll: int) -> tuple[bool, list[str]]:
    """Whether the site passes, and the names of the failing checks. Up to ``max_scroll``
    unlisted scrolling code blocks (inputs, outputs, other code together) are tolerated."""
    failing = []
    scroll = sum(len(checks[f"scroll_{k}"]["failures"]) for k in SCROLL_KINDS)
    if scroll > max_scroll:
        failing += [f"scroll_{k}" for k in SCROLL_KINDS if checks[f"scroll_{k}"]["failures"]]
    failing += [name for name, c in checks.items()
                if not name.startswith("scroll_") and c["failures"]]
    return not failing, failing


_LABELS = {
    "scroll_input": "code inputs scrolling", "scroll_output": "text outputs scrolling",
    "scroll_code": "other code blocks scrolling", "page_overflow": "pages scrolling sideways",
    "tables": "unrendered table rows", "math": "math delimiters left", "math_errors": "MathJax errors",
    "links": "broken internal links", "favicon": "pages without a favicon",
    "search": "pages without exactly one search field", "eq_refs": "equation refs without number",
    "figures": "figures without number", "fig_refs": "figure refs without Fig. N",
    "images": "images failing", "console": "console errors / failed local requests",
}


def summary(report: dict[str, Any], limit: int = 25) -> str:
    """A readable summary: pages, totals per check, allowed exceptions, failures (first few)."""
    checks = report["checks"]
    mathjax = "served locally" if report["mathjax"] else "not loaded: static math check"
    head = (f"check-site: {report['pages']} pages of {report['html']} at 1400x900 (MathJax {mathjax}), "
            f"{report['seconds']:.0f} s")
    lines = [head, "  looked at: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in report["counts"].items())]
    for name, label in _LABELS.items():
        c = checks[name]
        extra = f", {len(c['allowed'])} allowed" if c["allowed"] else ""
        extra += f", {len(c['info'])} info" if c["info"] and name not in ("scroll_input", "links", "math") else ""
        lines.append(f"  {label:40s} {len(c['failures']):4d}{extra}")
    for name, label in _LABELS.items():
        c = checks[name]
        if c["allowed"]:
            lines.append(f"allowed ({label}):")
            lines += [f"  {json.dumps(x, ensure_ascii=False)}" for x in c["allowed"]]
    for name, label in _LABELS.items():
        c = checks[name]
        if c["failures"]:
            lines.append(f"{label} ({len(c['failures'])}):")
            lines += [f"  {json.dumps(x, ensure_ascii=False)}" for x in c["failures"][:limit]]
            if len(c["failures"]) > limit:
                lines.append(f"  ... {len(c['failures']) - limit} more in {report['json']}")
    ok = report["ok"]
    lines.append("check-site: OK" if ok else f"check-site: FAILED ({', '.join(report['failing'])})"
                 + (f"; scrolling blocks tolerated: {report['max_scroll']}" if report["max_scroll"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--html", type=Path, default=DEFAULT_HTML, help="the built site (default _build/html)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="the report (default _build/check_site.json)")
    ap.add_argument("--allow", type=Path, default=DEFAULT_ALLOW, help="allow-list YAML (tools/check_site_allow.yml)")
    ap.add_argument("--max-scroll", type=int, default=0,
                    help="unlisted scrolling code blocks tolerated (default 0: strict apart from the allow-list)")
    ap.add_argument("--mathjax", type=Path, default=DEFAULT_MATHJAX,
                    help="a local MathJax 3 package (with es5/) answering the CDN's requests")
    ap.add_argument("--chromium", default=CHROMIUM, help="the Chromium executable (default /usr/bin/chromium)")
    ap.add_argument("--pages", nargs="*", help="only these pages (paths relative to the site root)")
    args = ap.parse_args(argv)
    if args.max_scroll < 0:
        ap.error(f"--max-scroll={args.max_scroll}: must be 0 or more")
    if not (args.html / "index.html").is_file():
        ap.error(f"--html={args.html}: no index.html there; build the site first (tools/build_site.py)")
    if not Path(args.chromium).is_file():
        ap.error(f"--chromium={args.chromium}: not found; install Debian's chromium (make check-site does)")
    mathjax = args.mathjax if (args.mathjax / "es5" / "tex-mml-chtml.js").is_file() else None
    if mathjax is None:
        print(f"check-site: no MathJax 3 at --mathjax={args.mathjax} (es5/tex-mml-chtml.js): "
              "math is checked statically", file=sys.stderr)
    allow = load_allow(args.allow)
    pages = list_pages(args.html)
    if args.pages:
        unknown = sorted(set(args.pages) - set(pages))
        if unknown:
            ap.error(f"--pages: {unknown} are not pages of {args.html}; pages are e.g. {pages[:3]}")
        pages = args.pages
    t0 = time.time()
    origin, data = visit_pages(args.html, pages, args.chromium, mathjax)
    checks = analyse(data, origin, args.html, allow)
    ok, failing = verdict(checks, args.max_scroll)
    report = {"ok": ok, "failing": failing, "pages": len(pages), "html": str(args.html),
              "json": str(args.json), "mathjax": mathjax is not None, "max_scroll": args.max_scroll,
              "seconds": round(time.time() - t0, 1),
              "counts": counts(data),
              "totals": {name: len(c["failures"]) for name, c in checks.items()},
              "checks": checks,
              "page_seconds": {p: d["seconds"] for p, d in data.items()}}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(summary(report))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
