"""Soft targets: the loss pair, GPT.loss/backward with (B, T, V) targets, the trainer's
validation, and the planted task that labels with the teacher's distribution."""

import numpy as np
import pytest

from minilora.core import layers as L
from minilora.core.adapters import add_adapter
from minilora.core.gradcheck import check_gradients
from minilora.core.lora import LoraConfig
from minilora.core.model import GPT, GPTConfig
from minilora.training.planted import PlantedRankTask, principal_cosines
from minilora.training.schedule import TrainConfig
from minilora.training.train import Trainer, evaluate, kl_divergence

CFG = GPTConfig(vocab_size=96, block_size=16, n_layer=2, n_head=2, d_model=32)


def _probs(rng, *shape):
    z = rng.normal(0.0, 2.0, shape)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def test_soft_cross_entropy_gradient_matches_finite_differences():
    """float64: dlogits = (softmax(z) - p) / N matches central differences."""
    rng = np.random.default_rng(0)
    logits, p = rng.normal(0.0, 2.0, (2, 3, 7)), _probs(rng, 2, 3, 7)
    _, cache = L.soft_cross_entropy_forward(logits, p)
    dlogits = L.soft_cross_entropy_backward(1.0, cache)
    assert dlogits.shape == logits.shape
    results = check_gradients(
        lambda: L.soft_cross_entropy_forward(logits, p)[0],
        {"logits": logits},
        {"logits": dlogits},
        max_coords=42,
    )
    assert all(r.passed(1e-6) and not r.zero for r in results), results


def test_soft_cross_entropy_value_and_one_hot_case():
    """H(p, q) = -sum p log q; one-hot p gives the hard-label cross-entropy; KL >= 0."""
    rng = np.random.default_rng(1)
    logits, p = rng.normal(0.0, 3.0, (4, 5, 6)), _probs(rng, 4, 5, 6)
    loss, _ = L.soft_cross_entropy_forward(logits, p)
    log_q = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    assert loss == pytest.approx(-(p * log_q).sum(-1).mean(), rel=1e-12)
    targets = rng.integers(0, 6, (4, 5))
    hard, _ = L.cross_entropy_forward(logits, targets)
    soft, _ = L.soft_cross_entropy_forward(logits, np.eye(6)[targets])
    assert soft == pytest.approx(hard, rel=1e-12)
    kl = kl_divergence(p, logits)
    assert kl.shape == (4, 5) and (kl >= 0).all()
    assert kl_divergence(p, np.log(p)) == pytest.approx(np.zeros((4, 5)), abs=1e-12)


def test_model_backward_with_soft_targets_matches_finite_differences():
    """GPT.loss with (B, T, V) targets; backward's dA, dB agree with finite differences."""
    model = GPT(CFG, seed=0, dtype="float64")
    add_adapter(model, LoraConfig(2, 4.0, 0.0, ("v",)), seed=0)
    rng = np.random.default_rng(2)
    for name in model.trainable_names():  # B != 0, so dA is not zero
        model.params[name][...] = rng.normal(0.0, 0.3, model.params[name].shape)
    idx = rng.integers(0, CFG.vocab_size, (2, 5))
    p = _probs(rng, 2, 5, CFG.vocab_size)
    model.loss(idx, p)
    model.backward()
    names = model.trainable_names()
    results = check_gradients(
        lambda: model.loss(idx, p),
        {n: model.params[n] for n in names},
        dict(model.grads),
        max_coords=8,
    )
    assert [r.name for r in results] == names
    assert all(r.passed(1e-5) and not r.zero for r in results), results


@pytest.mark.parametrize(
    "targets, message",
    [
        (np.full((2, 5, 7), 1 / 7), r"must be \(B, T, V\)"),
        (np.full((2, 5, CFG.vocab_size), 0.5), "probabilities"),
        (np.full((2, 5, CFG.vocab_size), -1.0 / CFG.vocab_size), "probabilities"),
        (np.ones((2, 5, CFG.vocab_size), dtype=np.int64), "float"),
    ],
)
def test_model_refuses_bad_soft_targets(targets, message):
    model = GPT(CFG, seed=0)
    with pytest.raises(ValueError, match=message):
        model.loss(np.zeros((2, 5), dtype=np.int64), targets)


def _soft_task(**kw):
    base = GPT(CFG, seed=0)
    args = {"rank": 2, "targets": ("v",), "blocks": (0,), "labels": "soft", "strength": 4.0}
    return base, PlantedRankTask(base, None, **{**args, **kw})


def test_planted_soft_labels_are_the_teachers_distribution():
    """labels="soft": float (B, T, V) rows summing to 1, the teacher's softmax; only the
    chosen blocks change; sigmas set the planted singular values."""
    base, task = _soft_task(sigmas=(1.0, 0.5))
    batch = task.batch(0, 3, 8)
    assert batch.targets.shape == (3, 8, CFG.vocab_size)
    assert batch.targets.dtype == np.float32
    np.testing.assert_allclose(batch.targets.sum(-1), 1.0, atol=1e-5)
    logits = task.teacher.forward(batch.idx).astype(np.float64)
    q = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(batch.targets, q / q.sum(-1, keepdims=True), atol=1e-6)
    assert sorted(task.delta) == ["h.0.attn.v"]
    s = np.linalg.svd(task.delta["h.0.attn.v"], compute_uv=False)
    assert s[1] / s[0] == pytest.approx(0.5) and s[2] < 1e-12 * s[0]
    with pytest.raises(ValueError, match="sigmas"):
        _soft_task(sigmas=(1.0,))
    with pytest.raises(ValueError, match="labels"):
        _soft_task(labels="argmax")
    with pytest.raises(ValueError, match="blocks"):
        _soft_task(blocks=(2,))


def test_planted_greedy_default_unchanged():
    """The default (greedy labels, every block) plants the same ΔW as before."""
    base = GPT(CFG, seed=0)
    task = PlantedRankTask(base, None, rank=2, seed=3)
    rng = np.random.default_rng(3)
    W = base.state_dict()["h.0.attn.q.weight"].astype(np.float64)
    U, _ = np.linalg.qr(rng.standard_normal((W.shape[0], 2)))
    V, _ = np.linalg.qr(rng.standard_normal((W.shape[1], 2)))
    np.testing.assert_allclose(task.delta["h.0.attn.q"], np.linalg.norm(W, 2) * U @ V.T)
    assert task.batch(0, 2, 8).targets.dtype == np.int64
    assert len(task.delta) == 2 * CFG.n_layer


def test_trainer_trains_on_soft_targets_and_reports_kl():
    """The trainer runs on the soft planted task; validation has a KL that falls."""
    base, task = _soft_task()
    add_adapter(base, LoraConfig(2, 4.0, 0.0, ("v",)), seed=0)
    cfg = TrainConfig(
        steps=40, batch_size=8, block_size=16, lr=0.1, warmup=2, eval_every=0, eval_size=16
    )
    trainer = Trainer(base, task, cfg, progress=False)
    before = evaluate(base, trainer.eval_batch)
    trainer.run()
    after = trainer.last_validation
    assert set(after) == {"loss", "char_acc", "exact", "kl"}
    assert 0 <= after["kl"] < 0.8 * before["kl"]
    assert after["loss"] - after["kl"] == pytest.approx(before["loss"] - before["kl"], rel=1e-4)


def test_principal_cosines():
    """1 for the planted directions themselves, small for random ones, per side."""
    rng = np.random.default_rng(4)
    U, _ = np.linalg.qr(rng.standard_normal((32, 3)))
    V, _ = np.linalg.qr(rng.standard_normal((48, 3)))
    same = principal_cosines(U @ np.diag([3.0, 2.0, 1.0]) @ V.T, U, V)
    np.testing.assert_allclose(same["col"] + same["row"], 1.0, atol=1e-12)
    other = principal_cosines(rng.standard_normal((32, 3)) @ rng.standard_normal((3, 48)), U, V)
    assert max(other["col"] + other["row"]) < 0.9
    rank1 = principal_cosines(np.outer(U[:, 0], V[:, 0]), U, V)  # one direction: one cosine
    assert rank1["col"] == pytest.approx([1.0])


def test_centred_rows_plant_only_what_a_layer_norm_output_can_show():
    """centred_rows: V is orthogonal to the all-ones vector on targets fed by a layer
    norm (q, k, v, fc); U, and every target fed by something else (o, proj), unchanged."""
    base = GPT(CFG, seed=0)
    kw = {"rank": 2, "targets": ("v", "fc", "proj"), "blocks": (0,), "seed": 5}
    plain = PlantedRankTask(base, None, **kw)
    centred = PlantedRankTask(base, None, centred_rows=True, **kw)
    for module in ("h.0.attn.v", "h.0.mlp.fc"):
        U, V = centred.factors[module]
        np.testing.assert_allclose(V.sum(axis=0), 0.0, atol=1e-12)
        np.testing.assert_allclose(V.T @ V, np.eye(2), atol=1e-12)
        np.testing.assert_array_equal(U, plain.factors[module][0])
        assert np.abs(plain.factors[module][1].sum(axis=0)).max() > 1e-3
    np.testing.assert_array_equal(centred.delta["h.0.mlp.proj"], plain.delta["h.0.mlp.proj"])
    with pytest.raises(TypeError, match="centred_rows"):
        PlantedRankTask(base, None, centred_rows="yes", **kw)


def test_no_gradient_reaches_A_along_the_all_ones_direction():
    """A layer norm's output (gain 1, bias 0) has zero mean over features, so
    dA = dU^T X is orthogonal to the all-ones vector: LoRA's A keeps its init there,
    which is why principal_cosines(centre_rows=True) compares the centred ΔW."""
    model = GPT(CFG, seed=0, dtype="float64")
    add_adapter(model, LoraConfig(2, 4.0, 0.0, ("fc", "proj")), seed=0)
    for name in model.trainable_names():  # B != 0, so that dA is not 0 for a trivial reason
        if ".lora_B." in name:
            model.params[name][...] = np.random.default_rng(1).normal(
                0, 0.1, model.params[name].shape
            )
    idx = np.random.default_rng(2).integers(0, CFG.vocab_size, (4, 16))
    model.loss(idx, np.roll(idx, -1, axis=1))
    model.backward()
    dA = model.grads["h.0.mlp.fc.lora_A.default"]
    assert np.abs(dA).max() > 1e-6
    np.testing.assert_allclose(dA.sum(axis=1), 0.0, atol=1e-12 * np.abs(dA).max() * 32)
    # proj's input is GELU's output, which has no such constraint
    assert np.abs(model.grads["h.0.mlp.proj.lora_A.default"].sum(axis=1)).max() > 1e-6


def test_principal_cosines_centre_rows_ignores_the_unseen_direction():
    """A ΔW that equals the planted one plus a part along the all-ones row direction:
    its raw cosines fall below 1, its centred ones are 1."""
    rng = np.random.default_rng(6)
    U, _ = np.linalg.qr(rng.standard_normal((40, 2)))
    G = rng.standard_normal((24, 2))
    V, _ = np.linalg.qr(G - G.mean(axis=0))
    planted = U @ np.diag([2.0, 1.0]) @ V.T
    learned = planted + np.outer(U @ np.array([1.5, -2.0]), np.ones(24))
    raw = principal_cosines(learned, U, V)
    centred = principal_cosines(learned, U, V, centre_rows=True)
    assert min(raw["row"]) < 0.9
    np.testing.assert_allclose(centred["row"] + centred["col"], 1.0, atol=1e-12)
