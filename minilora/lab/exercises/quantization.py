"""The exercise of notebook 08 on QLoRA's 4-bit base: NF4 quantization of a weight.

The reference is core.quant's, so the learner's function is graded against the code
that stores the model's base (itself equal to bitsandbytes', tests/test_quant_reference.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minilora.core.quant import BLOCKSIZE, NF4_CODE, quantize_blockwise
from minilora.lab.exercises.grader import Case, Exercise, Mistake, register

Array = Any


def nf4_quantize(w: Array, code: Array) -> tuple[Array, Array]:
    idx, absmax = quantize_blockwise(w, np.asarray(code, dtype=np.float32), BLOCKSIZE)
    return idx, absmax


def _cases(rng: np.random.Generator) -> list[Case]:
    code = np.asarray(NF4_CODE, dtype=np.float32)
    cases = []
    for label, shape in (
        ("(8, 64): 8 blocks", (8, 64)),
        ("(5, 40): blocks cross rows, the last has 8", (5, 40)),
        ("(3, 7): one short block", (3, 7)),
    ):
        w = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        w.flat[rng.integers(w.size)] = -0.1  # a block whose largest magnitude is negative
        cases.append(Case(label, {"w": w, "code": code}, tol=1e-7))
    return cases


def _one_absmax(w: Array, code: Array) -> tuple[Array, Array]:
    flat = w.reshape(-1)
    c = np.abs(flat).max()
    idx = np.abs(flat[:, None] / c - code[None, :]).argmin(axis=1)
    return idx, np.full(-(-flat.size // 64), c, dtype=np.float32)


def _signed_max(w: Array, code: Array) -> tuple[Array, Array]:
    flat = w.reshape(-1)
    n = -(-flat.size // 64)
    absmax = np.array([flat[64 * b : 64 * b + 64].max() for b in range(n)], dtype=np.float32)
    x = np.clip(flat / np.repeat(absmax, 64)[: flat.size], -1, 1)
    return np.abs(x[:, None] - code[None, :]).argmin(axis=1), absmax


def _uniform_levels(w: Array, code: Array) -> tuple[Array, Array]:
    idx, absmax = nf4_quantize(w, code)
    x = w.reshape(-1) / np.repeat(absmax, 64)[: w.size]
    return np.rint((x + 1) * 7.5).astype(np.int64), absmax


def _column_major(w: Array, code: Array) -> tuple[Array, Array]:
    return nf4_quantize(np.ascontiguousarray(w.T), code)


register(
    Exercise(
        name="nf4_quantize",
        notebook="08",
        statement="""\
Quantize a weight to NF4 (QLoRA's 4-bit NormalFloat), blockwise:

    def nf4_quantize(w, code) -> (idx, absmax)

w (d_out, d_in) float32; code the 16 NF4 values, sorted, in [-1, 1]
(core.quant.NF4_CODE). Read w row-major as n values and cut them into blocks of 64
(the last block may be shorter). For block b and each value w_j in it:

    absmax_b = max |w_j| over the block                    absmax: (ceil(n / 64),)
    idx_j    = the index of the code value nearest to w_j / absmax_b      idx: (n,)

Dequantized, w_j is code[idx_j] * absmax_b: each block's largest magnitude is kept
exactly, and the codes are spaced as a normal distribution's quantiles.""",
        reference=nf4_quantize,
        cases=_cases,
        hint="absmax = np.abs(blocks).max(axis=1) over w.reshape(-1) cut in 64s, then "
        "argmin of |w / absmax - code| per value. Notebook 08, NF4.",
        outputs=("idx", "absmax"),
        exact=("idx",),
        mistakes=(
            Mistake(
                "one absmax for the whole weight: QLoRA keeps one per block of 64 values, so "
                "one outlier does not crush every other value to the zero code",
                _one_absmax,
            ),
            Mistake(
                "absmax is the largest magnitude |w|: a block's most negative value can be "
                "larger than its largest positive one",
                _signed_max,
            ),
            Mistake(
                "NF4's 16 values are not evenly spaced: take the nearest code value, not "
                "the nearest of 16 evenly spaced levels",
                _uniform_levels,
            ),
            Mistake(
                "the blocks run over the row-major weight, w.reshape(-1), not over its "
                "columns (w.T)",
                _column_major,
            ),
        ),
    )
)
