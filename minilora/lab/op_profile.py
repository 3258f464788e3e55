"""Where a training step's time goes: self time of every forward/backward pair."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from minilora.core import layers as layers_module
from minilora.core import lora as lora_module
from minilora.core import model as model_module
from minilora.core.model import GPT
from minilora.core.optim import AdamW
from minilora.lab.timing import wall_seconds

OP_MODULES = (model_module, lora_module, layers_module)
"""Where the op pairs are looked up when called: the model calls them from its own
namespace, the LoRA layer from lora's, attention its softmax from layers'."""


def is_op(value: Any) -> bool:
    """A forward/backward function of layers.py or lora.py."""
    return (
        callable(value)
        and getattr(value, "__module__", None) in (layers_module.__name__, lora_module.__name__)
        and getattr(value, "__name__", "").endswith(("_forward", "_backward"))
    )


class OpTimes:
    """Seconds of self time (time inside an op minus the ops it calls) and call counts."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = {}
        self.calls: dict[tuple[str, str], int] = {}

    def add(self, key: tuple[str, str], seconds: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.calls[key] = self.calls.get(key, 0) + 1


@contextlib.contextmanager
def timed_ops(
    sync: Callable[[], None] = lambda: None, modules: Sequence[Any] = OP_MODULES
) -> Iterator[OpTimes]:
    """Time every op pair while the block runs; the original functions are put back after.

    Each ``*_forward`` / ``*_backward`` function of layers.py and lora.py found in
    ``modules`` is replaced, in those namespaces, by a wrapper that times it (after
    ``sync()``, so device work is charged to the op that queued it). Times are *self*
    times: an op that calls others (the LoRA layer calls the linear and the branch,
    attention calls softmax) is charged only for its own lines, so the parts add up
    to the step. The originals are restored in a ``finally``, even if the block raises.
    """
    times = OpTimes()
    children = [0.0]  # a stack: time spent in the callees of each open call
    wrappers: dict[Any, Callable[..., Any]] = {}

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        op, _, kind = fn.__name__.rpartition("_")

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            children.append(0.0)
            sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync()
                elapsed = time.perf_counter() - start
                times.add((op, kind), elapsed - children.pop())
                children[-1] += elapsed

        return timed

    patched: list[tuple[Any, str, Any]] = []
    try:
        for module in modules:
            for attr, value in list(vars(module).items()):
                if is_op(value):
                    if value not in wrappers:
                        wrappers[value] = wrap(value)
                    patched.append((module, attr, value))
                    setattr(module, attr, wrappers[value])
        yield times
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)


def op_table(model: GPT, opt: AdamW, idx: Any, targets: Any, passes: int = 2) -> dict[str, Any]:
    """Where a training step's time goes: ms per step of each op, forward and backward.

    ``passes`` steps run under :func:`timed_ops` (their mean is reported); AdamW's step
    is timed as one more row, and "other" is the rest of the measured step: the
    model's own lines (gradient sums, the embedding add, id checks, Python). Shares are
    of the step as measured here, with the timers' small overhead included.
    """
    sync = model.backend.synchronize
    opt_seconds = step_seconds = 0.0
    with timed_ops(sync) as times:
        for _ in range(passes):
            sync()
            start = time.perf_counter()
            model.train().loss(idx, targets)
            model.backward()
            opt_seconds += wall_seconds(opt.step, sync)
            opt.zero_grad()
            step_seconds += time.perf_counter() - start
    step_ms = 1e3 * step_seconds / passes
    rows: dict[str, dict[str, float]] = {}
    for (op, kind), seconds in times.seconds.items():
        row = rows.setdefault(op, {"forward_ms": 0.0, "backward_ms": 0.0, "calls": 0})
        row[f"{kind}_ms"] += 1e3 * seconds / passes
        row["calls"] += times.calls[(op, kind)] // passes
    rows["adamw"] = {"forward_ms": 0.0, "backward_ms": 1e3 * opt_seconds / passes, "calls": 1}
    accounted = sum(r["forward_ms"] + r["backward_ms"] for r in rows.values())
    rows["other"] = {"forward_ms": 0.0, "backward_ms": step_ms - accounted, "calls": 0}
    ops = []
    for op, row in rows.items():
        total = row["forward_ms"] + row["backward_ms"]
        ops.append({"op": op, **row, "total_ms": total, "share": total / step_ms})
    ops.sort(key=lambda r: -r["total_ms"])
    return {"step_ms": step_ms, "passes": passes, "ops": ops}
