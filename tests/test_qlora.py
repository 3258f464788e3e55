"""A quantized frozen base (QLoRA): quantize_base, training on it, refusals, files, memory."""

import json
import warnings

import numpy as np
import pytest
from conftest import random_model, randomise_adapters, rel_error, token_batch

import minilora as ml
from minilora.cli.main import main
from minilora.core import params
from minilora.core.gradcheck import check_gradients
from minilora.core.lora import LoraBranch, lora_linear_backward, lora_linear_forward
from minilora.core.qlora import linear_weights, qlora_65b, quantize_base, requantized_merge_error
from minilora.core.quant import dequantize, quantize


def _qlora_model(cfg, dtype="float64", r=2):
    model = random_model(cfg, dtype=dtype)
    quantize_base(model, "nf4")
    ml.add_adapter(model, ml.LoraConfig(r=r, alpha=2 * r, target_modules=("q", "v", "fc")))
    randomise_adapters(model)
    return model


def test_the_linears_are_stored_in_nf4_and_dequantized_in_the_forward(tiny_config):
    model = random_model(tiny_config, dtype="float32")
    W = {n: model.params[n].copy() for n in linear_weights(model)}
    idx, _ = token_batch(tiny_config)
    model.eval()
    before = model.forward(idx)
    quantize_base(model, "nf4")
    assert model.quantization == "nf4"
    assert not set(W) & set(model.params)  # no float copy of a quantized W is kept
    assert set(model.quantized) == set(W)
    assert "wte.weight" in model.params and "h.0.ln_1.weight" in model.params
    for name, value in W.items():
        module = name.removesuffix(".weight")
        assert np.array_equal(model.weight(module), dequantize(quantize(value)))
        assert model.weight_shape(module) == value.shape
        assert model.quantized[name].packed.dtype == np.uint8
    after = model.forward(idx)
    assert 0 < np.abs(after - before).max() < 0.5 * np.abs(before).max()


def test_backward_gives_dx_through_the_dequantized_weight():
    """The quantized-base LoRA layer against finite differences in float64."""
    rng = np.random.default_rng(0)
    W = dequantize(quantize(rng.normal(size=(8, 16)))).astype(np.float64)
    b = rng.normal(size=8)
    x, A, B = rng.normal(size=(3, 5, 16)), rng.normal(size=(2, 16)), rng.normal(size=(8, 2))
    dh = rng.normal(size=(3, 5, 8))

    def loss():
        h, _ = lora_linear_forward(x, W, b, [LoraBranch(A, B, 2.0, None)])
        return float((h * dh).sum())

    _, cache = lora_linear_forward(x, W, b, [LoraBranch(A, B, 2.0, None)], need_dW=False)
    dx, dW, db, ((dA, dB),) = lora_linear_backward(dh, cache, need_dW=False, need_db=False)
    assert dW is None and db is None
    for r in check_gradients(loss, {"x": x, "A": A, "B": B}, {"x": dx, "A": dA, "B": dB}):
        assert r.passed(1e-7), r


def test_only_the_adapters_train_on_a_quantized_base(tiny_config):
    model = _qlora_model(tiny_config)
    idx, y = token_batch(tiny_config)
    model.loss(idx, y)
    model.backward()
    assert set(model.grads) == set(model.trainable_names())
    assert all(".lora_" in n for n in model.grads)

    def loss():
        model.reseed(0)
        return model.loss(idx, y)

    loss()
    model.backward()
    arrays = {n: model.params[n] for n in model.trainable_names()}
    for r in check_gradients(loss, arrays, model.grads):
        assert r.passed(1e-6), r


@pytest.mark.parametrize(
    "variant", [dict(use_dora=True), dict(use_vera=True)], ids=["dora", "vera"]
)
def test_dora_and_vera_train_on_a_quantized_base(tiny_config, variant):
    """QDoRA and VeRA over NF4: the adapter's own parameters, and only they, get gradients,
    and DoRA's magnitude starts at the dequantized W's row norms (the model unchanged)."""
    model = ml.GPT(tiny_config, seed=0, dtype="float64")
    ml.quantize_base(model, "nf4")
    idx, y = token_batch(tiny_config)
    before = model.forward(idx)
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q", "v", "fc"), **variant))
    np.testing.assert_allclose(model.forward(idx), before, rtol=0, atol=1e-12)
    model.train()
    model.loss(idx, y)
    model.backward()
    assert set(model.grads) == set(model.trainable_names()) and model.grads


def test_quantize_after_adding_an_adapter_gives_the_same_model(tiny_config):
    a, b = random_model(tiny_config), random_model(tiny_config)
    quantize_base(a)
    cfg = ml.LoraConfig(r=2, target_modules=("q", "v"))
    ml.add_adapter(a, cfg)
    ml.add_adapter(b, cfg)
    quantize_base(b)
    idx, y = token_batch(tiny_config)
    assert rel_error(a.forward(idx), b.forward(idx)) == 0


@pytest.mark.parametrize(
    "action, message",
    [
        (lambda m: quantize_base(m, "nf4"), "quantized already"),
        (lambda m: m.unfreeze("h.0.attn.q.weight"), "cannot train"),
        (lambda m: m.unfreeze("h.*"), "full fine-tuning"),
        (ml.merge, "cannot merge into a quantized"),
        (lambda m: ml.add_adapter(m, ml.LoraConfig(r=2, init="pissa"), name="p"), "pissa"),
        (lambda m: ml.save_model(m, "/tmp/never-written"), "float weights are gone"),
    ],
)
def test_refused_on_a_quantized_base(tiny_config, action, message):
    model = _qlora_model(tiny_config)
    before = {n: v.copy() for n, v in model.params.items()}
    with pytest.raises(ValueError, match=message):
        action(model)
    assert model.params.keys() == before.keys()
    assert all(np.array_equal(model.params[n], v) for n, v in before.items())
    assert model.merged_adapters == []


def test_quantize_base_refuses_bad_kinds_merged_and_pissa(tiny_config):
    model = random_model(tiny_config)
    with pytest.raises(ValueError, match="nf5"):
        quantize_base(model, "nf5")
    with pytest.raises(TypeError):
        quantize_base("model")
    ml.add_adapter(model, ml.LoraConfig(r=2))
    ml.merge(model)
    with pytest.raises(ValueError, match="merged"):
        quantize_base(model)
    ml.unmerge(model)
    pissa = random_model(tiny_config)
    ml.add_adapter(pissa, ml.LoraConfig(r=2, init="pissa"))
    with pytest.raises(ValueError, match="PiSSA"):
        quantize_base(pissa)
    assert model.quantization is None and pissa.quantization is None


def test_the_fingerprint_is_the_float_base_s_until_its_float_parameters_change(tiny_config):
    model = random_model(tiny_config)
    before = model.base_fingerprint()
    quantize_base(model)
    assert model.base_fingerprint() == before
    model.params["h.0.attn.q.bias"] += 1.0  # e.g. trained before an adapter froze it
    with pytest.raises(ValueError, match="changed after quantize_base"):
        model.base_fingerprint()


def test_freezing_a_quantized_weight_is_a_no_op(tiny_config):
    model = _qlora_model(tiny_config)
    model.freeze("h.0.attn.q.weight")  # it is frozen by being stored in 4 bits
    with pytest.raises(ValueError, match="matches no parameter"):
        model.freeze("h.0.attn.nothing")


def test_requantized_merge_error_measures_what_a_merge_would_keep(tiny_config):
    model = _qlora_model(tiny_config, dtype="float32")
    big = requantized_merge_error(model)
    for name in model.trainable_names():  # a small update, as after a short fine-tune
        model.params[name] *= 0.05
    small = requantized_merge_error(model)
    assert 0 <= big["relative_error"] < small["relative_error"]
    assert small["unchanged"] > big["unchanged"]
    with pytest.raises(ValueError, match="not quantized"):
        requantized_merge_error(random_model(tiny_config))


def test_adapter_files_record_the_quantization_and_warn_across(tiny_config, tmp_path):
    model = _qlora_model(tiny_config, dtype="float32")
    ml.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["base_quantization"] == "nf4"
    # the same base quantized again: the same fingerprint and storage, no warning
    again = random_model(tiny_config, dtype="float32")
    quantize_base(again)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ml.load_adapter(again, tmp_path)
    idx, _ = token_batch(tiny_config)
    assert np.array_equal(again.forward(idx), model.forward(idx))
    # onto the float base (to merge it for deployment): loads, with a warning
    float_base = random_model(tiny_config, dtype="float32")
    with pytest.warns(UserWarning, match="trained on a base stored as nf4"):
        ml.load_adapter(float_base, tmp_path)
    ml.merge(float_base)


def test_count_parameters_counts_quantized_weights_as_frozen(tiny_config):
    model = random_model(tiny_config)
    before = ml.count_parameters(model)
    quantize_base(model)
    after = ml.count_parameters(model)
    assert after.total == before.total and after.trainable < before.trainable
    assert after.per_module["h.0.attn.q"] == (before.per_module["h.0.attn.q"][0], 32)


def test_memory_estimate_counts_the_base_at_half_a_byte(tiny_config):
    config = params.preset("small")
    lora = params.memory_estimate(config, 8)
    qlora = params.memory_estimate(config, 8, quantize="nf4")
    n, nbytes = params.quantized_linear_bytes(config)
    assert n == 12 * 128 * 128 * 4
    assert 0.5 < nbytes / n < 0.52
    assert lora["weights"] - qlora["weights"] == 4 * n - nbytes
    assert qlora["quantized_weights"] == nbytes
    assert qlora["gradients"] == lora["gradients"]
    with pytest.raises(ValueError, match="cannot train"):
        params.memory_estimate(config, None, quantize="nf4")


def test_params_command_shows_qlora_beside_the_paper(capsys):
    assert main(["params", "--preset", "small", "--quantize", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "QLoRA (NF4 base)" in out and "one 48 GB GPU" in out and "0.516 bytes" in out
    q = qlora_65b()
    assert 64e9 < q["params"] < 66e9
    assert q["without_activations"] < 48e9 < q["full_16bit_without_activations"]
    assert main(["params", "--quantize", "nf5"]) == 2
    assert "--quantize" in capsys.readouterr().err


def test_finetune_quantize_nf4_trains_and_resumes(capsys, tmp_path):
    argv = ["finetune", "--steps", "2", "--eval-every", "0", "--quiet", "--batch-size", "2"]
    argv += ["--rank", "2", "--threads", "1", "--out", str(tmp_path), "--quantize", "nf4"]
    assert main(argv) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "over an NF4 base" in out
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["base_quantization"] == "nf4"
    (ckpt,) = sorted((tmp_path / "train").glob("ckpt-*"))
    record = json.loads((ckpt / "trainer.json").read_text())
    assert record["settings"]["quantize"] == "nf4"
    resumed = [*argv, "--resume"]  # the same run, from its last checkpoint
    assert main(resumed) == 0, capsys.readouterr()
    capsys.readouterr()
    # resuming without --quantize would continue on another base: refused
    assert main([a for a in resumed if a not in ("--quantize", "nf4")]) == 2
    assert "quantize" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantize", "nf4", "--full"], "drop --full"),
        (["--quantize", "nf4", "--init", "pissa"], "pissa"),
        (["--quantize", "int3"], "int3"),
    ],
)
def test_finetune_quantize_refusals(capsys, tmp_path, extra, message):
    code = main(["finetune", "--steps", "1", "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "adapter").exists()


def test_a_qlora_step_on_the_device_copies_only_the_loss(strict_gpu, tiny_config):
    """The NF4 storage lives on the device and is dequantized there: the step's only copy
    to the host is the loss, and the numbers are NumPy's."""
    from minilora.basics import backend

    models = {}
    for device in ("cpu", "gpu"):
        model = ml.GPT(tiny_config, seed=0, dtype="float64", device=device)
        quantize_base(model)
        ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q", "v", "fc")))
        models[device] = model
    assert all(backend.is_device_array(a) for a in models["gpu"].quantized["h.0.attn.q.weight"][:3])
    idx, y = token_batch(tiny_config)
    results = {}
    for device, model in models.items():
        strict_gpu.transfers.clear()
        loss = model.loss(idx, y)
        model.backward()
        ml.AdamW(model, lr=1e-2).step()
        if device == "gpu":
            assert strict_gpu.transfers.sites() == ["minilora.core.layers.cross_entropy_forward"]
            # the ids go up; the code tables are on the device with the 4-bit codes
            assert set(strict_gpu.transfers.sites("to_device")) == {
                "minilora.core.model.GPT._as_ids"
            }
        results[device] = (loss, {n: backend.to_host(g) for n, g in model.grads.items()})
    assert abs(results["cpu"][0] - results["gpu"][0]) < 1e-10 * results["cpu"][0]
    for name, g in results["cpu"][1].items():
        assert rel_error(g, results["gpu"][1][name]) < 1e-10, name
