"""``minilora figures``: every figure of figures/README.md, drawn from experiments.py.

Each figure is a :class:`Figure`: the experiments it needs (a function of
experiments.py and its settings, full and ``--quick``) and a plot function that turns
their records into a matplotlib figure (plots.py). :func:`make_figures` runs the experiments
(each once, even when two figures share one), writes ``NAME.png`` and ``NAME.json``
(the records it was drawn from, the settings, the time) and returns what it wrote.
Deterministic for a seed: the same command draws the same figures.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from minilora.files.io import atomic_write_bytes, load_json, save_json
from minilora.lab import experiments as E
from minilora.lab import variants as V
from minilora.lab.plots import (
    plot_alpha_sweep,
    plot_dropout_sweep,
    plot_lora_vs_full,
    plot_memory_breakdown,
    plot_params_vs_rank,
    plot_rank_sweep,
    plot_target_budget,
    pyplot,
)
from minilora.lab.update_plots import (
    plot_delta_w_spectrum,
    plot_init_and_scaling,
    plot_subspace_similarity,
)

Records = list[dict[str, Any]]


@dataclass(frozen=True)
class Figure:
    name: str
    question: str
    experiments: dict[str, tuple[Callable[..., Records], dict, dict]]  # label: (fn, full, quick)
    plot: Callable[[dict[str, Records]], Any] = field(repr=False)


# --------------------------------------------------------------------- the registry
_QUICK_RUNS = {"seeds": (0,), "processes": None}

FIGURES = [
    Figure(
        "params_vs_rank",
        "How many parameters does LoRA train, against r, for our model, GPT-2 and GPT-3?",
        {"counts": (E.parameter_counts, {}, {})},
        plot_params_vs_rank,
    ),
    Figure(
        "rank_sweep",
        "How does the rank r change what LoRA can learn, and where does it stop helping?",
        {
            "runs": (E.rank_sweep, {}, {**_QUICK_RUNS, "ranks": (1, 4, 16), "steps": 40}),
            # r=4 on shift is bimodal across seeds (0% or 88% exact): more seeds there
            "more_seeds": (
                E.rank_sweep,
                {
                    "ranks": (4,),
                    "seeds": (3, 4),
                    "tasks": ("shift",),
                    "full": False,
                    "processes": 3,
                },
                {
                    **_QUICK_RUNS,
                    "ranks": (4,),
                    "seeds": (1,),
                    "tasks": ("shift",),
                    "steps": 40,
                    "full": False,
                },
            ),
        },
        plot_rank_sweep,
    ),
    Figure(
        "alpha_sweep",
        "What does alpha do at fixed r, and does alpha/r starve high ranks (rsLoRA)?",
        {
            "alpha": (E.alpha_sweep, {}, {**_QUICK_RUNS, "alphas": (4, 16, 64), "steps": 40}),
            "scaling": (
                E.scaling_across_ranks,
                {},
                {**_QUICK_RUNS, "ranks": (2, 16, 128), "steps": 20},
            ),
            # rsLoRA at r=64 is bimodal across seeds (loss 2.73 or 0.13): more seeds there
            "more_seeds": (
                E.scaling_across_ranks,
                {"ranks": (64,), "seeds": (2, 3, 4), "rslora": (True,), "processes": 3},
                {**_QUICK_RUNS, "ranks": (128,), "seeds": (1,), "steps": 20},
            ),
        },
        plot_alpha_sweep,
    ),
    Figure(
        "dropout_sweep",
        "Does LoRA dropout close the gap between training and validation loss on small data?",
        {
            "runs": (
                E.dropout_sweep,
                {},
                {**_QUICK_RUNS, "dropouts": (0.0, 0.3), "pools": (64, 4096), "steps": 60},
            )
        },
        plot_dropout_sweep,
    ),
    Figure(
        "lora_vs_full",
        "What does LoRA cost and reach against full fine-tuning, per trainable parameter?",
        {
            "runs": (E.rank_sweep, {}, {**_QUICK_RUNS, "ranks": (1, 4, 16), "steps": 40}),
            "costs": (E.step_costs, {}, {"ranks": (1, 4, 16), "steps": 2}),
        },
        plot_lora_vs_full,
    ),
    Figure(
        "target_budget",
        "With a fixed budget, adapt one matrix at a high rank or several at a low one?",
        {"runs": (E.target_budget, {}, {**_QUICK_RUNS, "steps": 40})},  # seeds 0, 1, 2
        plot_target_budget,
    ),
    Figure(
        "subspace_similarity",
        "Do the directions A learns at r=8 reappear at r=64 (the LoRA paper's Figure 3)?",
        {"phi": (E.subspace_similarity, {}, {"steps": 60, "seeds": (0,), "blocks": (3,)})},
        plot_subspace_similarity,
    ),
    Figure(
        "delta_w_spectrum",
        "How low is the rank of the update that fine-tuning actually needs?",
        {"sigma": (E.delta_w_spectrum, {}, {"steps": 60})},
        plot_delta_w_spectrum,
    ),
    Figure(
        "init_and_scaling",
        "Why does B start at zero, and does the choice of A's initialisation matter?",
        {
            "runs": (
                E.init_and_scaling,
                {"seeds": (0, 1), "steps": 200, "processes": 3},
                {"seeds": (0,), "steps": 15},
            )
        },
        plot_init_and_scaling,
    ),
    Figure(
        "memory_breakdown",
        "Where does LoRA save training memory, and where can it not (activations)?",
        {
            "memory": (
                E.memory_breakdown,
                {},
                {"measured": ("small",), "measured_batch_sizes": (4, 16)},
            )
        },
        plot_memory_breakdown,
    ),
    Figure(
        "variants",
        "What do DoRA, LoRA+ and an NF4 base (QLoRA) change against LoRA, at the same rank?",
        {
            "runs": (
                V.compare_variants,
                # planted too would double the time; notebook 08 runs it, smaller
                {"tasks": ("shift",), "timing_steps": 5},
                {**_QUICK_RUNS, "steps": 20, "timing_steps": 2},
            )
        },
        V.plot_variants,
    ),
]
NAMES = tuple(f.name for f in FIGURES)


# ----------------------------------------------------------------------- making them
QUICK_OUT = "runs/figures-quick"
"""Where ``quick`` figures go by default: never onto the committed ``figures/``."""


def make_figures(
    out: str | Path | None = None,
    quick: bool = False,
    only: Iterable[str] | None = None,
    log: Callable[[str], None] = print,
    reuse: bool = False,
) -> list[dict[str, Any]]:
    """Run the experiments of the chosen figures (each once) and write PNG + JSON.

    ``out``: default ``figures``, or :data:`QUICK_OUT` with ``quick`` (a quick run
    replaces committed figures only when told ``out="figures"``). ``reuse``: take the
    records of any experiment whose name and settings match one in ``out``'s JSON files
    instead of running it again (to redraw, or to finish a run that stopped); by
    default every experiment runs. A saved file that is not a figure's record is an
    error naming it, before any experiment runs.
    """
    only = list(only) if only else list(NAMES)
    unknown = [n for n in only if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown figure {unknown[0]!r}; allowed: {', '.join(NAMES)}")
    plt = pyplot()
    out = Path(out if out is not None else QUICK_OUT if quick else "figures")
    done: dict[str, tuple[Records, float]] = _saved(out, quick) if reuse else {}
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for figure in (f for f in FIGURES if f.name in only):
        data, used, seconds = {}, {}, 0.0
        for label, (fn, full, fast) in figure.experiments.items():
            kwargs = fast if quick else full
            key = _key(fn.__name__, kwargs)
            if key not in done:  # a second figure on the same runs draws from the first's
                log(f"{figure.name}: {key}")
                start = time.perf_counter()
                done[key] = (fn(**kwargs), time.perf_counter() - start)
                seconds += done[key][1]
            data[label], elapsed = done[key]
            used[label] = {"experiment": fn.__name__, "settings": kwargs, "seconds": elapsed}
        # the records first: a plot that fails loses no run (--reuse redraws from them)
        save_json(
            out / f"{figure.name}.json",
            {
                "figure": figure.name,
                "question": figure.question,
                "quick": quick,
                "experiments": used,
                "records": _plain(data),
            },
        )
        fig = figure.plot(data)
        png = out / f"{figure.name}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        atomic_write_bytes(png, buffer.getvalue())
        written.append({"name": figure.name, "png": str(png), "seconds": seconds})
    return written


def describe(saved: dict[str, Any]) -> str:
    """The caption line of a figure in figures/README.md, from its saved JSON alone: per
    experiment, how many records, the steps per task and the seeds. The README quotes it
    verbatim (tests/test_figures.py checks), so a caption cannot drift from its data."""
    parts = []
    for label, records in saved["records"].items():
        text = f"{label}: {len(records)} records"
        steps: dict[str, set] = {}
        for r in records:
            if r.get("steps") is not None:
                steps.setdefault(r.get("task") or "", set()).add(r["steps"])
        if steps:
            text += ", " + ", ".join(
                f"{task} {' or '.join(str(n) for n in sorted(v))} steps".strip()
                for task, v in steps.items()
            )
        seeds = sorted({r["seed"] for r in records if "seed" in r})
        if seeds:
            text += f", seed{'s' if len(seeds) > 1 else ''} " + ", ".join(map(str, seeds))
        parts.append(text)
    return f"`{saved['figure']}.json`: " + "; ".join(parts) + "."


def _key(experiment: str, settings: dict) -> str:
    return f"{experiment}({json.dumps(settings, sort_keys=True, default=str)})"


def _saved(out: Path, quick: bool) -> dict[str, tuple[Records, float]]:
    """{experiment key: (records, seconds)} from the JSON files already in ``out``."""
    found = {}
    for path in sorted(out.glob("*.json")):
        data = load_json(path)  # broken JSON: an error naming the file
        if not isinstance(data, dict) or data.get("quick") != quick or "experiments" not in data:
            continue
        experiments, records = data["experiments"], data.get("records")
        if not isinstance(experiments, dict) or not isinstance(records, dict):
            raise ValueError(
                f"{path}: not a figure's record: 'experiments' and 'records' "
                "must be objects; delete it or run without --reuse"
            )
        for label, used in experiments.items():
            if not (
                isinstance(used, dict)
                and isinstance(used.get("experiment"), str)
                and isinstance(used.get("settings"), dict)
                and isinstance(used.get("seconds"), (int, float))
                and isinstance(records.get(label), list)
            ):
                raise ValueError(
                    f"{path}: experiment {label!r} is not a figure's record (it needs "
                    "experiment, settings, seconds and a list of records); delete it or "
                    "run without --reuse"
                )
            found[_key(used["experiment"], used["settings"])] = (records[label], used["seconds"])
    return found


def _plain(value: Any) -> Any:
    """Records as JSON: NumPy numbers become Python numbers, arrays are left out."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if not isinstance(v, np.ndarray)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
