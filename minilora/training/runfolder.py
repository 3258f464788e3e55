"""A training run's folder: what minilora writes there, and the rule that it writes
nowhere else.

::

    OUT/latest.json            {"checkpoint": "ckpt-000120", "step": 120}
    OUT/ckpt-000120/           state.safetensors (trainable parameters, optimizer moments)
                               trainer.json (step, optimizer step, settings, first loss)
    OUT/metrics.jsonl          one JSON object per logged row

Every name read from a file is checked before it is used as a path: ``latest.json``
may only name a direct child ``ckpt-NNNNNN`` of OUT, so a hand-edited or hostile
pointer (``../elsewhere``, ``/home``) can neither be trained from nor deleted. Only
entries with exactly these names are ever removed.

A write that was cut short (Ctrl-C, ``kill -9``, a crash) leaves at most a partial
``ckpt-*`` folder that ``latest.json`` does not name, and temporary files of
``io.atomic_write_bytes``; both are removed at the next start, and metrics logged
after the checkpoint a run resumes from are dropped, so the log is that of one run.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from minilora.files.io import (
    load_json,
    load_safetensors,
    remove_temporaries,
    save_json,
    save_safetensors,
)

LATEST = "latest.json"
METRICS = "metrics.jsonl"
STATE = "state.safetensors"
TRAINER = "trainer.json"
_CHECKPOINT = re.compile(r"ckpt-\d{6}")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


class RunFolder:
    """The files of one training run in ``path`` (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def _ours(self) -> list[Path]:
        """Every entry in the folder that minilora names (and so may remove)."""
        if not self.path.is_dir():
            return []
        return [
            entry
            for entry in self.path.iterdir()
            if entry.name in (LATEST, METRICS)
            or (_CHECKPOINT.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink())
        ]

    def holds_a_run(self) -> bool:
        return bool(self._ours())

    def clear(self) -> None:
        """Remove a previous run (``--overwrite``): our names only, nothing else."""
        for entry in self._ours():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        remove_temporaries(self.path)

    def remove_leftovers(self) -> None:
        """Drop checkpoint folders ``latest.json`` does not name, and temporary files."""
        keep = self.latest()
        for entry in self._ours():
            if entry.is_dir() and entry != keep:
                shutil.rmtree(entry)
        remove_temporaries(self.path)
        if keep is not None:
            remove_temporaries(keep)

    # ---------------------------------------------------------------- checkpoints
    def latest(self) -> Path | None:
        """The folder ``latest.json`` names, after checking it is one of ours; or None."""
        pointer = self.path / LATEST
        if not pointer.exists():
            return None
        meta = load_json(pointer)
        name = meta.get("checkpoint") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not _CHECKPOINT.fullmatch(name):
            raise ValueError(
                f"{pointer}: names checkpoint {name!r}; allowed: a folder ckpt-NNNNNN in "
                f"{self.path} (the file was edited or is not minilora's)"
            )
        folder = self.path / name
        if not folder.is_dir() or folder.is_symlink():
            raise ValueError(f"{pointer}: names {name}, which is not a folder in {self.path}")
        return folder

    def write_checkpoint(self, step: int, tensors: dict[str, np.ndarray], meta: dict) -> Path:
        """Write ckpt-{step}/, then point latest.json to it, then drop the previous one.

        In that order, a crash at any moment leaves latest.json naming a complete
        checkpoint: the old one until the new one is whole, then the new one.
        """
        folder = self.path / checkpoint_name(step)
        if folder.exists():  # a partial write of this very step, from a crash
            shutil.rmtree(folder)
        save_safetensors(folder / STATE, tensors)
        save_json(folder / TRAINER, meta)
        save_json(self.path / LATEST, {"checkpoint": folder.name, "step": step})
        self.remove_leftovers()
        return folder

    def read_checkpoint(self) -> tuple[dict[str, np.ndarray], dict[str, Any], Path]:
        """(tensors, trainer.json, folder) of the newest checkpoint, every field checked."""
        folder = self.latest()
        if folder is None:
            raise ValueError(f"--resume: no checkpoint in {str(self.path)!r}")
        meta = load_json(folder / TRAINER)
        if not isinstance(meta, dict):
            raise ValueError(f"{folder / TRAINER}: not a minilora trainer state")
        for key in ("step", "opt_t"):
            value = meta.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"{folder / TRAINER}: {key}={value!r}; allowed: a non-negative integer"
                )
        if meta["opt_t"] != meta["step"] or folder.name != checkpoint_name(meta["step"]):
            raise ValueError(
                f"{folder / TRAINER}: step {meta['step']}, optimizer step {meta['opt_t']} and "
                f"folder {folder.name} disagree (the file was edited or is damaged)"
            )
        if not isinstance(meta.get("settings"), dict):
            raise ValueError(f"{folder / TRAINER}: settings missing; allowed: an object")
        tensors, _ = load_safetensors(folder / STATE)
        return tensors, meta, folder

    # -------------------------------------------------------------------- metrics
    def append_metrics(self, row: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Keep only rows up to ``step``: what a run that crashed after it logged again."""
        path = self.path / METRICS
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line)
        path.write_text("".join(line + "\n" for line in kept))
