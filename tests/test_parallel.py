"""Row blocks on a thread pool (basics/parallel.py): bit for bit the serial result.

Each op is run twice on the same inputs: once as one call on the whole array (the
serial path: blocks switched off), once cut into many small blocks of rows on two
threads. Row counts are odd so that the last block is a short one. The arrays must be
*equal*, not close: a block changes no row's arithmetic.
"""

import threading

import numpy as np
import pytest

import minilora as ml
from minilora.basics import blas, parallel
from minilora.core import layers
from minilora.core.model import GPT, GPTConfig
from minilora.core.optim import AdamW


@pytest.fixture
def serial(monkeypatch):
    """A context in which by_rows calls the op once on the whole array."""

    def switch(on: bool) -> None:
        monkeypatch.setattr(parallel, "MIN_PARALLEL_ELEMENTS", 1 << 60 if on else 0)
        monkeypatch.setattr(parallel, "BLOCK_BYTES", 1 if on else 5 * 8 * 24)  # tiny blocks

    return switch


def _same(a, b):
    """Equal bit for bit, arrays or (nested) tuples of arrays and None."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def _both(serial, fn, *args):
    """fn(*args) on the serial path and on blocks with two threads."""
    serial(True)
    whole = fn(*args)
    serial(False)
    with parallel.limited_element_threads(2):
        blocked = fn(*args)
    return whole, blocked


DTYPES = ["float32", "float64"]
SHAPES = [(3, 37, 24), (1, 101, 17), (7, 24)]  # odd row counts: a short last block


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_row_wise_ops_are_bit_identical_in_blocks(serial, dtype, shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(dtype) * 3
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[-1]
    w = rng.standard_normal(C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)

    def gelu():
        y, cache = layers.gelu_forward(x)
        return y, cache[1], layers.gelu_backward(dy, cache)

    def softmax():
        y, cache = layers.softmax_forward(x)
        return y, layers.softmax_backward(dy, cache)

    def layer_norm():
        y, cache = layers.layer_norm_forward(x, w, b)
        full = layers.layer_norm_backward(dy, cache)
        frozen = layers.layer_norm_backward(dy, cache, need_dparams=False)
        return y, cache.xhat, cache.rstd, *full, *frozen

    for op in (gelu, softmax, layer_norm):
        whole, blocked = _both(serial, op)
        assert _same(whole, blocked), op.__name__


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_is_bit_identical_in_blocks(serial, dtype):
    rng = np.random.default_rng(5)
    B, T, C, H = 3, 13, 12, 3  # softmax over 3 * 3 * 13 rows of 13
    q, k, v, dy = (rng.standard_normal((B, T, C)).astype(dtype) for _ in range(4))

    def attention():
        y, cache = layers.attention_forward(q, k, v, H)
        return (y, *layers.attention_backward(dy, cache))

    whole, blocked = _both(serial, attention)
    assert _same(whole, blocked)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_steps_are_bit_identical_in_blocks(serial, dtype):
    cfg = GPTConfig(vocab_size=11, block_size=9, n_layer=1, n_head=2, d_model=10)
    idx = np.random.default_rng(0).integers(0, 11, (3, 9))

    def three_steps():
        model = GPT(cfg, dtype=dtype, seed=1)
        opt = AdamW(model, lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            model.loss(idx, idx)
            model.backward()
            opt.step()
        return tuple(model.params[n] for n in sorted(model.params))

    whole, blocked = _both(serial, three_steps)
    assert _same(whole, blocked)


def test_a_training_step_of_the_model_is_bit_identical_in_blocks(serial):
    """The whole model, full fine-tuning and LoRA: loss, every gradient."""
    cfg = GPTConfig(vocab_size=13, block_size=11, n_layer=2, n_head=2, d_model=14)
    idx = np.random.default_rng(1).integers(0, 13, (5, 11))

    def step(lora):
        model = GPT(cfg, seed=2)
        if lora:
            ml.add_adapter(model, ml.LoraConfig(r=2, alpha=4))
        loss = model.loss(idx, idx)
        model.backward()
        return (np.array(loss), *(model.grads[n] for n in sorted(model.grads)))

    for lora in (False, True):
        whole, blocked = _both(serial, step, lora)
        assert _same(whole, blocked)


def test_blocks_cover_every_row_once_and_run_on_two_threads(serial):
    serial(False)
    seen = set()

    def rows(x, y, first):
        seen.add(threading.current_thread().name)
        np.add(x, 1.0, out=y)
        np.multiply(x[:, :1], 2.0, out=first)

    x = np.arange(5 * 7 * 24, dtype=np.float64).reshape(5, 7, 24)
    y, first = np.full_like(x, np.nan), np.full((5, 7, 1), np.nan)
    with parallel.limited_element_threads(2):
        assert parallel.by_rows(rows, (x, y, first)) is None
    assert np.array_equal(y, x + 1.0) and np.array_equal(first, x[..., :1] * 2.0)
    assert len(seen) == 2  # this thread and one of the pool's


def test_small_or_not_contiguous_arrays_and_one_row_call_the_op_once(serial):
    calls = []

    def double(x, y):
        calls.append(x.shape)
        np.multiply(x, 2, out=y)

    x = np.ones((3, 4), dtype=np.float32)  # far under MIN_PARALLEL_ELEMENTS
    big = np.ones(parallel.MIN_PARALLEL_ELEMENTS, dtype=np.float32)  # 1-D: one row
    for a in (x, big):
        y = np.empty_like(a)
        parallel.by_rows(double, (a, y))
        assert np.array_equal(y, a * 2)
    assert calls == [(3, 4), big.shape]
    serial(False)  # blocks for every size now; a transposed output is not contiguous
    wide = np.ones((40, 24), dtype=np.float32)
    out = np.empty((24, 40), dtype=np.float32).T  # a block of its reshape would be a copy
    with parallel.limited_element_threads(2):
        parallel.by_rows(double, (wide, out))
    assert np.array_equal(out, wide * 2) and calls[-1] == (40, 24)


def test_an_error_in_a_block_reaches_the_caller(serial):
    serial(False)

    def fails_on_the_last_block(x):
        if x[-1, 0] == 6.0:
            raise ValueError("row 6 is bad")

    x = np.repeat(np.arange(7.0)[:, None], 24, axis=1)
    with parallel.limited_element_threads(2), pytest.raises(ValueError, match="row 6"):
        parallel.by_rows(fails_on_the_last_block, (x,))


def test_blas_limited_threads_sets_the_element_threads_too():
    before = parallel.element_threads()
    with blas.limited_threads(1):
        assert parallel.element_threads() == 1
    assert parallel.element_threads() == before
    with pytest.raises(ValueError, match="threads=0"):
        with parallel.limited_element_threads(0):
            pass


def test_without_a_limit_the_count_is_the_blas_default(monkeypatch):
    """OPENBLAS_NUM_THREADS=1 (how the bench measures one thread) holds for both kinds."""
    for name in parallel.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert parallel.element_threads() == parallel.usable_cores()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert parallel.element_threads() == 1
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "999")  # read first, capped at the cores
    assert parallel.element_threads() == parallel.usable_cores()
    with parallel.limited_element_threads(1):
        assert parallel.element_threads() == 1
