"""minilora demo end to end: the claims it prints are checked here, not just its exit code."""

import re
from pathlib import Path

import pytest

from minilora.cli.main import main


def run_demo(capsys, tmp_path, steps):
    code = main(["demo", "--quiet", "--steps", str(steps), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def result_row(out, label):
    """(val loss, char acc, exact) from the demo's results table."""
    line = next(line for line in out.splitlines() if line.startswith(label))
    loss, char, exact = re.findall(r"[\d.]+%?", line[len(label) :])[:3]
    return float(loss), float(char.rstrip("%")) / 100, float(exact.rstrip("%")) / 100


def test_demo_quick_mode_shows_the_invariants(capsys, tmp_path):
    """A 5-step demo: B = 0, logits unchanged at init, merged == unmerged, adapter saved."""
    out = run_demo(capsys, tmp_path, steps=5)
    assert "all zero = True" in out
    assert "max |logits(adapted) - logits(base)| = 0\n" in out
    assert result_row(out, "LoRA merged into W") == result_row(out, "LoRA  ")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_demo_lora_learns_the_new_rule(capsys, tmp_path):
    """The full demo (300 steps, ~50 s on 2 cores): LoRA solves 'shift', the base cannot."""
    out = run_demo(capsys, tmp_path, steps=300)
    _, _, base_exact = result_row(out, "base (frozen)")
    _, lora_char, lora_exact = result_row(out, "LoRA  ")
    assert base_exact <= 0.05
    assert lora_exact >= 0.9 and lora_char >= 0.95
    # Where the footer says the README's NumPy, OpenBLAS, kernel and thread count, section 5
    # must be the README's block to the last digit (it went stale once when GELU changed).
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    footer = next(line for line in readme.splitlines() if line.startswith("Computed with NumPy"))
    if footer in out.splitlines():
        block = readme.split("== 5. Results on 256 held-out words\n")[1].split("\n...")[0]
        assert block in out, f"README's section 5 is stale; this run printed:\n{out}"


def test_demo_footer_names_the_blas_kernel_and_threads(capsys, tmp_path):
    """Section 5's digits depend on the BLAS kernel and thread count: the footer says which."""
    from threadpoolctl import threadpool_info

    code = main(["demo", "--quiet", "--steps", "2", "--threads", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    blas = next((i for i in threadpool_info() if i.get("user_api") == "blas"), {})
    kernel = blas.get("architecture")  # OpenBLAS says; MKL does not
    if kernel is None:
        pytest.skip("the BLAS library does not name its kernel")
    assert f" {kernel} kernel, 1 thread; another BLAS kernel" in out
