"""Speed and memory, measured: LoRA against full fine-tuning, minilora against PyTorch.

Behind ``minilora bench`` and ``benchmarks/bench.py``. Every function returns plain
dicts of numbers and strings (JSON as it is); :func:`bench_report.format_results` turns the whole
result into one text table. What is measured, on the reference configurations of
docs/DESIGN.md, "Reference configurations" (small, medium: CPU; large: GPU), float32, LoRA r=8,
alpha=16 on q, k, v, o and dropout 0:

- training step (forward, backward, AdamW step), full fine-tuning and LoRA: median
  milliseconds after warm-up, and LoRA / full;
- forward only (evaluation mode): the base, LoRA unmerged and LoRA merged into W;
- peak memory of one training step, split into weights, gradients, optimizer state and
  activations (:func:`measure_memory` says how), beside ``params.memory_estimate``;
- the FLOPs of a step (:func:`step_flops` says exactly what is counted) and the
  achieved GFLOP/s against this machine's float32 matrix-multiply rate;
- where the time goes: self time of every forward/backward pair of layers.py and
  lora.py inside a step (:func:`timed_ops`);
- with PyTorch installed: the same model, same weights, same dtype and thread count in
  PyTorch eager mode (``torch_reference.py``), timed alternately with minilora;
- the BLAS library and its thread count; ``busy=True`` repeats all of it while a helper
  process keeps one core busy, as on a shared machine.

Timings are medians because a step's time has a long right tail (the OS, the
allocator); alternating the runs step by step spreads any slow spell of the machine
over all of them instead of one. Speed is a result to read, never a test assertion.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import math
import multiprocessing
import os
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from minilora.basics.backend import Backend, get_backend, host_rng, to_host
from minilora.basics.blas import blas_libraries, limited_threads, usable_cores
from minilora.basics.checks import non_negative_int, one_of, positive_int
from minilora.core import layers as layers_module
from minilora.core import lora as lora_module
from minilora.core import model as model_module
from minilora.core.adapters import add_adapter, merge
from minilora.core.lora import LoraConfig
from minilora.core.model import GPT, GPTConfig, parameter_shapes
from minilora.core.optim import ADAMW_DEFAULTS, AdamW
from minilora.core.params import lora_parameter_count, memory_estimate, preset
from minilora.lab.torch_reference import (
    lora_branches,
    to_torch_state,
    torch_available,
    torch_forward,
    torch_training_step,
)

CONFIGS = ("tiny", "small", "medium", "large")
"""docs/DESIGN.md, "Reference configurations"; "tiny" is for the quick pass of the tests."""
DEFAULT_CONFIGS = {"cpu": ("small", "medium"), "gpu": ("large",)}
MODES = ("full", "lora")
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16.0, ("q", "k", "v", "o")
DTYPE = "float32"
MB = 1e6  # decimal megabytes, as params.human_bytes
SETTLE_S = 0.3  # idle seconds before each timed run when minilora and PyTorch alternate


# ------------------------------------------------------------------- the setups
def reference_config(name: str) -> tuple[GPTConfig, int]:
    """(GPTConfig, batch size) of docs/DESIGN.md, "Reference configurations"."""
    p = preset(one_of("config", name, CONFIGS))
    cfg = GPTConfig(
        vocab_size=p["vocab_size"],
        block_size=p["block_size"],
        n_layer=p["n_layer"],
        n_head=p["n_head"],
        d_model=p["d_model"],
    )
    return cfg, p["batch_size"]


def lora_config() -> LoraConfig:
    """The benchmark's adapter, as in docs/DESIGN.md, "Reference configurations"."""
    return LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules=LORA_TARGETS)


def build_model(cfg: GPTConfig, mode: str, device: str | None = None, seed: int = 0) -> GPT:
    """A float32 GPT with GPT-2's init; ``mode`` "lora" adds the benchmark's adapter.

    B is set to small random values (std 0.02) instead of 0, as after some training,
    so that the adapter changes the output and merged differs from base.
    """
    one_of("mode", mode, MODES + ("base",))
    model = GPT(cfg, seed=seed, dtype=DTYPE, device=device)
    if mode == "lora":
        add_adapter(model, lora_config())
        rng = host_rng(seed + 1)
        for name in model.params:
            if ".lora_B." in name:
                value = rng.normal(0.0, 0.02, model.params[name].shape)
                model.params[name][...] = model.backend.asarray(value, dtype=model.dtype)
    return model


def make_batch(cfg: GPTConfig, batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids and next-token targets (batch_size, block_size) on the host."""
    rng = host_rng(seed)
    shape = (batch_size, cfg.block_size)
    return rng.integers(0, cfg.vocab_size, shape), rng.integers(0, cfg.vocab_size, shape)


def training_step(model: GPT, opt: AdamW, idx: Any, targets: Any) -> float:
    """One step as the benchmark counts it: forward + loss, backward, AdamW, zero_grad."""
    loss = model.loss(idx, targets)
    model.backward()
    opt.step()
    opt.zero_grad()
    return loss


def _seconds(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
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
            elapsed = _seconds(fn, sync)
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: _summary(t) for name, t in times.items()}


# --------------------------------------------------------------- the machine
def blas_info(backend: Backend | None = None) -> dict[str, Any]:
    """The BLAS library and the number of threads it uses (read by threadpoolctl from
    the loaded library, blas.py); on the GPU, the device."""
    backend = backend or get_backend("cpu")
    if backend.device == "gpu":
        xp = backend.xp
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return {
            "library": f"cuBLAS via CuPy {xp.__version__}",
            "device": name,
            "threads": None,
            "source": "cupy.cuda.runtime",
        }
    libraries = blas_libraries()
    if not libraries:
        return {"library": "unknown", "threads": None, "source": "threadpoolctl found no BLAS"}
    lib = libraries[0]
    return {
        "library": f"{lib['library']} {lib['version']}",
        "threads": lib["threads"],
        "source": "threadpoolctl",
    }


def environment(backend: Backend) -> dict[str, Any]:
    """Date, machine, library versions and BLAS: what a number needs to be read with."""
    ok, torch_version = torch_available()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": backend.device,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "usable_cores": usable_cores(),
        },
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cupy": backend.xp.__version__ if backend.device == "gpu" else None,
        "torch": torch_version if ok else None,
        "blas": blas_info(backend),
        "load_average": _load_average(),
    }


def _load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other work on the machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def matmul_rate(backend: Backend, n: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """This machine's float32 matrix-multiply rate: an (n, n) @ (n, n) product, 2 n^3 FLOPs.

    ``gflops`` is the best of ``repeats`` products after one warm-up (the ceiling the
    model's matrix products can approach; the best, because any other load on the
    machine only slows it down); ``median_gflops`` for comparison.
    """
    n = positive_int("n", n)
    rng = host_rng(0)
    a = backend.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = backend.asarray(rng.standard_normal((n, n), dtype=np.float32))
    timed = time_alternately({"matmul": lambda: a @ b}, repeats, 1, backend.synchronize)
    best, median = timed["matmul"]["min_ms"], timed["matmul"]["median_ms"]
    return {
        "n": n,
        "flops": 2 * n**3,
        "best_ms": best,
        "median_ms": median,
        "gflops": 2 * n**3 / (best * 1e6),
        "median_gflops": 2 * n**3 / (median * 1e6),
    }


# ------------------------------------------------------------------------ FLOPs
FLOP_COUNT = (
    "multiply-adds of matrix products, 2 FLOPs each; element-wise work, layer norms, "
    "softmax, biases and AdamW are not counted. Per token: forward 2 per weight of every "
    "matrix product (q, k, v, o, fc, proj of every block and the tied head; the "
    "embedding lookups are not products), backward 2 for dx and 2 for dW, so 6 for a "
    "trained weight and 4 for a frozen one (LoRA: no dW); LoRA's A and B 6 per "
    "parameter (x A^T, u B^T; dB, du, dA, dx); attention 12 n_layer T d (Q K^T and P V: "
    "4 T d forward, 8 T d backward), over the whole T x T score matrix, as computed."
)


def step_flops(cfg: GPTConfig, batch_size: int, mode: str) -> dict[str, Any]:
    """FLOPs of one training step (``mode`` "full" or "lora") or one forward ("base").

    See :data:`FLOP_COUNT` for exactly what is counted. Returns the parts and the total:
    tokens, matmul_params, lora_params, weights (FLOPs of the base matrix products),
    adapters (LoRA's branch), attention, total.
    """
    one_of("mode", mode, MODES + ("base",))
    tokens = batch_size * cfg.block_size
    shapes = parameter_shapes(cfg)
    matmul_params = sum(
        math.prod(shape)
        for name, shape in shapes.items()
        if name.startswith("h.") and name.endswith(".weight") and len(shape) == 2
    )
    matmul_params += math.prod(shapes["wte.weight"])  # the tied head is a product; the lookup not
    lora_params = 0
    if mode == "lora":
        lora_params = lora_parameter_count(cfg.n_layer, cfg.d_model, LORA_R, LORA_TARGETS)
    per_weight = {"full": 6, "lora": 4, "base": 2}[mode]
    attention_fwd = 4 * cfg.n_layer * cfg.block_size * cfg.d_model * tokens
    out = {
        "tokens": tokens,
        "matmul_params": matmul_params,
        "lora_params": lora_params,
        "weights": per_weight * matmul_params * tokens,
        "adapters": 6 * lora_params * tokens,
        "attention": attention_fwd if mode == "base" else 3 * attention_fwd,
    }
    out["total"] = out["weights"] + out["adapters"] + out["attention"]
    return out


# ----------------------------------------------------------------------- memory
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
    optimizer = AdamW's m and v, gradients = ``model.grads`` right after backward.
    The step itself (forward, backward, AdamW; the gradients of the last step freed
    first) runs under :func:`peak_memory`, which returns the memory allocated at its
    highest point beyond what existed before: peak = weights + optimizer + that.
    activations = peak - weights - gradients - optimizer: everything else alive at the
    peak, i.e. the caches of the forward pass and the temporaries of the moment.
    """
    training_step(model, opt, idx, targets)  # creates the optimizer state
    opt.zero_grad()
    weights = _nbytes(model.params.values())
    optimizer = _nbytes(a for slots in opt.state.values() for a in slots.values())
    with peak_memory(model.backend) as new:
        model.loss(idx, targets)
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


# ---------------------------------------------------------------- per-op times
OP_MODULES = (model_module, lora_module, layers_module)
"""Where the op pairs are looked up when called: the model calls them from its own
namespace, the LoRA layer from lora's, attention its softmax from layers'."""


def _is_op(value: Any) -> bool:
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
                if _is_op(value):
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
            model.loss(idx, targets)
            model.backward()
            opt_seconds += _seconds(opt.step, sync)
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


# ---------------------------------------------------------------------- busy core
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


# ------------------------------------------------------------------------- torch
@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Give PyTorch the BLAS's thread count for the block, then restore its own."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_logit_difference(model: GPT, idx: Any) -> float:
    """max |logits(minilora) - logits(torch_reference)| for the same weights and ids.

    Checks that the PyTorch model being timed is the same model (float32 rounding only).
    """
    import torch

    state = model.state_dict()
    sd = to_torch_state(state)
    adapters = model.active_adapters
    lora = None
    if adapters:
        scale = model.adapters[adapters[0]].config.scale
        lora = lora_branches(sd, scale, adapters[0])
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        ref = torch_forward(sd, model.config, ids, lora).numpy()
    ours = to_host(model.forward(idx)).astype(np.float64)
    return float(np.max(np.abs(ours - ref)))


# ---------------------------------------------------------------------- one config
def bench_config(
    name: str,
    device: str | None = None,
    seed: int = 0,
    steps: int = 10,
    warmup: int = 2,
    use_torch: bool = True,
    threads: int | None = None,
    matmul_gflops: float | None = None,
    op_passes: int = 2,
    settle: float = SETTLE_S,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Every measurement of one reference configuration, as a JSON-able dict.

    Sections: config, training, forward, memory, flops, ops, torch (see the module
    docstring). ``threads``: PyTorch's thread count (the BLAS's); ``matmul_gflops``:
    the machine's rate, for the fraction achieved; ``settle``: idle seconds before each
    timed training step when minilora and PyTorch alternate on the CPU
    (:func:`time_alternately` says why).
    """
    cfg, batch_size = reference_config(name)
    backend = get_backend(device)
    sync = backend.synchronize
    idx, targets = make_batch(cfg, batch_size, seed)
    models = {mode: build_model(cfg, mode, device, seed) for mode in MODES}
    opts = {mode: AdamW(models[mode]) for mode in MODES}
    result: dict[str, Any] = {
        "config": cfg.to_dict() | {"batch_size": batch_size, "tokens": batch_size * cfg.block_size}
    }

    # PyTorch: built from the same weights before minilora's steps change them
    ok, why = torch_available()
    torch_steps: dict[str, Callable[[], Any]] = {}
    result["torch"] = {"available": bool(ok and use_torch), "threads": threads}
    if not use_torch:
        result["torch"]["reason"] = "--no-torch"
    elif not ok:
        result["torch"]["reason"] = why
    elif backend.device == "gpu":
        import torch

        if not torch.cuda.is_available():
            result["torch"] |= {"available": False, "reason": "PyTorch has no CUDA device here"}
    if result["torch"]["available"]:
        result["torch"]["version"] = why
        torch_device = "cuda" if backend.device == "gpu" else "cpu"
        check_idx = idx[: min(2, batch_size)]
        result["torch"]["max_abs_logit_diff"] = {
            mode: torch_logit_difference(models[mode], check_idx) for mode in MODES
        }
        for mode in MODES:
            scale = lora_config().scale if mode == "lora" else None
            step, _ = torch_training_step(
                models[mode].state_dict(), cfg, scale, device=torch_device
            )
            torch_steps[mode] = functools.partial(step, idx, targets)

    log(f"{name}: training steps ({warmup} warm-up + {steps} timed, alternating)")
    runs: dict[str, Callable[[], Any]] = {}
    for mode in MODES:
        runs[f"minilora_{mode}"] = functools.partial(
            training_step, models[mode], opts[mode], idx, targets
        )
        if mode in torch_steps:
            runs[f"torch_{mode}"] = torch_steps[mode]
    # two CPU libraries alternating: let the previous one's spinning threads sleep first
    settle = settle if torch_steps and backend.device == "cpu" else 0.0
    with _torch_threads(threads) if torch_steps else contextlib.nullcontext():
        timed = time_alternately(runs, steps, warmup, sync, settle)
    result["torch"]["settle_s"] = settle
    training: dict[str, Any] = {
        "minilora": {mode: timed[f"minilora_{mode}"] for mode in MODES},
        "torch": {mode: timed[f"torch_{mode}"] for mode in torch_steps} or None,
    }
    ms = {mode: training["minilora"][mode]["median_ms"] for mode in MODES}
    training["lora_over_full"] = ms["lora"] / ms["full"]
    if torch_steps:
        torch_ms = {mode: training["torch"][mode]["median_ms"] for mode in MODES}
        training["torch_lora_over_full"] = torch_ms["lora"] / torch_ms["full"]
        training["minilora_over_torch"] = {mode: ms[mode] / torch_ms[mode] for mode in MODES}
    result["training"] = training

    if backend.device == "cpu":
        log(f"{name}: BLAS threads, 1 against all cores (what --threads auto chooses from)")
        counts = sorted({1, usable_cores()})
        by_threads = {
            f"{mode}@{n}": _with_threads(n, runs[f"minilora_{mode}"])
            for n in counts
            for mode in MODES
        }
        timed = time_alternately(by_threads, steps, warmup, sync)
        result["threads"] = {
            mode: {str(n): timed[f"{mode}@{n}"]["median_ms"] for n in counts} for mode in MODES
        }

    log(f"{name}: forward only (base, LoRA unmerged, LoRA merged)")
    merged = build_model(cfg, "lora", device, seed)
    merge(merged)  # W + s B A: runs at the base's cost
    forward_models = {
        "base": build_model(cfg, "base", device, seed),  # the same W, no adapter
        "lora_unmerged": models["lora"],
        "lora_merged": merged,
    }
    forward_runs = {k: functools.partial(m.forward, idx) for k, m in forward_models.items()}
    fwd: dict[str, Any] = time_alternately(forward_runs, steps, warmup, sync)
    fwd["unmerged_over_base"] = fwd["lora_unmerged"]["median_ms"] / fwd["base"]["median_ms"]
    fwd["merged_over_base"] = fwd["lora_merged"]["median_ms"] / fwd["base"]["median_ms"]
    result["forward"] = fwd
    del forward_models, forward_runs, merged  # free their weights before the memory pass

    log(f"{name}: memory of one step")
    measured = {mode: measure_memory(models[mode], opts[mode], idx, targets) for mode in MODES}
    predicted = {mode: predicted_memory(cfg, batch_size, mode) for mode in MODES}
    method = "CuPy memory pool peak" if backend.device == "gpu" else "tracemalloc peak"
    result["memory"] = memory_report(measured, predicted, method)

    flops = {mode: step_flops(cfg, batch_size, mode) for mode in MODES}
    achieved = {mode: flops[mode]["total"] / (ms[mode] * 1e6) for mode in MODES}
    result["flops"] = {
        "counted": FLOP_COUNT,
        **flops,
        "forward_base": step_flops(cfg, batch_size, "base"),
        "achieved_gflops": achieved,
        "fraction_of_matmul": (
            {mode: achieved[mode] / matmul_gflops for mode in MODES} if matmul_gflops else None
        ),
    }

    log(f"{name}: per-op times ({op_passes} instrumented steps each)")
    result["ops"] = {
        mode: op_table(models[mode], opts[mode], idx, targets, op_passes) for mode in MODES
    }
    return result


def _with_threads(n: int, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with limited_threads(n):
            return fn()

    return run


# ------------------------------------------------------------------------- the run
def run_benchmark(
    configs: Sequence[str] | None = None,
    device: str | None = None,
    seed: int = 0,
    steps: int = 10,
    warmup: int = 2,
    busy: bool = False,
    use_torch: bool = True,
    quick: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """The whole benchmark: environment, matmul rate, and :func:`bench_config` per config.

    ``configs`` default: small and medium on the CPU, large on the GPU; with ``quick``,
    tiny only, a small matmul and one instrumented step (a fast pass for the tests).
    ``busy``: everything runs while :func:`busy_core` keeps one core busy.
    """
    backend = get_backend(device)
    if configs is None:
        configs = ("tiny",) if quick else DEFAULT_CONFIGS[backend.device]
    configs = [one_of("config", c, CONFIGS) for c in configs]
    steps = positive_int("steps", steps)
    warmup = non_negative_int("warmup", warmup)
    meta = environment(backend)
    threads = meta["blas"]["threads"]
    settings = {
        "dtype": DTYPE,
        "lora": lora_config().to_dict(),
        "optimizer": f"AdamW({', '.join(f'{k}={v}' for k, v in ADAMW_DEFAULTS.items())})",
        "steps": steps,
        "warmup": warmup,
        "seed": seed,
        "busy": busy,
        "quick": quick,
        "torch": use_torch,
    }
    with busy_core() if busy else contextlib.nullcontext() as helper:
        meta["busy"] = helper
        n = 256 if quick else (4096 if backend.device == "gpu" else 2048)
        log(f"matmul rate: ({n}, {n}) @ ({n}, {n}) float32")
        mm = matmul_rate(backend, n)
        results = {
            name: bench_config(
                name,
                backend.device,
                seed,
                steps,
                warmup,
                use_torch,
                threads,
                mm["gflops"],
                op_passes=1 if quick else 2,
                settle=0.0 if quick else SETTLE_S,
                log=log,
            )
            for name in configs
        }
    meta["load_average_after"] = _load_average()
    return {"meta": meta, "settings": settings, "matmul": mm, "configs": results}
