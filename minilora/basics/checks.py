"""Argument checks: one small helper per kind, so every error reads the same way.

Each helper returns the value in its plain Python type or raises with a message that
names the argument, the value and what is allowed: TypeError when the kind is wrong
(``r="8"``, ``r=True``), ValueError when the kind is right but the value is not
(``r=0``). ``bool`` is an ``int`` in Python, but ``r=True`` is a bug, not a rank, so
the integer checks refuse it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """An integer (NumPy integers too, bool not), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an integer, not {type(value).__name__}")
    if minimum is not None and value < minimum:
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}={value!r} is not allowed; it must be {allowed}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """An integer >= 1 (sizes, ranks, step counts)."""
    return integer(name, value, minimum=1)


def non_negative_int(name: str, value: Any) -> int:
    """An integer >= 0 (seeds, indices, intervals where 0 means "off")."""
    return integer(name, value, minimum=0)


def real(name: str, value: Any) -> float:
    """A finite real number (bool not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a number, not {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:  # an integer beyond float's range
        as_float = math.inf
    if not math.isfinite(as_float):
        raise ValueError(f"{name}={_short(value)} must be a finite number")
    return as_float


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def positive_real(name: str, value: Any) -> float:
    """A finite number > 0 (alpha, learning rates, temperatures)."""
    value = real(name, value)
    if value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed; it must be a positive number")
    return value


def in_range(name: str, value: Any, low: float, high: float | None = None) -> float:
    """A finite number with low <= value (< high when given): hyperparameters' ranges."""
    value = real(name, value)
    if value < low or (high is not None and value >= high):
        bound = f"{low} <= {name} < {high}" if high is not None else f"{name} >= {low}"
        raise ValueError(f"{name}={value!r} is not allowed; it must satisfy {bound}")
    return value


def probability(name: str, value: Any) -> float:
    """A dropout probability p with 0 <= p < 1 (p = 1 would drop everything)."""
    return in_range(name, value, 0.0, 1.0)


def boolean(name: str, value: Any) -> bool:
    """True or False exactly: "no" is truthy in Python, so strings are refused."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} must be True or False, not {type(value).__name__}")
    return value


def one_of(name: str, value: Any, allowed: Iterable[str]) -> str:
    """One of a fixed set of names."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not known; allowed: {', '.join(allowed)}")
    return value


def distinct_names(
    name: str,
    values: Any,
    allowed: Iterable[str],
    refused: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """A non-empty list of distinct names from ``allowed``; one bare name is a list of one.

    ``refused`` maps names that look plausible but are not allowed to the reason why
    (for LoRA targets: why embeddings and layer norms are not adapted).
    """
    allowed = tuple(allowed)
    values = (values,) if isinstance(values, str) else values
    if not isinstance(values, Iterable):
        raise TypeError(f"{name}={values!r} must be a list of names from {', '.join(allowed)}")
    values = tuple(values)
    if not values:
        raise ValueError(f"{name} is empty; choose from {', '.join(allowed)}")
    for v in values:
        if refused and v in refused:
            raise ValueError(f"{name}: {v!r} is not allowed: {refused[v]}")
        if v not in allowed:
            raise ValueError(f"{name}: {v!r} is not known; allowed: {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}={values!r} lists a name twice")
    return values


def distinct_indices(name: str, values: Any, stop: int | None = None) -> tuple[int, ...]:
    """A non-empty list of distinct non-negative integers, each below ``stop`` if given."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name}={values!r} must be a list of non-negative integers")
    values = tuple(non_negative_int(name, v) for v in values)
    if not values:
        raise ValueError(f"{name} is empty; give at least one index or None for all")
    if len(set(values)) != len(values):
        raise ValueError(f"{name}={values!r} lists an index twice")
    if stop is not None and max(values) >= stop:
        raise ValueError(f"{name} contains {max(values)}; allowed: 0..{stop - 1}")
    return values
