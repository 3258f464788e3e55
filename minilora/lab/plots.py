"""The plots of figures/README.md: records in, a matplotlib figure out (the three of
the learned update itself are in update_plots.py).

Each ``plot_*`` takes ``{label: records}`` (the experiments a figure needs, by the
labels of its entry in figures.py's registry) and returns the figure; figures.py runs
the experiments and writes the files.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import numpy as np

from minilora.lab import experiments as E

Records = list[dict[str, Any]]


# ----------------------------------------------------------------------------- helpers
def pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no window, works on a server
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(
            "figures need matplotlib: pip install 'minilora[figures]' (or the dev extra)"
        ) from None
    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _spread(records: Records, key: str, by: Iterable[str]) -> dict[tuple, tuple]:
    """{group: (mean, low, high, n)} of ``key`` over the records of each group (seeds)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for rec in records:
        groups[tuple(rec[b] for b in by)].append(rec[key])
    return {g: (float(np.mean(v)), min(v), max(v), len(v)) for g, v in groups.items()}


def _errorbar(ax: Any, xs: list, stats: list[tuple], **kw: Any) -> None:
    means = [s[0] for s in stats]
    err = [
        [m - s[1] for m, s in zip(means, stats, strict=True)],
        [s[2] - m for m, s in zip(means, stats, strict=True)],
    ]
    ax.errorbar(xs, means, yerr=err, capsize=3, marker="o", **kw)


def smooth(values: list[float], width: int = 9) -> np.ndarray:
    """A centred moving average, so noisy per-batch losses show their trend."""
    values = np.asarray(values, dtype=float)
    width = max(1, min(width, len(values)))
    kernel = np.ones(width) / width
    padded = np.pad(values, (width // 2, width - 1 - width // 2), mode="edge")
    return np.convolve(padded, kernel, mode="valid")


def runs_note(records: Records, by: Iterable[str] = ()) -> str:
    """ "300 steps, 3 seeds (r=4: 7)": the steps and the seeds per point (per group of
    ``by``), read from the records drawn, so a title states only what they hold."""
    by = list(by)
    parts = []
    steps = sorted({r["steps"] for r in records if r.get("steps") is not None})
    if steps:
        parts.append(f"{' or '.join(str(n) for n in steps)} steps")
    seeds: dict[tuple, set] = defaultdict(set)
    for rec in (r for r in records if "seed" in r):
        seeds[tuple(rec[b] for b in by)].add(rec["seed"])
    counts = [len(v) for v in seeds.values()]
    if counts:
        usual = max(set(counts), key=counts.count)  # the most common count, then the others
        others = [
            ", ".join(f"{b}={v}" for b, v in zip(by, g, strict=True)) + f": {len(s)}"
            for g, s in seeds.items()
            if len(s) != usual
        ]
        parts.append(
            f"{usual} seed{'s' if usual != 1 else ''}"
            + (f" ({'; '.join(others)})" if others else "")
        )
    return ", ".join(parts)


def _seed_points(ax: Any, records: Records, x: str, y: str, **kw: Any) -> list:
    """Every run as a point (x, y) and a line through the means per x: a bimodal outcome
    shows as two clusters, not as a mean that describes neither. Returns the x values."""
    xs = sorted({r[x] for r in records})
    color = kw.pop("color", None)
    line = ax.plot(
        xs, [np.mean([r[y] for r in records if r[x] == v]) for v in xs], color=color, **kw
    )
    ax.scatter(
        [r[x] for r in records], [r[y] for r in records], color=line[0].get_color(), s=14, alpha=0.6
    )
    return xs


def _seeds_note(records: Records) -> str:
    seeds = sorted({r["seed"] for r in records if "seed" in r})
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}: mean, bars = min to max"


# ------------------------------------------------------------------ the plots
def plot_params_vs_rank(data: dict[str, Records]) -> Any:
    plt = pyplot()
    records = data["counts"]
    presets = list(dict.fromkeys(r["preset"] for r in records))
    fig, axes = plt.subplots(1, len(presets), figsize=(5 * len(presets), 4.2))
    for ax, preset in zip(np.atleast_1d(axes), presets, strict=True):
        rows = [r for r in records if r["preset"] == preset]
        for targets in E.TARGET_SETS:
            pts = [r for r in rows if r["targets"] == targets]
            ax.plot([p["r"] for p in pts], [p["lora"] for p in pts], marker="o", label=targets)
        ax.axhline(rows[0]["full"], color="k", ls="--", label="full fine-tuning")
        if preset == "gpt3-175b":
            for point in E.PAPER_POINTS:
                hit = next(r for r in rows if r["r"] == point["r"] and r["targets"] == "q,v")
                ax.scatter([hit["r"]], [hit["lora"]], s=120, facecolors="none", edgecolors="r")
                ax.annotate(
                    point["label"],
                    (hit["r"], hit["lora"]),
                    textcoords="offset points",
                    xytext=(10, -10),
                    fontsize=8,
                    color="r",
                )
            ax.set_ylim(bottom=min(r["lora"] for r in rows) / 3)  # room for the labels
        ax.set(xscale="log", yscale="log", xlabel="LoRA rank r", title=preset)
        ax.set_ylabel("trainable parameters")
    np.atleast_1d(axes)[0].legend(title="targets per block", fontsize=8)
    fig.suptitle("Trainable parameters of LoRA against rank (full fine-tuning dashed)")
    fig.tight_layout()
    return fig


def plot_rank_sweep(data: dict[str, Records]) -> Any:
    plt = pyplot()
    records = data["runs"] + data.get("more_seeds", [])  # more seeds where it is bimodal
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = [
        ("planted", "val_loss", "validation loss"),
        ("shift", "val_loss", "validation loss"),
        ("shift", "val_exact", "exact answers (fraction)"),
    ]
    for ax, (task, key, label) in zip(axes, panels, strict=True):
        lora = [r for r in records if r["task"] == task and r["mode"] == "lora"]
        full = [r for r in records if r["task"] == task and r["mode"] == "full"]
        ranks = _seed_points(ax, lora, "r", key, marker="", label=f"LoRA on {lora[0]['targets']}")
        if full:
            values = [r[key] for r in full]
            ax.axhline(np.mean(values), color="k", ls="--", label="full fine-tuning (mean)")
            ax.axhspan(min(values), max(values), color="k", alpha=0.08)
        if task == "planted":
            ax.axvline(E.PLANTED_RANK, color="r", ls=":", label=f"planted rank {E.PLANTED_RANK}")
        ax.set(xscale="log", xlabel="LoRA rank r", ylabel=label)
        ax.set_title(f"{task}: {label}\n{runs_note(lora + full, ['r'])}", fontsize=10)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        if key == "val_loss":
            twin = ax.twinx()
            sizes = {r["r"]: r["trainable"] for r in lora}
            twin.plot(ranks, [sizes[r] for r in ranks], color="gray", alpha=0.5, marker=".")
            twin.set(yscale="log", ylabel="trainable parameters (gray)")
            twin.grid(False)
        ax.legend(fontsize=8)
    fig.suptitle("Rank sweep: each dot one seed, line through the means; band: full, min to max")
    fig.tight_layout()
    return fig


def plot_alpha_sweep(data: dict[str, Records]) -> Any:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    curves = data["alpha"]
    r = curves[0]["r"]
    for alpha in sorted({c["alpha"] for c in curves}):
        runs = np.array([c["curve"] for c in curves if c["alpha"] == alpha])
        mean = smooth(runs.mean(axis=0))
        steps = np.arange(1, len(mean) + 1)
        line = left.plot(steps, mean, label=f"alpha={alpha:g} ({alpha / r:g} r, s={alpha / r:g})")
        lo, hi = smooth(runs.min(axis=0)), smooth(runs.max(axis=0))
        left.fill_between(steps, lo, hi, color=line[0].get_color(), alpha=0.12)
    left.set(xlabel="step", ylabel="training loss (moving average)", yscale="log")
    left.set_title(
        f"r={r}: alpha from r/2 to 8r, same learning rate\n"
        f"{runs_note(curves, ['alpha'])}: mean, band min to max",
        fontsize=10,
    )
    left.legend(fontsize=8)
    scaling = data["scaling"] + data.get("more_seeds", [])  # more seeds where it is bimodal
    for rslora, label in ((False, "s = alpha / r"), (True, "s = alpha / sqrt(r) (rsLoRA)")):
        rows = [s for s in scaling if s["rslora"] == rslora]
        ranks = _seed_points(right, rows, "r", "val_loss", marker="", label=label)
    alphas = sorted({s["alpha"] for s in scaling})
    right.set(xscale="log", xlabel="LoRA rank r", ylabel="validation loss after the run")
    right.set_title(
        f"alpha fixed at {' or '.join(f'{a:g}' for a in alphas)}; each dot one seed, line: mean"
        f"\n{runs_note(scaling, ['rslora', 'r'])}",
        fontsize=10,
    )
    right.set_xticks(ranks, [str(k) for k in ranks])
    right.legend(fontsize=8)
    fig.suptitle("Alpha and the scale of the update (shift)")
    fig.tight_layout()
    return fig


def plot_dropout_sweep(data: dict[str, Records]) -> Any:
    plt = pyplot()
    records = data["runs"]
    pools = sorted({r["pool"] for r in records})
    fig, axes = plt.subplots(1, len(pools), figsize=(5 * len(pools), 4.2), sharey=True)
    for ax, pool in zip(np.atleast_1d(axes), pools, strict=True):
        rows = [r for r in records if r["pool"] == pool]
        for key, label in (("train_loss", "train (its own examples)"), ("val_loss", "validation")):
            stats = _spread(rows, key, ["dropout"])
            ps = sorted(g[0] for g in stats)
            _errorbar(ax, ps, [stats[(p,)] for p in ps], label=label)
        ax.set(xlabel="LoRA dropout p", title=f"{pool} training examples", yscale="log")
        ax.legend(fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("loss")
    steps, r = records[0]["steps"], records[0]["r"]
    fig.suptitle(
        f"Dropout and the generalisation gap: shift, r={r}, {steps} steps, {_seeds_note(records)}"
    )
    fig.tight_layout()
    return fig


def plot_lora_vs_full(data: dict[str, Records]) -> Any:
    plt = pyplot()
    runs = [r for r in data["runs"] if r["task"] == "shift"]
    costs = {c["r"]: c for c in data["costs"]}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    stats = _spread(runs, "val_loss", ["r"])
    for (r,), (mean, lo, hi, _) in sorted(stats.items(), key=lambda kv: kv[1][0]):
        c = costs[r]
        full = r is None
        left.errorbar(
            [c["trainable"]],
            [mean],
            yerr=[[mean - lo], [hi - mean]],
            capsize=3,
            marker="s" if full else "o",
            color="k" if full else "C0",
        )
        label = "full" if full else f"r={r}"
        left.annotate(
            f"{label}\n{c['step_ms']:.0f} ms, {c['peak_mb']:.0f} MB",
            (c["trainable"], mean),
            textcoords="offset points",
            xytext=(6, 4),
            fontsize=7,
        )
    left.set(
        xscale="log",
        yscale="log",
        xlabel="trainable parameters",
        ylabel="validation loss (shift)",
        title="Loss against trainable parameters (step time, peak memory)",
    )
    order = sorted(costs.values(), key=lambda c: c["trainable"])
    xs = [c["trainable"] for c in order]
    right.plot(xs, [c["step_ms"] for c in order], marker="o", label="step time (ms)")
    twin = right.twinx()
    twin.plot(xs, [c["peak_mb"] for c in order], marker="s", color="C1", label="peak memory (MB)")
    twin.grid(False)
    right.set(
        xscale="log",
        xlabel="trainable parameters",
        ylabel="ms per training step",
        title="Cost of one step, small model, batch 32 (last point: full)",
    )
    twin.set_ylabel("peak memory of a step (MB)")
    right.legend(loc="upper left", fontsize=8)
    twin.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"LoRA on {runs[0]['targets']} against full fine-tuning, {_seeds_note(runs)}")
    fig.tight_layout()
    return fig


def plot_target_budget(data: dict[str, Records]) -> Any:
    plt = pyplot()
    records = data["runs"]
    panels = [(t, "val_loss", "validation loss") for t in dict.fromkeys(r["task"] for r in records)]
    if any(r["task"] == "shift" for r in records):
        panels.append(("shift", "val_exact", "exact answers (fraction)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.8))
    for ax, (task, key, label) in zip(np.atleast_1d(axes), panels, strict=True):
        rows = [r for r in records if r["task"] == task]
        configs = list(dict.fromkeys((r["targets"], r["r"]) for r in rows))
        values = [[r[key] for r in rows if (r["targets"], r["r"]) == c] for c in configs]
        x = np.arange(len(configs))
        ax.bar(x, [np.mean(v) for v in values], color=[f"C{k}" for k in range(len(configs))])
        for k, v in enumerate(values):  # every seed, over its bar
            ax.scatter([k] * len(v), v, color="k", s=12, zorder=3)
        ax.set_xticks(x, [f"{t} @ r={r}" for t, r in configs], rotation=30, ha="right")
        ax.set_ylim(0, max(max(v) for v in values) * 1.08)  # bars start at 0
        budget = sorted({r["trainable"] for r in rows})
        ax.set(ylabel=label)
        ax.set_title(
            f"{task}: {label}, {' or '.join(f'{n:,}' for n in budget)} parameters each\n"
            f"{runs_note(rows, ['targets', 'r'])}",
            fontsize=10,
        )
    fig.suptitle("One budget, spent on one matrix or several (bar: mean, dots: seeds)")
    fig.tight_layout()
    return fig


def plot_memory_breakdown(data: dict[str, Records]) -> Any:
    plt = pyplot()
    records = data["memory"]
    models = list(dict.fromkeys(r["model"] for r in records))
    parts = ("weights", "gradients", "optimizer", "activations")
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4.4))
    for ax, name in zip(np.atleast_1d(axes), models, strict=True):
        rows = [r for r in records if r["model"] == name]
        sizes = sorted({r["batch_size"] for r in rows})
        x = np.arange(len(sizes))
        for offset, mode in ((-0.2, "full"), (0.2, "lora")):
            bottom = np.zeros(len(sizes))
            for k, part in enumerate(parts):
                values = (
                    np.array(
                        [
                            next(
                                r[part] for r in rows if r["mode"] == mode and r["batch_size"] == b
                            )
                            for b in sizes
                        ]
                    )
                    / 1e9
                )
                ax.bar(
                    x + offset,
                    values,
                    0.38,
                    bottom=bottom,
                    color=f"C{k}",
                    hatch="//" if mode == "lora" else None,
                    label=part if mode == "full" else None,
                )
                bottom += values
        ax.set_xticks(x, [str(b) for b in sizes])
        source = rows[0]["source"]
        ax.set(
            xlabel="batch size (left bar full, right bar LoRA, hatched)",
            ylabel="GB",
            title=f"{name} ({source})",
        )
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.suptitle("Training memory: full fine-tuning against LoRA r=8 on q,k,v,o")
    fig.tight_layout()
    return fig


def plot_nf4_code(records: Records) -> Any:
    """NF4's 16 values against the standard normal quantiles they are made from
    (core.quant.nf4_quantile_table), and the share of normal weights each code gets."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    z = np.array([r["normal_quantile"] for r in records])
    left.plot(z, [r["code"] for r in records], "o-", label="NF4 value")
    left.plot(z, [r["uniform"] for r in records], "s--", alpha=0.6, label="evenly spaced 4-bit")
    left.set(xlabel="standard normal quantile Φ⁻¹(p)", ylabel="code value", title="On a line")
    left.legend(fontsize=8)
    index = np.array([r["index"] for r in records])
    right.bar(index - 0.2, [r["mass_nf4"] for r in records], 0.4, label="NF4")
    right.bar(index + 0.2, [r["mass_uniform"] for r in records], 0.4, label="evenly spaced")
    right.set(xlabel="code index", ylabel="share of normal weights", title="Used evenly")
    right.legend(fontsize=8)
    fig.suptitle("NormalFloat 4: the codes are a normal distribution's quantiles")
    fig.tight_layout()
    return fig
