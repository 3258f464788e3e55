"""The planted-rank task: a fine-tuning target whose true update has a known rank.

A *teacher* is the base model with a rank-k change added to chosen weights,

    W_teacher = W + ΔW,   ΔW = sigma U V^T,   U (d_out, k), V (d_in, k) orthonormal columns,
    sigma = strength * ||W||_2                 (so the change is comparable to W itself)

and the targets are the teacher's greedy next tokens on windows of the pretraining
corpus. LoRA with r >= k on the same modules can represent ΔW exactly (B A = ΔW / s);
with r < k it can only approximate it. That is what makes the rank experiments
readable: the rank the task needs is not a guess.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minilora.basics.backend import to_host
from minilora.basics.checks import distinct_names, positive_int, positive_real
from minilora.core.lora import TARGET_MODULES, module_path
from minilora.core.model import GPT
from minilora.core.tokenizer import CharTokenizer
from minilora.training.batches import EVAL_SEED_OFFSET, Batch, SeedLike, lm_windows
from minilora.training.data import PretrainTask


class PlantedRankTask:
    """Imitate ``base`` + a planted rank-``rank`` change on ``targets`` of every block."""

    name = "planted"

    def __init__(
        self,
        base: GPT,
        tokenizer: CharTokenizer | None = None,
        rank: int = 4,
        targets: tuple[str, ...] = ("q", "v"),
        strength: float = 1.0,
        seed: int = 0,
    ) -> None:
        rank = positive_int("planted rank", rank)
        if rank > base.config.d_model:
            raise ValueError(f"planted rank={rank} exceeds d_model={base.config.d_model}")
        targets = distinct_names("planted targets", targets, TARGET_MODULES)
        strength = positive_real("strength", strength)
        self.rank, self.targets, self.strength = int(rank), tuple(targets), float(strength)
        self.description = (
            f"imitate the base plus a planted rank-{rank} change on {','.join(targets)}"
        )
        self.corpus = PretrainTask(tokenizer)
        self.tokenizer = self.corpus.tokenizer
        # the teacher: a copy of the base's weights with ΔW added (host draws, then device)
        self.teacher = GPT(base.config, seed=base.seed, dtype=base.dtype, device=base.device)
        state = {n: v for n, v in base.state_dict().items() if ".lora_" not in n}
        rng = np.random.default_rng(seed)
        self.delta: dict[str, np.ndarray] = {}
        for i in range(base.config.n_layer):
            for t in self.targets:
                name = f"{module_path(i, t)}.weight"
                W = state[name].astype(np.float64)
                U, _ = np.linalg.qr(rng.standard_normal((W.shape[0], self.rank)))
                V, _ = np.linalg.qr(rng.standard_normal((W.shape[1], self.rank)))
                self.delta[module_path(i, t)] = strength * np.linalg.norm(W, 2) * (U @ V.T)
                state[name] = W + self.delta[module_path(i, t)]
        self.teacher.load_state_dict(state)
        self.teacher.eval()  # a fixed labeller: never dropout, whatever the base's config

    def _label(self, windows: Batch) -> Batch:
        """Replace the corpus' next characters with the teacher's greedy choices."""
        logits = self.teacher.forward(windows.idx)
        return Batch(windows.idx, to_host(logits.argmax(axis=-1)).astype(np.int64))

    def batch(self, rng_or_seed: SeedLike, batch_size: int, block_size: int) -> Batch:
        return self._label(
            lm_windows(self.corpus.corpus_tokens(), rng_or_seed, batch_size, block_size)
        )

    def eval_batch(self, n: int, block_size: int, seed: int = 0) -> Batch:
        return self.batch(np.random.default_rng(seed + EVAL_SEED_OFFSET), n, block_size)

    def delta_for(self, module: str) -> Any:
        """The planted ΔW (d_out, d_in) of ``module`` (e.g. "h.0.attn.q")."""
        return self.delta[module]
