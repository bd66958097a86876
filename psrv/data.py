"""Training data: read or generate it, check it, and lay it out once in a shared-memory block, shard by shard.

Synthetic rows are generated in fixed chunks, each from its own seed, so any subset of rows can be regenerated
without the rest. Standardization happens in place in the block; `unscale` maps theta back to the data as given.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field

import numpy as np

from . import partition
from .errors import DataError
from .shards import BlockSpec, DataBlock

log = logging.getLogger(__name__)

SYNTH_CHUNK_ROWS = 8192
FILE_KINDS = (".npz", ".csv")


# ---------------------------------------------------------------------------------------------- synthetic data
def synthetic_truth(seed: int, d: int) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """(w, b, col_mean, col_scale) of the synthetic generator: y = X.w + b + noise, X[:, j] ~ N(mean_j, scale_j²).
    Columns have unequal scales on purpose, so that data.standardize matters as it does on real data."""
    rng = np.random.default_rng([seed, 0x5EED])
    w = rng.standard_normal(d)
    b = float(rng.standard_normal())
    col_mean = rng.uniform(-1.0, 1.0, d)
    col_scale = np.exp(rng.uniform(np.log(0.5), np.log(2.0), d))
    return w, b, col_mean, col_scale


def synthetic_rows(seed: int, d: int, noise: float, lo: int, hi: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows lo..hi-1 of the synthetic data set of n rows, in float64. Costs O(hi - lo) whatever lo is."""
    w, b, col_mean, col_scale = synthetic_truth(seed, d)
    xs, ys = [], []
    for c in range(lo // SYNTH_CHUNK_ROWS, -(-hi // SYNTH_CHUNK_ROWS)):
        c_lo, c_hi = c * SYNTH_CHUNK_ROWS, min((c + 1) * SYNTH_CHUNK_ROWS, n)
        rng = np.random.default_rng([seed, 1, c])
        X = rng.standard_normal((c_hi - c_lo, d)) * col_scale + col_mean
        y = X @ w + b + noise * rng.standard_normal(c_hi - c_lo)
        a, z = max(lo, c_lo) - c_lo, min(hi, c_hi) - c_lo
        xs.append(X[a:z])
        ys.append(y[a:z])
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------------------------- files
def _read_npz(path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "X" not in f or "y" not in f:
                raise DataError(f"{path}: a .npz source must hold arrays 'X' and 'y'; it holds {sorted(f.files)}")
            X, y = f["X"], f["y"]
    except DataError:
        raise
    except Exception as e:  # zipfile/pickle refusal/corrupt file
        raise DataError(f"{path}: cannot read as .npz: {e}") from None
    if X.ndim != 2:
        raise DataError(f"{path}: X must be 2-D (rows x columns), got shape {X.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != len(X):
        raise DataError(f"{path}: y must be a vector with one value per row of X ({len(X)}), got shape {y.shape}")
    for name, a in (("X", X), ("y", y)):
        if a.dtype.kind not in "fiub":
            raise DataError(f"{path}: {name} has dtype {a.dtype}; expected numbers")
    return X, y, [f"x{j}" for j in range(X.shape[1])]


def _read_csv(path: str, target: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file; expected a header row") from None
        header = [h.strip() for h in header]
        if len(header) < 2:
            raise DataError(f"{path}: need at least two columns (features and a target), header has {header}")
        if target == "":
            t = len(header) - 1
        elif target in header:
            t = header.index(target)
        else:
            raise DataError(f"data.target: column {target!r} is not in {path}; columns are {header}")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise DataError(f"{path}: line {line_no} has {len(row)} fields, the header has {len(header)}")
            try:
                rows.append([float(v) for v in row])
            except ValueError:
                col = next(j for j, v in enumerate(row) if not _is_float(v))
                raise DataError(f"{path}: line {line_no}, column {header[col]!r}: {row[col]!r} is not a number") \
                    from None
    if not rows:
        raise DataError(f"{path}: no data rows after the header")
    A = np.asarray(rows, dtype=np.float64)
    keep = [j for j in range(len(header)) if j != t]
    return A[:, keep], A[:, t], [header[j] for j in keep]


def _is_float(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def read_file(path: str, target: str = "") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X, y, column names) from a data file, as given (no standardization, no NaN policy)."""
    if not os.path.exists(path):
        raise DataError(f"data.source: file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        return _read_npz(path)
    if ext == ".csv":
        return _read_csv(path, target)
    raise DataError(f"data.source: {path}: unknown file type {ext!r}; supported: synthetic, "
                    + ", ".join(FILE_KINDS))


def apply_nan_policy(X: np.ndarray, y: np.ndarray, policy: str, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Check that every value is finite; policy 'drop' removes bad rows, 'error' names the first one."""
    bad = ~np.isfinite(y)
    for lo in range(0, len(X), 65536):  # row blocks keep the temporary mask small
        bad[lo:lo + 65536] |= ~np.isfinite(X[lo:lo + 65536]).all(axis=1)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return X, y, 0
    if policy == "drop":
        if n_bad == len(X):
            raise DataError(f"{source}: every one of its {len(X)} rows has NaN or Inf; nothing left to train on")
        log.warning("%s: dropped %d of %d rows with NaN or Inf (data.nan_policy = 'drop')", source, n_bad, len(X))
        return X[~bad], y[~bad], n_bad
    first = int(np.argmax(bad))
    raise DataError(f"{source}: {n_bad} of {len(X)} rows have NaN or Inf; the first is row {first} "
                    f"(0-based, after the header); set data.nan_policy = \"drop\" to drop them")


# ---------------------------------------------------------------------------------------------- the block
@dataclass
class Layout:
    """What every process needs to know about the data, as a plain dict (msgpack-able)."""
    block: dict                       # BlockSpec as a dict
    shards: list[list[int]]           # [offset, size] of each shard in block.X
    columns: list[str]
    source: str
    rows_dropped: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"block": self.block, "shards": self.shards, "columns": self.columns, "source": self.source,
                "rows_dropped": self.rows_dropped, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(**d)


def load_arrays(dcfg) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """(X, y, columns, rows_dropped) of the whole data set as given, in file order (float64). For files this is the
    launcher's one read; tests and benchmarks use it to build their oracles and baselines."""
    if dcfg.source == "synthetic":
        X, y = synthetic_rows(dcfg.seed, dcfg.d, dcfg.noise, 0, dcfg.n, dcfg.n)
        return X, y, [f"x{j}" for j in range(dcfg.d)], 0
    X, y, cols = read_file(dcfg.source, dcfg.target)
    X, y, dropped = apply_nan_policy(X, y, "error", dcfg.source)
    return X.astype(np.float64, copy=False), y.astype(np.float64, copy=False), cols, dropped


def _check_explicit(cfg, n: int, d: int) -> None:
    if "data.d" in cfg.explicit and cfg.data.d != d:
        raise DataError(f"data.d = {cfg.data.d} but {cfg.data.source} has {d} feature columns")
    if "data.n" in cfg.explicit and cfg.data.n != n:
        raise DataError(f"data.n = {cfg.data.n} but {cfg.data.source} has {n} rows")


def build(cfg, n_shards: int, name: str) -> tuple[DataBlock, Layout]:
    """Read or generate the data once into a new shared-memory block named `name`, shards contiguous.
    The caller owns the block (close + unlink). Raises DataError for unusable data."""
    dc = cfg.data
    if dc.source == "synthetic":
        n, d, X_all, y_all, cols, dropped = dc.n, dc.d, None, None, [f"x{j}" for j in range(dc.d)], 0
    else:
        X_all, y_all, cols = read_file(dc.source, dc.target)
        X_all, y_all, dropped = apply_nan_policy(X_all, y_all, "error", dc.source)
        n, d = X_all.shape
        _check_explicit(cfg, n, d)
    if n < n_shards:
        raise DataError(f"{dc.source}: {n} rows cannot fill {n_shards} shards (one per worker); "
                        f"use fewer train.workers")

    rows = np.arange(n, dtype=np.int64)
    order, blocks = partition.layout(rows, n_shards, dc.partition)
    empty = [s for s, (_, size) in enumerate(blocks) if size == 0]
    if empty:
        raise DataError(f"{dc.source}: shard {empty[0]} of {n_shards} is empty ({dc.partition} partition of "
                        f"{n} rows); use fewer train.workers")

    spec = BlockSpec(name=name, dtype=dc.dtype, d=d, n_train=len(order), n_test=0)
    block = DataBlock.create(spec)
    try:
        _fill(block, order, dc, X_all, y_all, n)
        _standardize(block, dc.standardize, cfg.model.fit_intercept)
    except BaseException:
        block.close()
        block.unlink()
        raise
    layout = Layout(block=spec.to_dict(), shards=[list(b) for b in blocks], columns=cols, source=dc.source,
                    rows_dropped=dropped)
    return block, layout


def _fill(block: DataBlock, order: np.ndarray, dc, X_all, y_all, n: int) -> None:
    """Write row order[i] of the data set to storage position i."""
    if X_all is not None:
        for lo in range(0, len(order), 65536):
            idx = order[lo:lo + 65536]
            block.X[lo:lo + len(idx)] = X_all[idx]
            block.y[lo:lo + len(idx)] = y_all[idx]
        return
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(len(order))
    for lo in range(0, n, SYNTH_CHUNK_ROWS):
        hi = min(lo + SYNTH_CHUNK_ROWS, n)
        X, y = synthetic_rows(dc.seed, dc.d, dc.noise, lo, hi, n)
        block.X[pos[lo:hi]] = X
        block.y[pos[lo:hi]] = y


def _standardize(block: DataBlock, on: bool, center: bool) -> None:
    """Scale columns to unit variance (and centre them when there is an intercept to absorb the mean), in place.
    Statistics are accumulated in float64 over row blocks, so no full-size temporary is made."""
    X = block.X
    block.mean[:] = 0.0
    block.scale[:] = 1.0
    if not on or len(X) == 0:
        return
    s1 = np.zeros(X.shape[1])
    s2 = np.zeros(X.shape[1])
    for lo in range(0, len(X), 65536):
        c = X[lo:lo + 65536].astype(np.float64)
        s1 += c.sum(axis=0)
        s2 += (c * c).sum(axis=0)
    mean = s1 / len(X)
    var = np.maximum(s2 / len(X) - mean * mean, 0.0)
    scale = np.sqrt(var)
    scale[scale < 1e-12 * np.maximum(1.0, np.abs(mean))] = 1.0  # constant columns stay as they are
    if not center:
        # without an intercept, centring would change the model; scale by the root mean square instead
        mean = np.zeros_like(mean)
        scale = np.sqrt(s2 / len(X))
        scale[scale == 0] = 1.0
    block.mean[:] = mean
    block.scale[:] = scale
    for lo in range(0, len(X), 65536):
        X[lo:lo + 65536] -= block.mean
        X[lo:lo + 65536] /= block.scale


def unscale(theta: np.ndarray, mean: np.ndarray, scale: np.ndarray, fit_intercept: bool) -> np.ndarray:
    """theta learned on standardized features -> theta for the data as given (same predictions).
    Layout: one row per feature, then the intercept row when fit_intercept; vector or (rows x K) matrix."""
    theta = np.asarray(theta, dtype=np.float64)
    d = len(mean)
    W = theta[:d] / (scale if theta.ndim == 1 else scale[:, None])
    out = theta.copy()
    out[:d] = W
    if fit_intercept:
        out[d] = theta[d] - mean @ W
    return out
