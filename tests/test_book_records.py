"""The generated records of the book agree with what produced them: the claims page with the
notebooks' claim outputs, the README's time table with bench/results/timing.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mini.claims import claims_of_notebook
from tools import claims_page, timing

ROOT = Path(__file__).resolve().parents[1]
LABS = sorted((ROOT / "labs").rglob("*.ipynb"))


def test_claims_page_matches_the_notebooks():
    page = ROOT / claims_page.PAGE
    assert page.read_text() == claims_page.render(ROOT), "run `make claims` (tools/claims_page.py --write)"


@pytest.mark.parametrize("path", LABS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_lab_records_its_claims(path):
    claims = claims_of_notebook(json.loads(path.read_text()))
    assert claims, "a lab records at least one claim with mini.claims.record"
    ids = [c["id"] for c in claims]
    assert len(ids) == len(set(ids)), f"a claim id is recorded twice: {ids}"
    for c in claims:
        assert c["asserted"] is False or c["holds"], f"{c['id']}: an asserted claim that does not hold"
        assert c["seeds"], c["id"]


def test_claim_ids_are_unique_in_the_book():
    ids = [c["id"] for p in LABS for c in claims_of_notebook(json.loads(p.read_text()))]
    assert len(ids) == len(set(ids))


def test_readme_time_table_is_generated_from_the_record():
    if not timing.RECORD.exists():
        pytest.skip("no committed timing record yet (make test, then make timing)")
    rec = json.loads(timing.RECORD.read_text())
    assert timing._readme_with(timing.table(rec)) == timing.README.read_text(), "run `make timing`"
    assert set(rec["notebooks"]) <= {p.relative_to(ROOT).as_posix() for p in timing.notebooks()}


def test_parts_come_from_the_table_of_contents():
    assert timing.part_of("labs/welore/compression.ipynb") == "Part II"
    assert timing.part_of("labs/cogo/constructions.ipynb") == "Part I"
    assert timing.part_of("labs/nowhere.ipynb") == "not in the book"
