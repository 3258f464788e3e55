"""The LoRA family against PEFT: DoRA's logits and gradients, LoRA+'s groups and step.

PEFT wraps ``nn.Linear`` modules, so the PyTorch twin of the GPT is written here as
modules (``TorchGPT``) whose parameter names are minilora's (``h.0.attn.q.weight``,
docs/DESIGN.md, "Parameter names"): minilora's state dict loads into it as it is.
``peft.get_peft_model(TorchGPT, LoraConfig(use_dora=True, ...))`` then adds PEFT's own
DoRA layers, into which minilora's A, B and magnitude are copied. Nothing is
downloaded (HF_HUB_OFFLINE). Requires torch and peft (the ``ref`` extra).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from conftest import TINY, random_model, token_batch
from conftest import rel_error as rel

import minilora as ml
from minilora.core import layers as L
from minilora.core.lora import LoraBranch, lora_linear_backward, lora_linear_forward

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("MINILORA_REQUIRE_REFERENCE") == "1":
    import peft  # CI installs the `ref` extra: a missing reference must fail, not skip
    import torch
else:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (the `ref` extra)")
    peft = pytest.importorskip("peft", reason="PEFT is not installed (the `ref` extra)")

from torch import nn  # noqa: E402  (after the skip: torch may be missing)

TOL = {"float64": 1e-12, "float32": 1e-5}
TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}


class _Attn(nn.Module):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(C, C) for _ in range(4))


class _Mlp(nn.Module):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.fc, self.proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)


class _Block(nn.Module):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = (
            nn.LayerNorm(C),
            _Attn(C),
            nn.LayerNorm(C),
            _Mlp(C),
        )


class TorchGPT(nn.Module):
    """minilora's GPT as torch modules, named as minilora names its parameters."""

    def __init__(self, cfg: ml.GPTConfig) -> None:
        super().__init__()
        C = cfg.d_model
        self.cfg = cfg
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, C), nn.Embedding(cfg.block_size, C)
        self.h = nn.ModuleList(_Block(C) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(C)

    def forward(self, idx):
        B, T = idx.shape
        H, C = self.cfg.n_head, self.cfg.d_model
        x = self.wte(idx) + self.wpe.weight[:T]
        future = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)
        for blk in self.h:
            a = blk.ln_1(x)
            q, k, v = (
                f(a).view(B, T, H, C // H).transpose(1, 2)
                for f in (blk.attn.q, blk.attn.k, blk.attn.v)
            )
            att = ((q @ k.transpose(-2, -1)) / math.sqrt(C // H)).masked_fill(future, float("-inf"))
            x = x + blk.attn.o((att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C))
            m = nn.functional.gelu(blk.mlp.fc(blk.ln_2(x)), approximate="tanh")
            x = x + blk.mlp.proj(m)
        return self.ln_f(x) @ self.wte.weight.T


def peft_twin(model: ml.GPT, targets: list[str]):
    """PEFT's DoRA on TorchGPT, with model's base weights and its adapter's A, B and m."""
    dtype = TORCH_DTYPE[model.dtype.name]
    twin = TorchGPT(model.config).to(dtype)
    state = model.state_dict()
    base = {n: torch.tensor(state[n]) for n in model.base_names()}
    twin.load_state_dict(base)
    config = model.adapters["default"].config
    peft_config = peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, target_modules=targets, use_dora=True
    )
    wrapped = peft.get_peft_model(twin, peft_config).to(dtype)
    params = dict(wrapped.named_parameters())
    prefix = "base_model.model."
    ours = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_magnitude_vector": "lora_magnitude"}
    copied = 0
    for name, p in params.items():
        for theirs, mine in ours.items():
            if f".{theirs}.default." in name:
                module = name[len(prefix) :].split(f".{theirs}.")[0]
                with torch.no_grad():
                    p.copy_(torch.tensor(state[f"{module}.{mine}.default"]))
                copied += 1
    assert copied == 3 * len(model.adapters["default"].modules)
    return wrapped, params


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_dora_logits_and_gradients_equal_peft(dtype):
    targets = ["q", "v", "fc", "proj"]
    config = ml.LoraConfig(r=2, alpha=4, target_modules=tuple(targets), use_dora=True)
    model = random_model(ml.GPTConfig(**TINY), seed=1, dtype=dtype)
    ml.add_adapter(model, config)
    rng = np.random.default_rng(5)
    for name in model.trainable_names():  # trained-looking A, B and m: dA is 0 at B = 0
        model.params[name] += rng.normal(0, 0.2, model.params[name].shape).astype(dtype)
    idx, targets_ids = token_batch(model.config, B=3, T=12, ignore=2)
    model.loss(idx, targets_ids)
    model.backward()
    twin, params = peft_twin(model, targets)
    twin.train()  # lora_dropout is 0: training mode changes nothing but PEFT's path
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
        theirs = {"lora_magnitude": "lora_magnitude_vector"}.get(kind, kind)
        ref = params[f"base_model.model.{module}.{theirs}.default.weight"].grad
        assert rel(g, ref.numpy()) < tol, (name, rel(g, ref.numpy()))
        checked += 1
    assert checked == 3 * 4 * TINY["n_layer"]


class FixedMask(nn.Module):
    """Dropout with a given multiplier, so that PEFT drops exactly what minilora drops."""

    def __init__(self, mask) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_a_dora_linear_with_dropout_equals_peft(dtype):
    """With dropout on, PEFT runs the correction's base term on the dropped-out input:
    the layer's output and dx, dA, dB, dm equal PEFT's (one linear, a fixed mask)."""
    rng = np.random.default_rng(0)
    d_in, d_out, r, s = 6, 5, 2, 1.5
    x, W, b = rng.normal(size=(4, 3, d_in)), rng.normal(size=(d_out, d_in)), rng.normal(size=d_out)
    A, B = rng.normal(size=(r, d_in)), rng.normal(size=(d_out, r))
    m = np.linalg.norm(W + s * B @ A, axis=1) + rng.normal(0, 0.3, d_out)
    keep = L.dropout_mask(x.shape, 0.4, np.random.default_rng(1), np.dtype("float64"))
    x, W, b, A, B, m, keep = (a.astype(dtype) for a in (x, W, b, A, B, m, keep))
    h, cache = lora_linear_forward(x, W, b, [LoraBranch(A, B, s, keep, m)], need_dW=False)
    dh = rng.normal(size=h.shape).astype(dtype)
    dx, _, _, [(dA, dB, dm)] = lora_linear_backward(dh, cache, need_dW=False, need_db=False)

    tdtype = TORCH_DTYPE[dtype]
    holder = nn.Module()
    holder.lin = nn.Linear(d_in, d_out).to(tdtype)
    with torch.no_grad():
        holder.lin.weight.copy_(torch.tensor(W))
        holder.lin.bias.copy_(torch.tensor(b))
    cfg = peft.LoraConfig(
        r=r, lora_alpha=s * r, target_modules=["lin"], use_dora=True, lora_dropout=0.1
    )
    wrapped = peft.get_peft_model(holder, cfg).to(tdtype)
    layer = wrapped.base_model.model.lin
    layer.lora_dropout["default"] = FixedMask(torch.tensor(keep))
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor(A))
        layer.lora_B["default"].weight.copy_(torch.tensor(B))
        layer.lora_magnitude_vector["default"].weight.copy_(torch.tensor(m))
    wrapped.train()
    tx = torch.tensor(x, requires_grad=True)
    out = layer(tx)
    (out * torch.tensor(dh)).sum().backward()
    tol = TOL[dtype]
    assert rel(h, out.detach().numpy()) < tol
    for ours, theirs in (
        (dx, tx.grad),
        (dA, layer.lora_A["default"].weight.grad),
        (dB, layer.lora_B["default"].weight.grad),
        (dm, layer.lora_magnitude_vector["default"].weight.grad),
    ):
        assert rel(ours, theirs.numpy()) < tol


def _minilora_name(peft_name: str) -> str:
    """PEFT's parameter name of the twin -> minilora's."""
    name = peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    for theirs, mine in (("lora_magnitude_vector", "lora_magnitude"), ("lora_A", "lora_A")):
        name = name.replace(f".{theirs}.default.weight", f".{mine}.default")
    return name.replace(".lora_B.default.weight", ".lora_B.default")


def test_loraplus_groups_and_step_equal_peft():
    """PEFT's create_loraplus_optimizer on the same model: every trainable parameter has
    the learning rate minilora gives it (lr x 16 for lora_B, DoRA's magnitude and the
    trainable biases and layer norm; lr for lora_A and a trainable matrix), and one
    AdamW step from the same gradients gives the same parameters."""
    from peft.optimizers import create_loraplus_optimizer

    lr, ratio = 1e-3, 16.0
    extra = ("h.0.attn.q.bias", "ln_f.weight", "h.1.attn.k.weight")
    config = ml.LoraConfig(r=2, alpha=4, target_modules=("q", "fc"), use_dora=True)
    model = random_model(ml.GPTConfig(**TINY), seed=1)
    ml.add_adapter(model, config)
    model.unfreeze(*extra)
    twin, params = peft_twin(model, ["q", "fc"])
    for name, p in params.items():
        if _minilora_name(name) in extra:
            p.requires_grad_(True)
    opt = create_loraplus_optimizer(twin, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio)
    theirs = {}
    by_id = {id(p): n for n, p in params.items()}
    for group in opt.param_groups:
        for p in group["params"]:
            theirs[_minilora_name(by_id[id(p)])] = group["lr"]
    ours_opt = ml.AdamW(model, lr=lr, loraplus_lr_ratio=ratio)
    assert theirs == {n: ours_opt.lr_of(n) for n in model.trainable_names()}
    assert sorted(set(theirs.values())) == [lr, lr * ratio]

    idx, targets = token_batch(model.config, B=2, T=10)
    model.loss(idx, targets)
    model.backward()
    ours_opt.step()
    logits = twin(torch.tensor(idx))
    nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.tensor(targets).reshape(-1)
    ).backward()
    opt.step()
    for name, p in params.items():
        if p.requires_grad:
            mine = model.params[_minilora_name(name)]
            assert rel(mine, p.detach().numpy()) < 1e-12, name
