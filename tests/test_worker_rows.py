"""A local worker's rows (workers.worker.Rows): private copies under data.worker_copy = "auto", within budget."""
import os

import numpy as np
import pytest

from psrv.blocks import BlockSpec, DataBlock
from workers.worker import Rows


@pytest.fixture
def block():
    spec = BlockSpec(name=f"psrv_test_rows_{os.getpid()}", dtype="float64", d=3, n_train=400)
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
    monkeypatch.setattr(sources, "available_memory_bytes", lambda: 4 * 100 * 4 * 8 - 1)   # a shard is 3200 bytes
    rows = Rows(welcome(block, "auto"), local=True, prefix="", wid=0)
    try:
        assert np.shares_memory(rows.get(0)[0], rows.block.X)
    finally:
        rows.close()
