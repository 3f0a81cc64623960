"""pytest plugin: print each notebook's total run time after an nbval run.

Loaded with ``-p tests.nbtiming`` by ``make test``. Budgets (2-core CPU, default settings):
a lab at most 90 s, a theory notebook at most 30 s. Over-budget notebooks are flagged in the
summary, not failed: timings on a shared machine are noisy, and the numbers are the record.
"""
from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

_durations: dict[str, float] = defaultdict(float)
_failed: set[str] = set()
_start: dict[str, float] = {}


def _budget(path: str) -> float:
    return 90.0 if Path(path).parts[0] == "labs" else 30.0


def pytest_runtest_logreport(report):  # one report per cell and phase
    if not report.nodeid.endswith(".ipynb") and ".ipynb::" not in report.nodeid:
        return
    path = report.nodeid.split("::")[0]
    _durations[path] += report.duration
    if report.failed:
        _failed.add(path)


def pytest_terminal_summary(terminalreporter):
    if not _durations:
        return
    tr = terminalreporter
    tr.section("notebook run times")
    for path, seconds in sorted(_durations.items()):
        budget = _budget(path)
        flag = "FAILED" if path in _failed else ("over budget" if seconds > budget else "ok")
        tr.write_line(f"{seconds:7.1f} s  (budget {budget:4.0f} s)  {flag:11s}  {path}")
    tr.write_line(f"{sum(_durations.values()):7.1f} s  in all, {len(_durations)} notebooks")
