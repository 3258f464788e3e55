"""Worked solutions to the exercises of notebook 06 (what LoRA learns)."""

import numpy as np


def subspace_similarity(A1, A2, i, j):
    U_i = np.linalg.svd(A1)[2][:i].T  # right singular vectors: rows of Vt
    V_j = np.linalg.svd(A2)[2][:j].T
    return np.linalg.norm(U_i.T @ V_j) ** 2 / min(i, j)


def amplification_factor(W, dW, r):
    U, _, Vt = np.linalg.svd(dW)
    U_r, V_r = U[:, :r], Vt[:r].T
    return np.linalg.norm(dW) / np.linalg.norm(U_r.T @ W @ V_r)
