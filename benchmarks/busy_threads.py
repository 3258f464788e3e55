"""Does ``--threads auto`` cost more than ``--threads 1`` when a core is busy?

Runs ``minilora finetune`` (LoRA, the shift task, 60 steps) as a fresh process with
``--threads auto`` and with ``--threads 1``, alternating, while a helper process keeps
one core busy (lab/busy_core.py); then the same pair on the quiet machine. Prints the
wall time of every run, each one's median, and auto / 1. The wall time includes the
process start and the import (the same for both), so it is what a user waits for.

    python benchmarks/busy_threads.py              # 3 rounds, about 4 minutes on 2 cores
    python benchmarks/busy_threads.py --rounds 5 --steps 60
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from minilora.lab.busy_core import busy_core
from minilora.lab.machine import blas_info, cpu_model, load_average


def finetune_seconds(threads: str, steps: int, out: str) -> float:
    """Wall seconds of one ``minilora finetune`` with ``--threads threads``."""
    cmd = [sys.executable, "-m", "minilora", "finetune", "--steps", str(steps), "--quiet"]
    cmd += ["--threads", threads, "--out", out, "--overwrite"]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def measure(rounds: int, steps: int, out: str) -> dict[str, list[float]]:
    """{threads: [seconds per round]}, the two settings alternating."""
    times: dict[str, list[float]] = {"auto": [], "1": []}
    for _ in range(rounds):
        for threads in times:
            times[threads].append(finetune_seconds(threads, steps, out))
    return times


def report(label: str, times: dict[str, list[float]]) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    runs = "  ".join(
        f"--threads {k}: " + ", ".join(f"{s:.1f}" for s in v) for k, v in times.items()
    )
    print(f"{label}: {runs}")
    print(
        f"{label}: median auto {med['auto']:.1f} s, 1 thread {med['1']:.1f} s, "
        f"auto / 1 = {med['auto'] / med['1']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    blas = blas_info()
    print(
        f"CPU {cpu_model()}, {os.cpu_count()} cores, BLAS kernel {blas.get('kernel')}, "
        f"load {load_average()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "run")
        with busy_core():
            report("one core busy", measure(args.rounds, args.steps, out))
        report("quiet", measure(args.rounds, args.steps, out))
    print(f"load after {load_average()}")


if __name__ == "__main__":
    main()
