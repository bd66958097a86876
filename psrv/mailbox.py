"""A request/reply mailbox in shared memory for a worker on the server's machine: the same message headers as over
ZeroMQ, without ZeroMQ's wake-ups.

Why: on these machines a ZeroMQ round trip costs 100-250 µs, four thread wake-ups of about 30 µs each (the I/O
threads sleep in between), while a plain SGD step of a small model takes 30-50 µs; two processes that busy-poll a
shared flag answer each other in about 5 µs (docs/design notes in ../shared/reference/machine-limits.md). So while
requests keep coming, the server polls its local workers' mailboxes in a loop instead of sleeping, and each
worker polls for its reply.

One segment per worker incarnation (a new one gets a new mailbox, so no reply meant for its predecessor reaches it):
eight u64 control words, then a request area and a reply area of AREA_BYTES each.

    REQ_SEQ, REQ_LEN: the worker writes a request's bytes, then REQ_LEN, then bumps REQ_SEQ;
    REP_SEQ, REP_LEN: the server does the same with the reply;
    AWAKE: 1 while the server is polling mailboxes, 0 when it sleeps in its ZeroMQ poll.

A worker posts to the mailbox only while AWAKE is 1 and otherwise sends the same request over ZeroMQ, which wakes
the server. The server clears AWAKE and then looks at every mailbox once more before it sleeps, so a request posted
just before is still seen; a request that slips between the two (stores and loads reordered by the CPU) waits for the
end of the server's poll timeout, never longer. One request is in flight per worker at a time (the client waits for
its reply), so an area is never written while the other side reads it. Stores become visible in program order on
x86-64 (TSO), which this relies on exactly as the theta seqlock does (shmarray.ORDERED_STORES).

Nothing here trusts the other side: lengths are checked against the area, and the bytes are decoded and validated by
psrv/protocol.py like any message from the network.
"""
from __future__ import annotations

import collections

import numpy as np

from .shmarray import SharedArray

AREA_BYTES = 16 * 1024     # a pull or push header is a few hundred bytes; the reply to one with theta in shm as well
REQ_SEQ, REQ_LEN, REP_SEQ, REP_LEN, AWAKE = range(5)
CONTROL_BYTES = 64
TOKEN_PREFIX = b"\x00mailbox:"  # a ZeroMQ peer cannot choose a routing id that starts with a zero byte

# what the server's handle() reads from frames[0]: the mailbox's token stands where a ZeroMQ routing id would be
Ident = collections.namedtuple("Ident", "bytes")


def token(wid: int, inc: int) -> bytes:
    """What stands for a mailbox where a ZeroMQ routing id would: one per worker incarnation."""
    return TOKEN_PREFIX + b"%d:%d" % (wid, inc)


class Mailbox:
    def __init__(self, seg: SharedArray, token: bytes = b""):
        self.seg, self.token = seg, token
        self.ident = Ident(token)  # made once: the server hands it with every request from this mailbox
        raw = seg.array
        self.ctl = raw[:CONTROL_BYTES].view(np.uint64)
        self.req = raw[CONTROL_BYTES:CONTROL_BYTES + AREA_BYTES]
        self.rep = raw[CONTROL_BYTES + AREA_BYTES:]
        # the same memory as memoryviews, which the per-message paths use: indexing one reads or writes a Python
        # int (one aligned 8-byte load or store, as numpy's), and copying bytes in or out needs no array, where
        # numpy's element access and np.frombuffer cost several times as much per call
        self._ctl = memoryview(self.ctl).cast("B").cast("Q")
        self._req = memoryview(self.req)
        self._rep = memoryview(self.rep)
        self.seen_req = self._ctl[REQ_SEQ]
        self.seen_rep = self._ctl[REP_SEQ]

    @classmethod
    def create(cls, name: str, token: bytes = b"") -> "Mailbox":
        return cls(SharedArray.create(name, (CONTROL_BYTES + 2 * AREA_BYTES,), np.uint8), token)

    @classmethod
    def attach(cls, name: str) -> "Mailbox":
        return cls(SharedArray.attach(name, (CONTROL_BYTES + 2 * AREA_BYTES,), np.uint8))

    @property
    def name(self) -> str:
        return self.seg.name

    def _put(self, area: memoryview, seq: int, length: int, frames: list) -> bool:
        """One header frame into `area`, then its length, then the bumped sequence number (the other side reads
        the number first, so it never sees a half-written message); False when it cannot go this way."""
        if len(frames) != 1 or len(frames[0]) > AREA_BYTES:
            return False
        data = frames[0]
        n = len(data)
        area[:n] = data
        ctl = self._ctl
        ctl[length] = n
        ctl[seq] = ctl[seq] + 1
        return True

    def _read(self, area: memoryview, length: int) -> bytes:
        """The message in `area`, its length read after its sequence number. A length beyond the area is cut to it
        (the decoder then refuses the bytes)."""
        n = self._ctl[length]
        return area[:n if n < AREA_BYTES else AREA_BYTES].tobytes()

    # ------------------------------------------------------------------ worker side
    def server_awake(self) -> bool:
        return self._ctl[AWAKE] != 0

    def post(self, frames: list) -> bool:
        """Write a request (one header frame, no arrays); False when it does not fit (use ZeroMQ)."""
        return self._put(self._req, REQ_SEQ, REQ_LEN, frames)

    def reply(self) -> bytes | None:
        """The reply the server wrote since the last call, or None."""
        now = self._ctl[REP_SEQ]
        if now == self.seen_rep:
            return None
        self.seen_rep = now
        return self._read(self._rep, REP_LEN)

    # ------------------------------------------------------------------ server side
    def request(self) -> bytes | None:
        """The request posted since the last call, or None."""
        now = self._ctl[REQ_SEQ]
        if now == self.seen_req:
            return None
        self.seen_req = now
        return self._read(self._req, REQ_LEN)

    def answer(self, frames: list) -> bool:
        """Write a reply (one header frame); False when it cannot go this way (arrays, or too large)."""
        return self._put(self._rep, REP_SEQ, REP_LEN, frames)

    def set_awake(self, on: bool) -> None:
        self._ctl[AWAKE] = 1 if on else 0

    def close(self) -> None:
        for view in (self._ctl, self._req, self._rep):
            view.release()  # a view still held would keep the segment mapped after seg.close()
        del self.ctl, self.req, self.rep, self._ctl, self._req, self._rep
        self.seg.close()
