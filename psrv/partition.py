"""Partitioning: which shard each row belongs to (pure numpy; no I/O).

"range" gives contiguous blocks; "hash" uses splitmix64 of the row index, which is the same on every machine and
every run (unlike Python's salted hash()). Either way layout() orders rows so that each shard is one contiguous block
in shared memory, keeping file order inside a shard, so a worker reads its shard as a plain slice.
"""
from __future__ import annotations

import numpy as np

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer (Steele et al. 2014) on uint64 values; wraps modulo 2**64 by design."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) & _M64


def assign(rows: np.ndarray, shards: int, how: str) -> np.ndarray:
    """Shard id (int64) of each row, given the rows' indices in the file (sorted ascending)."""
    if shards < 1:
        raise ValueError("need at least one shard")
    rows = np.asarray(rows, dtype=np.int64)
    if how == "range":
        # consecutive blocks by position, like np.array_split: the first n % k shards get one row more
        n = len(rows)
        sizes = np.full(shards, n // shards, dtype=np.int64)
        sizes[: n % shards] += 1
        return np.searchsorted(np.cumsum(sizes), np.arange(n, dtype=np.int64), side="right")
    if how == "hash":
        with np.errstate(over="ignore"):
            return (splitmix64(rows.astype(np.uint64)) % np.uint64(shards)).astype(np.int64)
    raise ValueError(f"unknown partition {how!r}; expected 'range' or 'hash'")


def layout(rows: np.ndarray, shards: int, how: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(order, blocks): `order` lists file row indices in storage order; shard s occupies storage positions
    blocks[s] = (offset, size). Every row is in exactly one shard."""
    rows = np.asarray(rows, dtype=np.int64)
    owner = assign(rows, shards, how)
    perm = np.argsort(owner, kind="stable")
    sizes = np.bincount(owner, minlength=shards)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return rows[perm], [(int(o), int(s)) for o, s in zip(offsets, sizes)]
