"""minilora: LoRA taught by building it.

A small GPT made of explicit arrays, every forward and backward pass written by hand,
LoRA adapters on top, and the same code on NumPy (CPU) or CuPy (GPU).
"""

from minilora.basics.backend import DeviceUnavailableError, get_backend, to_host
from minilora.basics.version import __version__
from minilora.core.adapters import (
    add_adapter,
    combine_adapters,
    delete_adapter,
    disable_adapters,
    merge,
    set_adapter,
    unmerge,
)
from minilora.core.gradcheck import check_gradients, format_report, gradcheck
from minilora.core.lora import (
    TARGET_MODULES,
    LoraBranch,
    LoraConfig,
    delta_weight,
    lora_linear_backward,
    lora_linear_forward,
)
from minilora.core.model import GPT, GPTConfig
from minilora.core.optim import SGD, AdamW
from minilora.core.params import count_parameters
from minilora.core.qlora import quantize_base
from minilora.files.checkpoints import load_adapter, load_base, load_model, save_adapter, save_model
from minilora.files.gpt2 import load_gpt2
from minilora.lab import exercises

__all__ = [
    "GPT",
    "SGD",
    "TARGET_MODULES",
    "AdamW",
    "DeviceUnavailableError",
    "GPTConfig",
    "LoraBranch",
    "LoraConfig",
    "__version__",
    "add_adapter",
    "check_gradients",
    "combine_adapters",
    "count_parameters",
    "delete_adapter",
    "delta_weight",
    "disable_adapters",
    "exercises",
    "format_report",
    "get_backend",
    "gradcheck",
    "load_adapter",
    "load_base",
    "load_gpt2",
    "load_model",
    "lora_linear_backward",
    "lora_linear_forward",
    "merge",
    "quantize_base",
    "save_adapter",
    "save_model",
    "set_adapter",
    "to_host",
    "unmerge",
]
