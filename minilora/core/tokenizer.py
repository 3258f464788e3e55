"""Characters to integer ids and back: the model's vocabulary.

A character-level tokenizer keeps the whole pipeline visible: one id per character, no
merges, no byte fallback. It runs on the host (plain NumPy); the trainer moves the ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

DEFAULT_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
"""Newline plus the 95 printable ASCII characters " " .. "~": 96 symbols, the reference vocab."""


class CharTokenizer:
    """One id per character; the order of ``chars`` defines the ids (``chars[i]`` has id i).

    Character level keeps the whole pipeline visible: no merges, no byte fallback, and
    a vocabulary small enough (96 by default) to print.
    """

    def __init__(self, chars: str) -> None:
        if not isinstance(chars, str) or not chars:
            raise ValueError(f"chars={chars!r} is not allowed; it must be a non-empty string")
        dupes = sorted(c for c, count in Counter(chars).items() if count > 1)
        if dupes:
            raise ValueError(
                f"chars has duplicate characters {', '.join(map(repr, dupes))}; "
                "each character must appear once (its position is its id)"
            )
        self.chars = chars
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def default(cls) -> CharTokenizer:
        """The reference vocabulary: ``DEFAULT_CHARS`` (newline + printable ASCII, 96 symbols)."""
        return cls(DEFAULT_CHARS)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """A vocabulary of exactly the characters in ``text``, sorted (so ids are reproducible)."""
        if not text:
            raise ValueError("text is empty; a vocabulary needs at least one character")
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        """Number of symbols, V: the size of the embedding table and of the logits."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Text -> 1-D int64 array of ids. Unknown characters are an error, never dropped."""
        unknown = set(text) - self._stoi.keys()
        if unknown:
            shown = sorted(unknown)[:10]
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise ValueError(
                f"text has {len(unknown)} character(s) not in the vocabulary: "
                f"{', '.join(map(repr, shown))}{more}; allowed: the {self.vocab_size} "
                "symbols of this vocabulary"
            )
        return np.fromiter(map(self._stoi.__getitem__, text), dtype=np.int64, count=len(text))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """1-D ids (array or list) -> text. Ids outside [0, vocab_size) are an error."""
        arr = np.asarray(ids)
        if arr.ndim > 1:
            raise ValueError(f"ids has shape {arr.shape}; allowed: one sequence (0-D or 1-D)")
        arr = arr.reshape(-1)
        if arr.size == 0:
            return ""
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ids has dtype {arr.dtype}; allowed: integers")
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise ValueError(
                f"ids {sorted(set(bad.tolist()))[:10]} are out of range; "
                f"allowed: 0 .. {self.vocab_size - 1}"
            )
        return "".join(self.chars[i] for i in arr.tolist())

    def to_dict(self) -> dict[str, str]:
        """A JSON-able description, saved next to checkpoints so ids mean the same later."""
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(d, dict) or d.get("type") != "char" or "chars" not in d:
            raise ValueError(
                f"tokenizer description {d!r} is not usable; allowed: "
                "{'type': 'char', 'chars': '...'} as written by to_dict()"
            )
        return cls(d["chars"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CharTokenizer):
            return NotImplemented
        return self.chars == other.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
