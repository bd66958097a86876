"""psrv.train(config, X=..., y=...): arrays in memory go straight into shared memory, are checked like a file's,
and the run says where its data came from."""
import json

import numpy as np
import pytest

import psrv
from psrv.errors import ConfigError, DataError

RNG = np.random.default_rng(11)
X = RNG.standard_normal((240, 4))
Y = X @ [1.0, -2.0, 0.5, 3.0] + 0.7 + 0.1 * RNG.standard_normal(240)
FAST = {"train": {"workers": 2, "steps": 150, "lr": 0.2, "batch_size": 32}}


def job(tmp_path, name, **data):
    return {**FAST, "data": {"test_fraction": 0.25, "seed": 4, **data},
            "output": {"dir": str(tmp_path / name), "plot": False}}


@pytest.mark.slow
def test_arrays_train_exactly_like_the_same_rows_from_a_file(tmp_path):
    """The oracle is the file path: the same rows from a .npz give the same theta, bit for bit, and the same split."""
    np.savez(tmp_path / "d.npz", X=X, y=Y)
    a = psrv.train(job(tmp_path, "mem"), X=X, y=Y)
    f = psrv.train(job(tmp_path, "file", source=str(tmp_path / "d.npz")))
    np.testing.assert_array_equal(a.theta, f.theta)
    np.testing.assert_array_equal(np.load(tmp_path / "mem" / "heldout.npy"), np.load(tmp_path / "file" / "heldout.npy"))
    assert a.summary["test_metric"] == f.summary["test_metric"] > 0.99
    assert a.summary["source"] == "arrays" and f.summary["source"] == str(tmp_path / "d.npz")
    saved = (tmp_path / "mem" / "config.toml").read_text()
    assert saved.startswith("# data.source = \"arrays\"") and 'source = "arrays"' in saved
    # the saved config says it cannot reload the arrays, and a rerun from it says so instead of "file not found"
    with pytest.raises(DataError, match="in-memory arrays .* numpy.savez"):
        psrv.train(str(tmp_path / "mem" / "config.toml"), ["output.dir=" + str(tmp_path / "again")])


@pytest.mark.parametrize("Xb, yb, needle", [
    (X[:, 0], Y, r"X: expected a 2-D array .*shape \(240,\)"),
    (X, Y[:-1], r"y: expected a vector with one value per row of X \(240 rows\), got shape \(239,\)"),
    (X, np.c_[Y, Y], r"got shape \(240, 2\)"),
    (X.astype(str), Y, "X: expected numbers"),
    (X, np.array(["a"] * 240), "y: expected numbers.*PSClassifier"),
    (X[:0], Y[:0], "no rows or no columns"),
    ([[1.0, 2.0], [3.0]], [1.0, 2.0], "cannot be read as numeric arrays"),
])
def test_bad_arrays_are_named_without_their_values(Xb, yb, needle):
    with pytest.raises(DataError, match=needle) as e:
        psrv.train(FAST, X=Xb, y=yb)
    assert len(str(e.value)) < 300   # the shape and dtype, never the elements


def test_arrays_with_nan_follow_nan_policy_and_other_misuse_is_refused(tmp_path):
    Xn = X.copy()
    Xn[17, 2] = np.nan
    with pytest.raises(DataError, match="1 of 240 rows have NaN or Inf; the first is row 17"):
        psrv.train(job(tmp_path, "nan"), X=Xn, y=Y)
    with pytest.raises(ConfigError, match="pass both X and y"):
        psrv.train(FAST, X=X)
    with pytest.raises(ConfigError, match="use one or the other"):
        psrv.train({"data": {"source": "x.csv"}}, X=X, y=Y)
    with pytest.raises(ConfigError, match="need role 'all'"):
        psrv.train(FAST, X=X, y=Y, role="server")


def test_an_array_in_the_config_is_named_by_shape_not_printed():
    with pytest.raises(ConfigError) as e:
        psrv.train({"data": {"source": X}})
    msg = str(e.value)
    assert "shape (240, 4), dtype float64" in msg and "psrv.train(config, X=..., y=...)" in msg and len(msg) < 200


@pytest.mark.slow
def test_arrays_with_missing_inputs_are_imputed_by_nan_policy(tmp_path):
    """nan_policy applies to arrays as to a file: "impute" fills a NaN input with its column's training mean
    (data.json records the means, computed here independently), "drop" leaves the row out."""
    Xn = X.copy()
    Xn[[3, 50, 51], [0, 2, 2]] = np.nan
    r = psrv.train(job(tmp_path, "imp", nan_policy="impute", test_fraction=0.0), X=Xn, y=Y)
    saved = json.loads((tmp_path / "imp" / "data.json").read_text())
    np.testing.assert_allclose(saved["impute_means"], np.nanmean(Xn, axis=0), rtol=1e-12)
    assert r.summary["rows"] == 240 and r.summary["train_metric"] > 0.99
    d = psrv.train(job(tmp_path, "drop", nan_policy="drop", test_fraction=0.0), X=Xn, y=Y)
    assert d.summary["rows"] == 237 and d.summary["rows_dropped"] == 3
