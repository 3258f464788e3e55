"""The exercises inside the notebooks: every stub is followed by its check, nothing else
uses the learner's function, the committed notebook shows "not implemented yet" at each
check, and with the worked solutions of notebooks/solutions/ filled in every check passes."""

import ast
import sys
from pathlib import Path

import nbformat
import pytest

import minilora as ml

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))
from execute import (  # noqa: E402
    check_results,
    execute_filled,
    exercise_name,
    filled,
    notebooks,
    tagged,
)

PATHS = [p for p in notebooks() if p.name[:2] != "07"]  # 07 (the GPU) has no exercises
REQUIRED = {"01", "02", "03", "04", "05", "06", "08"}  # at least two exercises each


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _exercises(nb) -> list[str]:
    return [exercise_name(c) for c in _code(nb) if tagged(c, "exercise")]


def _names_used(source: str) -> set[str]:
    """Every identifier a cell reads (strings such as "lora_forward" are not reads)."""
    return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}


def test_the_required_notebooks_are_there():
    assert REQUIRED <= {p.name[:2] for p in PATHS}


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_each_stub_is_followed_by_its_check_and_nothing_else_uses_it(path):
    nb = nbformat.read(path, as_version=4)
    names = _exercises(nb)
    if path.name[:2] in REQUIRED:
        assert len(names) >= 2, f"{path.name} needs at least two exercise cells"
    assert len(set(names)) == len(names)
    code = _code(nb)
    for k, cell in enumerate(code):
        if tagged(cell, "check"):  # only ever right after its stub
            assert k > 0 and tagged(code[k - 1], "exercise")
        if not tagged(cell, "exercise"):
            continue
        name = exercise_name(cell)
        assert ml.exercises.get(name).notebook == path.name[:2]
        assert code[k + 1].source.strip() == f'ml.exercises.check("{name}", {name})'
        assert tagged(code[k + 1], "check")
        # the stub itself: the grader calls it "not implemented yet", it does not raise
        namespace: dict = {}
        exec(cell.source, namespace)
        result = ml.exercises.check(name, namespace[name], verbose=False)
        assert not result.passed and result.message.startswith("not implemented yet")
        # the rest of the notebook runs on the library's code, whatever the learner wrote
        users = [c for c in code if c is not code[k + 1] and c is not cell]
        assert not [c.source for c in users if name in _names_used(c.source)]


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_committed_checks_say_not_implemented_yet_with_the_hint(path):
    nb = nbformat.read(path, as_version=4)
    results = check_results(nb)
    assert [name for name, _, _ in results] == _exercises(nb), "run notebooks/execute.py"
    for name, passed, text in results:
        assert passed is False
        assert "not implemented yet" in text and ml.exercises.get(name).hint in text


def test_the_filled_notebook_is_cut_to_setup_exercises_and_checks():
    path = NOTEBOOKS / "01_lora_in_one_layer.ipynb"
    nb = filled(path)
    setup, *rest = nb.cells
    assert tagged(setup, "setup") and "import minilora as ml" in setup.source
    assert [("exercise" if tagged(c, "exercise") else "check") for c in rest] == [
        "exercise",
        "check",
        "exercise",
        "check",
    ]
    for cell in rest[::2]:  # the worked solution, not the stub
        assert "NotImplementedError" not in cell.source
        assert f"def {exercise_name(cell)}(" in cell.source


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_with_the_solutions_filled_in_every_check_passes(path):
    names = _exercises(nbformat.read(path, as_version=4))
    if not names:
        pytest.skip(f"{path.name} has no exercise cells yet")
    nb, _ = execute_filled(path)
    results = check_results(nb)
    assert [name for name, _, _ in results] == names
    failed = [text for _, passed, text in results if passed is not True]
    assert not failed, "\n\n".join(failed)
