"""lab/variants.py: the LoRA family side by side (notebook 08, figures/variants.png)."""

import pytest

from minilora.core import params
from minilora.lab import variants as V

TINY = dict(task="shift", r=2, steps=3, batch_size=4, eval_size=8, seed=1)


def test_steps_to_threshold_is_the_first_step_whose_running_mean_is_there():
    curve = [3.0, 2.0, 1.0, 0.4, 0.4, 0.1]
    assert V.steps_to_threshold(curve, 0.5, smooth=1) == 4  # counted from 1
    assert V.steps_to_threshold(curve, 0.5, smooth=2) == 5  # (0.4 + 0.4) / 2; not (1.0 + 0.4) / 2
    assert V.steps_to_threshold(curve, 0.05, smooth=1) is None
    assert V.steps_to_threshold(curve[:3], 0.5, smooth=10) is None  # too short to average


def test_a_variant_spec_is_a_named_dict_with_known_keys():
    with pytest.raises(TypeError, match="'name'"):
        V.variant_run({"use_dora": True}, **TINY)
    with pytest.raises(ValueError, match=r"unknown keys \['dora'\]"):
        V.variant_run({"name": "DoRA", "dora": True}, **TINY)


def test_each_variant_run_is_a_deterministic_record_with_its_own_costs():
    records = {v["name"]: V.variant_run(v, **TINY) for v in V.VARIANTS}
    again = V.variant_run(V.VARIANTS[1], **TINY)
    assert records["DoRA"].pop("seconds") > 0 and again.pop("seconds") > 0
    assert again == records["DoRA"]  # same seed, same record
    lora = params.lora_parameter_count(4, 128, 2, ("q", "k", "v", "o"))
    assert records["LoRA"]["trainable"] == records["LoRA+"]["trainable"] == lora
    assert records["QLoRA"]["trainable"] == lora
    assert records["DoRA"]["trainable"] == lora + 4 * 4 * 128  # one magnitude per output
    assert records["QLoRA"]["weight_bytes"] < records["LoRA"]["weight_bytes"]  # NF4 linears
    assert records["DoRA"]["memory_bytes"] > records["LoRA"]["memory_bytes"]
    # LoRA+ trains B faster from the same start: the same first loss, another trajectory
    assert records["LoRA+"]["curve"][0] == records["LoRA"]["curve"][0]
    assert records["LoRA+"]["curve"][-1] != records["LoRA"]["curve"][-1]
    assert records["QLoRA"]["curve"][0] != records["LoRA"]["curve"][0]  # another base
    assert all(len(r["curve"]) == 3 and r["threshold"] == 0.5 for r in records.values())


def test_compare_variants_times_every_variant_and_the_figure_quotes_the_records():
    records = V.compare_variants(
        V.VARIANTS[:2], tasks=("shift",), seeds=(0,), steps=2, r=2, timing_steps=1, processes=1
    )
    assert [r["variant"] for r in records] == ["LoRA", "DoRA"]
    assert all(r["step_ms"] > 0 for r in records)
    rows = V.summary(records, "shift")
    assert [row["val_loss"] for row in rows] == [r["val_loss"] for r in records]  # one seed
    pytest.importorskip("matplotlib")
    fig = V.plot_variants({"runs": records})
    titles = " ".join(ax.get_title() for ax in fig.axes)
    for row in rows:
        assert f"{row['variant']} {row['val_loss']:.3f}" in titles
        assert f"{row['variant']} {row['memory_mb']:.1f} MB {row['step_ms']:.0f} ms" in titles
    assert "1 seed, each drawn as a point" in fig._suptitle.get_text()
