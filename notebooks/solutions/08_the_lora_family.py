"""Worked solutions to the exercises of notebook 08 (the LoRA family)."""

import numpy as np


def dora_backward(dh, x, W, A, B, m, s, mask=None):
    """DoRA's backward with the norm n = ||W + s B A|| (per row) held constant."""
    xd = x if mask is None else x * mask  # D(x)
    n = np.sqrt(((W + s * B @ A) ** 2).sum(axis=1))  # (d_out,): one norm per output
    g = m / n  # (d_out,): broadcasts over every leading position

    # dm, dA and dB sum over every leading position N...: flatten those to rows first
    def rows(a):
        return a.reshape(-1, a.shape[-1])

    u = xd @ A.T  # (N..., r)
    z = xd @ W.T + s * u @ B.T  # D(x) V^T: what g multiplies (N..., d_out)
    dm = (rows(dh) * rows(z)).sum(axis=0) / n  # dg = sum(dh * z); g = m / n
    dlora = g * dh  # the LoRA path is scaled by g; n is a constant here
    dB = s * rows(dlora).T @ rows(u)  # (d_out, r)
    du = s * dlora @ B  # (N..., r)
    dA = rows(du).T @ rows(xd)  # (r, d_in)
    dxd = ((g - 1) * dh) @ W + du @ A  # the correction's two terms, through D(x)
    if mask is not None:
        dxd = dxd * mask  # the same mask as the forward
    return dh @ W + dxd, dA, dB, dm  # plus the plain linear's dh W


def nf4_quantize(w, code):
    """Blocks of 64 of the row-major weight, each scaled by its absmax, nearest code."""
    flat = w.reshape(-1)
    n_blocks = -(-flat.size // 64)
    padded = np.zeros(n_blocks * 64, dtype=flat.dtype)
    padded[: flat.size] = flat  # the short last block: padding zeros change no max
    absmax = np.abs(padded.reshape(n_blocks, 64)).max(axis=1)
    x = flat / np.repeat(absmax, 64)[: flat.size]
    idx = np.abs(x[:, None] - code[None, :]).argmin(axis=1)
    return idx, absmax
