"""psrv.sklearn: PSRegressor / PSClassifier against scikit-learn's estimator checks, in a Pipeline with GridSearchCV,
and against independent oracles (closed-form least squares; scikit-learn's LogisticRegression on the same split)."""
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="scikit-learn is optional (pip install 'psrv[sklearn]')")

from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GridSearchCV, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from psrv.sklearn import EXPECTED_FAILED, PSClassifier, PSRegressor  # noqa: E402

from .conftest import ROOT  # noqa: E402

BREAST = ROOT / "tests" / "data" / "breast_cancer.csv"
DIGITS = ROOT / "tests" / "data" / "digits.csv"


def test_import_psrv_does_not_import_sklearn():
    code = "import sys, psrv; assert 'sklearn' not in sys.modules, 'psrv imported sklearn'"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr


# Every fit is a real run (a server and a worker process, about a second), so the whole suite on both estimators
# takes two minutes on two idle cores. PSClassifier gets every check; PSRegressor, whose fit/predict plumbing is the
# same base class (validation, the run, pickling, cloning), gets the checks that fit nothing plus those about
# regression, and skips the ones in SHARED_WITH_CLASSIFIER, saying so.
SHARED_WITH_CLASSIFIER = {
    "check_fit_score_takes_y", "check_estimators_overwrite_params", "check_dont_overwrite_parameters",
    "check_estimators_fit_returns_self", "check_readonly_memmap_input", "check_n_features_in_after_fitting",
    "check_positive_only_tag_during_fit", "check_estimators_dtypes", "check_dtype_object",
    "check_pipeline_consistency", "check_estimators_nan_inf", "check_estimators_pickle",
    "check_f_contiguous_array_estimator", "check_methods_sample_order_invariance", "check_methods_subset_invariance",
    "check_fit2d_1feature", "check_dict_unchanged", "check_fit_idempotent", "check_fit_check_is_fitted",
    "check_n_features_in", "check_fit2d_predict1d"}


def check_name(check) -> str:
    return getattr(check, "func", check).__name__


@pytest.mark.slow
@parametrize_with_checks([PSRegressor(steps=300), PSClassifier(steps=300)],
                         expected_failed_checks=lambda est: EXPECTED_FAILED)
def test_sklearn_estimator_checks(estimator, check):
    if isinstance(estimator, PSRegressor) and check_name(check) in SHARED_WITH_CLASSIFIER:
        pytest.skip("the same base-class code as PSClassifier's run of this check (tests/test_sklearn.py)")
    check(estimator)


@pytest.mark.slow
def test_regressor_matches_closed_form_least_squares():
    """Full-batch gradient descent on a well-conditioned problem converges to the least-squares solution, which
    numpy's lstsq gives independently."""
    rng = np.random.default_rng(2)
    X = rng.standard_normal((300, 5)) * [1.0, 2.0, 0.5, 3.0, 1.0] + [0.0, 1.0, -2.0, 0.5, 4.0]
    y = X @ [0.5, -1.0, 2.0, 0.25, 1.5] - 3.0 + 0.3 * rng.standard_normal(300)
    est = PSRegressor(lr=0.3, steps=300, batch_size=300, config={"train": {"lr_schedule": "constant"}}).fit(X, y)
    sol = np.linalg.lstsq(np.c_[X, np.ones(len(X))], y, rcond=None)[0]
    np.testing.assert_allclose(est.coef_, sol[:5], rtol=0, atol=1e-6)
    assert abs(est.intercept_ - sol[5]) < 1e-6
    assert est.n_features_in_ == 5 and est.summary_["workers"] == 1
    np.testing.assert_allclose(est.predict(X), np.c_[X, np.ones(300)] @ sol, atol=1e-5)


def read(path):
    A = np.loadtxt(path, delimiter=",", skiprows=1)
    return A[:, :-1], A[:, -1]


@pytest.mark.slow
@pytest.mark.parametrize("path, labels", [(BREAST, ("malignant", "benign")), (DIGITS, None)])
def test_classifier_accuracy_is_comparable_to_logistic_regression(path, labels):
    X, y = read(path)
    if labels:  # string labels: classes_ and predict speak them
        y = np.array(labels)[y.astype(int)]
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    ps = PSClassifier(lr=0.2, steps=1500, batch_size=64, workers=2, optimizer="adam",
                      config={"train": {"lr_schedule": "cosine"}}).fit(Xtr, ytr)
    sk = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(Xtr, ytr)
    acc_ps, acc_sk = ps.score(Xte, yte), sk.score(Xte, yte)
    assert acc_ps >= acc_sk - 0.03, (acc_ps, acc_sk)
    np.testing.assert_array_equal(ps.classes_, np.unique(y))
    k = len(ps.classes_)
    assert ps.coef_.shape == ((1 if k == 2 else k), X.shape[1])
    assert set(np.unique(ps.predict(Xte))) <= set(ps.classes_)
    np.testing.assert_allclose(ps.predict_proba(Xte).sum(axis=1), 1.0)


@pytest.mark.slow
def test_pipeline_with_grid_search_over_lr(tmp_path):
    rng = np.random.default_rng(8)
    X = rng.standard_normal((120, 3)) * [10.0, 0.1, 1.0]
    y = X @ [0.2, 30.0, -1.0] + 0.1 * rng.standard_normal(120)
    pipe = make_pipeline(StandardScaler(), PSRegressor(steps=100, batch_size=16, workers=2))
    grid = GridSearchCV(pipe, {"psregressor__lr": [1e-4, 0.1]}, cv=2).fit(X, y)
    assert grid.best_params_ == {"psregressor__lr": 0.1}   # 1e-4 barely moves from theta = 0 in 100 steps
    assert grid.score(X, y) > 0.99
    scores = grid.cv_results_["mean_test_score"]
    assert scores[1] > 0.99 > scores[0]
    # output_dir keeps the run's folder, which psrv.load reads like any run
    kept = PSRegressor(steps=100, output_dir=str(tmp_path / "run")).fit(X, y)
    assert (tmp_path / "run" / "theta.npy").exists() and (tmp_path / "run" / "summary.json").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "run" / "theta.npy")[:3], kept.coef_)
