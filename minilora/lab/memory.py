"""Peak memory of a training step, measured, and what ``params.memory_estimate`` predicts."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import re
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
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


def predicted_memory(
    cfg: GPTConfig,
    batch_size: int,
    mode: str,
    targets: tuple[str, ...] = LORA_TARGETS,
    seq_len: int | None = None,
) -> dict[str, int]:
    """What ``params.memory_estimate`` predicts for this step (float32, AdamW).

    ``seq_len``: tokens per sequence when shorter than the block (gpt2: 128 of 1024).
    memory_estimate reads one block_size for both; it is given ``seq_len``, and the
    position rows the step does not use, still stored in wpe, are added to the weights.
    """
    seq = cfg.block_size if seq_len is None else seq_len
    config = cfg.to_dict() | {"batch_size": batch_size, "block_size": seq}
    config.pop("dropout")
    r = LORA_R if mode == "lora" else None
    est = memory_estimate(config, r, targets, bytes_per_param=4)
    unused_positions = (cfg.block_size - seq) * cfg.d_model * 4
    est["weights"] += unused_positions
    est["total"] += unused_positions
    keys = ("weights", "gradients", "optimizer", "activations", "total")
    return {k: int(est[k]) for k in keys}


# ------------------------------------------ resident memory: any library, Linux only
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)[1])


def _malloc_trim() -> None:
    """glibc's malloc_trim(0): free heap pages go back to the system (no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def rss_peak(fn: Callable[[], Any]) -> dict[str, int] | None:
    """Resident memory of the process around ``fn()``, for libraries tracemalloc does
    not see (PyTorch allocates outside Python): {"before": RSS before, "peak": the
    high-water mark during the call, "above": peak - before}, in bytes.

    Linux: writing "5" to /proc/self/clear_refs resets the high-water mark VmHWM to the
    current RSS; VmHWM after the call is the peak. It counts pages touched, so memory
    the allocator kept from earlier calls and reuses unseen would be missing: glibc's
    ``malloc_trim(0)`` first hands the free memory back to the system (NumPy and
    PyTorch's CPU tensors both allocate through it). Still a lower bound of what the
    call needs beyond what existed. None where /proc does not allow it.
    """
    gc.collect()
    _malloc_trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kb("VmRSS")
    except (OSError, TypeError):  # not Linux, not allowed, or no such field
        return None
    fn()
    peak = _status_kb("VmHWM")
    return {"before": 1024 * before, "peak": 1024 * peak, "above": 1024 * (peak - before)}


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
