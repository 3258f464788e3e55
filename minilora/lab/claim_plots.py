"""The figure of ``minilora reproduce``: the planted rank's knee, its recovery, how
much of full fine-tuning's gain survives truncating ΔW to rank k, and Table 7.

Every number in the titles is read from the report's own JSON (``data``), never typed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from minilora.lab.claims import smallest_cosine
from minilora.lab.plots import pyplot


def plot_claims(data: dict[str, Any], path: str | Path) -> Any:
    """Four panels from claims.json's results; writes ``path`` and returns the figure."""
    plt = pyplot()
    res = data["results"]
    single = res["single"]
    runs = single["runs"]
    ranks = sorted({r["r"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    steps = runs[0]["steps"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))

    ax = axes[0]  # every seed a point: outcomes may be bimodal
    # a KL at or below the exact answer's (float32 round-off; it can be negative) is
    # drawn on that floor: a log axis has no room for it, and nothing tells it apart
    floor = max(abs(single["floor_kl"]), 1e-12)
    for r in ranks:
        kls = [max(x["kl"], floor) for x in runs if x["r"] == r]
        ax.scatter([r] * len(kls), kls, color="C0", alpha=0.6, s=18)
    means = [max(float(np.mean([x["kl"] for x in runs if x["r"] == r])), floor) for r in ranks]
    ax.plot(ranks, means, color="C0", label="mean over seeds")
    kl0 = float(np.mean([x["kl0"] for x in runs]))
    ax.axhline(kl0, color="gray", ls=":", label=f"before training ({kl0:.2g})")
    ax.axhline(floor, color="k", ls="-.", lw=0.8, label=f"exact answer, float32 ({floor:.1g})")
    k = res["settings"].get("plant_rank", 4)
    ax.axvline(k, color="C3", ls="--", label=f"planted rank k = {k}")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="LoRA rank r",
        ylabel="KL(teacher || student)",
        title=f"Planted rank {k} in one matrix: KL after {steps} steps\n"
        f"({len(seeds)} seeds, learning rate tuned per rank)",
    )
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xticks([], minor=True)
    ax.legend(fontsize=8)

    ax = axes[1]
    for r in ranks:
        cos = [smallest_cosine(x) for x in runs if x["r"] == r]
        ax.scatter([r] * len(cos), cos, color="C1", alpha=0.6, s=18)
    d = res["single"]["similarity"][0]["floor_top1"] ** -1 if single["similarity"] else None
    ax.axhline(0.9, color="gray", ls=":", label="0.9 (the issue's bar)")
    ax.set(
        xscale="log",
        ylim=(0, 1.02),
        xlabel="LoRA rank r",
        ylabel="smallest principal cosine",
        title="Learned ΔW (rows centred) vs the planted U, V:\ntop min(r, k) directions"
        + (f", d = {d:.0f}" if d else ""),
    )
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xticks([], minor=True)
    ax.legend(fontsize=8)

    ax = axes[2]
    s7 = res["section7"]
    rows = s7["truncation"]
    ax.plot([r["k"] for r in rows], [r["kept"] for r in rows], marker="o", color="C2")
    ax.axhline(1.0, color="gray", ls=":")
    ax.set(
        xscale="log",
        xlabel="rank k kept in every ΔW (top k singular triplets)",
        ylabel="fraction of the loss gain kept",
        title=f"Full fine-tuning on shift, ΔW truncated to rank k\n(loss "
        f"{s7['base_val_loss']:.2f} → {s7['full_val_loss']:.2f} untruncated)",
    )
    ax.set_xticks([r["k"] for r in rows], [str(r["k"]) for r in rows])
    ax.set_xticks([], minor=True)

    ax = axes[3]  # Table 7: how much of W lies in each set of r directions
    rows = s7["table7"]
    kinds = (
        ("proj_delta_dirs", "ΔW's top r", "C0"),
        ("proj_W_dirs", "W's top r", "C1"),
        ("proj_random_dirs", "random r", "C7"),
    )
    x = np.arange(len(rows))
    for i, (key, label, color) in enumerate(kinds):
        ax.bar(x + (i - 1) * 0.27, [row[key] for row in rows], 0.27, label=label, color=color)
    ax.set_xticks(x, [f"r = {row['r']}" for row in rows])
    factors = ", ".join(f"{row['factor']:.1f} (r = {row['r']})" for row in rows)
    ax.set(
        ylabel="||U^T W V^T||_F",
        title=f"Table 7 on {s7['module']}: W projected on r directions\n"
        f"||ΔW||_F / ||U^T W V^T||_F = {factors}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return fig
