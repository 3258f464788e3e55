"""The planted-rank task: a fine-tuning target whose true update has a known rank.

A *teacher* is the base model with a rank-k change added to chosen weights,

    W_teacher = W + ΔW,   ΔW = sigma U V^T,   U (d_out, k), V (d_in, k) orthonormal columns,
    sigma = strength * ||W||_2                 (so the change is comparable to W itself)

and the targets are, on windows of the pretraining corpus, either the teacher's greedy
next tokens (``labels="greedy"``) or its whole next-token distribution
(``labels="soft"``: GPT.loss then minimises the cross-entropy on soft targets, i.e.
KL(teacher || student) up to a constant). LoRA with r >= k on the same modules can
represent ΔW exactly (B A = ΔW / s); with r < k it can only approximate it. That is
what makes the rank experiments readable: the rank the task needs is not a guess.

Why soft labels: greedy labels reward a student that is *more confident* than the
teacher, so the best student is not the teacher and ΔW is not what the loss recovers
(notebook 06's aside). With soft labels the teacher is the unique minimiser of the KL
in function space, and when the change lives in one module (``blocks=(i,)``, one
target) it is identifiable: validation can compare the learned ΔW with U and V
(:func:`principal_cosines`). ``sigmas`` makes the k planted singular values distinct,
so that the best rank-r approximation (r < k, Eckart–Young) is unique.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from minilora.basics.backend import to_host
from minilora.basics.checks import (
    boolean,
    distinct_indices,
    distinct_names,
    one_of,
    positive_int,
    positive_real,
)
from minilora.core.lora import TARGET_MODULES, module_path
from minilora.core.model import GPT
from minilora.core.tokenizer import CharTokenizer
from minilora.training.batches import EVAL_SEED_OFFSET, Batch, SeedLike, lm_windows
from minilora.training.data import PretrainTask

LAYER_NORM_FED = ("q", "k", "v", "fc")
"""The targets whose input is a layer norm's output (ln_1 for attention, ln_2 for fc)."""


class PlantedRankTask:
    """Imitate ``base`` + a planted rank-``rank`` change on ``targets`` of ``blocks``.

    ``blocks``: the blocks that get the change (None: every block). ``labels``:
    "greedy" (the teacher's argmax, int targets) or "soft" (its distribution, float
    (B, T, V) targets). ``sigmas``: the k singular values relative to
    strength * ||W||_2, largest first (None: all 1, as U V^T). ``centred_rows``:
    draw V orthogonal to the all-ones vector on the targets fed by a layer norm, whose
    output has zero mean over features (exactly, with its initial gain 1 and bias 0):
    no data can show a change along that direction, so none could be recovered.
    """

    name = "planted"

    def __init__(
        self,
        base: GPT,
        tokenizer: CharTokenizer | None = None,
        rank: int = 4,
        targets: tuple[str, ...] = ("q", "v"),
        strength: float = 1.0,
        seed: int = 0,
        blocks: tuple[int, ...] | None = None,
        labels: str = "greedy",
        sigmas: tuple[float, ...] | None = None,
        centred_rows: bool = False,
    ) -> None:
        rank = positive_int("planted rank", rank)
        if rank > base.config.d_model:
            raise ValueError(f"planted rank={rank} exceeds d_model={base.config.d_model}")
        targets = distinct_names("planted targets", targets, TARGET_MODULES)
        strength = positive_real("strength", strength)
        n_layer = base.config.n_layer
        blocks = tuple(range(n_layer)) if blocks is None else blocks
        self.blocks = distinct_indices("planted blocks", blocks, stop=n_layer)
        self.labels = one_of("labels", labels, ("greedy", "soft"))
        sigmas = (1.0,) * int(rank) if sigmas is None else tuple(sigmas)
        if len(sigmas) != rank:
            raise ValueError(f"sigmas={sigmas!r} must hold rank={rank} values")
        sigmas = tuple(positive_real("planted sigma", v) for v in sigmas)
        self.sigmas = sigmas
        self.centred_rows = centred_rows = boolean("centred_rows", centred_rows)
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
        self.factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # module: (U, V)
        for i in range(n_layer):
            for t in self.targets:
                name = f"{module_path(i, t)}.weight"
                W = state[name].astype(np.float64)
                # drawn for every block, so a block's change is the same whichever are planted
                U, _ = np.linalg.qr(rng.standard_normal((W.shape[0], self.rank)))
                G = rng.standard_normal((W.shape[1], self.rank))
                if centred_rows and t in LAYER_NORM_FED:
                    # a layer norm's output (gain 1, bias 0) sums to zero over features,
                    # so ΔW's action on the all-ones direction never reaches the data:
                    # plant only what a learner could see
                    G -= G.mean(axis=0)
                V, _ = np.linalg.qr(G)
                if i not in self.blocks:
                    continue
                scale = strength * np.linalg.norm(W, 2) * np.asarray(sigmas)
                self.delta[module_path(i, t)] = (U * scale) @ V.T
                self.factors[module_path(i, t)] = (U, V)
                state[name] = W + self.delta[module_path(i, t)]
        self.teacher.load_state_dict(state)
        self.teacher.eval()  # a fixed labeller: never dropout, whatever the base's config

    def _label(self, windows: Batch) -> Batch:
        """Replace the corpus' next characters with the teacher's greedy choices, or
        with its next-token distributions (float32, (B, T, V))."""
        logits = self.teacher.forward(windows.idx)
        if self.labels == "soft":
            z = logits - logits.max(axis=-1, keepdims=True)
            p = self.teacher.xp.exp(z)
            p /= p.sum(axis=-1, keepdims=True)
            return Batch(windows.idx, to_host(p).astype(np.float32))
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


def principal_cosines(
    learned: np.ndarray, U: np.ndarray, V: np.ndarray, centre_rows: bool = False
) -> dict[str, list]:
    """Cosines of the principal angles between the learned ΔW's top directions and the
    planted ones, largest first: "col" against span(U), "row" against span(V).

    learned (d_out, d_in); U (d_out, k), V (d_in, k) orthonormal. The learned ΔW's top
    m = min(k, rank) left and right singular vectors are compared: cosines are the
    singular values of U_learned^T U (m of them). 1 means the direction is recovered;
    random m-dimensional subspaces of R^d give cosines of order sqrt(k/d).

    ``centre_rows``: compare ΔW (I - 1 1^T / d_in), the part of it that the data can
    see, when the layer's input is a layer norm's output (zero mean over features):
    the loss does not depend on A along the all-ones direction (dA = dU^T X, and every
    row of X is orthogonal to it), so nothing pulls that part of A toward the planted
    change: it starts at A's random init (and AdamW, scaling each coordinate's step
    separately, moves it anyway), and that part of ΔW = BA changes no output.
    """
    learned = np.asarray(learned, dtype=np.float64)
    if centre_rows:
        learned = learned - learned.mean(axis=1, keepdims=True)
    P, s, Qt = np.linalg.svd(learned, full_matrices=False)
    m = min(U.shape[1], int((s > s[0] * 1e-6).sum()) if s[0] > 0 else 0)
    if m == 0:
        return {"col": [0.0] * U.shape[1], "row": [0.0] * V.shape[1]}
    col = np.linalg.svd(P[:, :m].T @ U, compute_uv=False)
    row = np.linalg.svd(Qt[:m] @ V, compute_uv=False)
    return {"col": col.tolist(), "row": row.tolist()}
