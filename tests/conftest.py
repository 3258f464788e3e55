"""Shared fixtures and helpers (test modules import the helpers: ``from conftest import ...``)."""

import contextlib
import signal

import numpy as np
import pytest

import minilora as ml
from minilora.basics import backend
from minilora.basics.backend import to_host
from minilora.core import layers as L
from minilora.core.gradcheck import relative_error
from minilora.core.params import preset_config
from minilora.lab.gradcheck_report import randomize_for_check
from minilora.training.data import ShiftTask
from minilora.training.train import Trainer

try:
    import resource
except ImportError:  # not on Windows: the memory cap is then skipped
    resource = None

TINY = preset_config("tiny").to_dict()
"""The "tiny" configuration (docs/DESIGN.md, "Reference configurations"): float64 checks."""


def pytest_report_header(config):
    """Say at the top of every log whether the PyTorch reference tests will run."""
    try:
        import torch
    except ImportError:
        return "PyTorch reference: not installed, its tests SKIP (pip install -e '.[ref]')"
    return f"PyTorch reference: torch {torch.__version__}, its tests run"


SMALL_GPT = dict(vocab_size=96, block_size=24, n_layer=1, n_head=2, d_model=16)
"""A one-block model the trainer tests train for a few steps."""


def train_config(steps, **changes):
    """The trainer tests' TrainConfig: a few fast steps; ``changes`` override fields."""
    from minilora.training.train import TrainConfig

    base = dict(steps=steps, batch_size=8, block_size=24, lr=1e-2, warmup=3, eval_every=0)
    return TrainConfig(**{**base, "eval_size": 16, "seed": 5, **changes})


@pytest.fixture
def tiny_config():
    return ml.GPTConfig(**TINY)


@pytest.fixture(params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def device(request):
    """Every backend this machine has: "cpu", and "gpu" when CuPy finds a CUDA device
    (skipped otherwise, with the reason backend.gpu_available() gives)."""
    if request.param == "gpu":
        ok, reason = backend.gpu_available()
        if not ok:
            pytest.skip(f"no GPU: {reason}")
    return request.param


@pytest.fixture
def strict_gpu(monkeypatch):
    """device="gpu" runs on tests/strict_backend.py's CuPy stand-in for this test; the
    fixture's value is that ``cupy`` module (its ``transfers`` log every host copy)."""
    import strict_backend

    return strict_backend.install(monkeypatch)


def random_model(cfg, seed=0, dtype="float64", device=None):
    """A model with random weights everywhere (not GPT-2's small init), so that no
    gradient is tiny enough to drown in the finite differences' rounding noise."""
    model = ml.GPT(cfg, seed=seed, dtype=dtype, device=device)
    randomize_for_check(model, seed)
    return model


def randomise_adapters(model, seed=1, std=0.3):
    """Give B (and A) non-zero values, as after training: at init dA would be 0."""
    rng = np.random.default_rng(seed)
    for name in model.params:
        if ".lora_" in name:
            model.params[name][...] = model.xp.asarray(rng.normal(0, std, model.params[name].shape))


def adapted_model(config, dtype="float64", seed=1):
    """A random tiny model (:func:`random_model`) with the adapter ``config`` added."""
    model = random_model(ml.GPTConfig(**TINY), seed=seed, dtype=dtype)
    ml.add_adapter(model, config)
    return model


def move_trainable(model, seed=3, std=0.1):
    """Move every trainable array off its init, as training would (LoRA's B off zero,
    DoRA's magnitude off the norms of W, VeRA's λ_b off zero)."""
    rng = np.random.default_rng(seed)
    for name in model.trainable_names():
        model.params[name] += model.xp.asarray(rng.normal(0, std, model.params[name].shape))
    return model


def dropout_keep(seed=0, p=0.4, shape=(3, 5, 6)):
    """A float64 dropout multiplier for the (3, 5, d_in=6) inputs of the layer tests."""
    return L.dropout_mask(shape, p, np.random.default_rng(seed), np.dtype("float64"))


def stopped_and_resumed(tmp_path, config):
    """A 4-step run with adapter ``config`` on SMALL_GPT in float64, whole, and stopped
    after step 2, checkpointed and resumed: returns the two trainers."""

    def trainer(out):
        model = ml.GPT(ml.GPTConfig(**SMALL_GPT), seed=0, dtype="float64")
        ml.add_adapter(model, config)
        return Trainer(model, ShiftTask(), train_config(4, checkpoint_every=2), out, False)

    whole = trainer(tmp_path / "whole")
    whole.run()
    stopped = trainer(tmp_path / "stopped")
    stopped.run(until=2)
    stopped.save_checkpoint()
    resumed = trainer(tmp_path / "stopped")
    resumed.run(resume=True)
    return whole, resumed


def rel_error(a, b):
    """||a - b|| / max(||a||, ||b||) in float64 on the host; 0 when both are ~0 (gradients
    that vanish in exact arithmetic, like the key bias's, are ~1e-19 noise on both sides)."""
    scale = max(np.linalg.norm(to_host(a)), np.linalg.norm(to_host(b)))
    return 0.0 if scale < 1e-15 else relative_error(a, b)


def token_batch(cfg, seed=0, B=3, T=8, ignore=0):
    """Random ids and targets (B, T); the first ``ignore`` targets of row 0 are ignored."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, :ignore] = -1
    return idx, targets


# ------------------------------------------------- a guard for inputs that take sizes on trust
HEADROOM = 2 << 30  # bytes of address space a guarded call may add before MemoryError


class Stalled(BaseException):
    """A guarded call still running after its time: a size taken on trust. A
    BaseException, so that no ``except Exception`` in the code under test swallows it."""


def _vm_size():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def guarded(seconds: float):
    """Raise Stalled after ``seconds``, and cap the address space at HEADROOM above now
    (Linux), so that a request for terabytes fails fast instead of taking the machine."""

    def on_alarm(signum, frame):
        raise Stalled(f"still running after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    old_limit, size = None, _vm_size()
    if resource is not None and size is not None:
        old_limit = resource.getrlimit(resource.RLIMIT_AS)
        soft, hard = size + HEADROOM, old_limit[1]
        if hard == resource.RLIM_INFINITY or soft <= hard:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        else:
            old_limit = None
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, old_limit)
