"""The forward caches only what the backward will use, given what is trainable.

A frozen linear without an adapter passes the gradient back as dx = dh W: it needs no
input, so it keeps none (as PyTorch's autograd). Caching less must change no number.
"""

import numpy as np
import pytest

import minilora.core.model as model_module
from minilora.core.adapters import add_adapter
from minilora.core.layers import linear_backward, linear_forward
from minilora.core.lora import LoraConfig, lora_backward, lora_forward
from minilora.core.model import GPT, GPTConfig

CFG = GPTConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, d_model=32)


def _lora_model(targets=("q", "k", "v", "o"), dropout=0.1) -> GPT:
    model = GPT(CFG, seed=3)
    add_adapter(model, LoraConfig(r=4, alpha=8.0, dropout=dropout, target_modules=targets), seed=1)
    rng = np.random.default_rng(7)
    for name in model.params:
        if ".lora_B." in name:  # B != 0, so every gradient path carries something
            model.params[name][...] = rng.normal(0.0, 0.1, model.params[name].shape)
    return model


def _batch():
    rng = np.random.default_rng(0)
    return rng.integers(0, 65, (3, 16)), rng.integers(0, 65, (3, 16))


def _step(model: GPT) -> tuple[float, dict]:
    idx, targets = _batch()
    model.reseed(11)  # the same dropout masks in both runs
    loss = model.loss(idx, targets)
    model.backward()
    return loss, {k: v.copy() for k, v in model.grads.items()}


def _cache_everything(monkeypatch):
    """The model as before: every linear keeps its input, every branch x and u."""
    lora_linear_forward, linear = model_module.lora_linear_forward, model_module.linear_forward

    def keep_all_lora(x, W, b, branches=(), need_dW=True, need_dAB=None):
        return lora_linear_forward(x, W, b, branches)

    def keep_all_linear(x, W, b=None, need_dW=True):
        return linear(x, W, b)

    monkeypatch.setattr(model_module, "lora_linear_forward", keep_all_lora)
    monkeypatch.setattr(model_module, "linear_forward", keep_all_linear)


@pytest.mark.parametrize("targets", [("q", "k", "v", "o"), ("q", "v"), ("fc", "proj")])
def test_a_lora_step_is_bit_identical_to_one_with_everything_cached(monkeypatch, targets):
    lean_loss, lean_grads = _step(_lora_model(targets))
    _cache_everything(monkeypatch)
    model = _lora_model(targets)
    model.loss(*_batch())
    assert _kept_input(model._cache.blocks[0].k)  # the control really caches everything
    full_loss, full_grads = _step(model)
    assert lean_loss == full_loss
    assert sorted(lean_grads) == sorted(full_grads) and lean_grads
    for name, g in full_grads.items():
        assert np.array_equal(lean_grads[name], g), name


def _kept_input(cache) -> bool:
    _module, _live, (base_cache, lora_caches) = cache
    return base_cache[0] is not None or any(c.x is not None for c in lora_caches)


def test_frozen_linears_without_an_adapter_keep_no_input():
    model = _lora_model(("q", "v"), dropout=0.0)
    model.loss(*_batch())
    blocks = model._cache.blocks
    for b in blocks:
        assert _kept_input(b.q) and _kept_input(b.v)  # dA = du^T x
        assert b.q[2][0][0] is None  # but W's own cache keeps no x: W is frozen
        for frozen in (b.k, b.o, b.fc, b.proj):
            assert not _kept_input(frozen)
    assert model._cache.head[0] is None  # wte is frozen: the head keeps no ln_f output
    full = GPT(CFG, seed=3)
    full.loss(*_batch())
    for b in full._cache.blocks:
        assert all(_kept_input(c) for c in (b.q, b.k, b.v, b.o, b.fc, b.proj))
    assert full._cache.head[0] is not None


def test_a_gradient_whose_input_was_not_kept_is_a_clear_error():
    x, W = np.ones((4, 3), np.float32), np.ones((2, 3), np.float32)
    _, cache = linear_forward(x, W, need_dW=False)
    dx, dW, _ = linear_backward(np.ones((4, 2), np.float32), cache, need_dW=False)
    assert dx.shape == (4, 3) and dW is None
    with pytest.raises(ValueError, match="did not keep"):
        linear_backward(np.ones((4, 2), np.float32), cache, need_dW=True)
    A, B = np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)
    _, lcache = lora_forward(x, A, B, 2.0, need_dA=False, need_dB=True)
    assert lcache.x is None and lcache.u is not None
    with pytest.raises(ValueError, match="dA needs x"):
        lora_backward(np.ones((4, 2), np.float32), lcache, need_dA=True)
    # the model: W unfrozen between the forward and the backward
    model = _lora_model(("q",), dropout=0.0)
    model.loss(*_batch())
    model.unfreeze("h.0.mlp.fc.weight")
    with pytest.raises(ValueError, match="did not keep"):
        model.backward()


def test_the_pre_merge_copy_of_w_is_kept_off_the_device(strict_gpu):
    """merge keeps W as it was, for an exact unmerge: on the host, not doubling the
    merged weights' device memory (strict_backend's arrays stand for CuPy's)."""
    from minilora.basics.backend import is_device_array, to_host
    from minilora.core.adapters import merge, unmerge

    model = GPT(CFG, seed=3, device="gpu")
    add_adapter(model, LoraConfig(r=2, alpha=4.0, target_modules=("q", "v")), seed=1)
    for name in model.params:
        if ".lora_B." in name:
            model.params[name][...] = model.backend.asarray(np.full(model.params[name].shape, 0.1))
    before = {n: to_host(p).copy() for n, p in model.params.items()}
    merge(model)
    saved = model.premerge_weights
    assert sorted(saved) == [f"h.{i}.attn.{t}.weight" for i in range(2) for t in ("q", "v")]
    assert all(isinstance(W, np.ndarray) and not is_device_array(W) for W in saved.values())
    assert not np.array_equal(
        to_host(model.params["h.0.attn.q.weight"]), before["h.0.attn.q.weight"]
    )
    unmerge(model)
    for name, value in before.items():
        assert is_device_array(model.params[name])
        assert np.array_equal(to_host(model.params[name]), value), name
