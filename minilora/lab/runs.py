"""One training run of the experiments, and many of them in parallel.

Every run fine-tunes the shipped base (checkpoints.BUILTIN_BASE: 4 layers, d_model 128)
on a built-in task, with the settings experiments.py explains (TASK_DEFAULTS: the
targets and steps per task). :func:`train_run` is one run; :func:`runs` sends a list of
settings through :func:`sweep.run_sweep`: one process per core, one BLAS thread each,
the same numbers whatever the number of processes. :func:`adapter_run` trains one named
adapter and saves it, for a notebook that trains several side by side and loads them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from minilora.basics.backend import to_host
from minilora.basics.blas import limited_threads
from minilora.core import params
from minilora.core.adapters import add_adapter
from minilora.core.lora import LoraConfig, delta_weight, gaussian_std, lora_names
from minilora.files.checkpoints import load_base, save_adapter
from minilora.lab.sweep import run_sweep
from minilora.training.data import FixedPoolTask, get_task
from minilora.training.planted import PlantedRankTask
from minilora.training.schedule import LORA_LR
from minilora.training.train import TrainConfig, Trainer, evaluate

Record = dict[str, Any]

FULL_LR = 3e-4  # full fine-tuning moves every weight: a tenth of LoRA's rate is stable here
PLANTED_RANK = 4
PLANTED_BLOCK = 32  # planted windows: half the base's context, to keep the runs short
POOL_SEED = 12_345  # the fixed small data sets are the same for every run
TASK_DEFAULTS = {  # targets and steps per task (module docstring)
    "shift": {"targets": ("q", "k", "v", "o"), "steps": 300},
    "planted": {"targets": ("q", "v"), "steps": 150},
}


# ------------------------------------------------------------------ one training run
def experiment_trainer(
    model: Any,
    task: Any,
    steps: int,
    block_size: int,
    lr: float,
    seed: int,
    batch_size: int = 32,
    eval_size: int = 256,
    loraplus_lr_ratio: float | None = None,
) -> Trainer:
    """The trainer every experiment uses: warm-up over the first 5% of the steps,
    validation only at the end, no progress bar, and one BLAS thread, as in a sweep,
    so a run gives the same numbers whoever calls it (blas.py)."""
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        block_size=block_size,
        lr=lr,
        warmup=max(1, steps // 20),
        eval_every=0,
        eval_size=eval_size,
        seed=seed,
        loraplus_lr_ratio=loraplus_lr_ratio,
    )
    with limited_threads(1):  # its validation batch too (the planted teacher labels it)
        return Trainer(model, task, cfg, progress=False, threads=1)


def task_for(name: str, model: Any, tokenizer: Any) -> tuple[Any, int]:
    if name == "planted":  # the teacher is this base plus a fixed rank-4 change of q and v
        return PlantedRankTask(model, tokenizer, rank=PLANTED_RANK, seed=0), PLANTED_BLOCK
    task = get_task(name, tokenizer=tokenizer)
    return task, task.block_size


def train_run(
    *,
    task: str = "shift",
    r: int | None = 8,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    dropout: float = 0.0,
    init: str = "gaussian",
    rslora: bool = False,
    random_B: bool = False,
    steps: int | None = None,
    batch_size: int = 32,
    lr: float | None = None,
    seed: int = 0,
    pool: int | None = None,
    eval_size: int = 256,
    keep: Sequence[str] = (),
) -> Record:
    """One fine-tuning run of the shipped base; ``r=None`` is full fine-tuning.

    ``targets`` and ``steps`` default to the task's (TASK_DEFAULTS), ``alpha`` to 2r;
    ``random_B`` draws B like A instead of zero (the initialisation LoRA avoids);
    ``pool`` trains on that many fixed examples (data.FixedPoolTask) and also reports the
    loss on them; ``keep`` names modules
    ("h.3.attn.q") whose learned ΔW (d_out, d_in) and A are returned as arrays.
    """
    targets = tuple(targets or TASK_DEFAULTS[task]["targets"])
    steps = steps or TASK_DEFAULTS[task]["steps"]
    model, tokenizer = load_base()
    task_obj, block = task_for(task, model, tokenizer)
    if pool is not None:
        task_obj = FixedPoolTask(task_obj, pool, block, seed=POOL_SEED)
    W0 = {m: to_host(model.params[f"{m}.weight"]).astype(np.float64) for m in keep}
    alpha = 2.0 * r if alpha is None and r is not None else alpha
    lcfg = None
    if r is not None:  # else full fine-tuning: every weight trains
        lcfg = LoraConfig(r, alpha, dropout, targets, init, rslora)
        adapt(model, lcfg, random_B, seed)
    lr = lr if lr is not None else (LORA_LR if r is not None else FULL_LR)
    trainer = experiment_trainer(model, task_obj, steps, block, lr, seed, batch_size, eval_size)
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    val = trainer.last_validation
    record: Record = {
        "task": task,
        "mode": "full" if r is None else "lora",
        "r": r,
        "alpha": alpha,
        "scale": lcfg.scale if lcfg else None,
        "targets": ",".join(targets) if r is not None else "all",
        "dropout": dropout,
        "init": init,
        "rslora": rslora,
        "pool": pool,
        "steps": steps,
        "seed": seed,
        "trainable": params.count_parameters(model).trainable,
        "seconds": seconds,
        "val_loss": val["loss"],
        "val_char_acc": val["char_acc"],
        "val_exact": val["exact"],
        "curve": [row["loss"] for row in trainer.history if "loss" in row],
    }
    if pool is not None:  # the loss on the examples it trained on, in eval mode
        record["train_loss"] = evaluate(model, task_obj.pool)["loss"]
    for m in keep:
        if r is None:
            record[f"delta:{m}"] = to_host(model.params[f"{m}.weight"]).astype(np.float64) - W0[m]
        else:
            A_name, B_name = lora_names(m, "default")
            A, B = (to_host(model.params[n]).astype(np.float64) for n in (A_name, B_name))
            record[f"delta:{m}"] = delta_weight(A, B, lcfg.scale)
            record[f"A:{m}"] = A
    return record


def adapter_run(
    *,
    task: str,
    name: str,
    directory: str,
    targets: Sequence[str] = ("q", "k", "v", "o"),
    r: int = 8,
    alpha: float = 16.0,
    steps: int = 300,
    seed: int = 0,
    lr: float = LORA_LR,
) -> Record:
    """Train adapter ``name`` for ``task`` on the shipped base; save it to ``directory``.

    What a notebook would do in its own process (add_adapter, a Trainer on one BLAS
    thread, save_adapter), as a job for sweep.run_sweep: independent adapters train in
    separate processes, one per core, and the notebook loads their files. A is seeded
    by ``seed`` and ``name``, as ``add_adapter(model, config, name=name, seed=seed)``
    seeds it anywhere. Returns the seconds of training and the trained model's logits
    on the 256 held-out prompts ``eval_batch(256, block_size, seed=0)``: what the saved
    adapter, loaded into a fresh base, must give again.
    """
    model, tokenizer = load_base()
    task_obj, block = task_for(task, model, tokenizer)
    add_adapter(model, LoraConfig(r, alpha, 0.0, tuple(targets)), name=name, seed=seed)
    trainer = experiment_trainer(model, task_obj, steps, block, lr, seed)
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    save_adapter(model, directory, name=name)
    val = task_obj.eval_batch(256, block, seed=0)
    with limited_threads(1):  # as the training: the same rounding wherever it runs
        logits = to_host(model.eval().forward(val.idx))
    return {"task": task, "name": name, "steps": steps, "seconds": seconds, "val_logits": logits}


def adapt(model: Any, lcfg: LoraConfig, random_B: bool, seed: int) -> None:
    """Add the adapter; with ``random_B``, B drawn like A (N(0, 1/r^2)) instead of zero,
    so the adapted model no longer starts at the base."""
    add_adapter(model, lcfg, seed=seed)
    if random_B:
        rng = np.random.default_rng([seed, 1])
        for name in model.trainable_names():
            if ".lora_B." in name:
                value = rng.normal(0.0, gaussian_std(lcfg.r), model.params[name].shape)
                model.params[name][...] = model.xp.asarray(value, dtype=model.dtype)


def runs(settings: list[dict], processes: int | None, desc: str) -> list[Record]:
    return run_sweep(train_run, settings, processes=processes, desc=desc)
