"""Run the teaching notebooks top to bottom and keep their outputs.

    python notebooks/execute.py                  # every notebook, in place
    python notebooks/execute.py 01_lora_in_one_layer.ipynb

Each notebook runs in a fresh Python kernel from the notebooks/ folder, so what it
prints is what a reader gets from the committed code. The run time of each is printed
(the target is about 90 s on 2 cores). tests/test_notebooks.py runs the same function
and checks that every number the prose quotes (written in bold, like **0.115**) is
printed by the notebook's own outputs, and that every range it quotes for a training
outcome (like **85% to 100%**, for digits that depend on the BLAS kernel) holds there.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
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


def output_text(nb: nbformat.NotebookNode) -> str:
    """Everything the code cells printed or displayed as text."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                parts.append(out["text"])
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


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


if __name__ == "__main__":
    chosen = [HERE / name for name in sys.argv[1:]] or notebooks()
    for path in chosen:
        nb, seconds = execute(path)
        nbformat.write(nb, path)
        missing = missing_quotes(nb)
        print(
            f"{path.name}: {seconds:.1f} s"
            + (f"; quoted but not printed: {missing}" if missing else "")
        )
