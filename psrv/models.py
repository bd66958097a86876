"""Models: mean loss and its gradient on a mini-batch, in numpy, stateless apart from reused scratch buffers.

theta's layout is shared by the built-in models: one row per feature, then the intercept row when fit_intercept is
true; a vector for linear and logistic, a (rows x K) matrix for softmax. Workers call loss_grad(); the server calls
loss() and metric() for evaluation; the launcher calls check_labels() once on the data.
"""
from __future__ import annotations

import importlib

import numpy as np

from .errors import ConfigError, DataError

BLOCK_ROWS = 65536  # loss() and metric() walk the rows in blocks, so evaluation never makes a full-size temporary


class _Glm:
    """What the built-in models share: z = X.W + b, a loss on z, and dL/dz -> dL/dtheta."""

    kind = ""
    metric_name = ""

    def __init__(self, d: int, fit_intercept: bool = True, dtype=np.float64, classes: int = 0):
        self.d, self.fit_intercept, self.dtype = d, fit_intercept, np.dtype(dtype)
        self.k = classes  # output columns; 0 for a vector theta
        rows = d + int(fit_intercept)
        self.theta_shape = (rows,) if classes == 0 else (rows, classes)
        self._z = np.empty(0, dtype=self.dtype)
        self._z_of: dict[int, np.ndarray] = {}   # rows -> the view of _z that holds their scores
        self.l2_rows = d  # the L2 term penalizes the weights, never the intercept row

    def init_theta(self) -> np.ndarray:
        return np.zeros(self.theta_shape, dtype=self.dtype)

    def _scores(self, theta: np.ndarray, X: np.ndarray) -> np.ndarray:
        """z = X.W (+ b) into a reused buffer."""
        m = len(X)
        z = self._z_of.get(m)   # the view for m rows, made once (batches mostly have one size)
        if z is None:
            size = m * max(self.k, 1)
            if self._z.size < size:
                self._z = np.empty(size, dtype=self.dtype)
                self._z_of.clear()
            z = self._z_of[m] = self._z[:size].reshape((m, self.k) if self.k else (m,))
        np.matmul(X, theta[:self.d] if self.fit_intercept else theta, out=z)
        if self.fit_intercept:
            z += theta[self.d]
        return z

    def loss_grad(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, out: np.ndarray) -> float:
        """Write the gradient of the batch's mean loss into `out`; return that mean loss."""
        m = len(X)
        z = self._scores(theta, X)
        loss = self._loss_dz(z, y)  # turns z into dL/dz (per row, not yet divided by m)
        w = out[:self.d] if self.fit_intercept else out
        np.matmul(X.T, z, out=w)
        w *= 1.0 / m
        if self.fit_intercept:
            out[self.d] = z.sum(axis=0) / m
        return loss / m

    def loss(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        total = 0.0
        for lo in range(0, len(X), BLOCK_ROWS):
            total += self._loss_dz(self._scores(theta, X[lo:lo + BLOCK_ROWS]), y[lo:lo + BLOCK_ROWS])
        return total / max(len(X), 1)

    def check_labels(self, y: np.ndarray, source: str) -> None:
        """Raise DataError when labels do not fit the model."""

    def _loss_dz(self, z: np.ndarray, y: np.ndarray) -> float:
        raise NotImplementedError


class Linear(_Glm):
    """Linear regression: L = mean((z - y)^2), dL/dz = 2 (z - y)."""

    kind, metric_name = "linear", "r2"

    def _loss_dz(self, z, y):
        z -= y
        loss = float((z if z.dtype == np.float64 else z.astype(np.float64)) @ z)
        z *= 2.0
        return loss

    def metric(self, theta, X, y) -> float:
        """R^2 = 1 - SSE / SST (0 when y is constant and the fit is not exact)."""
        sse = self.loss(theta, X, y) * len(X)
        sst = float(np.sum((y - y.mean(dtype=np.float64)) ** 2))
        return 1.0 - sse / sst if sst > 0 else float(sse == 0)


class Logistic(_Glm):
    """Binary logistic regression, labels 0/1: L = mean(log(1 + e^z) - y z), dL/dz = sigmoid(z) - y."""

    kind, metric_name = "logistic", "accuracy"

    def _loss_dz(self, z, y):
        loss = float(np.sum(np.logaddexp(0.0, z, dtype=np.float64)) - np.dot(y, z.astype(np.float64, copy=False)))
        # sigmoid as 0.5 (1 + tanh(z/2)): no overflow for any z, computed in place
        z *= 0.5
        np.tanh(z, out=z)
        z += 1.0
        z *= 0.5
        z -= y
        return loss

    def metric(self, theta, X, y) -> float:
        right = 0
        for lo in range(0, len(X), BLOCK_ROWS):
            right += int(np.sum((self._scores(theta, X[lo:lo + BLOCK_ROWS]) > 0) == (y[lo:lo + BLOCK_ROWS] > 0.5)))
        return right / max(len(X), 1)

    def check_labels(self, y, source):
        bad = (y != 0) & (y != 1)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{source}: model.kind = 'logistic' needs labels 0 or 1; {int(bad.sum())} rows have "
                            f"others, the first is row {i} with {float(y[i]):g}{_label_hint(y, 2)}")


class Softmax(_Glm):
    """Multiclass logistic regression, labels 0..K-1: L = mean(logsumexp(z) - z_y), dL/dz = softmax(z) - onehot(y)."""

    kind, metric_name = "softmax", "accuracy"

    def __init__(self, d, fit_intercept=True, dtype=np.float64, classes: int = 2):
        if classes < 2:
            raise ConfigError(f"model.classes: softmax needs at least 2 classes, got {classes}")
        super().__init__(d, fit_intercept, dtype, classes)

    def _loss_dz(self, z, y):
        rows = np.arange(len(z))
        label = y.astype(np.intp)
        z -= z.max(axis=1, keepdims=True)       # shift for a stable exp; the loss is unchanged
        picked = z[rows, label].astype(np.float64)
        np.exp(z, out=z)
        total = z.sum(axis=1, keepdims=True)
        loss = float(np.sum(np.log(total, dtype=np.float64)) - picked.sum())
        z /= total
        z[rows, label] -= 1.0
        return loss

    def metric(self, theta, X, y) -> float:
        right = 0
        for lo in range(0, len(X), BLOCK_ROWS):
            pred = np.argmax(self._scores(theta, X[lo:lo + BLOCK_ROWS]), axis=1)
            right += int(np.sum(pred == y[lo:lo + BLOCK_ROWS].astype(np.intp)))
        return right / max(len(X), 1)

    def check_labels(self, y, source):
        bad = (y != np.round(y)) | (y < 0) | (y >= self.k)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{source}: model.kind = 'softmax' with {self.k} classes needs integer labels 0..{self.k - 1};"
                            f" {int(bad.sum())} rows have others, the first is row {i} with {float(y[i]):g}"
                            f"{_label_hint(y, self.k)}")


def _label_hint(y: np.ndarray, k: int) -> str:
    """What to do about labels a classifier cannot take, in words."""
    if not np.all(y == np.round(y)):
        return " (the target looks continuous: use model.kind = 'linear' for regression)"
    labels = np.unique(y)
    if k == 2 and set(labels.tolist()) <= {-1.0, 1.0}:
        return " (map -1 to 0)"
    if len(labels) and labels.min() >= 1 and len(labels) <= k:
        return (f" (labels start at {labels.min():g}, not 0: subtract {labels.min():g}, or write them as text labels "
                f"in a CSV, which psrv maps to 0..K-1)")
    return ""


def infer_classes(y: np.ndarray, source: str) -> int:
    """K = 1 + the largest label, for softmax when model.classes is 0."""
    if len(y) == 0:
        raise DataError(f"{source}: no training rows to take softmax classes from")
    bad = (y != np.round(y)) | (y < 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{source}: model.kind = 'softmax' needs integer labels 0..K-1; {int(bad.sum())} rows have "
                        f"others, the first is row {i} with {float(y[i]):g}{_label_hint(y, 0)}")
    return int(y.max()) + 1


def missing_classes(y: np.ndarray, k: int) -> list[int]:
    """The classes 0..k-1 that no label in y names (softmax then learns them from no example)."""
    return sorted(set(range(k)) - set(np.unique(y).astype(np.int64).tolist()))


class Custom:
    """Adapts a user's model object (init_theta(d), loss(theta, X, y), grad(theta, X, y), optionally metric and
    metric_name) to the interface the server and workers use. See docs/models.md."""

    def __init__(self, obj, spec: str, d: int, dtype):
        self.obj, self.kind, self.d, self.dtype = obj, spec, d, np.dtype(dtype)
        self.metric_name = getattr(obj, "metric_name", "loss")
        theta = np.asarray(obj.init_theta(d), dtype=self.dtype)
        self.theta_shape = theta.shape
        self._theta0 = theta
        self.l2_rows = theta.shape[0] if theta.ndim else 0  # a custom model's theta is penalized whole

    def init_theta(self) -> np.ndarray:
        return self._theta0.copy()

    def loss_grad(self, theta, X, y, out) -> float:
        g = np.asarray(self.obj.grad(theta, X, y))
        if g.shape != self.theta_shape:
            raise ValueError(f"{self.kind}.grad returned shape {g.shape}; theta has shape {self.theta_shape}")
        out[...] = g
        return float(self.obj.loss(theta, X, y))

    def loss(self, theta, X, y) -> float:
        return float(self.obj.loss(theta, X, y))

    def metric(self, theta, X, y) -> float:
        f = getattr(self.obj, "metric", None)
        return float(f(theta, X, y)) if f is not None else self.loss(theta, X, y)

    def check_labels(self, y, source):
        f = getattr(self.obj, "check_labels", None)
        if f is not None:
            f(y, source)


def load_custom(spec: str):
    """Import 'package.module:Name'; a class is instantiated with no arguments. ConfigError if it is unusable."""
    module_name, _, attr = spec.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.kind: cannot load {spec!r}: {type(e).__name__}: {e}") from None
    if isinstance(obj, type):
        obj = obj()
    missing = [m for m in ("init_theta", "loss", "grad") if not callable(getattr(obj, m, None))]
    if missing:
        raise ConfigError(f"model.kind: {spec!r} lacks {', '.join(missing)} (see docs/models.md)")
    return obj


KINDS = {"linear": Linear, "logistic": Logistic, "softmax": Softmax}


def make(kind: str, d: int, fit_intercept: bool = True, dtype=np.float64, classes: int = 0):
    """The model named by model.kind, for d feature columns."""
    if kind in KINDS:
        if kind == "softmax":
            return Softmax(d, fit_intercept, dtype, classes)
        return KINDS[kind](d, fit_intercept, dtype)
    return Custom(load_custom(kind), kind, d, dtype)
