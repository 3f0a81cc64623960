"""Results as tables: HTML on the book's pages, aligned text in a terminal or under nbval.

A lab's results are tables (methods by measures). Printed with f-string padding they overflow
the book's code column and lose their right-hand columns; :func:`table` returns a pandas
``DataFrame`` of formatted strings instead, which Jupyter shows as an HTML table (the page's
width, wrapped by the browser) and whose text form is deterministic, so the same notebook
prints the same thing under nbval, ``make book`` and ``jupyter execute``. The book's pages
explain the convention: :doc:`/book/intro`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["table"]

Format = str | Callable[[Any], str]


def _cell(value: Any, fmt: Format | None) -> str:
    if value is None:
        return ""
    if fmt is None:
        return value if isinstance(value, str) else format(value)
    if callable(fmt):
        return fmt(value)
    return format(value, fmt)


def table(
    rows: Sequence[Mapping[str, Any]],
    formats: Mapping[str, Format] | None = None,
    index: str | None = None,
) -> Any:
    """A ``pandas.DataFrame`` of ``rows`` with each column formatted as ``formats`` says.

    ``rows``: one mapping per row, column name -> value; columns keep the first row's order
    (later rows may add columns). ``formats``: column -> a format spec (``".3f"``, ``","``,
    ``".1e"``) or a function of the value; other columns use ``format(value)``; ``None`` shows
    as an empty cell. ``index``: the column whose values label the rows (e.g. the method).
    Display the result (the last expression of a cell, or ``display(...)``) rather than print it.

    See the book's :doc:`introduction </book/intro>`.
    """
    try:
        import pandas as pd
    except ImportError as err:  # pragma: no cover - pandas ships with mini-book[labs]
        raise ImportError("mini.table needs pandas: pip install 'mini-book[labs]'") from err
    if isinstance(rows, Mapping) or not isinstance(rows, Sequence) or not rows:
        raise ValueError(f"rows must be a non-empty sequence of mappings, got {rows!r:.80}")
    columns: list[str] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"rows[{i}] must be a mapping (column -> value), got {type(row).__name__}")
        columns += [c for c in row if c not in columns]
    formats = dict(formats or {})
    unknown = sorted(set(formats) - set(columns))
    if unknown:
        raise ValueError(f"formats names columns {unknown} that no row has; columns: {columns}")
    if index is not None and index not in columns:
        raise ValueError(f"index={index!r} is not a column; columns: {columns}")
    data = [{c: _cell(row.get(c), formats.get(c)) for c in columns} for row in rows]
    frame = pd.DataFrame(data, columns=columns)
    return frame.set_index(index) if index is not None else frame
