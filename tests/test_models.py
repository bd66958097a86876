import numpy as np
import pytest

from psrv import models, optim
from psrv.errors import ConfigError, DataError


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


def data_for(kind, rng, m=40, d=4):
    X = rng.standard_normal((m, d))
    if kind == "linear":
        return X, rng.standard_normal(m)
    if kind == "logistic":
        return X, (rng.random(m) < 0.5).astype(float)
    return X, rng.integers(0, 3, m).astype(float)


@pytest.mark.parametrize("kind", ["linear", "logistic", "softmax"])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_gradients_match_finite_differences(kind, fit_intercept):
    rng = np.random.default_rng(2)
    X, y = data_for(kind, rng)
    m = models.make(kind, 4, fit_intercept, np.float64, classes=3 if kind == "softmax" else 0)
    theta = rng.standard_normal(m.theta_shape)
    g = np.empty_like(theta)
    loss = m.loss_grad(theta, X, y, g)
    np.testing.assert_allclose(g, finite_diff(lambda t: m.loss(t, X, y), theta), rtol=1e-6, atol=1e-8)
    assert loss == pytest.approx(m.loss(theta, X, y), rel=1e-12)


def test_logistic_and_softmax_losses_against_direct_formulas():
    rng = np.random.default_rng(3)
    X, y = data_for("logistic", rng)
    t = rng.standard_normal(5)
    p = 1 / (1 + np.exp(-(X @ t[:4] + t[4])))
    expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert models.make("logistic", 4).loss(t, X, y) == pytest.approx(expected, rel=1e-12)
    X, y = data_for("softmax", rng)
    W = rng.standard_normal((5, 3))
    Z = X @ W[:4] + W[4]
    P = np.exp(Z) / np.exp(Z).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(P[np.arange(len(y)), y.astype(int)]))
    assert models.make("softmax", 4, classes=3).loss(W, X, y) == pytest.approx(expected, rel=1e-12)


def test_extreme_scores_stay_finite():
    X = np.array([[1000.0], [-1000.0]])
    # every row confidently wrong: the loss is the margin, with no overflow on the way
    cases = (("logistic", np.array([0.0, 1.0]), np.array([1.0, 0.0]), 1000.0),
             ("softmax", np.array([1.0, 0.0]), np.array([[1.0, -1.0], [0.0, 0.0]]), 2000.0))
    for kind, y, theta, expected in cases:
        m = models.make(kind, 1, classes=2 if kind == "softmax" else 0)
        g = np.empty(theta.shape)
        loss = m.loss_grad(theta, X, y, g)
        assert np.isfinite(g).all() and loss == pytest.approx(expected, rel=1e-9)


def test_metrics():
    X = np.array([[1.0], [2.0], [3.0], [4.0]])
    lin = models.make("linear", 1)
    assert lin.metric(np.array([2.0, 0.0]), X, 2 * X[:, 0]) == 1.0               # perfect fit
    assert lin.metric(np.array([0.0, 5.0]), X, 2 * X[:, 0]) == pytest.approx(0.0)  # the mean: R^2 = 0
    log = models.make("logistic", 1)
    assert log.metric(np.array([1.0, -2.5]), X, np.array([0, 0, 1, 0.0])) == 0.75
    sm = models.make("softmax", 1, classes=3)
    W = np.array([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0]])   # class 2 wins for every x > 0
    assert sm.metric(W, X, np.array([2, 2, 1, 0.0])) == 0.5


def test_label_checks():
    with pytest.raises(DataError, match="needs labels 0 or 1; 1 rows have others, the first is row 2"):
        models.make("logistic", 1).check_labels(np.array([0, 1, 2.0]), "f.csv")
    with pytest.raises(DataError, match="map -1 to 0"):
        models.make("logistic", 1).check_labels(np.array([-1, 1.0]), "f.csv")
    with pytest.raises(DataError, match="integer labels 0..2; 1 rows have others, the first is row 1 with 0.5"):
        models.make("softmax", 1, classes=3).check_labels(np.array([0, 0.5, 2]), "f.csv")
    with pytest.raises(DataError, match="integer labels 0..2"):
        models.make("softmax", 1, classes=3).check_labels(np.array([0, 3.0]), "f.csv")
    assert models.infer_classes(np.array([0, 4.0, 1]), "f") == 5
    with pytest.raises(DataError):
        models.infer_classes(np.array([0, -1.0]), "f")
    with pytest.raises(ConfigError, match="at least 2 classes"):
        models.make("softmax", 1, classes=1)


class Quadratic:
    """A custom model: L = mean((X.theta - y)^2) / 2, to check the adapter."""
    metric_name = "half_mse"

    def init_theta(self, d):
        return np.full(d, 0.5)

    def loss(self, theta, X, y):
        return float(np.mean((X @ theta - y) ** 2) / 2)

    def grad(self, theta, X, y):
        return X.T @ (X @ theta - y) / len(X)


def test_custom_model_adapter():
    m = models.make("tests.test_models:Quadratic", 3)
    assert m.theta_shape == (3,) and m.metric_name == "half_mse"
    X, y = np.eye(3), np.ones(3)
    g = np.empty(3)
    assert m.loss_grad(m.init_theta(), X, y, g) == pytest.approx(0.125)
    np.testing.assert_allclose(g, [-0.5 / 3] * 3)
    assert m.metric(m.init_theta(), X, y) == pytest.approx(0.125)


@pytest.mark.parametrize("spec,needle", [
    ("nowhere.at_all:Model", "cannot load 'nowhere.at_all:Model': ModuleNotFoundError"),
    ("tests.test_models:Nothing", "AttributeError"),
    ("tests.test_models:finite_diff", "lacks init_theta, loss, grad"),
])
def test_custom_model_errors(spec, needle):
    with pytest.raises(ConfigError) as e:
        models.make(spec, 3)
    assert needle in str(e.value)


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


@pytest.mark.parametrize("schedule", ["constant", "step", "inv_sqrt", "cosine"])
def test_lr_range_is_lr_at_of_each_step(schedule):
    """Group steps' replies carry a step's rates computed at once (lr_range); each is lr_at's, to rounding, across
    decay boundaries and past the end of a cosine schedule."""
    kw = {"decay": 0.5, "decay_every": 100, "lr_min": 0.01}
    for start, count in [(0, 64), (90, 20), (980, 40), (5, 1)]:
        got = optim.lr_range(start, count, 0.1, schedule, 1000, **kw)
        want = [optim.lr_at(start + k, 0.1, schedule, 1000, **kw) for k in range(count)]
        assert len(got) == count and all(type(r) is float for r in got)
        np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        optim.lr_range(0, 3, 0.1, "linear", 1000)


def test_sgd_step_in_place_without_new_arrays():
    theta = np.ones(10_000)
    g = np.full(10_000, 2.0)
    opt = optim.SGD(theta)
    before = id(theta)
    opt.step(theta, g, 0.25)
    assert id(theta) == before and np.allclose(theta, 0.5) and opt.steps == 1


def test_loss_plot_is_optional(tmp_path, monkeypatch):
    import sys

    from psrv import plot
    train, test = [(10, 0.1, 1.0), (20, 0.2, 0.5)], [(20, 0.2, 0.6, 0.9)]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    assert plot.loss_curves(str(tmp_path / "a.png"), train, test, "t") is False
    assert not (tmp_path / "a.png").exists()
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert plot.loss_curves(str(tmp_path / "b.png"), train, test, "t") is True
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def png_width(path) -> int:
    with open(path, "rb") as fh:
        return int.from_bytes(fh.read(24)[16:20], "big")   # the IHDR chunk's width


def test_loss_plot_has_a_held_out_metric_panel_when_there_are_held_out_rows(tmp_path):
    from psrv import plot
    train = [(10, 0.1, 1.0), (20, 0.2, 0.5)]
    assert plot.loss_curves(str(tmp_path / "a.png"), train, [], "t", "r2")
    assert plot.loss_curves(str(tmp_path / "b.png"), train, [(10, 0.1, 0.7, 0.8), (20, 0.2, 0.6, 0.9)], "t", "r2")
    assert (png_width(tmp_path / "a.png"), png_width(tmp_path / "b.png")) == (1000, 1500)   # 2 panels, then 3
