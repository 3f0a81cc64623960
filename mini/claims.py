"""The claims record: what each lab measured against what its paper states, machine-readable.

A lab calls :func:`record` once per claim, in the cell that measures it. The call compares the
measured value with the threshold, prints one line (value, threshold, the range over the seeds
it was checked on, holds or not), and emits the claim as a notebook output: a line of text and
HTML whose output metadata carries the claim as JSON under the key :data:`MIME` (metadata, so
that the book's renderer, which knows no such type, shows the line and keeps the record). A claim recorded with ``asserted=True`` that does not hold raises
``AssertionError``: that is the lab's assertion. One recorded with ``asserted=False`` is a
*finding*: it is printed and recorded either way.

The book's page "Claims at a glance" (``book/claims.md``, written by ``tools/claims_page.py``)
tabulates every claim of every executed notebook, and ``make test`` checks that a fresh
execution reproduces each committed claim (``tests/nbtiming.py``).

The rule every asserted claim follows (README, "Claims and their margins"): it was checked over
at least three seeds first, the lab's default seed among them; its threshold sits clearly
outside the range observed; the lab prints that range, from its own runs (its default seeds, or
a ``FULL=1`` results file that the lab writes and reads back: ``source="FULL=1"``).

Explained in :doc:`/book/claims`.
"""
from __future__ import annotations

import math
import numbers
import operator
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from mini.runtime import machine

__all__ = ["MIME", "OPS", "Claim", "record", "claims_of_notebook", "claims_of_outputs"]

MIME = "application/vnd.mini.claim+json"
"""The key under which a claim output's metadata carries the claim as JSON."""
OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}
SOURCES = ("default", "FULL=1")
_ID = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")


@dataclass
class Claim:
    """One claim as the record keeps it (see :func:`record` for the fields).

    Explained in :doc:`/book/claims`.
    """

    id: str  #: ``"<lab>.<claim>"``, unique in the book
    statement: str  #: the claim in one sentence, as the lab tests it
    paper: str  #: what the paper states or measures
    value: Any  #: our measured value
    op: str  #: the check is ``value op threshold``, ``op`` one of ``<, <=, >, >=, ==``
    threshold: Any  #: the other side of the check
    holds: bool  #: whether the check passed (at every seed)
    asserted: bool  #: True if the lab stops when the claim fails, False for a finding
    seeds: list[int]  #: the seeds it was checked over
    values: list[Any] = field(default_factory=list)  #: the value at each seed, in the order of ``seeds``
    source: str = "default"  #: ``"default"`` (this run) or ``"FULL=1"`` (the lab's results file)
    unit: str = ""  #: printed after the value
    machine: str = ""  #: CPU model and torch's CPU kernels, from :func:`mini.runtime.machine`

    def _ipython_display_(self) -> None:
        """Show nothing: a claim shows its line once, when :func:`record` records it (so a cell
        that ends with ``record(...)`` does not print the claim a second time)."""

    @property
    def anchor(self) -> str:
        """The HTML id of the claim's line in its notebook."""
        return "claim-" + self.id.replace(".", "-").replace("_", "-")

    def range_text(self) -> str:
        """The values over the seeds as "min to max" (the value alone for one seed)."""
        nums = [v for v in self.values if _is_number(v)]
        if len(nums) > 1:
            return f"{_fmt(min(nums))} to {_fmt(max(nums))}"
        return _fmt(self.value)

    def line(self) -> str:
        """The claim's one printed line: check, verdict, kind, seeds, range and source."""
        mark = "holds" if self.holds else "does not hold"
        kind = "asserted" if self.asserted else "finding"
        seeds = ", ".join(str(s) for s in self.seeds)
        unit = f" {self.unit}" if self.unit else ""
        return (f"[claim {self.id}] {_fmt(self.value)}{unit} {self.op} {_fmt(self.threshold)}: {mark} "
                f"({kind}; seeds {seeds}: {self.range_text()}; {self.source} run)")


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _fmt(v: Any) -> str:
    if _is_number(v):
        v = float(v)
        if v == 0 or math.isinf(v) or math.isnan(v):
            return f"{v:g}"
        return f"{v:.4g}" if abs(v) >= 1e-3 else f"{v:.3e}"
    return str(v)


def _plain(v: Any) -> Any:
    """A JSON-able copy: numpy and torch scalars become python numbers."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if hasattr(v, "item") and callable(v.item):
        v = v.item()  # a numpy or torch bool becomes a python bool here, so test bool first
    if isinstance(v, bool):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    raise TypeError(f"a claim's value must be a number, a bool or a string, got {type(v).__name__}")


def record(
    id: str,
    *,
    statement: str,
    paper: str,
    value: Any,
    op: str,
    threshold: Any,
    seeds: Sequence[int],
    values: Sequence[Any] | None = None,
    asserted: bool = True,
    source: str = "default",
    unit: str = "",
    display: bool = True,
) -> Claim:
    """Record one claim of a lab; assert it when ``asserted``.

    Explained in :doc:`/book/claims`.

    Args:
        id: ``"<lab>.<claim>"`` in lower case, unique in the book (e.g. ``"welore.spearman"``).
        statement: the claim in one sentence, as our lab tests it.
        paper: what the paper states or measures, with its number where it gives one.
        value: our measured value (for the default seed, or the summary over ``values``).
        op, threshold: the check ``value op threshold``; ``op`` is one of ``<, <=, >, >=, ==``.
        seeds: the seeds the claim was checked over.
        values: the value at each seed, in the order of ``seeds`` (each must pass the check too).
        asserted: raise ``AssertionError`` when the claim does not hold; False records a finding.
        source: ``"default"`` (this run) or ``"FULL=1"`` (read back from the lab's results file).
        unit: printed after the value.
        display: emit the claim as a notebook output (else only print its line).
    """
    if not isinstance(id, str) or not _ID.match(id):
        raise ValueError(f"id must look like 'lab.claim' (lower case, dots), got {id!r}")
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    for name, text in (("statement", statement), ("paper", paper)):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{name} must be a non-empty string, got {text!r}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one seed")
    value, threshold = _plain(value), _plain(threshold)
    values = [_plain(v) for v in (values if values is not None else [value])]
    if values and len(values) != len(seeds) and values != [value]:
        raise ValueError(f"values has {len(values)} entries for {len(seeds)} seeds")
    if op != "==" and not (_is_number(value) and _is_number(threshold)):
        raise TypeError(f"op {op!r} compares numbers; got value {value!r} and threshold {threshold!r}")
    check = OPS[op]
    holds = bool(check(value, threshold)) and all(bool(check(v, threshold)) for v in values)
    claim = Claim(id=id, statement=statement, paper=paper, value=value, op=op, threshold=threshold,
                  holds=holds, asserted=bool(asserted), seeds=seeds, values=values, source=source,
                  unit=unit, machine=machine())
    if display:
        _display(claim)
    else:
        print(claim.line())
    if asserted and not holds:
        raise AssertionError(f"claim {id} does not hold: {claim.line()}")
    return claim


def _display(claim: Claim) -> None:
    import html

    try:
        from IPython.display import display
    except ImportError:  # plain python: the line is the record
        print(claim.line())
        return
    color = "#1a7f37" if claim.holds else "#9a6700"
    html_line = (f'<div class="mini-claim" id="{claim.anchor}"><code style="color:{color}">'
                 f"{html.escape(claim.line())}</code></div>")
    display({"text/plain": claim.line(), "text/html": html_line}, metadata={MIME: asdict(claim)}, raw=True)


def claims_of_notebook(nb: Any) -> list[dict[str, Any]]:
    """Every claim recorded in a notebook's outputs (an ``nbformat`` node or its dict), in order.

    Explained in :doc:`/book/claims`.
    """
    out = []
    for cell in nb["cells"]:
        if cell.get("cell_type") != "code":
            continue
        out.extend(claims_of_outputs(cell.get("outputs", [])))
    return out


def claims_of_outputs(outputs: Sequence[Any]) -> list[dict[str, Any]]:
    """The claims among a cell's outputs.

    Explained in :doc:`/book/claims`.
    """
    return [dict(o["metadata"][MIME]) for o in outputs if MIME in (o.get("metadata") or {})]
