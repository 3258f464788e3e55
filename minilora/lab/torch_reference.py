"""An independent implementation of the same GPT in PyTorch, for checks and benchmarks.

It shares no code with the NumPy model: it reads a minilora state dict ((d_out, d_in)
weights, head tied to ``wte``; docs/DESIGN.md, "Parameter names"), builds torch tensors from it and
runs the architecture written out with torch's own layer norm, tanh GELU, softmax and
autograd. ``tests/test_torch_reference.py`` compares logits, loss and every gradient
against it; ``bench.py`` times its training step next to minilora's.

The gpt2 benchmark's reference is not this model but the one a learner would use:
transformers' GPT2LMHeadModel with PEFT's LoRA (:func:`peft_gpt2`), given the same
weights and the same adapter.

PyTorch is optional (the ``ref`` extra): this module imports without it, and torch is
imported only inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from minilora.basics.backend import to_host
from minilora.core.model import GPT
from minilora.core.optim import ADAMW_DEFAULTS
from minilora.files.gpt2 import PREFIX, hf_config, to_gpt2

Tensor = Any  # a torch.Tensor (torch is imported lazily)


def torch_available() -> tuple[bool, str]:
    """(True, version) when PyTorch imports, else (False, the reason)."""
    try:
        import torch
    except ImportError as err:
        return False, f"PyTorch is not installed ({err}); pip install -e '.[ref]'"
    return True, torch.__version__


def to_torch_state(
    state: Mapping[str, Any],
    requires_grad: bool | Iterable[str] = False,
    dtype: Any = None,
    device: str = "cpu",
) -> dict[str, Tensor]:
    """Torch copies of a minilora state dict, name by name (host or device arrays in).

    ``requires_grad``: True for every tensor, or the names that should receive
    gradients (the LoRA A and B for a LoRA step). ``dtype``: a torch dtype, default
    the arrays' own (float32 stays float32, float64 stays float64).
    """
    import torch

    wanted = set(state) if requires_grad is True else set(requires_grad or ())
    out = {}
    for name, value in state.items():
        t = torch.tensor(np.ascontiguousarray(to_host(value)), dtype=dtype, device=device)
        out[name] = t.requires_grad_(name in wanted)
    return out


def lora_modules(state: Mapping[str, Any], adapter: str = "default") -> list[str]:
    """The modules that carry adapter ``adapter`` ("h.0.attn.q", ...), in state order."""
    marker = f".lora_A.{adapter}"
    return [name[: -len(marker)] for name in state if name.endswith(marker)]


def lora_branches(
    sd: Mapping[str, Tensor], scale: float, adapter: str = "default"
) -> dict[str, tuple[Tensor, Tensor, float]]:
    """{module: (A, B, s)} for every module of ``adapter`` in the torch state ``sd``."""
    return {
        m: (sd[f"{m}.lora_A.{adapter}"], sd[f"{m}.lora_B.{adapter}"], scale)
        for m in lora_modules(sd, adapter)
    }


def torch_forward(
    sd: Mapping[str, Tensor],
    cfg: Any,
    idx: Tensor,
    lora: Mapping[str, tuple[Tensor, Tensor, float]] | None = None,
    masks: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Logits (B, T, V) for ids ``idx`` (B, T), in torch: docs/DESIGN.md, "The model".

    ``sd``: torch state (:func:`to_torch_state`); ``cfg``: anything with ``n_layer``,
    ``n_head``, ``d_model`` (a GPTConfig). ``lora``: {module: (A, B, s)} adds
    s (D(x) A^T) B^T to that linear; ``masks``: {module: dropout multiplier} for D
    (absent: no dropout). Base dropout is not modelled (the references use 0).
    """
    import torch
    import torch.nn.functional as F

    B, T = idx.shape
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    H, C = cfg.n_head, cfg.d_model
    future = torch.triu(torch.ones(T, T, dtype=torch.bool, device=x.device), 1)

    def linear(module: str, x: Tensor) -> Tensor:
        y = x @ sd[f"{module}.weight"].T + sd[f"{module}.bias"]
        if lora and module in lora:
            A, Bm, s = lora[module]
            xd = x * masks[module] if masks else x
            y = y + s * (xd @ A.T) @ Bm.T
        return y

    for i in range(cfg.n_layer):
        h = f"h.{i}"
        a = F.layer_norm(x, (C,), sd[f"{h}.ln_1.weight"], sd[f"{h}.ln_1.bias"], eps=1e-5)
        q, k, v = (linear(f"{h}.attn.{t}", a) for t in "qkv")
        q, k, v = (z.view(B, T, H, C // H).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // H)
        att = att.masked_fill(future, float("-inf"))
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        x = x + linear(f"{h}.attn.o", y)
        m = F.layer_norm(x, (C,), sd[f"{h}.ln_2.weight"], sd[f"{h}.ln_2.bias"], eps=1e-5)
        m = F.gelu(linear(f"{h}.mlp.fc", m), approximate="tanh")
        x = x + linear(f"{h}.mlp.proj", m)
    x = F.layer_norm(x, (C,), sd["ln_f.weight"], sd["ln_f.bias"], eps=1e-5)
    return x @ sd["wte.weight"].T


def torch_loss(logits: Tensor, targets: Tensor, ignore_index: int = -1) -> Tensor:
    """Mean cross-entropy over counted positions (targets == ignore_index do not count)."""
    import torch.nn.functional as F

    V = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index)


def torch_training_step(
    state: Mapping[str, Any],
    cfg: Any,
    lora_scale: float | None = None,
    lr: float = ADAMW_DEFAULTS["lr"],
    device: str = "cpu",
) -> tuple[Callable[[Any, Any], float], dict[str, Tensor]]:
    """A PyTorch eager training step on a copy of ``state``: forward, loss, backward, AdamW.

    Full fine-tuning (``lora_scale`` None) trains every tensor; LoRA (``lora_scale`` =
    s) trains only the ``lora_A`` / ``lora_B`` tensors of adapter "default", as
    minilora does. AdamW has minilora's defaults (betas 0.9, 0.999, eps 1e-8, weight
    decay 0). Returns (step, sd): ``step(idx, targets)`` takes host integer arrays and
    returns the loss; ``sd`` is the live torch state.
    """
    import torch

    trainable = [n for n in state if lora_scale is None or ".lora_" in n]
    sd = to_torch_state(state, requires_grad=trainable, device=device)
    lora = None if lora_scale is None else lora_branches(sd, lora_scale)
    opt = torch.optim.AdamW([sd[n] for n in trainable], **{**ADAMW_DEFAULTS, "lr": lr})

    def step(idx: Any, targets: Any) -> float:
        ids = torch.as_tensor(np.asarray(idx), dtype=torch.long, device=device)
        tgt = torch.as_tensor(np.asarray(targets), dtype=torch.long, device=device)
        loss = torch_loss(torch_forward(sd, cfg, ids, lora), tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # frees the gradients, as minilora's zero_grad
        return float(loss.detach())

    return step, sd


# ------------------------------------------------------------ the comparison
@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Give PyTorch the BLAS's thread count for the block, then restore its own."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_logit_difference(model: GPT, idx: Any) -> float:
    """max |logits(minilora) - logits(torch_reference)| for the same weights and ids.

    Checks that the PyTorch model being timed is the same model (float32 rounding only).
    """
    import torch

    state = model.state_dict()
    sd = to_torch_state(state)
    adapters = model.active_adapters
    lora = None
    if adapters:
        scale = model.adapters[adapters[0]].config.scale
        lora = lora_branches(sd, scale, adapters[0])
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        ref = torch_forward(sd, model.config, ids, lora).numpy()
    ours = to_host(model.forward(idx)).astype(np.float64)
    return float(np.max(np.abs(ours - ref)))


# ------------------------------------------------- GPT-2 in transformers + PEFT
def peft_available() -> tuple[bool, str]:
    """(True, versions) when torch, transformers and peft import, else (False, the reason)."""
    try:
        import peft
        import torch
        import transformers
    except ImportError as err:
        return False, f"{err}; pip install -e '.[ref]'"
    return True, f"PyTorch {torch.__version__}, transformers {transformers.__version__}, " + (
        f"PEFT {peft.__version__}"
    )


def peft_gpt2(model: GPT, lr: float = ADAMW_DEFAULTS["lr"]) -> dict[str, Any]:
    """``model`` as a learner would train it in PyTorch: GPT2LMHeadModel + PEFT LoRA.

    transformers' GPT-2 gets ``model``'s base weights (files.gpt2.to_gpt2: fused,
    transposed; the head tied to wte); PEFT's LoRA with the adapter's r and alpha sits on
    the fused ``c_attn``, holding minilora's q, k, v adapters: A is their common A (they
    must share it, as reference.build_gpt2_model makes them), B their B's in their row
    blocks, zeros for a module without one. Same function, same number of trainable
    numbers when q and v are adapted: r (d + 3d) per block = 2 r (d + d). The optimizer
    is torch's AdamW with minilora's defaults. Returns {"model": the PeftModel in
    training mode, "optimizer", "step": step(idx, targets) -> loss (host int arrays in,
    forward + loss + backward + AdamW + zero_grad), "trainable": count, "attention":
    transformers' attention implementation}.
    """
    import peft
    import torch
    import transformers

    adapter = model.adapters[model.active_adapters[0]]
    config, name, cfg = adapter.config, adapter.name, model.config
    qkv = [t for t in "qkv" if t in config.target_modules]
    if not qkv or len(qkv) != len(config.target_modules):
        raise ValueError(f"peft_gpt2 maps q, k, v adapters only; targets {config.target_modules}")
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config(cfg, model.dtype)))
    base = {n: to_host(model.params[n]) for n in model.base_names()}
    state = {PREFIX + k: torch.from_numpy(v) for k, v in to_gpt2(base, cfg).items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is wte, tied
        raise ValueError(f"GPT-2 state: missing {missing}, unexpected {unexpected}")
    lora = peft.LoraConfig(
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=0.0,
        target_modules=["c_attn"],
        fan_in_fan_out=True,  # Conv1D stores W as (d_in, d_out)
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = peft.get_peft_model(hf, lora)
    d = cfg.d_model
    with torch.no_grad():
        for i in range(cfg.n_layer):
            A = [to_host(model.params[f"h.{i}.attn.{t}.lora_A.{name}"]) for t in qkv]
            if any(not np.array_equal(a, A[0]) for a in A):
                raise ValueError(f"block {i}: the q, k, v adapters must share A (rank r on c_attn)")
            B_c = np.zeros((3 * d, config.r), dtype=A[0].dtype)
            for t in qkv:
                j = "qkv".index(t)
                B_c[j * d : (j + 1) * d] = to_host(model.params[f"h.{i}.attn.{t}.lora_B.{name}"])
            c_attn = peft_model.base_model.model.transformer.h[i].attn.c_attn
            c_attn.lora_A["default"].weight.copy_(torch.from_numpy(A[0]))
            c_attn.lora_B["default"].weight.copy_(torch.from_numpy(B_c))
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, **{**ADAMW_DEFAULTS, "lr": lr})
    peft_model.train()  # every dropout probability is 0 (hf_config of a dropout-0 model)

    def step(idx: Any, targets: Any) -> float:
        ids = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        tgt = torch.as_tensor(np.asarray(targets), dtype=torch.long)
        loss = torch_loss(peft_model(input_ids=ids, use_cache=False).logits, tgt)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return {
        "model": peft_model,
        "optimizer": opt,
        "step": step,
        "trainable": int(sum(p.numel() for p in trainable)),
        "attention": getattr(hf.config, "_attn_implementation", None),
    }


def peft_logit_difference(model: GPT, peft_model: Any, idx: Any) -> dict[str, float]:
    """max |logits(minilora) - logits(PEFT)| and max |logit| for the same ids, both in
    evaluation mode (PEFT's model is put back into training mode)."""
    import torch

    peft_model.eval()
    with torch.no_grad():
        ids = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        ref = peft_model(input_ids=ids, use_cache=False).logits.numpy().astype(np.float64)
    peft_model.train()
    ours = to_host(model.eval().forward(idx)).astype(np.float64)
    model.train()
    return {"max_abs_diff": float(np.max(np.abs(ours - ref))), "max_abs": float(np.abs(ref).max())}


def torch_state_bytes(peft_model: Any, optimizer: Any) -> dict[str, int]:
    """Bytes of every parameter (tied ones once) and of the optimizer's state tensors."""
    import torch

    weights = sum(p.numel() * p.element_size() for p in peft_model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "weights": int(weights),
        "optimizer": int(sum(t.numel() * t.element_size() for t in state)),
    }
