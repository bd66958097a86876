import numpy as np
import pytest

from psrv import schedule
from psrv.partition import CHUNK, splitmix64, splitmix64_inplace
from psrv.schedule import Cursor, Schedule, assign, block_order, epoch_order, share, storage_order, unsplitmix64

from .test_e2e import M64, block_order as block_order_py, epoch_order as epoch_order_py


@pytest.mark.parametrize("seed,shard,epoch,size", [(0, 0, 0, 10), (7, 3, 2, 1000), (2**40, 1, 9, 1), (3, 0, 0, 0),
                                                   (5, 2, 1, 2 * CHUNK + 7)])   # the mixes work chunk by chunk
def test_epoch_order_matches_the_documented_rule(seed, shard, epoch, size):
    got = epoch_order(seed, shard, epoch, size)
    assert got.dtype == np.int64 and got.tolist() == epoch_order_py(seed, shard, epoch, size)
    assert sorted(got.tolist()) == list(range(size))


def test_unsplitmix64_inverts_splitmix64():
    x = np.random.default_rng(3).integers(0, 2**64, 10_000, dtype=np.uint64, endpoint=False)
    x = np.concatenate([x, np.array([0, 1, 2**63, 2**64 - 1], dtype=np.uint64)])
    assert (unsplitmix64(splitmix64(x)) == x).all()


def test_splitmix64_in_place_over_several_chunks_and_shapes_matches_python_ints():
    from .test_keyrange import mix
    x = np.random.default_rng(4).integers(0, 2**64, 2 * CHUNK + 3, dtype=np.uint64, endpoint=False)
    x[:3] = [0, 2**63, 2**64 - 1]
    want = [mix(int(v)) for v in x]
    assert splitmix64(x).tolist() == want and x[1] == 2**63        # the input left as it was
    grid = x[:-3].reshape(2, CHUNK).copy()                         # two dimensions: mixed element by element
    assert splitmix64_inplace(grid) is grid and grid.ravel().tolist() == want[:-3]
    assert int(splitmix64(np.uint64(x[5]))) == want[5]             # a scalar
    # any layout of the input: transposed, Fortran-ordered, broadcast
    assert splitmix64(x[:-3].reshape(2, CHUNK).T.copy().T).ravel().tolist() == want[:-3]   # (not the mixed grid)
    assert splitmix64(np.asfortranarray(x[:-3].reshape(2, CHUNK))).ravel().tolist() == want[:-3]
    assert splitmix64(np.broadcast_to(x[:3], (2, 3))).tolist() == [want[:3]] * 2
    with pytest.raises(ValueError, match="C-contiguous uint64"):
        splitmix64_inplace(x[::2])                                 # in place in a copy would be lost
    with pytest.raises(ValueError, match="C-contiguous uint64"):
        splitmix64_inplace(x.view(np.int64))


def test_epoch_order_when_key_plus_position_wraps_past_2_64(monkeypatch):
    """key + position is taken modulo 2**64: a key just below 2**64 wraps for the later positions, and the
    positions must still come back (an argsort of the hashes is the oracle)."""
    key = 2**64 - 5
    monkeypatch.setattr(schedule, "epoch_key", lambda seed, shard, epoch: key)
    with np.errstate(over="ignore"):
        h = splitmix64(np.uint64(key) + np.arange(50, dtype=np.uint64))
    assert epoch_order(0, 0, 0, 50).tolist() == np.argsort(h, kind="stable").tolist()


@pytest.mark.parametrize("seed,shard,epoch,size,batch", [(0, 0, 0, 10, 3), (7, 3, 2, 1000, 32), (5, 1, 0, 7, 10),
                                                        (1, 0, 4, 64, 16)])
def test_block_order_matches_the_documented_rule(seed, shard, epoch, size, batch):
    got = block_order(seed, shard, epoch, size, batch)
    assert got.tolist() == block_order_py(seed, shard, epoch, size, batch)
    assert sorted(got.tolist()) == list(range(size))
    c = Cursor(size=size)
    for _ in range(-(-size // batch)):  # every batch a cursor serves is one run of consecutive rows
        _, start, count = c.take(batch)
        rows = got[start:start + count]
        assert (np.diff(rows) == 1).all() and (start + count < size or rows[-1] == size - 1 or count == batch)
    assert storage_order(seed, shard, size).tolist() == epoch_order_py(seed, shard, M64, size)


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


@pytest.mark.parametrize("n,live,expected", [
    (2, [0, 1], {}),                                   # a shard each: nobody shares
    (2, [0, 1, 7], {7: 0}),                            # one more worker than shards: it reads shard 0 too
    (2, [0, 1, 7, 8, 9], {7: 0, 8: 1, 9: 0}),          # spread: the shard fewest read, the lowest on a tie
    (0, [0], {}),
])
def test_share(n, live, expected):
    assert share(n, live, assign(n, live, {})) == expected


def test_a_worker_sharing_a_shard_reads_on_from_its_cursor():
    st = Schedule([8, 8])
    st.rebalance([0, 1])
    assert st.next_batch(0, 2) == [0, 0, 0, 2]
    st.rebalance([0, 1, 2])                             # 2 joins: it shares shard 0, whose cursor stands at 2
    assert st.held_by(2) == [0] and st.held_by(0) == [0]
    assert [st.next_batch(w, 2) for w in (2, 0, 2)] == [[0, 0, 2, 2], [0, 0, 4, 2], [0, 0, 6, 2]]
    st.rebalance([0, 2])                                # 1 leaves: 2 takes its shard, and shares no more
    assert st.held_by(2) == [1] and st.shared == {}


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


def test_rows_visited_stay_small_over_100000_epochs():
    import msgpack
    from psrv.schedule import EPOCHS_KEPT
    st = Schedule([3])
    st.rebalance([0])
    epochs = 100_000
    while (b := st.next_batch(0, 2, epochs=epochs)) is not None:   # batches of 2 and 1 rows
        st.commit(b)
    kept = st.rows_visited()
    assert kept == {e: 3 for e in range(epochs - EPOCHS_KEPT, epochs)}
    assert st.rows_visited_before() + sum(kept.values()) == 3 * epochs          # the total is exact
    packed = msgpack.packb(st.state())
    assert len(packed) < 200, len(packed)                                       # was one pair per epoch
    again = Schedule([3])
    again.load_state(msgpack.unpackb(packed))
    assert again.state() == st.state() and again.rows_visited_before() == st.rows_visited_before()


def test_folded_counts_match_a_full_count_whatever_the_commit_order():
    import random
    from psrv.schedule import EPOCHS_KEPT
    rng = random.Random(3)
    st, full = Schedule([10, 10]), {}
    for i in range(5000):
        e = max(0, i // 100 - rng.choice([0, 0, 0, 1, 2, 12]))   # mostly current, some late commits of old epochs
        k = rng.randint(1, 4)
        st.commit([rng.randint(0, 1), e, 0, k])
        full[e] = full.get(e, 0) + k
    kept = st.rows_visited()
    assert len(kept) == EPOCHS_KEPT and kept == {e: full[e] for e in kept}      # each kept epoch counted whole
    assert min(kept) > max(e for e in full if e not in kept)
    assert st.rows_visited_before() == sum(k for e, k in full.items() if e not in kept)


def test_old_state_format_with_counts_per_shard_loads():
    old = {"cursors": [[5, 20, 1, [], [[e, 5] for e in range(20)]],
                       [5, 20, 0, [[19, 0, 2]], [[e, 4] for e in range(19)]]]}
    st = Schedule([5, 5])
    st.load_state(old)
    assert st.rows_visited() == {**{e: 9 for e in range(12, 19)}, 19: 5}
    assert st.rows_visited_before() == 9 * 12
    assert [c.epoch for c in st.cursors] == [20, 20] and st.cursors[1].returned == [[19, 0, 2]]
