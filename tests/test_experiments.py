"""The experiments and figures: the arithmetic of each experiment, and a quick pass of
`minilora figures` that must draw all ten PNGs with their data."""

import json

import numpy as np
import pytest

from minilora.core import params
from minilora.lab import experiments as E
from minilora.training.data import FixedPoolTask, ShiftTask


def test_parameter_counts_reproduce_the_lora_paper():
    records = E.parameter_counts(presets=("gpt3-175b",), ranks=(1, 4, 8))
    qv = {r["r"]: r["lora"] for r in records if r["targets"] == "q,v"}
    assert qv == {1: 4_718_592, 4: 18_874_368, 8: 37_748_736}  # 4.7M, 18.9M, 37.7M
    assert {r["full"] for r in records} == {174_604_259_328}
    small = E.parameter_counts(presets=("small",), ranks=(64, 128, 256))
    assert max(r["r"] for r in small) == 128  # r above d_model = 128 adds no capacity


def test_phi_is_one_for_the_same_subspace_and_small_for_random_ones():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((8, 128))
    same = E._phi(A, np.concatenate([A, rng.standard_normal((56, 128))]))
    assert np.allclose(np.diag(same)[:8], np.diag(same)[:8])  # well defined
    assert same[7, 63] == pytest.approx(1.0)  # the 8 directions lie inside the 64
    random = E._phi(rng.standard_normal((8, 128)), rng.standard_normal((64, 128)))
    assert random[0, 0] < 0.2 and random[7, 63] == pytest.approx(64 / 128, abs=0.15)


def test_a_fixed_pool_only_ever_shows_its_own_examples():
    task = ShiftTask()
    pool = FixedPoolTask(task, 5, task.block_size, seed=3)
    rows = {tuple(r) for r in pool.pool.idx}
    for seed in range(4):
        assert {tuple(r) for r in pool.batch(seed, 16, task.block_size).idx} <= rows
    held_out = pool.eval_batch(8, task.block_size)
    np.testing.assert_array_equal(held_out.idx, task.eval_batch(8, task.block_size).idx)


def test_a_training_run_is_a_deterministic_record():
    kwargs = dict(task="shift", r=2, steps=3, batch_size=4, eval_size=8, seed=1, pool=16)
    first, second = E.train_run(**kwargs), E.train_run(**kwargs)
    assert first.pop("seconds") > 0 and second.pop("seconds") > 0  # the one thing that varies
    assert first == second
    assert first["targets"] == "q,k,v,o" and len(first["curve"]) == 3
    assert first["trainable"] == params.lora_parameter_count(4, 128, 2, ("q", "k", "v", "o"))
    assert {"val_loss", "val_exact", "train_loss"} <= set(first)


def test_an_adapter_run_saves_what_it_trained(tmp_path):
    from minilora.basics.blas import limited_threads
    from minilora.files.checkpoints import load_adapter, load_base
    from minilora.lab.runs import adapter_run
    from minilora.training.data import get_task

    directory = tmp_path / "rot"
    run = adapter_run(task="rot", name="rot", directory=str(directory), targets=("q", "v"), steps=3)
    assert run["seconds"] > 0 and run["steps"] == 3
    fresh, tok = load_base()
    assert load_adapter(fresh, directory) == "rot" and fresh.active_adapters == ["rot"]
    assert sorted(fresh.adapters["rot"].modules) == sorted(
        f"h.{i}.attn.{t}" for i in range(4) for t in ("q", "v")
    )
    task = get_task("rot", tokenizer=tok)
    idx = task.eval_batch(256, task.block_size, seed=0).idx
    with limited_threads(1):  # the run's own thread count: the same rounding, bit for bit
        np.testing.assert_array_equal(fresh.forward(idx), run["val_logits"])
    base, _ = load_base()
    assert np.abs(base.forward(idx) - run["val_logits"]).max() > 1e-3  # 3 steps moved it


@pytest.mark.slow
def test_quick_figures_draw_all_eleven_with_their_data(tmp_path):
    from minilora.lab.figures import NAMES, make_figures

    written = make_figures(tmp_path, quick=True, log=lambda message: None)
    assert [w["name"] for w in written] == list(NAMES) and len(NAMES) == 11
    for name in NAMES:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["quick"] is True and all(data["records"].values())


def test_unknown_figure_is_refused(tmp_path):
    from minilora.lab.figures import make_figures

    with pytest.raises(ValueError, match="unknown figure 'nope'"):
        make_figures(tmp_path, only=["nope"])


def test_quick_figures_never_replace_the_committed_ones(tmp_path, monkeypatch, capsys):
    """``minilora figures --quick`` from the repository root writes elsewhere by default."""
    pytest.importorskip("matplotlib")
    from minilora.cli.main import main

    monkeypatch.chdir(tmp_path)
    committed = tmp_path / "figures" / "params_vs_rank.png"
    committed.parent.mkdir()
    committed.write_bytes(b"the committed figure")
    assert main(["figures", "--quick", "--only", "params_vs_rank"]) == 0
    assert committed.read_bytes() == b"the committed figure"
    assert sorted(p.name for p in committed.parent.iterdir()) == ["params_vs_rank.png"]
    quick = tmp_path / "runs" / "figures-quick" / "params_vs_rank.png"
    assert quick.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(quick.relative_to(tmp_path)) in capsys.readouterr().out
