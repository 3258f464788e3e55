"""--resume continues the same run or refuses what would make it another one.

- a text file edited since the run started is another run (its content's hash is a
  setting, not only its path);
- a checkpoint's tensors are checked where the trainer reads them: an int32, NaN or
  negative optimizer moment, or a missing one, is refused in one line naming the file;
- the device and the dtype are settings like the others;
- Ctrl-C before the first step leaves something the advice given can act on;
- resuming a finished run logs its final validation once.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import SMALL_GPT, train_config
from test_bad_inputs import edit_tensors, run_cli
from test_data_loss import (  # made_fixture, tmp_fixture: the fixtures made and tmp
    assert_refused,
    finetune,
    made_fixture,  # noqa: F401
    tmp_fixture,  # noqa: F401
    tree,
)

import minilora as ml
from minilora.training.data import ShiftTask
from minilora.training.train import Trainer

SMALL = ml.GPTConfig(**SMALL_GPT)


def lora_model(dtype="float32", device=None):
    model = ml.GPT(SMALL, seed=0, dtype=dtype, device=device)
    ml.add_adapter(model, ml.LoraConfig(r=2, alpha=4, target_modules=("q", "v")))
    return model


def trainer(out, model=None, steps=4, **kw):
    return Trainer(model or lora_model(), ShiftTask(), train_config(steps, **kw), out, False)


# ------------------------------------------------------------------ the text's content
CORPUS = "".join(f"copy {w}>{w}.\nrev {w}>{w[::-1]}.\n" for w in ("abc", "lorax", "zebra")) * 20


def test_resume_refuses_a_text_file_edited_since_the_run_started(tmp, capsys):
    """Same path, other content: refused, naming the text's hash; the same bytes
    rewritten (a newer mtime only) resume."""
    corpus = tmp / "corpus.txt"
    corpus.write_text(CORPUS)
    shutil.rmtree(tmp / "run")
    argv = finetune(tmp, "--text", str(corpus))
    assert run_cli(argv, capsys).status == 0
    corpus.write_text(CORPUS)  # the same content again: still the same run
    assert run_cli([*argv, "--resume"], capsys).status == 0
    corpus.write_text(CORPUS.replace("zebra", "quartz"))
    assert_refused([*argv, "--resume"], tmp, capsys, says="text_sha256")


# ------------------------------------------------------- the checkpoint's optimizer moments
def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _as_int32(t):
    key = _first(t, ".m")
    t[key] = (t[key] * 1e6).astype(np.int32)


def _nan_v(t):
    t[_first(t, ".v")][0, 0] = np.nan


def _negative_v(t):
    t[_first(t, ".v")][0, 0] = -1.0


def _no_v(t):
    del t[_first(t, ".v")]


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (_as_int32, "int32"),
        (_nan_v, "NaN"),
        (_negative_v, "negative"),
        (_no_v, "missing"),
    ],
    ids=["int32_moment", "nan_moment", "negative_second_moment", "missing_moment"],
)
def test_a_damaged_optimizer_moment_is_refused_naming_the_file(tmp, capsys, change, says):
    """Never cast, never accepted, never a KeyError: one line naming state.safetensors."""
    edit_tensors(tmp / "run" / "train" / "ckpt-000004" / "state.safetensors", change)
    argv = finetune(tmp, "--resume")
    assert_refused(argv, tmp, capsys, says="ckpt-000004/state.safetensors: opt.state.")
    assert_refused(argv, tmp, capsys, says=says)


# ------------------------------------------------------------------ device and dtype
def test_settings_record_the_device_and_the_dtype(tmp_path):
    trainer(tmp_path, checkpoint_every=2).run(until=2)
    settings = json.loads((tmp_path / "ckpt-000002" / "trainer.json").read_text())["settings"]
    assert (settings["device"], settings["dtype"]) == ("cpu", "float32")


def test_resume_refuses_another_dtype(tmp_path):
    trainer(tmp_path, checkpoint_every=2).run(until=2)
    with pytest.raises(ValueError, match="dtype 'float32' -> 'float64'"):
        trainer(tmp_path, lora_model("float64")).run(resume=True)


def test_resume_refuses_another_device(tmp_path, strict_gpu):
    """A run begun on the GPU (here the strict CuPy stand-in) is not continued on NumPy."""
    trainer(tmp_path, lora_model(device="gpu"), checkpoint_every=2).run(until=2)
    with pytest.raises(ValueError, match="device 'gpu' -> 'cpu'"):
        trainer(tmp_path, lora_model(device="cpu")).run(resume=True)


# --------------------------------------------------------- Ctrl-C before the first step
def test_ctrl_c_before_the_first_step_leaves_a_checkpoint_to_resume(tmp_path, monkeypatch, capsys):
    """Interrupted while measuring the thread count (before step 1): a step-0 checkpoint,
    so the advice printed ("continue with --resume") works, and the run ends as one."""
    first = Trainer(lora_model(), ShiftTask(), train_config(4), tmp_path, False, threads="auto")

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(first, "_measure_threads", interrupted)
    with pytest.raises(KeyboardInterrupt):
        first.run()
    assert "continue with --resume" in capsys.readouterr().out
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 0
    resumed = Trainer(lora_model(), ShiftTask(), train_config(4), tmp_path, False, threads="auto")
    resumed.run(resume=True)
    assert resumed.step == 4
    assert isinstance(resumed.settings["blas_threads"], int)  # measured now, then recorded


@pytest.mark.parametrize("flags", [[], ["--resume"]], ids=["again", "resume"])
def test_a_run_stopped_before_its_first_checkpoint_is_not_sent_to_resume(tmp, capsys, flags):
    """What a kill before the first checkpoint leaves (metrics, no checkpoint): both
    refusals advise --overwrite, which then works; neither advises --resume."""
    shutil.rmtree(tmp / "run")
    (tmp / "run" / "train").mkdir(parents=True)
    row = {"step": 0, "val_loss": 4.5, "val_char_acc": 0.0, "val_exact": 0.0}
    (tmp / "run" / "train" / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    argv = finetune(tmp, *flags)
    assert_refused(argv, tmp, capsys, says="nothing to resume")
    assert_refused(argv, tmp, capsys, says="--overwrite")
    capsys.readouterr()
    outcome = run_cli(finetune(tmp, "--overwrite"), capsys)
    assert outcome.status == 0, outcome.err[-500:]


def test_a_run_stopped_before_its_first_checkpoint_is_not_sent_to_resume_by_the_trainer(
    tmp_path,
):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 4.0}\n')
    with pytest.raises(ValueError, match="nothing to resume; replace it with --overwrite"):
        trainer(tmp_path).run()


# ------------------------------------------------------------------ a finished run
def test_resuming_a_finished_run_logs_its_final_validation_once(tmp_path):
    """Twice resumed, the finished run's log and checkpoint are byte-identical."""
    first = trainer(tmp_path)
    first.run()
    before = tree(tmp_path)
    for _ in range(2):
        again = trainer(tmp_path)
        again.run(resume=True)
        assert again.last_validation == first.last_validation
    assert tree(tmp_path) == before
