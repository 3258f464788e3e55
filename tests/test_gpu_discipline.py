"""device="gpu" on a machine without one: the whole library through a strict CuPy.

The ``strict_gpu`` fixture (conftest.py) makes ``device="gpu"`` use the stand-in of
tests/strict_backend.py, whose arrays refuse NumPy the way CuPy's do and log every
copy between host and device; its docstring says what that proves and what it cannot.
Every test here runs the same work on NumPy and on the stand-in and requires the same
numbers (float64, relative error below 1e-10; the stand-in computes with NumPy, so
in fact they are equal), and where it matters, says which host copies were made.
"""

import numpy as np
import pytest
import strict_backend
from conftest import SMALL_GPT, TINY, random_model, randomise_adapters, rel_error, train_config
from test_parity import parity_forward_backward, parity_training

import minilora as ml
from minilora.basics import backend
from minilora.core import layers as L
from minilora.core.gradcheck import gradcheck
from minilora.files import checkpoints
from minilora.lab.gradcheck_report import full_report
from minilora.training.data import ShiftTask
from minilora.training.planted import PlantedRankTask
from minilora.training.train import Trainer

TOL = 1e-10
DEVICES = ("cpu", "gpu")


def same(a, b, what=""):
    """b is a device array (or host) holding a's values to TOL."""
    assert rel_error(a, b) < TOL, what


def batch(seed=0, B=3, T=12):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, TINY["vocab_size"], (B, T))
    targets = rng.integers(0, TINY["vocab_size"], (B, T))
    targets[0, :4] = -1
    return idx, targets


def lora_models(**lora):
    """The same float64 model with the same LoRA adapter(s), on NumPy and on the device."""
    models = {}
    for device in DEVICES:
        model = random_model(ml.GPTConfig(**TINY), seed=1, device=device)
        for i, (name, cfg) in enumerate(lora.items()):
            ml.add_adapter(model, cfg, name=name)
            randomise_adapters(model, seed=10 + i)
        models[device] = model
    return models


# ------------------------------------------------------------- the stand-in itself
def test_the_stand_in_refuses_what_cupy_refuses(strict_gpu):
    """Its arrays are device arrays to minilora, never become NumPy arrays silently,
    never mix with them, and reach the host only through logged, explicit copies."""
    xp = backend.get_backend("gpu").xp
    assert xp is strict_gpu
    x = xp.asarray(np.arange(6.0))
    assert backend.is_device_array(x) and backend.xp_of(x) is xp
    host = np.ones(6)
    refused = {
        "np.asarray": lambda: np.asarray(x),
        "device + host": lambda: x + host,
        "host + device": lambda: host + x,
        "device @ host": lambda: x @ host,
        "np.exp": lambda: np.exp(x),
        "np.sum": lambda: np.sum(x),
        "np.concatenate": lambda: np.concatenate([x, x]),
        "float of many": lambda: float(x),
        "host index": lambda: x[np.array([0, 1])],
        "host value": lambda: x.__setitem__(slice(None), host),
        "xp.where(host)": lambda: xp.where(host > 0, x, 0.0),
    }
    for what, attempt in refused.items():
        with pytest.raises(TypeError):
            attempt()
            pytest.fail(f"{what} was allowed")
    strict_gpu.transfers.clear()
    y = np.float64(2.0) * (x + 1.0)  # scalars, host or Python, are fine (as in CuPy)
    assert backend.is_device_array(y)
    assert float(y.sum()) == 42.0  # a scalar read: allowed, and logged
    np.testing.assert_array_equal(backend.to_host(y), 2 * (np.arange(6.0) + 1))
    name = f"{__name__}.test_the_stand_in_refuses_what_cupy_refuses"
    assert strict_gpu.transfers.sites() == [name, name]


# ---------------------------------------------------------------- training
def test_a_training_step_copies_only_the_loss_to_the_host(strict_gpu):
    """loss, backward, AdamW (and SGD with momentum): the numbers of NumPy, and the only
    copy to the host is the loss itself (its sum and count, in one transfer)."""
    models = lora_models(
        default=ml.LoraConfig(r=2, alpha=4, dropout=0.1, target_modules=("q", "v", "fc"))
    )
    idx, targets = batch()
    for device, model in models.items():
        model.reseed(5)  # the stand-in draws dropout masks with NumPy's generator too
        strict_gpu.transfers.clear()
        loss = model.loss(idx, targets)  # training mode: dropout on
        model.backward()
        grads = dict(model.grads)
        ml.AdamW(model, lr=1e-2, weight_decay=0.1).step()
        ml.SGD(model, lr=1e-2, momentum=0.9).step()
        model.grads = grads
        if device == "gpu":
            assert strict_gpu.transfers.sites() == ["minilora.core.layers.cross_entropy_forward"]
            assert all(backend.is_device_array(g) for g in model.grads.values())
        model.result = loss
    cpu, gpu = models["cpu"], models["gpu"]
    assert abs(cpu.result - gpu.result) < TOL * cpu.result
    for name in cpu.grads:
        same(cpu.grads[name], gpu.grads[name], name)
    for name in cpu.params:
        same(cpu.params[name], gpu.params[name], name)


def test_the_trainer_runs_and_resumes_on_the_device(strict_gpu, tmp_path):
    """Trainer with clipping, evaluation and checkpoints: the same history and weights
    as NumPy, also when the device run is stopped after 2 steps and resumed. A step's
    host copies: the loss, and the gradient norm that clipping needs and the log keeps."""
    cfg = ml.GPTConfig(**SMALL_GPT)
    train = train_config(4, warmup=2, eval_every=2, checkpoint_every=2, grad_clip=0.035)
    lcfg = ml.LoraConfig(r=2, alpha=4, dropout=0.1, target_modules=("q", "v"))

    def trainer(device, out):
        model = ml.GPT(cfg, seed=0, dtype="float64", device=device)
        ml.add_adapter(model, lcfg)
        return Trainer(model, ShiftTask(), train, out_dir=out, progress=False)

    cpu = trainer("cpu", tmp_path / "cpu")
    cpu.run()
    gpu = trainer("gpu", tmp_path / "gpu")
    gpu.run(until=1)
    strict_gpu.transfers.clear()
    gpu.train_step()
    assert strict_gpu.transfers.sites() == [
        "minilora.core.layers.cross_entropy_forward",
        "minilora.training.schedule.clip_gradients",
    ]
    gpu.save_checkpoint()
    resumed = trainer("gpu", tmp_path / "gpu")
    resumed.run(resume=True)
    assert any(row.get("grad_norm", 0) > train.grad_clip for row in cpu.history)  # clipped
    rows = [r for r in cpu.history if r["step"] > 2]
    assert len(rows) == len(resumed.history) and resumed.history
    for a, b in zip(rows, resumed.history, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= TOL * abs(a[key]), key
    for name in cpu.model.params:
        same(cpu.model.params[name], resumed.model.params[name], name)
    for key, value in cpu.opt.state.items():
        for slot in value:
            same(value[slot], resumed.opt.state[key][slot], f"{key}.{slot}")


def test_parity_checks_pass_on_the_stand_in(strict_gpu):
    """tests/test_parity.py's checks, which run on a real GPU when there is one."""
    for dtype in ("float64", "float32"):
        parity_forward_backward("gpu", dtype)
    parity_training("gpu", "float64", steps=5)


# ------------------------------------------------------------------ adapters
def test_merge_unmerge_and_combine_on_the_device(strict_gpu):
    """Stacked adapters merged and unmerged, then combined by "cat" and by "svd": the
    same W, factors, errors and logits as NumPy."""
    models = lora_models(
        a=ml.LoraConfig(r=2, alpha=4, target_modules=("q", "v")),
        b=ml.LoraConfig(r=3, alpha=3, target_modules=("v", "fc"), layers=(1,)),
    )
    idx, _ = batch(1)
    results = {}
    for device, model in models.items():
        ml.set_adapter(model, ["a", "b"])
        unmerged = model.forward(idx)
        ml.merge(model)
        merged_W = model.params["h.1.attn.v.weight"].copy()
        merged = model.forward(idx)
        ml.unmerge(model)
        cat = ml.combine_adapters(model, ["a", "b"], [1.0, 0.5], "cat", method="cat")
        svd = ml.combine_adapters(model, ["a", "b"], [1.0, 0.5], "svd", method="svd", r=2)
        ml.set_adapter(model, "svd")
        results[device] = (unmerged, merged_W, merged, cat, svd, model.forward(idx))
        assert all(backend.xp_of(p) is model.xp for p in model.params.values())
    cpu, gpu = results["cpu"], results["gpu"]
    for i in (0, 1, 2, 5):
        same(cpu[i], gpu[i], f"result {i}")
    assert cpu[3] == gpu[3] and cpu[4].keys() == gpu[4].keys()
    for module, error in cpu[4].items():
        assert abs(error - gpu[4][module]) < TOL
    for name in models["cpu"].params:
        same(models["cpu"].params[name], models["gpu"].params[name], name)


def test_pissa_add_and_delete_on_the_device(strict_gpu):
    """PiSSA takes W's top singular part out of W (on the host, in float64) and gives it
    back on delete: the same residual W, factors and logits as NumPy."""
    idx, _ = batch(2)
    results = {}
    for device in DEVICES:
        model = random_model(ml.GPTConfig(**TINY), seed=1, device=device)
        before = model.forward(idx)
        ml.add_adapter(model, ml.LoraConfig(r=2, alpha=4, target_modules=("q", "o"), init="pissa"))
        residual = model.params["h.0.attn.q.weight"].copy()
        A = model.params["h.0.attn.q.lora_A.default"].copy()
        adapted = model.forward(idx)
        ml.delete_adapter(model, "default")
        results[device] = (
            before,
            residual,
            A,
            adapted,
            model.forward(idx),
            model.params["h.0.attn.q.weight"],
        )
    for i, (a, b) in enumerate(zip(results["cpu"], results["gpu"], strict=True)):
        same(a, b, f"result {i}")
    same(results["gpu"][0], results["gpu"][3])  # PiSSA starts at the base model


# ---------------------------------------------------------------------- files
def test_adapter_and_model_files_move_between_devices(strict_gpu, tmp_path):
    """Saved on the device, loaded on the host and back (adapters, PiSSA adapters, whole
    models): every load gives the saving model's logits."""
    idx, _ = batch(3)
    gpu = lora_models(default=ml.LoraConfig(r=2, alpha=4, target_modules=("q", "v")))["gpu"]
    ml.add_adapter(
        gpu, ml.LoraConfig(r=2, alpha=4, target_modules=("k",), init="pissa"), name="pissa"
    )
    randomise_adapters(gpu, seed=4)
    ml.set_adapter(gpu, ["default", "pissa"])
    expected = gpu.forward(idx)
    ml.save_adapter(gpu, tmp_path / "lora", name="default")
    ml.save_adapter(gpu, tmp_path / "pissa", name="pissa")
    ml.delete_adapter(gpu, "pissa")
    ml.delete_adapter(gpu, "default")
    checkpoints.save_model(gpu, tmp_path / "base")
    for device in DEVICES:
        model, _ = checkpoints.load_model(tmp_path / "base", device=device)
        assert model.device == device and model.dtype == np.float64
        same(gpu.forward(idx), model.forward(idx), f"base on {device}")
        for name in ("lora", "pissa"):
            ml.load_adapter(model, tmp_path / name, name=name)
        ml.set_adapter(model, ["lora", "pissa"])
        same(expected, model.forward(idx), f"adapters on {device}")


def test_generate_on_the_device(strict_gpu):
    """Greedy and sampled (temperature, top-k) generation: NumPy's tokens, as host ids."""
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    outputs = {}
    for device, model in lora_models(default=ml.LoraConfig(r=2, target_modules=("q",))).items():
        outputs[device] = [
            model.generate(prompt, 5, greedy=True),
            model.generate(prompt, 5, temperature=0.8, top_k=10, seed=3),
        ]
    for a, b in zip(outputs["cpu"], outputs["gpu"], strict=True):
        assert isinstance(b, np.ndarray)
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ gradients
def test_gradcheck_on_the_device(strict_gpu):
    """gradcheck of layer norm with device inputs: the same relative errors as on NumPy."""
    errors = {}
    for device in DEVICES:
        xp = backend.get_backend(device).xp
        rng = np.random.default_rng(0)
        inputs = {
            k: xp.asarray(rng.normal(size=s))
            for k, s in (("x", (3, 5, 6)), ("weight", (6,)), ("bias", (6,)))
        }
        results = gradcheck(L.layer_norm_forward, L.layer_norm_backward, inputs, seed=0)
        assert all(r.passed() for r in results), results
        errors[device] = [r.error for r in results]
    assert errors["cpu"] == pytest.approx(errors["gpu"], rel=1e-6, abs=1e-15)


def test_stand_in_modules_are_fresh_per_test(strict_gpu):
    """Each test gets its own modules and log; the real backends are back afterwards."""
    assert strict_gpu.transfers.events == []
    assert strict_backend.ndarray.transfers is strict_gpu.transfers


def test_the_whole_gradcheck_report_on_the_device(strict_gpu):
    """What `minilora gradcheck --device gpu` checks (every op, the stacked LoRA layer,
    the tiny GPT full and LoRA) runs and passes on device arrays (3 s on the stand-in)."""
    results = full_report(seed=0, device="gpu")
    assert len(results) > 50
    assert all(r.passed() for r in results), [r.name for r in results if not r.passed()]


def test_the_planted_task_labels_on_the_device(strict_gpu):
    """The planted-rank teacher (host SVD draws, then device forward passes) labels a
    batch exactly as on NumPy."""
    labels = {}
    for device in DEVICES:
        base = random_model(ml.GPTConfig(**{**TINY, "vocab_size": 96}), seed=2, device=device)
        task = PlantedRankTask(base, rank=2, targets=("q",), seed=1)
        labels[device] = task.batch(0, batch_size=4, block_size=12)
    np.testing.assert_array_equal(labels["cpu"].idx, labels["gpu"].idx)
    np.testing.assert_array_equal(labels["cpu"].targets, labels["gpu"].targets)


def test_a_dora_adapter_trains_merges_and_saves_on_the_device(strict_gpu, tmp_path):
    """DoRA (exact and detached backward, dropout on): the adapter's magnitudes are made
    on the device, a training step copies only the loss to the host, and merge, unmerge
    and the adapter files give NumPy's numbers."""
    for exact in (False, True):
        config = ml.LoraConfig(
            r=2,
            alpha=4,
            dropout=0.1,
            target_modules=("q", "fc"),
            use_dora=True,
            dora_exact_grad=exact,
        )
        models = lora_models(default=config)
        idx, targets = batch()
        results = {}
        for device, model in models.items():
            model.reseed(5)
            strict_gpu.transfers.clear()
            loss = model.loss(idx, targets)
            model.backward()
            ml.AdamW(model, lr=1e-2).step()
            if device == "gpu":
                assert strict_gpu.transfers.sites() == [
                    "minilora.core.layers.cross_entropy_forward"
                ]
            model.eval()
            unmerged = model.forward(idx)
            ml.merge(model)
            merged = model.forward(idx)
            ml.unmerge(model)
            checkpoints.save_adapter(model, tmp_path / f"{device}-{exact}")
            results[device] = (loss, dict(model.grads), unmerged, merged)
            assert all(backend.xp_of(p) is model.xp for p in model.params.values())
        cpu, gpu = results["cpu"], results["gpu"]
        assert abs(cpu[0] - gpu[0]) < TOL * cpu[0]
        for name in cpu[1]:
            same(cpu[1][name], gpu[1][name], name)
        same(cpu[2], gpu[2], "unmerged")
        same(cpu[3], gpu[3], "merged")
        for name in models["cpu"].params:
            same(models["cpu"].params[name], models["gpu"].params[name], name)
        fresh = random_model(ml.GPTConfig(**TINY), seed=1, device="gpu").eval()
        checkpoints.load_adapter(fresh, tmp_path / f"cpu-{exact}")
        same(cpu[2], fresh.forward(idx), "loaded on the device")


def test_a_vera_adapter_trains_merges_and_saves_on_the_device(strict_gpu, tmp_path):
    """VeRA (dropout on): the shared matrices move to the device once, a training step
    copies only the loss to the host, and merge, unmerge and the adapter files (with the
    shared matrices) give NumPy's numbers."""
    config = ml.LoraConfig(r=2, dropout=0.1, target_modules=("q", "fc"), use_vera=True)
    models = lora_models(default=config)
    idx, targets = batch()
    results = {}
    for device, model in models.items():
        model.reseed(5)
        strict_gpu.transfers.clear()
        loss = model.loss(idx, targets)
        model.backward()
        ml.AdamW(model, lr=1e-2).step()
        if device == "gpu":
            assert strict_gpu.transfers.sites() == ["minilora.core.layers.cross_entropy_forward"]
            assert all(backend.xp_of(a) is model.xp for a in model.vera_projection("default"))
        model.eval()
        unmerged = model.forward(idx)
        ml.merge(model)
        merged = model.forward(idx)
        ml.unmerge(model)
        checkpoints.save_adapter(model, tmp_path / device)
        results[device] = (loss, dict(model.grads), unmerged, merged)
    cpu, gpu = results["cpu"], results["gpu"]
    assert abs(cpu[0] - gpu[0]) < TOL * cpu[0]
    assert sorted(cpu[1]) == sorted(gpu[1]) and cpu[1]
    for name in cpu[1]:
        same(cpu[1][name], gpu[1][name], name)
    same(cpu[2], gpu[2], "unmerged")
    same(cpu[3], gpu[3], "merged")
    fresh = random_model(ml.GPTConfig(**TINY), seed=1, device="gpu").eval()
    checkpoints.load_adapter(fresh, tmp_path / "cpu")
    same(cpu[2], fresh.forward(idx), "loaded on the device")
