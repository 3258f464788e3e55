"""Adapters on a model: add, switch, stack, delete, combine, merge and unmerge.

``lora.py`` holds the math of one adapter; this module decides what happens to a
GPT's adapters, and changes the model only through its public interface: the
parameters (``model.params``, written in place) and the four adapter-state methods
the model owns (``attach_adapter``, ``detach_adapter``, ``activate_adapters``,
``mark_merged``; see model.py for why the model owns that state). Every function
checks its arguments completely before it changes anything.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from minilora.basics.backend import require_memory, to_host
from minilora.basics.checks import non_negative_int, one_of, positive_int, real
from minilora.core.dora import dora_weight, weight_norm
from minilora.core.lora import (
    TARGET_MODULES,
    Adapter,
    LoraConfig,
    delta_weight,
    lora_names,
    magnitude_name,
    module_order,
    module_path,
    pissa_factors,
    random_factors,
    vera_names,
)
from minilora.core.model import GPT, require_gpt
from minilora.core.vera import vera_delta_weight, vera_projection, vera_slices, vera_vectors

Factors = Mapping[str, tuple[np.ndarray, ...]]  # module -> (A, B), or (A, B, m), on the host


# ----------------------------------------------------------------------- checks
def check_adapter_name(name: Any) -> str:
    """Adapter names become parts of parameter names: letters, digits, _ and - only."""
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(
            f"adapter name {name!r} must be a non-empty string of letters, digits, _ -"
        )
    return name


def require_adapter(model: GPT, name: Any) -> str:
    if name not in model.adapters:
        raise ValueError(f"no adapter named {name!r}; adapters: {list(model.adapters)}")
    return name


def require_unmerged(model: GPT, action: str) -> None:
    """Changing adapters while one is inside W would leave W with an orphaned update."""
    if model.merged_adapters:
        raise ValueError(
            f"cannot {action} while adapters {model.merged_adapters} are merged; "
            "call unmerge(model) first"
        )


def adapter_modules(model: GPT, config: LoraConfig) -> tuple[str, ...]:
    """The module paths ``config`` adapts on ``model``: its targets on its layers."""
    n_layer = model.config.n_layer
    layers = range(n_layer) if config.layers is None else config.layers
    for i in layers:
        if i >= n_layer:
            raise ValueError(f"layers contains {i}, but the model has blocks 0..{n_layer - 1}")
    return tuple(module_path(i, t) for i in layers for t in config.target_modules)


def check_rank(r: int, shapes: Mapping[str, Sequence[int]]) -> int:
    """The rank rule: r <= the smallest side of every adapted matrix.

    ``shapes`` maps each adapted matrix to its (d_out, d_in). B A of a (d_out, d_in)
    matrix has rank at most min(d_out, d_in), so a larger r only adds parameters (and
    can train more of them than full fine-tuning would). params.py applies the same rule.
    """
    r = positive_int("r", r)
    name, shape = min(shapes.items(), key=lambda item: min(item[1]))
    smallest = min(shape)
    if r > smallest:
        raise ValueError(
            f"r={r} exceeds {smallest}, the smallest side of the adapted matrices "
            f"({name} is {' x '.join(map(str, shape))}): a rank-r update of such a matrix "
            f"has rank at most {smallest}; allowed: 1..{smallest}"
        )
    return r


# --------------------------------------------------------------------- building
def pissa_split(
    model: GPT, modules: Sequence[str], config: LoraConfig
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """lora.pissa_factors of each module's W: {module: (A0, B0, W_residual)}; W unchanged."""
    return {
        module: pissa_factors(to_host(model.params[f"{module}.weight"]), config.r, config.scale)
        for module in modules
    }


def apply_pissa_split(
    model: GPT, split: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, np.ndarray]]:
    """Write each W_residual into W (in place).

    Returns ({module: (A0, B0)}, {module: W before the split, a host copy}): the second
    is what delete_adapter puts back.
    """
    before = {}
    for module, (_, _, W_residual) in split.items():
        W = model.params[f"{module}.weight"]
        before[module] = to_host(W).copy()
        W[...] = model.backend.asarray(W_residual, model.dtype)
    return {module: (A, B) for module, (A, B, _) in split.items()}, before


def dora_magnitudes(model: GPT, factors: Factors, config: LoraConfig) -> dict:
    """DoRA's initial magnitude m = ||W + s B A|| per row of each module: {module: (A, B, m)}.

    Computed on the model's device in its dtype, by the same function as the forward's
    norm n: so m / n is exactly 1 at step 0 and the model is unchanged (m = ||W|| at
    B = 0; with PiSSA, W is the residual and W + s B A the original weight).
    """
    out = {}
    for module, (A, B) in factors.items():
        on_device = (model.backend.asarray(a, dtype=model.dtype) for a in (A, B))
        m = weight_norm(model.weight(module), *on_device, config.scale)  # NF4: dequantized
        out[module] = (A, B, to_host(m))
    return out


def install_adapter(
    model: GPT,
    name: str,
    config: LoraConfig,
    factors: Factors,
    fingerprint: str,
    pissa_init: Factors | None = None,
    activate: bool = True,
    pissa_base: Mapping[str, np.ndarray] | None = None,
    projection: tuple[np.ndarray, np.ndarray] | None = None,
) -> None:
    """Freeze the base, attach A and B of every module, and (by default) make ``name`` active.

    PiSSA adapters pass ``apply_pissa_split``'s two results as ``pissa_init`` and
    ``pissa_base``; VeRA adapters pass their shared (A, B) as ``projection``.
    """
    model.freeze(*model.base_names())
    pissa = dict(pissa_init or {}), dict(pissa_base or {})
    adapter = Adapter(name, config, tuple(factors), fingerprint, *pissa, projection)
    model.attach_adapter(adapter, factors)
    if activate:
        model.activate_adapters([name])


def add_adapter(
    model: GPT, config: LoraConfig, name: str = "default", seed: int | None = None
) -> None:
    """Add a LoRA adapter: freeze every base parameter, add A and B, make it active.

    A is drawn on the host (seeded by ``seed``, default the model's seed, and the
    adapter's name) so CPU and GPU start from the same adapter.
    """
    require_gpt(model)
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    check_adapter_name(name)
    if name in model.adapters:
        raise ValueError(f"adapter {name!r} exists already; adapters: {list(model.adapters)}")
    require_unmerged(model, "add an adapter")
    modules = adapter_modules(model, config)
    if config.init == "pissa" and model.quantization:  # PiSSA rewrites W, stored in 4 bits
        raise ValueError("init 'pissa' needs a float base; this base is quantized (NF4)")
    check_rank(config.r, {m: model.weight_shape(m) for m in modules})
    sizes = [sum(model.weight_shape(m)) for m in modules]  # d_out + d_in
    n_new = config.r * sum(sizes)  # drawn in float64 on the host, then copied
    require_memory(
        n_new * (8 + model.dtype.itemsize), f"LoRA r={config.r} on {len(modules)} matrices"
    )
    fingerprint = model.base_fingerprint()  # before PiSSA rewrites W
    shapes = {m: model.weight_shape(m) for m in modules}
    seed = model.seed if seed is None else non_negative_int("seed", seed)
    rng = np.random.default_rng([seed, sum(ord(c) * 31**i for i, c in enumerate(name)) % 2**32])
    pissa_init, pissa_base = {}, {}
    if config.init == "pissa":
        pissa_init, pissa_base = apply_pissa_split(model, pissa_split(model, modules, config))
        factors = pissa_init
    else:
        factors = {m: random_factors(*shapes[m], config.r, config.init, rng) for m in modules}
    if config.use_dora:
        factors = dora_magnitudes(model, factors, config)
    projection = None
    if config.use_vera:  # the shared matrices span the largest sides (PEFT's _find_dim)
        d_out, d_in = (max(shapes[m][k] for m in modules) for k in (0, 1))
        projection = vera_projection(config.r, d_in, d_out, config.vera_seed)
        factors = {m: vera_vectors(shapes[m][0], config.r, config.vera_d_initial) for m in modules}
    install_adapter(
        model, name, config, factors, fingerprint, pissa_init, True, pissa_base, projection
    )


# -------------------------------------------------------------------- switching
def set_adapter(model: GPT, names: str | Sequence[str]) -> None:
    """Activate one adapter, or several (stacked: their updates add up).

    The active adapters' A and B become trainable; every other adapter is frozen.
    """
    require_gpt(model)
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        require_adapter(model, n)
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names {names} repeat")
    dora = [n for n in names if model.adapters[n].config.use_dora]
    if dora and len(names) > 1:
        raise ValueError(
            f"adapter {dora[0]!r} uses DoRA, which rescales the whole weight W + s B A to "
            f"its magnitude: it cannot be stacked with other adapters ({names}); "
            "activate it alone"
        )
    require_unmerged(model, "switch adapters")
    model.activate_adapters(names)


def disable_adapters(model: GPT) -> None:
    """Run the base model alone; the adapters stay on the model (frozen) for later."""
    set_adapter(model, [])


def delete_adapter(model: GPT, name: str) -> list[str]:
    """Remove an adapter's A and B; returns the adapters active afterwards.

    A PiSSA adapter gives W back exactly as it was before the split (the saved copy, as
    unmerge does), so the base's fingerprint is the same again; a change made to those W
    since the split is undone with it. Deleting an active
    adapter does what PEFT's ``delete_adapter`` does: the other active adapters stay
    active; if none is left, the first remaining adapter becomes active, with a warning
    that names it; with no adapter left, the base runs alone.
    """
    require_gpt(model)
    require_adapter(model, name)
    require_unmerged(model, "delete an adapter")
    was_active = name in model.active_adapters
    adapter = model.detach_adapter(name)
    for module, W_before in adapter.pissa_base.items():
        model.params[f"{module}.weight"][...] = model.backend.asarray(W_before, model.dtype)
    if was_active and not model.active_adapters and model.adapters:
        successor = next(iter(model.adapters))
        warnings.warn(
            f"adapter {name!r} was active and is now deleted; adapter {successor!r} is "
            "active now (set_adapter(model, []) runs the base alone)",
            stacklevel=2,
        )
        model.activate_adapters([successor])
    return model.active_adapters


# ---------------------------------------------------------------------- merging
def adapted_weight(model: GPT, name: str, module: str, W: Any) -> Any:
    """The weight ``module`` computes with adapter ``name`` on top of ``W`` (d_out,
    d_in), on the model's device: W + s B A; for DoRA m ⊙ (W + s B A) / ||W + s B A||
    (dora.dora_weight); for VeRA W + (λ_b ⊙ B) (λ_d ⊙ A) on the shared matrices' slices
    (vera.vera_delta_weight). ``W`` is not changed."""
    config = model.adapters[name].config
    if config.use_vera:
        A, B = vera_slices(*model.vera_projection(name), *W.shape)
        return W + vera_delta_weight(A, B, *(model.params[n] for n in vera_names(module, name)))
    A, B = (model.params[n] for n in lora_names(module, name))
    if config.use_dora:
        return dora_weight(W, A, B, model.params[magnitude_name(module, name)], config.scale)
    return W + delta_weight(A, B, config.scale)


def _apply_delta(model: GPT, name: str) -> None:
    """W <- :func:`adapted_weight` on every module of adapter ``name`` (in place: the
    live array)."""
    for module in model.adapters[name].modules:
        W = model.params[f"{module}.weight"]
        W[...] = adapted_weight(model, name, module, W)


def merge(model: GPT) -> None:
    """W <- W + s B A for every active adapter: inference then costs what the base costs.

    The weights are kept as they were before the first merge, so unmerge can put them
    back exactly: subtracting ΔW again, fl(fl(W + ΔW) - ΔW), misses W by about one ulp
    of |W| + |ΔW| (1.5e-8 on the demo's float32 base), which would change the base's
    fingerprint and so which adapters fit it. The copies are kept on the host: on a
    GPU they would double the merged weights' device memory, which inference after a
    merge is meant to save.
    """
    require_gpt(model)
    if model.quantization:  # W + ΔW would be re-quantized: a small ΔW is lost (qlora.py)
        raise ValueError(
            "cannot merge into a quantized (NF4) base: re-quantizing W + ΔW rounds the "
            "update to the 4-bit grid, and a small update is lost "
            "(qlora.requantized_merge_error measures it); run the adapter unmerged, or "
            "load it onto the float base and merge there"
        )
    merged, saved = model.merged_adapters, dict(model.premerge_weights)
    for name in model.active_adapters:
        if name not in merged:
            for module in model.adapters[name].modules:
                W = f"{module}.weight"
                saved.setdefault(W, to_host(model.params[W]).copy())  # off the device
            _apply_delta(model, name)
            merged.append(name)
    model.mark_merged(merged, saved)


def unmerge(model: GPT) -> None:
    """Undo merge: every changed W gets back its value from before the merge, exactly."""
    require_gpt(model)
    for name, W in model.premerge_weights.items():
        model.params[name][...] = model.backend.asarray(W)  # the host copy, bit for bit
    model.mark_merged([])


# -------------------------------------------------------------------- combining
def _check_combination(
    model: GPT,
    names: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    method: str,
    r: int | None,
) -> tuple[list[Adapter], list[float]]:
    require_gpt(model)
    for what, value in (("names", names), ("weights", weights)):
        if not isinstance(value, (list, tuple)):  # a str is a sequence too: of letters
            raise TypeError(f"{what}={value!r} must be a list, one entry per adapter")
    names, weights = list(names), list(weights)
    if not names:
        raise ValueError("combine_adapters needs at least one adapter name")
    sources = [model.adapters[require_adapter(model, n)] for n in names]
    for a in sources:
        if a.pissa_init:
            raise ValueError(
                f"adapter {a.name!r} uses init='pissa', which rewrote W; it cannot be combined"
            )
        if a.config.use_dora:
            raise ValueError(
                f"adapter {a.name!r} uses DoRA: its update is not s B A alone (its magnitude "
                f"rescales W too), so it cannot be combined (method {method!r})"
            )
        if a.config.use_vera:
            raise ValueError(
                f"adapter {a.name!r} uses VeRA: it has no A and B of its own (only vectors "
                f"on shared frozen matrices), so it cannot be combined (method {method!r})"
            )
    if len(weights) != len(names):
        raise ValueError(f"weights={weights!r} must be {len(names)} numbers, one per adapter")
    weights = [real("weight", w) for w in weights]
    one_of("method", method, ("cat", "svd"))
    if method == "cat" and r is not None:
        raise ValueError(
            f"r={r!r} is only for method='svd'; 'cat' is exact, with rank the sum of the "
            "adapters' ranks"
        )
    check_adapter_name(new_name)
    if new_name in model.adapters:
        raise ValueError(f"adapter {new_name!r} exists already")
    if len({a.base_fingerprint for a in sources}) > 1:
        raise ValueError(f"adapters {names} were made on different base weights")
    return sources, weights


def _weighted_parts(
    model: GPT, sources: list[Adapter], weights: list[float], module: str
) -> tuple[np.ndarray, np.ndarray]:
    """[A_1; A_2; ...] and [w_1 s_1 B_1, w_2 s_2 B_2, ...] on the host in float64.

    An adapter without ``module`` contributes zeros of its rank: B A is then unchanged.
    """
    d_out, d_in = model.weight_shape(module)
    As, Bs = [], []
    for a, w in zip(sources, weights, strict=True):
        if module in a.modules:
            A_name, B_name = lora_names(module, a.name)
            As.append(to_host(model.params[A_name]).astype(np.float64))
            Bs.append(to_host(model.params[B_name]).astype(np.float64) * (w * a.config.scale))
        else:
            As.append(np.zeros((a.config.r, d_in)))
            Bs.append(np.zeros((d_out, a.config.r)))
    return np.concatenate(As, axis=0), np.concatenate(Bs, axis=1)


def _truncate(A_cat: np.ndarray, B_cat: np.ndarray, rank: int) -> tuple[Any, Any, float]:
    """The best rank-``rank`` factors of B_cat A_cat (Eckart-Young) and the relative
    Frobenius error ||ΔW - ΔW_r|| / ||ΔW|| of dropping the rest."""
    U, S, Vt = np.linalg.svd(B_cat @ A_cat, full_matrices=False)
    k = min(rank, S.size)
    A, B = np.zeros((rank, A_cat.shape[1])), np.zeros((B_cat.shape[0], rank))
    A[:k] = np.sqrt(S[:k])[:, None] * Vt[:k]
    B[:, :k] = U[:, :k] * np.sqrt(S[:k])
    total = np.sqrt((S**2).sum())
    return A, B, float(np.sqrt((S[k:] ** 2).sum()) / total) if total > 0 else 0.0


def combine_adapters(
    model: GPT,
    names: Sequence[str],
    weights: Sequence[float],
    new_name: str,
    method: str = "cat",
    r: int | None = None,
) -> dict[str, float]:
    """Make one adapter whose update is sum_i w_i s_i B_i A_i (not activated).

    method "cat": exact. Stack the factors, A = [A_1; A_2; ...] and B = [w_1 s_1 B_1,
    w_2 s_2 B_2, ...] with scale 1, rank sum r_i: B A = sum_i w_i s_i B_i A_i (no ``r``).
    method "svd": the best rank-r approximation (Eckart-Young) of that sum, r default
    max r_i. Returns each module's relative Frobenius error ||ΔW - ΔW_r|| / ||ΔW||
    (all 0 for "cat").

    The result adapts every target of any source on every layer of any source, so its
    config describes it exactly; a module no source adapts gets A = B = 0 (ΔW = 0).
    """
    sources, weights = _check_combination(model, names, weights, new_name, method, r)
    if method == "cat":
        rank = sum(a.config.r for a in sources)
    else:
        rank = positive_int("r", r) if r is not None else max(a.config.r for a in sources)
    targets = tuple(t for t in TARGET_MODULES if any(t in a.config.target_modules for a in sources))
    layers = None
    if all(a.config.layers is not None for a in sources):
        layers = tuple(sorted({i for a in sources for i in a.config.layers}))
    config = LoraConfig(
        r=rank, alpha=float(rank), dropout=0.0, target_modules=targets, layers=layers
    )
    factors, errors = {}, {}
    for module in sorted(adapter_modules(model, config), key=module_order):
        A_cat, B_cat = _weighted_parts(model, sources, weights, module)
        if method == "cat":
            factors[module], errors[module] = (A_cat, B_cat), 0.0
        else:
            A, B, errors[module] = _truncate(A_cat, B_cat, rank)
            factors[module] = (A, B)
    install_adapter(model, new_name, config, factors, sources[0].base_fingerprint, activate=False)
    return errors
