"""DoRA (core/dora.py and LoraConfig(use_dora=True)): the math, both backwards, and the
adapter everywhere a LoRA adapter goes (merge, files, trainer, resume, the CLI)."""

from __future__ import annotations

import json

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
from minilora.core.dora import dora_backward, dora_forward, dora_weight, weight_norm
from minilora.core.gradcheck import gradcheck
from minilora.core.lora import LoraBranch, lora_linear_backward, lora_linear_forward
from minilora.core.params import count_parameters
from minilora.files import checkpoints
from minilora.files.io import load_safetensors

DORA = ml.LoraConfig(r=2, alpha=4, target_modules=("q", "v", "fc"), use_dora=True)


def layer(seed=0, d_in=6, d_out=4, r=2):
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.normal(size=(3, 5, d_in)),
        W=rng.normal(size=(d_out, d_in)),
        A=rng.normal(size=(r, d_in)),
        B=rng.normal(size=(d_out, r)),
        m=rng.normal(1.0, 0.3, size=d_out),
    )


# ------------------------------------------------------------------------- the math
def test_the_forward_is_the_linear_with_the_decomposed_weight():
    """Without dropout, x W^T + b + the correction = x W'^T + b, W' = m ⊙ V / ||V|| with
    the norm per output feature (over d_in), so every row of W' has length |m_i|."""
    p, b, s = layer(), np.arange(4.0), 1.5
    h, _ = lora_linear_forward(p["x"], p["W"], b, [LoraBranch(p["A"], p["B"], s, None, p["m"])])
    V = p["W"] + s * p["B"] @ p["A"]
    W_prime = p["m"][:, None] * V / np.linalg.norm(V, axis=1, keepdims=True)
    np.testing.assert_allclose(h, p["x"] @ W_prime.T + b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(W_prime, axis=1), np.abs(p["m"]), rtol=1e-12)
    np.testing.assert_allclose(dora_weight(p["W"], p["A"], p["B"], p["m"], s), W_prime, rtol=1e-12)


def test_with_dropout_the_correction_runs_on_the_dropped_out_input_as_in_peft():
    """PEFT's form: h = x W^T + b + (g - 1) ⊙ (D(x) W^T) + g ⊙ s D(x) A^T B^T, g = m / n:
    not x W'^T + b, and not the base on the undropped x."""
    p, s, keep = layer(), 0.5, dropout_keep()
    delta, _ = dora_forward(p["x"], p["W"], p["A"], p["B"], p["m"], s, keep)
    g = p["m"] / np.linalg.norm(p["W"] + s * p["B"] @ p["A"], axis=1)
    xd = p["x"] * keep
    expected = (g - 1) * (xd @ p["W"].T) + g * (s * (xd @ p["A"].T) @ p["B"].T)
    np.testing.assert_allclose(delta, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dropout", [False, True])
def test_the_detached_backward_is_the_gradient_with_the_norm_held_fixed(dropout):
    """The default backward against finite differences of the forward with n held at its
    value (dora_forward(norm=...)): relative error below 1e-6 for x, A, B and m."""
    p, s = layer(1), 1.5
    keep = dropout_keep(1) if dropout else None
    n = weight_norm(p["W"], p["A"], p["B"], s)
    inputs = {k: p[k] for k in ("x", "A", "B", "m")}
    results = gradcheck(
        lambda x, A, B, m: dora_forward(x, p["W"], A, B, m, s, keep, norm=n),
        lambda dh, cache: dora_backward(dh, cache)[:4],
        inputs,
    )
    assert [r.name for r in results] == ["x", "A", "B", "m"]
    assert all(r.error < 1e-6 for r in results), [(r.name, r.error) for r in results]


@pytest.mark.parametrize("dropout", [False, True])
def test_the_exact_backward_is_the_gradient_of_the_forward_itself(dropout):
    """exact_grad=True follows n = ||W + s B A|| through A and B: finite differences of
    the full forward agree to 1e-6, and they disagree with the detached dA and dB (the
    difference the paper chose to drop), while dm and dx are the same in both."""
    p, s = layer(2), 1.5
    keep = dropout_keep(2) if dropout else None
    inputs = {k: p[k] for k in ("x", "A", "B", "m")}
    results = gradcheck(
        lambda x, A, B, m: dora_forward(x, p["W"], A, B, m, s, keep, exact_grad=True),
        lambda dh, cache: dora_backward(dh, cache)[:4],
        inputs,
    )
    assert all(r.error < 1e-6 for r in results), [(r.name, r.error) for r in results]
    dh = np.random.default_rng(0).normal(size=(3, 5, 4))
    args = (p["x"], p["W"], p["A"], p["B"], p["m"], s, keep)
    exact = dora_backward(dh, dora_forward(*args, exact_grad=True)[1])[:4]
    detached = dora_backward(dh, dora_forward(*args)[1])[:4]
    for name, e, d in zip("xABm", exact, detached, strict=True):
        if name in "xm":
            np.testing.assert_allclose(e, d, rtol=1e-12, atol=1e-12)
        else:
            assert rel_error(e, d) > 1e-3, name


def test_the_layer_with_a_dora_branch_and_a_trainable_W_is_gradient_checked():
    """lora_linear_forward/backward with a DoRA branch (exact): dx, dW (the base's plus
    the correction's, through the norm too), db, dA, dB, dm."""
    p, s, keep = layer(3), 2.0, dropout_keep(3)
    b = np.random.default_rng(3).normal(size=4)

    def forward(x, W, b, A, B, m):
        return lora_linear_forward(x, W, b, [LoraBranch(A, B, s, keep, m, True)])

    def backward(dh, cache):
        dx, dW, db, [(dA, dB, dm)] = lora_linear_backward(dh, cache)
        return dx, dW, db, dA, dB, dm

    inputs = dict(x=p["x"], W=p["W"], b=b, A=p["A"], B=p["B"], m=p["m"])
    results = gradcheck(forward, backward, inputs)
    assert all(r.error < 1e-6 for r in results), [(r.name, r.error) for r in results]


def test_norm_and_exact_grad_together_are_refused():
    p = layer()
    n = weight_norm(p["W"], p["A"], p["B"], 1.0)
    with pytest.raises(ValueError, match="norm= holds n fixed"):
        dora_forward(p["x"], p["W"], p["A"], p["B"], p["m"], 1.0, norm=n, exact_grad=True)


# ------------------------------------------------------------------------ the config
def test_config_checks_the_dora_options():
    with pytest.raises(TypeError, match="use_dora"):
        ml.LoraConfig(use_dora="yes")
    with pytest.raises(ValueError, match="dora_exact_grad=True .* needs use_dora=True"):
        ml.LoraConfig(dora_exact_grad=True)
    config = ml.LoraConfig(use_dora=True, dora_exact_grad=True)
    assert ml.LoraConfig.from_dict(config.to_dict()) == config


def test_a_config_saved_before_dora_existed_still_loads_as_plain_lora():
    old = ml.LoraConfig().to_dict()
    del old["use_dora"], old["dora_exact_grad"]
    assert ml.LoraConfig.from_dict(old) == ml.LoraConfig()


# ------------------------------------------------------------------------- the model
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_new_dora_adapter_leaves_the_model_unchanged_bit_for_bit(dtype):
    """m = ||W + s B A|| = ||W|| per row, computed as the forward computes n: g = 1."""
    model = random_model(ml.GPTConfig(**TINY), seed=1, dtype=dtype).eval()
    idx, _ = token_batch(model.config)
    before = model.forward(idx)
    ml.add_adapter(model, DORA)
    np.testing.assert_array_equal(model.forward(idx), before)
    m = model.params["h.0.mlp.fc.lora_magnitude.default"]
    assert m.shape == (4 * TINY["d_model"],) and m.dtype == model.dtype
    np.testing.assert_allclose(m, np.linalg.norm(model.params["h.0.mlp.fc.weight"], axis=1))


def test_the_magnitude_trains_and_is_counted():
    """Per adapted matrix r (d_in + d_out) + d_out trainable numbers, grouped under the
    linear they adapt; the magnitude gets a gradient, the base none."""
    model = adapted_model(DORA)
    C, n_layer = TINY["d_model"], TINY["n_layer"]
    per_layer = 2 * (2 * (C + C) + C) + (2 * (C + 4 * C) + 4 * C)  # q, v and fc
    count = count_parameters(model)
    assert count.trainable == n_layer * per_layer
    total, trainable = count.per_module["h.0.attn.q"]
    assert trainable == 2 * 2 * C + C and total == C * C + C + trainable
    idx, targets = token_batch(model.config)
    model.loss(idx, targets)
    model.backward()
    assert set(model.grads) == set(model.trainable_names())
    assert "h.0.attn.q.lora_magnitude.default" in model.grads


def test_exact_and_detached_model_gradients_differ_only_in_A_and_B():
    models = {}
    for exact in (False, True):
        config = ml.LoraConfig(**{**DORA.to_dict(), "dora_exact_grad": exact})
        model = move_trainable(adapted_model(config))
        idx, targets = token_batch(model.config)
        model.loss(idx, targets)
        model.backward()
        models[exact] = model.grads
    for name, g in models[False].items():
        error = rel_error(g, models[True][name])
        assert error > 1e-6 if ".lora_magnitude." not in name else error < 1e-12, name


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_merge_gives_the_same_logits_and_unmerge_restores_W_bit_for_bit(dtype):
    model = move_trainable(adapted_model(DORA, dtype)).eval()
    idx, _ = token_batch(model.config)
    W_before = {n: model.params[n].copy() for n in model.base_names()}
    unmerged = model.forward(idx)
    ml.merge(model)
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(model.forward(idx), unmerged, rtol=tol, atol=tol)
    W = model.params["h.0.attn.q.weight"]
    np.testing.assert_allclose(
        np.linalg.norm(W, axis=1), np.abs(model.params["h.0.attn.q.lora_magnitude.default"]), tol
    )
    ml.unmerge(model)
    for name, value in W_before.items():
        np.testing.assert_array_equal(model.params[name], value)


def test_dora_cannot_be_stacked_or_combined():
    model = adapted_model(DORA)
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q",)), name="plain")
    with pytest.raises(ValueError, match="uses DoRA.*cannot be stacked"):
        ml.set_adapter(model, ["default", "plain"])
    for method in ("cat", "svd"):
        with pytest.raises(ValueError, match="'default' uses DoRA.*cannot be combined"):
            ml.combine_adapters(model, ["default", "plain"], [1.0, 1.0], "both", method=method)
    assert model.active_adapters == ["plain"] and set(model.adapters) == {"default", "plain"}
    ml.set_adapter(model, "default")  # alone, switching back and forth is fine
    with pytest.warns(UserWarning, match="'plain' is active now"):
        ml.delete_adapter(model, "default")
    assert not any(".lora_magnitude." in n for n in model.params)


# ------------------------------------------------------------------------- the files
def test_adapter_files_round_trip_with_the_magnitude(tmp_path):
    model = move_trainable(adapted_model(DORA)).eval()
    idx, _ = token_batch(model.config)
    expected = model.forward(idx)
    checkpoints.save_adapter(model, tmp_path / "a")
    fresh = random_model(ml.GPTConfig(**TINY), seed=1).eval()
    name = checkpoints.load_adapter(fresh, tmp_path / "a")
    np.testing.assert_array_equal(fresh.forward(idx), expected)
    assert fresh.adapters[name].config == DORA
    tensors, _ = load_safetensors(tmp_path / "a" / checkpoints.ADAPTER_WEIGHTS)
    assert "h.0.attn.q.lora_magnitude_vector" in tensors


def test_an_adapter_file_without_its_magnitudes_is_refused(tmp_path):
    model = adapted_model(DORA)
    checkpoints.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / checkpoints.ADAPTER_CONFIG
    meta = json.loads(path.read_text())
    meta["lora_config"]["use_dora"] = False  # the file's magnitudes are now unexpected
    path.write_text(json.dumps(meta))
    fresh = random_model(ml.GPTConfig(**TINY), seed=1)
    with pytest.raises(ValueError, match="unexpected.*lora_magnitude_vector"):
        checkpoints.load_adapter(fresh, tmp_path / "a")
    assert not fresh.adapters


# ----------------------------------------------------------------- trainer and CLI
def test_a_dora_run_stopped_and_resumed_is_the_same_run(tmp_path):
    config = ml.LoraConfig(r=2, alpha=4, dropout=0.1, target_modules=("q", "v"), use_dora=True)
    whole, resumed = stopped_and_resumed(tmp_path, config)
    m = "h.0.attn.q.lora_magnitude.default"
    init = np.linalg.norm(whole.model.params["h.0.attn.q.weight"], axis=1)  # m's init
    assert rel_error(whole.model.params[m], init) > 1e-4  # the magnitude did train
    for name, value in whole.model.params.items():
        np.testing.assert_allclose(resumed.model.params[name], value, rtol=1e-12, err_msg=name)


def test_finetune_dora_saves_a_dora_adapter_and_resumes(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MINILORA_DEVICE", raising=False)
    base = tmp_path / "base"
    checkpoints.save_model(ml.GPT(CLI_TINY, seed=0), base, extra={"tokenizer": TOKENIZER.to_dict()})
    argv = ["finetune", "--base", str(base), "--out", str(tmp_path / "run"), *RUN, "--dora"]
    outcome = run_cli(argv, capsys)
    assert outcome.status == 0, outcome.err
    assert "DoRA r=8" in outcome.out
    meta = json.loads((tmp_path / "run" / "adapter" / checkpoints.ADAPTER_CONFIG).read_text())
    assert meta["lora_config"]["use_dora"] is True
    assert run_cli([*argv, "--resume"], capsys).status == 0
    refused = run_cli([*argv[:-1], "--full", "--dora", "--overwrite"], capsys)
    assert refused.status == 2 and "--dora" in refused.err


def test_params_counts_dora_magnitudes_in_the_accounting_and_on_the_command_line(capsys):
    """d_out more trainable numbers per adapted matrix: for GPT-3 175B with r=4 on q and
    v, 96 * 2 * 12288 = 2,359,296 more than LoRA's 18,874,368."""
    from minilora.core import params

    lora = params.lora_parameter_count(96, 12288, 4, ("q", "v"))
    assert params.lora_parameter_count(96, 12288, 4, ("q", "v"), dora=True) == lora + 2_359_296
    model = adapted_model(DORA)
    expected = params.lora_parameter_count(
        TINY["n_layer"], TINY["d_model"], 2, DORA.target_modules, dora=True
    )
    assert count_parameters(model).trainable == expected
    outcome = run_cli(["params", "--preset", "gpt3-175b", "--rank", "4", "--dora"], capsys)
    assert outcome.status == 0 and "DoRA trains 21,233,664" in outcome.out
    table = params.accounting_table("gpt3-175b", r=4, dora=True)
    assert table["trainable"] == 21_233_664 and table["lora"]["dora"] is True


def test_a_lora_run_started_before_dora_existed_still_resumes(tmp_path, capsys, monkeypatch):
    """Its checkpoints' settings have no use_dora / dora_exact_grad: a plain LoRA run's
    settings leave them out too, so --resume finds nothing changed; --dora is a change."""
    monkeypatch.delenv("MINILORA_DEVICE", raising=False)
    base = tmp_path / "base"
    checkpoints.save_model(ml.GPT(CLI_TINY, seed=0), base, extra={"tokenizer": TOKENIZER.to_dict()})
    argv = ["finetune", "--base", str(base), "--out", str(tmp_path / "run"), *RUN]
    assert run_cli(argv, capsys).status == 0
    for path in (tmp_path / "run" / "train").glob("ckpt-*/trainer.json"):
        assert "use_dora" not in json.loads(path.read_text())["settings"]["lora"]
    assert run_cli([*argv, "--resume"], capsys).status == 0
    changed = run_cli([*argv, "--resume", "--dora"], capsys)
    assert changed.status == 2 and "lora.use_dora None -> True" in changed.err


def test_dora_on_a_pissa_split_starts_at_the_base_and_gives_W_back(tmp_path):
    """With init="pissa", W holds the residual and m = ||W_res + s B0 A0|| = ||W||: the
    model starts where the base was (to rounding), and deleting the adapter restores W."""
    model = random_model(ml.GPTConfig(**TINY), seed=1).eval()
    idx, _ = token_batch(model.config)
    before = model.forward(idx)
    W = model.params["h.0.attn.q.weight"].copy()
    config = ml.LoraConfig(r=2, target_modules=("q", "v"), init="pissa", use_dora=True)
    ml.add_adapter(model, config)
    np.testing.assert_allclose(model.forward(idx), before, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        model.params["h.0.attn.q.lora_magnitude.default"], np.linalg.norm(W, axis=1), rtol=1e-12
    )
    checkpoints.save_adapter(model, tmp_path / "a")
    ml.delete_adapter(model, "default")
    np.testing.assert_array_equal(model.params["h.0.attn.q.weight"], W)
    checkpoints.load_adapter(model, tmp_path / "a")
    np.testing.assert_allclose(model.forward(idx), before, rtol=1e-10, atol=1e-12)
