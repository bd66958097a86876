"""The shared-memory data block: keep finite rows, hold out test rows, partition, copy once, standardize, unscale.
It never parses files or generates rows (sources.py does), never trains and never talks to other processes.
"""
# Standardization statistics come from the training rows alone and are applied in place to training and test rows;
# `unscale` maps theta back to the data as given.
from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass, field

import numpy as np

from . import partition, schedule, sources
from .errors import DataError
from .blocks import BlockSpec, DataBlock
# synthetic_truth is not used here: it stays importable as data.synthetic_truth, as are read_file and synthetic_rows
from .sources import ARRAYS, SYNTH_CHUNK_ROWS, SVM_KINDS, read_file, synthetic_rows, synthetic_truth  # noqa: F401

log = logging.getLogger(__name__)

ROW_BLOCK = 65536          # rows per block wherever a loop bounds its temporaries


# ---------------------------------------------------------------------------------------------- held-out rows
def holdout(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices (int64) of the round(n * fraction) rows held out for evaluation, drawn at random from n rows.
    Pure: the same (n, fraction, seed) always gives the same rows, on every machine."""
    if n < 0 or not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout: need n >= 0 and 0 <= fraction < 1; got n={n}, fraction={fraction}")
    k = round(n * fraction)
    if k == 0:
        return np.empty(0, dtype=np.int64)
    # its own stream of data.seed, so holding rows out does not change the synthetic rows themselves
    rows = np.random.default_rng([seed, 0x7E57]).choice(n, k, replace=False)
    return np.sort(rows).astype(np.int64, copy=False)


# ---------------------------------------------------------------------------------------------- rows kept
def nan_rows(X: np.ndarray, y: np.ndarray, policy: str, source: str,
             lines: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """(indices of the rows to keep, rows dropped): every value must be finite; policy 'drop' leaves bad rows
    out, 'error' raises naming how many there are and the first (with its file line when `lines` are known);
    'impute' keeps rows whose inputs are not finite (impute() fills them) and leaves out those without a finite
    target, which cannot be imputed. Reads X in row blocks (X may be a memory map)."""
    bad = ~np.isfinite(y)
    if policy != "impute":
        for lo in range(0, len(X), ROW_BLOCK):  # row blocks keep the temporary mask small
            bad[lo:lo + ROW_BLOCK] |= ~np.isfinite(X[lo:lo + ROW_BLOCK]).all(axis=1)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return np.arange(len(X), dtype=np.int64), 0
    if policy in ("drop", "impute"):
        what = "NaN or Inf" if policy == "drop" else "a missing or non-finite target (it cannot be imputed)"
        if n_bad == len(X):
            raise DataError(f"{source}: every one of its {len(X)} rows has {what}; nothing left to train on")
        log.warning("%s: dropped %d of %d rows with %s (data.nan_policy = %r)", source, n_bad, len(X), what, policy)
        return np.flatnonzero(~bad).astype(np.int64, copy=False), n_bad
    first = int(np.argmax(bad))
    ext = os.path.splitext(source)[1].lower()
    where = "0-based"
    if lines is not None:
        where += f", line {int(lines[first])} of the file"
    elif ext in SVM_KINDS:
        where += ", not counting blank and comment lines"
    if ext == ".csv":
        where += "; a missing field reads as NaN"
    raise DataError(f"{source}: {n_bad} of {len(X)} rows have NaN or Inf; the first is row {first} ({where}); set "
                    f"data.nan_policy = \"drop\" to drop them, or \"impute\" to replace missing inputs by their "
                    f"training mean")


def impute_means(X: np.ndarray, rows: np.ndarray, columns: list, source: str) -> np.ndarray:
    """The mean of each column over the finite values of X[rows] (float64): what data.nan_policy = "impute" puts in
    place of a NaN or Inf input. `rows` are the training rows only, so held-out rows do not leak into training.
    Reads X in row blocks (X may be a memory map)."""
    s = np.zeros(X.shape[1])
    k = np.zeros(X.shape[1])
    for lo in range(0, len(rows), ROW_BLOCK):
        c = np.asarray(X[rows[lo:lo + ROW_BLOCK]], dtype=np.float64)
        ok = np.isfinite(c)
        s += np.where(ok, c, 0.0).sum(axis=0)
        k += ok.sum(axis=0)
    if (k == 0).any():
        j = int(np.argmax(k == 0))
        raise DataError(f"{source}: column {columns[j]!r} has no value in any training row, so there is no mean to "
                        f"impute; leave it out (data.drop_columns)")
    return s / k


def impute(X: np.ndarray, means: np.ndarray | None) -> None:
    """Replace every NaN or Inf in X (rows x columns, in place) by its column's mean; nothing when means is None."""
    if means is not None:
        np.copyto(X, np.broadcast_to(means.astype(X.dtype), X.shape), where=~np.isfinite(X))


def apply_nan_policy(X: np.ndarray, y: np.ndarray, policy: str, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(X, y, rows dropped) after nan_rows(): unchanged when every row is finite, else a copy without the bad rows.
    With 'impute' the inputs are left as they are (see impute())."""
    keep, n_bad = nan_rows(X, y, policy, source)
    if n_bad == 0:
        return X, y, 0
    return X[keep], y[keep], n_bad


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
    # indices of the held-out rows in the data as read (data.test_source's rows when it is set, else data.source's),
    # before data.nan_policy drops any: kept by the launcher for heldout.npy, never sent to a child
    heldout: np.ndarray | None = field(default=None, compare=False, repr=False)
    classes: list | None = None       # a CSV's string labels, in the order of y = 0..K-1
    impute_means: list | None = None  # data.nan_policy = "impute": each input column's training mean, as given
    fields: list | None = None        # a CSV's columns, every one (names, or indices as strings without a header)

    def to_dict(self) -> dict:
        return {"block": self.block, "shards": self.shards, "columns": self.columns, "source": self.source,
                "rows_dropped": self.rows_dropped, "extra": self.extra, "classes": self.classes,
                "impute_means": self.impute_means, "fields": self.fields}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(**d)


def _explicit_d(dcfg, explicit) -> int:
    """data.d when the user set it (it then fixes an svmlight file's width), else 0."""
    return dcfg.d if "data.d" in explicit else 0


def _read(dc, explicit, arrays=None) -> sources.Table:
    """data.source as given: the caller's in-memory arrays (X, y, columns), or the file."""
    if arrays is not None:
        return sources.Table(*arrays)
    if dc.source == ARRAYS:
        raise DataError('data.source = "arrays": that run trained on in-memory arrays passed to psrv.train(X=..., '
                        'y=...), which were never written to disk, so they cannot be loaded here; save them with '
                        'numpy.savez(PATH, X=X, y=y) and set data.source = PATH')
    return sources.read_table(dc.source, dc.labels, _explicit_d(dc, explicit), sources.CsvOptions.of(dc))


def load_arrays(dcfg, explicit: frozenset = frozenset()) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """(X, y, columns, rows_dropped) of the whole data set as given, in file order (float64), after data.nan_policy
    and without the held-out split: what tests and benchmarks build their oracles and baselines from. `explicit` is
    cfg.explicit (only "data.d" matters: it fixes an svmlight file's width). A float64 .npy source comes back as
    read-only memory maps. With "impute", missing inputs get the means a run uses (of its training rows)."""
    if dcfg.source == "synthetic":
        X, y = synthetic_rows(dcfg.seed, dcfg.d, dcfg.noise, 0, dcfg.n, dcfg.n)
        return X, y, [f"x{j}" for j in range(dcfg.d)], 0
    p = plan(dcfg, explicit, 1)
    X, y = p.X_all, p.y_all
    if p.dropped:
        held = p.test_rows if not dcfg.test_source else p.test_rows[:0]   # test_source rows are another file's
        keep = np.sort(np.concatenate([p.order, held]))
        X, y = X[keep], y[keep]
    if p.means is not None:
        X = np.array(X, dtype=np.float64)  # a copy: never write into the file's own arrays
        impute(X, p.means)
    return X.astype(np.float64, copy=False), y.astype(np.float64, copy=False), p.cols, p.dropped


def _check_explicit(dc, explicit, n: int, d: int) -> None:
    if "data.d" in explicit and dc.d != d:
        raise DataError(f"data.d = {dc.d} but {dc.source} has {d} feature columns")
    if "data.n" in explicit and dc.n != n:
        raise DataError(f"data.n = {dc.n} but {dc.source} has {n} rows")


@dataclass
class Plan:
    """Where every row goes: the training rows (file row indices) in storage order with each shard's block, and the
    held-out rows. X_all/y_all hold a file's data (None for synthetic data, which is generated where it is needed)."""
    d: int
    cols: list
    dropped: int
    order: np.ndarray
    blocks: list
    test_rows: np.ndarray
    X_all: np.ndarray | None = None
    y_all: np.ndarray | None = None
    X_test_all: np.ndarray | None = None   # data.test_source's rows (test_rows index them), else None: X_all's
    y_test_all: np.ndarray | None = None
    means: np.ndarray | None = None   # data.nan_policy = "impute": the training means that replace missing inputs
    table: sources.Table | None = None


def _read_test_source(dc, d: int, table: sources.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, y, indices of the rows kept) of data.test_source, read like data.source (a CSV's text labels mapped by the
    training file's classes) and checked against its width."""
    opt = sources.CsvOptions.of(dc)
    opt.classes = table.classes
    t = sources.read_table(dc.test_source, "", d, opt)
    if t.X.shape[1] != d:
        raise DataError(f"data.test_source: {dc.test_source} has {t.X.shape[1]} feature columns, data.source has {d}")
    kept, _ = nan_rows(t.X, t.y, dc.nan_policy, dc.test_source, t.lines)
    return t.X, t.y, kept


def plan(dc, explicit, n_shards: int, arrays=None) -> Plan:
    """Read (files) and split the data set: nan_policy, held-out rows, partition into n_shards shards. The same
    function runs in the launcher and in every attached worker, so both agree on which rows form each shard.
    `arrays`: (X, y, columns) given in memory (sources.from_arrays) instead of data.source's file."""
    X_test_all = y_test_all = None
    if dc.source == "synthetic":
        n, d, X_all, y_all, cols, dropped = dc.n, dc.d, None, None, [f"x{j}" for j in range(dc.d)], 0
        kept = np.arange(n, dtype=np.int64)
    else:
        table = _read(dc, explicit, arrays)
        X_all, y_all, cols = table.X, table.y, table.columns
        # dropped rows are left out by index rather than copied away, so a memory-mapped X stays on disk
        kept, dropped = nan_rows(X_all, y_all, dc.nan_policy, dc.source, table.lines)
        n, d = len(kept), X_all.shape[1]
        _check_explicit(dc, explicit, n, d)

    # held-out rows are drawn among the rows kept; both sets are then named by their row index in the file
    test_pos = holdout(n, dc.test_fraction, dc.seed)
    is_test = np.zeros(n, dtype=bool)
    is_test[test_pos] = True
    test_rows, train_rows = kept[test_pos], kept[~is_test]
    del kept, is_test
    if dc.test_source:  # config.check_combinations allows it only with a file source and test_fraction = 0
        X_test_all, y_test_all, test_rows = _read_test_source(dc, d, table)
    if dc.test_fraction > 0 and len(test_rows) == 0:
        raise DataError(f"data.test_fraction = {dc.test_fraction} holds out no row of {dc.source}'s {n} rows; "
                        f"raise it or set it to 0")
    if len(train_rows) < n_shards:
        if dc.test_fraction > 0:
            raise DataError(f"data.test_fraction = {dc.test_fraction} leaves {len(train_rows)} training rows of "
                            f"{n} for {n_shards} shards; lower it or use fewer shards (data.shards, train.workers)")
        raise DataError(f"{dc.source}: {n} rows cannot fill {n_shards} shards; use fewer shards "
                        f"(data.shards, train.workers)")

    # partition by the row's index in the file, so a hash shard holds the same rows whatever is held out
    order, blocks = partition.layout(train_rows, n_shards, dc.partition)
    del train_rows
    empty = [s for s, (_, size) in enumerate(blocks) if size == 0]
    if empty:
        raise DataError(f"{dc.source}: shard {empty[0]} of {n_shards} is empty ({dc.partition} partition of "
                        f"{len(order)} rows); use fewer shards (data.shards, train.workers)")
    if dc.batch_order == "blocks":  # batches are then runs of consecutive rows: those must be a random sample
        for s, (off, size) in enumerate(blocks):
            order[off:off + size] = order[off:off + size][schedule.storage_order(dc.seed, s, size)]
    means = None
    if X_all is not None and dc.nan_policy == "impute":
        means = impute_means(X_all, np.sort(order), cols, dc.source)
    return Plan(d, cols, dropped, order, blocks, test_rows, X_all, y_all, X_test_all, y_test_all, means,
                table if dc.source != "synthetic" else None)


def build(cfg, n_shards: int, name: str, arrays=None) -> tuple[DataBlock, Layout]:
    """Read or generate the data once into a new shared-memory block named `name`: training rows with shards
    contiguous, then the held-out rows (data.test_fraction, or data.test_source's rows) in file order. The caller
    owns the block (close + unlink). `arrays`: as for plan(). Raises DataError for unusable data."""
    dc = cfg.data
    p = plan(dc, cfg.explicit, n_shards, arrays)
    spec = BlockSpec(name=name, dtype=dc.dtype, d=p.d, n_train=len(p.order), n_test=len(p.test_rows))
    block = DataBlock.create(spec)
    try:
        _fill(block, p, dc)
        _standardize(block, dc.standardize, cfg.model.fit_intercept)
    except BaseException:
        block.close()
        block.unlink()
        raise
    layout = Layout(block=spec.to_dict(), shards=[list(b) for b in p.blocks], columns=p.cols, source=dc.source,
                    rows_dropped=p.dropped, heldout=p.test_rows, classes=p.table.classes if p.table else None,
                    impute_means=None if p.means is None else p.means.tolist(),
                    fields=p.table.fields if p.table else None)
    return block, layout


def saved(layout: Layout) -> dict:
    """What a run writes to data.json, so that a new file can be read as its data was (read_new): the string labels
    in the order of y = 0..K-1 (null: numeric labels), the imputed means of the input columns in the data's own
    units (null: no "impute"), the input columns used in order and every column of the file (null: not a CSV)."""
    csv = os.path.splitext(layout.source)[1].lower() == ".csv"
    return {"classes": layout.classes, "impute_means": layout.impute_means,
            "columns": layout.columns if csv else None, "fields": layout.fields}


def read_new(dc, saved: dict, path: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(X, y) of a new file (`path`, default dc.source) read as a run read its data: dc is the run's [data] config
    (its config.toml), `saved` its data.json. A CSV gives the run's input columns by name (or position, without a
    header), its string labels mapped through the run's classes (an unknown label is an error), and y = None when
    the target column is absent; a .npy file gives X alone. Missing inputs get the run's imputed means when it had
    them, else stay NaN. Rows are never dropped, so outputs line up with the file's rows. X is float64, a copy."""
    path = path or dc.source
    if not os.path.exists(path):
        raise DataError(f"file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        columns = saved.get("columns")
        opt = sources.CsvOptions(dc.target, dc.delimiter, dc.header, list(columns or dc.columns),
                                 [] if columns else list(dc.drop_columns), saved.get("classes"), saved.get("fields"),
                                 need_target=False)
        t = sources.read_csv(path, opt)
        X, y = t.X, t.y
    elif ext == ".npy" and not (dc.labels and path == dc.source):
        X, y = sources.load_npy(path, "data.source"), None
        if X.ndim != 2:
            raise DataError(f"{path}: X must be 2-D (rows x columns), got shape {X.shape}")
    else:
        X, y, _ = read_file(path, labels=dc.labels if ext == ".npy" else "")
    X = np.array(X, dtype=np.float64)
    means = saved.get("impute_means")
    if means is not None:
        if len(means) != X.shape[1]:
            raise DataError(f"{path}: {X.shape[1]} input columns; the run had {len(means)}")
        impute(X, np.asarray(means, dtype=np.float64))
    return X, None if y is None else np.asarray(y, dtype=np.float64)


def shard_rows(dc, explicit, n_shards: int, shard: int, mean: np.ndarray, scale: np.ndarray,
               dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) of one shard, standardized with the server's mean and scale, in storage order: what an attached worker
    on another machine loads for itself, reading only what it needs from the same file or synthetic seed."""
    p = plan(dc, explicit, n_shards)
    off, size = p.blocks[shard]
    rows = p.order[off:off + size]
    X = np.empty((size, p.d), dtype=dtype)
    y = np.empty(size, dtype=dtype)
    if p.X_all is not None:
        X[:] = p.X_all[rows]
        y[:] = p.y_all[rows]
        impute(X, p.means)
    else:
        for lo in range(0, dc.n, SYNTH_CHUNK_ROWS):
            hi = min(lo + SYNTH_CHUNK_ROWS, dc.n)
            want = (rows >= lo) & (rows < hi)
            if want.any():
                Xc, yc = synthetic_rows(dc.seed, dc.d, dc.noise, lo, hi, dc.n)
                X[want] = Xc[rows[want] - lo]
                y[want] = yc[rows[want] - lo]
    # the same operations, in the same dtype, as _standardize on the server's block: the bits agree
    X -= mean.astype(dtype)
    X /= scale.astype(dtype)
    return X, y


def checksum(X: np.ndarray, y: np.ndarray) -> int:
    """CRC-32 of a shard's bytes (X then y): proves an attached worker's rows are the server's."""
    return zlib.crc32(np.ascontiguousarray(y).data, zlib.crc32(np.ascontiguousarray(X).data))


def _fill(block: DataBlock, p: Plan, dc) -> None:
    """Write file row order[i] to training position i and file row test_rows[j] (of data.test_source's rows when
    it is set) to test position j, missing inputs replaced by the training means (data.nan_policy = "impute")."""
    order, test_rows = p.order, p.test_rows
    if p.X_all is not None:
        X_test, y_test = (p.X_all, p.y_all) if p.X_test_all is None else (p.X_test_all, p.y_test_all)
        for dst_X, dst_y, rows, X_all, y_all in ((block.X, block.y, order, p.X_all, p.y_all),
                                                 (block.X_test, block.y_test, test_rows, X_test, y_test)):
            for lo in range(0, len(rows), ROW_BLOCK):
                idx = rows[lo:lo + ROW_BLOCK]
                dst_X[lo:lo + len(idx)] = X_all[idx]
                dst_y[lo:lo + len(idx)] = y_all[idx]
                impute(dst_X[lo:lo + len(idx)], p.means)
        return
    # synthetic: generate each chunk once and scatter its rows to their train or test position, so the data set
    # is never in memory twice
    n = dc.n
    pos = np.empty(n, dtype=np.int64)
    pos[order] = np.arange(len(order))
    pos[test_rows] = np.arange(len(test_rows))
    is_test = np.zeros(n, dtype=bool)
    is_test[test_rows] = True
    for lo in range(0, n, SYNTH_CHUNK_ROWS):
        hi = min(lo + SYNTH_CHUNK_ROWS, n)
        X, y = synthetic_rows(dc.seed, dc.d, dc.noise, lo, hi, n)
        t, at = is_test[lo:hi], pos[lo:hi]
        block.X[at[~t]] = X[~t]
        block.y[at[~t]] = y[~t]
        if t.any():
            block.X_test[at[t]] = X[t]
            block.y_test[at[t]] = y[t]


def _standardize(block: DataBlock, on: bool, center: bool) -> None:
    """Scale columns to unit variance (and centre them when there is an intercept to absorb the mean), in place.
    Statistics come from the training rows only (test rows must not leak into training) and are applied to both.
    They are accumulated in float64 over row blocks, so no full-size temporary is made."""
    X = block.X
    block.mean[:] = 0.0
    block.scale[:] = 1.0
    if not on or len(X) == 0:
        return
    s1 = np.zeros(X.shape[1])
    s2 = np.zeros(X.shape[1])
    for lo in range(0, len(X), ROW_BLOCK):
        c = X[lo:lo + ROW_BLOCK].astype(np.float64)
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
    for A in (X, block.X_test):
        for lo in range(0, len(A), ROW_BLOCK):
            A[lo:lo + ROW_BLOCK] -= block.mean
            A[lo:lo + ROW_BLOCK] /= block.scale


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
