"""The whole-library gradient check behind ``minilora gradcheck``.

``gradcheck.py`` is the finite-difference machinery and knows nothing of a model
(cs231n's ``gradient_check.py``); this module decides what to check: every op of
``layers.py``, the LoRA layer with two stacked adapters and on an NF4 base (QLoRA),
DoRA's correction with each backward, VeRA's branch (gradients for x, λ_d and λ_b; its
shared A and B are frozen), and the tiny GPT with full fine-tuning, with LoRA, with DoRA
and with VeRA on every target and with LoRA on an NF4 base, all in float64.

DoRA has two rows because it has two backwards (dora.py). The exact one is checked
against finite differences of the forward itself. The detached one (the default, the
paper's and PEFT's) is the gradient of a different function, the forward with the
norm ||W + s B A|| held at its value: finite differences of the full forward would
see the norm move and disagree. Its row holds the norm fixed (``norm=``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from minilora.basics.backend import get_backend, to_host, xp_of
from minilora.core import layers as L
from minilora.core.adapters import add_adapter
from minilora.core.dora import dora_backward, dora_forward, weight_norm
from minilora.core.gradcheck import CheckResult, check_gradients, gradcheck
from minilora.core.lora import LoraBranch, LoraConfig, lora_linear_backward, lora_linear_forward
from minilora.core.model import GPT
from minilora.core.params import preset_config
from minilora.core.qlora import quantize_base
from minilora.core.quant import dequantize, quantize
from minilora.core.vera import vera_backward, vera_forward

Array = Any


def randomize_for_check(model: Any, seed: int = 0) -> None:
    """Give a float64 model weights that make every gradient well-sized.

    GPT-2's init (std 0.02) makes attention nearly uniform, so the gradients of q and
    k are ~1e-6 and drown in the finite differences' rounding noise. Here matrices get
    std 0.2 and biases / layer-norm parameters get a perturbation of std 0.1 around
    their init (LN weights stay near 1, so activations keep their scale).
    """
    rng = np.random.default_rng(seed + 12345)
    for value in model.params.values():
        host = to_host(value)
        noise = rng.normal(0.0, 0.2 if host.ndim == 2 else 0.1, host.shape)
        value[...] = xp_of(value).asarray(noise if host.ndim == 2 else host + noise)


def _lora_linear_grads(dh: Array, cache: tuple) -> tuple:
    """lora_linear_backward's gradients in the order (x, A1, B1, A2, B2)."""
    dx, _, _, ((dA1, dB1), (dA2, dB2)) = lora_linear_backward(dh, cache)
    return dx, dA1, dB1, dA2, dB2


def _dora_grads(dh: Array, cache: tuple) -> tuple:
    """dora_backward's gradients in the order (x, A, B, m)."""
    return dora_backward(dh, cache)[:4]


def _qlora_linear_grads(dh: Array, cache: tuple) -> tuple:
    """lora_linear_backward's gradients in the order (x, A, B); the base W is frozen."""
    dx, _, _, ((dA, dB),) = lora_linear_backward(dh, cache, need_dW=False, need_db=False)
    return dx, dA, dB


def full_report(seed: int = 0, device: str | None = None) -> list[CheckResult]:
    """Check every op, the LoRA layer, and the tiny GPT (full and LoRA) in float64.

    This is what ``minilora gradcheck`` prints: one row per op input, then one row
    per model parameter, named "gpt.<param>" and "gpt+lora.<param>".
    """
    xp = get_backend(device).xp
    rng = np.random.default_rng(seed)

    def arr(*shape: int) -> Array:
        return xp.asarray(rng.normal(size=shape))

    mask = L.dropout_mask((3, 5, 6), 0.3, xp.random.default_rng(seed), np.dtype("float64"))
    mask2 = L.dropout_mask((3, 5, 6), 0.5, xp.random.default_rng(seed + 1), np.dtype("float64"))
    targets = xp.asarray(rng.integers(-1, 7, size=(3, 5)))
    targets[0, 0] = 1  # at least one counted position
    W_lora, b_lora = arr(4, 6), arr(4)  # the frozen base of the LoRA layer
    dora = dict(x=arr(3, 5, 6), A=arr(2, 6), B=arr(4, 2), m=arr(4))
    norm = weight_norm(W_lora, dora["A"], dora["B"], 1.5)  # n at the checked point, held
    # QLoRA's layer: the same LoRA layer on W = dequantize(quantize(W)), a constant
    W_nf4 = xp.asarray(to_host(dequantize(quantize(arr(8, 16)))), dtype=xp.float64)
    b_nf4 = arr(8)
    A_vera, B_vera = arr(3, 6), arr(4, 3)  # VeRA's shared slices: frozen, not checked
    ops: list[tuple[str, Callable, Callable, dict]] = [
        (
            "linear",
            L.linear_forward,
            L.linear_backward,
            dict(x=arr(3, 5, 6), W=arr(4, 6), b=arr(4)),
        ),
        (
            "layer_norm",
            L.layer_norm_forward,
            L.layer_norm_backward,
            dict(x=arr(3, 5, 6), weight=arr(6), bias=arr(6)),
        ),
        ("gelu", L.gelu_forward, L.gelu_backward, dict(x=arr(3, 5, 6))),
        ("softmax", L.softmax_forward, L.softmax_backward, dict(x=arr(3, 5, 6))),
        (
            "attention",
            lambda q, k, v: L.attention_forward(q, k, v, n_head=2),
            L.attention_backward,
            dict(q=arr(2, 5, 6), k=arr(2, 5, 6), v=arr(2, 5, 6)),
        ),
        ("dropout", lambda x: L.dropout_forward(x, mask), L.dropout_backward, dict(x=arr(3, 5, 6))),
        ("residual", L.residual_forward, L.residual_backward, dict(x=arr(3, 6), fx=arr(3, 6))),
        (
            "cross_entropy",
            lambda logits: L.cross_entropy_forward(logits, targets),
            L.cross_entropy_backward,
            dict(logits=arr(3, 5, 7)),
        ),
        (
            "lora_linear",  # two stacked adapters with their own dropout masks; W, b frozen
            lambda x, A1, B1, A2, B2: lora_linear_forward(
                x, W_lora, b_lora, [LoraBranch(A1, B1, 2.0, mask), LoraBranch(A2, B2, 0.5, mask2)]
            ),
            _lora_linear_grads,
            dict(x=arr(3, 5, 6), A1=arr(2, 6), B1=arr(4, 2), A2=arr(3, 6), B2=arr(4, 3)),
        ),
        (
            "dora_detached",  # the default backward: the forward with n held fixed
            lambda x, A, B, m: dora_forward(x, W_lora, A, B, m, 1.5, mask, norm=norm),
            _dora_grads,
            dora,
        ),
        (
            "dora_exact",  # the backward through n = ||W + s B A||: the forward itself
            lambda x, A, B, m: dora_forward(x, W_lora, A, B, m, 1.5, mask, exact_grad=True),
            _dora_grads,
            dora,
        ),
        (
            "nf4_lora_linear",  # dx = dh Ŵ + s (dh B) A, dA, dB; Ŵ from NF4 gets nothing
            lambda x, A, B: lora_linear_forward(x, W_nf4, b_nf4, [LoraBranch(A, B, 2.0, None)]),
            _qlora_linear_grads,
            dict(x=arr(3, 5, 16), A=arr(2, 16), B=arr(8, 2)),
        ),
        (
            "vera",  # λ_b ⊙ ((λ_d ⊙ D(x) A^T) B^T): only x and the two vectors have gradients
            lambda x, lambda_d, lambda_b: vera_forward(x, A_vera, B_vera, lambda_d, lambda_b, mask),
            vera_backward,
            dict(x=arr(3, 5, 6), lambda_d=arr(3), lambda_b=arr(4)),
        ),
    ]
    results = []
    for name, forward, backward, inputs in ops:
        for r in gradcheck(forward, backward, inputs, seed=seed):
            r.name = f"{name}.{r.name}"
            results.append(r)
    # the embedding's input is integer ids: only its weight has a gradient
    ids = xp.asarray(rng.integers(0, 5, size=(3, 4)))
    for r in gradcheck(
        lambda weight: L.embedding_forward(ids, weight),
        L.embedding_backward,
        dict(weight=arr(5, 6)),
        seed=seed,
    ):
        r.name = "embedding.weight"
        results.append(r)

    config = preset_config("tiny")
    idx = rng.integers(0, config.vocab_size, size=(4, config.block_size))
    y = rng.integers(0, config.vocab_size, size=(4, config.block_size))
    targets_all = ("q", "k", "v", "o", "fc", "proj")
    lora = LoraConfig(r=2, alpha=4, dropout=0.1, target_modules=targets_all)
    # the whole model's loss with DoRA is checked with the exact backward: finite
    # differences of the loss see the norm move (the detached backward has its op row)
    dora_config = LoraConfig(
        r=2, alpha=4, dropout=0.1, target_modules=targets_all, use_dora=True, dora_exact_grad=True
    )
    vera_config = LoraConfig(r=2, dropout=0.1, target_modules=targets_all, use_vera=True)
    adapters = (
        ("gpt+lora", lora),
        ("gpt+dora", dora_config),
        ("gpt+vera", vera_config),
        ("gpt+qlora", lora),
    )
    for label, adapter in (("gpt", None), *adapters):
        model = GPT(config, seed=seed, dtype="float64", device=device)
        randomize_for_check(model, seed)
        if label == "gpt+qlora":  # the linears' W in NF4, dequantized on every forward
            quantize_base(model, "nf4")
        if adapter is not None:
            add_adapter(model, adapter)
            for name in model.trainable_names():  # B = 0 would make dA exactly zero
                model.params[name][...] = xp.asarray(rng.normal(0.0, 0.2, model.params[name].shape))

        def loss(model: GPT = model) -> float:
            model.reseed(seed)  # the same dropout masks every time
            return model.loss(idx, y)  # in training mode: dropout on

        loss()
        model.backward()
        arrays = {n: model.params[n] for n in model.trainable_names()}
        for r in check_gradients(loss, arrays, model.grads, seed=seed):
            r.name = f"{label}.{r.name}"
            results.append(r)
    return results
