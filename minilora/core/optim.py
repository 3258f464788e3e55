"""Optimizers that update the model's trainable parameters in place.

They walk ``model.grads``, which holds entries for trainable parameters only, so a
frozen base costs no optimizer state at all: with LoRA, AdamW keeps two moments for
A and B and nothing for W. That is the other half of LoRA's memory saving.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from minilora.basics.backend import to_host
from minilora.basics.checks import in_range, non_negative_int


class Optimizer:
    """Shared plumbing: the model, the learning rate, and state that can be saved."""

    def __init__(self, model: Any, lr: float, weight_decay: float) -> None:
        self.model = model
        self.lr = in_range("lr", lr, 0.0)
        self.weight_decay = in_range("weight_decay", weight_decay, 0.0)
        self.t = 0  # steps taken
        self.state: dict[str, dict[str, Any]] = {}  # name -> {"m": ..., "v": ...}
        self._owners: dict[str, Any] = {}  # name -> the parameter array its state belongs to
        self._scratch: dict[str, Any] = {}  # name -> a work array for step(), not state

    def _slots(self, name: str, p: Any, keys: tuple[str, ...]) -> dict[str, Any]:
        """The state of parameter ``name``: zeros the first time, and again whenever the
        name has come to mean another array (an adapter deleted and added again under
        the same name must not inherit the old one's moments)."""
        if self._owners.get(name) is not p:
            self.state[name] = {key: self.model.xp.zeros_like(p) for key in keys}
            self._owners[name] = p
            self._scratch.pop(name, None)
        return self.state[name]

    def _scratch_for(self, name: str, p: Any) -> Any:
        """A work array shaped like ``p``, allocated once per parameter, never saved."""
        if name not in self._scratch:
            self._scratch[name] = self.model.xp.empty_like(p)
        return self._scratch[name]

    def zero_grad(self) -> None:
        self.model.grads = {}

    def memory_bytes(self) -> int:
        """Bytes the optimizer holds between steps: its state and its work arrays."""
        arrays = [a for slots in self.state.values() for a in slots.values()]
        return int(sum(a.nbytes for a in [*arrays, *self._scratch.values()]))

    def _decays(self, name: str) -> bool:
        """Decay matrices only (embeddings, weights, LoRA A and B), never biases or norms."""
        return self.weight_decay > 0 and self.model.params[name].ndim >= 2

    def state_dict(self) -> dict[str, Any]:
        """Host arrays and numbers: {"t": steps, "lr": ..., "state.NAME.KEY": array}."""
        out: dict[str, Any] = {"t": self.t, "lr": self.lr}
        for name, slots in self.state.items():
            for key, value in slots.items():
                out[f"state.{name}.{key}"] = to_host(value).copy()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (checked before anything changes)."""
        if not isinstance(state, dict) or "t" not in state or "lr" not in state:
            raise ValueError("optimizer state must be a dict with 't', 'lr' and 'state.*' entries")
        slots: dict[str, dict[str, Any]] = {}
        for key, value in state.items():
            if not key.startswith("state."):
                continue
            name, slot = key[len("state.") :].rsplit(".", 1)
            if name not in self.model.params:
                raise ValueError(f"optimizer state for {name!r}, which the model does not have")
            if np.shape(value) != self.model.params[name].shape:
                raise ValueError(
                    f"optimizer state {key}: shape {np.shape(value)} does not match "
                    f"{self.model.params[name].shape}"
                )
            slots.setdefault(name, {})[slot] = self.model.backend.asarray(
                value, dtype=self.model.dtype
            )
        t, lr = non_negative_int("optimizer t", state["t"]), in_range("lr", state["lr"], 0.0)
        self.t, self.lr, self.state = t, lr, slots
        self._owners = {name: self.model.params[name] for name in slots}


class SGD(Optimizer):
    """p <- p - lr (g + momentum buffer) with optional momentum and decoupled decay."""

    def __init__(
        self, model: Any, lr: float = 1e-2, momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        super().__init__(model, lr, weight_decay)
        self.momentum = in_range("momentum", momentum, 0.0, 1.0)

    def step(self) -> None:
        self.t += 1
        for name, g in self.model.grads.items():
            p = self.model.params[name]
            if self._decays(name):
                p -= self.lr * self.weight_decay * p
            if self.momentum:
                slots = self._slots(name, p, ("m",))
                slots["m"] *= self.momentum
                slots["m"] += g
                g = slots["m"]
            p -= self.lr * g


class AdamW(Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), as torch.optim.AdamW.

    m <- b1 m + (1 - b1) g          v <- b2 v + (1 - b2) g^2
    p <- p - lr wd p                (decay, decoupled from the gradient)
    p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(
        self,
        model: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(model, lr, weight_decay)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas={betas!r} must be a pair (beta1, beta2)")
        self.b1 = in_range("betas[0]", betas[0], 0.0, 1.0)
        self.b2 = in_range("betas[1]", betas[1], 0.0, 1.0)
        self.eps = in_range("eps", eps, 0.0)

    def step(self) -> None:
        self.t += 1
        xp = self.model.xp
        correction1 = 1.0 - self.b1**self.t
        correction2 = 1.0 - self.b2**self.t
        for name, g in self.model.grads.items():
            p = self.model.params[name]
            slots = self._slots(name, p, ("m", "v"))
            m, v = slots["m"], slots["v"]
            buf = self._scratch_for(name, p)  # instead of a temporary per operation
            m *= self.b1
            m += xp.multiply(g, 1.0 - self.b1, out=buf)
            v *= self.b2
            xp.multiply(g, g, out=buf)
            buf *= 1.0 - self.b2
            v += buf
            if self._decays(name):
                p -= self.lr * self.weight_decay * p
            xp.sqrt(v, out=buf)  # the step m_hat / (sqrt(v_hat) + eps), as torch writes it:
            buf *= 1.0 / math.sqrt(correction2)  # sqrt(v_hat) = sqrt(v) / sqrt(1 - b2^t)
            buf += self.eps
            xp.divide(m, buf, out=buf)
            buf *= self.lr / correction1
            p -= buf
