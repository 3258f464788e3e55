"""The grader is itself tested: every reference passes, planted mistakes fail with the
hint they should earn, stubs and crashes are reported (not raised), and the command line
gives status 0, 1 or a one-line error with 2."""

import math
import runpy
from pathlib import Path

import numpy as np
import pytest
from conftest import random_model

import minilora as ml
from minilora.cli.main import main
from minilora.lab.exercises import family as D
from minilora.lab.exercises import file_format as F
from minilora.lab.exercises import gpt2_layout as G
from minilora.lab.exercises import many_adapters as M
from minilora.lab.exercises import one_layer as O
from minilora.lab.exercises import quantization as Q
from minilora.lab.exercises import whole_model as W

SOLUTIONS = Path(__file__).resolve().parents[1] / "notebooks" / "solutions"
REFERENCE = {
    n: getattr(m, n) for m in (O, W, M, F, D, Q, G) for n in dir(m) if n in ml.exercises.names()
}


def _rows(a):
    return a.reshape(-1, a.shape[-1])


def _changed(fn, change):
    """fn's result with ``change`` applied to it: a planted mistake on the reference."""
    return lambda *args: change(fn(*args), *args)


def _lora_backward_dx_nan(dh, x, A, B, s, mask=None):
    dx, dA, dB = O.lora_backward(dh, x, A, B, s, mask)
    with np.errstate(invalid="ignore"):  # 0 / 0 where a unit was dropped: the planted NaN
        return (dx / mask if mask is not None else dx), dA, dB


def _lora_backward_by_hand(dx_mask):
    """A learner's lora_backward whose dx is multiplied by ``dx_mask(mask)``."""

    def lora_backward(dh, x, A, B, s, mask=None):
        xd = x if mask is None else x * mask
        u = xd @ A.T
        du = s * dh @ B
        dx = du @ A if mask is None else du @ A * dx_mask(mask)
        return dx, _rows(du).T @ _rows(xd), s * _rows(dh).T @ _rows(u)

    return lora_backward


# Each exercise's planted mistakes: (wrong solution, text its hint must contain).
PLANTED = {
    "nf4_quantize": [
        (Q._one_absmax, "one absmax for the whole weight"),
        (Q._signed_max, "largest magnitude |w|"),
        (Q._uniform_levels, "not evenly spaced"),
        (Q._column_major, "row-major"),
        (lambda w, code: (Q.nf4_quantize(w, code)[0] + 1, Q.nf4_quantize(w, code)[1]), "idx"),
    ],
    "lora_forward": [
        (
            lambda x, A, B, s, mask=None: O.lora_forward(x, A, B, 1.0, mask),
            "off by exactly the scale s",
        ),
        (lambda x, A, B, s, mask=None: O.lora_forward(x, A, B, s, None), "mask is not applied"),
        (lambda x, A, B, s, mask=None: O.lora_forward(x, A, B, s, mask).T, "transposed: shape"),
        (
            lambda x, A, B, s, mask=None: O.lora_forward(
                x, A, B, s, None if mask is None else 1.0 * (mask > 0)
            ),
            "off by exactly 1/(1-p)",
        ),
    ],
    "lora_backward": [
        (
            _changed(O.lora_backward, lambda g, *a: (g[0], g[1] / a[4], g[2])),
            "dA: off by exactly the scale s",
        ),
        (
            _lora_backward_by_hand(lambda mask: 1.0),
            "dx: the dropout mask is applied on the forward but not on the backward",
        ),
        (
            _changed(O.lora_backward, lambda g, *a: (g[0], g[1].T, g[2])),
            "dA: transposed: shape",
        ),
        (_lora_backward_by_hand(lambda mask: mask > 0), "dx: off by exactly 1/(1-p)"),
        (_lora_backward_dx_nan, "dx contains NaN"),
        (
            lambda dh, x, A, B, s, mask=None: O.lora_backward(dh, x, A, B, s, mask)[1:],
            "returned a tuple of 2",
        ),
    ],
    "inverted_dropout": [
        (lambda x, keep, p: x * keep, "off by exactly 1/(1-p)"),
        (lambda x, keep, p: x * keep / p, "not 1/p"),
        (lambda x, keep, p: x * ~keep / (1 - p), "zeroes the survivors"),
        (lambda x, keep, p: x * keep * (1 - p), "multiplied by (1 - p)"),
    ],
    "dropout_backward": [
        (lambda dy, keep, p: dy, "applied on the forward but not on the backward"),
        (lambda dy, keep, p: dy * keep, "off by exactly 1/(1-p)"),
        (lambda dy, keep, p: dy * keep / p, "not 1/p"),
    ],
    "lora_scale": [
        (lambda alpha, r, rslora: alpha / r, "rsLoRA divides by sqrt(r)"),
        (lambda alpha, r, rslora: alpha / math.sqrt(r), "plain LoRA divides by r"),
        (lambda alpha, r, rslora: r / alpha, "upside down"),
    ],
    "lora_parameter_count": [
        (lambda n, d, r, t: n * len(t) * d * d, "frozen matrices"),
        (lambda n, d, r, t: n * len(t) * 2 * r * d, "5d, not 2d"),
        (lambda n, d, r, t: W.lora_parameter_count(1, d, r, t), "that is one block"),
        (lambda n, d, r, t: W._count(n, d, r, t, lambda r, i, o: r * i), "counts only A"),
    ],
    "training_memory": [
        (lambda c, r, t, b: W._memory(c, r, t, b, grads_all=True), "trainable parameters only"),
        (lambda c, r, t, b: W._memory(c, r, t, b, adam=8), "not a fixed 8 bytes"),
        (lambda c, r, t, b: W._memory(c, r, t, b, adapters=False), "the adapters are stored too"),
        (lambda c, r, t, b: W._memory(c, r, t, b, acts=False), "activations are missing"),
    ],
    "frozen_linear_backward": [
        (lambda dy, W_: dy @ W_.T if W_.shape[0] == W_.shape[1] else dy @ W_, "not dy W^T"),
        (lambda dy, W_: (dy @ W_, _rows(dy).T @ _rows(dy)), "expected one value, dx"),
        (lambda dy, W_: -dy @ W_, "the sign is flipped"),
    ],
    "layer_norm_backward": [
        (
            lambda dy, x, w, eps=1e-5: W._ln_by_hand(dy, x, w, eps, mean_terms=0),
            "two mean terms are missing",
        ),
        (
            lambda dy, x, w, eps=1e-5: W._ln_by_hand(dy, x, w, eps, mean_terms=1),
            "path through the variance",
        ),
        (lambda dy, x, w, eps=1e-5: W._ln_by_hand(dy, x, w, eps, ddof=1), "biased one"),
        (lambda dy, x, w, eps=1e-5: W._ln_by_hand(dy, x, w, eps, dweight_on_x=True), "not by x"),
        (
            lambda dy, x, w, eps=1e-5: (W.layer_norm_backward(dy, x, w, eps)[0], dy * x, dy),
            "wrong shape",
        ),
    ],
    "softmax_backward": [
        (lambda dy, y: dy * y, "the term -y * sum(dy * y) is missing"),
        (lambda dy, y: dy * y * (1 - y), "only the diagonal"),
        (
            lambda dy, y: y * (dy - (dy * y).sum(axis=0, keepdims=True)),
            "the sum runs over the last axis",
        ),
    ],
    "attention_backward": [
        (
            lambda dy, q, k, v, H: W._attention_by_hand(dy, q, k, v, H, dv_transposed=False),
            "dv: dV = P^T dY",
        ),
        (
            lambda dy, q, k, v, H: W._attention_by_hand(dy, q, k, v, H, dk_transposed=False),
            "dk: dK = dS^T Q'",
        ),
        (
            _changed(
                W.attention_backward,
                lambda g, dy, q, k, v, H: (g[0] * math.sqrt(q.shape[-1] // H), g[1], g[2]),
            ),
            "dq: off by exactly 1/sqrt(hs)",
        ),
    ],
    "merge_unmerge": [
        (lambda W_, A, B, s: (W_ + s * B @ A, W_ + s * B @ A - s * B @ A), "not exact"),
        (lambda W_, A, B, s: (W_ + B @ A, W_.copy()), "off by exactly the scale s"),
        (lambda W_, A, B, s: ((W_ + s * B @ A).T, W_.copy()), "W_merged: transposed"),
    ],
    "cat_combination": [
        (lambda As, Bs, s, w: M.cat_combination(As, Bs, s, [1.0] * len(As)), "its weight w_i"),
        (lambda As, Bs, s, w: M.cat_combination(As, Bs, [1.0] * len(As), w), "its scale s_i"),
        (
            lambda As, Bs, s, w: (
                M.cat_combination(As, Bs, s, w)[0].T,
                M.cat_combination(As, Bs, s, w)[1],
            ),
            "A: transposed",
        ),
    ],
    "svd_combination": [
        (lambda *a: M._svd_wrong_error(*a, how="absolute"), "the error is relative"),
        (lambda *a: M._svd_wrong_error(*a, how="unsquared"), "adds squares"),
        (M._svd_smallest, "keep the r largest"),
        (
            lambda As, Bs, s, w, r: M.svd_combination(As, Bs, s, [1.0] * len(As), r),
            "its weight w_i",
        ),
    ],
    "subspace_similarity": [
        (lambda *a: M._phi_with(*a, divide=max), "divides by min(i, j)"),
        (lambda *a: M._phi_with(*a, norm_power=1), "is squared"),
        (lambda *a: M._phi_with(*a, shift=1), "off by one"),
    ],
    "safetensors_tensor": [
        (lambda d, n: F._read_with(d, n, skip="all"), "you read from byte 0"),
        (lambda d, n: F._read_with(d, n, skip="length"), "you left out the 8 length bytes"),
        (lambda d, n: F._read_with(d, n, skip="header"), "you left out the header"),
        (lambda d, n: F._read_with(d, n, order=">"), "you read them big-endian"),
        (lambda d, n: F.safetensors_tensor(d, n).astype(np.float64), "the dtype comes from"),
        (lambda d, n: F.safetensors_tensor(d, n).ravel(), "wrong shape"),
    ],
    "amplification_factor": [
        (lambda W_, dW, r: M._amplification_with(W_, dW, r, of_W=True), "not W's own"),
        (lambda W_, dW, r: M._amplification_with(W_, dW, r, inverse=True), "upside down"),
        (lambda W_, dW, r: M._amplification_with(W_, dW, r, k=min(W_.shape)), "only the top r"),
    ],
    "split_c_attn": [
        (G._no_transpose, "each column block must be transposed"),
        (G._rows, "cuts its rows instead"),
        (G._interleaved, "not interleaved"),
        (lambda W_, b: (*G.split_c_attn(W_, b)[:3], *G._interleaved(W_, b)[3:]), "not interleaved"),
        (
            lambda W_, b: tuple(G.split_c_attn(W_, b)[k] for k in (1, 0, 2, 4, 3, 5)),
            "q, k, v order",
        ),
    ],
    "dora_backward": [
        (lambda *a: D._wrong(*a, exact=True), "that is the exact gradient"),
        (lambda *a: D._wrong(*a, dm_by_n=False), "dm is missing its 1/n"),
        (lambda *a: D._wrong(*a, g_on_lora=False), "start from g ⊙ dh"),
        (  # the base term on the undropped x: PEFT's form recomputes it on D(x)
            lambda dh, x, W, A, B, m, s, mask=None: (
                D.dora_backward(dh, x, W, A, B, m, s, mask)[0]
                + (
                    0
                    if mask is None
                    else ((m / D.weight_norm(W, A, B, s) - 1) * dh) @ W * (1 - mask)
                ),
                *D.dora_backward(dh, x, W, A, B, m, s, mask)[1:],
            ),
            "dx",
        ),
    ],
}


def test_at_least_14_exercises_two_per_notebook_in_reading_order():
    names = ml.exercises.names()
    notebooks = [ml.exercises.get(n).notebook for n in names]
    assert len(names) >= 14 and notebooks == sorted(notebooks)
    assert all(notebooks.count(f"0{i}") >= 2 for i in range(1, 7))
    for name in names:  # each statement gives the signature the learner writes
        assert f"def {name}(" in ml.exercises.get(name).statement


@pytest.mark.parametrize("name", ml.exercises.names())
def test_the_reference_passes_its_checker(name):
    exercise = ml.exercises.get(name)
    assert exercise.reference is REFERENCE[name]
    result = ml.exercises.check(name, exercise.reference, verbose=False)
    assert result.passed, str(result)
    assert len(result.cases) >= 2 and not result.hints


def test_every_exercise_has_at_least_three_planted_mistakes():
    assert sorted(PLANTED) == sorted(ml.exercises.names())
    assert all(len(planted) >= 3 for planted in PLANTED.values())


@pytest.mark.parametrize(
    "name, wrong, hint",
    [(name, wrong, hint) for name, planted in PLANTED.items() for wrong, hint in planted],
)
def test_a_planted_mistake_fails_with_its_hint(name, wrong, hint):
    result = ml.exercises.check(name, wrong, verbose=False)
    assert not result.passed
    assert any(hint in h for h in result.hints), result.hints


def test_the_table_shows_each_case_error_and_verdict(capsys):
    result = ml.exercises.check("lora_backward", PLANTED["lora_backward"][0][0])
    out = capsys.readouterr().out
    assert "r=1, dropout 0.2" in out and "finite diff." in out
    assert "FAIL" in out and "ok" in out and "hint: dA: off by exactly the scale s" in out
    failed = [c for c in result.cases if not c.passed]
    assert {c.value for c in failed} == {"dA"} and all(c.error > 0.1 for c in failed)
    # the finite differences judge the learner's dA independently of the reference
    assert all(c.fd_error > 0.1 for c in failed if c.fd_error is not None)


def test_a_stub_is_not_implemented_yet_not_an_error(capsys):
    def lora_forward(x, A, B, s, mask=None):
        raise NotImplementedError("write the adapter branch here")

    result = ml.exercises.check("lora_forward", lora_forward)
    assert not result.passed and result.cases == []
    out = capsys.readouterr().out
    assert out.startswith("lora_forward: not implemented yet. Hint: u = D(x) @ A.T")


def test_an_exception_shows_the_learners_own_line(capsys):
    def softmax_backward(dy, y):
        total = (dy * y).sum(axis=-1, keepdims=True)
        return y * (dy - total[..., 0] @ y)  # the learner's bug

    result = ml.exercises.check("softmax_backward", softmax_backward)
    assert not result.passed
    line = softmax_backward.__code__.co_firstlineno + 2
    assert f'{__file__}", line {line}, in softmax_backward' in result.message
    assert "return y * (dy - total[..., 0] @ y)  # the learner's bug" in result.message
    assert result.message.startswith("error in your code: ValueError")
    assert "error in your code" in capsys.readouterr().out


def test_a_check_is_the_same_every_time():
    wrong = PLANTED["attention_backward"][2][0]
    first, second = (ml.exercises.check("attention_backward", wrong, verbose=False) for _ in "ab")
    assert [c.error for c in first.cases] == [c.error for c in second.cases]


def test_bad_arguments_to_check_are_errors():
    with pytest.raises(ValueError, match="exercise='nope' is not known; allowed: lora_forward"):
        ml.exercises.check("nope", print)
    with pytest.raises(TypeError, match="the function you wrote"):
        ml.exercises.check("lora_forward", "x @ A.T")


# ------------------------------------------------- the references agree with the library
def test_the_combination_references_equal_combine_adapters():
    model = ml.GPT(ml.GPTConfig(vocab_size=11, block_size=4, n_layer=1, n_head=2, d_model=8))
    rng = np.random.default_rng(0)
    for name, r, alpha in (("one", 2, 3.0), ("two", 3, 12.0)):
        ml.add_adapter(model, ml.LoraConfig(r=r, alpha=alpha, target_modules=("q",)), name=name)
        model.params[f"h.0.attn.q.lora_B.{name}"][...] = rng.standard_normal((8, r))
    ml.combine_adapters(model, ["one", "two"], [0.5, -2.0], "cat", method="cat")
    errors = ml.combine_adapters(model, ["one", "two"], [0.5, -2.0], "svd", method="svd", r=2)
    As = [model.params[f"h.0.attn.q.lora_A.{n}"].astype(np.float64) for n in ("one", "two")]
    Bs = [model.params[f"h.0.attn.q.lora_B.{n}"].astype(np.float64) for n in ("one", "two")]
    A, B = M.cat_combination(As, Bs, [1.5, 4.0], [0.5, -2.0])
    lib = {n: [model.params[f"h.0.attn.q.lora_{f}.{n}"] for f in "AB"] for n in ("cat", "svd")}
    np.testing.assert_allclose(A, lib["cat"][0], rtol=1e-6)
    np.testing.assert_allclose(B, lib["cat"][1], rtol=1e-6)
    A, B, error = M.svd_combination(As, Bs, [1.5, 4.0], [0.5, -2.0], 2)
    np.testing.assert_allclose(B @ A, lib["svd"][1] @ lib["svd"][0], rtol=1e-5, atol=1e-6)
    assert error == pytest.approx(errors["h.0.attn.q"], rel=1e-5)


def test_phi_equals_the_experiments_subspace_similarity():
    from minilora.lab.experiments import _phi

    rng = np.random.default_rng(1)
    A1, A2 = rng.standard_normal((4, 16)), rng.standard_normal((8, 16))
    grid = _phi(A1, A2)
    for i, j in ((1, 1), (2, 5), (4, 8)):
        assert M.subspace_similarity(A1, A2, i, j) == pytest.approx(grid[i - 1, j - 1], rel=1e-12)


def test_safetensors_tensor_reads_what_the_library_reads():
    import safetensors.numpy

    cases = ml.exercises.get("safetensors_tensor").cases(np.random.default_rng(0))
    for case in cases:
        data, name = case.args["data"], case.args["name"]
        expected = safetensors.numpy.load(data)[name]
        got = F.safetensors_tensor(data, name)
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes()
    assert len({case.args["name"] for case in cases}) == len(cases)


def test_split_c_attn_splits_as_load_gpt2_does(tmp_path):
    """The reference on a GPT-2 file the library wrote gives load_gpt2's q, k, v."""
    from minilora.files.io import load_safetensors

    config = ml.GPTConfig(vocab_size=11, block_size=4, n_layer=2, n_head=2, d_model=6)
    ml.save_model(random_model(config, seed=3, dtype="float32"), tmp_path, format="hf")
    tensors, _ = load_safetensors(tmp_path / "model.safetensors")
    loaded = ml.load_gpt2(tmp_path)
    for i in range(2):
        c = f"transformer.h.{i}.attn.c_attn"
        parts = G.split_c_attn(tensors[f"{c}.weight"], tensors[f"{c}.bias"])
        for j, t in enumerate("qkv"):
            np.testing.assert_array_equal(parts[j], loaded.params[f"h.{i}.attn.{t}.weight"])
            np.testing.assert_array_equal(parts[3 + j], loaded.params[f"h.{i}.attn.{t}.bias"])


# ------------------------------------------------------------------- worked solutions
@pytest.mark.parametrize("path", sorted(SOLUTIONS.glob("*.py")), ids=lambda p: p.stem)
def test_the_worked_solutions_pass(path):
    functions = runpy.run_path(str(path))
    mine = [n for n in ml.exercises.names() if n in functions]
    assert mine, f"{path.name} solves no exercise"
    for name in mine:
        assert ml.exercises.check(name, functions[name], verbose=False).passed, name


def test_every_exercise_has_a_worked_solution():
    solved = {n for p in SOLUTIONS.glob("*.py") for n in runpy.run_path(str(p))}
    assert set(ml.exercises.names()) <= solved
    for name in ml.exercises.names():  # in the solutions file of its notebook
        [path] = SOLUTIONS.glob(f"{ml.exercises.get(name).notebook}_*.py")
        assert f"def {name}(" in path.read_text()


# ---------------------------------------------------------------------- command line
def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_lists_the_exercises_in_reading_order(capsys):
    code, out, err = run(capsys, "exercises", "list")
    assert code == 0 and not err
    rows = out.splitlines()
    assert [row.split()[1] for row in rows] == ml.exercises.names()
    assert rows[0].startswith("01  lora_forward ")
    assert rows[-1].startswith(ml.exercises.get(ml.exercises.names()[-1]).notebook + "  ")


def test_cli_check_passes_a_solution_and_fails_a_wrong_one(capsys, tmp_path):
    solution = SOLUTIONS / "01_lora_in_one_layer.py"
    code, out, _ = run(capsys, "exercises", "check", "lora_backward", "--file", str(solution))
    assert code == 0 and "lora_backward: passed" in out
    wrong = tmp_path / "mine.py"
    wrong.write_text("def lora_scale(alpha, r, rslora):\n    return alpha / r\n")
    code, out, _ = run(capsys, "exercises", "check", "lora_scale", "--file", str(wrong))
    assert code == 1 and "FAILED" in out and "rsLoRA divides by sqrt(r)" in out


def test_cli_shows_the_line_of_an_exception_in_the_file(capsys, tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("def softmax_backward(dy, y):\n    return dy @ y\n")
    code, out, _ = run(capsys, "exercises", "check", "softmax_backward", "--file", str(path))
    assert code == 1
    assert f'File "{path}", line 2, in softmax_backward\n    return dy @ y' in out


def test_cli_stub_is_not_implemented_yet(capsys, tmp_path):
    path = tmp_path / "stub.py"
    path.write_text("def merge_unmerge(W, A, B, s):\n    raise NotImplementedError\n")
    code, out, _ = run(capsys, "exercises", "check", "merge_unmerge", "--file", str(path))
    assert code == 1 and "not implemented yet" in out


@pytest.mark.parametrize(
    "argv, files, match",
    [
        (["check", "lora_forward", "--file", "missing.py"], {}, "'missing.py' does not exist"),
        (
            ["check", "lora_forward", "--file", "f.py"],
            {"f.py": "x = 1\n"},
            "no function 'lora_forward'",
        ),
        (["check", "nope", "--file", "f.py"], {"f.py": "x = 1\n"}, "exercise='nope' is not known"),
        (["check", "lora_forward", "--file", "f.py"], {"f.py": "def (\n"}, "SyntaxError at line 1"),
        (
            ["check", "lora_forward", "--file", "f.py"],
            {"f.py": "\n1 / 0\n"},
            "ZeroDivisionError at line 2",
        ),
        (["check", "lora_forward"], {}, "check NAME --file FILE"),
        (["list", "lora_forward"], {}, "list takes no NAME"),
        (["grade"], {}, "invalid choice: 'grade'"),  # argparse's own error: SystemExit(2)
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(capsys, tmp_path, monkeypatch, argv, files, match):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    try:
        code, out, err = run(capsys, "exercises", *argv)
    except SystemExit as exit_:  # argparse's errors exit from inside parse_args
        code, (out, err) = exit_.code, capsys.readouterr()
    assert code == 2 and not out
    assert err.startswith("minilora exercises: error: ") and err.count("\n") == 1
    assert match in err
