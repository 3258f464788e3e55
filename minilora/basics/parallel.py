"""Element-wise work on all cores: row blocks of a large array on a small thread pool.

NumPy runs every ufunc (``x * x``, ``tanh``, ``exp``, a ``mean`` over the last axis) on
one core, one pass over memory each. PyTorch runs the same ops as fused kernels on all
cores. The gap grows with the core count and with a CPU's memory latency: on a
2-core machine GELU, layer norm and softmax took 3 to 4.5 times longer on one CPU
than on another (issue 21). Two things close part of it, without changing one line
of the maths:

- **Threads.** A row-wise op (each output row depends on its own input row only) can
  run on blocks of rows at the same time. NumPy releases the GIL inside its ufunc
  loops, so Python threads really run in parallel there.
- **Cache-sized blocks.** An op of five passes over a 6 MB array reads and writes
  main memory five times; cut into blocks of a few hundred kilobytes, each block's
  five passes stay in the core's cache and memory is touched about once.

:func:`by_rows` does both. Each row's arithmetic is exactly what the op does on the
whole array (the same ufuncs, the same order along the row), so the result is
**bit for bit** the serial one, for any number of threads (tests/test_parallel.py).
Reductions *across* rows (a bias gradient, a sum over the batch) stay with the
caller: splitting them would change the order of their additions.

The thread count is the BLAS's: :func:`blas.limited_threads` sets both, so one
``--threads`` (or ``auto``'s measurement) decides all the CPU work of a step. On
CuPy and for arrays under :data:`MIN_PARALLEL_ELEMENTS` it simply calls the op.
This module is the only place that owns threads for element-wise work.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from minilora.basics.backend import is_device_array
from minilora.basics.checks import positive_int

Array = Any

MIN_PARALLEL_ELEMENTS = 1 << 16
"""Below this many elements an op runs as one call: a block's dispatch (tens of
microseconds) would cost more than the work it shares."""

BLOCK_BYTES = 1 << 18
"""The size of one block of input, 256 KiB: with an op's two or three temporaries of
the same size it stays in a core's L2 cache (512 KiB to 2 MiB on current x86 CPUs)."""


def usable_cores() -> int:
    """The cores this process may run on (the affinity mask, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Where a BLAS library reads its default thread count, first found first."""


def default_threads() -> int:
    """The count without a limit: the BLAS library's own default, so that both kinds of
    work agree. OpenBLAS and MKL read it from the environment (``OPENBLAS_NUM_THREADS=1
    minilora bench`` measures one thread), else use every core; capped at the cores."""
    for name in THREAD_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return min(int(value), usable_cores())
    return usable_cores()


_threads: int | None = None  # None: default_threads()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def element_threads() -> int:
    """The threads :func:`by_rows` uses now (set with :func:`limited_element_threads`)."""
    return _threads if _threads is not None else default_threads()


@contextlib.contextmanager
def limited_element_threads(n: int | None) -> Iterator[None]:
    """Within the block, :func:`by_rows` uses ``n`` threads (None: leave it as it is).

    blas.py's ``limited_threads`` calls this, so BLAS and element-wise work share one
    count; call it directly only to vary the element-wise threads alone.
    """
    global _threads
    if n is None:
        yield
        return
    n = positive_int("threads", n)
    before, _threads = _threads, n
    try:
        yield
    finally:
        _threads = before


def _executor() -> ThreadPoolExecutor:
    """The pool, made on first use with one worker per core but this one (the calling
    thread does a share of every op itself)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(1, usable_cores() - 1), thread_name_prefix="minilora-rows"
            )
        return _pool


def _leading(a: Array, ndim: int) -> Array:
    """``a`` as (items, *last ndim axes): the leading axes flattened (a view, as ``a`` is
    C-contiguous)."""
    return a.reshape(-1, *a.shape[a.ndim - ndim :]) if a.ndim > ndim else a[None]


def by_rows(fn: Callable[..., None], arrays: tuple[Array, ...], *args: Any, ndim: int = 1) -> None:
    """``fn(*arrays, *args)``, run on blocks of rows on :func:`element_threads` threads.

    ``arrays``: the inputs and the outputs, all with the same leading shape N...; the
    caller allocates the outputs (``xp.empty``) and ``fn`` writes its results into
    them (``out=``, ``*=``), row by row: no row may read another. A "row" is one item
    of the last ``ndim`` axes (a vector for ``ndim=1``, a (T, T) matrix for ``ndim=2``).
    ``args`` go to every call unchanged (a weight, eps). Writing into the caller's
    arrays, instead of returning blocks to be joined, saves a copy of every output.

    One call on the whole arrays (the serial path) on CuPy, under
    :data:`MIN_PARALLEL_ELEMENTS`, or when an array is not C-contiguous (a block of it
    would be a copy, and writes into a copy are lost).
    """
    first = arrays[0]
    if (
        is_device_array(first)
        or first.size < MIN_PARALLEL_ELEMENTS
        or first.ndim < ndim
        or not all(a.flags.c_contiguous for a in arrays)
    ):
        fn(*arrays, *args)  # CuPy: its own kernels use the GPU; small: not worth a thread
        return
    rows = [_leading(a, ndim) for a in arrays]
    n = rows[0].shape[0]
    per_block = max(1, BLOCK_BYTES // max(1, rows[0][0].nbytes))
    starts = list(range(0, n, per_block))
    if len(starts) == 1:
        fn(*arrays, *args)  # one block: the arrays as they are
        return
    k = min(element_threads(), len(starts))
    shares = [starts[i * len(starts) // k : (i + 1) * len(starts) // k] for i in range(k)]

    def run(my_starts: list[int]) -> None:
        for start in my_starts:
            fn(*(r[start : start + per_block] for r in rows), *args)

    futures = [_executor().submit(run, share) for share in shares[1:]]
    try:
        run(shares[0])  # this thread takes the first share
    finally:
        for f in futures:
            f.result()  # waits for every block, and re-raises a worker's error here
