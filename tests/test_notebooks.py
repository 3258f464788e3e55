"""The teaching notebooks: committed with outputs, and those outputs are what the
committed code prints (every number the prose quotes in bold appears in them)."""

import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
from execute import execute, missing_quotes, notebooks  # noqa: E402

PATHS = notebooks()


def test_the_seven_notebooks_are_there():
    assert [p.name[:2] for p in PATHS] == ["01", "02", "03", "04", "05", "06", "07"]


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_committed_outputs_back_every_quoted_number(path):
    """Read on the web without running: every code cell ran, and the prose quotes only
    numbers the outputs print."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "run notebooks/execute.py"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    assert missing_quotes(nb) == []


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_runs_top_to_bottom_and_prints_what_the_prose_quotes(path):
    """A fresh run of the committed code prints every number the prose quotes: a code
    change that moves a quoted number fails here until the notebook is run again."""
    nb, _ = execute(path)
    assert missing_quotes(nb) == []
