"""Exercises of notebook 08 (the LoRA family): DoRA's backward.

The reference calls the library (core.dora); the mistakes are the wrong versions
learners write most often, each with the hint it earns.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minilora.core.dora import dora_backward as library_dora_backward
from minilora.core.dora import dora_forward, weight_norm
from minilora.core.layers import as_rows, dropout_mask
from minilora.lab.exercises.grader import Case, Exercise, Gradient, Mistake, register
from minilora.lab.exercises.one_layer import LAYER_SETTINGS

Array = Any


def _dora_cases(rng: np.random.Generator) -> list[Case]:
    """Odd shapes, r = 1, a batch of sequences, dropout on and off, float32 once; B != 0
    and m away from ||W + s B A||, as after training (at init dA = 0 and g = 1)."""
    cases = []
    for label, lead, d_in, d_out, r, alpha, p, dtype, tol in LAYER_SETTINGS:
        s = alpha / r
        x = rng.standard_normal((*lead, d_in)).astype(dtype)
        W = rng.standard_normal((d_out, d_in)).astype(dtype)
        A = rng.standard_normal((r, d_in)).astype(dtype)
        B = rng.standard_normal((d_out, r)).astype(dtype)
        n = weight_norm(W, A, B, s)
        m = (n * rng.uniform(0.5, 1.5, d_out)).astype(dtype)
        mask = dropout_mask(x.shape, p, rng, dtype)
        dh = rng.standard_normal((*lead, d_out)).astype(dtype)
        args = {"dh": dh, "x": x, "W": W, "A": A, "B": B, "m": m, "s": s, "mask": mask}
        # the finite differences hold n fixed: the detached backward's function
        cases.append(Case(label, args, extra={"n": n}, factors={"the scale s": s}, tol=tol))
    return cases


def dora_layer_forward(
    x: Array, W: Array, A: Array, B: Array, m: Array, s: float, mask: Array | None, n: Array
) -> Array:
    """h = x W^T + (g - 1) ⊙ (D(x) W^T) + g ⊙ s (D(x) A^T) B^T with g = m / n, n held."""
    return x @ W.T + dora_forward(x, W, A, B, m, s, mask, norm=n)[0]


def dora_backward(
    dh: Array, x: Array, W: Array, A: Array, B: Array, m: Array, s: float, mask: Array | None = None
) -> tuple[Array, Array, Array, Array]:
    _, cache = dora_forward(x, W, A, B, m, s, mask)
    dx, dA, dB, dm, _ = library_dora_backward(dh, cache)
    return dx + dh @ W, dA, dB, dm  # the layer's dx: the plain linear's dh W too


def _wrong(dh, x, W, A, B, m, s, mask, exact=False, dm_by_n=True, g_on_lora=True):
    """The backward with one classic mistake switched on."""
    _, cache = dora_forward(x, W, A, B, m, s, mask, exact_grad=exact)
    dx, dA, dB, dm, _ = library_dora_backward(dh, cache)
    if not dm_by_n:  # dg returned as if it were dm
        dm = dm * cache.norm
    if not g_on_lora:  # LoRA's backward on dh itself, as if g were 1
        xd = as_rows(x if mask is None else x * mask)
        u, dh2 = xd @ A.T, as_rows(dh)
        dB = s * (dh2.T @ u)
        dA = (s * (dh2 @ B)).T @ xd
    return dx + dh @ W, dA, dB, dm


register(
    Exercise(
        name="dora_backward",
        notebook="08",
        statement="""\
Implement the backward of a DoRA layer with the norm detached (the paper's §4.3, PEFT):

    def dora_backward(dh, x, W, A, B, m, s, mask=None) -> (dx, dA, dB, dm)

The forward, with D(x) = x * mask (just x when mask is None), as PEFT computes it:

    V = W + s B A   (d_out, d_in)      n = ||V|| per row (d_out,)      g = m / n
    h = x W^T + (g - 1) ⊙ (D(x) W^T) + g ⊙ s (D(x) A^T) B^T

(without dropout: h = x W'^T, W' = m ⊙ V / n). n is treated as a constant: with
u = D(x) A^T (N..., r), z = D(x) W^T + s u B^T (N..., d_out), dh (N..., d_out):

    dm = sum over N... of (dh ⊙ z) / n          (d_out,)
    dB = s (g ⊙ dh)^T u                         (d_out, r)
    du = s (g ⊙ dh) B                           (N..., r)
    dA = du^T D(x)                              (r, d_in)
    dx = dh W + D'(((g - 1) ⊙ dh) W + du A)     (N..., d_in)

x (N..., d_in), W (d_out, d_in), A (r, d_in), B (d_out, r), m (d_out,). The check
compares with core.dora and with finite differences of the forward with n held fixed.""",
        reference=dora_backward,
        cases=_dora_cases,
        hint="compute n, g, u and z as the forward does, then the five lines of the "
        "statement. Notebook 08, DoRA.",
        outputs=("dx", "dA", "dB", "dm"),
        mistakes=(
            Mistake(
                "dA and dB follow the norm n = ||W + s B A|| too: that is the exact gradient "
                "(LoraConfig(dora_exact_grad=True)); DoRA's default detaches n, so A and B "
                "get gradient only through the s u B^T path",
                lambda dh, x, W, A, B, m, s, mask: _wrong(dh, x, W, A, B, m, s, mask, exact=True),
            ),
            Mistake(
                "dm is missing its 1/n: the forward uses g = m / n, so dm = dg / n",
                lambda dh, x, W, A, B, m, s, mask: _wrong(
                    dh, x, W, A, B, m, s, mask, dm_by_n=False
                ),
            ),
            Mistake(
                "the LoRA path is scaled by g = m / n in the forward: dA and dB start from "
                "g ⊙ dh, not dh",
                lambda dh, x, W, A, B, m, s, mask: _wrong(
                    dh, x, W, A, B, m, s, mask, g_on_lora=False
                ),
            ),
        ),
        gradient=Gradient(
            forward=lambda env: dora_layer_forward(
                env["x"], env["W"], env["A"], env["B"], env["m"], env["s"], env["mask"], env["n"]
            ),
            upstream="dh",
            wrt={"dx": "x", "dA": "A", "dB": "B", "dm": "m"},
        ),
    )
)
