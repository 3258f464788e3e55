"""Every backend present gives NumPy's numbers: logits, loss, every gradient, 20 steps.

The ``device`` fixture (conftest.py) runs each test on "cpu" and on "gpu"; the gpu
runs skip, with the reason, where CuPy finds no CUDA device. The reference is always
the same model on NumPy. On the CPU the comparison is trivially exact; on a GPU it
measures CuPy's kernels against NumPy's (cuBLAS sums in another order), hence the
tolerances: float64 relative error below 1e-10, float32 below 1e-4, and for 20
training steps, whose rounding differences compound, 1e-8 and 1e-3.

The same checks run on the strict CuPy stand-in in tests/test_gpu_discipline.py.
Dropout is off here: CuPy draws its masks from its own generator, so with dropout the
two devices train on different masks (backend.py, "Randomness").
"""

import numpy as np
import pytest
from conftest import SMALL_GPT, TINY, rel_error, train_config

import minilora as ml
from minilora.basics import backend
from minilora.training.data import ShiftTask
from minilora.training.train import Trainer

TOL = {"float64": 1e-10, "float32": 1e-4}
STEPS_TOL = {"float64": 1e-8, "float32": 1e-3}
ZERO_GRADS = (".attn.k.bias",)
"""Gradients that are zero in exact arithmetic (a key bias adds the same number to a
whole row of scores, which the softmax ignores): on each device they are rounding
noise, so they are compared with the size of the other gradients, not with each other."""


def model_pair(device, dtype, seed=3):
    """The same random weights on NumPy and on ``device``, LoRA on q and v, B != 0."""
    cfg = ml.GPTConfig(**TINY)
    ref = ml.GPT(cfg, seed=seed, dtype=dtype, device="cpu")
    dev = ml.GPT(cfg, seed=seed, dtype=dtype, device=device)
    rng = np.random.default_rng(seed)
    state = {n: rng.normal(0, 0.2, v.shape) for n, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    dev.load_state_dict(state)
    return ref, dev


def parity_forward_backward(device, dtype):
    """Logits, loss and every gradient, full fine-tuning and LoRA, against NumPy."""
    tol = TOL[dtype]
    ref, dev = model_pair(device, dtype)
    for name in ref.params:  # initialised on the host, then loaded: identical weights
        np.testing.assert_array_equal(ref.params[name], backend.to_host(dev.params[name]))
    rng = np.random.default_rng(4)
    idx = rng.integers(0, ref.config.vocab_size, (4, ref.config.block_size))
    targets = rng.integers(0, ref.config.vocab_size, idx.shape)
    targets[:, :3] = -1
    for lora in (False, True):
        if lora:
            lcfg = ml.LoraConfig(r=2, alpha=4, target_modules=("q", "v", "fc"))
            for model in (ref, dev):
                ml.add_adapter(model, lcfg)
                for name in model.trainable_names():  # B = 0 would make every dA zero
                    value = np.random.default_rng(7).normal(0, 0.2, model.params[name].shape)
                    model.params[name][...] = model.xp.asarray(value, dtype=model.dtype)
        assert rel_error(ref.forward(idx), dev.forward(idx)) < tol
        loss_ref, loss_dev = ref.loss(idx, targets), dev.loss(idx, targets)
        assert abs(loss_ref - loss_dev) < tol * abs(loss_ref)
        ref.backward()
        dev.backward()
        assert sorted(ref.grads) == sorted(dev.grads)
        scale = max(np.linalg.norm(backend.to_host(g)) for g in ref.grads.values())
        for name, g in ref.grads.items():
            assert backend.xp_of(dev.grads[name]) is dev.xp, name
            if name.endswith(ZERO_GRADS):
                for grad in (g, dev.grads[name]):
                    assert np.linalg.norm(backend.to_host(grad)) < 10 * tol * scale, name
            else:
                assert rel_error(g, dev.grads[name]) < tol, name


def parity_training(device, dtype, steps=20):
    """20 LoRA steps of the trainer (AdamW, warm-up, clipping): the same losses."""
    cfg = ml.GPTConfig(**SMALL_GPT)
    train = train_config(steps, grad_clip=0.5)
    histories = []
    for where in ("cpu", device):
        model = ml.GPT(cfg, seed=0, dtype=dtype, device=where)
        ml.add_adapter(model, ml.LoraConfig(r=2, alpha=4, target_modules=("q", "v")))
        trainer = Trainer(model, ShiftTask(), train, progress=False)
        histories.append([row["loss"] for row in trainer.run() if "loss" in row])
    ref, dev = (np.array(h) for h in histories)
    assert len(ref) == len(dev) == steps
    assert np.max(np.abs(ref - dev) / np.abs(ref)) < STEPS_TOL[dtype]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_logits_loss_and_every_gradient_match_numpy(device, dtype):
    """On every backend: logits, loss and all gradients equal NumPy's (full and LoRA)."""
    parity_forward_backward(device, dtype)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_twenty_training_steps_match_numpy(device, dtype):
    """On every backend: 20 trainer steps give NumPy's losses within tolerance."""
    parity_training(device, dtype)


def test_scatter_add_sums_repeated_indices_on_every_backend(device):
    """scatter_add adds every value at a repeated index, on the host and on the device."""
    xp = backend.get_backend(device).xp
    target = xp.zeros((3, 2))
    backend.scatter_add(target, xp.asarray([2, 2, 0]), xp.ones((3, 2)))
    np.testing.assert_array_equal(backend.to_host(target), [[1, 1], [0, 0], [2, 2]])
