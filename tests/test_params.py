"""Tests for minilora.params: analytic counts, LoRA counts, memory and the live-model count."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

import minilora as ml
from minilora.core.params import (
    PRESETS,
    accounting_table,
    activation_bytes,
    count_architecture,
    count_parameters,
    format_accounting,
    lora_parameter_count,
    memory_estimate,
    module_key,
    preset,
    step_activation_bytes,
)

ARCH_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "d_model")


def arch(name: str) -> dict[str, int]:
    return count_architecture(**{k: PRESETS[name][k] for k in ARCH_KEYS})


# --------------------------------------------------------------------------- presets


def test_reference_presets_match_design_table():
    assert preset("tiny") == dict(
        vocab_size=65, d_model=32, n_layer=2, n_head=2, block_size=16, batch_size=4
    )
    assert preset("large")["d_model"] == 768 and preset("large")["block_size"] == 256
    assert set(PRESETS) == {"tiny", "small", "medium", "large", "gpt2", "gpt3-175b"}


def test_preset_returns_a_copy():
    p = preset("small")
    p["d_model"] = 1
    assert PRESETS["small"]["d_model"] == 128


def test_unknown_preset_lists_allowed_names():
    with pytest.raises(ValueError, match=r"'gpt4'.*allowed: tiny, small, medium, large, gpt2"):
        preset("gpt4")
    with pytest.raises(ValueError, match="allowed"):
        accounting_table("gpt4")


# --------------------------------------------------------------------------- architecture


def test_gpt2_total_is_the_known_number():
    counts = arch("gpt2")
    assert counts["total"] == 124_439_808
    assert counts["embeddings"] == 50257 * 768 + 1024 * 768
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_gpt3_175b_total():
    total = arch("gpt3-175b")["total"]
    assert total == 174_604_259_328
    assert abs(total - 174.6e9) < 0.05e9


def test_architecture_matches_a_live_model():
    """The analytic count equals the arrays a GPT allocates, group by group, and the
    LoRA count equals the A and B that add_adapter creates (layers subset included)."""
    cfg = ml.GPTConfig(vocab_size=65, block_size=16, n_layer=3, n_head=2, d_model=32)
    model = ml.GPT(cfg)
    counts = count_architecture(65, 16, 3, 2, 32)
    live = count_parameters(model)
    assert counts["total"] == live.total
    attention = sum(n for key, (n, _) in live.per_module.items() if ".attn." in key)
    mlp = sum(n for key, (n, _) in live.per_module.items() if ".mlp." in key)
    assert (counts["attention"], counts["mlp"]) == (attention, mlp)
    ml.add_adapter(model, ml.LoraConfig(r=3, target_modules=("q", "fc", "proj"), layers=(0, 2)))
    expected = lora_parameter_count(3, 32, 3, ("q", "fc", "proj"), layers=[0, 2])
    assert count_parameters(model).trainable == expected == 2 * 3 * (64 + 160 + 160)


def test_architecture_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible by n_head=5"):
        count_architecture(10, 8, 2, 5, 32)
    with pytest.raises(ValueError, match="n_layer=0"):
        count_architecture(10, 8, 0, 2, 32)


# --------------------------------------------------------------------------- LoRA counts


@pytest.mark.parametrize(
    "r, expected", [(1, 4_718_592), (4, 18_874_368), (8, 37_748_736)]
)  # the LoRA paper, GPT-3 175B, adapters on W_q and W_v
def test_lora_paper_numbers(r, expected):
    assert lora_parameter_count(96, 12288, r, ("q", "v")) == expected


def test_lora_mlp_targets_and_layers():
    d, r = 32, 2
    assert lora_parameter_count(1, d, r, ["fc"]) == r * (d + 4 * d)
    assert lora_parameter_count(1, d, r, ["proj"]) == r * (4 * d + d)
    assert lora_parameter_count(4, d, r, "q") == 4 * r * 2 * d
    assert lora_parameter_count(4, d, r, "q", layers=[0, 3]) == 2 * r * 2 * d


@pytest.mark.parametrize(
    "r, error",
    [(0, ValueError), (-2, ValueError), (2.5, TypeError), ("8", TypeError), (True, TypeError)],
)
def test_invalid_rank(r, error):
    with pytest.raises(error, match=r"r="):
        lora_parameter_count(2, 32, r, ("q",))
    with pytest.raises(error, match=r"r="):
        accounting_table("tiny", r=r)


@pytest.mark.parametrize("targets", [("q", "wte"), ("qv",), ("q", "q"), ()])
def test_invalid_targets(targets):
    with pytest.raises(ValueError, match="target"):
        lora_parameter_count(2, 32, 4, targets)


def test_unknown_target_lists_allowed():
    with pytest.raises(ValueError, match=r"'ln_1'.*allowed: q, k, v, o, fc, proj"):
        memory_estimate(preset("tiny"), 4, ("ln_1",))


def test_invalid_layers():
    with pytest.raises(ValueError, match=r"layers contains 4; allowed: 0\.\.3"):
        lora_parameter_count(4, 32, 2, "q", layers=[4])


# --------------------------------------------------------------------------- memory


def test_gpt3_checkpoint_sizes():
    full = memory_estimate(preset("gpt3-175b"), None, bytes_per_param=2)
    lora = memory_estimate(preset("gpt3-175b"), 4, ("q", "v"), bytes_per_param=2)
    assert 340e9 < full["checkpoint"] < 360e9  # ~350 GB
    assert lora["checkpoint"] == 18_874_368 * 2  # ~38 MB, tens of MB
    assert 10e6 < lora["checkpoint"] < 100e6


def test_memory_breakdown_full_vs_lora():
    cfg = preset("small")
    total = arch("small")["total"]
    full = memory_estimate(cfg, None, bytes_per_param=4)
    lora = memory_estimate(cfg, 8, ("q", "v"), bytes_per_param=4)
    n_lora = lora_parameter_count(4, 128, 8, ("q", "v"))
    assert full["weights"] == full["gradients"] == full["checkpoint"] == 4 * total
    assert full["optimizer"] == 12 * total  # AdamW: two fp32 moments and a work array
    assert lora["weights"] == 4 * (total + n_lora)  # the frozen base is still in memory
    assert lora["gradients"] == lora["checkpoint"] == 4 * n_lora
    assert lora["optimizer"] == 12 * n_lora
    # frozen linears without an adapter (k, o, fc, proj here) keep no input
    assert 0 < lora["activations"] < full["activations"]
    for m in (full, lora):
        parts = ("weights", "gradients", "optimizer", "activations")
        assert m["total"] == sum(m[k] for k in parts)
    assert memory_estimate(cfg, None, optimizer="sgd")["optimizer"] == 0


def test_activation_estimate_follows_korthikanti():
    cfg = preset("gpt2")
    s, b, d, a, L = 1024, 8, 768, 12, 12
    expected = L * s * b * d * (34 + 5 * a * s / d)
    assert activation_bytes(cfg, bytes_per_param=2) == pytest.approx(expected)
    # float32 activations take twice the bytes
    assert activation_bytes(cfg, bytes_per_param=4) == pytest.approx(2 * expected)


def test_step_activations_by_hand():
    """minilora's own caches, element by element (step_activation_bytes' docstring)."""
    cfg = preset("tiny")  # V 65, d 32, 2 layers, 2 heads, s 16, batch 4
    V, d, L, a, s, b = 65, 32, 2, 2, 16, 4
    working = 14 * d + V + 3 * a * s + 4 * d  # block 0's attention backward
    full = L * (20 * d + a * s + 2) + (2 * d + 1 + V) + working
    assert step_activation_bytes(cfg, None) == b * s * (4 * full + 17)
    # LoRA r=8 on q, v: ln_1's output kept for q and v; o, fc, proj keep no input
    lora = L * (13 * d + a * s + 2 + d + 2 * 8) + (d + 1 + V) + working
    assert step_activation_bytes(cfg, 8, ("q", "v")) == b * s * (4 * lora + 17)
    assert memory_estimate(cfg, 8, ("q", "v"))["activations"] == b * s * (4 * lora + 17)
    # every linear adapted keeps every input, as full fine-tuning, plus u per adapter
    all_six = step_activation_bytes(cfg, 8, ("q", "k", "v", "o", "fc", "proj"))
    assert all_six == step_activation_bytes(cfg, None) + b * s * 4 * (L * 6 * 8 - d)


def test_memory_estimate_bad_input():
    with pytest.raises(ValueError, match="optimizer='adam'.*allowed: adamw, sgd"):
        memory_estimate(preset("tiny"), None, optimizer="adam")
    cfg = preset("tiny")
    del cfg["batch_size"]
    with pytest.raises(ValueError, match="missing batch_size"):
        memory_estimate(cfg, None)


# --------------------------------------------------------------------------- the table


def test_accounting_table_is_json_able_and_consistent():
    table = accounting_table("gpt3-175b", r=4)
    round_tripped = json.loads(json.dumps(table))
    assert round_tripped == table
    assert table["bytes_per_param"] == 2
    assert table["total"] == 174_604_259_328
    assert table["trainable"] == table["lora"]["trainable"] == 18_874_368
    assert table["full"]["trainable"] == table["total"]
    assert table["lora"]["targets"] == ["q", "v"] and table["lora"]["r"] == 4
    assert table["ratio"] == pytest.approx(174_604_259_328 / 18_874_368)
    assert table["full"]["memory"]["checkpoint"] == 2 * table["total"]


def test_accounting_default_precision():
    assert accounting_table("gpt2")["bytes_per_param"] == 2
    assert accounting_table("small")["bytes_per_param"] == 4
    assert accounting_table("small", bytes_per_param=2)["bytes_per_param"] == 2


def test_format_accounting_shows_human_units():
    text = format_accounting(accounting_table("gpt3-175b", r=4))
    assert "174.6B" in text and "18.9M" in text
    assert "349.2 GB" in text and "37.7 MB" in text
    assert "LoRA r=4 (q, v)" in text
    lines = text.splitlines()
    # aligned: every row of the table has the same width
    rows = [ln for ln in lines if ln.startswith(("trainable params", "weights", "checkpoint"))]
    assert len(rows) == 3 and len({len(ln) for ln in rows}) == 1


# --------------------------------------------------------------------------- live models


def fake_model() -> SimpleNamespace:
    """A tiny stand-in for GPT: 1 block, d=4, V=5, T=3, LoRA r=2 on q (adapter 'default')."""
    d, V, T, r = 4, 5, 3, 2
    shapes = {
        "wte.weight": (V, d),
        "wpe.weight": (T, d),
        "h.0.ln_1.weight": (d,),
        "h.0.ln_1.bias": (d,),
        "h.0.attn.q.weight": (d, d),
        "h.0.attn.q.bias": (d,),
        "h.0.attn.q.lora_A.default": (r, d),
        "h.0.attn.q.lora_B.default": (d, r),
        "h.0.mlp.fc.weight": (4 * d, d),
        "h.0.mlp.fc.bias": (4 * d,),
        "ln_f.weight": (d,),
        "ln_f.bias": (d,),
    }
    params = {name: np.zeros(shape) for name, shape in shapes.items()}
    trainable = ["h.0.attn.q.lora_A.default", "h.0.attn.q.lora_B.default"]
    return SimpleNamespace(params=params, trainable_names=lambda: list(trainable))


def test_count_parameters_groups_and_ratio():
    pc = count_parameters(fake_model())
    assert pc.total == 20 + 12 + 8 + (16 + 4 + 8 + 8) + (64 + 16) + 8
    assert pc.trainable == 16
    assert pc.ratio == pytest.approx(16 / pc.total)
    assert list(pc.per_module) == ["wte", "wpe", "h.0.ln_1", "h.0.attn.q", "h.0.mlp.fc", "ln_f"]
    assert pc.per_module["h.0.attn.q"] == (36, 16)  # weight + bias + A + B; only A, B train
    assert pc.per_module["wte"] == (20, 0)


def test_count_parameters_str():
    pc = count_parameters(fake_model())
    text = str(pc)
    assert text.splitlines()[0].split() == ["module", "total", "trainable"]
    assert "h.0.attn.q" in text
    assert text.splitlines()[-1] == f"trainable: 16 of {pc.total:,} ({100 * 16 / pc.total:.2f}%)"


def test_count_parameters_bad_model():
    with pytest.raises(TypeError, match="params"):
        count_parameters(object())
    model = fake_model()
    model.trainable_names = lambda: ["h.9.attn.q.lora_A.x"]
    with pytest.raises(ValueError, match=r"h\.9\.attn\.q\.lora_A\.x"):
        count_parameters(model)


@pytest.mark.parametrize(
    "name, key",
    [
        ("wte.weight", "wte"),
        ("h.11.attn.v.bias", "h.11.attn.v"),
        ("h.0.mlp.proj.lora_B.task.v2", "h.0.mlp.proj"),
        ("h.0.attn.o.lora_A.default", "h.0.attn.o"),
    ],
)
def test_module_key(name, key):
    assert module_key(name) == key


def test_adam_state_bytes_follow_the_parameters_dtype():
    """AdamW keeps m and v like the parameters, plus one work array: 3 x bytes_per_param."""
    cfg = preset("small")
    for bpp in (2, 4, 8):
        full = memory_estimate(cfg, None, bytes_per_param=bpp)
        lora = memory_estimate(cfg, 8, ("q", "v"), bytes_per_param=bpp)
        assert full["optimizer"] == 3 * full["gradients"] == 3 * bpp * full["trainable"]
        assert lora["optimizer"] == 3 * bpp * lora_parameter_count(4, 128, 8, ("q", "v"))


def test_the_tiny_config_has_one_home():
    """params.PRESETS["tiny"] is the tiny config; preset_config builds its GPTConfig."""
    from minilora.core.params import preset_config

    tiny = preset_config("tiny")
    assert tiny == ml.GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, d_model=32)
    assert preset_config("small").d_model == preset("small")["d_model"]
    with pytest.raises(ValueError, match="preset 'huge' is not known"):
        preset_config("huge")
