import os

import numpy as np
import pytest

from psrv import config, data, partition, blocks, schedule, sources
from psrv.errors import DataError
from psrv.blocks import BlockSpec, DataBlock

from .conftest import build


def cfg(**over):
    return config.load(None, [f"{k}={v}" for k, v in over.items()])




def test_synthetic_rows_are_the_same_whatever_slice_is_asked():
    X, y = data.synthetic_rows(3, 5, 0.1, 0, 20_000, 20_000)
    X2, y2 = data.synthetic_rows(3, 5, 0.1, 9_000, 17_000, 20_000)
    np.testing.assert_array_equal(X[9_000:17_000], X2)
    np.testing.assert_array_equal(y[9_000:17_000], y2)
    w, b, _, _ = data.synthetic_truth(3, 5)
    Xn, yn = data.synthetic_rows(3, 5, 0.0, 0, 100, 100)
    np.testing.assert_allclose(yn, Xn @ w + b)   # y = X.w + b exactly without noise


@pytest.mark.parametrize("how", ["range", "hash"])
def test_block_holds_each_shard_contiguously(how, made):
    c = cfg(**{"data.n": 1000, "data.d": 4, "data.partition": how, "data.standardize": "false"})
    b, layout = build(c, 3, made)
    X, y, _, _ = data.load_arrays(c.data)
    order, _ = partition.layout(np.arange(1000), 3, how)
    np.testing.assert_array_equal(b.X, X[order])
    np.testing.assert_array_equal(b.y, y[order])
    assert [list(s) for s in layout.shards] == layout.shards and sum(s for _, s in layout.shards) == 1000


def test_standardize_and_unscale_give_the_same_predictions(made):
    c = cfg(**{"data.n": 500, "data.d": 6})
    b, _ = build(c, 2, made)
    X, y, _, _ = data.load_arrays(c.data)
    np.testing.assert_allclose(b.X.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(b.X.std(axis=0), 1, rtol=1e-10)
    theta_int = np.random.default_rng(0).standard_normal(7)
    theta = data.unscale(theta_int, b.mean, b.scale, True)
    order = np.arange(500)  # range partition keeps file order
    np.testing.assert_allclose(X[order] @ theta[:6] + theta[6], b.X @ theta_int[:6] + theta_int[6], rtol=1e-12)


def test_standardize_without_intercept_only_scales(made):
    c = cfg(**{"data.n": 300, "data.d": 3, "model.fit_intercept": "false"})
    b, _ = build(c, 1, made)
    X, _, _, _ = data.load_arrays(c.data)
    assert (b.mean == 0).all()
    t = np.array([0.3, -1.0, 2.0])
    np.testing.assert_allclose(X @ data.unscale(t, b.mean, b.scale, False), b.X @ t, rtol=1e-12)


def test_constant_column_is_left_alone(tmp_path, made):
    X = np.c_[np.ones(50) * 7.0, np.arange(50.0)]
    np.savez(tmp_path / "d.npz", X=X, y=np.arange(50.0))
    b, _ = build(cfg(**{"data.source": str(tmp_path / "d.npz")}), 1, made)
    assert b.scale[0] == 1.0 and np.isfinite(b.X).all()


def test_float32_block(made):
    b, _ = build(cfg(**{"data.n": 100, "data.d": 3, "data.dtype": "float32"}), 2, made)
    assert b.X.dtype == np.float32 and b.y.dtype == np.float32


def test_npz_and_csv_sources(tmp_path, made):
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((40, 3)), rng.standard_normal(40)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    with open(tmp_path / "d.csv", "w") as fh:
        fh.write("a,target,b,c\n")
        for row, t in zip(X, y):
            fh.write(",".join(repr(float(v)) for v in (row[0], t, row[1], row[2])) + "\n")
    for src, target in (("d.npz", ""), ("d.csv", "target")):
        c = cfg(**{"data.source": str(tmp_path / src), "data.target": target, "data.standardize": "false"})
        b, layout = build(c, 2, made)
        np.testing.assert_array_equal(b.X, X)
        np.testing.assert_array_equal(b.y, y)
    assert layout.columns == ["a", "b", "c"]


@pytest.mark.parametrize("content,needle", [
    ("a,b\n1,2\n3\n", "line 3 has 1 fields, the header has 2"),
    ("a,b\n1,2\nx,3\n", "line 3, column 'a': 'x' is not a number; leave a text column out with "
                          "data.drop_columns = ['a']"),
    ("", "empty file"),
    ("a,b\n", "no data rows"),
    ("a\n1\n", "at least two columns"),
])
def test_bad_csv_names_file_and_line(tmp_path, content, needle):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(DataError) as e:
        data.read_file(str(p))
    assert needle in str(e.value) and "bad.csv" in str(e.value)


def test_missing_target_column(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="data.target: column 'y' is not in"):
        data.read_file(str(p), "y")


def test_missing_file_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        data.read_file(str(tmp_path / "none.npz"))
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="unknown file type '.parquet'"):
        data.read_file(str(tmp_path / "x.parquet"))


@pytest.mark.parametrize("arrays,needle", [
    ({"X": np.zeros((3, 2))}, "must hold arrays 'X' and 'y'"),
    ({"X": np.zeros(3), "y": np.zeros(3)}, "X must be 2-D"),
    ({"X": np.zeros((3, 2)), "y": np.zeros(4)}, "one value per row"),
    ({"X": np.array([["a", "b"]]), "y": np.zeros(1)}, "expected numbers"),
])
def test_bad_npz(tmp_path, arrays, needle):
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError, match=needle):
        data.read_file(str(tmp_path / "d.npz"))


def test_npz_with_pickled_objects_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(DataError, match="cannot read"):
        data.read_file(str(tmp_path / "d.npz"))


def test_nan_rows_error_names_the_first_row(tmp_path, made):
    X = np.ones((10, 2))
    X[4, 1] = np.nan
    y = np.zeros(10)
    y[7] = np.inf
    np.savez(tmp_path / "d.npz", X=X, y=y)
    with pytest.raises(DataError, match="2 of 10 rows have NaN or Inf; the first is row 4"):
        build(cfg(**{"data.source": str(tmp_path / "d.npz")}), 1, made)
    Xd, yd, dropped = data.apply_nan_policy(X, y, "drop", "d.npz")
    assert dropped == 2 and len(Xd) == 8 and np.isfinite(Xd).all()


def test_explicit_size_mismatch(tmp_path, made):
    np.savez(tmp_path / "d.npz", X=np.zeros((10, 5)), y=np.zeros(10))
    src = str(tmp_path / "d.npz")
    with pytest.raises(DataError, match="data.d = 6 but .* has 5 feature columns"):
        build(config.load(None, [f"data.source={src}", "data.d=6"]), 1, made)
    with pytest.raises(DataError, match="data.n = 11 but .* has 10 rows"):
        build(config.load(None, [f"data.source={src}", "data.n=11"]), 1, made)
    build(config.load(None, [f"data.source={src}"]), 1, made)  # defaults are not checked against files


def test_more_workers_than_rows(made):
    with pytest.raises(DataError, match="cannot fill 4 shards"):
        build(cfg(**{"data.n": 3}), 4, made)


def test_empty_hash_shard_is_an_error(made):
    with pytest.raises(DataError, match="is empty"):
        build(cfg(**{"data.n": 3, "data.partition": "hash"}), 3, made)


def test_block_lifecycle_attach_close_unlink():
    spec = BlockSpec(name=blocks.run_prefix() + "life", dtype="float64", d=3, n_train=10)
    owner = DataBlock.create(spec)
    owner.X[:] = 5.0
    other = DataBlock.attach(spec.to_dict())
    assert (other.X == 5.0).all() and not other.owner
    other.unlink()                                   # not the owner: a no-op
    assert os.path.exists(f"/dev/shm/{spec.name}")
    assert oct(os.stat(f"/dev/shm/{spec.name}").st_mode & 0o777) == "0o600"
    other.close()
    owner.close()
    owner.unlink()
    assert not os.path.exists(f"/dev/shm/{spec.name}")


def test_failed_build_unlinks_its_block(tmp_path, monkeypatch):
    name = blocks.run_prefix() + "fail"
    mine = lambda: {f for f in os.listdir("/dev/shm") if f.startswith(name)}  # noqa: E731 (others' runs come and go)

    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(data, "_standardize", boom)
    with pytest.raises(RuntimeError):
        data.build(cfg(**{"data.n": 10}), 1, name)
    assert mine() == set()


# ---------------------------------------------------------------------------------------------- held-out rows
DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


@pytest.mark.parametrize("n,fraction", [(0, 0.5), (1, 0.4), (10, 0.25), (10, 0.35), (1000, 0.1), (7, 0.9), (50, 0.0)])
def test_holdout_size_order_and_range(n, fraction):
    rows = data.holdout(n, fraction, seed=3)
    assert len(rows) == round(n * fraction) and rows.dtype == np.int64
    assert (np.diff(rows) > 0).all() and (rows >= 0).all() and (rows < max(n, 1)).all()


def test_holdout_is_deterministic_and_follows_the_documented_draw():
    a = data.holdout(1000, 0.2, seed=5)
    np.testing.assert_array_equal(a, data.holdout(1000, 0.2, seed=5))
    np.testing.assert_array_equal(a, np.sort(np.random.default_rng([5, 0x7E57]).choice(1000, 200, replace=False)))
    assert not np.array_equal(a, data.holdout(1000, 0.2, seed=6))


def _npz(tmp_path, X, y, name="d.npz"):
    np.savez(tmp_path / name, X=X, y=y)
    return str(tmp_path / name)


@pytest.mark.parametrize("how", ["range", "hash"])
def test_build_holds_out_exactly_the_drawn_rows_and_standardizes_on_training_rows(tmp_path, made, how):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((200, 4)) * [1.0, 3.0, 0.1, 10.0] + [0.0, 5.0, -2.0, 1.0]
    y = rng.standard_normal(200)
    c = cfg(**{"data.source": _npz(tmp_path, X, y), "data.test_fraction": 0.25, "data.seed": 9,
               "data.partition": how})
    b, layout = build(c, 3, made)
    test = data.holdout(200, 0.25, 9)
    train = np.setdiff1d(np.arange(200), test)
    assert b.spec.n_test == 50 and b.spec.n_train == 150
    np.testing.assert_allclose(b.mean, X[train].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(b.scale, X[train].std(axis=0), rtol=1e-12)
    np.testing.assert_allclose(b.X_test * b.scale + b.mean, X[test], rtol=1e-12, atol=1e-12)  # file order
    np.testing.assert_array_equal(b.y_test, y[test])
    order, blocks_ = partition.layout(train, 3, how)  # shards by original file row index
    np.testing.assert_allclose(b.X * b.scale + b.mean, X[order], rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(b.y, y[order])
    assert layout.shards == [list(s) for s in blocks_]


def test_synthetic_holdout_scatters_each_chunk(made):
    n = 2 * data.SYNTH_CHUNK_ROWS + 123  # several generator chunks
    c = cfg(**{"data.n": n, "data.d": 3, "data.test_fraction": 0.3, "data.partition": "hash",
               "data.standardize": "false"})
    b, _ = build(c, 2, made)
    X, y, _, _ = data.load_arrays(c.data)  # no holdout there: every row, in file order
    assert len(X) == n
    test = data.holdout(n, 0.3, 0)
    order, _ = partition.layout(np.setdiff1d(np.arange(n), test), 2, "hash")
    np.testing.assert_array_equal(b.X_test, X[test])
    np.testing.assert_array_equal(b.y_test, y[test])
    np.testing.assert_array_equal(b.X, X[order])
    np.testing.assert_array_equal(b.y, y[order])


@pytest.mark.parametrize("n,fraction,k,needle", [
    (10, 0.01, 1, "data.test_fraction = 0.01 holds out no row"),
    (10, 0.9, 2, "data.test_fraction = 0.9 leaves 1 training rows of 10 for 2 shards"),
])
def test_test_fraction_that_leaves_nothing_is_an_error(made, n, fraction, k, needle):
    with pytest.raises(DataError, match=needle):
        build(cfg(**{"data.n": n, "data.test_fraction": fraction}), k, made)


# ---------------------------------------------------------------------------------------------- nan_policy
def _dirty():
    X = np.arange(40.0).reshape(20, 2)
    y = np.arange(20.0)
    X[3, 0], X[11, 1], y[15] = np.nan, np.inf, -np.inf
    return X, y, np.setdiff1d(np.arange(20), [3, 11, 15])


def test_nan_policy_drop_through_build_and_load_arrays(tmp_path, made):
    X, y, good = _dirty()
    src = _npz(tmp_path, X, y)
    c = cfg(**{"data.source": src, "data.nan_policy": "drop", "data.standardize": "false",
               "data.partition": "hash"})
    b, layout = build(c, 2, made)
    assert layout.rows_dropped == 3 and b.spec.n_train == 17
    order, _ = partition.layout(good, 2, "hash")  # kept rows keep their file row index
    np.testing.assert_array_equal(b.X, X[order])
    np.testing.assert_array_equal(b.y, y[order])
    Xl, yl, _, dropped = data.load_arrays(c.data)
    assert dropped == 3
    np.testing.assert_array_equal(Xl, X[good])
    with pytest.raises(DataError, match="3 of 20 rows have NaN or Inf; the first is row 3"):
        data.load_arrays(cfg(**{"data.source": src}).data)


def test_nan_policy_drop_with_holdout_draws_among_kept_rows(tmp_path, made):
    X, y, good = _dirty()
    c = cfg(**{"data.source": _npz(tmp_path, X, y), "data.nan_policy": "drop", "data.standardize": "false",
               "data.test_fraction": 0.3, "data.seed": 1})
    b, layout = build(c, 2, made)
    test = good[data.holdout(17, 0.3, 1)]
    assert layout.rows_dropped == 3 and b.spec.n_test == 5 and b.spec.n_train == 12
    np.testing.assert_array_equal(b.X_test, X[test])
    np.testing.assert_array_equal(b.X, X[np.setdiff1d(good, test)])


def test_nan_policy_drop_of_every_row_is_an_error(tmp_path, made):
    src = _npz(tmp_path, np.full((4, 2), np.nan), np.zeros(4))
    with pytest.raises(DataError, match="every one of its 4 rows"):
        build(cfg(**{"data.source": src, "data.nan_policy": "drop"}), 1, made)


# ---------------------------------------------------------------------------------------------- .npy pairs
def test_npy_pair_round_trip(tmp_path, made):
    rng = np.random.default_rng(4)
    X, y = rng.standard_normal((30, 3)).astype(np.float32), rng.integers(0, 3, (30, 1))
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    Xr, yr, cols = data.read_file(str(tmp_path / "X.npy"), labels=str(tmp_path / "y.npy"))
    assert isinstance(Xr, np.memmap) and yr.shape == (30,) and cols == ["x0", "x1", "x2"]
    np.testing.assert_array_equal(Xr, X)
    np.testing.assert_array_equal(yr, y[:, 0])
    c = cfg(**{"data.source": str(tmp_path / "X.npy"), "data.labels": str(tmp_path / "y.npy"),
               "data.standardize": "false", "data.test_fraction": 0.2})
    b, _ = build(c, 2, made)
    test = data.holdout(30, 0.2, 0)
    np.testing.assert_array_equal(b.X_test, X[test])
    np.testing.assert_array_equal(b.y_test, y[test, 0])
    np.testing.assert_array_equal(b.X, np.delete(X, test, axis=0))
    Xl, yl, _, _ = data.load_arrays(c.data)
    assert Xl.dtype == np.float64 and len(Xl) == 30


@pytest.mark.parametrize("X,y,needle", [
    (np.zeros(3), np.zeros(3), "X.npy: X must be 2-D"),
    (np.zeros((3, 2)), np.zeros(4), "y.npy: y must be a vector with one value per row of X \\(3 rows in"),
    (np.zeros((3, 2)), np.zeros((3, 2)), "got shape \\(3, 2\\)"),
    (np.array([["a", "b"]]), np.zeros(1), "X.npy: X has dtype <U1; expected numbers"),
    (np.zeros((1, 2)), np.array(["a"]), "y.npy: y has dtype <U1; expected numbers"),
])
def test_bad_npy_pair(tmp_path, X, y, needle):
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", y)
    with pytest.raises(DataError, match=needle):
        data.read_file(str(tmp_path / "X.npy"), labels=str(tmp_path / "y.npy"))


def test_npy_unreadable_missing_or_misplaced_labels(tmp_path):
    np.save(tmp_path / "X.npy", np.zeros((2, 2)))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    X = str(tmp_path / "X.npy")
    with pytest.raises(DataError, match="obj.npy: cannot read as .npy"):
        data.read_file(X, labels=str(tmp_path / "obj.npy"))
    with pytest.raises(DataError, match="junk.npy: cannot read as .npy"):
        data.read_file(str(tmp_path / "junk.npy"), labels=X)
    with pytest.raises(DataError, match="data.labels: file not found: .*none.npy"):
        data.read_file(X, labels=str(tmp_path / "none.npy"))
    with pytest.raises(DataError, match="data.labels: .*X.npy is a .npy source"):
        data.read_file(X)
    np.savez(tmp_path / "d.npz", X=np.zeros((2, 2)), y=np.zeros(2))
    with pytest.raises(DataError, match="data.labels: only a .npy data.source"):
        data.read_file(str(tmp_path / "d.npz"), labels=X)


# ---------------------------------------------------------------------------------------------- svmlight
def _svm(tmp_path, text, name="d.svm"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_svmlight_one_based_with_comments_blank_lines_and_qid(tmp_path):
    p = _svm(tmp_path, "# a header comment\n"
                       "1 1:0.5 3:-2   # trailing comment 9:9\n"
                       "\n"
                       "-1 qid:7 2:1e3\n"
                       "   \n"
                       "0.25\n"
                       "2 3:4 1:1\n", "d.libsvm")
    X, y, cols = data.read_file(p)
    np.testing.assert_array_equal(X, [[0.5, 0, -2], [0, 1000, 0], [0, 0, 0], [1, 0, 4]])
    np.testing.assert_array_equal(y, [1, -1, 0.25, 2])
    assert X.dtype == np.float64 and cols == ["x1", "x2", "x3"]


def test_svmlight_zero_based_when_an_index_is_zero(tmp_path):
    X, y, cols = data.read_file(_svm(tmp_path, "1 0:1 2:3\n0 1:2\n", "d.txt"))
    np.testing.assert_array_equal(X, [[1, 0, 3], [0, 2, 0]])
    assert cols == ["x0", "x1", "x2"]


def test_svmlight_explicit_width(tmp_path, made):
    p = _svm(tmp_path, "1 1:1\n0 2:2\n1 1:3\n", "d.svmlight")
    X, _, _ = data.read_file(p, d=4)
    np.testing.assert_array_equal(X, [[1, 0, 0, 0], [0, 2, 0, 0], [3, 0, 0, 0]])
    b, layout = build(config.load(None, [f"data.source={p}", "data.d=4", "data.standardize=false"]), 1, made)
    assert b.spec.d == 4 and len(layout.columns) == 4
    np.testing.assert_array_equal(b.X, X)
    with pytest.raises(DataError, match=r"d.svmlight: line 2: index 2 is beyond data.d = 1 \(1-based"):
        data.read_file(p, d=1)
    with pytest.raises(DataError, match=r"line 1: index 3 is beyond data.d = 3 \(0-based"):
        data.read_file(_svm(tmp_path, "1 3:1 0:2\n"), d=3)


@pytest.mark.parametrize("text,needle", [
    ("1 1:2\nx 1:2\n", "line 2: malformed token 'x': the label is not a number"),
    ("1 1:2\n\n# c\n1 1-2\n", "line 4: malformed token '1-2': expected index:value"),
    ("1 a:2\n", "line 1: malformed token 'a:2': the index is not an integer"),
    ("1 1.5:2\n", "line 1: malformed token '1.5:2': the index is not an integer"),
    ("1 -1:2\n", "line 1: malformed token '-1:2': negative index"),
    ("1 1:two\n", "line 1: malformed token '1:two': the value is not a number"),
    ("1 1:\n", "line 1: malformed token '1:': the value is not a number"),
    ("1 qid:a 1:1\n", "line 1: malformed token 'qid:a': qid must be an integer"),
    ("1 2:1 2:3\n", "line 1: malformed token '2:3': index 2 appears twice"),
    ("# only a comment\n\n", "no data lines"),
    ("1\n0\n", "no feature index on any line"),
])
def test_bad_svmlight_names_file_line_and_token(tmp_path, text, needle):
    with pytest.raises(DataError) as e:
        data.read_file(_svm(tmp_path, text, "bad.svm"))
    assert needle in str(e.value) and "bad.svm" in str(e.value)


def test_svmlight_that_would_not_fit_in_memory(tmp_path, monkeypatch):
    p = _svm(tmp_path, "1 1:1 1000:1\n" * 3)
    monkeypatch.setattr(sources, "available_memory_bytes", lambda: 10_000)
    with pytest.raises(DataError, match=r"svmlight file .*d.svm would need .* GiB dense \(3 rows x 1000 columns"
                                        r" of float64\); .* GiB available"):
        data.read_file(p)
    monkeypatch.setattr(sources, "available_memory_bytes", lambda: None)  # unknown: no check
    assert data.read_file(p)[0].shape == (3, 1000)


def test_available_memory_is_a_positive_byte_count():
    avail = sources.available_memory_bytes()
    assert avail is None or avail > 0


def test_svmlight_nan_values_follow_nan_policy(tmp_path, made):
    p = _svm(tmp_path, "1 1:1\n2 1:nan\n3 2:1\n")
    with pytest.raises(DataError, match="1 of 3 rows have NaN or Inf; the first is row 1"):
        build(cfg(**{"data.source": p}), 1, made)
    b, layout = build(cfg(**{"data.source": p, "data.nan_policy": "drop", "data.standardize": "false"}), 1, made)
    assert layout.rows_dropped == 1
    np.testing.assert_array_equal(b.y, [1, 3])


def test_unknown_type_lists_every_supported_kind(tmp_path):
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError) as e:
        data.read_file(str(tmp_path / "x.parquet"))
    for kind in ("synthetic", *sources.FILE_KINDS):
        assert kind in str(e.value)


# ---------------------------------------------------------------------------------------------- real data sets
@pytest.mark.parametrize("name,rows,cols,labels", [
    ("breast_cancer.csv", 569, 30, {0, 1}),
    ("digits.csv", 1797, 64, set(range(10))),
])
def test_bundled_datasets_load_with_documented_shapes(name, rows, cols, labels):
    X, y, columns = data.read_file(os.path.join(DATA_DIR, name))
    assert X.shape == (rows, cols) and len(columns) == cols and "target" not in columns
    assert set(np.unique(y).astype(int)) == labels and (y == np.round(y)).all()
    assert np.isfinite(X).all()
    if name == "digits.csv":
        assert X.min() == 0 and X.max() == 16 and columns[0] == "pixel_0_0"
    else:
        assert columns[0] == "mean radius" and (np.bincount(y.astype(int)) == [212, 357]).all()


@pytest.mark.parametrize("order", ["rows", "blocks"])
@pytest.mark.parametrize("source", ["synthetic", "npz"])
def test_an_attached_worker_rebuilds_each_shard_exactly_as_stored(tmp_path, made, order, source):
    """data.shard_rows (what a worker on another machine loads) equals the launcher's block, shard by shard, bit
    for bit; under batch_order = "blocks" both hold each shard's rows in storage_order (shuffled once)."""
    over = {"data.n": 3000, "data.d": 3, "data.partition": "hash", "data.batch_order": order,
            "data.test_fraction": 0.1}
    if source == "npz":
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "d.npz", X=rng.normal(size=(3000, 3)), y=rng.normal(size=3000))
        over = {**over, "data.source": str(tmp_path / "d.npz")}
        del over["data.n"]
    c = cfg(**over)
    b, layout = build(c, 3, made)
    for s, (off, size) in enumerate(layout.shards):
        X, y = data.shard_rows(c.data, c.explicit, 3, s, b.mean, b.scale, "float64")
        np.testing.assert_array_equal(X, b.X[off:off + size])
        np.testing.assert_array_equal(y, b.y[off:off + size])
    if order == "blocks":  # each shard holds the rows of the "rows" layout, permuted by storage_order
        br, _ = build(config.load(None, [f"{k}={v}" for k, v in {**over, "data.batch_order": "rows"}.items()]), 3,
                      made)
        for s, (off, size) in enumerate(layout.shards):
            perm = schedule.storage_order(0, s, size)
            assert (perm != np.arange(size)).any()
            # (standardized with sums taken in another row order: equal up to rounding)
            np.testing.assert_allclose(b.X[off:off + size], br.X[off:off + size][perm], rtol=1e-12, atol=1e-12)
