"""Hugging Face GPT-2 checkpoints in and out: the same network, another file layout.

minilora's GPT already is GPT-2: pre-LayerNorm blocks, learned positions, the tanh
GELU (``gelu_new``), biases everywhere, the head tied to wte. What differs is how the
weights are stored. A folder written by ``GPT2LMHeadModel.save_pretrained`` holds::

    config.json          n_embd, n_layer, n_head, n_positions, vocab_size, ...
    model.safetensors    transformer.h.{i}.attn.c_attn.weight   (d, 3d)  q | k | v
                         transformer.h.{i}.attn.c_proj.weight   (d, d)
                         transformer.h.{i}.mlp.c_fc.weight      (d, 4d)
                         transformer.h.{i}.mlp.c_proj.weight    (4d, d)
                         ... their biases, ln_1, ln_2, wte, wpe, ln_f

(the original checkpoint on the hub has the same names without ``transformer.``).
GPT-2's linears are ``Conv1D``: y = x W + b with W (d_in, d_out), the transpose of
minilora's (d_out, d_in) for y = x W^T + b. So every matrix is transposed, and the
fused attention projection is cut into its three column blocks first::

    W_c_attn (d, 3d) = [ W_q | W_k | W_v ]   ->   q.weight = W_q^T (d, d), ...
    b_c_attn (3d,)   = [ b_q | b_k | b_v ]   ->   q.bias = b_q, ...

Writing goes the other way (:func:`save_gpt2`): the adapters' updates merged into a
copy of the weights, q, k and v fused again, every matrix transposed back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from minilora.basics.backend import finite_as, require_memory, resolve_dtype, to_host
from minilora.basics.checks import positive_int, positive_real
from minilora.core.adapters import adapted_weight
from minilora.core.model import GPT, GPTConfig, parameter_shapes, require_gpt
from minilora.files.io import (
    atomic_write_bytes,
    load_json,
    load_safetensors,
    save_json,
    save_safetensors,
)

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
PREFIX = "transformer."
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")  # both are 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
BUFFERS = ("attn.bias", "attn.masked_bias")  # causal-mask buffers of old checkpoints: not weights
# config.json features minilora's GPT does not have: key -> (the only value allowed, why)
UNSUPPORTED = {
    "scale_attn_weights": (True, "minilora always divides attention scores by sqrt(head size)"),
    "scale_attn_by_inverse_layer_idx": (False, "minilora does not scale scores by layer"),
    "reorder_and_upcast_attn": (False, "minilora does not reorder or upcast attention"),
    "add_cross_attention": (False, "minilora's GPT is a decoder without cross-attention"),
    "tie_word_embeddings": (True, "minilora's head is always tied to wte"),
}


def not_a_gpt2(folder: Path, what: str) -> ValueError:
    return ValueError(f"{folder} is not a GPT-2 checkpoint: {what}")


def _model_type(folder: str | os.PathLike) -> Any:
    try:
        meta = load_json(Path(folder) / HF_CONFIG)
    except ValueError:
        return None
    return meta.get("model_type") if isinstance(meta, dict) else None


def is_hf_folder(folder: str | os.PathLike) -> bool:
    """True if ``folder`` has a Hugging Face config.json (one with a ``model_type``)."""
    return _model_type(folder) is not None


def is_gpt2_folder(folder: str | os.PathLike) -> bool:
    """True if ``folder`` has a config.json that says ``"model_type": "gpt2"``."""
    return _model_type(folder) == "gpt2"


def gpt2_config(meta: Any, path: Path) -> GPTConfig:
    """The GPTConfig of a GPT-2 config.json, refusing every feature minilora lacks.

    GPT-2's dropouts are not carried over (dropout 0): minilora has no attention
    dropout, and LoRA fine-tuning runs the frozen base without dropout anyway.
    """
    if not isinstance(meta, dict):
        raise not_a_gpt2(path.parent, f"{path.name} is not a JSON object")
    if meta.get("model_type") != "gpt2":
        raise not_a_gpt2(
            path.parent, f"{path.name} has model_type={meta.get('model_type')!r}; allowed: 'gpt2'"
        )
    missing = [
        k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head") if k not in meta
    ]
    if missing:
        raise not_a_gpt2(path.parent, f"{path.name} lacks {', '.join(missing)}")
    act = meta.get("activation_function", "gelu_new")
    if act not in TANH_GELUS:
        raise ValueError(
            f"{path}: activation_function={act!r} is not supported; allowed: "
            f"{', '.join(TANH_GELUS)} (the tanh GELU, the only one minilora has)"
        )
    for key, (allowed, why) in UNSUPPORTED.items():
        if key in meta and meta[key] != allowed:
            raise ValueError(
                f"{path}: {key}={meta[key]!r} is not supported ({why}); allowed: {allowed}"
            )
    try:
        d_model = positive_int(f"{path.name} n_embd", meta["n_embd"])
        n_inner = meta.get("n_inner")
        if n_inner is not None and positive_int(f"{path.name} n_inner", n_inner) != 4 * d_model:
            raise ValueError(
                f"{path.name} n_inner={n_inner} is not supported; allowed: null or {4 * d_model}"
            )
        eps = positive_real(f"{path.name} layer_norm_epsilon", meta.get("layer_norm_epsilon", 1e-5))
        return GPTConfig(
            vocab_size=meta["vocab_size"],
            block_size=meta["n_positions"],
            n_layer=meta["n_layer"],
            n_head=meta["n_head"],
            d_model=d_model,
            dropout=0.0,
            layer_norm_eps=eps,
        )
    except (TypeError, ValueError) as err:
        raise type(err)(f"{path.parent}: {err}") from None


def hf_config(config: GPTConfig, dtype: np.dtype) -> dict:
    """The config.json of ``config`` that ``GPT2Config`` reads (the inverse of gpt2_config)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.d_model,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": config.layer_norm_eps,
        "resid_pdrop": config.dropout,
        "embd_pdrop": config.dropout,
        "attn_pdrop": 0.0,  # minilora has no attention dropout
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "bos_token_id": None,  # GPT2Config's default 50256 is outside a small vocabulary
        "eos_token_id": None,
        "dtype": np.dtype(dtype).name,
    }


# ----------------------------------------------------------------------- the map
def _blocks(config: GPTConfig) -> range:
    return range(config.n_layer)


def gpt2_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a GPT-2 file (unprefixed names) and its shape."""
    C, V = config.d_model, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (V, C),
        "wpe.weight": (config.block_size, C),
    }
    for i in _blocks(config):
        h = f"h.{i}"
        for ln in ("ln_1", "ln_2"):
            shapes[f"{h}.{ln}.weight"] = shapes[f"{h}.{ln}.bias"] = (C,)
        shapes[f"{h}.attn.c_attn.weight"], shapes[f"{h}.attn.c_attn.bias"] = (C, 3 * C), (3 * C,)
        shapes[f"{h}.attn.c_proj.weight"], shapes[f"{h}.attn.c_proj.bias"] = (C, C), (C,)
        shapes[f"{h}.mlp.c_fc.weight"], shapes[f"{h}.mlp.c_fc.bias"] = (C, 4 * C), (4 * C,)
        shapes[f"{h}.mlp.c_proj.weight"], shapes[f"{h}.mlp.c_proj.bias"] = (4 * C, C), (C,)
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (C,)
    return shapes


CONV1D = {"attn.c_proj": "attn.o", "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
"""GPT-2's unfused Conv1D layers -> minilora's linears (c_attn is q, k and v fused)."""


def from_gpt2(tensors: dict[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """GPT-2's tensors (unprefixed, checked) -> minilora's parameters: split, transposed."""
    C = config.d_model
    out = {}
    for name in parameter_shapes(config):
        if ".attn.q." in name or ".attn.k." in name or ".attn.v." in name:
            block, _, t, kind = name.rsplit(".", 3)
            j = "qkv".index(t)
            fused = tensors[f"{block}.attn.c_attn.{kind}"]
            part = fused[..., j * C : (j + 1) * C]  # the column block of q, k or v
            out[name] = np.ascontiguousarray(part.T if kind == "weight" else part)
            continue
        source = name
        for gpt2_name, ours in CONV1D.items():
            source = source.replace(f".{ours}.", f".{gpt2_name}.")
        value = tensors[source]
        out[name] = np.ascontiguousarray(value.T if value.ndim == 2 and source != name else value)
    return out


def to_gpt2(params: dict[str, np.ndarray], config: GPTConfig) -> dict[str, np.ndarray]:
    """minilora's parameters (host) -> GPT-2's tensors (unprefixed): fused, transposed."""
    out = {}
    for name in gpt2_shapes(config):
        block, _, rest = name.partition(".attn.c_attn.")
        if rest:  # rest is "weight" or "bias"
            parts = [params[f"{block}.attn.{t}.{rest}"] for t in "qkv"]
            out[name] = np.ascontiguousarray(
                np.concatenate([p.T for p in parts], axis=1)
                if rest == "weight"
                else np.concatenate(parts)
            )
            continue
        source = name
        for gpt2_name, ours in CONV1D.items():
            source = source.replace(f".{gpt2_name}.", f".{ours}.")
        value = params[source]
        out[name] = np.ascontiguousarray(value.T if source != name and value.ndim == 2 else value)
    return out


# ------------------------------------------------------------------------ reading
def _unprefixed(tensors: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """The tensors without ``transformer.``; all keys must agree on the prefix."""
    body = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    prefixed = [k.startswith(PREFIX) for k in body]
    if any(prefixed) and not all(prefixed):
        odd = next(k for k in body if not k.startswith(PREFIX))
        raise ValueError(f"{path}: key {odd!r} lacks the {PREFIX!r} prefix the other keys have")
    out = {k.removeprefix(PREFIX): v for k, v in body.items()}
    if "lm_head.weight" in tensors:
        out["lm_head.weight"] = tensors["lm_head.weight"]
    return out


def check_gpt2_tensors(
    tensors: dict[str, np.ndarray], config: GPTConfig, path: Path, dtype: Any
) -> None:
    """Every key present, none extra, every shape right, every value finite as ``dtype``."""
    shapes = gpt2_shapes(config)
    buffers = {f"h.{i}.{b}" for i in _blocks(config) for b in BUFFERS}
    missing = sorted(set(shapes) - set(tensors))
    extra = sorted(set(tensors) - set(shapes) - buffers - {"lm_head.weight"})
    if missing or extra:
        raise ValueError(
            f"{path}: the tensors do not fit config.json ({config.n_layer} layers, "
            f"n_embd {config.d_model}): missing {missing[:4]}, unexpected {extra[:4]}"
        )
    for name, shape in shapes.items():
        value = tensors[name]
        if tuple(value.shape) != shape or not np.issubdtype(value.dtype, np.floating):
            raise ValueError(
                f"{path}: {name} has shape {tuple(value.shape)} and dtype {value.dtype}; "
                f"expected a float array of shape {shape}"
            )
        if not finite_as(value, dtype):
            raise ValueError(f"{path}: {name} contains NaN or inf (as {np.dtype(dtype).name})")
    head = tensors.get("lm_head.weight")
    if head is not None and not (
        head.shape == shapes["wte.weight"] and np.array_equal(head, tensors["wte.weight"])
    ):
        raise ValueError(
            f"{path}: lm_head.weight differs from wte.weight; minilora's head is tied to wte"
        )


def load_gpt2(folder: str | os.PathLike, dtype: Any = "float32", device: str | None = None) -> GPT:
    """A minilora GPT with the weights of the Hugging Face GPT-2 checkpoint in ``folder``.

    Reads config.json and model.safetensors; checks the config, every key, shape and
    value before the model is built, and the memory before the file is read.
    """
    dtype = resolve_dtype(dtype)
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"GPT-2 folder {str(folder)!r} does not exist or is not a folder")
    config_path, weights_path = folder / HF_CONFIG, folder / HF_WEIGHTS
    if not config_path.is_file():
        raise not_a_gpt2(folder, f"missing {HF_CONFIG}")
    config = gpt2_config(load_json(config_path), config_path)
    if not weights_path.is_file():
        found = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".json", ".safetensors")]
        raise not_a_gpt2(
            folder,
            f"missing {HF_WEIGHTS} (found {sorted(found)}; minilora reads "
            "only a single safetensors file, never pickled .bin files)",
        )
    n_params = sum(int(np.prod(s)) for s in parameter_shapes(config).values())
    # the file on the host, its transposed copies, then the model (whose init checks itself)
    require_memory(2 * weights_path.stat().st_size + n_params * dtype.itemsize, f"loading {folder}")
    tensors = _unprefixed(load_safetensors(weights_path)[0], weights_path)
    check_gpt2_tensors(tensors, config, weights_path, dtype)
    params = from_gpt2(tensors, config)
    del tensors
    model = GPT(config, dtype=dtype, device=device)
    model.load_state_dict(params)
    return model


# ------------------------------------------------------------------------ writing
def merged_base(model: GPT) -> dict[str, np.ndarray]:
    """Host copies of the base weights with every active, unmerged adapter applied as
    ``merge`` applies it (W + s B A; DoRA's and VeRA's own weights: adapters.adapted_weight):
    the weights a plain GPT-2 needs to compute what ``model`` computes. The model is
    not changed."""
    params = {name: to_host(model.params[name]).copy() for name in model.base_names()}
    for name in model.active_adapters:
        if name in model.merged_adapters:
            continue  # already inside W
        for module in model.adapters[name].modules:
            W = model.backend.asarray(params[f"{module}.weight"])  # on the model's device
            params[f"{module}.weight"] = to_host(adapted_weight(model, name, module, W))
    return params


def save_gpt2(model: GPT, directory: str | os.PathLike) -> dict:
    """Write ``model`` (active adapters merged into a copy) as a Hugging Face GPT-2 folder
    that ``GPT2LMHeadModel.from_pretrained`` loads: config.json + model.safetensors."""
    require_gpt(model)
    directory = Path(directory)
    tensors = {PREFIX + k: v for k, v in to_gpt2(merged_base(model), model.config).items()}
    weights, config = directory / HF_WEIGHTS, directory / HF_CONFIG
    save_safetensors(weights, tensors, metadata={"format": "pt"})  # what transformers expects
    save_json(config, hf_config(model.config, model.dtype))
    return {"config": str(config), "weights": str(weights), "bytes": weights.stat().st_size}


# ---------------------------------------------------------------------- tokenizer
TOKENIZER_FILES = ("tokenizer.json", "vocab.json + merges.txt")
END_OF_TEXT = "<|endoftext|>"


class GPT2Tokenizer:
    """GPT-2's byte-level BPE, read from a checkpoint folder by the ``tokenizers`` library
    (the optional ``gpt2`` extra): ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``.

    Nothing is downloaded, and BPE is not written here: the merges are the library's
    job. The interface is CharTokenizer's: ``encode``, ``decode``, ``vocab_size``.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        except ImportError:
            raise ValueError(
                f"{folder}: reading GPT-2's tokenizer needs the `tokenizers` library; "
                "pip install 'minilora[gpt2]'"
            ) from None
        self.folder = folder
        vocab, merges, whole = (
            folder / "vocab.json",
            folder / "merges.txt",
            folder / "tokenizer.json",
        )
        try:
            if whole.is_file():
                tokenizer = Tokenizer.from_file(str(whole))
            elif vocab.is_file() and merges.is_file():
                tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
                # GPT-2's own settings: bytes as printable characters, no space added
                tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
                tokenizer.decoder = decoders.ByteLevel()
                tokenizer.add_special_tokens([END_OF_TEXT])  # one id (50256), never split
            else:
                raise not_a_gpt2(folder, f"no tokenizer: missing {' or '.join(TOKENIZER_FILES)}")
        except Exception as err:  # the library's errors are its own types: one line, ours
            if isinstance(err, ValueError) and str(err).startswith(str(folder)):
                raise
            line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ValueError(f"{folder}: cannot read the GPT-2 tokenizer: {line}") from None
        self._tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """text -> 1-D int64 ids (GPT-2's: "Hello world" -> [15496, 995])."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Any) -> str:
        """1-D ids -> text. Ids outside [0, vocab_size) are an error."""
        arr = np.asarray(to_host(ids) if not isinstance(ids, (list, tuple)) else ids)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"ids must be a 1-D sequence of integers, got shape {arr.shape}")
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ValueError(
                f"id {int(bad[0])} is not in the vocabulary; allowed: 0 .. {self.vocab_size - 1}"
            )
        return self._tokenizer.decode(arr.tolist(), skip_special_tokens=False)

    @property
    def files(self) -> list[Path]:
        """The files it was read from."""
        names = ("tokenizer.json",) if (self.folder / "tokenizer.json").is_file() else ()
        return [self.folder / n for n in names or ("vocab.json", "merges.txt")]

    def to_dict(self) -> dict[str, str]:
        return {"type": "gpt2", "folder": str(self.folder)}

    def __repr__(self) -> str:
        return f"GPT2Tokenizer({str(self.folder)!r}, vocab_size={self.vocab_size})"


def load_gpt2_base(
    folder: str | os.PathLike, device: str | None = None, dtype: Any = "float32"
) -> tuple[GPT, GPT2Tokenizer]:
    """A GPT-2 folder's model and tokenizer (what ``load_base`` returns for such a folder)."""
    tokenizer = GPT2Tokenizer(folder)  # first: a folder without one fails before the weights
    model = load_gpt2(folder, dtype=dtype, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, the model's "
            f"vocabulary only {model.config.vocab_size}"
        )
    return model, tokenizer


def copy_tokenizer(tokenizer: GPT2Tokenizer, directory: str | os.PathLike) -> None:
    """Put the tokenizer's files next to a model written by save_gpt2 (atomically)."""
    for path in tokenizer.files:
        atomic_write_bytes(Path(directory) / path.name, path.read_bytes())
