"""A local worker's rows (workers.worker.Rows): private copies under data.worker_copy = "auto", within budget."""
import os

import numpy as np
import pytest

from psrv.blocks import BlockSpec, DataBlock
from workers.worker import Rows


@pytest.fixture(params=["float64", "float32"])
def block(request):
    spec = BlockSpec(name=f"psrv_test_rows_{os.getpid()}", dtype=request.param, d=3, n_train=400)
    b = DataBlock.create(spec)
    b.X[:] = np.arange(1200.0).reshape(400, 3)
    b.y[:] = np.arange(400.0)
    yield b
    b.close()
    b.unlink()


def welcome(block, worker_copy, workers=2):
    return {"data": {"block": block.spec.to_dict(), "shards": [[0, 100], [100, 100], [200, 100], [300, 100]],
                     "config": {"worker_copy": worker_copy}},
            "mean": None, "scale": None, "train": {"workers": workers}}


def test_auto_copies_shards_until_one_and_a_half_shares_then_reads_in_place(block):
    rows = Rows(welcome(block, "auto"), local=True, prefix="", wid=0)
    try:
        # 400 rows over 2 workers: a share is 200 rows, so 300 rows' worth (three shards of 100) are copied
        got = [rows.get(s) for s in range(4)]
        for s, (X, y) in enumerate(got):
            np.testing.assert_array_equal(X, block.X[100 * s:100 * (s + 1)])
            np.testing.assert_array_equal(y, block.y[100 * s:100 * (s + 1)])
        assert [np.shares_memory(X, rows.block.X) for X, _ in got] == [False, False, False, True]
        assert rows.get(0)[0] is got[0][0]   # copied once, then reused
    finally:
        del got
        rows.close()


def test_off_reads_every_shard_in_place(block):
    rows = Rows(welcome(block, "off"), local=True, prefix="", wid=0)
    try:
        assert all(np.shares_memory(rows.get(s)[0], rows.block.X) for s in range(4))
    finally:
        rows.close()


def test_auto_copies_nothing_when_memory_is_short(block, monkeypatch):
    from psrv import sources
    shard_bytes = 100 * 4 * block.X.itemsize
    monkeypatch.setattr(sources, "available_memory_bytes", lambda: 4 * shard_bytes - 1)
    rows = Rows(welcome(block, "auto"), local=True, prefix="", wid=0)
    try:
        assert np.shares_memory(rows.get(0)[0], rows.block.X)
    finally:
        rows.close()


@pytest.mark.parametrize("spare", [-1, 0])
def test_auto_copies_only_if_every_workers_copies_fit_in_half_the_memory_available(block, monkeypatch, spare):
    """The workers decide together (their first batches come at once): each must allow for all their copies, not
    only its own shard's. 4 workers, 400 rows: together at most 1.5 x 400 rows; a shard alone is 100 rows."""
    from psrv import sources
    row_bytes = 4 * block.X.itemsize
    all_copies = int(1.5 * 400 * row_bytes)
    reads = []
    monkeypatch.setattr(sources, "available_memory_bytes", lambda: reads.append(1) or 2 * all_copies + spare)
    rows = Rows(welcome(block, "auto", workers=4), local=True, prefix="", wid=0)
    try:
        copied = [not np.shares_memory(rows.get(s)[0], rows.block.X) for s in (0, 1, 0, 1)]
        # with memory to spare, the worker's own shard (100 rows, its share) is copied, a second one is over budget
        assert copied == ([True, False, True, False] if spare >= 0 else [False] * 4)
        assert len(reads) == 1   # once, at the start: not a read of /proc/meminfo per step
    finally:
        rows.close()


def test_a_worker_attached_from_elsewhere_copies_nothing(block):
    """local=False: it loads its shards into segments of its own (Rows._load) and reads those; nothing to copy."""
    rows = Rows(welcome(block, "auto"), local=False, prefix="", wid=0)
    try:
        assert rows.block is None and rows.copy_budget == 0
    finally:
        rows.close()


def test_local_sgd_penalties_clip_then_add_the_l2_term_and_refuse_a_bad_spec():
    """workers/worker.py's local-SGD penalties (welcome.train.local): the gradient scaled down to clip_norm, then
    l2 * w added on the first l2_rows rows, in place; a spec of the wrong types or out of range is a RunError."""
    from types import SimpleNamespace
    from psrv.errors import RunError
    from workers.worker import Worker
    me = SimpleNamespace(wid=3)
    pen = Worker._penalties(me, {"l2": 0.5, "l2_rows": 2, "clip_norm": 2.0}, np.zeros(3))
    g, w = np.array([3.0, 0.0, 4.0]), np.array([1.0, 2.0, 10.0])   # |g| = 5: scaled to 2
    pen(g, w)
    np.testing.assert_allclose(g, [1.2 + 0.5, 0.0 + 1.0, 1.6], rtol=1e-15)   # the last row is not penalized
    assert pen.clipped == 1
    assert Worker._penalties(me, {"l2": 0.0, "l2_rows": 2, "clip_norm": 0.0}, np.zeros(3)) is None
    for bad in ({"l2": -0.1}, {"l2": 1}, {"clip_norm": float("inf")}, {"l2_rows": 4}, {"l2_rows": "2"}):
        with pytest.raises(RunError, match="welcome.train.local"):
            Worker._penalties(me, {"l2": 0.5, "l2_rows": 2, "clip_norm": 0.0, **bad}, np.zeros(3))
