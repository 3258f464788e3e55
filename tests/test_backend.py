"""The NumPy/CuPy switch: device and dtype names, the GPU's absence, host copies,
scatter-add, and the one line that says why the GPU cannot be used."""

import sys
from types import SimpleNamespace

import numpy as np
import pytest

import minilora as ml
from minilora.basics import backend
from minilora.cli import main as cli

GPU_OK, GPU_REASON = backend.gpu_available()


# ------------------------------------------------------------------- resolve_device
def test_resolve_device_explicit():
    """An explicit "cpu" or "gpu" is returned as given."""
    assert backend.resolve_device("cpu") == "cpu"
    assert backend.resolve_device("gpu") == "gpu"


def test_resolve_device_default_is_cpu(monkeypatch):
    """None with $MINILORA_DEVICE unset (or empty) means "cpu"."""
    monkeypatch.delenv("MINILORA_DEVICE", raising=False)
    assert backend.resolve_device(None) == "cpu"
    monkeypatch.setenv("MINILORA_DEVICE", "")
    assert backend.resolve_device(None) == "cpu"


def test_resolve_device_reads_environment(monkeypatch):
    """None takes $MINILORA_DEVICE; an explicit argument wins over it."""
    monkeypatch.setenv("MINILORA_DEVICE", "gpu")
    assert backend.resolve_device(None) == "gpu"
    assert backend.resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("name", ["cuda", "CPU", "tpu", ""])
def test_resolve_device_rejects_unknown(name):
    """An unknown device name raises ValueError naming it and the allowed ones."""
    with pytest.raises(ValueError, match=f"device={name!r}.*cpu, gpu"):
        backend.resolve_device(name)


def test_resolve_device_rejects_unknown_from_environment(monkeypatch):
    """A bad $MINILORA_DEVICE raises ValueError naming its value."""
    monkeypatch.setenv("MINILORA_DEVICE", "cuda:0")
    with pytest.raises(ValueError, match="cuda:0"):
        backend.resolve_device(None)


# -------------------------------------------------------------------- resolve_dtype
@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("float32", np.float32),
        ("float64", np.float64),
        (np.float32, np.float32),
        (np.float64, np.float64),
        (np.dtype("float32"), np.float32),
        (np.dtype("float64"), np.float64),
    ],
)
def test_resolve_dtype_accepts_names_types_and_dtypes(given, expected):
    """Names, scalar types and dtype objects of float32/float64 resolve to a np.dtype."""
    resolved = backend.resolve_dtype(given)
    assert isinstance(resolved, np.dtype)
    assert resolved == np.dtype(expected)


@pytest.mark.parametrize("given", ["float16", "int64", np.int32, np.dtype("float16"), "bf16"])
def test_resolve_dtype_rejects_others(given):
    """Other dtypes raise ValueError naming the value and the allowed ones."""
    with pytest.raises(ValueError, match="float32, float64"):
        backend.resolve_dtype(given)


# ---------------------------------------------------------------- the missing GPU
@pytest.mark.skipif(GPU_OK, reason="a GPU is available here; this tests its absence")
def test_gpu_unavailable_raises_with_install_hint():
    """Without CuPy/CUDA, get_backend("gpu") raises DeviceUnavailableError saying how
    to install CuPy; gpu_available() reports the same reason; GPT(device="gpu") too."""
    with pytest.raises(backend.DeviceUnavailableError, match="pip install") as info:
        backend.get_backend("gpu")
    assert "cupy" in str(info.value).lower()
    assert issubclass(backend.DeviceUnavailableError, RuntimeError)
    assert ml.DeviceUnavailableError is backend.DeviceUnavailableError
    ok, reason = backend.gpu_available()
    assert not ok and "pip install" in reason
    with pytest.raises(backend.DeviceUnavailableError):
        ml.GPT(
            ml.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, d_model=4), device="gpu"
        )


def test_cpu_backend():
    """get_backend("cpu") is cached, uses NumPy, and makes host arrays and seeded rngs."""
    cpu = backend.get_backend("cpu")
    assert cpu is backend.get_backend("cpu")
    assert cpu.xp is np and cpu.device == "cpu"
    a = cpu.asarray([1, 2, 3], dtype=np.float32)
    assert isinstance(a, np.ndarray) and a.dtype == np.float32
    np.testing.assert_array_equal(cpu.rng(4).random(5), cpu.rng(4).random(5))
    cpu.synchronize()  # a no-op, but callable


# ----------------------------------------------------------------- host helpers
def test_to_host_and_xp_of_on_cpu():
    """to_host returns NumPy arrays (lists become arrays); xp_of(NumPy array) is NumPy."""
    a = np.arange(6.0).reshape(2, 3)
    host = backend.to_host(a)
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, a)
    listed = backend.to_host([[1, 2], [3, 4]])
    assert isinstance(listed, np.ndarray) and listed.shape == (2, 2)
    assert backend.xp_of(a) is np
    assert not backend.is_device_array(a)


def test_scatter_add_sums_repeated_indices():
    """scatter_add adds every value at a repeated index (fancy assignment would not)."""
    target = np.zeros((4, 2))
    indices = np.array([1, 3, 1, 1, 0])
    values = np.arange(10.0).reshape(5, 2)
    backend.scatter_add(target, indices, values)
    expected = np.array([[8.0, 9.0], [0 + 4 + 6, 1 + 5 + 7], [0.0, 0.0], [2.0, 3.0]])
    np.testing.assert_array_equal(target, expected)


def test_host_rng_is_seeded_pcg64():
    """host_rng(seed) is NumPy's PCG64 generator, reproducible for a seed."""
    a, b = backend.host_rng(3), backend.host_rng(3)
    assert isinstance(a.bit_generator, np.random.PCG64)
    np.testing.assert_array_equal(a.normal(size=4), b.normal(size=4))


# ------------------------------------------------- the missing GPU, on any machine
class _NoDevice:
    """A CuPy that imports but finds no device (count 0) or no working driver."""

    def __init__(self, count):
        def get_device_count():
            if isinstance(count, Exception):
                raise count
            return count

        self.cuda = SimpleNamespace(runtime=SimpleNamespace(getDeviceCount=get_device_count))


CUPY_IMPORT_ERROR = """
================================================================
Failed to import CuPy.

If you installed CuPy via wheels (cupy-cudaXXX or cupy-rocm-X-X), make sure that the
package matches with the version of CUDA or ROCm installed.

Original error:
  ImportError: libcudart.so.12: cannot open shared object file: No such file or directory
================================================================
"""
"""The shape of CuPy's own import error: a framed page, the cause on its last line."""


class _FailingCupyImport:
    """A finder that makes `import cupy` raise CuPy's many-line ImportError."""

    def find_spec(self, name, path=None, target=None):
        if name == "cupy":
            raise ImportError(CUPY_IMPORT_ERROR)
        return None


@pytest.mark.parametrize(
    ("cupy", "says"),
    [
        (None, "needs CuPy"),  # sys.modules["cupy"] = None: `import cupy` fails
        (_NoDevice(0), "no CUDA device found"),
        (_NoDevice(RuntimeError("cudaErrorInsufficientDriver")), "CUDA is not usable"),
        (CUPY_IMPORT_ERROR, "needs CuPy (ImportError: libcudart.so.12: cannot open"),
    ],
)
def test_gpu_unavailable_is_one_clear_line(monkeypatch, capsys, cupy, says):
    """Without CuPy, without a device or without a driver, device="gpu" raises
    DeviceUnavailableError with one line that says why and how to install CuPy; the
    command line prints exactly that line and exits with status 2."""
    if cupy is CUPY_IMPORT_ERROR:  # a CuPy wheel that does not match the CUDA libraries
        monkeypatch.delitem(sys.modules, "cupy", raising=False)
        monkeypatch.setattr(sys, "meta_path", [_FailingCupyImport(), *sys.meta_path])
    else:
        monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(backend, "_BACKENDS", {})
    with pytest.raises(backend.DeviceUnavailableError) as info:
        ml.GPT(
            ml.GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, d_model=4), device="gpu"
        )
    message = str(info.value)
    assert "\n" not in message and says in message
    assert "pip install 'minilora[gpu]'" in message and "device='cpu'" in message
    assert backend.gpu_available() == (False, message)
    assert cli.main(["gradcheck", "--device", "gpu"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"minilora gradcheck: error: {message}\n"


# CPU/GPU parity of the model lives in tests/test_parity.py (the ``device`` fixture).
