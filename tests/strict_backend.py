"""A strict stand-in for CuPy: the GPU discipline, tested on a machine without a GPU.

minilora's rule (docs/DESIGN.md, "Backend and determinism"): array code uses the namespace of its
arrays (``xp_of(x)``, ``model.xp``) and copies to the host only where values leave the
computation, through ``backend.to_host``. On NumPy every slip is invisible: a host
array *is* the device array, ``np.exp`` works on it, and ``np.asarray`` is free. The
slips show only on a GPU, as a TypeError from CuPy or as a silent device-to-host copy.

This module builds modules named ``cupy`` and ``cupyx`` whose arrays behave like
CuPy's in exactly the ways that expose such slips:

* ``ndarray`` is not a NumPy array, and its class says it lives in module "cupy", so
  ``backend.is_device_array`` and ``xp_of`` treat it as a device array;
* it refuses to become a NumPy array silently: ``np.asarray(x)`` and ``__array__``
  raise TypeError (CuPy's message), ``float(x)`` / ``int(x)`` / ``bool(x)`` of more than
  one element raise too;
* it refuses to mix with NumPy arrays: ``x + host``, ``host + x``, ``x @ host``,
  ``x[host_ids]``, ``x[...] = host`` and ``xp.where(host, ...)`` raise TypeError, as
  CuPy does ("Unsupported type <class 'numpy.ndarray'>");
* it is *stricter* than CuPy in one place on purpose: NumPy functions and ufuncs
  given a device array (``np.exp(x)``, ``np.concatenate([x])``, ``np.linalg.svd(x)``)
  raise TypeError. CuPy would dispatch many of them to itself, but array code that
  relies on that is code that calls NumPy on device data, which the design forbids;
* the only ways to the host are explicit: ``x.get()`` (what ``backend.to_host`` calls)
  and the scalar conversions CuPy allows (``float``, ``int``, ``bool``, ``item``,
  ``tolist`` of device values). Each one, and each host-to-device copy
  (``xp.asarray(host)``), is recorded in ``cupy.transfers`` with the function that
  asked for it, so a test can say exactly which copies a training step makes.

Underneath, every operation is the same NumPy operation on a private NumPy array (the
fake random generator is NumPy's PCG64 too), so a run on this backend must give the
same numbers as the same run on NumPy, bit for bit: any difference is a bug in how
minilora dispatches, not rounding.

What it proves: that the code paths the tests drive (a training step, merge, combine,
adapter and model files, PiSSA, generation, gradient checks) never hand a device array
to NumPy, never mix host and device arrays, never convert silently, and copy to the
host only where the tests expect it. What it cannot prove: that CuPy's kernels give
the same numbers as NumPy's (different summation orders, cuBLAS), anything about
speed or GPU memory, code paths the tests do not run, and API differences between
NumPy and the real CuPy (a function or keyword CuPy lacks, CuPy's own random
streams, its dtype rules for Python scalars). Those need a real GPU: tests/test_parity.py
runs the same checks there when CuPy finds a device.
"""

from __future__ import annotations

import operator
import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import minilora.basics.backend

IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. "
    "Please use `.get()` to construct a NumPy array explicitly."
)
HINT = (
    "use the array's namespace (xp = xp_of(x), or model.xp) on device arrays, "
    "xp.asarray(host) to move host data to the device, and backend.to_host(x) where "
    "values leave the computation"
)
_SKIP_FILES = {os.path.abspath(__file__), os.path.abspath(minilora.basics.backend.__file__)}


# ------------------------------------------------------------------ the transfer log
@dataclass
class Transfers:
    """Every copy between host and device: (direction, the function that asked)."""

    events: list[tuple[str, str]] = field(default_factory=list)

    def record(self, direction: str) -> None:
        frame = sys._getframe(1)
        while frame is not None and os.path.abspath(frame.f_code.co_filename) in _SKIP_FILES:
            frame = frame.f_back
        site = "?"
        if frame is not None:
            module = frame.f_globals.get("__name__", "?")
            site = f"{module}.{getattr(frame.f_code, 'co_qualname', frame.f_code.co_name)}"
        self.events.append((direction, site))

    def clear(self) -> None:
        self.events.clear()

    def sites(self, direction: str = "to_host") -> list[str]:
        return [site for d, site in self.events if d == direction]


# ------------------------------------------------------------------ wrapping
def _mixing_error(value: Any) -> TypeError:
    return TypeError(
        f"Unsupported type {type(value)}: a host (NumPy) array mixed with a device array; {HINT}"
    )


def _unwrap(value: Any) -> Any:
    """Device arrays -> their NumPy payload; NumPy arrays -> TypeError (as CuPy)."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, np.ndarray):
        raise _mixing_error(value)
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_unwrap(v) for v in value)
    return value  # Python and NumPy scalars, None, slices, Ellipsis, dtypes, strings


def _wrap(value: Any) -> Any:
    """NumPy results -> device arrays (a NumPy scalar becomes a 0-d array, as in CuPy)."""
    if isinstance(value, np.ndarray):
        return ndarray(value)
    if isinstance(value, np.generic):
        return ndarray(np.asarray(value))
    if isinstance(value, tuple):
        items = [_wrap(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class ndarray:  # noqa: N801 - CuPy's name
    """A device array: a private NumPy array that refuses to meet NumPy."""

    __slots__ = ("_a",)
    __hash__ = None  # type: ignore[assignment]
    transfers: Transfers  # set per module instance by make_modules

    def __init__(self, a: np.ndarray) -> None:
        self._a = a

    # --- refusing NumPy
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError(IMPLICIT)

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        host = [x for x in inputs if isinstance(x, np.ndarray)]
        numpy_scalar = any(isinstance(x, np.generic) for x in inputs)
        if host or not numpy_scalar or method != "__call__":
            raise TypeError(
                f"numpy.{ufunc.__name__} was given a device array"
                + (" and a host array" if host else "")
                + f"; {HINT}"
            )
        # np.float64(2.0) * x: a NumPy scalar is a host *scalar*, which CuPy accepts
        out = kwargs.get("out")
        result = ufunc(*_unwrap(list(inputs)), **_unwrap_kwargs(kwargs))
        return out[0] if isinstance(out, tuple) else _wrap(result)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        raise TypeError(f"numpy.{func.__name__} was given a device array; {HINT}")

    # --- the explicit ways to the host (recorded)
    def get(self, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
        self.transfers.record("to_host")
        return self._a.copy(order=order)

    def set(self, arr: Any, stream: Any = None) -> None:
        if not isinstance(arr, np.ndarray):
            raise TypeError(f"set() takes a NumPy array, got {type(arr)}")
        self.transfers.record("to_device")
        self._a[...] = arr

    def _scalar(self, what: str) -> Any:
        if self._a.size != 1:
            raise TypeError(f"only length-1 arrays can be converted to Python scalars ({what})")
        self.transfers.record("to_host")
        return self._a.reshape(-1)[0]

    def __float__(self) -> float:
        return float(self._scalar("float"))

    def __int__(self) -> int:
        return int(self._scalar("int"))

    def __bool__(self) -> bool:
        if self._a.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous.")
        return bool(self._scalar("bool"))

    def item(self) -> Any:
        return self._scalar("item").item()

    def tolist(self) -> Any:
        self.transfers.record("to_host")
        return self._a.tolist()

    def __repr__(self) -> str:
        self.transfers.record("to_host")
        return f"strict_cupy.{self._a!r}"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        self.transfers.record("to_host")
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    # --- metadata (host values, no copy)
    shape = property(lambda self: self._a.shape)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    dtype = property(lambda self: self._a.dtype)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    T = property(lambda self: ndarray(self._a.T))

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Any:
        return (_wrap(row) for row in self._a)

    # --- indexing
    def __getitem__(self, key: Any) -> Any:
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._a[_unwrap(key)] = _unwrap(value)

    # --- methods that exist on cupy.ndarray, computed on the payload
    _METHODS = frozenset(
        "reshape transpose sum mean max min argmax argmin astype copy ravel flatten fill "
        "any all std var cumsum prod dot clip squeeze swapaxes take repeat sort argsort "
        "round view".split()
    )

    def __getattr__(self, name: str) -> Any:
        if name not in ndarray._METHODS:
            raise AttributeError(f"strict cupy.ndarray has no attribute {name!r}")
        method = getattr(self._a, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            out = kwargs.get("out")
            result = method(*_unwrap(list(args)), **_unwrap_kwargs(kwargs))
            return out if out is not None else _wrap(result)

        return call


def _unwrap_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: _unwrap(v) for k, v in kwargs.items()}


def _binary(op: Any) -> Any:
    def method(self: ndarray, other: Any) -> Any:
        return _wrap(op(self._a, _unwrap(other)))

    return method


def _reflected(op: Any) -> Any:
    def method(self: ndarray, other: Any) -> Any:
        return _wrap(op(_unwrap(other), self._a))

    return method


def _inplace(op: Any) -> Any:
    def method(self: ndarray, other: Any) -> ndarray:
        op(self._a, _unwrap(other))  # NumPy's in-place operator writes into the payload
        return self

    return method


def _unary(op: Any) -> Any:
    def method(self: ndarray) -> Any:
        return _wrap(op(self._a))

    return method


for _name in "add sub mul truediv floordiv mod pow matmul and or xor lshift rshift".split():
    _op = getattr(operator, _name + ("_" if _name in ("and", "or") else ""))
    setattr(ndarray, f"__{_name}__", _binary(_op))
    setattr(ndarray, f"__r{_name}__", _reflected(_op))
    setattr(ndarray, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}")))
for _name in "lt le eq ne gt ge".split():
    setattr(ndarray, f"__{_name}__", _binary(getattr(operator, _name)))
for _name in "neg pos abs invert".split():
    setattr(ndarray, f"__{_name}__", _unary(getattr(operator, _name)))
ndarray.__module__ = "cupy"  # what backend.is_device_array looks at


# ------------------------------------------------------------------ the modules
DEVICE_FUNCTIONS = (
    "zeros ones empty full zeros_like ones_like empty_like full_like arange linspace eye "
    "triu tril where einsum exp log sqrt tanh abs maximum minimum multiply subtract divide "
    "add negative square power matmul dot sum mean max min argmax concatenate stack reshape "
    "transpose clip isfinite isnan all any sign sort argsort take take_along_axis cumsum "
    "outer broadcast_to expand_dims squeeze logical_and logical_or logical_not"
).split()
"""NumPy functions that CuPy has too, offered on device arrays (NumPy arrays refused)."""
LINALG_FUNCTIONS = ("svd", "norm", "qr")


def _device_function(func: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        out = kwargs.get("out")
        result = func(*_unwrap(list(args)), **_unwrap_kwargs(kwargs))
        return out if out is not None else _wrap(result)

    call.__name__ = func.__name__
    return call


class _Generator:
    """cupy.random.Generator over NumPy's PCG64: the same draws as the host, on 'device'."""

    def __init__(self, seed: Any) -> None:
        self._rng = np.random.default_rng(seed)

    def __getattr__(self, name: str) -> Any:
        if name not in ("random", "standard_normal", "normal", "uniform", "integers"):
            raise AttributeError(f"strict cupy.random.Generator has no attribute {name!r}")
        return _device_function(getattr(self._rng, name))


_Generator.__module__ = "cupy.random"


class _Stream:
    def synchronize(self) -> None:
        pass


def make_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """Fresh ``cupy`` and ``cupyx`` modules with an empty transfer log (``cupy.transfers``)."""
    transfers = Transfers()
    ndarray.transfers = transfers
    cupy = types.ModuleType("cupy", "A strict stand-in for CuPy (tests/strict_backend.py).")
    cupy.__version__ = "0.0-strict"
    cupy.transfers = transfers
    cupy.ndarray = ndarray
    for name in DEVICE_FUNCTIONS:
        setattr(cupy, name, _device_function(getattr(np, name)))
    for name in ("inf", "nan", "pi", "e", "newaxis", "float32", "float64", "int64", "int32"):
        setattr(cupy, name, getattr(np, name))
    cupy.bool_, cupy.dtype = np.bool_, np.dtype

    def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
        """Host data is copied to the 'device' (recorded); device arrays stay."""
        if isinstance(a, ndarray):
            return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
        if isinstance(a, (list, tuple)) and any(isinstance(v, ndarray) for v in a):
            return ndarray(np.array(_unwrap(a), dtype=dtype))  # e.g. [x, y] of device arrays
        transfers.record("to_device")
        return ndarray(np.array(a, dtype=dtype, order=order or "K", copy=True))

    def array(a: Any, dtype: Any = None, copy: bool = True, **kwargs: Any) -> ndarray:
        result = asarray(a, dtype)
        return result.copy() if copy and result is a else result

    def asnumpy(a: Any) -> np.ndarray:
        return a.get() if isinstance(a, ndarray) else np.asarray(a)

    def get_array_module(*args: Any) -> types.ModuleType:
        return cupy if any(isinstance(a, ndarray) for a in args) else np

    cupy.asarray, cupy.array, cupy.asnumpy = asarray, array, asnumpy
    cupy.get_array_module = get_array_module
    cupy.linalg = types.SimpleNamespace(
        **{n: _device_function(getattr(np.linalg, n)) for n in LINALG_FUNCTIONS}
    )
    cupy.random = types.SimpleNamespace(default_rng=_Generator, Generator=_Generator)
    cupy.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(
            getDeviceCount=lambda: 1, memGetInfo=lambda: (64 << 30, 80 << 30)
        ),
        get_current_stream=_Stream,
    )

    cupyx = types.ModuleType("cupyx", "The strict stand-in's cupyx: scatter_add only.")

    def scatter_add(a: ndarray, slices: Any, value: Any) -> None:
        if not isinstance(a, ndarray):
            raise TypeError(f"cupyx.scatter_add needs a device array, got {type(a)}")
        np.add.at(a._a, _unwrap(slices), _unwrap(value))

    cupyx.scatter_add = scatter_add
    return cupy, cupyx


def install(monkeypatch: Any) -> types.ModuleType:
    """Make ``device="gpu"`` use fresh strict modules for one test; returns ``cupy``."""
    cupy, cupyx = make_modules()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setattr(minilora.basics.backend, "_BACKENDS", {})  # forget any cached backend
    return cupy
