"""Using a finished run: psrv.load -> predict / predict_proba / score, `launch.py predict`, heldout.npy and
data.test_source. Oracles: the formulas of docs/models.md computed here by hand, and summary.json's own metrics."""
import json
import subprocess
import sys

import numpy as np
import pytest

import psrv
from psrv import model as model_mod
from psrv.errors import ConfigError, DataError, PsrvError

from .conftest import LAUNCH, ROOT

BREAST = ROOT / "tests" / "data" / "breast_cancer.csv"


def run_dir(tmp_path, kind, theta, fit_intercept=True, data_json=None, name="run"):
    """A run folder as a finished run leaves it: config.toml, theta.npy (and data.json when given)."""
    d = tmp_path / name
    d.mkdir()
    (d / "config.toml").write_text(f'[model]\nkind = "{kind}"\nfit_intercept = {str(fit_intercept).lower()}\n')
    np.save(d / "theta.npy", np.asarray(theta, dtype=np.float64))
    if data_json is not None:
        (d / "data.json").write_text(json.dumps(data_json))
    return str(d)


RNG = np.random.default_rng(5)
X5 = RNG.standard_normal((40, 3))


def test_linear_predict_and_r2_follow_the_formulas(tmp_path):
    theta = [1.5, -2.0, 0.25, 3.0]
    m = psrv.load(run_dir(tmp_path, "linear", theta))
    assert (m.kind, m.d, m.classes, m.metric_name) == ("linear", 3, None, "r2")
    want = X5 @ np.array(theta[:3]) + 3.0
    np.testing.assert_allclose(m.predict(X5), want, rtol=1e-12)
    y = want + RNG.standard_normal(40)
    r2 = 1 - np.sum((y - want) ** 2) / np.sum((y - y.mean()) ** 2)
    assert m.score(X5, y) == pytest.approx(r2, rel=1e-12)
    with pytest.raises(PsrvError, match="predicts values, not classes"):
        m.predict_proba(X5)


def test_logistic_and_softmax_probabilities_and_labels(tmp_path):
    m = psrv.load(run_dir(tmp_path, "logistic", [1.0, -1.0, 0.5, -0.2]))
    z = X5 @ [1.0, -1.0, 0.5] - 0.2
    p = m.predict_proba(X5)
    np.testing.assert_allclose(p[:, 1], 1 / (1 + np.exp(-z)), rtol=1e-12)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_array_equal(m.predict(X5), (z > 0).astype(int))
    y = (RNG.random(40) < 0.5).astype(float)
    assert m.score(X5, y) == np.mean((z > 0) == (y == 1))

    W = RNG.standard_normal((4, 3))   # (d + 1) x K, the intercept row last
    sm = psrv.load(run_dir(tmp_path, "softmax", W, name="s"))
    Z = X5 @ W[:3] + W[3]
    P = np.exp(Z) / np.exp(Z).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(sm.predict_proba(X5), P, rtol=1e-12)
    np.testing.assert_array_equal(sm.predict(X5), Z.argmax(axis=1))
    np.testing.assert_array_equal(sm.classes, [0, 1, 2])


def test_data_json_maps_labels_back_and_imputes_missing_values(tmp_path):
    W = RNG.standard_normal((4, 3))
    means = [10.0, -1.0, 0.5]
    m = psrv.load(run_dir(tmp_path, "softmax", W, data_json={
        "classes": ["cat", "dog", "emu"], "impute_means": means, "columns": ["a", "b", "c"]}))
    X = X5.copy()
    X[3, 1] = X[7, 0] = np.nan
    filled = np.where(np.isnan(X), means, X)
    want = np.array(["cat", "dog", "emu"])[(filled @ W[:3] + W[3]).argmax(axis=1)]
    np.testing.assert_array_equal(m.predict(X), want)
    y = want.copy()
    y[:10] = "emu"
    assert m.score(X, y) == np.mean(want == y)
    with pytest.raises(DataError, match="not among the run's classes"):
        m.score(X, np.array(["cat"] * 39 + ["yak"]))
    assert m.columns == ["a", "b", "c"]


def test_unusable_rows_and_runs_are_named(tmp_path):
    m = psrv.load(run_dir(tmp_path, "linear", [1.0, 2.0]))
    with pytest.raises(DataError, match="1 columns"):
        m.predict(X5)
    with pytest.raises(DataError, match="row 1"):
        m.predict([[0.0], [np.nan]])   # no imputation without data.json: the row is named
    with pytest.raises(ConfigError, match="config.toml is missing"):
        psrv.load(str(tmp_path))
    gone = run_dir(tmp_path, "nowhere_pkg.mod:Thing", [1.0], name="c")
    with pytest.raises(ConfigError, match="cannot rebuild the run's own model 'nowhere_pkg.mod:Thing'"):
        psrv.load(gone)
    bad = run_dir(tmp_path, "linear", [1.0, 2.0], data_json={"classes": "abc"}, name="j")
    with pytest.raises(DataError, match="classes must be a list"):
        psrv.load(bad)


def test_a_custom_model_predicts_through_its_own_method(tmp_path, monkeypatch):
    (tmp_path / "mymodel.py").write_text(
        "import numpy as np\n"
        "class Twice:\n"
        "    metric_name = 'mae'\n"
        "    def init_theta(self, d): return np.zeros(d)\n"
        "    def loss(self, theta, X, y): return float(np.mean(np.abs(X @ theta - y)))\n"
        "    def grad(self, theta, X, y): return X.T @ np.sign(X @ theta - y) / len(X)\n"
        "    metric = loss\n"
        "    def predict(self, theta, X): return 2 * (X @ theta)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = psrv.load(run_dir(tmp_path, "mymodel:Twice", [1.0, 0.0, -1.0]))
    np.testing.assert_allclose(m.predict(X5), 2 * (X5[:, 0] - X5[:, 2]))
    assert m.score(X5, X5[:, 0] - X5[:, 2]) == pytest.approx(0.0)
    assert m.metric_name == "mae"


# ---------------------------------------------------------------------------------------------- real runs
def read_csv(path):
    A = np.loadtxt(path, delimiter=",", skiprows=1)
    return A[:, :-1], A[:, -1]


@pytest.mark.slow
def test_heldout_rows_reproduce_the_summary_test_metric(tmp_path):
    """heldout.npy names the rows held out; scoring psrv.load's model on exactly those rows of the file gives the
    summary's test metric, and the other rows its training metric."""
    out = tmp_path / "out"
    r = psrv.train({"data": {"source": str(BREAST), "test_fraction": 0.25, "seed": 3},
                    "model": {"kind": "logistic"},
                    "train": {"workers": 2, "steps": 300, "lr": 0.5, "batch_size": 64},
                    "output": {"dir": str(out), "plot": False}})
    X, y = read_csv(BREAST)
    held = np.load(out / "heldout.npy")
    assert held.dtype == np.int64 and len(held) == r.summary["test_rows"] == round(0.25 * len(X))
    assert len(np.unique(held)) == len(held) and held.max() < len(X)
    m = psrv.load(str(out))
    assert m.score(X[held], y[held]) == pytest.approx(r.summary["test_metric"], abs=1e-12)
    train = np.setdiff1d(np.arange(len(X)), held)
    assert m.score(X[train], y[train]) == pytest.approx(r.summary["train_metric"], abs=1e-12)
    assert 0.9 < r.summary["test_metric"] <= 1.0


@pytest.mark.slow
def test_test_source_is_the_held_out_set_and_predict_cli_scores_it(tmp_path):
    X, y = read_csv(BREAST)
    header = BREAST.read_text().splitlines()[0]
    lines = BREAST.read_text().splitlines()[1:]
    (tmp_path / "train.csv").write_text("\n".join([header] + lines[:400]) + "\n")
    (tmp_path / "test.csv").write_text("\n".join([header] + lines[400:]) + "\n")
    (tmp_path / "new.csv").write_text("\n".join([header.rsplit(",", 1)[0]]
                                                + [ln.rsplit(",", 1)[0] for ln in lines[400:]]) + "\n")
    out = tmp_path / "out"
    r = psrv.train({"data": {"source": str(tmp_path / "train.csv"), "test_source": str(tmp_path / "test.csv")},
                    "model": {"kind": "logistic"}, "train": {"workers": 1, "steps": 200, "lr": 0.5},
                    "output": {"dir": str(out), "plot": False}})
    assert r.summary["rows"] == 400 and r.summary["test_rows"] == len(X) - 400
    np.testing.assert_array_equal(np.load(out / "heldout.npy"), np.arange(len(X) - 400))
    m = psrv.load(str(out))
    assert m.score(X[400:], y[400:]) == pytest.approx(r.summary["test_metric"], abs=1e-12)
    Xr, yr = m.read(str(tmp_path / "test.csv"))   # the run's reader: the same rows
    np.testing.assert_array_equal(Xr, X[400:])
    np.testing.assert_array_equal(yr, y[400:])
    assert m.read(str(tmp_path / "new.csv"))[1] is None

    # the CLI: with the target, predictions to a file and the score on stdout
    p = subprocess.run([sys.executable, LAUNCH, "predict", str(out), "--data", str(tmp_path / "test.csv"),
                        "--out", str(tmp_path / "p.csv")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"accuracy {r.summary['test_metric']:.6g} on {len(X) - 400} rows of " \
                               f"{tmp_path / 'test.csv'}"
    pred = np.loadtxt(tmp_path / "p.csv", skiprows=1)
    np.testing.assert_array_equal(pred, m.predict(X[400:]))
    # without the target: no score; predictions on stdout as CSV, or .npy by --out's suffix
    p = subprocess.run([sys.executable, LAUNCH, "predict", str(out), "--data", str(tmp_path / "new.csv")],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    lines_out = p.stdout.splitlines()
    assert lines_out[0] == "prediction" and [float(v) for v in lines_out[1:]] == m.predict(X[400:]).tolist()
    p = subprocess.run([sys.executable, LAUNCH, "predict", str(out), "--data", str(tmp_path / "new.csv"), "--out",
                        str(tmp_path / "p.npy")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout == ""
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), m.predict(X[400:]))
    p = subprocess.run([sys.executable, LAUNCH, "predict", str(tmp_path), "--data", "new.csv"],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and "not a finished psrv run" in p.stderr


def test_test_source_with_test_fraction_or_synthetic_data_is_refused():
    with pytest.raises(ConfigError, match="not both"):
        psrv.load_config({"data": {"source": "a.csv", "test_source": "b.csv", "test_fraction": 0.2}})
    with pytest.raises(ConfigError, match="needs a file data.source"):
        psrv.load_config({"data": {"test_source": "b.csv"}})


def test_model_module_does_not_need_a_run_to_read_data_json(tmp_path):
    assert model_mod.read_data_json(str(tmp_path)) == {"classes": None, "impute_means": None, "columns": None,
                                                       "fields": None}
