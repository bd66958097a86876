"""Which rows each step reads: shard cursors, the per-epoch row order, and which worker holds which shard (pure).

A mini-batch is named by (shard, epoch, start, count): rows order[start:start+count] of that shard, where order is
epoch_order(seed, shard, epoch, size) (data.batch_order = "rows") or block_order(..., batch_size) ("blocks"). The server owns the cursors, so a checkpoint records exactly where every shard stands, a batch lost
with a dead worker goes back to its shard, and any process can turn a batch name into rows without asking.
Under the static schedule each shard is leased to one live worker (assign() spreads them evenly), and a worker left
without one (more workers than shards) reads a shard along with its holder (share()); under the dynamic one any
worker takes the next batch of the least-read shard.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .partition import GAMMA, CHUNK, splitmix64, splitmix64_inplace

# Epochs whose rows visited are counted one by one; older ones are folded into one total. A count per epoch for the
# whole run grew without bound: it travels in every status reply, summary.json and checkpoint.
EPOCHS_KEPT = 8


def epoch_key(seed: int, shard: int, epoch: int) -> int:
    """key = sm(sm(sm(seed) + shard) + epoch), all arithmetic modulo 2**64 (sm = splitmix64)."""
    with np.errstate(over="ignore"):
        k = splitmix64(np.uint64(seed))
        k = splitmix64(k + np.uint64(shard))
        return int(splitmix64(k + np.uint64(epoch)))


def epoch_order(seed: int, shard: int, epoch: int, size: int) -> np.ndarray:
    """The order in which a shard's rows are visited in one epoch: positions 0..size-1 sorted by
    splitmix64(key + position), ties by position. Defined with nothing but 64-bit integer arithmetic, so a client
    in any language can reproduce it (docs/protocol.md). One array of the shard's size is made, and worked on in
    place: a worker computes an order per epoch of each shard, and fresh temporaries of that size cost more in page
    faults than the arithmetic."""
    key = np.uint64(epoch_key(seed, shard, epoch))
    h = np.arange(size, dtype=np.uint64)
    with np.errstate(over="ignore"):
        h += key
        splitmix64_inplace(h)
        # splitmix64 is a bijection of 2**64 and key + position differs for every position, so no two hashes are
        # equal (no ties) and each hash names its position: sorting the hashes and inverting splitmix64 gives the
        # positions in hash order. Sorting values is cheaper than an argsort, which moves an index with each (this
        # runs once per epoch of a shard, a cost a small model's short steps feel).
        h.sort()
        unsplitmix64(h)
        h -= key
    return h.view(np.int64)


def _inverse_mod_2_64(a: int) -> int:
    """The inverse of an odd a modulo 2**64 (Newton's iteration: each step doubles the correct low bits)."""
    x = a
    for _ in range(6):
        x = x * (2 - a * x) % (1 << 64)
    return x


_INV_M1 = np.uint64(_inverse_mod_2_64(0xBF58476D1CE4E5B9))
_INV_M2 = np.uint64(_inverse_mod_2_64(0x94D049BB133111EB))
_UNDO = ((np.uint64(31), _INV_M2), (np.uint64(27), _INV_M1), (np.uint64(30), None))


def unsplitmix64(h: np.ndarray) -> np.ndarray:
    """x such that splitmix64(x) == h, in place in h (a 1-D uint64 array); returns h. Each step of splitmix64 is
    undone in reverse order: x = z ^ (z >> s) gives back z = x ^ (x >> s) ^ (x >> 2s) when 3s >= 64 (s = 31, 27,
    30 here); a product by an odd constant is undone by the constant's inverse modulo 2**64. Chunk by chunk, with
    one small scratch array (psrv/partition.py, splitmix64_inplace, says why)."""
    t = np.empty(min(CHUNK, len(h)), np.uint64)
    with np.errstate(over="ignore"):
        for lo in range(0, len(h), CHUNK):
            c = h[lo:lo + CHUNK]
            s = t[:len(c)]
            for shift, inverse in _UNDO:
                np.right_shift(c, shift, out=s)      # x >> s
                c ^= s
                np.right_shift(s, shift, out=s)      # x >> 2s
                c ^= s
                if inverse is not None:
                    c *= inverse
            c -= GAMMA
    return h


def block_order(seed: int, shard: int, epoch: int, size: int, batch_size: int) -> np.ndarray:
    """The epoch order of data.batch_order = "blocks": the shard's whole batch_size-row blocks (rows
    [k*batch_size, (k+1)*batch_size)) in the order epoch_order(seed, shard, epoch, size // batch_size), then the
    short tail block, always last. A cursor takes batch_size rows at a time from position 0, so every batch is one
    block: consecutive rows, a view of shared memory rather than a gather. The rows were shuffled once when the
    data was loaded (storage_order), so a block is still a random sample of its shard."""
    full = size // batch_size
    blocks = epoch_order(seed, shard, epoch, full) * batch_size
    head = (blocks[:, None] + np.arange(batch_size)).ravel()
    return np.concatenate([head, np.arange(full * batch_size, size)])


# the epoch number that names the shuffle done once at load time (data.batch_order = "blocks"): no training epoch
# reaches it, so the shuffle never equals an epoch's order
LOAD_EPOCH = (1 << 64) - 1


def storage_order(seed: int, shard: int, size: int) -> np.ndarray:
    """How data.batch_order = "blocks" stores a shard's rows: its rows in file order, permuted once by
    epoch_order(data.seed, shard, 2**64 - 1, size)."""
    return epoch_order(seed, shard, LOAD_EPOCH, size)


@dataclass
class Cursor:
    size: int
    epoch: int = 0
    pos: int = 0
    returned: list = field(default_factory=list)  # batches [epoch, start, count] handed back, served first

    def take(self, batch_size: int) -> tuple[int, int, int]:
        """(epoch, start, count) of the next batch; a batch never crosses an epoch boundary, so the last batch of
        an epoch may be short."""
        if self.returned:
            return tuple(self.returned.pop(0))
        epoch, start = self.epoch, self.pos
        count = min(batch_size, self.size - start)
        self.pos += count
        if self.pos >= self.size:
            self.epoch, self.pos = self.epoch + 1, 0
        return epoch, start, count

    def read(self) -> float:
        """Epochs read so far, counting batches handed back as unread."""
        back = sum(b[2] for b in self.returned)
        return self.epoch + (self.pos - back) / self.size

    def done(self, epochs: int) -> bool:
        return epochs > 0 and self.epoch >= epochs and not self.returned


def assign(n_shards: int, live: list[int], current: dict[int, int]) -> dict[int, int]:
    """The lease of every shard (shard -> wid) over the live workers: counts differ by at most one (the lowest wids
    get the extra ones); shard s goes to worker s when s is live; a shard no live worker prefers stays with whoever
    holds it where that fits, else goes to the lowest wid with room. So when the workers are 0..N-1 the result
    depends only on who is live, never on the order they joined."""
    live = sorted(live)
    if not live:
        return {}
    base, extra = divmod(n_shards, len(live))
    target = {w: base + (i < extra) for i, w in enumerate(live)}
    count = dict.fromkeys(live, 0)
    new: dict[int, int] = {}

    def give(s: int, w: int) -> None:
        new[s] = w
        count[w] += 1

    for w in live:
        if w < n_shards and target[w]:
            give(w, w)
    for s, w in sorted(current.items()):
        if s < n_shards and s not in new and w in count and count[w] < target[w]:
            give(s, w)
    for s in range(n_shards):
        if s not in new:
            give(s, next(w for w in live if count[w] < target[w]))
    return new


def share(n_shards: int, live: list[int], lease: dict[int, int]) -> dict[int, int]:
    """wid -> the shard it reads along with that shard's holder, for each live worker assign() left without one
    (more workers than shards: a worker attached to a run joins one). Each takes the shard fewest workers read, the
    lowest index on a tie; the workers read it from its one cursor, so the shard's place in its epoch is kept and no
    row is read twice in an epoch. A worker keeps the shard it shares while no worker below it comes or goes (ids
    are handed out in increasing order, so a join never moves an earlier one)."""
    if not n_shards:
        return {}
    holders = dict.fromkeys(range(n_shards), 0)
    for s in lease:
        holders[s] += 1
    held = set(lease.values())
    out: dict[int, int] = {}
    for w in sorted(live):
        if w not in held:
            s = min(holders, key=lambda s: (holders[s], s))
            out[w], holders[s] = s, holders[s] + 1
    return out


class Schedule:
    """The cursor of every shard and, under the static schedule, its lease (the worker that holds it)."""

    def __init__(self, sizes: list[int], dynamic: bool = False):
        self.cursors = [Cursor(size=int(s)) for s in sizes]
        self.dynamic = dynamic
        self.lease: dict[int, int] = {}  # shard -> wid (static schedule)
        self.shared: dict[int, int] = {}  # wid -> the shard it reads with its holder (more workers than shards)
        # rows whose gradient was applied, over all shards: per epoch for the newest EPOCHS_KEPT epochs committed,
        # one total for all older ones. Every kept epoch is newer than every folded one, so a kept count is whole.
        self.visited: dict[int, int] = {}
        self.visited_before = 0
        self._held: dict[int, list[int]] = {}  # wid -> its shards, derived from lease (asked for at every batch)

    def rebalance(self, live: list[int]) -> None:
        if not self.dynamic:
            self.lease = assign(len(self.cursors), live, self.lease)
            self.shared = share(len(self.cursors), live, self.lease)
            self._held = {}

    def held_by(self, wid: int) -> list[int]:
        if self.dynamic:
            return list(range(len(self.cursors)))
        held = self._held.get(wid)
        if held is None:
            held = sorted(s for s, w in self.lease.items() if w == wid)
            if not held and wid in self.shared:
                held = [self.shared[wid]]
            self._held[wid] = held
        return held

    def next_batch(self, wid: int, batch_size: int, epochs: int = 0) -> list[int] | None:
        """[shard, epoch, start, count] from the least-read shard this worker may read, or None when none has rows
        left (train.epochs reached)."""
        held = self.held_by(wid)
        if len(held) == 1:  # the common case, without the search
            s = held[0]
            c = self.cursors[s]
            return None if c.done(epochs) else [s, *c.take(batch_size)]
        open_shards = [s for s in held if not self.cursors[s].done(epochs)]
        if not open_shards:
            return None
        s = min(open_shards, key=lambda s: (self.cursors[s].read(), s))
        return [s, *self.cursors[s].take(batch_size)]

    def give_back(self, batch: list[int]) -> None:
        """A served batch whose gradient will never arrive (its worker died): serve it again."""
        s, epoch, start, count = batch
        self.cursors[s].returned.append([epoch, start, count])

    def commit(self, batch: list[int]) -> None:
        """The batch's gradient was applied: its rows count as visited."""
        _, epoch, _, count = batch
        self._count(epoch, count)

    def _count(self, epoch: int, rows: int) -> None:
        v = self.visited
        v[epoch] = v.get(epoch, 0) + rows
        if len(v) > EPOCHS_KEPT:  # the oldest goes; an epoch older than every kept one goes at once
            self.visited_before += v.pop(min(v))

    def all_done(self, epochs: int) -> bool:
        return all(c.done(epochs) for c in self.cursors)

    def rows_visited(self) -> dict[int, int]:
        """epoch -> rows whose gradient was applied in that epoch, summed over shards, for the newest EPOCHS_KEPT
        epochs (all of them in a run of at most EPOCHS_KEPT epochs)."""
        return dict(sorted(self.visited.items()))

    def epochs_read(self) -> float:
        """Rows whose gradient was applied, in epochs of the whole training set (how far train.epochs has come)."""
        rows = sum(c.size for c in self.cursors)
        return (sum(self.visited.values()) + self.visited_before) / rows if rows else 0.0

    def rows_visited_before(self) -> int:
        """Rows whose gradient was applied in the epochs older than those rows_visited() lists."""
        return self.visited_before

    # checkpoints: plain lists and ints (msgpack-able), of a size independent of the run's length
    def state(self) -> dict:
        return {"cursors": [[c.size, c.epoch, c.pos, c.returned] for c in self.cursors],
                "visited": [[e, k] for e, k in sorted(self.visited.items())], "visited_before": self.visited_before}

    def load_state(self, st: dict) -> None:
        sizes = [c.size for c in self.cursors]
        saved = [c[0] for c in st["cursors"]]
        if saved != sizes:
            raise ValueError(f"checkpoint shards have sizes {saved}; this data has {sizes}")
        self.cursors = [Cursor(size=c[0], epoch=c[1], pos=c[2], returned=[list(b) for b in c[3]])
                        for c in st["cursors"]]
        self.visited, self.visited_before = {}, int(st.get("visited_before", 0))
        # the old format counted per shard, every epoch: summed here, and folded down to the newest epochs
        pairs = st.get("visited", []) + [p for c in st["cursors"] if len(c) > 4 for p in c[4]]
        for e, k in sorted((int(e), int(k)) for e, k in pairs):
            self._count(e, k)
        self._held = {}
