"""The benchmark's structure and arithmetic (never its speed: timings are results, not tests).

One quick pass on the tiny configuration is shared by the tests that read its output.
"""

import importlib
import json
import multiprocessing
import os

import numpy as np
import pytest

from minilora.cli.main import build_parser
from minilora.core import layers as layers_module
from minilora.core import lora as lora_module
from minilora.core import model as model_module
from minilora.core.optim import AdamW
from minilora.core.params import lora_parameter_count
from minilora.lab import (
    bench,
    bench_report,
    busy_core,
    flops,
    memory,
    op_profile,
    reference,
    torch_reference,
)

SECTIONS = ("config", "training", "forward", "memory", "flops", "ops", "torch")
PARTS = ("weights", "gradients", "optimizer", "activations")


@pytest.fixture(scope="module")
def quick():
    """A quick pass (tiny, 1 timed step), with PyTorch when it is installed."""
    return bench.run_benchmark(configs=["tiny"], steps=1, warmup=0, quick=True)


def _ops_in_namespaces():
    return {
        (module.__name__, attr): value
        for module in op_profile.OP_MODULES
        for attr, value in vars(module).items()
        if op_profile.is_op(value)
    }


def test_results_have_every_section_and_are_json(quick):
    assert set(quick) == {"meta", "settings", "matmul", "configs"}
    assert {"date", "machine", "numpy", "blas", "torch"} <= set(quick["meta"])
    assert quick["meta"]["blas"]["library"] and quick["meta"]["blas"]["source"]
    r = quick["configs"]["tiny"]
    assert set(SECTIONS) <= set(r)
    for mode in reference.MODES:
        assert r["training"]["minilora"][mode]["median_ms"] > 0
        assert set(PARTS) | {"peak", "predicted"} <= set(r["memory"][mode])
        assert r["flops"][mode]["total"] > 0
        assert r["ops"][mode]["ops"]
    assert {"base", "lora_unmerged", "lora_merged", "merged_over_base"} <= set(r["forward"])
    assert r["config"]["tokens"] == 4 * 16
    json.loads(json.dumps(quick, allow_nan=False))  # plain JSON: no NumPy types, no NaN


def test_the_table_shows_each_part(quick):
    text = bench_report.format_results(quick)
    for words in ("training step", "forward only", "memory of a step", "where the time goes"):
        assert words in text
    assert "== tiny" in text and "matmul rate" in text


def test_memory_parts_add_up_to_the_peak(quick):
    for mode in reference.MODES:
        m = quick["configs"]["tiny"]["memory"][mode]
        assert sum(m[k] for k in PARTS) == m["peak"]
        assert m["activations"] > 0
        predicted = m["predicted"]
        assert sum(predicted[k] for k in PARTS) == predicted["total"]


def test_lora_keeps_far_less_gradient_and_optimizer_state(quick):
    mem = quick["configs"]["tiny"]["memory"]
    full = mem["full"]["gradients"] + mem["full"]["optimizer"]
    lora = mem["lora"]["gradients"] + mem["lora"]["optimizer"]
    assert lora < 0.2 * full
    # exact: 4 bytes of gradient per trainable float32 parameter, and 12 of AdamW: the
    # moments m and v and its work array
    cfg, _ = reference.reference_config("tiny")
    n_lora = lora_parameter_count(cfg.n_layer, cfg.d_model, 8, ("q", "k", "v", "o"))
    assert mem["lora"]["gradients"] == 4 * n_lora
    assert mem["lora"]["optimizer"] == 12 * n_lora
    assert mem["full"]["gradients"] == mem["full"]["predicted"]["gradients"]
    assert mem["saving"]["fraction"] == pytest.approx(1.0)


def test_memory_report_arithmetic():
    measured = {
        "full": dict(weights=10, gradients=10, optimizer=20, activations=5, peak=45),
        "lora": dict(weights=11, gradients=1, optimizer=2, activations=5, peak=19),
    }
    predicted = {
        "full": dict(weights=10, gradients=10, optimizer=20, activations=3, total=43),
        "lora": dict(weights=11, gradients=1, optimizer=1, activations=3, total=16),
    }
    report = memory.memory_report(measured, predicted, "test")
    assert report["saving"]["measured"] == 27 and report["saving"]["theoretical"] == 28
    assert report["saving"]["fraction"] == pytest.approx(27 / 28)
    assert report["saving"]["peak"] == 26


def test_flop_count_of_tiny_by_hand():
    cfg, batch = reference.reference_config("tiny")  # V 65, d 32, 2 layers, T 16, batch 4
    tokens = 4 * 16
    # matrix weights: per block q, k, v, o (32 x 32) + fc, proj (128 x 32); head 65 x 32
    matmul_params = 2 * (4 * 32 * 32 + 2 * 128 * 32) + 65 * 32
    assert matmul_params == 26_656
    attention = 12 * 2 * 16 * 32 * tokens  # 12 n_layer T d per token
    full = flops.step_flops(cfg, batch, "full")
    assert full["matmul_params"] == matmul_params
    assert full["attention"] == attention == 786_432
    assert full["total"] == 6 * matmul_params * tokens + attention == 11_022_336
    lora_params = 2 * 4 * 8 * (32 + 32)  # A (8, 32) and B (32, 8) on q, k, v, o of 2 blocks
    lora = flops.step_flops(cfg, batch, "lora")
    assert lora["lora_params"] == lora_params == 4096
    assert lora["total"] == 4 * matmul_params * tokens + 6 * lora_params * tokens + attention
    assert lora["total"] == 9_183_232
    base = flops.step_flops(cfg, batch, "base")
    assert base["total"] == 2 * matmul_params * tokens + attention // 3


def test_op_timer_times_the_ops_and_restores_them():
    before = _ops_in_namespaces()
    assert ("minilora.core.lora", "linear_forward") in before  # the LoRA layer's own lookups
    assert ("minilora.core.layers", "softmax_forward") in before  # attention's
    cfg, batch = reference.reference_config("tiny")
    model = reference.build_model(cfg, "lora")
    idx, targets = reference.make_batch(cfg, batch)
    with op_profile.timed_ops() as times:
        assert (
            model_module.layer_norm_forward
            is not before[("minilora.core.model", "layer_norm_forward")]
        )
        model.loss(idx, targets)
        model.backward()
    assert _ops_in_namespaces() == before
    ops = {op for op, _ in times.seconds}
    assert {"linear", "lora", "lora_linear", "attention", "softmax", "layer_norm", "gelu"} <= ops
    assert times.calls[("lora", "forward")] == 4 * cfg.n_layer  # q, k, v, o of every block


def test_op_timer_restores_the_functions_when_a_step_raises():
    before = _ops_in_namespaces()
    cfg, batch = reference.reference_config("tiny")
    model = reference.build_model(cfg, "full")
    idx, targets = reference.make_batch(cfg, batch)
    with pytest.raises(RuntimeError, match="boom"), op_profile.timed_ops():
        model.loss(idx, targets)
        raise RuntimeError("boom")
    assert _ops_in_namespaces() == before
    # an op that raises inside its wrapper: the error passes through, the originals return
    with pytest.raises(ValueError), op_profile.timed_ops():
        layers_module.linear_forward(np.ones((2, 3)), np.ones((4, 5)))
    assert _ops_in_namespaces() == before
    assert lora_module.linear_forward is layers_module.linear_forward


def test_op_table_shares_add_up():
    cfg, batch = reference.reference_config("tiny")
    model = reference.build_model(cfg, "lora")
    idx, targets = reference.make_batch(cfg, batch)
    table = op_profile.op_table(model, AdamW(model), idx, targets, passes=1)
    assert sum(o["share"] for o in table["ops"]) == pytest.approx(1.0)
    assert sum(o["total_ms"] for o in table["ops"]) == pytest.approx(table["step_ms"])
    assert {"adamw", "other", "lora"} <= {o["op"] for o in table["ops"]}


def test_busy_helper_stops():
    with busy_core.busy_core() as helper:
        alive = [p for p in multiprocessing.active_children() if p.pid == helper["pid"]]
        assert alive and alive[0].is_alive()
    assert not [p for p in multiprocessing.active_children() if p.pid == helper["pid"]]


def test_command_line_arguments():
    """The bench options live with the other commands, --device and --seed defined once."""
    args = build_parser().parse_args(
        ["bench", "--config", "small", "--config", "medium", "--json", "x.json"]
    )
    assert args.config == ["small", "medium"] and args.json == "x.json"
    assert (args.steps, args.warmup, args.busy, args.no_torch, args.quick) == (
        None,  # not given: run() uses 10 and 2 (2 and 1 with --quick)
        None,
        False,
        False,
        False,
    )
    args = build_parser().parse_args(["bench", "--device", "cpu", "--seed", "3"])
    assert (args.device, args.seed) == ("cpu", 3)
    assert not hasattr(bench_report, "add_arguments")  # bench_report only formats


def test_without_torch_the_section_says_why():
    r = bench.bench_config("tiny", steps=1, warmup=0, use_torch=False, op_passes=1)
    assert r["torch"]["available"] is False and r["torch"]["reason"] == "--no-torch"
    assert r["training"]["torch"] is None


def test_torch_model_matches_minilora_logits(quick):
    pytest.importorskip("torch", reason="PyTorch is not installed (the `ref` extra)")
    cfg, batch = reference.reference_config("tiny")
    idx, _ = reference.make_batch(cfg, batch)
    for mode in reference.MODES:
        assert torch_reference.torch_logit_difference(reference.build_model(cfg, mode), idx) < 1e-5
    r = quick["configs"]["tiny"]
    assert r["torch"]["available"]
    assert max(r["torch"]["max_abs_logit_diff"].values()) < 1e-5
    assert set(r["training"]["torch"]) == set(reference.MODES)


# ------------------------------------------------------ on what it ran; memory, lean
def test_the_results_say_on_what_they_ran(quick):
    """CPU model, BLAS kernel, cores and load: in the JSON and in the table's header."""
    meta = quick["meta"]
    assert meta["machine"]["cpu_model"] and meta["machine"]["usable_cores"] >= 1
    assert "kernel" in meta["blas"]  # OpenBLAS's kernel; None where none is reported
    assert len(meta["load_average"]) == 3
    header = bench_report.format_results(quick).split("\n\n")[0]
    assert f"CPU {meta['machine']['cpu_model']}" in header
    assert f"{meta['machine']['usable_cores']} of {meta['machine']['cpu_count']} cores" in header
    if meta["blas"]["kernel"]:
        assert f"kernel {meta['blas']['kernel']}" in header
    assert "load average" in header
    assert meta["element_threads"] >= 1  # the element-wise work's threads (basics/parallel.py)
    n = meta["element_threads"]
    assert f"element-wise work on {n} thread{'s' * (n != 1)}" in header


def test_results_of_each_kernel_get_their_own_file(tmp_path, monkeypatch, capsys):
    """Issue 21: results of several machines and kernels sit side by side in benchmarks/."""
    from minilora.cli.main import main
    from minilora.lab import machine

    cpu = {"device": "cpu", "blas": {"kernel": "SkylakeX"}}
    assert machine.results_filename(cpu) == "results-cpu-skylakex.json"
    assert machine.results_filename({"device": "cpu", "blas": {}}) == "results-cpu.json"
    assert machine.results_filename({"device": "gpu", "blas": {}}) == "results-gpu.json"
    one = {"device": "cpu", "blas": {"kernel": "Haswell", "threads": 1}}
    ones = (
        "results-cpu-haswell-1thread.json"
        if machine.usable_cores() > 1
        else "results-cpu-haswell.json"
    )
    assert machine.results_filename(one) == ones
    # a run of named configurations does not replace the default run's file
    hw = {"device": "cpu", "blas": {"kernel": "Haswell"}}
    assert machine.results_filename(hw, ["gpt2"]) == "results-cpu-haswell-gpt2.json"
    assert machine.results_filename(hw, ["small", "tiny"]) == "results-cpu-haswell-small-tiny.json"
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Sandybridge")  # recorded, not applied (too late)
    assert main(["bench", "--quick", "--no-torch", "--json", str(tmp_path)]) == 0
    name = machine.results_filename({"device": "cpu", "blas": bench.blas_info()})
    written = json.loads((tmp_path / name).read_text())
    assert written["meta"]["environment"] == {"OPENBLAS_CORETYPE": "Sandybridge"}
    assert "environment: OPENBLAS_CORETYPE=Sandybridge" in capsys.readouterr().out


def _measured(name: str) -> dict:
    cfg, batch = reference.reference_config(name)
    idx, targets = reference.make_batch(cfg, batch)
    out = {}
    for mode in reference.MODES:
        model = reference.build_model(cfg, mode)
        out[mode] = memory.measure_memory(model, AdamW(model), idx, targets)
        out[mode]["predicted"] = memory.predicted_memory(cfg, batch, mode)
    return out


@pytest.mark.parametrize(
    "name", ["small", pytest.param("medium", marks=pytest.mark.slow)]
)  # tracemalloc counts allocations, not time: the machine's load does not change them
def test_lora_keeps_fewer_activations_and_the_estimate_is_within_10_percent(name):
    m = _measured(name)
    assert m["lora"]["activations"] < 0.9 * m["full"]["activations"]
    for mode in reference.MODES:
        predicted, peak = m[mode]["predicted"]["total"], m[mode]["peak"]
        assert abs(predicted - peak) < 0.1 * peak, (mode, predicted, peak)
        assert m[mode]["predicted"]["optimizer"] == m[mode]["optimizer"]  # exact


# ------------------------------------------------------------- gpt2: GPT-2 small, opt-in
@pytest.fixture
def tiny_gpt2(monkeypatch):
    """The gpt2 configuration's code path on a shape that runs in a second: 2 sequences
    of 8 tokens from the tiny preset's 16 positions (the real one: 4 of 128 from 1024)."""
    monkeypatch.setattr(reference, "GPT2_PRESET", "tiny")
    monkeypatch.setattr(reference, "GPT2_BATCH", 2)
    monkeypatch.setattr(reference, "GPT2_SEQ", 8)
    return reference.gpt2_setup()


def test_gpt2_is_opt_in_with_gpt2_small_shape():
    assert "gpt2" in reference.CONFIGS and "gpt2" in bench.CONFIGS
    assert all("gpt2" not in names for names in reference.DEFAULT_CONFIGS.values())
    assert build_parser().parse_args(["bench", "--config", "gpt2"]).config == ["gpt2"]
    cfg, batch, seq = reference.gpt2_setup()
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.d_model) == (
        50257,
        1024,
        12,
        12,
        768,
    )
    assert (cfg.layer_norm_eps, cfg.dropout, batch, seq) == (1e-5, 0.0, 4, 128)
    adapter = reference.gpt2_lora_config()
    assert (adapter.r, adapter.alpha, adapter.dropout, adapter.target_modules) == (
        8,
        16.0,
        0.0,
        ("q", "v"),
    )
    with pytest.raises(ValueError, match="config='gpt2'"):  # not a preset: gpt2_setup says how
        reference.reference_config("gpt2")


def test_gpt2_model_shares_a_between_q_and_v(tiny_gpt2):
    """PEFT's rank-r c_attn can then hold the q, v adapter exactly (torch_reference.peft_gpt2)."""
    cfg, _, _ = tiny_gpt2
    model = reference.build_gpt2_model(cfg)
    again = reference.build_gpt2_model(cfg)
    for i in range(cfg.n_layer):
        A_q, A_v = (model.params[f"h.{i}.attn.{t}.lora_A.default"] for t in "qv")
        np.testing.assert_array_equal(A_q, A_v)
        assert np.abs(model.params[f"h.{i}.attn.v.lora_B.default"]).min() > 0
    for name, value in model.state_dict().items():  # built the same way every time
        np.testing.assert_array_equal(again.params[name], value)


def test_gpt2_path_without_torch(tiny_gpt2):
    cfg, batch, seq = tiny_gpt2
    results = bench.run_benchmark(configs=["gpt2"], steps=1, warmup=0, quick=True, use_torch=False)
    r = results["configs"]["gpt2"]
    assert r["kind"] == "gpt2" and r["torch"]["reason"] == "--no-torch"
    assert r["config"]["tokens"] == batch * seq == 16 and r["config"]["seq_len"] == 8
    d, n_layer = cfg.d_model, cfg.n_layer
    assert r["trainable"] == {"minilora": n_layer * 2 * 8 * (d + d)}  # q, v: A (8, d), B (d, 8)
    t = r["training"]["minilora"]
    assert set(r["training"]) == {"minilora"} and t["median_ms"] > 0
    assert t["tokens_per_s"] == pytest.approx(16 / (t["median_ms"] / 1e3))
    assert r["what_it_takes"]["minilora"]["minutes_per_1000_steps"] == pytest.approx(
        1000 * t["median_ms"] / 60e3
    )
    m = r["memory"]["minilora"]
    assert sum(m[k] for k in PARTS) == m["peak"]
    # the prediction counts the 32 stored positions although a step uses 8: exact
    assert m["predicted"]["weights"] == m["weights"]
    assert m["predicted"]["optimizer"] == m["optimizer"] == 12 * r["trainable"]["minilora"]
    assert m["predicted"]["gradients"] == m["gradients"]
    rss = r["memory"]["rss"]["minilora"]
    if rss is not None:  # Linux
        assert rss["peak"] == m["weights"] + m["optimizer"] + rss["above"]
    json.loads(json.dumps(results, allow_nan=False))
    text = bench_report.format_results(results)
    assert "== gpt2: GPT-2 small's shape" in text and "PEFT not compared: --no-torch" in text
    assert "LoRA training step" in text and "1,000 steps" in text


def test_gpt2_refuses_in_one_line_without_peft(tiny_gpt2, monkeypatch, capsys):
    """Before anything is measured; --no-torch still runs."""
    from minilora.cli.main import main

    monkeypatch.setattr(bench, "peft_available", lambda: (False, "No module named 'peft'"))
    assert main(["bench", "--config", "gpt2", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minilora bench: error: --config gpt2 compares with transformers + PEFT")
    assert "No module named 'peft'" in err and "--no-torch" in err and err.count("\n") == 1
    assert main(["bench", "--config", "gpt2", "--quick", "--no-torch"]) == 0
    assert "== gpt2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--config gpt2 measures the CPU"):
        bench.bench_gpt2(device="gpu")  # checked before CuPy is asked for


def _require_reference():
    """torch, transformers and peft: a failure under MINILORA_REQUIRE_REFERENCE=1 (CI
    installs the `ref` extra), a skip otherwise."""
    for name in ("torch", "transformers", "peft"):
        if os.environ.get("MINILORA_REQUIRE_REFERENCE") == "1":
            importlib.import_module(name)
        else:
            pytest.importorskip(name, reason="the `ref` extra is not installed")


def test_gpt2_against_peft_same_function_and_size(tiny_gpt2, monkeypatch):
    _require_reference()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg, batch, seq = tiny_gpt2
    results = bench.run_benchmark(configs=["gpt2"], steps=1, warmup=0, quick=True)
    r = results["configs"]["gpt2"]
    logits = r["torch"]["logits"]
    assert logits["max_abs"] > 0.1 and logits["max_abs_diff"] < 1e-5 * logits["max_abs"]
    # PEFT's r=8 on c_attn (d -> 3d) against minilora's r=8 on q and v (d -> d each)
    assert (
        r["trainable"]["peft"] == r["trainable"]["minilora"] == cfg.n_layer * 8 * (4 * cfg.d_model)
    )
    assert set(r["training"]) == {"minilora", "peft", "minilora_over_peft"}
    rss = r["memory"]["rss"]
    if rss["minilora"] is not None:  # Linux: the same weights, tied head counted once
        assert rss["peft"]["weights"] == rss["minilora"]["weights"]
        assert rss["peft"]["optimizer"] >= 8 * r["trainable"]["peft"]  # AdamW's two moments
    text = bench_report.format_results(results)
    assert "PEFT, PyTorch eager" in text and "minilora / PEFT" in text and "fused c_attn" in text


def test_peft_gpt2_step_starts_at_minilora_loss_and_trains(tiny_gpt2):
    """The first losses agree (the same function); then each side trains its own adapter
    (PEFT's k rows of B and its one A move too), so the losses drift apart slowly."""
    _require_reference()
    cfg, batch, seq = tiny_gpt2
    model = reference.build_gpt2_model(cfg)
    ref = torch_reference.peft_gpt2(model)
    idx, targets = reference.make_batch(cfg, batch, 0, seq)
    opt = AdamW(model)
    ours = [reference.training_step(model, opt, idx, targets) for _ in range(3)]
    theirs = [ref["step"](idx, targets) for _ in range(3)]
    assert ours[0] == pytest.approx(theirs[0], rel=1e-6)
    assert ours[2] < ours[0] and theirs[2] < theirs[0]


def test_a_named_configuration_gets_its_own_results_file(tmp_path):
    """`--json DIR --config tiny` writes results-<kernel>-tiny.json, beside the default
    run's file instead of over it (a gpt2 run once replaced a small run's JSON)."""
    from minilora.cli.main import main
    from minilora.lab import machine

    assert (
        main(["bench", "--quick", "--no-torch", "--config", "tiny", "--json", str(tmp_path)]) == 0
    )
    meta = {"device": "cpu", "blas": bench.blas_info()}
    assert [p.name for p in tmp_path.iterdir()] == [machine.results_filename(meta, ["tiny"])]
    assert machine.results_filename(meta, ["tiny"]).endswith("-tiny.json")
