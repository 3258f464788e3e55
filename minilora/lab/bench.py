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

``gpt2`` (opt-in, :func:`bench_gpt2`): GPT-2 small, a LoRA step only (r=8 on q, v; batch
4 of 128 tokens), minilora against transformers + PEFT with the same weights, the same
adapter and threads, timed alternately; ms per step, tokens per second, the peak memory
beside ``params.memory_estimate``, and what 1,000 steps take at that speed.

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
from minilora.lab.memory import measure_memory, memory_report, predicted_memory, rss_peak
from minilora.lab.op_profile import op_table
from minilora.lab.reference import (
    CONFIGS,
    DEFAULT_CONFIGS,
    DTYPE,
    MODES,
    build_gpt2_model,
    build_model,
    gpt2_lora_config,
    gpt2_setup,
    lora_config,
    make_batch,
    reference_config,
    training_step,
)
from minilora.lab.timing import time_alternately
from minilora.lab.torch_reference import (
    peft_available,
    peft_gpt2,
    peft_logit_difference,
    torch_available,
    torch_logit_difference,
    torch_state_bytes,
    torch_threads,
    torch_training_step,
)

__all__ = [  # what the notebooks and scripts use from here, wherever it is defined
    "CONFIGS",
    "MODES",
    "SETTLE_S",
    "bench_config",
    "bench_gpt2",
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


# ------------------------------------------------------------ GPT-2 small, opt-in
def bench_gpt2(
    device: str | None = None,
    seed: int = 0,
    steps: int = 10,
    warmup: int = 2,
    use_torch: bool = True,
    threads: int | None = None,
    settle: float = SETTLE_S,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """The "gpt2" configuration: a LoRA step of GPT-2 small, minilora against
    transformers + PEFT (``torch_reference.peft_gpt2``), as a JSON-able dict.

    PEFT adapts GPT-2's fused c_attn; minilora adapts q and v. The comparison is PEFT's
    r=8 on c_attn: the same number of trainable parameters (r (d + 3d) = 2 r (d + d) per
    block) and of adapter FLOPs, and, with v's A equal to q's (reference.build_gpt2_model),
    the same function: the logits are compared before anything is timed. Memory: the
    minilora step by tracemalloc (measure_memory) beside params.memory_estimate; both
    libraries' steps by the resident set's high-water mark (memory.rss_peak), over the
    weights and optimizer state counted from the arrays and tensors.
    """
    cfg, batch_size, seq = gpt2_setup()
    backend = get_backend(_gpt2_device(device))
    _gpt2_device(backend.device)  # MINILORA_DEVICE may say gpu
    tokens = batch_size * seq
    log(f"gpt2: building GPT-2 ({cfg.n_layer} layers, d_model {cfg.d_model}), seed {seed}")
    model = build_gpt2_model(cfg, device, seed)
    opt = AdamW(model)
    idx, targets = make_batch(cfg, batch_size, seed, seq)
    adapter = gpt2_lora_config()
    n_trainable = int(sum(model.params[n].size for n in model.trainable_names()))
    result: dict[str, Any] = {
        "kind": "gpt2",
        "config": cfg.to_dict() | {"batch_size": batch_size, "seq_len": seq, "tokens": tokens},
        "adapter": adapter.to_dict(),
        "trainable": {"minilora": n_trainable},
        "torch": {"available": bool(use_torch), "threads": threads},
    }
    runs = {"minilora": functools.partial(training_step, model, opt, idx, targets)}
    ref = None
    if not use_torch:
        result["torch"]["reason"] = "--no-torch"
    else:
        ok, versions = peft_available()
        if not ok:  # run_benchmark refuses this before anything is measured
            raise ValueError(f"--config gpt2 needs transformers + PEFT: {versions}")
        log("gpt2: the same weights and adapter in transformers + PEFT; logits compared")
        ref = peft_gpt2(model)
        result["torch"] |= {"version": versions, "attention": ref["attention"]}
        result["torch"]["logits"] = peft_logit_difference(model, ref["model"], idx[:2])
        result["trainable"]["peft"] = ref["trainable"]
        runs["peft"] = functools.partial(ref["step"], idx, targets)

    log(f"gpt2: LoRA training steps ({warmup} warm-up + {steps} timed, alternating)")
    settle = settle if ref else 0.0
    with torch_threads(threads) if ref else contextlib.nullcontext():
        timed = time_alternately(runs, steps, warmup, backend.synchronize, settle)
        log("gpt2: memory of a step (tracemalloc; resident set high-water mark)")
        measured = measure_memory(model, opt, idx, targets)
        rss = {"minilora": rss_peak(runs["minilora"])}
        state = {"minilora": {"weights": measured["weights"], "optimizer": measured["optimizer"]}}
        if ref:
            rss["peft"] = rss_peak(runs["peft"])
            state["peft"] = torch_state_bytes(ref["model"], ref["optimizer"])
    result["torch"]["settle_s"] = settle
    result["training"] = {
        side: t | {"tokens_per_s": tokens / (t["median_ms"] / 1e3)} for side, t in timed.items()
    }
    if ref:
        result["training"]["minilora_over_peft"] = (
            timed["minilora"]["median_ms"] / timed["peft"]["median_ms"]
        )
    predicted = predicted_memory(cfg, batch_size, "lora", adapter.target_modules, seq)
    result["memory"] = {
        "method": "tracemalloc peak",
        "minilora": measured | {"predicted": predicted},
        "rss": {side: _rss_total(r, state[side]) for side, r in rss.items()},
    }
    result["what_it_takes"] = {  # 1,000 steps of batch x seq tokens at the median step time
        side: {"minutes_per_1000_steps": t["median_ms"] / 60.0, "tokens": 1000 * tokens}
        for side, t in timed.items()
    }
    return result


def _rss_total(rss: dict[str, int] | None, counted: dict[str, int]) -> dict[str, int] | None:
    """The same method for both libraries: weights + optimizer state (counted from the
    arrays or tensors) + the step's resident-memory high-water mark above its start."""
    if rss is None:  # not Linux
        return None
    return rss | counted | {"peak": counted["weights"] + counted["optimizer"] + rss["above"]}


def _gpt2_device(device: str | None) -> str | None:
    """The gpt2 configuration measures the CPU: a GPU is refused before it is looked for."""
    if device == "gpu":
        raise ValueError("--config gpt2 measures the CPU (a laptop's question); use --device cpu")
    return device


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
    if configs is not None and "gpt2" in configs:
        _gpt2_device(device)
    backend = get_backend(device)
    if configs is None:
        configs = ("tiny",) if quick else DEFAULT_CONFIGS[backend.device]
    configs = [one_of("config", c, CONFIGS) for c in configs]
    steps = positive_int("steps", steps)
    warmup = non_negative_int("warmup", warmup)
    if "gpt2" in configs:  # before minutes of measuring
        _gpt2_device(backend.device)
        ok, why = peft_available()
        if use_torch and not ok:
            raise ValueError(
                f"--config gpt2 compares with transformers + PEFT, which do not import ({why}), "
                "or pass --no-torch"
            )
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
        settle = 0.0 if quick else SETTLE_S
        results = {
            name: bench_gpt2(backend.device, seed, steps, warmup, use_torch, threads, settle, log)
            if name == "gpt2"
            else bench_config(
                name,
                backend.device,
                seed,
                steps,
                warmup,
                use_torch,
                threads,
                mm["gflops"],
                op_passes=1 if quick else 2,
                settle=settle,
                log=log,
            )
            for name in configs
        }
    meta["load_average_after"] = load_average()
    return {"meta": meta, "settings": settings, "matmul": mm, "configs": results}
