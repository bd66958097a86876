"""The parameter server's shell: one ROUTER socket polled with a timeout, and the I/O the coordinator asks for.

It decodes each message into an event, hands it to the coordinator (psrv/coordinator.py, where every decision
is made), and carries out the instructions that come back in order: replies, updates of the store, metrics lines,
evaluations, checkpoints. It owns what touches the outside: the socket, shared memory (theta under a seqlock,
gradient slots), files, and the launcher's pipe. A bad message gets an error reply; the loop keeps serving.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
import traceback
import uuid

import numpy as np

from . import checkpoint, data, group, identity, mailbox, models, plot, protocol, proc, shmarray, sparse_data
from . import transport
from . import config as config_mod
from . import events as ev
from .blocks import DataBlock
from . import report
from .coordinator import Coordinator
from .keyrange import Ranges
from .rangeserver import RangeGone, RangeLinks, make_store, range_dir, rates
from .errors import ConfigError, ProtocolError, RunError
from .metrics import Metrics
from .outputs import num as _num, write_json as _write_json, writing as _writing
from .protocol import Op, OpStr
from .shmarray import SeqlockArray, SharedArray
from .sparse_model import SparseLogistic
from .spec import RANGES_FILE, ServerSpec
from .store import workers_penalize

log = logging.getLogger(__name__)

POLL_MS = 50
DRAIN_MAX = 256          # messages handled per wake-up before the timers get a turn
PROGRESS_INTERVAL_S = 0.5
TERMINATE_GRACE_S = 1.0  # after SIGTERM: how long workers computing a step get to push it and hear "stop"


class Server:
    def __init__(self, cfg: config_mod.Config, layout: dict, out_dir: str, reporter: proc.Reporter | None = None,
                 bind: str | None = None, resume: str | None = None, server_restarts: int = 0,
                 alone: bool = False, shm_prefix: str = "", own_core: bool = False, cuts=(), ranges=(),
                 range_restarts: int = 0):
        self.cfg, self.out_dir, self.reporter = cfg, out_dir, reporter or proc.Reporter(None)
        self.server_restarts = server_restarts
        self.layout = data.Layout.from_dict(layout)
        # a sparse model's rows are CSR (psrv/sparse_data.py): its theta is read and pushed by keys
        self.sparse = sparse_data.is_sparse_layout(layout)
        self.block = sparse_data.SparseData(layout) if self.sparse else DataBlock.attach(self.layout.block)
        t = cfg.train
        self.model = SparseLogistic(self.block.spec.d) if self.sparse else models.make(
            cfg.model.kind, self.block.spec.d, cfg.model.fit_intercept, self.block.spec.dtype,
            self.layout.extra.get("classes", 0))
        self.server_id = uuid.uuid4().hex[:12]
        theta0 = self.model.init_theta()
        # local workers read theta from shared memory (a seqlock) and write gradients into slots there; theta then
        # lives in that segment and is updated in place. Workers elsewhere get it over ZeroMQ.
        self.shm_prefix = shm_prefix if cfg.worker.shm and shmarray.ORDERED_STORES else ""
        self.theta_shm = None
        self.slots: dict[int, SharedArray] = {}
        # requests of local workers through shared memory (psrv/mailbox.py): the server polls for them only on a
        # core of its own (polling on a core a worker needs would slow that worker more than it saves); otherwise,
        # or once requests pause, it sleeps and a worker that posts rings its bell
        self.spin_s = cfg.server.spin_s if self.shm_prefix and own_core else 0.0
        self.bell = mailbox.Bell.open(f"{self.shm_prefix}bell_{self.server_id}") if self.shm_prefix else None
        self.mailboxes: dict[int, mailbox.Mailbox] = {}   # wid -> its current incarnation's mailbox
        self.by_token: dict[bytes, mailbox.Mailbox] = {}
        self.mailbox_requests = 0  # requests that came through a mailbox rather than the socket
        self.rings = 0             # of those, the ones that woke this server from its poll (its bell rang)
        if self.shm_prefix:
            self.theta_shm = SeqlockArray.create(f"{self.shm_prefix}theta_{self.server_id}", theta0.shape,
                                                 theta0.dtype)
            theta = self.theta_shm.array
            theta[...] = theta0
        else:
            theta = theta0
        self.store = make_store(cfg, theta, self.model.l2_rows, self.theta_shm)
        self.rates_of = rates(cfg)        # (first step, count) -> the schedule's rates of those steps
        self._rates_cache: tuple = (None, [])
        # train.group_steps > 1: where the launcher's workers average each sub-step's gradients (psrv/group.py)
        # (and, for an optimizer with state, where the members take it from and leave theirs)
        self.group = group.Group.create(f"{self.shm_prefix}group_{self.server_id}", t.workers, theta0.shape,
                                        theta0.dtype, t.group_steps, len(self.store.opt.dense_names)) \
            if t.group_steps > 1 and self.shm_prefix and t.workers > 0 else None
        self.coord = Coordinator(cfg, [s for _, s in self.layout.shards], self.store, self.server_id,
                                 time.monotonic(), alone=alone, shm=bool(self.shm_prefix),
                                 has_test=self.block.spec.n_test > 0)
        self.checksums: dict[int, int] = {}      # shard -> CRC-32 of its rows, for workers that load their own
        # the job a checkpoint belongs to (psrv/identity.py): every shard's checksum now, while nothing waits on us
        spec = self.block.spec
        self.identity = identity.job_identity(cfg, spec.n_train, spec.n_test, spec.d,
                                              [s for _, s in self.layout.shards],
                                              identity.data_checksum([self._checksum(s) for s in
                                                                      range(len(self.layout.shards))]))
        self.resumed_from: str | None = None
        self.ckpt_dir = cfg.checkpoint.dir or os.path.join(out_dir, "checkpoints")
        os.makedirs(out_dir, exist_ok=True)
        checkpoint.clean_temporaries(self.ckpt_dir)
        if resume:
            try:
                self._restore(resume)
            except BaseException:
                # a checkpoint of another job, say: the process exits with that error alone, not with the noise
                # of segments garbage-collected while numpy views of them still exist
                self._release_shared()
                raise
        else:
            # a fresh run in a used folder: an old run's checkpoints (its ranges' too) must never be taken for this
            # run's
            old = [p for d in [self.ckpt_dir, *(range_dir(self.ckpt_dir, s) for s in range(1, len(ranges) + 1))]
                   for p in checkpoint.checkpoints(d)]
            for path in old:
                os.remove(path)
            if old:
                log.warning("removed the checkpoints of an earlier run in %s", self.ckpt_dir)
        self._publish_state()
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        with _writing("the metrics", self.metrics_path):
            self.metrics = Metrics(self.metrics_path, t.tol, t.tol_window, append=self.resumed_from is not None)
        self.last_progress_s = 0.0
        self.terminate = False                   # SIGTERM: end the run now, keeping its results
        self.rewind = False                      # SIGUSR1 (server.shards > 1): a range server was restarted
        self.range_restarts = range_restarts
        # per op, the event its decoded header becomes (a status request is answered here, never an event)
        self.events = {OpStr.PUSH: self._push_event, OpStr.PULL: _pull_event, OpStr.HEARTBEAT: _heartbeat_event,
                       OpStr.HELLO: _hello_event, OpStr.BYE: _bye_event, OpStr.GET: self._get}
        self.do = {ev.Send: self._send, ev.Theta: self._theta, ev.Welcome: self._welcome,
                   ev.Accumulate: lambda i: self.store.push(i.grad, i.keys, i.state),
                   ev.ApplyStep: self._apply_here,
                   ev.Update: lambda i: self.store.update(i.grad, i.step, i.version, i.scale, i.keys),
                   ev.Log: self._log, ev.Evaluate: lambda i: self.evaluate(i.step),
                   ev.Checkpoint: lambda i: self.save_checkpoint(), ev.Fail: self._fail, ev.Finish: lambda i: None}
        self.ctx = transport.context()
        # CURVE: the authenticator refuses unknown keys during the handshake, before any message reaches us
        self.auth = transport.authenticator(self.ctx, cfg.server.keys) if cfg.server.keys else None
        self.sock, self.address = transport.router(
            self.ctx, bind or cfg.server.bind,
            max_frame_bytes=max(theta.nbytes, protocol.HEADER_MAX_BYTES) + 1024, keys=cfg.server.keys)
        # server.shards > 1: the range servers the launcher started, which apply what this server orders
        self.links = RangeLinks(self.ctx, Ranges(cuts), ranges, cfg.worker.server_timeout_s, self.server_id) \
            if ranges else None
        self.measuring: dict[int, tuple] = {}   # wid -> (ident, header, arrays) of its push waiting for measurements
        # pushes name their rows: a sparse model's, and a dense one's range 0 slice when S > 1 (its slot is unused)
        self.keyed = self.sparse or self.links is not None
        if self.links is not None:
            self.links.attach(theta.shape[0])
            if self.resumed_from is not None:   # every range goes back to the step this server went back to
                self.links.load(self.resumed_step, os.path.dirname(self.resumed_from))
            self.links.sync(self.store.version, time.monotonic())
            self.do.update({ev.Accumulate: self._accumulate, ev.ApplyStep: self._apply_step, ev.Update: self._update})
        if not protocol.is_local(self.address) and not cfg.server.keys:
            log.warning("server.insecure: listening on %s WITHOUT authentication: anyone who can reach this "
                        "address can send gradients and read theta", self.address)

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        """Serve until the run is over, then write the outputs; returns the summary."""
        self.loop()
        return self.finish()

    def loop(self) -> None:
        self.reporter.send("ready", address=self.address, pid=os.getpid(), resumed_from=self.resumed_from)
        log.info("listening on %s; waiting for %d worker(s)", self.address, self.coord.n_expected)
        # a bell is a plain socket: ZeroMQ's poll watches its file descriptor beside the ZeroMQ sockets
        poller = transport.poller(self.sock, *(self.links.socks if self.links is not None else ()),
                                  *((self.bell,) if self.bell is not None else ()))
        terminated_s = None
        last_request_s = last_tick_s = 0.0
        awake = False
        while not self.coord.done and not self.rewind:
            # polling: the mailboxes, then the socket without waiting, for spin_s after the last request; then
            # sleeping in the socket's poll, with the mailboxes marked so that workers send over ZeroMQ instead
            now = time.monotonic()
            spinning = bool(self.mailboxes) and now - last_request_s < self.spin_s
            if spinning != awake:
                awake = spinning
                for box in self.mailboxes.values():
                    box.set_awake(awake)
            handled = self._drain_mailboxes()  # also once after clearing AWAKE: a request posted just before
            if spinning or handled:
                if transport.readable(self.sock):
                    handled += self._drain_socket()
                elif not handled:
                    os.sched_yield()  # a worker that shares this core gets it
            elif poller.poll(POLL_MS):
                if self.bell is not None and self.bell.drain():
                    self.rings += 1
                    handled = self._drain_mailboxes()
                handled += self._drain_socket()
            if self.links is not None:
                handled += self._drain_links()
            now = time.monotonic()
            if handled:
                last_request_s = now
            elif spinning and now - last_tick_s < POLL_MS / 1000 and not self.terminate:
                continue  # the timers need no look after every empty poll
            last_tick_s = now
            if self.terminate and terminated_s is None:
                # every worker is told to stop at its next request (a waiting one at once), so none is left
                # waiting for a server that is gone; the outputs wait at most TERMINATE_GRACE_S for them
                terminated_s = now
                self.execute(self.coord.handle(ev.Stop("terminated"), now))
                continue
            if terminated_s is not None and now - terminated_s > TERMINATE_GRACE_S:
                self.execute(self.coord.handle(ev.Stop("terminated", at_once=True), now))
                break
            self.execute(self.coord.handle(ev.Tick(), now))
            if self.links is not None:
                self.links.sync(self.coord.version, now)
            if self.coord.started_s is not None and now - self.last_progress_s >= PROGRESS_INTERVAL_S:
                self.report_progress(now)

    def _drain_socket(self) -> int:
        n = 0
        # once the run is over nothing more is answered (docs/protocol.md, after stop)
        while n < DRAIN_MAX and not self.coord.done and transport.readable(self.sock):
            self.handle(transport.recv_now(self.sock))
            n += 1
        return n

    def _drain_links(self) -> int:
        """The range servers' measurements: a push whose slices every range has now measured is decided."""
        complete = self.links.receive()
        for wid, clock in complete:
            held = self.measuring.get(wid)
            if held is not None and held[1]["clock"] == clock and not self.coord.done:
                del self.measuring[wid]
                self._dispatch(*held, self._push_event, self.links.measurements(wid, clock))
        return len(complete)

    def _drain_mailboxes(self) -> int:
        n = 0
        for box in list(self.mailboxes.values()):  # handling may replace a mailbox (a hello)
            req = box.request()
            if req is not None:
                self.handle([box.ident, req])
                n += 1
        if n:
            self.mailbox_requests += n
        return n

    def _out(self, frames: list, ident: bytes) -> None:
        """A reply: into the mailbox the request came from, else over the socket (never blocking)."""
        box = self.by_token.get(ident)
        if box is None:
            transport.send(self.sock, frames, ident, block=False)
        elif not box.answer(frames):
            # dropped, the worker would time out and register again, forever: the run fails, saying why
            raise RunError("server", f"a reply of {sum(len(f) for f in frames)} bytes does not fit a worker's "
                                     f"mailbox ({mailbox.AREA_BYTES} bytes)")
        elif self.bell is not None and box.worker_waiting():   # asleep on its bell, not polling
            self.bell.ring(mailbox.bell_name(box.name))

    def handle(self, frames: list) -> None:
        """One message: decode it into an event for the coordinator (a status request is answered here)."""
        if len(frames) < 2:  # a ROUTER always prefixes the peer's id; an empty message has nothing to answer
            return
        ident = frames[0].bytes
        now = time.monotonic()
        try:
            h, arrays = protocol.decode(frames[1:], protocol.REQUESTS)
        except ProtocolError as e:
            self.execute(self.coord.handle(ev.Malformed(ident, e.code, str(e), getattr(e, "rid", None)), now))
            return
        make = self.events.get(h["op"])
        if make is None:  # status: a read, not a transition
            self._send(ev.Send(ident, {"op": Op.STATUS.value, "state": self.status(), **_rid(h.get("rid"))}))
            return
        measured = ()
        if self.links is not None and h["op"] == OpStr.PUSH and h["sid"] == self.server_id:
            # several servers: the push is judged whole, on every range server's measurement of its slice; it
            # waits here for those (a resent push replaces the one waiting)
            measured = self.links.measurements(h["wid"], h["clock"])
            if measured is None:
                self.measuring[h["wid"]] = (ident, h, arrays)
                return
        self._dispatch(ident, h, arrays, make, measured)

    def _dispatch(self, ident: bytes, h: dict, arrays: list, make, measured: tuple) -> None:
        now = time.monotonic()
        try:
            event = make(ident, h, arrays)
        except ProtocolError as e:  # the keys of a push or a get
            self.execute(self.coord.handle(ev.Malformed(ident, e.code, str(e), h.get("rid")), now))
            return
        if event is not None:
            if measured:
                event.ranges = measured
            self.execute(self.coord.handle(event, now))

    def _push_event(self, ident: bytes, h: dict, arrays: list) -> ev.Push:
        keys = self._push_keys(arrays)
        framed = bool(arrays)
        if framed:
            grad = arrays[-1]
        else:  # in the worker's slot
            slot = self.slots.get(h["wid"])
            grad = slot.array if slot is not None else None
        push = ev.Push(ident, h["wid"], h["inc"], h["sid"], h["seq"], h["clock"], h["version"], h["loss"], h["count"],
                       h["pull"], h["compute_s"], h["request_s"], grad, framed, keys, h.get("rid"))
        if self.group is not None and not framed and 0 <= h["wid"] < self.group.members:
            push.notes = self.group.read_notes(h["wid"])   # the coordinator checks them before it logs them
            if self.group.n_state:
                push.state = self.group.states[h["wid"]]
        return push

    def _get(self, ident: bytes, h: dict, arrays: list) -> None:
        """A read of some rows of theta, never held by the gate: answered here, no event for the coordinator."""
        self.coord.members.current(h["wid"], h["inc"])
        keys = self._check_keys(arrays[0])
        self._out(protocol.encode({"op": OpStr.VALUES, "version": self.store.version, **_rid(h.get("rid"))},
                                  (self.store.theta[keys],)), ident)   # a gather: a copy of this version

    def _check_keys(self, keys: np.ndarray) -> np.ndarray:
        """A decoded keys frame (sorted, distinct) whose keys are all rows of theta."""
        rows = self.store.theta.shape[0]
        if len(keys) and int(keys[-1]) >= rows:
            raise ProtocolError(f"key {int(keys[-1])} is not a row of theta (keys are 0 .. {rows - 1})", "bad_keys")
        if self.links is not None:   # this server holds range 0 only
            try:
                self.links.ranges.check(0, keys)
            except ValueError as e:
                raise ProtocolError(f"range 0: {e}", "bad_keys") from None
        return keys

    def _push_keys(self, arrays: list) -> np.ndarray | None:
        """The keys of a push: a sparse model's push carries a keys frame and a values frame, a dense model's one
        gradient frame (or none: the slot)."""
        if self.keyed and len(arrays) != 2:
            raise ProtocolError(f"push: a sparse model's push (or any push with server.shards > 1) carries 2 array "
                                f"frames (keys, values); got {len(arrays)}", "bad_frames")
        if not self.keyed and len(arrays) == 2:
            raise ProtocolError("push: a keys frame is only for a sparse model (model.kind = 'sparse_logistic') or "
                                "server.shards > 1", "bad_frames")
        return self._check_keys(arrays[0]) if self.keyed else None

    def execute(self, instructions: list) -> None:
        for i in instructions:
            self.do[type(i)](i)

    # ------------------------------------------------------------------ instructions
    def _send(self, i: ev.Send) -> None:
        self._out(protocol.encode(i.header), i.ident)

    def _theta(self, i: ev.Theta) -> None:
        # a local worker copies theta from shared memory itself; the reply only says which clock and batch
        header = {"op": OpStr.THETA, "clock": i.clock, "version": i.version, "batch": i.batch}
        if self.group is not None:   # the step's members and rates: the workers apply its sub-steps themselves
            header["group"] = self.coord.gate.step_members()
            header["lr"] = self._group_rates(i.first_step, i.step_budget)
            header["wait_s"] = self._group_timeout_s()
        if i.rid is not None:
            header["rid"] = i.rid
        # a sparse model's worker reads only its batch's rows (shared memory, or a get)
        self._out(protocol.encode(header, () if i.shm or self.keyed else (self.store.snapshot(),)), i.ident)

    def _group_rates(self, first: int, budget: int) -> list[float]:
        """Group steps: the learning rates of BSP steps first .. first + budget - 1, computed once for all the
        members of a step."""
        if self._rates_cache[0] != (first, budget):
            self._rates_cache = ((first, budget), self.rates_of(first, budget))
        return self._rates_cache[1]

    def _apply_here(self, i: ev.ApplyStep) -> None:
        self.store.apply_step(i.step, i.version, i.steps)
        self._publish_state()

    def _publish_state(self) -> None:
        """Group steps with an optimizer that has state: where the members start the next group step from."""
        if self.group is not None and self.group.n_state:
            self.group.publish(self.store.opt, self.store.version)

    # server.shards > 1: each update of range 0 is ordered to the other ranges too (psrv/rangeserver.py)
    def _accumulate(self, i: ev.Accumulate) -> None:
        self.store.push(i.grad, i.keys)
        self.links.accumulated(i.wid, i.clock, i.slices)

    def _apply_step(self, i: ev.ApplyStep) -> None:
        self.links.apply_step(i.step, i.version)
        self.store.apply_step(i.step, i.version)

    def _update(self, i: ev.Update) -> None:
        self.links.update(i.wid, i.clock, i.slices, i.step, i.version, i.scale)
        self.store.update(i.grad, i.step, i.version, i.scale, i.keys)

    def _penalties(self) -> dict:
        """What the workers apply at each of their steps under group steps and local SGD (the welcome's
        data.shm.group and train.local): model.l2 on theta's first l2_rows rows, and train.clip_norm."""
        return {"l2": self.cfg.model.l2, "l2_rows": self.model.l2_rows, "clip_norm": self.cfg.train.clip_norm}

    def _workers_clip(self) -> bool:
        """Group steps and local SGD: the workers clip their own gradients, which no push tells the server."""
        return self.cfg.train.clip_norm > 0 and workers_penalize(self.cfg.train)

    def _group_timeout_s(self) -> float:
        """How long a group member waits for the others before it leaves the group step: half as long as the server
        waits for a straggler now (server.progress_deadline_s, or 10 x the time a group step's batch is held, if
        longer: a member that is merely slow is waited for, as BSP waits for it), else as long as for a silent
        worker. Each theta reply says it anew."""
        s = self.cfg.server
        # half the deadline: a member that left at the deadline itself could push after the server had called it
        # a straggler for holding its batch while the first ones pushed (a healthy member, left behind)
        return 0.5 * self.coord.progress.deadline_s() if s.progress_deadline_s > 0 else s.heartbeat_timeout_s

    def theta_now(self) -> np.ndarray:
        """theta as it is now: with several servers, every range's rows at this version."""
        if self.links is None:
            return self.store.theta
        return self.links.compose(self.store.theta, self.store.version, lambda: self.rewind)

    def _welcome(self, i: ev.Welcome) -> None:
        p, t, m = i.peer, self.cfg.train, self.cfg.model
        spec = self.layout.to_dict()
        for k in ("columns", "fields", "impute_means", "classes"):
            del spec[k]  # as long as the data is wide (or as many as its classes); no worker needs them
        # what a worker that loads its own rows needs: the data config and a checksum of each shard it may read
        spec["config"] = dc = self.cfg.to_dict()["data"]
        if dc["source"] not in ("synthetic", data.ARRAYS, sparse_data.CRITEO):  # arrays: plan() tells such a worker why it cannot load them
            dc["source"] = os.path.abspath(dc["source"])  # a worker started elsewhere reads the same path
        if dc["test_source"]:
            dc["test_source"] = os.path.abspath(dc["test_source"])
        if dc["labels"]:
            dc["labels"] = os.path.abspath(dc["labels"])  # relative to the launcher's directory, like source
        spec["explicit"] = sorted(k for k in self.cfg.explicit if k.startswith("data."))
        if not p.local:
            spec["checksums"] = [[s, self._checksum(s)] for s in range(len(self.layout.shards))]
        # to load (or, locally, copy: data.worker_copy) before the first pull, which puts it in the run: the others
        # wait for it from then on
        spec["expected_shards"] = self.coord.expected_shards(p.wid)
        if self.links is not None:   # each range's keys go to its server; range 0's come here
            spec["ranges"] = {"cuts": [int(c) for c in self.links.ranges.cuts],
                              "addresses": [self.address, *self.links.addresses]}
        if p.shm and self.keyed:  # keyed reads of theta; pushes carry their keys and values as frames
            spec["shm"] = {"theta": self.theta_shm.name}
        elif p.shm:
            if p.wid not in self.slots:  # kept across incarnations of the same worker id
                self.slots[p.wid] = SharedArray.create(f"{self.shm_prefix}slot_{self.server_id}_{p.wid}",
                                                       self.store.theta.shape, self.store.theta.dtype)
            spec["shm"] = {"theta": self.theta_shm.name, "slot": self.slots[p.wid].name}
            if self.group is not None:
                # the members clip and penalize at each sub-step; the server's store does neither to their pushes
                spec["shm"]["group"] = {"name": self.group.name, "members": self.group.members,
                                        "timeout_s": self._group_timeout_s(), **self._penalties(),
                                        "max_grad_ratio": self.cfg.server.max_grad_ratio}
                if self.group.n_state:   # the rule the members apply, and its hyper-parameters
                    opt = self.store.opt
                    spec["shm"]["group"]["optimizer"] = {"name": opt.name,
                                                         **{k: getattr(t, k) for k in type(opt).hyper}}
            if self.spin_s > 0 or self.bell is not None:
                # one per incarnation: a reply to the previous one's last request (an error, by now) must never
                # reach the new one, whose request ids may start again from 1 (a restarted process)
                old = self.mailboxes.pop(p.wid, None)
                if old is not None:
                    del self.by_token[old.token]
                    old.close()
                box = mailbox.Mailbox.create(f"{self.shm_prefix}mail_{self.server_id}_{p.wid}_{p.inc}",
                                             mailbox.token(p.wid, p.inc))
                self.mailboxes[p.wid] = self.by_token[box.token] = box
                spec["shm"]["mailbox"] = box.name
                if self.bell is not None:
                    spec["shm"]["bell"] = self.bell.name
        theta = self.store.theta
        header = {
            "op": Op.WELCOME.value, "version": protocol.VERSION, "protocol": protocol.VERSION, "wid": p.wid,
            "inc": p.inc,
            "server_id": self.server_id, "theta_shape": list(theta.shape), "theta_dtype": theta.dtype.str,
            "data": spec,
            "train": {"workers": t.workers, "batch_size": t.batch_size, "seed": t.seed, "steps": t.steps, "local_steps": t.local_steps,
                      "group_steps": t.group_steps,
                      "lr": t.lr,
                      "heartbeat_interval_s": self.cfg.worker.heartbeat_interval_s,
                      "server_timeout_s": self.cfg.worker.server_timeout_s, "rejoin": self.cfg.worker.rejoin},
            "model": {"kind": m.kind, "fit_intercept": m.fit_intercept, "classes": self.layout.extra.get("classes", 0)},
            **_rid(i.rid),
        }
        if t.local_steps > 1:   # local SGD: the client clips and penalizes its own steps; the server does neither
            header["train"]["local"] = self._penalties()
        transport.send(self.sock, protocol.encode(header, [self.block.mean, self.block.scale]), i.ident, block=False)

    def _checksum(self, shard: int) -> int:
        if shard not in self.checksums and self.sparse:
            self.checksums[shard] = self.block.shard(*self.layout.shards[shard]).checksum()
        if shard not in self.checksums:
            off, size = self.layout.shards[shard]
            self.checksums[shard] = data.checksum(self.block.X[off:off + size], self.block.y[off:off + size])
        return self.checksums[shard]

    def _log(self, i: ev.Log) -> None:
        with _writing("the metrics", self.metrics_path):
            self.metrics.log_train(i.step, i.elapsed_s, i.samples, i.loss)
        if self.metrics.plateaued():
            self.execute(self.coord.handle(ev.Stop("tol"), time.monotonic()))

    def _fail(self, i: ev.Fail) -> None:
        raise RunError("server", i.message)

    def evaluate(self, step: int) -> tuple[float, float] | None:
        if self.block.spec.n_test == 0:
            return None
        try:
            theta = self.theta_now()
        except RangeGone as e:   # the run goes back to a checkpoint before this step, and evaluates it again
            log.warning("no evaluation at step %d: %s", step, e)
            return None
        X, y = self.block.X_test, self.block.y_test
        loss, metric = self.model.loss(theta, X, y), self.model.metric(theta, X, y)
        self._finite_loss(step, loss, "the held-out loss")
        with _writing("the metrics", self.metrics_path):
            self.metrics.log_eval(step, self.coord.elapsed_s(time.monotonic()), loss, _num(metric),
                                  self.model.metric_name)
        return loss, metric

    def _finite_loss(self, step: int, loss: float, what: str) -> None:
        """A loss over whole data that is not finite: theta diverged (the pushed losses did not show it first)."""
        if not math.isfinite(loss):
            raise RunError("server", f"loss diverged at step {step} with lr = {self.cfg.train.lr:g}; lower "
                                     f"train.lr ({what} is {loss})")

    # ------------------------------------------------------------------ checkpoints
    def _data_id(self) -> dict:
        return {"rows": self.block.spec.n_train, "cols": self.block.spec.d,
                "shards": [s for _, s in self.layout.shards]}

    def save_checkpoint(self) -> str:
        """The coordinator's state (clocks, cursors with the batches in flight handed back, incarnations,
        counters) and the store's (theta, optimizer state), with the config and protocol version, written
        atomically with a checksum (psrv/checkpoint.py)."""
        c = self.coord
        c.checkpointed_step, c.checkpointed_version = c.step, c.version
        meta, arrays = self.store.state()
        state = {"protocol": protocol.VERSION, "config": self.cfg.to_dict(), "explicit": sorted(self.cfg.explicit),
                 "step": c.step, "coordinator": c.state(time.monotonic()), "store": meta, "data": self._data_id(),
                 "identity": self.identity, "server_restarts": self.server_restarts}
        with _writing("a checkpoint in", self.ckpt_dir):
            path = checkpoint.save(self.ckpt_dir, c.step, state, arrays, keep=self.cfg.checkpoint.keep)
        log.info("checkpoint at step %d: %s", c.step, path)
        if self.links is not None:   # every range at the same step, once it has made this version
            self.links.save(c.step, c.version)
        return path

    def _restore(self, source: str) -> None:
        found = checkpoint.load_latest(source)
        if found is None:
            raise RunError("server", f"no valid checkpoint in {source}")
        state, arrays, path = found
        if state["protocol"] != protocol.VERSION:
            raise RunError("server", f"{path} was written by protocol v{state['protocol']}; this is "
                                     f"v{protocol.VERSION}")
        saved = state.get("identity")
        if saved is None:
            log.warning("%s records no job identity (an older psrv wrote it): resuming without checking that it is "
                        "this job", path)
        if state["data"] != self._data_id():
            old, now = state["data"], self._data_id()
            key = "data.shards" if (old["rows"], old["cols"]) == (now["rows"], now["cols"]) else "data.shape"
            raise identity.ResumeMismatch(path, [(key, old, now)], forceable=False)
        forced = identity.check(path, saved, self.identity, self.cfg.checkpoint.resume_force)
        if forced:
            log.warning("resuming %s as another job (checkpoint.resume_force): %s", path,
                        "; ".join(f"{k} was {a!r}, now {b!r}" for k, a, b in forced))
        same_optimizer = state["store"]["optimizer"]["name"] == self.store.opt.name
        try:
            self.store.load(state["store"], arrays, optimizer=same_optimizer)
        except ValueError as e:
            raise identity.ResumeMismatch(path, [("theta", str(e), "")], forceable=False) from None
        self.coord.restore(state["coordinator"])
        self.resumed_from = path
        self.resumed_step = state["step"]
        log.warning("resumed from %s at step %d", path, state["step"])

    # ------------------------------------------------------------------ outputs
    def report_progress(self, now: float) -> None:
        self.last_progress_s = now
        c = self.coord
        elapsed = c.elapsed_s(now)
        self.reporter.send("progress", step=c.step, steps=c.max_steps or 0, loss=_num(c.last_loss), elapsed_s=elapsed,
                           samples_per_s=c.stats.samples / elapsed if elapsed > 0 else 0.0,
                           epochs_read=c.schedule.epochs_read())

    def status(self) -> dict:
        return {"protocol": protocol.VERSION, "server_id": self.server_id, "address": self.address, "pid": os.getpid(),
                "server_restarts": self.server_restarts, **report.status(self.coord, time.monotonic())}

    def finish(self) -> dict:
        c, now = self.coord, time.monotonic()
        wall, step = c.elapsed_s(now), c.step
        tail = c.flush_loss(now)  # the pushes since the last metrics line
        theta, X, y = self.theta_now(), self.block.X, self.block.y
        final_loss, train_metric = self.model.loss(theta, X, y), self.model.metric(theta, X, y)
        self._finite_loss(step, final_loss, "the training loss at the end")
        with _writing("the metrics", self.metrics_path):
            if tail is not None:
                self.metrics.log_train(tail.step, tail.elapsed_s, tail.samples, tail.loss)
            self.metrics.log_final(step, wall, final_loss, _num(train_metric), self.model.metric_name)
        test = self.evaluate(step)
        with _writing("the metrics", self.metrics_path):
            self.metrics.close()
        if c.checkpointed_version != c.version:
            self.save_checkpoint()
        if self.links is not None:
            self.links.sync(-1, now)   # every range is read (and ordered to save): the range servers may go
        if isinstance(self.model, (models.Custom, SparseLogistic)):  # theta as learned: no scaling to undo
            theta_out = theta.astype(np.float64)
        else:
            theta_out = data.unscale(theta, self.block.mean, self.block.scale, self.cfg.model.fit_intercept)
        summary = {
            **report.summary(c, now), "final_loss": final_loss, "train_metric": train_metric,
            "metric": self.model.metric_name, "test_loss": test[0] if test else None,
            "test_metric": test[1] if test else None, "partition": self.cfg.data.partition,
            "shards": len(self.layout.shards), "rows": self.block.spec.n_train, "test_rows": self.block.spec.n_test,
            "cols": self.block.spec.d, "model": self.cfg.model.kind,
            # group steps and local SGD: the workers clip (each logs its count), which no push tells the server
            "clipped": None if self._workers_clip() else self.store.clipped,
            "server_restarts": self.server_restarts, "resumed_from": self.resumed_from,
            "rows_dropped": self.layout.rows_dropped, "address": self.address,
            "source": self.cfg.data.source, "test_source": self.cfg.data.test_source or None,
            "mailbox_requests": self.mailbox_requests, "mailbox_rings": self.rings, "range_restarts": self.range_restarts,
        }
        path = os.path.join(self.out_dir, "theta.npy")
        with _writing("theta", path):
            np.save(path, theta_out)
        path = os.path.join(self.out_dir, "summary.json")
        with _writing("the summary", path):
            _write_json(path, summary)
        if self.cfg.output.plot:
            path = os.path.join(self.out_dir, "loss.png")
            with _writing("the plot", path):
                plot.loss_curves(path, self.metrics.train, self.metrics.test,
                                 f"{self.cfg.model.kind}, {summary['workers']} workers, {c.gate.mode}",
                                 self.model.metric_name)
        log.info("done (%s): %d steps in %.2f s, final loss %.6g", c.stopping, step, wall, final_loss)
        return summary

    def close(self) -> None:
        if self.links is not None:
            self.links.close()
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        try:
            self.metrics.close()
        except OSError:  # already reported (a full disk): closing must not hide that error
            pass
        self._release_shared()

    def _release_shared(self) -> None:
        """Close the data block and every segment this server made (which unlinks them) or attached."""
        self.block.close()
        for seg in [self.theta_shm, self.group, self.bell, *self.slots.values(), *self.mailboxes.values()]:
            if seg is not None:
                seg.close()  # the creator unlinks


def _rid(rid) -> dict:
    return {} if rid is None else {"rid": rid}


# the events of the other requests, from their checked headers (psrv/protocol.py has checked every field)
def _pull_event(ident: bytes, h: dict, arrays: list) -> ev.Pull:
    return ev.Pull(ident, h["wid"], h["inc"], h["clock"], h.get("rid"))


def _heartbeat_event(ident: bytes, h: dict, arrays: list) -> ev.Heartbeat:
    return ev.Heartbeat(ident, h["wid"], h["inc"], h.get("rid"))


def _hello_event(ident: bytes, h: dict, arrays: list) -> ev.Hello:
    return ev.Hello(ident, h["wid"], h["version"], h["role"], h["pid"], h["host"], h["local"], h.get("rid"))


def _bye_event(ident: bytes, h: dict, arrays: list) -> ev.Bye:
    return ev.Bye(ident, h["wid"], h["inc"], h.get("rid"))


def _rewound(old: Server, spec: ServerSpec) -> Server:
    """The run as of its newest checkpoint, in this process, after the launcher restarted a range server from its
    own checkpoint: server 0 goes back to that step the way a restarted server does (a new server id, so every
    worker says hello again and pulls again; the clocks and cursors of the checkpoint) on the same address, and
    orders every range to load its checkpoint of the same step. The other processes keep running."""
    with open(os.path.join(spec.out_dir, RANGES_FILE)) as fh:
        links = json.load(fh)
    # the newest step every range and server 0 have a checkpoint of (a range may have died before saving the step
    # server 0 saved last: server 0's newer ones are then of no use, and removed so that _restore takes this one)
    steps = [set(checkpoint.steps(d)) for d in [old.ckpt_dir, *(range_dir(old.ckpt_dir, s) for s in range(1, len(links) + 1))]]
    common = set.intersection(*steps)
    if not common:
        raise RunError("server", f"a range server died before every range had checkpointed a step; the run cannot "
                                 f"go back to one (checkpoint.every_steps = {old.cfg.checkpoint.every_steps})")
    for step in checkpoint.steps(old.ckpt_dir):
        if step > max(common):
            os.remove(checkpoint.path_for(old.ckpt_dir, step))
    log.warning("a range server was restarted: the run goes back to step %d, its newest checkpoint of every range",
                max(common))
    address, cfg, restarts = old.address, old.cfg, old.range_restarts + 1
    old.close()
    server = Server(cfg, spec.layout, spec.out_dir, old.reporter, bind=address, resume=old.ckpt_dir,
                    server_restarts=spec.server_restarts, alone=spec.alone, shm_prefix=spec.shm_prefix,
                    own_core=spec.own_core, cuts=spec.cuts, ranges=links, range_restarts=restarts)
    signal.signal(signal.SIGTERM, lambda signum, frame: setattr(server, "terminate", True))
    signal.signal(signal.SIGUSR1, lambda signum, frame: setattr(server, "rewind", True))
    return server


def main(spec: ServerSpec, conn, parent_pid: int, core, log_level: int):
    """Entry point of the server process ("psrv.server:main", started with spawn by the launcher)."""
    proc.child_setup("server", parent_pid, core, log_level)
    reporter = proc.Reporter(conn)
    server = None
    try:
        cfg = config_mod.Config.from_dict(spec.cfg, frozenset(spec.explicit))
        server = Server(cfg, spec.layout, spec.out_dir, reporter, bind=spec.bind, resume=spec.resume,
                        server_restarts=spec.server_restarts, alone=spec.alone, shm_prefix=spec.shm_prefix,
                        own_core=spec.own_core, cuts=spec.cuts, ranges=spec.ranges)
        # from now on SIGTERM ends the run like a stopping criterion: theta, summary and checkpoint are written
        signal.signal(signal.SIGTERM, lambda signum, frame: setattr(server, "terminate", True))
        # server.shards > 1: the launcher restarted a range server (the new one's link in RANGES_FILE)
        signal.signal(signal.SIGUSR1, lambda signum, frame: setattr(server, "rewind", True))
        with proc.profiled("server"):  # the serving loop only: not start-up, not the final outputs
            server.loop()
            while server.rewind and not server.coord.done:
                server = _rewound(server, spec)
                server.loop()
        reporter.send("finishing")
        reporter.send("done", summary=server.finish())
    except RunError as e:
        log.error("%s", e)
        reporter.send("error", process=e.process, message=e.cause)
        sys.exit(1)
    except ConfigError as e:  # the job cannot run as configured (a checkpoint of another job): exit 2, not 1
        log.error("%s", e)
        reporter.send("error", process="server", message=str(e), kind="config")
        sys.exit(2)
    except Exception as e:
        log.error("server failed:\n%s", traceback.format_exc())
        reporter.send("error", process="server", message=f"{type(e).__name__}: {e}")
        sys.exit(1)
    finally:
        if server is not None:
            server.close()
