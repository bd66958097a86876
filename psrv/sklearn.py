"""scikit-learn estimators that train with psrv: PSRegressor (model.kind = "linear") and PSClassifier ("logistic"
for two classes, "softmax" for more). Each fit() is a real psrv run (a server and train.workers worker processes)
on the arrays given, in a temporary output folder removed afterwards (output_dir= keeps it).

Needs scikit-learn (`pip install 'psrv[sklearn]'`); `import psrv` never imports this module or scikit-learn.

The constructor's parameters map to config keys (lr -> train.lr, steps -> train.steps, epochs -> train.epochs,
batch_size -> train.batch_size, workers -> train.workers, consistency -> train.consistency, optimizer ->
train.optimizer, l2 -> model.l2, seed -> train.seed and data.seed, fit_intercept -> model.fit_intercept); `config`
(a nested dict or a TOML path) sets any other key, and the parameters take precedence over it. On a small data set
batch_size and workers are capped so that every worker's shard holds at least one batch.

Every one of scikit-learn's estimator checks (`sklearn.utils.estimator_checks`, scikit-learn 1.9) passes, so
EXPECTED_FAILED (checks that do not apply, with the reason) is empty; scikit-learn itself skips its array-API check
unless SCIPY_ARRAY_API is set, and its pandas checks without pandas. tests/test_sklearn.py runs the suite: all of it
on PSClassifier, and on PSRegressor all but the checks of code the two share (each fit is a real run, about a
second).
"""
from __future__ import annotations

import shutil
import tempfile

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .launch import train
from .model import load

# estimator checks that do not apply, and why (the expected_failed_checks of parametrize_with_checks)
EXPECTED_FAILED: dict[str, str] = {}


class _PSEstimator(BaseEstimator):
    def __init__(self, lr=0.1, steps=1000, epochs=0, batch_size=64, workers=1, consistency="bsp", optimizer="sgd",
                 l2=0.0, seed=0, fit_intercept=True, config=None, output_dir=None):
        self.lr, self.steps, self.epochs, self.batch_size, self.workers = lr, steps, epochs, batch_size, workers
        self.consistency, self.optimizer, self.l2, self.seed = consistency, optimizer, l2, seed
        self.fit_intercept, self.config, self.output_dir = fit_intercept, config, output_dir

    def _run(self, X, y, kind: str, classes: int = 0):
        """One psrv run on (X, y); sets model_ (a psrv.Model), summary_, coef_/intercept_ in scikit-learn's shapes."""
        n = len(X)
        workers = max(1, min(self.workers, n))      # a shard needs at least one row ...
        batch = max(1, min(self.batch_size, n // workers))   # ... and at least one batch
        out = self.output_dir or tempfile.mkdtemp(prefix="psrv-fit-")
        overrides = [("train", "lr", self.lr), ("train", "steps", self.steps), ("train", "epochs", self.epochs),
                     ("train", "batch_size", batch), ("train", "workers", workers),
                     ("train", "consistency", self.consistency), ("train", "optimizer", self.optimizer),
                     ("train", "seed", self.seed), ("data", "seed", self.seed), ("model", "l2", self.l2),
                     ("model", "fit_intercept", self.fit_intercept), ("model", "kind", kind),
                     ("model", "classes", classes), ("output", "dir", out)]
        if self.output_dir is None:   # nobody would see them; a grid search would print a live-view address per fit
            overrides += [("output", "plot", False), ("output", "live_view", False)]
        try:
            result = train(self.config, overrides, X=X, y=y)
            self.model_ = load(out)
        finally:
            if self.output_dir is None:
                shutil.rmtree(out, ignore_errors=True)
        self.summary_ = result.summary
        theta, d = self.model_.theta, X.shape[1]
        b = theta[d] if self.fit_intercept else np.zeros(theta.shape[1:])
        if kind == "linear":
            self.coef_, self.intercept_ = theta[:d].copy(), float(b)
        elif kind == "logistic":
            self.coef_, self.intercept_ = theta[:d].reshape(1, d).copy(), np.atleast_1d(b).copy()
        else:
            self.coef_, self.intercept_ = theta[:d].T.copy(), np.asarray(b).copy()
        return self

    def _checked(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False)


class PSRegressor(RegressorMixin, _PSEstimator):
    """Linear regression (squared loss) trained by psrv. score(): R²."""

    def fit(self, X, y):
        X, y = validate_data(self, X, y, y_numeric=True)
        return self._run(X, y, "linear")

    def predict(self, X):
        X = self._checked(X)
        return self.model_.predict(X)


class PSClassifier(ClassifierMixin, _PSEstimator):
    """Logistic regression (two classes) or softmax regression (more) trained by psrv; any labels (classes_ in
    sorted order, as scikit-learn's). score(): accuracy."""

    def fit(self, X, y):
        X, y = validate_data(self, X, y)
        check_classification_targets(y)
        self.classes_, idx = np.unique(y, return_inverse=True)
        k = len(self.classes_)
        if k < 2:
            raise ValueError(f"PSClassifier needs samples of at least 2 classes; y has only 1 class "
                             f"({self.classes_[0]!r})")
        return self._run(X, idx.astype(np.float64), "logistic" if k == 2 else "softmax", 0 if k == 2 else k)

    def decision_function(self, X):
        """Binary: the log-odds of classes_[1], one per row; more classes: rows x K scores."""
        X = self._checked(X)
        return self.model_.decision_function(X)

    def predict(self, X):
        X = self._checked(X)
        return self.classes_[self.model_.predict(X)]

    def predict_proba(self, X):
        X = self._checked(X)
        return self.model_.predict_proba(X)
