"""A range server: one of the S - 1 processes that hold a key range of a sparse model's theta when server.shards = S
> 1 (server 0, the coordinator, holds range 0 itself). docs/sparse.md, "Several servers", says how the run fits
together; docs/protocol.md, "Several servers", specifies the messages.

A range server decides nothing. Workers send it their slice of every push (`rpush`, keyed by (wid, clock)) and read
its rows at a version (`rget`); server 0 orders each update (`apply`: which slices, in which order, with which
step, version and scale), exactly the updates its own store carries out for range 0. A slice waits here until an
apply names it, and an apply waits until every slice it names has arrived (the two come over different
connections), so each range sums the same gradients in the same order as one server would: S servers give S = 1's
theta. An `rget` for a version not reached yet is answered once it is.

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
from dataclasses import dataclass

import numpy as np

from . import config as config_mod
from . import optim, proc, protocol, transport
from .coordinator import run_steps
from .errors import ProtocolError
from .keyrange import Ranges
from .protocol import OpStr
from .shmarray import SeqlockArray
from .store import Store

log = logging.getLogger(__name__)

POLL_MS = 50
MAX_PUSHES = 1024            # (wid, clock) pairs one apply may name: far above any train.workers
FIRST_WORD_S = 120.0         # how long a range server waits for server 0's first message (it starts after us)


@dataclass(frozen=True)
class RangeSpec:
    """What the launcher hands a range server process (plain fields: it pickles for spawn)."""
    cfg: dict
    explicit: list
    rows: int                 # theta's rows (d + 1)
    index: int                # this range: 1 .. S - 1
    cuts: list                # Ranges(cuts): the S ranges
    shm_prefix: str


def make_store(cfg, theta: np.ndarray, weight_rows: int, writer=None) -> Store:
    """The store of a sparse or dense theta as server.py builds it: train.optimizer and its learning-rate schedule,
    clipping, the L2 term on the first `weight_rows` rows (FTRL's L2 is in its closed form instead)."""
    t = cfg.train
    total_steps = run_steps(cfg) or t.steps
    ftrl = t.optimizer == "ftrl"
    return Store(theta, optim.make(t.optimizer, theta, t, l2=cfg.model.l2),
                 lambda step: optim.lr_at(step, t.lr, t.lr_schedule, total_steps, t.lr_decay, t.lr_decay_every,
                                          t.lr_min),
                 clip_norm=t.clip_norm, l2=0.0 if ftrl else cfg.model.l2,
                 l2_mask=np.arange(theta.shape[0]) < weight_rows, writer=writer)


class RangeStore:
    """Range s's rows of theta (a Store over all d + 1 rows, of which only range s's ever change), the slices
    pushed to it and not yet applied, the applies waiting for their slices, and the reads waiting for a version."""

    def __init__(self, store: Store, ranges: Ranges, index: int):
        self.store, self.ranges, self.index = store, ranges, index
        self.slices: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}   # (wid, clock) -> (keys, values)
        self.applies: deque = deque()      # (step, version, pushes, mean, scale), in the coordinator's order
        self.reads: list[tuple] = []       # (ident, rid, version, keys) of rgets for a version not reached

    @property
    def version(self) -> int:
        return self.store.version

    def check_keys(self, keys: np.ndarray) -> np.ndarray:
        """ProtocolError bad_keys unless every key is a row of theta in this range (decode checked the order)."""
        rows = self.store.theta.shape[0]
        if len(keys) and int(keys[-1]) >= rows:
            raise ProtocolError(f"key {int(keys[-1])} is not a row of theta (keys are 0 .. {rows - 1})", "bad_keys")
        try:
            self.ranges.check(self.index, keys)
        except ValueError as e:
            raise ProtocolError(f"range {self.index}: {e}", "bad_keys") from None
        return keys

    def slice(self, wid: int, clock: int, keys: np.ndarray, values: np.ndarray) -> None:
        """A worker's slice of its push for `clock`: held until an apply names it (a resent one replaces it)."""
        self.check_keys(keys)
        try:
            self.store.check(values, keys)
        except TypeError as e:
            raise ProtocolError(f"rpush: {e}", "bad_dtype") from None
        except ValueError as e:
            raise ProtocolError(f"rpush: {e}", "bad_shape") from None
        self.slices[(wid, clock)] = (keys, values)

    def order(self, step: int, version: int, pushes: list, mean: bool, scale: float) -> None:
        """The coordinator's apply: ValueError if it is not well formed or not the next version (a coordinator's
        orders come over one connection, in order: anything else is a bug, never a worker's doing)."""
        if type(pushes) is not list or not 0 < len(pushes) <= MAX_PUSHES or not all(
                type(p) is list and len(p) == 2 and all(type(x) is int for x in p) for p in pushes):
            raise ValueError(f"apply: pushes must be 1 to {MAX_PUSHES} [wid, clock] pairs of ints")
        if not mean and len(pushes) != 1:
            raise ValueError("apply: an update of one push (mean = false) names exactly one push")
        last = self.applies[-1][1] if self.applies else self.version
        if version != last + 1:
            raise ValueError(f"apply: version {version} does not follow {last}")
        self.applies.append((step, version, [tuple(p) for p in pushes], mean, scale))

    def run(self) -> int:
        """Carry out every apply whose slices have all arrived, in order; the number carried out."""
        done = 0
        while self.applies:
            step, version, pushes, mean, scale = self.applies[0]
            if any(p not in self.slices for p in pushes):
                return done
            self.applies.popleft()
            parts = [self.slices.pop(p) for p in pushes]
            if mean:   # a BSP step: the same accumulate-then-apply as server 0's store, in the same order
                for keys, values in parts:
                    self.store.push(values, keys)
                if not self.store.apply_step(step, version):
                    raise AssertionError("an apply names at least one push")
            else:
                keys, values = parts[0]
                self.store.update(values, step, version, scale, keys)
            for wid, clock in pushes:   # this worker's earlier slices were never applied (refused, late): gone
                for old in [k for k in self.slices if k[0] == wid and k[1] < clock]:
                    del self.slices[old]
            done += 1
        return done

    def read(self, ident: bytes, rid, version: int, keys: np.ndarray) -> None:
        self.check_keys(keys)
        self.reads.append((ident, rid, version, keys))

    def answerable(self) -> list[tuple]:
        """The reads whose version has been reached, each (ident, rid, keys), removed from the waiting ones."""
        ready = [r for r in self.reads if r[2] <= self.version]
        if ready:
            self.reads = [r for r in self.reads if r[2] > self.version]
        return [(ident, rid, keys) for ident, rid, _, keys in ready]


class RangeServer:
    def __init__(self, spec: RangeSpec, reporter: proc.Reporter):
        self.cfg = cfg = config_mod.Config.from_dict(spec.cfg, frozenset(spec.explicit))
        self.reporter = reporter
        self.index = spec.index
        self.theta_shm = SeqlockArray.create(f"{spec.shm_prefix}range{spec.index}_{uuid.uuid4().hex[:12]}",
                                             (spec.rows,), np.float64)
        self.theta_shm.array[...] = 0.0   # theta starts at 0 (FTRL needs it; sparse_model.init_theta gives it)
        self.rs = RangeStore(make_store(cfg, self.theta_shm.array, spec.rows - 1, self.theta_shm),
                             Ranges(spec.cuts), spec.index)
        self.ctx = transport.context()
        self.sock, self.address = transport.router(self.ctx, "tcp://127.0.0.1:0",
                                                   max_frame_bytes=max(8 * spec.rows, protocol.HEADER_MAX_BYTES) + 1024)
        self.coordinator: bytes | None = None   # server 0's identity on our socket, from its first message
        self.heard_s = time.monotonic()
        self.silence_s = cfg.worker.server_timeout_s   # server 0 syncs every half second: this long silent, it is gone
        self.stopped = False

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
                self.rs.slice(h["wid"], h["clock"], arrays[0], arrays[1])
            elif op == OpStr.RGET:
                self.rs.read(ident, rid, h["version"], arrays[0])
            elif op in (OpStr.APPLY, OpStr.SYNC):
                if self.coordinator is None:
                    self.coordinator = ident
                elif ident != self.coordinator:
                    raise ProtocolError(f"{op}: only server 0 sends it", "not_coordinator")
                self.heard_s = time.monotonic()
                if op == OpStr.APPLY:
                    try:
                        self.rs.order(h["step"], h["version"], h["pushes"], h["mean"], h["scale"])
                    except ValueError as e:
                        raise ProtocolError(str(e), "bad_apply") from None
                elif h["version"] < 0:   # sync: server 0 has ended the run
                    self.stopped = True
            else:   # status
                self._send(ident, {"op": OpStr.STATUS, "state": {
                    "range": self.index, "version": self.rs.version, "held_slices": len(self.rs.slices),
                    "held_applies": len(self.rs.applies), "held_reads": len(self.rs.reads)}}, rid)
        except ProtocolError as e:
            rid = rid if rid is not None else getattr(e, "rid", None)
            self._send(ident, {"op": OpStr.ERROR, "code": e.code, "reason": str(e)}, rid)
            if e.code == "bad_apply":   # the coordinator and this range disagree: the run cannot be exact
                raise

    def _progress(self) -> None:
        self.rs.run()
        for ident, rid, keys in self.rs.answerable():
            self._send(ident, {"op": OpStr.VALUES, "version": self.rs.version}, rid,
                       (self.rs.store.theta[keys.view(np.int64)],))

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


class RangeLinks:
    """Server 0's side of ranges 1 .. S - 1: a DEALER to each range server for its orders (apply, sync), and each
    range's theta segment attached read-only, from which the whole theta is put together for evaluations and the
    end of the run."""

    SYNC_EVERY_S = 0.5

    def __init__(self, ctx, ranges: Ranges, links: list, timeout_s: float):
        self.ranges, self.timeout_s = ranges, timeout_s
        self.addresses = [link["address"] for link in links]
        self.socks = [transport.dealer(ctx, a) for a in self.addresses]
        self.views: list[SeqlockArray] = []
        self.step_pushes: list[list[int]] = []     # BSP: the (wid, clock) of each accumulated push, in order
        self.synced_s = 0.0
        self.owner: np.ndarray | None = None       # theta row -> its range, made at the first compose
        self.links = links

    def attach(self, rows: int) -> None:
        self.views = [SeqlockArray.attach(link["theta"], (rows,), np.float64) for link in self.links]

    def accumulated(self, wid: int, clock: int) -> None:
        self.step_pushes.append([wid, clock])

    def apply_step(self, step: int, version: int) -> None:
        """BSP: every range applies the mean of the slices of this step's pushes, in the order server 0 summed them."""
        pushes, self.step_pushes = self.step_pushes, []
        self._order({"op": OpStr.APPLY, "step": step, "version": version, "pushes": pushes, "mean": True,
                     "scale": 1.0})

    def update(self, wid: int, clock: int, step: int, version: int, scale: float) -> None:
        """SSP/ASP: every range applies this one push's slice, weighted by `scale`."""
        self._order({"op": OpStr.APPLY, "step": step, "version": version, "pushes": [[wid, clock]], "mean": False,
                     "scale": scale})

    def sync(self, version: int, now: float) -> None:
        """A sign of life every SYNC_EVERY_S (a range server whose coordinator is silent exits); version -1: the run
        is over, exit now."""
        if version < 0 or now - self.synced_s >= self.SYNC_EVERY_S:
            self.synced_s = now
            self._order({"op": OpStr.SYNC, "version": version})

    def _order(self, header: dict) -> None:
        frames = protocol.encode(header)
        for sock, address in zip(self.socks, self.addresses):
            # a range server reads its socket all the time: a full queue means it is gone or stuck
            if not transport.send(sock, frames, block=False) and not (
                    transport.writable(sock, int(self.timeout_s * 1000))
                    and transport.send(sock, frames, block=False)):
                raise RuntimeError(f"the range server at {address} takes no orders (queue full for "
                                   f"{self.timeout_s:g} s)")

    def compose(self, own: np.ndarray, version: int) -> np.ndarray:
        """The whole theta at `version`: range 0's rows from `own` (server 0's theta), every other range's rows from
        its segment once that range has reached `version` (it may lag while slices are on their way)."""
        if self.owner is None:
            self.owner = self.ranges.owner(np.arange(len(own), dtype=np.uint64))
        out = own.copy()
        buf = np.empty_like(out)
        for s, view in enumerate(self.views, start=1):
            deadline = time.monotonic() + self.timeout_s
            while (got := view.read_into(buf)) != version:
                if got > version or time.monotonic() > deadline:
                    raise RuntimeError(f"range {s} is at version {got}, not {version}, after {self.timeout_s:g} s")
                time.sleep(0.001)
            mine = self.owner == s
            out[mine] = buf[mine]
        return out

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
        for view in self.views:
            view.close()
