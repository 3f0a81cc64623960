"""pytest plugin of ``make test``: notebook times, the timing record, and the claims check.

Loaded with ``-p tests.nbtiming``. It

- orders notebooks longest first (by the committed ``bench/results/timing.json``), so the two
  workers of ``pytest -n 2 --dist loadfile`` finish close together;
- checks, cell by cell, that a fresh execution reproduces the claims the committed notebook
  records (:mod:`mini.claims`): the same ids, checks, seeds, holds / does not hold, and values
  within 10% of the larger of the committed value and the threshold, on a machine like the one
  that committed them (on another, what must not move; see :func:`_compare_claims`). The count
  of identical values is reported. A cell whose claims differ fails;
- counts the code cells whose printed text (stdout and plain-text results, every duration
  masked: :func:`tools.compare_outputs.printed`) differs from the committed cell's, and reports
  them (a report, not a failure: peak-memory readings, for one, move between runs);
- prints each notebook's run time against its budget (a lab 90 s, a theory notebook 30 s):
  budgets are measured and reported, never failed on;
- writes ``_build/timing/$MINI_TIMING.json`` (``unit`` or ``notebooks``) for ``tools/timing.py``.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tools.compare_outputs import diff_lines, printed  # noqa: E402
from tools.timing import budget_of, expected_seconds, part_of  # noqa: E402

_durations: dict[str, float] = defaultdict(float)
_failed: set[str] = set()
_counts: dict[str, int] = defaultdict(int)
_claims = {"compared": 0, "identical": 0}
_diffs: list = []  # (cell, first differing lines)
_printed: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # notebook -> [cells, cells that differ]
_t0 = time.time()
CLAIM_RTOL = 0.10


def _is_notebook(nodeid: str) -> bool:
    return ".ipynb" in nodeid.split("::")[0]


def pytest_collection_modifyitems(session, config, items):
    order = {}
    for i, item in enumerate(items):
        path = item.nodeid.split("::")[0]
        order.setdefault(path, (-expected_seconds(path) if _is_notebook(path) else 0.0, i))
    items.sort(key=lambda it: order[it.nodeid.split("::")[0]])  # stable: cells keep their order


def _compare_claims(fresh: list[dict], committed: list[dict]) -> tuple[list[str], int]:
    """Differences between a cell's fresh and committed claims, and the count of identical values.

    On the machine that committed the outputs (same CPU model and torch CPU kernels, the claim's
    ``machine``) everything is compared: values within 10% of the larger of the committed value
    and the threshold. On another machine float arithmetic differs in the last digits and a
    training run amplifies them, so only what must not move is compared: ids, checks, seeds,
    asserted or not, source, and that asserted claims hold (findings may flip there).
    """
    problems, identical = [], 0
    if [c["id"] for c in fresh] != [c["id"] for c in committed]:
        return [f"claim ids {[c['id'] for c in fresh]} != committed {[c['id'] for c in committed]}"], 0
    for f, c in zip(fresh, committed):
        same_machine = f.get("machine") == c.get("machine")
        keys = ("op", "threshold", "seeds", "asserted", "source") + (("holds",) if same_machine else ())
        for key in keys:
            if f.get(key) != c.get(key):
                problems.append(f"{f['id']}: {key} {f.get(key)!r} != committed {c.get(key)!r}")
        if f.get("asserted") and not f.get("holds"):
            problems.append(f"{f['id']}: an asserted claim that does not hold")
        fv, cv = f.get("value"), c.get("value")
        if fv == cv:
            identical += 1
        elif not same_machine:
            continue
        elif isinstance(fv, (int, float)) and isinstance(cv, (int, float)) and not isinstance(fv, bool):
            thr = c.get("threshold")
            scale = max(abs(cv), abs(thr) if isinstance(thr, (int, float)) and not isinstance(thr, bool) else 0.0)
            if abs(fv - cv) > CLAIM_RTOL * scale + 1e-12:
                problems.append(f"{f['id']}: value {fv!r} differs from the committed {cv!r} by more than "
                                f"{CLAIM_RTOL:.0%}")
        else:
            problems.append(f"{f['id']}: value {fv!r} != committed {cv!r}")
    return problems, identical


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    # read the committed outputs before nbval runs the cell: its comparison of NBVAL_CHECK_OUTPUT
    # cells merges the committed stream outputs in place
    if _is_notebook(item.nodeid) and hasattr(item, "cell"):
        from mini.claims import claims_of_outputs

        outputs = copy.deepcopy(list(item.cell.get("outputs", [])))
        item._mini_committed = (printed({"outputs": outputs}), claims_of_outputs(outputs))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when != "call" or not hasattr(item, "_mini_committed"):
        return
    from mini.claims import claims_of_outputs

    if report.passed:  # does the cell print what the committed cell printed (durations masked)?
        fresh_text = printed({"outputs": getattr(item, "test_outputs", None) or []})
        committed_text = item._mini_committed[0]
        report.user_properties.append(("printed", int(fresh_text != committed_text)))
        if fresh_text != committed_text:
            diff = diff_lines(committed_text, fresh_text)
            report.user_properties.append(("printed_diff", (item.nodeid, diff[:6])))
    fresh = claims_of_outputs(getattr(item, "test_outputs", None) or [])
    committed = item._mini_committed[1] if hasattr(item, "_mini_committed") else []
    if not fresh and not committed:
        return
    if report.passed:
        problems, identical = _compare_claims(fresh, committed)
        report.user_properties.append(("claims", {"compared": len(committed), "identical": identical}))
        if problems:
            report.outcome = "failed"
            report.longrepr = ("the fresh execution does not reproduce the committed claims record "
                               "(re-execute the notebook and commit it):\n  " + "\n  ".join(problems))


def pytest_runtest_logreport(report):
    nb = _is_notebook(report.nodeid)
    path = report.nodeid.split("::")[0]
    if nb:
        _durations[path] += report.duration
        if report.failed:
            _failed.add(path)
    for key, value in report.user_properties:
        if key == "printed_diff":
            _diffs.append(value)
        if key == "printed":
            _printed[path][0] += 1
            _printed[path][1] += value
        if key == "claims":
            _claims["compared"] += value["compared"]
            _claims["identical"] += value["identical"]
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _counts[report.outcome] += 1
    elif report.when == "teardown" and report.failed:
        _counts["failed"] += 1


def pytest_terminal_summary(terminalreporter):
    if getattr(terminalreporter.config, "workerinput", None) is not None:
        return  # an xdist worker: the controller reports
    wall = time.time() - _t0
    jobs = terminalreporter.config.getoption("numprocesses", None) or 1
    if not isinstance(jobs, int):
        jobs = os.cpu_count() or 1
    name = os.environ.get("MINI_TIMING")
    record = {"wall_s": round(wall, 1), "jobs": jobs, "passed": _counts["passed"],
              "failed": _counts["failed"], "skipped": _counts["skipped"]}
    if _durations:
        tr = terminalreporter
        tr.section("notebook run times")
        for path, seconds in sorted(_durations.items()):
            budget = budget_of(path)
            flag = "FAILED" if path in _failed else ("over budget" if seconds > budget else "ok")
            tr.write_line(f"{seconds:7.1f} s  (budget {budget:4.0f} s)  {flag:11s}  {path}")
        tr.write_line(f"{sum(_durations.values()):7.1f} s  in all, {len(_durations)} notebooks, "
                      f"{wall:.1f} s wall clock with {jobs} at a time")
        tr.write_line(f"claims: {_claims['compared']} compared with the committed record, "
                      f"{_claims['identical']} identical values")
        differ = {p: d for p, (n, d) in _printed.items() if d}
        tr.write_line(f"printed text (durations masked): {sum(d for _, d in _printed.values())} of "
                      f"{sum(n for n, _ in _printed.values())} code cells differ from the committed outputs"
                      + (": " + ", ".join(f"{p} ({d})" for p, d in sorted(differ.items())) if differ else ""))
        record["notebooks"] = {p: {"seconds": round(s, 1), "part": part_of(p), "ok": p not in _failed}
                               for p, s in sorted(_durations.items())}
        record["claims"] = dict(_claims)
        record["printed"] = {p: {"cells": n, "differ": d} for p, (n, d) in sorted(_printed.items())}
        record["printed_diffs"] = [{"cell": c, "diff": [line[:200] for line in d]} for c, d in sorted(_diffs)]
    if name:
        out = ROOT / "_build" / "timing" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=1) + "\n")
