"""Run the teaching notebooks top to bottom and keep their outputs.

    python notebooks/execute.py                  # every notebook, in place
    python notebooks/execute.py 01_lora_in_one_layer.ipynb
    python notebooks/execute.py --filled 01_lora_in_one_layer.ipynb   # the exercises solved

Each notebook runs in a fresh Python kernel from the notebooks/ folder, so what it
prints is what a reader gets from the committed code. The run time of each is printed
(the target is about 90 s on 2 cores). tests/test_notebooks.py runs the same function
and checks that every number the prose quotes (written in bold, like **0.115**) is
printed by the notebook's own outputs, and that every range it quotes for a training
outcome (like **85% to 100%**, for digits that depend on the BLAS kernel) holds there.

Exercises. A cell tagged ``exercise`` is a stub the learner fills in: it defines one
function named after its exercise (``def lora_forward(...)``) that raises
NotImplementedError. The cell tagged ``check`` after it ends with
``ml.exercises.check("lora_forward", lora_forward)``, whose last line of output is the
result, ``Result('lora_forward', passed=False)``. ``--filled`` (``execute_filled``) runs
a cheap copy of a notebook: only its ``setup`` cells (the first code cell when none is
tagged), its exercise cells, each replaced by the worked solution from
notebooks/solutions/, and its check cells; it writes nothing. tests/test_notebook_exercises.py
requires every check to pass there, and to say "not implemented yet" in the committed
notebook.
"""

from __future__ import annotations

import ast
import copy
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
SOLUTIONS = HERE / "solutions"
RESULT = re.compile(r"Result\('(\w+)', passed=(True|False)\)")
"""The last line a check cell shows: the repr of what ``ml.exercises.check`` returned."""
NUMBER = r"(?<![0-9.,])[-+]?[0-9][0-9,]*(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?%?"
QUOTED = re.compile(rf"\*\*({NUMBER})\*\*")
"""A number the prose quotes from the outputs: bold, like **0.115**, **98.8%** or **4,096**."""
RANGE = re.compile(rf"\*\*({NUMBER}) to ({NUMBER})\*\*")
"""A training outcome the prose quotes as a range, like **85% to 100%**: its digits depend
on the BLAS kernel (one per CPU type), which rounds float32 differently, and hundreds of
training steps amplify that. An output line must print the value and then the same range,
with no digit between ("exact 94.9% (any BLAS kernel: 85% to 100%)"), the value inside."""


def notebooks() -> list[Path]:
    return sorted(HERE.glob("[0-9][0-9]_*.ipynb"))


def execute(path: Path, timeout: int = 600) -> tuple[nbformat.NotebookNode, float]:
    """Run ``path`` in a fresh kernel; returns the notebook with outputs and the seconds."""
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    return nb, time.perf_counter() - start


def tagged(cell: nbformat.NotebookNode, tag: str) -> bool:
    return tag in cell.get("metadata", {}).get("tags", [])


def exercise_name(cell: nbformat.NotebookNode) -> str:
    """The exercise an ``exercise`` cell is the stub of: the one function it defines."""
    names = [n.name for n in ast.parse(cell.source).body if isinstance(n, ast.FunctionDef)]
    if len(names) != 1:
        raise ValueError(f"an exercise cell defines one function, this one {names}:\n{cell.source}")
    return names[0]


def solution_source(notebook: Path, name: str) -> str:
    """The worked solution of exercise ``name`` as a learner would type it into the cell:
    the top-level imports and constants of notebooks/solutions/<notebook>.py, then the
    function itself."""
    path = SOLUTIONS / f"{Path(notebook).stem}.py"
    text = path.read_text()
    body = ast.parse(text).body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the module docstring
    preamble = [ast.get_source_segment(text, n) for n in body if not isinstance(n, ast.FunctionDef)]
    functions = [n for n in body if isinstance(n, ast.FunctionDef) and n.name == name]
    if not functions:
        raise ValueError(f"{path} defines no function {name!r}")
    return "\n".join([*preamble, "", ast.get_source_segment(text, functions[0])]).strip() + "\n"


def filled(path: Path) -> nbformat.NotebookNode:
    """The notebook cut to its setup, exercise and check cells, the exercises solved."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    setup = [c for c in code if tagged(c, "setup")] or code[:1]
    keep = []
    for cell in code:
        if tagged(cell, "exercise"):
            cell = copy.deepcopy(cell)
            cell.source = solution_source(path, exercise_name(cell))
        elif not (tagged(cell, "check") or any(cell is c for c in setup)):
            continue
        keep.append(cell)
    nb.cells = keep
    return nb


def execute_filled(path: Path, timeout: int = 600) -> tuple[nbformat.NotebookNode, float]:
    """Run :func:`filled` in a fresh kernel; returns the notebook with outputs and the seconds."""
    nb = filled(path)
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}
    ).execute()
    return nb, time.perf_counter() - start


def check_results(nb: nbformat.NotebookNode) -> list[tuple[str, bool | None, str]]:
    """(exercise, passed, what it printed) for every check cell, in order; passed is
    None when the cell shows no result line."""
    found = []
    for cell in nb.cells:
        if cell.cell_type == "code" and tagged(cell, "check"):
            text = cell_text(cell)
            m = RESULT.findall(text)
            name, passed = m[-1] if m else (None, None)
            found.append((name, None if passed is None else passed == "True", text))
    return found


def cell_text(cell: nbformat.NotebookNode) -> str:
    """Everything one code cell printed or displayed as text."""
    parts = []
    for out in cell.get("outputs", []):
        if "text" in out:
            parts.append(out["text"])
        parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def output_text(nb: nbformat.NotebookNode) -> str:
    """Everything the code cells printed or displayed as text."""
    return "\n".join(cell_text(cell) for cell in nb.cells)


def quoted_numbers(nb: nbformat.NotebookNode) -> list[str]:
    """The bold numbers of the Markdown cells."""
    return [
        m for cell in nb.cells if cell.cell_type == "markdown" for m in QUOTED.findall(cell.source)
    ]


def quoted_ranges(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    """The bold ranges of the Markdown cells, as (low, high)."""
    return [
        m for cell in nb.cells if cell.cell_type == "markdown" for m in RANGE.findall(cell.source)
    ]


def _number(text: str) -> float:
    return float(text.replace(",", "").rstrip("%"))


def range_backed(text: str, low: str, high: str) -> bool:
    """Some line of ``text`` prints a value inside [low, high], in the same unit (percent
    or not), and then the range itself."""
    printed = re.compile(rf"({NUMBER})[^0-9\n]*{re.escape(f'{low} to {high}')}")
    return any(
        v.endswith("%") == low.endswith("%") == high.endswith("%")
        and _number(low) <= _number(v) <= _number(high)
        for v in printed.findall(text)
    )


def missing_quotes(nb: nbformat.NotebookNode) -> list[str]:
    """Quoted numbers that no output of the notebook prints, and quoted ranges that no
    output line backs with a value inside them."""
    text = output_text(nb)
    missing = [q for q in quoted_numbers(nb) if q not in text]
    return missing + [
        f"{low} to {high}" for low, high in quoted_ranges(nb) if not range_backed(text, low, high)
    ]


# ---------------------------------------------------------------- every number of the prose
RESULT_NUMBER = re.compile(r"(?<![\w.,])[-+]?[0-9][0-9,]*(?:\.[0-9]+(?:e[-+]?[0-9]+)?%?|%)(?![\w])")
"""A result number in the prose: one with a decimal point or a percent sign, like 0.83,
2370.7, 1.49e-08 or 85%. Integers (counts, sizes, section numbers, years) are left out:
the bold ones among them are checked by :func:`missing_quotes`."""
NOT_PROSE = re.compile(
    r"\$\$.*?\$\$|\$[^$\n]+\$|```.*?```|`[^`\n]*`|\]\([^)]*\)|\*\*[^*\n]+ to [^*\n]+\*\*"
    r'|"[^"\n]*"|\b(?:[Ss]ection|Table|Eq\.|[Ff]igure)s? [0-9.]+',
    re.DOTALL,
)
"""What is not prose for the check: equations ($...$, $$...$$), code (`...`), link targets,
the bold ranges :func:`range_backed` checks, quotations ("3x", a paper's words) and the
numbers of sections, tables, equations and figures. A setting written in a code span,
like `lr=3e-3`, or a version number, like `11.8`, is therefore not a result."""
CITED = re.compile(r"\b((?:figures|benchmarks)/[\w.-]+\.(?:json|md))\b")
"""A file a Markdown cell cites, like figures/rank_sweep.json or figures/README.md (the
figures' write-up): its numbers back the cell's prose (results of runs too long to repeat
in a notebook)."""
ROOT = HERE.parent


def prose_numbers(source: str) -> list[str]:
    """The result numbers of one Markdown cell, in order."""
    return RESULT_NUMBER.findall(NOT_PROSE.sub(" ", source))


def _json_numbers(path: Path) -> list[float]:
    """The numbers of a JSON file, leaving out lists of more than 16 numbers (loss curves, the
    steps of a timing): with thousands of values, some would round to any number."""
    import json

    found: list[float] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            numbers = [v for v in value if isinstance(v, (int, float))]
            if len(numbers) <= 16:  # not curves: they would back anything
                for v in value:
                    walk(v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            found.append(float(value))

    walk(json.loads(path.read_text()))
    return found


def _file_numbers(path: Path) -> list[float]:
    if path.suffix == ".json":
        return _json_numbers(path)
    return _text_numbers(path.read_text())


def _text_numbers(text: str) -> list[float]:
    found = []
    for token in re.findall(NUMBER, text):
        try:
            found.append(_number(token))
        except ValueError:  # "1,2" read as one token
            continue
    return found


def number_backed(quoted: str, values: list[float], scales: tuple[float, ...]) -> bool:
    """Some value, times one of ``scales``, rounds to ``quoted`` at the precision quoted
    (3.26 backs 3.3 and 0.949 backs 94.9% with scale 100; 3.36 backs neither)."""
    from decimal import Decimal

    digits = quoted.replace(",", "").rstrip("%").lstrip("+")
    target = float(digits)
    half = 0.5 * 10.0 ** Decimal(digits).as_tuple().exponent
    return any(abs(v * k - target) <= half * (1 + 1e-9) for v in values for k in scales)


def unbacked_numbers(nb: nbformat.NotebookNode, root: Path = ROOT) -> list[str]:
    """The prose's result numbers that neither the notebook's code cells (their outputs,
    and their sources for the settings) nor a file the cell cites back, as "cell i: n".
    A percentage may also be backed by a fraction (0.949 for 94.9%); a cited file's
    numbers may also be scaled to the units prose uses (1e-3, 1e-6, 1e-9: k, MB, GB)."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    local = _text_numbers(output_text(nb) + "\n" + "\n".join(c.source for c in code))
    missing = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "markdown":
            continue
        cited = [v for f in CITED.findall(cell.source) for v in _file_numbers(root / f)]
        for quoted in prose_numbers(cell.source):
            pct = (100.0,) if quoted.endswith("%") else ()
            if not (
                number_backed(quoted, local, (1.0, *pct))
                or number_backed(quoted, cited, (1.0, 1e-3, 1e-6, 1e-9, *pct))
            ):
                missing.append(f"cell {i}: {quoted}")
    return missing


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--filled"]:  # the exercises solved: print each check's verdict
        failed = 0
        for path in [HERE / name for name in args[1:]] or notebooks():
            nb, seconds = execute_filled(path)
            results = check_results(nb)
            failed += sum(passed is not True for _, passed, _ in results)
            verdicts = ", ".join(f"{n}: {'passed' if ok else 'FAILED'}" for n, ok, _ in results)
            print(f"{path.name} (filled): {seconds:.1f} s; {verdicts or 'no exercises'}")
        sys.exit(1 if failed else 0)
    chosen = [HERE / name for name in args] or notebooks()
    for path in chosen:
        nb, seconds = execute(path)
        nbformat.write(nb, path)
        missing, unbacked = missing_quotes(nb), unbacked_numbers(nb)
        print(
            f"{path.name}: {seconds:.1f} s"
            + (f"; quoted but not printed: {missing}" if missing else "")
            + (f"; prose numbers not backed: {unbacked}" if unbacked else "")
        )
