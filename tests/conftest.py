"""Shared fixtures and helpers (test modules import the helpers: ``from conftest import ...``)."""

import numpy as np
import pytest

import minilora as ml
from minilora.backend import to_host
from minilora.gradcheck import relative_error
from minilora.gradcheck_report import randomize_for_check

TINY = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, d_model=32)
"""The "tiny" reference configuration (DESIGN.md): gradient checks in float64."""


def pytest_report_header(config):
    """Say at the top of every log whether the PyTorch reference tests will run."""
    try:
        import torch
    except ImportError:
        return "PyTorch reference: not installed, its tests SKIP (pip install -e '.[ref]')"
    return f"PyTorch reference: torch {torch.__version__}, its tests run"


@pytest.fixture
def tiny_config():
    return ml.GPTConfig(**TINY)


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
