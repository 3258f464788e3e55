"""Exercises of notebooks 01 and 02: one LoRA layer, its backward, dropout, the scale.

Each exercise's reference calls the library (core.lora, core.layers); the mistakes are
the wrong versions learners write most often, each with the hint it earns.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from minilora.core.layers import as_rows, dropout_forward, dropout_mask
from minilora.core.layers import dropout_backward as library_dropout_backward
from minilora.core.lora import LoraConfig
from minilora.core.lora import lora_backward as library_lora_backward
from minilora.core.lora import lora_forward as library_lora_forward
from minilora.lab.exercises.grader import Case, Exercise, Gradient, Mistake, register

Array = Any

MASK_NOT_ON_BACKWARD = (
    "the dropout mask is applied on the forward but not on the backward: "
    "D(x) = x * mask, so the gradient that reaches x is multiplied by the same mask"
)


# ------------------------------------------------------------------ the cases
# label, leading shape, d_in, d_out, r, alpha, p, dtype, tolerance: odd shapes, r = 1, a
# batch of sequences, dropout on and off, float32 once (family.py's DoRA cases reuse it)
LAYER_SETTINGS = (
    ("5 rows, 7 -> 3, r=2", (5,), 7, 3, 2, 5.0, 0.0, np.float64, 1e-9),
    ("r=1, dropout 0.2", (4,), 6, 5, 1, 3.0, 0.2, np.float64, 1e-9),
    ("(2, 3) rows, r=3, dropout 0.25", (2, 3), 5, 4, 3, 4.5, 0.25, np.float64, 1e-9),
    ("float32, 6 -> 6, r=2", (3,), 6, 6, 2, 5.0, 0.0, np.float32, 1e-5),
)


def _lora_cases(rng: np.random.Generator) -> list[Case]:
    """Odd shapes, r = 1, a batch of sequences, dropout on and off, float32 once."""
    cases = []
    for label, lead, d_in, d_out, r, alpha, p, dtype, tol in LAYER_SETTINGS:
        s = alpha / r
        x = rng.standard_normal((*lead, d_in)).astype(dtype)
        A = rng.standard_normal((r, d_in)).astype(dtype)
        B = rng.standard_normal((d_out, r)).astype(dtype)  # trained: B != 0
        mask = dropout_mask(x.shape, p, rng, dtype)
        dh = rng.standard_normal((*lead, d_out)).astype(dtype)
        factors = {"the scale s": s, **({"1/(1-p)": 1 / (1 - p)} if p else {})}
        args = {"dh": dh, "x": x, "A": A, "B": B, "s": s, "mask": mask}
        cases.append(Case(label, args, factors=factors, tol=tol))
    return cases


def _forward_cases(rng: np.random.Generator) -> list[Case]:
    return [
        Case(c.label, {k: v for k, v in c.args.items() if k != "dh"}, factors=c.factors, tol=c.tol)
        for c in _lora_cases(rng)
    ]


# ------------------------------------------------------------------ 01: the forward
def lora_forward(x: Array, A: Array, B: Array, s: float, mask: Array | None = None) -> Array:
    return library_lora_forward(x, A, B, s, mask)[0]


register(
    Exercise(
        name="lora_forward",
        notebook="01",
        statement="""\
Implement the adapter branch of a LoRA layer (the LoRA paper, Eq. 3, with dropout):

    def lora_forward(x, A, B, s, mask=None) -> delta_h

    delta_h = s * (D(x) A^T) B^T,    D(x) = x * mask  (just x when mask is None)

x (N..., d_in): any number of leading dimensions; A (r, d_in); B (d_out, r); s the scale
alpha / r; mask (N..., d_in) the inverted-dropout multiplier (0 or 1/(1-p)) or None.
Returns delta_h (N..., d_out). Compute it in the low-rank order: (x A^T) first, never
B A.""",
        reference=lora_forward,
        cases=_forward_cases,
        hint="u = D(x) @ A.T is (N..., r); then s * u @ B.T. See notebook 01, section 2.",
        mistakes=(
            Mistake(
                "the dropout mask is not applied: the branch uses D(x) = x * mask",
                lambda x, A, B, s, mask: lora_forward(x, A, B, s, None),
            ),
        ),
    )
)


# ------------------------------------------------------------------ 01: the backward
def lora_backward(
    dh: Array, x: Array, A: Array, B: Array, s: float, mask: Array | None = None
) -> tuple[Array, Array, Array]:
    _, cache = library_lora_forward(x, A, B, s, mask)
    return library_lora_backward(dh, cache)


def _grads_by_hand(
    dh: Array,
    x: Array,
    A: Array,
    B: Array,
    s: float,
    mask: Array | None,
    dx_mask: bool,
    dA_mask: bool,
) -> tuple[Array, Array, Array]:
    """The backward with the mask left out of dx or of dA: two classic mistakes."""
    m = 1.0 if mask is None else mask
    xd = x * m
    u = xd @ A.T
    du = s * dh @ B
    dx = (du @ A) * (m if dx_mask else 1.0)
    dA = as_rows(du).T @ as_rows(xd if dA_mask else x)
    dB = s * as_rows(dh).T @ as_rows(u)
    return dx, dA, dB


register(
    Exercise(
        name="lora_backward",
        notebook="01",
        statement="""\
Implement the backward of the adapter branch delta_h = s * (D(x) A^T) B^T:

    def lora_backward(dh, x, A, B, s, mask=None) -> (dx, dA, dB)

With u = D(x) A^T (N..., r) and dh = dL/d(delta_h) (N..., d_out):

    dB = s * dh^T u          (d_out, r)     summed over every leading position
    du = s * dh B            (N..., r)
    dA = du^T D(x)           (r, d_in)
    dx = D'(du A)            (N..., d_in)   D' multiplies by the same mask

x (N..., d_in), A (r, d_in), B (d_out, r), mask (N..., d_in) or None. The check
compares with core.lora.lora_backward and with finite differences.""",
        reference=lora_backward,
        cases=_lora_cases,
        hint="recompute u = D(x) @ A.T, then follow the four lines of the statement in order. "
        "Notebook 01, section 3.",
        outputs=("dx", "dA", "dB"),
        mistakes=(
            Mistake(
                MASK_NOT_ON_BACKWARD,
                lambda dh, x, A, B, s, mask: _grads_by_hand(dh, x, A, B, s, mask, False, True),
            ),
            Mistake(
                "dA uses x, but the forward used D(x) = x * mask: dA = du^T D(x)",
                lambda dh, x, A, B, s, mask: _grads_by_hand(dh, x, A, B, s, mask, True, False),
            ),
        ),
        gradient=Gradient(
            forward=lambda env: lora_forward(env["x"], env["A"], env["B"], env["s"], env["mask"]),
            upstream="dh",
            wrt={"dx": "x", "dA": "A", "dB": "B"},
        ),
    )
)


# ------------------------------------------------------------------ 02: dropout
def _dropout_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for label, shape, p in (("(5, 7), p=0.2", (5, 7), 0.2), ("(2, 3, 4), p=0.3", (2, 3, 4), 0.3)):
        x = rng.standard_normal(shape)
        keep = rng.random(shape) >= p
        dy = rng.standard_normal(shape)
        args = {"dy": dy, "x": x, "keep": keep, "p": p}
        cases.append(Case(label, args, factors={"1/(1-p)": 1 / (1 - p)}))
    return cases


def inverted_dropout(x: Array, keep: Array, p: float) -> Array:
    return dropout_forward(x, keep.astype(x.dtype) * (1.0 / (1.0 - p)))[0]


def dropout_backward(dy: Array, keep: Array, p: float) -> Array:
    return library_dropout_backward(dy, keep.astype(dy.dtype) * (1.0 / (1.0 - p)))


def _forward_only(rng: np.random.Generator) -> list[Case]:
    return [
        Case(c.label, {k: c.args[k] for k in ("x", "keep", "p")}, factors=c.factors)
        for c in _dropout_cases(rng)
    ]


DIVIDED_BY_P = "survivors are scaled by 1/(1-p), not 1/p: p is the probability of dropping"
register(
    Exercise(
        name="inverted_dropout",
        notebook="02",
        statement="""\
Implement inverted dropout with a given keep pattern:

    def inverted_dropout(x, keep, p) -> y

    y = x * keep / (1 - p)

x any shape; keep a boolean array of the same shape, True where the unit survives;
p the probability of dropping (0 <= p < 1). Dividing the survivors by 1 - p keeps
E[y] = x, so nothing is rescaled at evaluation time (core.layers.dropout_mask).""",
        reference=inverted_dropout,
        cases=_forward_only,
        hint="multiply by keep (as 0.0 / 1.0) and divide by 1 - p. Notebook 02, section 0.",
        mistakes=(
            Mistake(DIVIDED_BY_P, lambda x, keep, p: x * keep / p),
            Mistake(
                "keep is True where a unit survives: this zeroes the survivors",
                lambda x, keep, p: x * ~keep / (1 - p),
            ),
            Mistake(
                "multiplied by (1 - p) where it divides: survivors grow by 1/(1-p)",
                lambda x, keep, p: x * keep * (1 - p),
            ),
        ),
    )
)

register(
    Exercise(
        name="dropout_backward",
        notebook="02",
        statement="""\
Implement the backward of inverted dropout y = x * keep / (1 - p):

    def dropout_backward(dy, keep, p) -> dx

dy, keep and dx have the same shape. Dropout multiplies each x by a constant (0 or
1/(1-p)), so the gradient is multiplied by the same constant: a dropped unit passes no
gradient, a surviving one passes dy / (1 - p).""",
        reference=dropout_backward,
        cases=lambda rng: [
            Case(
                c.label, {k: c.args[k] for k in ("dy", "keep", "p")}, {"x": c.args["x"]}, c.factors
            )
            for c in _dropout_cases(rng)
        ],
        hint="the same multiplier as the forward: dy * keep / (1 - p).",
        mistakes=(
            Mistake(MASK_NOT_ON_BACKWARD, lambda dy, keep, p: dy),
            Mistake(DIVIDED_BY_P, lambda dy, keep, p: dy * keep / p),
        ),
        gradient=Gradient(
            forward=lambda env: inverted_dropout(env["x"], env["keep"], env["p"]),
            upstream="dy",
            wrt={"result": "x"},
        ),
    )
)


# ------------------------------------------------------------------ 02: the scale
def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    return LoraConfig(r=r, alpha=alpha, use_rslora=rslora).scale


register(
    Exercise(
        name="lora_scale",
        notebook="02",
        statement="""\
Implement LoRA's scale s, plain and rsLoRA (Kalajdzievski 2023):

    def lora_scale(alpha, r, rslora) -> s

    s = alpha / r           (plain LoRA, rslora False)
    s = alpha / sqrt(r)     (rsLoRA, rslora True)

alpha > 0, r >= 1 an integer, rslora True or False. Plain LoRA's division by r keeps
the first steps' update the same size at any rank; rsLoRA's sqrt(r) lets larger
ranks learn faster (notebook 02, section 2).""",
        reference=lora_scale,
        cases=lambda rng: [
            Case(f"alpha={a:g}, r={r}, rslora={rs}", {"alpha": a, "r": r, "rslora": rs})
            for a, r, rs in ((16.0, 8, False), (16.0, 64, True), (3.0, 1, False), (8.0, 4, True))
        ],
        hint="alpha / r, or alpha / math.sqrt(r) when rslora is True.",
        mistakes=(
            Mistake(
                "plain LoRA divides by r; sqrt(r) is rsLoRA's",
                lambda alpha, r, rslora: alpha / math.sqrt(r),
            ),
            Mistake(
                "rsLoRA divides by sqrt(r), not r",
                lambda alpha, r, rslora: alpha / r,
            ),
            Mistake(
                "upside down: s = alpha / r, not r / alpha",
                lambda alpha, r, rslora: (math.sqrt(r) if rslora else r) / alpha,
            ),
        ),
    )
)
