"""One test per statement we teach about LoRA, plus gradient checks and adapter files."""

import json
import warnings

import numpy as np
import pytest
from conftest import random_model, randomise_adapters
from conftest import token_batch as batch

import minilora as ml
from minilora.core.gradcheck import check_gradients, gradcheck
from minilora.core.layers import dropout_mask
from minilora.core.lora import lora_backward, lora_forward

ALL = ml.TARGET_MODULES


# --------------------------------------------------------------------- the pair
def test_lora_linear_pair_gradcheck_with_dropout_mask():
    """dx, dA, dB of the LoRA layer match finite differences (fixed dropout mask)."""
    rng = np.random.default_rng(0)
    d_in, d_out, r = 6, 5, 3
    x = rng.normal(size=(2, 4, d_in))
    mask = dropout_mask(x.shape, 0.4, np.random.default_rng(1), np.dtype("float64"))
    inputs = dict(
        x=x,
        W=rng.normal(size=(d_out, d_in)),
        b=rng.normal(size=d_out),
        A=rng.normal(size=(r, d_in)),
        B=rng.normal(size=(d_out, r)),
    )

    def forward(x, W, b, A, B):
        return ml.lora_linear_forward(x, W, b, [ml.LoraBranch(A, B, 2.5, mask)])

    def backward(dh, cache):  # (dx, dW, db, dA, dB): W and b are frozen, so None
        dx, dW, db, [(dA, dB)] = ml.lora_linear_backward(dh, cache, need_dW=False, need_db=False)
        assert dW is None and db is None  # frozen: dW is never formed
        return dx, None, None, dA, dB

    results = gradcheck(forward, backward, inputs)
    assert [r.name for r in results] == ["x", "A", "B"]
    assert all(r.passed() for r in results), ml.format_report(results)

    def backward_all(dh, cache):  # the same layer with W and b trainable too
        dx, dW, db, [(dA, dB)] = ml.lora_linear_backward(dh, cache, need_dW=True, need_db=True)
        return dx, dW, db, dA, dB

    results = gradcheck(forward, backward_all, inputs)
    assert [r.name for r in results] == ["x", "W", "b", "A", "B"]
    assert all(r.passed() for r in results), ml.format_report(results)


def test_stacked_lora_layer_is_the_sum_of_its_branches():
    """Two branches: h = base + branch 1 + branch 2, and every gradient checks out."""
    rng = np.random.default_rng(5)
    x, W, b = rng.normal(size=(2, 3, 6)), rng.normal(size=(4, 6)), rng.normal(size=4)
    mask = dropout_mask(x.shape, 0.3, np.random.default_rng(2), np.dtype("float64"))
    inputs = dict(x=x, A1=rng.normal(size=(2, 6)), B1=rng.normal(size=(4, 2)))
    inputs.update(A2=rng.normal(size=(3, 6)), B2=rng.normal(size=(4, 3)))

    def forward(x, A1, B1, A2, B2):
        branches = [ml.LoraBranch(A1, B1, 2.0, mask), ml.LoraBranch(A2, B2, 0.5)]
        return ml.lora_linear_forward(x, W, b, branches)

    def backward(dh, cache):
        dx, _, _, [(dA1, dB1), (dA2, dB2)] = ml.lora_linear_backward(dh, cache)
        return dx, dA1, dB1, dA2, dB2

    h, _ = forward(**inputs)
    expected = x @ W.T + b + 2.0 * ((x * mask) @ inputs["A1"].T) @ inputs["B1"].T
    expected += 0.5 * (x @ inputs["A2"].T) @ inputs["B2"].T
    np.testing.assert_allclose(h, expected, rtol=1e-12)
    results = gradcheck(forward, backward, inputs)
    assert all(r.passed() for r in results), ml.format_report(results)


def test_lora_backward_skips_frozen_factors():
    """need_dA / need_dB = False return None, and dx is unchanged."""
    rng = np.random.default_rng(0)
    x, A, B = rng.normal(size=(4, 6)), rng.normal(size=(2, 6)), rng.normal(size=(5, 2))
    dh = rng.normal(size=(4, 5))
    _, cache = lora_forward(x, A, B, 0.5)
    dx_all, dA, dB = lora_backward(dh, cache)
    dx_none, dA_none, dB_none = lora_backward(dh, cache, need_dA=False, need_dB=False)
    assert dA_none is None and dB_none is None
    np.testing.assert_array_equal(dx_all, dx_none)
    # and the closed forms of docs/DESIGN.md, "LoRA math", written out once more
    u = x @ A.T
    np.testing.assert_allclose(dB, 0.5 * dh.T @ u)
    np.testing.assert_allclose(dA, (0.5 * dh @ B).T @ x)


def test_low_rank_order_equals_merged_weight():
    """s (x A^T) B^T equals x (s B A)^T: the two orders compute the same update."""
    rng = np.random.default_rng(0)
    x, A, B = rng.normal(size=(7, 6)), rng.normal(size=(2, 6)), rng.normal(size=(5, 2))
    delta, _ = lora_forward(x, A, B, 1.5)
    np.testing.assert_allclose(delta, x @ ml.delta_weight(A, B, 1.5).T, rtol=1e-12)


# ------------------------------------------------------------- whole-model checks
@pytest.mark.parametrize("use_rslora", [False, True])
def test_whole_model_gradcheck_all_targets(tiny_config, use_rslora):
    """Every A and B of adapters on all six targets matches finite differences."""
    model = random_model(tiny_config)
    cfg = ml.LoraConfig(r=2, alpha=3.0, dropout=0.2, target_modules=ALL, use_rslora=use_rslora)
    ml.add_adapter(model, cfg)
    randomise_adapters(model)
    idx, targets = batch(tiny_config)

    def loss():
        model.reseed(7)  # the same dropout masks at every evaluation
        return model.loss(idx, targets)  # training mode: dropout on

    loss()
    model.backward()
    assert sorted(model.grads) == sorted(model.trainable_names())
    assert all(".lora_" in n for n in model.grads), "base weights must get no gradient buffer"
    results = check_gradients(loss, {n: model.params[n] for n in model.grads}, model.grads)
    assert len(results) == 2 * 6 * tiny_config.n_layer
    assert all(r.passed() for r in results), ml.format_report(results)


def test_rslora_scale():
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
    assert ml.LoraConfig(r=16, alpha=32).scale == 2.0
    assert ml.LoraConfig(r=16, alpha=32, use_rslora=True).scale == 8.0


# --------------------------------------------------------------- init invariants
@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_adapted_model_equals_base_at_init(tiny_config, init):
    """B = 0, so ΔW = BA = 0: the adapted model's logits equal the base's exactly."""
    model = ml.GPT(tiny_config, seed=3)
    idx, _ = batch(tiny_config)
    before = model.forward(idx)
    ml.add_adapter(model, ml.LoraConfig(r=4, target_modules=ALL, init=init))
    assert all(not model.params[n].any() for n in model.params if ".lora_B." in n)
    assert all(model.params[n].std() > 0 for n in model.params if ".lora_A." in n)
    np.testing.assert_array_equal(model.forward(idx), before)


def test_gaussian_and_kaiming_statistics(tiny_config):
    """gaussian: A ~ N(0, 1/r^2); kaiming: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    model = ml.GPT(ml.GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, d_model=256))
    ml.add_adapter(model, ml.LoraConfig(r=8, target_modules=("fc",), init="gaussian"), "g")
    A = model.params["h.0.mlp.fc.lora_A.g"]
    assert abs(A.std() - 1 / 8) < 0.01 and abs(A.mean()) < 0.01
    ml.add_adapter(model, ml.LoraConfig(r=8, target_modules=("proj",), init="kaiming"), "k")
    A = model.params["h.0.mlp.proj.lora_A.k"]  # d_in = 4 * 256
    assert np.abs(A).max() <= 1 / np.sqrt(1024) and A.std() > 0.8 / np.sqrt(3 * 1024)


def test_pissa_keeps_outputs_and_restores_on_delete(tiny_config):
    """PiSSA: W_res + s B A = W, so outputs match at init; delete gives W back."""
    model = random_model(tiny_config)
    idx, _ = batch(tiny_config)
    before = model.forward(idx)
    W0 = model.params["h.0.attn.q.weight"].copy()
    ml.add_adapter(model, ml.LoraConfig(r=4, alpha=8, target_modules=ALL, init="pissa"))
    assert model.params["h.0.mlp.fc.lora_B.default"].any()  # not zero: the top of W
    np.testing.assert_allclose(model.forward(idx), before, rtol=1e-12, atol=1e-12)
    ml.delete_adapter(model, "default")
    np.testing.assert_allclose(model.params["h.0.attn.q.weight"], W0, rtol=1e-12, atol=1e-14)


# -------------------------------------------------------------- trainability
def test_add_adapter_freezes_everything_else(tiny_config):
    """Only the new A and B are trainable; embeddings and layer norms are frozen."""
    model = ml.GPT(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q", "v"), layers=(1,)))
    assert model.trainable_names() == [
        "h.1.attn.q.lora_A.default",
        "h.1.attn.q.lora_B.default",
        "h.1.attn.v.lora_A.default",
        "h.1.attn.v.lora_B.default",
    ]
    count = ml.count_parameters(model)
    assert count.trainable == 2 * 2 * (32 + 32)
    assert "trainable" in str(count)


def test_training_changes_only_adapters(tiny_config):
    """After AdamW steps, every base parameter is bit-identical; A and B moved."""
    model = ml.GPT(tiny_config, dtype="float64")
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q", "v", "fc")))
    base = {n: model.params[n].copy() for n in model.base_names()}
    opt = ml.AdamW(model, lr=1e-2)
    idx, targets = batch(tiny_config)
    for _ in range(3):
        model.loss(idx, targets)
        model.backward()
        opt.step()
    for n, v in base.items():
        np.testing.assert_array_equal(model.params[n], v)
    assert model.params["h.0.attn.q.lora_B.default"].any()
    assert set(opt.state) == set(model.trainable_names())


# ------------------------------------------------------------------- dropout
def test_dropout_changes_training_but_never_eval(tiny_config):
    """LoRA dropout acts on the adapter input in training only."""
    model = random_model(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=4, dropout=0.5, target_modules=ALL))
    randomise_adapters(model)
    idx, _ = batch(tiny_config)
    assert not np.allclose(model.forward(idx), model.forward(idx))  # training mode
    model.eval()
    eval_a, eval_b = model.forward(idx), model.forward(idx)
    np.testing.assert_array_equal(eval_a, eval_b)
    # eval equals the same adapter with dropout 0
    other = random_model(tiny_config)
    ml.add_adapter(other, ml.LoraConfig(r=4, dropout=0.0, target_modules=ALL))
    randomise_adapters(other)
    np.testing.assert_array_equal(other.forward(idx), eval_a)


def test_dropout_is_unbiased_in_expectation():
    """E[s (D(x) A^T) B^T] over masks equals the no-dropout branch (inverted scaling)."""
    rng = np.random.default_rng(0)
    x, A, B = rng.normal(size=(4, 16)), rng.normal(size=(3, 16)), rng.normal(size=(5, 3))
    exact, _ = lora_forward(x, A, B, 1.0)
    mask_rng = np.random.default_rng(1)
    n = 4000
    total = np.zeros_like(exact)
    for _ in range(n):
        mask = dropout_mask(x.shape, 0.3, mask_rng, np.dtype("float64"))
        total += lora_forward(x, A, B, 1.0, mask)[0]
    # each output is a sum of 16 terms; the Monte Carlo error shrinks as 1/sqrt(n)
    assert np.abs(total / n - exact).max() < 6 * np.abs(exact).max() / np.sqrt(n)


# ------------------------------------------------------ merge, stack, combine
def test_merge_equals_unmerged_and_unmerge_restores(tiny_config):
    """Merged and unmerged outputs agree; unmerge gives W back (float64 and float32)."""
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-5)):
        model = random_model(tiny_config, dtype=dtype)
        ml.add_adapter(model, ml.LoraConfig(r=4, alpha=8, target_modules=ALL))
        randomise_adapters(model)
        idx, _ = batch(tiny_config)
        W0 = model.params["h.1.mlp.fc.weight"].copy()
        unmerged = model.forward(idx)
        ml.merge(model)
        merged = model.forward(idx)
        assert np.linalg.norm(merged - unmerged) / np.linalg.norm(unmerged) <= tol
        ml.unmerge(model)
        rel = np.abs(model.params["h.1.mlp.fc.weight"] - W0).max() / np.abs(W0).max()
        assert rel <= tol


def test_unmerge_restores_w_exactly_where_subtracting_would_not(tiny_config):
    """Subtracting ΔW again rounds twice, fl(fl(W + ΔW) - ΔW), and misses W by up to an
    ulp of |W| + |ΔW|; unmerge puts back the W saved at merge time instead, so 100
    cycles leave W and the base's fingerprint bit for bit as they were (and adapters
    made for that base still fit it)."""
    model = random_model(tiny_config, dtype="float32")
    ml.add_adapter(model, ml.LoraConfig(r=4, alpha=8, target_modules=("q",)))
    randomise_adapters(model)
    W = model.params["h.0.attn.q.weight"]
    W0, fingerprint = W.copy(), model.base_fingerprint()
    dW = ml.delta_weight(
        model.params["h.0.attn.q.lora_A.default"], model.params["h.0.attn.q.lora_B.default"], 2.0
    )
    subtracted = (W0 + dW) - dW
    assert not np.array_equal(subtracted, W0)  # the rounding that unmerge avoids
    assert (np.abs(subtracted - W0) <= np.spacing(np.abs(W0) + np.abs(dW))).all()
    for _ in range(100):
        ml.merge(model)
        assert not np.array_equal(W, W0)
        ml.unmerge(model)
    np.testing.assert_array_equal(W, W0)
    assert model.base_fingerprint() == fingerprint and model.premerge_weights == {}


def test_training_while_merged_is_refused(tiny_config):
    """Merged adapters are part of W: training them is an error, not a silent no-op."""
    model = ml.GPT(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=2))
    ml.merge(model)
    idx, targets = batch(tiny_config)
    with pytest.raises(ValueError, match="unmerge"):
        model.loss(idx, targets)  # training mode
    model.eval().loss(idx, targets)  # evaluation is fine
    with pytest.raises(ValueError, match="unmerge"):
        ml.set_adapter(model, "default")


def test_stacked_adapters_add_their_updates(tiny_config):
    """Two active adapters give W + s1 B1 A1 + s2 B2 A2."""
    model = random_model(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=2, alpha=4, target_modules=("q", "v")), "a")
    ml.add_adapter(model, ml.LoraConfig(r=3, alpha=3, target_modules=("v", "fc")), "b")
    randomise_adapters(model)
    ml.set_adapter(model, ["a", "b"])
    idx, _ = batch(tiny_config)
    stacked = model.forward(idx)
    # the same thing written as one merged model
    ref = random_model(tiny_config)
    for adapter in model.adapters.values():
        for module in adapter.modules:
            A = model.params[f"{module}.lora_A.{adapter.name}"]
            B = model.params[f"{module}.lora_B.{adapter.name}"]
            ref.params[f"{module}.weight"] += ml.delta_weight(A, B, adapter.config.scale)
    np.testing.assert_allclose(stacked, ref.forward(idx), rtol=1e-12, atol=1e-14)
    ml.disable_adapters(model)
    np.testing.assert_array_equal(model.forward(idx), random_model(tiny_config).forward(idx))


def test_combine_cat_is_exact_and_svd_reports_error(tiny_config):
    """cat: weighted sum of updates, exactly; svd: best rank-r with its error."""
    model = random_model(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=2, alpha=4, target_modules=("q", "v")), "a")
    ml.add_adapter(model, ml.LoraConfig(r=3, alpha=3, target_modules=("v",)), "b")
    randomise_adapters(model)
    idx, _ = batch(tiny_config)
    ml.set_adapter(model, "a")
    out_a = model.forward(idx)
    errors = ml.combine_adapters(model, ["a", "b"], [1.0, 0.5], "ab", method="cat")
    assert set(errors.values()) == {0.0}
    assert model.active_adapters == ["a"]  # combining does not switch
    assert model.adapters["ab"].config.r == 5
    # reference: a at weight 1 plus b at weight 0.5, written into W
    ref = random_model(tiny_config)
    for name, w in (("a", 1.0), ("b", 0.5)):
        for module in model.adapters[name].modules:
            A = model.params[f"{module}.lora_A.{name}"]
            B = model.params[f"{module}.lora_B.{name}"]
            scale = model.adapters[name].config.scale
            ref.params[f"{module}.weight"] += w * ml.delta_weight(A, B, scale)
    ml.set_adapter(model, "ab")
    np.testing.assert_allclose(model.forward(idx), ref.forward(idx), rtol=1e-12, atol=1e-14)
    assert not np.allclose(model.forward(idx), out_a)
    svd_errors = ml.combine_adapters(model, ["a", "b"], [1.0, 0.5], "ab2", method="svd", r=1)
    assert all(0 < e < 1 for m, e in svd_errors.items() if m.endswith(".v"))
    full = ml.combine_adapters(model, ["a", "b"], [1.0, 0.5], "ab5", method="svd", r=5)
    assert max(full.values()) < 1e-12  # rank 5 holds a rank <= 5 sum exactly


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"r": 0}, "r=0"),
        ({"r": 2.5}, "r=2.5"),
        ({"alpha": 0}, "alpha=0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"dropout": -0.1}, "dropout=-0.1"),
        ({"target_modules": ("q", "x")}, "'x'"),
        ({"target_modules": ("wte",)}, "embeddings"),
        ({"target_modules": ("ln_1",)}, "layer norms"),
        ({"target_modules": ()}, "empty"),
        ({"init": "zeros"}, "zeros"),
        ({"layers": (-1,)}, "layers"),
    ],
)
def test_lora_config_errors(kwargs, match):
    """Each bad LoraConfig value gets a ValueError that names it."""
    with pytest.raises(
        (ValueError, TypeError),  # TypeError: wrong kind
        match=match,
    ):
        ml.LoraConfig(**kwargs)


def test_adapter_management_errors(tiny_config):
    """Unknown names, duplicates, bad layers and r > min(d) are reported clearly."""
    model = ml.GPT(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=2))
    with pytest.raises(ValueError, match="exists already"):
        ml.add_adapter(model, ml.LoraConfig(r=2))
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        ml.set_adapter(model, "nope")
    with pytest.raises(ValueError, match="blocks 0..1"):
        ml.add_adapter(model, ml.LoraConfig(r=2, layers=(5,)), "far")
    with pytest.raises(ValueError, match="name"):
        ml.add_adapter(model, ml.LoraConfig(r=2), "has.dot")
    before = set(model.params)
    with pytest.raises(ValueError, match=r"r=40 exceeds \d+, the smallest side"):
        ml.add_adapter(model, ml.LoraConfig(r=40, target_modules=("q",)), "big")
    assert set(model.params) == before and "big" not in model.adapters


# ----------------------------------------------------------------- adapter files
@pytest.mark.parametrize("method", ["cat", "svd"])
def test_combined_mixed_adapters_round_trip_through_files(tiny_config, tmp_path, method):
    """q on every block combined with v on block 1 only: the result's config describes
    its modules exactly (v on block 0 gets zero factors), so it saves, loads into a
    fresh model and gives the same logits."""
    model = random_model(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=2, alpha=4, target_modules=("q",)), "a")
    ml.add_adapter(model, ml.LoraConfig(r=3, alpha=3, target_modules=("v",), layers=(1,)), "b")
    randomise_adapters(model)
    ml.combine_adapters(model, ["a", "b"], [1.0, -0.5], "ab", method=method)
    combined = model.adapters["ab"]
    assert combined.config.target_modules == ("q", "v") and combined.config.layers is None
    assert set(combined.modules) == {f"h.{i}.attn.{t}" for i in (0, 1) for t in "qv"}
    assert not model.params["h.0.attn.v.lora_B.ab"].any()  # no source adapts it: ΔW = 0
    ml.set_adapter(model, "ab")
    idx, _ = batch(tiny_config)
    expected = model.forward(idx)
    ml.save_adapter(model, tmp_path / "ab", name="ab")

    fresh = random_model(tiny_config)
    assert ml.load_adapter(fresh, tmp_path / "ab") == "ab"
    np.testing.assert_array_equal(fresh.forward(idx), expected)


@pytest.mark.parametrize("init", ["gaussian", "kaiming", "pissa"])
def test_rank_of_every_update_is_at_most_r(tiny_config, init):
    """rank(ΔW) <= r for trained-like factors of every init, and for combinations:
    cat has rank <= r_a + r_b, svd exactly the r it was asked for at most."""
    model = random_model(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=3, target_modules=ml.TARGET_MODULES, init=init), "a")
    if init != "pissa":  # PiSSA adapters cannot be combined: they rewrote W
        ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q", "fc")), "b")
        randomise_adapters(model)
        ml.combine_adapters(model, ["a", "b"], [1.0, 1.0], "cat", method="cat")
        ml.combine_adapters(model, ["a", "b"], [1.0, 1.0], "svd", method="svd", r=4)
    else:
        randomise_adapters(model)
    for name, adapter in model.adapters.items():
        for module in adapter.modules:
            A = model.params[f"{module}.lora_A.{name}"]
            B = model.params[f"{module}.lora_B.{name}"]
            dW = ml.delta_weight(A, B, adapter.config.scale)
            assert np.linalg.matrix_rank(dW) <= adapter.config.r, (name, module)
    if init != "pissa":
        assert model.adapters["cat"].config.r == 5 and model.adapters["svd"].config.r == 4


def test_the_model_owns_the_adapter_state(tiny_config):
    """The state is read-only from outside: adapters.py changes it through the model's
    four methods, and the copies handed out cannot change it by accident."""
    model = ml.GPT(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=2), "a")
    with pytest.raises(TypeError):
        model.adapters["b"] = model.adapters["a"]
    model.active_adapters.append("ghost")
    assert model.active_adapters == ["a"]
    with pytest.raises(ValueError, match="only active adapters"):
        model.mark_merged(["ghost"])
    with pytest.raises(ValueError, match="exists already"):
        model.attach_adapter(model.adapters["a"], {})


def test_save_load_round_trip_bit_for_bit(tiny_config, tmp_path):
    """Only A and B are written; loading them onto a fresh base reproduces the outputs."""
    model = ml.GPT(tiny_config, seed=1)
    ml.add_adapter(model, ml.LoraConfig(r=4, alpha=8, target_modules=("q", "v")), "task")
    randomise_adapters(model)
    info = ml.save_adapter(model, tmp_path / "ad", name="task")
    tensors, _ = ml.files.io.load_safetensors(tmp_path / "ad" / "adapter_model.safetensors")
    assert all(".lora_A" in k or ".lora_B" in k for k in tensors)
    assert info["bytes"] < 16 * 1024

    fresh = ml.GPT(tiny_config, seed=1)
    assert ml.load_adapter(fresh, tmp_path / "ad") == "task"
    for name in model.params:
        np.testing.assert_array_equal(fresh.params[name], model.params[name])
    idx, _ = batch(tiny_config)
    np.testing.assert_array_equal(fresh.forward(idx), model.forward(idx))
    assert (
        json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_config"]["r"] == 4
    )


def test_pissa_adapter_round_trip(tiny_config, tmp_path):
    """A PiSSA adapter reloads onto the original base (the residual is recomputed)."""
    model = random_model(tiny_config, dtype="float32")
    ml.add_adapter(model, ml.LoraConfig(r=2, alpha=2, target_modules=("q",), init="pissa"))
    randomise_adapters(model)
    ml.save_adapter(model, tmp_path / "p")
    fresh = random_model(tiny_config, dtype="float32")
    ml.load_adapter(fresh, tmp_path / "p")
    idx, _ = batch(tiny_config)
    np.testing.assert_array_equal(fresh.forward(idx), model.forward(idx))


def test_an_init_edited_to_pissa_is_refused(tiny_config, tmp_path):
    """A gaussian adapter whose saved config was edited to init "pissa" would rewrite W
    on load; the residual fingerprint catches it before the model changes."""
    model = random_model(tiny_config, dtype="float32")
    ml.add_adapter(model, ml.LoraConfig(r=2, alpha=2, target_modules=("q",)))
    randomise_adapters(model)
    ml.save_adapter(model, tmp_path / "g")
    path = tmp_path / "g" / "adapter_config.json"
    path.write_text(path.read_text().replace('"gaussian"', '"pissa"'))
    fresh = random_model(tiny_config, dtype="float32")
    before = fresh.state_dict()
    with pytest.raises(ValueError, match="init is 'pissa', but splitting this base"):
        ml.load_adapter(fresh, tmp_path / "g")
    for name, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_combine_svd_with_rank_zero_is_refused(tiny_config):
    model = random_model(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=2), "a")
    with pytest.raises(ValueError, match="r=0"):
        ml.combine_adapters(model, ["a"], [1.0], "a0", method="svd", r=0)
    assert list(model.adapters) == ["a"]


def test_backward_while_merged_is_refused(tiny_config):
    """Evaluating merged is fine; a backward would give A and B nothing, so it is refused."""
    model = random_model(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=2), "a")
    ml.merge(model)
    idx, targets = batch(tiny_config)
    model.eval().loss(idx, targets)
    with pytest.raises(ValueError, match="merged into W; call unmerge"):
        model.backward()


def _corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "adapter_model.safetensors").unlink(), "no such file"),
        (lambda d: _corrupt(d / "adapter_model.safetensors"), "truncated|header"),
        (lambda d: (d / "adapter_config.json").write_text("{not json"), "JSON|json"),
        (
            lambda d: (d / "adapter_config.json").write_text(
                (d / "adapter_config.json").read_text().replace('"v"', '"k"')
            ),
            "missing",
        ),
        (
            lambda d: (d / "adapter_config.json").write_text(
                (d / "adapter_config.json").read_text().replace('"r": 4', '"r": 3')
            ),
            "shape",
        ),
    ],
)
def test_bad_adapter_files_leave_model_unchanged(tiny_config, tmp_path, damage, match):
    """Missing, truncated, corrupted or mismatched files: clear error, model untouched."""
    model = ml.GPT(tiny_config, seed=1)
    ml.add_adapter(model, ml.LoraConfig(r=4, target_modules=("q", "v")))
    ml.save_adapter(model, tmp_path / "ad")
    damage(tmp_path / "ad")
    fresh = ml.GPT(tiny_config, seed=1)
    before = fresh.state_dict()
    with pytest.raises(ValueError, match=match):
        ml.load_adapter(fresh, tmp_path / "ad")
    assert fresh.adapters == {} and fresh.frozen == set()
    assert fresh.state_dict().keys() == before.keys()
    for n, v in before.items():
        np.testing.assert_array_equal(fresh.params[n], v)


def test_adapter_on_a_different_base_is_refused(tiny_config, tmp_path):
    """The base fingerprint ties an adapter to the weights it was trained on."""
    model = ml.GPT(tiny_config, seed=1)
    ml.add_adapter(model, ml.LoraConfig(r=2))
    ml.save_adapter(model, tmp_path / "ad")
    with pytest.raises(ValueError, match="fingerprint"):
        ml.load_adapter(ml.GPT(tiny_config, seed=2), tmp_path / "ad")
    other = ml.GPTConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, d_model=32)
    with pytest.raises(ValueError, match="adapter is for a model"):
        ml.load_adapter(ml.GPT(other, seed=1), tmp_path / "ad")


# --------------------------- PiSSA delete, the scale's dtype, deleting the active adapter
def test_pissa_delete_gives_W_back_bit_for_bit(tiny_config, tmp_path):
    """Adding and deleting a PiSSA adapter leaves every W as it was, bit for bit, so the
    base's fingerprint is unchanged and an adapter saved on that base still loads."""
    model = ml.GPT(tiny_config, seed=3)  # float32: fl(fl(W - sBA) + sBA) misses W here
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q",)), "plain")
    ml.save_adapter(model, tmp_path / "plain", name="plain")
    ml.delete_adapter(model, "plain")
    before, fingerprint = model.state_dict(), model.base_fingerprint()
    ml.add_adapter(model, ml.LoraConfig(r=4, alpha=8, target_modules=ALL, init="pissa"), "p")
    ml.delete_adapter(model, "p")
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert model.base_fingerprint() == fingerprint
    assert ml.load_adapter(model, tmp_path / "plain") == "plain"


def test_a_numpy_scalar_scale_keeps_float32():
    """s = np.float64(2.0) on float32 arrays: outputs and gradients stay float32."""
    rng = np.random.default_rng(0)
    f32 = np.float32
    x, W, b = rng.normal(size=(2, 3, 6)).astype(f32), rng.normal(size=(4, 6)).astype(f32), None
    A, B = rng.normal(size=(2, 6)).astype(f32), rng.normal(size=(4, 2)).astype(f32)
    h, cache = ml.lora_linear_forward(x, W, b, [ml.LoraBranch(A, B, np.float64(2.0))])
    dx, _, _, [(dA, dB)] = ml.lora_linear_backward(np.ones_like(h), cache)
    assert [a.dtype for a in (h, dx, dA, dB)] == [np.float32] * 4
    assert ml.delta_weight(A, B, np.float64(2.0)).dtype == np.float32
    with pytest.raises(TypeError, match="scale='2'"):
        lora_forward(x, A, B, "2")


def test_lora_linear_backward_defaults_to_every_gradient_as_linear_backward():
    """need_dW and need_db default the same way in both backwards: every gradient."""
    rng = np.random.default_rng(1)
    x, W, b = rng.normal(size=(5, 6)), rng.normal(size=(4, 6)), rng.normal(size=4)
    h, cache = ml.lora_linear_forward(x, W, b, [])
    dx, dW, db, _ = ml.lora_linear_backward(np.ones_like(h), cache)
    _, base_cache = ml.core.layers.linear_forward(x, W, b)
    dx_ref, dW_ref, db_ref = ml.core.layers.linear_backward(np.ones_like(h), base_cache)
    for got, want in ((dx, dx_ref), (dW, dW_ref), (db, db_ref)):
        np.testing.assert_array_equal(got, want)


def test_deleting_the_active_adapter_activates_another_as_peft_does(tiny_config):
    """Other active adapters stay active; with none left, the first remaining adapter
    becomes active, with a warning naming it; with no adapter left, the base runs."""
    model = ml.GPT(tiny_config)
    for name in ("a", "b", "c"):
        ml.add_adapter(model, ml.LoraConfig(r=2), name)
    ml.set_adapter(model, ["b", "c"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ml.delete_adapter(model, "b") == ["c"]
    with pytest.warns(UserWarning, match="'c' was active .* adapter 'a' is active now"):
        assert ml.delete_adapter(model, "c") == ["a"]
    assert model.active_adapters == ["a"]
    assert model.is_trainable("h.0.attn.q.lora_A.a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ml.delete_adapter(model, "a") == []


def test_combine_refuses_a_string_of_names_and_a_rank_for_cat(tiny_config):
    model = random_model(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=2), "default")
    with pytest.raises(TypeError, match="names='default' must be a list"):
        ml.combine_adapters(model, "default", [1.0], "x")
    with pytest.raises(TypeError, match="weights=1.0 must be a list"):
        ml.combine_adapters(model, ["default"], 1.0, "x")
    with pytest.raises(ValueError, match="r=3 is only for method='svd'"):
        ml.combine_adapters(model, ["default"], [1.0], "x", method="cat", r=3)
    assert list(model.adapters) == ["default"]


@pytest.mark.parametrize(
    "call",
    [
        lambda tmp: ml.add_adapter(None, ml.LoraConfig()),
        lambda tmp: ml.save_adapter(None, tmp / "x"),
        lambda tmp: ml.load_adapter(None, tmp / "x"),
        lambda tmp: ml.set_adapter(None, "default"),
        lambda tmp: ml.delete_adapter(None, "default"),
        lambda tmp: ml.merge(None),
        lambda tmp: ml.combine_adapters(None, ["a"], [1.0], "b"),
        lambda tmp: ml.core.adapters.unmerge(None),
        lambda tmp: ml.files.checkpoints.save_model(None, tmp / "x"),
    ],
    ids=["add", "save", "load", "set", "delete", "merge", "combine", "unmerge", "save_model"],
)
def test_adapter_functions_refuse_a_model_that_is_not_a_gpt(call, tmp_path):
    with pytest.raises(TypeError, match="model must be a minilora GPT, got NoneType"):
        call(tmp_path)
    assert not (tmp_path / "x").exists()


def test_load_adapter_refuses_a_non_boolean_activate(tiny_config, tmp_path):
    model = ml.GPT(tiny_config)
    ml.add_adapter(model, ml.LoraConfig(r=2), "a")
    ml.save_adapter(model, tmp_path / "a", name="a")
    with pytest.raises(TypeError, match="activate='yes' must be True or False"):
        ml.load_adapter(model, tmp_path / "a", name="b", activate="yes")
    assert list(model.adapters) == ["a"]


def test_a_loaded_pissa_adapter_also_gives_W_back_on_delete(tiny_config, tmp_path):
    """load_adapter splits W as add_adapter does; deleting restores W bit for bit."""
    model = ml.GPT(tiny_config, seed=4)
    ml.add_adapter(model, ml.LoraConfig(r=3, alpha=6, target_modules=ALL, init="pissa"))
    ml.save_adapter(model, tmp_path / "p")
    fresh = ml.GPT(tiny_config, seed=4)
    before, fingerprint = fresh.state_dict(), fresh.base_fingerprint()
    ml.load_adapter(fresh, tmp_path / "p")
    ml.delete_adapter(fresh, "default")
    for name, value in fresh.state_dict().items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
    assert fresh.base_fingerprint() == fingerprint
