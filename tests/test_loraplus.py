"""LoRA+ (optim.py): B, and trainable 1-D vectors, learn at lr x ratio; A at lr."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SMALL_GPT, adapted_model, token_batch, train_config
from test_bad_inputs import TINY as CLI_TINY
from test_bad_inputs import TOKENIZER, run_cli
from test_data_loss import RUN

import minilora as ml
from minilora.core.optim import loraplus_groups
from minilora.files import checkpoints
from minilora.training.data import ShiftTask
from minilora.training.train import Trainer

DORA_Q_FC = ml.LoraConfig(r=2, target_modules=("q", "fc"), use_dora=True)


def test_the_groups_are_peft_s_rule_lora_B_and_every_trainable_vector_learn_faster():
    model = adapted_model(DORA_Q_FC)
    model.unfreeze("h.0.attn.q.bias", "ln_f.weight", "h.1.mlp.fc.weight")
    groups = loraplus_groups(model)
    assert set(groups["A"]) | set(groups["B"]) == set(model.trainable_names())
    assert "h.0.attn.q.lora_A.default" in groups["A"] and "h.1.mlp.fc.weight" in groups["A"]
    for name in ("h.0.attn.q.lora_B.default", "h.0.attn.q.lora_magnitude.default"):
        assert name in groups["B"]
    assert "h.0.attn.q.bias" in groups["B"] and "ln_f.weight" in groups["B"]
    assert all(".lora_A." in n or n.endswith(".weight") for n in groups["A"])


def test_a_step_moves_B_ratio_times_further_than_plain_adamw_and_A_the_same():
    """Adam's first step is lr m_hat / (sqrt(v_hat) + eps): lr x 16 moves B (and m) 16
    times as far; A moves exactly as without LoRA+. The schedule's lr still applies."""
    moves = {}
    for ratio in (None, 16.0):
        model = adapted_model(DORA_Q_FC)
        before = {n: model.params[n].copy() for n in model.trainable_names()}
        model.loss(*token_batch(model.config))
        model.backward()
        opt = ml.AdamW(model, lr=1e-3, loraplus_lr_ratio=ratio)
        opt.lr = 5e-4  # as the schedule would
        opt.step()
        moves[ratio] = {n: model.params[n] - before[n] for n in before}
    fast = set(loraplus_groups(adapted_model(DORA_Q_FC))["B"])
    for name, move in moves[None].items():
        factor = 16.0 if name in fast else 1.0
        np.testing.assert_allclose(moves[16.0][name], factor * move, rtol=1e-10, err_msg=name)
    assert ml.AdamW(adapted_model(DORA_Q_FC), lr=2e-3, loraplus_lr_ratio=4).lr_of(
        "h.0.attn.q.lora_magnitude.default"
    ) == pytest.approx(8e-3)


@pytest.mark.parametrize("ratio, error", [(0, ValueError), (-2.0, ValueError), ("16", TypeError)])
def test_a_bad_ratio_is_refused(ratio, error):
    with pytest.raises(error, match="loraplus_lr_ratio"):
        ml.AdamW(adapted_model(DORA_Q_FC), loraplus_lr_ratio=ratio)


def test_resume_keeps_the_ratio_and_refuses_another(tmp_path):
    cfg = ml.GPTConfig(**SMALL_GPT)

    def trainer(out, ratio=16.0):
        model = ml.GPT(cfg, seed=0, dtype="float64")
        ml.add_adapter(model, ml.LoraConfig(r=2, alpha=4, target_modules=("q", "v")))
        train = train_config(4, checkpoint_every=2, loraplus_lr_ratio=ratio)
        return Trainer(model, ShiftTask(), train, out, False)

    whole = trainer(tmp_path / "whole")
    whole.run()
    assert whole.opt.loraplus_lr_ratio == 16.0
    stopped = trainer(tmp_path / "stopped")
    stopped.run(until=2)
    stopped.save_checkpoint()
    with pytest.raises(ValueError, match="loraplus_lr_ratio 16.0 -> 4.0"):
        trainer(tmp_path / "stopped", ratio=4.0).run(resume=True)
    resumed = trainer(tmp_path / "stopped")
    resumed.run(resume=True)
    for name, value in whole.model.params.items():
        np.testing.assert_allclose(resumed.model.params[name], value, rtol=1e-12, err_msg=name)
    plain = trainer(tmp_path / "plain", ratio=None)
    plain.run()
    B = "h.0.attn.q.lora_B.default"
    assert not np.allclose(plain.model.params[B], whole.model.params[B])


def test_finetune_loraplus_ratio(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MINILORA_DEVICE", raising=False)
    base = tmp_path / "base"
    checkpoints.save_model(ml.GPT(CLI_TINY, seed=0), base, extra={"tokenizer": TOKENIZER.to_dict()})
    argv = ["finetune", "--base", str(base), "--out", str(tmp_path / "run"), *RUN]
    outcome = run_cli([*argv, "--loraplus-ratio", "16"], capsys)
    assert outcome.status == 0, outcome.err
    [ckpt] = sorted((tmp_path / "run" / "train").glob("ckpt-*/trainer.json"))[-1:]
    assert json.loads(ckpt.read_text())["settings"]["train"]["loraplus_lr_ratio"] == 16.0
    for flags, says in (
        (["--loraplus-ratio", "0"], "--loraplus-ratio"),
        (["--full", "--loraplus-ratio", "16"], "drop --full, or drop --loraplus-ratio"),
    ):
        refused = run_cli([*argv, "--overwrite", *flags], capsys)
        lines = refused.err.strip().splitlines()
        assert refused.status == 2 and len(lines) == 1 and says in lines[0], refused.err
