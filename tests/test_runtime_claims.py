"""mini.runtime (every notebook's setup) and mini.claims (the claims record)."""
from __future__ import annotations

import json

import pytest
import torch

import mini
from mini import claims
from mini.runtime import cpu_budget, notebook_threads


def test_setup_pins_threads_and_seeds(monkeypatch, capsys):
    saved = torch.get_num_threads()
    try:
        monkeypatch.delenv("MINI_THREADS", raising=False)
        monkeypatch.setenv("FULL", "1")
        s = mini.setup(3)
        assert (s.seed, s.threads, s.full, s.device) == (3, 1, True, "cpu")
        assert torch.get_num_threads() == 1
        a = torch.rand(3)
        mini.setup(3, verbose=False)
        assert torch.equal(a, torch.rand(3))  # seeded
        out = capsys.readouterr().out
        assert "1 torch thread |" in out and "FULL=1" in out
        assert max(map(len, out.splitlines())) <= 88  # fits the book's code column
        monkeypatch.setenv("MINI_THREADS", "2")
        assert mini.setup(0, verbose=False).threads == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(saved)


def test_setup_errors(monkeypatch):
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        mini.setup(-1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got True"):
        mini.setup(True)
    monkeypatch.setenv("MINI_THREADS", "zero")
    with pytest.raises(ValueError, match="MINI_THREADS must be a positive integer, got 'zero'"):
        notebook_threads()
    monkeypatch.setenv("MINI_CPUS", "0")
    with pytest.raises(ValueError, match="MINI_CPUS must be a positive integer, got '0'"):
        cpu_budget()
    monkeypatch.setenv("MINI_CPUS", "1")
    assert cpu_budget() == 1


def _record(**kw):
    args = dict(statement="x is small", paper="x < 1 (Table 1)", value=0.5, op="<", threshold=1.0,
                seeds=[0, 1, 2], values=[0.5, 0.4, 0.6], display=False)
    args.update(kw)
    return claims.record("lab.small_x", **args)


def test_record_holds_and_range(capsys):
    c = _record()
    assert c.holds and c.asserted and c.range_text() == "0.4 to 0.6"
    assert "[claim lab.small_x] 0.5 < 1: holds (asserted; seeds 0, 1, 2: 0.4 to 0.6" in capsys.readouterr().out
    assert c.anchor == "claim-lab-small-x"
    json.dumps(c.__dict__)  # JSON-able


def test_record_asserts_every_seed():
    with pytest.raises(AssertionError, match="claim lab.small_x does not hold"):
        _record(values=[0.5, 0.4, 1.2])  # one seed fails the check
    f = _record(values=[0.5, 0.4, 1.2], asserted=False)  # a finding is recorded either way
    assert not f.holds and not f.asserted
    assert _record(value=True, op="==", threshold=True, values=None, seeds=[0]).holds


def test_record_errors():
    with pytest.raises(ValueError, match="id must look like 'lab.claim'"):
        claims.record("NoDot", statement="s", paper="p", value=1, op="<", threshold=2, seeds=[0])
    with pytest.raises(ValueError, match="op must be one of"):
        _record(op="~")
    with pytest.raises(ValueError, match="source must be one of"):
        _record(source="typed")
    with pytest.raises(ValueError, match="statement must be a non-empty string"):
        _record(statement=" ")
    with pytest.raises(ValueError, match="values has 2 entries for 3 seeds"):
        _record(values=[0.1, 0.2])
    with pytest.raises(TypeError, match="op '<' compares numbers"):
        _record(value="a", values=None, seeds=[0])
    with pytest.raises(ValueError, match="seeds must name at least one seed"):
        _record(seeds=[], values=None)


def test_claims_round_trip_through_notebook_outputs():
    c = _record()
    nb = {"cells": [{"cell_type": "markdown", "source": ""},
                    {"cell_type": "code", "outputs": [
                        {"output_type": "display_data", "data": {"text/plain": "x"},
                         "metadata": {claims.MIME: c.__dict__}},
                        {"output_type": "stream", "name": "stdout", "text": "hi"}]}]}
    assert [d["id"] for d in claims.claims_of_notebook(nb)] == ["lab.small_x"]


def test_nbval_plugin_compares_claims():
    from tests.nbtiming import _compare_claims

    a = _record().__dict__
    assert _compare_claims([a], [a]) == ([], 1)
    b = dict(a, value=0.52)
    assert _compare_claims([b], [a]) == ([], 0)  # within 10%: another machine's last digits
    problems, _ = _compare_claims([dict(a, value=0.9)], [a])
    assert "differs from the committed" in problems[0]
    problems, _ = _compare_claims([dict(a, holds=False)], [a])
    assert "holds False != committed True" in problems[0]
    problems, _ = _compare_claims([], [a])
    assert "claim ids" in problems[0]


def test_nbval_plugin_on_another_machine_compares_what_must_not_move():
    from tests.nbtiming import _compare_claims

    a = _record().__dict__
    assert a["machine"]  # the CPU model and torch's CPU kernels
    other = dict(a, machine="another CPU / AVX2", value=0.9)
    assert _compare_claims([other], [a]) == ([], 0)  # values may move on another machine
    finding = dict(_record(values=[0.5, 0.4, 1.2], asserted=False).__dict__)
    assert _compare_claims([dict(finding, machine="x", holds=True)], [finding]) == ([], 1)  # may flip
    problems, _ = _compare_claims([dict(other, threshold=2.0)], [a])
    assert "threshold 2.0 != committed 1.0" in problems[0]
    problems, _ = _compare_claims([dict(other, holds=False)], [a])
    assert "an asserted claim that does not hold" in problems[0]
