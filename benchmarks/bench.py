"""The benchmark as a script: the same code as ``minilora bench`` (minilora/lab/bench.py).

    python benchmarks/bench.py --json benchmarks/results-cpu.json
    python benchmarks/bench.py --device gpu --json benchmarks/results-gpu.json
    python benchmarks/bench.py --help

benchmarks/README.md shows the latest results and how they were made.
"""

from __future__ import annotations

import sys

from minilora.cli.main import main as cli_main


def main(argv: list[str] | None = None) -> int:
    """``minilora bench`` with these arguments (its options: ``--help``)."""
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # the guard also keeps the --busy helper process from rerunning this
    raise SystemExit(main())
