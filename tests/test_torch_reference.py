"""An independent check: the same architecture written with PyTorch autograd.

Weights travel through ``state_dict`` (docs/DESIGN.md, "Parameter names"), so this also
checks that the names, the (d_out, d_in) layout, the tied head, tanh GELU, LayerNorm
eps = 1e-5 and the LoRA scale/dropout placement mean what docs/DESIGN.md, "LoRA math",
says. Skipped without torch.
"""

import os

import numpy as np
import pytest
from conftest import random_model
from conftest import rel_error as rel

import minilora as ml
from minilora.lab.torch_reference import lora_branches, to_torch_state, torch_forward, torch_loss

if os.environ.get("MINILORA_REQUIRE_REFERENCE") == "1":
    import torch  # CI installs the `ref` extra: a missing reference must fail, not skip
else:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (the `ref` extra)")


def test_full_model_matches_torch(tiny_config):
    model = random_model(tiny_config)
    rng = np.random.default_rng(3)
    idx = rng.integers(0, tiny_config.vocab_size, (4, tiny_config.block_size))
    targets = rng.integers(0, tiny_config.vocab_size, idx.shape)
    loss = model.loss(idx, targets)
    model.backward()

    sd = to_torch_state(model.state_dict(), requires_grad=True)
    logits = torch_forward(sd, tiny_config, torch.tensor(idx))
    ref_loss = torch_loss(logits, torch.tensor(targets))
    ref_loss.backward()

    assert rel(model.forward(idx), logits.detach().numpy()) < 1e-12
    assert abs(loss - ref_loss.item()) < 1e-12
    for name, p in sd.items():
        assert rel(model.grads[name], p.grad.numpy()) < 1e-10, name


def test_lora_gradients_match_torch(tiny_config, monkeypatch):
    model = random_model(tiny_config)
    lcfg = ml.LoraConfig(r=3, alpha=5.0, dropout=0.3, target_modules=ml.TARGET_MODULES)
    ml.add_adapter(model, lcfg, name="default")
    rng = np.random.default_rng(4)
    for name in model.trainable_names():  # B = 0 at init would make dA vanish: randomise
        model.params[name][...] = rng.normal(0, 0.3, model.params[name].shape)
    idx = rng.integers(0, tiny_config.vocab_size, (2, 8))
    targets = rng.integers(0, tiny_config.vocab_size, idx.shape)
    targets[:, :3] = -1  # ignored positions, as in fine-tuning prompts

    # record the dropout masks minilora draws, to hand the same ones to torch
    masks = {}
    original = ml.core.lora.lora_forward

    def recording(x, A, B, scale, mask=None, *need):  # need_dA, need_dB: what to cache
        out, cache = original(x, A, B, scale, mask, *need)
        masks[len(masks)] = mask
        return out, cache

    monkeypatch.setattr(ml.core.lora, "lora_forward", recording)  # the LoRA layer's branch
    loss = model.loss(idx, targets)  # training mode: dropout on
    monkeypatch.undo()
    model.backward()

    sd = to_torch_state(model.state_dict(), requires_grad=True)
    modules = [
        m
        for i in range(tiny_config.n_layer)
        for m in (
            f"h.{i}.attn.q",
            f"h.{i}.attn.k",
            f"h.{i}.attn.v",
            f"h.{i}.attn.o",
            f"h.{i}.mlp.fc",
            f"h.{i}.mlp.proj",
        )
    ]
    lora = lora_branches(sd, lcfg.alpha / lcfg.r)
    assert list(lora) == modules  # the masks below are matched to modules in this order
    torch_masks = {m: torch.tensor(masks[j]) for j, m in enumerate(modules)}
    logits = torch_forward(sd, tiny_config, torch.tensor(idx), lora, torch_masks)
    ref = torch_loss(logits, torch.tensor(targets), ignore_index=-1)
    ref.backward()
    assert abs(loss - ref.item()) < 1e-12
    assert sorted(model.grads) == sorted(n for n in sd if ".lora_" in n)
    for name in model.grads:
        assert rel(model.grads[name], sd[name].grad.numpy()) < 1e-10, name
