"""Exercise of notebook 05: what is inside an adapter file.

minilora reads and writes safetensors through the ``safetensors`` package
(files/io.py); this exercise is the format by hand, in a dozen lines: the learner reads
one tensor out of a file's bytes. The cases are files the library wrote, and
tests/test_exercises.py checks that the reference agrees with ``safetensors.numpy``.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from minilora.files.io import CODE_TO_DTYPE, serialize_safetensors
from minilora.lab.exercises.grader import Case, Exercise, Mistake, register

Array = Any

WHERE_THE_DATA_STARTS = (
    "data_offsets count from the start of the data section, which begins at byte "
    "8 + N: after the 8-byte length field and the N bytes of the header"
)


# ------------------------------------------------------------------ the reference
def safetensors_tensor(data: bytes, name: str) -> Array:
    (n,) = struct.unpack("<Q", data[:8])  # N: unsigned 64-bit, little-endian
    header = json.loads(data[8 : 8 + n])  # {"name": {"dtype", "shape", "data_offsets"}}
    entry = header[name]
    begin, end = entry["data_offsets"]
    start = 8 + n  # the data section follows the header
    dtype = CODE_TO_DTYPE[entry["dtype"]]  # "F32" -> float32, little-endian
    return np.frombuffer(data[start + begin : start + end], dtype=dtype).reshape(entry["shape"])


def _read_with(data: bytes, name: str, skip: str = "", order: str = "<") -> Array:
    """The reference with a classic mistake: the data read from the wrong place
    (``skip`` "all": from byte 0; "length": without the 8 bytes; "header": without
    the N bytes) or in the wrong byte order (``order`` ">")."""
    (n,) = struct.unpack("<Q", data[:8])
    entry = json.loads(data[8 : 8 + n])[name]
    begin, end = entry["data_offsets"]
    start = {"": 8 + n, "all": 0, "length": n, "header": 8}[skip]
    dtype = CODE_TO_DTYPE[entry["dtype"]].newbyteorder(order)
    return np.frombuffer(data[start + begin : start + end], dtype=dtype).reshape(entry["shape"])


def _itemsize(result: Any) -> int:
    """Bytes per item of what the learner returned: the values alone miss a wrong dtype."""
    return np.asarray(result).dtype.itemsize


# ------------------------------------------------------------------ the cases
def _cases(rng: np.random.Generator) -> list[Case]:
    """Files written by the library: the tensor asked for first, in the middle, last."""
    r, d = 2, 6
    adapter = {
        "h.0.attn.q.lora_A": rng.standard_normal((r, d)).astype(np.float32),
        "h.0.attn.q.lora_B": rng.standard_normal((d, r)).astype(np.float32),
        "h.0.attn.v.lora_A": rng.standard_normal((r, d)).astype(np.float32),
    }
    state = {  # the library lays out the 8-byte dtypes first, then by name
        "bias": rng.standard_normal(5).astype(np.float16),
        "step": np.array(1234, dtype=np.int64),
        "tokens": rng.integers(-(2**40), 2**40, size=(2, 3)),
        "weight": rng.standard_normal((3, 4)),
    }
    files = [
        ("one float32 matrix", {"w": rng.standard_normal((3, 4)).astype(np.float32)}, "w"),
        ("an adapter, lora_B of q", adapter, "h.0.attn.q.lora_B"),
        ("float64 weight after int64", state, "weight"),
        ("int64 tokens", state, "tokens"),
        ("a 0-d int64 step", state, "step"),
        ("float16 bias, last", state, "bias"),
    ]
    meta = {"format": "minilora-adapter"}
    return [
        Case(label, {"data": serialize_safetensors(t, meta), "name": name}, tol=0.0)
        for label, t, name in files
    ]


register(
    Exercise(
        name="safetensors_tensor",
        notebook="05",
        statement="""\
Read one tensor out of the bytes of a safetensors file (what adapter_model.safetensors is):

    def safetensors_tensor(data, name) -> array

    bytes [0, 8)           N, the header length: unsigned 64-bit little-endian
    bytes [8, 8 + N)       the header, UTF-8 JSON (padded with spaces):
                           {"name": {"dtype": "F32", "shape": [2, 3],
                                     "data_offsets": [begin, end]}, ...,
                            "__metadata__": {"format": "minilora-adapter"}}
    bytes [8 + N, ...)     the data section: each tensor's raw little-endian bytes, in
                           C order, at [begin, end) counted from the data section's start

dtypes: F16 F32 F64 I32 I64 U8 BOOL (float16/32/64, int32/64, uint8, bool). data is a
bytes object; return the tensor called name as an array of its dtype and shape. There
is no pickle and no code in the file: only numbers, which is why it is safe to load.""",
        reference=safetensors_tensor,
        cases=_cases,
        hint="N = int.from_bytes(data[:8], 'little'); the header is json.loads(data[8:8 + N]).",
        outputs=("result",),
        compare=lambda result: {"result": result, "bytes per item": _itemsize(result)},
        exact=("result", "bytes per item"),
        mistakes=(
            Mistake(
                WHERE_THE_DATA_STARTS + "; you read from byte 0 of the file",
                lambda d, n: _read_with(d, n, skip="all"),
            ),
            Mistake(
                WHERE_THE_DATA_STARTS + "; you left out the 8 length bytes",
                lambda d, n: _read_with(d, n, skip="length"),
            ),
            Mistake(
                WHERE_THE_DATA_STARTS + "; you left out the header",
                lambda d, n: _read_with(d, n, skip="header"),
            ),
            Mistake(
                "the dtype comes from the header: F16, F32, F64 are float16, float32, float64 "
                "(2, 4, 8 bytes an item), I32, I64 are int32, int64",
                lambda d, n: safetensors_tensor(d, n).astype(np.float64),
            ),
            Mistake(
                "the bytes are little-endian (dtype '<i8', '<f4'); you read them big-endian",
                lambda d, n: _read_with(d, n, order=">"),
            ),
        ),
    )
)
