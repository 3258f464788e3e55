"""Your own UTF-8 text as a task: train on its first part, validate on the rest."""

from __future__ import annotations

import os
from pathlib import Path

from minilora.basics.checks import positive_int
from minilora.core.tokenizer import CharTokenizer
from minilora.training.batches import EVAL_SEED_OFFSET, Batch, SeedLike, check_split, lm_windows


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
        check_split(split)
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
