"""The trainer: schedule, clipping, exact resume, NaN handling, checkpoints."""

import json
import math

import numpy as np
import pytest

import minilora as ml
from minilora.data import ShiftTask
from minilora.train import (
    TrainConfig,
    Trainer,
    TrainingDiverged,
    clip_gradients,
    learning_rate,
)

SMALL = ml.GPTConfig(vocab_size=96, block_size=24, n_layer=1, n_head=2, d_model=16)


def lora_model(seed=0, dropout=0.1):
    model = ml.GPT(SMALL, seed=seed)
    ml.add_adapter(model, ml.LoraConfig(r=2, alpha=4, dropout=dropout, target_modules=("q", "v")))
    return model


def config(steps, **kw):
    base = dict(
        steps=steps,
        batch_size=8,
        block_size=24,
        lr=1e-2,
        warmup=3,
        eval_every=0,
        eval_size=16,
        seed=5,
    )
    base.update(kw)
    return TrainConfig(**base)


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
        Trainer(full, ShiftTask(), config(4), out_dir=tmp_path, progress=False).run(resume=True)


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
