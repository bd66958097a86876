"""Data sources: read a data file (.npz, .npy pairs, CSV, svmlight/libsvm) or generate the synthetic rows, as given,
checking shapes, types and syntax. It never drops, holds out, reorders or scales rows, and never touches shared memory.
"""
# Synthetic rows are generated in fixed chunks, each from its own seed, so any subset of rows can be regenerated
# without the rest. A .npy source is memory-mapped, so only the rows being copied are read.
from __future__ import annotations

import array
import csv
import io
import itertools
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from .errors import DataError

SYNTH_CHUNK_ROWS = 8192
ARRAYS = "arrays"   # data.source of a run given in-memory arrays: psrv.train(config, X=..., y=...)
SVM_KINDS = (".svm", ".libsvm", ".svmlight", ".txt")
FILE_KINDS = (".npz", ".npy", ".csv") + SVM_KINDS
_KINDS_TEXT = ("synthetic, .npz (arrays X and y), .npy (X; y in data.labels), .csv, "
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


def load_npy(path: str, key: str) -> np.ndarray:
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
    X, y = load_npy(path, "data.source"), load_npy(labels, "data.labels")
    y = _check_xy(path, X, y, labels)
    return X, y, [f"x{j}" for j in range(X.shape[1])]


# ---------------------------------------------------------------------------------------------- CSV
# A field is missing when, stripped of spaces and lower-cased, it is one of these: pandas writes NaN as an empty
# field, R writes NA, JSON-minded tools write null. float() itself reads "nan" and "inf" (any case).
NA_MARKERS = frozenset({"", "na", "n/a", "nan", "null"})
# every spelling of a marker in any case, without spaces: one dict lookup per field finds them
_NA_EXACT = {"".join(cs): "nan" for m in NA_MARKERS for cs in itertools.product(*({c.lower(), c.upper()} for c in m))}
CSV_DELIMITERS = ",;\t|"      # what the sniffer chooses among when data.delimiter is ""
SNIFF_BYTES = 65536
CSV_CHUNK_ROWS = 65536        # rows parsed per chunk: numpy converts a chunk's column at a time
CSV_PROBE_ROWS = 1000         # the first chunk: it decides the header and the labels' kind
CSV_BLOCK_CHARS = 1 << 22     # text np.loadtxt reads at a time


@dataclass
class CsvOptions:
    """How to read a CSV file: the [data] keys that concern it, and, to read a new file like a run's (predict),
    what the run saved."""
    target: str | int = ""                 # name, 0-based index, or "" for the last column
    delimiter: str = ""                    # "" sniffs among CSV_DELIMITERS
    header: bool | str = "auto"
    columns: list = field(default_factory=list)        # input columns to use (names or indices); [] = all others
    drop_columns: list = field(default_factory=list)   # columns never used (an id, free text)
    classes: list | None = None            # a run's string labels in order 0..K-1: map with these, refuse others
    fields: list | None = None             # a run's file columns: a header-less new file may lack the target
    need_target: bool = True               # False: a file without the target column gives y = None

    @classmethod
    def of(cls, dc) -> "CsvOptions":
        return cls(dc.target, dc.delimiter, dc.header, list(dc.columns), list(dc.drop_columns))


@dataclass
class Table:
    """What a data file holds, as given: X (float64; NaN where a CSV field is missing), y (None when a new file for
    predict has no target), the names of X's columns, and for a CSV its string labels and every column's name."""
    X: np.ndarray
    y: np.ndarray | None
    columns: list
    classes: list | None = None
    fields: list | None = None
    lines: np.ndarray | None = None        # CSV: the file line of each row (1-based), for error messages


def sniff_delimiter(sample: str) -> str:
    """The delimiter of a CSV sample, chosen by csv.Sniffer among CSV_DELIMITERS; "," when it cannot tell."""
    try:
        return csv.Sniffer().sniff(sample, delimiters=CSV_DELIMITERS).delimiter
    except csv.Error:
        return ","


def _number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


def _missing(v: str) -> bool:
    return v.strip().lower() in NA_MARKERS


def looks_like_header(first: list[str], rest: list[list[str]]) -> bool:
    """data.header = "auto": the first row is a header when one of its fields is text (neither a number nor a missing
    marker) in a column whose later fields are numbers (or missing), at least one of them a number. A first row with
    nothing after it is a header when it holds any text."""
    for j, v in enumerate(first):
        if _number(v) or _missing(v):
            continue
        later = [r[j] for r in rest if j < len(r)]
        if not rest or (any(_number(x) for x in later) and all(_number(x) or _missing(x) for x in later)):
            return True
    return False


def _parse(values) -> tuple[np.ndarray, int]:
    """(floats with NaN where missing, index of the first field that is text, or -1)."""
    try:
        return np.array(values, dtype=np.float64), -1   # the common case: every field a number, converted in C
    except ValueError:
        pass
    try:  # missing markers made "nan", the rest converted as above: several times as fast as a loop over the fields
        return np.array([_NA_EXACT.get(v, v) for v in values], dtype=np.float64), -1
    except ValueError:  # text, or a marker with spaces around it
        pass
    out = np.empty(len(values))  # a field is text: find the first
    for i, v in enumerate(values):
        try:
            out[i] = float(v)
        except ValueError:
            if not _missing(v):
                return out, i
            out[i] = np.nan
    return out, -1


def _column(key, names: list[str], what: str, path: str, has_header: bool) -> int:
    """The index of the column named (str) or numbered (int, 0-based) by `key`."""
    if isinstance(key, int):
        if 0 <= key < len(names):
            return key
        raise DataError(f"{what}: column index {key} is out of range; {path} has {len(names)} columns "
                        f"(0..{len(names) - 1})")
    if names.count(key) == 1:
        return names.index(key)
    if key in names:
        raise DataError(f"{what}: column {key!r} appears {names.count(key)} times in {path}'s header; name it "
                        f"by index instead")
    shown = names if len(names) <= 30 else names[:30] + [f"... ({len(names)} in all)"]
    hint = "" if has_header else (" (no header row was found, so columns are named by their index; set "
                                  "data.header = true if the first row is one)")
    raise DataError(f"{what}: column {key!r} is not in {path}; columns are {shown}{hint}")


def _csv_names(path: str, first: list[str], rest: list[list[str]], opt: CsvOptions) -> tuple[list[str], bool]:
    """(column names, whether the first row is the header)."""
    header = opt.header
    if header == "auto":
        header = looks_like_header(first, rest)
    if header:
        return [h.strip() for h in first], True
    n = len(first)
    if opt.fields is not None and n != len(opt.fields):
        # a new header-less file for predict: the run's columns, or those less the target
        t = _column(opt.target, list(opt.fields), "data.target", path, False) if opt.target != "" \
            else len(opt.fields) - 1
        if n == len(opt.fields) - 1 and not opt.need_target:
            return [f for j, f in enumerate(opt.fields) if j != t], False
        raise DataError(f"{path}: {n} columns and no header row; the run's file had {len(opt.fields)}")
    return list(opt.fields) if opt.fields is not None else [str(j) for j in range(n)], False


def _rows(reader, path: str):
    """(line number, fields) of each non-blank row."""
    for row in reader:
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        yield reader.line_num, row


def read_csv(path: str, opt: CsvOptions | None = None) -> Table:
    """A CSV file as a Table: missing fields (NA_MARKERS) as NaN, the target's string labels mapped to 0..K-1 in
    sorted order (numeric labels stay as they are), only the chosen input columns read.

    The first CSV_PROBE_ROWS rows are read with the csv module: they decide the header, the kind of labels (numbers
    or text) and any error in them. The whole file is then read by np.loadtxt, numpy's C reader, a few MiB of text at
    a time, with every missing field first written as "nan" (str.replace, or a regular expression when the text
    holds letters): several times as fast as the csv module, and a fraction of its memory (benchmarks/csvread.py).
    What numpy cannot read (text in an input column, a ragged row, a quoted field, an unknown label) is read on,
    chunk by chunk of CSV_CHUNK_ROWS rows, with the csv module, numpy converting a chunk's column at a time; that
    path also names the line of any error."""
    opt = opt or CsvOptions()
    with open(path, newline="") as fh:
        sample = fh.read(SNIFF_BYTES)
        fh.seek(0)
        delimiter = opt.delimiter or sniff_delimiter(sample[:sample.rfind("\n") + 1] or sample)
        rows = _rows(csv.reader(fh, delimiter=delimiter), path)
        chunk = [r for _, r in zip(range(CSV_PROBE_ROWS + 1), rows)]
        if not chunk:
            raise DataError(f"{path}: empty file; expected a header row or data rows")
        head_line, first = chunk[0]
        names, has_header = _csv_names(path, first, [r for _, r in chunk[1:]], opt)
        if has_header:
            chunk = chunk[1:]
        if len(names) < 2 and opt.need_target:
            raise DataError(f"{path}: need at least two columns (features and a target), the first row has {names} "
                            f"(delimiter {delimiter!r}; set data.delimiter if that is wrong)")
        t = _target(path, names, opt, has_header)
        use = _inputs(path, names, t, opt, has_header)
        xs, ys, lines = [], [], []
        while chunk:
            xs.append(_chunk(path, chunk, names, use, has_header))
            if t is not None:
                ys.extend(r[t] for _, r in chunk)
            lines.append(np.fromiter((ln for ln, _ in chunk), np.int64, len(chunk)))
            if len(xs) == 1 and len(chunk) == CSV_PROBE_ROWS + 1 - has_header:   # more rows than the probe
                fast = _numpy_read(path, delimiter, head_line if has_header else 0, use, t, xs[0], ys, opt)
                if fast is not None:
                    X, y, classes, line_of = fast
                    return Table(X, y, [names[j] for j in use], classes, names, line_of)
            chunk = [r for _, r in zip(range(CSV_CHUNK_ROWS), rows)]
    if not xs:
        raise DataError(f"{path}: no data rows after the header")
    line_of = np.concatenate(lines)
    y, classes = (None, opt.classes) if t is None else _labels(path, names[t], ys, opt.classes, line_of)
    return Table(np.concatenate(xs), y, [names[j] for j in use], classes, names, line_of)


def _chunk(path: str, chunk: list, names: list[str], use: list[int], has_header: bool) -> np.ndarray:
    """The input columns of a chunk of (line, fields) rows as floats, NaN where missing."""
    for line_no, row in chunk:
        if len(row) != len(names):
            what = "the header has" if has_header else "the first row has"
            raise DataError(f"{path}: line {line_no} has {len(row)} fields, {what} {len(names)}")
    cols = list(zip(*(r for _, r in chunk)))
    X = np.empty((len(chunk), len(use)))
    for k, j in enumerate(use):
        X[:, k], bad = _parse(cols[j])
        if bad >= 0:
            raise DataError(f"{path}: line {chunk[bad][0]}, column {names[j]!r}: {cols[j][bad]!r} is not a number; "
                            f"leave a text column out with data.drop_columns = [{names[j]!r}] (or list the input "
                            f"columns in data.columns)")
    return X


def _missing_to_nan(d: str):
    """A function that writes "nan" into every missing field of a text of whole lines (delimiter d). Without the
    letter n in the text, only empty fields can be missing, and str.replace finds them at memory speed; otherwise
    a regular expression finds the markers too (an empty or marker field between delimiters or line ends; a blank
    line stays blank)."""
    ws = " " if d == "\t" else " \t"
    e = re.escape(d)
    marker = re.compile(rf"({e}|\n(?![\r\n]))[{ws}]*(?:na|n/a|nan|null)?[{ws}]*(?=[{e}\r\n])", re.IGNORECASE)

    def fill(text: str) -> str:
        text = "\n" + text   # every line, the first too, starts after a line end
        if "n" in text or "N" in text:
            return marker.sub(r"\g<1>nan", text)[1:]
        while d + d in text:   # twice for ",,,": replacements do not overlap
            text = text.replace(d + d, d + "nan" + d)
        text = text.replace("\n" + d, "\nnan" + d).replace(d + "\n", d + "nan\n")
        return text.replace(d + "\r\n", d + "nan\r\n")[1:]
    return fill


def _text_blocks(path: str, skip_lines: int):
    """The file after its first skip_lines lines, in blocks of about CSV_BLOCK_CHARS that end at a line end."""
    with open(path, newline="") as fh:
        for _ in range(skip_lines):
            fh.readline()
        while text := fh.read(CSV_BLOCK_CHARS):
            text += fh.readline()
            yield text if text.endswith("\n") else text + "\n"


def _count_lines(path: str, skip_lines: int) -> int:
    """Lines of the file after its first skip_lines (a last line without a line end counts)."""
    n, last = 0, b"\n"
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            n, last = n + chunk.count(b"\n"), chunk[-1:]
    return n - skip_lines + (last != b"\n")


def _numpy_read(path, delimiter, skip_lines, use, t, X0, y0, opt):
    """(X, y, classes, file line of each row or None) of the whole file read by np.loadtxt, or None when numpy
    cannot read it as the csv module did (see read_csv). X0 and y0 are the first rows as the csv module read them."""
    text_labels = False
    if t is not None:
        y_first, bad = _parse(y0)
        text_labels = bad >= 0 or opt.classes is not None
    fill = _missing_to_nan(delimiter)
    kw = {"delimiter": delimiter, "comments": None, "quotechar": '"', "encoding": None}
    numbers = use + ([t] if t is not None and not text_labels else [])
    clean = not text_labels and np.isfinite(X0).all() and (t is None or np.isfinite(y_first).all())
    blocks, labels, n_lines = [], [], 0
    try:
        with warnings.catch_warnings():
            # numpy >= 1.23 warns at a blank line that it no longer counts it as a row: it is skipped, as the csv module
            # skips it
            warnings.filterwarnings("ignore", "Input line", UserWarning)
            if clean:  # numbers so far: the file as it is, in one call (half the time of the blocks below)
                try:
                    blocks.append(np.loadtxt(path, skiprows=skip_lines, usecols=numbers, dtype=np.float64, ndmin=2,
                                             **kw))
                    n_lines = _count_lines(path, skip_lines)
                except ValueError:  # a missing field further down
                    pass
            for text in _text_blocks(path, skip_lines) if not blocks else ():
                if '"' in text:
                    return None   # a quoted field may hold a delimiter or a line end: the csv module reads it
                n_lines += text.count("\n")
                text = fill(text)
                blocks.append(np.loadtxt(io.StringIO(text), usecols=numbers, dtype=np.float64, ndmin=2, **kw))
                if text_labels:
                    labels.append(np.loadtxt(io.StringIO(text), usecols=[t], dtype=str, ndmin=1, **kw))
    except ValueError:   # text in an input column, a ragged row: the csv module says where
        return None
    A = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
    X = A[:, :len(use)]
    classes = opt.classes
    if t is None:
        y = None
    elif text_labels:
        mapped = _text_labels(np.concatenate(labels), opt.classes)
        if mapped is None:
            return None
        y, classes = mapped
    else:
        y = A[:, len(use)]
    # the rows the csv module read first must come out the same (a header both agree on)
    if len(X) < len(X0) or not np.array_equal(X[:len(X0)], X0, equal_nan=True):
        return None
    if y is not None and not text_labels and not np.array_equal(y[:len(X0)], y_first, equal_nan=True):
        return None
    # a row's line in the file is known when no blank line was skipped
    line_of = skip_lines + 1 + np.arange(len(X), dtype=np.int64) if n_lines == len(X) else None
    return X, y, classes, line_of


def _text_labels(values: np.ndarray, classes) -> tuple[np.ndarray, list] | None:
    """(y, classes) of text labels as _labels() maps them, from a numpy array of the labels; None when one is not
    among the run's `classes` (the csv module then names it and its line)."""
    u, inv = np.unique(np.strings.strip(values), return_inverse=True)   # sorted as Python sorts str
    u = u.tolist()
    missing = [v.lower() in NA_MARKERS for v in u]
    if classes is None:
        classes = [v for v, m in zip(u, missing) if not m]
    index = {c: i for i, c in enumerate(classes)}
    if any(v not in index for v, m in zip(u, missing) if not m):
        return None
    code = np.array([np.nan if m else index[v] for v, m in zip(u, missing)], dtype=np.float64)
    return code[inv.reshape(-1)], list(classes)


def _target(path: str, names: list[str], opt: CsvOptions, has_header: bool) -> int | None:
    """The target's column, or None for a new file (predict, need_target false) that does not hold it."""
    if not opt.need_target and opt.fields is not None and not has_header and len(names) == len(opt.fields) - 1:
        return None                                   # _csv_names named its columns: the run's, less the target
    if opt.target == "":
        if not opt.need_target:
            # the run's target was the last column of its file: is it in this one?
            if opt.fields is not None and has_header:
                return names.index(opt.fields[-1]) if opt.fields[-1] in names else None
            if opt.columns and names[-1] in opt.columns:
                return None
        return len(names) - 1
    if not opt.need_target and isinstance(opt.target, str) and opt.target not in names:
        return None
    return _column(opt.target, names, "data.target", path, has_header)


def _inputs(path: str, names: list[str], t: int | None, opt: CsvOptions, has_header: bool) -> list[int]:
    """The input columns: data.columns in their order (else every column but the target), less data.drop_columns."""
    drop = {_column(k, names, "data.drop_columns", path, has_header) for k in opt.drop_columns}
    if t is not None and t in drop:
        raise DataError(f"data.drop_columns: {names[t]!r} is the target column (data.target)")
    if opt.columns:
        use = [_column(k, names, "data.columns", path, has_header) for k in opt.columns]
        if t is not None and t in use:
            raise DataError(f"data.columns: {names[t]!r} is the target column (data.target); list only inputs")
        if len(set(use)) != len(use):
            raise DataError(f"data.columns: a column is listed twice: {opt.columns}")
    else:
        # a new file for predict without the target: its last column is an input, not a target
        use = [j for j in range(len(names)) if j != t]
    use = [j for j in use if j not in drop]
    if not use:
        raise DataError(f"{path}: no input column left (data.columns, data.drop_columns); columns are {names}")
    return use


def _labels(path: str, name: str, values: list[str], classes, line_of) -> tuple[np.ndarray, list | None]:
    """(y, string classes): numbers as given; otherwise each distinct label (spaces stripped) -> its index in the
    sorted labels, or in the run's own `classes` when given. Missing labels are NaN."""
    if classes is None:
        y, bad = _parse(values)
        if bad < 0:
            return y, None
    labels = [v.strip() for v in values]
    if classes is None:
        classes = sorted({v for v in labels if v.lower() not in NA_MARKERS})
    index = {c: float(i) for i, c in enumerate(classes)}
    y = np.empty(len(labels))
    for i, v in enumerate(labels):
        k = index.get(v)
        if k is None:
            if v.lower() not in NA_MARKERS:
                raise DataError(f"{path}: line {int(line_of[i])}, column {name!r}: label {v!r} is not one of the "
                                f"run's classes {classes}")
            k = np.nan
        y[i] = k
    return y, list(classes)


# svmlight / libsvm: "label idx:val idx:val ... [# comment]", an optional qid:N token, blank lines skipped.
# Two passes over the bytes: the first checks every token and finds the size, the second densifies (or, in
# psrv.sparse, fills CSR arrays). Between them only scalars are kept, and the second pass buffers (row, col, value)
# in typed arrays, never Python objects.
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


def _svm_rows(path: str, n: int, zero_based: bool):
    """Second pass over a file _svm_scan has checked: (row, label, columns, values) of each data line, columns
    counted from 0 whatever the file's base, qid tokens skipped. Shared by the dense and the sparse (CSR) reader."""
    off = 0 if zero_based else 1
    i = -1
    for i, (_, toks) in enumerate(_svm_lines(path)):
        if i >= n:
            break
        cols, vals = [], []
        for tok in toks[1:]:
            key, _, val = tok.partition(b":")
            if key != b"qid":
                cols.append(int(key) - off)
                vals.append(float(val))
        yield i, float(toks[0]), cols, vals
    if i + 1 != n:
        raise DataError(f"{path}: changed while it was being read ({n} data lines, then {i + 1})")


def _read_svmlight(path: str, d_explicit: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    n, d, zero_based = _svm_scan(path, d_explicit)
    need = n * d * 8 + n * 8
    avail = available_memory_bytes()
    if avail is not None and need > avail:
        raise DataError(f"svmlight file {path} would need {_gib(need)} GiB dense ({n} rows x {d} columns of "
                        f"float64); {_gib(avail)} GiB available (psrv.sparse.read_svmlight_csr reads it as CSR)")
    X = np.zeros((n, d), dtype=np.float64)
    y = np.empty(n, dtype=np.float64)
    rows, cols, vals = array.array("q"), array.array("q"), array.array("d")

    def flush():
        if vals:
            X[np.frombuffer(rows, dtype=np.int64), np.frombuffer(cols, dtype=np.int64)] = \
                np.frombuffer(vals, dtype=np.float64)
            del rows[:], cols[:], vals[:]

    for i, label, row_cols, row_vals in _svm_rows(path, n, zero_based):
        y[i] = label
        rows.extend([i] * len(row_cols))
        cols.extend(row_cols)
        vals.extend(row_vals)
        if len(vals) >= _SVM_FLUSH:
            flush()
    flush()
    first = 0 if zero_based else 1
    return X, y, [f"x{j + first}" for j in range(d)]  # named by the file's own indices


def read_table(path: str, labels: str = "", d: int = 0, csv_options: CsvOptions | None = None) -> Table:
    """A data file as given (no standardization, no NaN policy): `labels` the .npy file holding y for a .npy source;
    `d`, when not 0, the number of columns of an svmlight file (else its largest index); `csv_options` how to read a
    CSV. A .npy X and y are read-only memory maps."""
    if not os.path.exists(path):
        raise DataError(f"data.source: file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if labels and ext != ".npy":
        raise DataError(f"data.labels: only a .npy data.source takes its y from another file; {path} holds y "
                        f"itself (leave data.labels empty)")
    if ext == ".csv":
        return read_csv(path, csv_options)
    if ext == ".npz":
        return Table(*_read_npz(path))
    if ext == ".npy":
        return Table(*_read_npy(path, labels))
    if ext in SVM_KINDS:
        return Table(*_read_svmlight(path, d))
    raise DataError(f"data.source: {path}: unknown file type {ext!r}; supported: {_KINDS_TEXT}")


def read_file(path: str, target: str | int = "", labels: str = "", d: int = 0) -> tuple[np.ndarray, np.ndarray, list]:
    """(X, y, column names) of read_table(); `target` is the CSV column holding y ("" = the last)."""
    t = read_table(path, labels, d, CsvOptions(target=target))
    return t.X, t.y, t.columns
