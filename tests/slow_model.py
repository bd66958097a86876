"""A custom model (model.kind = "tests.slow_model:SlowFinish") for launcher tests: linear least squares whose loss on
a set of at least PSRV_TEST_SLOW_ROWS rows (the end-of-run full pass over the training rows, never a mini-batch)
first sleeps PSRV_TEST_SLOW_S seconds, like a large data set's final evaluation on a loaded machine."""
import os
import time

import numpy as np


class SlowFinish:
    metric_name = "mse"

    def init_theta(self, d):
        return np.zeros(d + 1)

    def _residual(self, theta, X, y):
        return X @ theta[:-1] + theta[-1] - y

    def loss(self, theta, X, y):
        rows = int(os.environ.get("PSRV_TEST_SLOW_ROWS", "0"))
        if rows and len(X) >= rows:
            time.sleep(float(os.environ.get("PSRV_TEST_SLOW_S", "0")))
            mark = os.environ.get("PSRV_TEST_SLOW_MARK")
            if mark:  # the test's evidence that the slow pass happened (no wall-clock assertion)
                with open(mark, "a") as fh:
                    fh.write("slept\n")
        return float(np.mean(self._residual(theta, X, y) ** 2))

    def grad(self, theta, X, y):
        r = self._residual(theta, X, y)
        return 2.0 * np.r_[X.T @ r, r.sum()] / len(X)

    def metric(self, theta, X, y):  # without one, psrv would call loss (and sleep) again
        return float(np.mean(self._residual(theta, X, y) ** 2))


class SlowSteps(SlowFinish):
    """SlowFinish whose every gradient first sleeps PSRV_TEST_GRAD_S seconds: a run that lasts at least steps x that
    long whatever the machine, at little CPU cost (for tests that look at a run while it goes on)."""

    def grad(self, theta, X, y):
        time.sleep(float(os.environ.get("PSRV_TEST_GRAD_S", "0")))
        return super().grad(theta, X, y)
