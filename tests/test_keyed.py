import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from psrv import optim
from psrv.ftrl import FTRL
from psrv.keyed import KeyedStore, KeyIndex

KEYS = st.lists(st.integers(0, 2**64 - 1), max_size=200)


@settings(max_examples=150, deadline=None)
@given(batches=st.lists(st.one_of(KEYS, st.lists(st.integers(0, 40), max_size=60)), max_size=8),
       capacity=st.integers(1, 64))
def test_no_key_is_lost_or_doubled(batches, capacity):
    """Against a dict: every key gets one row, numbered in order of first touch, found again after any growth."""
    index, oracle = KeyIndex(capacity), {}
    for batch in batches:
        rows = index.rows(np.array(batch, dtype=np.uint64))
        for k, r in zip(batch, rows):
            assert oracle.setdefault(k, len(oracle)) == r
        assert len(index) == len(oracle)
    everything = np.array(list(oracle), dtype=np.uint64)
    np.testing.assert_array_equal(index.find(everything), np.arange(len(oracle)))
    np.testing.assert_array_equal(index.keys[:len(index)], everything)
    slots = index._slot_row[index._slot_row >= 0]
    assert sorted(slots) == list(range(len(oracle)))           # each row in exactly one slot


def test_find_does_not_add_and_colliding_homes_probe_on():
    index = KeyIndex(4)
    mask = int(index._mask)
    # keys that share a home slot, found by search: a batch of them must spread over consecutive slots
    home = index._home(np.arange(5000, dtype=np.uint64))
    same = np.flatnonzero(home == home[0])[:5].astype(np.uint64)
    assert len(same) == 5
    assert (index.find(same) == -1).all() and len(index) == 0
    np.testing.assert_array_equal(index.rows(same), np.arange(5))
    # five keys of one home fill the five slots from it on (wrapping at the end of the table), none elsewhere
    assert set(np.flatnonzero(index._slot_row >= 0)) == {(int(home[0]) + i) & mask for i in range(5)}
    np.testing.assert_array_equal(index.find(same[::-1]), np.arange(5)[::-1])
    assert index.find(np.array([2**64 - 1], dtype=np.uint64))[0] == -1


def test_keyed_store_equals_a_dense_optimizer_on_the_touched_rows():
    """Pushes by key on a store that starts tiny (so it grows many times) give the rows a dense theta gets from
    the same updates by row, for FTRL and for Adam (whose per-row counts must survive the growth)."""
    rng = np.random.default_rng(0)
    universe = rng.integers(0, 2**63, 300, dtype=np.uint64)
    for make in (lambda t: FTRL(t, l1=0.05, l2=0.01), lambda t: optim.Adam(t, beta1=0.9, beta2=0.99, eps=1e-8)):
        store = KeyedStore(2, make, capacity=1)
        dense = np.zeros((len(universe), 2))
        opt = make(dense)
        for _ in range(60):
            pick = np.sort(rng.choice(len(universe), 12, replace=False))
            grad = rng.normal(size=(12, 2))
            shuffle = rng.permutation(12)                    # keys arrive in any order
            store.push(universe[pick][shuffle], grad[shuffle], 0.1)
            opt.step(dense, grad, 0.1, rows=pick)
        touched = np.unique(np.flatnonzero(opt.state["n" if "n" in opt.state else "v"].any(axis=1)))
        np.testing.assert_array_equal(store.pull(universe[touched]), dense[touched])
        assert len(store) == len(touched)


def test_pull_creates_zero_rows_and_push_checks_its_arguments():
    store = KeyedStore(3, lambda t: optim.SGD(t), capacity=1)
    np.testing.assert_array_equal(store.pull(np.array([7, 9, 7], dtype=np.uint64)), np.zeros((3, 3)))  # grows
    assert len(store) == 2
    store.push(np.array([9], dtype=np.uint64), np.ones((1, 3)), 0.5)
    np.testing.assert_array_equal(store.pull(np.array([9, 7], dtype=np.uint64)), [[-0.5] * 3, [0] * 3])
    with pytest.raises(ValueError, match="appears twice"):
        store.push(np.array([9, 9], dtype=np.uint64), np.ones((2, 3)), 0.5)
    with pytest.raises(ValueError, match="shape"):
        store.push(np.array([9], dtype=np.uint64), np.ones((1, 2)), 0.5)
