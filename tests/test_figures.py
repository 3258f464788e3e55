"""The committed figures against their own data: every figure is drawn again from its
JSON in figures/, and what it states (titles, captions in figures/README.md) and how it
draws (log axes, bars, seeds) is checked against the records it was drawn from."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from matplotlib.container import BarContainer  # noqa: E402

from minilora.lab import experiments as E  # noqa: E402
from minilora.lab.figures import FIGURES  # noqa: E402
from minilora.lab.plots import pyplot  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIGS = ROOT / "figures"
BY_NAME = {f.name: f for f in FIGURES}


def _saved(name: str) -> dict:
    return json.loads((FIGS / f"{name}.json").read_text())


_DRAWN: dict[str, tuple[dict, object]] = {}


def _drawn(name: str) -> tuple[dict, object]:
    """(saved JSON, the figure drawn from its records), drawn once per name."""
    if name not in _DRAWN:
        saved = _saved(name)
        _DRAWN[name] = (saved, BY_NAME[name].plot(saved["records"]))
    return _DRAWN[name]


@pytest.fixture(scope="module", autouse=True)
def _close_figures():
    yield
    plt = pyplot()
    for _, fig in _DRAWN.values():
        plt.close(fig)
    _DRAWN.clear()


def _all_records(saved: dict) -> list[dict]:
    return [r for records in saved["records"].values() for r in records]


def _steps_claimed(text: str) -> set[int] | None:
    """{150, 300} from "150 or 300 steps", {300} from "300 steps"; None if no claim."""
    match = re.search(r"((?:\d+ or )*\d+) steps", text)
    return {int(n) for n in match.group(1).split(" or ")} if match else None


def _seeds_claimed(text: str) -> int | None:
    match = re.search(r"(\d+) seeds?\b", text)
    return int(match.group(1)) if match else None


def _titles(fig) -> list[tuple[object, str]]:
    return [(ax, ax.get_title()) for ax in fig.axes if ax.get_title()]


@pytest.mark.parametrize("name", list(BY_NAME))
def test_the_suptitle_states_only_what_every_record_holds(name):
    """A claim in the figure's own title covers all of its records: "150 steps per run"
    over panels that ran 300, or "3 seeds" over an experiment that ran 2, fail."""
    saved, fig = _drawn(name)
    title = fig._suptitle.get_text() if fig._suptitle else ""
    records = _all_records(saved)
    steps = _steps_claimed(title)
    if steps is not None:
        assert steps == {r["steps"] for r in records if r.get("steps") is not None}, title
    seeds = _seeds_claimed(title)
    if seeds is not None and not re.search(rf"{seeds} seeds? \(", title):  # no exceptions
        for label, rows in saved["records"].items():
            if any("seed" in r for r in rows):
                assert len({r["seed"] for r in rows}) == seeds, (title, label)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_panel_titles_state_their_own_records(name):
    """A panel titled "shift: ..." claims the steps of the shift records; any panel's
    step, seed and parameter counts are ones its figure's records hold."""
    saved, fig = _drawn(name)
    records = _all_records(saved)
    tasks = {r["task"] for r in records if "task" in r}
    for _, title in _titles(fig):
        first = title.split(":")[0]
        rows = [r for r in records if r.get("task") == first] if first in tasks else records
        steps = _steps_claimed(title)
        if steps is not None:
            held = {r["steps"] for r in rows if r.get("steps") is not None}
            assert steps <= held, title
            if first in tasks:
                assert steps == held, title
        seeds = _seeds_claimed(title)
        if seeds is not None:
            assert seeds <= len({r["seed"] for r in rows if "seed" in r}), title
        for count in re.findall(r"([\d,]{4,}) parameters", title):
            assert int(count.replace(",", "")) in {r.get("trainable") for r in rows}, title


def test_every_caption_in_the_readme_is_generated_from_its_json():
    from minilora.lab.figures import describe

    readme = (FIGS / "README.md").read_text()
    for name in BY_NAME:
        caption = describe(_saved(name))
        assert caption in readme, f"figures/README.md lacks the caption {caption!r}"


@pytest.mark.parametrize("name", list(BY_NAME))
def test_no_log_axis_spans_more_than_ten_decades(name):
    """Below about 1e-7 of the largest value, float32 results are round-off, not data."""
    _, fig = _drawn(name)
    for ax in fig.axes:
        for scale, limits in ((ax.get_yscale(), ax.get_ylim()), (ax.get_xscale(), ax.get_xlim())):
            if scale == "log":
                low, high = sorted(limits)
                assert np.log10(high / low) <= 10.5, (name, ax.get_title(), limits)


@pytest.mark.parametrize("name", list(BY_NAME))
def test_bars_start_at_zero(name):
    _, fig = _drawn(name)
    for ax in fig.axes:
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        if bars and ax.get_yscale() == "linear":
            assert ax.get_ylim()[0] == 0, (name, ax.get_title(), ax.get_ylim())


def _points(ax) -> set[tuple[float, float]]:
    """Every point drawn as a marker in ``ax`` (scatter collections), rounded."""
    found = set()
    for collection in ax.collections:
        for x, y in np.asarray(collection.get_offsets()):
            found.add((round(float(x), 6), round(float(y), 6)))
    return found


def _panel(fig, start: str):
    return next(ax for ax in fig.axes if ax.get_title().startswith(start))


def test_bimodal_outcomes_draw_every_one_of_at_least_five_seeds():
    """r=4 on shift and rsLoRA at r=64 split across seeds: each seed is a point."""
    saved, fig = _drawn("rank_sweep")
    runs = _all_records(saved)
    r4 = [r for r in runs if r["task"] == "shift" and r["mode"] == "lora" and r["r"] == 4]
    assert len({r["seed"] for r in r4}) >= 5
    panel = _points(_panel(fig, "shift: validation loss"))
    for r in r4:
        assert (4.0, round(r["val_loss"], 6)) in panel
    saved, fig = _drawn("alpha_sweep")
    rs64 = [r for r in _all_records(saved) if r.get("rslora") is True and r["r"] == 64]
    assert len({r["seed"] for r in rs64}) >= 5
    panel = _points(_panel(fig, "alpha fixed"))
    for r in rs64:
        assert (64.0, round(r["val_loss"], 6)) in panel


def test_the_budget_is_one_that_some_placement_learns_and_includes_the_mlp():
    runs = _saved("target_budget")["records"]["runs"]
    assert len({r["trainable"] for r in runs}) == 1  # one budget for every placement
    placements = {r["targets"] for r in runs}
    assert {"fc", "proj"} <= {t for p in placements for t in p.split(",")}
    shift = [r for r in runs if r["task"] == "shift"]
    exact = {}
    for r in shift:
        exact.setdefault(r["targets"], []).append(r["val_exact"])
    assert max(np.mean(v) for v in exact.values()) >= 0.9, exact


def test_init_runs_past_the_plateau_and_price_the_base_tasks():
    saved, fig = _drawn("init_and_scaling")
    runs = saved["records"]["runs"]
    assert min(r["steps"] for r in runs) >= 200 and all(len(r["curve"]) == r["steps"] for r in runs)
    by = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    zero_b = [v for v in E.INIT_VARIANTS if not E.INIT_VARIANTS[v].get("random_B")]
    random_b = [v for v in E.INIT_VARIANTS if E.INIT_VARIANTS[v].get("random_B")]
    for op in E.BASE_OPS:
        key = f"{op}_loss_step0"
        base = {round(r[key], 9) for v in zero_b for r in by[v]}
        assert len(base) == 1  # B = 0: the base itself, whatever A or the seed
        assert min(r[key] for v in random_b for r in by[v]) > base.pop()
    left = fig.axes[0]  # the min-max bands it promises: one per variant
    assert len([c for c in left.collections if c.get_paths() and len(c.get_paths()[0])]) >= 3


def test_subspace_similarity_has_seeds_blocks_and_a_floor_random_matrices_meet():
    records = _saved("subspace_similarity")["records"]["phi"]
    assert len({r["seed"] for r in records}) >= 3 and len({r["block"] for r in records}) >= 2
    first = records[0]
    floor = E.phi_floor(first["r_small"], first["r_large"], first["d"])
    random = np.mean([r["phi"] for r in records if r["source"] == "random"], axis=0)
    assert np.abs(random - floor).max() < 0.1  # the floor is what random subspaces give


def test_phi_floor_is_the_mean_for_random_subspaces():
    rng = np.random.default_rng(0)
    grids = [
        E._phi(rng.standard_normal((4, 32)), rng.standard_normal((16, 32))) for _ in range(400)
    ]
    np.testing.assert_allclose(np.mean(grids, axis=0), E.phi_floor(4, 16, 32), atol=0.02)
