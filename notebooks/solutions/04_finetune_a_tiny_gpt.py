"""Worked solutions to the exercises of notebook 04 (fine-tune a tiny GPT)."""

import numpy as np


def frozen_linear_backward(dy, W):
    """dx = dy W: needs W, not x. dW = dy^T x is never formed for a frozen layer."""
    return dy @ W


def layer_norm_backward(dy, x, weight, eps=1e-5):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased: divided by C
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    C = x.shape[-1]
    dweight = (dy * xhat).reshape(-1, C).sum(axis=0)
    dbias = dy.reshape(-1, C).sum(axis=0)
    dxhat = dy * weight
    # the two means: the paths through the row's mean and through its variance
    dx = rstd * (
        dxhat
        - dxhat.mean(axis=-1, keepdims=True)
        - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True)
    )
    return dx, dweight, dbias


def softmax_backward(dy, y):
    """The Jacobian diag(y) - y y^T applied to dy, row by row."""
    return y * (dy - (dy * y).sum(axis=-1, keepdims=True))


def attention_backward(dy, q, k, v, n_head):
    B, T, C = q.shape
    hs = C // n_head

    def heads(a):  # (B, T, C) -> (B, H, T, hs)
        return a.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)

    def merge(a):  # (B, H, T, hs) -> (B, T, C)
        return a.transpose(0, 2, 1, 3).reshape(B, T, C)

    Q, K, V, dY = heads(q) / np.sqrt(hs), heads(k), heads(v), heads(dy)
    S = Q @ K.transpose(0, 1, 3, 2)
    S = np.where(np.tril(np.ones((T, T), dtype=bool)), S, -np.inf)  # causal mask
    P = np.exp(S - S.max(axis=-1, keepdims=True))
    P /= P.sum(axis=-1, keepdims=True)
    dV = P.transpose(0, 1, 3, 2) @ dY
    dP = dY @ V.transpose(0, 1, 3, 2)
    dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True))
    dQ = dS @ K / np.sqrt(hs)
    dK = dS.transpose(0, 1, 3, 2) @ Q
    return merge(dQ), merge(dK), merge(dV)
