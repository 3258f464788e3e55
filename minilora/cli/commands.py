"""What each ``minilora`` command does (cli.py parses the arguments)."""

from __future__ import annotations

import json
import os
import sys
import time
from argparse import Namespace
from pathlib import Path
from typing import Any

from minilora.basics.blas import describe as describe_threads
from minilora.basics.checks import one_of
from minilora.cli.demo import run_demo
from minilora.core import params
from minilora.core.adapters import add_adapter, merge, set_adapter
from minilora.core.gradcheck import format_report
from minilora.core.lora import LoraConfig
from minilora.core.model import GPT, GPTConfig
from minilora.core.tokenizer import CharTokenizer
from minilora.files import checkpoints
from minilora.files.checkpoints import load_base
from minilora.files.io import check_writable_file, save_json
from minilora.lab.bench import run_benchmark
from minilora.lab.bench_report import format_results
from minilora.lab.gradcheck_report import full_report
from minilora.training.data import get_task
from minilora.training.planted import PlantedRankTask
from minilora.training.runfolder import RunFolder
from minilora.training.textfile import TextFileTask
from minilora.training.train import TrainConfig, Trainer

FINETUNE_TASKS = ("shift", "rot", "planted")
PRODUCT_FILES = {
    "adapter": (checkpoints.ADAPTER_CONFIG, checkpoints.ADAPTER_WEIGHTS),
    "model": (checkpoints.MODEL_CONFIG, checkpoints.MODEL_WEIGHTS),
}


def _targets(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _train_config(args: Namespace, block_size: int) -> TrainConfig:
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=block_size,
        lr=args.lr,
        warmup=args.warmup,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )


def _resolved(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _metrics(m: dict) -> str:
    """loss, accuracy per counted character, and rows with every counted character right."""
    return f"loss {m['loss']:.4f}, char acc {m['char_acc']:.1%}, exact {m['exact']:.1%}"


def _prepare_out(out: Path, resume: bool, overwrite: bool, products: tuple[str, ...]) -> None:
    """Refuse to mix a new run with a finished one in ``out``, or clear it (--overwrite).

    A run is its train/ folder (runfolder.py) and its products (model/, adapter/); with
    --overwrite only the files minilora names there are removed, nothing else.
    """
    if resume:
        return
    run = RunFolder(out / "train")
    files = [out / folder / name for folder in products for name in PRODUCT_FILES[folder]]
    if not (run.holds_a_run() or any(f.exists() for f in files)):
        return
    if not overwrite:
        raise ValueError(
            f"{out} holds a previous run; continue it with --resume, replace it with "
            "--overwrite, or choose another --out"
        )
    run.clear()
    for f in files:
        f.unlink(missing_ok=True)


def _task(name: str, text: str | None, tokenizer: CharTokenizer | None) -> Any:
    if text is not None:
        return TextFileTask(text, tokenizer=tokenizer)
    return get_task(name, tokenizer=tokenizer) if tokenizer is not None else get_task(name)


# ------------------------------------------------------------------------- pretrain
def pretrain(args: Namespace) -> int:
    task = _task("pretrain", args.text, None)
    tokenizer = task.tokenizer
    sizes = params.preset(args.preset)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size,
        block_size=sizes["block_size"],
        n_layer=sizes["n_layer"],
        n_head=sizes["n_head"],
        d_model=sizes["d_model"],
    )
    out = Path(args.out)
    _prepare_out(out, args.resume, args.overwrite, ("model",))
    model = GPT(config, seed=args.seed, device=args.device)
    settings = {"config": config.to_dict(), "task": task.name, "text": _resolved(args.text)}
    trainer = Trainer(
        model,
        task,
        _train_config(args, config.block_size),
        out / "train",
        progress=not args.quiet,
        settings=settings,
        threads=args.threads,
    )
    trainer.run(resume=args.resume)
    print(describe_threads(trainer.blas_threads, trainer.thread_choice, model.device))
    last = trainer.last_validation
    info = checkpoints.save_model(
        model,
        out / "model",
        extra={
            "tokenizer": tokenizer.to_dict(),
            "task": task.name,
            "command": "minilora " + " ".join(sys.argv[1:]),
            "val": last,
        },
    )
    print(f"validation: {_metrics(last)}")
    print(f"saved {info['weights']} ({info['bytes'] / 1e6:.2f} MB)")
    return 0


# ------------------------------------------------------------------------- finetune
def finetune(args: Namespace) -> int:
    if args.text is not None and args.task is not None:
        raise ValueError(
            f"--task {args.task} and --text {args.text} both given: --text fine-tunes on the "
            "file instead of a built-in task; give one of them"
        )
    one_of("--task", args.task or "shift", FINETUNE_TASKS)  # a text file comes with --text
    out = Path(args.out)
    _prepare_out(out, args.resume, args.overwrite, ("adapter", "model"))
    model, tokenizer = load_base(args.base, args.device)
    base = model.base_fingerprint()
    task_name = args.task or "shift"
    if task_name == "planted" and args.text is None:  # its teacher is this base + a rank-k ΔW
        task = PlantedRankTask(model, tokenizer, rank=args.planted_rank, seed=args.seed)
    else:
        task = _task(task_name, args.text, tokenizer)
    settings: dict[str, Any] = {"base": base, "task": task.name, "text": _resolved(args.text)}
    if task_name == "planted":
        settings["planted_rank"] = args.planted_rank
    if args.full:
        mode = "full"
        settings["mode"] = "full"
    else:
        alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
        lcfg = LoraConfig(
            r=args.rank,
            alpha=alpha,
            dropout=args.dropout,
            target_modules=_targets(args.targets),
            init=args.init,
            use_rslora=args.rslora,
        )
        add_adapter(model, lcfg, name="default", seed=args.seed)
        mode = f"LoRA r={lcfg.r} alpha={lcfg.alpha:g} on {','.join(lcfg.target_modules)}"
        settings.update(mode="lora", lora=lcfg.to_dict())
    block = min(model.config.block_size, getattr(task, "block_size", model.config.block_size))
    trainer = Trainer(
        model,
        task,
        _train_config(args, block),
        out / "train",
        progress=not args.quiet,
        settings=settings,
        threads=args.threads,
    )
    before = trainer.validate() if not args.resume else None
    trainer.run(resume=args.resume)
    print(describe_threads(trainer.blas_threads, trainer.thread_choice, model.device))
    after = trainer.last_validation
    print(f"{mode}: {len(model.trainable_names())} trainable tensors")
    if before:
        print(f"before: {_metrics(before)}")
    print(f"after:  {_metrics(after)}")
    if args.full:
        info = checkpoints.save_model(
            model, out / "model", extra={"tokenizer": tokenizer.to_dict()}
        )
    else:
        info = checkpoints.save_adapter(model, out / "adapter")
    print(f"saved {info['weights']} ({info['bytes'] / 1e3:.1f} kB)")
    return 0


# ------------------------------------------------------------------------- generate
def generate(args: Namespace) -> int:
    folders = [_resolved(a) for a in args.adapter]
    repeated = sorted({f for f in folders if folders.count(f) > 1})
    if repeated:
        raise ValueError(f"--adapter {repeated[0]} is given twice; each adapter can stack once")
    model, tokenizer = load_base(args.base, args.device)
    names = [checkpoints.load_adapter(model, a, name=f"a{i}") for i, a in enumerate(args.adapter)]
    if names:
        set_adapter(model, names)
    if args.merge:
        merge(model)
    prompt = tokenizer.encode(args.prompt)[None, :]
    out = model.generate(
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        greedy=args.greedy,
        seed=args.seed,
    )
    print(tokenizer.decode(out[0]))
    return 0


# --------------------------------------------------------------------------- params
def params_command(args: Namespace) -> int:
    if args.device == "gpu":  # say so rather than pretend: there are no arrays here
        print(
            "minilora params: note: arithmetic only; --device gpu changes nothing", file=sys.stderr
        )
    table = params.accounting_table(args.preset, r=args.rank, targets=_targets(args.targets))
    if args.json:
        json.dump(table, sys.stdout, indent=2)
        print()
    else:
        print(params.format_accounting(table))
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


def bench_command(args: Namespace) -> int:
    """``minilora bench``: measure, print the table, write --json if asked."""
    if args.json:  # before minutes of measuring: a path that cannot be written fails now
        check_writable_file(args.json)
    steps, warmup = args.steps, args.warmup
    if args.quick:
        steps, warmup = min(steps, 2), min(warmup, 1)
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
    if args.json:
        save_json(args.json, results)
        print(f"results written to {args.json}")
    return 0


def demo(args: Namespace) -> int:
    return run_demo(args)


COMMANDS = {
    "demo": demo,
    "pretrain": pretrain,
    "finetune": finetune,
    "generate": generate,
    "params": params_command,
    "gradcheck": gradcheck_command,
    "bench": bench_command,
    "figures": figures_command,
}
