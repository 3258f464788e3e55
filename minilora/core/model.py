"""A GPT-2 style decoder built from the forward/backward pairs in ``layers.py``.

    x = wte[idx] + wpe[0..T)                               (B, T, C)
    for each block i:
        x = x + o(attention(q(ln_1(x)), k(ln_1(x)), v(ln_1(x))))
        x = x + proj(gelu(fc(ln_2(x))))
    logits = ln_f(x) wte^T                                  (B, T, V), head tied to wte

``GPT.forward`` calls the pairs in this order; ``GPT.backward`` calls their backwards in
the reverse order, one per line, so the two read as mirror images. Every linear runs
``lora.lora_linear_forward`` with the branches of the adapters active on it (none
before any adapter is added): the layer that is taught and gradient-checked.

All parameters live in one flat dict, ``model.params``, under GPT-2's dotted names
(docs/DESIGN.md, "Parameter names"). ``model.grads`` has the same keys, trainable only: a
frozen parameter never gets a gradient buffer. The forward caches only what the
backward will use, given what is trainable: a frozen linear without an adapter keeps
no input (dx = dh W needs none), as PyTorch's autograd.

Adapter state has one owner: the model. Which adapters exist, which are active and
which are merged into W is read on every forward, so it lives next to the parameters
it describes, behind read-only properties (``adapters``, ``active_adapters``,
``merged_adapters``) and four methods that keep it consistent with ``params`` and the
frozen set (``attach_adapter``, ``detach_adapter``, ``activate_adapters``,
``mark_merged``). ``adapters.py`` decides *what* to do (draw A, merge, combine) and
calls only these; nothing else writes the state.

Training and evaluation are a mode of the model, as in PyTorch: ``model.train()`` and
``model.eval()`` set ``model.training``, which ``forward`` and ``loss`` read. Dropout
(the base's and every adapter's) runs in training mode only; ``generate`` always runs
without it. A new model starts in training mode; the trainer switches to training mode
for its steps and to eval mode for validation.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from minilora.basics.backend import (
    finite_as,
    get_backend,
    host_rng,
    require_memory,
    resolve_dtype,
    to_host,
)
from minilora.basics.checks import (
    boolean,
    non_negative_int,
    positive_int,
    positive_real,
    probability,
)
from minilora.core.layers import (
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
    soft_cross_entropy_backward,
    soft_cross_entropy_forward,
)
from minilora.core.lora import (
    Adapter,
    LoraBranch,
    adapter_names,
    lora_linear_backward,
    lora_linear_forward,
    lora_names,
    magnitude_name,
    vera_names,
)
from minilora.core.quant import NF4Weight, dequantize, quantize, to_device
from minilora.core.vera import vera_slices

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
    # the eps of every layer norm: 1e-5 is GPT-2's (and PyTorch's default); a config
    # written before this field existed loads with it
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model"):
            object.__setattr__(self, name, positive_int(f"GPTConfig {name}", getattr(self, name)))
        object.__setattr__(self, "dropout", probability("GPTConfig dropout", self.dropout))
        eps = positive_real("GPTConfig layer_norm_eps", self.layer_norm_eps)
        object.__setattr__(self, "layer_norm_eps", eps)
        if self.d_model % self.n_head:
            raise ValueError(
                f"GPTConfig d_model={self.d_model} is not divisible by n_head={self.n_head}; "
                f"allowed n_head: divisors of {self.d_model}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> GPTConfig:
        known = sorted(cls.__dataclass_fields__)
        if not isinstance(d, dict) or set(d) - set(known):
            raise ValueError(f"not a GPT config: {d!r}; allowed keys: {known}")
        return cls(**d)


def parameter_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every base parameter's name and shape, in a fixed order (the init order).

    The one table of shapes: the model allocates from it and params.py counts from it.
    """
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
    """What one block's backward needs: one cache per op, named as in the forward."""

    ln_1: Any
    q: Any
    k: Any
    v: Any
    attn: Any
    o: Any
    attn_drop: Any
    ln_2: Any
    fc: Any
    gelu: Any
    proj: Any
    mlp_drop: Any


class ModelCache(NamedTuple):
    tok_emb: Any
    pos_emb: Any
    emb_drop: Any
    blocks: list[BlockCache]
    ln_f: Any
    head: Any
    loss: Any


class GPT:
    """The model: parameters in a flat dict, forward/backward written out by hand.

    Modes, as in PyTorch: ``training`` is True after construction and ``train()``, and
    False after ``eval()``. It decides one thing: whether dropout is on in ``forward``
    and ``loss`` (and ``loss`` in training mode refuses merged adapters, which would
    train W instead). Evaluate with ``model.eval()``, train with ``model.train()``.

    >>> model = GPT(GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, d_model=32))
    >>> model.forward(np.zeros((1, 4), dtype=np.int64)).shape
    (1, 4, 65)
    """

    def __init__(
        self, config: GPTConfig, seed: int = 0, dtype: Any = "float32", device: str | None = None
    ) -> None:
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.seed = non_negative_int("seed", seed)
        self.dtype = resolve_dtype(dtype)
        self.backend = get_backend(device)
        n_params = sum(math.prod(shape) for shape in parameter_shapes(config).values())
        # the init draws float64 on the host, then copies to the model's dtype
        require_memory(n_params * (8 + self.dtype.itemsize), f"a GPT with {n_params:,} parameters")
        self.device = self.backend.device
        self.xp = self.backend.xp
        self.params: dict[str, Array] = {
            name: self.backend.asarray(value)
            for name, value in init_parameters(config, seed, self.dtype).items()
        }
        self.grads: dict[str, Array] = {}
        self.frozen: set[str] = set()
        self._adapters: dict[str, Adapter] = {}  # the adapter state: see the module docstring
        self._active: list[str] = []
        self._merged: list[str] = []
        self._premerge: dict[str, Array] = {}  # host copies of W before merge, for unmerge
        self._quantized: dict[str, NF4Weight] = {}  # weight name -> NF4 storage (QLoRA)
        self._fingerprint_before_quantization: tuple[str, str] | None = None  # (all, rest)
        self._projections: dict[str, tuple[Array, Array]] = {}  # VeRA's shared A, B on device
        self.rng = self.backend.rng(seed)  # dropout masks
        self.training = True  # dropout on; see train() and eval()
        self._cache: ModelCache | None = None

    def __repr__(self) -> str:
        c = self.config
        return (
            f"GPT(n_layer={c.n_layer}, n_head={c.n_head}, d_model={c.d_model}, "
            f"vocab_size={c.vocab_size}, block_size={c.block_size}, dtype={self.dtype.name}, "
            f"device={self.device!r}, adapters={list(self._adapters)})"
        )

    # -------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> GPT:
        """Training mode (dropout on), or eval mode with ``mode=False``; returns the model."""
        self.training = boolean("mode", mode)
        return self

    def eval(self) -> GPT:
        """Eval mode: no dropout, the same output on every call. Returns the model."""
        return self.train(False)

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
            if not hits and not fnmatch.filter(self._quantized, pattern):
                raise ValueError(
                    f"{pattern!r} matches no parameter (e.g. 'h.0.attn.q.weight', 'h.*')"
                )
            names += hits
        return names

    def freeze(self, *patterns: str) -> None:
        """Stop gradients for parameters matching the glob patterns (e.g. "h.*.ln_1.*")."""
        self.frozen.update(self._match(patterns))

    def unfreeze(self, *patterns: str) -> None:
        """Let parameters matching the glob patterns receive gradients again.

        A weight stored in NF4 (:meth:`quantize_weights`) cannot: it is a set of 4-bit
        codes, and QLoRA trains adapters on it, never the weight itself.
        """
        stored = [name for p in patterns for name in fnmatch.filter(self._quantized, p)]
        if stored:
            raise ValueError(
                f"{stored[0]} is stored in 4 bits (NF4) and cannot train: full fine-tuning "
                "needs the unquantized base; on a quantized base train an adapter (QLoRA)"
            )
        self.frozen.difference_update(self._match(patterns))

    def reseed(self, seed: int) -> None:
        """Restart the dropout generator (a fixed seed gives fixed dropout masks)."""
        self.rng = self.backend.rng(seed)

    # ------------------------------------------------ adapter state (one owner)
    @property
    def adapters(self) -> Mapping[str, Adapter]:
        """name -> :class:`lora.Adapter`, read-only (adapters.py changes it via the methods)."""
        return MappingProxyType(self._adapters)

    @property
    def active_adapters(self) -> list[str]:
        """The adapters whose branches run (stacked, in this order); a copy."""
        return list(self._active)

    @property
    def merged_adapters(self) -> list[str]:
        """The active adapters whose update is inside W now; a copy."""
        return list(self._merged)

    def attach_adapter(self, adapter: Adapter, factors: Mapping[str, tuple[Any, ...]]) -> None:
        """Register ``adapter`` and put its host factors {module: (A, B)} into ``params``
        ({module: (A, B, m)} for a DoRA adapter, m its magnitude; {module: (λ_d, λ_b)} for
        a VeRA adapter, whose shared frozen A and B, ``adapter.vera_projection``, move to
        the device once, outside ``params``: they are neither base nor trainable).

        The new parameters start frozen; :meth:`activate_adapters` makes them trainable.
        """
        if adapter.name in self._adapters:
            raise ValueError(f"adapter {adapter.name!r} exists already")
        if set(factors) != set(adapter.modules):
            raise ValueError(f"factors {sorted(factors)} do not match modules {adapter.modules}")
        for module, arrays in factors.items():
            names = adapter_names(module, adapter.name, adapter.config)
            if len(arrays) != len(names):
                raise ValueError(f"{module}: {len(arrays)} arrays for the parameters {names}")
            for pname, value in zip(names, arrays, strict=True):
                self.params[pname] = self.backend.asarray(value, dtype=self.dtype)
                self.frozen.add(pname)
        if adapter.vera_projection is not None:
            self._projections[adapter.name] = tuple(
                self.backend.asarray(a, dtype=self.dtype) for a in adapter.vera_projection
            )
        self._adapters[adapter.name] = adapter

    def vera_projection(self, name: str) -> tuple[Array, Array]:
        """VeRA adapter ``name``'s shared frozen (A (r, d_in_max), B (d_out_max, r)) on the
        model's device."""
        return self._projections[name]

    def detach_adapter(self, name: str) -> Adapter:
        """Remove an adapter's A and B (and gradients); returns its record."""
        adapter = self._adapters.pop(name)
        self._projections.pop(name, None)
        for module in adapter.modules:
            for pname in adapter_names(module, name, adapter.config):
                del self.params[pname]
                self.frozen.discard(pname)
                self.grads.pop(pname, None)
        if name in self._active:
            self._active.remove(name)
        return adapter

    def activate_adapters(self, names: list[str]) -> None:
        """Run exactly ``names`` (stacked); their A and B train, every other adapter's freeze."""
        unknown = [n for n in names if n not in self._adapters]
        if unknown:
            raise ValueError(f"no adapter named {unknown[0]!r}; adapters: {list(self._adapters)}")
        self._active = list(names)
        for adapter in self._adapters.values():
            for module in adapter.modules:
                pnames = adapter_names(module, adapter.name, adapter.config)
                if adapter.name in names:
                    self.frozen.difference_update(pnames)
                else:
                    self.frozen.update(pnames)

    def mark_merged(self, names: list[str], saved: Mapping[str, Array] | None = None) -> None:
        """Record which active adapters are inside W (merge / unmerge change W itself),
        and the weights as they were before the first merge (``saved``: name -> a host
        copy, off the device), which unmerge puts back."""
        if any(n not in self._active for n in names):
            raise ValueError(f"only active adapters {self._active} can be merged, not {names}")
        self._merged = list(names)
        self._premerge = dict(saved or {}) if names else {}

    @property
    def premerge_weights(self) -> Mapping[str, Array]:
        """The weights merge changed, as they were before it (empty when nothing is merged)."""
        return MappingProxyType(self._premerge)

    def _live_adapters(self, module: str) -> list[str]:
        """Active adapters on ``module`` whose update is not already merged into W."""
        return [
            name
            for name in self._active
            if name not in self._merged and module in self._adapters[name].modules
        ]

    # -------------------------------------------- quantized base (QLoRA, quant.py)
    @property
    def quantization(self) -> str | None:
        """Returns "nf4" when the linears' weights are stored quantized, else None.

        See :meth:`quantize_weights`.
        """
        return "nf4" if self._quantized else None

    @property
    def quantized(self) -> Mapping[str, NF4Weight]:
        """weight name -> its NF4 storage, read-only; these names are not in ``params``."""
        return MappingProxyType(self._quantized)

    def quantize_weights(self, names: list[str]) -> None:
        """Store the named weights in NF4 (quant.quantize) in place of their float arrays.

        Each leaves ``params`` (so it has no gradient, no optimizer state, and no float
        copy on the device) and is dequantized on every forward (:meth:`weight`).
        ``qlora.quantize_base`` decides which weights, and checks everything first.
        """
        if self._fingerprint_before_quantization is None:
            rest = [n for n in self.base_names() if n not in names]
            self._fingerprint_before_quantization = (
                self.base_fingerprint(),
                weights_fingerprint({n: self.params[n] for n in rest}),
            )
        for name in names:
            stored = quantize(to_host(self.params[name]))
            self._quantized[name] = to_device(stored, self.backend.asarray)
            del self.params[name]
            self.frozen.discard(name)
            self.grads.pop(name, None)

    def weight(self, module: str) -> Array:
        """W (d_out, d_in) of a linear: its parameter, or dequantized from NF4 on every call."""
        stored = self._quantized.get(f"{module}.weight")
        if stored is None:
            return self.params[f"{module}.weight"]
        return dequantize(stored).astype(self.dtype, copy=False)

    def weight_shape(self, module: str) -> tuple[int, ...]:
        """The shape of a linear's W, stored as a float parameter or in NF4."""
        stored = self._quantized.get(f"{module}.weight")
        return tuple(self.params[f"{module}.weight"].shape) if stored is None else stored.shape

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
        """h = x W^T + b + sum over live adapters of s (D(x) A^T) B^T (the LoRA layer);
        a DoRA adapter's branch carries its magnitude, a VeRA adapter's its vectors and the
        shared matrices' slices (lora.LoraBranch)."""
        p = self.params
        live = self._live_adapters(module)
        branches, need_dAB = [], []
        for name in live:
            config = self._adapters[name].config
            mask = dropout_mask(x.shape, config.dropout, self.rng, self.dtype) if train else None
            if config.use_vera:
                A, B = vera_slices(*self._projections[name], *self.weight_shape(module))
                lambdas = tuple(p[n] for n in vera_names(module, name))
                branches.append(LoraBranch(A, B, 1.0, mask, lambdas=lambdas))
                need_dAB.append(tuple(self.is_trainable(n) for n in vera_names(module, name)))
                continue
            A_name, B_name = lora_names(module, name)
            m = p[magnitude_name(module, name)] if config.use_dora else None
            branch = LoraBranch(p[A_name], p[B_name], config.scale, mask, m, config.dora_exact_grad)
            branches.append(branch)
            need_dAB.append((self.is_trainable(A_name), self.is_trainable(B_name)))
        W, b = self.weight(module), p[f"{module}.bias"]  # a quantized W: dequantized here
        # cache only what the backward will use: a frozen W needs no x (dx = dh W)
        need_dW = self.is_trainable(f"{module}.weight")  # never for a quantized W
        h, cache = lora_linear_forward(x, W, b, branches, need_dW, need_dAB)
        if f"{module}.weight" in self._quantized:  # keep 4-bit Q, not Ŵ: backward rebuilds it
            cache = _swap_weight(cache, None)
        return h, (module, live, cache)

    def _dropout(self, x: Array, train: bool) -> tuple[Array, Array | None]:
        p = self.config.dropout
        mask = dropout_mask(x.shape, p, self.rng, self.dtype) if train else None
        return dropout_forward(x, mask)

    def _block_forward(self, i: int, x: Array, train: bool) -> tuple[Array, BlockCache]:
        """x_out = x_mid + mlp(ln_2(x_mid)),  x_mid = x + attn(ln_1(x)).   All (B, T, C)
        unless noted; ``_block_backward`` walks these lines bottom to top."""
        p, h, H = self.params, f"h.{i}", self.config.n_head
        eps = self.config.layer_norm_eps
        ln1, c_ln1 = layer_norm_forward(x, p[f"{h}.ln_1.weight"], p[f"{h}.ln_1.bias"], eps)
        q, c_q = self._linear(f"{h}.attn.q", ln1, train)
        k, c_k = self._linear(f"{h}.attn.k", ln1, train)
        v, c_v = self._linear(f"{h}.attn.v", ln1, train)
        atty, c_attn = attention_forward(q, k, v, H)  # heads concatenated back to C
        attproj, c_o = self._linear(f"{h}.attn.o", atty, train)
        attdrop, c_attdrop = self._dropout(attproj, train)
        x_mid, _ = residual_forward(x, attdrop)
        ln2, c_ln2 = layer_norm_forward(x_mid, p[f"{h}.ln_2.weight"], p[f"{h}.ln_2.bias"], eps)
        fch, c_fc = self._linear(f"{h}.mlp.fc", ln2, train)  # (B, T, 4C)
        fch_gelu, c_gelu = gelu_forward(fch)  # (B, T, 4C)
        fcproj, c_proj = self._linear(f"{h}.mlp.proj", fch_gelu, train)
        mlpdrop, c_mlpdrop = self._dropout(fcproj, train)
        x_out, _ = residual_forward(x_mid, mlpdrop)
        cache = BlockCache(
            c_ln1, c_q, c_k, c_v, c_attn, c_o, c_attdrop, c_ln2, c_fc, c_gelu, c_proj, c_mlpdrop
        )
        return x_out, cache

    def _forward(self, idx: Array, train: bool) -> tuple[Array, tuple]:
        p = self.params
        T = idx.shape[1]
        tok_emb, c_tok = embedding_forward(idx, p["wte.weight"])  # (B, T, C)
        pos_emb, c_pos = embedding_forward(self.xp.arange(T), p["wpe.weight"])  # (T, C)
        x, c_embdrop = self._dropout(tok_emb + pos_emb, train)  # pos broadcast over B
        c_blocks = []
        for i in range(self.config.n_layer):
            x, c_block = self._block_forward(i, x, train)
            c_blocks.append(c_block)
        lnf, c_lnf = layer_norm_forward(
            x, p["ln_f.weight"], p["ln_f.bias"], self.config.layer_norm_eps
        )  # (B, T, C)
        # tied head: lnf wte^T (B, T, V); lnf is kept only if wte trains
        logits, c_head = linear_forward(lnf, p["wte.weight"], None, self.is_trainable("wte.weight"))
        return logits, (c_tok, c_pos, c_embdrop, c_blocks, c_lnf, c_head)

    def forward(self, idx: Any) -> Array:
        """Logits (B, T, V) for token ids ``idx`` (B, T); dropout in training mode only."""
        logits, _ = self._forward(self._as_ids(idx, "idx"), self.training)
        return logits

    def loss(self, idx: Any, targets: Any) -> float:
        """Mean cross-entropy of next-token prediction; keeps the caches for ``backward``.

        ``targets`` is either (B, T) integer: the token that should follow each
        position, or ``IGNORE_INDEX`` (-1) for positions that do not count; or
        (B, T, V) float: a probability distribution over the next token at every
        position (soft targets, e.g. a teacher's softmax), for which the loss is the
        cross-entropy H(p, q) = KL(p || q) + H(p) (layers.soft_cross_entropy_forward).
        Dropout in training mode only, as in :meth:`forward`.
        """
        train = self.training
        if train and self._merged:
            raise ValueError(
                f"adapters {self._merged} are merged into W; training them now would "
                "train W instead. Call unmerge(model) before training, or model.eval() "
                "to evaluate"
            )
        idx = self._as_ids(idx, "idx")
        if getattr(targets, "ndim", None) == 3:  # soft targets (B, T, V)
            probs = self._as_probs(targets, idx.shape)
            logits, caches = self._forward(idx, train)
            loss, c_loss = soft_cross_entropy_forward(logits, probs)
            self._cache = ModelCache(*caches, (soft_cross_entropy_backward, c_loss))
            return loss
        targets = self._as_ids(targets, "targets", allow_ignore=True)
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {targets.shape} must equal idx shape {idx.shape}")
        logits, caches = self._forward(idx, train)
        loss, c_loss = cross_entropy_forward(logits, targets)
        self._cache = ModelCache(*caches, (cross_entropy_backward, c_loss))
        return loss

    def _as_probs(self, probs: Any, shape: tuple[int, ...]) -> Array:
        """Validate soft targets (B, T, V): float, each row non-negative and summing to 1."""
        want = (*shape, self.config.vocab_size)
        if tuple(probs.shape) != want:
            raise ValueError(f"soft targets shape {tuple(probs.shape)} must be (B, T, V) = {want}")
        xp = self.xp
        probs = xp.asarray(probs)
        if not np.issubdtype(probs.dtype, np.floating):
            raise ValueError(f"soft targets must be a float array, got dtype {probs.dtype}")
        # one transfer for both checks; the tolerance allows float32 softmax round-off
        low, err = to_host(
            xp.stack([probs.min(), xp.abs(probs.sum(axis=-1) - 1).max()]).astype("float64")
        ).tolist()
        if not (low >= 0 and err <= 1e-3):
            raise ValueError(
                f"soft targets must be probabilities (each >= 0, each row summing to 1); "
                f"got smallest {low:.3g}, largest |row sum - 1| {err:.3g}"
            )
        return probs.astype(self.dtype, copy=False)

    # ---------------------------------------------------------------- backward
    def _set_grad(self, name: str, g: Array | None) -> None:
        if g is not None:
            self.grads[name] = g

    def _linear_backward(self, dh: Array, cache: tuple) -> Array:
        """dx through the LoRA layer; dW, db only if trainable; dA, dB (and DoRA's dm) of
        live adapters."""
        module, live, layer_cache = cache
        if f"{module}.weight" in self._quantized:  # dequantize again, as bitsandbytes does
            layer_cache = _swap_weight(layer_cache, self.weight(module))
        names = [adapter_names(module, name, self._adapters[name].config) for name in live]
        dx, dW, db, dAB = lora_linear_backward(
            dh,
            layer_cache,
            need_dW=self.is_trainable(f"{module}.weight"),  # frozen: pass dx through only
            need_db=self.is_trainable(f"{module}.bias"),
            need_dAB=[tuple(self.is_trainable(n) for n in pnames) for pnames in names],
        )
        self._set_grad(f"{module}.weight", dW)
        self._set_grad(f"{module}.bias", db)
        for pnames, grads in zip(names, dAB, strict=True):
            for pname, grad in zip(pnames, grads, strict=True):
                self._set_grad(pname, grad)
        return dx

    def _layer_norm_backward(self, dy: Array, cache: Any, ln: str) -> Array:
        weight, bias = f"{ln}.weight", f"{ln}.bias"
        need = self.is_trainable(weight) or self.is_trainable(bias)
        dx, dweight, dbias = layer_norm_backward(dy, cache, need_dparams=need)
        self._set_grad(weight, dweight if self.is_trainable(weight) else None)
        self._set_grad(bias, dbias if self.is_trainable(bias) else None)
        return dx

    def _block_backward(self, i: int, dx_out: Array, c: BlockCache) -> Array:
        """The forward's lines in reverse; d<name> is dL/d<name> of the forward's <name>."""
        h = f"h.{i}"
        dx_mid_skip, dmlpdrop = residual_backward(dx_out)
        dfcproj = dropout_backward(dmlpdrop, c.mlp_drop)
        dfch_gelu = self._linear_backward(dfcproj, c.proj)
        dfch = gelu_backward(dfch_gelu, c.gelu)
        dln2 = self._linear_backward(dfch, c.fc)
        dx_mid_ln2 = self._layer_norm_backward(dln2, c.ln_2, f"{h}.ln_2")
        dx_mid = dx_mid_skip + dx_mid_ln2  # x_mid feeds the skip path and ln_2
        dx_skip, dattdrop = residual_backward(dx_mid)
        dattproj = dropout_backward(dattdrop, c.attn_drop)
        datty = self._linear_backward(dattproj, c.o)
        dq, dk, dv = attention_backward(datty, c.attn)
        dln1_q = self._linear_backward(dq, c.q)
        dln1_k = self._linear_backward(dk, c.k)
        dln1_v = self._linear_backward(dv, c.v)
        dln1 = dln1_q + dln1_k + dln1_v  # ln1 feeds q, k and v
        dx_ln1 = self._layer_norm_backward(dln1, c.ln_1, f"{h}.ln_1")
        return dx_skip + dx_ln1  # x feeds the skip path and ln_1

    def backward(self) -> None:
        """Fill ``self.grads`` for the trainable parameters from the last ``loss`` call."""
        if self._cache is None:
            raise ValueError("backward() needs a preceding loss(idx, targets) call")
        if self._merged:  # merged branches do not run, so their A and B would get nothing
            raise ValueError(
                f"backward() while adapters {self._merged} are merged into W; call "
                "unmerge(model) first"
            )
        c = self._cache
        self._cache = None  # free the activations as soon as they are used
        self.grads = {}
        wte_trainable = self.is_trainable("wte.weight")
        loss_backward, c_loss = c.loss  # hard or soft targets: the loss's own backward
        dlogits = loss_backward(1.0, c_loss)  # (B, T, V)
        dlnf, dwte_head, _ = linear_backward(dlogits, c.head, need_dW=wte_trainable, need_db=False)
        dx = self._layer_norm_backward(dlnf, c.ln_f, "ln_f")
        for i in reversed(range(self.config.n_layer)):
            dx = self._block_backward(i, dx, c.blocks[i])
        demb = dropout_backward(dx, c.emb_drop)  # (B, T, C): d(tok_emb) = d(tok_emb + pos_emb)
        if self.is_trainable("wpe.weight"):  # pos_emb was broadcast over B: sum it back
            self._set_grad("wpe.weight", embedding_backward(demb.sum(axis=0), c.pos_emb))
        if wte_trainable:  # wte is used twice, by the head and by the lookup: the grads add
            dwte_tok = embedding_backward(demb, c.tok_emb)
            self._set_grad("wte.weight", dwte_head + dwte_tok)

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
        The context is cropped to the last ``block_size`` tokens. Generation runs without
        dropout in either mode (the mode is left as it was).
        """
        max_new_tokens = non_negative_int("max_new_tokens", max_new_tokens)
        temperature = positive_real("temperature", temperature)
        V = self.config.vocab_size
        if top_k is not None and not 1 <= positive_int("top_k", top_k) <= V:
            raise ValueError(f"top_k={top_k!r} must be an integer in 1..{V} or None")
        out = to_host(self._as_ids(idx, "idx", any_length=True)).copy()
        require_memory(out.shape[0] * (out.shape[1] + max_new_tokens) * 8, "the generated ids")
        rng = host_rng(seed)
        for _ in range(max_new_tokens):
            context = out[:, -self.config.block_size :]
            logits, _ = self._forward(self.xp.asarray(context), False)  # no dropout
            logits = to_host(logits[:, -1, :]).astype(np.float64)
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
        """Host copies of all parameters, LoRA's too (docs/DESIGN.md, "Parameter names")."""
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
            if not finite_as(value, self.dtype):  # 1e300 is finite in float64, not float32
                raise ValueError(f"{name} contains NaN or inf (as {self.dtype.name})")
            host[name] = value
        for name, value in host.items():
            self.params[name][...] = self.backend.asarray(value, dtype=self.dtype)

    def base_names(self) -> list[str]:
        """The pretrained parameters (everything that is not an adapter's: A, B, DoRA's m,
        VeRA's λ_d and λ_b)."""
        return [n for n in self.params if ".lora_" not in n and ".vera_" not in n]

    def base_fingerprint(self) -> str:
        """A short SHA-256 of the base weights (as float32), to tie an adapter to its base.

        A quantized base keeps the fingerprint of the weights it was quantized from: it is
        the same pretrained base (adapter files record the quantization separately). If
        its float parameters (embeddings, biases, layer norms) changed since, there is no
        fingerprint to give: the float W it would need are gone.
        """
        if self.merged_adapters:
            raise ValueError(f"unmerge adapters {self.merged_adapters} first: W holds their update")
        rest = weights_fingerprint({name: self.params[name] for name in self.base_names()})
        if self._fingerprint_before_quantization is None:
            return rest
        before, rest_before = self._fingerprint_before_quantization
        if rest != rest_before:
            raise ValueError(
                "the base's float parameters changed after quantize_base, so its fingerprint "
                "is unknown (the float W it hashes are gone); quantize after changing them"
            )
        return before


def _swap_weight(cache: tuple, W: Array | None) -> tuple:
    """The LoRA layer's cache with the base's W replaced: linear_forward caches
    (x rows, W, has_b, leading shape), and a quantized base keeps no float W between
    the forward and the backward (the step's peak memory would hold every Ŵ)."""
    (x2, _, has_b, lead), branch_caches = cache
    return (x2, W, has_b, lead), branch_caches


def require_gpt(model: Any, what: str = "model") -> GPT:
    """``model`` itself if it is a GPT; a TypeError naming ``what`` otherwise."""
    if not isinstance(model, GPT):
        raise TypeError(f"{what} must be a minilora GPT, got {type(model).__name__}")
    return model


def weights_fingerprint(weights: Mapping[str, Any]) -> str:
    """A short SHA-256 of named arrays, taken as float32 in name order."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(to_host(weights[name]), dtype=np.float32))
    return digest.hexdigest()[:16]
