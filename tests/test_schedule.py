import numpy as np
import pytest

from psrv.schedule import Cursor, Shards, epoch_order

from .test_e2e import epoch_order as epoch_order_py


@pytest.mark.parametrize("seed,shard,epoch,size", [(0, 0, 0, 10), (7, 3, 2, 1000), (2**40, 1, 9, 1)])
def test_epoch_order_matches_the_documented_rule(seed, shard, epoch, size):
    got = epoch_order(seed, shard, epoch, size)
    assert got.tolist() == epoch_order_py(seed, shard, epoch, size)
    assert sorted(got.tolist()) == list(range(size))


def test_epoch_orders_differ_between_epochs_and_shards():
    a = epoch_order(0, 0, 0, 100)
    assert (a != epoch_order(0, 0, 1, 100)).any() and (a != epoch_order(0, 1, 0, 100)).any()
    assert (a == epoch_order(0, 0, 0, 100)).all()


def test_cursor_walks_epochs_with_a_short_last_batch():
    c = Cursor(size=10)
    assert [c.take(4) for _ in range(4)] == [(0, 0, 4), (0, 4, 4), (0, 8, 2), (1, 0, 4)]
    assert c.visited == {0: 10, 1: 4}


def test_leases():
    s = Shards([5, 5, 5])
    assert s.acquire(wid=0, preferred=0) == 0
    assert s.acquire(wid=1, preferred=0) == 1      # taken: the lowest free one
    assert s.acquire(wid=2) == 2
    assert s.acquire(wid=3) is None                 # none left
    s.release(1)
    assert s.held_by(1) == [] and s.acquire(wid=3, preferred=1) == 1
    assert s.next_batch(1, 4) == [1, 0, 0, 4]
    assert s.rows_visited() == {0: 4}
    assert np.array_equal(s.held_by(3), [1])
