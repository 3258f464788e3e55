"""Exercises of notebooks 03 and 04: counting, memory, and the backwards of a GPT block.

The references call core.params and core.layers; the mistakes are written out by hand.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from minilora.core import params
from minilora.core.layers import (
    attention_backward as library_attention_backward,
)
from minilora.core.layers import (
    attention_forward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    softmax_forward,
)
from minilora.core.layers import (
    layer_norm_backward as library_layer_norm_backward,
)
from minilora.core.layers import softmax_backward as library_softmax_backward
from minilora.lab.exercises.grader import Case, Exercise, Gradient, Mistake, register

Array = Any


# ------------------------------------------------------------ 03: parameter count
def lora_parameter_count(n_layer: int, d_model: int, r: int, targets: Sequence[str]) -> int:
    return params.lora_parameter_count(n_layer, d_model, r, targets)


def _shape(target: str, d: int) -> tuple[int, int]:
    """(d_in, d_out): fc is Linear(d, 4d), proj Linear(4d, d), q k v o Linear(d, d)."""
    return {"fc": (d, 4 * d), "proj": (4 * d, d)}.get(target, (d, d))


def _count(n_layer: int, d: int, r: int, targets: Sequence[str], per: Any) -> int:
    return n_layer * sum(per(r, *_shape(t, d)) for t in targets)


register(
    Exercise(
        name="lora_parameter_count",
        notebook="03",
        statement="""\
Count the trainable parameters of LoRA on a GPT:

    def lora_parameter_count(n_layer, d_model, r, targets) -> int

Each adapted Linear(d_in, d_out) gets A (r, d_in) and B (d_out, r): r (d_in + d_out)
parameters. targets is a list from q, k, v, o (Linear(d, d)), fc (Linear(d, 4d)) and
proj (Linear(4d, d)); every one of the n_layer blocks is adapted. GPT-3 175B, r = 4 on
q and v: 96 * 2 * 4 * (12288 + 12288) = 18,874,368 (the LoRA paper, section 7).""",
        reference=lora_parameter_count,
        cases=lambda rng: [
            Case(f"{n} layers, d={d}, r={r}, {'+'.join(t)}", {"n": n, "d": d, "r": r, "t": t})
            for n, d, r, t in (
                (96, 12288, 4, ("q", "v")),
                (4, 128, 8, ("q", "k", "v", "o")),
                (2, 32, 1, ("q", "fc", "proj")),
            )
        ],
        hint="sum r * (d_in + d_out) over the targets of one block, times n_layer.",
        exact=("result",),
        mistakes=(
            Mistake(
                "that counts the frozen matrices d_in * d_out; the adapter has r (d_in + d_out)",
                lambda n, d, r, t: _count(n, d, r, t, lambda r, i, o: i * o),
            ),
            Mistake(
                "fc is Linear(d, 4d) and proj Linear(4d, d): their d_in + d_out is 5d, not 2d",
                lambda n, d, r, t: n * len(t) * r * 2 * d,
            ),
            Mistake(
                "that counts only A (r d_in); B adds d_out r",
                lambda n, d, r, t: _count(n, d, r, t, lambda r, i, o: r * i),
            ),
            Mistake(
                "that is one block; every one of the n_layer blocks has adapters",
                lambda n, d, r, t: _count(1, d, r, t, lambda r, i, o: r * (i + o)),
            ),
        ),
    )
)


# ------------------------------------------------------------ 03: training memory
def training_memory(
    config: Mapping[str, int], r: int | None, targets: Sequence[str], bytes_per_param: int
) -> int:
    return params.memory_estimate(config, r, targets, bytes_per_param)["total"]


def _memory(config, r, targets, bpp, grads_all=False, adam=None, adapters=True, acts=True) -> int:
    """The formula with one term changed: the mistakes of the exercise."""
    c = config
    base = params.count_architecture(
        c["vocab_size"], c["block_size"], c["n_layer"], c["n_head"], c["d_model"]
    )["total"]
    lora = 0 if r is None else params.lora_parameter_count(c["n_layer"], c["d_model"], r, targets)
    trainable = base if r is None else lora
    stored = base + (lora if adapters else 0)
    gradients = (stored if grads_all else trainable) * bpp
    activations = params.step_activation_bytes(c, r, targets, bpp) if acts else 0
    adam = 3 * bpp if adam is None else adam  # AdamW's m, v and work array, per parameter
    return stored * bpp + gradients + adam * trainable + activations


def _memory_cases(rng: np.random.Generator) -> list[Case]:
    settings = (
        ("gpt3-175b", 4, ("q", "v"), 2),
        ("gpt3-175b", None, ("q", "v"), 2),
        ("small", 8, ("q", "k", "v", "o"), 4),
        ("small", None, ("q", "v"), 4),
    )
    return [
        Case(
            f"{name}, {'full' if r is None else f'LoRA r={r}'}, {bpp} bytes",
            {"config": params.preset(name), "r": r, "targets": t, "bpp": bpp},
        )
        for name, r, t, bpp in settings
    ]


register(
    Exercise(
        name="training_memory",
        notebook="03",
        statement="""\
Estimate the memory of one training step with AdamW, in bytes:

    def training_memory(config, r, targets, bytes_per_param) -> int

    total = weights + gradients + optimizer state + activations
    weights      = (base + LoRA parameters) * bytes_per_param   (every stored parameter)
    gradients    = trainable parameters * bytes_per_param
    optimizer    = trainable parameters * 3 * bytes_per_param   (AdamW's m and v, and the
                   one work array its update uses)
    activations  = params.step_activation_bytes(config, r, targets, bytes_per_param)

config is a dict like params.preset("small"); r is the LoRA rank, or None for full
fine-tuning (then every base parameter is trainable and there are no adapters).
Count the base with params.count_architecture(...)["total"] and the adapters with
params.lora_parameter_count(n_layer, d_model, r, targets).""",
        reference=training_memory,
        cases=_memory_cases,
        hint="first the three counts (base, LoRA, trainable), then the four terms.",
        exact=("result",),
        mistakes=(
            Mistake(
                "gradients are kept for the trainable parameters only",
                lambda c, r, t, b: _memory(c, r, t, b, grads_all=True),
            ),
            Mistake(
                "AdamW's two moments are arrays like the parameters: 2 * bytes_per_param "
                "per trainable parameter (plus one work array), not a fixed 8 bytes",
                lambda c, r, t, b: _memory(c, r, t, b, adam=8),
            ),
            Mistake(
                "the adapters are stored too: weights = (base + LoRA) * bytes_per_param",
                lambda c, r, t, b: _memory(c, r, t, b, adapters=False),
            ),
            Mistake(
                "the activations are missing (params.step_activation_bytes)",
                lambda c, r, t, b: _memory(c, r, t, b, acts=False),
            ),
        ),
    )
)


# ------------------------------------------------------------ 04: a frozen layer
def frozen_linear_backward(dy: Array, W: Array) -> Array:
    # linear_backward's cache is (x as rows, W, has_bias, leading shape); with
    # need_dW=False it never reads x, so None stands in for it: dx needs W alone
    cache = (None, W, False, dy.shape[:-1])
    return linear_backward(dy, cache, need_dW=False, need_db=False)[0]


register(
    Exercise(
        name="frozen_linear_backward",
        notebook="04",
        statement="""\
Implement the backward of a frozen linear layer y = x W^T + b (W and b not trained):

    def frozen_linear_backward(dy, W) -> dx

    dx = dy W        (N..., d_in)

dy (N..., d_out), W (d_out, d_in). Under LoRA the base is frozen, so dW = dy^T x is
never formed and x need not be kept for it: the layer passes the gradient down to the
adapters below, and that needs W alone (core.layers.linear_backward, need_dW=False).""",
        reference=frozen_linear_backward,
        cases=lambda rng: [
            Case(
                label,
                {"dy": rng.standard_normal((*lead, o)), "W": rng.standard_normal((o, i))},
                {"x": rng.standard_normal((*lead, i))},
            )
            for label, lead, i, o in (
                ("5 rows, 7 -> 3", (5,), 7, 3),
                ("(2, 3) rows, 4 -> 4", (2, 3), 4, 4),
            )
        ],
        hint="one matrix product: dy @ W.",
        outputs=("dx",),
        mistakes=(Mistake("W is (d_out, d_in): dx = dy W, not dy W^T", lambda dy, W: dy @ W.T),),
        gradient=Gradient(
            forward=lambda env: linear_forward(env["x"], env["W"])[0],
            upstream="dy",
            wrt={"dx": "x"},
        ),
    )
)


# ------------------------------------------------------------ 04: layer norm
def layer_norm_backward(
    dy: Array, x: Array, weight: Array, eps: float = 1e-5
) -> tuple[Array, Array, Array]:
    _, cache = layer_norm_forward(x, weight, np.zeros_like(weight), eps)
    return library_layer_norm_backward(dy, cache)


def _ln_by_hand(dy, x, weight, eps, mean_terms=2, ddof=0, dweight_on_x=False):
    """Layer norm's backward with a term dropped: the mistakes of the exercise."""
    mu = x.mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(x.var(axis=-1, keepdims=True, ddof=ddof) + eps)
    xhat = (x - mu) * rstd
    dxhat = dy * weight
    dx = dxhat.copy()
    if mean_terms >= 1:
        dx -= dxhat.mean(axis=-1, keepdims=True)
    if mean_terms >= 2:
        dx -= xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    C = x.shape[-1]
    dweight = (dy * (x if dweight_on_x else xhat)).reshape(-1, C).sum(axis=0)
    return dx * rstd, dweight, dy.reshape(-1, C).sum(axis=0)


def _ln_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for label, lead, C in (("4 rows, C=5", (4,), 5), ("(2, 3) rows, C=6", (2, 3), 6)):
        x = 2.0 + 3.0 * rng.standard_normal((*lead, C))  # mean and scale far from 0 and 1
        args = {
            "dy": rng.standard_normal((*lead, C)),
            "x": x,
            "weight": 1.0 + rng.standard_normal(C),
            "eps": 1e-5,
        }
        cases.append(Case(label, args, {"bias": rng.standard_normal(C)}))
    return cases


register(
    Exercise(
        name="layer_norm_backward",
        notebook="04",
        statement="""Implement the backward of layer norm over the last axis (C channels):

    def layer_norm_backward(dy, x, weight, eps=1e-5) -> (dx, dweight, dbias)

Forward: xhat = (x - mean) * rstd, rstd = 1 / sqrt(var + eps) (the biased variance,
divided by C), y = xhat * weight + bias. Backward, with dxhat = dy * weight:

    dweight = sum over rows of dy * xhat      (C,)
    dbias   = sum over rows of dy             (C,)
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))     (N..., C)

the two means over the last axis being the paths through the mean and the variance.
dy, x (N..., C); weight (C,).""",
        reference=layer_norm_backward,
        cases=_ln_cases,
        hint="recompute xhat and rstd from x, then the three lines of the statement.",
        outputs=("dx", "dweight", "dbias"),
        mistakes=(
            Mistake(
                "the two mean terms are missing: the mean and the variance depend on every x",
                lambda dy, x, w, eps: _ln_by_hand(dy, x, w, eps, mean_terms=0),
            ),
            Mistake(
                "the path through the variance is missing: subtract xhat * mean(dxhat * xhat)",
                lambda dy, x, w, eps: _ln_by_hand(dy, x, w, eps, mean_terms=1),
            ),
            Mistake(
                "layer norm's variance is the biased one (divided by C, not C - 1)",
                lambda dy, x, w, eps: _ln_by_hand(dy, x, w, eps, ddof=1),
            ),
            Mistake(
                "dweight multiplies dy by the normalised xhat, not by x",
                lambda dy, x, w, eps: _ln_by_hand(dy, x, w, eps, dweight_on_x=True),
            ),
        ),
        gradient=Gradient(
            forward=lambda env: layer_norm_forward(
                env["x"], env["weight"], env["bias"], env["eps"]
            )[0],
            upstream="dy",
            wrt={"dx": "x", "dweight": "weight", "dbias": "bias"},
        ),
    )
)


# ------------------------------------------------------------ 04: softmax
def softmax_backward(dy: Array, y: Array) -> Array:
    return library_softmax_backward(dy, y)


def _softmax_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for label, shape in (("(4, 5)", (4, 5)), ("(2, 3, 7)", (2, 3, 7))):
        x = rng.standard_normal(shape)
        y = softmax_forward(x)[0]
        cases.append(Case(label, {"dy": rng.standard_normal(shape), "y": y}, {"x": x}))
    return cases


register(
    Exercise(
        name="softmax_backward",
        notebook="04",
        statement="""Implement the backward of the softmax over the last axis, from its output y:

    def softmax_backward(dy, y) -> dx

    dx = y * (dy - sum(dy * y))      the sum over the last axis, kept as a column

This is the Jacobian diag(y) - y y^T applied to dy without forming it: each output
depends on every input of its row through the normalising sum. dy, y, dx (N..., V).""",
        reference=softmax_backward,
        cases=_softmax_cases,
        hint="(dy * y).sum(axis=-1, keepdims=True) is the column to subtract.",
        mistakes=(
            Mistake(
                "the term -y * sum(dy * y) is missing: every output depends on every input",
                lambda dy, y: dy * y,
            ),
            Mistake(
                "only the diagonal of the Jacobian, y (1 - y): the -y_i y_j terms are missing",
                lambda dy, y: dy * y * (1 - y),
            ),
            Mistake(
                "the sum runs over the last axis, the one the softmax normalises",
                lambda dy, y: y * (dy - (dy * y).sum(axis=0, keepdims=True)),
            ),
        ),
        gradient=Gradient(
            forward=lambda env: softmax_forward(env["x"])[0],
            upstream="dy",
            wrt={"result": "x"},
        ),
    )
)


# ------------------------------------------------------------ 04: attention
def attention_backward(
    dy: Array, q: Array, k: Array, v: Array, n_head: int
) -> tuple[Array, Array, Array]:
    _, cache = attention_forward(q, k, v, n_head)
    return library_attention_backward(dy, cache)


def _heads(a: Array, H: int) -> Array:
    B, T, C = a.shape
    return a.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)


def _unheads(a: Array) -> Array:
    B, H, T, hs = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, T, H * hs)


def _attention_by_hand(dy, q, k, v, H, dv_transposed=True, dk_transposed=True):
    """Attention's backward with a transpose forgotten: the mistakes of the exercise."""
    _, (qh, kh, vh, P) = attention_forward(q, k, v, H)  # qh already divided by sqrt(hs)
    dyh = _heads(dy, H)
    Pt = P.transpose(0, 1, 3, 2)
    dvh = (Pt if dv_transposed else P) @ dyh
    dS = library_softmax_backward(dyh @ vh.transpose(0, 1, 3, 2), P)
    dqh = dS @ kh / math.sqrt(qh.shape[-1])
    dkh = (dS.transpose(0, 1, 3, 2) if dk_transposed else dS) @ qh
    return _unheads(dqh), _unheads(dkh), _unheads(dvh)


def _attention_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for label, B, T, C, H in (
        ("B=2, T=3, C=4, 2 heads", 2, 3, 4, 2),
        ("B=1, T=5, C=3, 1 head", 1, 5, 3, 1),
    ):
        q, k, v, dy = (rng.standard_normal((B, T, C)) for _ in range(4))
        factors = {"1/sqrt(hs)": 1 / math.sqrt(C // H)}
        cases.append(Case(label, {"dy": dy, "q": q, "k": k, "v": v, "H": H}, factors=factors))
    return cases


register(
    Exercise(
        name="attention_backward",
        notebook="04",
        statement="""Implement the backward of causal multi-head attention:

    def attention_backward(dy, q, k, v, n_head) -> (dq, dk, dv)

The forward is core.layers.attention_forward: q, k, v, dy (B, T, C) are split into
H = n_head heads of size hs = C / H. Per head, with Q' = Q / sqrt(hs):
S = Q' K^T (causal: -inf above the diagonal), P = softmax(S), Y = P V. Recompute P, then

    dV = P^T dY,   dP = dY V^T,   dS = P * (dP - sum(dP * P)),
    dQ = dS K / sqrt(hs),   dK = dS^T Q'

and merge the heads back to (B, T, C). The masked entries have P = 0, so dS is 0 there.""",
        reference=attention_backward,
        cases=_attention_cases,
        hint="split into heads with reshape(B, T, H, hs).transpose(0, 2, 1, 3); recompute P "
        "with the causal mask, then the five lines of the statement.",
        outputs=("dq", "dk", "dv"),
        mistakes=(
            Mistake(
                "dV = P^T dY: every query position sends gradient to the values it read",
                lambda dy, q, k, v, H: _attention_by_hand(dy, q, k, v, H, dv_transposed=False),
            ),
            Mistake(
                "dK = dS^T Q', not dS Q': S = Q' K^T, so K enters transposed",
                lambda dy, q, k, v, H: _attention_by_hand(dy, q, k, v, H, dk_transposed=False),
            ),
        ),
        gradient=Gradient(
            forward=lambda env: attention_forward(env["q"], env["k"], env["v"], env["H"])[0],
            upstream="dy",
            wrt={"dq": "q", "dk": "k", "dv": "v"},
        ),
    )
)
