"""Peak memory of a training step, measured, and what ``params.memory_estimate`` predicts."""

from __future__ import annotations

import contextlib
import tracemalloc
from collections.abc import Iterable, Iterator
from typing import Any

from minilora.basics.backend import Backend
from minilora.core.model import GPT, GPTConfig
from minilora.core.optim import AdamW
from minilora.core.params import memory_estimate
from minilora.lab.reference import LORA_R, LORA_TARGETS, training_step


class _PoolPeak:
    """CuPy allocator that records the pool's highest ``used_bytes`` (the pool keeps no peak)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.peak = pool.used_bytes()

    def malloc(self, size: int) -> Any:
        memory = self.pool.malloc(size)
        self.peak = max(self.peak, self.pool.used_bytes())  # peaks happen only at an allocation
        return memory


@contextlib.contextmanager
def peak_memory(backend: Backend) -> Iterator[dict[str, int]]:
    """Bytes newly allocated at the highest point inside the block: ``result["peak"]``.

    NumPy: tracemalloc (NumPy reports its array buffers to it), peak minus the traced
    memory when the block starts. CuPy: every allocation goes through the default memory
    pool, whose used bytes are read after each one. Arrays alive before the block are
    not in the number; arrays freed inside it count until they are freed.
    """
    result = {"peak": 0}
    if backend.device == "gpu":
        xp = backend.xp
        backend.synchronize()
        tracker = _PoolPeak(xp.get_default_memory_pool())
        start = tracker.peak
        with xp.cuda.using_allocator(tracker.malloc):
            yield result
        backend.synchronize()
        result["peak"] = tracker.peak - start
        return
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        yield result
        _, peak = tracemalloc.get_traced_memory()
        result["peak"] = peak - start
    finally:
        if started:
            tracemalloc.stop()


def _nbytes(arrays: Iterable[Any]) -> int:
    return int(sum(a.nbytes for a in arrays))


def measure_memory(model: GPT, opt: AdamW, idx: Any, targets: Any) -> dict[str, int]:
    """Peak memory of one training step, split into what it holds (bytes).

    Method. After one unmeasured step (so AdamW's moments exist, as in training) the
    persistent parts are counted exactly from the arrays: weights = every parameter,
    optimizer = AdamW's m and v and its work array (``opt.memory_bytes()``), gradients
    = ``model.grads`` right after backward.
    The step itself (forward, backward, AdamW; the gradients of the last step freed
    first) runs under :func:`peak_memory`, which returns the memory allocated at its
    highest point beyond what existed before: peak = weights + optimizer + that.
    activations = peak - weights - gradients - optimizer: everything else alive at the
    peak, i.e. the caches of the forward pass and the temporaries of the moment.
    """
    training_step(model, opt, idx, targets)  # creates the optimizer state
    opt.zero_grad()
    weights = _nbytes(model.params.values())
    optimizer = opt.memory_bytes()
    with peak_memory(model.backend) as new:
        model.train().loss(idx, targets)
        model.backward()
        grads = dict(model.grads)
        opt.step()
    gradients = _nbytes(grads.values())
    del grads
    opt.zero_grad()
    peak = weights + optimizer + new["peak"]
    return {
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": peak - weights - gradients - optimizer,
        "peak": peak,
    }


def predicted_memory(cfg: GPTConfig, batch_size: int, mode: str) -> dict[str, int]:
    """What ``params.memory_estimate`` predicts for this step (float32, AdamW)."""
    config = cfg.to_dict() | {"batch_size": batch_size}
    config.pop("dropout")
    r = LORA_R if mode == "lora" else None
    est = memory_estimate(config, r, LORA_TARGETS, bytes_per_param=4)
    keys = ("weights", "gradients", "optimizer", "activations", "total")
    return {k: int(est[k]) for k in keys}


def memory_report(
    measured: dict[str, dict[str, int]], predicted: dict[str, dict[str, int]], method: str
) -> dict[str, Any]:
    """Measured and predicted memory side by side, and LoRA's saving in gradients +
    optimizer state: measured (full - LoRA) as a fraction of the predicted one."""

    def state(d: dict[str, int]) -> int:
        return d["gradients"] + d["optimizer"]

    theoretical = state(predicted["full"]) - state(predicted["lora"])
    saving = state(measured["full"]) - state(measured["lora"])
    return {
        "method": method,
        "full": measured["full"] | {"predicted": predicted["full"]},
        "lora": measured["lora"] | {"predicted": predicted["lora"]},
        "saving": {
            "measured": saving,
            "theoretical": theoretical,
            "fraction": saving / theoretical if theoretical else float("nan"),
            "peak": measured["full"]["peak"] - measured["lora"]["peak"],
        },
    }
