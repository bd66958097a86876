"""The parameter server: one ROUTER socket, a poll loop with a timeout, handlers by op (on_<op>).

It owns theta and the optimizer, asks the consistency gate when a pull may be answered, hands out mini-batches and
shard leases, tracks liveness, writes checkpoints, decides when to stop, and writes theta.npy, summary.json and
metrics.jsonl. A bad message gets an error reply; the loop keeps serving.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint, data, models, optim, plot, protocol, proc, transport
from . import config as config_mod
from .consistency import APPLY, COMPLETE, LATE, Gate
from .errors import ProtocolError, RunError
from .metrics import Metrics
from .protocol import Op
from .schedule import Schedule
from .spec import ServerSpec
from .blocks import DataBlock
from . import shmarray
from .shmarray import SeqlockArray, SharedArray

log = logging.getLogger(__name__)

POLL_MS = 50
DRAIN_MAX = 256          # messages handled per wake-up before the timers get a turn
PROGRESS_INTERVAL_S = 0.5
MAX_WID = 1 << 20        # worker ids a client may ask for
RATE_WINDOW_S = 5.0      # push rate in status: pushes over about this many seconds
RATE_MARK_S = 0.25
BAD_PEERS_KEPT = 1024    # per-peer counts of malformed messages: bounded, however many peers misbehave
MAX_PEERS = 4096         # workers remembered (live, dead, finished); beyond it dead ones are forgotten
STATUS_WORKERS = 200     # workers listed in a status reply (live ones first), so it stays under the header cap
HOST_CHARS = 128


@dataclass
class Peer:
    """What the server knows about one worker incarnation."""
    wid: int
    inc: int
    ident: bytes
    pid: int
    host: str
    local: bool
    joined_s: float
    last_seen_s: float
    alive: bool = True
    finished: bool = False
    seq: int = -1                 # last push sequence number seen
    clock: int = 0
    inflight: list | None = None  # the batch it was served and has not pushed yet
    pushes: int = 0
    samples: int = 0
    last_staleness: int = 0
    shm: bool = False             # reads theta from shared memory and pushes through its slot
    bad_streak: int = 0           # non-finite gradients in a row
    quarantined: bool = False
    parked_s: float = 0.0         # when its pull was parked (for the time spent waiting)
    # (time, pushes) marks at most every RATE_MARK_S: the push rate over the last RATE_WINDOW_S, in O(1) memory
    rate_marks: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))


@dataclass
class Stats:
    applied: int = 0              # gradients that went into an update (BSP: every one of a step's)
    samples: int = 0
    rejected: dict = field(default_factory=dict)      # reason -> pushes refused
    dropped: dict = field(default_factory=dict)       # wid -> late gradients dropped (backup workers)
    clipped: int = 0
    duplicates: int = 0
    stale_pushes: int = 0         # pushes from a dead or replaced incarnation, or for an older server
    bad_messages: int = 0
    staleness_hist: dict = field(default_factory=dict)
    version_lag_max: int = 0
    deaths: int = 0
    worker_restarts: int = 0
    pushes: dict = field(default_factory=dict)        # wid -> gradients applied (every incarnation)
    compute_s: float = 0.0        # summed over applied pushes: time workers spent computing gradients
    request_s: float = 0.0        # ... and waiting for the reply to their previous push (network + server + barrier)
    wait_s: float = 0.0           # time pulls spent parked at the server (barrier or staleness bound)
    quarantined: list = field(default_factory=list)   # wids refused for pushing non-finite gradients

    MAPS = ("rejected", "dropped", "staleness_hist", "pushes")

    def to_state(self) -> dict:
        d = dict(self.__dict__)
        for k in self.MAPS:
            d[k] = [[key, v] for key, v in d[k].items()]
        return d

    @classmethod
    def from_state(cls, d: dict) -> "Stats":
        d = dict(d)
        for k in cls.MAPS:
            d[k] = {key: v for key, v in d[k]}
        return cls(**d)


class Server:
    def __init__(self, cfg: config_mod.Config, layout: dict, out_dir: str, reporter: proc.Reporter | None = None,
                 bind: str | None = None, resume: str | None = None, server_restarts: int = 0,
                 alone: bool = False, shm_prefix: str = ""):
        self.cfg, self.out_dir, self.reporter = cfg, out_dir, reporter or proc.Reporter(None)
        self.alone = alone                        # started with --role server: waits for workers as long as needed
        self.layout = data.Layout.from_dict(layout)
        self.block = DataBlock.attach(self.layout.block)
        t = cfg.train
        self.n_expected = t.workers
        self.n_start = t.workers                 # joins needed to open the gate (after a restart: who was live)
        self.model = models.make(cfg.model.kind, self.block.spec.d, cfg.model.fit_intercept, self.block.spec.dtype,
                                 self.layout.extra.get("classes", 0))
        self.server_id = uuid.uuid4().hex[:12]
        theta0 = self.model.init_theta()
        # local workers read theta from shared memory (a seqlock) and write gradients into slots there; theta then
        # lives in that segment and is updated in place. Workers elsewhere get it over ZeroMQ.
        self.shm_prefix = shm_prefix if cfg.worker.shm and shmarray.ORDERED_STORES else ""
        self.theta_shm = None
        self.slots: dict[int, SharedArray] = {}
        if self.shm_prefix:
            self.theta_shm = SeqlockArray.create(f"{self.shm_prefix}theta_{self.server_id}", theta0.shape,
                                                 theta0.dtype)
            self.theta = self.theta_shm.array
            self.theta[...] = theta0
        else:
            self.theta = theta0
        self.opt = optim.make(t.optimizer, self.theta, t)
        self.work = np.empty_like(self.theta)    # the update's input when it must be scaled or penalized
        self.finite_buf = np.empty(self.theta.shape, dtype=bool)
        self.work2 = np.empty_like(self.theta)
        self._lr_cache = (-1, 0.0)
        # l2 penalizes the weights, never the intercept row; a custom model's theta is penalized whole
        self.l2_rows = self.block.spec.d if isinstance(self.model, models._Glm) else self.theta.shape[0]
        self.version = 0                         # updates applied to theta
        self._published: np.ndarray | None = None
        self.gate = Gate(t.consistency, staleness=t.staleness, backup=t.backup_workers)
        self.schedule = Schedule([s for _, s in self.layout.shards], dynamic=t.schedule == "dynamic")
        self.checksums: dict[int, int] = {}      # shard -> CRC-32 of its rows, for workers that load their own
        self.acc = np.zeros_like(self.theta)     # BSP: the sum of this step's gradients
        self.acc_n = 0
        self.step_records: list[tuple] = []      # BSP: the pushes in acc, accounted once their step is applied
        self.applied_records: list[tuple] = []   # applied, to be accounted after the reply
        # train.steps bounds the run unless only train.epochs was asked for
        self.max_steps = t.steps if (t.epochs == 0 or "train.steps" in cfg.explicit) else None
        self.peers: dict[int, Peer] = {}         # wid -> current incarnation
        self.incarnations: dict[int, int] = {}   # wid -> last incarnation number handed out
        self.saved_clocks: dict[int, int] = {}   # wid -> clock at the checkpoint this server resumed from
        self.parked: dict[int, tuple[int, int | None]] = {}  # wid -> (clock, rid) of a waiting pull
        self.stats = Stats()
        self.server_restarts = server_restarts
        self.started_s: float | None = None
        self.t0 = time.monotonic()
        self.elapsed_before_s = 0.0              # training time before the checkpoint this server resumed from
        self.last_progress_s = 0.0
        self.stopping = ""                       # why the run is ending ("" while it is not)
        self.done = False
        self.evaluated_step = 0
        self.checkpointed_step = 0
        self.checkpointed_version = 0
        self.updated = False                     # an update happened that bookkeeping() has not seen yet
        self.resumed_from: str | None = None
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(out_dir, "checkpoints")
        os.makedirs(out_dir, exist_ok=True)
        checkpoint.clean_temporaries(self.ckpt_dir)
        if resume:
            self._restore(resume)
        elif checkpoint.checkpoints(self.ckpt_dir):
            # a fresh run in a used folder: an old run's checkpoints must never be taken for this run's
            for path in checkpoint.checkpoints(self.ckpt_dir):
                os.remove(path)
            log.warning("removed the checkpoints of an earlier run in %s", self.ckpt_dir)
        self.metrics = Metrics(os.path.join(out_dir, "metrics.jsonl"), t.log_every, t.tol, t.tol_window,
                               append=self.resumed_from is not None)
        self.metrics.logged_step = self.step
        self.handlers = {op.value: getattr(self, f"on_{op.value}") for op in protocol.REQUESTS}
        self.bad_by_peer: dict[bytes, int] = {}
        self.terminate = False                   # SIGTERM: end the run now, keeping its results
        self.ctx = transport.context()
        # CURVE: the authenticator refuses unknown keys during the handshake, before any message reaches us
        self.auth = transport.authenticator(self.ctx, cfg.server.keys) if cfg.server.keys else None
        self.sock, self.address = transport.router(
            self.ctx, bind or cfg.server.bind,
            max_frame_bytes=max(self.theta.nbytes, protocol.HEADER_MAX_BYTES) + 1024, keys=cfg.server.keys)
        if not protocol.is_local(self.address) and not cfg.server.keys:
            log.warning("server.insecure: listening on %s WITHOUT authentication: anyone who can reach this "
                        "address can send gradients and read theta", self.address)

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict:
        """Serve until the run is over, then write the outputs; returns the summary."""
        self.loop()
        return self.finish()

    def loop(self) -> None:
        self.reporter.send("ready", address=self.address, pid=os.getpid(), resumed_from=self.resumed_from)
        log.info("listening on %s; waiting for %d worker(s)", self.address, self.n_expected)
        join_deadline = time.monotonic() + self.cfg.server.join_timeout_s
        poller = transport.poller(self.sock)
        while not self.done:
            if poller.poll(POLL_MS):
                for _ in range(DRAIN_MAX):
                    if not transport.readable(self.sock):
                        break
                    self.handle(transport.recv_now(self.sock))
            now = time.monotonic()
            if self.terminate:
                self.stop_all("terminated")
                self.done = True  # no waiting for workers: whoever asks next is told to stop, or finds us gone
                break
            self.check_liveness(now)
            self.bookkeeping()
            if not self.gate.open and not self.alone and now > join_deadline:
                joined = sorted(p.wid for p in self.live())
                if self.resumed_from and joined:  # a worker lost for good before the restart is not waited for
                    log.warning("resuming with %d of the %d workers that were training: %s", len(joined),
                                self.n_start, joined)
                    self._open()
                else:
                    missing = [w for w in range(self.n_expected) if w not in joined]
                    raise RunError("server", f"only {len(joined)} of {self.n_start} workers joined within "
                                             f"{self.cfg.server.join_timeout_s:g} s (missing worker ids: {missing})")
            if self.started_s is not None:
                if self.cfg.train.max_wall_s and self.elapsed_s() > self.cfg.train.max_wall_s:
                    self.stop_all("max_wall_s")
                if now - self.last_progress_s >= PROGRESS_INTERVAL_S:
                    self.report_progress(now)

    def handle(self, frames: list) -> None:
        if len(frames) < 2:  # a ROUTER always prefixes the peer's id; an empty message has nothing to answer
            return
        ident, body = frames[0].bytes, frames[1:]
        rid = None
        try:
            header, arrays = protocol.decode(body, protocol.REQUESTS)
            rid = header.get("rid")
            self.handlers[header["op"]](ident, header, arrays)
        except ProtocolError as e:
            self.stats.bad_messages += 1
            self._count_bad(ident)
            log.debug("bad message from %r: %s", ident, e)
            transport.send(self.sock, protocol.error(e.code, str(e), rid), ident, block=False)
        self.bookkeeping()

    def _count_bad(self, ident: bytes) -> None:
        if ident not in self.bad_by_peer and len(self.bad_by_peer) >= BAD_PEERS_KEPT:
            del self.bad_by_peer[min(self.bad_by_peer, key=self.bad_by_peer.get)]  # forget the least noisy
        self.bad_by_peer[ident] = self.bad_by_peer.get(ident, 0) + 1

    def reply(self, ident: bytes, header: dict, arrays=(), rid: int | None = None) -> None:
        if rid is not None:
            header["rid"] = rid
        transport.send(self.sock, protocol.encode(header, arrays), ident, block=False)

    # ------------------------------------------------------------------ handlers
    def on_hello(self, ident, h, arrays):
        if h["version"] != protocol.VERSION:
            raise ProtocolError(f"protocol version mismatch: client speaks v{h['version']}, server speaks "
                                f"v{protocol.VERSION}", "version_mismatch")
        if h["role"] != "worker":
            raise ProtocolError(f"hello: role must be 'worker', got {h['role']!r}", "bad_field")
        wid = h["wid"]
        if wid == -1:  # an attached worker: the lowest id no launcher worker uses and nobody has had
            wid = max([self.n_expected - 1, *self.incarnations]) + 1
        if not 0 <= wid < MAX_WID:
            raise ProtocolError(f"hello: worker id {wid} is outside -1..{MAX_WID - 1}", "bad_wid")
        if self.stopping:
            raise ProtocolError(f"the run is ending ({self.stopping}); no new workers", "finished")
        if wid not in self.peers and len(self.peers) >= MAX_PEERS:
            for gone in [w for w, q in self.peers.items() if not q.alive and not q.quarantined]:
                del self.peers[gone]
            if len(self.peers) >= MAX_PEERS:
                raise ProtocolError(f"{MAX_PEERS} workers are registered already", "too_many_workers")
        old = self.peers.get(wid)
        if old is not None and old.quarantined:
            raise ProtocolError(f"worker {wid} is quarantined (it pushed non-finite gradients)", "quarantined")
        if old is not None and old.finished:
            raise ProtocolError(f"worker {wid} has already finished", "finished")
        if old is not None:
            self.stats.worker_restarts += 1
            if old.alive:
                log.warning("worker %d re-registered from pid %d; incarnation %d replaces %d", wid, h["pid"],
                            self.incarnations[wid] + 1, old.inc)
                self._remove(old)
        inc = self.incarnations.get(wid, 0) + 1
        now = time.monotonic()
        self.incarnations[wid] = inc
        self.peers[wid] = p = Peer(wid=wid, inc=inc, ident=ident, pid=h["pid"], host=h["host"][:HOST_CHARS],
                                   local=h["local"], joined_s=now, last_seen_s=now)
        # gradient slots only for the launcher's own workers (ids below train.workers): a bounded number, however
        # many clients say they are local
        if h["local"] and self.theta_shm is not None and wid < self.n_expected:
            p.shm = True
            if wid not in self.slots:  # kept across incarnations of the same worker id
                self.slots[wid] = SharedArray.create(f"{self.shm_prefix}slot_{self.server_id}_{wid}",
                                                     self.theta.shape, self.theta.dtype)
        self._membership_changed()
        log.info("worker %d joined (pid %d on %s, incarnation %d, shards %s)", wid, p.pid, p.host, inc,
                 self.schedule.held_by(wid))
        if not self.gate.open and len(self.live()) >= self.n_start:
            self._open()
        self.reply(ident, self._welcome(p), [self.block.mean, self.block.scale], rid=h.get("rid"))
        self.release_parked()

    def _open(self) -> None:
        self.gate.open = True
        self.started_s = time.monotonic()
        log.info("%d workers joined; training %s", len(self.live()),
                 f"resumes at step {self.step}" if self.resumed_from else "starts")
        self.release_parked()

    def _welcome(self, p: Peer) -> dict:
        t, m = self.cfg.train, self.cfg.model
        spec = self.layout.to_dict()
        del spec["columns"]  # as long as the data is wide; no worker needs the names
        # what a worker that loads its own rows needs: the data config and a checksum of each shard it may read
        spec["config"] = dc = self.cfg.to_dict()["data"]
        if dc["source"] != "synthetic":
            dc["source"] = os.path.abspath(dc["source"])  # a worker started elsewhere reads the same path
        spec["explicit"] = sorted(k for k in self.cfg.explicit if k.startswith("data."))
        if not p.local:
            spec["checksums"] = [[s, self._checksum(s)] for s in range(len(self.layout.shards))]
        if p.shm:
            spec["shm"] = {"theta": self.theta_shm.name, "slot": self.slots[p.wid].name}
        return {
            "op": Op.WELCOME.value, "version": protocol.VERSION, "wid": p.wid, "inc": p.inc,
            "server_id": self.server_id, "theta_shape": list(self.theta.shape), "theta_dtype": self.theta.dtype.str,
            "data": spec,
            "train": {"batch_size": t.batch_size, "seed": t.seed, "steps": t.steps,
                      "heartbeat_interval_s": self.cfg.worker.heartbeat_interval_s,
                      "server_timeout_s": self.cfg.worker.server_timeout_s, "rejoin": self.cfg.worker.rejoin},
            "model": {"kind": m.kind, "fit_intercept": m.fit_intercept, "classes": self.layout.extra.get("classes", 0)},
        }

    def _checksum(self, shard: int) -> int:
        if shard not in self.checksums:
            off, size = self.layout.shards[shard]
            self.checksums[shard] = data.checksum(self.block.X[off:off + size], self.block.y[off:off + size])
        return self.checksums[shard]

    def _peer(self, h) -> Peer:
        """The live incarnation named by a request's (wid, inc); anything else is refused (and counted)."""
        p = self.peers.get(h["wid"])
        if p is None:
            raise ProtocolError(f"worker {h['wid']} has not said hello to this server", "unknown_worker")
        if p.quarantined:
            raise ProtocolError(f"worker {h['wid']} is quarantined (it pushed non-finite gradients)", "quarantined")
        if p.inc != h["inc"]:
            self.stats.stale_pushes += h["op"] == Op.PUSH.value
            raise ProtocolError(f"worker {h['wid']} incarnation {h['inc']} is stale (current: {p.inc})",
                                "stale_incarnation")
        if not p.alive:
            self.stats.stale_pushes += h["op"] == Op.PUSH.value
            raise ProtocolError(f"worker {h['wid']} incarnation {h['inc']} was declared dead", "dead")
        if p.finished:
            raise ProtocolError(f"worker {h['wid']} has finished", "finished")
        return p

    @staticmethod
    def _touch(p: Peer, ident: bytes) -> None:
        """A valid request: its connection is where replies go now, and it counts as a sign of life."""
        p.ident, p.last_seen_s = ident, time.monotonic()

    def on_pull(self, ident, h, arrays):
        p = self._peer(h)
        try:
            self.gate.check_pull(p.wid, h["clock"])
        except ValueError as e:
            raise ProtocolError(f"pull: {e}", "bad_clock") from None
        self._touch(p, ident)
        self.pull(p, h["clock"], h.get("rid"))

    def on_push(self, ident, h, arrays):
        if h["sid"] != self.server_id:
            # computed against theta from another server process (one that died): never applied
            self.stats.stale_pushes += 1
            raise ProtocolError(f"push for server {h['sid']}, but this is server {self.server_id}; say hello again",
                                "stale_server")
        p = self._peer(h)
        rid = h.get("rid")
        seq = h["seq"]
        if seq <= p.seq:
            self.stats.duplicates += 1
            self.reply(ident, {"op": Op.ACK.value, "applied": False, "reason": "duplicate"}, rid=rid)
            return
        if arrays:
            grad = arrays[0]
        elif p.shm:
            grad = self.slots[p.wid].array  # it wrote its gradient there before sending this push
        else:
            raise ProtocolError(f"push: no gradient frame, and worker {p.wid} has no shared-memory slot", "bad_frames")
        if grad.dtype != self.theta.dtype or grad.shape != self.theta.shape:
            raise ProtocolError(f"push: gradient {grad.dtype.str} {list(grad.shape)} does not match theta "
                                f"{self.theta.dtype.str} {list(self.theta.shape)}", "bad_shape")
        if p.inflight is None or h["count"] != p.inflight[3]:
            raise ProtocolError(f"push: count {h['count']} is not the size of the batch served "
                                f"({p.inflight[3] if p.inflight else 'none'})", "bad_field")
        if not 0 <= h["version"] <= self.version:
            raise ProtocolError(f"push: theta version {h['version']} was never served (now {self.version})",
                                "bad_field")
        for key in ("loss", "compute_s", "request_s"):
            if not math.isfinite(h[key]) or (key != "loss" and not 0 <= h[key] < 1e6):
                raise ProtocolError(f"push: {key} = {h[key]!r} is not a plausible number", "bad_field")
        self._touch(p, ident)
        finite = bool(np.isfinite(grad, out=self.finite_buf).all())  # into a reused buffer: no allocation
        clock = h["clock"]
        if self.stopping:  # the run is ending: nothing more is applied, the worker is told to leave
            p.seq = seq
            self._finish_peer(p, rid, self.stopping)
            return
        try:
            decision = self.gate.push(p.wid, clock)
        except ValueError as e:
            raise ProtocolError(f"push: {e}", "bad_clock") from None
        p.seq = seq
        p.clock = clock + 1
        batch, p.inflight = p.inflight, None
        if not finite:
            # counted as this worker's (missing) part of the step: theta never sees it; a BSP step goes on with
            # the others' gradients
            self._count_rejected("nonfinite")
            p.bad_streak += 1
            log.warning("worker %d pushed a gradient with NaN or Inf at clock %d; rejected (%d in a row)", p.wid,
                        clock, p.bad_streak)
            if decision == COMPLETE:
                self._apply_step()
            if p.bad_streak >= self.cfg.server.max_bad_pushes:
                self._quarantine(p, rid)
                return
        else:
            p.bad_streak = 0
        applied = decision != LATE and finite
        if applied:
            record = (p, batch, h["count"], h["loss"], h["compute_s"], h["request_s"],
                      self.gate.staleness_of(p.wid, clock), self.version - h["version"])
            grad = self._clip(grad)
            if decision == APPLY:
                # each gradient counts 1/N, so N pushes move theta as far as one BSP step (exactly so for SGD)
                self._update(grad, self.step, scale=1.0 / max(1, len(self.gate.members)))
                self.applied_records.append(record)
            else:
                # its rows count as visited, and it in the statistics, once the step it belongs to is applied
                self.acc += grad
                self.acc_n += 1
                self.step_records.append(record)
                if decision == COMPLETE:
                    self._apply_step()
        # answer first: the counting below need not delay the worker
        if h["pull"]:
            self.pull(p, clock + 1, rid)
        else:
            reason = "" if applied else ("late" if finite else "nonfinite")
            self.reply(ident, {"op": Op.ACK.value, "applied": applied, "reason": reason}, rid=rid)
        self.release_parked()
        p.pushes += 1
        now = time.monotonic()
        if not p.rate_marks or now - p.rate_marks[-1][0] >= RATE_MARK_S:
            p.rate_marks.append((now, p.pushes))
        if not applied and finite:
            self.stats.dropped[p.wid] = self.stats.dropped.get(p.wid, 0) + 1

    def on_heartbeat(self, ident, h, arrays):
        p = self.peers.get(h["wid"])
        live = p is not None and p.inc == h["inc"] and p.alive
        if live:
            p.last_seen_s = time.monotonic()
        # `alive: false` tells a worker that was paused past the timeout that it was declared dead, even while it
        # waits for a reply that will never come
        # `waiting`: the server holds a pull of this worker. A worker waiting for a reply while the server holds
        # nothing of it knows that its request or the reply was lost (a reconnect drops them) and starts over.
        self.reply(ident, {"op": Op.HEARTBEAT.value, "server_id": self.server_id, "step": self.step, "alive": live,
                           "waiting": live and h["wid"] in self.parked}, rid=h.get("rid"))

    def on_bye(self, ident, h, arrays):
        p = self._peer(h)
        log.info("worker %d (pid %d on %s) left at clock %d", p.wid, p.pid, p.host, p.clock)
        self._remove(p)
        self.reply(ident, {"op": Op.BYE.value}, rid=h.get("rid"))

    def on_status(self, ident, h, arrays):
        self.reply(ident, {"op": Op.STATUS.value, "state": self.status()}, rid=h.get("rid"))

    # ------------------------------------------------------------------ pulls and batches
    @property
    def step(self) -> int:
        """Steps done: BSP steps applied; under SSP/ASP, gradients applied / workers."""
        if self.gate.mode == "bsp":
            return self.gate.step
        return self.stats.applied // max(1, self.n_expected)

    def pull(self, p: Peer, clock: int, rid) -> None:
        if self.stopping:
            self._finish_peer(p, rid, self.stopping)
        elif self.max_steps is not None and clock >= self.max_steps and self.gate.mode == "bsp":
            self._finish_peer(p, rid, "steps")
        elif self.gate.may_serve(p.wid, clock):
            self.serve(p, clock, rid)
        else:
            self.parked[p.wid] = (clock, rid)
            p.parked_s = time.monotonic()

    def serve(self, p: Peer, clock: int, rid) -> None:
        serving = self.gate.members[p.wid].serving
        if p.inflight is not None and serving is not None:
            # asked again before pushing (its reply was lost, or the client repeats itself): the same batch and
            # clock again, so that no rows are handed out and skipped
            self.reply(p.ident, {"op": Op.THETA.value, "clock": serving, "version": self.version,
                                 "batch": p.inflight}, () if p.shm else (self.published(),), rid=rid)
            return
        batch = self.schedule.next_batch(p.wid, self.cfg.train.batch_size, self.cfg.train.epochs)
        if batch is None:
            if self.schedule.held_by(p.wid):
                # every shard it reads has had its epochs; the others finish their steps without it
                self._finish_peer(p, rid, "epochs")
                if self.schedule.all_done(self.cfg.train.epochs) and not any(q.inflight for q in self.live()):
                    self.stop_all("epochs")
            else:  # no lease (more workers than shards): it waits, out of the gate, until a shard frees up
                self.parked[p.wid] = (clock, rid)
                self._gate_leave(p.wid)
            return
        clock = self.gate.serve(p.wid, clock)
        p.clock, p.inflight = clock, batch
        if p.parked_s:
            self.stats.wait_s += time.monotonic() - p.parked_s
            p.parked_s = 0.0
        # a local worker copies theta from shared memory itself; the reply only says which clock and batch
        self.reply(p.ident, {"op": Op.THETA.value, "clock": clock, "version": self.version, "batch": batch},
                   () if p.shm else (self.published(),), rid=rid)

    def release_parked(self) -> None:
        """Answer every parked pull the gate now allows. Answering one can end a step or a worker and so call this
        again; each entry is re-read before use, so a nested call's work is never redone."""
        for wid in list(self.parked):
            entry = self.parked.get(wid)
            if entry is None:
                continue
            p = self.peers.get(wid)
            if p is None or not p.alive:
                del self.parked[wid]
            elif self.stopping or self.gate.may_serve(wid, entry[0]):
                del self.parked[wid]
                self.pull(p, *entry)

    def published(self) -> np.ndarray:
        """An immutable snapshot of theta for this version. Replies send it zero-copy, so theta itself may change
        while a send is still in flight without corrupting what the peer receives."""
        if self._published is None:
            self._published = self.theta.copy()
        return self._published

    # ------------------------------------------------------------------ updates
    def _record(self, p: Peer, batch, count: int, loss: float, compute_s: float, request_s: float, staleness: int,
                lag: int) -> None:
        """An applied gradient: its rows count as visited, it counts in the statistics and the training loss."""
        s = self.stats
        if batch is not None:
            self.schedule.commit(batch)
        s.staleness_hist[staleness] = s.staleness_hist.get(staleness, 0) + 1
        s.pushes[p.wid] = s.pushes.get(p.wid, 0) + 1
        if lag > s.version_lag_max:
            s.version_lag_max = lag
        s.samples += count
        s.compute_s += compute_s
        s.request_s += request_s
        p.samples += count
        p.last_staleness = staleness
        self.metrics.add_batch(loss, count)

    def _count_rejected(self, reason: str) -> None:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1

    def _clip(self, grad: np.ndarray) -> np.ndarray:
        limit = self.cfg.train.clip_norm
        if limit > 0:
            norm = float(np.linalg.norm(grad))
            if norm > limit:
                self.stats.clipped += 1
                return grad * (limit / norm)
        return grad

    def _update(self, grad: np.ndarray, step: int, scale: float = 1.0) -> None:
        """One optimizer update with the learning rate of `step` (0-based), after weighting and the L2 term. grad
        may be a read-only frame or a worker's slot: anything derived goes into preallocated buffers."""
        t, l2 = self.cfg.train, self.cfg.model.l2
        if scale != 1.0 or l2:
            np.multiply(grad, scale, out=self.work)
            grad = self.work
            if l2:
                r = self.l2_rows
                np.multiply(self.theta[:r], l2, out=self.work2[:r])
                grad[:r] += self.work2[:r]
        if self._lr_cache[0] != step:
            self._lr_cache = (step, optim.lr_at(step, t.lr, t.lr_schedule, self.max_steps or t.steps, t.lr_decay,
                                                t.lr_decay_every, t.lr_min))
        if self.theta_shm is not None:
            self.theta_shm.begin_write()
            try:
                self.opt.step(self.theta, grad, self._lr_cache[1])
            finally:  # never leave the sequence number odd: readers would wait for a write that never ends
                self.theta_shm.end_write(self.version + 1)
        else:
            self.opt.step(self.theta, grad, self._lr_cache[1])
        self.version += 1
        self._published = None
        if self.gate.mode != "bsp":
            self.stats.applied += 1
        self.updated = True
        if self.max_steps is not None and self.step >= self.max_steps:
            self.stop_all("steps")

    def _apply_step(self) -> None:
        """BSP: theta <- optimizer(mean of this step's gradients). The gate has already moved on to the next step.
        A step whose every gradient was rejected leaves theta as it was."""
        self.applied_records += self.step_records
        self.step_records = []
        if self.acc_n == 0:
            return
        self.acc /= self.acc_n
        self.stats.applied += self.acc_n
        self._update(self.acc, self.gate.step - 1)
        self.acc[...] = 0.0
        self.acc_n = 0

    def bookkeeping(self) -> None:
        """After updates, once the replies have gone out: the applied gradients' accounting, metrics line, plateau
        test, evaluation, checkpoint."""
        for r in self.applied_records:
            self._record(*r)
        self.applied_records.clear()
        if not self.updated:
            return
        self.updated = False
        step = self.step
        if self.metrics.due(step):
            self.metrics.log_train(step, self.elapsed_s(), self.stats.samples)
            if self.metrics.plateaued():
                self.stop_all("tol")
        every = self.cfg.train.eval_every
        if every and self.block.spec.n_test and step >= self.evaluated_step + every:
            self.evaluated_step = step - step % every
            self.evaluate(step)
        every = self.cfg.checkpoint.every_steps
        if every and step >= self.checkpointed_step + every:
            self.save_checkpoint()

    def evaluate(self, step: int) -> tuple[float, float] | None:
        if self.block.spec.n_test == 0:
            return None
        loss = self.model.loss(self.theta, self.block.X_test, self.block.y_test)
        metric = self.model.metric(self.theta, self.block.X_test, self.block.y_test)
        self.metrics.log_eval(step, self.elapsed_s(), loss, metric, self.model.metric_name)
        return loss, metric

    def elapsed_s(self) -> float:
        return self.elapsed_before_s + time.monotonic() - (self.started_s or self.t0)

    # ------------------------------------------------------------------ membership and stopping
    def live(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.alive and not p.finished]

    def _membership_changed(self) -> None:
        """Re-lease the shards over the live workers, and let into the gate exactly those with work to do: a
        member that lost its last lease and is not computing leaves it (it waits, parked, for a shard)."""
        live = self.live()
        self.schedule.rebalance([p.wid for p in live])
        for p in live:
            held = self.schedule.held_by(p.wid)
            member = self.gate.members.get(p.wid)
            if member is None and held:
                p.clock = self.gate.join(p.wid, self.saved_clocks.pop(p.wid, None))
            elif member is not None and not held and member.serving is None:
                self._gate_leave(p.wid)

    def stop_all(self, reason: str) -> None:
        """End the run: every worker is told to stop at its next request; waiting ones are told now."""
        if self.stopping:
            return
        self.stopping = reason
        log.info("stopping: %s", reason)
        self.release_parked()
        self._check_done()

    def _quarantine(self, p: Peer, rid) -> None:
        p.quarantined = True
        self.stats.quarantined.append(p.wid)
        log.error("worker %d quarantined: %d non-finite gradients in a row (pid %d on %s, clock %d)", p.wid,
                  p.bad_streak, p.pid, p.host, p.clock)
        self.reply(p.ident, {"op": Op.ERROR.value, "code": "quarantined",
                             "reason": f"worker {p.wid} pushed {p.bad_streak} non-finite gradients in a row"}, rid=rid)
        self._remove(p)

    def _finish_peer(self, p: Peer, rid, reason: str) -> None:
        p.finished = True
        self.reply(p.ident, {"op": Op.STOP.value, "reason": reason}, rid=rid)
        self._leave(p)

    def _remove(self, p: Peer) -> None:
        p.alive = False
        self._leave(p)

    def _gate_leave(self, wid: int) -> None:
        """Take a worker out of the gate; if that completes the BSP step, apply it and answer who was waiting."""
        if self.gate.leave(wid) and not self.stopping:
            self._apply_step()
            self.release_parked()

    def _leave(self, p: Peer) -> None:
        self.parked.pop(p.wid, None)
        if p.inflight is not None:  # its batch was never pushed: hand it out again
            self.schedule.give_back(p.inflight)
            p.inflight = None
        self._gate_leave(p.wid)
        self._membership_changed()
        self.release_parked()
        self._check_done()

    def _check_done(self) -> None:
        if self.stopping and not self.live() and not self.done:
            self.done = True

    def check_liveness(self, now: float) -> None:
        timeout = self.cfg.server.heartbeat_timeout_s
        for p in list(self.peers.values()):
            if p.alive and not p.finished and now - p.last_seen_s > timeout:
                self.stats.deaths += 1
                log.error("worker %d declared dead: pid %d on %s, clock %d, silent for %.1f s (timeout %g s)",
                          p.wid, p.pid, p.host, p.clock, now - p.last_seen_s, timeout)
                self._remove(p)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> str:
        """θ, optimizer state, clocks, shard cursors (with the batches in flight handed back), incarnations, counters,
        config and protocol version, written atomically with a checksum (psrv/checkpoint.py)."""
        self.checkpointed_step, self.checkpointed_version = self.step, self.version
        shards = Schedule([c.size for c in self.schedule.cursors])
        shards.load_state(self.schedule.state())
        for p in self.live():
            if p.inflight is not None:  # a restart re-serves what was in flight
                shards.give_back(p.inflight)
        for r in self.step_records:     # ...and the rows of a BSP step not applied yet
            if r[1] is not None:
                shards.give_back(r[1])
        opt = self.opt.state_dict()
        state = {
            "protocol": protocol.VERSION, "config": self.cfg.to_dict(), "explicit": sorted(self.cfg.explicit),
            "step": self.step, "version": self.version, "gate_step": self.gate.step,
            "clocks": [[w, m.pushed] for w, m in self.gate.members.items()],
            "incarnations": [[w, i] for w, i in self.incarnations.items()],
            "shards": shards.state(), "stats": self.stats.to_state(), "elapsed_s": self.elapsed_s(),
            "optimizer": {"name": opt["name"], "steps": opt["steps"]},
            "data": {"rows": self.block.spec.n_train, "cols": self.block.spec.d,
                     "shards": [s for _, s in self.layout.shards]},
            "server_restarts": self.server_restarts,
        }
        arrays = {"theta": self.theta, **{f"opt.{k}": v for k, v in opt["arrays"].items()}}
        path = checkpoint.save(self.ckpt_dir, self.step, state, arrays, keep=self.cfg.checkpoint.keep)
        log.info("checkpoint at step %d: %s", self.step, path)
        return path

    def _restore(self, source: str) -> None:
        found = checkpoint.load_latest(source)
        if found is None:
            raise RunError("server", f"no valid checkpoint in {source}")
        state, arrays, path = found
        if state["protocol"] != protocol.VERSION:
            raise RunError("server", f"{path} was written by protocol v{state['protocol']}; this is "
                                     f"v{protocol.VERSION}")
        here = {"rows": self.block.spec.n_train, "cols": self.block.spec.d,
                "shards": [s for _, s in self.layout.shards]}
        if state["data"] != here:
            raise RunError("server", f"{path} is for data {state['data']}; this run's data is {here}")
        theta = arrays["theta"]
        if theta.shape != self.theta.shape or theta.dtype != self.theta.dtype:
            raise RunError("server", f"{path} holds theta {theta.dtype} {theta.shape}; this model needs "
                                     f"{self.theta.dtype} {self.theta.shape}")
        if self.theta_shm is not None:
            self.theta_shm.begin_write()
        self.theta[...] = theta
        if self.theta_shm is not None:
            self.theta_shm.end_write(state["version"])  # local workers read the restored version, not 0
        self.opt.load_state_dict({**state["optimizer"],
                                  "arrays": {k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}})
        self.version, self.gate.step = state["version"], state["gate_step"]
        self.saved_clocks = {w: c for w, c in state["clocks"]}
        self.n_start = max(1, len(self.saved_clocks))  # the workers training at the checkpoint, not train.workers
        self.incarnations = {w: i for w, i in state["incarnations"]}
        self.schedule.load_state(state["shards"])
        self.stats = Stats.from_state(state["stats"])
        self.elapsed_before_s = state["elapsed_s"]
        self.checkpointed_step = self.evaluated_step = state["step"]
        self.checkpointed_version = state["version"]
        self.resumed_from = path
        log.warning("resumed from %s at step %d", path, state["step"])

    # ------------------------------------------------------------------ outputs
    def report_progress(self, now: float) -> None:
        self.last_progress_s = now
        elapsed = self.elapsed_s()
        self.reporter.send("progress", step=self.step, steps=self.max_steps or 0, loss=self.metrics.last_loss,
                           elapsed_s=elapsed, samples_per_s=self.stats.samples / elapsed if elapsed > 0 else 0.0)

    def status(self) -> dict:
        now = time.monotonic()
        workers = []
        for p in self.peers.values():
            marks = [m for m in p.rate_marks if now - m[0] <= RATE_WINDOW_S] or [(p.joined_s, 0)]
            rate = (p.pushes - marks[0][1]) / max(now - marks[0][0], 1e-3) if p.alive else 0.0
            workers.append({"wid": p.wid, "inc": p.inc, "pid": p.pid, "host": p.host, "clock": p.clock,
                            "last_seen_s": round(now - p.last_seen_s, 3), "alive": p.alive, "finished": p.finished,
                            "pushes": p.pushes, "push_rate": round(rate, 2),
                            "staleness": p.last_staleness, "shards": self.schedule.held_by(p.wid) if p.alive else []})
        return {
            "server_id": self.server_id, "address": self.address, "pid": os.getpid(), "step": self.step,
            "steps": self.max_steps or 0,
            "theta_version": self.version, "consistency": self.gate.mode, "schedule": self.cfg.train.schedule,
            "loss": self.metrics.last_loss, "started": self.gate.open, "stopping": self.stopping,
            "elapsed_s": round(self.elapsed_s(), 3), "workers": workers, "deaths": self.stats.deaths,
            "bad_messages": self.stats.bad_messages, "rejected": self.stats.rejected,
            "quarantined": self.stats.quarantined,
            "worker_restarts": self.stats.worker_restarts, "server_restarts": self.server_restarts,
            "rows_visited": [[e, k] for e, k in self.schedule.rows_visited().items()],
        }

    def finish(self) -> dict:
        self.bookkeeping()
        wall = self.elapsed_s()
        step = self.step
        self.metrics.log_train(step, wall, self.stats.samples)
        X, y = self.block.X, self.block.y
        final_loss = self.model.loss(self.theta, X, y)
        train_metric = self.model.metric(self.theta, X, y)
        self.metrics.log_final(step, wall, final_loss, train_metric, self.model.metric_name)
        test = self.evaluate(step)
        self.metrics.close()
        if self.checkpointed_version != self.version:
            self.save_checkpoint()
        if isinstance(self.model, models._Glm):
            theta_out = data.unscale(self.theta, self.block.mean, self.block.scale, self.cfg.model.fit_intercept)
        else:
            theta_out = self.theta.astype(np.float64)
        s = self.stats
        summary = {
            "steps": step, "wall_s": wall, "samples_per_s": s.samples / wall if wall > 0 else None,
            "final_loss": final_loss, "train_metric": train_metric, "metric": self.model.metric_name,
            "test_loss": test[0] if test else None, "test_metric": test[1] if test else None,
            "stopped_by": self.stopping, "workers": self.n_expected, "consistency": self.gate.mode,
            "staleness": self.cfg.train.staleness if self.gate.mode == "ssp" else None,
            "backup_workers": self.cfg.train.backup_workers, "schedule": self.cfg.train.schedule,
            "partition": self.cfg.data.partition, "shards": len(self.layout.shards),
            "rows": self.block.spec.n_train, "test_rows": self.block.spec.n_test, "cols": self.block.spec.d,
            "model": self.cfg.model.kind, "optimizer": self.cfg.train.optimizer,
            "batch_size": self.cfg.train.batch_size, "lr": self.cfg.train.lr, "theta_version": self.version,
            "gradients_applied": s.applied, "samples": s.samples, "rejected": s.rejected, "clipped": s.clipped,
            "duplicates": s.duplicates, "stale_pushes": s.stale_pushes, "bad_messages": s.bad_messages,
            "bad_messages_by_peer": {k.hex(): v for k, v in sorted(self.bad_by_peer.items(),
                                                                    key=lambda kv: -kv[1])[:10]},
            "quarantined": s.quarantined,
            "worker_deaths": s.deaths, "worker_restarts": s.worker_restarts, "server_restarts": self.server_restarts,
            "resumed_from": self.resumed_from,
            "staleness_max": max(s.staleness_hist, default=0),
            "staleness_hist": {str(k): v for k, v in sorted(s.staleness_hist.items())},
            "version_lag_max": s.version_lag_max,
            "dropped_grads": {str(k): v for k, v in sorted(s.dropped.items())},
            "pushes_applied": {str(k): v for k, v in sorted(s.pushes.items())},
            "time_per_push_ms": _time_split(s),
            "rows_visited": {str(k): v for k, v in self.schedule.rows_visited().items()},
            "rows_dropped": self.layout.rows_dropped, "address": self.address,
        }
        np.save(os.path.join(self.out_dir, "theta.npy"), theta_out)
        _write_json(os.path.join(self.out_dir, "summary.json"), summary)
        if self.cfg.output.plot:
            plot.loss_curves(os.path.join(self.out_dir, "loss.png"), self.metrics.train, self.metrics.test,
                             f"{self.cfg.model.kind}, {self.n_expected} workers, {self.gate.mode}")
        log.info("done (%s): %d steps in %.2f s, final loss %.6g", self.stopping, step, wall, final_loss)
        return summary

    def close(self) -> None:
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        self.metrics.close()
        self.block.close()
        for seg in [self.theta_shm, *self.slots.values()]:
            if seg is not None:
                seg.close()  # the creator unlinks


def _time_split(s: Stats) -> dict:
    """Where a worker's step goes, per applied push: computing the gradient, waiting at the server for the barrier
    or the staleness bound, and the rest of the round trip (communication and server work)."""
    n = sum(s.pushes.values())
    if not n:
        return {}
    return {"compute": 1000 * s.compute_s / n, "wait": 1000 * s.wait_s / n,
            "communication": 1000 * max(s.request_s - s.wait_s, 0.0) / n}


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def main(spec: ServerSpec, conn, parent_pid: int, core, log_level: int):
    """Entry point of the server process ("psrv.server:main", started with spawn by the launcher)."""
    proc.child_setup("server", parent_pid, core, log_level)
    reporter = proc.Reporter(conn)
    server = None
    try:
        cfg = config_mod.Config.from_dict(spec.cfg, frozenset(spec.explicit))
        server = Server(cfg, spec.layout, spec.out_dir, reporter, bind=spec.bind, resume=spec.resume,
                        server_restarts=spec.server_restarts, alone=spec.alone, shm_prefix=spec.shm_prefix)
        # from now on SIGTERM ends the run like a stopping criterion: theta, summary and checkpoint are written
        signal.signal(signal.SIGTERM, lambda signum, frame: setattr(server, "terminate", True))
        with proc.profiled("server"):  # the serving loop only: not start-up, not the final outputs
            server.loop()
        reporter.send("done", summary=server.finish())
    except RunError as e:
        log.error("%s", e)
        reporter.send("error", process=e.process, message=e.cause)
        sys.exit(1)
    except Exception as e:
        log.error("server failed:\n%s", traceback.format_exc())
        reporter.send("error", process="server", message=f"{type(e).__name__}: {e}")
        sys.exit(1)
    finally:
        if server is not None:
            server.close()
