"""A range server: one of the S - 1 processes that hold a key range of theta (a sparse model's, or a dense vector
theta's rows) when server.shards = S > 1 (server 0, the coordinator, holds range 0 itself). docs/sparse.md,
"Several servers", says how the run fits together; docs/protocol.md, "Several servers", specifies the messages.

A range server decides nothing. Workers send it their slice of every push (`rpush`, for a (wid, clock)) and read
its rows at a version (`rget`). It measures each slice as it arrives (finite? its sum of squares) and tells server 0
(`measured`, with its own number for the slice); server 0 judges the whole push on range 0's slice and every
range's measurement (never on a worker's word: psrv/guard.py's rules, as at S = 1) and orders each update of a
push it accepted (`apply`: which slices by number, in which order, with which step, version and scale), exactly the
updates its own store carries out for range 0. A refused push is never named, so no range applies it. A slice
waits here until an apply names it, so each range sums the same gradients in the same order as one server would:
S servers give S = 1's theta. An `rget` for a version not reached yet is answered once it is.

RangeStore is that bookkeeping, pure (tested in-process); RangeServer is its shell (a ROUTER socket polled with a
timeout, theta in shared memory under a seqlock, which server 0 reads for its evaluations and final theta).
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import uuid
from collections import deque

import numpy as np

from . import config as config_mod
from . import checkpoint, keyrange, optim, proc, protocol, transport
from .coordinator import run_steps
from .errors import ProtocolError
from .keyrange import Ranges
from .protocol import OpStr
from .shmarray import SeqlockArray
from .spec import RangeSpec
from .store import Store, workers_penalize

log = logging.getLogger(__name__)

POLL_MS = 50
MAX_PUSHES = 1024            # (wid, clock) pairs one apply may name: far above any train.workers
FIRST_WORD_S = 120.0         # how long a range server waits for server 0's first message (it starts after us)


def make_store(cfg, theta: np.ndarray, weight_rows: int, writer=None, rows: np.ndarray | None = None) -> Store:
    """The store of a sparse or dense theta as server.py builds it: train.optimizer and its learning-rate schedule,
    clipping, the L2 term on the rows below `weight_rows` (FTRL's L2 is in its closed form instead). `rows`: the
    rows of the whole theta that this store's rows are, in order (a range server's); None: all of them. With
    group steps or local SGD (train.group_steps or train.local_steps > 1) the workers clip and penalize at each of
    their steps (psrv/group.py, workers/worker.py), so the store does neither to their pushes."""
    t = cfg.train
    held = np.arange(theta.shape[0]) if rows is None else rows
    ftrl = t.optimizer == "ftrl"
    workers = workers_penalize(t)
    # group steps: a push is how far its member moved theta, each sub-step at its own rate, which the server
    # applies as it is (rate 1)
    return Store(theta, optim.make(t.optimizer, theta, t, l2=cfg.model.l2),
                 (lambda step: 1.0) if t.group_steps > 1 else rate_at(cfg),
                 clip_norm=0.0 if workers else t.clip_norm,
                 l2=0.0 if ftrl or workers else cfg.model.l2,
                 l2_mask=held < weight_rows, writer=writer, grouped=t.group_steps > 1)


def _schedule(cfg) -> tuple:
    """optim.lr_at's arguments after the step: train.lr under train.lr_schedule, over the run's steps."""
    t = cfg.train
    return t.lr, t.lr_schedule, run_steps(cfg) or t.steps, t.lr_decay, t.lr_decay_every, t.lr_min


def rate_at(cfg):
    """The learning rate of each step (0-based)."""
    schedule = _schedule(cfg)
    return lambda step: optim.lr_at(step, *schedule)


def rates(cfg):
    """rate_at's rates of `count` steps from `start`, as a list: (start, count) -> [float]."""
    schedule = _schedule(cfg)
    return lambda start, count: optim.lr_range(start, count, *schedule)


def range_dir(ckpt_dir: str, index: int) -> str:
    """Where range `index` keeps its own checkpoints (keyrange.save_range's format), beside server 0's."""
    return os.path.join(ckpt_dir, f"range{index}")


def range_rows(ranges: Ranges, index: int, rows: int) -> np.ndarray:
    """The rows (keys) of a theta of `rows` rows that range `index` holds, increasing: a range server's store holds
    these and no others, its row i being theta's row range_rows(...)[i]."""
    return np.flatnonzero(ranges.owner(np.arange(rows, dtype=np.uint64)) == index).astype(np.uint64)


class RangeStore:
    """Range s's rows of theta (a Store over only the rows this range holds, `keys`, in their order), the slices
    pushed to it and not yet applied, the orders waiting for their slices, and the reads waiting for a version.
    Keys on the wire are theta's rows; each is turned into its row in this store once, on arrival.

    Each slice gets a number of its own as it arrives, and an apply names slices by number: the slice carried out is
    the one server 0 judged on this range's measurement, even if the same (wid, clock) came again since (a resent
    push, a new incarnation of the worker). Slices are kept per server id (`sid`, server 0's, which workers learn at
    hello): after server 0 goes back to a checkpoint it has a new id, and a slice computed before that can never be
    taken for one computed after."""

    def __init__(self, store: Store, ranges: Ranges, index: int, keys: np.ndarray, rows: int, on_save=None,
                 max_held: int = 16):
        """keys: range_rows(ranges, index, rows), the rows of the whole theta (of `rows` rows) that `store` holds.
        max_held: slices one worker may have held here at once (a worker pushes one step at a time, and its
        unnamed slices go when a later push of its is applied: only a refused streak or a misbehaving peer holds
        more, and memory must stay bounded whatever a peer sends)."""
        if store.theta.shape[0] != len(keys):
            raise ValueError(f"range {index} holds {len(keys)} rows, but its store has {store.theta.shape[0]}")
        self.store, self.ranges, self.index, self.on_save = store, ranges, index, on_save
        self.keys, self.rows, self.max_held = keys, rows, max_held
        self.sid = ""                      # server 0's current id (sync, load)
        self.slices: dict[int, tuple[str, int, int, np.ndarray, np.ndarray]] = {}  # number -> (sid, wid, clock, rows)
        self.arrived = 0                   # slices numbered so far
        self.orders: deque = deque()       # ("apply", step, version, pushes, mean, scale) or ("save", step, version)
        self.ordered = store.version       # the version the orders so far make
        self.reads: list[tuple] = []       # (ident, rid, version, keys) of rgets for a version not reached

    @property
    def version(self) -> int:
        return self.store.version

    def local(self, keys: np.ndarray) -> np.ndarray:
        """This store's rows of `keys` (increasing, as the keys are), or ProtocolError bad_keys unless every key is
        a row of theta in this range (decode checked the order)."""
        rows = self.rows
        if len(keys) and int(keys[-1]) >= rows:
            raise ProtocolError(f"key {int(keys[-1])} is not a row of theta (keys are 0 .. {rows - 1})", "bad_keys")
        try:
            self.ranges.check(self.index, keys)
        except ValueError as e:
            raise ProtocolError(f"range {self.index}: {e}", "bad_keys") from None
        # every key below `rows` in this range is in self.keys: the position is the row
        return np.searchsorted(self.keys, keys)

    def values(self, keys: np.ndarray) -> np.ndarray:
        """theta's rows `keys` (all in this range), as this range holds them now."""
        return self.store.theta[self.local(keys)]

    def slice(self, wid: int, clock: int, keys: np.ndarray, values: np.ndarray,
              sid: str = "") -> tuple[int, bool, float]:
        """A worker's slice of its push for `clock`, held until an apply names it; its (number, every value finite,
        sum of squares), which server 0 judges the whole push on."""
        keys = self.local(keys)
        if sum(1 for v in self.slices.values() if v[1] == wid) >= self.max_held:
            raise ProtocolError(f"rpush: worker {wid} already has {self.max_held} slices held here that no apply "
                                f"named", "too_many_slices")
        try:
            self.store.check(values, keys)
        except TypeError as e:
            raise ProtocolError(f"rpush: {e}", "bad_dtype") from None
        except ValueError as e:
            raise ProtocolError(f"rpush: {e}", "bad_shape") from None
        self.arrived += 1
        self.slices[self.arrived] = (sid, wid, clock, keys, values)
        return (self.arrived, *self.store.squares(values))

    def synced(self, sid: str) -> None:
        """Server 0's id, from its sync: slices for another id are never applied."""
        if sid != self.sid:
            self.sid = sid
            self.slices = {n: v for n, v in self.slices.items() if v[0] == sid}

    def order(self, step: int, version: int, pushes: list, mean: bool, scale: float) -> None:
        """The coordinator's apply: ValueError if it is not well formed or not the next version (a coordinator's
        orders come over one connection, in order: anything else is a bug, never a worker's doing)."""
        if type(pushes) is not list or not 0 < len(pushes) <= MAX_PUSHES or not all(
                type(p) is list and len(p) == 3 and all(type(x) is int for x in p) for p in pushes):
            raise ValueError(f"apply: pushes must be 1 to {MAX_PUSHES} [wid, clock, slice] triples of ints")
        if not mean and len(pushes) != 1:
            raise ValueError("apply: an update of one push (mean = false) names exactly one push")
        if version != self.ordered + 1:
            raise ValueError(f"apply: version {version} does not follow {self.ordered}")
        self.ordered = version
        self.orders.append(("apply", step, version, [tuple(p) for p in pushes], mean, scale))

    def save(self, step: int, version: int) -> None:
        """A checkpoint of this range at `step`, once the orders before it are carried out (on_save(step))."""
        if version != self.ordered:
            raise ValueError(f"save: version {version} is not the {self.ordered} the orders so far make")
        self.orders.append(("save", step, version))

    def loaded(self, sid: str) -> None:
        """After this range's store was loaded from a checkpoint (server 0 went back to it, with id `sid`): what
        was held belongs to the run before; the orders start again from the loaded version."""
        self.sid, self.slices, self.orders, self.reads = sid, {}, deque(), []
        self.ordered = self.store.version

    def run(self) -> int:
        """Carry out every order whose slices have all arrived, in order; the number of applies carried out."""
        done = 0
        while self.orders:
            head = self.orders[0]
            if head[0] == "save":
                self.orders.popleft()
                if self.on_save is not None:
                    self.on_save(head[1])
                continue
            _, step, version, pushes, mean, scale = head
            if any(n not in self.slices for _, _, n in pushes):
                return done
            self.orders.popleft()
            parts = []
            for wid, clock, n in pushes:
                sid, *named, keys, values = self.slices.pop(n)
                if (sid, *named) != (self.sid, wid, clock):   # server 0 names only slices this range reported
                    raise ValueError(f"apply: slice {n} is ({sid}, {named[0]}, {named[1]}), not ({self.sid}, {wid}, "
                                     f"{clock})")
                parts.append((keys, values))
            if mean:   # a BSP step: the same accumulate-then-apply as server 0's store, in the same order
                for keys, values in parts:
                    self.store.push(values, keys)
                if not self.store.apply_step(step, version):
                    raise AssertionError("an apply names at least one push")
            else:
                keys, values = parts[0]
                self.store.update(values, step, version, scale, keys)
            for wid, clock, _ in pushes:   # this worker's other slices up to clock are never applied (refused,
                for old in [n for n, v in self.slices.items() if v[1] == wid and v[2] <= clock]:   # late, resent)
                    del self.slices[old]
            done += 1
        return done

    def read(self, ident: bytes, rid, version: int, keys: np.ndarray) -> None:
        self.reads.append((ident, rid, version, self.local(keys)))

    def answerable(self) -> list[tuple]:
        """The reads whose version has been reached, each (ident, rid, this store's rows), removed from the waiting
        ones."""
        ready = [r for r in self.reads if r[2] <= self.version]
        if ready:
            self.reads = [r for r in self.reads if r[2] > self.version]
        return [(ident, rid, keys) for ident, rid, _, keys in ready]


class RangeServer:
    def __init__(self, spec: RangeSpec, reporter: proc.Reporter):
        self.cfg = cfg = config_mod.Config.from_dict(spec.cfg, frozenset(spec.explicit))
        self.reporter = reporter
        self.index = spec.index
        ranges = Ranges(spec.cuts)
        keys = range_rows(ranges, spec.index, spec.rows)   # only its own rows: memory about 1/S of theta's
        self.theta_shm = SeqlockArray.create(f"{spec.shm_prefix}range{spec.index}_{uuid.uuid4().hex[:12]}",
                                             (len(keys),), np.float64)
        self.theta_shm.array[...] = 0.0   # theta starts at 0 (FTRL needs it; sparse_model.init_theta gives it)
        self.ckpt_dir = range_dir(spec.ckpt_dir, spec.index)
        self.rs = RangeStore(make_store(cfg, self.theta_shm.array, spec.rows - 1, self.theta_shm, rows=keys),
                             ranges, spec.index, keys, spec.rows, on_save=self._save,
                             max_held=cfg.server.max_bad_pushes + 8)   # a refused streak's slices, and some
        self.ctx = transport.context()
        self.sock, self.address = transport.router(self.ctx, "tcp://127.0.0.1:0",
                                                   max_frame_bytes=max(8 * len(keys), protocol.HEADER_MAX_BYTES) + 1024)
        self.coordinator: bytes | None = None   # server 0's identity on our socket, from its first message
        self.heard_s = time.monotonic()
        self.silence_s = cfg.worker.server_timeout_s   # server 0 syncs every half second: this long silent, it is gone
        self.stopped = False
        self.unreported: list[dict] = []   # measurements of slices not yet sent to server 0

    def loop(self) -> None:
        self.reporter.send("ready", address=self.address, theta=self.theta_shm.name, pid=os.getpid())
        while not self.stopped:
            if self.sock.poll(POLL_MS):
                n = 0
                while n < 256 and transport.readable(self.sock):
                    self.handle(transport.recv_now(self.sock))
                    n += 1
                self._progress()
            limit = self.silence_s if self.coordinator is not None else FIRST_WORD_S
            if time.monotonic() - self.heard_s > limit:
                log.warning("range %d: no word from server 0 for %.1f s; it is gone, exiting", self.index,
                            time.monotonic() - self.heard_s)
                return

    def handle(self, frames: list) -> None:
        if len(frames) < 2:
            return
        ident = frames[0].bytes
        rid = None
        try:
            h, arrays = protocol.decode(frames[1:], protocol.RANGE_REQUESTS)
            rid, op = h.get("rid"), h["op"]
            if op == OpStr.RPUSH:
                n, finite, sq = self.rs.slice(h["wid"], h["clock"], arrays[0], arrays[1], h["sid"])
                self.unreported.append({"op": OpStr.MEASURED, "sid": h["sid"], "wid": h["wid"], "clock": h["clock"],
                                        "slice": n, "finite": finite, "sq": sq})
            elif op == OpStr.RGET:
                self.rs.read(ident, rid, h["version"], arrays[0])
            elif op == OpStr.STATUS:
                self._send(ident, {"op": OpStr.STATUS, "state": {
                    "range": self.index, "version": self.rs.version, "held_slices": len(self.rs.slices),
                    "held_orders": len(self.rs.orders), "held_reads": len(self.rs.reads)}}, rid)
            else:   # server 0's orders: apply, save, sync, load
                if op == OpStr.LOAD:   # server 0 went back to a checkpoint (a new process, or the same one anew)
                    self.coordinator = ident
                elif self.coordinator is None:
                    self.coordinator = ident
                elif ident != self.coordinator:
                    raise ProtocolError(f"{op}: only server 0 sends it", "not_coordinator")
                self.heard_s = time.monotonic()
                try:
                    self._order(op, h)
                except ValueError as e:
                    raise ProtocolError(f"{op}: {e}", "bad_apply") from None
        except ProtocolError as e:
            rid = rid if rid is not None else getattr(e, "rid", None)
            self._send(ident, {"op": OpStr.ERROR, "code": e.code, "reason": str(e)}, rid)
            if e.code == "bad_apply":   # the coordinator and this range disagree: the run cannot be exact
                raise

    def _order(self, op: str, h: dict) -> None:
        if op == OpStr.APPLY:
            self.rs.order(h["step"], h["version"], h["pushes"], h["mean"], h["scale"])
        elif op == OpStr.SAVE:
            self.rs.save(h["step"], h["version"])
        elif op == OpStr.LOAD:
            directory = range_dir(h["dir"], self.index)
            try:
                keyrange.load_range(directory, h["step"], self.rs.store, self.rs.ranges, self.index)
            except (OSError, checkpoint.CheckpointError) as e:
                raise ValueError(f"no checkpoint of range {self.index} at step {h['step']} in {directory}: {e}")
            self.rs.loaded(h["sid"])
            log.warning("range %d: back at step %d (version %d) from its checkpoint", self.index, h["step"],
                        self.rs.version)
        elif h["version"] < 0:   # sync: server 0 has ended the run
            self.stopped = True
        else:
            self.rs.synced(h["sid"])

    def _save(self, step: int) -> None:
        keyrange.save_range(self.ckpt_dir, step, self.rs.store, self.rs.ranges, self.index,
                            keep=self.cfg.checkpoint.keep)

    def _progress(self) -> None:
        if self.coordinator is not None:   # known from server 0's first sync, sent before any worker has our address
            for header in self.unreported:
                self._send(self.coordinator, header, None)
            self.unreported.clear()
        self.rs.run()
        for ident, rid, local in self.rs.answerable():
            self._send(ident, {"op": OpStr.VALUES, "version": self.rs.version}, rid, (self.rs.store.theta[local],))

    def _send(self, ident: bytes, header: dict, rid, arrays=()) -> None:
        if rid is not None:
            header["rid"] = rid
        transport.send(self.sock, protocol.encode(header, arrays), ident, block=False)

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        self.theta_shm.close()   # the creator unlinks


def main(spec: RangeSpec, conn, parent_pid: int, core, log_level: int) -> None:
    """Entry point of a range server process ("psrv.rangeserver:main", started with spawn by the launcher)."""
    proc.child_setup(f"range{spec.index}", parent_pid, core, log_level)
    reporter = proc.Reporter(conn)
    server = None
    try:
        server = RangeServer(spec, reporter)
        server.loop()
    except Exception as e:
        log.error("range server %d failed:\n%s", spec.index, traceback.format_exc())
        reporter.send("error", process=f"range server {spec.index}", message=f"{type(e).__name__}: {e}")
        sys.exit(1)
    finally:
        if server is not None:
            server.close()


class RangeGone(Exception):
    """A range's rows cannot be read now: its server died and is being restarted."""


class RangeLinks:
    """Server 0's side of ranges 1 .. S - 1: a DEALER to each range server for its orders (apply, sync) and its
    measurements of the slices that arrive there, and each range's theta segment attached read-only, from which the
    whole theta is put together for evaluations and the end of the run."""

    SYNC_EVERY_S = 0.5

    def __init__(self, ctx, ranges: Ranges, links: list, timeout_s: float, sid: str):
        self.ranges, self.timeout_s, self.sid = ranges, timeout_s, sid
        self.addresses = [link["address"] for link in links]
        self.socks = [transport.dealer(ctx, a) for a in self.addresses]
        self.views: list[SeqlockArray] = []
        self.step_pushes: list[tuple] = []         # BSP: the (wid, clock, slices) of each accumulated push, in order
        self.measured: dict[tuple[int, int], dict[int, tuple]] = {}  # (wid, clock) -> {range: (slice, finite, sq)}
        self.synced_s = 0.0
        self.held: list[np.ndarray] = []           # range s's rows of theta (s = 1 ..), as its segment holds them
        self.links = links

    def attach(self, rows: int) -> None:
        self.held = [range_rows(self.ranges, s, rows).astype(np.int64) for s in range(1, len(self.links) + 1)]
        self.views = [SeqlockArray.attach(link["theta"], (len(held),), np.float64)
                      for link, held in zip(self.links, self.held)]

    def receive(self) -> list[tuple[int, int]]:
        """Read what the range servers sent (their measurements of slices, error replies to orders); the (wid,
        clock) of each push that every range has now measured its slice of."""
        complete = []
        for s, sock in enumerate(self.socks, start=1):
            n = 0
            while n < 256 and transport.readable(sock):
                n += 1
                try:
                    h, _ = protocol.decode(transport.recv_now(sock), protocol.RANGE_REPORTS)
                except ProtocolError as e:   # a range server is ours: a bad message is a bug, not an attack
                    log.error("range %d sent a bad message: %s", s, e)
                    continue
                if h["op"] == OpStr.ERROR:
                    log.error("range %d refused an order: %s: %s", s, h["code"], h["reason"])
                elif h["sid"] == self.sid:   # a slice for this server id (an older one's is never applied)
                    got = self.measured.setdefault((h["wid"], h["clock"]), {})
                    got[s] = (h["slice"], h["finite"], h["sq"])   # sent again: the newest is the one judged
                    if len(got) == len(self.socks):
                        complete.append((h["wid"], h["clock"]))
        return complete

    def measurements(self, wid: int, clock: int) -> tuple | None:
        """Each range's (slice, finite, sq) of the push (wid, clock), in range order; None until all have come."""
        got = self.measured.get((wid, clock))
        if got is None or len(got) < len(self.socks):
            return None
        return tuple(got[s] for s in range(1, len(self.socks) + 1))

    def _named(self, wid: int, clock: int) -> None:
        """(wid, clock) is applied: the measurements of wid's pushes before it (refused, late) are of no more use.
        Its own stay until the next, so that the push sent again reaches the coordinator (a duplicate)."""
        for key in [k for k in self.measured if k[0] == wid and k[1] < clock]:
            del self.measured[key]

    def accumulated(self, wid: int, clock: int, slices: tuple) -> None:
        self.step_pushes.append((wid, clock, slices))
        self._named(wid, clock)

    def apply_step(self, step: int, version: int) -> None:
        """BSP: every range applies the mean of the slices of this step's pushes, in the order server 0 summed them."""
        pushes, self.step_pushes = self.step_pushes, []
        self._order({"op": OpStr.APPLY, "step": step, "version": version, "mean": True, "scale": 1.0}, pushes)

    def update(self, wid: int, clock: int, slices: tuple, step: int, version: int, scale: float) -> None:
        """SSP/ASP: every range applies this one push's slice, weighted by `scale`."""
        self._named(wid, clock)
        self._order({"op": OpStr.APPLY, "step": step, "version": version, "mean": False, "scale": scale},
                    [(wid, clock, slices)])

    def sync(self, version: int, now: float) -> None:
        """Server 0's id, and a sign of life every SYNC_EVERY_S (a range server whose coordinator is silent exits);
        version -1: the run is over, exit now."""
        if version < 0 or now - self.synced_s >= self.SYNC_EVERY_S:
            self.synced_s = now
            self._order({"op": OpStr.SYNC, "sid": self.sid, "version": version})

    def save(self, step: int, version: int) -> None:
        """Every range checkpoints itself at `step` once it has carried out the orders up to `version`."""
        self._order({"op": OpStr.SAVE, "step": step, "version": version})

    def load(self, step: int, directory: str) -> None:
        """Every range goes back to its own checkpoint of `step` (in range_dir(directory, s)), as server 0 just did."""
        self._order({"op": OpStr.LOAD, "sid": self.sid, "step": step, "dir": os.path.abspath(directory)})

    def _order(self, header: dict, pushes: list | None = None) -> None:
        """The same order to every range; an apply's `pushes` name each range's own slice numbers ([wid, clock,
        slice] from (wid, clock, slices) with slices[s - 1] range s's)."""
        frames = protocol.encode(header) if pushes is None else None
        for s, (sock, address) in enumerate(zip(self.socks, self.addresses), start=1):
            if pushes is not None:
                frames = protocol.encode({**header, "pushes": [[w, c, sl[s - 1]] for w, c, sl in pushes]})
            self._send(sock, address, frames)

    def _send(self, sock, address: str, frames: list) -> None:
        # a range server reads its socket all the time: a full queue means it is gone or stuck
        if not transport.send(sock, frames, block=False) and not (
                transport.writable(sock, int(self.timeout_s * 1000)) and transport.send(sock, frames, block=False)):
            raise RuntimeError(f"the range server at {address} takes no orders (queue full for {self.timeout_s:g} s)")

    def compose(self, own: np.ndarray, version: int, give_up=lambda: False) -> np.ndarray:
        """The whole theta at `version`: range 0's rows from `own` (server 0's theta), every other range's rows from
        its segment once that range has reached `version` (it may lag while slices are on their way). RangeGone
        when give_up() says so while waiting (a range server died and the run goes back to a checkpoint)."""
        out = own.copy()
        for s, (view, held) in enumerate(zip(self.views, self.held), start=1):
            buf = np.empty(len(held))
            deadline = time.monotonic() + self.timeout_s
            while (got := view.read_into(buf)) != version:
                if give_up():
                    raise RangeGone(f"range {s} did not reach version {version}: the run goes back to a checkpoint")
                if got > version or time.monotonic() > deadline:
                    raise RuntimeError(f"range {s} is at version {got}, not {version}, after {self.timeout_s:g} s")
                time.sleep(0.001)
            out[held] = buf
        return out

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        for view in self.views:
            view.close()
