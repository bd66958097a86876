"""psrv.optim against a serial reference written here from the update rules; closed forms; checkpoints; allocation."""
import tracemalloc

import numpy as np
import pytest

from psrv import config, optim

HYPER = {"momentum": 0.9, "nesterov": False, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}

# (optimizer name, the hyper-parameters that differ from HYPER)
CASES = [("sgd", {}), ("momentum", {}), ("momentum", {"nesterov": True}), ("adagrad", {}), ("adam", {})]
CASE_IDS = ["sgd", "momentum", "nesterov", "adagrad", "adam"]


def build(name, theta, **changes):
    h = {**HYPER, **changes}
    return optim.OPTIMIZERS[name](theta, **{k: h[k] for k in optim.OPTIMIZERS[name].hyper})


def reference(name, h, theta0, grads, lrs):
    """theta after each step, by the rules of the brief, serially in float64 with fresh arrays every time."""
    theta = theta0.astype(np.float64)
    a = np.zeros_like(theta)  # velocity, sum of squares, or Adam's m
    b = np.zeros_like(theta)  # Adam's v
    out = []
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        g = g.astype(np.float64)
        if name == "sgd":
            theta = theta - lr * g
        elif name == "momentum":
            a = h["momentum"] * a + g
            theta = theta - lr * (g + h["momentum"] * a if h["nesterov"] else a)
        elif name == "adagrad":
            a = a + g * g
            theta = theta - lr * g / (np.sqrt(a) + h["eps"])
        elif name == "adam":
            a = h["beta1"] * a + (1 - h["beta1"]) * g
            b = h["beta2"] * b + (1 - h["beta2"]) * g * g
            mhat, vhat = a / (1 - h["beta1"] ** t), b / (1 - h["beta2"] ** t)
            theta = theta - lr * mhat / (np.sqrt(vhat) + h["eps"])
        out.append(theta)
    return out


def problem(shape, dtype, n_steps=20, seed=0):
    """theta0, a fixed sequence of gradients and a varying lr. One coordinate never gets a gradient, so the eps
    path (0 / (0 + eps)) is exercised too."""
    rng = np.random.default_rng(seed)
    theta0 = rng.standard_normal(shape).astype(dtype)
    grads = rng.standard_normal((n_steps, *shape)).astype(dtype)
    grads.reshape(n_steps, -1)[:, 0] = 0
    lrs = rng.uniform(0.01, 0.2, n_steps)
    return theta0, grads, lrs


def near_zero_atol(want, rtol):
    """Rounding error scales with the size of the terms a coordinate was summed from (theta0 and the steps, O(1)
    here), not with its final value: a coordinate that ends near 0 has a large relative error yet is right. So
    allow rtol times the largest |theta| as absolute slack; every coordinate away from 0 is still held to rtol."""
    return rtol * float(np.abs(want).max())


@pytest.mark.parametrize("name,changes", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(7,), (3, 5)], ids=["vector", "matrix"])
def test_matches_serial_reference_every_step(name, changes, dtype, shape):
    theta0, grads, lrs = problem(shape, dtype)
    theta = theta0.copy()
    opt = build(name, theta, **changes)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for t, (g, lr, want) in enumerate(zip(grads, lrs, reference(name, {**HYPER, **changes}, theta0, grads, lrs)), 1):
        opt.step(theta, g, lr)
        assert theta.dtype == dtype and theta.shape == shape and opt.steps == t
        np.testing.assert_allclose(theta, want, rtol=rtol, atol=near_zero_atol(want, rtol), err_msg=f"{name} step {t}")
    assert not np.array_equal(theta, theta0)


def test_adam_first_step_is_lr_times_sign():
    # t = 1: mhat = g and vhat = g^2, so the move is lr * g / (|g| + eps), i.e. lr * sign(g) up to eps/|g|.
    rng = np.random.default_rng(1)
    g = rng.choice([-1, 1], 50) * rng.uniform(1e-2, 1e3, 50)
    theta = rng.standard_normal(50)
    before = theta.copy()
    build("adam", theta).step(theta, g, 0.01)
    np.testing.assert_allclose(before - theta, 0.01 * g / (np.abs(g) + HYPER["eps"]), rtol=1e-12)
    # eps / |g| <= 1e-6 here, and the moves are far bigger than theta's rounding
    np.testing.assert_allclose(before - theta, 0.01 * np.sign(g), rtol=2e-6, atol=0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_constant_gradient_geometric_sum(nesterov):
    # v_k = g (1 - mu^k) / (1 - mu); theta moves by lr v_k, or by lr (g + mu v_k) with Nesterov.
    mu, lr, g = 0.9, 0.1, np.array([1.0, -2.0, 0.5])
    theta = np.zeros(3)
    opt = build("momentum", theta, momentum=mu, nesterov=nesterov)
    moved = np.zeros(3)
    for k in range(1, 13):
        opt.step(theta, g, lr)
        v = g * (1 - mu ** k) / (1 - mu)
        np.testing.assert_allclose(opt.state_dict()["arrays"]["velocity"], v, rtol=1e-12)
        moved += lr * (g + mu * v if nesterov else v)
        np.testing.assert_allclose(theta, -moved, rtol=1e-12)


def test_adagrad_constant_gradient_moves_by_lr_over_sqrt_k():
    # G_k = k g^2, so step k moves each coordinate by lr g / (sqrt(k) |g| + eps), about lr sign(g) / sqrt(k).
    g, lr, eps = np.array([3.0, -0.5, 10.0]), 0.1, HYPER["eps"]
    theta = np.zeros(3)
    opt = build("adagrad", theta)
    for k in range(1, 9):
        opt.step(theta, g, lr)
        moved = sum(lr * g / (np.sqrt(j) * np.abs(g) + eps) for j in range(1, k + 1))
        np.testing.assert_allclose(theta, -moved, rtol=1e-12)
        np.testing.assert_allclose(theta, -lr * np.sign(g) * sum(j ** -0.5 for j in range(1, k + 1)), rtol=1e-7)


def test_sgd_constant_gradient():
    theta = np.ones(4, np.float32)
    opt = build("sgd", theta)
    for _ in range(4):
        opt.step(theta, np.full(4, 2.0, np.float32), 0.125)
    np.testing.assert_array_equal(theta, np.zeros(4, np.float32))
    assert opt.state_dict() == {"name": "sgd", "steps": 4, "arrays": {}}


@pytest.mark.parametrize("name,changes", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_state_dict_round_trip_resumes_exactly(name, changes, dtype):
    theta0, grads, lrs = problem((4, 3), dtype, n_steps=10, seed=2)
    theta = theta0.copy()
    opt = build(name, theta, **changes)
    for g, lr in zip(grads[:5], lrs[:5]):
        opt.step(theta, g, lr)
    saved, theta5 = opt.state_dict(), theta.copy()
    assert saved["name"] == name and saved["steps"] == 5
    frozen = {k: a.copy() for k, a in saved["arrays"].items()}
    for g, lr in zip(grads[5:], lrs[5:]):
        opt.step(theta, g, lr)
    for k, a in saved["arrays"].items():  # a copy: later steps did not change what was saved
        np.testing.assert_array_equal(a, frozen[k])

    resumed_theta = theta5.copy()
    resumed = build(name, resumed_theta, **changes)
    resumed.load_state_dict(saved)
    assert resumed.steps == 5
    for g, lr in zip(grads[5:], lrs[5:]):
        resumed.step(resumed_theta, g, lr)
    np.testing.assert_array_equal(resumed_theta, theta)
    assert resumed.steps == opt.steps == 10
    for k, a in opt.state_dict()["arrays"].items():
        np.testing.assert_array_equal(resumed.state_dict()["arrays"][k], a)
    for k, a in saved["arrays"].items():  # loading copied: the restored optimizer does not write into `saved`
        np.testing.assert_array_equal(a, frozen[k])


@pytest.mark.parametrize("name", ["momentum", "adagrad", "adam"])
def test_load_state_dict_refuses_what_does_not_fit(name):
    theta = np.zeros((4, 3))
    opt = build(name, theta)
    opt.step(theta, np.ones((4, 3)), 0.1)
    good = opt.state_dict()
    key = next(iter(good["arrays"]))

    def with_array(a):
        return {**good, "arrays": {**good["arrays"], key: a}}

    fresh = build(name, np.zeros((4, 3)))
    before = fresh.state_dict()
    with pytest.raises(ValueError, match=r"expected <f8 \[4, 3\]"):
        fresh.load_state_dict(with_array(np.zeros((3, 4))))
    with pytest.raises(ValueError, match=r"expected <f8 \[4, 3\]"):
        fresh.load_state_dict(with_array(np.zeros((4, 3), np.float32)))
    with pytest.raises(ValueError, match="arrays"):
        fresh.load_state_dict({**good, "arrays": {}})
    with pytest.raises(ValueError, match="not 'sgd'"):
        optim.SGD(np.zeros((4, 3))).load_state_dict(good)
    with pytest.raises(ValueError, match="steps"):
        fresh.load_state_dict({**good, "steps": -1})
    # a refused state leaves the optimizer as it was
    assert fresh.steps == 0
    for k, a in fresh.state_dict()["arrays"].items():
        np.testing.assert_array_equal(a, before["arrays"][k])


def test_step_refuses_a_gradient_of_another_shape_or_dtype():
    theta = np.zeros(5)
    opt = build("adam", theta)
    with pytest.raises(ValueError, match=r"grad is <f8 \[6\]"):
        opt.step(theta, np.zeros(6), 0.1)
    with pytest.raises(ValueError, match="grad is <f4"):
        opt.step(theta, np.zeros(5, np.float32), 0.1)
    assert opt.steps == 0


@pytest.mark.parametrize("name,changes", CASES, ids=CASE_IDS)
def test_step_updates_in_place_without_allocating(name, changes):
    n = 1_000_000
    rng = np.random.default_rng(3)
    theta = rng.standard_normal(n)
    grad = rng.standard_normal(n)
    opt = build(name, theta, **changes)
    expected = reference(name, {**HYPER, **changes}, theta, [grad] * 10, [0.01] * 10)[-1]
    before_id, before_ptr = id(theta), theta.__array_interface__["data"][0]

    tracemalloc.start()
    try:  # first make sure tracemalloc sees numpy's buffers at all, or the check below would prove nothing
        (theta * 2.0).sum()
        assert tracemalloc.get_traced_memory()[1] >= theta.nbytes
        tracemalloc.reset_peak()
        for _ in range(10):
            opt.step(theta, grad, 0.01)
        peak_nbytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert peak_nbytes < theta.nbytes / 100, f"{name}: step() allocated up to {peak_nbytes} bytes"
    assert id(theta) == before_id and theta.__array_interface__["data"][0] == before_ptr
    np.testing.assert_allclose(theta, expected, rtol=1e-12, atol=near_zero_atol(expected, 1e-12))


def test_make_reads_hyper_parameters_from_train_config():
    body = {"momentum": 0.8, "nesterov": True, "beta1": 0.85, "beta2": 0.95, "eps": 1e-6}
    theta = np.zeros(3)
    for name in ("sgd", "momentum", "adagrad", "adam"):
        train = config.load({"train": {"optimizer": name, **body}}).train
        opt = optim.make(train.optimizer, theta, train)
        assert type(opt) is optim.OPTIMIZERS[name] and opt.name == name
        for k in opt.hyper:
            assert getattr(opt, k) == body[k]
    assert optim.make("momentum", theta, train).nesterov is True


def test_make_knows_every_optimizer_the_config_allows():
    choices = config.Train.__dataclass_fields__["optimizer"].metadata["choices"]
    assert set(choices) == set(optim.OPTIMIZERS) | {"ftrl"}
    train = config.load({"train": {"optimizer": "ftrl", "ftrl_beta": 2.0, "l1": 0.5}}).train
    opt = optim.make("ftrl", np.zeros(3), train, l2=0.25)   # FTRL's L2 is model.l2, passed in
    assert opt.name == "ftrl" and (opt.beta, opt.l1, opt.l2) == (2.0, 0.5, 0.25)


def test_make_rejects_an_unknown_name():
    train = config.load({}).train
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; known: sgd, momentum, adagrad, adam, ftrl"):
        optim.make("rmsprop", np.zeros(3), train)


@pytest.mark.parametrize("name,changes,match", [
    ("adam", {"beta1": 1.0}, r"beta1 must be in \[0, 1\)"),
    ("adam", {"beta2": 1.0}, r"beta2 must be in \[0, 1\)"),
    ("adam", {"eps": 0.0}, "eps must be > 0"),
    ("adagrad", {"eps": 0.0}, "eps must be > 0"),
])
def test_hyper_parameters_that_would_give_nan_are_refused(name, changes, match):
    with pytest.raises(ValueError, match=match):
        build(name, np.zeros(3), **changes)
