import numpy as np
import pytest

from psrv import checkpoint, optim
from psrv.ftrl import FTRL
from psrv.keyed import KeyedStore
from psrv.keyrange import Ranges, check_keys, load_range, row_ranges, save_range

TOP = 2**64 - 1
M = 2**64


# ------------------------------------------------------------------ an independent splitmix64, and its inverse

def mix(x: int) -> int:
    """splitmix64's finalizer in Python ints (Steele et al. 2014), written from the paper, not from partition.py."""
    z = (x + 0x9E3779B97F4A7C15) % M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % M
    return z ^ (z >> 31)


def _unshift(y: int, s: int) -> int:
    """x from y = x ^ (x >> s)."""
    x, shift = y, s
    while shift < 64:
        x ^= y >> shift
        shift += s
    return x


_INV2, _INV1 = pow(0x94D049BB133111EB, -1, M), pow(0xBF58476D1CE4E5B9, -1, M)   # odd, so invertible mod 2^64


def unmix(h: int) -> int:
    """The key whose hash is h: splitmix64 is a bijection, so every hash value, a cut included, has one key."""
    z = _unshift(h, 31)
    z = _unshift(z * _INV2 % M, 27)
    z = _unshift(z * _INV1 % M, 30)
    return (z - 0x9E3779B97F4A7C15) % M


def owner_oracle(ranges: Ranges, keys: np.ndarray) -> np.ndarray:
    """For each key the one s with lo_s <= hash < hi_s, from the ranges' bounds (checked linearly: disjoint)."""
    bounds = [ranges.bounds(s) for s in range(len(ranges))]
    out = []
    for key in keys.tolist():
        h = mix(key)
        hits = [s for s, (lo, hi) in enumerate(bounds) if lo <= h < hi]
        assert len(hits) == 1, (key, h, hits)
        out.append(hits[0])
    return np.array(out, dtype=np.int64)


def test_the_oracle_hash_is_partitions_and_inverts():
    from psrv.partition import splitmix64
    rng = np.random.default_rng(1)
    xs = [0, 1, 2, TOP, TOP - 1, *map(int, rng.integers(0, TOP, 50, dtype=np.uint64, endpoint=True))]
    assert [int(h) for h in splitmix64(np.array(xs, dtype=np.uint64))] == [mix(x) for x in xs]
    assert all(unmix(mix(x)) == x and mix(unmix(x)) == x for x in xs)


# ------------------------------------------------------------------ the property test (ps-lite#185)

def _random_ranges(rng, shards: int) -> Ranges:
    kind = rng.integers(4)
    if kind == 0:
        return Ranges.even(shards)
    if kind == 1:   # cuts anywhere, equal ones (empty ranges) and the ends of the space likely
        pool = [0, 1, TOP, TOP - 1, *map(int, rng.integers(0, TOP, 3, dtype=np.uint64, endpoint=True))]
        anywhere = map(int, rng.integers(0, TOP, shards - 1, dtype=np.uint64, endpoint=True))
        return Ranges(sorted(pool[rng.integers(len(pool))] if rng.random() < 0.5 else c for c in anywhere))
    sample = np.unique(rng.integers(0, 1000 if kind == 2 else TOP, rng.integers(1, 60), dtype=np.uint64))
    return Ranges.by_bytes(shards, sample, rng.integers(0, 50, len(sample)) if rng.random() < 0.5 else 8)


def _random_keys(rng, ranges: Ranges) -> np.ndarray:
    n = int(rng.integers(0, 120))
    keys = [*map(int, rng.integers(0, TOP, n, dtype=np.uint64, endpoint=True)),   # anywhere
            *range(int(rng.integers(0, 50)))]                                   # small and consecutive
    if rng.random() < 0.5:
        keys += [0, TOP]
    for c in map(int, ranges.cuts):   # the keys on either side of every boundary
        keys += [unmix(c), unmix((c - 1) % M), unmix((c + 1) % M)]
    return np.unique(np.array(keys, dtype=np.uint64))


def test_ranges_property_no_key_lost_or_doubled():
    """Random key sets over random range counts and cuts (even, arbitrary with empty ranges, by bytes), with the
    keys whose hash is each cut, one below and one above it: every key goes to exactly one range (the one whose
    bounds hold its hash, by an independent hash), the same key to the same range in any set, split keeps each
    range's keys sorted and loses or repeats none, split then merge is the identity, and the ranges tile
    [0, 2^64)."""
    rng = np.random.default_rng(20261130)
    for case in range(300):
        shards = int(rng.integers(1, 10) if case % 5 else rng.integers(10, 40))   # the latter: searchsorted
        ranges = _random_ranges(rng, shards)
        assert len(ranges) == shards
        bounds = [ranges.bounds(s) for s in range(shards)]
        assert bounds[0][0] == 0 and bounds[-1][1] == M
        assert all(lo <= hi for lo, hi in bounds) and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))

        keys = _random_keys(rng, ranges)
        want = owner_oracle(ranges, keys)
        np.testing.assert_array_equal(ranges.owner(keys), want, err_msg=f"case {case}")
        perm = rng.permutation(len(keys))[:len(keys) // 2]
        np.testing.assert_array_equal(ranges.owner(keys[perm]), want[perm])     # any other set, any order

        values = rng.normal(size=(len(keys), int(rng.integers(1, 4))))
        pulled, pushed = ranges.split(keys), ranges.split(keys, values)
        assert len(pulled) == len(pushed) == shards
        for s, (ks, (ks2, vs)) in enumerate(zip(pulled, pushed)):
            check_keys(ks)                                                     # sorted and distinct
            mine = want == s
            assert np.array_equal(ks, ks2) and np.array_equal(ks, keys[mine]) and np.array_equal(vs, values[mine])
        merged = ranges.merge(pushed)
        assert merged.dtype == values.dtype and np.array_equal(merged, values)


def test_split_and_merge_at_the_edges():
    keys = np.array([0, 5, TOP], dtype=np.uint64)
    values = np.arange(6.0).reshape(3, 2)
    one = Ranges.even(1)
    assert one.split(keys)[0] is keys and one.split(keys, values)[0][1] is values   # S = 1: nothing copied
    assert one.merge(one.split(keys, values)) is values
    for ranges in (Ranges.even(4), Ranges([0, 0, TOP, TOP])):                      # the latter: 3 empty ranges
        parts = ranges.split(np.empty(0, np.uint64), np.empty((0, 2)))
        assert [len(k) for k, _ in parts] == [0] * len(ranges)
        assert ranges.merge(parts).shape == (0, 2)
        np.testing.assert_array_equal(ranges.merge(ranges.split(keys, values)), values)
    # the hash 2^64 - 1 is the last range's; the hash 0 the first's, whatever the cuts
    ranges = Ranges([1, TOP])
    np.testing.assert_array_equal(ranges.owner(np.array([unmix(0), unmix(1), unmix(TOP - 1), unmix(TOP)],
                                                        dtype=np.uint64)), [0, 1, 1, 2])


def test_bad_input_is_refused_with_a_clear_error():
    ranges = Ranges.even(3)
    with pytest.raises(TypeError, match="uint64"):
        ranges.split(np.array([1, 2, 3], dtype=np.int64))
    with pytest.raises(TypeError, match="uint64"):
        ranges.split([1, 2, 3])
    with pytest.raises(TypeError, match="1-D"):
        ranges.split(np.zeros((2, 2), np.uint64))
    with pytest.raises(ValueError, match=r"keys\[1\] = 7, keys\[2\] = 7 \(repeated\)"):
        ranges.split(np.array([1, 7, 7], dtype=np.uint64))
    with pytest.raises(ValueError, match=r"out of order"):
        ranges.split(np.array([1, 9, 7], dtype=np.uint64))
    with pytest.raises(ValueError, match="one row per key"):
        ranges.split(np.array([1, 2], dtype=np.uint64), np.zeros(3))
    keys = np.arange(40, dtype=np.uint64)
    parts = ranges.split(keys, np.zeros((40, 1)))
    with pytest.raises(ValueError, match="one .keys, values. part per range"):
        ranges.merge(parts[:2])
    wrong = list(parts)
    wrong[0] = (np.sort(np.concatenate([parts[0][0], parts[1][0][:1]])), np.zeros((len(parts[0][0]) + 1, 1)))
    with pytest.raises(ValueError, match="belongs to range 1, not 0"):
        ranges.merge(wrong)
    wrong = [parts[0], (parts[1][0], parts[1][1][:-1]), parts[2]]
    with pytest.raises(ValueError, match="part 1's values"):
        ranges.merge(wrong)
    wrong = [parts[0], (parts[1][0], parts[1][1].astype(np.float32)), parts[2]]
    with pytest.raises(ValueError, match="differ in dtype"):
        ranges.merge(wrong)
    for cuts, match in (([5, 3], "non-decreasing"), ([-1], r"\[0, 2\^64\)"), ([M], r"\[0, 2\^64\)"),
                        ([True], "int"), ([1.5], "int")):
        with pytest.raises(ValueError, match=match):
            Ranges(cuts)
    for shards in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="number of ranges"):
            Ranges.even(shards)
    with pytest.raises(TypeError, match="uint64"):
        ranges.owner(np.array([1.0]))
    assert Ranges(list(Ranges.even(5).cuts)) == Ranges.even(5)                       # as sent on the wire


# ------------------------------------------------------------------ balance by bytes

def test_even_ranges_have_equal_widths_and_by_bytes_balances_each_range():
    for shards in (1, 2, 3, 7, 64):
        widths = [hi - lo for lo, hi in (Ranges.even(shards).bounds(s) for s in range(shards))]
        assert max(widths) - min(widths) <= 1 and sum(widths) == M
    rng = np.random.default_rng(3)
    for case in range(30):
        shards = int(rng.integers(1, 9))
        keys = np.unique(rng.integers(0, 2**22, int(rng.integers(1, 800)), dtype=np.uint64))
        row_bytes = rng.integers(1, 200, len(keys))      # tables of different widths
        ranges = Ranges.by_bytes(shards, keys, row_bytes)
        owned = owner_oracle(ranges, keys)
        per_range = np.bincount(owned, weights=row_bytes, minlength=shards)
        # each range is off its share by at most half the heaviest row at each of its two cuts
        assert np.abs(per_range - row_bytes.sum() / shards).max() <= row_bytes.max(), case
        counts = np.bincount(Ranges.by_bytes(shards, keys, 16).owner(keys), minlength=shards)
        assert counts.max() - counts.min() <= 1                     # equal rows: equal key counts
    # keys whose hashes are consecutive: a cut must fall between two hashes one apart
    keys = np.unique(np.array([unmix(h) for h in range(2**40, 2**40 + 101)], dtype=np.uint64))
    for shards in (2, 3, 10):
        counts = np.bincount(Ranges.by_bytes(shards, keys, 8).owner(keys), minlength=shards)
        assert counts.max() - counts.min() <= 1, counts
    with pytest.raises(ValueError, match=">= 0"):
        Ranges.by_bytes(2, np.arange(3, dtype=np.uint64), [1, -1, 1])


def test_row_ranges_cut_a_dense_theta_by_bytes():
    rng = np.random.default_rng(4)
    for case in range(200):
        rows, shards = int(rng.integers(0, 60)), int(rng.integers(1, 9))
        b = row_ranges(shards, rows)
        assert b[0] == 0 and b[-1] == rows and len(b) == shards + 1 and (np.diff(b) >= 0).all()
        assert np.diff(b).max() - np.diff(b).min() <= 1
        np.testing.assert_array_equal(row_ranges(shards, rows, 24), b)
        weights = rng.integers(1, 100, rows)
        # the oracle: each cut at the prefix nearest to k/S of the bytes, the left one on a tie (exact integers)
        prefix = [0, *np.cumsum(weights).tolist()]
        total = prefix[-1]
        want = [min(range(rows + 1), key=lambda i: (abs(prefix[i] * shards - k * total), i))
                for k in range(1, shards)]
        np.testing.assert_array_equal(row_ranges(shards, rows, weights), [0, *want, rows], err_msg=f"case {case}")
        np.testing.assert_array_equal(row_ranges(shards, rows, np.full(rows, 24)), b)  # equal rows: the same cut
    with pytest.raises(ValueError, match="3 finite sizes"):
        row_ranges(2, 3, [1, 2])
    with pytest.raises(ValueError, match="rows must be"):
        row_ranges(2, -1)


# ------------------------------------------------------------------ per-range checkpoints

OPTIMIZERS = {
    "sgd": lambda t: optim.SGD(t),
    "adagrad": lambda t: optim.Adagrad(t, eps=1e-8),
    "adam": lambda t: optim.Adam(t, beta1=0.9, beta2=0.99, eps=1e-8),
    "ftrl": lambda t: FTRL(t, ftrl_beta=1.0, l1=0.02, l2=0.01),
}


def _pushes(seed: int, count: int):
    """Sorted distinct keys, Zipf-like over a small universe (so rows repeat and new ones keep appearing)."""
    rng = np.random.default_rng(seed)
    universe = rng.integers(0, TOP, 500, dtype=np.uint64, endpoint=True)
    for _ in range(count):
        keys = np.unique(universe[np.minimum(rng.zipf(1.3, 40), len(universe)) - 1])
        yield keys, rng.normal(size=(len(keys), 2))


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint64)    # compares -0.0 and 0.0 (and NaN payloads) as different


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_a_range_restored_from_its_checkpoint_continues_bit_for_bit(name, tmp_path):
    """Two ranges, each a KeyedStore fed its part of every push; range 1 is checkpointed at step 30, 'dies', and
    a fresh store loaded from that checkpoint is fed the pushes since. Its pulls at once and after 30 more pushes
    are bit-identical to the uninterrupted range's, and the two ranges together to one store fed whole pushes."""
    make = OPTIMIZERS[name]
    ranges = Ranges.even(2)
    whole = KeyedStore(2, make, capacity=1)
    live = [KeyedStore(2, make, capacity=1) for _ in range(2)]
    restored = None
    for step, (keys, grad) in enumerate(_pushes(7, 60)):
        whole.push(keys, grad, 0.05)
        for s, (ks, gs) in enumerate(ranges.split(keys, grad)):
            live[s].push(ks, gs, 0.05)
            if s == 1 and restored is not None:
                restored.push(ks, gs, 0.05)
        if step == 29:
            for s in range(2):
                save_range(tmp_path / f"range{s}", 30, live[s], ranges, s)
            restored = KeyedStore(2, make, capacity=1)
            load_range(tmp_path / "range1", 30, restored, ranges, 1)
            keys1 = live[1].index.keys[:len(live[1])]
            np.testing.assert_array_equal(_bits(restored.pull(keys1)), _bits(live[1].pull(keys1)))
    for (k, a), (k2, b) in zip(restored.state()[1].items(), live[1].state()[1].items()):
        assert k == k2 and a.dtype == b.dtype and np.array_equal(_bits(a) if a.dtype.kind == "f" else a,
                                                                  _bits(b) if b.dtype.kind == "f" else b), k
    assert restored.optimizer.steps == live[1].optimizer.steps
    assert set(live[1].state()[1]) == {"keys", "values", *(f"optimizer.{k}" for k in live[1].optimizer.state)}
    everything = np.sort(whole.index.keys[:len(whole)])
    parts = ranges.split(everything)
    pulled = ranges.merge([(parts[0], live[0].pull(parts[0])), (parts[1], restored.pull(parts[1]))])
    np.testing.assert_array_equal(_bits(pulled), _bits(whole.pull(everything)))


def test_a_range_checkpoint_refuses_another_range_or_store_and_a_bad_load_changes_nothing(tmp_path):
    ranges = Ranges.even(2)
    store = KeyedStore(1, OPTIMIZERS["ftrl"])
    keys = ranges.split(np.arange(100, dtype=np.uint64))[0]
    store.push(keys, np.ones((len(keys), 1)), 0.1)
    path = save_range(tmp_path, 4, store, ranges, 0)
    assert path == checkpoint.path_for(tmp_path, 4)
    other = KeyedStore(1, OPTIMIZERS["ftrl"])
    other.push(np.array([3], np.uint64), np.ones((1, 1)), 0.1)
    before = other.state()
    with pytest.raises(ValueError, match="not range 1"):
        load_range(tmp_path, 4, other, ranges, 1)
    with pytest.raises(ValueError, match="not range 0"):
        load_range(tmp_path, 4, other, Ranges.even(3), 0)
    with pytest.raises(ValueError, match="width"):
        load_range(tmp_path, 4, KeyedStore(2, OPTIMIZERS["ftrl"]), ranges, 0)
    with pytest.raises(ValueError, match="'ftrl', not 'adagrad'"):
        load_range(tmp_path, 4, other_opt := KeyedStore(1, OPTIMIZERS["adagrad"]), ranges, 0)
    assert len(other_opt) == 0
    state, arrays = checkpoint.load(path)
    with pytest.raises(ValueError, match="twice"):
        other.load(state, {**arrays, "keys": np.zeros_like(arrays["keys"])})
    with pytest.raises(ValueError, match="rows"):
        other.load({**state, "rows": state["rows"] + 1}, arrays)
    for (k, a), (_, b) in zip(other.state()[1].items(), before[1].items()):
        np.testing.assert_array_equal(a, b, err_msg=k)                     # untouched by the refused loads
    with open(path, "r+b") as fh:                                           # one flipped byte: the digest says so
        fh.seek(-3, 2)
        byte = fh.read(1)
        fh.seek(-3, 2)
        fh.write(bytes([byte[0] ^ 1]))
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        load_range(tmp_path, 4, other, ranges, 0)
