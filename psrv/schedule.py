"""Which rows each step reads: shard cursors, the per-epoch row order, and which worker holds which shard (pure).

A mini-batch is named by (shard, epoch, start, count): rows epoch_order(seed, shard, epoch, size)[start:start+count]
of that shard. The server owns the cursors, so a checkpoint records exactly where every shard stands, and any
process can turn a batch name into rows without asking anyone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .partition import splitmix64


def epoch_key(seed: int, shard: int, epoch: int) -> int:
    """key = sm(sm(sm(seed) + shard) + epoch), all arithmetic modulo 2**64 (sm = splitmix64)."""
    with np.errstate(over="ignore"):
        k = splitmix64(np.uint64(seed))
        k = splitmix64(k + np.uint64(shard))
        return int(splitmix64(k + np.uint64(epoch)))


def epoch_order(seed: int, shard: int, epoch: int, size: int) -> np.ndarray:
    """The order in which a shard's rows are visited in one epoch: positions 0..size-1 sorted by
    splitmix64(key + position), ties by position. Defined with nothing but 64-bit integer arithmetic, so a client
    in any language can reproduce it (docs/protocol.md)."""
    with np.errstate(over="ignore"):
        h = splitmix64(np.uint64(epoch_key(seed, shard, epoch)) + np.arange(size, dtype=np.uint64))
    return np.argsort(h, kind="stable")


@dataclass
class Cursor:
    size: int
    epoch: int = 0
    pos: int = 0
    visited: dict[int, int] = field(default_factory=dict)  # epoch -> rows handed out in that epoch

    def take(self, batch_size: int) -> tuple[int, int, int]:
        """(epoch, start, count) of the next batch; a batch never crosses an epoch boundary, so the last batch of
        an epoch may be short."""
        epoch, start = self.epoch, self.pos
        count = min(batch_size, self.size - start)
        self.pos += count
        self.visited[epoch] = self.visited.get(epoch, 0) + count
        if self.pos >= self.size:
            self.epoch, self.pos = self.epoch + 1, 0
        return epoch, start, count


class Shards:
    """Cursors of every shard and the lease of each shard (which worker reads it)."""

    def __init__(self, sizes: list[int]):
        self.cursors = [Cursor(size=int(s)) for s in sizes]
        self.lease: dict[int, int] = {}  # shard -> wid

    def acquire(self, wid: int, preferred: int | None = None) -> int | None:
        """Lease a shard to `wid`: its preferred one if free, else the lowest free one; None if all are taken."""
        free = [s for s in range(len(self.cursors)) if s not in self.lease]
        if not free:
            return None
        s = preferred if preferred in free else free[0]
        self.lease[s] = wid
        return s

    def release(self, wid: int) -> None:
        for s in [s for s, w in self.lease.items() if w == wid]:
            del self.lease[s]

    def held_by(self, wid: int) -> list[int]:
        return sorted(s for s, w in self.lease.items() if w == wid)

    def next_batch(self, shard: int, batch_size: int) -> list[int]:
        epoch, start, count = self.cursors[shard].take(batch_size)
        return [shard, epoch, start, count]

    def rows_visited(self) -> dict[int, int]:
        """epoch -> rows handed out in that epoch, summed over shards."""
        out: dict[int, int] = {}
        for c in self.cursors:
            for e, k in c.visited.items():
                out[e] = out.get(e, 0) + k
        return dict(sorted(out.items()))
