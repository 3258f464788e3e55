"""minilora: LoRA taught by building it.

A small GPT made of explicit arrays, every forward and backward pass written by hand,
LoRA adapters on top, and the same code on NumPy (CPU) or CuPy (GPU).
"""

from minilora.backend import DeviceUnavailableError, get_backend, to_host
from minilora.checkpoints import load_adapter, load_model, save_adapter, save_model
from minilora.gradcheck import check_gradients, format_report, gradcheck
from minilora.lora import (
    TARGET_MODULES,
    LoraConfig,
    add_adapter,
    combine_adapters,
    delete_adapter,
    delta_weight,
    disable_adapters,
    lora_linear_backward,
    lora_linear_forward,
    merge,
    set_adapter,
    unmerge,
)
from minilora.model import GPT, GPTConfig
from minilora.optim import SGD, AdamW
from minilora.params import count_parameters

__version__ = "0.1.0"

__all__ = [
    "GPT",
    "SGD",
    "AdamW",
    "count_parameters",
    "TARGET_MODULES",
    "DeviceUnavailableError",
    "GPTConfig",
    "LoraConfig",
    "add_adapter",
    "check_gradients",
    "combine_adapters",
    "delete_adapter",
    "delta_weight",
    "disable_adapters",
    "format_report",
    "get_backend",
    "gradcheck",
    "lora_linear_backward",
    "lora_linear_forward",
    "merge",
    "set_adapter",
    "to_host",
    "unmerge",
    "load_adapter",
    "load_model",
    "save_adapter",
    "save_model",
]
