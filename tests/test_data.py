"""Tests for the data of minilora.training (batches, data, textfile) and the tokenizer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from minilora.core.layers import IGNORE_INDEX
from minilora.core.tokenizer import DEFAULT_CHARS, CharTokenizer
from minilora.training.batches import (
    EVAL_SEED_OFFSET,
    Batch,
    Example,
    answer_accuracy,
    encode_examples,
    lm_windows,
)
from minilora.training.data import (
    TASKS,
    PretrainTask,
    RotTask,
    ShiftTask,
    get_task,
    is_heldout,
    rot_word,
    shift_word,
)
from minilora.training.textfile import TextFileTask

TOK = CharTokenizer.default()


# --------------------------------------------------------------------------- tokenizer


def test_default_vocabulary_has_96_symbols():
    assert len(DEFAULT_CHARS) == 96
    assert TOK.vocab_size == 96
    assert DEFAULT_CHARS[0] == "\n" and DEFAULT_CHARS[1] == " " and DEFAULT_CHARS[-1] == "~"


def test_encode_decode_round_trip():
    text = "copy abc>abc.\nHello, World! ~{}|"
    ids = TOK.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert TOK.decode(ids) == text
    assert TOK.decode(ids.tolist()) == text
    assert TOK.encode("").shape == (0,)
    assert TOK.decode([]) == ""


def test_unknown_characters_are_named():
    with pytest.raises(ValueError, match=r"'é'.*'\\t'|'\\t'.*'é'") as info:
        TOK.encode("caf\u00e9\tok")
    assert "2 character(s)" in str(info.value)
    assert "96" in str(info.value)


def test_unknown_characters_list_at_most_ten():
    text = "".join(chr(0x4E00 + i) for i in range(15))
    with pytest.raises(ValueError, match="and 5 more") as info:
        TOK.encode(text)
    assert str(info.value).count("'") == 20  # ten quoted characters


def test_decode_out_of_range():
    with pytest.raises(ValueError, match=r"\[96\].*0 \.\. 95"):
        TOK.decode([1, 96])
    with pytest.raises(ValueError, match="out of range"):
        TOK.decode(np.array([-1]))


def test_tokenizer_construction_errors():
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer("")
    with pytest.raises(ValueError, match="duplicate.*'a'"):
        CharTokenizer("abca")
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.from_text("")


def test_from_text_sorted_and_dict_round_trip():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == " dehlorw"
    d = json.loads(json.dumps(tok.to_dict()))
    assert CharTokenizer.from_dict(d) == tok
    assert tok != TOK
    assert CharTokenizer(DEFAULT_CHARS) == TOK
    with pytest.raises(ValueError, match="to_dict"):
        CharTokenizer.from_dict({"chars": "abc"})


# --------------------------------------------------------------------------- packing


def test_encode_examples_targets_only_on_answer_and_terminator():
    exs = [Example("rev ab>", "ba"), Example("copy xyz>", "xyz")]
    batch = encode_examples(TOK, exs, block_size=16)
    assert isinstance(batch, Batch)
    assert batch.idx.shape == batch.targets.shape == (2, 16)
    assert batch.idx.dtype == batch.targets.dtype == np.int64
    for b, (prompt, answer) in enumerate(exs):
        full = prompt + answer + "."
        # Left-aligned, padded with newlines.
        assert TOK.decode(batch.idx[b]) == (full + "\n" * 16)[:16]
        # Targets: ignore everywhere except the positions predicting answer + terminator.
        p, n = len(prompt), len(full)
        expected = np.full(16, IGNORE_INDEX)
        expected[p - 1 : n - 1] = TOK.encode(answer + ".")
        np.testing.assert_array_equal(batch.targets[b], expected)
        # Where a target exists, it is the next token of the row.
        row = TOK.encode(full + "\n" * 17)
        kept = batch.targets[b] != IGNORE_INDEX
        np.testing.assert_array_equal(batch.targets[b][kept], row[1:17][kept])


def test_encode_examples_fits_block_plus_one():
    ex = [Example("rev abc>", "cba")]  # 12 characters with the terminator
    batch = encode_examples(TOK, ex, block_size=11)  # the terminator is only a target
    assert TOK.decode([batch.targets[0, -1]]) == "."
    with pytest.raises(ValueError, match=r"12 characters.*prompt 8 \+ answer 3.*block_size=10"):
        encode_examples(TOK, ex, block_size=10)


def test_encode_examples_errors():
    with pytest.raises(ValueError, match="empty"):
        encode_examples(TOK, [], block_size=8)
    with pytest.raises(ValueError, match="empty prompt"):
        encode_examples(TOK, [Example("", "abc")], block_size=8)


# --------------------------------------------------------------------------- rules


def test_shift_rule():
    assert shift_word("abc") == "bcd"
    assert shift_word("xyz") == "yza"
    assert shift_word("zzz") == "aaa"
    for ex in ShiftTask().examples(50, seed=3):
        word = ex.prompt[len("shift ") : -1]
        assert ex.prompt == f"shift {word}>"
        assert len(ex.answer) == len(word)
        for a, b in zip(word, ex.answer, strict=True):
            assert (ord(a) - ord("a") + 1) % 26 == ord(b) - ord("a")


def test_rot_rule():
    assert rot_word("abcd") == "bcda"
    assert rot_word("abc") == "bca"
    for ex in RotTask().examples(50, seed=4):
        word = ex.prompt[len("rot ") : -1]
        assert ex.prompt == f"rot {word}>"
        assert ex.answer == word[1:] + word[0]


def test_word_lengths_and_letters():
    exs = ShiftTask(min_len=2, max_len=4).examples(300, seed=0, split="train")
    lengths = {len(e.answer) for e in exs}
    assert lengths == {2, 3, 4}
    assert all(re.fullmatch("[a-z]+", e.answer) for e in exs)
    with pytest.raises(ValueError, match="max_len=2 is below min_len=3"):
        ShiftTask(max_len=2)


def test_train_and_val_words_are_disjoint():
    task = RotTask()
    train = [e.prompt for e in task.examples(200, seed=0, split="train")]
    val = [e.prompt for e in task.examples(200, seed=0, split="val")]
    assert not any(is_heldout(p[len("rot ") : -1]) for p in train)
    assert all(is_heldout(p[len("rot ") : -1]) for p in val)


def test_corpus_lines_parse_into_three_ops():
    task = PretrainTask(corpus_chars=20_000)
    text = task.corpus_text()
    assert len(text) >= 20_000 and text.endswith("\n")
    counts = {"copy": 0, "rev": 0, "upper": 0}
    for line in text.splitlines():
        m = re.fullmatch(r"(copy|rev|upper) ([a-z]{3,8})>([a-zA-Z]+)\.", line)
        assert m, line
        op, word, answer = m.groups()
        expected = {"copy": word, "rev": word[::-1], "upper": word.upper()}[op]
        assert answer == expected, line
        assert not is_heldout(word)
        counts[op] += 1
    total = sum(counts.values())
    assert all(0.25 < c / total < 0.42 for c in counts.values()), counts


def test_pretrain_batch_is_language_modelling():
    task = PretrainTask(corpus_chars=5_000)
    batch = task.batch(0, batch_size=8, block_size=32)
    assert batch.idx.shape == (8, 32)
    assert (batch.targets != IGNORE_INDEX).all()
    np.testing.assert_array_equal(batch.idx[:, 1:], batch.targets[:, :-1])
    stream = TOK.decode(task.corpus_tokens())
    for row_idx, row_tgt in zip(batch.idx, batch.targets, strict=True):
        window = TOK.decode(row_idx) + TOK.decode(row_tgt[-1:])
        assert window in stream


def test_pretrain_examples_per_op():
    task = PretrainTask(corpus_chars=1_000)
    for op in ("copy", "rev", "upper"):
        exs = task.examples(5, seed=1, op=op)
        assert all(e.prompt.startswith(op + " ") for e in exs)
    with pytest.raises(ValueError, match="op='shift'.*copy, rev, upper"):
        task.examples(5, seed=1, op="shift")


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", ["pretrain", "shift", "rot"])
def test_batches_are_deterministic_per_seed(name):
    kwargs = {"corpus_chars": 5_000} if name == "pretrain" else {}
    task, again = get_task(name, **kwargs), get_task(name, **kwargs)
    a = task.batch(7, batch_size=6, block_size=32)
    b = again.batch(7, batch_size=6, block_size=32)
    c = task.batch(8, batch_size=6, block_size=32)
    np.testing.assert_array_equal(a.idx, b.idx)
    np.testing.assert_array_equal(a.targets, b.targets)
    assert not np.array_equal(a.idx, c.idx)
    # A Generator works too and gives the same first batch as its seed.
    g = task.batch(np.random.default_rng(7), batch_size=6, block_size=32)
    np.testing.assert_array_equal(a.idx, g.idx)
    # eval_batch is fixed and differs from the training batch of the same seed.
    e1, e2 = task.eval_batch(6, 32, seed=7), again.eval_batch(6, 32, seed=7)
    np.testing.assert_array_equal(e1.idx, e2.idx)
    assert not np.array_equal(e1.idx, a.idx)


def test_eval_batch_is_encoded_examples():
    task = ShiftTask()
    expected = encode_examples(TOK, task.examples(4, 3 + EVAL_SEED_OFFSET), 32)
    got = task.eval_batch(4, 32, seed=3)
    np.testing.assert_array_equal(got.idx, expected.idx)
    np.testing.assert_array_equal(got.targets, expected.targets)


def test_bad_seed_and_sizes():
    task = ShiftTask()
    with pytest.raises(TypeError, match="rng_or_seed=1.5"):
        task.batch(1.5, 4, 32)
    with pytest.raises(ValueError, match="batch_size=0"):
        lm_windows(np.arange(100), 0, 0, 8)
    with pytest.raises(ValueError, match="5 tokens.*block_size=8 needs at least 9"):
        lm_windows(np.arange(5), 0, 2, 8)


# --------------------------------------------------------------------------- registry


def test_registry():
    assert set(TASKS) == {"pretrain", "shift", "rot", "text"}
    assert isinstance(get_task("shift"), ShiftTask)
    with pytest.raises(ValueError, match="'nope'.*pretrain, shift, rot, text"):
        get_task("nope")
    for name in ("pretrain", "shift", "rot"):
        task = get_task(name)
        assert task.name == name and task.description


# --------------------------------------------------------------------------- text files


def test_text_file_split_and_batches(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    task = TextFileTask(path)
    assert task.tokenizer == CharTokenizer.from_text(text)
    assert len(task.train_tokens) == 900 and len(task.val_tokens) == 100
    assert task.tokenizer.decode(task.train_tokens) == text[:900]
    assert task.tokenizer.decode(task.val_tokens) == text[900:]

    train = task.batch(0, 4, 16)
    val = task.batch(0, 4, 16, split="val")
    np.testing.assert_array_equal(train.idx[:, 1:], train.targets[:, :-1])
    for row in val.idx:
        assert task.tokenizer.decode(row) in text[900:]
    np.testing.assert_array_equal(task.eval_batch(3, 16).idx, task.eval_batch(3, 16).idx)

    with pytest.raises(ValueError, match=r"val split .* 100 characters.*block_size=100.*101"):
        task.batch(0, 2, 100, split="val")
    with pytest.raises(ValueError, match="split='test'"):
        task.batch(0, 2, 8, split="test")


def test_text_file_with_tokenizer_and_crlf(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"hello\r\nworld\r\n" * 20)
    task = TextFileTask(path, tokenizer=TOK)
    assert task.tokenizer == TOK
    assert "\r" not in TOK.decode(task.train_tokens)


def test_text_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        TextFileTask(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        TextFileTask(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"abc\xff\xfe")
    with pytest.raises(ValueError, match="not valid UTF-8: byte 0xff at offset 3"):
        TextFileTask(binary)
    accents = tmp_path / "accents.txt"
    accents.write_text("na\u00efve caf\u00e9", encoding="utf-8")
    with pytest.raises(ValueError, match="accents.txt.*'é', 'ï'"):
        TextFileTask(accents, tokenizer=TOK)
    with pytest.raises(ValueError, match="val_fraction=1.5"):
        TextFileTask(accents, val_fraction=1.5)


# --------------------------------------------------------------------------- accuracy


def _hand_batch() -> Batch:
    idx = np.zeros((2, 5), dtype=np.int64)
    targets = np.array([[-1, -1, 3, 4, 5], [-1, 7, 8, -1, -1]], dtype=np.int64)
    return Batch(idx, targets)


def test_accuracy_perfect():
    batch = _hand_batch()
    pred = np.where(batch.targets == IGNORE_INDEX, 0, batch.targets)
    assert answer_accuracy(pred, batch) == (1.0, 1.0)


def test_accuracy_one_wrong_char():
    batch = _hand_batch()
    pred = np.where(batch.targets == IGNORE_INDEX, 0, batch.targets)
    pred[0, 3] = 9  # one of five scored characters wrong, in row 0
    char_acc, exact = answer_accuracy(pred, batch)
    assert char_acc == pytest.approx(4 / 5)
    assert exact == pytest.approx(1 / 2)


def test_accuracy_ignores_ignored_positions():
    batch = _hand_batch()
    pred = np.where(batch.targets == IGNORE_INDEX, 0, batch.targets)
    noisy = pred.copy()
    noisy[batch.targets == IGNORE_INDEX] = 42
    assert answer_accuracy(noisy, batch) == answer_accuracy(pred, batch) == (1.0, 1.0)


def test_accuracy_errors():
    batch = _hand_batch()
    with pytest.raises(ValueError, match=r"shape \(2, 5, 3\)"):
        answer_accuracy(np.zeros((2, 5, 3)), batch)
    with pytest.raises(ValueError, match="no targets"):
        answer_accuracy(np.zeros((1, 2)), Batch(np.zeros((1, 2)), np.full((1, 2), -1)))


# ----------------------------------------------------------------- planted rank
def test_planted_rank_task_is_exactly_representable():
    """LoRA with B A = ΔW / s on the planted modules reproduces the teacher exactly."""
    import minilora as ml
    from minilora.training.planted import PlantedRankTask

    cfg = ml.GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, d_model=16)
    base = ml.GPT(cfg, seed=0, dtype="float64")
    task = PlantedRankTask(base, rank=2, targets=("q", "v"), strength=2.0, seed=1)
    batch = task.batch(3, 8, 32)
    np.testing.assert_array_equal(batch.targets, task.batch(3, 8, 32).targets)  # deterministic
    base_pred = base.forward(batch.idx).argmax(-1)
    assert (base_pred != batch.targets).mean() > 0.02  # the change matters
    for delta in task.delta.values():
        assert np.linalg.matrix_rank(delta) == 2
    lcfg = ml.LoraConfig(r=2, alpha=2.0, target_modules=("q", "v"))
    ml.add_adapter(base, lcfg)
    for module, delta in task.delta.items():
        U, S, Vt = np.linalg.svd(delta)
        base.params[f"{module}.lora_B.default"][...] = U[:, :2] * S[:2] / lcfg.scale
        base.params[f"{module}.lora_A.default"][...] = Vt[:2]
    np.testing.assert_array_equal(base.forward(batch.idx).argmax(-1), batch.targets)


def test_rule_task_block_size_fits_the_longest_example():
    """block_size is the smallest T that encodes the longest example of every op."""
    for task in (ShiftTask(), RotTask(), PretrainTask()):
        longest = [task.make_example(op, "z" * task.max_len) for op in task.ops]
        encode_examples(task.tokenizer, longest, task.block_size)
        with pytest.raises(ValueError):
            encode_examples(task.tokenizer, longest, task.block_size - 1)
