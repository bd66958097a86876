"""Data sources: read a data file (.npz, .npy pairs, CSV, svmlight/libsvm) or generate the synthetic rows, as given,
checking shapes, types and syntax. It never drops, holds out, reorders or scales rows, and never touches shared memory.
"""
# Synthetic rows are generated in fixed chunks, each from its own seed, so any subset of rows can be regenerated
# without the rest. A .npy source is memory-mapped, so only the rows being copied are read.
from __future__ import annotations

import array
import csv
import os

import numpy as np

from .errors import DataError

SYNTH_CHUNK_ROWS = 8192
ARRAYS = "arrays"   # data.source of a run given in-memory arrays: psrv.train(config, X=..., y=...)
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


def _describe(a) -> str:
    """An array named by its shape and dtype, never by its values (which may be millions)."""
    shape, dtype = getattr(a, "shape", None), getattr(a, "dtype", None)
    return f"shape {shape}, dtype {dtype}" if shape is not None else type(a).__name__


def from_arrays(X, y) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(X, y, column names) of arrays given in memory (psrv.train(X=..., y=...)), checked like a .npz source's. They
    are not copied here: the launcher copies their rows once, straight into shared memory. A pandas DataFrame's
    column names are kept."""
    cols = [str(c) for c in X.columns] if hasattr(X, "columns") else None
    try:
        X, y = np.asarray(X), np.asarray(y)
    except (TypeError, ValueError) as e:  # ragged lists
        raise DataError(f"X, y: cannot be read as numeric arrays: {e}") from None
    if X.dtype.kind not in "fiub":
        raise DataError(f"X: expected numbers, got an array of {_describe(X)}")
    if y.dtype.kind not in "fiub":
        raise DataError(f"y: expected numbers, got an array of {_describe(y)} (map class labels to 0..K-1, or "
                        f"use psrv.sklearn.PSClassifier, which does)")
    if X.ndim != 2:
        raise DataError(f"X: expected a 2-D array (rows x columns), got {_describe(X)}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or len(y) != len(X):
        raise DataError(f"y: expected a vector with one value per row of X ({len(X)} rows), got {_describe(y)}")
    if len(X) == 0 or X.shape[1] == 0:
        raise DataError(f"X: no rows or no columns ({_describe(X)})")
    return X, y, cols or [f"x{j}" for j in range(X.shape[1])]


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


def _read_csv(path: str, target: str | None) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file; expected a header row") from None
        header = [h.strip() for h in header]
        if target is None:  # a file of inputs only (predictions): every column is a feature
            t = None
        elif len(header) < 2:
            raise DataError(f"{path}: need at least two columns (features and a target), header has {header}")
        elif target == "":
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
    return A[:, keep], (None if t is None else A[:, t]), [header[j] for j in keep]


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


def read_file(path: str, target: str | None = "", labels: str = "", d: int = 0) -> tuple[np.ndarray, np.ndarray,
                                                                                       list[str]]:
    """(X, y, column names) from a data file, as given (no standardization, no NaN policy). `target` is the CSV
    column holding y ("" = the last; None: a CSV of inputs only, whose y comes back None); `labels` the .npy file
    holding y for a .npy source; `d`, when not 0, the number of columns of an svmlight file (else its largest
    index). A .npy X and y are read-only memory maps."""
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
