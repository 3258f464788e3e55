"""The reference setups that the benchmark and the experiments measure
(docs/DESIGN.md, "Reference configurations").

A configuration by name (tiny, small, medium, large) with its batch size, the
benchmark's adapter (LoRA r=8, alpha=16 on q, k, v, o, no dropout), a model built the
same way every time, a random batch, and one training step as it is counted.

"gpt2" is GPT-2 small (124M parameters, random weights with GPT-2's init), opt-in:
the question a learner asks ("can I fine-tune GPT-2 on my laptop?"), with GPT-2's usual
LoRA (r=8, alpha=16 on q and v), batch 4 of 128 tokens, against transformers + PEFT.
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

CONFIGS = ("tiny", "small", "medium", "large", "gpt2")
"""Reference configurations (params.PRESETS); "tiny" is for the quick pass of the tests;
"gpt2" (GPT-2 small, params.PRESETS) only when asked for."""
DEFAULT_CONFIGS = {"cpu": ("small", "medium"), "gpu": ("large",)}
MODES = ("full", "lora")
LORA_R, LORA_ALPHA, LORA_TARGETS = 8, 16.0, ("q", "k", "v", "o")
DTYPE = "float32"
GPT2_PRESET = "gpt2"  # params.PRESETS: GPT-2 small's shape, 1024 positions in wpe
GPT2_BATCH, GPT2_SEQ = 4, 128  # a step: 4 sequences of 128 tokens
GPT2_TARGETS = ("q", "v")


def reference_config(name: str) -> tuple[GPTConfig, int]:
    """(GPTConfig, batch size) of a reference configuration (gpt2: :func:`gpt2_setup`)."""
    one_of("config", name, CONFIGS[:-1])
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


def make_batch(
    cfg: GPTConfig, batch_size: int, seed: int = 0, seq_len: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Random token ids and next-token targets (batch_size, seq_len) on the host;
    ``seq_len`` default: the config's block_size."""
    rng = host_rng(seed)
    shape = (batch_size, cfg.block_size if seq_len is None else seq_len)
    return rng.integers(0, cfg.vocab_size, shape), rng.integers(0, cfg.vocab_size, shape)


def training_step(model: GPT, opt: AdamW, idx: Any, targets: Any) -> float:
    """One step as the benchmark counts it: forward + loss, backward, AdamW, zero_grad."""
    loss = model.train().loss(idx, targets)
    model.backward()
    opt.step()
    opt.zero_grad()
    return loss


# ---------------------------------------------------------------- GPT-2 small, opt-in
def gpt2_setup() -> tuple[GPTConfig, int, int]:
    """(GPTConfig, batch size, tokens per sequence) of the "gpt2" configuration: read
    from GPT2_PRESET, GPT2_BATCH and GPT2_SEQ when called (the tests shrink them).
    GPTConfig's defaults are GPT-2's: no dropout, layer norm eps 1e-5."""
    return preset_config(GPT2_PRESET), GPT2_BATCH, GPT2_SEQ


def gpt2_lora_config() -> LoraConfig:
    """The gpt2 configuration's adapter: r=8, alpha=16 on q and v, no dropout."""
    return LoraConfig(r=LORA_R, alpha=LORA_ALPHA, dropout=0.0, target_modules=GPT2_TARGETS)


def build_gpt2_model(cfg: GPTConfig, device: str | None = None, seed: int = 0) -> GPT:
    """GPT-2 small with GPT-2's init (float32) and the gpt2 adapter, as after some training.

    B ~ N(0, 0.02^2) instead of 0, and v's A is q's A in every block: then q's and v's
    update, s [B_q A_q; 0; B_v A_q] on the fused c_attn, has rank r, so PEFT's own r=8
    adapter on c_attn computes exactly the same function (torch_reference.peft_gpt2),
    and the logits can be compared before the timing.
    """
    model = GPT(cfg, seed=seed, dtype=DTYPE, device=device)
    add_adapter(model, gpt2_lora_config())
    rng = host_rng(seed + 1)
    for i in range(cfg.n_layer):
        A_q = model.params[f"h.{i}.attn.q.lora_A.default"]
        model.params[f"h.{i}.attn.v.lora_A.default"][...] = A_q
        for t in GPT2_TARGETS:
            B = model.params[f"h.{i}.attn.{t}.lora_B.default"]
            B[...] = model.backend.asarray(rng.normal(0.0, 0.02, B.shape), dtype=model.dtype)
    return model
