import os

import numpy as np
import pytest

from psrv import config, data, partition, shards
from psrv.errors import DataError
from psrv.shards import BlockSpec, DataBlock


def cfg(**over):
    return config.load(None, [f"{k}={v}" for k, v in over.items()])


@pytest.fixture
def blocks():
    made = []
    yield made
    for b in made:
        b.close()
        b.unlink()


def build(c, k, blocks):
    b, layout = data.build(c, k, shards.run_prefix() + "t")
    blocks.append(b)
    return b, layout


def test_synthetic_rows_are_the_same_whatever_slice_is_asked():
    X, y = data.synthetic_rows(3, 5, 0.1, 0, 20_000, 20_000)
    X2, y2 = data.synthetic_rows(3, 5, 0.1, 9_000, 17_000, 20_000)
    np.testing.assert_array_equal(X[9_000:17_000], X2)
    np.testing.assert_array_equal(y[9_000:17_000], y2)
    w, b, _, _ = data.synthetic_truth(3, 5)
    Xn, yn = data.synthetic_rows(3, 5, 0.0, 0, 100, 100)
    np.testing.assert_allclose(yn, Xn @ w + b)   # y = X.w + b exactly without noise


@pytest.mark.parametrize("how", ["range", "hash"])
def test_block_holds_each_shard_contiguously(how, blocks):
    c = cfg(**{"data.n": 1000, "data.d": 4, "data.partition": how, "data.standardize": "false"})
    b, layout = build(c, 3, blocks)
    X, y, _, _ = data.load_arrays(c.data)
    order, _ = partition.layout(np.arange(1000), 3, how)
    np.testing.assert_array_equal(b.X, X[order])
    np.testing.assert_array_equal(b.y, y[order])
    assert [list(s) for s in layout.shards] == layout.shards and sum(s for _, s in layout.shards) == 1000


def test_standardize_and_unscale_give_the_same_predictions(blocks):
    c = cfg(**{"data.n": 500, "data.d": 6})
    b, _ = build(c, 2, blocks)
    X, y, _, _ = data.load_arrays(c.data)
    np.testing.assert_allclose(b.X.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(b.X.std(axis=0), 1, rtol=1e-10)
    theta_int = np.random.default_rng(0).standard_normal(7)
    theta = data.unscale(theta_int, b.mean, b.scale, True)
    order = np.arange(500)  # range partition keeps file order
    np.testing.assert_allclose(X[order] @ theta[:6] + theta[6], b.X @ theta_int[:6] + theta_int[6], rtol=1e-12)


def test_standardize_without_intercept_only_scales(blocks):
    c = cfg(**{"data.n": 300, "data.d": 3, "model.fit_intercept": "false"})
    b, _ = build(c, 1, blocks)
    X, _, _, _ = data.load_arrays(c.data)
    assert (b.mean == 0).all()
    t = np.array([0.3, -1.0, 2.0])
    np.testing.assert_allclose(X @ data.unscale(t, b.mean, b.scale, False), b.X @ t, rtol=1e-12)


def test_constant_column_is_left_alone(tmp_path, blocks):
    X = np.c_[np.ones(50) * 7.0, np.arange(50.0)]
    np.savez(tmp_path / "d.npz", X=X, y=np.arange(50.0))
    b, _ = build(cfg(**{"data.source": str(tmp_path / "d.npz")}), 1, blocks)
    assert b.scale[0] == 1.0 and np.isfinite(b.X).all()


def test_float32_block(blocks):
    b, _ = build(cfg(**{"data.n": 100, "data.d": 3, "data.dtype": "float32"}), 2, blocks)
    assert b.X.dtype == np.float32 and b.y.dtype == np.float32


def test_npz_and_csv_sources(tmp_path, blocks):
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((40, 3)), rng.standard_normal(40)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    with open(tmp_path / "d.csv", "w") as fh:
        fh.write("a,target,b,c\n")
        for row, t in zip(X, y):
            fh.write(",".join(repr(float(v)) for v in (row[0], t, row[1], row[2])) + "\n")
    for src, target in (("d.npz", ""), ("d.csv", "target")):
        c = cfg(**{"data.source": str(tmp_path / src), "data.target": target, "data.standardize": "false"})
        b, layout = build(c, 2, blocks)
        np.testing.assert_array_equal(b.X, X)
        np.testing.assert_array_equal(b.y, y)
    assert layout.columns == ["a", "b", "c"]


@pytest.mark.parametrize("content,needle", [
    ("a,b\n1,2\n3\n", "line 3 has 1 fields, the header has 2"),
    ("a,b\n1,2\n3,x\n", "line 3, column 'b': 'x' is not a number"),
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


def test_nan_rows_error_names_the_first_row(tmp_path, blocks):
    X = np.ones((10, 2))
    X[4, 1] = np.nan
    y = np.zeros(10)
    y[7] = np.inf
    np.savez(tmp_path / "d.npz", X=X, y=y)
    with pytest.raises(DataError, match="2 of 10 rows have NaN or Inf; the first is row 4"):
        build(cfg(**{"data.source": str(tmp_path / "d.npz")}), 1, blocks)
    Xd, yd, dropped = data.apply_nan_policy(X, y, "drop", "d.npz")
    assert dropped == 2 and len(Xd) == 8 and np.isfinite(Xd).all()


def test_explicit_size_mismatch(tmp_path, blocks):
    np.savez(tmp_path / "d.npz", X=np.zeros((10, 5)), y=np.zeros(10))
    src = str(tmp_path / "d.npz")
    with pytest.raises(DataError, match="data.d = 6 but .* has 5 feature columns"):
        build(config.load(None, [f"data.source={src}", "data.d=6"]), 1, blocks)
    with pytest.raises(DataError, match="data.n = 11 but .* has 10 rows"):
        build(config.load(None, [f"data.source={src}", "data.n=11"]), 1, blocks)
    build(config.load(None, [f"data.source={src}"]), 1, blocks)  # defaults are not checked against files


def test_more_workers_than_rows(blocks):
    with pytest.raises(DataError, match="cannot fill 4 shards"):
        build(cfg(**{"data.n": 3}), 4, blocks)


def test_empty_hash_shard_is_an_error(blocks):
    with pytest.raises(DataError, match="is empty"):
        build(cfg(**{"data.n": 3, "data.partition": "hash"}), 3, blocks)


def test_block_lifecycle_attach_close_unlink():
    spec = BlockSpec(name=shards.run_prefix() + "life", dtype="float64", d=3, n_train=10)
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
    before = set(os.listdir("/dev/shm"))

    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(data, "_standardize", boom)
    with pytest.raises(RuntimeError):
        data.build(cfg(**{"data.n": 10}), 1, shards.run_prefix() + "fail")
    assert set(os.listdir("/dev/shm")) == before
