"""A helper process that keeps one core busy: a shared machine, on purpose."""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator
from typing import Any


def _spin(started: Any, stop: Any) -> None:
    """Keep one core busy until ``stop`` is set (runs in the helper process)."""
    started.set()
    while not stop.is_set():
        for _ in range(20_000):  # pure Python work between checks of the event
            pass


@contextlib.contextmanager
def busy_core() -> Iterator[dict[str, Any]]:
    """A helper process that keeps one core busy while the block runs, then stops.

    Stopping is reliable: an event asks the loop to end, then terminate, then kill,
    each with a timeout; the process is a daemon, so it dies with this one anyway.
    """
    ctx = multiprocessing.get_context()
    started, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_spin, args=(started, stop), name="minilora-busy", daemon=True)
    proc.start()
    try:
        started.wait(timeout=30)
        yield {"pid": proc.pid, "cores_busy": 1}
    finally:
        stop.set()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
