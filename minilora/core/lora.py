"""LoRA: a frozen weight plus a trainable low-rank update. The math, and nothing else.

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

This module holds the pair (``lora_forward`` / ``lora_backward``), the whole layer
(``lora_linear_forward`` / ``lora_linear_backward``, which the model runs for every
linear), ``delta_weight``, the initialisations, and ``LoraConfig``. It never touches
a model: putting adapters on a GPT is ``adapters.py``'s job. A DoRA adapter
(``LoraConfig(use_dora=True)``) is a branch with a magnitude: its pair is in ``dora.py``.
A VeRA adapter (``LoraConfig(use_vera=True)``) is a branch whose A and B are the shared
frozen matrices' slices and whose trainable parts are two vectors: its pair is in ``vera.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from minilora.basics.checks import (
    boolean,
    distinct_indices,
    distinct_names,
    non_negative_int,
    one_of,
    positive_int,
    positive_real,
    probability,
    real,
)
from minilora.core.dora import DoraCache, dora_backward, dora_forward
from minilora.core.layers import (
    as_rows,
    dropout_backward,
    dropout_forward,
    linear_backward,
    linear_forward,
)
from minilora.core.vera import VeraCache, vera_backward, vera_forward

Array = Any

TARGET_MODULES = ("q", "k", "v", "o", "fc", "proj")
"""The linears of a block that can take an adapter, in block order."""
INITS = ("gaussian", "kaiming", "pissa")
_LOOKUP = "embeddings are lookups, not matrix products; LoRA adapts linear layers"
_NORM = "layer norms have only per-channel scales and shifts: nothing low-rank to adapt"
NOT_TARGETS = {"wte": _LOOKUP, "wpe": _LOOKUP, "ln_1": _NORM, "ln_2": _NORM, "ln_f": _NORM}


# ----------------------------------------------------------------------- the pair
class LoraCache(NamedTuple):
    x: Array | None  # the adapter's input as rows (rows, d_in), before dropout; for dA only
    A: Array
    B: Array
    scale: float
    mask: Array | None  # the dropout multiplier as rows; None in eval or for p = 0
    u: Array | None  # D(x) A^T (rows, r): the low-rank activation; for dB only
    lead: tuple  # the leading shape N... of x, restored on dx


def lora_forward(
    x: Array,
    A: Array,
    B: Array,
    scale: float,
    mask: Array | None = None,
    need_dA: bool = True,
    need_dB: bool = True,
) -> tuple[Array, LoraCache]:
    """The adapter branch: delta_h = s * (D(x) A^T) B^T, on rows.

    x (N..., d_in), A (r, d_in), B (d_out, r), mask (N..., d_in) or None.
    Returns delta_h (N..., d_out). Cache: x and mask as rows, A, B, s, u = D(x) A^T;
    x only if the backward will form dA = du^T D(x) (``need_dA``), u only if it will
    form dB = s dh^T u (``need_dB``): dx needs neither. ``scale`` becomes a Python
    float: a NumPy float64 scalar would promote float32 activations and gradients.
    """
    scale = real("scale", scale)
    x2 = as_rows(x)  # (rows, d_in)
    mask2 = None if mask is None else as_rows(mask)
    xd, _ = dropout_forward(x2, mask2)  # D(x)              (rows, d_in)
    u = xd @ A.T  # (rows, r)
    delta_h = (scale * u) @ B.T  # s on u: (rows, r) is cheaper to scale than (rows, d_out)
    cache = LoraCache(
        x2 if need_dA else None, A, B, scale, mask2, u if need_dB else None, x.shape[:-1]
    )
    return delta_h.reshape(*x.shape[:-1], B.shape[0]), cache


def lora_backward(
    dh: Array, cache: LoraCache, need_dA: bool = True, need_dB: bool = True
) -> tuple[Array, Array | None, Array | None]:
    """Gradients of the adapter branch (docs/DESIGN.md, "LoRA math"), on rows.

    dh (N..., d_out) -> the adapter's part of dx (N..., d_in), dA (r, d_in), dB (d_out, r).
    """
    x2, A, B, scale, mask2, u, lead = cache
    if (need_dA and x2 is None) or (need_dB and u is None):
        raise ValueError("dA needs x and dB needs u, which the forward kept only if asked")
    dh2 = as_rows(dh)  # (rows, d_out)
    # forward: delta_h = s * u B^T           ->  dB = s * dh^T u          (d_out, r)
    dB = scale * (dh2.T @ u) if need_dB else None
    # forward: delta_h = s * u B^T           ->  du = s * dh B            (rows, r)
    du = scale * (dh2 @ B)
    # forward: u = D(x) A^T                  ->  dA = du^T D(x)           (r, d_in)
    dA = None
    if need_dA:
        xd, _ = dropout_forward(x2, mask2)  # recomputed: cheaper than caching a second x
        dA = du.T @ xd
    # forward: u = D(x) A^T, D(x) = x * mask ->  dx = D'(du A)            (rows, d_in)
    dx = dropout_backward(du @ A, mask2)
    return dx.reshape(*lead, A.shape[1]), dA, dB


class LoraBranch(NamedTuple):
    """One adapter on a linear: its factors, its scale s and its dropout mask (or None).

    A DoRA branch also has its magnitude m (d_out,) and says which backward it wants
    (``exact_grad``: through the norm; default detached, see dora.py). A VeRA branch has
    its vectors (λ_d, λ_b) in ``lambdas``, and A, B are then the shared matrices' slices
    (frozen; no scale: see vera.py).
    """

    A: Array  # (r, d_in)
    B: Array  # (d_out, r)
    scale: float
    mask: Array | None = None  # (N..., d_in), from layers.dropout_mask; None in eval
    magnitude: Array | None = None  # DoRA's m (d_out,); None for plain LoRA
    exact_grad: bool = False  # DoRA only
    lambdas: tuple[Array, Array] | None = None  # VeRA's (λ_d (r,), λ_b (d_out,)); else None


def lora_linear_forward(
    x: Array,
    W: Array,
    b: Array | None,
    branches: Sequence[LoraBranch] = (),
    need_dW: bool = True,
    need_dAB: Sequence[tuple[bool, bool]] | None = None,
) -> tuple[Array, tuple]:
    """The whole LoRA layer: h = x W^T + b + sum_j s_j (D_j(x) A_j^T) B_j^T.

    One branch is the LoRA layer of the paper; several are stacked adapters (their
    updates add); none is the plain linear. The base and each branch are terms of a
    sum, so the forward adds the pairs' outputs and the backward adds their dx. A DoRA
    branch (one with a magnitude) adds dora.dora_forward's correction instead, so with
    it alone h = x W'^T + b (the model never stacks it with another branch).
    x (N..., d_in), W (d_out, d_in), b (d_out,) or None -> h (N..., d_out).
    ``need_dW`` and ``need_dAB`` (per branch, default all) are the flags the backward
    will get: the caches keep only what those gradients use. Under LoRA a frozen
    linear without an adapter keeps nothing of x.
    """
    h, base_cache = linear_forward(x, W, b, need_dW=need_dW)
    need_dAB = [(True, True)] * len(branches) if need_dAB is None else need_dAB
    lora_caches = []
    for branch, need in zip(branches, need_dAB, strict=True):
        A, B, scale, mask, magnitude, exact_grad, lambdas = branch
        if lambdas is not None:  # VeRA: A and B are frozen, only the vectors train
            delta_h, lora_cache = vera_forward(x, A, B, *lambdas, mask)
        elif magnitude is not None:  # DoRA: every gradient needs z and u, so keep them all
            delta_h, lora_cache = dora_forward(x, W, A, B, magnitude, scale, mask, exact_grad)
        else:
            delta_h, lora_cache = lora_forward(x, A, B, scale, mask, need[0], need[1])
        h += delta_h  # in place: h is the fresh output of linear_forward
        lora_caches.append(lora_cache)
    return h, (base_cache, lora_caches)


def lora_linear_backward(
    dh: Array,
    cache: tuple,
    need_dW: bool = True,
    need_db: bool = True,
    need_dAB: Sequence[tuple[bool, bool]] | None = None,
) -> tuple[Array, Array | None, Array | None, list[tuple[Array | None, Array | None]]]:
    """dx = dh W + sum_j D_j'(du_j A_j);  dA_j, dB_j as in :func:`lora_backward`.

    Every gradient by default, as ``linear_backward``. Under LoRA, W and b are frozen:
    pass need_dW = need_db = False (the model does), and the base contributes only the
    pass-through dx = dh W; dW is never formed. ``need_dAB`` says per branch whether
    dA and dB are wanted (default: all). Returns (dx, dW, db, [(dA_j, dB_j) ...]); a
    DoRA branch gives (dA_j, dB_j, dm_j), and its need flags may be a triple too; a VeRA
    branch gives (dλ_d_j, dλ_b_j).
    """
    base_cache, lora_caches = cache
    need_dAB = [(True, True, True)] * len(lora_caches) if need_dAB is None else need_dAB
    dx, dW, db = linear_backward(dh, base_cache, need_dW=need_dW, need_db=need_db)
    dAB: list = []
    for lora_cache, need in zip(lora_caches, need_dAB, strict=True):
        if isinstance(lora_cache, VeraCache):
            dx_lora, dld, dlb = vera_backward(dh, lora_cache)
            dAB.append((dld if need[0] else None, dlb if need[1] else None))
        elif isinstance(lora_cache, DoraCache):
            dx_lora, dA, dB, dm, dW_dora = dora_backward(dh, lora_cache, need_dW)
            if dW_dora is not None:  # W feeds the base and the DoRA correction
                dW += dW_dora
            need = (*need, True)[:3]  # a pair of flags says nothing of m: keep dm
            grads = (dA, dB, dm)
            dAB.append(tuple(g if wanted else None for g, wanted in zip(grads, need, strict=True)))
        else:
            dx_lora, dA, dB = lora_backward(dh, lora_cache, need[0], need[1])
            dAB.append((dA, dB))
        dx += dx_lora  # x feeds the base and every branch: their gradients add
    return dx, dW, db, dAB


def delta_weight(A: Array, B: Array, scale: float) -> Array:
    """ΔW = s * B A  (d_out, d_in): what merge adds to W (PEFT's get_delta_weight)."""
    return real("scale", scale) * (B @ A)  # a Python float: keeps A's and B's dtype


# ---------------------------------------------------------------- initialisation
def gaussian_std(r: int) -> float:
    """The standard deviation of A's entries under init "gaussian" (PEFT's): 1 / r,
    so u = x A^T shrinks as the rank grows."""
    return 1.0 / r


def random_factors(
    d_out: int, d_in: int, r: int, init: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) on the host in float64 for the random inits: A drawn, B = 0, so ΔW = 0."""
    if init == "gaussian":
        return rng.normal(0.0, gaussian_std(r), (r, d_in)), np.zeros((d_out, r))
    if init == "kaiming":  # kaiming_uniform_(a=sqrt(5)), nn.Linear's default
        bound = 1.0 / math.sqrt(d_in)
        return rng.uniform(-bound, bound, (r, d_in)), np.zeros((d_out, r))
    raise ValueError(f"init={init!r} is not a random init; allowed: gaussian, kaiming")


def pissa_factors(W: np.ndarray, r: int, scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PiSSA (Meng et al. 2024): split W into its top-r singular part and the rest.

    Returns (A0, B0, W_residual) with s B0 A0 = U_r S_r V_r^T and W_residual = W - s B0 A0,
    so the adapted model equals the base at step 0. No randomness: the same W always
    gives the same split. W (d_out, d_in) on the host.
    """
    W = np.asarray(W, dtype=np.float64)
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    k = min(r, S.size)
    sqrt_s = np.sqrt(S[:k] / scale)
    A, B = np.zeros((r, W.shape[1])), np.zeros((W.shape[0], r))
    A[:k] = sqrt_s[:, None] * Vt[:k]
    B[:, :k] = U[:, :k] * sqrt_s
    return A, B, W - scale * (B @ A)


# ------------------------------------------------------------------ configuration
@dataclass(frozen=True)
class LoraConfig:
    """How to build one adapter.

    r: rank of the update (capacity); alpha: s = alpha / r (alpha / sqrt(r) with
    ``use_rslora``); dropout: probability of zeroing an input of the adapter in
    training; target_modules: the linears of each block to adapt (q k v o fc proj);
    init: "gaussian" (A ~ N(0, 1/r^2)), "kaiming" (A ~ U(+-1/sqrt(d_in))), both with
    B = 0, or "pissa" (A, B from W's top-r singular vectors, W keeps the rest);
    layers: block indices to adapt (None = all); use_dora: DoRA (Liu et al. 2024), a
    trainable magnitude per output feature beside A and B (dora.py);
    dora_exact_grad: DoRA's backward follows the norm ||W + s B A|| too (default: the
    norm is detached, as in the paper's §4.3 and PEFT). use_vera: VeRA (Kopiczko et al.
    2024): frozen random A and B shared by every adapted linear, drawn from ``vera_seed``,
    and two trainable vectors per linear, λ_d (r) starting at ``vera_d_initial`` and λ_b
    (d_out) at 0 (vera.py); alpha, use_rslora and init do not apply (no scale; the
    shared matrices are Kaiming-uniform).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q", "v")
    init: str = "gaussian"
    use_rslora: bool = False
    layers: tuple[int, ...] | None = None
    use_dora: bool = False
    dora_exact_grad: bool = False
    use_vera: bool = False
    vera_d_initial: float = 0.1
    vera_seed: int = 0

    def __post_init__(self) -> None:
        targets = distinct_names("target_modules", self.target_modules, TARGET_MODULES, NOT_TARGETS)
        checked = {
            "r": positive_int("r", self.r),
            "alpha": positive_real("alpha", self.alpha),
            "dropout": probability("dropout", self.dropout),
            "target_modules": targets,
            "init": one_of("init", self.init, INITS),
            "use_rslora": boolean("use_rslora", self.use_rslora),
            "layers": None if self.layers is None else distinct_indices("layers", self.layers),
            "use_dora": boolean("use_dora", self.use_dora),
            "dora_exact_grad": boolean("dora_exact_grad", self.dora_exact_grad),
            "use_vera": boolean("use_vera", self.use_vera),
            "vera_d_initial": real("vera_d_initial", self.vera_d_initial),
            "vera_seed": non_negative_int("vera_seed", self.vera_seed),
        }
        if checked["dora_exact_grad"] and not checked["use_dora"]:
            raise ValueError("dora_exact_grad=True is a DoRA option; it needs use_dora=True")
        self._check_vera(checked)
        for name, value in checked.items():  # frozen dataclass: store the normalised values
            object.__setattr__(self, name, value)

    @staticmethod
    def _check_vera(checked: dict) -> None:
        """VeRA replaces A and B by shared frozen matrices and has no scale: the options
        that act on A, B or s make no sense with it."""
        if not checked["use_vera"]:
            for key, default in (("vera_d_initial", 0.1), ("vera_seed", 0)):
                if checked[key] != default:
                    raise ValueError(
                        f"{key}={checked[key]!r} is a VeRA option; it needs use_vera=True"
                    )
            return
        clashes = {
            "use_dora": "DoRA's magnitude rescales W + s B A, and VeRA has no trainable B A",
            "use_rslora": "rsLoRA changes the scale s, and VeRA has none (its vectors scale)",
        }
        for key, why in clashes.items():
            if checked[key]:
                raise ValueError(f"use_vera=True cannot be combined with {key}=True: {why}")
        if checked["init"] == "pissa":
            raise ValueError(
                "use_vera=True cannot be combined with init='pissa': VeRA's A and B are "
                "shared random matrices, not W's singular vectors; allowed: gaussian, kaiming"
            )

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
    def from_dict(cls, d: Any) -> LoraConfig:
        """The inverse of :meth:`to_dict`; every field is checked as in the constructor.

        The DoRA and VeRA fields may be absent (files written before they existed): plain
        LoRA.
        """
        known = sorted(cls.__dataclass_fields__)
        optional = {"use_dora", "dora_exact_grad", "use_vera", "vera_d_initial", "vera_seed"}
        if not isinstance(d, dict) or not set(known) - optional <= set(d) <= set(known):
            raise ValueError(
                f"not a LoRA config: {d!r}; it needs exactly the keys {known} "
                "(the DoRA and VeRA fields may be left out)"
            )
        for key in ("target_modules", "layers"):  # a file's "qv" is not the list ["q", "v"]
            if not isinstance(d[key], list) and not (key == "layers" and d[key] is None):
                raise TypeError(f"LoRA config {key}={d[key]!r} must be a list")
        return cls(**d)


# ------------------------------------------------------------------------ naming
@dataclass(frozen=True)
class Adapter:
    """What an adapter is, apart from its arrays: its config and the modules it adapts."""

    name: str
    config: LoraConfig
    modules: tuple[str, ...]  # e.g. ("h.0.attn.q", "h.0.attn.v", ...)
    base_fingerprint: str  # base_fingerprint() of the weights it was made for
    # PiSSA only: the initial (A0, B0) on the host whose product was taken out of W
    pissa_init: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    # PiSSA only: each W as it was before the split (host copies, the model's dtype).
    # Deleting the adapter puts these back bit for bit: adding s B0 A0 to the residual
    # again would miss W by rounding, and so change the base's fingerprint.
    pissa_base: dict[str, np.ndarray] = field(default_factory=dict)
    # VeRA only: the shared frozen (A (r, d_in_max), B (d_out_max, r)) on the host; the
    # model keeps their device copies (GPT.vera_projection)
    vera_projection: tuple[np.ndarray, np.ndarray] | None = None


def module_path(block: int, target: str) -> str:
    """ "h.3.attn.q" for (3, "q"), "h.3.mlp.fc" for (3, "fc")."""
    group = "attn" if target in ("q", "k", "v", "o") else "mlp"
    return f"h.{block}.{group}.{target}"


def module_order(module: str) -> tuple[int, int]:
    """Sort key of a module path: block first, then the target's place in the block."""
    _, block, _, target = module.split(".")
    return int(block), TARGET_MODULES.index(target)


def lora_names(module: str, adapter: str) -> tuple[str, str]:
    """The parameter names of A and B of ``adapter`` on ``module``."""
    return f"{module}.lora_A.{adapter}", f"{module}.lora_B.{adapter}"


def magnitude_name(module: str, adapter: str) -> str:
    """The parameter name of a DoRA adapter's magnitude m on ``module``."""
    return f"{module}.lora_magnitude.{adapter}"


def vera_names(module: str, adapter: str) -> tuple[str, str]:
    """The parameter names of a VeRA adapter's λ_d and λ_b on ``module``."""
    return f"{module}.vera_lambda_d.{adapter}", f"{module}.vera_lambda_b.{adapter}"


def adapter_names(module: str, adapter: str, config: LoraConfig) -> tuple[str, ...]:
    """Every parameter name ``adapter`` has on ``module``: A, B, and m with DoRA; λ_d
    and λ_b with VeRA (its A and B are shared and frozen: not parameters)."""
    if config.use_vera:
        return vera_names(module, adapter)
    extra = (magnitude_name(module, adapter),) if config.use_dora else ()
    return (*lora_names(module, adapter), *extra)
