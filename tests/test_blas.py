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


def test_a_decisive_first_round_ends_the_measurement():
    """Issue 21: on a busy core every many-thread call costs two or three one-thread
    calls, and the old measurement (a warm-up, then two full rounds: 5 calls) alone
    made --threads auto cost more than --threads 1. Now: one thread first (it is the
    warm-up), and a second round only when the first is close."""
    for cost, calls_expected in (({1: 1.0, 2: 2.5}, [1, 2]), ({1: 1.0, 2: 0.9}, [1, 2, 1, 2])):
        now, calls = [0.0], []

        def run_once(cost=cost, now=now, calls=calls):
            calls.append(blas.current_threads())
            now[0] += cost[blas.current_threads()]

        choice = blas.choose_threads(run_once, candidates=(2, 1), clock=lambda now=now: now[0])
        assert calls == calls_expected
        assert choice["threads"] == min(cost, key=cost.get)
        assert choice["rounds"] == len(calls_expected) // 2


@pytest.mark.skipif(blas.usable_cores() < 2, reason="one core: the default is one thread")
@pytest.mark.parametrize("threads", [1, "auto"])
def test_a_validation_before_the_first_step_runs_under_the_runs_count(monkeypatch, threads):
    """Issue 21: ``minilora finetune`` validates before training; that validation ran
    with the library's default (all cores), outside the run's limit, even with
    --threads 1. Now the run's count (measured first, once, for auto) covers it."""
    from minilora.basics import parallel
    from minilora.training import train

    seen, measured = [], []
    real_evaluate, real_choose = train.evaluate, train.choose_threads

    def spy_evaluate(model, batch):
        seen.append((blas.current_threads(), parallel.element_threads()))
        return real_evaluate(model, batch)

    def slow_many_threads(run_once, **kwargs):  # as on a busy core: 1 thread wins
        measured.append(1)
        now = [0.0]

        def clock():  # a call takes n^3 seconds with n threads
            now[0] += blas.current_threads() ** 3
            return now[0]

        return real_choose(run_once, clock=clock)

    monkeypatch.setattr(train, "evaluate", spy_evaluate)
    monkeypatch.setattr(train, "choose_threads", slow_many_threads)
    cfg = TrainConfig(steps=2, batch_size=4, block_size=24, eval_every=0, eval_size=8)
    gpt = ml.GPTConfig(vocab_size=96, block_size=24, n_layer=1, n_head=2, d_model=16)
    trainer = Trainer(ml.GPT(gpt), ShiftTask(), cfg, None, False, threads=threads)
    with blas.limited_threads(2):  # the library's default on a 2-core machine
        trainer.validate()
        trainer.run()
    assert seen == [(1, 1), (1, 1)]  # before the first step, and at the end
    assert measured == ([1] if threads == "auto" else [])  # measured once, before validating


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
