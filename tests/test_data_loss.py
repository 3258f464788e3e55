"""Runs never delete the user's files.

Each case prepares a folder under ``tmp_path`` (a tiny base, a finished run, the user's
own files next to and inside it), runs ``minilora`` in-process, and compares the whole
tree, folders and links included, before and after:

- a refusal is one line ``minilora <command>: error: ...``, exit 2, and leaves every
  file and folder byte-identical (nothing written, nothing deleted);
- a run that goes ahead changes only the run's own entries (``OUT/train/``,
  ``OUT/adapter/``); everything else, the base included, is byte-identical.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from test_bad_inputs import TINY, TOKENIZER, run_cli

from minilora.core.model import GPT
from minilora.files.checkpoints import save_model

RUN = ["--steps", "4", "--batch-size", "2", "--eval-every", "0", "--quiet"]
RUN += ["--checkpoint-every", "2"]


def tree(root: Path) -> dict[str, str]:
    """relative path -> "dir", "link -> TARGET" or the sha256 of a file, for everything."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                out[rel] = "link -> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module", name="made")
def made_fixture(tmp_path_factory) -> Path:
    """A tiny base in base/ and a finished 4-step run on it in run/ (ckpt-000004)."""
    root = tmp_path_factory.mktemp("made")
    save_model(GPT(TINY, seed=0), root / "base", extra={"tokenizer": TOKENIZER.to_dict()})
    argv = ["finetune", "--base", str(root / "base"), "--out", str(root / "run"), *RUN]
    assert run_cli(argv, _NoCapture()).status == 0
    return root


class _NoCapture:
    """run_cli reads the output through pytest's capsys; a module fixture has none."""

    def readouterr(self):
        return "", ""


@pytest.fixture(name="tmp")
def tmp_fixture(made, tmp_path, monkeypatch) -> Path:
    """A copy of ``made`` plus the user's own files: victim/keep.txt, run/notes.txt."""
    monkeypatch.delenv("MINILORA_DEVICE", raising=False)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(made / "base", tmp_path / "base")
    shutil.copytree(made / "run", tmp_path / "run")
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("the user's own file\n")
    (tmp_path / "run" / "notes.txt").write_text("the user's notes, next to the run\n")
    return tmp_path


def finetune(tmp: Path, *flags: str, base: str = "base", out: str = "run") -> list[str]:
    return ["finetune", "--base", str(tmp / base), "--out", str(tmp / out), *RUN, *flags]


def assert_refused(argv: list[str], tmp: Path, capsys, says: str) -> None:
    """One error line naming ``says``, exit 2, and the tree under tmp unchanged."""
    capsys.readouterr()
    before = tree(tmp)
    outcome = run_cli(argv, capsys)
    lines = outcome.err.strip().splitlines()
    assert outcome.crash is None, outcome.err[-600:]
    assert outcome.status == 2 and len(lines) == 1, outcome.err[-600:]
    assert lines[0].startswith(f"minilora {argv[0]}: error: ") and says in lines[0], lines[0]
    after = tree(tmp)
    assert after == before, {k: (before.get(k), after.get(k)) for k in before.keys() | after}


# ------------------------------------------------ 1. --overwrite and the run's own inputs
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_overwrite_refuses_to_delete_the_base_it_fine_tunes(tmp, capsys, full):
    """``pretrain --out base`` then ``finetune --base base/model --out base --overwrite``:
    --overwrite would remove base/model/config.json, the model it is about to load."""
    shutil.copytree(tmp / "run" / "train", tmp / "base_run" / "train")  # a pretrain-like run
    shutil.copytree(tmp / "base", tmp / "base_run" / "model")
    argv = finetune(
        tmp, "--overwrite", *(["--full"] if full else []), base="base_run/model", out="base_run"
    )
    assert_refused(argv, tmp, capsys, says="base_run/model")


@pytest.mark.parametrize("text", ["train/metrics.jsonl", "adapter/adapter_config.json"])
def test_overwrite_refuses_to_delete_the_text_it_trains_on(tmp, capsys, text):
    """--text names a file of the run that --overwrite replaces."""
    argv = finetune(tmp, "--overwrite", "--text", str(tmp / "run" / text))
    assert_refused(argv, tmp, capsys, says=text)


# ------------------------------------------------------ 3. --resume without latest.json
def test_resume_without_latest_json_continues_from_the_newest_complete_checkpoint(tmp, capsys):
    """latest.json moved away: --resume recovers ckpt-000004 (complete: both files, the
    last one written last) instead of deleting it; the finished run ends as it was."""
    train = tmp / "run" / "train"
    kept = {p.name: p.read_bytes() for p in (train / "ckpt-000004").iterdir()}
    metrics = (train / "metrics.jsonl").read_bytes()
    adapter = tree(tmp / "run" / "adapter")
    shutil.move(train / "latest.json", tmp / "moved-latest.json")
    before = tree(tmp)
    outcome = run_cli(finetune(tmp, "--resume"), capsys)
    assert outcome.status == 0 and outcome.crash is None, outcome.err[-600:]
    assert "resuming from ckpt-000004" in outcome.out
    assert {p.name: p.read_bytes() for p in (train / "ckpt-000004").iterdir()} == kept
    assert json.loads((train / "latest.json").read_text())["checkpoint"] == "ckpt-000004"
    assert (train / "metrics.jsonl").read_bytes() == metrics
    assert tree(tmp / "run" / "adapter") == adapter
    after = tree(tmp)
    own = ("run/train", "run/adapter")
    outside = {k: v for k, v in before.items() if not k.startswith(own)}
    assert outside == {k: v for k, v in after.items() if not k.startswith(own)}


def test_resume_without_latest_json_or_a_complete_checkpoint_deletes_nothing(tmp, capsys):
    """Only a partial checkpoint (no trainer.json): refused, and the partial one is kept
    too (nothing is removed by a command that refuses)."""
    train = tmp / "run" / "train"
    (train / "latest.json").unlink()
    (train / "ckpt-000004" / "trainer.json").unlink()
    assert_refused(finetune(tmp, "--resume"), tmp, capsys, says="no complete checkpoint")


# ------------------------------------------------------------ 4. links in the run folder
def _link_train(tmp: Path) -> None:
    shutil.move(tmp / "run" / "train", tmp / "elsewhere")
    os.symlink(tmp / "elsewhere", tmp / "run" / "train", target_is_directory=True)


def _link_adapter(tmp: Path) -> None:
    shutil.move(tmp / "run" / "adapter", tmp / "elsewhere")
    os.symlink(tmp / "elsewhere", tmp / "run" / "adapter", target_is_directory=True)


def _link_latest(tmp: Path) -> None:
    shutil.move(tmp / "run" / "train" / "latest.json", tmp / "victim" / "latest.json")
    os.symlink(tmp / "victim" / "latest.json", tmp / "run" / "train" / "latest.json")


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
@pytest.mark.parametrize(
    ("link", "says"),
    [(_link_train, "train"), (_link_adapter, "adapter"), (_link_latest, "latest.json")],
    ids=["train", "adapter", "latest_json"],
)
def test_a_linked_run_folder_or_entry_is_refused(tmp, capsys, flag, link, says):
    """train/, adapter/ or latest.json a symbolic link: minilora neither writes nor
    deletes through it."""
    link(tmp)
    assert_refused(finetune(tmp, flag), tmp, capsys, says=f"{says} is a symbolic link")


# -------------------------------------- 5. the user's entries under minilora's names
def _metrics_folder(tmp: Path) -> None:
    metrics = tmp / "run" / "train" / "metrics.jsonl"
    metrics.unlink()
    metrics.mkdir()
    (metrics / "mine.txt").write_text("a user's folder that happens to have this name\n")


def _note_in_checkpoint(tmp: Path) -> None:
    (tmp / "run" / "train" / "ckpt-000004" / "notes.txt").write_text("my notes on step 4\n")


def _folder_named_like_a_checkpoint(tmp: Path) -> None:
    (tmp / "run" / "train" / "ckpt-000002").mkdir()
    (tmp / "run" / "train" / "ckpt-000002" / "plot.png").write_bytes(b"\x89PNG mine")


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
@pytest.mark.parametrize(
    ("prepare", "says"),
    [
        (_metrics_folder, "metrics.jsonl is a folder"),
        (_note_in_checkpoint, "notes.txt is not a file minilora writes"),
        (_folder_named_like_a_checkpoint, "plot.png is not a file minilora writes"),
    ],
    ids=["metrics_jsonl_folder", "note_in_checkpoint", "folder_named_ckpt"],
)
def test_a_users_entry_under_a_minilora_name_is_never_deleted(tmp, capsys, flag, prepare, says):
    """minilora removes only regular files and folders it made, by name and kind: a
    folder named metrics.jsonl, or a checkpoint folder holding anything but its two
    files, is refused before anything is removed."""
    prepare(tmp)
    assert_refused(finetune(tmp, flag), tmp, capsys, says=says)
