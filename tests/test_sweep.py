"""The sweep runner: order kept, one BLAS thread per run, the same numbers whatever the
number of processes."""

import numpy as np
import pytest

from minilora.basics import blas
from minilora.lab.sweep import run_sweep


def matmul_record(seed, n=64):
    """A module-level job (the spawn start method imports it by name)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n)).astype(np.float32)
    return {"seed": seed, "sum": float((a @ a).sum()), "threads": blas.current_threads()}


def test_one_process_and_two_give_the_same_records_in_order():
    settings = [{"seed": s} for s in (3, 1, 2)]
    serial = run_sweep(matmul_record, settings, processes=1, progress=False)
    parallel = run_sweep(matmul_record, settings, processes=2, progress=False)
    assert [r["seed"] for r in serial] == [3, 1, 2]
    assert serial == parallel
    if blas.current_threads() is not None:
        assert {r["threads"] for r in serial} == {1}


def test_bad_process_count():
    with pytest.raises(ValueError, match="processes=0"):
        run_sweep(matmul_record, [{"seed": 0}], processes=0)
