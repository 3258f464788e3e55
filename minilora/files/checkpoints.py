"""Model checkpoints and adapter files: safetensors for arrays, JSON for the rest.

Adapters use PEFT's two file names::

    DIR/adapter_config.json          LoRA config, base fingerprint, minilora version
    DIR/adapter_model.safetensors    h.{i}.{attn|mlp}.{t}.lora_A / .lora_B, nothing else
                                     (DoRA: also .lora_magnitude_vector, PEFT's name)
                                     (VeRA: .vera_lambda_d / .vera_lambda_b instead, and
                                     the shared vera_A, vera_B once)

so an adapter is r (d_in + d_out) numbers per adapted matrix: kilobytes where the model
is megabytes. Everything read is validated before the model is touched, and every
file is written to a temporary name and renamed (see io.py). No pickle anywhere.

The built-in base (``BUILTIN_BASE``, shipped in the package) is loaded here too, with
its tokenizer: :func:`load_base`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from minilora.basics.backend import finite_as, to_host
from minilora.basics.checks import boolean, one_of
from minilora.basics.version import __version__
from minilora.core.adapters import (
    adapter_modules,
    apply_pissa_split,
    check_adapter_name,
    install_adapter,
    pissa_split,
    require_unmerged,
)
from minilora.core.lora import LoraConfig, adapter_names, lora_names, magnitude_name
from minilora.core.model import (
    GPT,
    GPTConfig,
    parameter_shapes,
    require_gpt,
    weights_fingerprint,
)
from minilora.core.tokenizer import CharTokenizer
from minilora.files.gpt2 import GPT2Tokenizer, is_hf_folder, load_gpt2_base, save_gpt2
from minilora.files.io import load_json, load_safetensors, save_json, save_safetensors
from minilora.files.peft import is_peft_config, load_peft_adapter, save_peft_adapter

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
BUILTIN_BASE = Path(__file__).parents[1] / "assets" / "base-small"
MAGNITUDE = "lora_magnitude_vector"  # DoRA's m in a file: PEFT's name for it
MODEL_FORMATS = ("minilora", "hf")
ADAPTER_FORMATS = ("minilora", "peft")
# VeRA's shared frozen matrices are saved with the adapter, as PEFT's default
# save_projection=True does: the file then loads whatever generator drew them.
VERA_SHARED = ("vera_A", "vera_B")
VERA_KINDS = ("vera_lambda_d", "vera_lambda_b")
PRETRAIN_COMMAND = "minilora pretrain --preset small --steps 3000 --seed 0 --out runs/base"


# The JSON files, field by field: name -> (allowed types, required). Exact types: JSON
# true is not a number, and a string is not a list.
ADAPTER_FIELDS = {
    "minilora_version": ((str,), False),
    "adapter_name": ((str,), False),
    "lora_config": ((dict,), True),
    "base_config": ((dict,), True),
    "base_fingerprint": ((str,), True),
    "residual_fingerprint": ((str, type(None)), False),
    "dtype": ((str,), False),
    "base_quantization": ((str, type(None)), False),
}
MODEL_FIELDS = {
    "minilora_version": ((str,), False),
    "gpt_config": ((dict,), True),
    "dtype": ((str,), False),
    "merged_adapters": ((list,), False),
    "extra": ((dict,), False),
}


def _read_fields(path: Path, fields: dict[str, tuple[tuple[type, ...], bool]]) -> dict:
    """Load a JSON object and check every field against ``fields`` before anything uses it."""
    meta = load_json(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: not a minilora file (a JSON object with {sorted(fields)})")
    unknown = sorted(set(meta) - set(fields))
    missing = sorted(k for k, (_, required) in fields.items() if required and k not in meta)
    if unknown or missing:
        raise ValueError(f"{path}: unknown fields {unknown}, missing fields {missing}")
    for key, value in meta.items():
        types = fields[key][0]
        if type(value) not in types:
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise ValueError(f"{path}: {key}={value!r}; allowed: {allowed}")
    return meta


# ------------------------------------------------------------------------ adapters
def save_adapter(
    model: GPT, directory: str | os.PathLike, name: str = "default", format: str = "minilora"
) -> dict:
    """Write adapter ``name``'s A and B and its config to ``directory``.

    ``format="peft"`` writes PEFT's own adapter for a GPT-2 instead (peft.py: q, k, v
    fused into c_attn), which ``PeftModel.from_pretrained`` loads on GPT2LMHeadModel.
    Returns {"config": path, "weights": path, "bytes": size of both files}.
    """
    require_gpt(model)
    if one_of("format", format, ADAPTER_FORMATS) == "peft":
        return save_peft_adapter(model, directory, name)
    if name not in model.adapters:
        raise ValueError(f"no adapter named {name!r}; adapters: {list(model.adapters)}")
    adapter = model.adapters[name]
    directory = Path(directory)
    tensors = {}
    if adapter.config.use_vera:
        tensors = dict(zip(VERA_SHARED, map(to_host, model.vera_projection(name)), strict=True))
        for module in adapter.modules:
            pnames = adapter_names(module, name, adapter.config)
            for kind, pname in zip(VERA_KINDS, pnames, strict=True):
                tensors[f"{module}.{kind}"] = to_host(model.params[pname])
    for module in () if adapter.config.use_vera else adapter.modules:
        A_name, B_name = lora_names(module, name)
        tensors[f"{module}.lora_A"] = to_host(model.params[A_name])
        tensors[f"{module}.lora_B"] = to_host(model.params[B_name])
        if adapter.config.use_dora:
            tensors[f"{module}.{MAGNITUDE}"] = to_host(model.params[magnitude_name(module, name)])
    weights = directory / ADAPTER_WEIGHTS
    config = directory / ADAPTER_CONFIG
    save_safetensors(weights, tensors, metadata={"format": "minilora-adapter"})
    save_json(
        config,
        {
            "minilora_version": __version__,
            "adapter_name": name,
            "lora_config": adapter.config.to_dict(),
            "base_config": model.config.to_dict(),
            "base_fingerprint": adapter.base_fingerprint,
            # PiSSA: the base as the split left it, so load_adapter can check its own split
            "residual_fingerprint": model.base_fingerprint() if adapter.pissa_init else None,
            "dtype": model.dtype.name,
            # QLoRA: the adapter learned on top of the NF4 base (load_adapter compares)
            "base_quantization": model.quantization,
        },
    )
    return {
        "config": str(config),
        "weights": str(weights),
        "bytes": weights.stat().st_size + config.stat().st_size,
    }


def load_adapter(
    model: GPT, directory: str | os.PathLike, name: str | None = None, activate: bool = True
) -> str:
    """Add the adapter saved in ``directory`` to ``model``; returns its name.

    A PEFT LoRA or DoRA adapter for GPT-2 (its config has ``peft_type``) is recognised and
    loaded by peft.load_peft_adapter, its fused c_attn split into q, k and v.

    Checks, before anything changes: both files exist and parse; the config is a
    valid LoraConfig for this architecture; the base weights have the fingerprint the
    adapter was trained on; every tensor is present, has the right shape, is finite.

    An adapter trained on an NF4-quantized base (QLoRA) loads onto the float base, and
    the other way round, with a warning: the base is the same pretrained one (the
    fingerprint is the float weights'), but the adapter learned its update against
    the other rounding of W. Loading onto the float base is how a QLoRA adapter is
    merged for deployment; the outputs differ from training's by the quantization error.
    """
    require_gpt(model)
    boolean("activate", activate)
    directory = _folder("adapter", directory)
    config_path = directory / ADAPTER_CONFIG
    if is_peft_config(load_json(config_path)):  # PEFT's own format (peft.py)
        return load_peft_adapter(model, directory, name, activate)
    meta = _read_fields(config_path, ADAPTER_FIELDS)
    try:  # the message names the file the bad value came from
        config = LoraConfig.from_dict(meta["lora_config"])
    except (TypeError, ValueError) as err:
        raise type(err)(f"{config_path}: {err}") from None
    try:  # through GPTConfig: a file written before a field existed gets its default
        base_config = GPTConfig.from_dict(meta["base_config"])
    except (TypeError, ValueError) as err:
        raise type(err)(f"{config_path}: {err}") from None
    if base_config != model.config:
        raise ValueError(
            f"{directory}: adapter is for a model with {meta['base_config']}, "
            f"this model has {model.config.to_dict()}"
        )
    require_unmerged(model, "load an adapter")
    fingerprint = model.base_fingerprint()
    if meta["base_fingerprint"] != fingerprint:
        raise ValueError(
            f"{directory}: adapter was trained on base weights with fingerprint "
            f"{meta['base_fingerprint']}, this model's base has {fingerprint}"
        )
    trained_on = meta.get("base_quantization")
    if trained_on != model.quantization:
        warnings.warn(
            f"{directory}: adapter was trained on a base stored as {trained_on or 'float'}, "
            f"this base is {model.quantization or 'float'}; outputs differ from training's "
            "by the quantization error (quantize_base(model, 'nf4') gives the same storage)",
            stacklevel=2,
        )
    name = check_adapter_name(name if name is not None else meta.get("adapter_name", "default"))
    if name in model.adapters:
        raise ValueError(f"adapter {name!r} exists already; pass another name=")
    try:
        modules = adapter_modules(model, config)
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from None
    tensors, _ = load_safetensors(directory / ADAPTER_WEIGHTS)
    kinds = ["lora_A", "lora_B"] + ([MAGNITUDE] if config.use_dora else [])
    kinds = list(VERA_KINDS) if config.use_vera else kinds
    expected = {f"{m}.{kind}" for m in modules for kind in kinds}
    expected |= set(VERA_SHARED) if config.use_vera else set()
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(
            f"{directory / ADAPTER_WEIGHTS}: tensors do not match the config's targets: "
            f"missing {missing[:4]}, unexpected {extra[:4]}"
        )
    factors = {}
    for module in modules:
        d_out, d_in = model.weight_shape(module)
        shapes = {"lora_A": (config.r, d_in), "lora_B": (d_out, config.r), MAGNITUDE: (d_out,)}
        shapes.update(vera_lambda_d=(config.r,), vera_lambda_b=(d_out,))
        arrays = tuple(tensors[f"{module}.{kind}"] for kind in kinds)
        for kind, array in zip(kinds, arrays, strict=True):
            _check_tensor(directory, f"{module}.{kind}", array, shapes[kind], model.dtype)
        if not config.use_vera:  # VeRA has no scale s; its vectors are checked finite
            _check_update_fits(config_path, config, module, arrays[0], arrays[1], model.dtype)
        factors[module] = arrays
    projection = None
    if config.use_vera:  # the shared matrices span the largest sides of the adapted linears
        sides = [model.weight_shape(m) for m in modules]
        d_out, d_in = (max(shape[k] for shape in sides) for k in (0, 1))
        projection = tensors["vera_A"], tensors["vera_B"]
        for kind, array, shape in zip(
            VERA_SHARED, projection, ((config.r, d_in), (d_out, config.r)), strict=True
        ):
            _check_tensor(directory, kind, array, shape, model.dtype)
    split = pissa_split(model, modules, config) if config.init == "pissa" else {}
    if split:  # the same SVD of the same W gives the same residual: check that it does
        after = {n: model.params[n] for n in model.base_names()}
        after.update({f"{m}.weight": W_residual for m, (_, _, W_residual) in split.items()})
        if meta.get("residual_fingerprint") != weights_fingerprint(after):
            raise ValueError(
                f"{directory / ADAPTER_CONFIG}: init is 'pissa', but splitting this base does "
                "not give the weights the adapter was saved with (edited config, or another base)"
            )
    # Everything checked: from here on the model changes.
    pissa_init, pissa_base = apply_pissa_split(model, split)
    install_adapter(
        model, name, config, factors, fingerprint, pissa_init, activate, pissa_base, projection
    )
    return name


def _check_tensor(
    directory: Path, what: str, array: np.ndarray, shape: tuple, dtype: np.dtype
) -> None:
    """An adapter file's tensor must be a finite float array of the expected shape."""
    if array.shape != shape or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"{directory}: {what} has shape {array.shape} and dtype "
            f"{array.dtype}; expected a float array of shape {shape}"
        )
    if not finite_as(array, dtype):
        raise ValueError(f"{directory}: {what} contains NaN or inf (as {np.dtype(dtype).name})")


def _folder(kind: str, directory: str | os.PathLike) -> Path:
    """``directory`` as a Path, refused unless it is a folder (a file is not one)."""
    directory = Path(directory)
    if not directory.exists():
        raise ValueError(f"{kind} directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise ValueError(f"{kind} directory {str(directory)!r} is not a folder")
    return directory


def _check_update_fits(
    path: Path, config: LoraConfig, module: str, A: np.ndarray, B: np.ndarray, dtype: np.dtype
) -> None:
    """The adapter's update must be representable: s = alpha/r (or alpha/sqrt(r)) and every
    entry of ΔW = s B A, at most s r max|A| max|B| in size, below the dtype's largest
    number (3.4e38 in float32). Otherwise merging or a forward overflows to inf and NaN."""
    largest = float(np.finfo(dtype).max)
    scale = config.scale
    bound = scale * config.r * float(np.abs(A).max()) * float(np.abs(B).max())
    if not (scale <= largest and bound <= largest):
        raise ValueError(
            f"{path}: alpha={config.alpha:g} with r={config.r} gives the scale "
            f"s={scale:.3g} and |ΔW| up to s r max|A| max|B| = {bound:.3g} on {module}; "
            f"allowed: both at most {largest:.3g}, the largest {np.dtype(dtype).name}"
        )


# -------------------------------------------------------------------------- models
def save_model(
    model: GPT,
    directory: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    format: str = "minilora",
) -> dict:
    """Write the base weights and the config to ``directory`` (adapters: save_adapter).

    With adapters merged, the weights written include their updates: that is how a
    fine-tuned model is exported as a plain GPT. ``extra`` is stored in config.json
    (e.g. the tokenizer and the command that made the model). ``format="hf"`` writes
    a Hugging Face GPT-2 folder instead, every active adapter merged into the copy
    written (gpt2.save_gpt2; ``extra`` has no place there).
    """
    require_gpt(model)
    if model.quantization:
        raise ValueError(
            f"the base is quantized ({model.quantization}) and its float weights are gone: "
            "save the float base before quantize_base (NF4 is a fixed function of it, so "
            "quantizing it again after loading gives the same 4-bit storage), and the "
            "adapter with save_adapter"
        )
    if one_of("format", format, MODEL_FORMATS) == "hf":
        if extra:
            raise ValueError(
                "extra= has no place in a Hugging Face folder; pass it with format='minilora'"
            )
        return save_gpt2(model, directory)
    directory = Path(directory)
    weights, config = directory / MODEL_WEIGHTS, directory / MODEL_CONFIG
    tensors = {name: to_host(model.params[name]) for name in model.base_names()}
    save_safetensors(weights, tensors, metadata={"format": "minilora-model"})
    meta = {
        "minilora_version": __version__,
        "gpt_config": model.config.to_dict(),
        "dtype": model.dtype.name,
        "merged_adapters": list(model.merged_adapters),
        "extra": extra or {},
    }
    save_json(config, meta)
    return {"config": str(config), "weights": str(weights), "bytes": weights.stat().st_size}


def load_model(
    directory: str | os.PathLike, device: str | None = None, dtype: str | None = None
) -> tuple[GPT, dict]:
    """Build a GPT from ``save_model`` output; returns (model, config.json contents)."""
    directory = _folder("model", directory)
    meta = _read_fields(directory / MODEL_CONFIG, MODEL_FIELDS)
    config = GPTConfig.from_dict(meta["gpt_config"])
    tensors, _ = load_safetensors(directory / MODEL_WEIGHTS)
    # Compare the file with the config before the model is built: a config that claims
    # more (or other) weights than the file holds must not allocate them first.
    n_expected = 4 + 16 * config.n_layer  # wte, wpe, ln_f x2, and 16 tensors per block
    shapes = parameter_shapes(config) if len(tensors) == n_expected else {}
    wrong = sorted(n for n in tensors if tuple(tensors[n].shape) != shapes.get(n))
    if len(tensors) != n_expected or wrong or set(shapes) != set(tensors):
        raise ValueError(
            f"{directory}: the weights do not fit config.json's {config}: "
            f"{len(tensors)} tensors (expected {n_expected})"
            + (f", {wrong[0]} has shape {tensors[wrong[0]].shape}" if wrong and shapes else "")
        )
    model = GPT(config, dtype=dtype or meta.get("dtype", "float32"), device=device)
    model.load_state_dict(tensors)
    return model, meta


def load_base(
    folder: str | os.PathLike | None = None, device: str | None = None
) -> tuple[GPT, CharTokenizer | GPT2Tokenizer]:
    """A base model and its tokenizer: ``folder``, or the built-in pretrained base.

    A Hugging Face folder (config.json has a ``model_type``) must be a GPT-2 one, and
    gives the GPT-2 and its BPE tokenizer (gpt2.load_gpt2_base).
    """
    path = Path(folder) if folder is not None else BUILTIN_BASE
    if folder is not None and is_hf_folder(path):  # not GPT-2: load_gpt2 says what it is
        return load_gpt2_base(path, device=device)
    if folder is None and not (path / MODEL_WEIGHTS).exists():
        raise ValueError(
            f"the built-in base is missing from {path}; rebuild it with `{PRETRAIN_COMMAND}` "
            "and pass --base runs/base/model"
        )
    model, meta = load_model(path, device=device)
    tokenizer = meta.get("extra", {}).get("tokenizer")
    tokenizer = CharTokenizer.from_dict(tokenizer) if tokenizer else CharTokenizer.default()
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(
            f"{path}: tokenizer has {tokenizer.vocab_size} symbols, model {model.config.vocab_size}"
        )
    return model, tokenizer
