"""VeRA against PEFT: logits and gradients equal ``peft.VeraConfig`` on the PyTorch
twin of the GPT (test_family_reference.TorchGPT).

PEFT draws its shared vera_A and vera_B from torch's generator
(``projection_prng_key``) and minilora from NumPy's: the same law (Kaiming-uniform)
but not the same numbers, so minilora's shared matrices are copied into PEFT's
``vera_A`` / ``vera_B`` buffers, and its λ_d, λ_b into ``vera_lambda_d`` /
``vera_lambda_b``. Everything else (the slicing of the shared pair per linear, the
formula, the absence of a scale, the init) is PEFT's own. Nothing is downloaded
(HF_HUB_OFFLINE). Requires torch and peft (the ``ref`` extra).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from conftest import TINY, random_model, token_batch
from conftest import rel_error as rel

import minilora as ml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("MINILORA_REQUIRE_REFERENCE") == "1":
    import peft  # CI installs the `ref` extra: a missing reference must fail, not skip
    import torch
else:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (the `ref` extra)")
    peft = pytest.importorskip("peft", reason="PEFT is not installed (the `ref` extra)")

from test_family_reference import TOL, TORCH_DTYPE, TorchGPT  # noqa: E402  (after the skip)
from torch import nn  # noqa: E402

TARGETS = ["q", "v", "fc", "proj"]


def peft_vera_twin(model: ml.GPT, d_initial: float = 0.1):
    """PEFT's VeRA on TorchGPT with model's base weights, shared matrices and vectors."""
    dtype = TORCH_DTYPE[model.dtype.name]
    twin = TorchGPT(model.config).to(dtype)
    state = model.state_dict()
    twin.load_state_dict({n: torch.tensor(state[n]) for n in model.base_names()})
    config = model.adapters["default"].config
    peft_config = peft.VeraConfig(r=config.r, target_modules=TARGETS, d_initial=d_initial)
    wrapped = peft.get_peft_model(twin, peft_config).to(dtype)
    shared = model.vera_projection("default")
    with torch.no_grad():
        for buffers, ours in zip(
            (wrapped.base_model.vera_A, wrapped.base_model.vera_B), shared, strict=True
        ):
            assert tuple(buffers["default"].shape) == ours.shape  # PEFT's _find_dim = ours
            buffers["default"].copy_(torch.tensor(ours))  # shared: every layer sees it
    params = dict(wrapped.named_parameters())
    copied = 0
    for name, p in params.items():
        for kind in ("vera_lambda_d", "vera_lambda_b"):
            if f".{kind}.default" in name:
                module = name[len("base_model.model.") :].split(f".{kind}.")[0]
                with torch.no_grad():
                    p.copy_(torch.tensor(state[f"{module}.{kind}.default"]))
                copied += 1
    assert copied == 2 * len(model.adapters["default"].modules)
    return wrapped, params


def test_a_fresh_vera_adapter_starts_as_peft_s():
    """λ_d = d_initial and λ_b = 0 in both; the shared matrices have PEFT's shapes and
    bounds (Kaiming-uniform: sqrt(6 / fan_in)). In float32: PEFT makes its vectors in
    float32, and 0.1 in float32 is not 0.1 in float64."""
    model = random_model(ml.GPTConfig(**TINY), seed=1, dtype="float32")
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=tuple(TARGETS), use_vera=True))
    twin = TorchGPT(model.config)
    wrapped = peft.get_peft_model(twin, peft.VeraConfig(r=2, target_modules=TARGETS))
    theirs = dict(wrapped.named_parameters())
    for name in model.trainable_names():
        module, kind, _ = name.rsplit(".", 2)
        ref = theirs[f"base_model.model.{module}.{kind}.default"].detach().numpy()
        np.testing.assert_array_equal(model.params[name], ref)
    for ours, ref in zip(
        model.vera_projection("default"),
        (wrapped.base_model.vera_A["default"], wrapped.base_model.vera_B["default"]),
        strict=True,
    ):
        ref = ref.numpy()
        assert ours.shape == ref.shape
        bound = math.sqrt(6 / ours.shape[1])
        assert np.abs(ours).max() <= bound and np.abs(ref).max() <= bound


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_vera_logits_and_gradients_equal_peft(dtype):
    config = ml.LoraConfig(r=2, target_modules=tuple(TARGETS), use_vera=True)
    model = random_model(ml.GPTConfig(**TINY), seed=1, dtype=dtype)
    ml.add_adapter(model, config)
    rng = np.random.default_rng(5)
    for name in model.trainable_names():  # trained-looking vectors: λ_b = 0 hides dλ_d
        model.params[name] += rng.normal(0, 0.3, model.params[name].shape).astype(dtype)
    idx, targets_ids = token_batch(model.config, B=3, T=12, ignore=2)
    model.loss(idx, targets_ids)
    model.backward()
    twin, params = peft_vera_twin(model)
    twin.train()  # vera_dropout is 0: training mode changes nothing
    logits = twin(torch.tensor(idx))
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.tensor(targets_ids).reshape(-1), ignore_index=-1
    )
    loss.backward()
    model.eval()
    tol = TOL[dtype]
    assert rel(model.forward(idx), logits.detach().numpy()) < tol
    checked = 0
    for name, g in model.grads.items():
        module, kind, _ = name.rsplit(".", 2)
        ref = params[f"base_model.model.{module}.{kind}.default"].grad
        assert rel(g, ref.numpy()) < tol, (name, rel(g, ref.numpy()))
        checked += 1
    assert checked == 2 * 4 * TINY["n_layer"]
    twin.merge_adapter()  # PEFT's merge and ours give the same weights
    twin_state = twin.base_model.model.state_dict()
    ml.merge(model)
    for module in model.adapters["default"].modules:
        ref = twin_state[f"{module}.base_layer.weight"].numpy()
        assert rel(model.params[f"{module}.weight"], ref) < tol, module
    ml.unmerge(model)
