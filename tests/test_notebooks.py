"""The teaching notebooks: committed with outputs, and those outputs are what the
committed code prints (every number the prose quotes in bold appears in them, and every
result number of the prose, bold or not, is backed by them or by a file the cell cites)."""

import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
from execute import (  # noqa: E402
    execute,
    missing_quotes,
    notebooks,
    prose_numbers,
    quoted_numbers,
    unbacked_numbers,
)

PATHS = notebooks()


def test_the_notebooks_are_there():
    assert [p.name[:2] for p in PATHS] == ["01", "02", "03", "04", "05", "06", "07", "08", "09"]


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_committed_outputs_back_every_quoted_number(path):
    """Read on the web without running: every code cell ran, and the prose quotes only
    numbers the outputs print."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), "run notebooks/execute.py"
    assert not any(o.get("output_type") == "error" for c in code for o in c.outputs)
    assert missing_quotes(nb) == []


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_every_result_number_of_the_prose_is_backed(path):
    """Not only the bold numbers: every number with a decimal point or a percent sign in
    the prose is printed by the notebook (or set in its code), or is in a figure or
    benchmark file the cell cites."""
    assert unbacked_numbers(nbformat.read(path, as_version=4)) == []


def test_what_counts_as_a_result_number():
    prose = (
        "Loss 0.245 after 300 steps, 94.9% exact, $s = 2.0$, `lr=3e-3`, section 7.2 of "
        'the paper ("1.2TB"), **85% to 100%** on 4 blocks, a [link](https://example.org/1.5), '
        "1.49e-08."
    )
    assert prose_numbers(prose) == ["0.245", "94.9%", "1.49e-08"]


def test_an_unbacked_prose_number_is_reported(tmp_path):
    """A number must round from a printed one at the precision written; a cited file
    backs its cell only."""
    nb = _notebook("loss 0.25, 94.9% exact, 3.3 MB", "loss 0.2468, exact 0.949, 3,260,928 bytes\n")
    assert unbacked_numbers(nb, tmp_path) == ["cell 1: 3.3"]  # 0.2468 backs 0.25, 0.949 94.9%
    nb.cells[1].source = "loss 0.26, 3.3 MB (figures/m.json)"
    (tmp_path / "figures").mkdir()
    curve = list(range(20))  # a list of more than 16 numbers backs nothing
    (tmp_path / "figures" / "m.json").write_text(f'{{"bytes": 3260928, "curve": {curve}}}')
    assert unbacked_numbers(nb, tmp_path) == ["cell 1: 0.26"]  # 3,260,928 bytes is 3.3 MB
    nb.cells.append(nbformat.v4.new_markdown_cell("again 3.3 MB, and 17.0 from a long curve"))
    assert unbacked_numbers(nb, tmp_path) == ["cell 1: 0.26", "cell 2: 3.3", "cell 2: 17.0"]


def _notebook(prose, printed):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("...")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=printed)]
    nb.cells = [cell, nbformat.v4.new_markdown_cell(prose)]
    return nb


def test_a_quoted_range_needs_a_printed_value_inside_it():
    """Issue 20: training outcomes move with the BLAS kernel, so the prose quotes them as
    ranges; the check must fail when the value printed before the range falls outside."""
    prose = "LoRA gets **85% to 100%** exact answers, loss **0.15 to 0.35**; **32** arrays."
    inside = "32 arrays\nr=8: exact 94.9% (any kernel: 85% to 100%), loss 0.245 (0.15 to 0.35)\n"
    assert missing_quotes(_notebook(prose, inside)) == []
    assert quoted_numbers(_notebook(prose, inside)) == ["32"]  # a range is not a number
    outside = inside.replace("94.9%", "80.1%").replace("0.245", "0.412")
    assert missing_quotes(_notebook(prose, outside)) == ["85% to 100%", "0.15 to 0.35"]
    unit = inside.replace("94.9%", "0.949")  # a fraction is not a percentage
    assert missing_quotes(_notebook(prose, unit)) == ["85% to 100%"]
    bare = "32 arrays\nexact 94.9%, loss 0.245\n"  # the value alone does not say the range
    assert missing_quotes(_notebook(prose, bare)) == ["85% to 100%", "0.15 to 0.35"]
    apart = "32 arrays\nexact 94.9%\n(85% to 100%), 0.245 (0.15 to 0.35)\n"  # not one line
    assert missing_quotes(_notebook(prose, apart)) == ["85% to 100%"]


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_runs_top_to_bottom_and_prints_what_the_prose_quotes(path):
    """A fresh run of the committed code prints every number the prose quotes, and a value
    inside every range it quotes: a code change that moves a quoted number fails here until
    the notebook is run again. Run it under two BLAS kernels (OPENBLAS_CORETYPE=Haswell,
    =Sandybridge, ... where the CPU has them) before changing a range."""
    nb, _ = execute(path)
    assert missing_quotes(nb) == []
