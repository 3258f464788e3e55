"""NF4 quantization (core/quant.py) on its own: the code, rounding, packing, storage."""

import math

import numpy as np
import pytest

from minilora.core import quant


def _weight(shape, seed=0, std=0.02):
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def test_the_derivation_gives_the_published_table_exactly():
    derived = quant.normal_float_code()
    assert derived.dtype == np.float32
    assert np.array_equal(derived, np.asarray(quant.NF4_CODE, dtype=np.float32))
    code = np.asarray(quant.NF4_CODE)
    assert (np.diff(code) > 0).all() and code[0] == -1 and code[-1] == 1
    assert code[7] == 0 and (code > 0).sum() == 8 and (code < 0).sum() == 7


def test_the_code_values_are_normal_quantiles():
    """Rescaled by Φ⁻¹(offset), each positive value is Φ⁻¹ at evenly spaced probabilities."""
    from statistics import NormalDist

    nd = NormalDist()
    top = nd.inv_cdf(quant.NF4_OFFSET)
    positive = np.asarray(quant.NF4_CODE[8:]) * top
    probabilities = [nd.cdf(v) for v in positive]
    assert np.allclose(np.diff(probabilities), np.diff(probabilities)[0], atol=1e-6)
    assert quant.NF4_OFFSET == pytest.approx(1 - 0.5 * (1 / 30 + 1 / 32), abs=1e-7)


def test_two_codes_per_byte_first_in_the_high_nibble():
    packed = quant.pack_nibbles(np.array([1, 2, 15, 0, 3]))
    assert packed.tolist() == [0x12, 0xF0, 0x37]  # odd count: padded with 7, NF4's zero
    assert quant.unpack_nibbles(packed, 5).tolist() == [1, 2, 15, 0, 3]


@pytest.mark.parametrize("shape", [(64, 64), (7, 9), (130, 3)])
def test_every_value_takes_its_nearest_code(shape):
    W = _weight(shape)
    idx, absmax = quant.quantize_blockwise(W, np.asarray(quant.NF4_CODE, np.float32), 64)
    flat = W.reshape(-1)
    blocks = np.arange(flat.size) // 64
    assert np.array_equal(absmax, [np.abs(flat[blocks == b]).max() for b in range(absmax.size)])
    x = flat / absmax[blocks]
    distance = np.abs(x[:, None] - np.asarray(quant.NF4_CODE)[None, :])
    assert np.allclose(distance[np.arange(x.size), idx], distance.min(axis=1), atol=1e-7)


def test_dequantize_is_close_and_keeps_each_block_s_largest_value():
    W = _weight((96, 64), seed=3)
    q = quant.quantize(W)
    W_hat = quant.dequantize(q)
    assert W_hat.shape == W.shape and W_hat.dtype == np.float32
    err = quant.quantization_error(W, q)
    assert err["relative_rms"] < 0.12  # a 4-bit code: about a tenth of the weights' RMS
    # the largest magnitude of a block is ±c_b exactly (code ±1), up to the 8-bit constant
    blocks = W.reshape(-1, 64)
    top = np.abs(blocks).argmax(axis=1)
    got = W_hat.reshape(-1, 64)[np.arange(blocks.shape[0]), top]
    want = blocks[np.arange(blocks.shape[0]), top]
    assert np.allclose(got, want, rtol=0.02)


def test_double_quantization_keeps_the_constants_to_a_few_percent():
    W = _weight((256, 256), seed=4)
    packed, absmax = quant.quantize_nf4(W)
    q = quant.quantize(W)
    assert np.array_equal(q.packed, packed)
    assert q.qabsmax.dtype == np.uint8 and q.qabsmax.size == absmax.size
    assert q.absmax2.size == math.ceil(absmax.size / 256)
    assert q.offset == pytest.approx(absmax.mean(), rel=1e-6)
    assert np.abs(quant.dequantize_absmax(q) - absmax).max() < 0.01 * absmax.max()


def test_bits_per_parameter():
    assert quant.bits_per_parameter() == pytest.approx(4.127, abs=5e-4)
    assert quant.bits_per_parameter(double=False) == 4.5
    W = _weight((512, 128))
    q = quant.quantize(W)
    assert quant.nbytes(q) == quant.storage_bytes(W.size)
    assert quant.bits_per_parameter(W.size) == 8 * quant.nbytes(q) / W.size
    assert quant.bits_per_parameter(4096 * 4096) == pytest.approx(4.127, abs=1e-3)


@pytest.mark.parametrize(
    "value, message",
    [(np.zeros((0, 3), np.float32), "empty"), (np.array([1.0, np.nan]), "NaN")],
)
def test_bad_input_is_refused(value, message):
    with pytest.raises(ValueError, match=message):
        quant.quantize(value)


def test_an_all_zero_block_stays_zero():
    W = np.zeros((2, 64), np.float32)
    W[1] = _weight(64)
    assert np.array_equal(quant.dequantize(quant.quantize(W))[0], np.zeros(64))


def test_the_quantile_table_puts_the_codes_on_a_line():
    table = quant.nf4_quantile_table()
    assert [r["index"] for r in table] == list(range(16))
    z = np.array([r["normal_quantile"] for r in table])
    code = np.array([r["code"] for r in table])
    assert np.allclose(code, z / z.max(), atol=1e-6)  # code = Φ⁻¹(p) / Φ⁻¹(offset)
    for key in ("mass_nf4", "mass_uniform"):
        assert sum(r[key] for r in table) == pytest.approx(1.0)
    nf4 = [r["mass_nf4"] for r in table]
    uniform = [r["mass_uniform"] for r in table]
    assert max(nf4) / min(nf4) < 1.5 < max(uniform) / min(uniform)  # NF4 uses codes evenly


def test_the_plot_draws_the_table():
    pytest.importorskip("matplotlib")
    from minilora.lab.plots import plot_nf4_code

    fig = plot_nf4_code(quant.nf4_quantile_table())
    left, right = fig.axes
    assert len(left.lines) == 2 and len(right.patches) == 32
