"""The experiments behind the figures, the notebooks and their tests.

One function per experiment. Each trains or measures and returns tidy records: a list
of flat dicts of numbers, strings and short lists (the settings, the seed, the losses,
the accuracy, the time), ready for JSON and for plotting (figures.py draws them). The
training runs are independent, so they go through :func:`sweep.run_sweep`: one process
per core, one BLAS thread each, the same numbers whatever the number of processes.

Every run fine-tunes the shipped base (checkpoints.BUILTIN_BASE: 4 layers, d_model 128)
on a built-in task:

- ``shift``: "shift abc>bcd.", a rule the base never saw (accuracy is meaningful);
  LoRA on q,k,v,o for 300 steps, as in the demo. (On q,v alone, r=8 reached only
  loss 2.6 in 200 steps where full fine-tuning reached 0.08; on q,k,v,o the loss falls
  sharply between steps 200 and 300, to 0.16 and 98% exact answers.)
- ``planted``: imitate the base plus a planted rank-4 change of q and v (planted.py),
  so the rank the task needs is known; LoRA on q,v, 150 steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from minilora.basics.backend import to_host
from minilora.core import params
from minilora.core.adapters import add_adapter
from minilora.core.lora import LoraConfig, delta_weight, lora_names
from minilora.core.optim import AdamW
from minilora.files.checkpoints import load_base
from minilora.lab.memory import measure_memory
from minilora.lab.reference import build_model, make_batch, reference_config
from minilora.lab.runs import (
    PLANTED_BLOCK,
    PLANTED_RANK,
    TASK_DEFAULTS,
    Record,
    adapt,
    runs,
    task_for,
    train_run,
)
from minilora.lab.sweep import run_sweep
from minilora.training.data import PretrainTask
from minilora.training.schedule import LORA_LR
from minilora.training.train import TrainConfig, Trainer, evaluate

__all__ = [  # one training run lives in runs.py; the tests and notebooks reach it from here
    "PLANTED_BLOCK",
    "PLANTED_RANK",
    "train_run",
]


# ------------------------------------------------------------ 1. parameters vs rank
PAPER_POINTS = [  # the LoRA paper's GPT-3 175B counts (Hu et al. 2021, Tables 4 and 5)
    {"label": "4.7M: r=1 on q,v", "r": 1, "targets": "q,v"},
    {"label": "18.9M: r=4 on q,v", "r": 4, "targets": "q,v"},
    {"label": "37.7M: r=8 on q,v", "r": 8, "targets": "q,v"},
]
TARGET_SETS = ("q,v", "q,k,v,o", "q,k,v,o,fc,proj")


def parameter_counts(
    presets: Sequence[str] = ("small", "gpt2", "gpt3-175b"),
    ranks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
) -> list[Record]:
    """Trainable parameters of LoRA against r, per target set; full fine-tuning's count."""
    records = []
    for name in presets:
        c = params.preset(name)
        full = params.count_architecture(
            c["vocab_size"], c["block_size"], c["n_layer"], c["n_head"], c["d_model"]
        )["total"]
        for targets in TARGET_SETS:
            for r in ranks:
                if r > c["d_model"]:
                    continue  # rank above the matrix side adds parameters, not capacity
                lora = params.lora_parameter_count(
                    c["n_layer"], c["d_model"], r, targets.split(",")
                )
                records.append(
                    {"preset": name, "targets": targets, "r": r, "lora": lora, "full": full}
                )
    return records


# ------------------------------------------------------------------- 2. rank sweep
def rank_sweep(
    ranks: Sequence[int] = (1, 2, 4, 8, 16, 32),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    tasks: Sequence[str] = ("planted", "shift"),
    processes: int | None = None,
    full: bool = True,
) -> list[Record]:
    """Validation loss (and accuracy) against r; full fine-tuning as a reference
    (``full=False`` leaves it out: more seeds for one rank, as figures.py adds them)."""
    settings = [
        {"task": t, "r": r, "steps": steps, "seed": s} for t in tasks for r in ranks for s in seeds
    ]
    if full:
        settings += [
            {"task": t, "r": None, "steps": steps, "seed": s} for t in tasks for s in seeds
        ]
    return runs(settings, processes, "rank sweep")


# ------------------------------------------------------------------ 3. alpha sweep
def alpha_sweep(
    r: int = 8,
    alphas: Sequence[float] = (4, 8, 16, 32, 64),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    processes: int | None = None,
) -> list[Record]:
    """Learning curves on shift at fixed r for alpha from r/2 to 8r (same learning rate)."""
    settings = [
        {"task": "shift", "r": r, "alpha": a, "steps": steps, "seed": s}
        for a in alphas
        for s in seeds
    ]
    return runs(settings, processes, "alpha sweep")


def scaling_across_ranks(
    ranks: Sequence[int] = (2, 4, 8, 16, 32, 64, 128),
    alpha: float = 16.0,
    seeds: Sequence[int] = (0, 1),
    steps: int = 200,
    processes: int | None = None,
    rslora: Sequence[bool] = (False, True),
) -> list[Record]:
    """alpha/r against alpha/sqrt(r) (rsLoRA) at fixed alpha, across ranks: how fast each
    learns. With alpha/r the update's scale falls as r grows (the rsLoRA paper's claim
    that it starves high ranks); with alpha/sqrt(r) it should not. ``rslora``: the
    scalings to run (one alone: more seeds for it, as figures.py adds them)."""
    settings = [
        {"task": "shift", "r": r, "alpha": alpha, "rslora": rs, "steps": steps, "seed": s}
        for r in ranks
        for rs in rslora
        for s in seeds
    ]
    return runs(settings, processes, "scaling across ranks")


# ---------------------------------------------------------------- 4. dropout sweep
def dropout_sweep(
    dropouts: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3),
    pools: Sequence[int] = (64, 512, 4096),
    seeds: Sequence[int] = (0, 1),
    steps: int | None = None,
    r: int = 16,
    processes: int | None = None,
) -> list[Record]:
    """Train and validation loss against LoRA dropout, on small fixed data sets of shift."""
    settings = [
        {"task": "shift", "r": r, "dropout": p, "pool": n, "steps": steps, "seed": s}
        for n in pools
        for p in dropouts
        for s in seeds
    ]
    return runs(settings, processes, "dropout sweep")


# -------------------------------------------------------- 5. LoRA against full: costs
def step_costs(
    ranks: Sequence[int] = (1, 2, 4, 8, 16, 32), batch_size: int = 32, steps: int = 10
) -> list[Record]:
    """Step time and peak memory of one training step (memory.py's measurement) on the
    small configuration: LoRA on q,k,v,o at each rank, and full fine-tuning."""
    cfg, _ = reference_config("small")
    idx, targets = make_batch(cfg, batch_size)
    records = []
    warm = build_model(cfg, "base")  # the first model measured would also pay BLAS's warm-up
    for _ in range(3):
        warm.loss(idx, targets)
        warm.backward()
    for r in [*ranks, None]:
        model = build_model(cfg, "base")
        if r is not None:
            adapted = TASK_DEFAULTS["shift"]["targets"]
            add_adapter(model, LoraConfig(r=r, alpha=2.0 * r, target_modules=adapted))
        opt = AdamW(model)
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            model.loss(idx, targets)
            model.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - start)
        memory = measure_memory(model, opt, idx, targets)
        records.append(
            {
                "mode": "full" if r is None else "lora",
                "r": r,
                "trainable": params.count_parameters(model).trainable,
                "step_ms": 1000 * float(np.median(times[1:])),
                "peak_mb": memory["peak"] / 1e6,
            }
        )
    return records


# ------------------------------------------------------------ 6. a fixed budget
# 10,240 parameters per block (40,960 in the model) in every configuration: a q, k, v or o
# adapter costs r (128 + 128) per block, an fc or proj adapter r (128 + 512). 10,240 is
# the smallest budget that both divide evenly, and q,k,v,o at r=10 learns shift (at the
# first budget tried, 8,192, no configuration did).
BUDGET_CONFIGS = (
    {"q": 40},
    {"v": 40},
    {"q,v": 20},
    {"q,k,v,o": 10},
    {"fc": 16},
    {"proj": 16},
    {"fc,proj": 8},
)


def target_budget(
    seeds: Sequence[int] = (0, 1, 2),
    steps: int | None = None,
    tasks: Sequence[str] = ("shift",),
    processes: int | None = None,
) -> list[Record]:
    """The LoRA paper's Table 5 at toy scale: one budget of trainable parameters spent on
    one attention matrix at r=40, two at r=20, four at r=10, or the MLP's fc and proj.
    On shift only by default: the planted task's greedy labels reward sharpening the
    base, not finding the planted change (figures/README.md), so it says little here."""
    settings = [
        {"task": t, "r": r, "targets": targets.split(","), "steps": steps, "seed": s}
        for t in tasks
        for config in BUDGET_CONFIGS
        for targets, r in config.items()
        for s in seeds
    ]
    return runs(settings, processes, "target budget")


# ------------------------------------------------- 7. subspace similarity (paper Eq. 4)
def subspace_similarity(
    ranks: tuple[int, int] = (8, 64),
    blocks: Sequence[int] = (0, 1, 2, 3),
    steps: int | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    processes: int | None = None,
) -> list[Record]:
    """phi(i, j) = ||U_i^T V_j||_F^2 / min(i, j) between the top-i right singular vectors
    of A learned at r = ranks[0] and the top-j of A at r = ranks[1] (q and v of each
    block, on shift, per seed), and the same for random Gaussian matrices of the same
    shapes. One record per (seed, module, source) holds the whole grid ``phi`` (a list
    of ranks[0] rows of ranks[1] values); :func:`phi_floor` is what random gives."""
    modules = [f"h.{b}.attn.{m}" for b in blocks for m in ("q", "v")]
    settings = [
        {"task": "shift", "r": r, "steps": steps, "seed": s, "keep": modules}
        for s in seeds
        for r in ranks
    ]
    done = runs(settings, processes, "subspace runs")
    records = []
    for k, seed in enumerate(seeds):
        small, large = done[2 * k], done[2 * k + 1]
        rng = np.random.default_rng([seed, 7])
        for m in modules:
            A_small, A_large = small[f"A:{m}"], large[f"A:{m}"]
            for source, (a, b) in (
                ("learned", (A_small, A_large)),
                (
                    "random",
                    (rng.standard_normal(A_small.shape), rng.standard_normal(A_large.shape)),
                ),
            ):
                records.append(
                    {
                        "seed": seed,
                        "module": m,
                        "block": int(m.split(".")[1]),
                        "matrix": m.rsplit(".", 1)[1],
                        "source": source,
                        "steps": small["steps"],
                        "r_small": A_small.shape[0],
                        "r_large": A_large.shape[0],
                        "d": A_small.shape[1],
                        "phi": _phi(a, b).round(6).tolist(),
                    }
                )
    return records


def phi_floor(r1: int, r2: int, d: int) -> np.ndarray:
    """(r1, r2): the mean of phi(i, j) for random subspaces of R^d, max(i, j) / d.

    A random j-dimensional subspace holds j/d of any unit vector's squared length, so
    E||U_i^T V_j||_F^2 = i j / d, and dividing by min(i, j) leaves max(i, j) / d (the
    j/d of the paper's i <= j). At d = 128 and j = 64 that is already 0.5."""
    i = np.arange(1, r1 + 1)[:, None]
    j = np.arange(1, r2 + 1)[None, :]
    return np.maximum(i, j) / d


def _phi(A1: np.ndarray, A2: np.ndarray) -> np.ndarray:
    """The normalised subspace similarity of the LoRA paper (Eq. 4), for all i, j."""
    U1 = np.linalg.svd(A1, full_matrices=False)[2].T  # (d_in, r1) right singular vectors
    U2 = np.linalg.svd(A2, full_matrices=False)[2].T
    overlap = (U1.T @ U2) ** 2  # (r1, r2): squared cosines between directions
    cumulative = overlap.cumsum(axis=0).cumsum(axis=1)  # ||U1[:, :i]^T U2[:, :j]||_F^2
    i = np.arange(1, U1.shape[1] + 1)[:, None]
    j = np.arange(1, U2.shape[1] + 1)[None, :]
    return cumulative / np.minimum(i, j)


# --------------------------------------------------------- 8. the spectrum of ΔW
def delta_w_spectrum(
    ranks: Sequence[int] = (1, 4, 16),
    block: int = 1,
    steps: int = 300,
    seed: int = 0,
    task: str = "planted",
    processes: int | None = None,
) -> list[Record]:
    """Singular values of the learned update of q and v in one block: full fine-tuning
    against LoRA at several ranks, on the planted task (true rank 4)."""
    modules = [f"h.{block}.attn.q", f"h.{block}.attn.v"]
    settings = [
        {"task": task, "r": r, "steps": steps, "seed": seed, "keep": modules}
        for r in [*ranks, None]
    ]
    records = []
    for run in runs(settings, processes, "spectrum runs"):
        for m in modules:
            s = np.linalg.svd(run[f"delta:{m}"], compute_uv=False)
            for k, value in enumerate(s[:32]):
                records.append(
                    {
                        "mode": run["mode"],
                        "r": run["r"],
                        "module": m,
                        "steps": run["steps"],
                        "seed": seed,
                        "k": k + 1,
                        "sigma": value,
                    }
                )
    return records


# ---------------------------------------------------- 9. initialisation and scale
INIT_VARIANTS = {
    "A Gaussian, B = 0 (LoRA)": {"init": "gaussian"},
    "A Kaiming, B = 0": {"init": "kaiming"},
    "A and B Gaussian": {"init": "gaussian", "random_B": True},
}


BASE_OPS = ("copy", "rev", "upper")  # the base's own tasks (data.PretrainTask)


def init_and_scaling(
    seeds: Sequence[int] = (0, 1, 2), steps: int = 300, r: int = 8, processes: int | None = None
) -> list[Record]:
    """Loss over the run (and at step 0) and the size of ΔW, for B = 0 as taught against
    both factors random, and Gaussian against Kaiming A; and the validation loss on the
    base's own tasks (copy, rev, upper) at step 0 and at the end: what the adapter costs
    the base before it has learned anything."""
    settings = [
        {"task": "shift", "r": r, "steps": steps, "seed": s, "variant": name, **kw}
        for name, kw in INIT_VARIANTS.items()
        for s in seeds
    ]
    return run_sweep(_init_run, settings, processes=processes, desc="init runs")


def _init_run(
    *, variant: str, task: str, r: int, steps: int, seed: int, init: str, random_B: bool = False
) -> Record:
    """Like train_run, but step by step: loss before each step and ||ΔW||_F after it."""
    model, tokenizer = load_base()
    task_obj, block = task_for(task, model, tokenizer)
    lcfg = LoraConfig(r=r, alpha=2.0 * r, target_modules=TASK_DEFAULTS[task]["targets"], init=init)
    adapt(model, lcfg, random_B, seed)
    cfg = TrainConfig(
        steps=steps,
        batch_size=32,
        block_size=block,
        lr=LORA_LR,
        warmup=1,
        eval_every=0,
        eval_size=128,
        seed=seed,
    )
    trainer = Trainer(model, task_obj, cfg, progress=False)  # run_sweep pins one BLAS thread
    base_task = PretrainTask(tokenizer)
    base_sets = {op: base_task.eval_batch(128, base_task.block_size, op=op) for op in BASE_OPS}
    before = {f"{op}_loss_step0": evaluate(model, b)["loss"] for op, b in base_sets.items()}
    val0 = trainer.validate()["loss"]
    losses, norms = [], [_delta_norm(model, lcfg)]
    for _ in range(steps):
        losses.append(trainer.train_step())
        norms.append(_delta_norm(model, lcfg))
    after = {f"{op}_loss_final": evaluate(model, b)["loss"] for op, b in base_sets.items()}
    return {
        "variant": variant,
        "seed": seed,
        "r": r,
        "steps": steps,
        "val_loss_step0": val0,
        "val_loss_final": trainer.validate()["loss"],
        **before,
        **after,
        "curve": losses,
        "delta_norm": norms,
    }


def _delta_norm(model: Any, lcfg: LoraConfig) -> float:
    """||ΔW||_F summed over the adapted matrices (root of the sum of squares)."""
    total = 0.0
    for adapter in model.adapters.values():
        for m in adapter.modules:
            A, B = (model.params[n] for n in lora_names(m, adapter.name))
            total += float((to_host(delta_weight(A, B, lcfg.scale)).astype(np.float64) ** 2).sum())
    return math.sqrt(total)


# ------------------------------------------------------------ 10. memory breakdown
def memory_breakdown(
    measured: Sequence[str] = ("small", "medium"),
    computed: Sequence[str] = ("gpt2", "gpt3-175b"),
    batch_sizes: Sequence[int] = (1, 4, 16, 64),
    measured_batch_sizes: Sequence[int] = (4, 8, 16, 32),
) -> list[Record]:
    """Training memory split into weights, gradients, optimizer state and activations,
    full against LoRA (r=8 on q,k,v,o): measured on our models (one step, tracemalloc,
    memory.py), computed for GPT-2 and GPT-3 175B (params.memory_estimate, fp16)."""
    parts = ("weights", "gradients", "optimizer", "activations")
    records = []
    for name in measured:
        cfg, _ = reference_config(name)
        for b in measured_batch_sizes:
            idx, targets = make_batch(cfg, b)
            for mode in ("full", "lora"):
                model = build_model(cfg, mode)
                memory = measure_memory(model, AdamW(model), idx, targets)
                records.append(
                    {
                        "model": name,
                        "source": "measured",
                        "mode": mode,
                        "batch_size": b,
                        **{p: memory[p] for p in parts},
                    }
                )
    for name in computed:
        config = params.preset(name)
        for b in batch_sizes:
            for mode, r in (("full", None), ("lora", 8)):
                estimate = params.memory_estimate(
                    {**config, "batch_size": b}, r, ("q", "k", "v", "o"), bytes_per_param=2
                )
                records.append(
                    {
                        "model": name,
                        "source": "computed",
                        "mode": mode,
                        "batch_size": b,
                        **{p: estimate[p] for p in parts},
                    }
                )
    return records
