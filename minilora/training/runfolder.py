"""A training run's folder: what minilora writes there, and the rule that it writes
nowhere else.

::

    OUT/latest.json            {"checkpoint": "ckpt-000120", "step": 120}
    OUT/ckpt-000120/           state.safetensors (trainable parameters, optimizer moments)
                               trainer.json (step, optimizer step, settings, first loss)
    OUT/metrics.jsonl          one JSON object per logged row

Every name read from a file is checked before it is used as a path: ``latest.json``
may only name a direct child ``ckpt-NNNNNN`` of OUT, so a hand-edited or hostile
pointer (``../elsewhere``, ``/home``) can neither be trained from nor deleted.

minilora removes only what it made, by name and kind: the regular files
``latest.json`` and ``metrics.jsonl``, and ``ckpt-NNNNNN`` folders holding only their
two files. Anything else under those names (a link, a folder named ``metrics.jsonl``,
a note inside a checkpoint), or a run folder that is itself a link, is refused before
anything is written or removed (:meth:`RunFolder.check`).

A write that was cut short (Ctrl-C, ``kill -9``, a crash) leaves at most a partial
``ckpt-*`` folder that ``latest.json`` does not name, and temporary files of
``io.atomic_write_bytes``; both are removed at the next start, and metrics logged
after the checkpoint a run resumes from are dropped, so the log is that of one run.
Without ``latest.json``, ``--resume`` continues from the newest complete checkpoint
and removes only checkpoints that are provably partial.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from minilora.basics.backend import finite_as
from minilora.files.io import (
    is_temporary,
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
MOMENTS = ("m", "v")  # AdamW's slots per parameter (core/optim.py): first and second moment
_CHECKPOINT = re.compile(r"ckpt-\d{6}")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


class RunFolder:
    """The files of one training run in ``path`` (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def check(self) -> None:
        """Refuse a folder whose entries with minilora's names are not what minilora made.

        The folder itself, ``latest.json``, ``metrics.jsonl`` and ``ckpt-NNNNNN/`` must be
        real folders and regular files (no links: writing or deleting through one would
        reach whatever it points to), and a checkpoint folder may hold only its two files.
        Called before anything in the folder is written or removed, so a refusal changes
        nothing.
        """
        if self.path.is_symlink():
            raise ValueError(
                f"{self.path} is a symbolic link; a run folder must be a real folder "
                "(minilora writes and deletes files in it)"
            )
        if not self.path.exists():
            return
        if not self.path.is_dir():
            raise ValueError(f"{self.path} is not a folder; a run folder must be one")
        for entry in sorted(self.path.iterdir()):
            if entry.name in (LATEST, METRICS):
                _expect(entry, "file")
            elif _CHECKPOINT.fullmatch(entry.name):
                _expect(entry, "folder")
                for inner in sorted(entry.iterdir()):
                    if inner.name in (STATE, TRAINER):
                        _expect(inner, "file")
                    elif not is_temporary(inner):
                        raise ValueError(
                            f"{inner} is not a file minilora writes in a checkpoint, and "
                            f"minilora removes {entry.name} when it is replaced; move it away"
                        )

    def _ours(self) -> list[Path]:
        """Every entry in the folder that minilora names (and so may remove), sorted."""
        if not self.path.is_dir():
            return []
        names = (LATEST, METRICS)
        entries = self.path.iterdir()
        return sorted(e for e in entries if e.name in names or _CHECKPOINT.fullmatch(e.name))

    def _checkpoints(self) -> list[Path]:
        return [entry for entry in self._ours() if entry.name not in (LATEST, METRICS)]

    def removable(self) -> list[Path]:
        """What :meth:`clear` removes (besides temporary files)."""
        self.check()
        return self._ours()

    def holds_a_run(self) -> bool:
        self.check()
        return bool(self._ours())

    def previous_run(self, where: Path) -> str:
        """Why a new run may not start in ``where``, with advice that is true of it."""
        try:
            resumable = self.resume_point() is not None
        except ValueError:  # a damaged latest.json: --resume says what is wrong with it
            resumable = True
        if resumable:
            return (
                f"{where} holds a previous run; continue it with --resume, replace it with "
                "--overwrite, or choose another --out"
            )
        return (
            f"{where} holds a run with no complete checkpoint (it stopped before its first "
            "one), so there is nothing to resume; replace it with --overwrite, or choose "
            "another --out"
        )

    def clear(self) -> None:
        """Remove a previous run (``--overwrite``): our names only, nothing else."""
        self.check()
        for entry in self._ours():
            _remove(entry)
        remove_temporaries(self.path)

    def remove_leftovers(self) -> None:
        """Drop checkpoint folders ``latest.json`` does not name, and temporary files.

        Without ``latest.json`` only provably partial checkpoints go (no trainer.json,
        which is written last); complete ones are kept for :meth:`resume_point`.
        """
        self.check()
        keep = self.latest()
        for entry in self._checkpoints():
            if entry != keep and (keep is not None or not _complete(entry)):
                _remove(entry)
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

    def resume_point(self) -> Path | None:
        """The checkpoint ``--resume`` continues from: the one ``latest.json`` names;
        without ``latest.json`` (a crash while the first one was committed, or a file
        moved away), the newest complete one, so that no finished work is lost."""
        if (self.path / LATEST).exists():
            return self.latest()
        return max(filter(_complete, self._checkpoints()), default=None)

    def write_checkpoint(self, step: int, tensors: dict[str, np.ndarray], meta: dict) -> Path:
        """Write ckpt-{step}/, then point latest.json to it, then drop the previous one.

        In that order, a crash at any moment leaves latest.json naming a complete
        checkpoint: the old one until the new one is whole, then the new one.
        """
        self.check()
        folder = self.path / checkpoint_name(step)
        if folder.exists():  # a partial write of this very step, from a crash
            _remove(folder)
        save_safetensors(folder / STATE, tensors)
        save_json(folder / TRAINER, meta)
        self.commit(folder, step)
        return folder

    def commit(self, folder: Path, step: int) -> None:
        """Point latest.json to ``folder`` (a complete checkpoint), then drop the others."""
        save_json(self.path / LATEST, {"checkpoint": folder.name, "step": step})
        self.remove_leftovers()

    def read_checkpoint(self) -> tuple[dict[str, Any], Path]:
        """(trainer.json, folder) of the checkpoint to resume from, every field checked."""
        self.check()
        folder = self.resume_point()
        if folder is None:
            why = ", so there is nothing to resume; start the run again with --overwrite"
            raise ValueError(
                f"--resume: no complete checkpoint in {str(self.path)!r}"
                + (why if self._ours() else "")
            )
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
        return meta, folder

    def read_tensors(
        self, folder: Path, shapes: dict[str, tuple[int, ...]], dtype: np.dtype, opt_t: int
    ) -> dict[str, np.ndarray]:
        """The checkpoint's tensors, checked against the model before any is used.

        ``param.NAME`` for each trainable parameter (``shapes``) and, once the optimizer
        has stepped, AdamW's moments ``opt.state.NAME.m`` and ``.v`` for each; all of
        the run's dtype (never cast: an int32 moment is not the run's value), its
        shapes, finite, and v >= 0 (a mean of squares). Errors name the file.
        """
        file = folder / STATE
        tensors, _ = load_safetensors(file)
        params = sorted(k for k in tensors if k.startswith("param."))
        if params != sorted(f"param.{name}" for name in shapes):
            raise ValueError(
                f"{file}: holds {len(params)} trainable parameters that do not match this "
                f"model's {len(shapes)} (other adapter or mode?)"
            )
        moments = {f"opt.state.{n}.{m}": n for n in shapes for m in MOMENTS} if opt_t else {}
        expected = {**{f"param.{n}": n for n in shapes}, **moments}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise ValueError(
                f"{file}: {missing[0]} is missing (optimizer step {opt_t} keeps moments "
                f"{' and '.join(MOMENTS)} for every trainable parameter); the file is damaged"
            )
        for key, value in tensors.items():
            if key not in expected:
                raise ValueError(f"{file}: unexpected tensor {key!r} (not this run's)")
            if value.dtype != dtype:
                raise ValueError(f"{file}: {key} is {value.dtype}; allowed: {dtype}, the run's")
            if value.shape != shapes[expected[key]]:
                raise ValueError(
                    f"{file}: {key} has shape {value.shape}; the model's "
                    f"{expected[key]} has {shapes[expected[key]]}"
                )
            if not finite_as(value, dtype):
                raise ValueError(f"{file}: {key} holds NaN or inf")
            if key.endswith(".v") and key in moments and (value < 0).any():
                raise ValueError(f"{file}: {key} holds negative values; a second moment is >= 0")
        return tensors

    # -------------------------------------------------------------------- metrics
    def append_metrics(self, row: dict) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")

    def validated_at(self, step: int) -> bool:
        """Whether the log holds a validation row at ``step`` (a finished run's final one)."""
        return any("val_loss" in row and row.get("step") == step for row in self._rows())

    def _rows(self) -> list[dict]:
        path = self.path / METRICS
        rows = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(row, dict):
                rows.append(row)
        return rows

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


def _complete(folder: Path) -> bool:
    """Both files of a checkpoint are there (each written atomically, trainer.json last)."""
    return (folder / STATE).is_file() and (folder / TRAINER).is_file()


def _expect(entry: Path, kind: str) -> None:
    """Refuse ``entry`` unless it is a regular file (kind "file") or a real folder."""
    if entry.is_symlink():
        found = "a symbolic link"
    elif kind == "file" and not entry.is_file():
        found = "a folder" if entry.is_dir() else "not a regular file"
    elif kind == "folder" and not entry.is_dir():
        found = "not a folder"
    else:
        return
    raise ValueError(
        f"{entry} is {found} where minilora keeps its {kind} {entry.name}; minilora removes "
        "only what it made, so move it away (or choose another --out)"
    )


def _remove(entry: Path) -> None:
    """Remove one of our entries by name and kind: a regular file, or a checkpoint folder
    holding only its own files (rmdir refuses anything else left in it)."""
    if entry.is_dir() and not entry.is_symlink():
        remove_temporaries(entry)
        for name in (STATE, TRAINER):
            file = entry / name
            if file.is_file() and not file.is_symlink():
                file.unlink()
        entry.rmdir()
    else:
        _expect(entry, "file")
        entry.unlink()
