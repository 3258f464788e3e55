"""Every forward/backward pair in ``minilora.core.layers``: finite-difference gradient checks
in float64, plus the behaviour each pair promises (masking, stability, flags, dropout).
"""

import math
import warnings

import numpy as np
import pytest

from minilora.core import layers as L
from minilora.core.gradcheck import check_gradients, gradcheck

TOL = 1e-6
F64 = np.dtype("float64")


def rnd(rng, *shape, scale=1.0):
    """Float64 Gaussian array of ``shape`` with standard deviation ``scale``."""
    return rng.normal(0.0, scale, shape)


def assert_all_pass(results, expected_names):
    """Every input named in ``expected_names`` was checked, none is a zero row, all pass."""
    assert [r.name for r in results] == list(expected_names)
    for r in results:
        assert not r.zero, f"{r.name}: gradient unexpectedly zero"
        assert r.passed(TOL), f"{r.name}: relative error {r.error:.2e}"


# ------------------------------------------------------------------------- linear
def test_linear_gradients_with_bias():
    """linear_backward's dx, dW, db match finite differences (2-D input, with bias)."""
    rng = np.random.default_rng(0)
    inputs = {"x": rnd(rng, 6, 4), "W": rnd(rng, 5, 4, scale=0.2), "b": rnd(rng, 5, scale=0.2)}
    results = gradcheck(L.linear_forward, L.linear_backward, inputs)
    assert_all_pass(results, ["x", "W", "b"])


def test_linear_gradients_without_bias_3d_input():
    """linear_backward is right for 3-D input and no bias (db is None and skipped)."""
    rng = np.random.default_rng(1)
    inputs = {"x": rnd(rng, 2, 3, 4), "W": rnd(rng, 5, 4, scale=0.2), "b": None}
    out, cache = L.linear_forward(**inputs)
    assert out.shape == (2, 3, 5)
    _, _, db = L.linear_backward(np.ones_like(out), cache)
    assert db is None
    results = gradcheck(L.linear_forward, L.linear_backward, inputs)
    assert_all_pass(results, ["x", "W"])


def test_linear_need_flags_skip_dW_db_but_keep_dx():
    """need_dW=False / need_db=False return None for dW and db and the same dx."""
    rng = np.random.default_rng(2)
    x, W, b = rnd(rng, 2, 3, 4), rnd(rng, 5, 4, scale=0.2), rnd(rng, 5)
    out, cache = L.linear_forward(x, W, b)
    dy = rnd(rng, *out.shape)
    dx_full, dW, db = L.linear_backward(dy, cache)
    dx, dW_none, db_none = L.linear_backward(dy, cache, need_dW=False, need_db=False)
    assert dW is not None and db is not None
    assert dW_none is None and db_none is None
    np.testing.assert_array_equal(dx, dx_full)
    np.testing.assert_allclose(dx, dy @ W, rtol=1e-12)


# ---------------------------------------------------------------------- embedding
def test_embedding_gradient_accumulates_repeated_ids():
    """A repeated id's row of dweight is the sum of all its upstream gradients."""
    rng = np.random.default_rng(3)
    idx = np.array([[1, 3, 1], [1, 0, 3]])
    weight = rnd(rng, 5, 4, scale=0.2)
    out, cache = L.embedding_forward(idx, weight)
    np.testing.assert_array_equal(out, weight[idx])
    dout = rnd(rng, *out.shape)
    dweight = L.embedding_backward(dout, cache)
    np.testing.assert_allclose(dweight[1], dout[0, 0] + dout[0, 2] + dout[1, 0], rtol=1e-12)
    np.testing.assert_allclose(dweight[3], dout[0, 1] + dout[1, 2], rtol=1e-12)
    np.testing.assert_array_equal(dweight[[2, 4]], 0.0)  # ids never used get nothing

    results = gradcheck(
        lambda weight: L.embedding_forward(idx, weight), L.embedding_backward, {"weight": weight}
    )
    assert_all_pass(results, ["weight"])


# --------------------------------------------------------------------- layer norm
def test_layer_norm_gradients():
    """layer_norm_backward's dx, dweight, dbias match finite differences."""
    rng = np.random.default_rng(4)
    inputs = {
        "x": rnd(rng, 2, 3, 6, scale=2.0) + 1.5,
        "weight": 1.0 + rnd(rng, 6, scale=0.2),
        "bias": rnd(rng, 6, scale=0.2),
    }
    results = gradcheck(L.layer_norm_forward, L.layer_norm_backward, inputs)
    assert_all_pass(results, ["x", "weight", "bias"])


def test_layer_norm_output_is_normalised():
    """With weight 1 and bias 0 each row has mean 0 and (biased) variance ~1."""
    rng = np.random.default_rng(5)
    x = rnd(rng, 4, 16, scale=3.0) + 7.0
    y, _ = L.layer_norm_forward(x, np.ones(16), np.zeros(16))
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=-1), x.var(axis=-1) / (x.var(axis=-1) + 1e-5))


def test_layer_norm_need_dparams_false():
    """need_dparams=False returns None for dweight and dbias and the same dx."""
    rng = np.random.default_rng(6)
    x, w, b = rnd(rng, 3, 6), 1.0 + rnd(rng, 6, scale=0.2), rnd(rng, 6)
    y, cache = L.layer_norm_forward(x, w, b)
    dy = rnd(rng, *y.shape)
    dx_full, dw, db = L.layer_norm_backward(dy, cache)
    dx, dw_none, db_none = L.layer_norm_backward(dy, cache, need_dparams=False)
    assert dw is not None and db is not None
    assert dw_none is None and db_none is None
    np.testing.assert_array_equal(dx, dx_full)


# --------------------------------------------------------------------------- GELU
def test_gelu_gradient():
    """gelu_backward matches finite differences over negative, small and large inputs."""
    rng = np.random.default_rng(7)
    x = rnd(rng, 4, 5, scale=2.0)
    results = gradcheck(L.gelu_forward, L.gelu_backward, {"x": x})
    assert_all_pass(results, ["x"])


def tanh_gelu(x):
    """The tanh GELU written out with math (GPT-2's formula)."""
    return 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def tail_gelu(x):
    """The same function for x < 0 without the cancellation in 1 + tanh(u) (which is 0
    in floating point once tanh(u) rounds to -1): 0.5 (1 + tanh u) = e^{2u} / (1 + e^{2u})."""
    e = math.exp(2.0 * math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))
    return x * e / (1.0 + e)


def test_gelu_hand_values():
    """gelu(0)=0, gelu(1)~0.841192, gelu(10)~10, and the tanh formula; far left, the
    exact tail x e^{2u} / (1 + e^{2u}) (about -1.2e-37 at -10), not the tanh form's 0."""
    xs = np.array([0.0, 1.0, -1.0, 0.5, 10.0, -3.0, -10.0])
    y, _ = L.gelu_forward(xs)
    np.testing.assert_allclose(y[:5], [tanh_gelu(x) for x in xs[:5]], rtol=1e-14)
    np.testing.assert_allclose(y[5:], [tail_gelu(x) for x in xs[5:]], rtol=1e-13)
    assert y[0] == 0.0
    assert abs(y[1] - 0.8411919906082768) < 1e-12
    assert abs(y[4] - 10.0) < 1e-12
    assert -1.3e-37 < y[6] < -1.1e-37


def test_gelu_far_left_float32_is_zero_without_warnings():
    """In float32 exp(-2u) overflows to inf below about x = -10: GELU is then -0.0 and
    its gradient 0 (the right limits), with no overflow warning and no nan."""
    x = np.array([[-30.0, -12.0, -9.0, 0.0, 12.0, 30.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y, cache = L.gelu_forward(x)
        dx = L.gelu_backward(np.ones_like(x), cache)
    assert y.dtype == np.float32 and np.isfinite(y).all() and np.isfinite(dx).all()
    np.testing.assert_array_equal(y[0, :2], [0.0, 0.0])
    np.testing.assert_array_equal(dx[0, :2], [0.0, 0.0])
    np.testing.assert_allclose(y[0, 4:], [12.0, 30.0], rtol=1e-7)
    np.testing.assert_allclose(dx[0, 4:], [1.0, 1.0], rtol=1e-7)


def test_gelu_gradient_in_the_tails():
    """The backward matches finite differences where s = sigmoid(2u) is near 0 and 1."""
    x = np.array([[-9.0, -6.0, -4.0, 4.0, 6.0]])
    results = gradcheck(L.gelu_forward, L.gelu_backward, {"x": x})
    assert_all_pass(results, ["x"])


# ------------------------------------------------------------------------ softmax
def test_softmax_gradient():
    """softmax_backward matches finite differences."""
    rng = np.random.default_rng(8)
    results = gradcheck(L.softmax_forward, L.softmax_backward, {"x": rnd(rng, 3, 7, scale=2.0)})
    assert_all_pass(results, ["x"])


def test_softmax_stable_with_huge_logits():
    """Logits of +-1e4 give finite probabilities that sum to 1 (no exp overflow)."""
    x = np.array([[1e4, 0.0, -1e4], [1e4, 1e4, 1e4 - math.log(2.0)], [-1e4, -1e4, -1e4]])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, _ = L.softmax_forward(x)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(y[0], [1.0, 0.0, 0.0], atol=1e-300)
    np.testing.assert_allclose(y[1], [0.4, 0.4, 0.2], rtol=1e-9)
    np.testing.assert_allclose(y[2], [1 / 3] * 3, rtol=1e-14)


# ---------------------------------------------------------------------- attention
def attention_inputs(seed=9, B=2, T=5, C=8):
    rng = np.random.default_rng(seed)
    return {name: rnd(rng, B, T, C) for name in ("q", "k", "v")}


def test_attention_gradients():
    """attention_backward's dq, dk, dv match finite differences (B=2, T=5, C=8, H=2)."""
    inputs = attention_inputs()
    results = gradcheck(
        lambda q, k, v: L.attention_forward(q, k, v, n_head=2), L.attention_backward, inputs
    )
    assert_all_pass(results, ["q", "k", "v"])


def test_attention_is_causal():
    """Changing the k/v of tokens t >= 3 leaves outputs at positions < 3 unchanged."""
    inputs = attention_inputs()
    y, cache = L.attention_forward(**inputs, n_head=2)
    changed = {name: a.copy() for name, a in inputs.items()}
    rng = np.random.default_rng(10)
    changed["k"][:, 3:] = rnd(rng, 2, 2, 8, scale=5.0)
    changed["v"][:, 3:] = rnd(rng, 2, 2, 8, scale=5.0)
    y2, _ = L.attention_forward(**changed, n_head=2)
    np.testing.assert_allclose(y2[:, :3], y[:, :3], rtol=1e-13, atol=1e-15)
    assert np.abs(y2[:, 3:] - y[:, 3:]).min() > 1e-6  # the later ones do see the change
    # the attention probabilities are zero above the diagonal and rows sum to 1
    assert (np.triu(np.ones((5, 5)), k=1) * cache.att == 0).all()
    np.testing.assert_allclose(cache.att.sum(axis=-1), 1.0, rtol=1e-14)


def test_attention_first_token_attends_only_to_itself():
    """The output at t=0 is exactly v[0] (it can only see itself)."""
    inputs = attention_inputs()
    y, _ = L.attention_forward(**inputs, n_head=2)
    np.testing.assert_allclose(y[:, 0], inputs["v"][:, 0], rtol=1e-14)


# ------------------------------------------------------------------------ dropout
def test_dropout_gradient_with_fixed_mask():
    """dropout_backward matches finite differences for a fixed mask (p=0.4)."""
    rng = np.random.default_rng(11)
    mask = L.dropout_mask((4, 6), 0.4, np.random.default_rng(12), F64)
    assert (mask == 0).any() and (mask != 0).any()
    results = gradcheck(
        lambda x: L.dropout_forward(x, mask), L.dropout_backward, {"x": rnd(rng, 4, 6)}
    )
    assert_all_pass(results, ["x"])


def test_dropout_none_mask_is_identity():
    """A None mask (p=0 or eval) passes values and gradients through unchanged."""
    x = np.arange(6.0)
    y, mask = L.dropout_forward(x, None)
    assert mask is None and y is x
    assert L.dropout_backward(x, None) is x


def test_dropout_mask_p_zero_is_none():
    """dropout_mask with p=0 returns None (identity)."""
    assert L.dropout_mask((3, 4), 0.0, np.random.default_rng(0), F64) is None


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_values_and_mean(p):
    """Mask entries are 0 or 1/(1-p), and the mean is 1 within 5 binomial std's."""
    n = 200_000
    mask = L.dropout_mask((n,), p, np.random.default_rng(13), F64)
    assert mask.dtype == F64 and mask.shape == (n,)
    values = np.unique(mask)
    np.testing.assert_allclose(values, [0.0, 1.0 / (1.0 - p)], rtol=1e-15)
    # mean = Binomial(n, 1-p) / (n (1-p)):  std = sqrt(p / ((1-p) n))
    std = math.sqrt(p / ((1.0 - p) * n))
    assert abs(mask.mean() - 1.0) < 5 * std


def test_dropout_mask_float32_dtype_and_reproducible():
    """The mask has the requested dtype and the same seed gives the same mask."""
    f32 = np.dtype("float32")
    a = L.dropout_mask((50,), 0.3, np.random.default_rng(1), f32)
    b = L.dropout_mask((50,), 0.3, np.random.default_rng(1), f32)
    c = L.dropout_mask((50,), 0.3, np.random.default_rng(2), f32)
    assert a.dtype == f32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_mask_rejects_p_outside_range(p):
    """p outside [0, 1) raises ValueError naming the value."""
    with pytest.raises(ValueError, match=f"p={p!r}"):
        L.dropout_mask((3,), p, np.random.default_rng(0), F64)


def test_dropout_mask_accepts_scalar_type_dtype():
    """dropout_mask accepts np.float64 (the type), as NumPy's own functions do."""
    mask = L.dropout_mask((4,), 0.5, np.random.default_rng(0), np.float64)
    assert mask.dtype == F64


# ----------------------------------------------------------------------- residual
def test_residual_gradients():
    """residual_backward gives dx = dfx = dy, matching finite differences."""
    rng = np.random.default_rng(14)
    inputs = {"x": rnd(rng, 2, 3, 4), "fx": rnd(rng, 2, 3, 4)}
    results = gradcheck(L.residual_forward, L.residual_backward, inputs)
    assert_all_pass(results, ["x", "fx"])


# ------------------------------------------------------------------ cross-entropy
def test_cross_entropy_gradient_with_ignored_positions():
    """cross_entropy_backward matches finite differences; ignored rows get zero grad."""
    rng = np.random.default_rng(15)
    logits = rnd(rng, 2, 4, 7, scale=2.0)
    targets = rng.integers(0, 7, (2, 4))
    targets[0, :2] = -1
    targets[1, 3] = -1
    _, cache = L.cross_entropy_forward(logits, targets)
    dlogits = L.cross_entropy_backward(1.0, cache)
    assert dlogits.shape == logits.shape
    np.testing.assert_array_equal(dlogits[targets == -1], 0.0)
    results = check_gradients(
        lambda: L.cross_entropy_forward(logits, targets)[0],
        {"logits": logits},
        {"logits": dlogits},
        max_coords=56,
    )
    assert_all_pass(results, ["logits"])


def test_cross_entropy_backward_scales_with_dloss():
    """cross_entropy_backward is linear in the upstream scalar dloss."""
    rng = np.random.default_rng(16)
    logits, targets = rnd(rng, 3, 5), rng.integers(0, 5, 3)
    _, cache = L.cross_entropy_forward(logits, targets)
    np.testing.assert_allclose(
        L.cross_entropy_backward(2.5, cache),
        2.5 * L.cross_entropy_backward(1.0, cache),
        rtol=1e-14,
    )


def test_cross_entropy_equals_direct_log_softmax():
    """The loss equals the mean over counted rows of -log softmax(logits)[target]."""
    rng = np.random.default_rng(17)
    logits = rnd(rng, 3, 4, 6, scale=3.0)
    targets = rng.integers(0, 6, (3, 4))
    targets[2, 1] = -1
    loss, _ = L.cross_entropy_forward(logits, targets)
    assert isinstance(loss, float)
    probs = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    counted = targets != -1
    picked = np.take_along_axis(probs, np.where(counted, targets, 0)[..., None], -1)[..., 0]
    expected = -np.log(picked[counted]).mean()
    assert abs(loss - expected) < 1e-12 * abs(expected)


def test_cross_entropy_stable_with_huge_logits():
    """Logits of 1e4 give a finite loss (the right target costs ~0, a wrong one ~2e4)."""
    logits = np.array([[1e4, -1e4, 0.0], [1e4, -1e4, 0.0]])
    loss, _ = L.cross_entropy_forward(logits, np.array([0, 1]))
    assert math.isfinite(loss)
    assert abs(loss - 1e4) < 1e-6  # (0 + 2e4) / 2


def test_cross_entropy_all_ignored_raises():
    """Every target equal to ignore_index raises ValueError (nothing to average)."""
    with pytest.raises(ValueError, match="ignore_index"):
        L.cross_entropy_forward(np.zeros((2, 3, 4)), np.full((2, 3), -1))
