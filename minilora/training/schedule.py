"""One step's arithmetic: the training settings, the warm-up + cosine learning rate,
gradient clipping, the per-step seed, and the floating-point error mode around every
forward. The loop that uses them is train.py's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from minilora.basics.checks import non_negative_int, positive_int, positive_real

LORA_LR = 3e-3
"""The peak learning rate of AdamW on A and B in ``finetune``, the demo and the lab's
experiments: LoRA's few parameters take a larger rate than full fine-tuning."""
RESULT_FIELDS = ("steps", "batch_size", "block_size", "lr", "min_lr_ratio", "warmup")
RESULT_FIELDS += ("weight_decay", "grad_clip", "seed", "loraplus_lr_ratio")
"""TrainConfig fields that change a run's result; eval and checkpoint intervals do not."""


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
    loraplus_lr_ratio: float | None = None  # LoRA+: B learns at lr x ratio (optim.py)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "block_size", "eval_size"):
            positive_int(name, getattr(self, name))
        for name in ("warmup", "eval_every", "checkpoint_every", "seed"):
            non_negative_int(name, getattr(self, name))
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < 10):
            raise ValueError(f"lr={self.lr!r} must be a number in (0, 10)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if self.loraplus_lr_ratio is not None:
            positive_real("loraplus_lr_ratio", self.loraplus_lr_ratio)
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip={self.grad_clip!r} must be >= 0 (0 turns it off)")


def floating_point_errors() -> np.errstate:
    """Overflow, invalid and divide-by-zero as FloatingPointError (underflow is harmless)
    around every forward the trainer runs, so that inf never goes on with a warning."""
    return np.errstate(over="raise", invalid="raise", divide="raise", under="ignore")


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
