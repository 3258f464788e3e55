"""The training loop: AdamW, warm-up + cosine schedule, clipping, eval, checkpoints.

Reproducibility by construction: the batch and the dropout masks of step t are drawn
from generators seeded by (seed, t), not from a stream that runs through the whole
run. So a run resumed at step t needs no generator state: with the parameters and the
optimizer state restored, steps t+1, t+2, ... are exactly those of an uninterrupted
run (on NumPy, bit for bit).

Checkpoints hold only what training changes: the trainable parameters and the
optimizer's moments (for LoRA, kilobytes; the frozen base is rebuilt from its own
file). Each is a new folder ``ckpt-{step:06d}``; ``latest.json`` names the newest one
and is replaced atomically, so a crash or a NaN never leaves a half-written "latest".
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minilora.backend import to_host
from minilora.checks import non_negative_int, positive_int
from minilora.data import Batch, answer_accuracy
from minilora.io import load_json, load_safetensors, save_json, save_safetensors
from minilora.layers import IGNORE_INDEX, cross_entropy_forward
from minilora.model import GPT
from minilora.optim import AdamW


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 32
    block_size: int = 64  # T of each batch (at most the model's block_size)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    eval_every: int = 50  # 0: only at the end
    eval_size: int = 256  # examples (or windows) in the fixed validation batch
    checkpoint_every: int = 0  # 0: only at the end
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "block_size", "eval_size"):
            positive_int(name, getattr(self, name))
        for name in ("warmup", "eval_every", "checkpoint_every", "seed"):
            non_negative_int(name, getattr(self, name))
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 10):
            raise ValueError(f"lr={self.lr!r} must be a number in (0, 10)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip={self.grad_clip!r} must be >= 0 (0 turns it off)")


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup`` steps, then a cosine from lr down to lr * min_lr_ratio.

    ``step`` counts from 1 (the first update uses lr / warmup).
    """
    if cfg.warmup and step <= cfg.warmup:
        return cfg.lr * step / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def clip_gradients(grads: dict[str, Any], max_norm: float) -> float:
    """Scale all gradients by min(1, max_norm / ||g||) in place; returns ||g|| before."""
    # per-array sums in the gradient's dtype, accumulated in float64 on the device: one
    # transfer at the end (a float() per array would make the GPU wait once per array)
    norm = math.sqrt(float(sum((g * g).sum().astype("float64") for g in grads.values())))
    if max_norm > 0 and norm > max_norm:
        for g in grads.values():
            g *= max_norm / norm
    return norm


def step_seed(seed: int, step: int) -> int:
    """The seed of step ``step``'s batch and dropout masks: a pure function of both."""
    return (seed * 1_000_003 + step) % 2**63


def evaluate(model: GPT, batch: Batch, chunk: int = 128) -> dict[str, float]:
    """Validation loss and, on counted positions, teacher-forced accuracies.

    Returns {"loss", "char_acc", "exact"}: exact is the fraction of rows whose every
    counted token is the argmax, i.e. rows that greedy decoding gets entirely right.
    """
    total_loss, total_count, predictions = 0.0, 0, []
    for start in range(0, len(batch.idx), chunk):
        idx, targets = batch.idx[start : start + chunk], batch.targets[start : start + chunk]
        logits = model.forward(idx, train=False)
        count = int((targets != IGNORE_INDEX).sum())
        loss, _ = cross_entropy_forward(logits, model.xp.asarray(targets))
        total_loss += loss * count
        total_count += count
        predictions.append(to_host(logits.argmax(axis=-1)))
    char_acc, exact = answer_accuracy(np.concatenate(predictions), batch)
    return {"loss": total_loss / total_count, "char_acc": char_acc, "exact": exact}


class Trainer:
    """Trains ``model``'s trainable parameters on ``task`` (see data.py)."""

    def __init__(
        self,
        model: GPT,
        task: Any,
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        progress: bool = True,
    ) -> None:
        if cfg.block_size > model.config.block_size:
            raise ValueError(
                f"block_size={cfg.block_size} exceeds the model's block_size "
                f"{model.config.block_size}"
            )
        if not model.trainable_names():
            raise ValueError("the model has no trainable parameters (all frozen)")
        self.model, self.task, self.cfg = model, task, cfg
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress
        self.opt = AdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.last_validation: dict[str, float] | None = None  # {"loss", "char_acc", "exact"}
        self.eval_batch = task.eval_batch(cfg.eval_size, cfg.block_size, seed=cfg.seed)

    # --------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write ckpt-{step}/ (trainable parameters + optimizer state), then point to it."""
        assert self.out_dir is not None
        folder = self.out_dir / f"ckpt-{self.step:06d}"
        tensors = {
            f"param.{n}": to_host(self.model.params[n]) for n in self.model.trainable_names()
        }
        opt_state = self.opt.state_dict()
        tensors.update({f"opt.{k}": v for k, v in opt_state.items() if k.startswith("state.")})
        save_safetensors(folder / "state.safetensors", tensors)
        save_json(
            folder / "trainer.json",
            {"step": self.step, "opt_t": opt_state["t"], "train_config": asdict(self.cfg)},
        )
        previous = self._latest()
        save_json(self.out_dir / "latest.json", {"checkpoint": folder.name, "step": self.step})
        if previous is not None and previous != folder and previous.exists():
            shutil.rmtree(previous)  # only after "latest" names the new one
        return folder

    def _latest(self) -> Path | None:
        pointer = self.out_dir / "latest.json" if self.out_dir else None
        if pointer is None or not pointer.exists():
            return None
        return self.out_dir / load_json(pointer)["checkpoint"]

    def load_checkpoint(self) -> int:
        """Restore the newest checkpoint in out_dir; returns its step."""
        folder = self._latest()
        if folder is None:
            raise ValueError(f"--resume: no checkpoint in {str(self.out_dir)!r}")
        meta = load_json(folder / "trainer.json")
        tensors, _ = load_safetensors(folder / "state.safetensors")
        params = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
        if sorted(params) != sorted(self.model.trainable_names()):
            raise ValueError(
                f"{folder}: checkpoint holds {len(params)} trainable parameters that do not "
                f"match this model's {len(self.model.trainable_names())} (other adapter or mode?)"
            )
        for name, value in params.items():
            if value.shape != self.model.params[name].shape:
                raise ValueError(
                    f"{folder}: {name} has shape {value.shape}, model has "
                    f"{self.model.params[name].shape}"
                )
        opt = {k[len("opt.") :]: v for k, v in tensors.items() if k.startswith("opt.")}
        opt.update(t=meta["opt_t"], lr=self.cfg.lr)
        self.opt.load_state_dict(opt)
        for name, value in params.items():
            self.model.params[name][...] = self.model.backend.asarray(value, self.model.dtype)
        self.step = int(meta["step"])
        return self.step

    # ---------------------------------------------------------------- the loop
    def _log(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")

    def train_step(self) -> float:
        """One update: batch, loss, backward, clip, AdamW. Returns the loss."""
        self.step += 1
        seed = step_seed(self.cfg.seed, self.step)
        batch = self.task.batch(seed, self.cfg.batch_size, self.cfg.block_size)
        self.model.reseed(seed)
        loss = self.model.loss(batch.idx, batch.targets, train=True)
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} at step {self.step}; the last good checkpoint is kept "
                "(try a lower --lr)"
            )
        self.model.backward()
        grad_norm = clip_gradients(self.model.grads, self.cfg.grad_clip)
        self.opt.lr = learning_rate(self.step, self.cfg)
        self.opt.step()
        self.opt.zero_grad()
        self._log({"step": self.step, "loss": loss, "lr": self.opt.lr, "grad_norm": grad_norm})
        return loss

    def run(self, resume: bool = False, until: int | None = None) -> list[dict[str, float]]:
        """Train to ``cfg.steps`` (or stop after step ``until``, as an interruption would).

        The schedule always spans ``cfg.steps``, so a run stopped at ``until`` and
        resumed later is the same run. Ctrl-C saves a checkpoint and re-raises.
        """
        from tqdm.auto import tqdm

        if resume:
            self.load_checkpoint()
        cfg = self.cfg
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not self.progress,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        stop = cfg.steps if until is None else min(until, cfg.steps)
        try:
            while self.step < stop:
                loss = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    self.validate()
                if self.out_dir and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            if self.out_dir is not None:
                folder = self.save_checkpoint()
                print(f"interrupted at step {self.step}; saved {folder} (continue with --resume)")
            raise
        bar.close()
        self.validate()
        if self.out_dir is not None:
            self.save_checkpoint()
        self.seconds = time.perf_counter() - start
        return self.history

    def validate(self) -> dict[str, float]:
        """Evaluate on the fixed validation batch and log it as val_* at this step."""
        metrics = evaluate(self.model, self.eval_batch)
        self.last_validation = metrics
        self._log({"step": self.step, **{f"val_{k}": v for k, v in metrics.items()}})
        return metrics
