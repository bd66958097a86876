"""FTRL-Proximal with L1 and L2 (McMahan et al., "Ad Click Prediction: a View from the Trenches", KDD 2013,
Algorithm 1), the standard optimizer for sparse logistic regression, as a row-wise optimizer like those of optim.py.

Per coordinate it keeps z (the sum of gradients less the proximal terms) and n (the sum of squared gradients); the
weight is a closed form of them: 0 where |z| <= l1, which is how L1 gives exact zeros (a weight stays exactly 0
until its coordinate's evidence outweighs l1), else -(z - sign(z) l1) / ((beta + sqrt(n)) / alpha + l2). alpha is the
`lr` each step is given: with a schedule it changes from step to step, and the proximal term of a step uses that
step's alpha (the paper's per-coordinate rate is alpha / (beta + sqrt(n)) for a constant alpha).

theta is taken to be the current closed-form weights, as it is when it starts at 0 (z = n = 0) and only this
optimizer writes it; the step uses it as the paper's w_t and writes w_{t+1} back.
"""
from __future__ import annotations

import numpy as np

from .optim import _Optimizer


class FTRL(_Optimizer):
    name = "ftrl"
    state_names = ("z", "n")
    hyper = ("ftrl_beta", "l1", "l2")

    def __init__(self, theta: np.ndarray, *, ftrl_beta: float = 1.0, l1: float = 0.0, l2: float = 0.0):
        super().__init__(theta)
        for k, v in (("ftrl_beta", ftrl_beta), ("l1", l1), ("l2", l2)):
            if not v >= 0:
                raise ValueError(f"ftrl: {k} must be >= 0; got {v!r}")
        self.beta, self.l1, self.l2 = float(ftrl_beta), float(l1), float(l2)

    def _update(self, theta, grad, lr, state, s, t):
        if not lr > 0:
            raise ValueError(f"ftrl: the learning rate (alpha) must be > 0; got {lr!r}")
        z, n = state["z"], state["n"]
        # sigma = (sqrt(n + g^2) - sqrt(n)) / alpha; z += g - sigma * w; n += g^2
        sqrt_old = np.sqrt(n)
        n += grad * grad
        np.sqrt(n, out=s)
        s -= sqrt_old
        s /= lr
        s *= theta
        z += grad
        z -= s
        self.weights(z, n, lr, out=theta)

    def weights(self, z: np.ndarray, n: np.ndarray, alpha: float, out: np.ndarray) -> np.ndarray:
        """The closed-form weights of accumulators z and n, written into `out` (exact zeros where |z| <= l1)."""
        denom = (self.beta + np.sqrt(n)) / alpha + self.l2
        shrunk = np.abs(z) - self.l1
        np.copyto(out, np.where(shrunk > 0, -np.sign(z) * shrunk / denom, 0.0))
        return out
