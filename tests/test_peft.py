"""PEFT's adapter format without PEFT: the fusion and the split are exact, bad files refused.

The checks against PEFT itself are in tests/test_gpt2_reference.py.
"""

import json

import numpy as np
import pytest
from conftest import random_model, randomise_adapters

import minilora as ml
from minilora.core.dora import weight_norm
from minilora.files.io import load_safetensors, save_safetensors

CFG = ml.GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=8)
PREFIX = "base_model.model.transformer.h"


def adapted(config, seed=0):
    model = random_model(CFG, seed=seed)
    ml.add_adapter(model, config)
    randomise_adapters(model, seed=seed + 1)
    return model.eval()


def delta(model, module, name="default"):
    adapter = model.adapters[name]
    A, B = (model.params[f"{module}.lora_{x}.{name}"] for x in "AB")
    return ml.delta_weight(A, B, adapter.config.scale)


@pytest.mark.parametrize("rslora", [False, True])
def test_fused_c_attn_has_the_same_delta_w(tmp_path, rslora):
    config = ml.LoraConfig(r=2, alpha=3.0, target_modules=("q", "v", "fc"), use_rslora=rslora)
    model = adapted(config)
    ml.save_adapter(model, tmp_path, format="peft")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    tensors, _ = load_safetensors(tmp_path / "adapter_model.safetensors")
    assert meta["target_modules"] == ["c_attn", "c_fc"] and meta["r"] == 2
    assert meta["rank_pattern"] == {"c_attn": 4}  # q and v stacked: rank 2 + 2
    R, alpha_c = 4, meta["alpha_pattern"]["c_attn"]
    scale_c = alpha_c / (np.sqrt(R) if rslora else R)
    assert scale_c == pytest.approx(config.scale, rel=1e-15)  # the scale is kept
    C = CFG.d_model
    for i in range(CFG.n_layer):
        A = tensors[f"{PREFIX}.{i}.attn.c_attn.lora_A.weight"]
        B = tensors[f"{PREFIX}.{i}.attn.c_attn.lora_B.weight"]
        assert A.shape == (R, C) and B.shape == (3 * C, R)
        fused = scale_c * (B @ A)  # (3d, d): rows q | k | v
        np.testing.assert_allclose(fused[:C], delta(model, f"h.{i}.attn.q"), rtol=1e-13, atol=1e-15)
        assert not fused[C : 2 * C].any()  # k is not adapted: exactly zero
        np.testing.assert_allclose(
            fused[2 * C :], delta(model, f"h.{i}.attn.v"), rtol=1e-13, atol=1e-15
        )
        np.testing.assert_array_equal(
            tensors[f"{PREFIX}.{i}.mlp.c_fc.lora_B.weight"],
            model.params[f"h.{i}.mlp.fc.lora_B.default"],
        )


def write_peft(folder, config, tensors):
    folder.mkdir(exist_ok=True)
    meta = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["c_attn"],
        "bias": "none",
    }
    meta.update(config)
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    save_safetensors(folder / "adapter_model.safetensors", tensors, {"format": "pt"})


def write_patterned(folder, tensors, rng, dora=False):
    """Add a rank-2 c_fc adapter in block 1 (its own alpha, 3) to ``tensors`` and write
    them with rank and alpha patterns; returns c_fc's A, B and (DoRA) magnitude."""
    C = CFG.d_model
    A_fc, B_fc = rng.normal(size=(2, C)), rng.normal(size=(4 * C, 2))
    tensors[f"{PREFIX}.1.mlp.c_fc.lora_A.weight"] = A_fc
    tensors[f"{PREFIX}.1.mlp.c_fc.lora_B.weight"] = B_fc
    m_fc = rng.normal(size=4 * C) if dora else None
    if dora:
        tensors[f"{PREFIX}.1.mlp.c_fc.lora_magnitude_vector"] = m_fc
    patterns = {"rank_pattern": {"c_fc": 2}, "alpha_pattern": {"c_fc": 3}}
    write_peft(folder, {"target_modules": ["c_attn", "c_fc"], "use_dora": dora} | patterns, tensors)
    return A_fc, B_fc, m_fc


def c_attn_tensors(blocks=(0, 1), r=4, seed=0):
    rng = np.random.default_rng(seed)
    C = CFG.d_model
    out = {}
    for i in blocks:
        out[f"{PREFIX}.{i}.attn.c_attn.lora_A.weight"] = rng.normal(size=(r, C))
        out[f"{PREFIX}.{i}.attn.c_attn.lora_B.weight"] = rng.normal(size=(3 * C, r))
    return out


def test_fused_c_attn_splits_into_q_k_v_exactly(tmp_path):
    tensors = c_attn_tensors()
    write_peft(tmp_path, {}, tensors)
    model = random_model(CFG)
    assert ml.load_adapter(model, tmp_path) == "default"
    adapter = model.adapters["default"]
    assert adapter.config.r == 4 and adapter.config.scale == 2.0
    assert adapter.config.target_modules == ("q", "k", "v")
    C = CFG.d_model
    A, B = (
        tensors[f"{PREFIX}.1.attn.c_attn.lora_A.weight"],
        tensors[f"{PREFIX}.1.attn.c_attn.lora_B.weight"],
    )
    for j, t in enumerate("qkv"):  # A shared, B its row block: bit for bit
        np.testing.assert_array_equal(model.params[f"h.1.attn.{t}.lora_A.default"], A)
        np.testing.assert_array_equal(
            model.params[f"h.1.attn.{t}.lora_B.default"], B[j * C : (j + 1) * C]
        )


def test_patterns_are_padded_and_folded(tmp_path):
    """c_fc with rank 2 and its own alpha, c_attn rank 4: one rank-4 adapter, same ΔW."""
    A_fc, B_fc, _ = write_patterned(tmp_path, c_attn_tensors(blocks=(0,)), np.random.default_rng(1))
    model = random_model(CFG)
    ml.load_adapter(model, tmp_path)
    config = model.adapters["default"].config
    assert (config.r, config.scale, config.layers) == (4, 2.0, None)
    np.testing.assert_allclose(
        delta(model, "h.1.mlp.fc"), 1.5 * (B_fc @ A_fc), rtol=1e-13, atol=1e-14
    )
    assert not delta(model, "h.0.mlp.fc").any()  # the grid's empty cell adds nothing
    assert not delta(model, "h.1.attn.q").any()


def test_round_trip_keeps_every_delta_w(tmp_path):
    model = adapted(ml.LoraConfig(r=2, target_modules=ml.TARGET_MODULES, layers=(1,)))
    ml.save_adapter(model, tmp_path, format="peft")
    again = random_model(CFG)
    ml.load_adapter(again, tmp_path, name="back")
    for module in model.adapters["default"].modules:
        np.testing.assert_allclose(
            delta(again, module, "back"), delta(model, module), rtol=1e-12, atol=1e-15
        )


def _meta(**change):
    return lambda folder: write_peft(folder, change, c_attn_tensors())


def _tensors(change):
    def prepare(folder):
        tensors = c_attn_tensors()
        change(tensors)
        write_peft(folder, {}, tensors)

    return prepare


def _nan(t):
    t[f"{PREFIX}.0.attn.c_attn.lora_B.weight"][0, 0] = np.nan


def _magnitude(t):
    t[f"{PREFIX}.0.attn.c_attn.lora_magnitude_vector"] = np.ones(3 * CFG.d_model)


def _dora_short_magnitude(folder):
    tensors = c_attn_tensors()
    for i in (0, 1):
        tensors[f"{PREFIX}.{i}.attn.c_attn.lora_magnitude_vector"] = np.ones(CFG.d_model)
    write_peft(folder, {"use_dora": True}, tensors)


BAD = [
    ("dora_without_magnitude", _meta(use_dora=True), "needs exactly lora_A, lora_B, lora_mag"),
    ("magnitude_without_dora", _tensors(_magnitude), "use_dora=False .* needs exactly lora_A, lo"),
    ("dora_short_magnitude", _dora_short_magnitude, r"lora_magnitude_vector has shape \(8,\)"),
    ("dora_string", _meta(use_dora="yes"), "use_dora"),
    ("bias_all", _meta(bias="all"), "bias='all'"),
    ("modules_to_save", _meta(modules_to_save=["lm_head"]), "modules_to_save"),
    ("pissa_init", _meta(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    ("prefix_tuning", _meta(peft_type="PREFIX_TUNING"), "peft_type='PREFIX_TUNING'"),
    ("r_zero", _meta(r=0), "r=0"),
    ("alpha_string", _meta(lora_alpha="8"), "lora_alpha"),
    ("rank_mismatch", _meta(r=3), r"shape \(4, 8\).*r=3"),
    (
        "unknown_key",
        _tensors(lambda t: t.update(other=np.zeros(2))),
        "'other' is not a LoRA factor",
    ),
    (
        "lm_head",
        _tensors(lambda t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros(2)})),
        "lm_head",
    ),
    (
        "only_A",
        _tensors(lambda t: t.pop(f"{PREFIX}.1.attn.c_attn.lora_B.weight")),
        "has lora_A; .* needs exactly lora_A, lora_B",
    ),
    (
        "block_5",
        _tensors(lambda t: t.update({k.replace("h.0", "h.5"): v for k, v in list(t.items())})),
        "h.5",
    ),
    ("nan", _tensors(_nan), "NaN"),
    ("empty", _tensors(lambda t: t.clear()), "no LoRA factors"),
]


@pytest.mark.parametrize("prepare, match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_peft_adapter_is_refused_and_changes_nothing(tmp_path, prepare, match):
    prepare(tmp_path)
    model = random_model(CFG)
    before = model.state_dict()
    with pytest.raises((TypeError, ValueError), match=match) as err:
        ml.load_adapter(model, tmp_path)
    assert "\n" not in str(err.value)
    assert not model.adapters and model.state_dict().keys() == before.keys()


def test_export_refuses_pissa_vera_quantized_dora_merged_and_unknown_format(tmp_path):
    model = adapted(ml.LoraConfig(r=2, init="pissa"))
    with pytest.raises(ValueError, match="PiSSA"):
        ml.save_adapter(model, tmp_path, format="peft")
    model = adapted(ml.LoraConfig(r=2, use_vera=True))  # was a KeyError on h.0.attn.q.lora_A
    with pytest.raises(ValueError, match="VeRA adapter; PEFT export writes LoRA and DoRA"):
        ml.save_adapter(model, tmp_path, format="peft")
    model = random_model(CFG, dtype="float32")
    ml.quantize_base(model, "nf4")
    ml.add_adapter(model, ml.LoraConfig(r=2, use_dora=True))
    with pytest.raises(ValueError, match=r"DoRA adapter on a quantized \(nf4\) base"):
        ml.save_adapter(model, tmp_path, format="peft")
    model = adapted(ml.LoraConfig(r=2))
    with pytest.raises(ValueError, match="format='torch'"):
        ml.save_adapter(model, tmp_path, format="torch")
    ml.merge(model)
    with pytest.raises(ValueError, match="merged"):
        ml.save_adapter(model, tmp_path, format="peft")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- DoRA
DORA = ml.LoraConfig(r=2, alpha=3.0, target_modules=("q", "v", "fc"), use_dora=True)


def test_dora_export_concatenates_the_magnitudes_of_q_k_v(tmp_path):
    """c_attn's magnitude is [m_q | m_k | m_v]; k has no adapter: ||W_k|| per row."""
    model = adapted(DORA)
    ml.save_adapter(model, tmp_path, format="peft")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["use_dora"] is True
    tensors, _ = load_safetensors(tmp_path / "adapter_model.safetensors")
    C = CFG.d_model
    for i in range(CFG.n_layer):
        m_c = tensors[f"{PREFIX}.{i}.attn.c_attn.lora_magnitude_vector"]
        assert m_c.shape == (3 * C,)
        for t in "qv":
            rows = slice(0, C) if t == "q" else slice(2 * C, 3 * C)
            np.testing.assert_array_equal(
                m_c[rows], model.params[f"h.{i}.attn.{t}.lora_magnitude.default"]
            )
        W_k = model.params[f"h.{i}.attn.k.weight"]
        np.testing.assert_allclose(m_c[C : 2 * C], np.linalg.norm(W_k, axis=1), rtol=1e-15)
        np.testing.assert_array_equal(
            tensors[f"{PREFIX}.{i}.mlp.c_fc.lora_magnitude_vector"],
            model.params[f"h.{i}.mlp.fc.lora_magnitude.default"],
        )


@pytest.mark.parametrize(
    "config",
    [
        DORA,
        ml.LoraConfig(r=2, target_modules=ml.TARGET_MODULES, layers=(1,), use_dora=True),
        ml.LoraConfig(r=3, alpha=2.0, target_modules=("k",), use_rslora=True, use_dora=True),
    ],
    ids=["q_v_fc", "all_layer_1", "k_rslora"],
)
def test_dora_round_trip_gives_the_same_logits(tmp_path, config):
    """Export, import into a fresh copy of the base: the same function (float64)."""
    model = adapted(config)
    ml.save_adapter(model, tmp_path, format="peft")
    again = random_model(CFG)
    ml.load_adapter(again, tmp_path, name="back")
    assert again.adapters["back"].config.use_dora
    idx = np.arange(12).reshape(2, 6)
    expected = model.forward(idx)
    assert np.abs(again.eval().forward(idx) - expected).max() < 1e-12 * np.abs(expected).max()
    for module in model.adapters["default"].modules:
        np.testing.assert_array_equal(
            again.params[f"{module}.lora_magnitude.back"],
            model.params[f"{module}.lora_magnitude.default"],
        )


def test_dora_import_splits_the_magnitude_and_folds_the_patterns(tmp_path):
    """c_attn rank 4 with its magnitude; c_fc rank 2 with its own alpha, in block 1 only."""
    rng = np.random.default_rng(2)
    C = CFG.d_model
    tensors = c_attn_tensors(blocks=(0,))
    m_c = rng.uniform(0.5, 2.0, 3 * C)
    tensors[f"{PREFIX}.0.attn.c_attn.lora_magnitude_vector"] = m_c
    A_fc, B_fc, m_fc = write_patterned(tmp_path, tensors, rng, dora=True)
    model = random_model(CFG)
    ml.load_adapter(model, tmp_path)
    config = model.adapters["default"].config
    assert config.use_dora and (config.r, config.scale) == (4, 2.0)
    for j, t in enumerate("qkv"):  # each its slice of the magnitude, bit for bit
        np.testing.assert_array_equal(
            model.params[f"h.0.attn.{t}.lora_magnitude.default"], m_c[j * C : (j + 1) * C]
        )
    np.testing.assert_array_equal(model.params["h.1.mlp.fc.lora_magnitude.default"], m_fc)
    np.testing.assert_allclose(  # the folded scale keeps s B A, so the norm m divides by
        delta(model, "h.1.mlp.fc"), 1.5 * (B_fc @ A_fc), rtol=1e-13, atol=1e-14
    )
    for module in ("h.1.attn.q", "h.0.mlp.fc"):  # empty cells: m = ||W|| per row, m / n = 1
        W = model.params[f"{module}.weight"]
        assert not delta(model, module).any()
        np.testing.assert_array_equal(
            model.params[f"{module}.lora_magnitude.default"],
            weight_norm(W, np.zeros((1, W.shape[1])), np.zeros((W.shape[0], 1)), 1.0),
        )
