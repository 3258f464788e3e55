"""Tests for minilora.files.io: safetensors through the `safetensors` package, JSON helpers
and atomic writes."""

from __future__ import annotations

import ast
import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy as st_numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

import minilora.files.io as mio
from minilora.files.io import (
    atomic_write_bytes,
    load_json,
    load_safetensors,
    save_json,
    save_safetensors,
    serialize_safetensors,
    sha256_file,
)


def sample_tensors() -> dict[str, np.ndarray]:
    """One array per supported dtype, plus 0-d and empty arrays and awkward values."""
    rng = np.random.default_rng(0)
    return {
        "f16": rng.standard_normal((3, 5)).astype(np.float16),
        "f32": np.array([[0.0, -0.0, np.inf], [-np.inf, np.nan, 1e-40]], dtype=np.float32),
        "f64": rng.standard_normal((2, 3, 4)),
        "i32": np.array([np.iinfo(np.int32).min, -1, 0, np.iinfo(np.int32).max], dtype=np.int32),
        "i64": np.arange(-6, 6, dtype=np.int64).reshape(3, 4),
        "u8": np.array([0, 1, 127, 255], dtype=np.uint8),
        "bool": np.array([[True, False], [False, True]]),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 7), dtype=np.float64),
        "empty_i": np.zeros((4, 0), dtype=np.int64),
    }


def assert_bit_equal(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.tobytes() == b.tobytes()  # bit for bit: NaN and -0.0 included


def write_raw(path: Path, header: dict, data: bytes, header_len: int | None = None) -> None:
    """Write a safetensors-like file by hand, to feed the reader broken inputs."""
    h = json.dumps(header).encode()
    n = len(h) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + h + data)


# --------------------------------------------------------------------------- round trips


def test_round_trip_every_dtype_bit_for_bit(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "t.safetensors"
    n = save_safetensors(path, tensors)
    assert n == path.stat().st_size
    loaded, metadata = load_safetensors(path)
    assert metadata == {}
    # The names come back in the file's order, which the library chooses (by dtype size,
    # then name), not in the order they were given.
    assert sorted(loaded) == sorted(tensors)
    for name, array in tensors.items():
        assert_bit_equal(loaded[name], array)


def test_header_is_padded_and_data_is_contiguous(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors(path, {"a": np.ones(3, np.float32), "b": np.ones((2, 2), np.int64)})
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    # safetensors lays out the larger item size first (alignment), then by name.
    assert header["b"] == {"dtype": "I64", "shape": [2, 2], "data_offsets": [0, 32]}
    assert header["a"] == {"dtype": "F32", "shape": [3], "data_offsets": [32, 44]}
    assert len(raw) == 8 + n + 44


def test_loaded_arrays_are_owned_and_writable(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors(path, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    loaded, _ = load_safetensors(path)
    w = loaded["w"]
    assert w.flags.writeable and w.flags.owndata and w.flags.c_contiguous
    w[0, 0] = 42.0  # must not raise
    assert w[0, 0] == 42.0


def test_non_contiguous_and_big_endian_inputs_are_written_correctly(tmp_path):
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    tensors = {"t": base.T, "big": np.arange(5, dtype=">i4")}
    path = tmp_path / "t.safetensors"
    save_safetensors(path, tensors)
    loaded, _ = load_safetensors(path)
    np.testing.assert_array_equal(loaded["t"], base.T)
    np.testing.assert_array_equal(loaded["big"], np.arange(5))
    assert loaded["big"].dtype == np.dtype("int32")


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "t.safetensors"
    meta = {"format": "np", "note": "ünïcode ✓", "empty": ""}
    save_safetensors(path, {"x": np.zeros(2, np.float32)}, metadata=meta)
    loaded, metadata = load_safetensors(path)
    assert metadata == meta
    assert list(loaded) == ["x"]


def test_empty_file_round_trip(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors(path, {}, metadata={"k": "v"})
    assert load_safetensors(path) == ({}, {"k": "v"})


# --------------------------------------------------------------------------- interop


def test_official_reader_loads_our_files(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "ours.safetensors"
    save_safetensors(path, tensors, metadata={"who": "minilora"})
    loaded = st_numpy.load_file(str(path))
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert_bit_equal(loaded[name], array)
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"who": "minilora"}


def test_we_load_official_files(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "theirs.safetensors"
    st_numpy.save_file(tensors, str(path), metadata={"who": "safetensors"})
    loaded, metadata = load_safetensors(path)
    assert metadata == {"who": "safetensors"}
    assert set(loaded) == set(tensors)
    for name, array in tensors.items():
        assert_bit_equal(loaded[name], array)


# --------------------------------------------------------------------------- save errors


def test_unsupported_dtype_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"'c'.*complex128.*allowed: float16"):
        save_safetensors(tmp_path / "t.safetensors", {"c": np.zeros(2, np.complex128)})
    assert not (tmp_path / "t.safetensors").exists()


def test_non_numpy_input_is_a_type_error(tmp_path):
    with pytest.raises(TypeError, match=r"'w'.*list.*to_host"):
        save_safetensors(tmp_path / "t.safetensors", {"w": [1.0, 2.0]})


def test_device_like_array_gets_the_to_host_hint(tmp_path):
    class FakeDeviceArray:  # looks like a CuPy array from the outside
        __cuda_array_interface__: dict = {}

        def get(self):
            return np.zeros(2)

    with pytest.raises(TypeError, match=r"device array: call minilora\.backend\.to_host"):
        save_safetensors(tmp_path / "t.safetensors", {"w": FakeDeviceArray()})


@pytest.mark.parametrize("name", ["", 3, "__metadata__"])
def test_bad_tensor_names(tmp_path, name):
    with pytest.raises(ValueError, match="name"):
        save_safetensors(tmp_path / "t.safetensors", {name: np.zeros(1, np.float32)})


def test_metadata_values_must_be_str(tmp_path):
    with pytest.raises(ValueError, match=r"'step'.*must be str"):
        save_safetensors(tmp_path / "t.safetensors", {}, metadata={"step": 3})


# --------------------------------------------------------------------------- load errors


@pytest.fixture
def good_file(tmp_path) -> Path:
    path = tmp_path / "good.safetensors"
    save_safetensors(path, {"a": np.arange(4, dtype=np.float32), "b": np.ones(2, np.int64)})
    return path


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(ValueError, match=r"nope\.safetensors: no such file"):
        load_safetensors(path)


def test_file_shorter_than_8_bytes(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match=r"short\.safetensors: 3 bytes is too short"):
        load_safetensors(path)


def test_truncated_file(good_file):
    raw = good_file.read_bytes()
    good_file.write_bytes(raw[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_safetensors(good_file)


def test_trailing_bytes(good_file):
    good_file.write_bytes(good_file.read_bytes() + b"\x00" * 4)
    with pytest.raises(ValueError, match="4 trailing bytes"):
        load_safetensors(good_file)


def test_header_length_bigger_than_file(tmp_path):
    path = tmp_path / "t.safetensors"
    write_raw(path, {}, b"", header_len=1000)
    with pytest.raises(ValueError, match="header length 1000 is more than"):
        load_safetensors(path)


def test_absurd_header_length(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(ValueError, match="exceeds the limit"):
        load_safetensors(path)


@pytest.mark.parametrize(
    "header_bytes, message",
    [
        (b"\xff\xfe{}", "not valid UTF-8"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}, "a": 1}', "duplicate"),
    ],
)
def test_garbage_header(tmp_path, header_bytes, message):
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + b"\x00" * 4)
    with pytest.raises(ValueError, match=message):
        load_safetensors(path)


def test_wrong_dtype_string(tmp_path):
    path = tmp_path / "t.safetensors"
    write_raw(path, {"x": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16)
    with pytest.raises(ValueError, match=r"'x'.*dtype 'F128' is not supported; allowed: F16"):
        load_safetensors(path)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "non-negative"),
        ({"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}, "non-negative integers"),
        ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "non-negative integers"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}, "begin <= end"),
        ({"dtype": "F32", "shape": [1], "data_offsets": [0]}, r"\[begin, end\]"),
        ({"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}, "needs 8"),
        ({"dtype": "F32", "shape": [1]}, "exactly"),
    ],
)
def test_bad_entries(tmp_path, entry, message):
    path = tmp_path / "t.safetensors"
    write_raw(path, {"x": entry}, b"\0" * 4)
    with pytest.raises(ValueError, match=message):
        load_safetensors(path)


def test_overlapping_offsets(tmp_path):
    path = tmp_path / "t.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    write_raw(path, header, b"\0" * 12)
    with pytest.raises(ValueError, match="'b'.*overlaps"):
        load_safetensors(path)


def test_gapped_offsets(tmp_path):
    path = tmp_path / "t.safetensors"
    header = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
    }
    write_raw(path, header, b"\0" * 12)
    with pytest.raises(ValueError, match="gap of 4 bytes before tensor 'b'"):
        load_safetensors(path)


def test_offsets_in_any_header_order_are_accepted(tmp_path):
    # The official writer orders the data by dtype size, not by header order.
    path = tmp_path / "t.safetensors"
    data = np.float32(1.5).tobytes() + np.int64(7).tobytes()
    header = {
        "late": {"dtype": "I64", "shape": [], "data_offsets": [4, 12]},
        "early": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
    }
    write_raw(path, header, data)
    loaded, _ = load_safetensors(path)
    assert loaded["early"] == np.float32(1.5) and loaded["late"] == 7


def test_bad_metadata(tmp_path):
    path = tmp_path / "t.safetensors"
    write_raw(path, {"__metadata__": {"step": 3}}, b"")
    with pytest.raises(ValueError, match="str -> str"):
        load_safetensors(path)


def test_bool_bytes_must_be_0_or_1(tmp_path):
    path = tmp_path / "t.safetensors"
    write_raw(path, {"m": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02")
    with pytest.raises(ValueError, match="other than 0/1"):
        load_safetensors(path)


# --------------------------------------------------------------------------- the library boundary


class FakePanic(BaseException):
    """What a Rust panic reaches Python as: pyo3's PanicException is a BaseException."""


def test_the_library_builds_the_arrays_and_its_failures_are_one_line(good_file, monkeypatch):
    def panic(data):
        raise FakePanic("called `Option::unwrap()` on a `None` value\nstack backtrace: ...")

    monkeypatch.setattr(mio.safetensors.numpy, "load", panic)
    with pytest.raises(ValueError) as info:
        load_safetensors(good_file)
    message = str(info.value)
    assert message.startswith(f"{good_file}: not a valid safetensors file (safetensors: called")
    assert "\n" not in message and "backtrace" not in message


def test_the_library_writes_the_bytes_and_its_failures_leave_nothing(tmp_path, monkeypatch):
    def refuse(tensors, metadata=None):
        raise safetensors.SafetensorError("Error while serializing: something odd")

    monkeypatch.setattr(mio.safetensors.numpy, "save", refuse)
    path = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match="safetensors cannot write these tensors: Error while"):
        save_safetensors(path, {"x": np.ones(2, np.float32)})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("code", ["BF16", "U16", "I8", "F8_E4M3"])
def test_dtypes_the_library_knows_but_minilora_does_not(tmp_path, code):
    path = tmp_path / "t.safetensors"
    write_raw(path, {"x": {"dtype": code, "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(ValueError, match=rf"'x'.*dtype '{code}' is not supported; allowed: F16"):
        load_safetensors(path)


def test_official_file_of_an_unsupported_dtype_is_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    st_numpy.save_file({"x": np.arange(3, dtype=np.uint16)}, str(path))
    with pytest.raises(ValueError, match=r"t\.safetensors: tensor 'x': dtype 'U16' is not"):
        load_safetensors(path)


def test_what_the_library_lets_through_is_still_refused(tmp_path):
    # safetensors 0.8 keeps the last of two equal names, ignores an extra field and
    # accepts an empty name: each would hide or invent a tensor.
    entry = '{"dtype": "F32", "shape": [], "data_offsets": [0, 4]}'
    cases = {
        f'{{"a": {entry}, "a": {entry}}}': "duplicate key 'a'",
        '{"a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4], "x": 1}}': "exactly",
        f'{{"": {entry}}}': "empty tensor name",
    }
    path = tmp_path / "t.safetensors"
    for header, message in cases.items():
        path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 4)
        with pytest.raises(ValueError, match=message):
            load_safetensors(path)


def test_empty_metadata_without_tensors_is_a_valid_file(tmp_path):
    # safetensors 0.8 writes an invalid header for metadata={} and no tensors.
    path = tmp_path / "t.safetensors"
    save_safetensors(path, {}, metadata={})
    assert load_safetensors(path) == ({}, {})
    assert st_numpy.load_file(str(path)) == {}


def test_metadata_both_ways_with_the_official_package(tmp_path):
    meta = {"format": "minilora-adapter", "note": "ünïcode ✓"}
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    save_safetensors(ours, {"w": np.eye(2, dtype=np.float32)}, metadata=meta)
    with safetensors.safe_open(str(ours), framework="np") as f:
        assert f.metadata() == meta and list(f.keys()) == ["w"]
    st_numpy.save_file({"w": np.eye(2, dtype=np.float32)}, str(theirs), metadata=meta)
    tensors, metadata = load_safetensors(theirs)
    assert metadata == meta
    assert_bit_equal(tensors["w"], np.eye(2, dtype=np.float32))
    assert ours.read_bytes()[:8] == theirs.read_bytes()[:8]  # the same header length


def test_same_tensors_same_bytes_whatever_the_metadata(tmp_path):
    # safetensors 0.8 writes the metadata in a HashMap's order, which changes from one
    # call to the next; minilora sorts it, so a file is reproducible byte for byte.
    meta = {key: f"value {key} ✓\t\u0001" for key in "fedcba"}
    tensors = {"w": np.eye(2, dtype=np.float32), "b": np.arange(3)}
    files = {bytes(serialize_safetensors(tensors, meta)) for _ in range(8)}
    assert len(files) == 1
    [data] = files
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert list(header["__metadata__"]) == sorted(meta)
    path = tmp_path / "t.safetensors"
    path.write_bytes(data)
    with safetensors.safe_open(str(path), framework="np") as f:
        assert f.metadata() == meta
    assert load_safetensors(path)[1] == meta


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    path = tmp_path / "a" / "b" / "f.bin"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(path.parent) == ["f.bin"]


def test_failed_replace_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "t.safetensors"
    save_safetensors(path, {"x": np.ones(3, np.float32)})
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(mio.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        save_safetensors(path, {"x": np.zeros(100, np.float64)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.safetensors"]


def test_failure_while_writing_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "t.json"
    save_json(path, {"v": 1})
    before = path.read_bytes()

    def broken_fsync(fd):
        raise OSError("fsync failed")

    monkeypatch.setattr(mio.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="fsync failed"):
        save_json(path, {"v": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.json"]


def test_bad_input_never_touches_the_old_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_safetensors(path, {"x": np.ones(3, np.float32)})
    before = path.read_bytes()
    # The second tensor is invalid: nothing may be written, not even the first one.
    with pytest.raises(ValueError, match="complex"):
        save_safetensors(path, {"x": np.zeros(3, np.float32), "y": np.zeros(1, np.complex64)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.safetensors"]


def test_atomic_write_to_a_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        atomic_write_bytes(tmp_path, b"x")


# --------------------------------------------------------------------------- JSON, hashing


def test_json_round_trip_and_format(tmp_path):
    path = tmp_path / "sub" / "c.json"
    obj = {"z": 1, "a": [1.5, "x", None], "nested": {"b": True}}
    save_json(path, obj)
    text = path.read_text()
    assert text.endswith("}\n")
    assert text.index('"z"') < text.index('"a"')  # insertion order, not sorted
    assert '\n  "z": 1' in text  # indent=2
    assert load_json(path) == obj


def test_load_json_errors_name_path_and_position(tmp_path):
    with pytest.raises(ValueError, match=r"missing\.json: no such file"):
        load_json(tmp_path / "missing.json")
    path = tmp_path / "bad.json"
    path.write_text('{\n  "a": 1,\n  oops\n}\n')
    with pytest.raises(ValueError, match=r"bad\.json: invalid JSON at line 3, column 3"):
        load_json(path)


def test_save_json_unserialisable_names_path(tmp_path):
    with pytest.raises(TypeError, match=r"x\.json: cannot write as JSON"):
        save_json(tmp_path / "x.json", {"a": object()})
    assert not (tmp_path / "x.json").exists()


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(path) == expected


# --------------------------------------------------------------------------- no pickle


def test_io_module_never_imports_pickle():
    source = Path(mio.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported  # the walk found the real imports (json, numpy, ...)
    assert not imported & {"pickle", "cPickle", "dill", "joblib", "shelve", "marshal"}
    assert "allow_pickle" not in source


# --------------------------------------------------------------------------- property

_any_tensor = st.sampled_from(
    [np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_]
).flatmap(lambda dt: arrays(dt, array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))


@settings(max_examples=60, deadline=None)
@given(
    tensors=st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda s: s != "__metadata__"),
        _any_tensor,
        max_size=4,
    )
)
def test_any_tensors_round_trip_bit_for_bit(tensors):
    """Whatever the names, dtypes and shapes (0-d, empty, NaN), the bytes come back."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.safetensors"
        save_safetensors(path, tensors)
        loaded, _ = load_safetensors(path)
        official = st_numpy.load_file(str(path))
        assert official.keys() == tensors.keys()
    assert loaded.keys() == tensors.keys()
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        assert loaded[name].tobytes() == array.tobytes()
