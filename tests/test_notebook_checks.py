"""Every notebook carries at least two outputs nbval compares (``# NBVAL_CHECK_OUTPUT``), and they do not depend on
the profile: `make test` runs the notebooks at ``smoke`` and compares with outputs committed at ``demo``."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb"))
PROFILE_WORDS = ("profile", "cfg", "make_config")  # a checked cell that reads these would change with the profile


def _checked(path: Path) -> list[dict]:
    cells = json.loads(path.read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).startswith("# NBVAL_CHECK_OUTPUT")]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_each_notebook_has_two_checked_profile_independent_outputs(path):
    checked = _checked(path)
    assert len(checked) >= 2, f"{path.name}: {len(checked)} cells marked # NBVAL_CHECK_OUTPUT, want at least 2"
    for cell in checked:
        source = "".join(cell["source"])
        assert cell["outputs"], f"{path.name}: a checked cell has no committed output to compare"
        assert cell["execution_count"] is not None, f"{path.name}: nbval fails a cell with outputs but no count"
        assert not any(word in source for word in PROFILE_WORDS), f"{path.name}: checked cell reads the profile"


def test_there_are_five_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05"]
