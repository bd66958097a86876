"""Key ranges for S server processes: which server owns a key, and a push or pull cut into one part per server and
put back together (pure numpy); the row ranges of a dense theta split over S servers; and each range's own
checkpoint (the only I/O here, through checkpoint.py).

A range is an interval of the key's hash h = splitmix64(key), not of the key itself. Keys are often small and
clustered (the generator's hashed buckets are 0 .. 2^22 - 1; raw ids are often consecutive, and the hot ones of a
Zipf head sit together), so ranges over the raw 64-bit key would give nearly every key to server 0. splitmix64
(partition.py's, also the feature hash of criteo.py and the slot hash of keyed.py) is used because it is:
- a bijection on 64 bits (an add, three xor-shifts and two multiplications by odd constants, each invertible), so
  the ranges of h partition the key space exactly: distinct keys never collide and no key falls between ranges;
- a strong mixer (each input bit flips about half the output bits), so neighbouring and hot keys land on
  servers independently of each other;
- the same on every machine and run, and a few numpy passes for a whole batch.
keyed.py places a key in its table by the LOW bits of the same h, while a range fixes its HIGH bits, so a range
server's table still sees uniform slots.

Range s owns the hashes cuts[s-1] <= h < cuts[s], with cuts[-1] = 0 and cuts[S-1] = 2^64 left implicit: S - 1
non-decreasing uint64 cuts, two equal cuts making an empty range. Keys of a push or pull are a 1-D uint64 array,
sorted and distinct (what a worker's batch gives after np.unique); anything else is refused, because a key listed
twice would be updated twice or a misordered part answered in the wrong order.
"""
from __future__ import annotations

import numpy as np

from . import checkpoint
from .partition import splitmix64

HASH_SPACE = 1 << 64


def check_keys(keys, what: str = "keys") -> np.ndarray:
    """`keys` itself if it is a 1-D uint64 array, sorted and distinct; TypeError or ValueError saying what is wrong."""
    if not isinstance(keys, np.ndarray) or keys.dtype != np.uint64 or keys.ndim != 1:
        got = f"{keys.dtype} array of shape {keys.shape}" if isinstance(keys, np.ndarray) else type(keys).__name__
        raise TypeError(f"{what} must be a 1-D numpy uint64 array; got {got}")
    bad = np.flatnonzero(keys[1:] <= keys[:-1])
    if len(bad):
        i = int(bad[0])
        how = "repeated" if keys[i] == keys[i + 1] else "out of order"
        raise ValueError(f"{what} must be sorted and distinct: {what}[{i}] = {keys[i]}, {what}[{i + 1}] = "
                         f"{keys[i + 1]} ({how})")
    return keys


def _check_rows(values, n: int, what: str) -> np.ndarray:
    if not isinstance(values, np.ndarray) or values.ndim < 1 or values.shape[0] != n:
        got = list(values.shape) if isinstance(values, np.ndarray) else type(values).__name__
        raise ValueError(f"{what} must be a numpy array with one row per key ({n}); got {got}")
    return values


def _weighted_positions(weights: np.ndarray, parts: int) -> np.ndarray:
    """Where to cut a sequence of items with these weights (non-negative) into `parts` pieces of about equal
    weight: the parts - 1 positions p (0 <= p <= len, non-decreasing) whose prefix sums are nearest to k/parts of
    the total (ties to the left), so each piece is off its share by at most half the heaviest item."""
    prefix = np.concatenate([[0.0], np.cumsum(weights, dtype=np.float64)])
    targets = prefix[-1] * np.arange(1, parts) / parts
    right = np.searchsorted(prefix, targets, side="left")            # first prefix >= target
    left = np.maximum(right - 1, 0)
    nearer_left = (targets - prefix[left]) <= (prefix[np.minimum(right, len(prefix) - 1)] - targets)
    return np.where((right > 0) & nearer_left, left, right).astype(np.int64)


class Ranges:
    """S ranges of the 64-bit hash space; see the module docstring. Build with even(S), by_bytes(...), or from
    `cuts` (S - 1 ints, as sent on the wire by `list(ranges.cuts)`)."""

    def __init__(self, cuts):
        ints = []
        for c in (cuts.tolist() if isinstance(cuts, np.ndarray) else list(cuts)):
            c = int(c) if isinstance(c, np.integer) else c
            if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < HASH_SPACE:
                raise ValueError(f"ranges: every cut must be an int in [0, 2^64); got {c!r}")
            ints.append(c)
        if any(b < a for a, b in zip(ints, ints[1:])):
            raise ValueError(f"ranges: cuts must be non-decreasing; got {ints}")
        self.cuts = np.array(ints, dtype=np.uint64)

    @classmethod
    def even(cls, shards: int) -> "Ranges":
        """S ranges of equal width (to within one hash value). With keys whose rows all hold the same bytes, each
        range owns the same expected bytes: the hash spreads any key set uniformly over the space."""
        shards = _shards(shards)
        return cls([k * HASH_SPACE // shards for k in range(1, shards)])

    @classmethod
    def by_bytes(cls, shards: int, keys: np.ndarray, row_bytes) -> "Ranges":
        """S ranges cut so that each owns about the same bytes of `keys` (a sample or the whole universe of keys,
        1-D uint64, distinct), where key i's row holds row_bytes (an int for all, or one per key: tables of
        different widths). A cut falls midway between the hashes of two neighbouring keys, so unseen keys split
        evenly; a range may own none of the keys when one key outweighs a share."""
        shards = _shards(shards)
        keys = check_keys(np.sort(keys) if isinstance(keys, np.ndarray) else keys, "keys")
        weights = np.broadcast_to(np.asarray(row_bytes, dtype=np.float64), keys.shape)
        if (weights < 0).any() or not np.isfinite(weights).all():
            raise ValueError("by_bytes: row_bytes must be finite and >= 0")
        h = splitmix64(keys)
        order = np.argsort(h)
        h, weights = h[order], weights[order]
        cuts = []
        for p in _weighted_positions(weights, shards).tolist():
            if p == 0:
                cuts.append(0)
            elif p == len(h):   # after the last key: as far right as the last key allows
                cuts.append(min(int(h[-1]) + 1, HASH_SPACE - 1))
            else:
                lo, hi = int(h[p - 1]), int(h[p])
                cuts.append(lo + (hi - lo) // 2 + 1)
        return cls(cuts)

    def __len__(self) -> int:
        return len(self.cuts) + 1

    def __eq__(self, other) -> bool:
        return isinstance(other, Ranges) and np.array_equal(self.cuts, other.cuts)

    def __repr__(self) -> str:
        return f"Ranges({[int(c) for c in self.cuts]})"

    def bounds(self, s: int) -> tuple[int, int]:
        """Range s's hashes as Python ints: lo <= h < hi (hi is 2^64 for the last range)."""
        if not 0 <= s < len(self):
            raise IndexError(f"range {s} of {len(self)}")
        lo = 0 if s == 0 else int(self.cuts[s - 1])
        hi = HASH_SPACE if s == len(self) - 1 else int(self.cuts[s])
        return lo, hi

    def owner(self, keys) -> np.ndarray:
        """The range (int64) of each key; keys in any order, repeats allowed."""
        keys = np.asarray(keys)
        if keys.dtype != np.uint64:
            raise TypeError(f"owner: keys must be uint64; got {keys.dtype}")
        return self._owners(keys).astype(np.int64)

    def _owners(self, keys: np.ndarray) -> np.ndarray:
        """owner() in a small integer type: numpy's stable argsort of 8- and 16-bit integers is a radix sort."""
        h = splitmix64(keys)
        if len(self.cuts) < 16:
            # the number of cuts <= h, one vectorized compare per cut: about 10x faster than searchsorted's binary
            # search per key at S = 4
            owner = np.zeros(h.shape, dtype=np.uint8)
            for c in self.cuts:
                owner += h >= c
            return owner
        return np.searchsorted(self.cuts, h, side="right").astype(np.uint16 if len(self) <= 1 << 16 else np.int64)

    def check(self, s: int, keys: np.ndarray, what: str = "keys") -> np.ndarray:
        """`keys` if they are sorted, distinct and all owned by range s (what a range server accepts); else
        ValueError naming the first key of another range."""
        check_keys(keys, what)
        if len(self) > 1:
            other = np.flatnonzero(self.owner(keys) != s)
            if len(other):
                i = int(other[0])
                raise ValueError(f"{what}[{i}] = {keys[i]} belongs to range {int(self.owner(keys[i:i + 1])[0])}, "
                                 f"not {s}")
        return keys

    def split(self, keys: np.ndarray, values: np.ndarray | None = None) -> list:
        """A push's (keys, values) or a pull's keys, one part per range: [(keys_s, values_s), ...] or [keys_s, ...].
        Each range's keys stay sorted (a stable sort by owner of sorted keys); values_s are the rows of keys_s.
        With one range the part is the arguments themselves, uncopied."""
        check_keys(keys)
        if values is not None:
            _check_rows(values, len(keys), "values")
        if len(self) == 1:
            return [keys] if values is None else [(keys, values)]
        owner = self._owners(keys)
        order = np.argsort(owner, kind="stable")   # a radix sort, O(n); stable, so each range's keys stay sorted
        ends = np.cumsum(np.bincount(owner, minlength=len(self)))[:-1]
        parts_k = np.split(keys[order], ends)
        if values is None:
            return parts_k
        return list(zip(parts_k, np.split(values[order], ends)))

    def merge(self, parts: list) -> np.ndarray:
        """The values of split(keys)'s parts put back in the order of `keys` (ascending): `parts` is one (keys_s,
        values_s) per range, keys_s as split gave them and values_s their rows (a pull's answer). Each part's keys
        are checked to be sorted, distinct and in their range, so no key can come back twice."""
        if not isinstance(parts, (list, tuple)) or len(parts) != len(self):
            raise ValueError(f"merge needs one (keys, values) part per range ({len(self)}); got "
                             f"{len(parts) if isinstance(parts, (list, tuple)) else type(parts).__name__}")
        for s, part in enumerate(parts):
            if not isinstance(part, (list, tuple)) or len(part) != 2:
                raise ValueError(f"merge: part {s} is not a (keys, values) pair")
            self.check(s, part[0], f"part {s}'s keys")
            _check_rows(part[1], len(part[0]), f"part {s}'s values")
        shapes = {(p[1].dtype, p[1].shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise ValueError(f"merge: the parts' values differ in dtype or row shape: {sorted(map(str, shapes))}")
        if len(self) == 1:
            return parts[0][1]
        keys = np.concatenate([p[0] for p in parts])
        # each part is one sorted run, and numpy's stable sort of 64-bit keys (timsort) merges runs: O(n log S)
        return np.concatenate([p[1] for p in parts])[np.argsort(keys, kind="stable")]


def _shards(shards) -> int:
    if isinstance(shards, bool) or not isinstance(shards, (int, np.integer)) or shards < 1:
        raise ValueError(f"need an int number of ranges >= 1; got {shards!r}")
    return int(shards)


def row_ranges(shards: int, rows: int, row_bytes=None) -> np.ndarray:
    """Row boundaries (S + 1 ints, 0 first, `rows` last) cutting a dense theta of `rows` rows into S contiguous
    ranges of about equal bytes: server s owns rows b[s]:b[s+1]. row_bytes is None or an int when every row holds
    the same bytes (theta's rows do: then the ranges differ by at most one row), or one size per row otherwise;
    each range is off its share by at most half the largest row."""
    shards = _shards(shards)
    if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 0:
        raise ValueError(f"row_ranges: rows must be an int >= 0; got {rows!r}")
    rows = int(rows)
    if row_bytes is None or np.ndim(row_bytes) == 0:
        # the nearest row to k * rows / S, ties to the left: what _weighted_positions gives for equal weights
        inner = [(2 * k * rows + shards - 1) // (2 * shards) for k in range(1, shards)]
    else:
        weights = np.asarray(row_bytes, dtype=np.float64)
        if weights.shape != (rows,) or (weights < 0).any() or not np.isfinite(weights).all():
            raise ValueError(f"row_ranges: row_bytes must be {rows} finite sizes >= 0; got shape {weights.shape}")
        inner = _weighted_positions(weights, shards).tolist()
    return np.array([0, *inner, rows], dtype=np.int64)


def save_range(directory: str, step: int, store, ranges: Ranges, s: int, keep: int = 3) -> str:
    """Checkpoint range s's KeyedStore as `step` in `directory` (that range's own: one directory per range server),
    atomically and checksummed by checkpoint.save; the ranges go with it, so it is never loaded into another range."""
    state, arrays = store.state()
    return checkpoint.save(directory, step, {**state, "range": s, "cuts": [int(c) for c in ranges.cuts]}, arrays,
                           keep=keep)


def load_range(directory: str, step: int, store, ranges: Ranges, s: int) -> None:
    """Load the checkpoint save_range wrote at `step` into `store` (built like the saved one: width, dtype,
    optimizer). CheckpointError for a file that does not verify; ValueError if it is another range's or layout's,
    or holds a key outside range s."""
    path = checkpoint.path_for(directory, step)
    state, arrays = checkpoint.load(path)
    if state.get("range") != s or state.get("cuts") != [int(c) for c in ranges.cuts]:
        raise ValueError(f"{path} holds range {state.get('range')!r} of cuts {state.get('cuts')!r}, not range {s} "
                         f"of {[int(c) for c in ranges.cuts]}")
    keys = arrays.get("keys")
    if isinstance(keys, np.ndarray) and keys.dtype == np.uint64 and keys.ndim == 1:
        ranges.check(s, np.sort(keys), f"{path}'s keys")
    store.load({k: v for k, v in state.items() if k not in ("range", "cuts")}, arrays)
