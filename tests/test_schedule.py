import numpy as np
import pytest

from psrv.schedule import Cursor, Schedule, assign, epoch_order

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
    c.returned.append([0, 8, 2])                 # a batch lost with a dead worker is served again, first
    assert c.take(4) == (0, 8, 2) and c.take(4) == (1, 4, 4)


@pytest.mark.parametrize("n,live,current,expected", [
    (3, [0, 1, 2], {}, {0: 0, 1: 1, 2: 2}),                     # one each, own shard
    (3, [0, 1], {}, {0: 0, 1: 1, 2: 0}),                        # the extra one to the lowest wid
    (3, [0, 1], {0: 0, 1: 0, 2: 0}, {0: 0, 1: 1, 2: 0}),        # join order 0, 1 ...
    (3, [0, 1], {0: 1, 1: 1, 2: 1}, {0: 0, 1: 1, 2: 0}),        # ... and 1, 0 give the same leases
    (2, [0], {0: 0, 1: 1}, {0: 0, 1: 0}),                       # worker 1 died: its shard goes to a survivor
    (2, [0, 1], {0: 0, 1: 0}, {0: 0, 1: 1}),                    # it came back: it gets its own shard again
    (2, [0, 1, 7], {0: 0, 1: 1}, {0: 0, 1: 1}),                 # more workers than shards: 7 holds none
    (4, [5, 9], {}, {0: 5, 1: 5, 2: 9, 3: 9}),                  # attached workers prefer no shard
    (4, [], {0: 1}, {}),
])
def test_assign(n, live, current, expected):
    assert assign(n, live, current) == expected


def test_assign_moves_little_when_a_worker_joins():
    before = assign(8, [0, 1], {})
    after = assign(8, [0, 1, 2], before)
    moved = [s for s in range(8) if before[s] != after[s]]
    assert len(moved) == 2 and all(after[s] == 2 for s in moved)


def test_static_and_dynamic_batches():
    st = Schedule([5, 5, 5])
    st.rebalance([0, 1])
    assert st.held_by(0) == [0, 2] and st.held_by(1) == [1]
    assert st.next_batch(0, 4) == [0, 0, 0, 4]
    assert st.next_batch(0, 4) == [2, 0, 0, 4]          # its least-read shard
    assert st.next_batch(7, 4) is None                  # holds no lease
    dyn = Schedule([5, 5], dynamic=True)
    seen = [dyn.next_batch(w, 5, epochs=1)[0] for w in (0, 0)]
    assert seen == [0, 1] and dyn.next_batch(1, 5, epochs=1) is None and dyn.all_done(1)


def test_epochs_done_only_when_nothing_is_handed_back():
    st = Schedule([4], dynamic=True)
    b = st.next_batch(0, 4, epochs=1)
    assert st.all_done(1)
    st.give_back(b)
    assert not st.all_done(1) and st.next_batch(1, 4, epochs=1) == b
    st.commit(b)
    assert st.rows_visited() == {0: 4}


def test_state_round_trip():
    st = Schedule([5, 7])
    st.next_batch(0, 3)
    st.give_back([0, 0, 0, 3])
    st.commit([1, 2, 0, 7])
    again = Schedule([5, 7])
    again.load_state(st.state())
    assert again.state() == st.state()
    with pytest.raises(ValueError, match="sizes"):
        Schedule([5, 8]).load_state(st.state())
