"""VeRA: one pair of frozen random matrices shared by every layer, two trainable vectors
per layer. The math only.

Kopiczko et al. 2024, "VeRA: Vector-based Random Matrix Adaptation", as PEFT builds it
(``peft/tuners/vera``)::

    A  (r, d_in_max)       frozen, random, shared by every adapted linear (and seeded)
    B  (d_out_max, r)      frozen, random, shared likewise
    A_l = A[:, :d_in]      (r, d_in)    the slice a (d_out, d_in) linear uses
    B_l = B[:d_out, :]     (d_out, r)
    λ_d                    (r,)         trainable, starts at d_initial (0.1)
    λ_b                    (d_out,)     trainable, starts at 0, so ΔW = 0 at step 0
    ΔW = (λ_b ⊙ B_l)(λ_d ⊙ A_l) = diag(λ_b) B_l diag(λ_d) A_l     (d_out, d_in)

    h = x W^T + b + λ_b ⊙ ((λ_d ⊙ (D(x) A_l^T)) B_l^T)

There is no alpha / r scale (the vectors carry it). d_in_max and d_out_max are the
largest sides over the adapted linears (PEFT's ``_find_dim``). A and B are drawn
Kaiming-uniform, U(-sqrt(6 / fan_in), +sqrt(6 / fan_in)) with fan_in their second side
(d_in_max for A, r for B), A first, from the seed: PEFT draws them the same way from
torch's generator (``projection_prng_key``), so the numbers differ but not the law.

A LoRA adapter trains r (d_in + d_out) numbers per linear; VeRA trains r + d_out.

The backward, with u = D(x) A_l^T (rows, r), v = λ_d ⊙ u and y = v B_l^T (rows, d_out)::

    dλ_b = sum_rows(dh ⊙ y)                 (d_out,)
    dv   = (dh ⊙ λ_b) B_l                   (rows, r)
    dλ_d = sum_rows(dv ⊙ u)                 (r,)
    dx   = D'((dv ⊙ λ_d) A_l)               (rows, d_in)

A and B are frozen: they never get a gradient, so the cache keeps no x.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from minilora.basics.checks import non_negative_int, positive_int
from minilora.core.layers import as_rows, dropout_backward, dropout_forward

Array = Any


class VeraCache(NamedTuple):
    A: Array  # the slice A_l (r, d_in)
    B: Array  # the slice B_l (d_out, r)
    lambda_d: Array  # (r,)
    lambda_b: Array  # (d_out,)
    mask: Array | None  # dropout multiplier as rows; None in eval or for p = 0
    u: Array  # D(x) A_l^T (rows, r): what dλ_d sums against
    y: Array  # (λ_d ⊙ u) B_l^T (rows, d_out): what dλ_b sums against
    lead: tuple  # the leading shape N... of x


def vera_forward(
    x: Array, A: Array, B: Array, lambda_d: Array, lambda_b: Array, mask: Array | None = None
) -> tuple[Array, VeraCache]:
    """The VeRA branch: delta_h = λ_b ⊙ ((λ_d ⊙ (D(x) A^T)) B^T), on rows.

    x (N..., d_in), A (r, d_in) and B (d_out, r) the shared matrices' slices, λ_d (r,),
    λ_b (d_out,), mask (N..., d_in) or None. Returns delta_h (N..., d_out): add it to the
    plain linear's x W^T + b.
    """
    x2 = as_rows(x)  # (rows, d_in)
    mask2 = None if mask is None else as_rows(mask)
    xd, _ = dropout_forward(x2, mask2)  # D(x)  (rows, d_in)
    u = xd @ A.T  # (rows, r)
    y = (lambda_d * u) @ B.T  # λ_d scales each of the r columns   (rows, d_out)
    delta_h = lambda_b * y  # λ_b scales each output feature        (rows, d_out)
    cache = VeraCache(A, B, lambda_d, lambda_b, mask2, u, y, x.shape[:-1])
    return delta_h.reshape(*x.shape[:-1], B.shape[0]), cache


def vera_backward(dh: Array, cache: VeraCache) -> tuple[Array, Array, Array]:
    """Gradients of the VeRA branch: (dx, dλ_d, dλ_b); dh (N..., d_out).

    dx is the branch's part only (the plain linear adds dh W). A and B get none.
    """
    A, B, lambda_d, lambda_b, mask2, u, y, lead = cache
    dh2 = as_rows(dh)  # (rows, d_out)
    # forward: delta_h = λ_b ⊙ y          ->  dλ_b = sum_rows(dh ⊙ y),  dy = dh ⊙ λ_b
    dlambda_b = (dh2 * y).sum(axis=0)  # (d_out,)
    # forward: y = v B^T, v = λ_d ⊙ u    ->  dv = dy B,  dλ_d = sum_rows(dv ⊙ u)
    dv = (dh2 * lambda_b) @ B  # (rows, r)
    dlambda_d = (dv * u).sum(axis=0)  # (r,)
    # forward: u = D(x) A^T              ->  dx = D'((dv ⊙ λ_d) A)
    dx = dropout_backward((dv * lambda_d) @ A, mask2)  # (rows, d_in)
    return dx.reshape(*lead, A.shape[1]), dlambda_d, dlambda_b


def vera_delta_weight(A: Array, B: Array, lambda_d: Array, lambda_b: Array) -> Array:
    """ΔW = (λ_b ⊙ B)(λ_d ⊙ A): (d_out, d_in) from the slices. What merge adds to W
    (PEFT's get_delta_weight)."""
    return (lambda_b[:, None] * B) @ (lambda_d[:, None] * A)


def vera_slices(A: Array, B: Array, d_out: int, d_in: int) -> tuple[Array, Array]:
    """The shared matrices' part a (d_out, d_in) linear uses: A[:, :d_in], B[:d_out, :]."""
    return A[:, :d_in], B[:d_out, :]


# ---------------------------------------------------------------- initialisation
def vera_projection(r: int, d_in: int, d_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The shared (A, B) on the host in float64: A (r, d_in), then B (d_out, r), each
    Kaiming-uniform (bound sqrt(6 / fan_in), fan_in = the second side), drawn from
    ``default_rng(seed)`` in that order. The same seed gives the same matrices."""
    r, d_in, d_out = (positive_int(n, v) for n, v in (("r", r), ("d_in", d_in), ("d_out", d_out)))
    rng = np.random.default_rng(non_negative_int("vera_seed", seed))
    A = rng.uniform(-1.0, 1.0, (r, d_in)) * math.sqrt(6.0 / d_in)
    B = rng.uniform(-1.0, 1.0, (d_out, r)) * math.sqrt(6.0 / r)
    return A, B


def vera_vectors(d_out: int, r: int, d_initial: float) -> tuple[np.ndarray, np.ndarray]:
    """The initial (λ_d, λ_b) on the host: λ_d = d_initial (r,), λ_b = 0 (d_out,), as PEFT."""
    return np.full(r, float(d_initial)), np.zeros(d_out)
