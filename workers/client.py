"""The client side of the protocol: hello / pull / push / bye / status, each a request with a timeout.

A Heartbeat thread, with a socket of its own, tells the server this worker is alive and tells the worker whether
the server is: a long numpy step never looks like death, and a wait for a BSP barrier gives up only when the
server itself has gone quiet.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

import numpy as np

from psrv import protocol, transport
from psrv.errors import ProtocolError, RunError, ServerLost
from psrv.protocol import Op

log = logging.getLogger(__name__)

SLICE_MS = 100


class RemoteError(RunError):
    """The server answered with an error reply."""

    def __init__(self, code: str, reason: str):
        super().__init__("server", f"{code}: {reason}")
        self.code = code


class Heartbeat(threading.Thread):
    """Sends a heartbeat every interval_s from its own socket and records when the server last answered."""

    def __init__(self, ctx, address: str, wid: int, inc: int, interval_s: float):
        super().__init__(name=f"heartbeat-{wid}", daemon=True)
        self.ctx, self.address, self.wid, self.inc, self.interval_s = ctx, address, wid, inc, interval_s
        self.last_heard_s = time.monotonic()
        self.server_id: str | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        sock = transport.dealer(self.ctx, self.address)
        try:
            frames = protocol.encode({"op": Op.HEARTBEAT.value, "wid": self.wid, "inc": self.inc})
            while not self._halt.is_set():
                transport.send(sock, frames, block=False)
                deadline = time.monotonic() + self.interval_s
                while (left := deadline - time.monotonic()) > 0 and not self._halt.is_set():
                    reply = transport.recv(sock, int(left * 1000) + 1)
                    if reply is None:
                        continue
                    try:
                        h, _ = protocol.decode(reply, protocol.REPLIES)
                    except ProtocolError:
                        continue
                    if h["op"] == Op.HEARTBEAT.value:
                        self.last_heard_s = time.monotonic()
                        self.server_id = h["server_id"]
        finally:
            sock.close(linger=0)

    def silent_for_s(self) -> float:
        return time.monotonic() - self.last_heard_s

    def stop(self) -> None:
        self._halt.set()


class Client:
    """One DEALER to the server, one request in flight at a time; replies are matched by request id."""

    def __init__(self, address: str, timeout_s: float = 10.0, ctx=None):
        self.address, self.timeout_s = address, timeout_s
        self._own_ctx = ctx is None
        self.ctx = ctx or transport.context()
        self.sock = transport.dealer(self.ctx, address)
        self.rid = 0
        self.heartbeat: Heartbeat | None = None
        self.wid, self.inc, self.seq = -1, 0, 0

    def request(self, header: dict, arrays=()) -> tuple[dict, list[np.ndarray]]:
        """Send a request and wait for its reply. While a heartbeat thread runs, the wait lasts as long as the
        server keeps answering heartbeats (a BSP barrier may legitimately take long); without one, timeout_s."""
        self.rid += 1
        header = {**header, "rid": self.rid}
        transport.send(self.sock, protocol.encode(header, arrays))
        start = time.monotonic()
        while True:
            frames = transport.recv(self.sock, SLICE_MS)
            if frames is not None:
                h, out = protocol.decode(frames, protocol.REPLIES)
                if h.get("rid") not in (None, self.rid):
                    continue  # a late reply to an earlier request that timed out
                if h["op"] == Op.ERROR.value:
                    raise RemoteError(h["code"], h["reason"])
                return h, out
            if self.heartbeat is not None and self.heartbeat.is_alive():
                silent = self.heartbeat.silent_for_s()
                if silent > self.timeout_s:
                    raise ServerLost(f"worker {self.wid}", f"no word from the server at {self.address} for "
                                                           f"{silent:.1f} s during {header['op']}")
            elif time.monotonic() - start > self.timeout_s:
                raise ServerLost(f"worker {self.wid}" if self.wid >= 0 else "client",
                                 f"no reply from {self.address} to {header['op']} within {self.timeout_s:g} s")

    def hello(self, wid: int, heartbeat_interval_s: float | None = None) -> dict:
        h, _ = self.request({"op": Op.HELLO.value, "version": protocol.VERSION, "role": "worker", "wid": wid,
                             "pid": os.getpid(), "host": socket.gethostname()})
        self.wid, self.inc = h["wid"], h["inc"]
        interval = heartbeat_interval_s or h["train"].get("heartbeat_interval_s", 0.5)
        self.heartbeat = Heartbeat(self.ctx, self.address, self.wid, self.inc, interval)
        self.heartbeat.start()
        return h

    def pull(self, clock: int) -> tuple[dict, list[np.ndarray]]:
        return self.request({"op": Op.PULL.value, "wid": self.wid, "inc": self.inc, "clock": clock})

    def push(self, clock: int, grad: np.ndarray, loss: float, count: int, pull: bool = True):
        self.seq += 1
        return self.request({"op": Op.PUSH.value, "wid": self.wid, "inc": self.inc, "seq": self.seq,
                             "clock": clock, "loss": float(loss), "count": int(count), "pull": pull}, [grad])

    def bye(self) -> None:
        try:
            self.request({"op": Op.BYE.value, "wid": self.wid, "inc": self.inc})
        except (RunError, ProtocolError) as e:  # leaving is best effort: the server may already be gone
            log.debug("bye: %s", e)

    def status(self) -> dict:
        h, _ = self.request({"op": Op.STATUS.value})
        return h["state"]

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat.join(timeout=2.0)
        self.sock.close(linger=0)
        if self._own_ctx:
            self.ctx.term()
