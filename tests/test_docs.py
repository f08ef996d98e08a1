"""README.md holds the tables generated from the code (fastkd/_docs.py) verbatim."""

from pathlib import Path

import pytest

from fastkd import _docs

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("marker, table", [
    ("<!-- the table below is fastkd._docs.defaults_table(); tests/test_docs.py checks it -->", _docs.defaults_table),
])
def test_readme_table_is_generated(marker, table):
    text = README.read_text()
    assert marker in text, f"README.md lost the marker {marker!r}"
    after = text.split(marker, 1)[1].lstrip("\n")
    expected = table()
    assert after.startswith(expected + "\n"), (
        "README.md's table is out of date; paste the output of "
        f"`python -c 'import fastkd._docs as d; print(d.{table.__name__}())'`:\n{expected}")
