"""Parameter and memory accounting: why LoRA makes fine-tuning cheap.

Everything here is arithmetic on the architecture (docs/DESIGN.md, "The model"), so it works
for GPT-3 175B without allocating a single array. :func:`count_parameters` does the same
bookkeeping for a live model by summing the sizes of its arrays.

Per block of a GPT-2 style model with width d:

    attention   q, k, v, o: Linear(d, d)          4 (d*d + d)
    mlp         fc: Linear(d, 4d), proj: (4d, d)  8 d*d + 5 d
    layernorm   ln_1, ln_2 (weight and bias)      4 d

plus the embeddings wte (V, d) and wpe (T, d), and ln_f (2 d). The LM head is tied to
wte, so it adds nothing. LoRA of rank r on a Linear(d_in, d_out) adds A (r, d_in) and
B (d_out, r): r (d_in + d_out) parameters, which is tiny next to d_in * d_out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from minilora.basics.checks import boolean, distinct_indices, distinct_names, one_of, positive_int
from minilora.core.adapters import check_rank
from minilora.core.lora import TARGET_MODULES, module_path
from minilora.core.model import GPTConfig, parameter_shapes
from minilora.core.optim import AdamW
from minilora.core.quant import storage_bytes

# docs/DESIGN.md, "Reference configurations", and the two models of the LoRA paper's story.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(vocab_size=65, d_model=32, n_layer=2, n_head=2, block_size=16, batch_size=4),
    "small": dict(vocab_size=96, d_model=128, n_layer=4, n_head=4, block_size=64, batch_size=32),
    "medium": dict(vocab_size=96, d_model=384, n_layer=6, n_head=6, block_size=128, batch_size=16),
    "large": dict(vocab_size=96, d_model=768, n_layer=12, n_head=12, block_size=256, batch_size=32),
    "gpt2": dict(
        vocab_size=50257, d_model=768, n_layer=12, n_head=12, block_size=1024, batch_size=8
    ),
    "gpt3-175b": dict(
        vocab_size=50257, d_model=12288, n_layer=96, n_head=96, block_size=2048, batch_size=1
    ),
}
# Bytes per parameter when none is given: the big models in fp16 (as the LoRA paper
# reports them), this repository's models in float32 (what minilora trains in).
_DEFAULT_BYTES_PER_PARAM = {"gpt2": 2, "gpt3-175b": 2}
_CONFIG_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "batch_size")
OPTIMIZERS = ("adamw", "sgd")
QUANTIZATIONS = ("nf4",)


def preset(name: str) -> dict[str, int]:
    """A copy of the named configuration (vocab_size, d_model, ..., batch_size)."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is not known; allowed: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def preset_config(name: str) -> GPTConfig:
    """The GPTConfig of a named preset (its batch_size is a training setting, left out)."""
    sizes = preset(name)
    del sizes["batch_size"]
    return GPTConfig(**sizes)


# --------------------------------------------------------------------------- validation


def _check_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
    return distinct_names("targets", targets, TARGET_MODULES)


def _check_config(config: Mapping[str, Any]) -> dict[str, int]:
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict with keys {', '.join(_CONFIG_KEYS)}")
    missing = [k for k in _CONFIG_KEYS if k not in config]
    if missing:
        raise ValueError(
            f"config is missing {', '.join(missing)}; needed: {', '.join(_CONFIG_KEYS)}"
        )
    return {k: positive_int(k, config[k]) for k in _CONFIG_KEYS}


# --------------------------------------------------------------------------- analytic counts


def count_architecture(
    vocab_size: int, block_size: int, n_layer: int, n_head: int, d_model: int
) -> dict[str, int]:
    """Parameters per group (embeddings, attention, mlp, layernorm) and their total.

    Summed over the model's own shape table (model.parameter_shapes), so the count is
    always that of the model minilora builds. GPT-2 small (50257, 1024, 12, 12, 768)
    gives 124,439,808, the number usually quoted for it with the LM head tied to wte.
    """
    config = GPTConfig(vocab_size, block_size, n_layer, n_head, d_model)
    counts = {"embeddings": 0, "attention": 0, "mlp": 0, "layernorm": 0}
    for name, shape in parameter_shapes(config).items():
        counts[_group(name)] += math.prod(shape)
    counts["total"] = sum(counts.values())
    return counts


def _group(name: str) -> str:
    """wte, wpe -> embeddings; h.{i}.attn.* -> attention; h.{i}.mlp.* -> mlp; ln_* -> layernorm."""
    if name.startswith(("wte.", "wpe.")):
        return "embeddings"
    if ".attn." in name:
        return "attention"
    return "mlp" if ".mlp." in name else "layernorm"


def _target_shape(target: str, d_model: int) -> tuple[int, int]:
    """(d_in, d_out) of a target Linear, read off the model's shape table."""
    one_block = GPTConfig(vocab_size=1, block_size=1, n_layer=1, n_head=1, d_model=d_model)
    d_out, d_in = parameter_shapes(one_block)[f"{module_path(0, target)}.weight"]
    return d_in, d_out


def lora_parameter_count(
    n_layer: int,
    d_model: int,
    r: int,
    targets: str | Iterable[str],
    layers: Iterable[int] | None = None,
    dora: bool = False,
    vera: bool = False,
) -> int:
    """LoRA parameters: r (d_in + d_out) per adapted Linear, over the chosen layers;
    with ``dora``, DoRA's magnitude adds d_out per adapted Linear; with ``vera``, VeRA's
    vectors are r + d_out per adapted Linear instead (its shared A, B are frozen).

    ``layers`` restricts the adapters to some block indices (default: all). For GPT-3
    175B with r=4 on q and v: 96 * 2 * 4 * (12288 + 12288) = 18,874,368, as in the paper.
    """
    n_layer = positive_int("n_layer", n_layer)
    d_model = positive_int("d_model", d_model)
    r = positive_int("r", r)
    targets = _check_targets(targets)
    n_adapted = n_layer if layers is None else len(distinct_indices("layers", layers, n_layer))
    per_layer = sum(r * sum(_target_shape(t, d_model)) for t in targets)
    if boolean("vera", vera):
        if boolean("dora", dora):
            raise ValueError("dora=True and vera=True: an adapter is one or the other")
        per_layer = sum(r + _target_shape(t, d_model)[1] for t in targets)  # λ_d, λ_b
    elif boolean("dora", dora):
        per_layer += sum(_target_shape(t, d_model)[1] for t in targets)  # m: (d_out,)
    return n_adapted * per_layer


# --------------------------------------------------------------------------- memory


def activation_bytes(config: Mapping[str, Any], bytes_per_param: int = 2) -> int:
    """Rough activation memory for one training step (estimate, not a measurement).

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
    Models"), for 16-bit activations without recomputation, per layer:
    ``s b d (34 + 5 a s / d)`` bytes (s sequence, b batch, d width, a heads); the
    ``5 a s / d`` term is the s x s attention matrices. We multiply by n_layer and scale
    by ``bytes_per_param / 2`` for other precisions; embeddings and logits are left out.
    The formula does not depend on what trains. minilora's own count, which does (a
    frozen linear without an adapter keeps no input), is :func:`step_activation_bytes`,
    the one ``memory_estimate`` uses.
    """
    c = _check_config(config)
    s, b, d, a = c["block_size"], c["batch_size"], c["d_model"], c["n_head"]
    per_layer_fp16 = s * b * (34 * d + 5 * a * s)  # = s b d (34 + 5 a s / d), in integers
    return c["n_layer"] * per_layer_fp16 * bytes_per_param // 2


def step_activation_bytes(
    config: Mapping[str, Any],
    r: int | None = None,
    targets: str | Iterable[str] = ("q", "v"),
    bytes_per_param: int = 4,
) -> int:
    """Activation memory at the peak of one minilora training step; full when ``r`` is None.

    Counted from what model.py's forward caches (in elements per token, d the width,
    a heads, s the sequence, V the vocabulary), at ``bytes_per_param`` each:

    - every block: the normalised inputs of ln_1 and ln_2 (2 d), attention's q, k, v
      (3 d) and probabilities (a s), the MLP's hidden layer before GELU and its tanh
      (8 d), and the two rows of 1/sigma (2);
    - the input x of a linear only where a gradient needs it (dW = dh^T x, dA = du^T x):
      ln_1's output for q, k, v (d), attention's output for o (d), ln_2's output for fc
      (d), GELU's output for proj (4 d). Full fine-tuning keeps all four (7 d); LoRA
      keeps those of adapted linears only, and each adapter adds u = x A^T (r);
    - the head: ln_f's normalised input (d + 1), its output when wte trains (d), and
      the loss's probabilities (V);
    - the backward's working arrays at its peak, block 0's attention backward, where
      every cache is still alive: the gradients in flight through the blocks (14 d +
      V; d and 4 d wide, held until the block's backward returns), attention's dP,
      dS and a temporary (3 a s), and its dq, dk, dv (4 d); or the loss's own
      working set (4 V) where the vocabulary dominates;
    - 17 bytes per token of token ids, targets and the mask of counted targets.

    LoRA dropout masks (d_in per adapter when dropout > 0) are not counted.
    """
    c = _check_config(config)
    s, b, d, a, V = c["block_size"], c["batch_size"], c["d_model"], c["n_head"], c["vocab_size"]
    full = r is None
    adapted = set() if full else set(_check_targets(targets))
    r = 0 if full else positive_int("r", r)

    def kept(*linears: str) -> bool:  # is this input cached for some gradient?
        return full or bool(adapted & set(linears))

    per_block = 13 * d + a * s + 2  # ln xhats 2d, q k v 3d, fc output and tanh 8d, rstd 2
    per_block += d * kept("q", "k", "v") + d * kept("o") + d * kept("fc") + 4 * d * kept("proj")
    per_block += r * len(adapted)  # u = x A^T of each adapter
    head = d + 1 + d * full + V
    working = max(14 * d + V + 3 * a * s + 4 * d, 4 * V)
    elements = c["n_layer"] * per_block + head + working
    return b * s * (elements * bytes_per_param + 17)


def quantized_linear_bytes(config: Mapping[str, Any]) -> tuple[int, int]:
    """(values, bytes) of every block's linear weights stored in NF4 (quant.storage_bytes)."""
    c = _check_config(config)
    d = c["d_model"]
    shapes = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]  # q, k, v, o, fc, proj
    values = c["n_layer"] * sum(a * b for a, b in shapes)
    return values, c["n_layer"] * sum(storage_bytes(a * b) for a, b in shapes)


def memory_estimate(
    config: Mapping[str, Any],
    r: int | None,
    targets: str | Iterable[str] = ("q", "v"),
    bytes_per_param: int = 4,
    optimizer: str = "adamw",
    dora: bool = False,
    quantize: str | None = None,
    vera: bool = False,
) -> dict[str, int]:
    """Training memory in bytes, split by what it holds; full fine-tuning when ``r`` is None.
    ``dora``: the adapters are DoRA's (d_out more trainable numbers per matrix; the
    activation estimate is LoRA's, without DoRA's extra cache of one (rows, d_out)).
    ``vera``: VeRA's adapters (r + d_out trainable numbers per matrix; the weights also
    hold the shared frozen A, B: r (d_in_max + d_out_max) numbers, and so does its file).

    - weights: every parameter (base + adapters) at ``bytes_per_param``; with
      ``quantize="nf4"`` (QLoRA, LoRA only) the blocks' linear weights at NF4's
      4.127 bits (about half a byte) each, the rest as before
    - gradients: trainable parameters only, at ``bytes_per_param``
    - optimizer: AdamW keeps 2 moments per trainable parameter in the parameters' dtype
      (``AdamW.slots``: m and v) and one work array for its update, allocated once and
      never saved: 3 ``bytes_per_param`` (12 bytes in float32); plain SGD keeps none
    - activations: :func:`step_activation_bytes`, what minilora's forward caches for
      this backward plus the backward's working arrays at its peak
    - total: the sum of the four above, the peak of one training step
    - checkpoint: what you must store per fine-tuned task: all parameters for full
      fine-tuning, only the adapters for LoRA

    On minilora's own small and medium models (float32, AdamW) the total is within a
    few percent of the peak ``minilora bench`` measures. Mixed-precision details (fp32
    master weights, loss scaling) and framework overheads are left out.
    :func:`activation_bytes` is the published estimate for a framework's activations.
    """
    c = _check_config(config)
    bytes_per_param = positive_int("bytes_per_param", bytes_per_param)
    one_of("optimizer", optimizer, OPTIMIZERS)
    if quantize is not None:
        one_of("quantize", quantize, QUANTIZATIONS)
        if r is None:
            raise ValueError(
                f"quantize={quantize!r} stores the base in 4 bits, which cannot train: "
                "give a LoRA rank r (QLoRA)"
            )
    base = count_architecture(
        c["vocab_size"], c["block_size"], c["n_layer"], c["n_head"], c["d_model"]
    )["total"]
    shared = 0  # VeRA's shared frozen A, B: stored with the weights and in its files
    if r is None:
        stored, trainable = base, base
    else:
        trainable = lora_parameter_count(
            c["n_layer"], c["d_model"], r, targets, dora=dora, vera=vera
        )
        sides = [_target_shape(t, c["d_model"]) for t in _check_targets(targets)]
        shared = r * sum(max(s[k] for s in sides) for k in (0, 1)) if vera else 0
        stored = base + trainable + shared
    out = {
        "params": stored,
        "trainable": trainable,
        "weights": stored * bytes_per_param,
        "gradients": trainable * bytes_per_param,
        # AdamW's moments are arrays like the parameters, plus its one work array
        "optimizer": trainable * (len(AdamW.slots) + 1) * bytes_per_param
        if optimizer == "adamw"
        else 0,
        "activations": step_activation_bytes(c, r, targets, bytes_per_param),
    }
    if quantize is not None:  # the linears leave the float weights for their NF4 storage
        values, nbytes = quantized_linear_bytes(c)
        out["weights"] += nbytes - values * bytes_per_param
        out["quantized_weights"] = nbytes
    out["total"] = out["weights"] + out["gradients"] + out["optimizer"] + out["activations"]
    out["checkpoint"] = (trainable + shared) * bytes_per_param
    return out


# --------------------------------------------------------------------------- the table


def accounting_table(
    preset_name: str | Mapping[str, Any],
    r: int = 8,
    targets: str | Iterable[str] = ("q", "v"),
    bytes_per_param: int | None = None,
    dora: bool = False,
    quantize: str | None = None,
    vera: bool = False,
) -> dict[str, Any]:
    """Full fine-tuning vs LoRA for a preset (or a config dict), as a JSON-able dict.

    Keys: preset, config, bytes_per_param, architecture (per-group counts), total,
    trainable (with LoRA), full and lora (each: trainable and a memory breakdown, see
    :func:`memory_estimate`), ratio (full trainable / LoRA trainable). ``dora``: DoRA
    adapters (their magnitudes counted); ``vera``: VeRA adapters (their vectors). With
    ``quantize="nf4"`` also qlora (LoRA on the NF4 base, the same keys as lora); the
    CLI adds qlora.qlora_65b().
    """
    if isinstance(preset_name, str):
        name, config = preset_name, preset(preset_name)
    else:
        name, config = "custom", _check_config(preset_name)
    if bytes_per_param is None:
        bytes_per_param = _DEFAULT_BYTES_PER_PARAM.get(name, 4)
    r = positive_int("r", r)
    targets = _check_targets(targets)
    # the rule add_adapter applies to a real model; _target_shape is (d_in, d_out)
    check_rank(r, {t: _target_shape(t, config["d_model"])[::-1] for t in targets})
    arch = count_architecture(
        config["vocab_size"],
        config["block_size"],
        config["n_layer"],
        config["n_head"],
        config["d_model"],
    )
    full = memory_estimate(config, None, targets, bytes_per_param)
    lora = memory_estimate(config, r, targets, bytes_per_param, dora=dora, vera=vera)
    table = {
        "preset": name,
        "config": dict(config),
        "bytes_per_param": bytes_per_param,
        "architecture": arch,
        "total": arch["total"],
        "trainable": lora["trainable"],
        "full": {"trainable": full["trainable"], "memory": full},
        "lora": {
            "r": r,
            "targets": list(targets),
            "dora": dora,
            "vera": vera,
            "trainable": lora["trainable"],
            "memory": lora,
        },
        "ratio": full["trainable"] / lora["trainable"],
    }
    if quantize is not None:
        qlora = memory_estimate(config, r, targets, bytes_per_param, dora=dora, quantize=quantize)
        table["qlora"] = {
            "quantize": quantize,
            "r": r,
            "targets": list(targets),
            "trainable": qlora["trainable"],
            "memory": qlora,
        }
    return table


def human_count(n: float) -> str:
    """1234 -> '1.2K', 18874368 -> '18.9M', 174.6e9 -> '174.6B' (powers of 1000)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:g}"


def human_bytes(n: float) -> str:
    """Decimal units (1 GB = 10^9 bytes), as model sizes are usually quoted: '349.2 GB'."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:g} B"


def format_accounting(table: Mapping[str, Any]) -> str:
    """The :func:`accounting_table` dict as an aligned text table, full vs LoRA."""
    c = table["config"]
    lora = table["lora"]
    bpp = table["bytes_per_param"]
    title = (
        f"{table['preset']}: vocab {c['vocab_size']}, block {c['block_size']}, "
        f"{c['n_layer']} layers, {c['n_head']} heads, d_model {c['d_model']}, "
        f"batch {c['batch_size']} ({bpp} bytes/param)"
    )
    kind = "DoRA" if lora.get("dora") else "VeRA" if lora.get("vera") else "LoRA"
    lora_head = f"{kind} r={lora['r']} ({', '.join(lora['targets'])})"
    rows = [("", "full fine-tuning", lora_head)]
    rows.append(
        (
            "trainable params",
            human_count(table["full"]["trainable"]),
            human_count(lora["trainable"]),
        )
    )
    labels = [
        ("weights", "weights"),
        ("gradients", "gradients"),
        ("optimizer (AdamW)", "optimizer"),
        ("activations (est.)", "activations"),
        ("training total (est.)", "total"),
        ("checkpoint per task", "checkpoint"),
    ]
    for label, key in labels:
        rows.append(
            (label, human_bytes(table["full"]["memory"][key]), human_bytes(lora["memory"][key]))
        )
    if "qlora" in table:  # a third column: the same LoRA on the NF4 base
        rows[0] += (f"QLoRA ({table['qlora']['quantize'].upper()} base)",)
        rows[1] += (human_count(table["qlora"]["trainable"]),)
        for i, (_, key) in enumerate(labels, start=2):
            rows[i] += (human_bytes(table["qlora"]["memory"][key]),)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [title, ""]
    lines += [
        "  ".join(
            [f"{row[0]:<{widths[0]}}"]
            + [f"{v:>{w}}" for v, w in zip(row[1:], widths[1:], strict=True)]
        )
        for row in rows
    ]
    lines += [
        "",
        f"total parameters: {table['total']:,}; {kind} trains {lora['trainable']:,} "
        f"({table['ratio']:,.0f}x fewer than full fine-tuning)",
    ]
    if "qlora" in table:
        n, nbytes = quantized_linear_bytes(c)
        lines.append(
            f"NF4 base: {n:,} linear weights in {human_bytes(nbytes)}, "
            f"{nbytes / n:.3f} bytes each with their constants; the rest as before"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- live models


def module_key(name: str) -> str:
    """The module a parameter belongs to: 'h.0.attn.q.weight' -> 'h.0.attn.q'.

    LoRA matrices (and DoRA's magnitude, VeRA's vectors) count under the Linear they adapt:
    'h.0.attn.q.lora_A.default' -> 'h.0.attn.q' (the adapter name may itself contain dots).
    """
    for marker in (".lora_A.", ".lora_B.", ".lora_magnitude.", ".vera_lambda_"):
        if marker in name:
            return name.split(marker, 1)[0]
    head, _, last = name.rpartition(".")
    return head if head and last in ("weight", "bias") else name


@dataclass
class ParameterCount:
    """How many parameters a model has, how many train, and where they sit."""

    total: int
    trainable: int
    per_module: dict[str, tuple[int, int]] = field(
        default_factory=dict
    )  # key -> (total, trainable)

    @property
    def ratio(self) -> float:
        """Trainable / total (0.0 for an empty model)."""
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        rows = [("module", "total", "trainable")]
        rows += [(k, f"{t:,}", f"{tr:,}") for k, (t, tr) in self.per_module.items()]
        w = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows]
        lines.append(f"trainable: {self.trainable:,} of {self.total:,} ({100 * self.ratio:.2f}%)")
        return "\n".join(lines)


def count_parameters(model: Any) -> ParameterCount:
    """Count a live model's parameters: ``model.params`` (name -> array) and
    ``model.trainable_names()``; grouped per module in the order of ``model.params``.
    Weights stored in NF4 (``model.quantized``) count too, as frozen."""
    params = getattr(model, "params", None)
    if not isinstance(params, Mapping) or not hasattr(model, "trainable_names"):
        raise TypeError(
            f"count_parameters needs a model with .params (dict name -> array) and "
            f".trainable_names(); got {type(model).__name__}"
        )
    trainable = set(model.trainable_names())
    unknown = sorted(trainable - set(params))
    if unknown:
        raise ValueError(f"trainable names {unknown} are not in model.params")
    per_module: dict[str, tuple[int, int]] = {}
    sizes = {name: int(array.size) for name, array in params.items()}
    for name, stored in getattr(model, "quantized", {}).items():  # NF4 weights: frozen
        sizes[name] = math.prod(stored.shape)
    for name, size in sizes.items():
        key = module_key(name)
        t, tr = per_module.get(key, (0, 0))
        per_module[key] = (t + size, tr + (size if name in trainable else 0))
    total = sum(t for t, _ in per_module.values())
    n_trainable = sum(tr for _, tr in per_module.values())
    return ParameterCount(total=total, trainable=n_trainable, per_module=per_module)
