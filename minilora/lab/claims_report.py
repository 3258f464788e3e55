"""``minilora reproduce``: the LoRA paper's claims, run at toy scale, with verdicts.

:func:`reproduce` runs claims.py's experiments (fewer ranks, seeds and steps with
``quick``) plus a few measurements the library already makes (params.py, merge), and
:func:`claims` turns the results into one record per claim: the claim in the paper's
words, the paper's number, ours, a verdict (reproduced / partly / not) and why.
:func:`write_report` writes them as figures/claims.json (with the raw results, which the
figure is drawn from) and figures/claims.md.

The verdicts' thresholds are stated next to each claim; ``TOLERANCE`` is how far a
rerun's numbers may move before tests/test_claims.py calls a finding broken.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from minilora.basics.backend import to_host
from minilora.core import params
from minilora.core.adapters import add_adapter, merge
from minilora.core.lora import LoraConfig
from minilora.files.checkpoints import load_base
from minilora.files.io import atomic_write_bytes, save_json
from minilora.lab import claims as C

QUICK = {
    "ranks": (2, 4, 32),
    "seeds": (0, 1),
    "grid": C.LR_GRID,
    "steps": C.STEPS,
    "single_steps": C.SINGLE_STEPS,
    "budget_seeds": (0,),
    "section7_steps": 40,
    "plant_rank": C.PLANT_RANK,
}
"""The quick run: ranks 2, 4 and 32 (the knee's three), each tuned as in the full run,
two seeds; one seed of the budget; Section 7 after 40 steps."""
FULL = {
    "ranks": (1, 2, 4, 8, 16, 32),
    "seeds": (0, 1, 2, 3, 4),
    "grid": C.LR_GRID,
    "steps": C.STEPS,
    "single_steps": C.SINGLE_STEPS,
    "budget_seeds": (0, 1),
    "section7_steps": 200,
    "plant_rank": C.PLANT_RANK,
}
TOLERANCE = 0.25
"""A rerun's number may differ from the committed one by this fraction of it (or 0.02
absolute, for numbers near 0): trained runs differ in their last bits between BLAS
kernels, and 300 steps amplify that (README); a broken finding moves far more."""
VERDICTS = ("reproduced", "partly", "not")


def reproduce(quick: bool = False, processes: int | None = None) -> dict[str, Any]:
    """Run every experiment the claims need; returns the raw results (JSON-ready)."""
    s = QUICK if quick else FULL
    sweep = C.rank_sweep(s["ranks"], s["seeds"], s["grid"], "single", s["single_steps"], processes)
    several = C.rank_sweep((2, 4), s["seeds"][:2], (3e-2,), "several", s["steps"], processes)
    budget = C.target_budget(s["budget_seeds"], s["steps"], processes)
    section7 = C.section7(s["section7_steps"], processes=processes)
    return {
        "mode": "quick" if quick else "full",
        "settings": s,
        "single": sweep,
        "several": several,
        "budget": budget,
        "section7": section7,
        "exact": exactness(),
    }


def exactness() -> dict[str, float]:
    """B = 0 keeps the base exact; merged inference has the base's size and output."""
    model, _ = load_base()
    idx = np.random.default_rng(0).integers(0, model.config.vocab_size, (4, 32))
    model.eval()
    base = to_host(model.forward(idx)).astype(np.float64)
    base_count = params.count_parameters(model).total
    add_adapter(model, LoraConfig(8, 16.0, 0.0, ("q", "k", "v", "o")), seed=0)
    fresh = to_host(model.forward(idx)).astype(np.float64)
    for name in model.trainable_names():  # as after training: B no longer 0
        if ".lora_B." in name:
            value = np.random.default_rng(1).normal(0, 0.02, model.params[name].shape)
            model.params[name][...] = model.xp.asarray(value, dtype=model.dtype)
    adapted = to_host(model.forward(idx)).astype(np.float64)
    merge(model)
    merged = to_host(model.forward(idx)).astype(np.float64)
    weights = {n: v.shape for n, v in model.params.items() if ".lora_" not in n}
    return {
        "fresh_adapter_max_diff": float(np.abs(fresh - base).max()),
        "merged_max_diff": float(np.abs(merged - adapted).max()),
        "adapter_effect": float(np.abs(adapted - base).max()),
        "merged_base_params": int(sum(int(np.prod(s)) for s in weights.values())),
        "base_params": int(base_count),
    }


# ----------------------------------------------------------------------- claims
def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def _kl_by_rank(sweep: dict[str, Any]) -> dict[int, float]:
    ranks = sorted({run["r"] for run in sweep["runs"]})
    return {r: _mean([x["kl"] for x in sweep["runs"] if x["r"] == r]) for r in ranks}


def claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per claim: id, claim, paper, ours (text), number, verdict, why."""
    out = []

    def add(cid: str, claim: str, paper: str, ours: str, number: float, verdict: str, why: str):
        assert verdict in VERDICTS
        out.append(
            {
                "id": cid,
                "claim": claim,
                "paper": paper,
                "ours": ours,
                "number": float(number),
                "verdict": verdict,
                "why": why,
            }
        )

    # 1. parameter counts (params.py, the paper's GPT-3 shapes)
    g = params.preset("gpt3-175b")
    count = params.lora_parameter_count(g["n_layer"], g["d_model"], 4, ("q", "v"))
    add(
        "parameters",
        "LoRA with r = 4 on W_q and W_v of GPT-3 175B trains 18.9M parameters (Tables 4 and 5)",
        "18.9M",
        f"{count:,}",
        count,
        "reproduced" if abs(count / 18.9e6 - 1) < 0.005 else "not",
        "2 matrices x 96 layers x r (d_in + d_out) = 2 x 96 x 4 x 2 x 12288, from the shapes",
    )

    # 2. memory (params.memory_estimate, fp16 weights and Adam state)
    def total(r: int | None, b: int) -> int:
        return params.memory_estimate({**g, "batch_size": b}, r, ("q", "v"), 2)["total"]

    small, large = total(None, 1) / total(4, 1), total(None, 64) / total(4, 64)
    add(
        "memory",
        "Training GPT-3 175B with LoRA needs 350GB of VRAM instead of 1.2TB "
        "(Section 4.2): about 3x less",
        "3.4x",
        f"{small:.2f}x at batch 1, {large:.2f}x at batch 64 (sequence 2048)",
        small,
        "reproduced" if 2.0 <= small <= 5.0 else "partly",
        "the saving is the gradients and Adam moments of the frozen weights; activations "
        "do not shrink, so as the batch grows they dominate and the ratio falls toward 1",
    )

    # 3. a small r suffices (shift, real fine-tune of the pretrained base)
    t7 = {row["r"]: row for row in results["section7"]["table7"]}
    lo, hi = min(t7), max(t7)
    ratio = t7[lo]["val_loss"] / t7[hi]["val_loss"]
    add(
        "small_r",
        "A very small r (even 1 or 2) on W_q and W_v performs competitively with large r (Table 6)",
        "r = 1 competitive with r = 64",
        f"shift: validation loss at r = {lo} is {ratio:.2f}x that at r = {hi} "
        f"({t7[lo]['val_loss']:.3f} vs {t7[hi]['val_loss']:.3f})",
        ratio,
        "reproduced" if ratio <= 1.1 else "partly" if ratio <= 2 else "not",
        "reproduced if within 10%, partly if within 2x; one seed, the steps of the run",
    )

    # 4. the planted rank is recovered (single module, soft labels, k = 4)
    single = results["single"]
    kl = _kl_by_rank(single)
    kl0 = _mean([x["kl0"] for x in single["runs"]])
    runs4 = [x for x in single["runs"] if x["r"] == C.PLANT_RANK]
    cos4 = min(C.smallest_cosine(x) for x in runs4)
    top = max(kl)
    below = max((r for r in kl if r < C.PLANT_RANK), default=None)
    knee = kl[4] <= 1.1 * kl[top] and (below is None or kl[4] < 0.5 * kl[below])
    ok = [knee, cos4 >= 0.9]
    shown = [r for r in (below, C.PLANT_RANK, top) if r is not None]
    ey = {  # r < k: distance to the best rank-r approximation (Eckart-Young), its range
        r: [v for x in single["runs"] if x["r"] == r for k, v in x.items() if "ey_error" in k]
        for r in kl
        if r < C.PLANT_RANK
    }
    add(
        "planted_rank",
        "The update has a low intrinsic rank and LoRA with r >= k recovers "
        f"it (k = {C.PLANT_RANK} planted; Section 7)",
        "a knee at r = k; cosines near 1",
        "KL / KL before training: "
        + ", ".join(f"r = {r}: {kl[r] / kl0:.2g}" for r in shown)
        + f" (KL before: {kl0:.2g}; the exact answer in float32: {single['floor_kl']:.1g}); "
        f"smallest principal cosine at r = 4 over {len(runs4)} seeds: {cos4:.3f}",
        cos4,
        "reproduced" if all(ok) else "partly" if any(ok) else "not",
        "knee: KL(r=4) at most 10% above KL(r=max) and below half KL(r=2); recovery: smallest "
        f"cosine >= 0.9 (h.0.mlp.fc, ΔW's rows centred: its inputs have zero mean). Knee "
        f"{'holds' if knee else 'fails'} (KL(r=4) / KL(r={top}) = {kl[4] / kl[top]:.2g}), "
        f"recovery {'holds' if cos4 >= 0.9 else 'fails'}. Learning rates tuned per rank "
        f"{single['lr']} on a held-out seed; {single['runs'][0]['steps']} steps"
        + (
            "; a larger r converges faster, so after a fixed number of steps its KL is "
            "lower even where both have found the planted change"
            if not knee and cos4 >= 0.9
            else ""
        )
        + (
            ". Below k the learned ΔW is not the SVD truncation of the planted one: "
            "||ΔW - best rank-r|| / ||best rank-r|| = "
            + ", ".join(f"{min(v):.2f} to {max(v):.2f} at r = {r}" for r, v in ey.items())
            + " (the loss is a KL between outputs, not a distance between matrices)"
            if ey
            else ""
        ),
    )

    # 5. Table 5: a budget over more matrices beats one matrix at high rank
    by_cfg: dict[str, list[float]] = {}
    for run in results["budget"]:
        by_cfg.setdefault(f"{run['targets']} r={run['r']}", []).append(run["kl"])
    means = {k: _mean(v) for k, v in by_cfg.items()}
    best = min(means, key=means.get)
    single_best = min(v for k, v in means.items() if "," not in k.split(" ")[0])
    add(
        "budget",
        "With a fixed budget, adapting more matrices at lower rank beats one "
        "matrix at higher rank (Table 5)",
        "W_q,W_v r=4: 73.7 vs W_q r=8: 70.4 (WikiSQL)",
        "; ".join(f"{k}: KL {v:.3g}" for k, v in means.items()),
        single_best / means[best],
        "reproduced" if "," in best else "not",
        "on the several-module planted task (rank 4 in q and v of both blocks), so q,v is "
        "favoured by construction; the number is the best single matrix's KL over the best",
    )

    # 6. Fig. 3: top directions shared across ranks
    sim = results["single"]["similarity"]
    phi = _mean([x["phi_top1"] for x in sim])
    floor = sim[0]["floor_top1"]
    ranks = sim[0]["ranks"]
    add(
        "shared_directions",
        "The top singular direction of A is shared between a small "
        "and a large r: phi(1, 1) > 0.5 (Fig. 3)",
        "phi > 0.5",
        f"phi(1, 1) between A at r = {ranks[0]} and r = {ranks[1]}: {phi:.2f} (mean of "
        f"{len(sim)} seeds; random floor 1/d = {floor:.3f})",
        phi,
        "reproduced" if phi > 0.5 else "partly" if phi > 5 * floor else "not",
        "planted single-module task; reproduced above 0.5, partly above 5x the floor",
    )

    # 7. Table 7: ΔW amplifies directions W does not emphasise
    a = t7[lo]
    add(
        "amplification",
        "ΔW amplifies directions not emphasised in W: ||ΔW||_F / "
        "||U^T W V^T||_F = 21.5 for r = 4 (Table 7)",
        "21.5 (r = 4)",
        f"r = {lo}: {a['factor']:.1f} (||U^T W V^T||: ΔW's dirs {a['proj_delta_dirs']:.3f}, "
        f"W's {a['proj_W_dirs']:.3f}, random {a['proj_random_dirs']:.3f}); r = {hi}: "
        f"{t7[hi]['factor']:.1f}",
        a["factor"],
        "reproduced"
        if a["factor"] > 5 and a["proj_delta_dirs"] < a["proj_W_dirs"] / 3
        else "partly"
        if a["factor"] > 1
        else "not",
        f"{results['section7']['module']} after fine-tuning on shift; reproduced if the "
        "factor > 5 and ΔW's directions carry well under W's own",
    )

    # 8. B = 0 keeps the base exact; 9. merged inference costs nothing extra
    e = results["exact"]
    add(
        "zero_init",
        "With B = 0, ΔW = BA is zero at the start of training (Section 4.1)",
        "ΔW = 0",
        f"max |logits with a new adapter - base| = {e['fresh_adapter_max_diff']:.3g}",
        e["fresh_adapter_max_diff"],
        "reproduced" if e["fresh_adapter_max_diff"] == 0 else "not",
        "the shipped base with r = 8 on q,k,v,o: the same logits, bit for bit",
    )
    same = e["merged_base_params"] == e["base_params"]
    add(
        "merged_inference",
        "Merging W + BA adds no inference latency (Section 4.1)",
        "no extra latency",
        f"merged model: {e['merged_base_params']:,} weights "
        f"(base: {e['base_params']:,}); max |merged - unmerged logits| = "
        f"{e['merged_max_diff']:.2g} (adapter effect {e['adapter_effect']:.2g})",
        e["merged_max_diff"],
        "reproduced"
        if same and e["merged_max_diff"] < 1e-4 * max(e["adapter_effect"], 1)
        else "not",
        "same weights, same shapes, so the same FLOPs; outputs agree to float32 round-off",
    )
    return out


# ------------------------------------------------------------------------ files
def report_paths(out_dir: str | Path, quick: bool) -> list[Path]:
    """The files :func:`write_report` writes: claims(.json, .md) and its figure (.png)."""
    stem = "claims_quick" if quick else "claims"
    return [Path(out_dir) / f"{stem}{ext}" for ext in (".json", ".md", ".png")]


def write_report(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """The report in ``out_dir`` (report_paths: claims JSON with the raw results, md, png)."""
    json_path, md_path, png_path = report_paths(out_dir, results["mode"] == "quick")
    # as JSON will hold them (tuples as lists, keys as strings), so that the claims
    # recomputed from the file are the claims written
    results = json.loads(json.dumps(results, default=_plain))
    records = claims(results)
    data = {"mode": results["mode"], "tolerance": TOLERANCE, "claims": records, "results": results}
    save_json(json_path, data)
    atomic_write_bytes(md_path, markdown(records, results["mode"]).encode("utf-8"))
    paths = [json_path, md_path]
    try:
        from minilora.lab.claim_plots import plot_claims  # matplotlib is an optional extra
    except ImportError:
        return paths
    plot_claims(data, png_path)
    return [*paths, png_path]


def _plain(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON: {type(x).__name__}")


def markdown(records: list[dict[str, Any]], mode: str) -> str:
    lines = [
        f"# LoRA's claims at toy scale ({mode} run of `minilora reproduce`)",
        "",
        "| claim | paper | ours | verdict | why |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        cells = [r["claim"], r["paper"], r["ours"], f"**{r['verdict']}**", r["why"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def compare(
    new: list[dict[str, Any]], old: list[dict[str, Any]], tol: float = TOLERANCE
) -> list[str]:
    """What differs between two claim lists: a verdict, or a number beyond ``tol``."""
    problems = []
    old_by_id = {r["id"]: r for r in old}
    for r in new:
        o = old_by_id.get(r["id"])
        if o is None:
            problems.append(f"{r['id']}: not in the committed report")
            continue
        if r["verdict"] != o["verdict"]:
            problems.append(f"{r['id']}: verdict {r['verdict']} (committed: {o['verdict']})")
        if abs(r["number"] - o["number"]) > max(tol * abs(o["number"]), 0.02):
            problems.append(f"{r['id']}: number {r['number']:.4g} (committed {o['number']:.4g})")
    return problems
