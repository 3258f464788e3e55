"""VeRA (core/vera.py and LoraConfig(use_vera=True)): the math, the shared seeded
matrices, and the adapter everywhere a LoRA adapter goes (merge, files, trainer,
resume, params, the CLI)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import (
    TINY,
    adapted_model,
    dropout_keep,
    move_trainable,
    random_model,
    rel_error,
    stopped_and_resumed,
    token_batch,
)
from test_bad_inputs import TINY as CLI_TINY
from test_bad_inputs import TOKENIZER, run_cli
from test_data_loss import RUN

import minilora as ml
from minilora.core import params
from minilora.core.gradcheck import gradcheck
from minilora.core.lora import LoraBranch, lora_linear_backward, lora_linear_forward
from minilora.core.params import count_parameters
from minilora.core.vera import (
    vera_backward,
    vera_delta_weight,
    vera_forward,
    vera_projection,
    vera_slices,
)
from minilora.files import checkpoints
from minilora.files.io import load_safetensors, save_safetensors

VERA = ml.LoraConfig(r=2, target_modules=("q", "v", "fc", "proj"), use_vera=True)


def branch(seed=0, d_in=6, d_out=4, r=3):
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.normal(size=(3, 5, d_in)),
        A=rng.normal(size=(r, d_in)),
        B=rng.normal(size=(d_out, r)),
        lambda_d=rng.normal(size=r),
        lambda_b=rng.normal(size=d_out),
    )


# ------------------------------------------------------------------------- the math
def test_the_branch_is_the_linear_with_delta_w_from_the_scaled_shared_matrices():
    """x W^T + b + λ_b ⊙ ((λ_d ⊙ x A^T) B^T) = x (W + ΔW)^T + b, ΔW = (λ_b ⊙ B)(λ_d ⊙ A)
    = diag(λ_b) B diag(λ_d) A: no alpha / r scale."""
    p, W, b = branch(), np.random.default_rng(1).normal(size=(4, 6)), np.arange(4.0)
    lambdas = (p["lambda_d"], p["lambda_b"])
    h, _ = lora_linear_forward(p["x"], W, b, [LoraBranch(p["A"], p["B"], 1.0, lambdas=lambdas)])
    dW = np.diag(p["lambda_b"]) @ p["B"] @ np.diag(p["lambda_d"]) @ p["A"]
    np.testing.assert_allclose(vera_delta_weight(p["A"], p["B"], *lambdas), dW, rtol=1e-12)
    np.testing.assert_allclose(h, p["x"] @ (W + dW).T + b, rtol=1e-12, atol=1e-12)


def test_with_dropout_the_branch_runs_on_the_dropped_out_input():
    p, keep = branch(), dropout_keep()
    delta, _ = vera_forward(p["x"], p["A"], p["B"], p["lambda_d"], p["lambda_b"], keep)
    expected = p["lambda_b"] * ((p["lambda_d"] * ((p["x"] * keep) @ p["A"].T)) @ p["B"].T)
    np.testing.assert_allclose(delta, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dropout", [False, True])
def test_the_backward_is_the_gradient_of_x_and_the_two_vectors(dropout):
    """Five-point finite differences in float64; A and B are frozen (no gradient)."""
    p, keep = branch(), dropout_keep() if dropout else None
    A, B = p.pop("A"), p.pop("B")
    results = gradcheck(
        lambda x, lambda_d, lambda_b: vera_forward(x, A, B, lambda_d, lambda_b, keep),
        vera_backward,
        p,
    )
    assert [r.name for r in results] == ["x", "lambda_d", "lambda_b"]
    assert all(r.passed() and not r.zero for r in results), results


def test_the_layer_gives_the_vectors_gradients_beside_a_stacked_lora_branch():
    """lora_linear_backward: a VeRA branch gives (dλ_d, dλ_b), a LoRA branch (dA, dB),
    and dx sums the base and both branches."""
    p, rng = branch(), np.random.default_rng(4)
    W, A2, B2 = rng.normal(size=(4, 6)), rng.normal(size=(2, 6)), rng.normal(size=(4, 2))
    vera = LoraBranch(p["A"], p["B"], 1.0, lambdas=(p["lambda_d"], p["lambda_b"]))
    h, cache = lora_linear_forward(p["x"], W, None, [vera, LoraBranch(A2, B2, 0.5)])
    dh = rng.normal(size=h.shape)
    dx, _, _, ((dld, dlb), (dA2, dB2)) = lora_linear_backward(dh, cache)
    _, c = vera_forward(p["x"], p["A"], p["B"], p["lambda_d"], p["lambda_b"])
    dx_v, dld_v, dlb_v = vera_backward(dh, c)
    np.testing.assert_allclose(dld, dld_v, rtol=1e-12)
    np.testing.assert_allclose(dlb, dlb_v, rtol=1e-12)
    assert dA2.shape == A2.shape and dB2.shape == B2.shape
    expected_dx = dh @ W + dx_v + 0.5 * (dh @ B2) @ A2
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-10, atol=1e-12)


def test_the_shared_matrices_are_seeded_kaiming_uniform_as_peft_draws_them():
    """A (r, d_in) then B (d_out, r), each U(-sqrt(6 / fan_in), +sqrt(6 / fan_in)) with
    fan_in the second side (PEFT's _kaiming_init: gain sqrt(2), bound sqrt(3) gain /
    sqrt(fan_in)); the same seed gives the same pair, another seed another."""
    A, B = vera_projection(4, 512, 300, seed=7)
    assert A.shape == (4, 512) and B.shape == (300, 4)
    bound_A, bound_B = math.sqrt(6 / 512), math.sqrt(6 / 4)
    assert np.abs(A).max() <= bound_A and np.abs(A).max() > 0.95 * bound_A
    assert np.abs(B).max() <= bound_B and np.abs(B).max() > 0.95 * bound_B
    np.testing.assert_array_equal(vera_projection(4, 512, 300, seed=7)[0], A)
    assert not np.array_equal(vera_projection(4, 512, 300, seed=8)[0], A)


def test_the_model_shares_one_pair_sliced_per_linear():
    """The pair spans the largest sides of the adapted linears ((4C, r) for B with fc,
    (r, 4C) for A with proj); q uses A[:, :C] and B[:C]: its ΔW is built from those."""
    model = move_trainable(adapted_model(VERA))
    C, r = TINY["d_model"], VERA.r
    A, B = model.vera_projection("default")
    assert A.shape == (r, 4 * C) and B.shape == (4 * C, r)
    A_q, B_q = vera_slices(A, B, C, C)
    np.testing.assert_array_equal(A_q, A[:, :C])
    ld, lb = (model.params[f"h.0.attn.q.vera_lambda_{k}.default"] for k in "db")
    W = model.params["h.0.attn.q.weight"].copy()
    ml.merge(model)
    np.testing.assert_allclose(
        model.params["h.0.attn.q.weight"], W + (lb[:, None] * B[:C]) @ (ld[:, None] * A[:, :C])
    )
    ml.unmerge(model)


# ------------------------------------------------------------------ the config
def test_config_refuses_the_combinations_that_make_no_sense():
    for bad, match in (
        (dict(use_dora=True), "use_dora"),
        (dict(use_rslora=True), "use_rslora"),
        (dict(init="pissa"), "init='pissa'"),
    ):
        with pytest.raises(ValueError, match=match):
            ml.LoraConfig(use_vera=True, **bad)
    with pytest.raises(ValueError, match="vera_seed=3 is a VeRA option"):
        ml.LoraConfig(vera_seed=3)
    with pytest.raises(ValueError, match="vera_d_initial"):
        ml.LoraConfig(vera_d_initial=0.5)
    with pytest.raises(ValueError, match="vera_seed"):
        ml.LoraConfig(use_vera=True, vera_seed=-1)
    with pytest.raises(TypeError, match="use_vera"):
        ml.LoraConfig(use_vera="yes")


def test_a_config_saved_before_vera_existed_still_loads_as_plain_lora():
    d = ml.LoraConfig().to_dict()
    for key in ("use_vera", "vera_d_initial", "vera_seed"):
        d.pop(key)
    assert ml.LoraConfig.from_dict(d) == ml.LoraConfig()


# -------------------------------------------------------------------- the adapter
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_new_vera_adapter_leaves_the_model_unchanged_and_starts_as_peft(dtype):
    """λ_b = 0 and λ_d = d_initial (0.1): ΔW = 0, so the logits are the base's exactly."""
    model = random_model(ml.GPTConfig(**TINY), seed=1, dtype=dtype).eval()
    idx, _ = token_batch(model.config)
    before = model.forward(idx)
    ml.add_adapter(model, VERA)
    np.testing.assert_array_equal(model.forward(idx), before)
    lambda_d = model.params["h.0.attn.q.vera_lambda_d.default"]
    np.testing.assert_array_equal(lambda_d, np.full(2, 0.1, dtype=model.dtype))
    np.testing.assert_array_equal(model.params["h.0.attn.q.vera_lambda_b.default"], 0.0)


def test_only_the_vectors_train_and_they_are_counted():
    """r + d_out per adapted matrix, the fewest of the family; A and B are not parameters."""
    model = adapted_model(VERA)
    assert all(".vera_lambda_" in n for n in model.trainable_names())
    assert len(model.trainable_names()) == 2 * TINY["n_layer"] * 4
    expected = params.lora_parameter_count(
        TINY["n_layer"], TINY["d_model"], 2, VERA.target_modules, vera=True
    )
    C = TINY["d_model"]
    assert expected == TINY["n_layer"] * (3 * (2 + C) + (2 + 4 * C))
    assert count_parameters(model).trainable == expected
    lora = params.lora_parameter_count(TINY["n_layer"], C, 2, VERA.target_modules)
    dora = params.lora_parameter_count(TINY["n_layer"], C, 2, VERA.target_modules, dora=True)
    assert expected < lora < dora
    assert model.base_names() == list(random_model(ml.GPTConfig(**TINY)).params)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_merge_gives_the_same_logits_and_unmerge_restores_W_bit_for_bit(dtype):
    model = move_trainable(adapted_model(VERA, dtype)).eval()
    idx, _ = token_batch(model.config)
    before = {n: model.params[n].copy() for n in model.base_names()}
    unmerged = model.forward(idx)
    ml.merge(model)
    tol = 1e-12 if dtype == "float64" else 1e-5
    assert rel_error(model.forward(idx), unmerged) < tol
    ml.unmerge(model)
    for name, value in before.items():
        np.testing.assert_array_equal(model.params[name], value, err_msg=name)


def test_vera_stacks_with_lora_but_cannot_be_combined():
    model = move_trainable(adapted_model(VERA))
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q",)), name="plain")
    ml.set_adapter(model, ["default", "plain"])  # updates add: stacking is fine
    idx, y = token_batch(model.config)
    model.loss(idx, y)
    model.backward()
    assert "h.0.attn.q.vera_lambda_b.default" in model.grads
    assert "h.0.attn.q.lora_B.plain" in model.grads
    for method in ("cat", "svd"):
        with pytest.raises(ValueError, match="uses VeRA"):
            ml.combine_adapters(model, ["default", "plain"], [1.0, 1.0], "both", method)


def test_deleting_a_vera_adapter_removes_its_shared_matrices():
    model = adapted_model(VERA)
    ml.delete_adapter(model, "default")
    with pytest.raises(KeyError):
        model.vera_projection("default")
    assert not any("vera" in n for n in model.params)


# ----------------------------------------------------------------------- files
def test_adapter_files_round_trip_with_the_shared_matrices(tmp_path):
    """The file holds λ_d, λ_b per module and vera_A, vera_B once (PEFT's
    save_projection=True): loading gives the same logits, whatever seed a new adapter
    would draw."""
    model = move_trainable(adapted_model(VERA)).eval()
    idx, _ = token_batch(model.config)
    checkpoints.save_adapter(model, tmp_path / "a")
    tensors, _ = load_safetensors(tmp_path / "a" / checkpoints.ADAPTER_WEIGHTS)
    assert {"vera_A", "vera_B", "h.0.attn.q.vera_lambda_d", "h.1.mlp.fc.vera_lambda_b"} <= set(
        tensors
    )
    assert not any("lora_" in k for k in tensors)
    fresh = random_model(ml.GPTConfig(**TINY), seed=1).eval()
    checkpoints.load_adapter(fresh, tmp_path / "a")
    np.testing.assert_array_equal(fresh.forward(idx), model.forward(idx))
    for kind, a, b in zip(
        "AB", fresh.vera_projection("default"), model.vera_projection("default"), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=kind)


@pytest.mark.parametrize("damage", ["drop_shared", "bad_shape", "nan_vector"])
def test_a_damaged_vera_file_is_refused_and_the_model_left_alone(tmp_path, damage):
    model = move_trainable(adapted_model(VERA))
    checkpoints.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / checkpoints.ADAPTER_WEIGHTS
    tensors, _ = load_safetensors(path)
    if damage == "drop_shared":
        del tensors["vera_B"]
    elif damage == "bad_shape":
        tensors["vera_A"] = tensors["vera_A"][:, :5]
    else:
        tensors["h.0.attn.v.vera_lambda_d"][0] = np.nan
    save_safetensors(path, tensors)
    fresh = random_model(ml.GPTConfig(**TINY), seed=1)
    names = list(fresh.params)
    with pytest.raises(ValueError, match="vera_B|vera_A|NaN"):
        checkpoints.load_adapter(fresh, tmp_path / "a")
    assert list(fresh.params) == names and not fresh.adapters


# ----------------------------------------------------------------- trainer and CLI
def test_a_vera_run_stopped_and_resumed_is_the_same_run(tmp_path):
    config = ml.LoraConfig(r=4, dropout=0.1, target_modules=("q", "v"), use_vera=True)
    whole, resumed = stopped_and_resumed(tmp_path, config)
    assert np.abs(whole.model.params["h.0.attn.q.vera_lambda_b.default"]).max() > 1e-4
    for name, value in whole.model.params.items():
        np.testing.assert_allclose(resumed.model.params[name], value, rtol=1e-12, err_msg=name)


def test_finetune_vera_saves_a_vera_adapter_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MINILORA_DEVICE", raising=False)
    base = tmp_path / "base"
    checkpoints.save_model(ml.GPT(CLI_TINY, seed=0), base, extra={"tokenizer": TOKENIZER.to_dict()})
    argv = ["finetune", "--base", str(base), "--out", str(tmp_path / "run"), *RUN, "--vera"]
    outcome = run_cli(argv, capsys)
    assert outcome.status == 0, outcome.err
    assert "VeRA r=8" in outcome.out
    meta = json.loads((tmp_path / "run" / "adapter" / checkpoints.ADAPTER_CONFIG).read_text())
    assert meta["lora_config"]["use_vera"] is True
    assert run_cli([*argv, "--resume"], capsys).status == 0
    for extra in (["--dora"], ["--init", "pissa"]):
        refused = run_cli([*argv[:-1], "--vera", *extra, "--overwrite"], capsys)
        assert refused.status == 2, refused.err
        assert refused.err.count("\n") == 1 and "use_vera" in refused.err


def test_params_counts_vera_vectors_in_the_accounting_and_on_the_command_line(capsys):
    """GPT-3 175B with r=4 on q and v: 96 * 2 * (4 + 12288) = 2,360,064 trainable
    numbers, against LoRA's 18,874,368."""
    assert params.lora_parameter_count(96, 12288, 4, ("q", "v"), vera=True) == 2_360_064
    outcome = run_cli(["params", "--preset", "gpt3-175b", "--rank", "4", "--vera"], capsys)
    assert outcome.status == 0 and "VeRA trains 2,360,064" in outcome.out
    table = params.accounting_table("gpt3-175b", r=4, vera=True)
    assert table["trainable"] == 2_360_064 and table["lora"]["vera"] is True
    shared = 4 * (12288 + 12288)  # A (4, 12288) and B (12288, 4): q and v are square
    memory = table["lora"]["memory"]
    assert memory["checkpoint"] == (2_360_064 + shared) * table["bytes_per_param"]
    assert memory["params"] == table["total"] + 2_360_064 + shared
    both = run_cli(["params", "--preset", "small", "--vera", "--dora"], capsys)
    assert both.status == 2 and "one or the other" in both.err
