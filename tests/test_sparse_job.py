"""A sparse logistic-regression job (model.kind = "sparse_logistic"): the worker's O(non-zeros) step against the dense
model, the CSR block's build and lifecycle, the keys frame on the wire, the config's refusals, and two short runs:
sparse BSP against dense BSP on the same rows, and FTRL against a serial numpy FTRL on the same batches."""
import json
import os

import msgpack
import numpy as np
import pytest

from psrv import blocks, config, data, models, optim, protocol, sparse_data, sparse_model
from psrv import model as psrv_model
from psrv.criteo import Criteo
from psrv.errors import ConfigError, DataError, ProtocolError
from psrv.metrics_binary import auc
from psrv.schedule import epoch_order
from psrv.shmarray import SeqlockArray
from psrv.sparse import read_svmlight_csr, shard_rows
from psrv.store import Store


# ---------------------------------------------------------------------------------------------- the step
def test_step_equals_the_dense_logistic_gradient_on_the_densified_batch():
    gen = Criteo(3, 9)
    batch = gen.rows(100, 400, 1000)
    rng = np.random.default_rng(1)
    theta = rng.standard_normal(gen.d + 1) * 0.3
    p = sparse_model.prepare(batch)
    assert p.keys.dtype == np.uint64 and p.keys[-1] == gen.d and (np.diff(p.keys.astype(np.int64)) > 0).all()
    assert set(p.keys[:-1].tolist()) == set(batch.indices.tolist())
    g, loss = sparse_model.loss_grad(p, theta[p.keys.astype(np.int64)])
    dense = np.empty(gen.d + 1)
    want = models.Logistic(gen.d).loss_grad(theta, batch.to_dense(), batch.y.copy(), dense)
    full = np.zeros(gen.d + 1)
    full[p.keys.astype(np.int64)] = g
    assert abs(loss - want) < 1e-12 and np.abs(full - dense).max() < 1e-14


def test_csr_take_gathers_rows_like_dense_fancy_indexing():
    csr = Criteo(0, 8).rows(0, 50, 50)
    idx = np.array([7, 0, 49, 7, 3])
    assert np.array_equal(csr.take(idx).to_dense(), csr.to_dense()[idx])
    assert np.array_equal(csr.take(idx).y, csr.y[idx])
    assert csr.rows(0, 25).checksum() != csr.rows(25, 50).checksum()


def test_held_out_metrics_are_log_loss_and_auc_of_the_logits():
    gen = Criteo(2, 8)
    rows = gen.rows(0, 500, 500)
    theta = np.append(gen.weights, gen.bias)
    m = sparse_model.SparseLogistic(gen.d)
    z = gen.logits(rows)
    assert abs(m.loss(theta, rows, rows.y) - np.mean(np.logaddexp(0, z) - rows.y * z)) < 1e-12
    assert m.metric(theta, rows, rows.y) == auc(rows.y, z)


def test_keyed_read_under_the_seqlock(tmp_path):
    arr = SeqlockArray.create(blocks.run_prefix() + "keyed", (10,), np.float64)
    try:
        arr.array[:] = np.arange(10) * 1.5
        arr.begin_write()
        arr.end_write(7)
        out = np.empty(3)
        assert arr.read_rows(np.array([1, 4, 9]), out) == 7 and out.tolist() == [1.5, 6.0, 13.5]
        arr.begin_write()   # a write that never ends: the reader gives up instead of returning torn rows
        with pytest.raises(TimeoutError):
            arr.read_rows(np.array([1]), out[:1], timeout_s=0.05)
    finally:
        arr.close()


# ---------------------------------------------------------------------------------------------- the store
@pytest.mark.parametrize("name", ["sgd", "adagrad", "ftrl"])
def test_keyed_bsp_step_equals_the_dense_step(name):
    """Two workers' keyed pushes summed over the union of their keys give the dense update of the mean."""
    rng = np.random.default_rng(5)
    t = config.Train(optimizer=name, l1=0.01 if name == "ftrl" else 0.0)
    stores = [Store(th, optim.make(name, th, t), lambda s: 0.1) for th in (np.zeros(40), np.zeros(40))]
    for step in range(4):
        for _ in range(2):
            keys = np.sort(rng.choice(40, 9, replace=False)).astype(np.uint64)
            g = rng.standard_normal(9)
            dense = np.zeros(40)
            dense[keys.astype(np.int64)] = g
            stores[0].push(g, keys)
            stores[1].push(dense)
        for s in stores:
            s.apply_step(step, step + 1)
    assert np.abs(stores[0].theta - stores[1].theta).max() < 1e-15 and stores[0].theta.any()


# ---------------------------------------------------------------------------------------------- the block
def _cfg(**over):
    sets = {"data.source": "criteo", "data.n": 3000, "data.log2_buckets": 10, "data.test_fraction": 0.2,
            "model.kind": "sparse_logistic", **over}
    if sets["data.source"] != "criteo" and "data.log2_buckets" not in over:
        del sets["data.log2_buckets"]   # a criteo key
    return config.load(None, [f"{k}={json.dumps(v)}" for k, v in sets.items()])


def test_criteo_block_holds_training_rows_then_held_out_rows():
    c = _cfg()
    block, layout = sparse_data.build(c, 3, blocks.run_prefix() + "sp")
    try:
        rows = Criteo(0, 10).rows(0, 3000, 3000)
        test = data.holdout(3000, 0.2, 0)
        train = np.setdiff1d(np.arange(3000), test)
        view = sparse_data.SparseData(layout.to_dict())
        assert np.array_equal(view.X.to_dense(), rows.take(train).to_dense())
        assert np.array_equal(view.X_test.to_dense(), rows.take(test).to_dense())
        assert np.array_equal(layout.heldout, test)
        assert layout.shards == [[lo, hi - lo] for lo, hi in shard_rows(len(train), 3)]
        view.close()
    finally:
        block.close()
        block.unlink()
    assert not os.path.exists(f"/dev/shm/{block.name}")


def test_svmlight_with_labels_other_than_0_1_is_refused_and_its_block_removed(tmp_path):
    path = tmp_path / "bad.svm"
    path.write_text("1 1:0.5 3:1\n2 2:1\n0 1:1\n")
    c = _cfg(**{"data.source": str(path), "data.test_fraction": 0.0})
    name = blocks.run_prefix() + "bad"
    with pytest.raises(DataError, match="labels 0 or 1"):
        sparse_data.build(c, 1, name)
    assert not os.path.exists(f"/dev/shm/{name}")


@pytest.mark.parametrize("over,needle", [
    ({"data.source": "synthetic"}, "data.source must be 'criteo' or an svmlight"),
    ({"data.source": "x.npz"}, "data.source must be 'criteo' or an svmlight"),
    ({"model.kind": "logistic"}, "need model.kind = 'sparse_logistic'"),
    ({"data.partition": "hash"}, "data.partition"),
    ({"data.batch_order": "blocks"}, "data.batch_order"),
    ({"data.dtype": "float32"}, "data.dtype"),
    ({"model.fit_intercept": False}, "model.fit_intercept"),
    ({"train.local_steps": 2}, "train.local_steps"),
    ({"train.l1": 0.5}, "only applies to train.optimizer = 'ftrl'"),
    ({"data.source": "rows.svm", "data.log2_buckets": 12}, "data.log2_buckets: only applies"),
])
def test_bad_sparse_combinations_are_config_errors(over, needle):
    with pytest.raises(ConfigError, match=needle):
        _cfg(**over)


# ---------------------------------------------------------------------------------------------- the wire
def _push(n_arrays: int, keys_descr, extra=()) -> list:
    h = {"op": "push", "wid": 0, "inc": 1, "sid": "s", "seq": 1, "clock": 0, "version": 0, "loss": 1.0, "count": 1,
         "pull": False, "compute_s": 0.0, "request_s": 0.0, "arrays": [keys_descr, ["<f8", [2]]][:n_arrays]}
    return [msgpack.packb(h), *extra]


def test_a_keyed_push_and_a_get_decode_with_a_u8_keys_frame():
    keys = np.array([2, 9], dtype="<u8")
    h, arrays = protocol.decode(_push(2, ["<u8", [2]], [keys.tobytes(), np.ones(2).tobytes()]))
    assert arrays[0].dtype == np.uint64 and arrays[0].tolist() == [2, 9] and arrays[1].tolist() == [1.0, 1.0]
    h, arrays = protocol.decode([msgpack.packb({"op": "get", "wid": 0, "inc": 1, "arrays": [["<u8", [2]]]}),
                                 keys.tobytes()])
    assert arrays[0].tolist() == [2, 9]
    frames = protocol.encode({"op": "get", "wid": 0, "inc": 1}, [keys])   # encode accepts a keys frame
    assert protocol.decode(frames)[1][0].tolist() == [2, 9]


@pytest.mark.parametrize("frames,code", [
    (_push(2, ["<f8", [2]], [np.ones(2).tobytes(), np.ones(2).tobytes()]), "bad_dtype"),       # float keys
    (_push(1, ["<u8", [2]], [np.ones(2, "<u8").tobytes()]), "bad_dtype"),                       # <u8 as a gradient
    (_push(2, ["<u8", [1, 2]], [np.arange(2, dtype="<u8").tobytes(), np.ones(2).tobytes()]), "bad_keys"),  # 2-D
    (_push(2, ["<u8", [2]], [np.array([5, 5], "<u8").tobytes(), np.ones(2).tobytes()]), "bad_keys"),  # repeated
    (_push(2, ["<u8", [2]], [np.array([5, 1], "<u8").tobytes(), np.ones(2).tobytes()]), "bad_keys"),  # unsorted
    ([msgpack.packb({"op": "get", "wid": 0, "inc": 1})], "bad_frames"),                         # get without keys
    ([msgpack.packb({"op": "get", "wid": 0, "inc": 1, "arrays": [["<f8", [1]]]}), np.ones(1).tobytes()],
     "bad_dtype"),
])
def test_bad_keys_frames_are_refused_with_named_codes(frames, code):
    with pytest.raises(ProtocolError) as e:
        protocol.decode(frames)
    assert e.value.code == code


# ---------------------------------------------------------------------------------------------- runs
def _write_svmlight(path, csr) -> None:
    with open(path, "w") as fh:
        for i in range(csr.n):
            a, b = csr.indptr[i], csr.indptr[i + 1]
            cols = " ".join(f"{j + 1}:{float(v)!r}" for j, v in zip(csr.indices[a:b], csr.values[a:b]))
            fh.write(f"{int(csr.y[i])} {cols}\n")


RUN = ["--set", "train.workers=2", "--set", "train.consistency=bsp", "--set", "train.batch_size=200",
       "--set", "data.test_fraction=0.2", "--set", "train.lr_schedule=constant", "--set", "checkpoint.every_steps=0",
       "--set", "output.plot=false", "--set", "output.live_view=false", "-q"]


@pytest.mark.slow
def test_sparse_bsp_equals_dense_bsp_on_the_same_rows(launch, tmp_path):
    """The same rows as an svmlight file (sparse_logistic, rows read by `get` over ZeroMQ: worker.shm = false) and
    as a dense .npz (logistic, unstandardized): same shards, batches and Adagrad steps, so the same theta."""
    d = 2 ** 9
    csr = Criteo(4, 9).rows(0, 2000, 2000)
    _write_svmlight(tmp_path / "rows.svm", csr)
    back, _ = read_svmlight_csr(str(tmp_path / "rows.svm"), d)
    np.savez(tmp_path / "rows.npz", X=back.to_dense(), y=back.y)
    common = [*RUN, "--set", "train.optimizer=adagrad", "--set", "train.lr=0.5", "--set", "train.steps=20",
              "--set", f"data.d={d}"]
    sp = launch(*common, "--set", f"data.source={tmp_path / 'rows.svm'}", "--set", "model.kind=sparse_logistic",
                "--set", "worker.shm=false", "--set", f"output.dir={tmp_path / 'sparse'}")
    code, out, err = sp.wait()
    assert code == 0, err
    sp.assert_no_leftovers()
    de = launch(*common, "--set", f"data.source={tmp_path / 'rows.npz'}", "--set", "model.kind=logistic",
                "--set", "data.standardize=false", "--set", f"output.dir={tmp_path / 'dense'}")
    code, out, err = de.wait()
    assert code == 0, err
    a, b = np.load(tmp_path / "sparse" / "theta.npy"), np.load(tmp_path / "dense" / "theta.npy")
    assert a.shape == b.shape == (d + 1,) and np.abs(b).max() > 0.01
    assert np.abs(a - b).max() < 1e-10
    s = json.loads((tmp_path / "sparse" / "summary.json").read_text())
    assert s["metric"] == "auc" and s["test_rows"] == 400 and 0.5 < s["test_metric"] <= 1
    with pytest.raises(ConfigError, match="do not serve sparse models yet"):
        psrv_model.load(str(tmp_path / "sparse"))


def _serial_ftrl(gen, n, steps, batch, alpha, beta, l1, l2, seed=0, fraction=0.2, workers=2):
    """FTRL-Proximal (McMahan et al. 2013, Algorithm 1) per coordinate, written out here, on the batches a BSP run
    of `workers` workers serves (shard w to worker w, each batch `batch` rows of its shard's epoch order), the
    gradient of each batch from the dense logistic model, the step's gradient their mean."""
    rows = gen.rows(0, n, n)
    test = data.holdout(n, fraction, seed)
    train = rows.take(np.setdiff1d(np.arange(n), test))
    d = gen.d
    w, z, nn = np.zeros(d + 1), np.zeros(d + 1), np.zeros(d + 1)
    cursors = [[0, 0] for _ in range(workers)]   # (epoch, position) of each shard
    shards = shard_rows(train.n, workers)
    model = models.Logistic(d)
    for _ in range(steps):
        g = np.zeros(d + 1)
        for s, (lo, hi) in enumerate(shards):
            epoch, pos = cursors[s]
            count = min(batch, hi - lo - pos)
            idx = lo + epoch_order(0, s, epoch, hi - lo)[pos:pos + count]
            part = train.take(idx)
            gs = np.empty(d + 1)
            model.loss_grad(w, part.to_dense(), part.y.copy(), gs)
            g += gs
            cursors[s] = [epoch + 1, 0] if pos + count >= hi - lo else [epoch, pos + count]
        g /= workers
        touched = g != 0
        sigma = (np.sqrt(nn + g * g) - np.sqrt(nn)) / alpha
        z += np.where(touched, g - sigma * w, 0.0)
        nn += g * g
        w = np.where(np.abs(z) <= l1, 0.0, -(z - np.sign(z) * l1) / ((beta + np.sqrt(nn)) / alpha + l2))
    return w, rows.take(test)


@pytest.mark.slow
def test_ftrl_run_matches_a_serial_numpy_ftrl_and_recovers_the_planted_weights(launch, tmp_path):
    n, k, steps = 6000, 10, 48
    la = launch(*RUN, "--set", "data.source=criteo", "--set", f"data.n={n}", "--set", f"data.log2_buckets={k}",
                "--set", "model.kind=sparse_logistic", "--set", "train.optimizer=ftrl", "--set", "train.lr=0.2",
                "--set", "train.l1=0.5", "--set", "model.l2=0.1", "--set", f"train.steps={steps}",
                "--set", f"output.dir={tmp_path / 'out'}")
    code, out, err = la.wait()
    assert code == 0, err
    la.assert_no_leftovers()
    theta = np.load(tmp_path / "out" / "theta.npy")
    gen = Criteo(0, k)
    want, test = _serial_ftrl(gen, n, steps, 200, 0.2, 1.0, 0.5, 0.1)
    assert np.abs(theta - want).max() < 1e-9
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    serial_auc = auc(test.y, sparse_model.SparseLogistic(gen.d).logits(want, test))
    assert abs(s["test_metric"] - serial_auc) < 0.002
    assert (theta[:-1] == 0).sum() > 0   # L1 keeps weights at exactly 0
    # 19,200 rows over 1,024 buckets, most weights 0: far above what chance gives (|corr| ~ 1/sqrt(1024) = 0.03);
    # benchmarks/sparse.py reports it on the full-size job
    corr = np.corrcoef(theta[:-1], gen.weights)[0, 1]
    assert corr > 0.15, corr


@pytest.mark.parametrize("n,d", [(0, 8), (1, 8), (500, 8), (5000, 2 ** 22), (300, 2 ** 61)])
def test_unique_inverse_is_numpys(n, d):
    cols = np.random.default_rng(n).integers(0, min(d, 2 ** 40), n).astype(np.int64)
    keys, inv = sparse_model.unique_inverse(cols, d)
    want_keys, want_inv = np.unique(cols, return_inverse=True)
    assert np.array_equal(keys, want_keys) and np.array_equal(inv, want_inv.reshape(-1))
