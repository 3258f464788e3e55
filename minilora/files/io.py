"""Files without pickle: safetensors through the ``safetensors`` package, JSON, atomic writes.

Why not pickle? Loading a pickle runs arbitrary code chosen by whoever wrote the file.
A checkpoint or an adapter downloaded from someone else should be *data*, so minilora
stores arrays in the safetensors format and everything else in JSON.

Arrays are read and written by ``safetensors.numpy``, as in PEFT, transformers and the
hub. What is inside such a file is the exercise ``safetensors_tensor`` of notebook 05
(lab/exercises/file_format.py) and docs/DESIGN.md's "File formats". This module is the
boundary: host NumPy arrays only, minilora's dtypes only, and one ValueError naming the
file for anything wrong in it. The library's errors speak of Rust types ("expected
usize") and it lets a repeated name, bfloat16 or bool bytes other than 0/1 through, so
the header is checked first and the library's refusals are explained.

Every writer goes through :func:`atomic_write_bytes`: a crash or an error half-way
leaves the previous file intact, never a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

PathLike = str | os.PathLike

# safetensors dtype code <-> NumPy dtype (always little-endian in the file).
DTYPE_TO_CODE: dict[np.dtype, str] = {
    np.dtype("float16"): "F16",
    np.dtype("float32"): "F32",
    np.dtype("float64"): "F64",
    np.dtype("int32"): "I32",
    np.dtype("int64"): "I64",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
}
CODE_TO_DTYPE: dict[str, np.dtype] = {
    code: dt.newbyteorder("<") for dt, code in DTYPE_TO_CODE.items()
}

METADATA_KEY = "__metadata__"
MAX_HEADER_BYTES = 100 * 1000 * 1000  # a header bigger than this is a broken or hostile file


# --------------------------------------------------------------------------- atomic writes


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.

    The bytes go to a temporary file in the same directory (``os.replace`` is only atomic
    within one file system), are flushed and fsync'ed to disk, and the temporary file is
    then renamed onto the target. On any error the temporary file is removed and the
    target is untouched. Missing parent directories are created.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name ("x" mode refuses to clobber) opened with open() so the umask applies,
    # unlike tempfile.mkstemp, which would leave the final file readable by its owner only.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them visible
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def check_writable_file(path: PathLike) -> None:
    """Refuse now, naming ``path``, a file :func:`atomic_write_bytes` could not write later.

    For outputs written after long work: the folder must be (or be creatable under) a
    writable folder, and ``path`` not a folder. Where the folder exists, a probe file is
    created and removed there, the one test that no permission bit or file system fools.
    Nothing else is created.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory; expected a file path")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the nearest existing ancestor
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{path}: cannot be written, {folder} is not a folder")
    if folder != path.parent:  # the folders will be created: the ancestor must allow it
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ValueError(f"{path}: cannot be written, {folder} is not writable")
        return
    probe = folder / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"  # atomic_write_bytes' name
    try:
        with open(probe, "xb"):
            pass
    except OSError as err:
        raise ValueError(f"{path}: cannot be written ({err.strerror})") from None
    probe.unlink()


_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")  # atomic_write_bytes' temporary names


def is_temporary(path: PathLike) -> bool:
    """Whether ``path`` is a plain file named as :func:`atomic_write_bytes`' temporaries."""
    path = Path(path)
    return bool(_TEMPORARY.fullmatch(path.name)) and path.is_file() and not path.is_symlink()


def remove_temporaries(directory: PathLike) -> list[str]:
    """Delete what an interrupted :func:`atomic_write_bytes` left in ``directory``.

    Only plain files whose names match the temporary pattern are touched. Returns their
    names. Safe only when no other process is writing into ``directory``.
    """
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if is_temporary(entry):
                entry.unlink()
                removed.append(entry.name)
    return removed


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); best effort, since not every OS allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """The hex SHA-256 of a file's bytes, read in chunks (for manifests and equality checks)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- JSON


def save_json(path: PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys in insertion order, trailing newline), atomically."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=False)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{path}: cannot write as JSON: {err}") from None
    atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def load_json(path: PathLike) -> Any:
    """Read a JSON file; a missing file or invalid JSON is a ValueError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except RecursionError:  # "[[[[..." nested deeper than Python's stack
        raise ValueError(f"{path}: JSON nested too deeply to be a minilora file") from None


# --------------------------------------------------------------------------- safetensors: write


def _check_tensor(name: Any, array: Any) -> np.dtype:
    """Validate one (name, array) pair for saving; return its dtype."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor name {name!r} is not allowed; names must be non-empty str")
    if name == METADATA_KEY:
        raise ValueError(f"tensor name {name!r} is reserved for the metadata")
    if not isinstance(array, np.ndarray):
        hint = ""
        if hasattr(array, "__cuda_array_interface__") or hasattr(array, "get"):
            hint = " (a device array: call minilora.backend.to_host first)"
        raise TypeError(
            f"tensor {name!r} is a {type(array).__module__}.{type(array).__name__}; "
            f"expected a host numpy.ndarray{hint}; use to_host() to copy arrays to the host"
        )
    dtype = array.dtype.newbyteorder("=")  # ">f4" is still float32; the library swaps it
    if dtype not in DTYPE_TO_CODE:
        allowed = ", ".join(dt.name for dt in DTYPE_TO_CODE)
        raise ValueError(f"tensor {name!r} has dtype {array.dtype}; allowed: {allowed}")
    return dtype


def serialize_safetensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """The complete safetensors file for ``tensors`` as bytes, made by ``safetensors.numpy``.

    Every name, array and metadata entry is checked here first, so the library only ever
    sees what it writes correctly. The library lays the data out by dtype size, then by
    name (not in the mapping's order), and pads the header to a multiple of 8 bytes.
    """
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict name -> numpy array, got {type(tensors).__name__}")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict str -> str, got {type(metadata).__name__}")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(
                    f"metadata entry {key!r}: {value!r} is not allowed; keys and values must be str"
                )
    arrays = {}
    for name, array in tensors.items():
        dtype = _check_tensor(name, array)
        # C order, little-endian: the library copies nbytes from the data pointer, so a
        # strided view (a transpose) would be written wrong. asarray keeps 0-d arrays 0-d.
        arrays[name] = np.asarray(array, dtype=dtype.newbyteorder("<"), order="C")
    # No metadata and empty metadata read back the same ({}); safetensors 0.8 writes an
    # invalid header for an empty dict with no tensors, so it never gets one.
    meta = dict(metadata) if metadata else None
    try:
        data = safetensors.numpy.save(arrays, metadata=meta)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as err:  # a SafetensorError, or a Rust panic (a BaseException)
        raise ValueError(f"safetensors cannot write these tensors: {_first_line(err)}") from None
    return _sorted_metadata(data) if meta and len(meta) > 1 else data


def _sorted_metadata(data: bytes) -> bytes:
    """``data`` with the metadata's keys in sorted order: same seed, same bytes.

    safetensors keeps the metadata in a Rust HashMap, whose order changes from call to
    call. Sorting the keys changes no byte count, so the header is rewritten in place;
    should the JSON come out longer or different in meaning, the library's bytes stand.
    """
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8 : 8 + n].decode("utf-8").rstrip(" ")
    header = json.loads(text)
    header[METADATA_KEY] = dict(sorted(header[METADATA_KEY].items()))
    again = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(again) != len(text.encode("utf-8")) or json.loads(again) != json.loads(text):
        return data
    return data[:8] + again + data[8 + len(again) :]  # the padding and the data as they were


def save_safetensors(
    path: PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
) -> int:
    """Save host arrays (and optional str -> str metadata) to ``path``; return bytes written.

    Supported dtypes: float16/32/64, int32/64, uint8, bool. Everything is validated and
    serialised in memory first, and the file is written atomically, so a bad input
    never leaves a broken or half-written file behind.
    """
    data = serialize_safetensors(tensors, metadata)
    atomic_write_bytes(path, data)
    return len(data)


# --------------------------------------------------------------------------- safetensors: read


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a repeated key would silently hide a tensor, so refuse it."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r} in the header")
        out[key] = value
    return out


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)  # JSON true is not a size


def _check_entry(where: str, entry: Any) -> tuple[str, int, int]:
    """One header entry, checked in words a learner can act on; returns (dtype, begin, end)."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(
            f"{where}: entry {entry!r} must be an object with exactly "
            "'dtype', 'shape' and 'data_offsets'"
        )
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in CODE_TO_DTYPE:  # the library knows more (BF16, U16, ...); minilora does not
        raise ValueError(
            f"{where}: dtype {code!r} is not supported; allowed: {', '.join(CODE_TO_DTYPE)}"
        )
    if not isinstance(shape, list) or not all(_is_int(n) and n >= 0 for n in shape):
        raise ValueError(f"{where}: shape {shape!r} must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(n) and n >= 0 for n in offsets)
        or offsets[0] > offsets[1]
    ):
        raise ValueError(
            f"{where}: data_offsets {offsets!r} must be [begin, end] with 0 <= begin <= end"
        )
    begin, end = offsets
    expected = math.prod(shape) * CODE_TO_DTYPE[code].itemsize  # Python ints: no overflow
    if end - begin != expected:
        raise ValueError(
            f"{where}: data_offsets {offsets!r} span {end - begin} bytes, but shape {shape} "
            f"of {code} needs {expected}"
        )
    return code, begin, end


def _read_header(path: Path, raw: bytes) -> tuple[int, dict[str, str], dict[str, tuple]]:
    """(N, metadata, {name: (dtype, begin, end)} in the header's order) of a file's bytes.

    The checks the library does not make, or makes in words about Rust types.
    """
    if len(raw) < 8:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for a safetensors file (>= 8)")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if n > len(raw) - 8:
        raise ValueError(
            f"{path}: header length {n} is more than the {len(raw) - 8} bytes after the "
            "length field (truncated or not a safetensors file)"
        )
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: header is not valid UTF-8 (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: header is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    except ValueError as err:  # from _reject_duplicates
        raise ValueError(f"{path}: {err}") from None
    except RecursionError:
        raise ValueError(f"{path}: header JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError(f"{path}: {METADATA_KEY} {metadata!r} must be an object of str -> str")
    if "" in header:
        raise ValueError(f"{path}: empty tensor name in the header")
    entries = {name: _check_entry(f"{path}: tensor {name!r}", e) for name, e in header.items()}
    return n, metadata, entries


def _explain(entries: dict[str, tuple], data_size: int, err: BaseException) -> str:
    """Why the library refused a header that passed :func:`_read_header`, in words.

    What is left to refuse is the layout: the tensors must tile the data section, sorted
    by offset each starting where the previous one ended, the last at the end of the file.
    """
    cursor = 0
    for name, (_, begin, end) in sorted(entries.items(), key=lambda kv: kv[1][1:]):
        if begin < cursor:
            return (
                f"tensor {name!r} at [{begin}, {end}) overlaps the previous tensor, "
                f"which ends at {cursor}"
            )
        if begin > cursor:
            return (
                f"gap of {begin - cursor} bytes before tensor {name!r} at [{begin}, {end}); "
                "tensors must be contiguous"
            )
        cursor = end
    if cursor > data_size:
        return (
            f"truncated: the header describes {cursor} data bytes but the file holds "
            f"only {data_size}"
        )
    if cursor < data_size:
        return (
            f"{data_size - cursor} trailing bytes after the last tensor "
            f"(the header describes {cursor} data bytes)"
        )
    return f"not a valid safetensors file (safetensors: {_first_line(err)})"


def load_safetensors(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file into (tensors, metadata) with ``safetensors.numpy``.

    The bytes are read once; the header is checked (see :func:`_read_header`), the
    library builds the arrays, and a file it refuses is explained. Any problem is one
    ValueError that starts with the path. The returned arrays are owned, writable,
    native-order copies, in the header's order of names.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    raw = path.read_bytes()
    n, metadata, entries = _read_header(path, raw)
    try:
        loaded = safetensors.numpy.load(raw)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as err:  # a SafetensorError, or a Rust panic (a BaseException)
        raise ValueError(f"{path}: {_explain(entries, len(raw) - 8 - n, err)}") from None
    del raw  # the library's arrays hold their own copy of the bytes
    tensors: dict[str, np.ndarray] = {}
    for name, (code, _, _) in entries.items():
        view = loaded.pop(name, None)  # read-only, on the library's buffer; freed as we go
        if view is None:  # a name JSON and the library decode differently
            raise ValueError(f"{path}: tensor {name!r} is not what safetensors read")
        if code == "BOOL" and view.size and view.view(np.uint8).max() > 1:
            # NumPy would show a byte 2 as True but compare it unequal to True: refuse it.
            raise ValueError(f"{path}: tensor {name!r} is BOOL but holds bytes other than 0/1")
        tensors[name] = view.astype(CODE_TO_DTYPE[code].newbyteorder("="))  # an owned copy
    return tensors, dict(metadata)
