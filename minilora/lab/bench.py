"""Speed and memory, measured: LoRA against full fine-tuning, minilora against PyTorch.

Behind ``minilora bench`` and ``benchmarks/bench.py``. Every function returns plain
dicts of numbers and strings (JSON as it is); :func:`bench_report.format_results` turns the whole
result into one text table. The measurements live in their own modules: reference.py
(the setups), timing.py, machine.py, flops.py, memory.py, op_profile.py, busy_core.py
and torch_reference.py; this module runs them in order. What is measured, on the
reference configurations (docs/DESIGN.md, "Reference configurations": small and
medium on the CPU, large on the GPU), in float32 with LoRA r=8, alpha=16 on q, k, v, o
and dropout 0:

- training step (forward, backward, AdamW step), full fine-tuning and LoRA: median
  milliseconds after warm-up, and LoRA / full;
- forward only (evaluation mode): the base, LoRA unmerged and LoRA merged into W;
- peak memory of one training step, split into weights, gradients, optimizer state and
  activations (:func:`memory.measure_memory` says how), beside ``params.memory_estimate``;
- the FLOPs of a step (:func:`flops.step_flops` says exactly what is counted) and the
  achieved GFLOP/s against this machine's float32 matrix-multiply rate;
- where the time goes: self time of every forward/backward pair of layers.py and
  lora.py inside a step (:func:`op_profile.timed_ops`);
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
import functools
from collections.abc import Callable, Sequence
from typing import Any

from minilora.basics.backend import get_backend
from minilora.basics.blas import limited_threads, usable_cores
from minilora.basics.checks import non_negative_int, one_of, positive_int
from minilora.core.adapters import merge
from minilora.core.optim import ADAMW_DEFAULTS, AdamW
from minilora.lab.busy_core import busy_core
from minilora.lab.flops import FLOP_COUNT, step_flops
from minilora.lab.machine import blas_info, environment, load_average, matmul_rate
from minilora.lab.memory import measure_memory, memory_report, predicted_memory
from minilora.lab.op_profile import op_table
from minilora.lab.reference import (
    CONFIGS,
    DEFAULT_CONFIGS,
    DTYPE,
    MODES,
    build_model,
    lora_config,
    make_batch,
    reference_config,
    training_step,
)
from minilora.lab.timing import time_alternately
from minilora.lab.torch_reference import (
    torch_available,
    torch_logit_difference,
    torch_threads,
    torch_training_step,
)

__all__ = [  # what the notebooks and scripts use from here, wherever it is defined
    "CONFIGS",
    "MODES",
    "SETTLE_S",
    "bench_config",
    "blas_info",
    "build_model",
    "make_batch",
    "matmul_rate",
    "reference_config",
    "run_benchmark",
    "step_flops",
    "time_alternately",
    "training_step",
]

SETTLE_S = 0.3  # idle seconds before each timed run when minilora and PyTorch alternate


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
    with torch_threads(threads) if torch_steps else contextlib.nullcontext():
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
    meta["load_average_after"] = load_average()
    return {"meta": meta, "settings": settings, "matmul": mm, "configs": results}
