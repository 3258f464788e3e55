"""The experiments behind ``minilora reproduce``: LoRA's central claims at toy scale.

Two settings, chosen so that each run is cheap and each claim is readable:

- **The planted task, soft labels** (training/planted.py): a tiny *random-init* GPT
  (TINY: 2 blocks, d_model 32) is the base; the teacher is that base plus a rank-4
  change with distinct singular values (PLANT_SIGMAS) in one module (h.0.mlp.fc, the
  single-module setting) or in q and v of both blocks (the several-module setting).
  The student matches the teacher's whole next-token distribution, so the teacher is
  the loss's minimiser and the true rank is known. A random base is enough here: the
  task is to recover a planted change, not to use what a base knows.

  Why fc, not an attention matrix: fc sees each token's own input, so every direction
  of its input space reaches the loss. W_v's output is averaged over positions by
  attention (nearly uniform in a random model), which hides most input directions
  behind a running mean; on h.0.attn.v an r = 4 adapter's smallest cosine was 0.76 to
  0.83 after 300 steps and 0.94 after 1000, on seeds 0 to 2. And the plant is drawn
  orthogonal to the all-ones vector (``centred_rows``), which no layer norm output
  contains: a change there could not be recovered from any data.
- **Section 7 on a real fine-tune**: the shipped pretrained base (4 blocks, d_model 128)
  fine-tuned on ``shift`` (runs.py's setting), because Table 7 asks how ΔW relates to a
  *pretrained* W.

Learning rates are tuned per rank on a seed kept out of the results (TUNE_SEED), over
LR_GRID, by the final KL: so that a larger r optimising faster at one shared rate does
not stand in for a larger r being needed. Every run has one BLAS thread (sweep.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from minilora.basics.backend import to_host
from minilora.basics.blas import limited_threads
from minilora.core.adapters import add_adapter
from minilora.core.lora import LoraConfig, delta_weight, lora_names
from minilora.core.model import GPT, GPTConfig
from minilora.files.checkpoints import load_base
from minilora.lab.runs import (
    FULL_LR,
    TASK_DEFAULTS,
    Record,
    experiment_trainer,
    task_for,
    train_run,
)
from minilora.lab.sweep import run_sweep
from minilora.training.data import PretrainTask
from minilora.training.planted import LAYER_NORM_FED, PlantedRankTask, principal_cosines
from minilora.training.train import evaluate

TINY = GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, d_model=32)
PLANT_RANK = 4
PLANT_SIGMAS = (1.0, 0.85, 0.7, 0.55)  # distinct: the best rank-r approximation is unique
PLANT_STRENGTH = 4.0  # sigma_1 = 4 ||W||_2: a random base's logits are small; the KL is not
SETTINGS = {
    "single": {"blocks": (0,), "targets": ("fc",)},
    "several": {"blocks": (0, 1), "targets": ("q", "v")},
}
LR_GRID = (1e-2, 3e-2)  # 0.1 diverged on some seeds within 1000 steps after tuning chose it
TUNE_SEED = 100  # the seed the learning rate is chosen on; the results use seeds 0, 1, ...
STEPS, BATCH = 300, 16
SINGLE_STEPS = 1000  # the rank sweep trains close to convergence (KL ~1e-5 of its start)
SECTION7_MODULE = "h.3.attn.q"  # the paper's Table 7 looks at W_q of a late layer


# ------------------------------------------------------------- the planted task
def planted_task(setting: str, labels: str = "soft") -> tuple[GPT, PlantedRankTask]:
    """The tiny random base and the planted task of ``setting`` ("single" or "several")."""
    base = GPT(TINY, seed=0)
    task = PlantedRankTask(
        base,
        PretrainTask().tokenizer,
        rank=PLANT_RANK,
        strength=PLANT_STRENGTH,
        sigmas=PLANT_SIGMAS,
        labels=labels,
        seed=0,
        centred_rows=True,
        **SETTINGS[setting],
    )
    return base, task


def floor_kl(setting: str = "single") -> float:
    """The KL of the exact answer: a rank-k adapter holding the planted ΔW itself
    (A = V^T, B = U diag(sigma) / scale), evaluated as the runs are. It is not 0 only
    because the logits are float32 (and the KL is a difference of nearly equal sums):
    trained KLs this small are equal to within what float32 can tell apart."""
    model, task = planted_task(setting)
    lcfg = LoraConfig(PLANT_RANK, 2.0 * PLANT_RANK, 0.0, SETTINGS[setting]["targets"])
    add_adapter(model, lcfg, seed=0)
    for module, delta in task.delta.items():
        U, V = task.factors[module]
        sigma = np.linalg.svd(delta, compute_uv=False)[:PLANT_RANK]
        a, b = lora_names(module, "default")
        model.params[a][...] = model.xp.asarray(V.T, dtype=model.dtype)
        model.params[b][...] = model.xp.asarray(U * sigma / lcfg.scale, dtype=model.dtype)
    return evaluate(model.eval(), task.eval_batch(64, TINY.block_size, seed=0))["kl"]


def planted_run(
    *,
    setting: str = "single",
    r: int = 4,
    targets: Sequence[str] | None = None,
    lr: float = 3e-2,
    seed: int = 0,
    steps: int = STEPS,
) -> Record:
    """One LoRA run on the soft-label planted task: the KL to the teacher before and
    after, and for every planted module the principal cosines of the learned ΔW with
    the planted U, V, and its distance to the best rank-min(r, k) approximation of the
    planted ΔW (Eckart–Young: its top min(r, k) singular triplets)."""
    with limited_threads(1):  # as in a sweep: the same numbers whoever calls it
        model, task = planted_task(setting)
        targets = tuple(targets or SETTINGS[setting]["targets"])
        lcfg = LoraConfig(r, 2.0 * r, 0.0, targets)
        add_adapter(model, lcfg, seed=seed)
        trainer = experiment_trainer(model, task, steps, TINY.block_size, lr, seed, BATCH, 64)
        kl0 = evaluate(model, trainer.eval_batch)["kl"]
        trainer.run()
        record: Record = {
            "setting": setting,
            "r": r,
            "targets": ",".join(targets),
            "lr": lr,
            "seed": seed,
            "steps": steps,
            "kl0": kl0,
            "kl": trainer.last_validation["kl"],
            "curve": [row["loss"] for row in trainer.history if "loss" in row],
        }
        m = min(r, PLANT_RANK)
        for module, planted in task.delta.items():
            if module.rsplit(".", 1)[1] not in targets:
                continue
            names = lora_names(module, "default")
            A, B = (to_host(model.params[n]).astype(np.float64) for n in names)
            learned = delta_weight(A, B, lcfg.scale)
            U, V = task.factors[module]
            centre = module.rsplit(".", 1)[1] in LAYER_NORM_FED
            cos = principal_cosines(learned, U[:, :m], V[:, :m], centre_rows=centre)
            best = (U[:, :m] * (np.linalg.svd(planted, compute_uv=False)[:m])) @ V[:, :m].T
            seen = learned - learned.mean(axis=1, keepdims=True) if centre else learned
            record[f"cos_col:{module}"] = cos["col"]
            record[f"cos_row:{module}"] = cos["row"]
            # the same, on the whole ΔW: what the ones direction (never seen) does to it
            record[f"raw_cos_row:{module}"] = principal_cosines(learned, U[:, :m], V[:, :m])["row"]
            record[f"ey_error:{module}"] = float(np.linalg.norm(seen - best) / np.linalg.norm(best))
            record[f"A:{module}"] = A
        return record


def smallest_cosine(run: Record) -> float:
    """A planted run's smallest principal cosine, over its modules and both sides."""
    return min(min(v) for k, v in run.items() if k.startswith(("cos_col:", "cos_row:")))


def tune_lr(
    ranks: Sequence[int], grid: Sequence[float], setting: str, steps: int, processes: int | None
) -> tuple[dict[int, float], list[Record]]:
    """The learning rate with the lowest final KL per rank, on TUNE_SEED (a grid of one
    value is taken as given: nothing to tune)."""
    if len(grid) == 1:
        return {r: grid[0] for r in ranks}, []
    settings = [
        {"setting": setting, "r": r, "lr": lr, "seed": TUNE_SEED, "steps": steps}
        for r in ranks
        for lr in grid
    ]
    tried = _strip(run_sweep(planted_run, settings, processes=processes, desc="lr tuning"))
    best = {r: min((t for t in tried if t["r"] == r), key=lambda t: t["kl"])["lr"] for r in ranks}
    return best, tried


def rank_sweep(
    ranks: Sequence[int],
    seeds: Sequence[int],
    grid: Sequence[float] = LR_GRID,
    setting: str = "single",
    steps: int = STEPS,
    processes: int | None = None,
) -> dict[str, Any]:
    """The KL and the recovery against r at each rank's tuned learning rate, per seed;
    and phi (paper Eq. 4) between the A of the two largest ranks of each seed."""
    best, tried = tune_lr(ranks, grid, setting, steps, processes)
    settings = [
        {"setting": setting, "r": r, "lr": best[r], "seed": s, "steps": steps}
        for r in ranks
        for s in seeds
    ]
    runs = run_sweep(planted_run, settings, processes=processes, desc=f"{setting} ranks")
    similarity = []
    small, large = sorted(ranks)[-2:]
    for s in seeds:
        a, b = (next(x for x in runs if x["r"] == r and x["seed"] == s) for r in (small, large))
        for key in (k for k in a if k.startswith("A:")):
            # phi(1, 1) of the paper's Eq. 4: the squared cosine of the top right
            # singular vectors of the two A's (experiments.subspace_similarity has all i, j)
            top_a, top_b = (np.linalg.svd(x[key], full_matrices=False)[2][0] for x in (a, b))
            d_in = a[key].shape[1]
            similarity.append(
                {
                    "seed": s,
                    "module": key[2:],
                    "ranks": [small, large],
                    "phi_top1": float((top_a @ top_b) ** 2),
                    "floor_top1": 1 / d_in,  # E phi(1, 1) of random directions in R^d_in
                }
            )
    return {
        "lr": best,
        "tuning": tried,
        "runs": _strip(runs),
        "similarity": similarity,
        "floor_kl": floor_kl(setting),
    }


BUDGET_CONFIGS = ({"q": 8}, {"v": 8}, {"q,v": 4}, {"q,k,v,o": 2})  # the same 8 x 64 per block


def target_budget(seeds: Sequence[int], steps: int, processes: int | None) -> list[Record]:
    """Table 5 on the several-module planted task (rank 4 in q and v of each block): one
    parameter budget spent on one matrix at r = 8, two at r = 4 or four at r = 2, at one
    learning rate (3e-2, the middle of LR_GRID)."""
    settings = [
        {
            "setting": "several",
            "r": r,
            "targets": t.split(","),
            "lr": 3e-2,
            "seed": s,
            "steps": steps,
        }
        for config in BUDGET_CONFIGS
        for t, r in config.items()
        for s in seeds
    ]
    return _strip(run_sweep(planted_run, settings, processes=processes, desc="budget"))


def _strip(records: list[Record]) -> list[Record]:
    """Records without their arrays (JSON holds numbers, strings and short lists)."""
    return [{k: v for k, v in r.items() if not isinstance(v, np.ndarray)} for r in records]


# ------------------------------------------------- Section 7 on a real fine-tune
def section7(
    steps: int | None = None, ranks: Sequence[int] = (4, 64), processes: int | None = None
) -> dict[str, Any]:
    """Table 7, the correlation of ΔW with W, and full fine-tuning's ΔW truncated to rank k,
    on ``shift`` with the shipped base (runs.py's LoRA setting, q,k,v,o)."""
    m = SECTION7_MODULE
    settings = [{"task": "shift", "r": r, "steps": steps, "seed": 0, "keep": [m]} for r in ranks]
    jobs = [(train_run, s) for s in settings] + [(full_linears_run, {"steps": steps})]
    results = run_sweep(
        _call, [{"job": j, "settings": s} for j, s in jobs], processes=processes, desc="section 7"
    )
    model, _ = load_base()
    W = to_host(model.params[f"{m}.weight"]).astype(np.float64)
    table7 = [amplification(W, run[f"delta:{m}"], run["r"], seed=0) for run in results[:-1]]
    for row, run in zip(table7, results[:-1], strict=True):
        row["val_loss"] = run["val_loss"]
    return {
        "module": m,
        "table7": table7,
        "truncation": results[-1]["truncation"],
        "full_val_loss": results[-1]["val_loss"],
        "base_val_loss": results[-1]["base_val_loss"],
    }


def _call(job: Any, settings: dict[str, Any]) -> Any:
    return job(**settings)


def amplification(W: np.ndarray, delta: np.ndarray, r: int, seed: int = 0) -> Record:
    """Table 7: project W onto ΔW's top-r directions: ||U^T W V^T||_F with U, V^T the top-r
    left and right singular vectors of ΔW; the factor ||ΔW||_F / ||U^T W V^T||_F; and the
    same projection for W's own top-r directions and for random ones. Also how much of
    ΔW's energy lies in W's top-r directions (its correlation with W)."""
    rng = np.random.default_rng(seed)
    P, _, Qt = np.linalg.svd(delta)
    Pw, sw, Qwt = np.linalg.svd(W)
    U_rand, _ = np.linalg.qr(rng.standard_normal((W.shape[0], r)))
    V_rand, _ = np.linalg.qr(rng.standard_normal((W.shape[1], r)))

    def projected(U: np.ndarray, Vt: np.ndarray) -> float:
        return float(np.linalg.norm(U.T @ W @ Vt.T))

    on_delta = projected(P[:, :r], Qt[:r])
    norm_delta = float(np.linalg.norm(delta))
    in_w_top = float(np.linalg.norm(Pw[:, :r].T @ delta @ Qwt[:r].T) / norm_delta)
    return {
        "r": r,
        "norm_W": float(np.linalg.norm(W)),
        "norm_delta": norm_delta,
        "proj_delta_dirs": on_delta,
        "proj_W_dirs": projected(Pw[:, :r], Qwt[:r]),
        "proj_random_dirs": projected(U_rand, V_rand.T),
        "factor": norm_delta / on_delta,
        "delta_in_W_top": in_w_top,  # ||Uw^T ΔW Vw||_F / ||ΔW||_F, Uw, Vw: W's top r
        "random_in_W_top": float(np.sqrt(r * r / (W.shape[0] * W.shape[1]))),  # its floor
    }


def full_linears_run(
    steps: int | None = None, ks: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128)
) -> Record:
    """Full fine-tuning of the block matrices LoRA could adapt (q, k, v, o, fc, proj; the
    embeddings and layer norms stay frozen) on shift; then each matrix's ΔW truncated
    to rank k (its top k singular triplets): the fraction of the loss gain that survives,
    (L_base - L_k) / (L_base - L_full)."""
    with limited_threads(1):  # as in a sweep: the same numbers whoever calls it
        steps = steps or TASK_DEFAULTS["shift"]["steps"]
        model, tokenizer = load_base()
        task, block = task_for("shift", model, tokenizer)
        model.freeze("*")
        model.unfreeze("h.*.attn.*.weight", "h.*.mlp.*.weight")
        W0 = {n: to_host(model.params[n]).astype(np.float64) for n in model.trainable_names()}
        trainer = experiment_trainer(model, task, steps, block, FULL_LR, seed=0)
        base_loss = evaluate(model, trainer.eval_batch)["loss"]
        trainer.run()
        full_loss = trainer.last_validation["loss"]
        delta = {n: to_host(model.params[n]).astype(np.float64) - W0[n] for n in W0}
        svds = {n: np.linalg.svd(d, full_matrices=False) for n, d in delta.items()}
        rows = []
        for k in ks:
            for n, (P, s, Qt) in svds.items():
                model.params[n][...] = model.xp.asarray(
                    (W0[n] + (P[:, :k] * s[:k]) @ Qt[:k]), dtype=model.dtype
                )
            loss = evaluate(model, trainer.eval_batch)["loss"]
            kept = (base_loss - loss) / (base_loss - full_loss)
            rows.append({"k": k, "loss": loss, "kept": kept})
        return {"val_loss": full_loss, "base_val_loss": base_loss, "truncation": rows}
