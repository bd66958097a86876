"""A harness for the pure coordinator (psrv/coordinator.py): no sockets, no processes, no sleeping.

H builds a Coordinator for config overrides given as keyword arguments with a double underscore for the dot
(train__consistency="ssp", server__max_bad_pushes=2), and plays workers the way workers/client.py does: hello
registers an incarnation, pull asks for a clock, push fills its fields from the Theta that worker was served last
(clock, count = the batch's count, version = the version served, seq increasing per incarnation, sid = the server
id, pull=True). Every request carries a fresh rid. Time is `H.now`, moved by hand.

P(out) projects a list of instructions onto compact tuples, so a test can compare the EXACT instruction list:

    ("Welcome", wid, inc, rid)                  ("Theta", wid, clock, version, batch, rid)
    ("Ack", wid, applied, reason, rid)          ("Stop", wid, reason, rid)
    ("Error", ident, code, rid)                 ("HB", wid, step, alive, waiting, rid)
    ("Bye", wid, rid)                           ("Accumulate", (wid, clock))
    ("ApplyStep", step, version)                ("Update", (wid, clock), step, version, scale)
    ("Log", step, samples, loss)                ("Evaluate", step)   ("Checkpoint", step)
    ("Fail", message)                           ("Finish", reason)

A gradient is named by the (wid, clock) of the push that carried it, found by identity (the harness keeps every
pushed array alive, so ids are never reused), so a projection says which array an instruction carries.
"""
from __future__ import annotations

import numpy as np

from psrv import config, events as ev
from psrv.coordinator import Coordinator
from psrv.optim import SGD
from psrv.protocol import VERSION, Op
from psrv.store import Store

SID = "server-A"


def ident(wid: int) -> bytes:
    return b"w%d" % wid


def wid_of(idt: bytes):
    return int(idt[1:]) if idt[:1] == b"w" and idt[1:].lstrip(b"-").isdigit() else idt


def cfg_of(n: int, overrides: dict):
    tree: dict = {"train": {"workers": n, "batch_size": 4}}
    for k, v in overrides.items():
        section, key = k.split("__", 1)
        tree.setdefault(section, {})[key] = v
    return config.load(tree)


class H:
    def __init__(self, n: int = 2, shards=None, now: float = 0.0, has_test: bool = False, alone: bool = False,
                 shm: bool = False, **overrides):
        self.n = n
        self.cfg = cfg_of(n, overrides)
        self.shards = list(shards) if shards is not None else [40] * n
        self.theta = np.zeros(3)
        self.store = Store(theta=self.theta, opt=SGD(self.theta), lr_at=lambda s: 0.1)
        self.now = now
        self.c = Coordinator(self.cfg, self.shards, self.store, SID, now, alone=alone, shm=shm, has_test=has_test)
        self.inc: dict[int, int] = {}
        self.seq: dict[int, int] = {}
        self.served: dict[int, tuple] = {}   # wid -> (clock, version, batch) of its last Theta
        self.stopped: dict[int, str] = {}    # wid -> reason of the stop it was sent
        self.rid = 0
        self.grads: list[np.ndarray] = []     # every pushed array, kept alive so that ids stay unique
        self.label: dict[int, tuple] = {}     # id(array) -> (wid, clock)
        self.log: list = []                   # every instruction, in order

    # ------------------------------------------------------------------ plumbing
    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    def handle(self, event, now: float | None = None) -> list:
        if now is not None:
            self.now = now
        out = self.c.handle(event, self.now)
        for i in out:
            if isinstance(i, ev.Theta):
                self.served[wid_of(i.ident)] = (i.clock, i.version, list(i.batch))
            elif isinstance(i, ev.Welcome):
                self.inc[i.peer.wid] = i.peer.inc
                self.seq[i.peer.wid] = 0
            elif isinstance(i, ev.Send) and i.header["op"] == Op.STOP.value:
                self.stopped[wid_of(i.ident)] = i.header["reason"]
        self.log += out
        return out

    def P(self, out: list) -> list:
        return [self.proj(i) for i in out]

    def name(self, grad):
        return self.label.get(id(grad), "?")

    def proj(self, i):
        if isinstance(i, ev.Send):
            h, w = i.header, wid_of(i.ident)
            op = h["op"]
            if op == Op.ERROR.value:
                return ("Error", w, h["code"], h.get("rid"))
            if op == Op.ACK.value:
                return ("Ack", w, h["applied"], h["reason"], h.get("rid"))
            if op == Op.STOP.value:
                return ("Stop", w, h["reason"], h.get("rid"))
            if op == Op.HEARTBEAT.value:
                return ("HB", w, h["step"], h["alive"], h["waiting"], h.get("rid"))
            if op == Op.BYE.value:
                return ("Bye", w, h.get("rid"))
            return ("Send", w, h)
        if isinstance(i, ev.Welcome):
            return ("Welcome", i.peer.wid, i.peer.inc, i.rid)
        if isinstance(i, ev.Theta):
            return ("Theta", wid_of(i.ident), i.clock, i.version, list(i.batch), i.rid)
        if isinstance(i, ev.Accumulate):
            return ("Accumulate", self.name(i.grad))
        if isinstance(i, ev.ApplyStep):
            return ("ApplyStep", i.step, i.version)
        if isinstance(i, ev.Update):
            return ("Update", self.name(i.grad), i.step, i.version, i.scale)
        if isinstance(i, ev.Log):
            return ("Log", i.step, i.samples, i.loss)
        if isinstance(i, ev.Evaluate):
            return ("Evaluate", i.step)
        if isinstance(i, ev.Checkpoint):
            return ("Checkpoint", i.step)
        if isinstance(i, ev.Fail):
            return ("Fail", i.message)
        if isinstance(i, ev.Finish):
            return ("Finish", i.reason)
        raise AssertionError(f"unknown instruction {i!r}")

    # ------------------------------------------------------------------ requests, as workers/client.py makes them
    def hello(self, wid: int, version: int = VERSION, role: str = "worker", host: str = "host", pid: int = 0,
              local: bool = True, idt: bytes | None = None, rid: int | None = None) -> list:
        rid = self.next_rid() if rid is None else rid
        idt = ident(wid) if idt is None else idt
        return self.handle(ev.Hello(idt, wid, version, role, pid or 1000 + wid, host, local, rid))

    def hellos(self, wids) -> list:
        out = []
        for w in wids:
            out += self.hello(w)
        return out

    def pull(self, wid: int, clock: int = 0, inc: int | None = None, rid: int | None = None) -> list:
        rid = self.next_rid() if rid is None else rid
        inc = self.inc.get(wid, 0) if inc is None else inc
        return self.handle(ev.Pull(ident(wid), wid, inc, clock, rid))

    def make_grad(self, wid: int, clock: int, value: float = 1.0) -> np.ndarray:
        g = np.full(3, value)
        self.grads.append(g)
        self.label[id(g)] = (wid, clock)
        return g

    def push(self, wid: int, clock: int | None = None, *, loss: float = 1.0, count: int | None = None,
             version: int | None = None, pull: bool = True, seq: int | None = None, grad=None, value: float = 1.0,
             sid: str = SID, compute_s: float = 0.0, request_s: float = 0.0, inc: int | None = None,
             framed: bool = True, keys=None, rid: int | None = None, ranges: tuple = (), state=None) -> list:
        s_clock, s_version, s_batch = self.served.get(wid, (0, 0, [0, 0, 0, 0]))
        clock = s_clock if clock is None else clock
        count = s_batch[3] if count is None else count
        version = s_version if version is None else version
        if seq is None:
            seq = self.seq.get(wid, 0) + 1
            self.seq[wid] = seq
        if grad is None:
            grad = self.make_grad(wid, clock, value)
        else:
            self.grads.append(grad)
            self.label.setdefault(id(grad), (wid, clock))
        rid = self.next_rid() if rid is None else rid
        inc = self.inc.get(wid, 0) if inc is None else inc
        return self.handle(ev.Push(ident(wid), wid, inc, sid, seq, clock, version, loss, count, pull, compute_s,
                                   request_s, grad, framed, keys, rid, ranges, state=state))

    def heartbeat(self, wid: int, inc: int | None = None) -> list:
        inc = self.inc.get(wid, 0) if inc is None else inc
        return self.handle(ev.Heartbeat(ident(wid), wid, inc, self.next_rid()))

    def bye(self, wid: int) -> list:
        return self.handle(ev.Bye(ident(wid), wid, self.inc.get(wid, 0), self.next_rid()))

    def tick(self, now: float | None = None) -> list:
        return self.handle(ev.Tick(), now)

    def stop(self, reason: str, at_once: bool = False) -> list:
        return self.handle(ev.Stop(reason, at_once))

    # ------------------------------------------------------------------ whole runs
    def start(self, pull: bool = True) -> list:
        """Every launcher worker says hello (and pulls clock 0): the gate opens."""
        out = self.hellos(range(self.n))
        if pull:
            for w in range(self.n):
                out += self.pull(w, 0)
        return out

    def holding(self) -> list[int]:
        """Workers that were served a batch and have not pushed it."""
        return sorted(self.c.batches)

    def drive(self, max_events: int = 100_000) -> None:
        """Push (with pull) for the lowest worker holding a batch, again and again, until none holds one."""
        for _ in range(max_events):
            wids = self.holding()
            if not wids:
                return
            self.push(wids[0])
        raise AssertionError("drive did not end")
