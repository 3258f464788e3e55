"""A quantized frozen base (QLoRA): ``quantize_base(model, "nf4")``, and what merging costs.

QLoRA (Dettmers et al. 2023) stores the frozen base's linear weights in 4-bit NormalFloat
(quant.py) and trains LoRA adapters on top in full precision:

    h = x Ŵ^T + b + s (x A^T) B^T,      Ŵ = dequantize(Q)   (d_out, d_in), rebuilt per forward

The backward is the LoRA layer's with W replaced by Ŵ: dx = dh Ŵ + s (dh B) A, and dA,
dB as usual; Q never gets a gradient (it is integers). Only the linears are quantized,
as in QLoRA: they hold almost all the weights (12 d² of 12 d² + 13 d per block), while
the embeddings, the tied head and the layer norms are small, used as lookups or
per-feature scales, and sensitive to rounding, so they stay in the model's dtype.

**Merging.** Merging an adapter into a quantized base would have to re-quantize W + ΔW:
the merged weight is again on the 4-bit grid (steps of about c_b / 8 near 0, c_b the
block's absmax), so ΔW survives only rounded to that grid, and the components of ΔW
much smaller than a step are lost. ``merge`` therefore refuses on a quantized base;
:func:`requantized_merge_error` measures what a re-quantizing merge would keep. (After
``minilora finetune --quantize nf4`` on shift, RMS(ΔW) = 0.057: the kept update misses
ΔW by 14%; scaled down 10x, by 69%; 30x, by 98%.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from minilora.basics.backend import to_host
from minilora.basics.checks import one_of
from minilora.core.lora import TARGET_MODULES, delta_weight, lora_names, module_path
from minilora.core.model import GPT, require_gpt
from minilora.core.params import human_bytes, human_count, memory_estimate
from minilora.core.quant import bits_per_parameter, dequantize, quantize

QUANTIZATIONS = ("nf4",)
# QLoRA's headline (Dettmers et al. 2023, abstract): a 65B model fine-tuned on one 48 GB
# GPU, where 16-bit fine-tuning needs more than 780 GB. LLaMA-65B's width and depth in
# this GPT's shape: 12 d² per block (LLaMA: 4 d² + 3 d·22016 = 12.06 d²), 65B in all.
QLORA_65B = dict(
    vocab_size=32000, d_model=8192, n_layer=80, n_head=64, block_size=2048, batch_size=1
)
QLORA_PAPER = {"params": "65B", "gpu_gb": 48, "full_16bit_gb": 780, "r": 64}


def linear_weights(model: GPT) -> list[str]:
    """The weights QLoRA quantizes: every block's q, k, v, o, fc and proj."""
    return [
        f"{module_path(i, t)}.weight" for i in range(model.config.n_layer) for t in TARGET_MODULES
    ]


def quantize_base(model: GPT, kind: str = "nf4") -> None:
    """Store every linear weight of the base in NF4 with double quantization (QLoRA).

    Afterwards the forward dequantizes W on the fly, the weights are frozen for good
    (``unfreeze`` refuses them), and adapters train on top as usual. Refused: a model
    quantized already, adapters merged into W (the update would be quantized into the
    base), and PiSSA adapters (their split rewrote W, and deleting them writes it back).
    Embeddings and layer norms stay as they are (module docstring).
    """
    require_gpt(model)
    one_of("kind", kind, QUANTIZATIONS)
    if model.quantization is not None:
        raise ValueError(f"the base is quantized already ({model.quantization}); quantize once")
    if model.merged_adapters:
        raise ValueError(
            f"cannot quantize while adapters {model.merged_adapters} are merged into W; "
            "call unmerge(model) first"
        )
    pissa = [name for name, a in model.adapters.items() if a.pissa_init]
    if pissa:
        raise ValueError(
            f"cannot quantize under PiSSA adapter {pissa[0]!r}: its split rewrote W; "
            "quantize the base first and use init 'gaussian' or 'kaiming'"
        )
    model.quantize_weights(linear_weights(model))


def requantized_merge_error(model: GPT, name: str | None = None) -> dict[str, float]:
    """What a merge into the NF4 base would keep of adapter ``name``'s update.

    For every module: Ŵ = dequantize(Q), ΔW = s B A, and the merged weight re-quantized,
    W_m = dequantize(quantize(Ŵ + ΔW)). The update that survives is W_m - Ŵ. Returns
    (over all modules, float64 on the host):

    - relative_error: ‖(W_m - Ŵ) - ΔW‖ / ‖ΔW‖ (0: kept exactly; about 1: lost);
    - unchanged: the fraction of entries whose value did not move at all (the same code
      and the same block constant: the update vanished there);
    - delta_rms: the RMS of ΔW, to set beside the NF4 step.
    """
    require_gpt(model)
    if model.quantization is None:
        raise ValueError("the base is not quantized; call quantize_base(model, 'nf4') first")
    name = name if name is not None else (model.active_adapters or [None])[0]
    if name not in model.adapters:
        raise ValueError(f"no adapter named {name!r}; adapters: {list(model.adapters)}")
    adapter = model.adapters[name]
    err2 = delta2 = 0.0
    unchanged = total = 0
    for module in adapter.modules:
        A, B = (model.params[n] for n in lora_names(module, name))
        W_hat = to_host(model.weight(module)).astype(np.float64)
        dW = to_host(delta_weight(A, B, adapter.config.scale)).astype(np.float64)
        W_merged = to_host(dequantize(quantize(W_hat + dW))).astype(np.float64)
        kept = W_merged - W_hat
        err2 += float(((kept - dW) ** 2).sum())
        delta2 += float((dW**2).sum())
        unchanged += int((kept == 0).sum())
        total += dW.size
    return {
        "relative_error": float(np.sqrt(err2 / max(delta2, 1e-300))),
        "unchanged": unchanged / total,
        "delta_rms": float(np.sqrt(delta2 / total)),
    }


def adapter_merge_report(model: GPT, name: str | None = None) -> str:
    """One line for the command line and notebooks: what re-quantizing a merge keeps."""
    e = requantized_merge_error(model, name)
    return (
        f"merging into the NF4 base would re-quantize W + ΔW: {e['unchanged']:.1%} of the "
        f"entries would not move at all, and the update kept misses ΔW by "
        f"{e['relative_error']:.1%} (RMS of ΔW {e['delta_rms']:.2e})"
    )


# ------------------------------------------------------------ the paper's 65B
def qlora_65b() -> dict[str, Any]:
    """QLoRA's 65B model on one 48 GB GPU, estimated here (``QLORA_65B``, ``QLORA_PAPER``).

    LoRA r = 64 on every linear, as the paper; 16-bit adapters, gradients and AdamW
    state. Activations are left out of the comparison: QLoRA checkpoints them (and
    pages the optimizer), minilora's estimate keeps every one (:func:`step_activation_bytes`).
    """
    r = QLORA_PAPER["r"]
    memory = memory_estimate(QLORA_65B, r, TARGET_MODULES, 2, quantize="nf4")
    full = memory_estimate(QLORA_65B, None, TARGET_MODULES, 2)
    without = memory["total"] - memory["activations"]
    return {
        "config": dict(QLORA_65B),
        "paper": dict(QLORA_PAPER),
        "params": memory["params"] - memory["trainable"],
        "bits_per_weight": bits_per_parameter(),
        "memory": memory,
        "without_activations": without,
        "full_16bit_without_activations": full["total"] - full["activations"],
    }


def format_qlora_65b(q: Mapping[str, Any]) -> list[str]:
    """The lines ``minilora params --quantize nf4`` prints under its table."""
    m, paper = q["memory"], q["paper"]
    adapters = 2 * m["trainable"]  # 16-bit adapter weights, inside "weights"
    return [
        f"QLoRA paper: a {paper['params']} model fine-tuned on one {paper['gpu_gb']} GB GPU "
        f"(16-bit fine-tuning: more than {paper['full_16bit_gb']} GB).",
        f"Here: a {human_count(q['params'])}-parameter GPT of LLaMA-65B's width and depth, "
        f"LoRA r={paper['r']} on every linear, 16-bit adapters:",
        f"  base {human_bytes(m['weights'] - adapters)} (linears in NF4, "
        f"{q['bits_per_weight']:.3f} bits each) + adapters, gradients and AdamW "
        f"{human_bytes(adapters + m['gradients'] + m['optimizer'])} = "
        f"{human_bytes(q['without_activations'])} before activations",
        f"  (16-bit full fine-tuning, the same way: "
        f"{human_bytes(q['full_16bit_without_activations'])}; activations left out: QLoRA "
        "checkpoints them).",
    ]
