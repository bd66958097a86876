"""Partitioning: which shard each row belongs to (pure numpy; no I/O).

"range" gives contiguous blocks; "hash" uses splitmix64 of the row index, which is the same on every machine and
every run (unlike Python's salted hash()). Either way layout() orders rows so that each shard is one contiguous block
in shared memory, keeping file order inside a shard, so a worker reads its shard as a plain slice.
"""
from __future__ import annotations

import numpy as np

GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
CHUNK = 8192   # elements per pass of the in-place mixes: 64 KiB of scratch, reused from the heap (no page faults)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer (Steele et al. 2014) on uint64 values; wraps modulo 2**64 by design."""
    z = np.array(x, dtype=np.uint64, order="C")   # a copy (the caller's array is left as it was), C-ordered
    if z.ndim == 0:   # a scalar: numpy scalars have no in-place operations, and warn when they wrap
        with np.errstate(over="ignore"):
            z = z + GAMMA
            z = (z ^ (z >> _S30)) * _M1
            z = (z ^ (z >> _S27)) * _M2
            return z ^ (z >> _S31)
    return splitmix64_inplace(z)


def splitmix64_inplace(z: np.ndarray) -> np.ndarray:
    """z <- splitmix64(z), in place (a C-contiguous uint64 array of any shape); returns z. Chunk by chunk, with
    one small scratch array: the expression written out makes about ten temporaries of z's size, and on this VM a
    fresh 1.6 MB array costs more in page faults than the arithmetic (an epoch order of 200,000 rows,
    psrv/schedule.py, spent more time here than in its sort)."""
    if z.dtype != np.uint64 or not z.flags.c_contiguous:
        raise ValueError(f"splitmix64_inplace needs a C-contiguous uint64 array, got {z.dtype} "
                         f"(C-contiguous: {z.flags.c_contiguous})")
    flat = z.reshape(-1)   # a view of a contiguous array
    t = np.empty(min(CHUNK, len(flat)), np.uint64)
    for lo in range(0, len(flat), CHUNK):
        c = flat[lo:lo + CHUNK]
        s = t[:len(c)]
        c += GAMMA
        for shift, m in ((_S30, _M1), (_S27, _M2), (_S31, None)):
            np.right_shift(c, shift, out=s)
            c ^= s
            if m is not None:
                c *= m
    return z


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
