"""Real CSV files: missing values, column choice, string labels, delimiters, header detection, nan_policy "impute",
the numpy fast path, data.json and reading a new file as a run read its own."""
import json

import numpy as np
import pytest

import psrv
from psrv import config, data, sources
from psrv.errors import ConfigError, DataError

from .conftest import ROOT, build


def cfg(**over):
    return config.load({"data": over})


def write(tmp_path, text, name="d.csv"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ---------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize("marker", ["", "NA", "na", "N/A", "NaN", "nan", "null", "NULL", " NA "])
def test_missing_markers_read_as_nan(tmp_path, marker):
    t = sources.read_csv(write(tmp_path, f"a,b,y\n1,{marker},0\n2,3,1\n"))
    assert np.isnan(t.X[0, 1]) and t.X[1].tolist() == [2.0, 3.0] and t.y.tolist() == [0.0, 1.0]


def test_missing_marker_list_is_documented():
    text = (ROOT / "README.md").read_text()
    assert all(f"`{m}`" in text for m in ("NA", "N/A", "NaN", "null")) and "empty field" in text
    assert sources.NA_MARKERS == {"", "na", "n/a", "nan", "null"}


def test_string_labels_map_to_sorted_indices_and_numbers_stay(tmp_path):
    t = sources.read_csv(write(tmp_path, "a,label\n1,dog\n2, cat\n3,emu\n4,cat\n5,NA\n"))
    assert t.classes == ["cat", "dog", "emu"]
    np.testing.assert_array_equal(t.y[:4], [1, 0, 2, 0])
    assert np.isnan(t.y[4])
    t = sources.read_csv(write(tmp_path, "a,label\n1,2\n2,7\n", "n.csv"))
    assert t.classes is None and t.y.tolist() == [2.0, 7.0]


def test_columns_and_drop_columns_choose_the_inputs(tmp_path):
    p = write(tmp_path, "id,a,b,c,y\nr1,1,2,3,0\nr2,4,5,6,1\n")
    t = sources.read_csv(p, sources.CsvOptions(drop_columns=["id"]))
    assert t.columns == ["a", "b", "c"] and t.X.tolist() == [[1, 2, 3], [4, 5, 6]]
    t = sources.read_csv(p, sources.CsvOptions(target="y", columns=["c", 1]))   # a name and an index, in this order
    assert t.columns == ["c", "a"] and t.X.tolist() == [[3, 1], [6, 4]]
    t = sources.read_csv(p, sources.CsvOptions(target=1, drop_columns=[0]))     # the target by index
    assert t.columns == ["b", "c", "y"] and t.y.tolist() == [1, 4]


@pytest.mark.parametrize("opt,needle", [
    ({}, "line 2, column 'id': 'r1' is not a number; leave a text column out with data.drop_columns = ['id']"),
    ({"drop_columns": ["nope"]}, "data.drop_columns: column 'nope' is not in"),
    ({"columns": [9]}, "data.columns: column index 9 is out of range"),
    ({"columns": ["a", "y"], "drop_columns": ["id"]}, "data.columns: 'y' is the target column"),
    ({"drop_columns": ["y"]}, "data.drop_columns: 'y' is the target column"),
    ({"target": "price"}, "data.target: column 'price' is not in"),
])
def test_column_errors_name_the_column(tmp_path, opt, needle):
    p = write(tmp_path, "id,a,b,y\nr1,1,2,0\nr2,4,5,1\n")
    with pytest.raises(DataError) as e:
        sources.read_csv(p, sources.CsvOptions(**opt))
    assert needle in str(e.value)


@pytest.mark.parametrize("sep", [";", "\t", "|", ","])
def test_delimiter_is_sniffed(tmp_path, sep):
    rows = [["a", "b", "y"], ["1.5", "2", "0"], ["3", "", "1"], ["4", "5", "1"]]
    t = sources.read_csv(write(tmp_path, "\n".join(sep.join(r) for r in rows) + "\n"))
    assert t.columns == ["a", "b"] and t.X[0].tolist() == [1.5, 2.0] and np.isnan(t.X[1, 1])


def test_delimiter_falls_back_to_comma_and_can_be_set(tmp_path):
    assert sources.sniff_delimiter("just one field\n") == ","
    p = write(tmp_path, "a;b,c\n1;2,3\n4;5,6\n")     # both could split it: the config decides
    assert sources.read_csv(p, sources.CsvOptions(delimiter=";")).columns == ["a"]
    with pytest.raises(DataError, match="column 'a;b': '1;2' is not a number"):
        sources.read_csv(p, sources.CsvOptions(delimiter=","))


def test_header_auto_detects_both_ways(tmp_path):
    with_header = sources.read_csv(write(tmp_path, "a,b,y\n1,2,3\n4,5,6\n"))
    assert with_header.columns == ["a", "b"] and len(with_header.X) == 2
    # a header-less file no longer loses its first row: columns are named by index
    without = sources.read_csv(write(tmp_path, "1,2,3\n4,5,6\n", "n.csv"))
    assert without.columns == ["0", "1"] and without.X.tolist() == [[1, 2], [4, 5]] and without.y.tolist() == [3, 6]
    # text labels under a numbers-only first row are data, not a header
    labelled = sources.read_csv(write(tmp_path, "1,2,cat\n4,5,dog\n", "l.csv"))
    assert len(labelled.X) == 2 and labelled.classes == ["cat", "dog"]
    # a header whose label column heads text labels, and an id column: detected by the numeric columns
    t = sources.read_csv(write(tmp_path, "id,a,species\nr1,1,cat\nr2,NA,dog\n", "h.csv"),
                         sources.CsvOptions(drop_columns=["id"]))
    assert t.columns == ["a"] and t.classes == ["cat", "dog"]
    assert not sources.looks_like_header(["1", "NA", "2"], [["3", "4", "5"]])
    assert sources.looks_like_header(["x", "NA", "2"], [["3", "4", "5"]])


def test_header_false_and_true_are_obeyed(tmp_path):
    p = write(tmp_path, "1,2,3\n4,5,6\n")
    t = sources.read_csv(p, sources.CsvOptions(header=True))
    assert t.columns == ["1", "2"] and len(t.X) == 1
    q = write(tmp_path, "5,x,0\n6,y,1\n", "q.csv")
    t = sources.read_csv(q, sources.CsvOptions(header=False, target=0, drop_columns=[1]))
    assert t.columns == ["2"] and t.y.tolist() == [5, 6]
    with pytest.raises(DataError, match="no header row was found"):
        sources.read_csv(p, sources.CsvOptions(target="price"))


def test_numpy_path_reads_a_large_clean_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    A = rng.standard_normal((300, 4))
    lines = ["a,b,c,y"] + [",".join(repr(float(v)) for v in r) for r in A]
    p = write(tmp_path, "\n".join(lines) + "\n")
    monkeypatch.setattr(sources, "CSV_PROBE_ROWS", 50)   # so the first chunk ends before the file does
    calls = []
    real = np.loadtxt
    monkeypatch.setattr(np, "loadtxt", lambda *a, **k: calls.append(1) or real(*a, **k))
    t = sources.read_csv(p)
    assert calls
    np.testing.assert_array_equal(t.X, A[:, :3])
    np.testing.assert_array_equal(t.y, A[:, 3])
    np.testing.assert_array_equal(t.lines, np.arange(2, 302))
    # a missing field after the first chunk: numpy reads on a block at a time, the field written as nan
    lines[200] = "," + lines[200].split(",", 1)[1]
    t = sources.read_csv(write(tmp_path, "\n".join(lines) + "\n", "m.csv"))
    assert np.isnan(t.X[199, 0]) and t.lines[199] == 201
    np.testing.assert_array_equal(np.delete(t.X, 199, 0), np.delete(A[:, :3], 199, 0))
    np.testing.assert_array_equal(t.y, A[:, 3])


def _messy(path, rng, n, sep, header, crlf, text_labels, blanks, idcol):
    """A CSV with missing fields of every marker, optionally an id column, text labels, blank lines, CRLF."""
    lines = [sep.join((["id"] if idcol else []) + ["x0", "x1", "x2", "y"])] if header else []
    for i in range(n):
        f = [repr(float(rng.normal())) if rng.random() > 0.1 else str(rng.choice(MARKERS)) for _ in range(3)]
        label = str(rng.choice(["cat", "dog", "emu", "NA"])) if text_labels else str(rng.choice(["0", "1", "2", ""]))
        lines.append(sep.join(([f"r{i}"] if idcol else []) + f + [label]))
        if blanks and rng.random() < 0.05:
            lines.append("")
    nl = "\r\n" if crlf else "\n"
    with open(path, "w", newline="") as fh:
        fh.write(nl.join(lines) + nl)


MARKERS = ["", "NA", "na", "N/A", "NaN", "nan", "null", "NULL", " NA ", "  "]


@pytest.mark.parametrize("seed", range(40))
def test_numpy_path_reads_what_the_csv_module_reads(tmp_path, monkeypatch, seed):
    # the chunked csv-module reader is the oracle: numpy must give the same values, labels, classes and lines
    rng = np.random.default_rng(seed)
    kw = dict(n=int(rng.integers(8, 60)), sep=str(rng.choice([",", ";", "\t", "|"])), header=bool(rng.random() < .7),
              crlf=bool(rng.random() < .3), text_labels=bool(rng.random() < .5), blanks=bool(rng.random() < .3),
              idcol=bool(rng.random() < .5))
    p = str(tmp_path / "m.csv")
    _messy(p, rng, **kw)
    opt = sources.CsvOptions(header=kw["header"], drop_columns=[0] if kw["idcol"] else [])
    monkeypatch.setattr(sources, "CSV_PROBE_ROWS", 5)    # so that numpy reads most of the file
    monkeypatch.setattr(sources, "CSV_CHUNK_ROWS", 7)    # and the oracle reads it in several chunks
    got = []
    real = sources._numpy_read
    monkeypatch.setattr(sources, "_numpy_read", lambda *a: got.append(real(*a)) or got[-1])
    fast = sources.read_csv(p, opt)
    assert got[0] is not None    # numpy read it
    monkeypatch.setattr(sources, "_numpy_read", lambda *a: None)
    slow = sources.read_csv(p, opt)
    np.testing.assert_array_equal(fast.X, slow.X)
    np.testing.assert_array_equal(fast.y, slow.y)
    assert (fast.classes, fast.columns) == (slow.classes, slow.columns)
    assert fast.lines is not None or kw["blanks"]   # a row's line is known unless a blank line was skipped
    if fast.lines is not None:
        np.testing.assert_array_equal(fast.lines, slow.lines)


def test_numpy_path_hands_over_what_it_cannot_read(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CSV_PROBE_ROWS", 3)
    rows = ["a,b,y"] + [f"{i},{i + 1},{i % 2}" for i in range(10)]
    got = []
    real = sources._numpy_read
    monkeypatch.setattr(sources, "_numpy_read", lambda *a: got.append(real(*a)) or got[-1])
    # text in an input column after the probe: the csv module names the line and the column
    bad = rows[:8] + ["7,x,1"] + rows[9:]
    with pytest.raises(DataError, match="line 9, column 'b': 'x' is not a number"):
        sources.read_csv(write(tmp_path, "\n".join(bad) + "\n"))
    # a quoted field in a file with a missing field (it may hold a delimiter): the csv module reads it
    quoted = rows[:8] + ['7,"8",1', "8,,0"] + rows[10:]
    t = sources.read_csv(write(tmp_path, "\n".join(quoted) + "\n", "q.csv"))
    assert got[-1] is None and t.X[7].tolist() == [7, 8] and np.isnan(t.X[8, 1])
    # a label the run does not know: the csv module names it and its line
    with pytest.raises(DataError, match="line 10, column 'y': label '9' is not one of the run's classes"):
        sources.read_csv(write(tmp_path, "\n".join(rows[:9] + ["8,9,9"] + rows[10:]) + "\n", "l.csv"),
                         sources.CsvOptions(classes=["0", "1"]))


# ---------------------------------------------------------------------------------------------- nan_policy
def test_error_policy_names_file_count_and_line(tmp_path, made):
    p = write(tmp_path, "a,b,y\n1,2,0\n\n3,,1\n4,NA,1\n")
    with pytest.raises(DataError, match=r"d.csv: 2 of 3 rows have NaN or Inf; the first is row 1 \(0-based, line 4 "
                                        r"of the file; a missing field reads as NaN\).*\"impute\""):
        build(cfg(source=p), 1, made)


def test_drop_policy_drops_missing_rows(tmp_path, made):
    p = write(tmp_path, "a,b,y\n1,2,0\n3,,1\n4,5,null\n6,7,1\n")
    b, layout = build(cfg(source=p, nan_policy="drop", standardize=False), 1, made)
    assert b.X.tolist() == [[1, 2], [6, 7]] and layout.rows_dropped == 2


def test_impute_means_are_nanmean_of_training_rows_only(tmp_path, made):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((200, 3)) * [1, 10, 100] + [0, 5, -50]
    y = rng.standard_normal(200)
    X[rng.random(X.shape) < 0.2] = np.nan
    with open(tmp_path / "d.csv", "w") as fh:
        fh.write("a,b,c,y\n")
        for row, t in zip(X, y):
            fh.write(",".join("" if np.isnan(v) else repr(float(v)) for v in row) + f",{t!r}\n")
    c = cfg(source=str(tmp_path / "d.csv"), nan_policy="impute", standardize=False, test_fraction=0.25, seed=5)
    b, layout = build(c, 2, made)
    test = data.holdout(200, 0.25, 5)
    train = np.setdiff1d(np.arange(200), test)
    want = np.nanmean(X[train], axis=0)
    np.testing.assert_allclose(layout.impute_means, want, rtol=1e-12)
    assert not np.allclose(want, np.nanmean(X, axis=0))   # the held-out rows would have moved it
    # every missing input, training or held-out, holds the training mean; the rest are as given
    filled = np.where(np.isnan(X), want, X)
    np.testing.assert_allclose(b.X, filled[train], rtol=1e-12)
    np.testing.assert_allclose(b.X_test, filled[test], rtol=1e-12)
    Xl, yl, _, dropped = data.load_arrays(c.data)
    np.testing.assert_allclose(Xl, filled, rtol=1e-12)
    assert dropped == 0


def test_impute_drops_rows_without_a_target_and_refuses_an_empty_column(tmp_path, made):
    p = write(tmp_path, "a,b,y\n1,,0\n,4,NA\n3,5,1\n")
    b, layout = build(cfg(source=p, nan_policy="impute", standardize=False), 1, made)
    assert b.X.tolist() == [[1, 5], [3, 5]] and layout.rows_dropped == 1 and layout.impute_means == [2.0, 5.0]
    q = write(tmp_path, "a,b,y\n1,,0\n2,NA,1\n", "e.csv")
    with pytest.raises(DataError, match="column 'b' has no value in any training row"):
        build(cfg(source=q, nan_policy="impute"), 1, made)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("over,needle", [
    ({"header": "maybe"}, 'data.header: must be true, false or "auto"'),
    ({"delimiter": ";;"}, "data.delimiter: must be one character"),
    ({"columns": [1.5]}, "data.columns: expected a list of column names"),
    ({"drop_columns": "id"}, "data.drop_columns: expected a list"),
    ({"target": -1}, "data.target: a column index is 0-based"),
    ({"target": 1.5}, "data.target: expected a string or an integer"),
    ({"nan_policy": "mean"}, "data.nan_policy: must be one of 'error', 'drop', 'impute'"),
    ({"source": "d.npz", "drop_columns": ["id"]}, "data.drop_columns: only applies to a .csv data.source"),
])
def test_config_errors(over, needle):
    with pytest.raises(ConfigError) as e:
        cfg(**over)
    assert needle in str(e.value)


def test_config_takes_csv_keys_from_the_command_line():
    c = config.load(None, ["data.source=d.csv", "data.target=2", "data.header=false", "data.delimiter=;",
                           'data.drop_columns=["id", 0]', "data.nan_policy=impute"])
    d = c.data
    assert (d.target, d.header, d.delimiter, d.drop_columns, d.nan_policy) == (2, False, ";", ["id", 0], "impute")
    assert config.load(None, ["data.source=d.csv", "data.header=auto"]).data.header == "auto"


# ---------------------------------------------------------------------------------------------- a new file
def test_read_new_reads_a_file_as_the_run_read_its_own(tmp_path, made):
    p = write(tmp_path, "id,a,b,species\nr1,1,,cat\nr2,3,4,dog\nr3,NA,8,cat\n")
    c = cfg(source=p, nan_policy="impute", standardize=False, drop_columns=["id"], target="species")
    _, layout = build(c, 1, made)
    saved = data.saved(layout)
    assert saved == {"classes": ["cat", "dog"], "impute_means": [2.0, 6.0], "columns": ["a", "b"],
                     "fields": ["id", "a", "b", "species"]}
    # columns by name in another order, an extra column, labels mapped by the run's classes, a missing input
    q = write(tmp_path, "b,species,a,note\n,dog,5,x\n1,cat,NA,y\n", "new.csv")
    X, y = data.read_new(c.data, saved, q)
    assert X.tolist() == [[5, 6], [2, 1]] and y.tolist() == [1, 0]
    X, y = data.read_new(c.data, saved, write(tmp_path, "a,b\n1,2\n", "x.csv"))   # no target column
    assert X.tolist() == [[1, 2]] and y is None
    with pytest.raises(DataError, match="label 'emu' is not one of the run's classes"):
        data.read_new(c.data, saved, write(tmp_path, "a,b,species\n1,2,emu\n", "u.csv"))


def test_read_new_header_less_file_may_lack_the_target(tmp_path, made):
    p = write(tmp_path, "1,2,0\n3,4,1\n5,6,0\n")
    c = cfg(source=p, standardize=False, header=False)
    _, layout = build(c, 1, made)
    saved = data.saved(layout)
    assert saved["columns"] == ["0", "1"] and saved["classes"] is None and saved["impute_means"] is None
    X, y = data.read_new(c.data, saved, write(tmp_path, "7,8\n", "n.csv"))
    assert X.tolist() == [[7, 8]] and y is None
    X, y = data.read_new(c.data, saved, write(tmp_path, "7,8,1\n", "m.csv"))
    assert X.tolist() == [[7, 8]] and y.tolist() == [1]


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_messy_csv_trains_end_to_end_and_data_json_is_right(tmp_path):
    rng = np.random.default_rng(0)
    n, names = 240, ["setosa", "versicolor", "virginica"]
    label = rng.integers(0, 3, n)
    X = rng.standard_normal((n, 2)) + 3.0 * np.c_[label == 1, label == 2]
    lines = ["id,x1,x2,species"]
    for i in range(n):
        f = [repr(float(v)) for v in X[i]]
        if i % 11 == 3:
            f[0] = ""          # what pandas writes for NaN
        if i % 13 == 5:
            f[1] = "NA"
        lines.append(f"row{i},{f[0]},{f[1]},{names[label[i]]}")
    src = write(tmp_path, "\n".join(lines) + "\n", "iris.csv")
    out = tmp_path / "run"
    r = psrv.train({"data": {"source": src, "drop_columns": ["id"], "target": "species", "nan_policy": "impute",
                             "test_fraction": 0.25},
                    "model": {"kind": "softmax"},
                    "train": {"workers": 2, "steps": 150, "lr": 0.5, "batch_size": 32},
                    "output": {"dir": str(out), "plot": False}})
    saved = json.loads((out / "data.json").read_text())
    assert saved["classes"] == names and saved["columns"] == ["x1", "x2"]
    test = data.holdout(n, 0.25, 0)
    train = np.setdiff1d(np.arange(n), test)
    Xm = X.copy()
    Xm[np.arange(n) % 11 == 3, 0] = np.nan
    Xm[np.arange(n) % 13 == 5, 1] = np.nan
    np.testing.assert_allclose(saved["impute_means"], np.nanmean(Xm[train], axis=0), rtol=1e-12)
    assert r.summary["test_metric"] > 0.8 and r.theta.shape == (3, 3)


def test_text_labels_with_a_linear_model_are_refused(tmp_path):
    src = write(tmp_path, "a,b\n1,cat\n2,dog\n")
    with pytest.raises(DataError, match="text labels .*'linear' needs numbers"):
        psrv.train({"data": {"source": src}, "train": {"workers": 1, "steps": 1},
                    "output": {"dir": str(tmp_path / "o"), "plot": False}})
