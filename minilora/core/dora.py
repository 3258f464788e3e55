"""DoRA: LoRA with the weight split into a magnitude and a direction. The math only.

Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", with PEFT's axis::

    V  = W + s B A               (d_out, d_in)   the LoRA-updated weight
    n  = ||V||  per row          (d_out,)        n_i = sqrt(sum_j V_ij^2), over the inputs
    m                            (d_out,)        trainable magnitude, starts at n (so W' = W)
    g  = m / n                   (d_out,)        the per-output-feature rescaling
    W' = g ⊙ V  = m ⊙ V / ||V||  (each row of V rescaled to length m_i)

    h  = x W'^T + b

The norm is per output feature (a row of the (d_out, d_in) matrix), as in PEFT and the
paper's code. (Raschka's "LoRA and DoRA from scratch" normalises each column instead:
another decomposition, with d_in magnitudes.)

The layer is computed as PEFT computes it, as a correction added to the plain linear::

    h = x W^T + b  +  (g - 1) ⊙ (D(x) W^T)  +  g ⊙ s (D(x) A^T) B^T

Without dropout (D = identity) this is exactly x W'^T + b. With dropout, PEFT runs the
correction's base term on the dropped-out input D(x) too; we do the same, so the two
agree in training as well.

The backward. Write z = D(x) V^T = D(x) W^T + s u B^T with u = D(x) A^T (rows, r). Then
dm = sum_rows(dh ⊙ z) / n. The paper (§4.3) and PEFT treat n as a constant in the
backward ("detached"): gradients reach A and B only through the s u B^T path, scaled by
g. It saves memory (V need not take part in the backward) and the paper found no loss
in accuracy. The exact gradient also follows n's dependence on A and B::

    dg = sum_rows(dh ⊙ z)              (d_out,)
    dn = -dg ⊙ g / n                   (d_out,)     since g = m / n
    dV = (dn / n)[:, None] ⊙ V         (d_out, d_in) since dn_i/dV_ij = V_ij / n_i
    dA += s B^T dV,  dB += s dV A^T    (and dW += dV when W trains)

``dora_forward(..., exact_grad=True)`` keeps what that needs. The detached backward is
the exact gradient of the same forward with n held fixed: pass ``norm=`` to hold it,
which is how its gradient is checked against finite differences.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from minilora.basics.backend import xp_of
from minilora.basics.checks import boolean, real
from minilora.core.layers import as_rows, dropout_backward, dropout_forward

Array = Any


def weight_norm(W: Array, A: Array, B: Array, scale: float) -> Array:
    """n = ||W + s B A|| per row (over d_in): (d_out,). PEFT's ``get_weight_norm``."""
    V = W + real("scale", scale) * (B @ A)
    return xp_of(V).sqrt((V * V).sum(axis=1))


class DoraCache(NamedTuple):
    x: Array  # the input as rows, before dropout (rows, d_in)
    W: Array
    A: Array
    B: Array
    m: Array
    scale: float
    mask: Array | None  # dropout multiplier as rows; None in eval or for p = 0
    u: Array  # D(x) A^T  (rows, r)
    z: Array  # D(x) V^T  (rows, d_out): what dg sums against dh
    norm: Array  # n (d_out,)
    exact_grad: bool
    lead: tuple  # the leading shape N... of x


def dora_forward(
    x: Array,
    W: Array,
    A: Array,
    B: Array,
    m: Array,
    scale: float,
    mask: Array | None = None,
    exact_grad: bool = False,
    norm: Array | None = None,
) -> tuple[Array, DoraCache]:
    """The DoRA correction: (g - 1) ⊙ (D(x) W^T) + g ⊙ s (D(x) A^T) B^T, g = m / n.

    x (N..., d_in), W (d_out, d_in), A (r, d_in), B (d_out, r), m (d_out,), mask (N...,
    d_in) or None. Returns delta_h (N..., d_out): add it to the plain linear's x W^T + b.
    ``exact_grad``: the backward follows n through A and B (default: n detached, as the
    paper and PEFT). ``norm`` (d_out,): hold n at this value instead of ||W + s B A||
    (only with the detached backward: the function that backward differentiates).
    """
    scale = real("scale", scale)
    exact_grad = boolean("exact_grad", exact_grad)
    if norm is not None and exact_grad:
        raise ValueError("norm= holds n fixed, so there is no exact gradient through it")
    n = weight_norm(W, A, B, scale) if norm is None else norm  # (d_out,)
    g = m / n  # (d_out,)
    x2 = as_rows(x)  # (rows, d_in)
    mask2 = None if mask is None else as_rows(mask)
    xd, _ = dropout_forward(x2, mask2)  # D(x)      (rows, d_in)
    base = xd @ W.T  # (rows, d_out)
    u = xd @ A.T  # (rows, r)
    lora = (scale * u) @ B.T  # (rows, d_out)
    delta_h = (g - 1.0) * base + g * lora  # g broadcasts over rows: one factor per output
    z = base + lora  # D(x) V^T, without forming V
    cache = DoraCache(x2, W, A, B, m, scale, mask2, u, z, n, exact_grad, x.shape[:-1])
    return delta_h.reshape(*x.shape[:-1], W.shape[0]), cache


def dora_backward(
    dh: Array, cache: DoraCache, need_dW: bool = False
) -> tuple[Array, Array, Array, Array, Array | None]:
    """Gradients of the DoRA correction: (dx, dA, dB, dm, dW or None).

    dh (N..., d_out). dx is the correction's part only (the plain linear adds dh W);
    dW likewise (only with ``need_dW``: under an adapter W is frozen).
    """
    x2, W, A, B, m, scale, mask2, u, z, n, exact_grad, lead = cache
    dh2 = as_rows(dh)  # (rows, d_out)
    g = m / n
    xd, _ = dropout_forward(x2, mask2)  # recomputed: cheaper than caching a second x
    # forward: delta_h = (g - 1) ⊙ base + g ⊙ lora = g ⊙ z - base  ->  dg = sum_rows(dh ⊙ z)
    dg = (dh2 * z).sum(axis=0)  # (d_out,)
    dm = dg / n  # g = m / n                                         (d_out,)
    dlora = dh2 * g  # (rows, d_out)
    dbase = dh2 * (g - 1.0)  # (rows, d_out)
    # forward: lora = s u B^T, u = D(x) A^T: LoRA's own backward, on dlora
    dB = scale * (dlora.T @ u)  # (d_out, r)
    du = scale * (dlora @ B)  # (rows, r)
    dA = du.T @ xd  # (r, d_in)
    # forward: base = D(x) W^T, u = D(x) A^T  ->  dx = D'(dbase W + du A)
    dx = dropout_backward(dbase @ W + du @ A, mask2)
    dW = dbase.T @ xd if need_dW else None  # (d_out, d_in)
    if exact_grad:  # n = ||V|| per row depends on A and B (and W) through V = W + s B A
        V = W + scale * (B @ A)  # recomputed: (d_out, d_in) is not worth keeping
        dn = -dg * g / n  # (d_out,)
        dV = (dn / n)[:, None] * V  # (d_out, d_in)
        dA = dA + scale * (B.T @ dV)
        dB = dB + scale * (dV @ A.T)
        dW = None if dW is None else dW + dV
    return dx.reshape(*lead, W.shape[1]), dA, dB, dm, dW


def dora_weight(W: Array, A: Array, B: Array, m: Array, scale: float) -> Array:
    """W' = m ⊙ (W + s B A) / ||W + s B A|| per row: (d_out, d_in). What merge writes."""
    scale = real("scale", scale)
    V = W + scale * (B @ A)
    return (m / xp_of(V).sqrt((V * V).sum(axis=1)))[:, None] * V
