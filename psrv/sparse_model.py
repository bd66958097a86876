"""Sparse logistic regression over hashed features (model.kind = "sparse_logistic"): the worker's step in
O(non-zeros) and the server's held-out metrics (AUC, log loss). Pure numpy, no I/O.

theta has d + 1 rows: the weight of column (key) j is row j, and the bias is key d (BIAS = d), the row after the last
column, as the dense models store their intercept last. A batch touches only the keys of its columns plus the bias.

The step, for a batch of m CSR rows:
  keys, inv = unique(indices)              sorted distinct columns, and each entry's local column (one sort)
  w = theta[keys + [d]]                    the only rows read (a keyed read from shared memory, or a `get`)
  z = bincount(row, values * w[inv]) + b   per-row sums: the logits
  r = (sigmoid(z) - y) / m                 dL/dz of the mean loss
  g = bincount(inv, values * r[row]), sum(r)   the gradient on those keys and the bias
Everything is O(non-zeros of the batch); nothing is ever d long.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import DataError
from .metrics_binary import auc
from .sparse import CSR

KIND = "sparse_logistic"
BLOCK_ROWS = 65536


@dataclass
class Prepared:
    """What a batch needs before theta is read: its keys (uint64, sorted, the bias last), each entry's local column
    (`inv`) and row, its values and labels. Made while the worker waits for the server."""
    keys: np.ndarray
    inv: np.ndarray
    row: np.ndarray
    values: np.ndarray
    y: np.ndarray
    parts: list | None = None   # server.shards > 1: the positions in `keys` of each range's keys (workers/worker.py)

    @property
    def m(self) -> int:
        return len(self.y)


def unique_inverse(cols: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """(the sorted distinct values of cols, each entry's index among them), as np.unique(return_inverse=True) gives,
    but from one plain sort of (column, position) packed into an int64 where they fit: np.unique's inverse needs a
    stable argsort, several times slower than sorting the values themselves."""
    n = len(cols)
    shift = max(int(n - 1).bit_length(), 1)
    if n == 0 or int(d).bit_length() + shift > 62:
        keys, inv = np.unique(cols, return_inverse=True)
        return keys, inv.reshape(-1)
    packed = cols.astype(np.int64) << shift
    packed |= np.arange(n)
    packed.sort()
    sorted_cols = packed >> shift
    first = np.empty(n, dtype=bool)
    first[0] = True
    np.not_equal(sorted_cols[1:], sorted_cols[:-1], out=first[1:])
    inv = np.empty(n, dtype=np.int64)
    inv[packed & ((1 << shift) - 1)] = np.cumsum(first) - 1
    return sorted_cols[first], inv


def prepare(batch: CSR) -> Prepared:
    cols, inv = unique_inverse(batch.indices, batch.d)
    keys = np.empty(len(cols) + 1, dtype=np.uint64)
    keys[:-1] = cols
    keys[-1] = batch.d   # the bias key: above every column, so the keys stay sorted
    return Prepared(keys, inv, batch.row_of_entry(), batch.values, batch.y)


def loss_grad(p: Prepared, w: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(the gradient of the batch's mean logistic loss on p.keys, that mean loss) at w = theta[p.keys]."""
    m, k = p.m, len(p.keys)
    z = np.bincount(p.row, weights=p.values * w[p.inv], minlength=m)
    z += w[-1]
    loss = float(np.sum(np.logaddexp(0.0, z)) - np.dot(p.y, z)) / m
    # dL/dz = sigmoid(z) - y, with sigmoid as 0.5 (1 + tanh(z/2)): no overflow for any z
    z *= 0.5
    np.tanh(z, out=z)
    z += 1.0
    z *= 0.5
    z -= p.y
    z /= m
    g = np.empty(k) if out is None else out[:k]
    g[:-1] = np.bincount(p.inv, weights=p.values * z[p.row], minlength=k - 1)
    g[-1] = z.sum()
    return g, loss


class SparseLogistic:
    """The server's and launcher's view: theta's shape, held-out log loss and AUC over CSR rows."""

    kind, metric_name = KIND, "auc"

    def __init__(self, d: int):
        self.d = int(d)
        self.theta_shape = (self.d + 1,)
        self.l2_rows = self.d   # model.l2 (row-wise optimizers) penalizes the weights, not the bias

    def init_theta(self) -> np.ndarray:
        return np.zeros(self.theta_shape)

    def logits(self, theta: np.ndarray, X: CSR) -> np.ndarray:
        z = np.empty(X.n)
        for lo in range(0, X.n, BLOCK_ROWS):
            part = X.rows(lo, min(lo + BLOCK_ROWS, X.n))
            z[lo:lo + part.n] = part.dot(theta[:self.d]) + theta[self.d]
        return z

    def loss(self, theta: np.ndarray, X: CSR, y: np.ndarray) -> float:
        if X.n == 0:
            return 0.0
        z = self.logits(theta, X)
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    def metric(self, theta: np.ndarray, X: CSR, y: np.ndarray) -> float:
        """Held-out AUC; NaN where it is undefined (one class only)."""
        n_pos = int(np.sum(y))
        if n_pos in (0, X.n):
            return float("nan")
        return auc(y, self.logits(theta, X))

    @staticmethod
    def check_labels(y: np.ndarray, source: str) -> None:
        bad = (y != 0) & (y != 1)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{source}: model.kind = '{KIND}' needs labels 0 or 1; {int(bad.sum())} rows have others, "
                            f"the first is row {i} with {float(y[i]):g}")
