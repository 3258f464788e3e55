"""Exercises of notebooks 05 and 06: merge, combination, and what an adapter learned.

Merge and the scale use core.lora; the combinations mirror core.adapters'
``combine_adapters`` and φ mirrors lab.experiments' subspace similarity, which work on
whole models (tests/test_exercises.py checks that each reference agrees with them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from minilora.core.lora import delta_weight
from minilora.lab.exercises.grader import Case, Exercise, Mistake, register

Array = Any


# ------------------------------------------------------------------ 05: merge, unmerge
def merge_unmerge(W: Array, A: Array, B: Array, s: float) -> tuple[Array, Array]:
    saved = W.copy()  # core.adapters.merge keeps W; unmerge writes this copy back
    merged = W + delta_weight(A, B, s)
    return merged, saved


def _merge_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for label, d_out, d_in, r, s, dtype in (
        ("6 x 4, r=2, float32", 6, 4, 2, 2.5, np.float32),
        ("5 x 5, r=1, float64", 5, 5, 1, 3.0, np.float64),
    ):
        W = rng.standard_normal((d_out, d_in)).astype(dtype)
        A = rng.standard_normal((r, d_in)).astype(dtype)
        B = (10.0 * rng.standard_normal((d_out, r))).astype(dtype)  # ΔW larger than W
        tol = 1e-6 if dtype == np.float32 else 1e-12
        cases.append(Case(label, {"W": W, "A": A, "B": B, "s": s}, tol=tol))
    return cases


register(
    Exercise(
        name="merge_unmerge",
        notebook="05",
        statement="""\
Merge an adapter into its weight, then undo the merge exactly:

    def merge_unmerge(W, A, B, s) -> (W_merged, W_back)

    W_merged = W + s B A        (d_out, d_in): inference then costs what the base costs
    W_back   = W after merging and unmerging; it must equal W bit for bit

W (d_out, d_in), A (r, d_in), B (d_out, r). In floating point W + ΔW - ΔW is not W
again: every sum rounds. core.adapters.merge keeps what unmerge needs to be exact.""",
        reference=merge_unmerge,
        cases=_merge_cases,
        hint="ΔW = s * B @ A; think about what to keep before W changes.",
        outputs=("W_merged", "W_back"),
        exact=("W_back",),
        mistakes=(
            Mistake(
                "unmerging by subtraction is not exact: fl(fl(W + ΔW) - ΔW) misses W by "
                "about an ulp; keep a copy of W from before the merge",
                lambda W, A, B, s: (W + s * (B @ A), (W + s * (B @ A)) - s * (B @ A)),
            ),
            Mistake(
                "ΔW is off by exactly the scale s: W_merged = W + s B A",
                lambda W, A, B, s: (W + B @ A, W.copy()),
            ),
        ),
    )
)


# ------------------------------------------------------------------ 05: combinations
def cat_combination(
    As: Sequence[Array], Bs: Sequence[Array], scales: Sequence[float], weights: Sequence[float]
) -> tuple[Array, Array]:
    A = np.concatenate(list(As), axis=0)  # [A_1; A_2; ...]      (sum r_i, d_in)
    B = np.concatenate([w * s * B_ for B_, s, w in zip(Bs, scales, weights, strict=True)], axis=1)
    return A, B


def _combination_cases(rng: np.random.Generator, svd: bool) -> list[Case]:
    cases = []
    for label, ranks, scales, weights, d_out, d_in, r in (
        ("ranks 2 + 1, weights 1, 0.5", (2, 1), (2.0, 3.0), (1.0, 0.5), 6, 5, 2),
        ("ranks 1 + 2 + 3", (1, 2, 3), (4.0, 1.5, 2.0), (0.3, -1.0, 2.0), 7, 8, 3),
    ):
        As = [rng.standard_normal((k, d_in)) for k in ranks]
        Bs = [rng.standard_normal((d_out, k)) for k in ranks]
        args = {"As": As, "Bs": Bs, "scales": scales, "weights": weights}
        cases.append(
            Case(f"{label}, r={r}" if svd else label, {**args, **({"r": r} if svd else {})})
        )
    return cases


def _no_weights(As, Bs, scales, weights, *r):
    return (cat_combination, svd_combination)[bool(r)](As, Bs, scales, [1.0] * len(As), *r)


def _no_scales(As, Bs, scales, weights, *r):
    return (cat_combination, svd_combination)[bool(r)](As, Bs, [1.0] * len(As), weights, *r)


WEIGHTS = "each B_i carries its weight w_i: ΔW = sum_i w_i s_i B_i A_i"
SCALES = "each B_i carries its scale s_i (the combined adapter has scale 1)"
register(
    Exercise(
        name="cat_combination",
        notebook="05",
        statement="""\
Combine adapters exactly by stacking their factors (PEFT's "cat"):

    def cat_combination(As, Bs, scales, weights) -> (A, B)

    A = [A_1; A_2; ...]                      (sum r_i, d_in)   rows stacked
    B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]      (d_out, sum r_i)  columns side by side
    so that B A = sum_i w_i s_i B_i A_i, and the new adapter has scale 1.

As[i] (r_i, d_in), Bs[i] (d_out, r_i); scales[i] = alpha_i / r_i; weights[i] any real.
The check compares B A with the reference (core.adapters.combine_adapters, method cat).""",
        reference=cat_combination,
        cases=lambda rng: _combination_cases(rng, svd=False),
        hint="np.concatenate(As, axis=0) and np.concatenate([...], axis=1).",
        outputs=("A", "B"),
        compare=lambda A, B: {"B A": B @ A},
        mistakes=(Mistake(WEIGHTS, _no_weights), Mistake(SCALES, _no_scales)),
    )
)


def _svd_of_sum(As, Bs, scales, weights):
    A_cat, B_cat = cat_combination(As, Bs, scales, weights)
    return np.linalg.svd(B_cat @ A_cat, full_matrices=False)


def svd_combination(
    As: Sequence[Array],
    Bs: Sequence[Array],
    scales: Sequence[float],
    weights: Sequence[float],
    r: int,
) -> tuple[Array, Array, float]:
    U, S, Vt = _svd_of_sum(As, Bs, scales, weights)
    A = np.sqrt(S[:r])[:, None] * Vt[:r]  # the top r singular directions, split evenly
    B = U[:, :r] * np.sqrt(S[:r])
    error = float(np.sqrt((S[r:] ** 2).sum() / (S**2).sum()))  # Eckart-Young: the rest
    return A, B, error


def _svd_wrong_error(As, Bs, scales, weights, r, how):
    A, B, _ = svd_combination(As, Bs, scales, weights, r)
    _, S, _ = _svd_of_sum(As, Bs, scales, weights)
    dropped = {"absolute": np.sqrt((S[r:] ** 2).sum()), "unsquared": S[r:].sum() / S.sum()}
    return A, B, float(dropped[how])


def _svd_smallest(As, Bs, scales, weights, r):
    U, S, Vt = _svd_of_sum(As, Bs, scales, weights)
    k = len(S)
    A = np.sqrt(S[k - r :])[:, None] * Vt[k - r :]
    B = U[:, k - r :] * np.sqrt(S[k - r :])
    return A, B, float(np.sqrt((S[: k - r] ** 2).sum() / (S**2).sum()))


register(
    Exercise(
        name="svd_combination",
        notebook="05",
        statement="""\
Combine adapters into one of rank r, as well as rank r allows (PEFT's "svd"):

    def svd_combination(As, Bs, scales, weights, r) -> (A, B, error)

    ΔW = sum_i w_i s_i B_i A_i = U S V^T         (its SVD, S descending)
    B A = U_r S_r V_r^T                          the best rank-r approximation
    error = ||ΔW - B A||_F / ||ΔW||_F = sqrt(sum_{k>r} S_k^2 / sum_k S_k^2)

(Eckart-Young: no rank-r matrix is closer to ΔW in the Frobenius norm.) A (r, d_in),
B (d_out, r), e.g. A = sqrt(S_r) V_r^T and B = U_r sqrt(S_r). Arguments as in
cat_combination; the check compares B A and the error.""",
        reference=svd_combination,
        cases=lambda rng: _combination_cases(rng, svd=True),
        hint="form ΔW (cat_combination's B @ A), np.linalg.svd(dW, full_matrices=False), "
        "keep the first r.",
        outputs=("A", "B", "error"),
        compare=lambda A, B, error: {"B A": B @ A, "error": error},
        mistakes=(
            Mistake(WEIGHTS, _no_weights),
            Mistake(SCALES, _no_scales),
            Mistake(
                "the error is relative: divide by ||ΔW||_F",
                lambda *a: _svd_wrong_error(*a, how="absolute"),
            ),
            Mistake(
                "the Frobenius norm adds squares: sqrt of the sum of the dropped S_k^2",
                lambda *a: _svd_wrong_error(*a, how="unsquared"),
            ),
            Mistake("keep the r largest singular values (the first r)", _svd_smallest),
        ),
    )
)


# ------------------------------------------------------------------ 06: φ
def subspace_similarity(A1: Array, A2: Array, i: int, j: int) -> float:
    V1 = np.linalg.svd(A1, full_matrices=False)[2][:i].T  # (d_in, i) top-i right vectors
    V2 = np.linalg.svd(A2, full_matrices=False)[2][:j].T
    return float(np.linalg.norm(V1.T @ V2) ** 2 / min(i, j))


def _phi_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for r1, r2, d, i, j in ((4, 8, 10, 2, 3), (1, 3, 6, 1, 2), (6, 6, 12, 4, 4)):
        A1, A2 = rng.standard_normal((r1, d)), rng.standard_normal((r2, d))
        A2[:2] += 2.0 * A1[:1]  # a shared direction: φ well away from the random floor
        args = {"A1": A1, "A2": A2, "i": i, "j": j}
        cases.append(Case(f"r {r1} and {r2}, d={d}, i={i}, j={j}", args))
    return cases


def _phi_with(A1, A2, i, j, norm_power=2, divide=min, shift=0):
    V1 = np.linalg.svd(A1, full_matrices=False)[2][: i + shift].T
    V2 = np.linalg.svd(A2, full_matrices=False)[2][: j + shift].T
    return float(np.linalg.norm(V1.T @ V2) ** norm_power / divide(i, j))


register(
    Exercise(
        name="subspace_similarity",
        notebook="06",
        statement="""\
Implement the normalised subspace similarity of the LoRA paper (Eq. 4):

    def subspace_similarity(A1, A2, i, j) -> phi

    phi(A1, A2, i, j) = ||U_i^T V_j||_F^2 / min(i, j)

U_i (d_in, i): the top-i right singular vectors of A1 (r1, d_in); V_j (d_in, j): the
top-j right singular vectors of A2 (r2, d_in). phi is 1 when one subspace contains
the other and about max(i, j) / d_in for random directions.""",
        reference=subspace_similarity,
        cases=_phi_cases,
        hint="np.linalg.svd(A, full_matrices=False) returns (U, S, Vt); the right singular "
        "vectors are the rows of Vt.",
        mistakes=(
            Mistake("phi divides by min(i, j)", lambda *a: _phi_with(*a, divide=max)),
            Mistake(
                "the Frobenius norm is squared: ||U_i^T V_j||_F^2",
                lambda *a: _phi_with(*a, norm_power=1),
            ),
            Mistake(
                "off by one: the top i vectors are rows 0 .. i-1 of Vt",
                lambda *a: _phi_with(*a, shift=1),
            ),
        ),
    )
)


# ------------------------------------------------------------------ 06: amplification
def amplification_factor(W: Array, dW: Array, r: int) -> float:
    U, _, Vt = np.linalg.svd(dW, full_matrices=False)
    projected = U[:, :r].T @ W @ Vt[:r].T  # (r, r): W in ΔW's own top-r directions
    return float(np.linalg.norm(dW) / np.linalg.norm(projected))


def _amplification_cases(rng: np.random.Generator) -> list[Case]:
    cases = []
    for d_out, d_in, r in ((8, 6, 2), (5, 7, 1), (10, 10, 4)):
        W = rng.standard_normal((d_out, d_in))
        dW = 0.3 * rng.standard_normal((d_out, r)) @ rng.standard_normal((r, d_in))
        cases.append(Case(f"{d_out} x {d_in}, r={r}", {"W": W, "dW": dW, "r": r}))
    return cases


def _amplification_with(W, dW, r, of_W=False, k=None, inverse=False):
    U, _, Vt = np.linalg.svd(W if of_W else dW, full_matrices=False)
    k = r if k is None else k
    ratio = np.linalg.norm(dW) / np.linalg.norm(U[:, :k].T @ W @ Vt[:k].T)
    return float(1 / ratio if inverse else ratio)


register(
    Exercise(
        name="amplification_factor",
        notebook="06",
        statement="""\
Compute the amplification factor of the LoRA paper (section 7.3, Table 7):

    def amplification_factor(W, dW, r) -> float

    factor = ||ΔW||_F / ||U^T W V||_F

U (d_out, r) and V (d_in, r): the top-r left and right singular vectors of ΔW (not of
W). U^T W V (r, r) is how much W already has in the directions ΔW changes; a large
factor means the update amplifies directions W barely used. W, dW (d_out, d_in).""",
        reference=amplification_factor,
        cases=_amplification_cases,
        hint="U, S, Vt = np.linalg.svd(dW, full_matrices=False); V is Vt[:r].T.",
        mistakes=(
            Mistake(
                "project W onto ΔW's singular directions, not W's own",
                lambda W, dW, r: _amplification_with(W, dW, r, of_W=True),
            ),
            Mistake(
                "upside down: ||ΔW||_F / ||U^T W V||_F",
                lambda W, dW, r: _amplification_with(W, dW, r, inverse=True),
            ),
            Mistake(
                "only the top r singular directions of ΔW count",
                lambda W, dW, r: _amplification_with(W, dW, r, k=min(W.shape)),
            ),
        ),
    )
)
