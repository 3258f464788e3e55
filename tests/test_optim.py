"""SGD and AdamW: the update formulas, frozen parameters, weight decay, saved state."""

import numpy as np
import pytest

import minilora as ml

CFG = ml.GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=8)


def make_model(seed=0, dtype="float64"):
    return ml.GPT(CFG, seed=seed, dtype=dtype)


def random_grads(model, rng, names=None):
    """Gradients N(0, 1) for ``names`` (default: every trainable parameter)."""
    names = model.trainable_names() if names is None else names
    return {n: rng.normal(0.0, 1.0, model.params[n].shape) for n in names}


def train_batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, CFG.vocab_size, (2, 6)), rng.integers(0, CFG.vocab_size, (2, 6))


def reference_adamw(p, grads, lr, b1, b2, eps, wd):
    """torch.optim.AdamW's documented algorithm, step by step, in plain NumPy."""
    p = p.copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p = p - lr * wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def test_adamw_matches_reference_formula():
    """Four AdamW steps with weight decay equal the documented formula (decay on
    matrices only); parameters without a gradient do not move."""
    model = make_model()
    lr, betas, eps, wd = 0.05, (0.8, 0.95), 1e-6, 0.1
    opt = ml.AdamW(model, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    names = ["h.0.attn.q.weight", "h.0.attn.q.bias", "h.0.ln_1.weight", "wte.weight"]
    start = model.state_dict()
    rng = np.random.default_rng(1)
    history = []
    for _ in range(4):
        model.grads = random_grads(model, rng, names)
        history.append(model.grads)
        opt.step()
    assert opt.t == 4
    for name in names:
        decay = wd if start[name].ndim == 2 else 0.0
        grads = [h[name] for h in history]
        expected = reference_adamw(start[name], grads, lr, *betas, eps, decay)
        np.testing.assert_allclose(model.params[name], expected, rtol=1e-12, atol=1e-14)
        assert not np.allclose(model.params[name], start[name])
    for name in set(model.params) - set(names):
        np.testing.assert_array_equal(model.params[name], start[name])


def step_both_and_compare(torch, model, opt, tparams, topt, steps):
    """Feed minilora's gradients to both optimizers for ``steps`` steps; weights must agree."""
    for step in range(steps):
        model.loss(*train_batch(step))
        model.backward()
        for name, p in tparams.items():
            p.grad = torch.tensor(model.grads[name])
        opt.step()
        topt.step()
        opt.zero_grad()
    for name, p in tparams.items():
        np.testing.assert_allclose(
            model.params[name], p.detach().numpy(), rtol=1e-10, atol=1e-13, err_msg=name
        )


def test_adamw_matches_torch():
    """Five AdamW steps on real gradients match torch.optim.AdamW (decay on matrices)."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (optional reference)")
    model = make_model()
    lr, wd = 0.01, 0.1
    opt = ml.AdamW(model, lr=lr, weight_decay=wd)
    tparams = {n: torch.tensor(v, requires_grad=True) for n, v in model.state_dict().items()}
    groups = [
        {"params": [p for p in tparams.values() if p.ndim >= 2], "weight_decay": wd},
        {"params": [p for p in tparams.values() if p.ndim < 2], "weight_decay": 0.0},
    ]
    topt = torch.optim.AdamW(groups, lr=lr)
    step_both_and_compare(torch, model, opt, tparams, topt, steps=5)


def test_sgd_without_momentum():
    """Plain SGD: p <- p - lr g at every step."""
    model = make_model()
    opt = ml.SGD(model, lr=0.3)
    start = model.state_dict()
    rng = np.random.default_rng(2)
    g1, g2 = random_grads(model, rng), random_grads(model, rng)
    model.grads = g1
    opt.step()
    model.grads = g2
    opt.step()
    for name in start:
        expected = start[name] - 0.3 * g1[name] - 0.3 * g2[name]
        np.testing.assert_allclose(model.params[name], expected, rtol=1e-13, atol=1e-15)
    assert opt.state == {}  # no momentum, no state


def test_sgd_with_momentum_and_decay():
    """SGD with momentum keeps buf <- mu buf + g (buf_1 = g) and decays matrices first."""
    model = make_model()
    lr, mu, wd = 0.1, 0.9, 0.05
    opt = ml.SGD(model, lr=lr, momentum=mu, weight_decay=wd)
    names = ["h.0.mlp.fc.weight", "h.0.mlp.fc.bias"]
    start = model.state_dict()
    rng = np.random.default_rng(3)
    p = {n: start[n].copy() for n in names}
    buf = {n: np.zeros_like(start[n]) for n in names}
    for _ in range(3):
        model.grads = random_grads(model, rng, names)
        opt.step()
        for n in names:
            if p[n].ndim == 2:
                p[n] = p[n] - lr * wd * p[n]
            buf[n] = mu * buf[n] + model.grads[n]
            p[n] = p[n] - lr * buf[n]
    for n in names:
        np.testing.assert_allclose(model.params[n], p[n], rtol=1e-13, atol=1e-15)
    assert set(opt.state) == set(names)


def test_sgd_momentum_matches_torch():
    """SGD with momentum (no decay) matches torch.optim.SGD over 4 steps."""
    torch = pytest.importorskip("torch", reason="PyTorch is not installed (optional reference)")
    model = make_model()
    opt = ml.SGD(model, lr=0.05, momentum=0.9)
    tparams = {n: torch.tensor(v, requires_grad=True) for n, v in model.state_dict().items()}
    topt = torch.optim.SGD(list(tparams.values()), lr=0.05, momentum=0.9)
    step_both_and_compare(torch, model, opt, tparams, topt, steps=4)


@pytest.mark.parametrize("make_opt", [ml.AdamW, ml.SGD], ids=["AdamW", "SGD"])
def test_frozen_parameters_never_change(make_opt):
    """Frozen parameters keep their values and get no optimizer state; others move."""
    model = make_model()
    model.freeze("h.0.attn.*", "wte.weight")
    frozen = set(model.frozen)
    kwargs = {"momentum": 0.9} if make_opt is ml.SGD else {}
    opt = make_opt(model, lr=0.05, weight_decay=0.1, **kwargs)
    start = model.state_dict()
    for step in range(3):
        model.loss(*train_batch(step))
        model.backward()
        opt.step()
        opt.zero_grad()
    assert model.grads == {}
    for name in model.params:
        if name in frozen:
            np.testing.assert_array_equal(model.params[name], start[name])
        else:
            assert not np.array_equal(model.params[name], start[name]), name
    assert set(opt.state) == set(model.params) - frozen
    assert not any(k.startswith(tuple(f"state.{n}." for n in frozen)) for k in opt.state_dict())


@pytest.mark.parametrize("make_opt", [ml.AdamW, ml.SGD], ids=["AdamW", "SGD"])
def test_weight_decay_only_on_matrices(make_opt):
    """With zero gradients, decay scales every matrix by (1 - lr wd) and leaves biases
    and layer norms exactly as they were."""
    model = make_model()
    lr, wd = 0.1, 0.2
    opt = make_opt(model, lr=lr, weight_decay=wd)
    start = model.state_dict()
    model.grads = {n: np.zeros_like(v) for n, v in model.params.items()}
    opt.step()
    n_matrices = 0
    for name, value in model.params.items():
        if start[name].ndim >= 2:
            n_matrices += 1
            np.testing.assert_allclose(value, (1 - lr * wd) * start[name], rtol=1e-14)
        else:
            np.testing.assert_array_equal(value, start[name])
    assert n_matrices == 2 + 6  # wte, wpe; q k v o fc proj


@pytest.mark.parametrize("make_opt", [ml.AdamW, ml.SGD], ids=["AdamW", "SGD"])
def test_state_dict_round_trip_is_bit_identical(make_opt):
    """Saving the optimizer, loading it into a new one on a copied model, and stepping
    on gives bit-identical parameters to the original run."""
    kwargs = {"momentum": 0.9} if make_opt is ml.SGD else {}
    a = make_model(dtype="float32")
    opt_a = make_opt(a, lr=0.01, weight_decay=0.1, **kwargs)
    for step in range(3):
        a.loss(*train_batch(step))
        a.backward()
        opt_a.step()
    state = opt_a.state_dict()
    assert state["t"] == 3 and state["lr"] == 0.01
    assert all(isinstance(v, np.ndarray) for k, v in state.items() if k.startswith("state."))

    b, fresh = make_model(seed=5, dtype="float32"), make_model(seed=6, dtype="float32")
    b.load_state_dict(a.state_dict())
    fresh.load_state_dict(a.state_dict())
    opt_b = make_opt(b, lr=0.5, weight_decay=0.1, **kwargs)
    opt_b.load_state_dict(state)
    assert opt_b.lr == 0.01 and opt_b.t == 3  # lr and the step count come from the state
    opt_fresh = make_opt(fresh, lr=0.01, weight_decay=0.1, **kwargs)
    for step in range(3, 6):
        for model, opt in ((a, opt_a), (b, opt_b), (fresh, opt_fresh)):
            model.loss(*train_batch(step))
            model.backward()
            opt.step()
    assert opt_b.t == 6
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    # without the saved moments the run differs, so the check above has teeth
    assert not np.array_equal(a.params["h.0.mlp.fc.weight"], fresh.params["h.0.mlp.fc.weight"])


def test_optimizer_state_dict_is_a_copy():
    """Changing a saved state array does not change the optimizer's live state."""
    model = make_model()
    opt = ml.AdamW(model)
    model.loss(*train_batch())
    model.backward()
    opt.step()
    state = opt.state_dict()
    state["state.wte.weight.m"][...] = 123.0
    assert not (opt.state["wte.weight"]["m"] == 123.0).any()


def test_load_state_dict_rejects_bad_state():
    """Unknown parameters or wrong shapes raise ValueError and change nothing."""
    model = make_model()
    opt = ml.AdamW(model)
    with pytest.raises(ValueError, match="h.7.attn.q.weight"):
        opt.load_state_dict({"t": 9, "lr": 1.0, "state.h.7.attn.q.weight.m": np.zeros((8, 8))})
    with pytest.raises(ValueError, match="state.wpe.weight.v"):
        opt.load_state_dict({"t": 9, "lr": 1.0, "state.wpe.weight.v": np.zeros((3, 8))})
    assert opt.t == 0 and opt.lr == 1e-3 and opt.state == {}


BAD_ADAMW = [
    (dict(lr=-1e-3), "lr=-0.001"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(lr=float("inf")), "lr=inf"),
    (dict(lr="0.1"), "lr='0.1'"),
    (dict(lr=True), "lr=True"),
    (dict(betas=(1.0, 0.999)), r"betas\[0\]=1.0"),
    (dict(betas=(-0.1, 0.999)), r"betas\[0\]=-0.1"),
    (dict(betas=(0.9, 1.5)), r"betas\[1\]=1.5"),
    (dict(eps=-1e-8), "eps=-1e-08"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"),
]


@pytest.mark.parametrize(("kwargs", "named"), BAD_ADAMW, ids=[c[1] for c in BAD_ADAMW])
def test_adamw_bad_hyperparameters(kwargs, named):
    """AdamW rejects out-of-range or non-numeric hyper-parameters, naming the value."""
    with pytest.raises(
        (ValueError, TypeError),  # TypeError: wrong kind
        match=named,
    ):
        ml.AdamW(make_model(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        (dict(lr=-0.1), "lr=-0.1"),
        (dict(momentum=1.0), "momentum=1.0"),
        (dict(momentum=-0.5), "momentum=-0.5"),
        (dict(weight_decay=float("nan")), "weight_decay=nan"),
    ],
)
def test_sgd_bad_hyperparameters(kwargs, named):
    """SGD rejects negative lr, momentum outside [0, 1) and bad decay, naming the value."""
    with pytest.raises(ValueError, match=named):
        ml.SGD(make_model(), **kwargs)


def test_numpy_scalar_learning_rate_is_accepted():
    """A NumPy float32 scalar (e.g. from a schedule array) is a valid learning rate."""
    opt = ml.AdamW(make_model(), lr=np.float32(1e-3))
    assert opt.lr == pytest.approx(1e-3)


def test_adamw_betas_of_wrong_length():
    """betas must be a pair; anything else is a ValueError."""
    with pytest.raises(ValueError, match="betas"):
        ml.AdamW(make_model(), betas=(0.9,))


def test_an_adapter_added_again_under_the_same_name_starts_with_fresh_moments():
    """Deleting adapter "a" and adding a new "a": AdamW must not reuse the old moments."""
    model = make_model()
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q",)), "a")
    opt = ml.AdamW(model, lr=1e-2)
    rng = np.random.default_rng(0)
    for _ in range(3):
        random_grads(model, rng)
        opt.step()
    ml.delete_adapter(model, "a")
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q",)), "a")
    fresh = ml.AdamW(model, lr=1e-2)
    fresh.t = opt.t  # the same bias correction, so only the moments can differ
    before = {n: np.array(model.params[n]) for n in model.trainable_names()}
    random_grads(model, np.random.default_rng(1))
    grads = dict(model.grads)
    opt.step()
    after_old = {n: np.array(model.params[n]) for n in model.trainable_names()}
    for n in before:
        model.params[n][...] = before[n]
    model.grads = grads
    fresh.step()
    for n in before:
        np.testing.assert_array_equal(after_old[n], model.params[n], err_msg=n)


# ------------------------------- state validation, re-added adapters, work arrays, decay
def trained_adamw(model, steps=2):
    opt = ml.AdamW(model, lr=1e-2)
    for step in range(steps):
        model.loss(*train_batch(step))
        model.backward()
        opt.step()
    return opt


def snapshot(opt):
    return opt.t, opt.lr, {n: {k: np.array(v) for k, v in s.items()} for n, s in opt.state.items()}


def assert_unchanged(opt, before):
    t, lr, state = before
    assert (opt.t, opt.lr) == (t, lr) and set(opt.state) == set(state)
    for name, slots in state.items():
        assert set(opt.state[name]) == set(slots)
        for key, value in slots.items():
            np.testing.assert_array_equal(opt.state[name][key], value)


def bad_states(good):
    """(label, state, message) for states that must be refused at load."""
    m_only = {k: v for k, v in good.items() if not k.endswith(".v")}
    key = "state.wte.weight.v"
    return [
        ("missing v", m_only, r"slots \['m'\]; AdamW keeps \['m', 'v'\]"),
        ("unknown slot", {**good, "state.wte.weight.u": good[key]}, "no slot 'u'"),
        ("int32 moments", {**good, key: good[key].astype(np.int32)}, "dtype int32"),
        ("NaN moment", {**good, key: np.full_like(good[key], np.nan)}, "NaN or inf"),
        ("1e300 in float32", {**good, key: good[key] + np.float64(1e300)}, "NaN or inf"),
        ("negative v", {**good, key: -good[key] - 1.0}, "state.wte.weight.v is negative"),
        ("wrong shape", {**good, key: good[key][:2]}, "shape"),
        ("unknown key", {**good, "momentum": 0.9}, "key 'momentum' is not known"),
    ]


def test_adamw_load_refuses_a_bad_state_and_changes_nothing():
    """Every check happens at load, with one error; the optimizer is left as it was."""
    model = make_model(dtype="float32")
    opt = trained_adamw(model)
    good = opt.state_dict()
    for _label, state, message in bad_states(good):
        before = snapshot(opt)
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(state)
        assert_unchanged(opt, before)
    with pytest.raises(TypeError, match="optimizer state must be a dict, got list"):
        opt.load_state_dict([])


def test_an_sgd_state_is_refused_by_adamw_at_load():
    model = make_model()
    sgd = ml.SGD(model, lr=1e-2, momentum=0.9)
    model.loss(*train_batch())
    model.backward()
    sgd.step()
    adamw = ml.AdamW(model)
    with pytest.raises(ValueError, match=r"AdamW keeps \['m', 'v'\]"):
        adamw.load_state_dict(sgd.state_dict())
    assert adamw.t == 0 and adamw.state == {}
    with pytest.raises(ValueError, match=r"SGD keeps no slot '[mv]'; its slots: none"):
        ml.SGD(model).load_state_dict(adamw_state := trained_adamw(model).state_dict())
    assert "state.wte.weight.v" in adamw_state


def test_an_adapter_added_again_at_another_rank_keeps_the_optimizer_usable():
    """Delete an adapter and add it again at rank 4: the old rank-2 moments are dropped,
    a saved state loads back, and steps run (they failed with a broadcast error)."""
    model = make_model(dtype="float32")
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q",)), "a")
    opt = trained_adamw(model)
    ml.delete_adapter(model, "a")
    ml.add_adapter(model, ml.LoraConfig(r=4, target_modules=("q",)), "a")
    state = opt.state_dict()
    assert not any(".lora_" in k for k in state)  # the rank-2 moments are gone
    opt.load_state_dict(state)
    for step in range(2):
        model.loss(*train_batch(step))
        model.backward()
        opt.step()
    assert opt.state["h.0.attn.q.lora_A.a"]["m"].shape == (4, 8)
    assert np.isfinite(model.params["h.0.attn.q.lora_A.a"]).all()


def test_load_resets_the_scratch_arrays():
    """A state loaded after an adapter changed rank steps without a broadcast error."""
    model = make_model(dtype="float32")
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q",)), "a")
    opt = trained_adamw(model)  # scratch arrays of rank-2 shapes
    ml.delete_adapter(model, "a")
    ml.add_adapter(model, ml.LoraConfig(r=4, target_modules=("q",)), "a")
    other = trained_adamw(model)
    opt.load_state_dict(other.state_dict())
    model.loss(*train_batch(3))
    model.backward()
    opt.step()
    assert opt.t == other.t + 1


@pytest.mark.parametrize("make_opt", [ml.AdamW, ml.SGD], ids=["AdamW", "SGD"])
def test_an_optimizer_needs_a_model(make_opt):
    with pytest.raises(TypeError, match="model must be a minilora GPT, got NoneType"):
        make_opt(None)


@pytest.mark.parametrize("make_opt", [ml.AdamW, ml.SGD], ids=["AdamW", "SGD"])
def test_weight_decay_reaches_lora_A_and_B(make_opt):
    """Decoupled decay shrinks A and B like any matrix: with zero gradients, both are
    scaled by exactly (1 - lr wd). (An optimizer that exempted them would fail here.)"""
    model = make_model()
    ml.add_adapter(model, ml.LoraConfig(r=2, target_modules=("q", "v")))
    randomise = np.random.default_rng(3)
    for name in model.trainable_names():
        model.params[name][...] = randomise.normal(size=model.params[name].shape)
    lr, wd = 0.1, 0.2
    opt = make_opt(model, lr=lr, weight_decay=wd)
    start = model.state_dict()
    model.grads = {n: np.zeros_like(model.params[n]) for n in model.trainable_names()}
    opt.step()
    names = model.trainable_names()
    assert sorted({n.split(".")[-2] for n in names}) == ["lora_A", "lora_B"]
    for name in names:
        np.testing.assert_allclose(model.params[name], (1 - lr * wd) * start[name], rtol=1e-14)


def test_adamw_defaults_have_one_home():
    """The benchmark and the PyTorch reference read AdamW's defaults from its signature."""
    from minilora.core.optim import ADAMW_DEFAULTS

    assert ADAMW_DEFAULTS == {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
    opt = ml.AdamW(make_model())
    assert (opt.lr, (opt.b1, opt.b2), opt.eps, opt.weight_decay) == tuple(ADAMW_DEFAULTS.values())
