"""Optimizers that update the model's trainable parameters in place.

They walk ``model.grads``, which holds entries for trainable parameters only, so a
frozen base costs no optimizer state at all: with LoRA, AdamW keeps two moments for
A and B and nothing for W. That is the other half of LoRA's memory saving.

LoRA+ (Hayou et al. 2024): B learns faster than A. ``AdamW(model, lr,
loraplus_lr_ratio=16)`` gives every parameter of :func:`loraplus_groups`' "B" group
the learning rate lr x ratio, and the others lr; the schedule still sets ``lr``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np

from minilora.basics.backend import finite_as, to_host
from minilora.basics.checks import in_range, non_negative_int, positive_real
from minilora.basics.parallel import by_rows
from minilora.core.model import GPT, require_gpt


def loraplus_groups(model: GPT) -> dict[str, list[str]]:
    """The trainable parameters in LoRA+'s two groups, as PEFT's create_loraplus_optimizer
    makes them: "B" learns at lr x ratio, "A" at lr.

    "B": every lora_B, and every trainable 1-D vector (DoRA's magnitude, and biases or
    layer-norm parameters if they train). "A": everything else (every lora_A, and whole
    matrices if they train). PEFT's rule is by name and by shape, ``"lora_B" in name or
    param.ndim == 1``; ours is the same rule on minilora's names.
    """
    groups: dict[str, list[str]] = {"A": [], "B": []}
    for name in require_gpt(model).trainable_names():
        fast = ".lora_B." in name or model.params[name].ndim == 1
        groups["B" if fast else "A"].append(name)
    return groups


class Optimizer:
    """Shared plumbing: the model, the learning rate, and state that can be saved.

    ``slots`` names the arrays an optimizer keeps per parameter (AdamW: "m", "v"),
    each shaped and typed like the parameter: that is the state ``state_dict`` saves.
    """

    slots: tuple[str, ...] = ()
    non_negative: tuple[str, ...] = ()  # slots that can never be negative

    def __init__(
        self, model: GPT, lr: float, weight_decay: float, loraplus_lr_ratio: float | None = None
    ) -> None:
        self.model = require_gpt(model)
        self.lr = in_range("lr", lr, 0.0)
        self.weight_decay = in_range("weight_decay", weight_decay, 0.0)
        ratio = loraplus_lr_ratio
        self.loraplus_lr_ratio = (
            None if ratio is None else positive_real("loraplus_lr_ratio", ratio)
        )
        self.t = 0  # steps taken
        self.state: dict[str, dict[str, Any]] = {}  # name -> {"m": ..., "v": ...}
        self._owners: dict[str, Any] = {}  # name -> the parameter array its state belongs to
        self._scratch: dict[str, Any] = {}  # name -> a work array for step(), not state

    def _slots(self, name: str, p: Any) -> dict[str, Any]:
        """The state of parameter ``name``: zeros the first time, and again whenever the
        name has come to mean another array (an adapter deleted and added again under
        the same name must not inherit the old one's moments)."""
        if self._owners.get(name) is not p:
            self.state[name] = {key: self.model.xp.zeros_like(p) for key in self.slots}
            self._owners[name] = p
            self._scratch.pop(name, None)
        return self.state[name]

    def _scratch_for(self, name: str, p: Any) -> Any:
        """A work array shaped like ``p``, allocated once per parameter, never saved."""
        if name not in self._scratch:
            self._scratch[name] = self.model.xp.empty_like(p)
        return self._scratch[name]

    def lr_of(self, name: str) -> float:
        """The learning rate of parameter ``name`` now: lr, or lr x ratio for LoRA+'s
        group "B" (:func:`loraplus_groups`: lora_B and trainable 1-D vectors)."""
        ratio = self.loraplus_lr_ratio
        if ratio is not None and (".lora_B." in name or self.model.params[name].ndim == 1):
            return self.lr * ratio
        return self.lr

    def zero_grad(self) -> None:
        self.model.grads = {}

    def memory_bytes(self) -> int:
        """Bytes the optimizer holds between steps: its state and its work arrays."""
        arrays = [a for slots in self.state.values() for a in slots.values()]
        return int(sum(a.nbytes for a in [*arrays, *self._scratch.values()]))

    def _decays(self, name: str) -> bool:
        """Decay matrices only (embeddings, weights, LoRA A and B), never biases or norms."""
        return self.weight_decay > 0 and self.model.params[name].ndim >= 2

    def _drop_stale(self) -> None:
        """Forget the state of parameters the model no longer has: a deleted adapter's,
        or one whose name now means another array (added again, perhaps at another rank).
        Such state could never be used again: :meth:`_slots` would start it afresh."""
        for name in [n for n, p in self._owners.items() if self.model.params.get(n) is not p]:
            del self.state[name], self._owners[name]
            self._scratch.pop(name, None)

    def state_dict(self) -> dict[str, Any]:
        """Host arrays and numbers: {"t": steps, "lr": ..., "state.NAME.SLOT": array}."""
        self._drop_stale()
        out: dict[str, Any] = {"t": self.t, "lr": self.lr}
        for name, slots in self.state.items():
            for key, value in slots.items():
                out[f"state.{name}.{key}"] = to_host(value).copy()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned. Everything is checked before anything
        changes: the keys, each parameter's slots (exactly ``slots``), and each array's
        shape (the parameter's), dtype (floating), values (finite in the model's dtype;
        AdamW's second moment v >= 0). The first problem raises one error."""
        if not isinstance(state, dict):
            raise TypeError(f"optimizer state must be a dict, got {type(state).__name__}")
        if "t" not in state or "lr" not in state:
            raise ValueError("optimizer state must be a dict with 't', 'lr' and 'state.*' entries")
        t, lr = non_negative_int("optimizer t", state["t"]), in_range("lr", state["lr"], 0.0)
        kind = type(self).__name__
        host: dict[str, dict[str, np.ndarray]] = {}
        for key, value in state.items():
            if key in ("t", "lr"):
                continue
            if not isinstance(key, str) or not key.startswith("state.") or key.count(".") < 2:
                raise ValueError(
                    f"optimizer state key {key!r} is not known; allowed: 't', 'lr', "
                    "'state.NAME.SLOT'"
                )
            name, slot = key[len("state.") :].rsplit(".", 1)
            if name not in self.model.params:
                raise ValueError(f"optimizer state for {name!r}, which the model does not have")
            if slot not in self.slots:
                raise ValueError(
                    f"optimizer state {key}: {kind} keeps no slot {slot!r}; "
                    f"its slots: {list(self.slots) or 'none'}"
                )
            value = np.asarray(to_host(value))
            shape = self.model.params[name].shape
            if np.shape(value) != shape:
                raise ValueError(
                    f"optimizer state {key}: shape {np.shape(value)} does not match {shape}"
                )
            if not np.issubdtype(value.dtype, np.floating):
                raise ValueError(
                    f"optimizer state {key}: dtype {value.dtype} is not a floating-point type"
                )
            if not finite_as(value, self.model.dtype):  # 1e300 is finite in float64 only
                raise ValueError(
                    f"optimizer state {key} contains NaN or inf (as {self.model.dtype.name})"
                )
            if slot in self.non_negative and (value < 0).any():
                raise ValueError(f"optimizer state {key} is negative somewhere; it must be >= 0")
            host.setdefault(name, {})[slot] = value
        for name, slots in host.items():
            if set(slots) != set(self.slots):
                raise ValueError(
                    f"optimizer state for {name!r} has slots {sorted(slots)}; "
                    f"{kind} keeps {list(self.slots)}"
                )
        # Everything checked: from here on the optimizer changes.
        to_device = self.model.backend.asarray
        self.state = {
            name: {slot: to_device(v, dtype=self.model.dtype) for slot, v in slots.items()}
            for name, slots in host.items()
        }
        self.t, self.lr = t, lr
        self._owners = {name: self.model.params[name] for name in host}
        self._scratch = {}  # shaped like the old parameters, which may have other shapes


class SGD(Optimizer):
    """p <- p - lr (g + momentum buffer) with optional momentum and decoupled decay."""

    def __init__(
        self, model: GPT, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        super().__init__(model, lr, weight_decay)
        self.momentum = in_range("momentum", momentum, 0.0, 1.0)
        self.slots = ("m",) if self.momentum else ()  # the momentum buffer, if any

    def step(self) -> None:
        self._drop_stale()
        self.t += 1
        for name, g in self.model.grads.items():
            p = self.model.params[name]
            if self._decays(name):
                p -= self.lr * self.weight_decay * p
            if self.momentum:
                slots = self._slots(name, p)
                slots["m"] *= self.momentum
                slots["m"] += g
                g = slots["m"]
            p -= self.lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW.

    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    p <- p - lr wd p                (decay, decoupled from the gradient)
    p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

    The defaults (``ADAMW_DEFAULTS``) are torch.optim.AdamW's, except weight_decay:
    0 here, 0.01 in torch. ``loraplus_lr_ratio``: LoRA+, lr x ratio for lora_B and
    trainable 1-D vectors (their decay too, as torch decays by each group's lr).
    """

    slots = ("m", "v")  # the first and second moments
    non_negative = ("v",)  # a mean of squares: sqrt(v) needs v >= 0

    def __init__(
        self,
        model: GPT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        loraplus_lr_ratio: float | None = None,
    ) -> None:
        super().__init__(model, lr, weight_decay, loraplus_lr_ratio)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas={betas!r} must be a pair (beta1, beta2)")
        self.b1 = in_range("betas[0]", betas[0], 0.0, 1.0)
        self.b2 = in_range("betas[1]", betas[1], 0.0, 1.0)
        self.eps = in_range("eps", eps, 0.0)

    def step(self) -> None:
        self._drop_stale()
        self.t += 1
        correction1 = 1.0 - self.b1**self.t
        correction2 = 1.0 - self.b2**self.t
        for name, g in self.model.grads.items():
            p = self.model.params[name]
            lr = self.lr_of(name)
            slots = self._slots(name, p)
            buf = self._scratch_for(name, p)  # instead of a temporary per operation
            arrays = (p, g, slots["m"], slots["v"], buf)  # updated in place, rows on all cores:
            by_rows(self._update, arrays, lr, self._decays(name), correction1, correction2)

    def _update(
        self,
        p: Any,
        g: Any,
        m: Any,
        v: Any,
        buf: Any,
        lr: float,
        decays: bool,
        c1: float,
        c2: float,
    ) -> None:
        """One AdamW update of rows of p (and of their m, v), in place, at rate lr (LoRA+
        gives B its own); c1 = 1 - b1^t, c2 = 1 - b2^t. Every element's arithmetic is its
        own: rows in any blocks agree."""
        xp = self.model.xp
        m *= self.b1
        m += xp.multiply(g, 1.0 - self.b1, out=buf)
        v *= self.b2
        xp.multiply(g, g, out=buf)
        buf *= 1.0 - self.b2
        v += buf
        if decays:
            p -= lr * self.weight_decay * p
        xp.sqrt(v, out=buf)  # the step m_hat / (sqrt(v_hat) + eps), as torch writes it:
        buf *= 1.0 / math.sqrt(c2)  # sqrt(v_hat) = sqrt(v) / sqrt(1 - b2^t)
        buf += self.eps
        xp.divide(m, buf, out=buf)
        buf *= lr / c1
        p -= buf


ADAMW_DEFAULTS: dict[str, Any] = {
    name: parameter.default
    for name, parameter in inspect.signature(AdamW).parameters.items()
    if parameter.default is not inspect.Parameter.empty and name != "loraplus_lr_ratio"
}
"""{"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}: read off
AdamW's signature, so the benchmark and the PyTorch reference use the same numbers."""
