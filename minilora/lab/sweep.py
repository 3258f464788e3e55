"""Many independent runs (a sweep over rank, alpha, seeds...), as fast as the machine allows.

On the 2-core development machine, four short LoRA runs of the built-in base took
12.5 s as two processes at a time with one BLAS thread each, against 18.6 s one at a
time with two threads (0.67x): a training step is many small products and element-wise
passes, which one thread per run keeps busy without the threads waiting on each other.
So :func:`run_sweep` runs one process per usable core, each with one BLAS thread.

Every run uses one BLAS thread whether the sweep runs in parallel or not, so its
numbers do not depend on how many processes the machine allowed (blas.py: the thread
count changes float32 rounding).
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any

from minilora.basics.backend import resolve_device
from minilora.basics.blas import limited_threads, usable_cores
from minilora.basics.checks import positive_int
from minilora.training.train import progress_bar


def _one(job: Callable[..., Any], settings: dict[str, Any]) -> Any:
    with limited_threads(1):
        return job(**settings)


def run_sweep(
    job: Callable[..., Any],
    settings: Sequence[dict[str, Any]],
    processes: int | None = None,
    progress: bool = True,
    desc: str = "sweep",
) -> list[Any]:
    """[job(**s) for s in settings], in order, in up to ``processes`` processes.

    ``job`` must be a module-level function (processes are started with "spawn", which
    imports it by name), and what it returns must be picklable: plain records. Default
    ``processes``: the usable cores; 1 runs everything in this process.
    """
    settings = list(settings)
    processes = usable_cores() if processes is None else positive_int("processes", processes)
    if resolve_device() == "gpu":  # the runs would share one GPU: one at a time there
        processes = 1
    processes = min(processes, len(settings)) or 1
    bar = progress_bar(progress, total=len(settings), desc=desc, unit="run")
    try:
        if processes == 1:
            results = []
            for s in settings:
                results.append(_one(job, s))
                bar.update(1)
            return results
        # spawn, not fork: a forked child would inherit this process's BLAS threads
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pending = [pool.apply_async(_one, (job, s)) for s in settings]
            results = []
            for p in pending:
                results.append(p.get())
                bar.update(1)
            pool.close()  # workers exit on their own: terminating them leaks semaphores
            pool.join()
            return results
    finally:
        bar.close()
