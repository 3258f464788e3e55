"""Finite-difference gradient checks: the evidence that every backward is right.

For a function L(theta) the centred difference

    dL/dtheta_j  ~  (L(theta + eps e_j) - L(theta - eps e_j)) / (2 eps)

has error O(eps^2) from truncation plus O(u |L| / eps) from rounding (u = 1.1e-16 in
float64). We use its five-point refinement,

    (8 [L(+eps) - L(-eps)] - [L(+2 eps) - L(-2 eps)]) / (12 eps),

whose truncation error is O(eps^4): with eps = 1e-4 truncation is ~1e-12 even
where the loss curves sharply, and rounding ~1e-12, so the check resolves errors far
below the 1e-6 relative error every backward here must reach. Run checks in float64:
in float32 (u = 6e-8) the rounding term alone is ~1e-4 and says little.

A gradient that is zero by the mathematics (the key bias of attention: adding the
same q.b to every score of a row leaves the softmax unchanged) cannot be compared
relatively: the finite difference is pure rounding noise (~1e-12). When both the
analytic and the numeric gradient are below ``zero_atol`` the row is reported as
"zero" instead of as a relative error.

To check a pair ``f_forward / f_backward`` we make it a scalar with a random upstream
gradient: L = sum(out * dout). Its gradient with respect to each input is exactly what
``f_backward(dout, cache)`` returns.

Large arrays are checked on a few random coordinates plus one random direction d,
where the same difference along d must equal <grad, d>: a bug
anywhere in the array shows up in the directional derivative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from minilora.basics.backend import to_host, xp_of

Array = Any


def relative_error(analytic: Any, numeric: Any) -> float:
    """||a - n|| / max(||a||, ||n||): 0 when they agree, ~1 when unrelated."""
    a = np.asarray(to_host(analytic), dtype=np.float64)
    n = np.asarray(to_host(numeric), dtype=np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(n), 1e-300)
    return float(np.linalg.norm(a - n) / scale)


@dataclass
class CheckResult:
    """One row of a gradient-check report."""

    name: str
    error: float  # the worse of the coordinate and the directional relative errors
    n_checked: int  # coordinates compared one by one (plus one random direction)
    size: int
    zero: bool = False  # both gradients below zero_atol: zero within rounding noise

    def passed(self, tol: float = 1e-6) -> bool:
        return self.zero or self.error < tol


def _slope(loss_at: Callable[[float], float], eps: float) -> float:
    """d/dt loss_at(t) at t = 0 by the five-point centred stencil (error O(eps^4))."""
    near = loss_at(eps) - loss_at(-eps)
    far = loss_at(2 * eps) - loss_at(-2 * eps)
    return (8 * near - far) / (12 * eps)


def _slope_along(
    loss_fn: Callable[[], float], flat: Array, where: Any, base: Any, step: Any, eps: float
) -> float:
    """d/dt of loss_fn() with flat[where] = base + t * step, at t = 0.

    flat[where] is set back to ``base`` after every evaluation, so the array ends
    exactly as it started.
    """

    def loss_at(t: float) -> float:
        flat[where] = base + t * step
        value = loss_fn()
        flat[where] = base
        return value

    return _slope(loss_at, eps)


def check_gradients(
    loss_fn: Callable[[], float],
    arrays: dict[str, Array],
    grads: dict[str, Array],
    eps: float = 1e-4,
    max_coords: int = 12,
    seed: int = 0,
    zero_atol: float = 1e-9,
) -> list[CheckResult]:
    """Compare ``grads`` with finite differences of ``loss_fn``.

    ``arrays`` are the live float64 inputs: each is nudged in place, ``loss_fn()`` is
    re-evaluated, and the original value is restored exactly. Arrays with at most
    ``max_coords`` entries are checked everywhere; larger ones on ``max_coords`` random
    coordinates plus one random direction.
    """
    rng = np.random.default_rng(seed)
    results = []
    for name, theta in arrays.items():
        if theta.dtype != np.float64:  # see the module docstring
            raise TypeError(f"gradient check of {name!r} needs float64, got {theta.dtype}")
        grad = to_host(grads[name]).reshape(-1)
        flat = theta.reshape(-1)  # a view: writes go into theta
        coords = (
            np.arange(flat.size)
            if flat.size <= max_coords
            else rng.choice(flat.size, size=max_coords, replace=False)
        )
        numeric = np.empty(len(coords))
        for i, j in enumerate(coords):
            numeric[i] = _slope_along(loss_fn, flat, int(j), flat[int(j)].item(), 1.0, eps)
        error = relative_error(grad[coords], numeric)
        zero = max(np.linalg.norm(grad), np.linalg.norm(numeric)) < zero_atol
        if flat.size > max_coords:
            host_d = rng.standard_normal(flat.size)
            d = _like(theta, host_d)
            directional = _slope_along(loss_fn, flat, Ellipsis, flat.copy(), d, eps)
            # <g, d> for a standard normal d is typically ||g||: measuring against that
            # keeps an unlucky near-cancelling direction from inflating the error
            analytic = float(np.dot(grad, host_d))
            scale = max(abs(analytic), abs(directional), float(np.linalg.norm(grad)), 1e-300)
            error = max(error, abs(analytic - directional) / scale)
            zero = zero and abs(directional) < zero_atol
        results.append(CheckResult(name, error, len(coords), flat.size, bool(zero)))
    return results


def gradcheck(
    forward: Callable[..., tuple[Array, Any]],
    backward: Callable[[Array, Any], Any],
    inputs: dict[str, Array],
    seed: int = 0,
    eps: float = 1e-4,
    max_coords: int = 12,
) -> list[CheckResult]:
    """Check one forward/backward pair.

    ``forward(**inputs)`` returns (out, cache); ``backward(dout, cache)`` returns the
    gradients for the inputs, in the order of ``inputs`` (a single array when there
    is one input; None entries are skipped). The scalar under test is sum(out * dout)
    for a fixed random dout.
    """
    out, cache = forward(**inputs)
    # a scalar output (the loss) gets a scalar upstream gradient; an array's shape is
    # read from the array itself (np.shape would hand a device array to NumPy)
    shape = () if isinstance(out, float) else out.shape
    host_dout = np.random.default_rng(seed + 1).standard_normal(shape)
    dout = float(host_dout) if isinstance(out, float) else _like(out, host_dout)
    grads = backward(dout, cache)
    if not isinstance(grads, tuple):
        grads = (grads,)
    named = {name: g for name, g in zip(inputs, grads, strict=True) if g is not None}

    def loss_fn() -> float:
        o, _ = forward(**inputs)
        return float((o * dout).sum()) if not isinstance(o, float) else o * dout

    checked = {name: inputs[name] for name in named}
    return check_gradients(loss_fn, checked, named, eps=eps, max_coords=max_coords, seed=seed)


def _like(reference: Array, host: np.ndarray) -> Array:
    """``host`` moved to the namespace of ``reference`` (NumPy stays NumPy)."""
    return xp_of(reference).asarray(host, dtype=reference.dtype)


def format_report(results: list[CheckResult], tol: float = 1e-6) -> str:
    """A table: name, size, coordinates checked, relative error, pass/FAIL."""
    width = max([len(r.name) for r in results] + [4])
    lines = [f"{'name':<{width}}  {'size':>8}  {'checked':>7}  {'rel. error':>10}  result"]
    for r in results:
        verdict = "ok" if r.passed(tol) else "FAIL"
        error = "zero" if r.zero else f"{r.error:.2e}"
        lines.append(f"{r.name:<{width}}  {r.size:>8}  {r.n_checked:>7}  {error:>10}  {verdict}")
    return "\n".join(lines)
