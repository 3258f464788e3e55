"""The GPT: whole-model gradient checks, determinism, state dicts, input validation,
a learning test, generation and dropout."""

import functools

import numpy as np
import pytest
from conftest import TINY, random_model, token_batch

import minilora as ml
import minilora.core.model as model_module
from minilora.core.gradcheck import check_gradients, format_report

TOL = 1e-6


batch = functools.partial(token_batch, B=2, ignore=2)  # (cfg, seed) -> idx, targets


def model_gradcheck(model, idx, targets):
    """Loss + backward once, then finite differences for every parameter in model.grads."""
    model.eval()  # no dropout: the loss is a fixed function of the weights
    model.loss(idx, targets)
    model.backward()
    grads = dict(model.grads)

    def loss_fn():
        return model.loss(idx, targets)

    arrays = {name: model.params[name] for name in grads}
    return check_gradients(loss_fn, arrays, grads)


def is_key_bias(name):
    return name.endswith(".attn.k.bias")


# ------------------------------------------------------------------ gradient checks
def test_whole_model_gradients_all_trainable(tiny_config):
    """Every parameter's gradient matches finite differences; the key biases are zero."""
    model = random_model(tiny_config)
    results = model_gradcheck(model, *batch(tiny_config, 1))
    assert sorted(r.name for r in results) == sorted(model.params)
    report = format_report(results)
    for r in results:
        assert r.passed(TOL), report
        # The key bias adds the same q_t . b_k to every score of row t; softmax is
        # invariant to a shift shared by a whole row, so dL/db_k = 0 exactly. The
        # finite difference is pure rounding noise, which gradcheck reports as "zero".
        assert r.zero == is_key_bias(r.name), report


def test_whole_model_gradients_with_frozen_parameters(tiny_config):
    """Frozen parameters get no gradient entry; every other one still passes."""
    model = random_model(tiny_config, seed=1)
    model.freeze("h.0.*", "wpe.weight")
    frozen = {n for n in model.params if n.startswith("h.0.") or n == "wpe.weight"}
    assert model.frozen == frozen
    assert model.trainable_names() == [n for n in model.params if n not in frozen]
    results = model_gradcheck(model, *batch(tiny_config, 2))
    assert sorted(model.grads) == sorted(set(model.params) - frozen)
    assert sorted(r.name for r in results) == sorted(model.grads)
    report = format_report(results)
    for r in results:
        assert r.passed(TOL), report
        assert r.zero == is_key_bias(r.name), report


def test_unfreeze_restores_gradient(tiny_config):
    """unfreeze brings a parameter back into model.grads; a bad pattern raises."""
    model = ml.GPT(tiny_config)
    model.freeze("h.*")
    model.unfreeze("h.1.mlp.*")
    idx, targets = batch(tiny_config, 3)
    model.loss(idx, targets)
    model.backward()
    assert {n for n in model.grads if n.startswith("h.")} == {
        n for n in model.params if n.startswith("h.1.mlp.")
    }
    with pytest.raises(ValueError, match="nothing.here"):
        model.freeze("nothing.here")


def test_backward_without_loss_raises(tiny_config):
    """backward() before any loss(), or twice after one loss(), raises ValueError."""
    model = ml.GPT(tiny_config)
    with pytest.raises(ValueError, match="loss"):
        model.backward()
    model.loss(*batch(tiny_config, 4))
    model.backward()
    with pytest.raises(ValueError, match="loss"):
        model.backward()


# ------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_params_and_logits(tiny_config):
    """Two models built with the same seed have bit-identical params and logits."""
    a, b = ml.GPT(tiny_config, seed=7), ml.GPT(tiny_config, seed=7)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    idx, _ = batch(tiny_config, 5)
    np.testing.assert_array_equal(a.forward(idx), b.forward(idx))


def test_different_seed_gives_different_params(tiny_config):
    """A different seed gives different random matrices and different logits."""
    a, b = ml.GPT(tiny_config, seed=7), ml.GPT(tiny_config, seed=8)
    for name in a.params:
        if a.params[name].ndim == 2:
            assert not np.array_equal(a.params[name], b.params[name]), name
    idx, _ = batch(tiny_config, 5)
    assert not np.array_equal(a.forward(idx), b.forward(idx))


def test_default_dtype_is_float32(tiny_config):
    """Parameters and logits default to float32; dtype='float64' gives float64."""
    model = ml.GPT(tiny_config)
    assert {v.dtype for v in model.params.values()} == {np.dtype("float32")}
    idx, targets = batch(tiny_config, 6)
    assert model.forward(idx).dtype == np.float32
    assert model.forward(idx).shape == (2, 8, tiny_config.vocab_size)
    model.loss(idx, targets)
    model.backward()
    assert {g.dtype for g in model.grads.values()} == {np.dtype("float32")}
    model64 = ml.GPT(tiny_config, dtype="float64")
    assert model64.forward(idx).dtype == np.float64


def test_init_follows_gpt2(tiny_config):
    """Biases start at 0, layer-norm weights at 1, matrices with std ~0.02."""
    model = ml.GPT(tiny_config, dtype="float64")
    for name, value in model.params.items():
        if name.endswith("bias"):
            assert (value == 0).all(), name
        elif "ln_" in name:
            assert (value == 1).all(), name
    assert abs(model.params["h.0.mlp.fc.weight"].std() - 0.02) < 0.002


# --------------------------------------------------------------------- state dict
def test_state_dict_round_trip(tiny_config):
    """load_state_dict(state_dict()) into another model reproduces logits bit for bit."""
    a = random_model(tiny_config, seed=0, dtype="float32")
    b = ml.GPT(tiny_config, seed=3)
    state = a.state_dict()
    assert set(state) == set(a.params)
    assert all(isinstance(v, np.ndarray) for v in state.values())
    idx, _ = batch(tiny_config, 7)
    assert not np.array_equal(a.forward(idx), b.forward(idx))
    live = dict(b.params)
    b.load_state_dict(state)
    assert all(b.params[n] is live[n] for n in live)  # written in place, same arrays
    np.testing.assert_array_equal(a.forward(idx), b.forward(idx))
    state["wte.weight"][...] = 0.0  # a copy: changing it leaves the model alone
    assert (a.params["wte.weight"] != 0).any()


def bad_states(cfg):
    good = random_model(cfg, seed=9).state_dict()
    missing = dict(good)
    del missing["h.1.ln_2.bias"]
    extra = dict(good, **{"h.9.attn.q.weight": np.zeros((32, 32))})
    shape = dict(good, **{"h.1.mlp.fc.bias": np.zeros(5)})
    integer = dict(good, **{"ln_f.weight": np.ones(32, dtype=np.int64)})
    return [
        ("missing", missing, "h.1.ln_2.bias"),
        ("extra", extra, "h.9.attn.q.weight"),
        ("shape", shape, "h.1.mlp.fc.bias"),
        ("integer", integer, "ln_f.weight"),
    ]


@pytest.mark.parametrize("case", range(4), ids=["missing", "extra", "shape", "integer"])
def test_load_state_dict_rejects_bad_state_and_changes_nothing(tiny_config, case):
    """A missing/extra key, a wrong shape or an integer array raise ValueError naming
    the key, and no parameter is changed (even those that would have fit)."""
    _, state, key = bad_states(tiny_config)[case]
    model = ml.GPT(tiny_config)
    before = model.state_dict()
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        model.load_state_dict(state)
    for name, value in model.params.items():
        np.testing.assert_array_equal(value, before[name])


# -------------------------------------------------------------- input validation
@pytest.fixture
def no_array_work(monkeypatch):
    """Make the first array operation of the forward fail loudly."""

    def boom(*args, **kwargs):
        raise AssertionError("array work started before the input was validated")

    monkeypatch.setattr(model_module, "embedding_forward", boom)


BAD_IDX = [
    ("id >= vocab", np.array([[1, 65, 2]]), "65"),
    ("negative id", np.array([[1, -3, 2]]), "-3"),
    ("float ids", np.array([[1.0, 2.0]]), "float64"),
    ("1-D", np.array([1, 2, 3]), r"\(3,\)"),
    ("3-D", np.zeros((1, 2, 3), dtype=np.int64), r"\(1, 2, 3\)"),
    ("T > block_size", np.zeros((1, 17), dtype=np.int64), "17"),
]


@pytest.mark.parametrize(("what", "idx", "named"), BAD_IDX, ids=[c[0] for c in BAD_IDX])
def test_bad_idx_raises_before_array_work(tiny_config, no_array_work, what, idx, named):
    """forward and loss reject bad token ids with a ValueError naming the value."""
    model = ml.GPT(tiny_config)
    with pytest.raises(ValueError, match=named):
        model.forward(idx)
    good_targets = np.zeros((1, 2), dtype=np.int64)
    with pytest.raises(ValueError, match=named):
        model.loss(idx, good_targets)


def test_bad_targets_raise_before_array_work(tiny_config, no_array_work):
    """Targets of another shape, or out of range (other than -1), raise ValueError."""
    model = ml.GPT(tiny_config)
    idx = np.zeros((2, 4), dtype=np.int64)
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        model.loss(idx, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="-2"):
        model.loss(idx, np.full((2, 4), -2))
    with pytest.raises(ValueError, match="65"):
        model.loss(idx, np.full((2, 4), 65))


BAD_CONFIGS = [
    (dict(d_model=30, n_head=4), "d_model=30"),
    (dict(n_head=0), "n_head=0"),
    (dict(d_model=-8), "d_model=-8"),
    (dict(vocab_size=0), "vocab_size=0"),
    (dict(block_size=-1), "block_size=-1"),
    (dict(n_layer=0), "n_layer=0"),
    (dict(n_layer=2.0), "n_layer=2.0"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(dropout=-0.1), "dropout=-0.1"),
]


@pytest.mark.parametrize(("kwargs", "named"), BAD_CONFIGS, ids=[c[1] for c in BAD_CONFIGS])
def test_bad_config_raises(kwargs, named):
    """GPTConfig rejects indivisible heads, non-positive sizes and dropout >= 1."""
    with pytest.raises((ValueError, TypeError), match=named):  # TypeError: wrong kind
        ml.GPTConfig(**{**TINY, **kwargs})


# ------------------------------------------------------------------------ learning
def test_learns_a_repeating_sequence(tiny_config):
    """AdamW drives the loss on a period-7 pattern (block 16, batch 4) below 0.05."""
    model = ml.GPT(tiny_config, seed=0)  # float32
    opt = ml.AdamW(model, lr=1e-2)
    seq = 3 + np.arange(17) % 7
    idx, targets = np.tile(seq[:16], (4, 1)), np.tile(seq[1:], (4, 1))
    first = model.loss(idx, targets)
    for _ in range(150):
        model.loss(idx, targets)
        model.backward()
        opt.step()
        opt.zero_grad()
    final = model.eval().loss(idx, targets)
    assert first > 3.5  # ~log(65) before training
    assert final < 0.05  # speed is the benchmark's business (minilora bench), not a test's


# ---------------------------------------------------------------------- generation
def test_generate_greedy_is_deterministic(tiny_config):
    """Greedy generation returns (B, T + n), keeps the prompt, and repeats exactly."""
    model = random_model(tiny_config, dtype="float32")
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    out = model.generate(prompt, 20, greedy=True)
    assert out.shape == (2, 23)
    assert isinstance(out, np.ndarray) and np.issubdtype(out.dtype, np.integer)
    np.testing.assert_array_equal(out[:, :3], prompt)
    assert ((out >= 0) & (out < tiny_config.vocab_size)).all()
    np.testing.assert_array_equal(out, model.generate(prompt, 20, greedy=True, seed=5))
    # each greedy token is the argmax of the logits of the context before it
    logits = model.forward(out[:, 3:19])
    np.testing.assert_array_equal(out[:, 19], logits[:, -1].argmax(axis=-1))


def test_generate_sampling_seeded(tiny_config):
    """Sampling with the same seed repeats; another seed gives another sample."""
    model = random_model(tiny_config, dtype="float32")
    prompt = np.array([[1, 2]])
    a = model.generate(prompt, 30, temperature=2.0, seed=1)
    b = model.generate(prompt, 30, temperature=2.0, seed=1)
    c = model.generate(prompt, 30, temperature=2.0, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_generate_top_k_1_equals_greedy(tiny_config):
    """Sampling restricted to the top 1 token is greedy decoding."""
    model = random_model(tiny_config, dtype="float32")
    prompt = np.array([[7, 8], [9, 10]])
    np.testing.assert_array_equal(
        model.generate(prompt, 12, top_k=1, seed=3), model.generate(prompt, 12, greedy=True)
    )


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(temperature=0), "temperature=0"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(temperature=float("nan")), "temperature=nan"),
        (dict(top_k=0), "top_k=0"),
        (dict(top_k=66), "top_k=66"),
        (dict(top_k=2.5), "top_k=2.5"),
    ],
)
def test_generate_bad_arguments(tiny_config, kwargs, named):
    """Non-positive temperatures and top_k outside 1..V raise ValueError naming them."""
    model = ml.GPT(tiny_config)
    with pytest.raises(
        (ValueError, TypeError),  # TypeError: wrong kind
        match=named,
    ):
        model.generate(np.array([[1]]), 3, **kwargs)


# ------------------------------------------------------------------------- dropout
def test_dropout_train_random_eval_deterministic(tiny_config):
    """With dropout>0, training mode changes logits per call; eval mode is fixed and
    equals a dropout-0 model with the same weights."""
    cfg = ml.GPTConfig(**{**tiny_config.to_dict(), "dropout": 0.2})
    model = random_model(cfg, dtype="float64")
    plain = ml.GPT(tiny_config, seed=5, dtype="float64")
    plain.load_state_dict(model.state_dict())
    idx, targets = batch(cfg, 8)
    assert model.training  # a new model starts in training mode, as in PyTorch
    t1, t2 = model.forward(idx), model.forward(idx)
    assert not np.allclose(t1, t2)
    assert model.eval() is model and not model.training
    e1, e2 = model.forward(idx), model.forward(idx)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(e1, plain.forward(idx))
    assert not np.allclose(t1, e1)
    assert model.loss(idx, targets) == plain.loss(idx, targets)
    assert model.train() is model and model.training
    assert not np.allclose(model.forward(idx), e1)


def test_dropout_model_gradients_with_fixed_masks(tiny_config):
    """With dropout on and the generator reseeded before each loss, gradients pass."""
    cfg = ml.GPTConfig(**{**tiny_config.to_dict(), "dropout": 0.3})
    model = random_model(cfg, seed=2)
    idx, targets = batch(cfg, 9)

    def loss_fn():
        model.reseed(11)  # the same masks every call
        return model.loss(idx, targets)  # training mode: dropout on

    loss_fn()
    model.backward()
    grads = dict(model.grads)
    names = ["wte.weight", "wpe.weight", "h.0.attn.q.weight", "h.1.mlp.proj.weight", "ln_f.bias"]
    results = check_gradients(loss_fn, {n: model.params[n] for n in names}, grads)
    assert all(r.passed(TOL) and not r.zero for r in results), format_report(results)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_refused(tiny_config, bad):
    model = ml.GPT(tiny_config)
    state = model.state_dict()
    state["h.1.mlp.fc.weight"][3, 4] = bad
    before = model.state_dict()
    with pytest.raises(ValueError, match="h.1.mlp.fc.weight contains NaN or inf"):
        model.load_state_dict(state)
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_a_model_beyond_memory_fails_before_allocating():
    huge = ml.GPTConfig(vocab_size=96, block_size=64, n_layer=100_000, n_head=4, d_model=1024)
    with pytest.raises(ValueError, match=r"needs about [\d,.]+ GB"):
        ml.GPT(huge)


# -------------------------------------------------------------------- modes
def test_train_and_eval_set_the_mode_and_nothing_else(tiny_config):
    """model.train() / model.eval() as in PyTorch: they return the model, only bools are
    modes, and forward/loss take no per-call train flag any more."""
    model = ml.GPT(tiny_config)
    assert model.training is True
    assert model.eval() is model and model.training is False
    assert model.train() is model and model.training is True
    assert model.train(False) is model and model.training is False
    with pytest.raises(TypeError, match="mode='yes' must be True or False"):
        model.train("yes")
    assert model.training is False
    idx, targets = batch(tiny_config, 1)
    with pytest.raises(TypeError, match="train"):
        model.forward(idx, train=True)
    with pytest.raises(TypeError, match="train"):
        model.loss(idx, targets, train=True)


def test_generate_runs_without_dropout_in_either_mode(tiny_config):
    """Sampling is inference: the same tokens in training and eval mode, mode kept."""
    model = random_model(ml.GPTConfig(**{**tiny_config.to_dict(), "dropout": 0.5}))
    idx, _ = batch(tiny_config, 2)
    in_training = model.generate(idx[:, :4], 6, seed=1)
    assert model.training
    in_eval = model.eval().generate(idx[:, :4], 6, seed=1)
    assert not model.training
    np.testing.assert_array_equal(in_training, in_eval)
