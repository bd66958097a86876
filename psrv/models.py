"""Models: loss and gradient of a mini-batch, in numpy, with no state but preallocated scratch buffers.

theta's layout is shared by every model: one row per feature, then the intercept row when fit_intercept is true;
a vector for single-output models. Workers call loss_grad(); the server calls loss() for evaluation.
"""
from __future__ import annotations

import numpy as np


class Linear:
    """Linear regression, mean squared loss: L = mean((X.w + b - y)^2), grad = 2/m X^T r (and 2/m sum r)."""

    kind = "linear"
    metric_name = "r2"

    def __init__(self, d: int, fit_intercept: bool = True, dtype=np.float64):
        self.d, self.fit_intercept, self.dtype = d, fit_intercept, np.dtype(dtype)
        self.theta_shape = (d + int(fit_intercept),)
        self._r = np.empty(0, dtype=self.dtype)

    def init_theta(self) -> np.ndarray:
        return np.zeros(self.theta_shape, dtype=self.dtype)

    def _residual(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        m = len(X)
        if len(self._r) < m:
            self._r = np.empty(m, dtype=self.dtype)
        r = self._r[:m]
        np.matmul(X, theta[:self.d], out=r)
        if self.fit_intercept:
            r += theta[self.d]
        r -= y
        return r

    def loss_grad(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray, out: np.ndarray) -> float:
        """Writes the gradient of the batch's mean loss into `out` and returns that loss."""
        m = len(X)
        r = self._residual(theta, X, y)
        loss = float(r @ r) / m
        np.matmul(r, X, out=out[:self.d])
        out[:self.d] *= 2.0 / m
        if self.fit_intercept:
            out[self.d] = 2.0 * r.sum() / m
        return loss

    def loss(self, theta: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
        """Mean loss, accumulated in float64 over row blocks (no full-size temporary)."""
        total = 0.0
        for lo in range(0, len(X), 65536):
            r = self._residual(theta, X[lo:lo + 65536], y[lo:lo + 65536])
            total += float(r.astype(np.float64) @ r)
        return total / max(len(X), 1)


KINDS = {"linear": Linear}


def make(kind: str, d: int, fit_intercept: bool, dtype) -> Linear:
    return KINDS[kind](d, fit_intercept, dtype)
