import numpy as np
import pytest

from psrv import models, optim


def finite_diff(f, theta, eps=1e-6):
    g = np.zeros_like(theta)
    for i in np.ndindex(theta.shape):
        t1, t2 = theta.copy(), theta.copy()
        t1[i] += eps
        t2[i] -= eps
        g[i] = (f(t1) - f(t2)) / (2 * eps)
    return g


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_linear_gradient_matches_finite_differences(fit_intercept):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((30, 4)), rng.standard_normal(30)
    m = models.Linear(4, fit_intercept)
    theta = rng.standard_normal(m.theta_shape)
    g = np.empty_like(theta)
    loss = m.loss_grad(theta, X, y, g)
    np.testing.assert_allclose(g, finite_diff(lambda t: m.loss(t, X, y), theta), rtol=1e-6, atol=1e-8)
    assert loss == pytest.approx(m.loss(theta, X, y), rel=1e-12)
    # the formula from the brief, written independently: 2/b X^T (X theta - y)
    A = np.c_[X, np.ones(30)] if fit_intercept else X
    np.testing.assert_allclose(g, 2 / 30 * A.T @ (A @ theta - y), rtol=1e-12)


def test_loss_over_blocks_equals_direct():
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((200_000, 3)), rng.standard_normal(200_000)
    m = models.Linear(3, True)
    theta = np.array([1.0, -2.0, 0.5, 0.1])
    assert m.loss(theta, X, y) == pytest.approx(np.mean((X @ theta[:3] + 0.1 - y) ** 2), rel=1e-12)


def test_float32_model_keeps_float32():
    m = models.Linear(2, True, np.float32)
    X = np.ones((5, 2), np.float32)
    g = np.empty(3, np.float32)
    m.loss_grad(m.init_theta(), X, np.ones(5, np.float32), g)
    assert g.dtype == np.float32 and m.init_theta().dtype == np.float32


@pytest.mark.parametrize("schedule,step,expected", [
    ("constant", 500, 0.1),
    ("step", 0, 0.1), ("step", 99, 0.1), ("step", 100, 0.05), ("step", 250, 0.025),
    ("inv_sqrt", 0, 0.1), ("inv_sqrt", 300, 0.05),
    ("cosine", 0, 0.1), ("cosine", 500, 0.055), ("cosine", 1000, 0.01),
])
def test_lr_schedules(schedule, step, expected):
    lr = optim.lr_at(step, 0.1, schedule, total_steps=1000, decay=0.5, decay_every=100, lr_min=0.01)
    assert lr == pytest.approx(expected)


def test_sgd_step_in_place_without_new_arrays():
    theta = np.ones(10_000)
    g = np.full(10_000, 2.0)
    opt = optim.SGD(theta)
    before = id(theta)
    opt.step(theta, g, 0.25)
    assert id(theta) == before and np.allclose(theta, 0.5) and opt.steps == 1
