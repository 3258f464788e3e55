"""The plots of the learned update itself: subspace similarity, the spectrum of ΔW, and
what the initialisation does to it. Records in, a matplotlib figure out, as in plots.py
(whose helpers these use).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minilora.lab import experiments as E
from minilora.lab.plots import Records, pyplot, runs_note, smooth

PHI_POINTS = ((1, 1), (1, 8), (8, 8), (8, 64))  # (i, j) the right-hand panels compare


def plot_subspace_similarity(data: dict[str, Records]) -> Any:
    """phi minus what random subspaces give (experiments.phi_floor): mean over seeds per
    block and matrix, and at a few (i, j) every seed and block as a dot."""
    plt = pyplot()
    records = data["phi"]
    matrices = list(dict.fromkeys(r["matrix"] for r in records))
    blocks = sorted({r["block"] for r in records})
    fig, axes = plt.subplots(
        len(matrices), len(blocks) + 1, figsize=(3.2 * len(blocks) + 4.5, 3.0 * len(matrices) + 1)
    )
    axes = np.atleast_2d(axes)
    first = records[0]
    floor = E.phi_floor(first["r_small"], first["r_large"], first["d"])
    for row, matrix in enumerate(matrices):
        for col, block in enumerate(blocks):
            pts = [
                r
                for r in records
                if (r["matrix"], r["block"], r["source"]) == (matrix, block, "learned")
            ]
            excess = np.mean([np.asarray(p["phi"]) for p in pts], axis=0) - floor
            ax = axes[row, col]
            n_i, n_j = excess.shape
            image = ax.imshow(
                excess,
                aspect="auto",
                origin="lower",
                vmin=-0.5,
                vmax=0.5,
                cmap="RdBu_r",
                extent=(0.5, n_j + 0.5, 0.5, n_i + 0.5),
            )
            ax.set(xlabel=f"j (A at r={n_j})", ylabel=f"i (A at r={n_i})")
            ax.set_title(f"{matrix}, block {block}: mean of {len(pts)} seeds", fontsize=9)
            ax.grid(False)
        fig.colorbar(image, ax=axes[row, len(blocks) - 1], label="phi - max(i, j)/d")
        ax = axes[row, -1]
        for source, color in (("learned", None), ("random", "gray")):
            for k, block in enumerate(blocks):
                pts = [
                    r
                    for r in records
                    if (r["matrix"], r["block"], r["source"]) == (matrix, block, source)
                ]
                xs, ys = [], []
                for n, (i, j) in enumerate(PHI_POINTS):
                    if i <= first["r_small"] and j <= first["r_large"]:
                        xs += [n + 0.08 * (k - len(blocks) / 2)] * len(pts)
                        ys += [p["phi"][i - 1][j - 1] - floor[i - 1, j - 1] for p in pts]
                label = f"block {block}" if source == "learned" else None
                if source == "random" and k == 0:
                    label = "random A (all blocks)"
                ax.scatter(xs, ys, s=12, color=color or f"C{k}", label=label)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(PHI_POINTS)), [f"({i},{j})" for i, j in PHI_POINTS])
        ax.set(xlabel="(i, j)", ylabel="phi - max(i, j)/d")
        ax.set_title(f"{matrix}: every seed and block", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Subspace similarity (LoRA paper, Eq. 4) of A learned at r={first['r_small']} and "
        f"r={first['r_large']} on shift, minus the random floor max(i, j)/d, d={first['d']} "
        f"({runs_note(records, ['module', 'source'])})"
    )
    fig.tight_layout()
    return fig


FLOAT32_FLOOR = 1e-7  # about float32's machine epsilon (1.2e-7): below it, round-off


def plot_delta_w_spectrum(data: dict[str, Records]) -> Any:
    """Singular values down to FLOAT32_FLOOR times the largest in the panel: the weights
    train in float32, so smaller singular values are round-off, not structure."""
    plt = pyplot()
    records = data["sigma"]
    modules = list(dict.fromkeys(r["module"] for r in records))
    fig, axes = plt.subplots(1, len(modules), figsize=(6 * len(modules), 4.4))
    for ax, m in zip(np.atleast_1d(axes), modules, strict=True):
        rows = [x for x in records if x["module"] == m]
        floor = FLOAT32_FLOOR * max(x["sigma"] for x in rows)
        runs = {(x["mode"], x["r"]) for x in rows}
        for mode, r in sorted(runs, key=lambda run: (run[0] == "full", run[1] or 0)):
            pts = [x for x in rows if x["mode"] == mode and x["r"] == r and x["sigma"] >= floor]
            label = "full fine-tuning" if mode == "full" else f"LoRA r={r}"
            ax.plot(
                [p["k"] for p in pts],
                [p["sigma"] for p in pts],
                marker=".",
                label=label,
                color="k" if mode == "full" else None,
            )
        ax.axhline(floor, color="gray", ls="--", label="1e-7 x largest: float32 round-off")
        ax.axvline(E.PLANTED_RANK, color="r", ls=":", label=f"planted rank {E.PLANTED_RANK}")
        ax.set(yscale="log", xlabel="k", ylabel="k-th singular value of ΔW", title=m)
        ax.set_ylim(floor / 2, None)
        ax.legend(fontsize=8)
    note = runs_note(records, ["mode", "r"])
    fig.suptitle(
        "Spectrum of the learned update on the planted task"
        + (f" ({note})" if note else "")
        + "; values under the dashed floor are not drawn"
    )
    fig.tight_layout()
    return fig


def plot_init_and_scaling(data: dict[str, Records]) -> Any:
    plt = pyplot()
    records = data["runs"]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(18, 4.8))
    for variant in E.INIT_VARIANTS:
        rows = [r for r in records if r["variant"] == variant]
        curves = np.array([r["curve"] for r in rows])
        steps = np.arange(1, curves.shape[1] + 1)
        line = left.plot(steps, smooth(curves.mean(axis=0)), label=variant)
        color = line[0].get_color()
        left.fill_between(
            steps, smooth(curves.min(axis=0)), smooth(curves.max(axis=0)), color=color, alpha=0.15
        )
        left.scatter([0] * len(rows), [r["val_loss_step0"] for r in rows], color=color, marker="D")
        norms = np.maximum(np.array([r["delta_norm"] for r in rows]), 1e-3)
        middle.plot(np.arange(norms.shape[1]), norms.mean(axis=0), color=color, label=variant)
        middle.fill_between(
            np.arange(norms.shape[1]), norms.min(axis=0), norms.max(axis=0), color=color, alpha=0.15
        )
    left.set(
        xlabel="step (diamonds: validation loss at step 0)", ylabel="training loss", yscale="log"
    )
    left.set_title("Loss (moving average): mean, band min to max", fontsize=10)
    middle.set(xlabel="step", ylabel="||ΔW||_F over the adapted matrices", yscale="log")
    middle.set_ylim(1e-3 / 2, None)
    middle.set_title("Size of the update: mean, band min to max (0 drawn at 1e-3)", fontsize=10)
    width = 0.8 / (2 * len(E.BASE_OPS))
    variants = list(E.INIT_VARIANTS)
    for k, op in enumerate(E.BASE_OPS):
        for h, when in enumerate(("step0", "final")):
            n = 2 * k + h
            x = np.arange(len(variants)) + (n - len(E.BASE_OPS) + 0.5) * width
            values = [
                [r[f"{op}_loss_{when}"] for r in records if r["variant"] == v] for v in variants
            ]
            right.bar(
                x,
                [np.mean(v) for v in values],
                width,
                color=f"C{k + 3}",
                hatch="//" if when == "final" else None,
                label=f"{op}, {'step 0' if when == 'step0' else 'after the run (hatched)'}",
            )
            for xi, v in zip(x, values, strict=True):
                right.scatter([xi] * len(v), v, color="k", s=8, zorder=3)
    right.set_xticks(range(len(variants)), [v.split(" (")[0] for v in variants], fontsize=8)
    right.set(ylabel="validation loss on the base's task")
    right.set_title("What the adapter costs the base's own tasks (dots: seeds)", fontsize=10)
    right.set_ylim(0, None)
    for ax in (left, middle, right):
        ax.legend(fontsize=7)
    fig.suptitle(
        f"Initialisation on shift, r={records[0]['r']}: B = 0 against both random "
        f"({runs_note(records, ['variant'])})"
    )
    fig.tight_layout()
    return fig
