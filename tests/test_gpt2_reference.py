"""GPT-2 and PEFT against the libraries themselves: transformers and peft (the `ref` extra).

Every model here is built locally with random weights (HF_HUB_OFFLINE=1: nothing is
downloaded). The biases and layer-norm parameters are moved away from 0 and 1, and the
weights made larger than GPT-2's init, so a mapping that mixes them up cannot pass.
"""

import os

import numpy as np
import pytest

import minilora as ml

os.environ["HF_HUB_OFFLINE"] = "1"  # never the network, whatever a test asks for
if os.environ.get("MINILORA_REQUIRE_REFERENCE") == "1":
    import torch  # CI installs the `ref` extra: a missing reference must fail, not skip
    import transformers
else:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (the `ref` extra)")
    transformers = pytest.importorskip("transformers", reason="the `ref` extra is not installed")

SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)


def hf_gpt2(seed=0, **config):
    """A transformers GPT-2 with random weights, in eval mode, every parameter moved."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**SMALL, **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # biases ~ N(0, 0.1), layer-norm weights ~ 1 + N(0, 0.1)
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(3.0)
    return model.eval()


def ids(vocab=1000, shape=(2, 40), seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def hf_logits(model, idx, dtype=torch.float32):
    with torch.no_grad():
        return model.to(dtype)(torch.tensor(idx)).logits.numpy()


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-10)])
def test_load_gpt2_gives_transformers_logits(tmp_path, dtype, tol):
    hf = hf_gpt2(layer_norm_epsilon=1e-3)  # not the default: eps must be read, not assumed
    hf.save_pretrained(tmp_path)
    model = ml.load_gpt2(tmp_path, dtype=dtype).eval()
    assert model.config.layer_norm_eps == 1e-3
    idx = ids()
    expected = hf_logits(hf, idx, getattr(torch, dtype))
    got = ml.to_host(model.forward(idx))
    assert np.abs(expected).max() > 1.0  # logits of a real size, not all near 0
    assert np.abs(got - expected).max() < tol * np.abs(expected).max()


def test_merged_export_loads_in_transformers(tmp_path):
    hf = hf_gpt2(seed=1)
    hf.save_pretrained(tmp_path / "base")
    model = ml.load_gpt2(tmp_path / "base")
    ml.add_adapter(
        model, ml.LoraConfig(r=4, alpha=8.0, target_modules=("q", "v", "o", "fc", "proj"))
    )
    rng = np.random.default_rng(0)
    for name in model.params:
        if ".lora_B." in name:
            model.params[name][...] = rng.normal(0.0, 0.05, model.params[name].shape)
    ml.save_model(model, tmp_path / "merged", format="hf")
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    idx = ids(seed=2)
    expected = ml.to_host(model.eval().forward(idx))
    assert np.abs(hf_logits(hf, idx) - expected).max() > 1e-2  # the adapter changes something
    assert np.abs(hf_logits(loaded, idx) - expected).max() < 1e-5 * np.abs(expected).max()


@pytest.mark.slow
def test_gpt2_small_config_gives_transformers_logits(tmp_path):
    """GPT-2 small's own sizes (124M parameters), random weights, float32."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    hf.save_pretrained(tmp_path)
    model = ml.load_gpt2(tmp_path).eval()
    assert ml.count_parameters(model).total == sum(p.numel() for p in hf.parameters())
    idx = ids(vocab=50257, shape=(1, 64))
    expected = hf_logits(hf, idx)
    assert np.abs(ml.to_host(model.forward(idx)) - expected).max() < 1e-5 * np.abs(expected).max()
