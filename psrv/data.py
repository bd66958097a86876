"""Training data: read or generate it, check it, hold out test rows, and lay it out once in a shared-memory block,
shard by shard. It never trains and never talks to other processes.

Synthetic rows are generated in fixed chunks, each from its own seed, so any subset of rows can be regenerated
without the rest. A .npy source is memory-mapped, so only the rows being copied are read. Standardization statistics
come from the training rows alone and are applied in place to training and test rows; `unscale` maps theta back to
the data as given.
"""
from __future__ import annotations

import array
import csv
import logging
import os
import zlib
from dataclasses import dataclass, field

import numpy as np

from . import partition
from .errors import DataError
from .blocks import BlockSpec, DataBlock

log = logging.getLogger(__name__)

SYNTH_CHUNK_ROWS = 8192
ROW_BLOCK = 65536          # rows per block wherever a loop bounds its temporaries
SVM_KINDS = (".svm", ".libsvm", ".svmlight", ".txt")
FILE_KINDS = (".npz", ".npy", ".csv") + SVM_KINDS
_KINDS_TEXT = ("synthetic, .npz (arrays X and y), .npy (X; y in data.labels), .csv (with a header row), "
               "svmlight/libsvm (" + ", ".join(SVM_KINDS) + ")")


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


# ---------------------------------------------------------------------------------------------- files
def _check_xy(path: str, X: np.ndarray, y: np.ndarray, y_path: str | None = None) -> np.ndarray:
    """Shape and dtype checks shared by .npz and .npy sources; returns y as a vector."""
    y_path = y_path or path
    if X.ndim != 2:
        raise DataError(f"{path}: X must be 2-D (rows x columns), got shape {X.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != len(X):
        raise DataError(f"{y_path}: y must be a vector with one value per row of X ({len(X)} rows in {path}), "
                        f"got shape {y.shape}")
    for name, a, p in (("X", X, path), ("y", y, y_path)):
        if a.dtype.kind not in "fiub":
            raise DataError(f"{p}: {name} has dtype {a.dtype}; expected numbers")
    return y


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
    y = _check_xy(path, X, y)
    return X, y, [f"x{j}" for j in range(X.shape[1])]


def _load_npy(path: str, key: str) -> np.ndarray:
    if not os.path.exists(path):
        raise DataError(f"{key}: file not found: {path}")
    try:
        # mmap: a large X is not read into memory here; build() copies it into shared memory row block by row block
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # not a .npy file, object dtype (cannot be mapped, never unpickled), truncated
        raise DataError(f"{path}: cannot read as .npy: {e}") from None


def _read_npy(path: str, labels: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if not labels:
        raise DataError(f"data.labels: {path} is a .npy source, which holds X only; name the .npy file holding y "
                        f"in data.labels")
    X, y = _load_npy(path, "data.source"), _load_npy(labels, "data.labels")
    y = _check_xy(path, X, y, labels)
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


# svmlight / libsvm: "label idx:val idx:val ... [# comment]", an optional qid:N token, blank lines skipped.
# Two passes over the bytes: the first checks every token and finds the size, the second densifies. Between them
# only scalars are kept, and the second pass buffers (row, col, value) in typed arrays, never Python objects.
_SVM_FLUSH = 1 << 20  # values buffered before they are scattered into X


def available_memory_bytes() -> int | None:
    """Memory the kernel says can be allocated without swapping (MemAvailable), else free physical pages, else
    None when neither is known."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g}"


def _svm_lines(path: str):
    """(line number, tokens) of each line that holds data, comments cut off."""
    with open(path, "rb") as fh:
        for line_no, line in enumerate(fh, start=1):
            cut = line.find(b"#")
            toks = (line if cut < 0 else line[:cut]).split()
            if toks:
                yield line_no, toks


def _svm_bad(path: str, line_no: int, tok: bytes, why: str) -> DataError:
    return DataError(f"{path}: line {line_no}: malformed token {tok.decode('utf-8', 'replace')!r}: {why}")


def _svm_scan(path: str, d_explicit: int) -> tuple[int, int, bool]:
    """First pass: check every token; return (rows, columns, zero_based)."""
    n, max_idx, min_idx = 0, -1, None
    beyond = {}  # index convention -> (line, index) of the first index past an explicit data.d
    for line_no, toks in _svm_lines(path):
        try:
            float(toks[0])
        except ValueError:
            raise _svm_bad(path, line_no, toks[0], "the label is not a number") from None
        seen = set()
        for tok in toks[1:]:
            key, sep, val = tok.partition(b":")
            if not sep:
                raise _svm_bad(path, line_no, tok, "expected index:value")
            if key == b"qid":
                try:
                    int(val)
                except ValueError:
                    raise _svm_bad(path, line_no, tok, "qid must be an integer") from None
                continue
            try:
                idx = int(key)
            except ValueError:
                raise _svm_bad(path, line_no, tok, "the index is not an integer") from None
            if idx < 0:
                raise _svm_bad(path, line_no, tok, "negative index")
            try:
                float(val)
            except ValueError:
                raise _svm_bad(path, line_no, tok, "the value is not a number") from None
            if idx in seen:
                raise _svm_bad(path, line_no, tok, f"index {idx} appears twice on this line")
            seen.add(idx)
            if idx > max_idx:
                max_idx = idx
                if d_explicit:
                    # which convention applies is known only at the end; remember the first offender of each
                    if idx >= d_explicit and 0 not in beyond:
                        beyond[0] = (line_no, idx)
                    if idx > d_explicit and 1 not in beyond:
                        beyond[1] = (line_no, idx)
            if min_idx is None or idx < min_idx:
                min_idx = idx
        n += 1
    if n == 0:
        raise DataError(f"{path}: no data lines (svmlight: 'label index:value ...')")
    zero_based = min_idx == 0
    if d_explicit:
        if (zero_based and 0 in beyond) or (not zero_based and 1 in beyond):
            line_no, idx = beyond[0 if zero_based else 1]
            base = "0-based" if zero_based else "1-based"
            raise DataError(f"{path}: line {line_no}: index {idx} is beyond data.d = {d_explicit} "
                            f"({base} indices)")
        return n, d_explicit, zero_based
    d = max_idx + 1 if zero_based else max_idx
    if d < 1:
        raise DataError(f"{path}: no feature index on any line; set data.d for a file without features")
    return n, d, zero_based


def _read_svmlight(path: str, d_explicit: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    n, d, zero_based = _svm_scan(path, d_explicit)
    need = n * d * 8 + n * 8
    avail = available_memory_bytes()
    if avail is not None and need > avail:
        raise DataError(f"svmlight file {path} would need {_gib(need)} GiB dense ({n} rows x {d} columns of "
                        f"float64); {_gib(avail)} GiB available")
    X = np.zeros((n, d), dtype=np.float64)
    y = np.empty(n, dtype=np.float64)
    off = 0 if zero_based else 1
    rows, cols, vals = array.array("q"), array.array("q"), array.array("d")

    def flush():
        if vals:
            X[np.frombuffer(rows, dtype=np.int64), np.frombuffer(cols, dtype=np.int64)] = \
                np.frombuffer(vals, dtype=np.float64)
            del rows[:], cols[:], vals[:]

    i = -1
    for i, (_, toks) in enumerate(_svm_lines(path)):
        if i >= n:
            break
        y[i] = float(toks[0])
        for tok in toks[1:]:
            key, _, val = tok.partition(b":")
            if key != b"qid":
                rows.append(i)
                cols.append(int(key) - off)
                vals.append(float(val))
        if len(vals) >= _SVM_FLUSH:
            flush()
    flush()
    if i + 1 != n:
        raise DataError(f"{path}: changed while it was being read ({n} data lines, then {i + 1})")
    first = 0 if zero_based else 1
    return X, y, [f"x{j + first}" for j in range(d)]  # named by the file's own indices


def read_file(path: str, target: str = "", labels: str = "", d: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X, y, column names) from a data file, as given (no standardization, no NaN policy). `target` is the CSV
    column holding y ("" = the last); `labels` the .npy file holding y for a .npy source; `d`, when not 0, the
    number of columns of an svmlight file (else its largest index). A .npy X and y are read-only memory maps."""
    if not os.path.exists(path):
        raise DataError(f"data.source: file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if labels and ext != ".npy":
        raise DataError(f"data.labels: only a .npy data.source takes its y from another file; {path} holds y "
                        f"itself (leave data.labels empty)")
    if ext == ".npz":
        return _read_npz(path)
    if ext == ".npy":
        return _read_npy(path, labels)
    if ext == ".csv":
        return _read_csv(path, target)
    if ext in SVM_KINDS:
        return _read_svmlight(path, d)
    raise DataError(f"data.source: {path}: unknown file type {ext!r}; supported: {_KINDS_TEXT}")


def nan_rows(X: np.ndarray, y: np.ndarray, policy: str, source: str) -> tuple[np.ndarray, int]:
    """(indices of the rows to keep, rows dropped): every value must be finite; policy 'drop' leaves bad rows
    out, 'error' raises naming how many there are and the first. Reads X in row blocks (X may be a memory map)."""
    bad = ~np.isfinite(y)
    for lo in range(0, len(X), ROW_BLOCK):  # row blocks keep the temporary mask small
        bad[lo:lo + ROW_BLOCK] |= ~np.isfinite(X[lo:lo + ROW_BLOCK]).all(axis=1)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return np.arange(len(X), dtype=np.int64), 0
    if policy == "drop":
        if n_bad == len(X):
            raise DataError(f"{source}: every one of its {len(X)} rows has NaN or Inf; nothing left to train on")
        log.warning("%s: dropped %d of %d rows with NaN or Inf (data.nan_policy = 'drop')", source, n_bad, len(X))
        return np.flatnonzero(~bad).astype(np.int64, copy=False), n_bad
    first = int(np.argmax(bad))
    ext = os.path.splitext(source)[1].lower()
    where = "0-based"
    if ext == ".csv":
        where += ", after the header"
    elif ext in SVM_KINDS:
        where += ", not counting blank and comment lines"
    raise DataError(f"{source}: {n_bad} of {len(X)} rows have NaN or Inf; the first is row {first} "
                    f"({where}); set data.nan_policy = \"drop\" to drop them")


def apply_nan_policy(X: np.ndarray, y: np.ndarray, policy: str, source: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(X, y, rows dropped) after nan_rows(): unchanged when every row is finite, else a copy without the bad rows."""
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

    def to_dict(self) -> dict:
        return {"block": self.block, "shards": self.shards, "columns": self.columns, "source": self.source,
                "rows_dropped": self.rows_dropped, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "Layout":
        return cls(**d)


def _explicit_d(dcfg, explicit) -> int:
    """data.d when the user set it (it then fixes an svmlight file's width), else 0."""
    return dcfg.d if "data.d" in explicit else 0


def load_arrays(dcfg, explicit: frozenset = frozenset()) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """(X, y, columns, rows_dropped) of the whole data set as given, in file order (float64), after data.nan_policy
    and without the held-out split: what tests and benchmarks build their oracles and baselines from. `explicit` is
    cfg.explicit (only "data.d" matters: it fixes an svmlight file's width). A float64 .npy source comes back as
    read-only memory maps."""
    if dcfg.source == "synthetic":
        X, y = synthetic_rows(dcfg.seed, dcfg.d, dcfg.noise, 0, dcfg.n, dcfg.n)
        return X, y, [f"x{j}" for j in range(dcfg.d)], 0
    X, y, cols = read_file(dcfg.source, dcfg.target, dcfg.labels, _explicit_d(dcfg, explicit))
    X, y, dropped = apply_nan_policy(X, y, dcfg.nan_policy, dcfg.source)
    return X.astype(np.float64, copy=False), y.astype(np.float64, copy=False), cols, dropped


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


def plan(dc, explicit, n_shards: int) -> Plan:
    """Read (files) and split the data set: nan_policy, held-out rows, partition into n_shards shards. The same
    function runs in the launcher and in every attached worker, so both agree on which rows form each shard."""
    if dc.source == "synthetic":
        n, d, X_all, y_all, cols, dropped = dc.n, dc.d, None, None, [f"x{j}" for j in range(dc.d)], 0
        kept = np.arange(n, dtype=np.int64)
    else:
        X_all, y_all, cols = read_file(dc.source, dc.target, dc.labels, _explicit_d(dc, explicit))
        # dropped rows are left out by index rather than copied away, so a memory-mapped X stays on disk
        kept, dropped = nan_rows(X_all, y_all, dc.nan_policy, dc.source)
        n, d = len(kept), X_all.shape[1]
        _check_explicit(dc, explicit, n, d)

    # held-out rows are drawn among the rows kept; both sets are then named by their row index in the file
    test_pos = holdout(n, dc.test_fraction, dc.seed)
    is_test = np.zeros(n, dtype=bool)
    is_test[test_pos] = True
    test_rows, train_rows = kept[test_pos], kept[~is_test]
    del kept, is_test
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
    return Plan(d, cols, dropped, order, blocks, test_rows, X_all, y_all)


def build(cfg, n_shards: int, name: str) -> tuple[DataBlock, Layout]:
    """Read or generate the data once into a new shared-memory block named `name`: training rows with shards
    contiguous, then the held-out rows (data.test_fraction) in file order. The caller owns the block
    (close + unlink). Raises DataError for unusable data."""
    dc = cfg.data
    p = plan(dc, cfg.explicit, n_shards)
    spec = BlockSpec(name=name, dtype=dc.dtype, d=p.d, n_train=len(p.order), n_test=len(p.test_rows))
    block = DataBlock.create(spec)
    try:
        _fill(block, p.order, p.test_rows, dc, p.X_all, p.y_all)
        _standardize(block, dc.standardize, cfg.model.fit_intercept)
    except BaseException:
        block.close()
        block.unlink()
        raise
    layout = Layout(block=spec.to_dict(), shards=[list(b) for b in p.blocks], columns=p.cols, source=dc.source,
                    rows_dropped=p.dropped)
    return block, layout


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


def _fill(block: DataBlock, order: np.ndarray, test_rows: np.ndarray, dc, X_all, y_all) -> None:
    """Write file row order[i] to training position i and file row test_rows[j] to test position j."""
    if X_all is not None:
        for dst_X, dst_y, rows in ((block.X, block.y, order), (block.X_test, block.y_test, test_rows)):
            for lo in range(0, len(rows), ROW_BLOCK):
                idx = rows[lo:lo + ROW_BLOCK]
                dst_X[lo:lo + len(idx)] = X_all[idx]
                dst_y[lo:lo + len(idx)] = y_all[idx]
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
        t, p = is_test[lo:hi], pos[lo:hi]
        block.X[p[~t]] = X[~t]
        block.y[p[~t]] = y[~t]
        if t.any():
            block.X_test[p[t]] = X[t]
            block.y_test[p[t]] = y[t]


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
