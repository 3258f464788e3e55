"""The command line: real runs on tiny settings, and one-line errors with status 2."""

import json
import subprocess
import sys

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
