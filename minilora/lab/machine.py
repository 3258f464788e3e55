"""What a number needs to be read with: the machine, its BLAS, its load, its matmul rate.

The same code runs at different speeds on different CPUs (issue 21: minilora/PyTorch
1.1 on one 2-core machine, 1.8 on another), so every result names the CPU model, the
kernel OpenBLAS chose for it (its ``architecture``: Haswell, SkylakeX, ...), the cores,
the threads of both kinds of work, the environment variables that change them
(``OPENBLAS_CORETYPE`` picks the kernel), and the load while it ran.
"""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np

from minilora.basics.backend import Backend, get_backend, host_rng
from minilora.basics.blas import blas_libraries, usable_cores
from minilora.basics.checks import positive_int
from minilora.basics.parallel import element_threads
from minilora.lab.timing import time_alternately
from minilora.lab.torch_reference import torch_available


def blas_info(backend: Backend | None = None) -> dict[str, Any]:
    """The BLAS library and the number of threads it uses (read by threadpoolctl from
    the loaded library, blas.py); on the GPU, the device."""
    backend = backend or get_backend("cpu")
    if backend.device == "gpu":
        xp = backend.xp
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        return {
            "library": f"cuBLAS via CuPy {xp.__version__}",
            "device": name,
            "threads": None,
            "source": "cupy.cuda.runtime",
        }
    libraries = blas_libraries()
    if not libraries:
        return {"library": "unknown", "threads": None, "source": "threadpoolctl found no BLAS"}
    lib = libraries[0]
    return {
        "library": f"{lib['library']} {lib['version']}",
        "threads": lib["threads"],
        "kernel": lib["kernel"],  # the kernel OpenBLAS chose for this CPU (its "architecture")
        "source": "threadpoolctl",
    }


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return value.strip()
    except OSError:  # not Linux
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(backend: Backend) -> dict[str, Any]:
    """Date, machine, library versions and BLAS: what a number needs to be read with."""
    ok, torch_version = torch_available()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": backend.device,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "usable_cores": usable_cores(),
        },
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cupy": backend.xp.__version__ if backend.device == "gpu" else None,
        "torch": torch_version if ok else None,
        "blas": blas_info(backend),
        "element_threads": None if backend.device == "gpu" else element_threads(),
        "environment": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "load_average": load_average(),
    }


THREAD_ENV = (
    "OPENBLAS_CORETYPE",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_THREAD_TIMEOUT",
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "MKL_NUM_THREADS",
)
"""Environment variables that change the BLAS's kernel or threads: recorded when set."""


def results_filename(meta: dict[str, Any], configs: Sequence[str] | None = None) -> str:
    """A results file's name that says where the numbers came from, so that the runs of
    several machines and kernels sit side by side in benchmarks/ instead of replacing
    each other: results-cpu-haswell.json, results-cpu-sandybridge-1thread.json (fewer
    BLAS threads than cores), results-gpu.json. ``configs``: the configurations named
    on the command line (None: the default set), as in results-cpu-haswell-gpt2.json,
    so that a run of one configuration does not replace a run of the others."""
    suffix = "".join(f"-{c}" for c in configs or ())
    if meta["device"] != "cpu":
        return f"results-{meta['device']}{suffix}.json"
    blas = meta["blas"]
    kernel = blas.get("kernel")
    name = "results-cpu"
    if kernel:
        name += "-" + "".join(c if c.isalnum() else "-" for c in str(kernel).lower())
    threads = blas.get("threads")
    if threads and threads < usable_cores():
        name += f"-{threads}thread{'s' * (threads != 1)}"
    return name + suffix + ".json"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: other work on the machine shows up here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # not on every platform
        return None


def matmul_rate(backend: Backend, n: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """This machine's float32 matrix-multiply rate: an (n, n) @ (n, n) product, 2 n^3 FLOPs.

    ``gflops`` is the best of ``repeats`` products after one warm-up (the ceiling the
    model's matrix products can approach; the best, because any other load on the
    machine only slows it down); ``median_gflops`` for comparison.
    """
    n = positive_int("n", n)
    rng = host_rng(0)
    a = backend.asarray(rng.standard_normal((n, n), dtype=np.float32))
    b = backend.asarray(rng.standard_normal((n, n), dtype=np.float32))
    timed = time_alternately({"matmul": lambda: a @ b}, repeats, 1, backend.synchronize)
    best, median = timed["matmul"]["min_ms"], timed["matmul"]["median_ms"]
    return {
        "n": n,
        "flops": 2 * n**3,
        "best_ms": best,
        "median_ms": median,
        "gflops": 2 * n**3 / (best * 1e6),
        "median_gflops": 2 * n**3 / (median * 1e6),
    }
