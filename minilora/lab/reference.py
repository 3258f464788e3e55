"""The reference setups that the benchmark and the experiments measure
(docs/DESIGN.md, "Reference configurations").

A configuration by name (tiny, small, medium, large) with its batch size, the
benchmark's adapter (LoRA r=8, alpha=16 on q, k, v, o, no dropout), a model built the
same way every time, a random batch, and one training step as it is counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minilora.basics.backend import host_rng
from minilora.basics.checks import one_of
from minilora.core.adapters import add_adapter
from minilora.core.lora import LoraConfig
from minilora.core.model import GPT, GPTConfig
from minilora.core.optim import AdamW
from minilora.core.params import preset, preset_config

CONFIGS = ("tiny", "small", "medium", "large")
"""Reference configurations (params.PRESETS); "tiny" is for the quick pass of the tests."""
DEFAULT_CONFIGS = {"cpu": ("small", "medium"), "gpu": ("large",)}
MODES = ("full", "lora")
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16.0, ("q", "k", "v", "o")
DTYPE = "float32"


def reference_config(name: str) -> tuple[GPTConfig, int]:
    """(GPTConfig, batch size) of a reference configuration."""
    one_of("config", name, CONFIGS)
    return preset_config(name), preset(name)["batch_size"]


def lora_config() -> LoraConfig:
    """The benchmark's adapter: r=8, alpha=16 on q, k, v, o, no dropout."""
    return LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules=LORA_TARGETS)


def build_model(cfg: GPTConfig, mode: str, device: str | None = None, seed: int = 0) -> GPT:
    """A float32 GPT with GPT-2's init; ``mode`` "lora" adds the benchmark's adapter.

    B is set to small random values (std 0.02) instead of 0, as after some training,
    so that the adapter changes the output and merged differs from base.
    """
    one_of("mode", mode, MODES + ("base",))
    model = GPT(cfg, seed=seed, dtype=DTYPE, device=device)
    if mode == "lora":
        add_adapter(model, lora_config())
        rng = host_rng(seed + 1)
        for name in model.params:
            if ".lora_B." in name:
                value = rng.normal(0.0, 0.02, model.params[name].shape)
                model.params[name][...] = model.backend.asarray(value, dtype=model.dtype)
    return model


def make_batch(cfg: GPTConfig, batch_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids and next-token targets (batch_size, block_size) on the host."""
    rng = host_rng(seed)
    shape = (batch_size, cfg.block_size)
    return rng.integers(0, cfg.vocab_size, shape), rng.integers(0, cfg.vocab_size, shape)


def training_step(model: GPT, opt: AdamW, idx: Any, targets: Any) -> float:
    """One step as the benchmark counts it: forward + loss, backward, AdamW, zero_grad."""
    loss = model.train().loss(idx, targets)
    model.backward()
    opt.step()
    opt.zero_grad()
    return loss
