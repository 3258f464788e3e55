"""Worked solutions to the exercises of notebook 05 (merge and multiple adapters)."""

import numpy as np


def merge_unmerge(W, A, B, s):
    """Keep W before merging: subtracting ΔW again would round."""
    saved = W.copy()
    W_merged = W + s * (B @ A)
    W_back = saved  # unmerge: write the saved copy back
    return W_merged, W_back


def cat_combination(As, Bs, scales, weights):
    A = np.concatenate(As, axis=0)
    B = np.concatenate([w * s * B_i for B_i, s, w in zip(Bs, scales, weights, strict=True)], axis=1)
    return A, B


def svd_combination(As, Bs, scales, weights, r):
    A_cat, B_cat = cat_combination(As, Bs, scales, weights)
    U, S, Vt = np.linalg.svd(B_cat @ A_cat, full_matrices=False)
    A = np.sqrt(S[:r])[:, None] * Vt[:r]
    B = U[:, :r] * np.sqrt(S[:r])
    error = np.sqrt((S[r:] ** 2).sum() / (S**2).sum())
    return A, B, float(error)
