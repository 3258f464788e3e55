"""What each ``minilora`` command does (cli/main.py parses the arguments)."""

from __future__ import annotations

import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

from minilora.basics.blas import describe as describe_threads
from minilora.basics.checks import one_of, positive_int, positive_real
from minilora.cli.demo import check_demo, holds_only_demo_output, run_demo
from minilora.cli.lab_commands import (
    bench_command,
    figures_command,
    gradcheck_command,
    params_command,
    parse_targets,
    reproduce_command,
)
from minilora.core import params
from minilora.core.adapters import add_adapter, merge, set_adapter
from minilora.core.lora import LoraConfig
from minilora.core.model import GPT, GPTConfig
from minilora.core.qlora import QUANTIZATIONS, quantize_base
from minilora.core.tokenizer import CharTokenizer
from minilora.files import checkpoints
from minilora.files.checkpoints import load_base
from minilora.files.gpt2 import GPT2Tokenizer, copy_tokenizer, is_gpt2_folder
from minilora.files.io import sha256_file
from minilora.training.data import get_task
from minilora.training.planted import PlantedRankTask
from minilora.training.runfolder import RunFolder
from minilora.training.textfile import TextFileTask
from minilora.training.train import TrainConfig, Trainer

FINETUNE_TASKS = ("shift", "rot", "planted")
WARMUP = 20  # steps, or all of them in a shorter run
LORA_DEFAULTS = {
    "rank": 8,
    "alpha": None,  # 2 r, worked out when the adapter is made
    "dropout": 0.0,
    "targets": "q,v",
    "init": "gaussian",
    "rslora": False,
    "dora": False,
    "vera": False,
}
"""finetune's LoRA options (None on the command line: not given) and their defaults."""
PRODUCT_FILES = {
    "adapter": (checkpoints.ADAPTER_CONFIG, checkpoints.ADAPTER_WEIGHTS),
    "model": (checkpoints.MODEL_CONFIG, checkpoints.MODEL_WEIGHTS),
}


def _train_config(args: Namespace, block_size: int) -> TrainConfig:
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=block_size,
        lr=args.lr,
        warmup=args.warmup,
        eval_every=args.eval_every,
        eval_size=args.eval_size,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        loraplus_lr_ratio=getattr(args, "loraplus_ratio", None),  # finetune only
    )


def _resolved(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _metrics(m: dict) -> str:
    """loss, accuracy per counted character, and rows with every counted character right."""
    return f"loss {m['loss']:.4f}, char acc {m['char_acc']:.1%}, exact {m['exact']:.1%}"


def _prepare_out(
    out: Path,
    resume: bool,
    overwrite: bool,
    products: tuple[str, ...],
    inputs: dict[str, str | None] | None = None,
) -> None:
    """Refuse to mix a new run with a finished one in ``out``, or clear it (--overwrite).

    A run is its train/ folder (runfolder.py) and its products (model/, adapter/); with
    --overwrite only the files minilora names there are removed, nothing else, and only
    when none of the run's ``inputs`` ({"--base": path, ...}) lies in what goes.
    Every check comes before anything is removed or written.
    """
    run = RunFolder(out / "train")
    run.check()  # no links, nothing of the user's under minilora's names
    for folder in products:
        _check_product(out / folder)
    if resume:
        return
    files = [out / folder / name for folder in products for name in PRODUCT_FILES[folder]]
    files = [f for f in files if f.exists()]
    if not (run.holds_a_run() or files):
        return
    if not overwrite:
        if run.holds_a_run():
            raise ValueError(run.previous_run(out))
        raise ValueError(
            f"{out} holds {files[0]} of a previous run (nothing to resume); replace it with "
            "--overwrite, or choose another --out"
        )
    doomed = [*run.removable(), *files]
    for flag, given in (inputs or {}).items():
        if given is None:
            continue
        path = Path(given).resolve()
        for entry in doomed:
            gone = entry.resolve()
            if gone == path:
                how = "is"
            elif path in gone.parents:
                how = "is in"
            elif gone in path.parents:
                how = "holds"
            else:
                continue
            raise ValueError(
                f"--overwrite would delete {entry}, which {how} {flag} {given}, an input of "
                "this run; choose another --out"
            )
    run.clear()
    for f in files:
        f.unlink()


def _check_product(folder: Path) -> None:
    """model/ or adapter/: a real folder whose files with our names are regular files."""
    if folder.is_symlink():
        raise ValueError(
            f"{folder} is a symbolic link; minilora writes its output only into a real folder"
        )
    for name in PRODUCT_FILES[folder.name]:
        file = folder / name
        if file.is_symlink() or (file.exists() and not file.is_file()):
            raise ValueError(
                f"{file} is not a regular file, where minilora writes its file {name}; "
                "move it away (or choose another --out)"
            )


def _text_settings(text: str | None) -> dict[str, str | None]:
    """A text file's path and content hash: a resume on an edited file is another run."""
    if text is None:
        return {"text": None}
    return {"text": _resolved(text), "text_sha256": sha256_file(text)}


def _check_run_options(args: Namespace) -> None:
    """What pretrain and finetune share: --resume and --overwrite exclude each other, and
    the warm-up fits in the run (an unset --warmup is shortened to --steps)."""
    if args.resume and args.overwrite:
        raise ValueError(
            "--resume continues the run in --out and --overwrite replaces it; give one of them"
        )
    if args.warmup is None:
        args.warmup = min(WARMUP, args.steps)
    elif args.warmup > args.steps > 0:
        raise ValueError(
            f"--warmup {args.warmup} is longer than --steps {args.steps}: the learning rate "
            f"would never reach --lr; allowed: --warmup 0..{args.steps}"
        )


EXPORTS = ("minilora", "peft")


def _check_finetune(args: Namespace) -> None:
    """Contradictions refused, then the defaults of the options left unset filled in."""
    _check_run_options(args)
    if args.text is not None and args.task is not None:
        raise ValueError(
            f"--task {args.task} and --text {args.text} both given: --text fine-tunes on the "
            "file instead of a built-in task; give one of them"
        )
    export = one_of("--export", "minilora" if args.export is None else args.export, EXPORTS)
    gpt2 = args.base is not None and is_gpt2_folder(args.base)
    if gpt2 and args.text is None:
        raise ValueError(
            f"--base {args.base} is a GPT-2 checkpoint: give your text with --text (the "
            "built-in tasks are character tasks, for the built-in base)"
        )
    if export == "peft" and (args.full or not gpt2):
        raise ValueError(
            "--export peft writes a LoRA adapter for a Hugging Face GPT-2: it needs a GPT-2 "
            "folder as --base" + (" and no --full" if args.full else f", not {args.base}")
        )
    if export == "peft" and (args.vera or (args.dora and args.quantize)):  # peft.py refuses
        what = (
            "--vera (PEFT's VeRA is another format)"
            if args.vera
            else ("--dora over a quantized base (its magnitudes are relative to the 4-bit W)")
        )
        raise ValueError(f"--export peft writes LoRA and DoRA adapters, not {what}")
    task = "shift" if args.task is None else args.task
    one_of("--task", task, FINETUNE_TASKS)  # a text file comes with --text
    if args.planted_rank is not None and (task != "planted" or args.text is not None):
        what = f"--text {args.text}" if args.text is not None else f"--task {task}"
        raise ValueError(f"--planted-rank is for --task planted only; this run has {what}")
    given = [f"--{name}" for name in LORA_DEFAULTS if getattr(args, name) is not None]
    if args.full and given:
        raise ValueError(
            f"--full fine-tunes every weight without an adapter, so {', '.join(given)} "
            "would be ignored; drop --full, or drop the LoRA options"
        )
    if args.loraplus_ratio is not None:
        positive_real("--loraplus-ratio", args.loraplus_ratio)
    if args.block_size is not None:
        positive_int("--block-size", args.block_size)
    if args.full and args.loraplus_ratio is not None:
        raise ValueError(
            "--loraplus-ratio sets B's learning rate apart from A's; --full fine-tunes "
            "without an adapter, so there is no B: drop --full, or drop --loraplus-ratio"
        )
    if args.quantize is not None:
        one_of("--quantize", args.quantize, QUANTIZATIONS)
        if args.full:
            raise ValueError(
                f"--quantize {args.quantize} stores the base in 4 bits, which cannot train: "
                "drop --full (QLoRA trains an adapter), or drop --quantize"
            )
        if args.init == "pissa":
            raise ValueError(f"--init pissa rewrites W, which --quantize {args.quantize} stores")
    for name, default in LORA_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.planted_rank is None:
        args.planted_rank = 4


def _pretrain_block_size(args: Namespace, preset_block: int, task: Any) -> int:
    """--block-size, or the preset's; the built-in corpus's validation examples must fit
    (a text file's windows fit any size), so a preset's shorter one is raised, and said."""
    needed = getattr(task, "block_size", 1)
    if args.block_size is not None:
        block = positive_int("--block-size", args.block_size)
        if block < needed:
            raise ValueError(
                f"--block-size {block} is too short for the {task.name} task: its longest "
                f"example needs {needed}"
            )
        return block
    if preset_block < needed:
        print(
            f"block size {needed}: the preset's {preset_block} is too short for the "
            f"{task.name} task's longest example (set it with --block-size)"
        )
        return needed
    return preset_block


def _finetune_block_size(args: Namespace, model_block: int, task: Any) -> int:
    """--block-size, or the model's context shortened to the task's longest example (a
    text file has none: a GPT-2 would train on windows of 1024 tokens, heavy on a CPU)."""
    needed = getattr(task, "block_size", None)
    if args.block_size is None:
        return min(model_block, needed or model_block)
    if args.block_size > model_block:
        raise ValueError(
            f"--block-size {args.block_size} is longer than the base model's context; "
            f"allowed: 1 .. {model_block}"
        )
    if needed is not None and args.block_size < needed:
        raise ValueError(
            f"--block-size {args.block_size} is too short for the {task.name} task: its "
            f"longest example needs {needed}"
        )
    return args.block_size


def _task(name: str, text: str | None, tokenizer: CharTokenizer | None) -> Any:
    if text is not None:
        return TextFileTask(text, tokenizer=tokenizer)
    return get_task(name, tokenizer=tokenizer) if tokenizer is not None else get_task(name)


# ------------------------------------------------------------------------- pretrain
def pretrain(args: Namespace) -> int:
    _check_run_options(args)
    task = _task("pretrain", args.text, None)
    tokenizer = task.tokenizer
    sizes = params.preset(args.preset)
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size,
        block_size=_pretrain_block_size(args, sizes["block_size"], task),
        n_layer=sizes["n_layer"],
        n_head=sizes["n_head"],
        d_model=sizes["d_model"],
    )
    out = Path(args.out)
    _prepare_out(out, args.resume, args.overwrite, ("model",), {"--text": args.text})
    model = GPT(config, seed=args.seed, device=args.device)
    settings = {"config": config.to_dict(), "task": task.name, **_text_settings(args.text)}
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
    _check_finetune(args)
    out = Path(args.out)
    inputs = {"--base": args.base, "--text": args.text}
    _prepare_out(out, args.resume, args.overwrite, ("adapter", "model"), inputs)
    model, tokenizer = load_base(args.base, args.device)
    base = model.base_fingerprint()
    task_name = args.task or "shift"
    if task_name == "planted" and args.text is None:  # its teacher is this base + a rank-k ΔW
        task = PlantedRankTask(model, tokenizer, rank=args.planted_rank, seed=args.seed)
    else:
        task = _task(task_name, args.text, tokenizer)
    settings: dict[str, Any] = {"base": base, "task": task.name, **_text_settings(args.text)}
    if task_name == "planted":
        settings["planted_rank"] = args.planted_rank
    if args.quantize is not None:  # QLoRA: the frozen base in 4 bits, the adapter on top
        quantize_base(model, args.quantize)
        settings["quantize"] = args.quantize
    if args.full:
        mode = "full"
        settings["mode"] = "full"
    else:
        alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
        lcfg = LoraConfig(
            r=args.rank,
            alpha=alpha,
            dropout=args.dropout,
            target_modules=parse_targets(args.targets),
            init=args.init,
            use_rslora=args.rslora,
            use_dora=args.dora,
            use_vera=args.vera,
        )
        add_adapter(model, lcfg, name="default", seed=args.seed)
        kind = "DoRA" if lcfg.use_dora else "VeRA" if lcfg.use_vera else "LoRA"
        scale = "" if lcfg.use_vera else f" alpha={lcfg.alpha:g}"  # VeRA has no scale
        mode = f"{kind} r={lcfg.r}{scale} on {','.join(lcfg.target_modules)}"
        mode += f" over an {args.quantize.upper()} base" if args.quantize else ""
        # the DoRA and VeRA fields only when on: a LoRA run started before they existed
        # resumes (VeRA's d_initial and seed go with it: its shared matrices come from them)
        off = {"use_dora", "dora_exact_grad", "use_vera", "vera_d_initial", "vera_seed"}
        vera = {"vera_d_initial", "vera_seed"} if lcfg.use_vera else set()
        lora = {k: v for k, v in lcfg.to_dict().items() if v or k not in off or k in vera}
        settings.update(mode="lora", lora=lora)
    block = _finetune_block_size(args, model.config.block_size, task)
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
    if args.full and isinstance(tokenizer, GPT2Tokenizer):  # a GPT-2 folder again
        info = checkpoints.save_model(model, out / "model", format="hf")
        copy_tokenizer(tokenizer, out / "model")
    elif args.full:
        info = checkpoints.save_model(
            model, out / "model", extra={"tokenizer": tokenizer.to_dict()}
        )
    else:
        info = checkpoints.save_adapter(model, out / "adapter", format=args.export or "minilora")
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


def demo(args: Namespace) -> int:
    """The same rule as every command: a folder holding another run is refused unless
    --overwrite; the demo's own earlier output is replaced (files are swapped atomically)."""
    plan = check_demo(args)  # every argument first: nothing printed or removed before
    out = Path(args.out)
    if not holds_only_demo_output(out):
        _prepare_out(out, resume=False, overwrite=args.overwrite, products=("adapter", "model"))
    return run_demo(args, plan)


COMMANDS = {
    "demo": demo,
    "pretrain": pretrain,
    "finetune": finetune,
    "generate": generate,
    "params": params_command,
    "gradcheck": gradcheck_command,
    "bench": bench_command,
    "figures": figures_command,
    "reproduce": reproduce_command,
}
