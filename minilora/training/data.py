"""The built-in tasks, and every task by name (a text file's is in textfile.py).

Plain NumPy on the host, as batches.py; every random choice draws on a local
generator, so the same seed always gives the same data.

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

import zlib
from collections.abc import Callable
from typing import Protocol

import numpy as np

from minilora.basics.checks import integer, non_negative_int, positive_int
from minilora.core.tokenizer import CharTokenizer
from minilora.training.batches import (
    EVAL_SEED_OFFSET,
    PAD,
    TERMINATOR,
    Batch,
    Example,
    SeedLike,
    as_rng,
    check_split,
    encode_examples,
    lm_windows,
)
from minilora.training.textfile import TextFileTask

LETTERS = "abcdefghijklmnopqrstuvwxyz"

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
        check_split(split)
        if op is not None and op not in self.ops:
            raise ValueError(f"op={op!r} is not known; allowed: {', '.join(self.ops)}")
        rng = as_rng(seed)
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
        rows = as_rng(rng_or_seed).integers(0, self.n, positive_int("batch_size", batch_size))
        return Batch(self.pool.idx[rows], self.pool.targets[rows])

    def eval_batch(self, n: int, block_size: int, seed: int = 0) -> Batch:
        return self.task.eval_batch(n, block_size, seed=seed)


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
