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

from minilora.basics.backend import is_device_array, xp_of
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


_threads: int | None = None  # None: every usable core (as a BLAS library's own default)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def element_threads() -> int:
    """The threads :func:`by_rows` uses now (set with :func:`limited_element_threads`)."""
    return _threads if _threads is not None else usable_cores()


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
    """``a`` as (items, *last ndim axes): the leading axes flattened (a view when
    ``a`` is contiguous)."""
    return a.reshape(-1, *a.shape[a.ndim - ndim :]) if a.ndim > ndim else a[None]


def by_rows(
    fn: Callable[..., Any], arrays: Array | tuple[Array, ...], *args: Any, ndim: int = 1
) -> Any:
    """``fn(*arrays, *args)`` computed on blocks of rows, on :func:`element_threads` threads.

    ``arrays``: one array or a tuple of arrays with the same leading shape N...; a
    "row" is one item of their last ``ndim`` axes (a vector for ``ndim=1``, a (T, T)
    score matrix for ``ndim=2``). ``args`` go to every call unchanged (a weight, eps).
    ``fn`` must treat each row on its own; it returns an array or a tuple of arrays,
    each (rows of the block, ...), or None when it works in place on its inputs.
    Returns what ``fn(*arrays, *args)`` would, outputs shaped (N..., ...): bit for bit.
    """
    arrays = arrays if isinstance(arrays, tuple) else (arrays,)
    first = arrays[0]
    if is_device_array(first) or first.size < MIN_PARALLEL_ELEMENTS or first.ndim < ndim:
        return fn(*arrays, *args)  # CuPy: its own kernels use the GPU; small: not worth it
    lead = first.shape[: first.ndim - ndim]
    rows = [_leading(a, ndim) for a in arrays]
    n = rows[0].shape[0]
    per_block = max(1, BLOCK_BYTES // max(1, rows[0][0].nbytes))
    starts = list(range(0, n, per_block))
    if len(starts) == 1:
        return fn(*arrays, *args)

    def run(start: int) -> Any:
        return fn(*(r[start : start + per_block] for r in rows), *args)

    result = run(starts[0])  # the first block tells the outputs' number, dtype, shape
    single = result is not None and not isinstance(result, tuple)
    parts = () if result is None else ((result,) if single else result)
    outs = tuple(_empty_like_rows(p, n) for p in parts)

    def store(start: int, part: Any) -> None:
        for out, p in zip(outs, (part,) if single else part or (), strict=True):
            out[start : start + p.shape[0]] = p

    store(starts[0], result)

    def share(my_starts: list[int]) -> None:
        for start in my_starts:
            store(start, run(start))

    rest = starts[1:]
    k = min(element_threads(), len(rest))
    groups = [rest[i * len(rest) // k : (i + 1) * len(rest) // k] for i in range(k)]
    futures = [_executor().submit(share, g) for g in groups[1:]]
    share(groups[0])  # this thread takes the first share
    for f in futures:
        f.result()  # re-raises an error of a worker here
    shaped = tuple(o.reshape(*lead, *o.shape[1:]) for o in outs)
    return None if result is None else (shaped[0] if single else shaped)


def _empty_like_rows(part: Array, n: int) -> Array:
    """An uninitialised (n, *part.shape[1:]) array of part's dtype, in its namespace."""
    return xp_of(part).empty((n, *part.shape[1:]), dtype=part.dtype)
