"""The command line: real runs on tiny settings, and one-line errors with status 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from minilora.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_params_json_reproduces_the_lora_paper(capsys):
    """GPT-3 175B, r = 4 on q, v: ~18.9M trainable, ~10,000x fewer, checkpoint ~tens of MB."""
    code, out, _ = run(capsys, "params", "--preset", "gpt3-175b", "--rank", "4", "--json")
    assert code == 0
    table = json.loads(out)
    assert table["trainable"] == 18_874_368
    assert 170e9 < table["total"] < 180e9
    assert 9_000 < table["total"] / table["trainable"] < 10_000
    assert 300e9 < table["full"]["memory"]["checkpoint"] < 400e9
    assert 10e6 < table["lora"]["memory"]["checkpoint"] < 100e6
    for rank, expected in ((1, 4_718_592), (8, 37_748_736)):
        _, out, _ = run(capsys, "params", "--preset", "gpt3-175b", "--rank", str(rank), "--json")
        assert json.loads(out)["trainable"] == expected


def test_params_table_is_readable(capsys):
    """Without --json a table comparing full fine-tuning and LoRA is printed."""
    code, out, _ = run(capsys, "params", "--preset", "small")
    assert code == 0 and "LoRA" in out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["params", "--preset", "gpt5"], "gpt5"),
        (["params", "--rank", "0"], "r"),
        (["params", "--targets", "q,wte"], "wte"),
        (["finetune", "--base", "/nonexistent/base"], "does not exist"),
        (["finetune", "--text", "/nonexistent.txt", "--steps", "1"], "nonexistent"),
        (["finetune", "--rank", "-1", "--steps", "1"], "r=-1"),
        (["finetune", "--targets", "ln_1", "--steps", "1"], "layer norms"),
        (["finetune", "--task", "nope", "--steps", "1"], "nope"),
        (["generate", "--adapter", "/nonexistent/adapter"], "does not exist"),
        (["generate", "--prompt", "caf\u00e9>"], "'\u00e9'"),
        (["generate", "--temperature", "0"], "temperature"),
        (["pretrain", "--preset", "huge"], "huge"),
        (["pretrain", "--steps", "abc"], "invalid int"),
        (["demo", "--device", "tpu"], "tpu"),
        (["nosuchcommand"], "nosuchcommand"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, match):
    """Every bad argument or file: status 2, one line on stderr naming it, no traceback."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    _, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    import re

    assert re.search(match, lines[0]), lines[0]


def test_gpu_without_cupy_is_one_line(capsys):
    """--device gpu on a machine without CuPy: one line saying how to install it."""
    from minilora.basics.backend import gpu_available

    if gpu_available()[0]:
        pytest.skip("a GPU is available here")
    code, _, err = run(capsys, "generate", "--device", "gpu", "--max-new-tokens", "1")
    assert code == 2 and "pip install" in err and len(err.strip().splitlines()) == 1


def test_finetune_then_generate_with_adapter(capsys, tmp_path):
    """A short LoRA run writes an adapter that generate can load and merge."""
    code, out, _ = run(
        capsys,
        "finetune",
        "--steps",
        "3",
        "--eval-every",
        "0",
        "--quiet",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path),
        "--rank",
        "2",
    )
    assert code == 0, out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    code, out, _ = run(
        capsys,
        "generate",
        "--adapter",
        str(tmp_path / "adapter"),
        "--merge",
        "--greedy",
        "--prompt",
        "shift abc>",
        "--max-new-tokens",
        "4",
    )
    assert code == 0 and out.startswith("shift abc>")


def test_gradcheck_command_passes(capsys):
    """minilora gradcheck prints every row below 1e-6 and exits 0."""
    code, out, _ = run(capsys, "gradcheck")
    assert code == 0
    assert "FAIL" not in out and "checks below 1e-6" in out


def test_python_dash_m_entry_point():
    """python -m minilora works like the console script."""
    result = subprocess.run(
        [sys.executable, "-m", "minilora", "params", "--preset", "tiny", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    assert json.loads(result.stdout)["preset"] == "tiny"


# ---- the command line: help, version, derived sizes, the demo's folder
def _options(parser):
    """(command, option, action) of every option of every command."""
    import argparse

    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                yield name, action.option_strings[-1], action


def test_version(capsys):
    from minilora.basics.version import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"minilora {__version__}"


def test_every_option_that_takes_a_value_says_its_default():
    """A flag is off unless given; every option that takes a value names its default."""
    from minilora.cli.main import build_parser

    missing = [
        f"{command} {option}"
        for command, option, action in _options(build_parser())
        if action.nargs != 0 and "default" not in (action.help or "")
    ]
    assert not missing


def test_demo_help_gives_the_readmes_duration():
    """The help says how long the demo takes in the README's words (it once said "about a
    minute" while the README said "about 20 s")."""
    from minilora.cli.main import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    story = "the whole LoRA story in "
    duration = next(line for line in readme.splitlines() if story in line).split(story)[1]
    help_text = build_parser().format_help()
    demo_line = next(line for line in help_text.splitlines() if line.strip().startswith("demo"))
    assert duration in demo_line, (duration, demo_line)


def _train_record(out):
    (ckpt,) = sorted((out / "train").glob("ckpt-*"))
    return json.loads((ckpt / "trainer.json").read_text())


def test_pretrain_tiny_on_the_builtin_corpus_raises_its_block_size_and_says_so(capsys, tmp_path):
    """The tiny preset's block size (16) is shorter than the corpus's longest example:
    it is raised to what fits, and said; --eval-size sets the validation batch."""
    argv = ["pretrain", "--preset", "tiny", "--out", str(tmp_path), "--eval-size", "8"]
    code, out, err = run(capsys, *argv, "--steps", "1", "--batch-size", "2", "--quiet")
    assert code == 0, err
    assert "too short for the pretrain task's longest example" in out
    record = _train_record(tmp_path)
    assert record["train_config"]["eval_size"] == 8
    assert record["settings"]["config"]["block_size"] > 16


def test_finetune_warmup_default_is_shortened_to_a_short_run(capsys, tmp_path):
    """The default warm-up (20) would keep a 3-step run near zero learning rate."""
    argv = ["finetune", "--out", str(tmp_path), "--steps", "3", "--batch-size", "2"]
    code, _, err = run(capsys, *argv, "--eval-every", "0", "--quiet", "--threads", "1")
    assert code == 0, err
    record = _train_record(tmp_path)
    assert record["train_config"]["warmup"] == 3
    assert record["settings"]["blas_threads"] == 1


def test_demo_replaces_its_own_output_and_another_run_only_with_overwrite(capsys, tmp_path):
    """The README's `minilora demo` twice works; over a finetune run it needs --overwrite,
    which then removes that run's checkpoints and metrics and replaces its adapter."""
    demo = ["demo", "--steps", "1", "--quiet", "--threads", "1"]
    for _ in range(2):
        code, _, err = run(capsys, *demo, "--out", str(tmp_path / "demo"))
        assert code == 0, err
    assert (tmp_path / "demo" / "demo.json").is_file()
    ft = tmp_path / "ft"
    argv = ["finetune", "--out", str(ft), "--steps", "1", "--batch-size", "2", "--quiet"]
    code, _, err = run(capsys, *argv, "--eval-every", "0", "--threads", "1")
    assert code == 0, err
    code, _, err = run(capsys, *demo, "--out", str(ft), "--overwrite")
    assert code == 0, err
    assert not any((ft / "train").iterdir())  # the run's entries removed, by name
    assert (ft / "adapter" / "adapter_model.safetensors").exists() and (ft / "demo.json").exists()


def test_a_model_that_overflows_is_one_error_not_warnings():
    """The forwards outside a training step (the thread timing, validation) run under the
    step's floating-point rules: an overflow is an error, never a RuntimeWarning."""
    import warnings

    import minilora as ml
    from minilora.training.data import ShiftTask
    from minilora.training.train import TrainConfig, Trainer, TrainingDiverged

    model = ml.GPT(ml.GPTConfig(vocab_size=96, block_size=24, n_layer=1, n_head=2, d_model=16))
    model.params["ln_f.bias"][...] = 3e38
    cfg = TrainConfig(steps=2, batch_size=2, block_size=24, eval_every=0, eval_size=4)
    for threads in ("auto", None):
        trainer = Trainer(model, ShiftTask(), cfg, progress=False, threads=threads)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(TrainingDiverged, match="overflow"):
                trainer.validate() if threads is None else trainer.run()
