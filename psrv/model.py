"""A finished run as a model: psrv.load(run_dir) -> predict, predict_proba, score. Reads the run's outputs only
(config.toml, theta.npy, data.json); never trains and never starts a process.

data.json, when the run wrote one, says how the run's rows were made from the file (written by the CSV reader):
    {"classes": [original labels, in the order of 0..K-1] or null,
     "impute_means": [one per input column] or null,     (data.nan_policy = "impute": NaN -> the training mean)
     "columns": [names of the input columns used, in order] or null,
     "fields": [every column of the CSV, by name (or index, without a header)] or null}
A missing file, or a null or missing key, means: labels are 0..K-1 as given, no imputation, columns as in the file.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

import numpy as np

from . import config as config_mod
from . import data, models, sources
from .errors import ConfigError, DataError, PsrvError


class Model:
    """theta of a finished run, applied to new rows as given (not standardized: theta.npy refers to the raw data).

    Attributes: kind (model.kind), theta (as in theta.npy), fit_intercept, d (input columns), classes (the labels
    predict returns, or None for linear), columns (names of the input columns, or None), metric_name (what score
    returns: "r2" or "accuracy", as in summary.json)."""

    def __init__(self, kind: str, theta: np.ndarray, fit_intercept: bool = True, classes=None,
                 impute_means=None, columns=None, custom=None):
        self.kind, self.theta, self.fit_intercept = kind, np.asarray(theta, dtype=np.float64), fit_intercept
        self.d = len(self.theta) - int(fit_intercept)
        self.custom = custom
        if custom is not None:
            self.d = len(columns) if columns else -1   # a custom theta's layout is its own: no width to check
            self._glm = None
            self.metric_name = getattr(custom, "metric_name", "loss")
        else:
            k = self.theta.shape[1] if self.theta.ndim == 2 else 0
            self._glm = models.make(kind, self.d, fit_intercept, np.float64, k)
            self.metric_name = self._glm.metric_name
            if classes is None and kind != "linear":
                classes = list(range(max(k, 2)))   # 0..K-1 as given
        self.classes = None if classes is None else np.asarray(classes)
        self.impute_means = None if impute_means is None else np.asarray(impute_means, dtype=np.float64)
        self.columns = columns
        self.data_config, self.saved = None, {}   # the run's [data] config and data.json (load() sets them): read()

    # ------------------------------------------------------------------ the rows
    def _inputs(self, X) -> np.ndarray:
        """X as float64 rows x d, missing values imputed when the run imputed them; DataError naming the problem."""
        try:
            X = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DataError(f"X: cannot be read as numbers: {e}") from None
        if X.ndim != 2 or (self.d >= 0 and X.shape[1] != self.d):
            want = f"{self.d} columns" if self.d >= 0 else "rows x columns"
            raise DataError(f"X: expected a 2-D array with {want} (as the run trained on), got shape {X.shape}")
        bad = ~np.isfinite(X)
        if self.impute_means is not None and bad.any():
            X = np.where(np.isnan(X), self.impute_means, X)  # the training means, as data.nan_policy = "impute" did
            bad = ~np.isfinite(X)
        if bad.any():
            row = int(np.argmax(bad.any(axis=1)))
            raise DataError(f"X: {int(bad.any(axis=1).sum())} rows have NaN or Inf; the first is row {row} "
                            f"(0-based); the model cannot predict them")
        return X

    def _labels_to_index(self, y) -> np.ndarray:
        """Original labels -> 0..K-1 (as the run trained on); DataError for a label the run never saw."""
        y = np.asarray(y)
        if self.classes is None or self.classes.dtype.kind in "fiub" and np.array_equal(
                self.classes, np.arange(len(self.classes))):
            return y.astype(np.float64)
        order = np.argsort(self.classes)
        pos = np.searchsorted(self.classes, y, sorter=order)
        pos = np.minimum(pos, len(order) - 1)
        idx = order[pos]
        unknown = self.classes[idx] != y
        if unknown.any():
            raise DataError(f"y: {int(unknown.sum())} labels are not among the run's classes "
                            f"{self.classes.tolist()[:20]}; the first is {y[int(np.argmax(unknown))]!r}")
        return idx.astype(np.float64)

    # ------------------------------------------------------------------ what a user calls
    def decision_function(self, X) -> np.ndarray:
        """z = X.W + b: the prediction (linear), the log-odds of class 1 (logistic), one score per class (softmax)."""
        if self.custom is not None:
            raise PsrvError(f"model.kind = {self.kind!r} is a model of your own: use predict()")
        X = self._inputs(X)
        z = X @ self.theta[:self.d]
        return z + self.theta[self.d] if self.fit_intercept else z

    def predict(self, X) -> np.ndarray:
        """Predicted values (linear) or labels (logistic, softmax: the run's original labels when it mapped them)."""
        if self.custom is not None:
            f = getattr(self.custom, "predict", None)
            if f is None:
                raise PsrvError(f"model.kind = {self.kind!r} has no predict(theta, X) method; add one to use "
                                f"predict (docs/models.md)")
            return np.asarray(f(self.theta, self._inputs(X)))
        z = self.decision_function(X)
        if self.kind == "linear":
            return z
        idx = (z > 0).astype(np.intp) if self.kind == "logistic" else np.argmax(z, axis=1)
        return self.classes[idx]

    def predict_proba(self, X) -> np.ndarray:
        """rows x K probabilities, columns in the order of `classes` (logistic: P(class 0), P(class 1))."""
        if self.kind not in ("logistic", "softmax"):
            raise PsrvError(f"predict_proba: model.kind = {self.kind!r} predicts values, not classes; use "
                            f"predict()")
        z = self.decision_function(X)
        if self.kind == "logistic":
            p1 = 0.5 * (1.0 + np.tanh(0.5 * z))   # the sigmoid, without overflow
            return np.column_stack([1.0 - p1, p1])
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=1, keepdims=True)

    def score(self, X, y) -> float:
        """summary.json's metric on these rows: R² (linear), accuracy (logistic, softmax), a custom model's own."""
        X = self._inputs(X)
        y = np.asarray(y)
        if y.ndim != 1 or len(y) != len(X):
            raise DataError(f"y: expected one value per row of X ({len(X)} rows), got shape {y.shape}")
        if self.custom is not None:
            f = getattr(self.custom, "metric", None) or self.custom.loss
            return float(f(self.theta, X, y))
        return float(self._glm.metric(self.theta, X, self._labels_to_index(y)))

    def read(self, path: str) -> tuple[np.ndarray, np.ndarray | None]:
        """(X, y or None) of a file of new rows, read with the run's reader, data options (its config.toml) and
        data.json: a CSV's input columns by name (or position), its text labels, its delimiter, missing inputs
        imputed as the run did. y, in the run's original labels, is there when the file holds the target: a CSV
        with the target column, any svmlight file, a .npz with an array 'y'. Rows are never dropped."""
        if self.data_config is None:
            raise PsrvError("read: this model did not come from psrv.load(run_dir), so it has no data options")
        if not os.path.exists(path):
            raise DataError(f"file not found: {path}")
        ext = os.path.splitext(path)[1].lower()
        if ext == ".npy":
            return sources.load_npy(path, "data"), None
        if ext == ".npz":
            with np.load(path, allow_pickle=False) as f:
                if "X" not in f:
                    raise DataError(f"{path}: a .npz of rows to predict must hold an array 'X' (and 'y' to score)")
                return f["X"], (f["y"] if "y" in f else None)
        if ext != ".csv":
            X, y, _ = sources.read_file(path, "", "", max(self.d, 0))
            return X, y
        X, y = data.read_new(self.data_config, self.saved, path)
        if y is not None and self.classes is not None and self.classes.dtype.kind not in "fiub":
            # read_new gives the run's class indices; score() takes the labels as the file writes them
            if np.isnan(y).any():
                raise DataError(f"{path}: {int(np.isnan(y).sum())} rows have no label; leave them out to score")
            y = self.classes[y.astype(np.intp)]
        return X, y


def read_data_json(run_dir: str) -> dict:
    """data.json's keys, each None when the file or the key is missing; DataError when it is unreadable."""
    out = {"classes": None, "impute_means": None, "columns": None, "fields": None}
    path = os.path.join(run_dir, "data.json")
    if not os.path.exists(path):
        return out
    try:
        with open(path) as fh:
            got = json.load(fh)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if not isinstance(got, dict):
        raise DataError(f"{path}: expected a JSON object with classes, impute_means and columns")
    for key in out:
        v = got.get(key)
        if v is not None and not isinstance(v, list):
            raise DataError(f"{path}: {key} must be a list or null, got {type(v).__name__}")
        out[key] = v
    return out


def load(run_dir: str) -> Model:
    """The model a finished run wrote to run_dir (its output.dir). ConfigError naming what is missing."""
    cfg_path, theta_path = os.path.join(run_dir, "config.toml"), os.path.join(run_dir, "theta.npy")
    for p in (cfg_path, theta_path):
        if not os.path.exists(p):
            raise ConfigError(f"{run_dir}: not a finished psrv run ({os.path.basename(p)} is missing)")
    cfg = config_mod.load(cfg_path)
    theta = np.load(theta_path, allow_pickle=False)
    meta = read_data_json(run_dir)
    kind = cfg.model.kind
    if kind in config_mod.SPARSE_MODELS:
        raise ConfigError(f"{run_dir}: a {kind} run; psrv.load and `launch.py predict` read dense rows and do not "
                          f"serve sparse models yet: its theta.npy holds the d bucket weights, then the bias "
                          f"(docs/sparse.md)")
    custom = None
    if kind not in config_mod.BUILTIN_MODELS:
        try:
            custom = models.load_custom(kind)
        except ConfigError as e:
            raise ConfigError(f"{run_dir}: cannot rebuild the run's own model {kind!r} ({e}); make its module "
                              f"importable here (e.g. PYTHONPATH) to use it") from None
    if meta["columns"] is not None and custom is None and len(meta["columns"]) != len(theta) - int(
            cfg.model.fit_intercept):
        raise DataError(f"{run_dir}: data.json names {len(meta['columns'])} input columns; theta.npy has "
                        f"{len(theta)} rows")
    m = Model(kind, theta, cfg.model.fit_intercept, meta["classes"], meta["impute_means"], meta["columns"], custom)
    m.data_config, m.saved = cfg.data, meta
    return m


# ---------------------------------------------------------------------------------------------- predict from the CLI
def _write_predictions(pred: np.ndarray, out: str | None) -> None:
    if out and out.lower().endswith(".npy"):
        np.save(out, pred)
        return
    fh = open(out, "w", newline="") if out else sys.stdout
    try:
        w = csv.writer(fh)
        w.writerow(["prediction"])
        w.writerows([[v] for v in (pred.tolist())])
    finally:
        if out:
            fh.close()


def predict_main(argv) -> int:
    """`launch.py predict RUN_DIR --data FILE [--out FILE]`: predictions as CSV (stdout, or --out; .npy by its
    suffix), and the score when the file holds the target. Exit 2 for a usage or data error, as training."""
    p = argparse.ArgumentParser(prog="launch.py predict", description="Predict new rows with a finished run's "
                                "model, reading them with the run's data options (its config.toml).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's output folder")
    p.add_argument("--data", required=True, metavar="FILE", help="rows to predict (.csv, .npz, .npy, svmlight)")
    p.add_argument("--out", metavar="FILE", help="write predictions here (.npy by suffix, else CSV); default stdout")
    args = p.parse_args(argv)
    try:
        m = load(args.run_dir)
        X, y = m.read(args.data)
        pred = m.predict(X)
        _write_predictions(pred, args.out)
        if y is not None:
            # with predictions on stdout, the score goes to stderr so that stdout stays a clean CSV
            print(f"{m.metric_name} {m.score(X, y):.6g} on {len(X)} rows of {args.data}",
                  file=sys.stdout if args.out else sys.stderr)
    except (PsrvError, OSError) as e:
        print(f"psrv: error: {e}", file=sys.stderr)
        return 2
    return 0
