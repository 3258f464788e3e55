"""The trainer: schedule, clipping, exact resume, NaN handling, checkpoints."""

import json
import math
import os
import signal

import numpy as np
import pytest
from conftest import SMALL_GPT, train_config

import minilora as ml
from minilora.training.data import ShiftTask
from minilora.training.train import (
    TrainConfig,
    Trainer,
    TrainingDiverged,
    clip_gradients,
    learning_rate,
)

SMALL = ml.GPTConfig(**SMALL_GPT)


def lora_model(seed=0, dropout=0.1):
    model = ml.GPT(SMALL, seed=seed)
    ml.add_adapter(model, ml.LoraConfig(r=2, alpha=4, dropout=dropout, target_modules=("q", "v")))
    return model


config = train_config


def test_learning_rate_warmup_then_cosine():
    """Linear warm-up to lr, cosine down to lr * min_lr_ratio at the last step."""
    cfg = TrainConfig(steps=110, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert learning_rate(1, cfg) == pytest.approx(0.1)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)  # half-way down the cosine
    assert learning_rate(110, cfg) == pytest.approx(0.1)
    rates = [learning_rate(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(rates, rates[1:], strict=False))


def test_clip_gradients_scales_to_max_norm():
    """Global norm above the limit is scaled to it; below it nothing changes."""
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert clip_gradients(grads, 1.0) == pytest.approx(5.0)
    total = math.sqrt(sum((g**2).sum() for g in grads.values()))
    assert total == pytest.approx(1.0)
    small = {"a": np.array([0.3])}
    clip_gradients(small, 1.0)
    assert small["a"][0] == 0.3


def test_resume_equals_uninterrupted_run_bit_for_bit(tmp_path):
    """10 steps, checkpoint, 10 more after a resume == 20 steps in one go (NumPy)."""
    task = ShiftTask()
    straight = lora_model()
    Trainer(straight, task, config(20), out_dir=tmp_path / "a", progress=False).run()

    first = lora_model()  # the same run, stopped after step 10
    Trainer(first, task, config(20), out_dir=tmp_path / "b", progress=False).run(until=10)
    second = lora_model()  # a new process would rebuild the model the same way
    trainer = Trainer(second, task, config(20), out_dir=tmp_path / "b", progress=False)
    trainer.run(resume=True)
    assert trainer.step == 20
    for name in straight.params:
        np.testing.assert_array_equal(second.params[name], straight.params[name], err_msg=name)
    losses = [
        json.loads(line)
        for line in (tmp_path / "b" / "metrics.jsonl").read_text().split("\n")
        if line
    ]
    assert [r["step"] for r in losses if "loss" in r] == list(range(1, 21))


def test_training_reduces_loss():
    """A few dozen steps lower the training loss on the shift task."""
    model = ml.GPT(SMALL)
    history = Trainer(model, ShiftTask(), config(40, lr=3e-2), progress=False).run()
    losses = [r["loss"] for r in history if "loss" in r]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5


def test_nan_stops_with_checkpoint_intact(tmp_path):
    """A non-finite loss stops training, names the step, keeps the last checkpoint."""
    model = lora_model()
    trainer = Trainer(
        model, ShiftTask(), config(8, checkpoint_every=3), out_dir=tmp_path, progress=False
    )
    for _ in range(3):
        trainer.train_step()
    trainer.save_checkpoint()
    saved = (tmp_path / "ckpt-000003" / "state.safetensors").read_bytes()
    model.params["h.0.attn.q.lora_B.default"][...] = np.nan
    model.params["h.0.attn.q.lora_A.default"][...] = np.nan
    with pytest.raises(TrainingDiverged, match="step 4"):
        trainer.run()
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 3
    assert (tmp_path / "ckpt-000003" / "state.safetensors").read_bytes() == saved


def test_resume_refuses_other_trainable_set(tmp_path):
    """A LoRA checkpoint cannot be resumed into a full fine-tuning model."""
    Trainer(lora_model(), ShiftTask(), config(2), out_dir=tmp_path, progress=False).run()
    full = ml.GPT(SMALL)
    with pytest.raises(ValueError, match="do not match"):
        Trainer(full, ShiftTask(), config(2), out_dir=tmp_path, progress=False).run(resume=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps=0"),
        ({"lr": -1.0}, "lr=-1.0"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"grad_clip": -1.0}, "grad_clip"),
    ],
)
def test_train_config_errors(kwargs, match):
    """Bad training settings are ValueErrors that name the setting."""
    with pytest.raises(
        (ValueError, TypeError),  # TypeError: wrong kind
        match=match,
    ):
        TrainConfig(**kwargs)


def test_frozen_everything_is_an_error():
    """Training a model with nothing trainable is refused up front."""
    model = ml.GPT(SMALL)
    model.freeze("*")
    with pytest.raises(ValueError, match="no trainable"):
        Trainer(model, ShiftTask(), config(2), progress=False)


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, monkeypatch):
    """KeyboardInterrupt mid-run: a checkpoint at the last finished step, then re-raised."""
    model = lora_model()
    trainer = Trainer(model, ShiftTask(), config(10), out_dir=tmp_path, progress=False)
    real_step = trainer.train_step

    def interrupted_step():
        if trainer.step == 4:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(trainer, "train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert json.loads((tmp_path / "latest.json").read_text())["step"] == 4
    resumed = Trainer(lora_model(), ShiftTask(), config(10), out_dir=tmp_path, progress=False)
    resumed.run(resume=True)
    assert resumed.step == 10


# ------------------------------------------------------------- runs that never lose work
def trainer_at(out, steps=10, model=None, **kw):
    return Trainer(model or lora_model(), ShiftTask(), config(steps, **kw), out, progress=False)


def final_params(model):
    return {n: np.array(v) for n, v in model.params.items()}


def test_ctrl_c_mid_step_finishes_the_step_and_resumes_exactly(tmp_path, monkeypatch):
    """A real SIGINT in the middle of step 5 (while its batch is drawn): the step
    completes, is saved as step 5 with the optimizer at step 5, and the resumed run
    equals an uninterrupted one bit for bit."""
    straight = lora_model()
    trainer_at(tmp_path / "a", model=straight).run()

    task = ShiftTask()
    real_batch = task.batch

    def batch_with_ctrl_c(seed, *args):
        if trainer.step == 4:  # drawing step 5's batch
            os.kill(os.getpid(), signal.SIGINT)
        return real_batch(seed, *args)

    trainer = Trainer(lora_model(), task, config(10), tmp_path / "b", progress=False)
    monkeypatch.setattr(task, "batch", batch_with_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    saved = json.loads((tmp_path / "b" / "ckpt-000005" / "trainer.json").read_text())
    assert (saved["step"], saved["opt_t"]) == (5, 5)
    resumed_model = lora_model()
    trainer_at(tmp_path / "b", model=resumed_model).run(resume=True)
    for name, value in final_params(straight).items():
        np.testing.assert_array_equal(resumed_model.params[name], value, err_msg=name)


def test_resume_after_a_crash_cleans_up_and_is_exact(tmp_path):
    """What kill -9 in the middle of a checkpoint leaves (a partial ckpt folder, a
    temporary file, metrics logged after the last checkpoint) is cleaned on resume, and
    the run ends where an uninterrupted one does."""
    straight = lora_model()
    trainer_at(tmp_path / "a", model=straight).run()
    trainer_at(tmp_path / "b", checkpoint_every=3).run(until=7)  # checkpoint at 6
    out = tmp_path / "b"
    (out / "ckpt-000009").mkdir()  # a write that was cut short
    (out / "ckpt-000009" / "state.safetensors").write_bytes(b"half")
    (out / ".latest.json.0123456789ab.tmp").write_text("{")
    (out / "notes.txt").write_text("the user's own file")
    resumed = lora_model()
    trainer_at(out, model=resumed, checkpoint_every=3).run(resume=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "ckpt-000010",
        "latest.json",
        "metrics.jsonl",
        "notes.txt",
    ]
    for name, value in final_params(straight).items():
        np.testing.assert_array_equal(resumed.params[name], value, err_msg=name)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))  # 7 was not logged twice


@pytest.mark.parametrize("pointer", ["../victim", "/tmp", "ckpt-1", "ckpt-000001/../../victim"])
def test_latest_json_cannot_point_outside_the_run(tmp_path, pointer):
    """A hand-edited latest.json is refused, with and without --resume; nothing outside
    the run folder is read or deleted."""
    out, victim = tmp_path / "run", tmp_path / "victim"
    trainer_at(out, steps=2).run()
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (out / "latest.json").write_text(json.dumps({"checkpoint": pointer, "step": 2}))
    with pytest.raises(ValueError, match="names checkpoint"):
        trainer_at(out, steps=2).run(resume=True)
    with pytest.raises(ValueError, match="holds a previous run"):
        trainer_at(out, steps=2, checkpoint_every=1).save_checkpoint()
    overwriting = Trainer(lora_model(), ShiftTask(), config(2), out, False, overwrite=True)
    overwriting.run()  # replaces the run: removes our names only, follows no pointer
    assert (victim / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("changed", "says"),
    [
        (dict(lr=2e-2), "train.lr 0.01 -> 0.02"),
        (dict(seed=6), "train.seed 5 -> 6"),
        (dict(steps=12), "train.steps 10 -> 12"),
    ],
)
def test_resume_with_other_settings_is_refused(tmp_path, changed, says):
    trainer_at(tmp_path, checkpoint_every=2).run(until=4)
    with pytest.raises(ValueError, match=f"other settings: {says}"):
        trainer_at(tmp_path, **changed).run(resume=True)
    trainer_at(tmp_path, eval_every=2).run(resume=True)  # intervals do not change the result


def test_resume_with_another_lora_config_is_refused(tmp_path):
    settings = {"lora": {"alpha": 4.0}}
    Trainer(lora_model(), ShiftTask(), config(4), tmp_path, False, settings).run(until=2)
    other = {"lora": {"alpha": 256.0}}
    with pytest.raises(ValueError, match=r"lora.alpha 4.0 -> 256.0"):
        Trainer(lora_model(), ShiftTask(), config(4), tmp_path, False, other).run(resume=True)


def test_a_finished_run_is_not_replaced_silently(tmp_path):
    trainer_at(tmp_path, steps=2).run()
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="holds a previous run.*--overwrite"):
        trainer_at(tmp_path, steps=2).run()
    assert (tmp_path / "metrics.jsonl").read_text() == before
    Trainer(lora_model(), ShiftTask(), config(3), tmp_path, False, overwrite=True).run()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # only the new run's rows


def test_an_exploding_loss_stops_and_says_so_truthfully(tmp_path):
    """Full fine-tuning at lr 9.99: stopped with the step named, well before NaN, and
    the message says no checkpoint exists (none was written)."""
    model = ml.GPT(SMALL)
    trainer = trainer_at(tmp_path, steps=30, model=model, lr=9.99, warmup=0)
    with pytest.raises(TrainingDiverged, match=r"diverged at step \d+.*no checkpoint was written"):
        trainer.run()
    assert not (tmp_path / "latest.json").exists()


def test_a_huge_alpha_is_a_divergence_not_a_warning(tmp_path):
    """alpha 1e30 overflows the gradient norm: a clear stop, not zeroed gradients and a
    RuntimeWarning."""
    model = ml.GPT(SMALL)
    ml.add_adapter(model, ml.LoraConfig(r=2, alpha=1e30, target_modules=("q", "v")))
    ml.AdamW(model)  # the optimizer is not the issue
    with pytest.raises(TrainingDiverged, match="diverged at step"):
        trainer_at(None, steps=5, model=model).run()


def test_batch_size_beyond_memory_fails_before_allocating():
    with pytest.raises(ValueError, match=r"batch_size=100000000 needs about .* GB"):
        trainer_at(None, model=lora_model(), batch_size=100_000_000)


def test_validation_runs_in_eval_mode_and_training_in_training_mode():
    """evaluate switches to eval mode (no dropout) and gives the mode back; a training
    step puts the model in training mode, whatever it was in."""
    from minilora.training.train import evaluate

    model = lora_model(dropout=0.5)
    for name in model.trainable_names():  # B != 0, so that dropout changes the output
        model.params[name][...] = np.random.default_rng(2).normal(0, 0.3, model.params[name].shape)
    batch = ShiftTask().eval_batch(16, 24, seed=1)
    first = evaluate(model, batch)
    assert model.training  # given back as it was
    assert evaluate(model, batch) == first  # no dropout masks: the same every time
    model.eval()
    assert evaluate(model, batch) == first and not model.training
    trainer = Trainer(model, ShiftTask(), config(1), progress=False)
    trainer.train_step()
    assert model.training
