"""mini.table: formatted cells, row labels, and the errors it promises."""
import pytest

import mini

ROWS = [
    {"method": "AdamW", "lr": 2e-3, "ppl": 2.7712, "bytes": 6532096},
    {"method": "GaLore", "lr": 1e-2, "ppl": 2.343, "bytes": 2173952, "svds": 112},
]


def test_cells_are_formatted_and_missing_values_empty():
    t = mini.table(ROWS, formats={"lr": ".0e", "ppl": ".3f", "bytes": ","}, index="method")
    assert list(t.columns) == ["lr", "ppl", "bytes", "svds"]
    assert t.loc["AdamW"].tolist() == ["2e-03", "2.771", "6,532,096", ""]
    assert t.loc["GaLore", "svds"] == "112"
    assert "<table" in t._repr_html_()


def test_callable_format_and_no_index():
    t = mini.table(ROWS, formats={"ppl": lambda v: f"{v:.1f} ppl"})
    assert t["ppl"].tolist() == ["2.8 ppl", "2.3 ppl"]
    assert t.index.tolist() == [0, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rows": []}, "rows must be a non-empty sequence"),
        ({"rows": {"a": 1}}, "rows must be a non-empty sequence"),
        ({"rows": ROWS, "formats": {"loss": ".2f"}}, r"formats names columns \['loss'\]"),
        ({"rows": ROWS, "index": "name"}, "index='name' is not a column"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mini.table(**kwargs)


def test_a_row_that_is_not_a_mapping():
    with pytest.raises(TypeError, match=r"rows\[1\] must be a mapping"):
        mini.table([{"a": 1}, [1, 2]])
