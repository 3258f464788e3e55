"""``minilora demo``: the whole LoRA story in 20 to 70 s on 2 cores.

1. a pretrained base that knows copy / rev / upper, and fails a new rule;
2. add LoRA: A Gaussian, B = 0, so the logits do not move (checked, not assumed);
3. what is trainable: full fine-tuning vs LoRA, parameters and memory;
4. fine-tune only A and B;
5. base vs LoRA vs merged (identical to unmerged), then unmerge;
6. samples before and after, and the adapter file next to the base checkpoint.

Every argument, and whether --out can take the adapter, is checked before section 1.
"""

from __future__ import annotations

import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from minilora.basics.backend import to_host
from minilora.basics.blas import describe as describe_threads
from minilora.basics.blas import summary as blas_summary
from minilora.basics.version import __version__
from minilora.core import params
from minilora.core.adapters import (
    adapter_modules,
    add_adapter,
    check_rank,
    disable_adapters,
    merge,
    set_adapter,
    unmerge,
)
from minilora.core.lora import LoraConfig, delta_weight, gaussian_std
from minilora.files import checkpoints
from minilora.files.checkpoints import BUILTIN_BASE, load_base
from minilora.files.io import save_json
from minilora.training.data import get_task
from minilora.training.schedule import LORA_LR
from minilora.training.train import TrainConfig, Trainer, evaluate

BATCH_SIZE = 64
WARMUP = 10  # steps, or all of them in a shorter demo
DEMO_RECORD = "demo.json"
"""Written into --out with the adapter: it marks the folder as the demo's own output,
which a later demo replaces without --overwrite (a folder holding another command's
run is refused unless --overwrite is given)."""


class DemoPlan(NamedTuple):
    """What :func:`check_demo` checked: the base, its tokenizer, the task and configs."""

    model: Any
    tokenizer: Any
    task: Any
    lora: LoraConfig
    train: TrainConfig


def holds_only_demo_output(out: Path) -> bool:
    """True when ``out`` holds the demo's own earlier output and no other command's run."""
    return (out / DEMO_RECORD).is_file() and not any(
        (out / folder).exists() for folder in ("train", "model")
    )


def check_out_folder(out: Path) -> None:
    """--out must be a folder that can take files: made now, and tried with a temporary
    file, so that a bad --out fails before the demo instead of after its training."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is not a folder")
    out.mkdir(parents=True, exist_ok=True)  # an OSError names what could not be made
    with tempfile.TemporaryFile(dir=out):
        pass


def check_demo(args: Namespace) -> DemoPlan:
    """Every argument, checked before anything is printed: the LoRA config (its rank
    against the base's matrices too), the training config, and --out."""
    alpha = args.alpha if args.alpha is not None else 2.0 * args.rank
    lcfg = LoraConfig(r=args.rank, alpha=alpha, target_modules=("q", "k", "v", "o"))
    model, tokenizer = load_base(None, args.device)
    modules = adapter_modules(model, lcfg)
    check_rank(lcfg.r, {m: model.params[f"{m}.weight"].shape for m in modules})
    task = get_task(args.task, tokenizer=tokenizer)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=BATCH_SIZE,
        block_size=task.block_size,  # fits the longest example, "shift abcdefgh>bcdefghi."
        lr=LORA_LR,
        warmup=min(WARMUP, args.steps),
        eval_every=0,
        eval_size=256,
        seed=args.seed,
    )
    check_out_folder(Path(args.out))
    return DemoPlan(model, tokenizer, task, lcfg, cfg)


def _heading(text: str) -> None:
    print(f"\n== {text}")


def _greedy(model, tokenizer, prompt: str, n: int = 10) -> str:
    out = model.generate(tokenizer.encode(prompt)[None, :], n, greedy=True)
    text = tokenizer.decode(out[0, len(prompt) :])
    return text.split("\n")[0]


def run_demo(args: Namespace, plan: DemoPlan | None = None) -> int:
    """The demo; ``plan`` is :func:`check_demo`'s (checked here when not given)."""
    start = time.perf_counter()
    model, tokenizer, task, lcfg, cfg = plan or check_demo(args)
    block = cfg.block_size
    c = model.config
    _heading("1. The pretrained base")
    print(
        f"GPT: {c.n_layer} layers, {c.n_head} heads, d_model {c.d_model}, "
        f"vocab {c.vocab_size}, device {model.device}  ({BUILTIN_BASE.name})"
    )
    for prompt in ("copy lorax>", "rev lorax>", "upper lorax>"):
        print(f"  {prompt!r:18} -> {_greedy(model, tokenizer, prompt)!r}")
    probe = f"{args.task} lorax>"
    print(
        f"  {probe!r:18} -> {_greedy(model, tokenizer, probe)!r}   (new rule: {task.description})"
    )
    val = task.eval_batch(256, block, seed=args.seed)
    base_metrics = evaluate(model, val)
    base_logits = to_host(model.eval().forward(val.idx[:8]))  # eval mode: no dropout

    _heading("2. Add a LoRA adapter")
    add_adapter(model, lcfg, seed=args.seed)
    A = to_host(model.params["h.0.attn.q.lora_A.default"])
    B = to_host(model.params["h.0.attn.q.lora_B.default"])
    print(
        f"r={lcfg.r}, alpha={lcfg.alpha:g}, scale s = alpha/r = {lcfg.scale:g}, "
        f"targets {','.join(lcfg.target_modules)}"
    )
    print(
        f"A {A.shape}: mean {A.mean():+.4f}, std {A.std():.4f} (init N(0, (1/r)^2): "
        f"std {gaussian_std(lcfg.r):.4f})"
    )
    print(f"B {B.shape}: all zero = {not B.any()}  ->  ΔW = s B A = 0")
    diff = np.abs(to_host(model.forward(val.idx[:8])) - base_logits).max()
    print(f"max |logits(adapted) - logits(base)| = {diff:g}")

    _heading("3. What is trainable")
    count = params.count_parameters(model)
    base_total = count.total - count.trainable  # what full fine-tuning would train
    full = params.memory_estimate(_sizes(c), None, bytes_per_param=4)
    lora = params.memory_estimate(_sizes(c), lcfg.r, lcfg.target_modules, bytes_per_param=4)
    print(f"{'':24}{'full fine-tuning':>18}{'LoRA':>14}")
    print(f"{'trainable parameters':24}{base_total:>18,}{count.trainable:>14,}")
    for key in ("gradients", "optimizer", "checkpoint"):
        print(f"{key + ' (bytes)':24}{full[key]:>18,}{lora[key]:>14,}")
    print(
        f"LoRA trains {count.trainable / base_total:.2%} as many parameters as full "
        f"fine-tuning ({base_total / count.trainable:.0f}x fewer); W gets no gradient buffer"
    )

    _heading(f"4. Fine-tune A and B on '{args.task}' ({args.steps} steps)")
    trainer = Trainer(model, task, cfg, out_dir=None, progress=not args.quiet, threads=args.threads)
    t0 = time.perf_counter()
    trainer.run()
    train_seconds = time.perf_counter() - t0
    print(describe_threads(trainer.blas_threads, trainer.thread_choice, model.device))
    lora_metrics = evaluate(model, val)
    unmerged_logits = to_host(model.eval().forward(val.idx))  # the trainer left training mode
    W0 = to_host(model.params["h.0.attn.q.weight"]).copy()
    merge(model)
    merged_metrics = evaluate(model, val)
    merge_diff = np.abs(to_host(model.forward(val.idx)) - unmerged_logits).max()

    _heading("5. Results on 256 held-out words")
    print(f"{'':22}{'val loss':>10}{'char acc':>10}{'exact':>8}")
    for label, m in (
        ("base (frozen)", base_metrics),
        ("LoRA", lora_metrics),
        ("LoRA merged into W", merged_metrics),
    ):
        print(f"{label:22}{m['loss']:>10.4f}{m['char_acc']:>10.1%}{m['exact']:>8.1%}")
    print(f"merged vs unmerged: max |logit difference| = {merge_diff:.2e} (float32 rounding)")
    W_merged = to_host(model.params["h.0.attn.q.weight"])
    A, B = (model.params[f"h.0.attn.q.lora_{x}.default"] for x in "AB")
    subtracted = np.abs(W_merged - to_host(delta_weight(A, B, lcfg.scale)) - W0).max()
    unmerge(model)
    restored = np.abs(to_host(model.params["h.0.attn.q.weight"]) - W0).max()
    print(
        f"unmerge: max |W - W_before_merge| = {restored:.2e} (the saved W put back; "
        f"subtracting ΔW would leave {subtracted:.2e})"
    )

    _heading("6. Samples (greedy) and files")
    words = ("lorax", "adapt", "matrix")
    disable_adapters(model)
    before = [_greedy(model, tokenizer, f"{args.task} {w}>") for w in words]
    set_adapter(model, "default")
    for w, b in zip(words, before, strict=True):
        after = _greedy(model, tokenizer, f"{args.task} {w}>")
        prompt = f"{args.task} {w}>"
        print(f"  {prompt:16} base: {b!r:14} LoRA: {after!r}")
    out = Path(args.out)
    save_json(out / DEMO_RECORD, {"made_by": "minilora demo", "minilora_version": __version__})
    info = checkpoints.save_adapter(model, out / "adapter")
    base_bytes = (BUILTIN_BASE / checkpoints.MODEL_WEIGHTS).stat().st_size
    print(
        f"adapter: {info['weights']} + {Path(info['config']).name}: "
        f"{info['bytes'] / 1e3:.1f} kB  (base checkpoint {base_bytes / 1e6:.2f} MB, "
        f"{base_bytes / info['bytes']:.0f}x larger)"
    )
    print(
        f"\nfine-tuning took {train_seconds:.1f} s; the demo {time.perf_counter() - start:.1f} s."
    )
    # The BLAS kernel (chosen per CPU type) and the thread count set the float32 rounding,
    # and 300 steps amplify it: section 5 can be compared only with the same line here.
    where = "the GPU (CuPy)" if model.device == "gpu" else blas_summary(trainer.blas_threads)
    print(f"Computed with {where}; another BLAS kernel or thread count moves section 5.")
    print(
        f"Try: minilora generate --adapter {out / 'adapter'} --prompt '{args.task} hello>' --greedy"
    )
    return 0


def _sizes(c, batch_size: int = BATCH_SIZE) -> dict:
    """The model's sizes in params.py's terms (activation memory needs a batch size)."""
    return {**c.to_dict(), "batch_size": batch_size}
