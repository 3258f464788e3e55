"""Worked solutions to the exercises of notebook 01 (LoRA in one layer)."""


def lora_forward(x, A, B, s, mask=None):
    """delta_h = s * (D(x) A^T) B^T, in the low-rank order: B A is never formed."""
    xd = x if mask is None else x * mask  # D(x): inverted dropout, or nothing
    u = xd @ A.T  # (N..., r)
    return s * u @ B.T  # (N..., d_out)


def lora_backward(dh, x, A, B, s, mask=None):
    """dB = s dh^T u, du = s dh B, dA = du^T D(x), dx = D'(du A)."""
    xd = x if mask is None else x * mask
    u = xd @ A.T  # recomputed from the forward: (N..., r)

    # dA and dB sum over every leading position N...: flatten those to rows first
    def rows(a):
        return a.reshape(-1, a.shape[-1])

    dB = s * rows(dh).T @ rows(u)  # (d_out, r)
    du = s * dh @ B  # (N..., r)
    dA = rows(du).T @ rows(xd)  # (r, d_in)
    dx = du @ A  # (N..., d_in)
    if mask is not None:
        dx = dx * mask  # the same mask as the forward
    return dx, dA, dB
