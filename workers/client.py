"""The client side of the protocol: hello / pull / push / bye / status, each a request with a timeout.

A Heartbeat thread, with a socket of its own, tells the server this worker is alive and tells the worker whether
the server is: a long numpy step never looks like death, and a wait for a BSP barrier gives up only when the
server itself has gone quiet.
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time

import numpy as np

from psrv import mailbox, protocol, transport
from psrv.errors import ProtocolError, RunError, ServerLost
from psrv.protocol import Op, OpStr

log = logging.getLogger(__name__)

SLICE_MS = 100
SPIN_S = 0.002  # a reply through the mailbox is polled for without sleeping this long, then slept for on the bell
POLL_SLEEP_S = 50e-6  # (no bell: polled every POLL_SLEEP_S)
BELL_WAIT_S = 0.002   # a sleep on the bell is at most this long: a ring lost to reordered stores costs no more
MAILBOX_OPS = (Op.PULL.value, Op.PUSH.value)
HALT_CHECK_S = 0.02  # how soon the heartbeat thread notices stop()
LOST_AFTER_BEATS = 4  # heartbeat periods of "the server holds nothing of ours" before a request counts as lost


class RemoteError(RunError):
    """The server answered with an error reply."""

    def __init__(self, code: str, reason: str):
        super().__init__("server", f"{code}: {reason}")
        self.code = code


class ServerRestarted(RunError):
    """The server answering heartbeats is not the one this worker registered with: its process was restarted."""

    def __init__(self, old: str, new: str):
        super().__init__("server", f"server {old} was replaced by server {new} (restarted)")


class Heartbeat(threading.Thread):
    """Sends a heartbeat every interval_s from its own socket and records when the server last answered."""

    def __init__(self, ctx, address: str, wid: int, inc: int, interval_s: float, keys: str = ""):
        super().__init__(name=f"heartbeat-{wid}", daemon=True)
        self.ctx, self.address, self.wid, self.inc, self.interval_s = ctx, address, wid, inc, interval_s
        self.keys = keys
        self.last_heard_s = time.monotonic()
        self.server_id: str | None = None
        self.declared_dead = False
        self.last_waiting_s = 0.0  # when the server last said it holds a pull of ours
        self.heard: collections.deque = collections.deque(maxlen=4 * LOST_AFTER_BEATS)  # when replies came
        self._halt = threading.Event()

    def run(self) -> None:
        sock = transport.dealer(self.ctx, self.address, self.keys)
        try:
            frames = protocol.encode({"op": Op.HEARTBEAT.value, "wid": self.wid, "inc": self.inc})
            while not self._halt.is_set():
                transport.send(sock, frames, block=False)
                deadline = time.monotonic() + self.interval_s
                while (left := deadline - time.monotonic()) > 0 and not self._halt.is_set():
                    # in slices: stop() is seen within HALT_CHECK_S, not a whole interval later (every worker's
                    # exit, and so every run's end, waited for it)
                    reply = transport.recv(sock, int(min(left, HALT_CHECK_S) * 1000) + 1)
                    if reply is None:
                        continue
                    try:
                        h, _ = protocol.decode(reply, protocol.REPLIES)
                    except ProtocolError:
                        continue
                    if h["op"] == Op.ERROR.value and h["code"] == "stale_incarnation":
                        # another incarnation took this worker's id: this one is as good as dead
                        self.last_heard_s = time.monotonic()
                        self.declared_dead = True
                    elif h["op"] == Op.HEARTBEAT.value:
                        self.last_heard_s = time.monotonic()
                        self.heard.append(self.last_heard_s)
                        self.server_id = h["server_id"]
                        self.declared_dead = not h["alive"]
                        if h["waiting"]:
                            self.last_waiting_s = self.last_heard_s
        finally:
            sock.close(linger=0)

    def silent_for_s(self) -> float:
        return time.monotonic() - self.last_heard_s

    def stop(self) -> None:
        self._halt.set()


class Client:
    """One DEALER to the server, one request in flight at a time; replies are matched by request id."""

    def __init__(self, address: str, timeout_s: float | None = None, ctx=None, keys: str = ""):
        """timeout_s: how long the server may stay silent; None means 10 s until the server's welcome says.
        keys: a CURVE key folder (server.key and this client's secret key) for a server that requires it."""
        self.address, self.keys = address, keys
        self.timeout_fixed = timeout_s is not None
        self.timeout_s = timeout_s if timeout_s is not None else 10.0
        self._own_ctx = ctx is None
        self.ctx = ctx or transport.context()
        self.sock = transport.dealer(self.ctx, address, keys)
        self.rid = 0
        self.heartbeat: Heartbeat | None = None
        self.wid, self.inc, self.seq = -1, 0, 0
        self.server_id = ""
        self.mailbox: mailbox.Mailbox | None = None  # pulls and pushes through shared memory (psrv/mailbox.py)
        self.bell: mailbox.Bell | None = None        # ours, where the server wakes us; and the server's, by name
        self.server_bell = ""

    def request(self, header: dict, arrays=(), timeout_s: float | None = None) -> tuple[dict, list[np.ndarray]]:
        """Send a request and wait for its reply (see send() and wait())."""
        self.send(header, arrays, timeout_s)
        return self.wait()

    def send(self, header: dict, arrays=(), timeout_s: float | None = None) -> None:
        """Send a request without waiting, so the caller can work until it needs the reply (wait())."""
        self.rid += 1
        frames = protocol.encode({**header, "rid": self.rid}, arrays)
        # through the mailbox only while the server polls it; else ZeroMQ, which also wakes the server
        box = self.mailbox
        by_mail = False
        if box is not None and header["op"] in MAILBOX_OPS:
            if box.server_awake():
                by_mail = box.post(frames)
            elif self.bell is not None and box.post(frames):   # it sleeps: wake it (a gone server is noticed
                by_mail = True                                 # by the wait's timeout, as over ZeroMQ)
                self.bell.ring(self.server_bell)
        if not by_mail:
            transport.send(self.sock, frames)
        self._pending = (header["op"], time.monotonic(), timeout_s, by_mail)

    def wait(self) -> tuple[dict, list[np.ndarray]]:
        """The reply to the request sent last. While a heartbeat thread runs, the wait lasts as long as the server
        keeps answering heartbeats (a BSP barrier may legitimately take long) and is the same server; with an
        explicit timeout_s, or without heartbeats, at most that long."""
        op, start, timeout_s, by_mail = self._pending
        hb = self.heartbeat if timeout_s is None else None  # an explicit timeout is a hard one
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        while True:
            frames = self._mail_reply(start) if by_mail else transport.recv(self.sock, SLICE_MS)
            if frames is not None:
                h, out = protocol.decode(frames, protocol.REPLIES)
                if h.get("rid") not in (None, self.rid):
                    continue  # a late reply to an earlier request that timed out
                if h["op"] == OpStr.ERROR:
                    raise RemoteError(h["code"], h["reason"])
                return h, out
            if hb is not None and hb.is_alive():
                if hb.server_id not in (None, self.server_id):
                    raise ServerRestarted(self.server_id, hb.server_id)
                if hb.declared_dead and hb.server_id in (None, self.server_id):
                    raise RemoteError("dead", f"the server declared worker {self.wid} (incarnation {self.inc}) "
                                              f"dead while it waited for {op}")
                # the server has kept answering heartbeats for a while since the request (so it is alive) without
                # holding a pull of ours, and no reply came: the request or its reply was lost. Measured from the
                # first such answer, over several: after a stall the server answers queued heartbeats (another
                # connection) in a burst before it reads the request, and a burst is not a while.
                since = max(start, hb.last_waiting_s)
                idle = [t for t in list(hb.heard) if t > since]  # a copy: the heartbeat thread appends
                if op in ("pull", "push") and len(idle) > LOST_AFTER_BEATS \
                        and idle[-1] - idle[0] > LOST_AFTER_BEATS * hb.interval_s:
                    raise RemoteError("lost", f"no reply to {op} for {time.monotonic() - start:.1f} s while the "
                                              f"server, answering, holds nothing of worker {self.wid}: the request or "
                                              f"its reply was lost")
                silent = hb.silent_for_s()
                if silent > timeout_s:
                    raise ServerLost(f"worker {self.wid}", f"no word from the server at {self.address} for "
                                                           f"{silent:.1f} s during {op}")
            elif time.monotonic() - start > timeout_s:
                raise ServerLost(f"worker {self.wid}" if self.wid >= 0 else "client",
                                 f"no reply from {self.address} to {op} within {timeout_s:g} s")

    def _mail_reply(self, start: float) -> list | None:
        """The reply in the mailbox, waiting up to SLICE_MS: polling without a pause for the first SPIN_S of the
        request (a reply usually comes within microseconds), then with short sleeps (a BSP barrier may last)."""
        box, bell = self.mailbox, self.bell
        reply = box.reply()  # usually there already: the server answers within microseconds
        if reply is not None:
            return [reply]
        end = time.monotonic() + SLICE_MS / 1000
        waiting = False
        try:
            while True:
                reply = box.reply()
                if reply is not None:
                    return [reply]
                now = time.monotonic()
                if now >= end:
                    return None
                if now - start < SPIN_S:
                    os.sched_yield()
                elif bell is None:
                    time.sleep(POLL_SLEEP_S)
                elif not waiting:   # from now on the server rings: rings from before are forgotten, then one more look
                    bell.drain()
                    box.set_waiting(True)
                    waiting = True
                else:
                    bell.wait(min(BELL_WAIT_S, end - now))
        finally:
            if waiting:
                box.set_waiting(False)

    def hello(self, wid: int, local: bool = True) -> dict:
        """Register (again) as worker `wid` (-1: let the server choose). Returns the welcome header, with the
        standardization arrays added as h["mean"] and h["scale"]; starts this incarnation's heartbeat thread."""
        self._stop_heartbeat()
        h, arrays = self.request({"op": Op.HELLO.value, "version": protocol.VERSION, "role": "worker", "wid": wid,
                                  "pid": os.getpid(), "host": socket.gethostname(), "local": local})
        self.wid, self.inc, self.server_id, self.seq = h["wid"], h["inc"], h["server_id"], 0
        h["mean"], h["scale"] = (a.copy() for a in arrays)
        self._close_mailbox()
        shm = h["data"].get("shm") or {}
        name = shm.get("mailbox")
        if name:
            try:
                self.mailbox = mailbox.Mailbox.attach(name)
            except (OSError, ValueError) as e:  # then ZeroMQ, as for a worker elsewhere
                log.warning("worker %d: cannot use the mailbox %s (%s); requests go over ZeroMQ", self.wid, name, e)
            if self.mailbox is not None and isinstance(shm.get("bell"), str):
                # None if the name is taken: then requests go over ZeroMQ while the server sleeps
                self.bell, self.server_bell = mailbox.Bell.open(mailbox.bell_name(name)), shm["bell"]
        if not self.timeout_fixed:
            self.timeout_s = h["train"].get("server_timeout_s", self.timeout_s)
        self.heartbeat = Heartbeat(self.ctx, self.address, self.wid, self.inc, h["train"]["heartbeat_interval_s"],
                                   self.keys)
        self.heartbeat.start()
        return h

    def pull(self, clock: int) -> tuple[dict, list[np.ndarray]]:
        return self.request({"op": OpStr.PULL, "wid": self.wid, "inc": self.inc, "clock": clock})

    def get(self, keys: np.ndarray) -> tuple[np.ndarray, int]:
        """(theta's rows `keys` (uint64, sorted, distinct), their version): a read the gate never holds."""
        h, arrays = self.request({"op": OpStr.GET, "wid": self.wid, "inc": self.inc}, [keys])
        return arrays[0], h["version"]

    def push(self, clock: int, grad, loss: float, count: int, version: int = 0,
             compute_s: float = 0.0, request_s: float = 0.0, pull: bool = True, wait: bool = True):
        """Push a gradient computed at theta `version` (grad None: it is already in this worker's shared-memory
        slot; a tuple (keys, values): a sparse model's gradient on those keys); with pull=True the reply is the
        next theta. With wait=False, only send: call wait() for the reply, and do not touch `grad` (or the slot)
        until then."""
        self.seq += 1
        return (self.request if wait else self.send)({"op": OpStr.PUSH, "wid": self.wid, "inc": self.inc, "sid": self.server_id,
                             "seq": self.seq, "clock": clock, "version": version, "loss": float(loss),
                             "count": int(count), "pull": pull, "compute_s": compute_s, "request_s": request_s},
                            [] if grad is None else list(grad) if isinstance(grad, tuple) else [grad])

    def bye(self, timeout_s: float = 1.0) -> None:
        """Tell the server this incarnation leaves (best effort: the server may already be gone)."""
        if self.inc == 0:
            return
        try:
            self.request({"op": Op.BYE.value, "wid": self.wid, "inc": self.inc}, timeout_s=timeout_s)
        except (RunError, ProtocolError) as e:
            log.debug("bye: %s", e)

    def status(self) -> dict:
        h, _ = self.request({"op": Op.STATUS.value})
        return h["state"]

    def _stop_heartbeat(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat.join(timeout=2.0)
            self.heartbeat = None

    def _close_mailbox(self) -> None:
        if self.mailbox is not None:
            self.mailbox.close()
            self.mailbox = None
        if self.bell is not None:
            self.bell.close()
            self.bell = None

    def close(self) -> None:
        self._stop_heartbeat()
        self._close_mailbox()
        self.sock.close(linger=0)
        if self._own_ctx:
            self.ctx.term()


class RangeClients:
    """A worker's connections to the range servers of ranges 1 .. S - 1 (server.shards = S > 1; range 0 is server 0's,
    through Client). Slices of a push go out without a reply; reads go to every range first and their replies are
    awaited after, so the ranges answer at the same time."""

    def __init__(self, client: Client, addresses: list[str]):
        self.client, self.addresses = client, addresses
        self.wid, self.timeout_s, self.sid = client.wid, client.timeout_s, client.server_id
        self.socks = [transport.dealer(client.ctx, a) for a in addresses]
        self.rid = 0

    def _send(self, s: int, header: dict, arrays) -> None:
        sock = self.socks[s]
        frames = protocol.encode(header, arrays)
        if not transport.send(sock, frames, block=False) and not (
                transport.writable(sock, int(self.timeout_s * 1000)) and transport.send(sock, frames, block=False)):
            raise ServerLost(f"worker {self.wid}", f"the range server at {self.addresses[s]} takes nothing for "
                                                   f"{self.timeout_s:g} s")

    def push(self, clock: int, parts: list) -> None:
        """parts[s - 1] = (keys, values) of range s: held there until server 0 orders the step that includes it."""
        for s, (keys, values) in enumerate(parts):
            self._send(s, {"op": OpStr.RPUSH, "sid": self.sid, "wid": self.wid, "clock": clock}, (keys, values))

    def send_gets(self, version: int, parts: list) -> None:
        """Ask range s for the rows parts[s - 1] at `version` or later (answered once it has reached it)."""
        self.rid += 1
        for s, keys in enumerate(parts):
            self._send(s, {"op": OpStr.RGET, "version": version, "rid": self.rid}, (keys,))

    def wait_gets(self) -> list[np.ndarray]:
        """The replies to send_gets, one values array per range; ServerLost after timeout_s of silence, and
        ServerRestarted as soon as server 0's heartbeats come from another server id (it went back to a checkpoint:
        a range server that died is not answering)."""
        out = []
        hb = self.client.heartbeat
        for s, sock in enumerate(self.socks):
            deadline = time.monotonic() + self.timeout_s
            while True:
                frames = transport.recv(sock, SLICE_MS)
                if frames is None:
                    if hb is not None and hb.server_id not in (None, self.sid):
                        raise ServerRestarted(self.sid, hb.server_id)
                    if time.monotonic() > deadline:
                        raise ServerLost(f"worker {self.wid}", f"no reply from the range server at "
                                                               f"{self.addresses[s]} within {self.timeout_s:g} s")
                    continue
                h, arrays = protocol.decode(frames, protocol.REPLIES)
                if h.get("rid") != self.rid:
                    continue   # a late reply to an earlier read
                if h["op"] == OpStr.ERROR:
                    raise RemoteError(h["code"], f"range server {s + 1}: {h['reason']}")
                out.append(arrays[0])
                break
        return out

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
