"""The building blocks, each a forward/backward pair.

Every op follows one pattern (cs231n's)::

    out, cache = op_forward(inputs...)
    grads...   = op_backward(dout, cache)

The forward returns what the next op needs and a cache of what its own backward will
need; the backward takes the upstream gradient dL/dout and returns dL/d(input) for each
input, in the forward's argument order. Parameters that are frozen get no gradient:
the backward takes ``need_*`` flags and returns None instead of computing them. That is
where LoRA saves compute and memory: a frozen W still passes the gradient through
(dx = dy W) but never forms dW.

Shapes use fixed letters: B batch, T time (sequence), C channels (d_model), H heads,
hs head size (C / H), V vocabulary, N "any leading dimensions".

Array code uses ``xp = xp_of(x)``, the namespace (NumPy or CuPy) of its input, so the
same lines run on both backends.

The row-wise ops (layer norm, GELU, softmax) allocate their outputs and write into
them in a private ``_..._rows`` function, called through ``by_rows``
(basics/parallel.py): on the CPU a large array is cut into cache-sized blocks of rows
that run on all cores. No row's arithmetic changes, so the result is bit for bit that
of one call on the whole array. Read the ``_rows`` function as the op.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from minilora.basics.backend import overflow_allowed, scatter_add, to_host, xp_of
from minilora.basics.parallel import by_rows

Array = Any  # a NumPy or CuPy ndarray

IGNORE_INDEX = -1
"""Target value meaning "take no loss here" (the cross-entropy skips these positions)."""


# --------------------------------------------------------------------------- linear
def as_rows(x: Array) -> Array:
    """(N..., d) -> (rows, d): every linear op works on rows (a view, no copy).

    One 2-D product is one BLAS call; NumPy runs a 3-D ``x @ W.T`` as a loop of
    smaller ones, 2.5 to 5 times slower on a 2-core CPU.
    """
    return x.reshape(-1, x.shape[-1])


def linear_forward(
    x: Array, W: Array, b: Array | None = None, need_dW: bool = True
) -> tuple[Array, tuple]:
    """y = x W^T + b  (PyTorch's nn.Linear convention), on rows.

    x (N..., d_in), W (d_out, d_in), b (d_out,) or None -> y (N..., d_out).
    Cache: x as rows (rows, d_in), W, and the leading shape N... to restore.
    x is kept only if the backward will form dW = dy^T x (``need_dW``): dx = dy W and
    db need no x, so a frozen W lets its input be freed, as autograd does.
    """
    x2 = as_rows(x)  # (rows, d_in)
    y = x2 @ W.T  # (rows, d_out)
    if b is not None:
        y += b  # in place: y is a fresh array
    kept = x2 if need_dW else None
    return y.reshape(*x.shape[:-1], W.shape[0]), (kept, W, b is not None, x.shape[:-1])


def linear_backward(
    dy: Array, cache: tuple, need_dW: bool = True, need_db: bool = True
) -> tuple[Array, Array | None, Array | None]:
    """dx = dy W,  dW = dy^T x,  db = sum of dy over rows.

    dy (N..., d_out) -> dx (N..., d_in), dW (d_out, d_in) or None, db (d_out,) or None.
    A frozen W (need_dW=False) costs one matmul instead of two.
    """
    x2, W, has_bias, lead = cache
    if need_dW and x2 is None:
        raise ValueError("dW needs the input x, which the forward did not keep (need_dW=False)")
    dy2 = as_rows(dy)  # (rows, d_out)
    dx = (dy2 @ W).reshape(*lead, W.shape[1])  # (N..., d_in)
    dW = dy2.T @ x2 if need_dW else None  # (d_out, d_in)
    db = dy2.sum(axis=0) if need_db and has_bias else None  # (d_out,)
    return dx, dW, db


# ------------------------------------------------------------------------ embedding
def embedding_forward(idx: Array, weight: Array) -> tuple[Array, tuple]:
    """out[n] = weight[idx[n]]: a row lookup.

    idx (N...) integer ids in [0, V), weight (V, C) -> out (N..., C).
    """
    return weight[idx], (idx, weight.shape)


def embedding_backward(dout: Array, cache: tuple) -> Array:
    """dweight[v] = sum of dout[n] over every n with idx[n] == v.

    A token that appears twice receives both gradients, so this is a scatter-*add*
    (plain fancy-index assignment would keep only the last one).
    dout (N..., C) -> dweight (V, C).
    """
    idx, weight_shape = cache
    xp = xp_of(dout)
    dweight = xp.zeros(weight_shape, dtype=dout.dtype)
    scatter_add(dweight, idx.reshape(-1), dout.reshape(-1, weight_shape[1]))
    return dweight


# ------------------------------------------------------------------ sums over rows
def row_sums(a: Array, b: Array | None = None) -> Array:
    """sum_c a[n, c] (or sum_c a[n, c] b[n, c] with ``b``) over the last axis, as (N..., 1).

    The row-wise ops need these sums of short rows (C = 128 in the small model). On
    such rows einsum's loop is about 3 times faster than ``a.sum(axis=-1)`` or
    ``a.mean(axis=-1)``, and the product form never builds a * b. Each row is summed
    on its own, so row blocks (basics/parallel.py) do not change it.
    """
    xp = xp_of(a)
    total = xp.einsum("...c->...", a) if b is None else xp.einsum("...c,...c->...", a, b)
    return total[..., None]


# ----------------------------------------------------------------------- layer norm
class LayerNormCache(NamedTuple):
    xhat: Array  # (x - mean) * rstd, the normalised input
    rstd: Array  # 1 / sqrt(var + eps), shape (N..., 1)
    weight: Array


def layer_norm_forward(
    x: Array, weight: Array, bias: Array, eps: float = 1e-5
) -> tuple[Array, LayerNormCache]:
    """y = (x - mean) / sqrt(var + eps) * weight + bias, statistics over the last axis.

    var is the biased (1/C) variance, as in PyTorch. x (N..., C), weight, bias (C,).
    """
    xp = xp_of(x)
    y, xhat = xp.empty(x.shape, x.dtype), xp.empty(x.shape, x.dtype)
    rstd = xp.empty((*x.shape[:-1], 1), x.dtype)
    by_rows(_layer_norm_rows, (x, y, xhat, rstd), weight, bias, eps)  # row blocks, all cores
    return y, LayerNormCache(xhat, rstd, weight)


def _layer_norm_rows(
    x: Array, y: Array, xhat: Array, rstd: Array, weight: Array, bias: Array, eps: float
) -> None:
    """Layer norm of rows x (rows, C) into y and xhat (rows, C), and rstd (rows, 1)."""
    xp = xp_of(x)
    C = x.shape[-1]
    mean = row_sums(x) / C  # (rows, 1)
    xp.subtract(x, mean, out=xhat)  # centred; normalised below
    var = row_sums(xhat, xhat) / C  # the sum of squares, with no (rows, C) temporary
    xp.divide(1.0, xp.sqrt(var + eps), out=rstd)
    xhat *= rstd
    xp.multiply(xhat, weight, out=y)
    y += bias


def layer_norm_backward(
    dy: Array, cache: LayerNormCache, need_dparams: bool = True
) -> tuple[Array, Array | None, Array | None]:
    """Gradients of layer norm.

    dweight = sum_rows dy * xhat,  dbias = sum_rows dy,
    dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),  dxhat = dy * weight
    (the two mean terms are the paths through the mean and the variance).
    """
    xhat, rstd, weight = cache
    xp = xp_of(dy)
    dx = xp.empty(dy.shape, dy.dtype)
    by_rows(_layer_norm_backward_rows, (dy, xhat, rstd, dx), weight)  # row blocks, all cores
    if not need_dparams:
        return dx, None, None
    C = dy.shape[-1]  # sums over rows: whole, as blocks would reorder their additions
    dweight = (dy * xhat).reshape(-1, C).sum(axis=0)
    dbias = dy.reshape(-1, C).sum(axis=0)
    return dx, dweight, dbias


def _layer_norm_backward_rows(
    dy: Array, xhat: Array, rstd: Array, dx: Array, weight: Array
) -> None:
    """dx of layer norm for rows dy (rows, C), written into dx."""
    xp = xp_of(dy)
    C = dy.shape[-1]
    xp.multiply(dy, weight, out=dx)  # dxhat, turned into dx in place
    mean_dxhat = row_sums(dx) / C  # (rows, 1)
    mean_dxhat_xhat = row_sums(dx, xhat) / C  # (rows, 1), with no (rows, C) temporary
    dx -= xhat * mean_dxhat_xhat
    dx -= mean_dxhat
    dx *= rstd


# ----------------------------------------------------------------------------- GELU
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def gelu_forward(x: Array) -> tuple[Array, tuple]:
    """y = 0.5 x (1 + tanh(u)),  u = c (x + 0.044715 x^3),  c = sqrt(2/pi)  (GPT-2's GELU),

    computed as y = x s with s = sigmoid(2u) = 1 / (1 + exp(-2u)), because
    0.5 (1 + tanh(u)) = sigmoid(2u): the same function, with one exp instead of one
    tanh (NumPy's float32 tanh costs about twice its exp), and no 1 + tanh(u) that
    cancels to 0 for large negative x. Cache: x and s, which the backward reuses.
    """
    xp = xp_of(x)
    y, s = xp.empty(x.shape, x.dtype), xp.empty(x.shape, x.dtype)
    by_rows(_gelu_rows, (x, y, s))  # row blocks, all cores (basics/parallel.py)
    return y, (x, s)


def _gelu_rows(x: Array, y: Array, s: Array) -> None:
    """GELU of rows x into y, and s = sigmoid(2u), in place (x*x, never x**3: pow is
    100x slower)."""
    xp = xp_of(x)
    e = xp.multiply(x, x, out=s)  # s holds -2u, then exp(-2u), until it holds sigmoid(2u)
    e *= -2 * _GELU_A * _GELU_C
    e -= 2 * _GELU_C
    e *= x  # -2u = -2c (x + 0.044715 x^3)
    with overflow_allowed(xp):  # x below about -10: exp(-2u) = inf, and s = 1/inf = 0
        xp.exp(e, out=e)
    e += 1.0
    xp.divide(1.0, e, out=s)
    xp.multiply(x, s, out=y)


def gelu_backward(dy: Array, cache: tuple) -> Array:
    """dx = dy * [s + 2 s (1 - s) x c (1 + 3 * 0.044715 x^2)],  s = sigmoid(2u) cached.

    From y = x s(u): dy/dx = s + x ds/du du/dx, with ds/du = 2 s (1 - s) (the sigmoid's
    derivative, times 2 for its argument 2u) and du/dx = c (1 + 3 * 0.044715 x^2).
    """
    x, s = cache
    xp = xp_of(dy)
    dx = xp.empty(dy.shape, dy.dtype)
    by_rows(_gelu_backward_rows, (dy, x, s, dx))  # row blocks, all cores
    return dx


def _gelu_backward_rows(dy: Array, x: Array, s: Array, dx: Array) -> None:
    """dx of GELU for rows (the formula above), written into dx."""
    xp = xp_of(dy)
    local = xp.multiply(x, x, out=dx)  # the local derivative, times dy at the end
    local *= 6 * _GELU_A * _GELU_C
    local += 2 * _GELU_C
    local *= x  # 2 x c (1 + 3 a x^2)
    slope = xp.subtract(1.0, s)
    slope *= s  # s (1 - s)
    local *= slope
    local += s
    local *= dy


# -------------------------------------------------------------------------- softmax
def softmax_forward(x: Array) -> tuple[Array, Array]:
    """y = exp(x - max) / sum exp(x - max) over the last axis (shifting by the max
    changes nothing mathematically and keeps exp from overflowing). Cache: y."""
    xp = xp_of(x)
    y = xp.empty(x.shape, x.dtype)
    by_rows(_softmax_rows, (x, y))  # row blocks, all cores (basics/parallel.py)
    return y, y


def _softmax_rows(x: Array, y: Array) -> None:
    """Softmax of rows x (rows, n) over each row, into y."""
    xp = xp_of(x)
    xp.subtract(x, x.max(axis=-1, keepdims=True), out=y)
    xp.exp(y, out=y)  # in place: one array for the whole softmax
    y *= 1.0 / row_sums(y)  # one division per row, then a multiply per element


def softmax_backward(dy: Array, y: Array) -> Array:
    """dx = y * (dy - sum(dy * y)) over the last axis: the softmax Jacobian
    diag(y) - y y^T applied to dy without forming it."""
    xp = xp_of(dy)
    dx = xp.empty(dy.shape, dy.dtype)
    by_rows(_softmax_backward_rows, (dy, y, dx))  # row blocks, all cores
    return dx


def _softmax_backward_rows(dy: Array, y: Array, dx: Array) -> None:
    """dx of softmax for rows, written into dx."""
    xp = xp_of(dy)
    xp.subtract(dy, row_sums(dy, y), out=dx)
    dx *= y


# --------------------------------------------------------------- causal attention
class AttentionCache(NamedTuple):
    q: Array  # (B, H, T, hs), split into heads and already multiplied by 1/sqrt(hs)
    k: Array
    v: Array
    att: Array  # (B, H, T, T) softmax probabilities, zero above the diagonal


def _split_heads(x: Array, n_head: int) -> Array:
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)  # (B, H, T, hs)


def _merge_heads(x: Array) -> Array:
    B, H, T, hs = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * hs)  # (B, T, C)


def attention_forward(q: Array, k: Array, v: Array, n_head: int) -> tuple[Array, AttentionCache]:
    """Causal multi-head scaled dot-product attention (the projections live outside).

    q, k, v (B, T, C) are split into H heads of size hs = C / H, then per head
        S = Q K^T / sqrt(hs)            (B, H, T, T)
        S[t, s] = -inf for s > t        (a token never sees the future)
        P = softmax(S)                  (rows sum to 1)
        Y = P V                         (B, H, T, hs)
    and the heads are concatenated back to y (B, T, C).
    """
    xp = xp_of(q)
    T = q.shape[1]
    qh, kh, vh = (_split_heads(a, n_head) for a in (q, k, v))
    qh = qh * (1.0 / math.sqrt(qh.shape[-1]))  # scale Q (B, H, T, hs), not S (B, H, T, T)
    scores = qh @ kh.transpose(0, 1, 3, 2)
    scores += xp.triu(xp.full((T, T), -xp.inf, dtype=scores.dtype), k=1)  # causal mask
    att, _ = softmax_forward(scores)
    y = att @ vh
    return _merge_heads(y), AttentionCache(qh, kh, vh, att)


def attention_backward(dy: Array, cache: AttentionCache) -> tuple[Array, Array, Array]:
    """Gradients of causal attention with respect to q, k, v (each (B, T, C)).

    In the forward: Y = P V, P = softmax(S), S = Q' K^T with Q' = Q / sqrt(hs). So
        dV = P^T dY,  dP = dY V^T,  dS = softmax_backward(dP, P),
        dQ = dS K / sqrt(hs),  dK = dS^T Q'.
    Masked entries have P = 0, so dS is zero there too: no extra masking needed.
    """
    qh, kh, vh, att = cache
    dyh = _split_heads(dy, qh.shape[1])
    dvh = att.transpose(0, 1, 3, 2) @ dyh
    datt = dyh @ vh.transpose(0, 1, 3, 2)
    dscores = softmax_backward(datt, att)
    dqh = dscores @ kh
    dqh *= 1.0 / math.sqrt(qh.shape[-1])
    dkh = dscores.transpose(0, 1, 3, 2) @ qh
    return _merge_heads(dqh), _merge_heads(dkh), _merge_heads(dvh)


# -------------------------------------------------------------------------- dropout
def dropout_mask(shape: tuple, p: float, rng: Any, dtype: Any) -> Array | None:
    """The inverted-dropout multiplier: 0 with probability p, else 1/(1-p).

    Scaling the survivors by 1/(1-p) keeps E[mask * x] = x, so nothing changes at
    evaluation time, when no mask is applied at all. ``p`` is the probability of
    *dropping* (PyTorch's meaning). Returns None for p == 0: dropout is then the identity.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p={p!r} must satisfy 0 <= p < 1")
    if p == 0.0:
        return None
    keep = rng.random(shape, dtype=dtype) >= p
    return keep.astype(dtype) * (1.0 / (1.0 - p))  # a Python float keeps the array's dtype


def dropout_forward(x: Array, mask: Array | None) -> tuple[Array, Array | None]:
    """y = x * mask  (mask from :func:`dropout_mask`; None means identity, as in eval)."""
    return (x if mask is None else x * mask), mask


def dropout_backward(dy: Array, mask: Array | None) -> Array:
    """dx = dy * mask: dropped units pass no gradient, survivors get the same 1/(1-p)."""
    return dy if mask is None else dy * mask


# --------------------------------------------------------------------- residual add
def residual_forward(x: Array, fx: Array) -> tuple[Array, None]:
    """y = x + f(x): the skip connection."""
    return x + fx, None


def residual_backward(dy: Array, cache: None = None) -> tuple[Array, Array]:
    """An add copies its gradient to both inputs: dx = dy (skip path), dfx = dy."""
    return dy, dy


# ---------------------------------------------------------------- cross-entropy loss
def cross_entropy_forward(
    logits: Array, targets: Array, ignore_index: int = IGNORE_INDEX
) -> tuple[float, tuple]:
    """Mean over counted tokens of -log softmax(logits)[target].

    logits (N..., V) float, targets (N...) integer in [0, V) or ``ignore_index`` for
    positions that do not count (e.g. the prompt of a fine-tuning example). Uses
    log-softmax = z - logsumexp(z) with z = logits - max, so no exp overflows.
    Returns the loss as a Python float and the cache (probabilities, targets, count).
    """
    xp = xp_of(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    t = targets.reshape(-1)
    counted = t != ignore_index
    z = z - z.max(axis=-1, keepdims=True)
    probs = xp.exp(z)  # divided by its row sums below: softmax(logits), for the backward
    sums = xp.sum(probs, axis=-1)
    logsumexp = xp.log(sums)
    probs /= sums[:, None]
    safe_t = xp.where(counted, t, 0)  # any valid index; these rows are masked below
    rows = xp.arange(z.shape[0])
    nll = (logsumexp - z[rows, safe_t]) * counted
    # the sum and the count leave the device together: one copy to the host, not two
    # (float64 holds the float32 sum and the count exactly)
    sums = xp.stack([nll.sum().astype("float64"), counted.sum().astype("float64")])
    total, n = to_host(sums).tolist()
    n = int(n)
    if n == 0:
        raise ValueError("cross-entropy: every target equals ignore_index; nothing to average")
    loss = total / n
    return loss, (probs, safe_t, counted, n, logits.shape)


def cross_entropy_backward(dloss: float, cache: tuple) -> Array:
    """dlogits = (softmax(logits) - onehot(target)) * dloss / n on counted rows, 0 elsewhere.

    Returns dlogits with the logits' shape (N..., V).
    """
    probs, safe_t, counted, n, shape = cache
    xp = xp_of(probs)
    dlogits = probs.copy()
    dlogits[xp.arange(probs.shape[0]), safe_t] -= 1.0
    dlogits *= (counted * (dloss / n))[:, None].astype(probs.dtype)
    return dlogits.reshape(shape)


# --------------------------------------------------- cross-entropy on soft targets
def soft_cross_entropy_forward(logits: Array, probs: Array) -> tuple[float, tuple]:
    """Mean over positions of -sum_v p_v log softmax(logits)_v: cross-entropy on soft targets.

    logits (N..., V) float, probs (N..., V) a probability distribution over V at each
    position (e.g. a teacher's softmax). The mean over positions is the cross-entropy
    H(p, q) with q = softmax(logits); it differs from KL(p || q) = H(p, q) - H(p) only by
    the targets' entropy H(p), which does not depend on the logits: the same gradient.
    Returns the loss as a Python float and the cache (q, p, N, shape).
    """
    xp = xp_of(logits)
    V = logits.shape[-1]
    z = logits.reshape(-1, V)
    p = probs.reshape(-1, V).astype(z.dtype)
    z = z - z.max(axis=-1, keepdims=True)
    log_q = z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))  # log-softmax, no overflow
    total = float(to_host(-(p * log_q).sum().astype("float64")))
    n = z.shape[0]
    return total / n, (xp.exp(log_q), p, n, logits.shape)


def soft_cross_entropy_backward(dloss: float, cache: tuple) -> Array:
    """dlogits = (softmax(logits) - p) * dloss / N, with the logits' shape (N..., V)."""
    q, p, n, shape = cache
    return ((q - p) * (dloss / n)).astype(q.dtype).reshape(shape)
