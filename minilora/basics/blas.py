"""How many threads the BLAS library (OpenBLAS, MKL) may use, chosen by measurement.

A training step is many small matrix products. With every core free, two BLAS threads
make a medium step about 1.6 times faster than one; with one of two cores taken by
another program (a browser, a second notebook), the two threads wait for each other
on every product and the step becomes twice as slow as with one thread (measured on
the 2-core development machine: 1.02 s with one thread, 1.9 s with two). The default
trusts the core count; :func:`choose_threads` times the real step instead.

The thread count changes the order of float32 additions inside the library, so results
are bit for bit the same only for the same count: a run records the count it chose, and
a resumed run uses it again. So does the *kernel*: OpenBLAS picks its inner loops for
the CPU it finds (Haswell, SkylakeX, Sandybridge, ...; ``OPENBLAS_CORETYPE`` overrides
the choice), each kernel rounds differently, and hundreds of training steps amplify the
difference. :func:`summary` names both, for every number printed for comparison.

Uses ``threadpoolctl`` (a dependency); where it finds no BLAS it can control (or on
the GPU) every function here is a no-op that says so.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from minilora.basics.checks import positive_int
from minilora.basics.parallel import limited_element_threads, usable_cores


def check_threads(name: str, n: Any) -> int:
    """A thread count this process can really use: 1 to :func:`usable_cores`.

    More threads than cores are refused rather than capped in silence: the count is
    printed and recorded with the run, and it must be the count that was used.
    """
    n = positive_int(name, n)
    cores = usable_cores()
    if n > cores:
        raise ValueError(
            f"{name}={n} is more than the {cores} cores this process may use; "
            f"allowed: 1..{cores} (or auto)"
        )
    return n


def blas_libraries() -> list[dict[str, Any]]:
    """The BLAS libraries loaded in this process: name, version, current threads, and
    the kernel it chose for this CPU (OpenBLAS's ``architecture``, e.g. Haswell or
    SkylakeX: it changes float32 rounding, so numbers are compared per kernel)."""
    return [
        {
            "library": i["internal_api"],
            "version": i.get("version"),
            "threads": i["num_threads"],
            "kernel": i.get("architecture"),
        }
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]


def current_threads() -> int | None:
    """The BLAS thread count now (None when no controllable BLAS is loaded)."""
    libraries = blas_libraries()
    return max(lib["threads"] for lib in libraries) if libraries else None


_NAMES = {"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS"}


def summary(threads: int | None = None) -> str:
    """What a float32 result was computed with, in one line, for comparing numbers:
    "NumPy 2.4.6, OpenBLAS 0.3.31 Haswell kernel, 2 threads". ``threads`` is the count
    the computation used (default: the library's count now)."""
    libraries = blas_libraries()
    if not libraries:
        return f"NumPy {np.__version__}, no BLAS that threadpoolctl can read"
    lib = libraries[0]
    version = ".".join(str(lib["version"] or "?").split(".")[:3])  # 0.3.31.188.0: a wheel build
    kernel = f" {lib['kernel']} kernel" if lib["kernel"] else ""
    n = threads if threads is not None else lib["threads"]
    name = _NAMES.get(lib["library"], lib["library"])
    return f"NumPy {np.__version__}, {name} {version}{kernel}, {n} thread{'s' * (n != 1)}"


@contextlib.contextmanager
def limited_threads(n: int | None) -> Iterator[None]:
    """Within the block, BLAS uses at most ``n`` threads (None: leave it as it is), and
    so does the element-wise work of parallel.py: one count for all of a step's work."""
    if n is None:
        yield
        return
    n = positive_int("threads", n)
    with threadpool_limits(limits=n, user_api="blas"), limited_element_threads(n):
        yield


DECISIVE = 1.25
"""A first round in which one count is this many times slower than the other decides."""


def choose_threads(
    run_once: Callable[[], Any],
    candidates: tuple[int, ...] | None = None,
    repeats: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Time ``run_once`` under each thread count and return the fastest.

    ``run_once`` must leave no trace (the trainer passes a forward and backward whose
    gradients it throws away). The candidates run in increasing order, so the first,
    one thread, is also the warm-up (first-touch page faults, BLAS buffers): a cold
    time can only overstate it. When the first round is decisive (the slowest is
    :data:`DECISIVE` times the fastest) it is the answer; else the candidates
    alternate up to ``repeats`` rounds, each counting its best time. Every call is a
    full forward and backward, and on a busy core a many-thread one costs two or three
    single-thread ones: the measurement used to be a warm-up plus two full rounds, and
    that alone made ``auto`` cost 1.1 to 1.3 times ``--threads 1`` on a 60-step
    finetune (issue 21). Returns {"threads", "seconds": {n: best}, "rounds"}.
    """
    cores = usable_cores()
    candidates = tuple(sorted(set(candidates or {1, cores})))
    if current_threads() is None or len(candidates) == 1:
        return {"threads": None, "seconds": {}, "reason": "no BLAS to control, or one core"}
    best: dict[int, float] = {}
    rounds = 0
    while rounds < max(1, repeats):
        rounds += 1
        for n in candidates:
            with limited_threads(n):
                start = clock()
                run_once()
                elapsed = clock() - start
            best[n] = min(best.get(n, elapsed), elapsed)
        if max(best.values()) >= DECISIVE * min(best.values()):
            break
    return {"threads": min(best, key=best.get), "seconds": best, "rounds": rounds}


def describe(threads: int | None, choice: dict[str, Any] | None = None, device: str = "cpu") -> str:
    """One line for the command line: the count used and, if measured, why."""
    if device == "gpu":
        return "BLAS threads: not used on the GPU (--threads has no effect there)"
    if threads is None:
        return "BLAS threads: the library's default"
    if not choice or not choice.get("seconds"):
        return f"BLAS threads: {threads}"
    timed = ", ".join(f"{n}: {1000 * t:.0f} ms" for n, t in sorted(choice["seconds"].items()))
    return f"BLAS threads: {threads} (a forward and backward took {timed})"
