"""``minilora ...`` and ``python -m minilora ...``.

Every command takes --device and --seed. Bad arguments, missing files and wrong
checkpoints print one line on stderr and exit with status 2; never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from minilora.basics.backend import DeviceUnavailableError
from minilora.basics.blas import check_threads
from minilora.basics.checks import non_negative_int
from minilora.basics.version import __version__
from minilora.lab.reference import CONFIGS as BENCH_CONFIGS
from minilora.training.schedule import LORA_LR

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line and exit 2 (argparse prints the usage too)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.split()[-1]  # "minilora" for the top-level parser itself
        prefix = "minilora" if command == "minilora" else f"minilora {command}"
        print(f"{prefix}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=("cpu", "gpu"),
        default=None,
        help="cpu (NumPy) or gpu (CuPy); default $MINILORA_DEVICE or cpu",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default 0)")


def _threads(p: argparse.ArgumentParser) -> None:
    def threads(text: str) -> str | int:
        if text == "auto":
            return text
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not 'auto' or an integer") from None

    p.add_argument(
        "--threads",
        type=threads,
        default="auto",
        help="BLAS threads while training: auto (measure 1 vs all cores, default) or N, "
        "at most the cores this process may use",
    )


def _base(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default=None, help="base model folder (default: the built-in base)")


# finetune's LoRA options default to None ("not given") so that --full can refuse them
# even when their value is the default one; commands.py fills in the defaults named here.
def _rank(p: argparse.ArgumentParser, alpha: bool, given: bool = False) -> None:
    default = None if given else 8
    p.add_argument("--rank", type=int, default=default, help="LoRA rank r (default 8)")
    if alpha:
        p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 r)")


def _targets(p: argparse.ArgumentParser, given: bool = False) -> None:
    p.add_argument(
        "--targets",
        default=None if given else "q,v",
        help="comma list of q,k,v,o,fc,proj (default q,v)",
    )


def _training(p: argparse.ArgumentParser, steps: int, batch: int, lr: float) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument(
        "--batch-size", type=int, default=batch, help=f"sequences per step (default {batch})"
    )
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,  # None: 20, or --steps when that is shorter; a longer one is refused
        help="warm-up steps, at most --steps (default 20, or --steps if fewer)",
    )
    p.add_argument(
        "--eval-size",
        type=int,
        default=256,
        help="examples (or text windows) in the validation batch (default 256)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=50,
        help="validate every N steps (default 50; 0: at the end)",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="save a resumable checkpoint every N steps (default 0 = at the end)",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace a previous run in OUT (default: refuse)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _threads(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="minilora",
        description="LoRA taught by building it: a hand-written GPT and LoRA on NumPy/CuPy.",
        formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"minilora {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "demo",
        help="the whole LoRA story in 20 to 70 s on 2 cores",
        formatter_class=_formatter,
        epilog="examples:\n  minilora demo\n  minilora demo --task rot --rank 2 --quiet",
    )
    _common(p)
    p.add_argument("--task", default="shift", choices=("shift", "rot"), help="(default shift)")
    _rank(p, alpha=True)
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    p.add_argument("--out", default="runs/demo", help="where the adapter goes (default runs/demo)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace another command's run in OUT (default: refuse; the demo's own "
        "earlier output is always replaced)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _threads(p)

    p = sub.add_parser(
        "pretrain",
        help="train a base model on a built-in task or a text file",
        formatter_class=_formatter,
        epilog="examples:\n"
        "  minilora pretrain --out runs/base\n"
        "  minilora pretrain --text my.txt --preset tiny --steps 500",
    )
    _common(p)
    p.add_argument(
        "--preset", default="small", help="model size: tiny small medium large (default small)"
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="context length T (default: the preset's, raised to the built-in corpus's "
        "longest example if that is longer)",
    )
    p.add_argument(
        "--text",
        default=None,
        help="a UTF-8 text file instead of the built-in corpus (default: the corpus)",
    )
    p.add_argument("--out", default="runs/base", help="output folder (default runs/base)")
    _training(p, steps=3000, batch=32, lr=3e-3)  # the built-in base's settings

    p = sub.add_parser(
        "finetune",
        help="LoRA (or full) fine-tuning of a base model",
        formatter_class=_formatter,
        epilog="examples:\n"
        "  minilora finetune --task shift --rank 8 --targets q,v\n"
        "  minilora finetune --task rot --full --lr 3e-4\n"
        "  minilora finetune --base runs/base/model --text my.txt\n"
        "  minilora finetune --base path/to/gpt2 --text my.txt --export peft",
    )
    _common(p)
    _base(p)
    p.add_argument(
        "--task", default=None, help="shift, rot or planted (default shift); not with --text"
    )
    p.add_argument(
        "--text", default=None, help="fine-tune on a UTF-8 text file instead (default: none)"
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="context length T of the training windows, at most the base's (default: the "
        "base's, or the task's longest example if shorter; a GPT-2's is 1024)",
    )
    p.add_argument(
        "--planted-rank",
        type=int,
        default=None,
        help="rank of the planted change, with --task planted only (default 4)",
    )
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    _rank(p, alpha=True, given=True)
    p.add_argument("--dropout", type=float, default=None, help="LoRA dropout (default 0)")
    _targets(p, given=True)
    p.add_argument("--init", default=None, help="gaussian, kaiming or pissa (default gaussian)")
    p.add_argument(
        "--rslora",
        action="store_const",
        const=True,
        default=None,
        help="scale by alpha/sqrt(r) (default: alpha/r)",
    )
    p.add_argument(
        "--dora",
        action="store_const",
        const=True,
        default=None,
        help="DoRA: a trainable magnitude per output feature beside A and B (default: off)",
    )
    p.add_argument(
        "--vera",
        action="store_const",
        const=True,
        default=None,
        help="VeRA: shared frozen random A and B, two trainable vectors per matrix (default: off)",
    )
    p.add_argument(
        "--loraplus-ratio",
        type=float,
        default=None,
        help="LoRA+: B (and DoRA's magnitude) learn at lr x this ratio, e.g. 16 (default: off)",
    )
    p.add_argument(
        "--quantize",
        default=None,
        help="nf4: store the base's linears in 4-bit NormalFloat, QLoRA (default: none)",
    )
    p.add_argument("--out", default="runs/finetune", help="output folder (default runs/finetune)")
    p.add_argument(
        "--export",
        default=None,
        help="adapter format: minilora, or peft (PEFT's, for a GPT-2 --base) (default minilora)",
    )
    _training(p, steps=300, batch=64, lr=LORA_LR)

    p = sub.add_parser(
        "generate",
        help="sample from a base model (+ adapters)",
        formatter_class=_formatter,
        epilog="examples:\n"
        "  minilora generate --prompt 'rev hello>'\n"
        "  minilora generate --adapter runs/finetune/adapter --prompt 'shift abc>'\n"
        "  minilora generate --adapter runs/finetune/adapter --merge --greedy\n"
        "  minilora generate --base path/to/gpt2 --adapter runs/finetune/adapter --prompt 'Hi'",
    )
    _common(p)
    _base(p)
    p.add_argument(
        "--adapter", action="append", default=[], help="adapter folder, repeatable (default: none)"
    )
    p.add_argument("--merge", action="store_true", help="merge the adapters into W first")
    p.add_argument(
        "--prompt", default="copy hello>", help="text to continue (default 'copy hello>')"
    )
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to add (default 40)")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="softmax temperature (default 1.0)"
    )
    p.add_argument(
        "--top-k", type=int, default=None, help="sample from the k most likely (default: all)"
    )
    p.add_argument("--greedy", action="store_true", help="always take the most likely token")

    p = sub.add_parser(
        "params",
        help="parameter and training-memory accounting",
        formatter_class=_formatter,
        epilog="examples:\n"
        "  minilora params --preset gpt3-175b --rank 4\n"
        "  minilora params --preset small --targets q,k,v,o --json\n"
        "  minilora params --preset small --quantize nf4",
    )
    _common(p)
    p.add_argument(
        "--preset", default="small", help="tiny small medium large gpt2 gpt3-175b (default small)"
    )
    _rank(p, alpha=False)
    _targets(p)
    p.add_argument(
        "--dora", action="store_true", help="count DoRA's magnitudes too (d_out per matrix)"
    )
    p.add_argument(
        "--quantize",
        default=None,
        help="nf4: add QLoRA (the base in 4 bits) and the paper's 65B figure (default: none)",
    )
    p.add_argument(
        "--vera", action="store_true", help="count VeRA's vectors instead (r + d_out per matrix)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    p = sub.add_parser(
        "gradcheck",
        help="check every backward against finite differences",
        formatter_class=_formatter,
        epilog="examples:\n  minilora gradcheck\n",
    )
    _common(p)

    p = sub.add_parser(
        "bench",
        help="speed and memory: LoRA vs full fine-tuning, minilora vs PyTorch",
        formatter_class=_formatter,
        epilog="examples:\n"
        "  minilora bench\n"
        "  minilora bench --config medium --json benchmarks/results-cpu.json\n"
        "  minilora bench --quick --no-torch\n"
        "  minilora bench --config gpt2        # GPT-2 small: LoRA vs transformers + PEFT",
    )
    _common(p)
    p.add_argument(
        "--config",
        action="append",
        choices=BENCH_CONFIGS,
        default=None,
        help="reference configuration, repeatable (default: small and medium on the cpu, "
        "large on the gpu; tiny with --quick); gpt2 only when named: a LoRA step of GPT-2 "
        "small (124M) against transformers + PEFT, minutes on 2 cores",
    )
    # None: not given, so that --quick can refuse them (the command fills in the defaults)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2)")
    p.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the results to PATH; a folder: to results-<device>-<kernel>.json in it, "
        "beside other machines' (default: print only)",
    )
    p.add_argument(
        "--busy", action="store_true", help="measure while a helper process keeps a core busy"
    )
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch comparison")
    p.add_argument(
        "--quick", action="store_true", help="a fast pass: tiny config, 2 steps, 1 warm-up"
    )

    p = sub.add_parser(
        "reproduce",
        help="run the LoRA paper's claims at toy scale; write a claims report",
        formatter_class=_formatter,
        epilog="examples:\n"
        "  minilora reproduce                # the full run, about 10 minutes on 2 cores\n"
        "  minilora reproduce --quick --out /tmp/claims",
    )
    _common(p)
    p.add_argument("--quick", action="store_true", help="fewer ranks, seeds and steps")
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default figures; with --quick runs/claims-quick, so that a "
        "quick run never replaces the committed report)",
    )

    p = sub.add_parser(
        "figures",
        help="regenerate every figure of figures/ and the data it was drawn from",
        formatter_class=_formatter,
        epilog="examples:\n"
        "  minilora figures                 # all ten, about 20 minutes on 2 cores\n"
        "  minilora figures --quick --out /tmp/figures\n"
        "  minilora figures --only rank_sweep --only alpha_sweep",
    )
    _common(p)
    p.add_argument("--quick", action="store_true", help="fewer steps, ranks and seeds")
    p.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="one figure, repeatable (default: all)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output folder (default figures; with --quick runs/figures-quick, so that a "
        "quick run never replaces the committed figures)",
    )
    p.add_argument(
        "--reuse", action="store_true", help="reuse OUT's saved records where settings match"
    )

    # exercises: list them, or grade a learner's file (handled by exercises_command)
    p = sub.add_parser(
        "exercises",
        help="list the notebooks' exercises, or check your solution to one",
        formatter_class=_formatter,
        epilog="examples:\n"
        "  minilora exercises list\n"
        "  minilora exercises check lora_backward --file my_solution.py\n\n"
        "The file must define a function named after the exercise: def lora_backward(...).\n"
        "Exit status: 0 the solution passes, 1 it fails, 2 bad input.",
    )
    p.add_argument("action", choices=("list", "check"), help="list, or check one exercise")
    p.add_argument("name", nargs="?", default=None, help="the exercise to check (see list)")
    p.add_argument(
        "--file",
        default=None,
        help="a Python file that defines def NAME(...) (no default: check needs it)",
    )
    return parser


def _check_common(args: argparse.Namespace) -> None:
    """The options every command shares, named as the user typed them."""
    non_negative_int("--seed", args.seed)
    if isinstance(getattr(args, "threads", None), int):  # a count, not "auto"
        check_threads("--threads", args.threads)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "exercises":  # runs the learner's code: errors are its own
        return exercises_command(args)
    from minilora.cli import commands

    try:
        _check_common(args)
        return commands.COMMANDS[args.command](args)
    except (ValueError, TypeError, DeviceUnavailableError) as err:
        print(f"minilora {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # e.g. an output folder that cannot be written
        print(f"minilora {args.command}: error: {err.strerror}: {err.filename}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"minilora {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def exercises_command(args: argparse.Namespace) -> int:
    """``minilora exercises list`` and ``minilora exercises check NAME --file FILE``.

    check executes FILE (the learner's Python) and grades its function NAME: status 0
    when it passes, 1 when it fails (the table and hints say why), 2 for bad input (a
    missing file, a file that does not load, no such function, an unknown exercise).
    """
    from minilora.lab import exercises

    try:
        if args.action == "list":
            if args.name is not None or args.file is not None:
                raise ValueError("list takes no NAME or --file")
            for name in exercises.names():
                exercise = exercises.get(name)
                print(f"{exercise.notebook}  {name:24} {exercise.summary}")
            return 0
        if args.name is None or args.file is None:
            raise ValueError("check needs an exercise and a file: check NAME --file FILE")
        exercises.get(args.name)  # an unknown name is bad input, before running any code
        fn = exercises.load_function(args.file, args.name)
    except ValueError as err:
        print(f"minilora exercises: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return 0 if exercises.check(args.name, fn).passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
