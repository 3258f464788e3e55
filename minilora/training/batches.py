"""Characters in, integer batches out: the batch types, packing, and scoring.

This module is the host boundary. Everything here is plain NumPy on the CPU; the
trainer moves each :class:`Batch` to the device later. Every random choice draws on
a local ``np.random.default_rng(seed)`` (or a Generator you pass in), never on global
state, so the same seed always gives the same data. The tasks that fill batches are in
data.py (the built-in ones) and textfile.py (your own text).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from minilora.basics.checks import non_negative_int, positive_int
from minilora.core.layers import IGNORE_INDEX
from minilora.core.tokenizer import CharTokenizer

TERMINATOR = "."
"""Ends every answer. It is a target too, so the model learns when to stop."""

PAD = "\n"
"""Fills rows on the right after the example; never a target."""

EVAL_SEED_OFFSET = 10_000
"""``eval_batch(seed=s)`` draws with seed ``s + EVAL_SEED_OFFSET``, away from training seeds."""
SeedLike = int | np.random.Generator


def as_rng(rng_or_seed: SeedLike) -> np.random.Generator:
    """Return a Generator: the one given (its state advances), or a fresh one from a seed."""
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(non_negative_int("rng_or_seed", rng_or_seed))


# --------------------------------------------------------------------------- batches


class Batch(NamedTuple):
    """One training or evaluation batch, int64 arrays of shape (B, T) on the host.

    ``targets[b, t]`` is the token that follows ``idx[b, t]``, or ``IGNORE_INDEX``
    where no loss (and no accuracy) should be counted. A task with soft targets (the
    planted task's ``labels="soft"``) gives instead float ``targets`` (B, T, V): the
    distribution of the next token (GPT.loss takes both).
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
    starts = as_rng(rng).integers(0, len(tokens) - block_size, size=batch_size)
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


def check_split(split: str) -> None:
    if split not in ("train", "val"):
        raise ValueError(f"split={split!r} is not known; allowed: 'train', 'val'")


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
