"""NF4 with double quantization against bitsandbytes 0.50.2 on the CPU.

What is equal bit for bit: the NF4 code table, the dynamic 8-bit map, the packed 4-bit
bytes, the first-level absmax constants, and the dequantized weight given the same
stored state. What is not, and why (docs/DESIGN.md, "A 4-bit base (QLoRA)"):

* bitsandbytes' CPU kernel for the 8-bit step (``quantize_blockwise``) does not search
  the nearest code: it rounds x / absmax onto a grid of 65,536 points in [-1, 1] and
  looks the code up in a table built for those points. minilora rounds to the nearest
  code by the midpoints (as bitsandbytes' CUDA and pure-PyTorch kernels do). A test
  below rebuilds that table and gets bitsandbytes' bytes exactly, and another shows
  that where the two differ, minilora's code is the nearer one.
* The offset (the mean of the constants) is rounded once from float64 here; torch sums
  in float32 in its own order, so the two can differ by one ulp.
"""

import os

import numpy as np
import pytest

from minilora.core import quant

if os.environ.get("MINILORA_REQUIRE_REFERENCE") == "1":
    import bitsandbytes.functional as bnb  # CI installs the `ref` extra: fail, never skip
    import torch
else:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (the `ref` extra)")
    bnb = pytest.importorskip(
        "bitsandbytes.functional", reason="bitsandbytes is not installed (the `ref` extra)"
    )

SHAPES = [(64, 64), (96, 32), (7, 9), (130, 3), (300, 200), (1000, 129)]  # some not 64k


def _weight(shape, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.02).astype(np.float32)


def _bnb(W, nested=True):
    return bnb.quantize_4bit(
        torch.from_numpy(W), quant_type="nf4", blocksize=64, compress_statistics=nested
    )


def _lut_quantize(x, code, blocksize):
    """bitsandbytes' CPU 8-bit kernel: x / absmax onto 65,536 grid points, then a table."""
    f32 = np.float32
    mid = f32(0.5) * (code[:-1] + code[1:])
    grid = (f32(-1) + (f32(2) * np.arange(65536, dtype=f32)) / f32(65535)).astype(f32)
    table = np.searchsorted(mid, grid, side="left")
    out = np.zeros(x.size, np.uint8)
    for start in range(0, x.size, blocksize):
        block = x[start : start + blocksize]
        a = np.abs(block).max()
        if a > 0:
            v = np.clip((block * (f32(1) / a)).astype(f32), -1, 1)
            i = ((v + f32(1)) * f32(0.5) * f32(65535) + f32(0.5)).astype(f32).astype(np.uint16)
            out[start : start + blocksize] = table[i]
    return out


def test_code_tables_equal_bitsandbytes():
    assert np.array_equal(
        np.asarray(quant.NF4_CODE, np.float32), bnb.get_4bit_type("nf4", device="cpu").numpy()
    )
    assert np.array_equal(quant.dynamic_map(), bnb.create_dynamic_map().numpy())


@pytest.mark.parametrize("shape", SHAPES)
def test_packed_bytes_and_absmax_equal_bitsandbytes(shape):
    W = _weight(shape)
    packed, state = _bnb(W, nested=False)
    ours, absmax = quant.quantize_nf4(W)
    assert np.array_equal(ours, packed.numpy().reshape(-1))
    assert np.array_equal(absmax, state.absmax.numpy())
    assert np.array_equal(quant.quantize(W).packed, ours)  # double quantization keeps them
    # and the dequantized weight, from the same bytes and constants
    idx = quant.unpack_nibbles(ours, W.size)
    ours_W = quant.dequantize_blockwise(idx, absmax, quant.NF4_CODE, 64).reshape(shape)
    assert np.array_equal(ours_W, bnb.dequantize_4bit(packed, state).numpy())


@pytest.mark.parametrize("shape", SHAPES)
def test_double_quantization_matches_bitsandbytes(shape):
    W = _weight(shape, seed=1)
    packed, state = _bnb(W)
    q = quant.quantize(W)
    offset = float(state.offset)
    assert abs(q.offset - offset) <= np.spacing(np.float32(offset))  # at most one ulp apart
    # from bitsandbytes' offset, the second-level constants are equal bit for bit
    absmax = quant.quantize_nf4(W)[1]
    qabsmax, absmax2, _ = quant.double_quantize(absmax, offset)
    assert np.array_equal(absmax2, state.state2.absmax.numpy())
    # the 8-bit codes equal bitsandbytes' CPU table lookup exactly...
    centred = absmax - np.float32(offset)
    bnb_codes = state.absmax.numpy()
    if absmax.size > 1:  # one constant minus its mean is 0 / 0 for bitsandbytes' kernel
        code = quant.dynamic_map()
        assert np.array_equal(_lut_quantize(centred, code, 256), bnb_codes)
        # ...and where minilora's nearest code differs from it, minilora's is nearer
        x = centred / np.repeat(absmax2, 256)[: absmax.size]
        differ = qabsmax != bnb_codes
        assert (np.abs(code[qabsmax] - x) <= np.abs(code[bnb_codes] - x))[differ].all()
        assert differ.mean() < 0.01
    # from bitsandbytes' stored state, minilora's dequantize is bitsandbytes' bit for bit
    theirs = quant.NF4Weight(
        packed.numpy().reshape(-1), bnb_codes, state.state2.absmax.numpy(), offset, shape
    )
    assert np.array_equal(quant.dequantize(theirs), bnb.dequantize_4bit(packed, state).numpy())


def test_lut_rounding_is_the_only_difference_in_the_8_bit_codes():
    x = np.random.default_rng(2).standard_normal(4096).astype(np.float32) * 0.01
    theirs, their_absmax = bnb.quantize_blockwise(torch.from_numpy(x), blocksize=256)
    ours, absmax = quant.quantize_blockwise(x, quant.dynamic_map(), 256)
    assert np.array_equal(absmax, their_absmax.absmax.numpy())
    assert np.array_equal(_lut_quantize(x, quant.dynamic_map(), 256), theirs.numpy())
    assert 0 < (ours != theirs.numpy()).sum() < 20  # a few values near a midpoint
