"""LoRA and DoRA adapters in PEFT's own format, for GPT-2: written for PeftModel, read from it.

PEFT adapts GPT-2's modules, whose names are not minilora's, and one of them is fused::

    minilora               PEFT target    tensor keys, after base_model.model.transformer.
    h.{i}.attn.q, k, v ->  c_attn         h.{i}.attn.c_attn.lora_A.weight, .lora_B.weight
    h.{i}.attn.o       ->  attn.c_proj    h.{i}.attn.c_proj.lora_A.weight, ...
    h.{i}.mlp.fc       ->  c_fc           h.{i}.mlp.c_fc.lora_A.weight, ...
    h.{i}.mlp.proj     ->  mlp.c_proj     h.{i}.mlp.c_proj.lora_A.weight, ...

A and B have the same layout in both: A (r, d_in), B (d_out, r), h += s (x A^T) B^T
(PEFT's ``fan_in_fan_out`` concerns the base Conv1D weight only, not A and B).

**Fusing q, k, v into one c_attn adapter (export).** c_attn computes [q | k | v], so its
ΔW (3d, d) is ΔW_q, ΔW_k, ΔW_v stacked by rows. Stack the A's and put each B in its own
row block, zeros elsewhere::

    A_c = [A_q; A_k; A_v]          (r_q + r_k + r_v, d)
    B_c = [[B_q, 0, 0],            (3d, r_q + r_k + r_v)
           [0, B_k, 0],
           [0, 0, B_v]]            B_c A_c = [B_q A_q; B_k A_k; B_v A_v]: exactly ΔW

Only the targeted ones are stacked (q, v alone give rank 2r). The rank of c_attn, R,
is then not the adapter's r, so its scale would change from alpha / r to alpha / R. The
scale is kept by giving c_attn its own alpha (PEFT's ``rank_pattern`` and
``alpha_pattern``, or ``r`` and ``lora_alpha`` themselves when c_attn is the only
target): alpha_c = s R (s sqrt(R) with rsLoRA), so alpha_c / R = s. A and B are written
unchanged.

**Splitting (import).** A c_attn adapter becomes three branches, q, k and v, that share
A, each with its row block of B: B_q A = rows 0..d of B_c A_c, exactly. minilora's
adapter has one rank and one scale; modules whose rank r_m or scale s_m differ (PEFT's
rank and alpha patterns) are padded with zero rows of A and zero columns of B to the
largest rank R, and their scale is folded into B: B_m <- (s_m / s) B_m, so s B_m A_m is
the file's ΔW. Modules the file does not adapt, where minilora's one (layers x
targets) grid needs them, get A = 0 and B = 0: a branch that adds nothing.

**DoRA** (``use_dora``). PEFT keeps one magnitude per output feature of each adapted
layer, ``...lora_magnitude_vector`` (d_out,), and divides by the norm of each row of
V = W + s B A, taken over the inputs (``fan_in_fan_out`` transposes the Conv1D weight
first, so a row is an output feature, as in dora.py), detached in the backward as in
minilora. A row of c_attn's fused V is a row of V_q, V_k or V_v, because B_c A_c is
their ΔW's stacked by rows: so c_attn's norm is the concatenation of the three norms,
and its magnitude the concatenation [m_q | m_k | m_v] (3d,). A module of q, k, v
without an adapter (k, when q and v are adapted) has ΔW = 0 in c_attn: its part of
the magnitude is the row norms of its W, DoRA's magnitude at its start, so m / n = 1
there and its rows are unchanged. Folding a scale into B (import) keeps s B A, so the
norm and the magnitude stay as they are; a grid cell the file does not adapt gets
m = ||W|| per row. Both ways are exact. Refused: a DoRA adapter on a quantized base
(its magnitudes are relative to the 4-bit weights, and k's rows need the float W's
norms, which that model no longer has), and VeRA adapters (PEFT's VeRA is another
format).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from minilora.basics.backend import finite_as, to_host
from minilora.basics.checks import boolean, positive_int, positive_real, probability
from minilora.core.adapters import (
    check_adapter_name,
    dora_magnitudes,
    install_adapter,
    require_unmerged,
)
from minilora.core.lora import (
    TARGET_MODULES,
    LoraConfig,
    lora_names,
    magnitude_name,
    module_order,
    module_path,
)
from minilora.core.model import GPT, require_gpt
from minilora.files.io import load_json, load_safetensors, save_json, save_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_MODULES = {
    "c_attn": ("q", "k", "v"),
    "attn.c_proj": ("o",),
    "c_fc": ("fc",),
    "mlp.c_proj": ("proj",),
}
"""PEFT's GPT-2 target -> the minilora targets it holds (c_attn: three, fused)."""
PEFT_PATH = {
    "c_attn": "attn.c_attn",
    "attn.c_proj": "attn.c_proj",
    "c_fc": "mlp.c_fc",
    "mlp.c_proj": "mlp.c_proj",
}
KEY = re.compile(
    r"base_model\.model\.transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
    r"\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)"
)
FACTOR = {"lora_A.weight": "A", "lora_B.weight": "B"}  # anything else: the magnitude "m"
# PEFT options whose non-default values change what the adapter computes: refused
MUST_BE_DEFAULT = {
    "bias": ("none", "trained biases"),
    "modules_to_save": (None, "fully trained extra modules"),
    "layer_replication": (None, "layer replication"),
    "lora_bias": (False, "a bias on lora_B"),
    "trainable_token_indices": (None, "trainable tokens"),
    "target_parameters": (None, "adapted parameters"),
    "use_qalora": (False, "QALoRA"),
    "alora_invocation_tokens": (None, "activated LoRA"),
}
RANDOM_INITS = (True, False, "gaussian")  # the others (pissa, olora, ...) rewrite the base in PEFT


def peft_target(target: str) -> str:
    return next(t for t, ours in PEFT_MODULES.items() if target in ours)


def _scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / (math.sqrt(r) if rslora else r)


# ------------------------------------------------------------------------- export
def save_peft_adapter(model: GPT, directory: str | os.PathLike, name: str = "default") -> dict:
    """Write adapter ``name`` as a PEFT LoRA adapter for GPT2LMHeadModel (see the module
    docstring): adapter_config.json and adapter_model.safetensors with PEFT's keys."""
    require_gpt(model)
    if name not in model.adapters:
        raise ValueError(f"no adapter named {name!r}; adapters: {list(model.adapters)}")
    adapter = model.adapters[name]
    config = adapter.config
    if adapter.pissa_init:
        raise ValueError(
            f"adapter {name!r} is a PiSSA adapter: its base is the residual, not the "
            "checkpoint's weights; export the merged model with save_model(format='hf')"
        )
    if config.use_vera:
        raise ValueError(
            f"adapter {name!r} is a VeRA adapter; PEFT export writes LoRA and DoRA adapters "
            "(PEFT's VeRA is another format); export the merged model with save_model(format='hf')"
        )
    if config.use_dora and model.quantization:
        raise ValueError(
            f"adapter {name!r} is a DoRA adapter on a quantized ({model.quantization}) base: its "
            "magnitudes are relative to the 4-bit weights and c_attn needs the float W's row "
            "norms; load it onto the float base (load_adapter) and export from there"
        )
    require_unmerged(model, "export an adapter")
    s, d = config.scale, model.config.d_model
    qkv = [t for t in ("q", "k", "v") if t in config.target_modules]
    R = config.r * len(qkv)  # c_attn's rank: the q, k, v adapters stacked
    tensors: dict[str, np.ndarray] = {}
    blocks = sorted({int(m.split(".")[1]) for m in adapter.modules})
    for i in blocks:
        factors, magnitude = {}, {}
        for t in config.target_modules:
            A_name, B_name = lora_names(module_path(i, t), name)
            factors[t] = (to_host(model.params[A_name]), to_host(model.params[B_name]))
            if config.use_dora:
                magnitude[t] = to_host(model.params[magnitude_name(module_path(i, t), name)])
        prefix = f"base_model.model.transformer.h.{i}."
        magnitude_key = "lora_magnitude_vector"
        if qkv:
            A_c = np.concatenate([factors[t][0] for t in qkv])  # (R, d)
            B_c = np.zeros((3 * d, R), dtype=A_c.dtype)
            for n, t in enumerate(qkv):  # B_t in t's row block, its own columns
                j = "qkv".index(t)
                B_c[j * d : (j + 1) * d, n * config.r : (n + 1) * config.r] = factors[t][1]
            tensors[prefix + "attn.c_attn.lora_A.weight"] = A_c
            tensors[prefix + "attn.c_attn.lora_B.weight"] = B_c
            if config.use_dora:  # [m_q | m_k | m_v]; a module without adapter: ||W|| per row
                parts = [magnitude[t] if t in qkv else _row_norms(model, i, t) for t in "qkv"]
                tensors[f"{prefix}attn.c_attn.{magnitude_key}"] = np.concatenate(parts)
        for t in config.target_modules:
            if t not in qkv:
                path = PEFT_PATH[peft_target(t)]
                tensors[f"{prefix}{path}.lora_A.weight"] = factors[t][0]
                tensors[f"{prefix}{path}.lora_B.weight"] = factors[t][1]
                if config.use_dora:
                    tensors[f"{prefix}{path}.{magnitude_key}"] = magnitude[t]
    targets = list(dict.fromkeys(peft_target(t) for t in config.target_modules))
    # c_attn's alpha keeps its scale at s: alpha_c / R = s (alpha_c / sqrt(R) with rsLoRA)
    alpha_c = s * (math.sqrt(R) if config.use_rslora else R)
    only_c_attn = targets == ["c_attn"]
    mixed = bool(qkv) and not only_c_attn and R != config.r
    meta = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": R if only_c_attn else config.r,
        "lora_alpha": alpha_c if only_c_attn else config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "layers_to_transform": None if config.layers is None else sorted(config.layers),
        "layers_pattern": None if config.layers is None else "h",
        "rank_pattern": {"c_attn": R} if mixed else {},
        "alpha_pattern": {"c_attn": alpha_c} if mixed else {},
        "fan_in_fan_out": True,  # GPT-2's Conv1D stores W as (d_in, d_out)
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    directory = Path(directory)
    weights, config_path = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    save_safetensors(weights, tensors, metadata={"format": "pt"})
    save_json(config_path, meta)
    return {
        "config": str(config_path),
        "weights": str(weights),
        "bytes": weights.stat().st_size + config_path.stat().st_size,
    }


def _row_norms(model: GPT, block: int, target: str) -> np.ndarray:
    """||W|| per row (d_out,) of a linear without an adapter: its DoRA magnitude at ΔW = 0,
    summed in float64 and rounded once to the model's dtype (PEFT divides by its own norm)."""
    W = to_host(model.weight(module_path(block, target))).astype(np.float64)
    return np.sqrt((W * W).sum(axis=1)).astype(model.dtype)


# ------------------------------------------------------------------------- import
def is_peft_config(meta: Any) -> bool:
    return isinstance(meta, dict) and "peft_type" in meta


def _pattern(patterns: Any, module: str, default: Any, path: Path, what: str) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that ends ``module``."""
    if not isinstance(patterns, dict):
        raise ValueError(f"{path}: {what}={patterns!r} must be an object")
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_peft_config(meta: dict, path: Path) -> tuple[int, float, float, bool, bool, dict, dict]:
    """(r, alpha, dropout, use_rslora, use_dora, rank_pattern, alpha_pattern), every
    feature checked."""
    if meta.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type={meta.get('peft_type')!r}; allowed: 'LORA'")
    for key, (default, what) in MUST_BE_DEFAULT.items():
        if meta.get(key, default) not in (default, [], {}):
            raise ValueError(
                f"{path}: {key}={meta.get(key)!r} ({what}) is not supported; allowed: {default!r}"
            )
    if meta.get("init_lora_weights", True) not in RANDOM_INITS:
        raise ValueError(
            f"{path}: init_lora_weights={meta['init_lora_weights']!r} changes the base weights in "
            "PEFT; allowed: true, false, 'gaussian' (convert it to plain LoRA in PEFT first)"
        )
    try:
        r = positive_int("r", meta.get("r", 8))
        alpha = positive_real("lora_alpha", meta.get("lora_alpha", 8))
        dropout = probability("lora_dropout", meta.get("lora_dropout", 0.0))
        rslora = boolean("use_rslora", meta.get("use_rslora", False))
        dora = boolean("use_dora", meta.get("use_dora", False))
    except (TypeError, ValueError) as err:
        raise type(err)(f"{path}: {err}") from None
    return (
        r,
        alpha,
        dropout,
        rslora,
        dora,
        meta.get("rank_pattern") or {},
        meta.get("alpha_pattern") or {},
    )


def load_peft_adapter(
    model: GPT, directory: str | os.PathLike, name: str | None = None, activate: bool = True
) -> str:
    """Add the PEFT LoRA or DoRA adapter for GPT-2 in ``directory`` to ``model``; returns
    its name.

    Everything is checked (config, every key, shape and value) before the model changes.
    """
    require_gpt(model)
    boolean("activate", activate)
    directory = Path(directory)
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    meta = load_json(config_path)
    checked_meta = _check_peft_config(meta, config_path)
    r, alpha, dropout, rslora, dora, rank_pattern, alpha_pattern = checked_meta
    name = check_adapter_name("default" if name is None else name)
    if name in model.adapters:
        raise ValueError(f"adapter {name!r} exists already; pass another name=")
    require_unmerged(model, "load an adapter")
    tensors, _ = load_safetensors(weights_path)
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{weights_path}: key {key!r} is not a LoRA factor of GPT-2 "
                "(base_model.model.transformer.h.{i}.{attn.c_attn|attn.c_proj|mlp.c_fc|mlp.c_proj}"
                ".{lora_A.weight|lora_B.weight|lora_magnitude_vector})"
            )
        block, module, which = int(match[1]), match[2], FACTOR.get(match[3], "m")
        found.setdefault((block, module), {})[which] = value
    if not found:
        raise ValueError(f"{weights_path}: no LoRA factors in the file")
    C, n_layer = model.config.d_model, model.config.n_layer
    d_out = {"attn.c_attn": 3 * C, "attn.c_proj": C, "mlp.c_fc": 4 * C, "mlp.c_proj": C}
    d_in = {"attn.c_attn": C, "attn.c_proj": C, "mlp.c_fc": C, "mlp.c_proj": 4 * C}
    checked = {}  # (block, module) -> (A, B, r_m, s_m)
    for (block, module), pair in sorted(found.items()):
        where = f"{weights_path}: h.{block}.{module}"
        if block >= n_layer:
            raise ValueError(f"{where}: the model has blocks 0..{n_layer - 1}")
        wanted = {"A", "B", "m"} if dora else {"A", "B"}
        if set(pair) != wanted:
            names = {"A": "lora_A", "B": "lora_B", "m": "lora_magnitude_vector"}
            has, needs = (", ".join(names[k] for k in sorted(keys)) for keys in (pair, wanted))
            raise ValueError(
                f"{where} has {has}; with use_dora={dora} in {ADAPTER_CONFIG} it needs exactly "
                f"{needs}"
            )
        key = f"transformer.h.{block}.{module}"
        r_m = _pattern(rank_pattern, key, r, config_path, "rank_pattern")
        a_m = _pattern(alpha_pattern, key, alpha, config_path, "alpha_pattern")
        try:
            r_m, a_m = (
                positive_int(f"the rank of {key}", r_m),
                positive_real(f"the alpha of {key}", a_m),
            )
        except (TypeError, ValueError) as err:
            raise type(err)(f"{config_path}: {err}") from None
        A, B, m = pair["A"], pair["B"], pair.get("m")
        expected = [("lora_A", A, (r_m, d_in[module])), ("lora_B", B, (d_out[module], r_m))]
        if dora:
            expected.append(("lora_magnitude_vector", m, (d_out[module],)))
        for which, array, shape in expected:
            if tuple(array.shape) != shape or not np.issubdtype(array.dtype, np.floating):
                raise ValueError(
                    f"{where}.{which} has shape {tuple(array.shape)} and dtype {array.dtype}; "
                    f"expected a float array of shape {shape} (r={r_m} from {ADAPTER_CONFIG})"
                )
            if not finite_as(array, model.dtype):
                raise ValueError(f"{where}.{which} contains NaN or inf (as {model.dtype.name})")
        checked[(block, module)] = (A, B, r_m, _scale(a_m, r_m, rslora), a_m, m)
    # minilora's adapter has one rank R (the largest) and one scale s: when every module
    # has the same rank and alpha, they are the file's; otherwise s = lora_alpha / R and
    # each module's own scale is folded into its B (the module docstring)
    R = max(v[2] for v in checked.values())
    if len({(v[2], v[4]) for v in checked.values()}) == 1:
        alpha = next(iter(checked.values()))[4]
    s = _scale(alpha, R, rslora)
    factors: dict[str, tuple[np.ndarray, ...]] = {}
    for (block, module), (A, B, r_m, s_m, _, m) in checked.items():
        A_pad, B_pad = np.zeros((R, A.shape[1])), np.zeros((B.shape[0], R))  # float64
        A_pad[:r_m] = A
        B_pad[:, :r_m] = B if s_m == s else (s_m / s) * B.astype(np.float64)
        # s B A is unchanged by the folding, so the norm is too: m is taken as it is
        if module == "attn.c_attn":  # the split: q, k, v share A, each its row block of B
            for j, t in enumerate("qkv"):  # and its slice of the magnitude
                rows = slice(j * C, (j + 1) * C)
                extra = (m[rows],) if dora else ()
                factors[module_path(block, t)] = (A_pad, B_pad[rows], *extra)
        else:
            t = {"attn.c_proj": "o", "mlp.c_fc": "fc", "mlp.c_proj": "proj"}[module]
            factors[module_path(block, t)] = (A_pad, B_pad, *((m,) if dora else ()))
    blocks = sorted({int(m.split(".")[1]) for m in factors})
    targets = tuple(t for t in TARGET_MODULES if any(m.endswith(f".{t}") for m in factors))
    config = LoraConfig(
        r=R,
        alpha=alpha,
        dropout=dropout,
        target_modules=targets,
        use_rslora=rslora,
        use_dora=dora,
        layers=None if len(blocks) == n_layer else tuple(blocks),
    )
    empty = {}  # minilora's grid of layers x targets: a missing cell adds nothing
    for block in blocks:
        for t in targets:
            module = module_path(block, t)
            if module not in factors:
                d_o, d_i = model.weight_shape(module)
                empty[module] = (np.zeros((R, d_i)), np.zeros((d_o, R)))
    if dora:  # DoRA's magnitude at ΔW = 0, ||W|| per row as the forward computes n: m / n = 1
        empty = dora_magnitudes(model, empty, config)
    factors |= empty
    factors = dict(sorted(factors.items(), key=lambda item: module_order(item[0])))
    install_adapter(model, name, config, factors, model.base_fingerprint(), activate=activate)
    return name
