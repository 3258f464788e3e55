"""4-bit NormalFloat (NF4) quantization with double quantization, as in QLoRA.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) fine-tunes LoRA adapters on top of a
frozen base whose linear weights are stored in 4 bits. This module holds the pure
functions; ``GPT.quantize_base`` (model.py) stores a model's linears this way.

**The code.** NF4 has 16 values in [-1, 1] (``NF4_CODE``), spaced as the quantiles of a
standard normal so that each code is used about equally often by normally distributed
weights (``normal_float_code`` derives them):

    q_i = Φ⁻¹(p_i) / Φ⁻¹(offset)      p_i evenly spaced from offset down to 1/2,
                                        8 on the positive side, 7 on the negative side,
                                        plus an exact 0 (so padding and zeros are exact)

with offset = 1 - ½(1/30 + 1/32) = 0.9677083 (the paper's δ: the middle of the 1/(2·15)
and 1/(2·16) tails, since Φ⁻¹(1) is infinite). There are 8 positive values and only 7
negative ones: a symmetric code of 16 values would have no exact 0.

**Blockwise absmax.** The weight W (d_out, d_in) is read row-major as n = d_out·d_in
values, cut into blocks of 64 (the last may be shorter), and each block b is scaled by
its largest magnitude:

    c_b = max_{j in b} |w_j|                     (n_blocks,) float32
    idx_j = nearest code to w_j / c_b            by the 15 midpoints between codes
    ŵ_j = NF4_CODE[idx_j] · c_b                  dequantized

Two 4-bit indices share a byte, the first in the high nibble: (ceil(n/2),) uint8.

**Double quantization.** The constants c (one float32 per 64 weights, 0.5 bit per
parameter) are themselves quantized: their mean μ is taken out, and c - μ is quantized to
8 bits in blocks of 256 with the dynamic 8-bit map (``dynamic_map``) and an absmax per
block. Then per parameter: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits (``bits_per_parameter``).

Every operation reproduces bitsandbytes 0.50.2's ``quantize_4bit(..., quant_type="nf4",
blocksize=64, compress_statistics=True)`` and ``dequantize_4bit`` bit for bit
(tests/test_quant_reference.py). Quantizing runs once, on the host (NumPy);
dequantizing runs on every forward, on the arrays' device (``xp``).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, NamedTuple

import numpy as np

from minilora.basics.backend import to_host, xp_of
from minilora.basics.checks import positive_int

NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
"""The 16 NF4 values as bitsandbytes stores them (float32; functional.get_4bit_type("nf4"))
and as printed in the QLoRA paper's appendix E; ``normal_float_code`` derives them."""

NF4_OFFSET = 0.9677083  # 1 - ½(1/30 + 1/32) to 7 digits, as bitsandbytes writes it
BLOCKSIZE = 64  # weights per absmax constant (QLoRA, bitsandbytes' default for NF4)
BLOCKSIZE2 = 256  # constants per second-level constant (double quantization)


class NF4Weight(NamedTuple):
    """A weight stored in NF4 with double-quantized constants.

    packed (ceil(n/2),) uint8: two code indices per byte, the first in the high nibble;
    qabsmax (n_blocks,) uint8: indices into ``dynamic_map()`` of c - offset;
    absmax2 (ceil(n_blocks/256),) float32: the scale of each block of 256 constants;
    offset: the mean of the constants (float32); shape: the weight's shape;
    code, code2: the NF4 and dynamic 8-bit tables, kept beside the arrays on their device
    so that dequantizing copies nothing from the host (None: the host tables).
    """

    packed: Any
    qabsmax: Any
    absmax2: Any
    offset: float
    shape: tuple[int, ...]
    code: Any = None
    code2: Any = None


# ------------------------------------------------------------------------ the code
def normal_float_code(offset: float = NF4_OFFSET) -> np.ndarray:
    """Derive the 16 NF4 values (float32, sorted) from standard normal quantiles.

    Positive side: Φ⁻¹ at 9 points evenly spaced from ``offset`` to 1/2, the last (1/2,
    giving 0) dropped: 8 values. Negative side: -Φ⁻¹ at 8 such points, the last dropped:
    7 values. With an exact 0, that is 16 values; dividing by the largest, Φ⁻¹(offset),
    puts them in [-1, 1]. This is bitsandbytes' ``create_normal_map`` step for step
    (the points in float32 as torch.linspace makes them, Φ⁻¹ in float64, the rest in
    float32), so it gives ``NF4_CODE`` exactly; in float64 throughout the values move
    by about 1e-7.
    """
    ppf = NormalDist().inv_cdf
    positive = [ppf(float(p)) for p in _linspace32(offset, 0.5, 9)[:-1]]
    negative = [-ppf(float(p)) for p in _linspace32(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array([*positive, 0.0, *negative], dtype=np.float32))
    return values / values.max()


def nf4_quantile_table(offset: float = NF4_OFFSET) -> list[dict[str, float]]:
    """The data of "NF4 against a normal's quantiles", one record per code (16, sorted).

    index, code (NF4_CODE); probability p and normal_quantile Φ⁻¹(p), the quantile the
    code was made from (code = Φ⁻¹(p) / Φ⁻¹(offset)); uniform: the evenly spaced 4-bit
    level -1 + 2i/15, for contrast; mass_nf4 and mass_uniform: the share of a normal
    N(0, (1/Φ⁻¹(offset))²) (weights scaled as a block's absmax would) that rounds to
    each code, by the midpoints. NF4 spreads the mass evenly; uniform levels do not.
    """
    nd = NormalDist()
    top = nd.inv_cdf(offset)
    positive = [float(p) for p in _linspace32(offset, 0.5, 9)[:-1]]
    negative = [1 - float(p) for p in _linspace32(offset, 0.5, 8)[:-1]]
    probabilities = sorted([*negative, 0.5, *positive])
    uniform = np.linspace(-1, 1, 16)

    def masses(levels: np.ndarray) -> list[float]:
        edges = [-np.inf, *((levels[:-1] + levels[1:]) / 2), np.inf]
        cdf = [nd.cdf(e * top) if np.isfinite(e) else float(e > 0) for e in edges]
        return [float(m) for m in np.diff(cdf)]

    code = np.asarray(NF4_CODE)
    return [
        {
            "index": i,
            "code": float(code[i]),
            "probability": p,
            "normal_quantile": nd.inv_cdf(p),
            "uniform": float(uniform[i]),
            "mass_nf4": m_nf4,
            "mass_uniform": m_uniform,
        }
        for i, (p, m_nf4, m_uniform) in enumerate(
            zip(probabilities, masses(code), masses(uniform), strict=True)
        )
    ]


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(True, 7, 8)), float32 (256,).

    A sign, then a run of zeros whose length e (0..6) is a decimal exponent, then a
    fraction with the remaining 6 - e bits: for e in 0..6 the 2^e values
    ±10^(e-6) · m, where m are the midpoints of 2^e + 1 evenly spaced points in
    [0.1, 1]. With 0 and 1 that is 2·127 + 2 = 256 values, fine near 0 and coarse near 1
    (the constants minus their mean are mostly small).
    """
    data: list[float] = []
    for e in range(7):
        bounds = _linspace32(0.1, 1.0, 2**e + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scale = np.float32(10.0 ** (e - 6))
        data += (scale * means).tolist() + (-scale * means).tolist()
    data += [0.0, 1.0]
    return np.sort(np.array(data, dtype=np.float32))


def _linspace32(start: float, end: float, n: int) -> np.ndarray:
    """float32 points as torch.linspace makes them on the CPU, so the map matches bit for bit.

    step = (end - start) / (n - 1) in float32; the first half is start + i·step, the
    second end - (n-1-i)·step, each rounded once (a fused multiply-add: the product of
    a float32 and a small integer is exact in float64). np.linspace differs in the last
    bit for a few points, which moves some of the 256 values by one ulp.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n)
    low = np.float64(start32) + i * step
    high = np.float64(end32) - (n - 1 - i) * step
    return np.where(i < n // 2, low, high).astype(np.float32)


def _midpoints(code: np.ndarray) -> np.ndarray:
    return (code[:-1] + code[1:]) / np.float32(2.0)  # float32, as bitsandbytes


# ------------------------------------------------------------------- blockwise
def _blockwise_absmax(flat: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block of ``blocksize`` values: c_b = max |x| and x / c_b clipped to [-1, 1]."""
    n = flat.size
    n_blocks = -(-n // blocksize)
    padded = np.zeros(n_blocks * blocksize, dtype=np.float32)
    padded[:n] = flat
    blocks = padded.reshape(n_blocks, blocksize)
    absmax = np.abs(blocks).max(axis=1)
    # an all-zero block: divide by a tiny number instead of 0, its values stay 0
    inv = np.float32(1.0) / np.maximum(absmax, np.float32(1e-38))
    scaled = np.clip(blocks * inv[:, None], -1, 1).reshape(-1)[:n]
    return scaled, absmax


def quantize_blockwise(x: Any, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax quantization of the flattened ``x`` to the nearest value of ``code``.

    Returns (indices (n,) int64, absmax (n_blocks,) float32). Nearest by midpoints:
    idx = #{midpoints m_k < x / c_b}, so a value exactly on a midpoint takes the
    lower code (bitsandbytes' ``torch.bucketize``). Host only: quantizing happens once.
    """
    blocksize = positive_int("blocksize", blocksize)
    flat = np.asarray(to_host(x), dtype=np.float32).reshape(-1)
    if flat.size == 0:
        raise ValueError("cannot quantize an empty array")
    if not np.isfinite(flat).all():
        raise ValueError("cannot quantize an array that contains NaN or inf")
    scaled, absmax = _blockwise_absmax(flat, blocksize)
    return np.searchsorted(_midpoints(code), scaled, side="left"), absmax


def pack_nibbles(idx: np.ndarray) -> np.ndarray:
    """Two 4-bit indices per byte, the first in the high nibble: (n,) -> (ceil(n/2),) uint8.

    An odd count is padded with index 7, NF4's exact 0 (as bitsandbytes pads with 0.0).
    """
    idx = np.asarray(idx, dtype=np.uint8)
    if idx.size % 2:
        idx = np.append(idx, np.uint8(7))
    return (idx[0::2] << 4) | idx[1::2]


def unpack_nibbles(packed: Any, n: int) -> Any:
    """Inverse of ``pack_nibbles``: (ceil(n/2),) uint8 -> (n,) indices, on the same device."""
    xp = xp_of(packed)
    idx = xp.stack([packed >> 4, packed & 15], axis=1).reshape(-1)
    return idx[:n]


def dequantize_blockwise(idx: Any, absmax: Any, code: Any, blocksize: int) -> Any:
    """code[idx_j] · c_b for every value j of block b: (n,) float32, on ``idx``'s device."""
    xp = xp_of(idx)
    n = idx.shape[0]
    values = xp.asarray(code, dtype=xp.float32)[idx.astype(xp.int64)]
    block = xp.arange(n) // blocksize
    return values * absmax[block]


# ---------------------------------------------------------------------- NF4 + DQ
def quantize_nf4(W: Any, blocksize: int = BLOCKSIZE) -> tuple[np.ndarray, np.ndarray]:
    """NF4 without double quantization: (packed (ceil(n/2),) uint8, absmax (n_blocks,) float32)."""
    idx, absmax = quantize_blockwise(W, np.asarray(NF4_CODE, dtype=np.float32), blocksize)
    return pack_nibbles(idx), absmax


def double_quantize(
    absmax: np.ndarray, offset: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """The constants minus their mean, to 8 bits: (qabsmax uint8, absmax2 float32, offset).

    The mean is rounded once from float64. bitsandbytes takes torch's float32 mean,
    whose summation order can leave it one ulp away; pass ``offset`` to use another.
    """
    absmax = np.asarray(absmax, dtype=np.float32)
    offset = np.float32(absmax.mean(dtype=np.float64) if offset is None else offset)
    idx, absmax2 = quantize_blockwise(absmax - offset, dynamic_map(), BLOCKSIZE2)
    return idx.astype(np.uint8), absmax2, offset


def quantize(W: Any) -> NF4Weight:
    """W (any shape, host or device) -> its NF4 storage with double-quantized constants."""
    packed, absmax = quantize_nf4(W)
    qabsmax, absmax2, offset = double_quantize(absmax)
    code = np.asarray(NF4_CODE, dtype=np.float32)
    return NF4Weight(packed, qabsmax, absmax2, float(offset), tuple(W.shape), code, dynamic_map())


def dequantize_absmax(q: NF4Weight) -> Any:
    """The constants back: dynamic_map[qabsmax] · absmax2 + offset, (n_blocks,) float32."""
    xp = xp_of(q.qabsmax)
    code2 = dynamic_map() if q.code2 is None else q.code2
    c = dequantize_blockwise(q.qabsmax, q.absmax2, code2, BLOCKSIZE2)
    return c + xp.float32(q.offset)


def dequantize(q: NF4Weight) -> Any:
    """Ŵ = NF4_CODE[idx] · ĉ_b, float32 of shape ``q.shape``, on the device of ``q``'s arrays.

    Backward of a frozen quantized linear needs only Ŵ: dx = dh Ŵ (there is no dŴ to give
    back, since Q is a set of integers and is never trained).
    """
    n = math.prod(q.shape)
    idx = unpack_nibbles(q.packed, n)
    code = NF4_CODE if q.code is None else q.code
    return dequantize_blockwise(idx, dequantize_absmax(q), code, BLOCKSIZE).reshape(q.shape)


def to_device(q: NF4Weight, asarray: Any) -> NF4Weight:
    """``q`` with its arrays passed through ``asarray`` (e.g. a backend's, to move them)."""
    tables = {k: asarray(getattr(q, k)) for k in ("code", "code2") if getattr(q, k) is not None}
    return q._replace(
        packed=asarray(q.packed), qabsmax=asarray(q.qabsmax), absmax2=asarray(q.absmax2), **tables
    )


# ---------------------------------------------------------------------- storage
def nbytes(q: NF4Weight) -> int:
    """Bytes stored for one quantized weight: packed codes, 8-bit constants, scales, offset
    (not the two code tables, which every weight shares)."""
    return int(q.packed.size + q.qabsmax.size + 4 * q.absmax2.size + 4)


def storage_bytes(n: int, double: bool = True) -> int:
    """Bytes of one weight of ``n`` values in NF4: ceil(n/2) for the codes, then the
    constants: 1 byte per block of 64, 4 per block of 256 of those, and a 4-byte offset
    (double quantization), or 4 bytes per block of 64 (float32 constants)."""
    n = positive_int("n", n)
    blocks = -(-n // BLOCKSIZE)
    constants = blocks + 4 * -(-blocks // BLOCKSIZE2) + 4 if double else 4 * blocks
    return -(-n // 2) + constants


def bits_per_parameter(n: int | None = None, double: bool = True) -> float:
    """Storage bits per weight of NF4 with blocks of 64 (and constants in 8 bits, if double).

    For ``n`` parameters the exact count, with the last partial blocks and the offset;
    without ``n`` the limit for large weights: 4 + 8/64 + 32/(64·256) = 4.127 (double)
    or 4 + 32/64 = 4.5 (float32 constants). The shared code tables are not counted.
    """
    if n is None:
        return 4 + 8 / BLOCKSIZE + 32 / (BLOCKSIZE * BLOCKSIZE2) if double else 4 + 32 / BLOCKSIZE
    return 8 * storage_bytes(n, double) / n


def quantization_error(W: Any, q: NF4Weight | None = None) -> dict[str, float]:
    """How far Ŵ = dequantize(quantize(W)) is from W: max and RMS of Ŵ - W, and RMS / RMS(W)."""
    host = np.asarray(to_host(W), dtype=np.float64)
    q = quantize(host) if q is None else q
    err = np.asarray(to_host(dequantize(q)), dtype=np.float64) - host
    rms = float(np.sqrt(np.mean(err**2)))
    return {
        "max_abs": float(np.abs(err).max()),
        "rms": rms,
        "relative_rms": rms / max(float(np.sqrt(np.mean(host**2))), 1e-300),
    }
