"""The one place that chooses between NumPy (CPU) and CuPy (GPU).

Everything else receives arrays and asks this module for the matching namespace
(``xp_of(x)``) or receives a :class:`Backend` and uses ``backend.xp``. NumPy proper
appears elsewhere only at the host boundary: file I/O, data preparation, plotting.

Randomness. Parameter initialisation always draws on the host with NumPy's PCG64 and
then moves the arrays to the device, so the same seed gives the same weights on CPU
and GPU. Dropout masks are drawn on the device by the backend's generator (NumPy's
PCG64 or CuPy's), so they are reproducible per device but differ between devices.
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Any

import numpy as np

DEVICES = ("cpu", "gpu")
DTYPES = ("float32", "float64")
DEVICE_ENV = "MINILORA_DEVICE"

GPU_INSTALL_HINT = (
    "install CuPy for your CUDA version, e.g. `pip install 'minilora[gpu]'` "
    "(cupy-cuda12x), or use device='cpu'"
)


class DeviceUnavailableError(RuntimeError):
    """The GPU was asked for, but CuPy or a CUDA device is not available."""


def resolve_device(device: str | None = None) -> str:
    """Return "cpu" or "gpu": the argument, else $MINILORA_DEVICE, else "cpu"."""
    if device is None:
        device = os.environ.get(DEVICE_ENV) or "cpu"
    if device not in DEVICES:
        raise ValueError(f"device={device!r} is not known; allowed: {', '.join(DEVICES)}")
    return device


def resolve_dtype(dtype: Any) -> np.dtype:
    """Return the NumPy dtype for "float32" / "float64" (or the dtype objects)."""
    name = np.dtype(dtype).name if isinstance(dtype, (type, np.dtype)) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    return np.dtype(name)


def _one_line(err: BaseException) -> str:
    """The last line of an error that says something: CuPy's import errors are a framed
    page of advice that ends with the original error ("libcudart.so.12: cannot open")."""
    lines = [line.strip() for line in str(err).splitlines() if any(c.isalnum() for c in line)]
    return lines[-1] if lines else type(err).__name__


def _import_cupy() -> ModuleType:
    try:
        import cupy
    except ImportError as err:
        raise DeviceUnavailableError(
            f"device='gpu' needs CuPy ({_one_line(err)}); {GPU_INSTALL_HINT}"
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDA driver missing or broken: CuPy raises its own types
        raise DeviceUnavailableError(
            f"device='gpu': CuPy is installed but CUDA is not usable ({_one_line(err)}); "
            f"{GPU_INSTALL_HINT}"
        ) from None
    if count < 1:
        raise DeviceUnavailableError(f"device='gpu': no CUDA device found; {GPU_INSTALL_HINT}")
    return cupy


class Backend:
    """An array namespace (``xp``) plus the few operations that differ by device."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.xp: ModuleType = _import_cupy() if device == "gpu" else np

    def __repr__(self) -> str:
        return f"Backend(device={self.device!r}, xp={self.xp.__name__})"

    def asarray(self, host_array: Any, dtype: Any = None) -> Any:
        """Copy a host (NumPy) array onto this backend's device."""
        return self.xp.asarray(host_array, dtype=dtype)

    def rng(self, seed: int) -> Any:
        """A seeded generator that draws directly on this device."""
        return self.xp.random.default_rng(seed)

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings); a no-op on the CPU."""
        if self.device == "gpu":
            self.xp.cuda.get_current_stream().synchronize()


_BACKENDS: dict[str, Backend] = {}


def get_backend(device: str | None = None) -> Backend:
    """The (cached) backend for ``device`` ("cpu", "gpu", or None for $MINILORA_DEVICE)."""
    device = resolve_device(device)
    if device not in _BACKENDS:
        _BACKENDS[device] = Backend(device)
    return _BACKENDS[device]


class MemoryEstimateError(ValueError):
    """A request was refused before allocation: it would not fit in memory."""


def available_memory(device: str | None = None) -> int | None:
    """Bytes that can be allocated now on ``device`` (None when the OS does not say).

    CPU: MemAvailable of /proc/meminfo (free memory plus caches the kernel can drop);
    GPU: the free bytes CUDA reports.
    """
    if resolve_device(device) == "gpu":
        free, _ = get_backend("gpu").xp.cuda.runtime.memGetInfo()
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def require_memory(nbytes: int, what: str, device: str | None = None) -> None:
    """Fail fast, before allocating, when ``what`` needs more memory than ``device`` has."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise MemoryEstimateError(
            f"{what} needs about {nbytes / 1e9:,.1f} GB, but only {free / 1e9:,.1f} GB is "
            f"available on the {resolve_device(device)}; choose a smaller size"
        )


def gpu_available() -> tuple[bool, str]:
    """(True, "") when the GPU backend works, else (False, the reason): for test skips."""
    try:
        get_backend("gpu")
    except DeviceUnavailableError as err:
        return False, str(err)
    return True, ""


def is_device_array(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "cupy"


def xp_of(x: Any) -> ModuleType:
    """The array namespace that owns ``x``: NumPy for host arrays, CuPy for device ones."""
    return get_backend("gpu").xp if is_device_array(x) else np


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy (or view, on the CPU) of any backend's array."""
    return x.get() if is_device_array(x) else np.asarray(x)


def scatter_add(target: Any, indices: Any, values: Any) -> None:
    """``target[indices[n]] += values[n]`` with repeated indices summed (in place)."""
    if is_device_array(target):
        import cupyx  # only this module touches CuPy's namespace

        cupyx.scatter_add(target, indices, values)
    else:
        np.add.at(target, indices, values)


def overflow_allowed(xp: ModuleType) -> contextlib.AbstractContextManager:
    """A block in which an overflow to inf is expected and not warned about: NumPy's
    ``errstate(over="ignore")``; CuPy never warns, so there it is a no-op. The setting
    is per thread (a context variable), so every thread that needs it enters it."""
    return np.errstate(over="ignore") if xp is np else contextlib.nullcontext()


def finite_as(host_array: np.ndarray, dtype: Any) -> bool:
    """True if every value stays finite once cast to ``dtype`` (1e300 is finite in
    float64, inf in float32); the cast's overflow is the answer, not a warning."""
    with np.errstate(over="ignore", invalid="ignore"):
        return bool(np.isfinite(np.asarray(host_array).astype(dtype)).all())


def host_rng(seed: int) -> np.random.Generator:
    """NumPy's seeded PCG64 generator, used for anything that must match across devices."""
    return np.random.default_rng(seed)
