"""LoRA: a frozen weight plus a trainable low-rank update.

The math, once, with the paper's shapes (Hu et al. 2021, "LoRA")::

    W  (d_out, d_in)   pretrained, frozen
    A  (r, d_in)       trainable, starts Gaussian (or Kaiming-uniform, or PiSSA)
    B  (d_out, r)      trainable, starts at zero
    ΔW = B A           rank <= r, and zero at step 0 because B = 0
    s  = alpha / r     (alpha / sqrt(r) with rsLoRA)

    h = x W^T + b + s * (D(x) A^T) B^T

D is inverted dropout on the adapter's input, in training only. Dividing by r keeps
the size of the update roughly independent of the rank, so alpha need not be retuned
when r changes (alpha ~ 2r is a common choice, up to 8r for harder tasks).

The adapter branch is computed in the low-rank order (x A^T) B^T: r (d_in + d_out)
multiply-adds per row instead of d_in d_out for x (BA)^T, and BA is never formed.
Merging writes W <- W + s B A once, after which inference costs exactly what the base
model costs; unmerging subtracts it again.

This module holds the pair (``lora_forward`` / ``lora_backward``, and the whole layer
``lora_linear_forward`` / ``lora_linear_backward``), the configuration, and the
functions that add, switch, combine, merge, save and load adapters on a GPT.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from minilora.backend import to_host
from minilora.layers import dropout_backward, dropout_forward, linear_backward, linear_forward

if TYPE_CHECKING:
    from minilora.model import GPT

Array = Any

TARGET_MODULES = ("q", "k", "v", "o", "fc", "proj")
INITS = ("gaussian", "kaiming", "pissa")
NOT_TARGETS = {
    "wte": "embeddings are lookups, not matrix products; LoRA adapts linear layers",
    "wpe": "embeddings are lookups, not matrix products; LoRA adapts linear layers",
    "ln_1": "layer norms have only per-channel scales and shifts: nothing low-rank to adapt",
    "ln_2": "layer norms have only per-channel scales and shifts: nothing low-rank to adapt",
    "ln_f": "layer norms have only per-channel scales and shifts: nothing low-rank to adapt",
}


# ----------------------------------------------------------------------- the pair
class LoraCache(NamedTuple):
    x: Array  # the adapter's input (before dropout)
    A: Array
    B: Array
    scale: float
    mask: Array | None  # the dropout multiplier (0 or 1/(1-p)); None in eval or p = 0
    u: Array  # D(x) A^T, (N..., r): the low-rank activation


def lora_forward(
    x: Array, A: Array, B: Array, scale: float, mask: Array | None = None
) -> tuple[Array, LoraCache]:
    """The adapter branch: delta_h = s * (D(x) A^T) B^T.

    x (N..., d_in), A (r, d_in), B (d_out, r), mask (N..., d_in) or None.
    Returns delta_h (N..., d_out). Cache: x, A, B, s, mask and u = D(x) A^T.
    """
    xd, _ = dropout_forward(x, mask)  # D(x)
    u = xd @ A.T  # (N..., r)
    delta_h = scale * (u @ B.T)  # (N..., d_out)
    return delta_h, LoraCache(x, A, B, scale, mask, u)


def lora_backward(
    dh: Array, cache: LoraCache, need_dA: bool = True, need_dB: bool = True
) -> tuple[Array, Array | None, Array | None]:
    """Gradients of the adapter branch (DESIGN.md, "LoRA math"), rows flattened.

    Returns the adapter's part of dx (N..., d_in), dA (r, d_in), dB (d_out, r).
    """
    x, A, B, scale, mask, u = cache
    dh2 = dh.reshape(-1, dh.shape[-1])  # (rows, d_out)
    u2 = u.reshape(-1, u.shape[-1])  # (rows, r)
    # forward: delta_h = s * u B^T           ->  dB = s * dh^T u          (d_out, r)
    dB = scale * (dh2.T @ u2) if need_dB else None
    # forward: delta_h = s * u B^T           ->  du = s * dh B            (rows, r)
    du = scale * (dh2 @ B)
    # forward: u = D(x) A^T                  ->  dA = du^T D(x)           (r, d_in)
    dA = None
    if need_dA:
        xd, _ = dropout_forward(x, mask)  # recomputed: cheaper than caching a second x
        dA = du.T @ xd.reshape(-1, xd.shape[-1])
    # forward: u = D(x) A^T, D(x) = x * mask ->  dx = D'(du A)            (rows, d_in)
    dx = dropout_backward((du @ A).reshape(x.shape), mask)
    return dx, dA, dB


def lora_linear_forward(
    x: Array,
    W: Array,
    b: Array | None,
    A: Array,
    B: Array,
    scale: float,
    mask: Array | None = None,
) -> tuple[Array, tuple]:
    """The whole LoRA layer: h = x W^T + b + s * (D(x) A^T) B^T.

    The frozen base and the adapter branch are the two terms of a sum, so the forward
    is literally the two pairs added and the backward adds their input gradients.
    """
    h_base, base_cache = linear_forward(x, W, b)
    delta_h, lora_cache = lora_forward(x, A, B, scale, mask)
    return h_base + delta_h, (base_cache, lora_cache)


def lora_linear_backward(
    dh: Array, cache: tuple, need_dA: bool = True, need_dB: bool = True
) -> tuple[Array, Array | None, Array | None]:
    """dx = dh W + D'(du A);  dA, dB as in :func:`lora_backward`;  dW, db not computed.

    W and b are frozen, so the base contributes only the pass-through dx = dh W.
    Returns (dx, dA, dB).
    """
    base_cache, lora_cache = cache
    dx_base, _, _ = linear_backward(dh, base_cache, need_dW=False, need_db=False)
    dx_lora, dA, dB = lora_backward(dh, lora_cache, need_dA, need_dB)
    return dx_base + dx_lora, dA, dB


def delta_weight(A: Array, B: Array, scale: float) -> Array:
    """ΔW = s * B A  (d_out, d_in): what merge adds to W (PEFT's get_delta_weight)."""
    return scale * (B @ A)


# ------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class LoraConfig:
    """How to build one adapter.

    r: rank of the update (capacity); alpha: scale numerator, s = alpha / r
    (alpha / sqrt(r) with ``use_rslora``); dropout: probability of zeroing an input of
    the adapter during training; target_modules: which linears of each block get an
    adapter (q k v o fc proj); init: "gaussian" (A ~ N(0, 1/r), B = 0), "kaiming"
    (A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0) or "pissa" (A, B from the top-r
    singular vectors of W, W replaced by the residual); layers: block indices to adapt
    (None = all).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q", "v")
    init: str = "gaussian"
    use_rslora: bool = False
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, (int, np.integer)) or self.r < 1:
            raise ValueError(f"LoRA r={self.r!r} must be a positive integer")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"LoRA alpha={self.alpha!r} must be a positive number")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"LoRA alpha={self.alpha!r} must be a positive number")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)):
            raise ValueError(f"LoRA dropout={self.dropout!r} must be a number in [0, 1)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout!r} must satisfy 0 <= dropout < 1")
        targets = self.target_modules
        if isinstance(targets, str):
            targets = (targets,)
        targets = tuple(targets)
        if not targets:
            raise ValueError(f"target_modules is empty; choose from {', '.join(TARGET_MODULES)}")
        for t in targets:
            if t in NOT_TARGETS:
                raise ValueError(f"target {t!r} cannot take LoRA: {NOT_TARGETS[t]}")
            if t not in TARGET_MODULES:
                raise ValueError(f"unknown target {t!r}; allowed: {', '.join(TARGET_MODULES)}")
        if len(set(targets)) != len(targets):
            raise ValueError(f"target_modules={targets!r} lists a target twice")
        object.__setattr__(self, "target_modules", targets)
        if self.init not in INITS:
            raise ValueError(f"LoRA init={self.init!r} is not known; allowed: {', '.join(INITS)}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(
                isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 for i in layers
            ):
                raise ValueError(f"layers={self.layers!r} must be non-negative block indices")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers={self.layers!r} lists a block twice")
            object.__setattr__(self, "layers", tuple(int(i) for i in layers))
        object.__setattr__(self, "r", int(self.r))
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        d["layers"] = None if self.layers is None else list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LoraConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"unknown LoRA config keys {sorted(unknown)}; allowed: {sorted(known)}"
            )
        d = dict(d)
        if d.get("target_modules") is not None:
            d["target_modules"] = tuple(d["target_modules"])
        if d.get("layers") is not None:
            d["layers"] = tuple(d["layers"])
        return cls(**d)


@dataclass
class Adapter:
    """An adapter living on a model: its config and the modules it adapts."""

    name: str
    config: LoraConfig
    modules: list[str]  # e.g. ["h.0.attn.q", "h.0.attn.v", ...]
    base_fingerprint: str
    # PiSSA only: the initial A, B (host copies) whose product was taken out of W
    pissa_init: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)


def module_path(block: int, target: str) -> str:
    """ "h.3.attn.q" for (3, "q"), "h.3.mlp.fc" for (3, "fc")."""
    group = "attn" if target in ("q", "k", "v", "o") else "mlp"
    return f"h.{block}.{group}.{target}"


def lora_names(module: str, adapter: str) -> tuple[str, str]:
    """The parameter names of A and B of ``adapter`` on ``module``."""
    return f"{module}.lora_A.{adapter}", f"{module}.lora_B.{adapter}"


# ---------------------------------------------------------- adapters on a model
def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(
            f"adapter name {name!r} must be a non-empty string of letters, digits, _ -"
        )
    return name


def _check_unmerged(model: GPT, action: str) -> None:
    if model.merged_adapters:
        raise ValueError(
            f"cannot {action} while adapters {model.merged_adapters} are merged; "
            "call unmerge(model) first"
        )


def _modules_for(model: GPT, config: LoraConfig) -> list[str]:
    n_layer = model.config.n_layer
    layers = range(n_layer) if config.layers is None else config.layers
    for i in layers:
        if i >= n_layer:
            raise ValueError(f"layers contains {i}, but the model has blocks 0..{n_layer - 1}")
    return [module_path(i, t) for i in layers for t in config.target_modules]


def _random_factors(
    d_out: int, d_in: int, config: LoraConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) on the host in float64 for the random inits: A drawn, B = 0."""
    r = config.r
    if config.init == "gaussian":  # PEFT's "gaussian": std 1/r, so u = xA^T shrinks with r
        return rng.normal(0.0, 1.0 / r, (r, d_in)), np.zeros((d_out, r))
    # kaiming_uniform_(a=sqrt(5)), PyTorch's nn.Linear default: U(-1/sqrt(d_in), 1/sqrt(d_in))
    bound = 1.0 / math.sqrt(d_in)
    return rng.uniform(-bound, bound, (r, d_in)), np.zeros((d_out, r))


def _take_pissa_part(model: GPT, module: str, config: LoraConfig) -> tuple[np.ndarray, np.ndarray]:
    """PiSSA (Meng et al. 2024): split W into its top-r singular part and the rest.

    Returns (A0, B0) with s B0 A0 = U_r S_r V_r^T and writes W <- W - s B0 A0 into the
    model, so s B0 A0 + W_residual = W and the model is unchanged at step 0. No
    randomness: the same W always gives the same split.
    """
    W = to_host(model.params[f"{module}.weight"]).astype(np.float64)
    d_out, d_in = W.shape
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    k = min(config.r, S.size)
    sqrt_s = np.sqrt(S[:k] / config.scale)
    A = np.zeros((config.r, d_in))
    B = np.zeros((d_out, config.r))
    A[:k] = sqrt_s[:, None] * Vt[:k]
    B[:, :k] = U[:, :k] * sqrt_s
    W_residual = W - config.scale * (B @ A)
    model.params[f"{module}.weight"][...] = model.backend.asarray(W_residual, model.dtype)
    return A, B


def _install(
    model: GPT,
    name: str,
    config: LoraConfig,
    factors: dict[str, tuple[np.ndarray, np.ndarray]],
    fingerprint: str,
    pissa_init: dict | None = None,
) -> None:
    """Put A and B of every module on the device, freeze the base, make ``name`` active."""
    model.freeze(*model.base_names())
    for module, (A, B) in factors.items():
        A_name, B_name = lora_names(module, name)
        model.params[A_name] = model.backend.asarray(A, dtype=model.dtype)
        model.params[B_name] = model.backend.asarray(B, dtype=model.dtype)
    model.adapters[name] = Adapter(name, config, list(factors), fingerprint, pissa_init or {})
    set_adapter(model, name)


def add_adapter(
    model: GPT, config: LoraConfig, name: str = "default", seed: int | None = None
) -> None:
    """Add a LoRA adapter: freeze every base parameter, add A and B, make it active.

    A is drawn on the host (seeded by ``seed``, default the model's seed, and the
    adapter's name) so CPU and GPU start from the same adapter.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    _check_name(name)
    if name in model.adapters:
        raise ValueError(f"adapter {name!r} exists already; adapters: {list(model.adapters)}")
    _check_unmerged(model, "add an adapter")
    modules = _modules_for(model, config)
    fingerprint = model.base_fingerprint()  # before PiSSA rewrites W
    seed = model.seed if seed is None else seed
    rng = np.random.default_rng([seed, sum(ord(c) * 31**i for i, c in enumerate(name)) % 2**32])
    factors, pissa_init = {}, {}
    for module in modules:
        d_out, d_in = model.params[f"{module}.weight"].shape
        if config.r > min(d_out, d_in):
            warnings.warn(
                f"LoRA r={config.r} exceeds min(d_out, d_in)={min(d_out, d_in)} of {module}: "
                "the update BA cannot have rank above that",
                stacklevel=2,
            )
        if config.init == "pissa":
            factors[module] = pissa_init[module] = _take_pissa_part(model, module, config)
        else:
            factors[module] = _random_factors(d_out, d_in, config, rng)
    _install(model, name, config, factors, fingerprint, pissa_init)


def set_adapter(model: GPT, names: str | list[str]) -> None:
    """Activate one adapter, or several (stacked: their updates add up).

    The active adapters' A and B become trainable; every other adapter is frozen.
    """
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in model.adapters:
            raise ValueError(f"no adapter named {n!r}; adapters: {list(model.adapters)}")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names {names} repeat")
    _check_unmerged(model, "switch adapters")
    model.active_adapters = names
    for adapter in model.adapters.values():
        lora = [n for m in adapter.modules for n in lora_names(m, adapter.name)]
        if adapter.name in names:
            model.frozen.difference_update(lora)
        else:
            model.frozen.update(lora)


def disable_adapters(model: GPT) -> None:
    """Run the base model alone; the adapters stay on the model (frozen) for later."""
    set_adapter(model, [])


def delete_adapter(model: GPT, name: str) -> None:
    """Remove an adapter's A and B. A PiSSA adapter gives W back its top-r part."""
    if name not in model.adapters:
        raise ValueError(f"no adapter named {name!r}; adapters: {list(model.adapters)}")
    _check_unmerged(model, "delete an adapter")
    adapter = model.adapters.pop(name)
    for module in adapter.modules:
        for n in lora_names(module, name):
            del model.params[n]
            model.frozen.discard(n)
            model.grads.pop(n, None)
        if module in adapter.pissa_init:
            A0, B0 = adapter.pissa_init[module]
            W = model.params[f"{module}.weight"]
            W += model.backend.asarray(adapter.config.scale * (B0 @ A0), dtype=model.dtype)
    if name in model.active_adapters:
        model.active_adapters.remove(name)


def merge(model: GPT) -> None:
    """W <- W + s B A for every active adapter: inference then costs what the base costs."""
    for name in model.active_adapters:
        if name in model.merged_adapters:
            continue
        adapter = model.adapters[name]
        for module in adapter.modules:
            A_name, B_name = lora_names(module, name)
            dW = delta_weight(model.params[A_name], model.params[B_name], adapter.config.scale)
            model.params[f"{module}.weight"] += dW  # in place: the live array changes
        model.merged_adapters.append(name)


def unmerge(model: GPT) -> None:
    """W <- W - s B A for every merged adapter, newest first: the inverse of merge.

    In floating point the round trip fl(fl(W + ΔW) - ΔW) can miss W by about one ulp of
    |W| + |ΔW| (3e-8 on the demo's float32 base). The error does not accumulate: after
    the first cycle W sits on a value that the round trip maps to itself, so 1 and 1000
    merge/unmerge cycles leave the same W (tests/test_lora.py checks 100).
    """
    for name in reversed(model.merged_adapters):
        adapter = model.adapters[name]
        for module in adapter.modules:
            A_name, B_name = lora_names(module, name)
            dW = delta_weight(model.params[A_name], model.params[B_name], adapter.config.scale)
            model.params[f"{module}.weight"] -= dW
    model.merged_adapters = []


def combine_adapters(
    model: GPT,
    names: list[str],
    weights: list[float],
    new_name: str,
    method: str = "cat",
    r: int | None = None,
) -> dict[str, float]:
    """Make one adapter whose update is sum_i w_i s_i B_i A_i (not activated).

    method "cat": exact. Stack the factors, A = [A_1; A_2; ...] and B = [w_1 s_1 B_1,
    w_2 s_2 B_2, ...] with scale 1, rank sum r_i: B A = sum_i w_i s_i B_i A_i.
    method "svd": the best rank-r approximation (Eckart-Young) of that sum, r default
    max r_i. Returns each module's relative Frobenius error ||ΔW - ΔW_r|| / ||ΔW||
    (all 0 for "cat").
    """
    names = list(names)
    weights = list(weights)
    if not names:
        raise ValueError("combine_adapters needs at least one adapter name")
    for n in names:
        if n not in model.adapters:
            raise ValueError(f"no adapter named {n!r}; adapters: {list(model.adapters)}")
        if model.adapters[n].pissa_init:
            raise ValueError(
                f"adapter {n!r} uses init='pissa', which rewrote W; it cannot be combined"
            )
    if len(weights) != len(names) or not all(
        isinstance(w, (int, float)) and math.isfinite(w) for w in weights
    ):
        raise ValueError(
            f"weights={weights!r} must be {len(names)} finite numbers, one per adapter"
        )
    if method not in ("cat", "svd"):
        raise ValueError(f"method={method!r} is not known; allowed: cat, svd")
    _check_name(new_name)
    if new_name in model.adapters:
        raise ValueError(f"adapter {new_name!r} exists already")
    fingerprints = {model.adapters[n].base_fingerprint for n in names}
    if len(fingerprints) > 1:
        raise ValueError(f"adapters {names} were made on different base weights")
    sources = [model.adapters[n] for n in names]
    modules = sorted({m for a in sources for m in a.modules}, key=_module_order)
    rank = (
        sum(a.config.r for a in sources)
        if method == "cat"
        else (r or max(a.config.r for a in sources))
    )
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"r={r!r} must be a positive integer")
    factors, errors = {}, {}
    for module in modules:
        parts = []  # (A_i, w_i s_i B_i) on the host, float64; zeros where absent
        for a, w in zip(sources, weights, strict=True):
            A_name, B_name = lora_names(module, a.name)
            if module in a.modules:
                A = to_host(model.params[A_name]).astype(np.float64)
                B = to_host(model.params[B_name]).astype(np.float64) * (w * a.config.scale)
            else:
                W = model.params[f"{module}.weight"]
                A, B = np.zeros((a.config.r, W.shape[1])), np.zeros((W.shape[0], a.config.r))
            parts.append((A, B))
        A_cat = np.concatenate([A for A, _ in parts], axis=0)
        B_cat = np.concatenate([B for _, B in parts], axis=1)
        if method == "cat":
            factors[module], errors[module] = (A_cat, B_cat), 0.0
            continue
        U, S, Vt = np.linalg.svd(B_cat @ A_cat, full_matrices=False)
        k = min(rank, S.size)
        A = np.zeros((rank, A_cat.shape[1]))
        B = np.zeros((B_cat.shape[0], rank))
        A[:k] = np.sqrt(S[:k])[:, None] * Vt[:k]
        B[:, :k] = U[:, :k] * np.sqrt(S[:k])
        total = np.sqrt((S**2).sum())
        errors[module] = float(np.sqrt((S[k:] ** 2).sum()) / total) if total > 0 else 0.0
        factors[module] = (A, B)
    targets = tuple(t for t in TARGET_MODULES if any(t in a.config.target_modules for a in sources))
    layers = None
    if all(a.config.layers is not None for a in sources):
        layers = tuple(sorted({i for a in sources for i in a.config.layers}))
    config = LoraConfig(
        r=rank, alpha=float(rank), dropout=0.0, target_modules=targets, layers=layers
    )
    active = list(model.active_adapters)
    _install(model, new_name, config, factors, fingerprints.pop())
    set_adapter(model, active)  # combining does not change what is active
    return errors


def _module_order(module: str) -> tuple[int, int]:
    _, block, _, target = module.split(".")
    return int(block), TARGET_MODULES.index(target)
