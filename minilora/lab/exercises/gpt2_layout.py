"""Exercise of notebook 09 (to GPT-2 and PEFT): split GPT-2's fused attention projection.

GPT-2 stores q, k and v as one ``Conv1D`` called ``c_attn``: y = x W + b with W of shape
(d, 3d), the three projections side by side in column blocks. minilora keeps three
``nn.Linear``-style weights of shape (d_out, d_in). The learner writes the split that
files/gpt2.py's ``from_gpt2`` does; tests/test_exercises.py checks the reference against
``ml.load_gpt2`` on a folder the library wrote.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minilora.lab.exercises.grader import Case, Exercise, Mistake, register

Array = Any


# ------------------------------------------------------------------ the reference
def split_c_attn(W: Array, b: Array) -> tuple[Array, Array, Array, Array, Array, Array]:
    d = W.shape[0]
    # column block j of W is projection j as a (d_in, d_out) Conv1D matrix: transpose it
    Wq, Wk, Wv = (W[:, j * d : (j + 1) * d].T for j in range(3))
    bq, bk, bv = (b[j * d : (j + 1) * d] for j in range(3))
    return Wq, Wk, Wv, bq, bk, bv


def _no_transpose(W: Array, b: Array) -> tuple:
    """Mistake: the column blocks kept as Conv1D's (d_in, d_out) matrices."""
    d = W.shape[0]
    return (*(W[:, j * d : (j + 1) * d] for j in range(3)), *split_c_attn(W, b)[3:])


def _rows(W: Array, b: Array) -> tuple:
    """Mistake: W (d, 3d) reshaped to (3, d, d), which cuts its rows, not its columns."""
    d = W.shape[0]
    blocks = W.reshape(3, d, d)
    return (*(blocks[j].T for j in range(3)), *split_c_attn(W, b)[3:])


def _interleaved(W: Array, b: Array) -> tuple:
    """Mistake: every third column (q, k, v interleaved), for the weight and the bias."""
    return (*(W[:, j::3].T for j in range(3)), *(b[j::3] for j in range(3)))


# ------------------------------------------------------------------ the cases
def _cases(rng: np.random.Generator) -> list[Case]:
    """Random fused weights: GPT-2's float32 at small widths, float64, an odd width."""
    cases = []
    for label, d, dtype in (
        ("d=4, float32", 4, np.float32),
        ("d=6, float64", 6, np.float64),
        ("d=5, float64", 5, np.float64),
        ("d=8, float32", 8, np.float32),
    ):
        W = rng.standard_normal((d, 3 * d)).astype(dtype)
        b = rng.standard_normal(3 * d).astype(dtype)
        cases.append(Case(label, {"W": W, "b": b}, tol=0.0))
    return cases


OUTPUTS = ("Wq", "Wk", "Wv", "bq", "bk", "bv")

register(
    Exercise(
        name="split_c_attn",
        notebook="09",
        statement="""\
Split GPT-2's fused attention projection c_attn into minilora's q, k and v:

    def split_c_attn(W, b) -> (Wq, Wk, Wv, bq, bk, bv)

GPT-2's layers are Conv1D: y = x W + b, with W of shape (d_in, d_out). c_attn computes
q, k and v at once, d = n_embd:

    W (d, 3d) = [ W_q | W_k | W_v ]     three column blocks of (d, d), in that order
    b (3d,)   = [ b_q | b_k | b_v ]

    [q | k | v] = x W + b               x (N, d)

minilora's linears compute h = x W^T + b with W of shape (d_out, d_in), as
torch.nn.Linear does. Return Wq, Wk, Wv, each (d, d) in minilora's layout, and bq, bk,
bv, each (d,), so that x Wq^T + bq is GPT-2's q, and so on. Nothing is rounded: the
check wants every value bit for bit.""",
        reference=split_c_attn,
        cases=_cases,
        hint="d = W.shape[0]; q is the column block W[:, 0:d], transposed; b[0:d] is bq.",
        outputs=OUTPUTS,
        exact=OUTPUTS,
        mistakes=(
            Mistake(
                "Conv1D stores W as (d_in, d_out) and minilora as (d_out, d_in): each column "
                "block must be transposed (a square block has the right shape either way)",
                _no_transpose,
            ),
            Mistake(
                "q, k and v are column blocks of W (axis 1); W.reshape(3, d, d) or a split "
                "along axis 0 cuts its rows instead",
                _rows,
            ),
            Mistake(
                "the three projections are contiguous blocks [q | k | v], not interleaved "
                "columns: take W[:, 0:d], not W[:, 0::3]",
                _interleaved,
            ),
            Mistake(
                "the blocks come in the q, k, v order: [W_q | W_k | W_v], q first",
                lambda W, b: tuple(split_c_attn(W, b)[k] for k in (1, 0, 2, 4, 3, 5)),
            ),
        ),
    )
)
