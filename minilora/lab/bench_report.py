"""The text table of bench.py's results: formatting only (the command is in cli/)."""

from __future__ import annotations

import textwrap
from typing import Any

from minilora.lab.bench import SETTLE_S
from minilora.lab.flops import FLOP_COUNT
from minilora.lab.reference import MODES

MB = 1e6  # decimal megabytes, as params.human_bytes


# ---------------------------------------------------------------------- the table
def _table(rows: list[list[str]], align: str) -> list[str]:
    """Aligned columns; ``align`` has one "<" or ">" per column."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths, strict=True)).rstrip()
        for row in rows
    ]


def _ms(x: float) -> str:
    """Milliseconds with about three significant digits."""
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _mb(n: float) -> str:
    return f"{n / MB:.2f}"


def _training_lines(r: dict[str, Any]) -> list[str]:
    tr, fl = r["training"], r["flops"]
    mini = tr["minilora"]
    rows = [["training step, median ms", "full", "LoRA", "LoRA/full"]]
    rows.append(
        [
            "minilora",
            _ms(mini["full"]["median_ms"]),
            _ms(mini["lora"]["median_ms"]),
            f"{tr['lora_over_full']:.2f}",
        ]
    )
    if tr["torch"]:
        t, ratio = tr["torch"], tr["minilora_over_torch"]
        rows.append(
            [
                f"PyTorch eager, {r['torch']['threads']} threads",
                _ms(t["full"]["median_ms"]),
                _ms(t["lora"]["median_ms"]),
                f"{tr['torch_lora_over_full']:.2f}",
            ]
        )
        rows.append(["minilora / PyTorch", f"{ratio['full']:.2f}", f"{ratio['lora']:.2f}", ""])
    else:
        rows.append(["PyTorch", "-", "-", ""])
    gflop = {mode: fl[mode]["total"] / 1e9 for mode in MODES}
    rows.append(["GFLOP per step", f"{gflop['full']:.3g}", f"{gflop['lora']:.3g}", ""])
    ach = fl["achieved_gflops"]
    rows.append(["achieved GFLOP/s", f"{ach['full']:.1f}", f"{ach['lora']:.1f}", ""])
    if fl["fraction_of_matmul"]:
        frac = fl["fraction_of_matmul"]
        rows.append(
            ["  of the matmul rate", f"{100 * frac['full']:.0f}%", f"{100 * frac['lora']:.0f}%", ""]
        )
    lines = _table(rows, "<>>>")
    if r["torch"].get("max_abs_logit_diff"):
        d = r["torch"]["max_abs_logit_diff"]
        lines.append(
            f"same weights in PyTorch: max |logit difference| {d['full']:.1e} (full), "
            f"{d['lora']:.1e} (LoRA)"
        )
    elif not r["torch"]["available"]:
        lines.append(f"PyTorch not compared: {r['torch'].get('reason', '')}")
    return lines


def _threads_lines(threads: dict[str, Any] | None) -> list[str]:
    """Training step by BLAS thread count: what ``--threads auto`` measures and picks."""
    if not threads:
        return []
    counts = list(threads["full"])
    rows = [["training step by BLAS threads, ms"] + [f"{n} thread(s)" for n in counts]]
    rows += [[mode] + [_ms(threads[mode][n]) for n in counts] for mode in MODES]
    return _table(rows, "<" + ">" * len(counts)) + [""]


def _forward_lines(fwd: dict[str, Any]) -> list[str]:
    rows = [["forward only, median ms", "ms", "/ base"]]
    rows.append(["base", _ms(fwd["base"]["median_ms"]), "1.000"])
    for key, label in (("unmerged", "LoRA unmerged"), ("merged", "LoRA merged")):
        rows.append([label, _ms(fwd[f"lora_{key}"]["median_ms"]), f"{fwd[f'{key}_over_base']:.3f}"])
    return _table(rows, "<>>")


def _memory_lines(mem: dict[str, Any]) -> list[str]:
    full, lora_ = mem["full"], mem["lora"]
    rows = [[f"memory of a step, MB ({mem['method']})", "full", "predicted", "LoRA", "predicted"]]
    for key in ("weights", "gradients", "optimizer", "activations"):
        rows.append(
            [
                key,
                _mb(full[key]),
                _mb(full["predicted"][key]),
                _mb(lora_[key]),
                _mb(lora_["predicted"][key]),
            ]
        )
    rows.append(
        [
            "peak (total)",
            _mb(full["peak"]),
            _mb(full["predicted"]["total"]),
            _mb(lora_["peak"]),
            _mb(lora_["predicted"]["total"]),
        ]
    )
    rows.append(
        [
            "  estimate error",
            "",
            f"{_error(full['predicted']['total'], full['peak'])}",
            "",
            f"{_error(lora_['predicted']['total'], lora_['peak'])}",
        ]
    )
    s = mem["saving"]
    return _table(rows, "<>>>>") + [
        f"LoRA saves {_mb(s['measured'])} MB of gradients + optimizer state: "
        f"{100 * s['fraction']:.1f}% of the theoretical {_mb(s['theoretical'])} MB "
        f"(peak: {_mb(s['peak'])} MB lower)",
        f"activations of a step: LoRA {_mb(lora_['activations'])} MB, full "
        f"{_mb(full['activations'])} MB (a frozen linear without an adapter keeps no input)",
    ]


def _error(predicted: float, measured: float) -> str:
    """The estimate's error relative to the measurement, in percent."""
    return f"{100 * (predicted - measured) / measured:+.1f}%"


def _ops_lines(ops: dict[str, Any]) -> list[str]:
    head = ["where the time goes, ms/step", "full fwd", "bwd", "total", "share"]
    rows = [head + ["LoRA fwd", "bwd", "total", "share"]]
    by_op = {mode: {o["op"]: o for o in ops[mode]["ops"]} for mode in MODES}
    order = [o["op"] for o in ops["full"]["ops"]]
    order += [op for op in by_op["lora"] if op not in order]
    for op in order:
        cells = [op]
        for mode in MODES:
            o = by_op[mode].get(op)
            if o is None:
                cells += ["", "", "-", ""]
                continue
            if op in ("adamw", "other"):  # not a forward/backward pair: one number
                cells += ["", "", _ms(o["total_ms"])]
            else:
                cells += [_ms(o["forward_ms"]), _ms(o["backward_ms"]), _ms(o["total_ms"])]
            cells.append(f"{100 * o['share']:.1f}%")
        rows.append(cells)
    step = {mode: _ms(ops[mode]["step_ms"]) for mode in MODES}
    rows.append(["step, instrumented", "", "", step["full"], "", "", "", step["lora"], ""])
    return _table(rows, "<" + ">" * 8)


def _gpt2_lines(name: str, r: dict[str, Any]) -> list[str]:
    """The gpt2 configuration: a LoRA step, minilora against transformers + PEFT."""
    c, a, n, tr = r["config"], r["adapter"], r["trainable"], r["training"]
    lora = f"LoRA r={a['r']} alpha={a['alpha']:g}"
    lines = [
        f"== {name}: GPT-2 small's shape with random weights (GPT-2's init): {c['n_layer']} "
        f"layers, {c['n_head']} heads, d_model {c['d_model']}, vocab {c['vocab_size']}, "
        f"{c['block_size']} positions; batch {c['batch_size']} x {c['seq_len']} tokens "
        f"({c['tokens']:,} per step)",
        f"minilora: {lora} on {', '.join(a['target_modules'])} ({n['minilora']:,} trainable)",
    ]
    if "peft" in n:
        lines += textwrap.wrap(
            f"PEFT: {lora} on the fused c_attn ({n['peft']:,} trainable): GPT-2's q, k, v are "
            "one layer there, so PEFT cannot adapt q and v alone; r=8 on c_attn has the same "
            "count and adapter FLOPs, and here the same function (v's A = q's A)",
            100,
        )
        lines += [
            f"same weights in transformers + PEFT ({r['torch']['attention']} attention): max "
            f"|logit difference| {r['torch']['logits']['max_abs_diff']:.1e} (largest |logit| "
            f"{r['torch']['logits']['max_abs']:.2g})",
        ]
    else:
        lines.append(f"PEFT not compared: {r['torch'].get('reason', '')}")
    sides = [("minilora", "minilora")]
    if "peft" in tr:
        sides.append(("peft", f"PEFT, PyTorch eager, {r['torch']['threads']} threads"))
    rows = [["LoRA training step", "median ms", "min ms", "tokens/s", "1,000 steps"]]
    for side, label in sides:
        t, take = tr[side], r["what_it_takes"][side]
        rows.append(
            [
                label,
                _ms(t["median_ms"]),
                _ms(t["min_ms"]),
                f"{t['tokens_per_s']:,.0f}",
                f"{take['minutes_per_1000_steps']:.1f} min",
            ]
        )
    if "peft" in tr:
        rows.append(["minilora / PEFT", f"{tr['minilora_over_peft']:.2f}", "", "", ""])
    lines += ["", *_table(rows, "<>>>>")]
    mem = r["memory"]
    m = mem["minilora"]
    rows = [[f"memory of a step, MB ({mem['method']})", "minilora", "predicted"]]
    for key in ("weights", "gradients", "optimizer", "activations"):
        rows.append([key, _mb(m[key]), _mb(m["predicted"][key])])
    rows.append(["peak (total)", _mb(m["peak"]), _mb(m["predicted"]["total"])])
    rows.append(["  estimate error", "", _error(m["predicted"]["total"], m["peak"])])
    lines += ["", *_table(rows, "<>>")]
    rss = {side: v for side, v in mem["rss"].items() if v}
    if rss:
        rows = [
            ["resident memory, MB"] + [{"minilora": "minilora", "peft": "PEFT"}[k] for k in rss]
        ]
        for key, label in (
            ("weights", "weights (counted)"),
            ("optimizer", "optimizer state (counted)"),
            ("above", "step: RSS high-water above its start"),
            ("peak", "peak (the three)"),
        ):
            rows.append([label] + [_mb(v[key]) for v in rss.values()])
        lines += [
            "",
            *_table(rows, "<" + ">" * len(rss)),
            *textwrap.wrap(
                "(RSS: Linux's VmHWM, reset before one step, after glibc's malloc_trim handed "
                "free memory back: the pages the step touches, whichever library allocates them; "
                "on minilora's step it reads near tracemalloc's peak above the weights and "
                "optimizer state)",
                100,
            ),
        ]
    return lines


def format_config(name: str, r: dict[str, Any]) -> list[str]:
    """The lines of one configuration's part of the table."""
    if r.get("kind") == "gpt2":
        return _gpt2_lines(name, r)
    c = r["config"]
    title = (
        f"== {name}: batch {c['batch_size']}, seq {c['block_size']}, d_model {c['d_model']}, "
        f"{c['n_layer']} layers, {c['n_head']} heads, vocab {c['vocab_size']} "
        f"({c['tokens']:,} tokens per step)"
    )
    return [
        title,
        *_training_lines(r),
        "",
        *_threads_lines(r.get("threads")),
        *_forward_lines(r["forward"]),
        "",
        *_memory_lines(r["memory"]),
        "",
        *_ops_lines(r["ops"]),
    ]


def format_results(results: dict[str, Any]) -> str:
    """The whole :func:`run_benchmark` result as one text table."""
    meta, s, mm = results["meta"], results["settings"], results["matmul"]
    blas = meta["blas"]
    threads = f"{blas['threads']} threads" if blas.get("threads") else blas.get("device", "")
    lib = f"NumPy {meta['numpy']}" + (f", CuPy {meta['cupy']}" if meta.get("cupy") else "")
    machine = meta["machine"]
    kernel = f", kernel {blas['kernel']}" if blas.get("kernel") else ""
    lines = [
        f"minilora bench  {meta['date']}  device {meta['device']}, "
        f"{machine['usable_cores']} of {machine['cpu_count']} cores usable",
        f"CPU {machine.get('cpu_model', machine['processor'])}",
        f"{lib}, BLAS {blas['library']}{kernel}, {threads} ({blas['source']})"
        + (
            f"; element-wise work on {meta['element_threads']} "
            f"thread{'s' * (meta['element_threads'] != 1)}"
            if meta.get("element_threads")
            else ""
        ),
        *(
            [f"environment: {' '.join(f'{k}={v}' for k, v in meta['environment'].items())}"]
            if meta.get("environment")
            else []
        ),
        f"PyTorch {meta['torch'] or 'not installed'}, Python {meta['python']}",
        f"{s['dtype']}, LoRA r={s['lora']['r']} alpha={s['lora']['alpha']:g} on "
        f"{','.join(s['lora']['target_modules'])}"
        + (" (gpt2: on q,v)" if "gpt2" in results["configs"] else "")
        + f", {s['optimizer']}",
        f"medians of {s['steps']} steps after {s['warmup']} warm-up, runs alternating"
        + (f", {SETTLE_S} s idle before each with PyTorch" if s["torch"] and not s["quick"] else "")
        + ("; BUSY: a helper process keeps one core busy" if s["busy"] else ""),
        f"matmul rate: ({mm['n']}, {mm['n']}) float32 product, best {_ms(mm['best_ms'])} ms "
        f"= {mm['gflops']:.1f} GFLOP/s (median {mm['median_gflops']:.1f})",
        f"load average (1, 5, 15 min) before {meta['load_average']}, "
        f"after {meta.get('load_average_after')}",
        "",
    ]
    for name, r in results["configs"].items():
        lines += format_config(name, r)
        lines.append("")
    notes = (
        "FLOPs: "
        + FLOP_COUNT
        + " Memory: peak during one step; activations = peak - weights - gradients - "
        "optimizer state. Op times are self times (callees excluded); 'other' is the "
        "model's own lines (gradient sums, embedding add, id checks)."
    )
    return "\n".join(lines + textwrap.wrap(notes, 100))
