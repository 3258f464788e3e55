"""The benchmark as a script: the same code as ``minilora bench`` (minilora/bench.py).

    python benchmarks/bench.py --json benchmarks/results-cpu.json
    python benchmarks/bench.py --device gpu --json benchmarks/results-gpu.json
    python benchmarks/bench.py --help

benchmarks/README.md shows the latest results and how they were made.
"""

from __future__ import annotations

import argparse

from minilora.lab import bench_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="minilora speed and memory: LoRA vs full fine-tuning, minilora vs PyTorch"
    )
    bench_report.add_arguments(parser)
    return bench_report.run(parser.parse_args(argv))


if __name__ == "__main__":  # the guard also keeps the --busy helper process from rerunning this
    raise SystemExit(main())
