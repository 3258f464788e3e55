"""BLAS threads: limited within a block, chosen by measurement, recorded by a run."""

import json

import pytest

import minilora as ml
from minilora.basics import blas
from minilora.training.data import ShiftTask
from minilora.training.train import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(blas.current_threads() is None, reason="no controllable BLAS")


def test_limited_threads_sets_and_restores():
    before = blas.current_threads()
    with blas.limited_threads(1):
        assert blas.current_threads() == 1
    assert blas.current_threads() == before
    with blas.limited_threads(None):  # None leaves the library alone
        assert blas.current_threads() == before


def test_choose_threads_keeps_the_fastest_count():
    """A fake clock: one call takes 3 s with 1 thread and 1 s with 2 (as on a quiet
    machine), then the other way round (as with a busy core)."""
    for cost, expected in (({1: 3.0, 2: 1.0}, 2), ({1: 1.0, 2: 3.0}, 1)):
        now = [0.0]

        def run_once(cost=cost, now=now):
            now[0] += cost.get(blas.current_threads(), 9.0)

        choice = blas.choose_threads(run_once, candidates=(1, 2), clock=lambda now=now: now[0])
        assert choice["threads"] == expected
        assert choice["seconds"] == {1: cost[1], 2: cost[2]}
    assert "took 1: 1000 ms, 2: 3000 ms" in blas.describe(1, choice)


def test_a_run_records_its_thread_count_and_resume_reuses_it(tmp_path):
    cfg = TrainConfig(steps=4, batch_size=4, block_size=24, eval_every=0, eval_size=8)
    gpt = ml.GPTConfig(vocab_size=96, block_size=24, n_layer=1, n_head=2, d_model=16)
    first = Trainer(ml.GPT(gpt), ShiftTask(), cfg, tmp_path, False, threads="auto")
    first.run(until=2)
    saved = json.loads((tmp_path / "ckpt-000002" / "trainer.json").read_text())
    assert saved["settings"]["blas_threads"] == first.blas_threads >= 1
    again = Trainer(ml.GPT(gpt), ShiftTask(), cfg, tmp_path, False, threads="auto")
    again.run(resume=True)
    assert again.thread_choice is None and again.blas_threads == first.blas_threads
    other = first.blas_threads % 2 + 1
    with pytest.raises(ValueError, match=f"blas_threads {first.blas_threads} -> {other}"):
        Trainer(ml.GPT(gpt), ShiftTask(), cfg, tmp_path, False, threads=other).run(resume=True)


def test_summary_names_the_kernel_and_the_threads(monkeypatch):
    """The kernel (chosen per CPU type) changes float32 rounding as much as the thread
    count does, so a printed result names both (issue 20: the demo's numbers)."""
    fake = {"user_api": "blas", "internal_api": "openblas", "num_threads": 2}
    fake |= {"version": "0.3.31.188.0", "architecture": "SkylakeX"}
    monkeypatch.setattr(blas, "threadpool_info", lambda: [fake])
    assert blas.blas_libraries()[0]["kernel"] == "SkylakeX"
    line = blas.summary(1)
    assert line.endswith(", OpenBLAS 0.3.31 SkylakeX kernel, 1 thread")
    assert line.startswith("NumPy ") and blas.summary().endswith("kernel, 2 threads")


def test_summary_reads_the_loaded_library():
    from threadpoolctl import threadpool_info

    info = next(i for i in threadpool_info() if i.get("user_api") == "blas")
    with blas.limited_threads(1):
        line = blas.summary()
    kernel = info.get("architecture")  # OpenBLAS names it; MKL does not
    assert line.endswith(f" {kernel} kernel, 1 thread" if kernel else ", 1 thread")
