"""The training loop: AdamW, warm-up + cosine schedule, clipping, eval, checkpoints.

Reproducibility by construction: the batch and the dropout masks of step t are drawn
from generators seeded by (seed, t), not from a stream that runs through the whole
run. So a run resumed at step t needs no generator state: with the parameters and the
optimizer state restored, steps t+1, t+2, ... are exactly those of an uninterrupted
run (on NumPy, bit for bit).

Checkpoints hold only what training changes: the trainable parameters and the
optimizer's moments (for LoRA, kilobytes; the frozen base is rebuilt from its own
file), plus the run's settings, so that ``--resume`` with other settings is refused
instead of silently producing a run that is neither. The folder's layout and its
safety rules are runfolder.py's.

Ctrl-C never cuts a step in half: the first one asks the loop to stop after the
current step, which is then saved; a second one stops at once.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from minilora.basics.backend import require_memory, to_host
from minilora.basics.blas import check_threads, choose_threads, limited_threads
from minilora.core.layers import (
    IGNORE_INDEX,
    cross_entropy_forward,
    soft_cross_entropy_forward,
)
from minilora.core.model import GPT
from minilora.core.optim import AdamW
from minilora.core.params import activation_bytes
from minilora.training.batches import Batch, answer_accuracy
from minilora.training.runfolder import LATEST, RunFolder, checkpoint_name
from minilora.training.schedule import (
    RESULT_FIELDS,
    TrainConfig,
    clip_gradients,
    floating_point_errors,
    learning_rate,
    step_seed,
)


class TrainingDiverged(ValueError):
    """The loss exploded or became NaN, or a gradient overflowed; checkpoints are kept."""


DIVERGED_FACTOR = 4.0
"""A loss above DIVERGED_FACTOR * first loss + DIVERGED_MARGIN means training diverged: far
beyond what noise does (fine-tuning losses fall from their first value), and early
enough to stop before anything is saved."""
DIVERGED_MARGIN = 10.0


def progress_bar(show: bool, **kwargs: Any) -> Any:
    """A tqdm bar: tqdm.auto's (a widget in a notebook) when shown, else a silent one.
    (Importing tqdm.auto in a notebook without ipywidgets warns, even for a hidden bar.)"""
    if show:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(disable=not show, **kwargs)


def evaluate(model: GPT, batch: Batch, chunk: int = 128) -> dict[str, float]:
    """Validation loss and, on counted positions, teacher-forced accuracies.

    Returns {"loss", "char_acc", "exact"}: exact is the fraction of rows whose every
    counted token is the argmax, i.e. rows that greedy decoding gets entirely right.
    With soft targets (B, T, V) the loss is the cross-entropy on them, "kl" is added
    (KL(p || q), 0 for a perfect imitation, in float64: :func:`kl_divergence`), and the
    accuracies compare the argmax with the targets' argmax.
    Runs in eval mode (no dropout) and gives the model back in the mode it had.
    """
    soft = batch.targets.ndim == 3
    total_loss, total_kl, total_count, predictions = 0.0, 0.0, 0, []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(batch.idx), chunk):
            idx, targets = batch.idx[start : start + chunk], batch.targets[start : start + chunk]
            logits = model.forward(idx)
            if soft:
                count = idx.size
                loss, _ = soft_cross_entropy_forward(logits, model.xp.asarray(targets))
                total_kl += float(kl_divergence(targets, to_host(logits)).sum())
            else:
                count = int((targets != IGNORE_INDEX).sum())
                loss, _ = cross_entropy_forward(logits, model.xp.asarray(targets))
            total_loss += loss * count
            total_count += count
            predictions.append(to_host(logits.argmax(axis=-1)))
    finally:
        model.train(was_training)
    labels = Batch(batch.idx, batch.targets.argmax(axis=-1)) if soft else batch
    char_acc, exact = answer_accuracy(np.concatenate(predictions), labels)
    metrics = {"loss": total_loss / total_count, "char_acc": char_acc, "exact": exact}
    if soft:
        metrics["kl"] = total_kl / total_count
    return metrics


def kl_divergence(probs: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(p || softmax(logits)) = sum_v p_v (log p_v - log q_v) over the last axis.

    On the host in float64, term by term (0 log 0 = 0): a near-perfect student's KL is
    far below float32's round-off of the cross-entropy H(p, q) it differs from.
    """
    p = np.asarray(probs, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_q = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    log_p = np.log(np.where(p > 0, p, 1.0))
    return (p * (log_p - log_q)).sum(axis=-1)


class Trainer:
    """Trains ``model``'s trainable parameters on ``task`` (see data.py).

    ``settings``: whatever else decides the result (the LoRA config, the task, the
    base), stored with each checkpoint and compared on resume, together with what the
    trainer adds: the TrainConfig fields of RESULT_FIELDS, the device and the dtype.
    ``overwrite``: replace a previous run in ``out_dir`` instead of refusing to.
    ``threads``: BLAS threads during training: None leaves the library's default, an
    integer fixes it, "auto" measures (blas.py) before the first step; a resumed run
    reuses its recorded count.
    """

    def __init__(
        self,
        model: GPT,
        task: Any,
        cfg: TrainConfig,
        out_dir: str | Path | None = None,
        progress: bool = True,
        settings: dict[str, Any] | None = None,
        overwrite: bool = False,
        threads: int | str | None = None,
    ) -> None:
        if cfg.block_size > model.config.block_size:
            raise ValueError(
                f"block_size={cfg.block_size} exceeds the model's block_size "
                f"{model.config.block_size}"
            )
        if not model.trainable_names():
            raise ValueError("the model has no trainable parameters (all frozen)")
        sizes = {**model.config.to_dict(), "block_size": cfg.block_size}
        for what, batch in (("batch_size", cfg.batch_size), ("eval_size", cfg.eval_size)):
            need = activation_bytes({**sizes, "batch_size": batch}, model.dtype.itemsize)
            require_memory(need, f"a step with {what}={batch}", model.device)
        self.model, self.task, self.cfg = model, task, cfg
        self.folder = RunFolder(out_dir) if out_dir is not None else None
        self.progress = progress
        self.settings = {
            "train": {k: asdict(cfg)[k] for k in RESULT_FIELDS},
            "device": model.device,  # the same run on another backend rounds otherwise
            "dtype": model.dtype.name,
            **(settings or {}),
        }
        self.overwrite = overwrite
        if threads is not None and threads != "auto":
            threads = check_threads("threads", threads)
        self.threads_request = threads
        self.thread_choice: dict[str, Any] | None = None  # what "auto" measured
        if isinstance(threads, int):  # a fixed count is a setting like any other
            self.settings["blas_threads"] = threads
        self.opt = AdamW(
            model, lr=cfg.lr, weight_decay=cfg.weight_decay, loraplus_lr_ratio=cfg.loraplus_lr_ratio
        )
        self.step = 0
        self.first_loss: float | None = None  # the divergence test's reference
        self.history: list[dict[str, float]] = []
        self.last_validation: dict[str, float] | None = None  # {"loss", "char_acc", "exact"}
        self.eval_batch = task.eval_batch(cfg.eval_size, cfg.block_size, seed=cfg.seed)
        self._claimed = False  # this trainer has started writing into out_dir
        self._saved_step: int | None = None  # the step of the checkpoint on disk, if ours

    # --------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write ckpt-{step}/ (trainable parameters, optimizer state, settings)."""
        if self.folder is None:
            raise ValueError("save_checkpoint needs an out_dir")
        if self._saved_step == self.step:  # already on disk (rewriting would delete it first)
            return self.folder.path / checkpoint_name(self.step)
        tensors = {
            f"param.{n}": to_host(self.model.params[n]) for n in self.model.trainable_names()
        }
        opt_state = self.opt.state_dict()
        tensors.update({f"opt.{k}": v for k, v in opt_state.items() if k.startswith("state.")})
        self._claim_folder()
        meta = {
            "step": self.step,
            "opt_t": opt_state["t"],
            "first_loss": self.first_loss,
            "settings": self.settings,
            "train_config": asdict(self.cfg),
        }
        folder = self.folder.write_checkpoint(self.step, tensors, meta)
        self._saved_step = self.step
        return folder

    def load_checkpoint(self) -> int:
        """Restore the newest checkpoint in out_dir, if its settings are this run's."""
        if self.folder is None:
            raise ValueError("--resume needs an out_dir")
        meta, folder = self.folder.read_checkpoint()
        measured = meta["settings"].get("blas_threads")
        if self.threads_request == "auto" and measured is not None:  # measured at its start
            self.settings["blas_threads"] = measured  # (None: stopped before it measured)
        changed = _differences(meta["settings"], self.settings)
        if changed:
            raise ValueError(
                f"--resume: {folder} was trained with other settings: {'; '.join(changed)}. "
                "Resume with the same settings, or start a new run in another --out"
            )
        names = self.model.trainable_names()
        shapes = {name: tuple(self.model.params[name].shape) for name in names}
        tensors = self.folder.read_tensors(folder, shapes, self.model.dtype, meta["opt_t"])
        if self.folder.latest() is None:  # latest.json was missing: name the checkpoint again
            print(f"{self.folder.path / LATEST} was missing; resuming from {folder.name}")
        self.folder.commit(folder, meta["step"])  # and drop what a crash left
        opt = {k[len("opt.") :]: v for k, v in tensors.items() if k.startswith("opt.")}
        opt.update(t=meta["opt_t"], lr=self.cfg.lr)
        self.opt.load_state_dict(opt)
        for name in names:
            value = tensors[f"param.{name}"]
            self.model.params[name][...] = self.model.backend.asarray(value, self.model.dtype)
        first = meta.get("first_loss")
        self.first_loss = float(first) if isinstance(first, (int, float)) else None
        self.step = self._saved_step = meta["step"]
        self.folder.truncate_metrics(self.step)  # rows a crashed run logged after it
        self._claimed = True
        return self.step

    def _claim_folder(self) -> None:
        """A new run may not mix its files with a previous run's, unless told to replace it."""
        if self.folder is None or self._claimed:
            return
        if self.folder.holds_a_run():
            if not self.overwrite:
                raise ValueError(self.folder.previous_run(self.folder.path))
            self.folder.clear()
        self._claimed = True

    # ---------------------------------------------------------------- the loop
    def _log(self, row: dict[str, float]) -> None:
        self.history.append(row)
        if self.folder is not None:
            self._claim_folder()
            self.folder.append_metrics(row)

    def _diverged(self, step: int, what: str) -> TrainingDiverged:
        latest = self.folder.latest() if self.folder is not None else None
        kept = (
            f"the last good checkpoint, {latest.name}, is kept in {self.folder.path}"
            if latest is not None
            else "no checkpoint was written before it (--checkpoint-every N keeps some)"
        )
        return TrainingDiverged(
            f"training diverged at step {step}: {what}; try a smaller --lr (or --alpha); {kept}"
        )

    def train_step(self) -> float:
        """One update: batch, loss, backward, clip, AdamW. Returns the loss.

        ``self.step`` advances only when the update is complete, so an exception at
        any point leaves the counter and the parameters consistent. NumPy's floating
        point warnings are errors here: an overflow is a divergence, not a warning.
        """
        step = self.step + 1
        seed = step_seed(self.cfg.seed, step)
        batch = self.task.batch(seed, self.cfg.batch_size, self.cfg.block_size)
        self.model.reseed(seed)
        self.model.train()  # dropout on (validation switches to eval mode and back)
        try:
            with floating_point_errors():
                loss = self.model.loss(batch.idx, batch.targets)
                if self.first_loss is None and math.isfinite(loss):
                    self.first_loss = loss
                limit = DIVERGED_FACTOR * (self.first_loss or 0.0) + DIVERGED_MARGIN
                if not math.isfinite(loss) or loss > limit:
                    raise self._diverged(
                        step, f"loss {loss:.4g} (first loss {self.first_loss:.4g})"
                    )
                self.model.backward()
                grad_norm = clip_gradients(self.model.grads, self.cfg.grad_clip)
                if not math.isfinite(grad_norm):
                    raise self._diverged(step, f"gradient norm {grad_norm}")
                self.opt.lr = learning_rate(step, self.cfg)
                self.opt.step()
        except FloatingPointError as err:
            raise self._diverged(step, f"floating-point {err}") from None
        self.opt.zero_grad()
        self.step = step
        self._log({"step": step, "loss": loss, "lr": self.opt.lr, "grad_norm": grad_norm})
        return loss

    def run(self, resume: bool = False, until: int | None = None) -> list[dict[str, float]]:
        """Train to ``cfg.steps`` (or stop after step ``until``, as an interruption would).

        The schedule always spans ``cfg.steps``, so a run stopped at ``until`` and
        resumed later is the same run. Ctrl-C finishes the current step, saves a
        checkpoint (at step 0 if it comes before the first step) and re-raises
        KeyboardInterrupt. A finished run resumed logs its final validation only once.
        """
        if resume:
            self.load_checkpoint()
        else:
            self._claim_folder()
        cfg = self.cfg
        bar = progress_bar(
            self.progress,
            total=cfg.steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        stop = cfg.steps if until is None else min(until, cfg.steps)
        try:  # from here on, a Ctrl-C leaves a checkpoint (at step 0 if need be) to resume
            if self.threads_request == "auto" and "blas_threads" not in self.settings:
                self._measure_threads()
            with _deferred_interrupt() as interrupted, limited_threads(self.blas_threads):
                while self.step < stop:
                    loss = self.train_step()
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    if _due(self.step, cfg.eval_every) and self.step < cfg.steps:
                        self.validate()
                    if self.folder is not None and _due(self.step, cfg.checkpoint_every):
                        self.save_checkpoint()
                    if interrupted:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            bar.close()
            if self.folder is not None:
                folder = self.save_checkpoint()
                print(f"interrupted at step {self.step}; saved {folder} (continue with --resume)")
            raise
        bar.close()
        with limited_threads(self.blas_threads):  # the same rounding as the evaluations above
            if self.folder is not None and self.folder.validated_at(self.step):
                self.last_validation = evaluate(self.model, self.eval_batch)  # logged once
            else:
                self.validate()
        if self.folder is not None:
            self.save_checkpoint()
        self.seconds = time.perf_counter() - start
        return self.history

    @property
    def blas_threads(self) -> int | None:
        """The BLAS thread count training runs with (None: the library's default)."""
        return None if self.model.device == "gpu" else self.settings.get("blas_threads")

    def _measure_threads(self) -> None:
        """Time a forward and backward of the next step's batch with 1 and with all
        cores' BLAS threads; keep the faster. Leaves no trace: gradients are dropped,
        and every training step reseeds dropout itself."""
        if self.model.device == "gpu":
            return
        seed = step_seed(self.cfg.seed, self.step + 1)
        batch = self.task.batch(seed, self.cfg.batch_size, self.cfg.block_size)

        def forward_backward() -> None:
            self.model.train()
            self.model.loss(batch.idx, batch.targets)
            self.model.backward()
            self.model.grads = {}

        self.thread_choice = self._checked(lambda: choose_threads(forward_backward))
        self.settings["blas_threads"] = self.thread_choice["threads"]

    def _checked(self, forward: Any) -> Any:
        """``forward()`` under a training step's floating-point rules: an overflow before
        the first step is the model's (its weights), after it the training's."""
        try:
            with floating_point_errors():
                return forward()
        except FloatingPointError as err:
            if self.step > 0:
                raise self._diverged(self.step, f"floating-point {err}") from None
            raise TrainingDiverged(
                f"the model's forward overflows before any training (floating-point {err}): "
                f"its weights are too large for {self.model.dtype.name}"
            ) from None

    def validate(self) -> dict[str, float]:
        """Evaluate on the fixed validation batch and log it as val_* at this step.

        Under the run's thread count, measured first if it is ``auto``: a validation
        before the first step (``minilora finetune`` logs one) used to run with the
        library's default, all cores, even with ``--threads 1`` (issue 21)."""
        if self.threads_request == "auto" and "blas_threads" not in self.settings:
            self._measure_threads()
        with limited_threads(self.blas_threads):
            metrics = self._checked(lambda: evaluate(self.model, self.eval_batch))
        self.last_validation = metrics
        self._log({"step": self.step, **{f"val_{k}": v for k, v in metrics.items()}})
        return metrics


def _due(step: int, every: int) -> bool:
    """True every ``every`` steps; never when ``every`` is 0 (off)."""
    return every > 0 and step % every == 0


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two settings dicts ("alpha 16.0 -> 256.0")."""
    out = []
    for key in sorted(set(saved) | set(now), key=str):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} {a!r} -> {b!r}")
    return out


class _deferred_interrupt:
    """Within the block, the first Ctrl-C only sets a flag (the loop stops after the
    current step); a second one raises at once. Outside the main thread, a no-op."""

    def __enter__(self) -> list[bool]:
        self.flag: list[bool] = []
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self.flag

    def _handler(self, signum: int, frame: Any) -> None:
        self.flag.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: now

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
