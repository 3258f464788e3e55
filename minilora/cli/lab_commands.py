"""What the commands that measure and report do: ``params``, ``gradcheck``, ``bench``,
``figures`` and ``reproduce`` (cli/main.py parses the arguments; cli/commands.py holds
the training commands and the table of all of them)."""

from __future__ import annotations

import json
import os
import sys
import time
from argparse import Namespace
from pathlib import Path

from minilora.basics.backend import get_backend
from minilora.basics.checks import one_of
from minilora.core import params
from minilora.core.gradcheck import format_report
from minilora.core.qlora import QUANTIZATIONS, format_qlora_65b, qlora_65b
from minilora.files.io import check_writable_file, save_json
from minilora.lab.bench import run_benchmark
from minilora.lab.bench_report import format_results
from minilora.lab.gradcheck_report import full_report
from minilora.lab.machine import blas_info, results_filename


def parse_targets(text: str) -> tuple[str, ...]:
    """The comma-separated --targets of params and finetune: "q, v" -> ("q", "v")."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


# --------------------------------------------------------------------------- params
def params_command(args: Namespace) -> int:
    if args.device == "gpu":  # say so rather than pretend: there are no arrays here
        print(
            "minilora params: note: arithmetic only; --device gpu changes nothing", file=sys.stderr
        )
    if args.quantize is not None:
        one_of("--quantize", args.quantize, QUANTIZATIONS)
    table = params.accounting_table(
        args.preset,
        r=args.rank,
        targets=parse_targets(args.targets),
        dora=args.dora,
        quantize=args.quantize,
        vera=args.vera,
    )
    if args.quantize is not None:  # QLoRA's own figure, beside this estimate of it
        table["qlora_65b"] = qlora_65b()
    if args.json:
        json.dump(table, sys.stdout, indent=2)
        print()
    else:
        print(params.format_accounting(table))
        if args.quantize is not None:
            print("\n" + "\n".join(format_qlora_65b(table["qlora_65b"])))
    return 0


# ------------------------------------------------------------------------ gradcheck
def gradcheck_command(args: Namespace) -> int:
    results = full_report(seed=args.seed, device=args.device)
    print(format_report(results))
    failed = [r.name for r in results if not r.passed()]
    print(
        f"{len(results) - len(failed)} of {len(results)} checks below 1e-6"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
    )
    return 1 if failed else 0


def figures_command(args: Namespace) -> int:
    from minilora.lab.figures import make_figures  # matplotlib is an optional extra

    if args.device is not None:  # the sweep's worker processes read it from the environment
        os.environ["MINILORA_DEVICE"] = args.device
    start = time.perf_counter()
    for row in make_figures(args.out, quick=args.quick, only=args.only, reuse=args.reuse):
        print(f"{row['png']}  ({row['seconds']:.0f} s of experiments)")
    print(f"figures took {time.perf_counter() - start:.0f} s")
    return 0


def reproduce_command(args: Namespace) -> int:
    """``minilora reproduce``: run the claims, write claims(.md, .json) and the figure."""
    from minilora.lab.claims_report import report_paths, reproduce, write_report

    out = args.out or ("runs/claims-quick" if args.quick else "figures")
    for path in report_paths(out, args.quick):  # before minutes of training
        check_writable_file(path)
    if args.device is not None:  # the sweep's worker processes read it from the environment
        os.environ["MINILORA_DEVICE"] = args.device
    start = time.perf_counter()
    for path in write_report(reproduce(quick=args.quick), out):
        print(path)
    print(f"reproduce took {time.perf_counter() - start:.0f} s")
    return 0


def bench_command(args: Namespace) -> int:
    """``minilora bench``: measure, print the table, write --json if asked."""
    json_path = None
    if args.json:  # before minutes of measuring: a path that cannot be written fails now
        json_path = Path(args.json)
        if json_path.is_dir():  # a folder: a file named for this machine's kernel (and
            # the --config named), beside others
            backend = get_backend(args.device)
            meta = {"device": backend.device, "blas": blas_info(backend)}
            json_path = json_path / results_filename(meta, args.config)
        check_writable_file(json_path)
    given = [f"--{name} {getattr(args, name)}" for name in ("steps", "warmup")]
    given = [flag for flag in given if not flag.endswith(" None")]
    if args.quick and given:
        raise ValueError(
            f"--quick times 2 steps after 1 warm-up step, so {' and '.join(given)} would be "
            "ignored; give --quick or the counts"
        )
    steps, warmup = (2, 1) if args.quick else (10, 2)
    steps = args.steps if args.steps is not None else steps
    warmup = args.warmup if args.warmup is not None else warmup
    results = run_benchmark(
        configs=args.config,
        device=args.device,
        seed=args.seed,
        steps=steps,
        warmup=warmup,
        busy=args.busy,
        use_torch=not args.no_torch,
        quick=args.quick,
        log=lambda message: print(f"[bench] {message}", file=sys.stderr, flush=True),
    )
    print(format_results(results))
    if json_path is not None:
        save_json(json_path, results)
        print(f"results written to {json_path}")
    return 0
