"""The LoRA family side by side: LoRA, DoRA, LoRA+ and QLoRA (LoRA on the NF4 base).

A variant is a spec, a plain dict: ``{"name": "DoRA", "use_dora": True}``. Its keys are
``name`` (the label), ``use_dora`` (LoraConfig's DoRA, dora.py), ``loraplus_lr_ratio``
(B and the magnitudes learn at lr x ratio, optim.py) and ``quantize`` ("nf4": the base's
linears in NF4 before the adapter is added, qlora.py). A new variant is one more entry
of :data:`VARIANTS` and, if it needs one, one more key read in :func:`variant_run`.

Every variant gets the same adapter (rank, alpha, targets, learning rate, steps) on the
same task and seeds, so their budgets differ only by what the variant itself adds (DoRA:
one magnitude per output feature of each adapted matrix); the records state each count.

- :func:`variant_run`: one fine-tuning run of the shipped base (runs.py's settings per
  task): final validation loss and exact accuracy, the training curve, the first step
  whose smoothed training loss reaches a threshold, trainable parameters, and the
  training memory that params.memory_estimate gives for this variant.
- :func:`variant_step_times`: time per training step of every variant, measured
  alternately round by round in one process (timing.py), so a slow spell of the machine
  is shared by all of them.
- :func:`compare_variants`: both, for a list of specs, tasks and seeds: the records that
  figures/variants.png is drawn from (plots.plot_variants) and notebook 08 prints.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from minilora.basics.backend import host_rng
from minilora.basics.blas import limited_threads
from minilora.core import params
from minilora.core.adapters import add_adapter
from minilora.core.lora import LoraConfig
from minilora.core.optim import AdamW
from minilora.core.qlora import quantize_base
from minilora.files.checkpoints import load_base
from minilora.lab.reference import training_step
from minilora.lab.runs import TASK_DEFAULTS, Record, experiment_trainer, task_for
from minilora.lab.sweep import run_sweep
from minilora.lab.timing import time_alternately
from minilora.training.schedule import LORA_LR

Records = list[Record]

VARIANTS: tuple[dict[str, Any], ...] = (
    {"name": "LoRA"},
    {"name": "DoRA", "use_dora": True},
    {"name": "LoRA+", "loraplus_lr_ratio": 16.0},  # the LoRA+ paper's usual ratio
    {"name": "QLoRA", "quantize": "nf4"},
)
SPEC_KEYS = ("name", "use_dora", "loraplus_lr_ratio", "quantize")
THRESHOLDS = {"shift": 0.5, "planted": 1.0}
"""The training loss a run must reach to count as "there" (``steps_to_threshold``): on
shift, below 0.5 the answers start to come out right; on planted, 1.0 is about the
teacher's own loss on its greedy labels (figures/README.md: 1.043), which the students
pass as they grow more confident than the teacher."""
SMOOTH = 10  # steps in the running mean of the training loss that must reach a threshold


def _check_spec(spec: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise TypeError(f"a variant is a dict with a 'name', got {spec!r}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"variant {spec['name']!r}: unknown keys {unknown}; allowed: {SPEC_KEYS}")
    return spec


def _adapted_model(spec: dict[str, Any], task: str, r: int, seed: int) -> tuple[Any, ...]:
    """The shipped base with the variant's adapter, and its task: (model, adapter
    config, task, block size). The task comes first: planted's teacher is the float base
    plus the planted change for every variant, QLoRA included."""
    model, tokenizer = load_base()
    task_obj, block = task_for(task, model, tokenizer)
    if spec.get("quantize"):  # QLoRA quantizes the base first, then adds the adapter
        quantize_base(model, spec["quantize"])
    lcfg = LoraConfig(
        r=r,
        alpha=2.0 * r,
        target_modules=TASK_DEFAULTS[task]["targets"],
        use_dora=bool(spec.get("use_dora", False)),
    )
    add_adapter(model, lcfg, seed=seed)
    return model, lcfg, task_obj, block


def steps_to_threshold(
    curve: Sequence[float], threshold: float, smooth: int = SMOOTH
) -> int | None:
    """The first step (counting from 1) at which the mean training loss of the last
    ``smooth`` steps is at most ``threshold``; None if it never is. The mean, because one
    lucky batch is not "there"."""
    losses = np.asarray(curve, dtype=np.float64)
    if losses.size < smooth:
        return None
    means = np.convolve(losses, np.ones(smooth) / smooth, mode="valid")
    hits = np.flatnonzero(means <= threshold)
    return int(hits[0]) + smooth if hits.size else None


def variant_run(
    spec: dict[str, Any],
    task: str = "shift",
    r: int = 8,
    steps: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    eval_size: int = 256,
) -> Record:
    """One fine-tuning run of the shipped base with variant ``spec`` (module docstring)."""
    spec = _check_spec(spec)
    steps = steps or TASK_DEFAULTS[task]["steps"]
    model, lcfg, task_obj, block = _adapted_model(spec, task, r, seed)
    trainer = experiment_trainer(
        model,
        task_obj,
        steps,
        block,
        LORA_LR,
        seed,
        batch_size,
        eval_size,
        loraplus_lr_ratio=spec.get("loraplus_lr_ratio"),
    )
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    curve = [row["loss"] for row in trainer.history if "loss" in row]
    targets = TASK_DEFAULTS[task]["targets"]
    c = model.config  # the estimate's activations for this run's batch shape
    shape = dict(vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head, d_model=c.d_model)
    memory = params.memory_estimate(
        {**shape, "block_size": block, "batch_size": batch_size},
        r,
        targets,
        dora=lcfg.use_dora,
        quantize=spec.get("quantize"),
    )
    val = trainer.last_validation
    return {
        "variant": spec["name"],
        "spec": dict(spec),
        "task": task,
        "r": r,
        "alpha": lcfg.alpha,
        "targets": ",".join(targets),
        "lr": LORA_LR,
        "steps": steps,
        "seed": seed,
        "trainable": params.count_parameters(model).trainable,
        "memory_bytes": memory["total"],
        "weight_bytes": memory["weights"],
        "seconds": seconds,
        "val_loss": val["loss"],
        "val_exact": val["exact"],
        "threshold": THRESHOLDS[task],
        "steps_to_threshold": steps_to_threshold(curve, THRESHOLDS[task]),
        "curve": curve,
    }


def variant_step_times(
    variants: Sequence[dict[str, Any]] = VARIANTS,
    task: str = "shift",
    r: int = 8,
    batch_size: int = 32,
    steps: int = 10,
    warmup: int = 2,
) -> list[Record]:
    """Median time of one training step (forward, backward, AdamW) per variant, the
    variants alternating step by step in this process (timing.time_alternately), on a
    fixed batch of the task's shape. QLoRA's step includes dequantizing its weights."""
    variants = [_check_spec(v) for v in variants]
    calls = {}
    for spec in variants:
        model, _, _, block = _adapted_model(spec, task, r, seed=0)
        ids = host_rng(0).integers(0, model.config.vocab_size, (batch_size, block + 1))
        idx, targets = ids[:, :-1], ids[:, 1:]  # the same batch for every variant
        opt = AdamW(model, lr=LORA_LR, loraplus_lr_ratio=spec.get("loraplus_lr_ratio"))
        calls[spec["name"]] = lambda m=model, o=opt, i=idx, t=targets: training_step(m, o, i, t)
    with limited_threads(1):  # one BLAS thread, as the runs: the same kernel's rounding
        times = time_alternately(calls, steps, warmup, sync=lambda: None)
    return [
        {"variant": name, "task": task, "batch_size": batch_size, "step_ms": t["median_ms"]}
        for name, t in times.items()
    ]


def compare_variants(
    variants: Sequence[dict[str, Any]] = VARIANTS,
    tasks: Sequence[str] = ("shift", "planted"),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    r: int = 8,
    timing_steps: int = 10,
    processes: int | None = None,
) -> list[Record]:
    """Every variant on every task and seed (:func:`variant_run`, in parallel), then the
    step times of every variant per task (:func:`variant_step_times`, one process).
    ``steps=None``: each task's default (runs.TASK_DEFAULTS)."""
    variants = [_check_spec(dict(v)) for v in variants]
    settings = [
        {"spec": v, "task": t, "r": r, "steps": steps, "seed": s}
        for t in tasks
        for v in variants
        for s in seeds
    ]
    records = run_sweep(variant_run, settings, processes=processes, desc="LoRA family")
    for t in tasks:
        ms = {
            x["variant"]: x["step_ms"]
            for x in variant_step_times(variants, t, r, steps=timing_steps)
        }
        for rec in records:
            if rec["task"] == t:
                rec["step_ms"] = ms[rec["variant"]]
    return records


# ------------------------------------------------------------------------ the figure
def summary(records: Records, task: str) -> list[dict[str, Any]]:
    """Per variant, in the records' order, on ``task``: the medians over seeds of the
    final validation loss, exact accuracy and steps to the threshold (runs that never
    reach it are counted: ``reached`` of ``seeds``), with trainable parameters, the
    memory estimate and the step time. What the figure's titles and notebook 08 print."""
    rows = []
    for name in dict.fromkeys(r["variant"] for r in records if r["task"] == task):
        runs = [r for r in records if r["task"] == task and r["variant"] == name]
        reached = [r["steps_to_threshold"] for r in runs if r["steps_to_threshold"] is not None]
        rows.append(
            {
                "variant": name,
                "seeds": len(runs),
                "val_loss": float(np.median([r["val_loss"] for r in runs])),
                "val_exact": float(np.median([r["val_exact"] for r in runs])),
                "reached": len(reached),
                "steps_to_threshold": float(np.median(reached)) if reached else None,
                "trainable": runs[0]["trainable"],
                "memory_mb": runs[0]["memory_bytes"] / 1e6,
                "step_ms": runs[0].get("step_ms"),
            }
        )
    return rows


def plot_variants(data: dict[str, Records]) -> Any:
    """figures/variants.png: per task, every seed's final validation loss (and exact
    accuracy on shift) per variant, then the costs: memory estimate and step time.
    Every number in a title is a median of the records (:func:`summary`)."""
    from minilora.lab.plots import pyplot  # matplotlib: the optional figures extra

    plt = pyplot()
    records = data["runs"]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    names = list(dict.fromkeys(r["variant"] for r in records))
    panels = [(t, "val_loss", "validation loss") for t in tasks]
    if "shift" in tasks:
        panels.insert(1, ("shift", "val_exact", "exact answers"))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.2 * (len(panels) + 1), 4.4))
    for ax, (task, key, label) in zip(axes, panels, strict=False):
        rows = {row["variant"]: row for row in summary(records, task)}
        for k, name in enumerate(names):
            ys = [r[key] for r in records if r["task"] == task and r["variant"] == name]
            jitter = np.linspace(-0.12, 0.12, len(ys)) if len(ys) > 1 else np.zeros(1)
            ax.plot(k + jitter, ys, "o", color=f"C{k}", alpha=0.8)  # every seed a point
            ax.plot([k - 0.25, k + 0.25], [rows[name][key]] * 2, "-", color="k", lw=1)
        ax.set_xticks(range(len(names)), names)
        medians = ", ".join(
            f"{n} {rows[n][key]:.0%}" if key == "val_exact" else f"{n} {rows[n][key]:.3f}"
            for n in names
        )
        ax.set_title(f"{task}: final {label}, medians\n{medians}", fontsize=8)
        ax.set_ylabel(f"final {label}")
    cost = axes[-1]
    task = "shift" if "shift" in tasks else tasks[0]
    rows = summary(records, task)
    xs = np.arange(len(rows))
    cost.bar(xs - 0.2, [r["memory_mb"] for r in rows], 0.4, color="C7", label="memory (MB)")
    cost.set_ylabel("training memory, estimated (MB)")
    cost.set_xticks(xs, [r["variant"] for r in rows])
    twin = cost.twinx()
    twin.bar(xs + 0.2, [r["step_ms"] or 0 for r in rows], 0.4, color="C9", label="step (ms)")
    twin.set_ylabel("ms per training step (median)")
    twin.grid(False)
    costs = [
        f"{r['variant']} {r['memory_mb']:.1f} MB {r['step_ms']:.0f} ms"
        for r in rows
        if r["step_ms"] is not None
    ]
    lines = [", ".join(costs[k : k + 2]) for k in range(0, len(costs), 2)]  # fits the panel
    cost.set_title("\n".join([f"{task}: cost per step (batch 32)", *lines]), fontsize=8)
    cost.legend(loc="upper left", fontsize=7)
    twin.legend(loc="upper right", fontsize=7)
    seeds = len({r["seed"] for r in records})
    steps = ", ".join(f"{t} {next(r['steps'] for r in records if r['task'] == t)}" for t in tasks)
    first = records[0]
    fig.suptitle(
        f"The LoRA family at r={first['r']}, alpha={first['alpha']:g} (steps: {steps}), "
        f"{seeds} seed{'s' if seeds != 1 else ''}, each drawn as a point; bar = median",
        fontsize=10,
    )
    fig.tight_layout()
    return fig
