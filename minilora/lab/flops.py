"""The floating-point operations of a training step, counted from the architecture."""

from __future__ import annotations

import math
from typing import Any

from minilora.basics.checks import one_of
from minilora.core.model import GPTConfig, parameter_shapes
from minilora.core.params import lora_parameter_count
from minilora.lab.reference import LORA_R, LORA_TARGETS, MODES

FLOP_COUNT = (
    "multiply-adds of matrix products, 2 FLOPs each; element-wise work, layer norms, "
    "softmax, biases and AdamW are not counted. Per token: forward 2 per weight of every "
    "matrix product (q, k, v, o, fc, proj of every block and the tied head; the "
    "embedding lookups are not products), backward 2 for dx and 2 for dW, so 6 for a "
    "trained weight and 4 for a frozen one (LoRA: no dW); LoRA's A and B 6 per "
    "parameter (x A^T, u B^T; dB, du, dA, dx); attention 12 n_layer T d (Q K^T and P V: "
    "4 T d forward, 8 T d backward), over the whole T x T score matrix, as computed."
)


def step_flops(cfg: GPTConfig, batch_size: int, mode: str) -> dict[str, Any]:
    """FLOPs of one training step (``mode`` "full" or "lora") or one forward ("base").

    See :data:`FLOP_COUNT` for exactly what is counted. Returns the parts and the total:
    tokens, matmul_params, lora_params, weights (FLOPs of the base matrix products),
    adapters (LoRA's branch), attention, total.
    """
    one_of("mode", mode, MODES + ("base",))
    tokens = batch_size * cfg.block_size
    shapes = parameter_shapes(cfg)
    matmul_params = sum(
        math.prod(shape)
        for name, shape in shapes.items()
        if name.startswith("h.") and name.endswith(".weight") and len(shape) == 2
    )
    matmul_params += math.prod(shapes["wte.weight"])  # the tied head is a product; the lookup not
    lora_params = 0
    if mode == "lora":
        lora_params = lora_parameter_count(cfg.n_layer, cfg.d_model, LORA_R, LORA_TARGETS)
    per_weight = {"full": 6, "lora": 4, "base": 2}[mode]
    attention_fwd = 4 * cfg.n_layer * cfg.block_size * cfg.d_model * tokens
    out = {
        "tokens": tokens,
        "matmul_params": matmul_params,
        "lora_params": lora_params,
        "weights": per_weight * matmul_params * tokens,
        "adapters": 6 * lora_params * tokens,
        "attention": attention_fwd if mode == "base" else 3 * attention_fwd,
    }
    out["total"] = out["weights"] + out["adapters"] + out["attention"]
    return out
