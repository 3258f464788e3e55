"""Property tests: random bytes, random JSON and random configs thrown at every loader.

The property, for every loader: either a clean ``ValueError`` or ``TypeError`` with a
non-empty message, or a load that is correct (what was read is what the file says, typed
exactly, finite where it must be, and nothing outside the run folder is followed). A model
passed in is unchanged when loading fails. Any other exception type (KeyError,
AttributeError, RecursionError, OverflowError, MemoryError, NumPy's errors, ...) or a load
that is silently wrong fails the test.

Strategies: pure noise (bytes, ``st.recursive`` JSON), and targeted ones that start from
a valid file and change ONE thing (a field to a wrong type or value: bool for int, string
for list, NaN, negative, huge; a field deleted or added; one tensor value made NaN, inf or
too large for float32), which find more than noise does.

Every example runs under a timer and an address-space cap (Linux), so a size taken on
trust fails the property instead of taking the machine's memory.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import guarded
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from minilora.core.adapters import add_adapter
from minilora.core.lora import INITS, TARGET_MODULES, LoraConfig
from minilora.core.model import GPT, GPTConfig
from minilora.core.tokenizer import CharTokenizer
from minilora.files.checkpoints import load_adapter, load_model, save_adapter, save_model
from minilora.files.io import load_json, load_safetensors, serialize_safetensors
from minilora.training.data import ShiftTask
from minilora.training.train import TrainConfig, Trainer

TOKENIZER = CharTokenizer.default()
TINY = GPTConfig(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layer=1, n_head=2, d_model=16)
LORA = LoraConfig(r=2, alpha=4.0, target_modules=("q", "v"))
SECONDS = 3.0  # per example; a correct load or refusal of these tiny files takes milliseconds

FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FUZZ, max_examples=30)


# --------------------------------------------------------------------------- guards
def attempt(fn, *args, **kwargs):
    """(result, None) or (None, error) for a clean ValueError / TypeError; anything else
    propagates and fails the property."""
    try:
        with guarded(SECONDS):
            return fn(*args, **kwargs), None
    except (ValueError, TypeError) as err:
        assert str(err).strip(), f"{type(err).__name__} with an empty message"
        return None, err


# --------------------------------------------------------------------------- comparisons
def same(a, b) -> bool:
    """JSON equality with exact kinds: bool is not a number, a string is not a list;
    int 2 and float 2.0 are the same number; NaN equals NaN."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (a != a and b != b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def model_state(model: GPT) -> dict:
    """Everything a failed load must leave as it was."""
    return {
        "params": {n: np.array(v, copy=True) for n, v in model.params.items()},
        "adapters": {n: (a.config, a.modules) for n, a in model.adapters.items()},
        "active": model.active_adapters,
        "merged": model.merged_adapters,
        "frozen": set(model.frozen),
    }


def assert_unchanged(model: GPT, before: dict) -> None:
    after = model_state(model)
    assert after["params"].keys() == before["params"].keys(), "parameters added or removed"
    for name, value in before["params"].items():
        assert same_array(after["params"][name], value), f"{name} changed by a failed load"
    for key in ("adapters", "active", "merged", "frozen"):
        assert after[key] == before[key], f"model {key} changed by a failed load"


# --------------------------------------------------------------------------- strategies
HUGE_INT = 10**400  # json writes it, json reads it back as an int; float() overflows
LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=10)
    | st.sampled_from([HUGE_INT, -HUGE_INT, 2**63, 2**64])
)
JSON = st.recursive(
    LEAVES,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
STANDARD_JSON = st.recursive(  # RFC 8259: no NaN or Infinity
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
WRONG_VALUES = [
    True,
    False,
    None,
    0,
    -1,
    -5,
    1,
    2.5,
    8.0,
    "8",
    "",
    "qv",
    "yes",
    "pissa",
    [],
    [8],
    ["q"],
    ["q", "q"],
    {},
    {"r": 8},
    math.nan,
    math.inf,
    -math.inf,
    1e300,
    10**6,
    2**63,
    HUGE_INT,
]
WRONG = st.one_of(st.sampled_from(WRONG_VALUES), JSON)
DEPTHS = st.integers(min_value=10, max_value=200_000)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _paths(obj, prefix=()):
    out = []
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.append((*prefix, key))
            out += _paths(value, (*prefix, key))
    return out


@st.composite
def one_field_wrong(draw, valid: dict):
    """A deep copy of ``valid`` with one field set to a wrong value, deleted, or a
    sibling key added (at any depth of nested objects)."""
    obj = copy.deepcopy(valid)
    path = draw(st.sampled_from(_paths(obj)))
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    how = draw(st.sampled_from(("value", "value", "delete", "add")))
    if how == "delete":
        del parent[path[-1]]
    elif how == "add":
        parent[f"unexpected_{path[-1]}"] = draw(WRONG)
    else:
        parent[path[-1]] = draw(WRONG)
    return obj


def dumps(obj) -> bytes:
    return json.dumps(obj, indent=2).encode()


class Blob(bytes):
    """File contents made from a valid file, shown in falsifying examples as what was done."""

    def __new__(cls, data: bytes, note: str) -> Blob:
        blob = super().__new__(cls, data)
        blob.note = note
        return blob

    def __repr__(self) -> str:
        return f"<{self.note}; {len(self)} bytes>"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


@st.composite
def mutated_bytes(draw, valid: bytes):
    """Flip, drop, insert or truncate bytes of a valid file, or lie in its length field."""
    data = bytearray(valid)
    how = draw(st.sampled_from(("flip", "truncate", "insert", "delete", "length")))
    pos = draw(st.integers(min_value=0, max_value=len(data) - 1))
    if how == "flip":
        bits = draw(st.integers(min_value=1, max_value=255))
        data[pos] ^= bits
        note = f"byte {pos} xor {bits}"
    elif how == "truncate":
        del data[pos:]
        note = f"truncated at {pos}"
    elif how == "insert":
        extra = draw(st.binary(min_size=1, max_size=16))
        data[pos:pos] = extra
        note = f"{extra!r} inserted at {pos}"
    elif how == "delete":
        n = draw(st.integers(min_value=1, max_value=16))
        del data[pos : pos + n]
        note = f"{n} bytes deleted at {pos}"
    else:
        length = draw(st.sampled_from([0, 1, 7, 2**31, 2**63, 2**64 - 1]) | st.integers(0, 4096))
        data[:8] = struct.pack("<Q", length)
        note = f"header length field {length}"
    return Blob(bytes(data), f"valid file, {note}")


@st.composite
def tensors_with_one_value(draw, valid: dict[str, np.ndarray]):
    """A safetensors file of the tensors with one value set to NaN, inf or a size float32
    cannot hold (the tensor then stored as float64), or one tensor's shape or dtype
    changed, or one dropped or added."""
    tensors = {k: v.copy() for k, v in valid.items()}
    name = draw(st.sampled_from(sorted(tensors)))
    how = draw(st.sampled_from(("value", "value", "shape", "dtype", "drop", "add")))
    if how == "value":
        value = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e300, -1e300, 1e38]))
        array = tensors[name].astype(np.float64)
        index = draw(st.integers(0, array.size - 1))
        array.flat[index] = value
        tensors[name] = array
        note = f"{name} as float64 with value {index} = {value!r}"
    elif how == "shape":
        tensors[name] = tensors[name].reshape(-1)[: max(tensors[name].size - 1, 0)]
        note = f"{name} reshaped to {tensors[name].shape}"
    elif how == "dtype":
        dtype = draw(st.sampled_from(["float16", "float64", "int32", "int64", "uint8", "bool"]))
        tensors[name] = tensors[name].astype(dtype)
        note = f"{name} as {dtype}"
    elif how == "drop":
        del tensors[name]
        note = f"{name} dropped"
    else:
        tensors[name + "_extra"] = np.zeros(3, np.float32)
        note = f"{name}_extra added"
    return Blob(serialize_safetensors(tensors), f"valid tensors, {note}")


# --------------------------------------------------------------------------- fixtures
class Files(dict):
    """A fixture's files, shown as one short line in Hypothesis's falsifying examples."""

    def __repr__(self) -> str:
        return f"<{self['what']}>"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


def lora_model(seed: int = 0) -> GPT:
    model = GPT(TINY, seed=0)
    add_adapter(model, LORA, seed=seed)
    return model


@pytest.fixture(scope="module")
def base_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("base")
    save_model(GPT(TINY, seed=0), root, extra={"tokenizer": TOKENIZER.to_dict()})
    config = (root / "config.json").read_bytes()
    weights = (root / "model.safetensors").read_bytes()
    return Files(
        what="a valid tiny base",
        config=config,
        weights=weights,
        meta=json.loads(config),
        tensors=load_safetensors(root / "model.safetensors")[0],
    )


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapter")
    model = lora_model()
    rng = np.random.default_rng(0)
    for name in model.params:
        if ".lora_B." in name:
            model.params[name][...] = rng.normal(0.0, 0.1, model.params[name].shape)
    save_adapter(model, root)
    config = (root / "adapter_config.json").read_bytes()
    weights = (root / "adapter_model.safetensors").read_bytes()
    return Files(
        what="a valid adapter for the tiny base",
        config=config,
        weights=weights,
        meta=json.loads(config),
        tensors=load_safetensors(root / "adapter_model.safetensors")[0],
    )


TRAIN = TrainConfig(steps=2, batch_size=2, block_size=23, eval_size=4, warmup=0, checkpoint_every=1)
TASK = ShiftTask(tokenizer=TOKENIZER)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory) -> dict:
    """A finished 2-step LoRA run's checkpoint, and a different one to use as a decoy."""
    root = tmp_path_factory.mktemp("run")
    Trainer(lora_model(), TASK, TRAIN, root / "out", progress=False).run()
    latest = json.loads((root / "out" / "latest.json").read_text())
    folder = root / "out" / latest["checkpoint"]
    state = load_safetensors(folder / "state.safetensors")[0]
    decoy = {k: (v + 1.0 if k.startswith("param.") else v) for k, v in state.items()}
    return Files(
        what="a finished 2-step run's checkpoint",
        latest=latest,
        name=latest["checkpoint"],
        trainer=json.loads((folder / "trainer.json").read_text()),
        state=serialize_safetensors(state),
        decoy=serialize_safetensors(decoy),
        tensors=state,
    )


# --------------------------------------------------------------------------- io.load_json
@FUZZ
@given(data=st.binary(max_size=300) | JSON.map(dumps))
def test_load_json_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.json"
        path.write_bytes(data)
        value, err = attempt(load_json, path)
        if err is None:
            assert same(value, json.loads(data.decode("utf-8-sig")))


@FEW
@given(depth=DEPTHS, closed=st.booleans())
@example(depth=100_000, closed=False)
def test_load_json_deeply_nested(depth, closed):
    """Nesting deeper than Python's recursion limit is a file to refuse, not a crash."""
    text = nested(depth) if closed else "[" * depth
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.json"
        path.write_text(text)
        value, err = attempt(load_json, path)
        if err is None:  # then it is ``depth`` lists, each inside the next (checked in a loop)
            assert closed, "unbalanced brackets were accepted"
            for _ in range(depth - 1):
                assert isinstance(value, list) and len(value) == 1
                value = value[0]
            assert value == []


@FUZZ
@given(value=STANDARD_JSON)
def test_load_json_reads_back_what_json_wrote(value):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.json"
        path.write_bytes(dumps(value))
        loaded, err = attempt(load_json, path)
        assert err is None, f"valid JSON refused: {err}"
        assert same(loaded, value)


# --------------------------------------------------------------------------- io.load_safetensors
def _check_tensors(path: Path, tensors: dict, metadata: dict) -> None:
    """A successful load: arrays of the supported dtypes, metadata str -> str, and the
    same tensors after writing them again and reading them back."""
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    for name, array in tensors.items():
        assert isinstance(name, str) and name
        assert isinstance(array, np.ndarray) and array.flags.writeable
    path.write_bytes(serialize_safetensors(tensors, metadata))
    again, meta2 = load_safetensors(path)
    assert meta2 == metadata and again.keys() == tensors.keys()
    for name in tensors:
        assert same_array(again[name], tensors[name])


@st.composite
def safetensors_headers(draw):
    """A header of plausible entries with random fields (and sometimes noise), its
    length field (true or not), and a data section."""
    entry = st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F64", "F16", "I32", "I64", "U8", "BOOL", "BF16"])
            | WRONG,
            "shape": st.lists(st.integers(-2, 2**40), max_size=3) | WRONG,
            "data_offsets": st.lists(st.integers(-2, 2**40), min_size=2, max_size=2) | WRONG,
        }
    )
    header = draw(
        st.dictionaries(st.text(max_size=6), entry | WRONG, max_size=3)
        | JSON
        | st.fixed_dictionaries({"__metadata__": WRONG})
    )
    raw = json.dumps(header).encode()
    data = draw(st.binary(max_size=64))
    length = draw(st.just(len(raw)) | st.integers(0, len(raw) + 80))
    return struct.pack("<Q", length) + raw + data


@FEW
@given(depth=DEPTHS)
@example(depth=100_000)
def test_load_safetensors_deeply_nested_header(depth):
    raw = nested(depth).encode()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw)
        result, err = attempt(load_safetensors, path)
        assert err is not None, "a header that is a list was accepted"


@FUZZ
@given(data=st.binary(max_size=200) | safetensors_headers())
def test_load_safetensors_noise_and_random_headers(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(data)
        result, err = attempt(load_safetensors, path)
        if err is None:
            _check_tensors(Path(tmp) / "again.safetensors", *result)


@FUZZ
@given(st.data())
def test_load_safetensors_mutated_valid_file(adapter_files, data):
    raw = data.draw(mutated_bytes(adapter_files["weights"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        path.write_bytes(raw)
        result, err = attempt(load_safetensors, path)
        if err is None:
            _check_tensors(Path(tmp) / "again.safetensors", *result)


# --------------------------------------------------------------------------- configs
def _check_config(cls, given_dict, config) -> None:
    """A config accepted from a dict says exactly what the dict said, and round-trips."""
    assert isinstance(config, cls)
    out = config.to_dict()
    for key, value in given_dict.items():
        assert key in out, f"unknown key {key!r} accepted"
        assert same(out[key], value), f"{key}={value!r} was read as {out[key]!r}"
    assert cls.from_dict(json.loads(json.dumps(out))) == config


GPT_VALID = TINY.to_dict()
LORA_VALID = LORA.to_dict()
RANDOM_DICTS = {
    cls: st.dictionaries(st.sampled_from(sorted(valid)) | st.text(max_size=6), WRONG, max_size=8)
    for cls, valid in ((GPTConfig, GPT_VALID), (LoraConfig, LORA_VALID))
}


@FUZZ
@given(d=JSON | RANDOM_DICTS[GPTConfig] | one_field_wrong(GPT_VALID))
@example(d={**GPT_VALID, "dropout": HUGE_INT})
@example(d={**GPT_VALID, "n_layer": True})
def test_gptconfig_from_dict(d):
    config, err = attempt(GPTConfig.from_dict, d)
    if err is None:
        _check_config(GPTConfig, d, config)


@FUZZ
@given(d=JSON | RANDOM_DICTS[LoraConfig] | one_field_wrong(LORA_VALID))
@example(d={**LORA_VALID, "alpha": HUGE_INT})
@example(d={**LORA_VALID, "use_rslora": "yes"})
@example(d={**LORA_VALID, "target_modules": "qv"})
@example(d={**LORA_VALID, "target_modules": "q"})
def test_loraconfig_from_dict(d):
    config, err = attempt(LoraConfig.from_dict, d)
    if err is None:
        _check_config(LoraConfig, d, config)


@FUZZ
@given(
    d=st.fixed_dictionaries(
        {
            "r": st.integers(1, 64),
            "alpha": st.floats(1e-3, 1e6),
            "dropout": st.floats(0.0, 0.99),
            "target_modules": st.lists(
                st.sampled_from(TARGET_MODULES), min_size=1, max_size=6, unique=True
            ),
            "init": st.sampled_from(INITS),
            "use_rslora": st.booleans(),
            "layers": st.none() | st.lists(st.integers(0, 11), min_size=1, max_size=4, unique=True),
        }
    )
)
def test_valid_loraconfig_round_trips(d):
    config, err = attempt(LoraConfig.from_dict, json.loads(json.dumps(d)))
    assert err is None, f"a valid LoRA config was refused: {err}"
    _check_config(LoraConfig, d, config)


# --------------------------------------------------------------------- checkpoints.load_model
def _write_model(folder: Path, config: bytes | None, weights: bytes | None) -> None:
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_bytes(config)
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)


def _check_model(folder: Path, result) -> None:
    model, meta = result
    file_meta = json.loads((folder / "config.json").read_text())
    assert same(meta, file_meta)
    _check_config(GPTConfig, file_meta["gpt_config"], model.config)
    tensors, _ = load_safetensors(folder / "model.safetensors")
    assert set(tensors) == set(model.base_names())
    for name, value in tensors.items():
        param = np.asarray(model.params[name])
        assert np.isfinite(param).all(), f"{name}: a non-finite weight was loaded"
        assert np.isfinite(value).all(), f"{name}: the file's non-finite weights were accepted"
        assert same_array(param, value.astype(model.dtype)), f"{name} is not the file's"


@FEW
@given(st.data())
def test_load_model_random_config(base_files, data):
    meta = base_files["meta"]
    config = data.draw(
        JSON.map(dumps)
        | one_field_wrong(meta).map(dumps)
        | st.fixed_dictionaries({"gpt_config": JSON}).map(dumps)
        | st.binary(max_size=64)
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "base"
        _write_model(folder, config, base_files["weights"])
        result, err = attempt(load_model, folder)
        if err is None:
            _check_model(folder, result)


@FEW
@given(st.data())
def test_load_model_huge_or_mismatched_sizes(base_files, data):
    """One size in config.json changed: the file's tensors say otherwise, so the load must
    be refused before the model is built at the claimed size."""
    meta = copy.deepcopy(base_files["meta"])
    key = data.draw(st.sampled_from(["n_layer", "d_model", "vocab_size", "block_size", "n_head"]))
    value = data.draw(st.sampled_from([2, 4, 64, 100_000, 10**9, 2**62]))
    meta["gpt_config"][key] = value
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "base"
        _write_model(folder, dumps(meta), base_files["weights"])
        result, err = attempt(load_model, folder)
        if err is None:
            _check_model(folder, result)


@FEW
@given(st.data())
def test_load_model_random_weights(base_files, data):
    weights = data.draw(
        st.binary(max_size=200)
        | mutated_bytes(base_files["weights"])
        | tensors_with_one_value(base_files["tensors"])
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "base"
        _write_model(folder, base_files["config"], weights)
        result, err = attempt(load_model, folder)
        if err is None:
            _check_model(folder, result)


# ------------------------------------------------------------------- checkpoints.load_adapter
REQUIRED_LORA_FIELDS = ("r", "alpha", "target_modules", "use_rslora", "init")


def _load_adapter_into_fresh_model(config: bytes, weights: bytes, files: dict) -> None:
    model = GPT(TINY, seed=0)
    before = model_state(model)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "adapter"
        folder.mkdir()
        (folder / "adapter_config.json").write_bytes(config)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        name, err = attempt(load_adapter, model, folder)
        if err is not None:
            assert_unchanged(model, before)
            return
        # Loaded: the config is the file's, every field typed and present; A and B are
        # the file's and finite; the base weights are untouched (the adapter was trained
        # with init "gaussian": nothing may rewrite W).
        meta = json.loads(config)
        given_config = meta["lora_config"]
        missing = [k for k in REQUIRED_LORA_FIELDS if k not in given_config]
        assert not missing, f"an adapter config without {missing} was accepted"
        adapter = model.adapters[name]
        _check_config(LoraConfig, given_config, adapter.config)
        tensors, _ = load_safetensors(folder / "adapter_model.safetensors")
        for module in adapter.modules:
            for x in "AB":
                param = np.asarray(model.params[f"{module}.lora_{x}.{name}"])
                assert np.isfinite(param).all(), f"{module}.lora_{x}: non-finite values loaded"
                assert same_array(param, tensors[f"{module}.lora_{x}"].astype(model.dtype))
        for pname, value in before["params"].items():
            assert same_array(np.asarray(model.params[pname]), value), f"{pname} was rewritten"


@FUZZ
@given(st.data())
def test_load_adapter_random_config(adapter_files, data):
    meta = adapter_files["meta"]
    config = data.draw(
        one_field_wrong(meta).map(dumps)
        | JSON.map(dumps)
        | st.fixed_dictionaries(
            {k: st.just(v) for k, v in meta.items() if k != "lora_config"}
            | {"lora_config": RANDOM_DICTS[LoraConfig]}
        ).map(dumps)
        | st.binary(max_size=64)
    )
    _load_adapter_into_fresh_model(config, adapter_files["weights"], adapter_files)


@FUZZ
@given(st.data())
def test_load_adapter_random_weights(adapter_files, data):
    weights = data.draw(
        tensors_with_one_value(adapter_files["tensors"])
        | mutated_bytes(adapter_files["weights"])
        | st.binary(max_size=200)
    )
    _load_adapter_into_fresh_model(adapter_files["config"], weights, adapter_files)


# -------------------------------------------------------------------- Trainer.load_checkpoint
_CKPT = re.compile(r"ckpt-\d{6}")
POINTER_NAMES = [
    "<ckpt>",
    "./<ckpt>",
    "../victim",
    "<victim>",
    "mine",
    "ckpt-000009",  # a link to the victim
    "ckpt-000001",  # not there
    "<ckpt>/../../victim",
    ".",
    "",
    "/",
    None,
    2,
    True,
    [],
    {},
]


def _run_folder(root: Path, files: dict, latest: bytes, trainer: bytes, state: bytes) -> Path:
    """root/out holds the checkpoint (with the given files); root/victim, out/mine and
    the link out/ckpt-000009 -> victim hold a valid but different checkpoint."""
    out = root / "out"
    ckpt = out / files["name"]
    ckpt.mkdir(parents=True)
    (ckpt / "trainer.json").write_bytes(trainer)
    (ckpt / "state.safetensors").write_bytes(state)
    for decoy in (root / "victim", out / "mine"):
        decoy.mkdir()
        (decoy / "trainer.json").write_bytes(dumps(files["trainer"]))
        (decoy / "state.safetensors").write_bytes(files["decoy"])
    os.symlink(root / "victim", out / "ckpt-000009", target_is_directory=True)
    text = latest.decode("utf-8", "replace")
    text = text.replace("<victim>", str(root / "victim")).replace("<ckpt>", files["name"])
    (out / "latest.json").write_text(text)
    return out


def _hashes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _resume(files: dict, latest: bytes, trainer: bytes, state: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        out = _run_folder(root, files, latest, trainer, state)
        victim = _hashes(root / "victim")
        model = lora_model()
        before = model_state(model)
        trainer_ = Trainer(model, TASK, TRAIN, out, progress=False)
        step, err = attempt(trainer_.load_checkpoint)
        assert _hashes(root / "victim") == victim, "a checkpoint outside the run was changed"
        if err is not None:
            assert_unchanged(model, before)
            assert trainer_.step == 0 and trainer_.opt.t == 0 and not trainer_.opt.state
            return
        # Loaded: from a real ckpt-NNNNNN folder directly inside out, with an exact
        # non-negative integer step that matches the optimizer's, and its parameters.
        pointer = json.loads((out / "latest.json").read_text())
        assert isinstance(pointer, dict) and isinstance(pointer.get("checkpoint"), str)
        folder = out / pointer["checkpoint"]
        assert not folder.is_symlink(), f"followed the link {pointer['checkpoint']!r}"
        assert folder.resolve().parent == out.resolve(), f"loaded {pointer['checkpoint']!r}"
        assert _CKPT.fullmatch(folder.resolve().name), f"loaded {pointer['checkpoint']!r}"
        meta = json.loads((folder / "trainer.json").read_text())
        for key in ("step", "opt_t"):
            value = meta.get(key)
            assert type(value) is int and value >= 0, f"trainer.json {key}={value!r} accepted"
        assert type(trainer_.step) is int and trainer_.step == meta["step"] == step
        assert trainer_.opt.t == meta["opt_t"] == trainer_.step, (
            f"step {trainer_.step} but optimizer step {trainer_.opt.t}: not an exact resume"
        )
        tensors, _ = load_safetensors(folder / "state.safetensors")
        for key, value in tensors.items():
            if key.startswith("param."):
                param = np.asarray(model.params[key[len("param.") :]])
                assert np.isfinite(param).all(), f"{key}: non-finite values loaded"
                assert same_array(param, value.astype(model.dtype)), f"{key} is not the file's"
        for name, slots in trainer_.opt.state.items():
            for slot, value in slots.items():
                finite = np.isfinite(np.asarray(value)).all()
                assert finite, f"optimizer state {name}.{slot}: non-finite values loaded"


@FUZZ
@given(st.data())
def test_load_checkpoint_random_latest_json(run_files, data):
    latest = data.draw(
        st.fixed_dictionaries(
            {"checkpoint": st.sampled_from(POINTER_NAMES) | st.text(max_size=12), "step": WRONG}
        ).map(dumps)
        | st.sampled_from(POINTER_NAMES).map(lambda n: dumps({"checkpoint": n, "step": 2}))
        | one_field_wrong(run_files["latest"]).map(dumps)
        | JSON.map(dumps)
        | st.binary(max_size=40)
    )
    _resume(run_files, latest, dumps(run_files["trainer"]), run_files["state"])


@FUZZ
@given(st.data())
def test_load_checkpoint_random_trainer_json(run_files, data):
    trainer = data.draw(
        one_field_wrong(run_files["trainer"]).map(dumps) | JSON.map(dumps) | st.binary(max_size=40)
    )
    _resume(run_files, dumps(run_files["latest"]), trainer, run_files["state"])


@FEW
@given(st.data())
def test_load_checkpoint_random_state(run_files, data):
    state = data.draw(
        tensors_with_one_value(run_files["tensors"])
        | mutated_bytes(run_files["state"])
        | st.binary(max_size=100)
    )
    _resume(run_files, dumps(run_files["latest"]), dumps(run_files["trainer"]), state)


@FUZZ
@given(st.data())
def test_load_checkpoint_non_finite_state(run_files, data):
    """One value of one saved tensor (a parameter or an optimizer moment) is NaN, inf, or
    too large for float32: resuming from it would train on garbage."""
    tensors = {k: v.copy() for k, v in run_files["tensors"].items()}
    name = data.draw(st.sampled_from(sorted(tensors)), label="tensor")
    value = data.draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e300]), label="value")
    array = tensors[name].astype(np.float64)
    array.flat[data.draw(st.integers(0, array.size - 1), label="index")] = value
    tensors[name] = array
    state = Blob(serialize_safetensors(tensors), f"{name} with {value!r}")
    _resume(run_files, dumps(run_files["latest"]), dumps(run_files["trainer"]), state)
