"""Wall-clock timing: one call, and several callables alternating round by round.

Timings are medians because a step's time has a long right tail (the OS, the
allocator); alternating the runs step by step spreads any slow spell of the machine
over all of them instead of one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any


def wall_seconds(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """Wall time of ``fn()``; device work is waited for on both sides of the timer."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def _summary(seconds: Sequence[float]) -> dict[str, Any]:
    ms = [1e3 * s for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "times_ms": ms}


def time_alternately(
    runs: dict[str, Callable[[], Any]],
    steps: int,
    warmup: int,
    sync: Callable[[], None],
    settle: float = 0.0,
) -> dict[str, dict[str, Any]]:
    """Run every callable once per round, in turn, ``warmup`` + ``steps`` rounds.

    Returns per name the median, minimum and all ``steps`` timed durations in ms.
    Alternating (instead of all steps of one, then the other) exposes every run to the
    same state of the machine: the fair way to compare them in one process.
    ``settle``: seconds of idle time before each run. Two libraries alternating on few
    cores need it: OpenBLAS's and PyTorch's worker threads spin for a while after their
    work before they sleep, and would take the next run's cores (on 2 cores this
    doubled the small configuration's step times).
    """
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(warmup + steps):
        for name, fn in runs.items():
            if settle:
                time.sleep(settle)
            elapsed = wall_seconds(fn, sync)
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: _summary(t) for name, t in times.items()}
