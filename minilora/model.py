"""A GPT-2 style decoder built from the forward/backward pairs in ``layers.py``.

    x = wte[idx] + wpe[0..T)                               (B, T, C)
    for each block i:
        x = x + o(attention(q(ln_1(x)), k(ln_1(x)), v(ln_1(x))))
        x = x + proj(gelu(fc(ln_2(x))))
    logits = ln_f(x) wte^T                                  (B, T, V), head tied to wte

``GPT.forward`` calls the pairs in this order; ``GPT.backward`` calls their backwards in
the reverse order, one per line, so the two read as mirror images. Every linear goes
through ``_linear``, which adds the branches of active LoRA adapters (lora.py).

All parameters live in one flat dict, ``model.params``, under GPT-2's dotted names
(DESIGN.md). ``model.grads`` has the same keys, for trainable parameters only: a
frozen parameter never gets a gradient buffer.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np

from minilora.backend import get_backend, host_rng, resolve_dtype, to_host
from minilora.layers import (
    IGNORE_INDEX,
    attention_backward,
    attention_forward,
    cross_entropy_backward,
    cross_entropy_forward,
    dropout_backward,
    dropout_forward,
    dropout_mask,
    embedding_backward,
    embedding_forward,
    gelu_backward,
    gelu_forward,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    residual_backward,
    residual_forward,
)
from minilora.lora import lora_backward, lora_forward, lora_names

Array = Any


@dataclass(frozen=True)
class GPTConfig:
    """The architecture's sizes. ``d_model`` must divide evenly into ``n_head`` heads."""

    vocab_size: int = 96
    block_size: int = 64
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0  # residual and embedding dropout of the base model

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GPTConfig {name}={value!r} must be a positive integer")
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"allowed n_head: divisors of {self.d_model}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig dropout={self.dropout!r} must satisfy 0 <= dropout < 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = set(cls.__dataclass_fields__)
        if not isinstance(d, dict) or set(d) - known:
            raise ValueError(f"not a GPT config: {d!r}; allowed keys: {sorted(known)}")
        return cls(**d)


def parameter_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every base parameter's name and shape, in a fixed order (the init order)."""
    C, V = cfg.d_model, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (V, C), "wpe.weight": (cfg.block_size, C)}
    for i in range(cfg.n_layer):
        h = f"h.{i}"
        shapes[f"{h}.ln_1.weight"] = shapes[f"{h}.ln_1.bias"] = (C,)
        for t in ("q", "k", "v", "o"):
            shapes[f"{h}.attn.{t}.weight"], shapes[f"{h}.attn.{t}.bias"] = (C, C), (C,)
        shapes[f"{h}.ln_2.weight"] = shapes[f"{h}.ln_2.bias"] = (C,)
        shapes[f"{h}.mlp.fc.weight"], shapes[f"{h}.mlp.fc.bias"] = (4 * C, C), (4 * C,)
        shapes[f"{h}.mlp.proj.weight"], shapes[f"{h}.mlp.proj.bias"] = (C, 4 * C), (C,)
    shapes["ln_f.weight"] = shapes["ln_f.bias"] = (C,)
    return shapes


def init_parameters(cfg: GPTConfig, seed: int, dtype: Any) -> dict[str, np.ndarray]:
    """GPT-2's initialisation, drawn on the host so every device gets the same weights.

    Matrices ~ N(0, 0.02^2); the two projections that write into the residual stream
    (attn.o, mlp.proj) use 0.02 / sqrt(2 n_layer), so the stream's variance does not grow
    with depth; biases 0; layer-norm weights 1.
    """
    rng = host_rng(seed)
    residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    params = {}
    for name, shape in parameter_shapes(cfg).items():
        if name.endswith("bias"):
            value = np.zeros(shape)
        elif ".ln_" in name or name.startswith("ln_"):
            value = np.ones(shape)
        elif name.endswith(("attn.o.weight", "mlp.proj.weight")):
            value = rng.normal(0.0, residual_std, shape)
        else:
            value = rng.normal(0.0, 0.02, shape)
        params[name] = value.astype(dtype)
    return params


class BlockCache(NamedTuple):
    ln_1: Any
    q: Any
    k: Any
    v: Any
    attn: Any
    o: Any
    drop_attn: Any
    ln_2: Any
    fc: Any
    gelu: Any
    proj: Any
    drop_mlp: Any


class GPT:
    """The model: parameters in a flat dict, forward/backward written out by hand.

    >>> model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, d_model=32))
    >>> model.forward(np.zeros((1, 4), dtype=np.int64)).shape
    (1, 4, 65)
    """

    def __init__(
        self, config: GPTConfig, seed: int = 0, dtype: Any = "float32", device: str | None = None
    ) -> None:
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer")
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.backend = get_backend(device)
        self.device = self.backend.device
        self.xp = self.backend.xp
        self.seed = int(seed)
        self.params: dict[str, Array] = {
            name: self.backend.asarray(value)
            for name, value in init_parameters(config, seed, self.dtype).items()
        }
        self.grads: dict[str, Array] = {}
        self.frozen: set[str] = set()
        # LoRA state, managed by the functions in lora.py
        self.adapters: dict[str, Any] = {}  # name -> lora.Adapter
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.rng = self.backend.rng(seed)  # dropout masks
        self._cache: tuple | None = None

    def __repr__(self) -> str:
        c = self.config
        return (
            f"GPT(n_layer={c.n_layer}, n_head={c.n_head}, d_model={c.d_model}, "
            f"vocab_size={c.vocab_size}, block_size={c.block_size}, dtype={self.dtype.name}, "
            f"device={self.device!r}, adapters={list(self.adapters)})"
        )

    # ------------------------------------------------------------- trainability
    def trainable_names(self) -> list[str]:
        """Names of the parameters that receive gradients, in ``params`` order."""
        return [name for name in self.params if name not in self.frozen]

    def is_trainable(self, name: str) -> bool:
        return name in self.params and name not in self.frozen

    def _match(self, patterns: tuple[str, ...]) -> list[str]:
        names = []
        for pattern in patterns:
            hits = fnmatch.filter(self.params, pattern)
            if not hits:
                raise ValueError(
                    f"{pattern!r} matches no parameter (e.g. 'h.0.attn.q.weight', 'h.*')"
                )
            names += hits
        return names

    def freeze(self, *patterns: str) -> None:
        """Stop gradients for parameters matching the glob patterns (e.g. "h.*.ln_1.*")."""
        self.frozen.update(self._match(patterns))

    def unfreeze(self, *patterns: str) -> None:
        """Let parameters matching the glob patterns receive gradients again."""
        self.frozen.difference_update(self._match(patterns))

    def reseed(self, seed: int) -> None:
        """Restart the dropout generator (a fixed seed gives fixed dropout masks)."""
        self.rng = self.backend.rng(seed)

    # ------------------------------------------------------------------ checks
    def _as_ids(
        self, ids: Any, what: str, allow_ignore: bool = False, any_length: bool = False
    ) -> Array:
        """Validate token ids on the host before any array work, then move them."""
        host = to_host(ids) if not isinstance(ids, (list, tuple)) else np.asarray(ids)
        if host.dtype == bool or not np.issubdtype(host.dtype, np.integer):
            raise ValueError(f"{what} must be an integer array, got dtype {host.dtype}")
        if host.ndim != 2:
            raise ValueError(f"{what} must have shape (B, T), got shape {host.shape}")
        B, T = host.shape
        if B < 1 or T < 1:
            raise ValueError(f"{what} shape {host.shape} is empty; need B >= 1 and T >= 1")
        if T > self.config.block_size and not any_length:
            raise ValueError(
                f"{what} has T={T} tokens but block_size={self.config.block_size} is the most"
            )
        V = self.config.vocab_size
        bad = (host < 0) | (host >= V)
        if allow_ignore:
            bad &= host != IGNORE_INDEX
        if bad.any():
            value = host[bad].flat[0]
            allowed = f"0..{V - 1}" + (f" or {IGNORE_INDEX} (ignored)" if allow_ignore else "")
            raise ValueError(f"{what} contains {value}, outside the vocabulary; allowed: {allowed}")
        return self.xp.asarray(host, dtype=np.int64)

    # ----------------------------------------------------------------- forward
    def _linear(self, module: str, x: Array, train: bool) -> tuple[Array, tuple]:
        """y = x W^T + b + sum over active adapters of s (D(x) A^T) B^T."""
        p = self.params
        y, base_cache = linear_forward(x, p[f"{module}.weight"], p[f"{module}.bias"])
        branches = []
        for name in self._live_adapters(module):
            A_name, B_name = lora_names(module, name)
            config = self.adapters[name].config
            mask = dropout_mask(x.shape, config.dropout, self.rng, self.dtype) if train else None
            delta, lora_cache = lora_forward(x, p[A_name], p[B_name], config.scale, mask)
            y = y + delta
            branches.append((A_name, B_name, lora_cache))
        return y, (module, base_cache, branches)

    def _live_adapters(self, module: str) -> list[str]:
        """Active adapters on ``module`` whose update is not already merged into W."""
        return [
            name
            for name in self.active_adapters
            if name not in self.merged_adapters and module in self.adapters[name].modules
        ]

    def _dropout(self, x: Array, train: bool) -> tuple[Array, Array | None]:
        p = self.config.dropout
        mask = dropout_mask(x.shape, p, self.rng, self.dtype) if train else None
        return dropout_forward(x, mask)

    def _block_forward(self, i: int, x: Array, train: bool) -> tuple[Array, BlockCache]:
        p, h = self.params, f"h.{i}"
        a, c_ln_1 = layer_norm_forward(x, p[f"{h}.ln_1.weight"], p[f"{h}.ln_1.bias"])
        q, c_q = self._linear(f"{h}.attn.q", a, train)
        k, c_k = self._linear(f"{h}.attn.k", a, train)
        v, c_v = self._linear(f"{h}.attn.v", a, train)
        a, c_attn = attention_forward(q, k, v, self.config.n_head)
        a, c_o = self._linear(f"{h}.attn.o", a, train)
        a, c_drop_attn = self._dropout(a, train)
        x, _ = residual_forward(x, a)
        m, c_ln_2 = layer_norm_forward(x, p[f"{h}.ln_2.weight"], p[f"{h}.ln_2.bias"])
        m, c_fc = self._linear(f"{h}.mlp.fc", m, train)
        m, c_gelu = gelu_forward(m)
        m, c_proj = self._linear(f"{h}.mlp.proj", m, train)
        m, c_drop_mlp = self._dropout(m, train)
        x, _ = residual_forward(x, m)
        cache = BlockCache(
            c_ln_1,
            c_q,
            c_k,
            c_v,
            c_attn,
            c_o,
            c_drop_attn,
            c_ln_2,
            c_fc,
            c_gelu,
            c_proj,
            c_drop_mlp,
        )
        return x, cache

    def _forward(self, idx: Array, train: bool) -> tuple[Array, tuple]:
        p = self.params
        T = idx.shape[1]
        tok, c_tok = embedding_forward(idx, p["wte.weight"])  # (B, T, C)
        pos, c_pos = embedding_forward(self.xp.arange(T), p["wpe.weight"])  # (T, C)
        x = tok + pos  # broadcast over the batch
        x, c_drop = self._dropout(x, train)
        c_blocks = []
        for i in range(self.config.n_layer):
            x, c_block = self._block_forward(i, x, train)
            c_blocks.append(c_block)
        x, c_ln_f = layer_norm_forward(x, p["ln_f.weight"], p["ln_f.bias"])
        logits, c_head = linear_forward(x, p["wte.weight"])  # tied head: x wte^T
        return logits, (c_tok, c_pos, c_drop, c_blocks, c_ln_f, c_head)

    def forward(self, idx: Any, train: bool = False) -> Array:
        """Logits (B, T, V) for token ids ``idx`` (B, T). ``train`` turns dropout on."""
        logits, _ = self._forward(self._as_ids(idx, "idx"), train)
        return logits

    def loss(self, idx: Any, targets: Any, train: bool = True) -> float:
        """Mean cross-entropy of next-token prediction; keeps the caches for ``backward``.

        ``targets`` (B, T): the token that should follow each position, or -1 for
        positions that do not count.
        """
        if train and self.merged_adapters:
            raise ValueError(
                f"adapters {self.merged_adapters} are merged into W; training them now would "
                "train W instead. Call unmerge(model) before training"
            )
        idx = self._as_ids(idx, "idx")
        targets = self._as_ids(targets, "targets", allow_ignore=True)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {targets.shape} must equal idx shape {idx.shape}")
        logits, cache = self._forward(idx, train)
        loss, c_loss = cross_entropy_forward(logits, targets)
        self._cache = (cache, c_loss)
        return loss

    # ---------------------------------------------------------------- backward
    def _grad(self, name: str, g: Array | None) -> None:
        """Record a gradient, summing when a parameter is used twice (the tied wte)."""
        if g is None:
            return
        self.grads[name] = self.grads[name] + g if name in self.grads else g

    def _linear_backward(self, dy: Array, cache: tuple) -> Array:
        module, base_cache, branches = cache
        dx, dW, db = linear_backward(
            dy,
            base_cache,
            need_dW=self.is_trainable(f"{module}.weight"),  # frozen: pass dx through only
            need_db=self.is_trainable(f"{module}.bias"),
        )
        self._grad(f"{module}.weight", dW)
        self._grad(f"{module}.bias", db)
        for A_name, B_name, lora_cache in branches:
            dx_lora, dA, dB = lora_backward(
                dy, lora_cache, self.is_trainable(A_name), self.is_trainable(B_name)
            )
            dx = dx + dx_lora
            self._grad(A_name, dA)
            self._grad(B_name, dB)
        return dx

    def _layer_norm_backward(self, dy: Array, cache: Any, ln: str) -> Array:
        need = self.is_trainable(f"{ln}.weight") or self.is_trainable(f"{ln}.bias")
        dx, dweight, dbias = layer_norm_backward(dy, cache, need_dparams=need)
        if self.is_trainable(f"{ln}.weight"):
            self._grad(f"{ln}.weight", dweight)
        if self.is_trainable(f"{ln}.bias"):
            self._grad(f"{ln}.bias", dbias)
        return dx

    def _block_backward(self, i: int, dx: Array, c: BlockCache) -> Array:
        h = f"h.{i}"
        # x = x + dropout(proj(gelu(fc(ln_2(x)))))
        dx, dm = residual_backward(dx)
        dm = dropout_backward(dm, c.drop_mlp)
        dm = self._linear_backward(dm, c.proj)
        dm = gelu_backward(dm, c.gelu)
        dm = self._linear_backward(dm, c.fc)
        dx = dx + self._layer_norm_backward(dm, c.ln_2, f"{h}.ln_2")
        # x = x + dropout(o(attention(q(a), k(a), v(a)))),  a = ln_1(x)
        dx, da = residual_backward(dx)
        da = dropout_backward(da, c.drop_attn)
        da = self._linear_backward(da, c.o)
        dq, dk, dv = attention_backward(da, c.attn)
        da = self._linear_backward(dq, c.q) + self._linear_backward(dk, c.k)
        da = da + self._linear_backward(dv, c.v)
        dx = dx + self._layer_norm_backward(da, c.ln_1, f"{h}.ln_1")
        return dx

    def backward(self) -> None:
        """Fill ``self.grads`` for the trainable parameters from the last ``loss`` call."""
        if self._cache is None:
            raise ValueError("backward() needs a preceding loss(idx, targets) call")
        (c_tok, c_pos, c_drop, c_blocks, c_ln_f, c_head), c_loss = self._cache
        self._cache = None  # free the activations as soon as they are used
        self.grads = {}
        wte_trainable = self.is_trainable("wte.weight")
        dlogits = cross_entropy_backward(1.0, c_loss)
        dx, dwte_head, _ = linear_backward(dlogits, c_head, need_dW=wte_trainable, need_db=False)
        self._grad("wte.weight", dwte_head)  # the head's share of the tied embedding
        dx = self._layer_norm_backward(dx, c_ln_f, "ln_f")
        for i in reversed(range(self.config.n_layer)):
            dx = self._block_backward(i, dx, c_blocks[i])
        dx = dropout_backward(dx, c_drop)
        if self.is_trainable("wpe.weight"):  # pos was broadcast over the batch: sum it back
            self._grad("wpe.weight", embedding_backward(dx.sum(axis=0), c_pos))
        if wte_trainable:  # the embedding's share of the tied embedding
            self._grad("wte.weight", embedding_backward(dx, c_tok))

    # -------------------------------------------------------------- generation
    def generate(
        self,
        idx: Any,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        greedy: bool = False,
        seed: int = 0,
    ) -> np.ndarray:
        """Extend ``idx`` (B, T) by ``max_new_tokens`` tokens; returns host ids (B, T + n).

        Greedy takes the most likely token; otherwise it samples from
        softmax(logits / temperature), restricted to the ``top_k`` most likely tokens.
        The context is cropped to the last ``block_size`` tokens.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a non-negative integer")
        if not (
            isinstance(temperature, numbers.Real) and 0 < temperature and math.isfinite(temperature)
        ):
            raise ValueError(f"temperature={temperature!r} must be a positive finite number")
        V = self.config.vocab_size
        if top_k is not None and not (isinstance(top_k, (int, np.integer)) and 1 <= top_k <= V):
            raise ValueError(f"top_k={top_k!r} must be an integer in 1..{V} or None")
        out = to_host(self._as_ids(idx, "idx", any_length=True)).copy()
        rng = host_rng(seed)
        for _ in range(max_new_tokens):
            context = out[:, -self.config.block_size :]
            logits = to_host(self.forward(context)[:, -1, :]).astype(np.float64)
            if greedy:
                nxt = logits.argmax(axis=-1)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = np.sort(logits, axis=-1)[:, -top_k][:, None]
                    logits = np.where(logits < kth, -np.inf, logits)
                probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
                probs /= probs.sum(axis=-1, keepdims=True)
                nxt = np.array([rng.choice(V, p=row) for row in probs])
            out = np.concatenate([out, nxt[:, None].astype(out.dtype)], axis=1)
        return out

    # -------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copies of every parameter (LoRA ones included), under DESIGN.md names."""
        return {name: to_host(value).copy() for name, value in self.params.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy ``state`` into the live parameters, after checking every name and shape.

        Nothing is written unless everything fits. Values are cast to the model's dtype.
        """
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict of name -> array, got {type(state).__name__}")
        if self.merged_adapters:
            raise ValueError(f"unmerge adapters {self.merged_adapters} before loading weights")
        missing = [n for n in self.params if n not in state]
        unexpected = [n for n in state if n not in self.params]
        if missing or unexpected:
            raise ValueError(
                f"state dict does not fit this model: missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
        host = {}
        for name, value in state.items():
            value = to_host(value)
            if not np.issubdtype(value.dtype, np.floating):
                raise ValueError(f"{name}: dtype {value.dtype} is not a floating-point type")
            if value.shape != self.params[name].shape:
                raise ValueError(
                    f"{name}: shape {value.shape} does not match the model's "
                    f"{self.params[name].shape}"
                )
            host[name] = value
        for name, value in host.items():
            self.params[name][...] = self.backend.asarray(value, dtype=self.dtype)

    def base_names(self) -> list[str]:
        """The pretrained parameters (everything that is not a LoRA A or B)."""
        return [n for n in self.params if ".lora_" not in n]

    def base_fingerprint(self) -> str:
        """A short SHA-256 of the base weights (as float32), to tie an adapter to its base."""
        if self.merged_adapters:
            raise ValueError(f"unmerge adapters {self.merged_adapters} first: W holds their update")
        digest = hashlib.sha256()
        for name in sorted(self.base_names()):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(to_host(self.params[name]), dtype=np.float32))
        return digest.hexdigest()[:16]
