"""Characters in, integer batches out: the built-in tasks and text files.

This module is the host boundary. Everything here is plain NumPy on the CPU; the
trainer moves each :class:`Batch` to the device later. Every random choice draws on
a local ``np.random.default_rng(seed)`` (or a Generator you pass in), never on global
state, so the same seed always gives the same data.

The built-in tasks are tiny string rules on random lowercase "words", small enough to
learn in a minute on a laptop and clear enough to see what LoRA changed:

==========  ======================  =========================================
task        one line                role
==========  ======================  =========================================
pretrain    ``copy abc>abc.``       the base model's corpus: three operations
            ``rev abc>cba.``        mixed in one long stream of lines
            ``upper abc>ABC.``
shift       ``shift abc>bcd.``      fine-tuning: a new rule (next letter, z->a)
rot         ``rot abcd>bcda.``      fine-tuning: a new word order
==========  ======================  =========================================

Held-out words. About 10% of all words (chosen by a stable hash of the word, see
:func:`is_heldout`) never appear in training data; evaluation uses only those. With
3-letter words there are just 26**3 = 17,576 possibilities, so without this split a
model could score well by memorising words it has already seen.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from minilora.basics.checks import integer, non_negative_int, positive_int
from minilora.core.layers import IGNORE_INDEX
from minilora.core.tokenizer import CharTokenizer

TERMINATOR = "."
"""Ends every answer. It is a target too, so the model learns when to stop."""

PAD = "\n"
"""Fills rows on the right after the example; never a target."""

EVAL_SEED_OFFSET = 10_000
"""``eval_batch(seed=s)`` draws with seed ``s + EVAL_SEED_OFFSET``, away from training seeds."""

LETTERS = "abcdefghijklmnopqrstuvwxyz"

SeedLike = int | np.random.Generator


def _as_rng(rng_or_seed: SeedLike) -> np.random.Generator:
    """Return a Generator: the one given (its state advances), or a fresh one from a seed."""
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(non_negative_int("rng_or_seed", rng_or_seed))


# --------------------------------------------------------------------------- batches


class Batch(NamedTuple):
    """One training or evaluation batch, int64 arrays of shape (B, T) on the host.

    ``targets[b, t]`` is the token that follows ``idx[b, t]``, or ``IGNORE_INDEX``
    where no loss (and no accuracy) should be counted.
    """

    idx: np.ndarray
    targets: np.ndarray


class Example(NamedTuple):
    """A prompt and the answer the model should write after it (without the terminator)."""

    prompt: str
    answer: str


def lm_windows(tokens: np.ndarray, rng: SeedLike, batch_size: int, block_size: int) -> Batch:
    """Language-modelling batch: random windows of ``block_size + 1`` tokens from one stream.

    A window ``w`` gives ``idx = w[:-1]`` and ``targets = w[1:]``: every position is
    trained to predict the next token, so no target is ignored.
    """
    positive_int("batch_size", batch_size)
    positive_int("block_size", block_size)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens has shape {tokens.shape}; allowed: a 1-D token stream")
    if len(tokens) < block_size + 1:
        raise ValueError(
            f"token stream has {len(tokens)} tokens; block_size={block_size} needs at least "
            f"{block_size + 1} (a window plus the next token)"
        )
    # Last valid start leaves room for block_size + 1 tokens; integers() excludes `high`.
    starts = _as_rng(rng).integers(0, len(tokens) - block_size, size=batch_size)
    windows = tokens[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    return Batch(idx=windows[:, :-1], targets=windows[:, 1:])


def encode_examples(
    tokenizer: CharTokenizer, examples: Sequence[Example], block_size: int
) -> Batch:
    """Pack one example per row: ``prompt + answer + "."``, left-aligned, ``"\\n"``-padded.

    Targets are ``IGNORE_INDEX`` everywhere except where the next token is an answer
    character or the terminator, so loss and accuracy measure only the answer (the
    prompt is given, not learned). Like an LM window, a row spans ``block_size + 1``
    characters: ``idx`` holds the first ``block_size``, and the last character (the
    terminator at most) only ever appears as a target.
    """
    positive_int("block_size", block_size)
    if len(examples) == 0:
        raise ValueError("examples is empty; allowed: at least one Example")
    pad_id = tokenizer.encode(PAD)[0]
    rows = len(examples)
    idx = np.full((rows, block_size), pad_id, dtype=np.int64)
    targets = np.full((rows, block_size), IGNORE_INDEX, dtype=np.int64)
    for b, (prompt, answer) in enumerate(examples):
        if not prompt:
            raise ValueError(
                f"example {b} has an empty prompt; allowed: at least one character, "
                "since the first answer character is predicted from the position before it"
            )
        ids = tokenizer.encode(prompt + answer + TERMINATOR)
        n = len(ids)
        if n > block_size + 1:
            raise ValueError(
                f"example {b} is {n} characters (prompt {len(prompt)} + answer {len(answer)} "
                f"+ terminator 1) but block_size={block_size} fits at most {block_size + 1}; "
                f"use block_size >= {n - 1} or shorter words"
            )
        row = np.full(block_size + 1, pad_id, dtype=np.int64)
        row[:n] = ids
        idx[b] = row[:-1]
        p = len(prompt)
        # Position t predicts row[t + 1]; the answer and terminator are row[p:n].
        targets[b, p - 1 : n - 1] = row[p:n]
    return Batch(idx=idx, targets=targets)


# --------------------------------------------------------------------------- words and rules


def is_heldout(word: str) -> bool:
    """True for the ~10% of words reserved for evaluation (a stable CRC-32 hash of the word).

    Python's ``hash()`` changes between runs, so it would break reproducibility; CRC-32
    gives the same split on every machine.
    """
    return zlib.crc32(word.encode("utf-8")) % 10 == 0


def random_word(rng: np.random.Generator, min_len: int, max_len: int, *, heldout: bool) -> str:
    """A word of uniform length in [min_len, max_len] and uniform letters a-z, from one split."""
    while True:  # rejection sampling: ~1.1 tries for training words, ~10 for held-out ones
        length = int(rng.integers(min_len, max_len + 1))
        word = "".join(LETTERS[i] for i in rng.integers(0, 26, size=length))
        if is_heldout(word) == heldout:
            return word


def shift_word(word: str) -> str:
    """Each letter replaced by the next one, z wrapping to a: ``"abz" -> "bca"``."""
    return "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in word)


def rot_word(word: str) -> str:
    """First letter moved to the end: ``"abcd" -> "bcda"``."""
    return word[1:] + word[:1]


def _check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is not known; allowed: 'train', 'val'")


# --------------------------------------------------------------------------- tasks


class Task(Protocol):
    """What the trainer needs from a task."""

    name: str
    description: str

    def batch(self, rng_or_seed: SeedLike, batch_size: int, block_size: int) -> Batch: ...

    def eval_batch(self, n: int, block_size: int, seed: int = 0) -> Batch: ...


class RuleTask:
    """Lines ``"{op} {word}>{answer}."``, one rule per op; subclasses fill in ``ops``.

    ``batch()`` draws fresh training examples and packs them with
    :func:`encode_examples`, so only the answer is trained.
    """

    name: str = "rule"
    description: str = ""
    ops: dict[str, Callable[[str], str]] = {}

    def __init__(
        self, tokenizer: CharTokenizer | None = None, min_len: int = 3, max_len: int = 8
    ) -> None:
        positive_int("min_len", min_len)
        integer("max_len", max_len)
        if max_len < min_len:
            raise ValueError(
                f"max_len={max_len} is below min_len={min_len}; need max_len >= min_len"
            )
        self.tokenizer = tokenizer if tokenizer is not None else CharTokenizer.default()
        self.min_len = int(min_len)
        self.max_len = int(max_len)
        # Fail now, not mid-training, if a custom vocabulary lacks a character we will write.
        needed = LETTERS + LETTERS.upper() + " >" + TERMINATOR + PAD + "".join(self.ops)
        self.tokenizer.encode("".join(sorted(set(needed))))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_len={self.min_len}, max_len={self.max_len})"

    @property
    def block_size(self) -> int:
        """The smallest T that fits every example: "{op} {word}>{answer}." has at most
        len(op) + 2 max_len + 3 characters, and the last one is only ever a target."""
        return max(len(op) for op in self.ops) + 2 * self.max_len + 2

    def make_example(self, op: str, word: str) -> Example:
        """The example for applying ``op`` to ``word``."""
        if op not in self.ops:
            raise ValueError(f"op={op!r} is not known; allowed: {', '.join(self.ops)}")
        return Example(prompt=f"{op} {word}>", answer=self.ops[op](word))

    def examples(
        self, n: int, seed: SeedLike = 0, *, op: str | None = None, split: str = "val"
    ) -> list[Example]:
        """``n`` examples (ops uniform, or only ``op``) on held-out words by default.

        ``split="train"`` draws from the training words instead, which is what
        ``batch()`` uses.
        """
        positive_int("n", n)
        _check_split(split)
        if op is not None and op not in self.ops:
            raise ValueError(f"op={op!r} is not known; allowed: {', '.join(self.ops)}")
        rng = _as_rng(seed)
        names = list(self.ops)
        out = []
        for _ in range(n):
            this_op = op if op is not None else names[int(rng.integers(len(names)))]
            word = random_word(rng, self.min_len, self.max_len, heldout=split == "val")
            out.append(self.make_example(this_op, word))
        return out

    def batch(self, rng_or_seed: SeedLike, batch_size: int, block_size: int) -> Batch:
        """Fresh training examples (training words only), one per row, loss on answers."""
        exs = self.examples(batch_size, rng_or_seed, split="train")
        return encode_examples(self.tokenizer, exs, block_size)

    def eval_batch(self, n: int, block_size: int, seed: int = 0, *, op: str | None = None) -> Batch:
        """A fixed validation set: ``n`` held-out examples, drawn with ``seed + EVAL_SEED_OFFSET``.

        ``op`` restricts it to one operation (e.g. to score "rev" alone on the base model).
        """
        exs = self.examples(n, seed + EVAL_SEED_OFFSET, op=op, split="val")
        return encode_examples(self.tokenizer, exs, block_size)


class PretrainTask(RuleTask):
    """The base model's corpus: a long stream of copy / rev / upper lines.

    ``batch()`` is plain language modelling on that stream (:func:`lm_windows`), the
    way a base model is pretrained: every next character counts, prompts included.
    ``eval_batch()`` and ``examples()`` are per-example, so the same
    :func:`answer_accuracy` measures the base model and the fine-tuned one.
    """

    name = "pretrain"
    description = "base corpus: 'copy abc>abc.', 'rev abc>cba.', 'upper abc>ABC.' lines"
    ops = {"copy": lambda w: w, "rev": lambda w: w[::-1], "upper": str.upper}

    def __init__(
        self,
        tokenizer: CharTokenizer | None = None,
        min_len: int = 3,
        max_len: int = 8,
        corpus_seed: int = 0,
        corpus_chars: int = 200_000,
    ) -> None:
        super().__init__(tokenizer, min_len, max_len)
        positive_int("corpus_chars", corpus_chars)
        self.corpus_seed = corpus_seed
        self.corpus_chars = int(corpus_chars)
        self._text: str | None = None
        self._tokens: np.ndarray | None = None

    def corpus_text(self) -> str:
        """The training stream (built once from ``corpus_seed``, then cached)."""
        if self._text is None:
            rng = np.random.default_rng(self.corpus_seed)
            lines: list[str] = []
            total = 0
            while total < self.corpus_chars:
                prompt, answer = self.examples(1, rng, split="train")[0]
                line = prompt + answer + TERMINATOR + "\n"
                lines.append(line)
                total += len(line)
            self._text = "".join(lines)
        return self._text

    def corpus_tokens(self) -> np.ndarray:
        """The training stream as int64 ids (cached)."""
        if self._tokens is None:
            self._tokens = self.tokenizer.encode(self.corpus_text())
        return self._tokens

    def batch(self, rng_or_seed: SeedLike, batch_size: int, block_size: int) -> Batch:
        """Random windows of the corpus with shifted targets (no ignored positions)."""
        return lm_windows(self.corpus_tokens(), rng_or_seed, batch_size, block_size)


class ShiftTask(RuleTask):
    """Fine-tuning on a rule the base never saw: every letter becomes the next one (z -> a)."""

    name = "shift"
    description = "next letter, z wraps to a: 'shift abz>bca.'"
    ops = {"shift": shift_word}


class RotTask(RuleTask):
    """Fine-tuning on a new word order: the first letter moves to the end."""

    name = "rot"
    description = "first letter to the end: 'rot abcd>bcda.'"
    ops = {"rot": rot_word}


class FixedPoolTask:
    """A task cut down to ``n`` training examples drawn once: what a small data set is.

    Training batches draw rows, with replacement, from that one pool; validation is the
    wrapped task's held-out set. So the training loss can fall far below the validation
    loss, and the gap between them is what LoRA dropout is meant to close.
    """

    def __init__(self, task: Task, n: int, block_size: int, seed: int = 0) -> None:
        self.task, self.n = task, positive_int("n", n)
        self.pool = task.batch(non_negative_int("seed", seed), self.n, block_size)
        self.name = f"{task.name}-{self.n}"
        self.tokenizer = task.tokenizer
        self.block_size = block_size
        self.description = f"{self.n} fixed examples of {task.name}"

    def batch(self, rng_or_seed: SeedLike, batch_size: int, block_size: int) -> Batch:
        if block_size != self.block_size:
            raise ValueError(f"block_size={block_size}; this pool was made with {self.block_size}")
        rows = _as_rng(rng_or_seed).integers(0, self.n, positive_int("batch_size", batch_size))
        return Batch(self.pool.idx[rows], self.pool.targets[rows])

    def eval_batch(self, n: int, block_size: int, seed: int = 0) -> Batch:
        return self.task.eval_batch(n, block_size, seed=seed)


class TextFileTask:
    """Your own UTF-8 text: the first ``1 - val_fraction`` is training, the rest validation.

    Without a tokenizer the vocabulary is the file's own characters (sorted); with one,
    every character must be in it. Windows line endings are read as ``"\\n"``.
    """

    name = "text"

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: CharTokenizer | None = None,
        val_fraction: float = 0.1,
    ) -> None:
        if not (isinstance(val_fraction, (int, float)) and 0.0 < val_fraction < 1.0):
            raise ValueError(f"val_fraction={val_fraction!r} is not allowed; it must be in (0, 1)")
        self.path = Path(path)
        if not self.path.exists():
            raise ValueError(f"text file '{self.path}' does not exist")
        if not self.path.is_file():
            raise ValueError(f"text file '{self.path}' is not a regular file")
        raw = self.path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"text file '{self.path}' is not valid UTF-8: byte {raw[err.start]:#04x} at "
                f"offset {err.start}; allowed: UTF-8 text"
            ) from None
        text = text.replace("\r\n", "\n")
        if not text:
            raise ValueError(f"text file '{self.path}' is empty; it needs some text to train on")
        self.tokenizer = tokenizer if tokenizer is not None else CharTokenizer.from_text(text)
        try:
            tokens = self.tokenizer.encode(text)
        except ValueError as err:
            raise ValueError(f"text file '{self.path}': {err}") from None
        # Split by position, not at random: the validation text is text the model never saw.
        n_val = int(round(len(tokens) * val_fraction))
        self.val_fraction = float(val_fraction)
        self.train_tokens = tokens[: len(tokens) - n_val]
        self.val_tokens = tokens[len(tokens) - n_val :]
        self.description = (
            f"text file '{self.path}': {len(tokens)} characters, "
            f"{self.tokenizer.vocab_size} symbols"
        )

    def __repr__(self) -> str:
        return f"TextFileTask({str(self.path)!r}, val_fraction={self.val_fraction})"

    def batch(
        self, rng_or_seed: SeedLike, batch_size: int, block_size: int, split: str = "train"
    ) -> Batch:
        """Random windows from one split with shifted targets."""
        _check_split(split)
        tokens = self.train_tokens if split == "train" else self.val_tokens
        positive_int("block_size", block_size)
        if len(tokens) < block_size + 1:
            raise ValueError(
                f"the {split} split of '{self.path}' is {len(tokens)} characters; "
                f"block_size={block_size} needs at least {block_size + 1} "
                "(use a longer file or a smaller block_size)"
            )
        return lm_windows(tokens, rng_or_seed, batch_size, block_size)

    def eval_batch(self, n: int, block_size: int, seed: int = 0) -> Batch:
        """A fixed set of ``n`` validation windows (seed ``seed + EVAL_SEED_OFFSET``)."""
        return self.batch(seed + EVAL_SEED_OFFSET, n, block_size, split="val")


TASKS: dict[str, type] = {
    "pretrain": PretrainTask,
    "shift": ShiftTask,
    "rot": RotTask,
    "text": TextFileTask,
}
"""Task name -> class. ``"text"`` needs ``path=...``."""


def get_task(name: str, **kwargs) -> Task:
    """Build the task called ``name`` with ``kwargs`` passed to its class."""
    if name not in TASKS:
        raise ValueError(f"task {name!r} is not known; allowed: {', '.join(TASKS)}")
    return TASKS[name](**kwargs)


# --------------------------------------------------------------------------- accuracy


def answer_accuracy(logits_argmax: np.ndarray, batch: Batch) -> tuple[float, float]:
    """(character accuracy, exact-match accuracy) over the non-ignored targets.

    ``logits_argmax`` holds the predicted next-token ids (B, T) under teacher forcing:
    one forward pass on ``batch.idx``, argmax over the vocabulary. Character accuracy
    is the fraction of non-ignored positions predicted correctly; exact match is the
    fraction of rows (with at least one target) where all of them are correct.

    Why teacher-forced exact match equals greedy-decoding correctness: greedy decoding
    from the prompt emits the argmax, feeds it back, and repeats. If every answer token
    is the argmax given the correct prefix, the first step emits the right token, so
    the next step sees the correct prefix again, and by induction greedy writes exactly
    the answer and its terminator. If some token is not the argmax, greedy follows the
    correct prefix up to the first such position and goes wrong there. So one batched
    forward pass scores generation without a token-by-token loop (ties aside).
    """
    pred = np.asarray(logits_argmax)
    targets = np.asarray(batch.targets)
    if pred.shape != targets.shape:
        raise ValueError(
            f"logits_argmax has shape {pred.shape} but batch.targets has shape "
            f"{targets.shape}; they must match (pass logits.argmax(-1), not the logits)"
        )
    mask = targets != IGNORE_INDEX
    if not mask.any():
        raise ValueError("batch has no targets (all are IGNORE_INDEX); nothing to score")
    correct = (pred == targets) & mask
    char_acc = correct.sum() / mask.sum()
    scored_rows = mask.any(axis=1)
    row_ok = (correct | ~mask).all(axis=1)
    exact = row_ok[scored_rows].mean()
    return float(char_acc), float(exact)
