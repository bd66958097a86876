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

    WAITING: 1 while the worker sleeps for its reply (on its bell) rather than polling.

While AWAKE is 1 a worker posts and the server sees the request within microseconds. While it is 0 (the server
sleeps: it shares a core with a worker, so it may not poll, or requests stopped for a while) the worker posts and
then rings the server's bell (Bell below: a one-byte datagram on a Unix socket in Linux's abstract namespace, which
the server's poll watches beside its ZeroMQ socket): a wake-up costs a system call or two, where a ZeroMQ round trip
costs four thread wake-ups and about twice the server's CPU. Without bells (another OS, a name taken) the request goes
over ZeroMQ instead, which wakes the server too. The server answers in the mailbox and rings the worker's bell only if
WAITING is 1. The server clears AWAKE and then looks at every mailbox once more before it sleeps, so a request posted
just before is still seen; a request or a reply that slips between a flag and a sequence number (stores and loads
reordered by the CPU) waits for the end of the sleeper's timeout (the server's poll, a worker's BELL_WAIT_S), never
longer. One request is in flight per worker at a time (the client waits for
its reply), so an area is never written while the other side reads it. Stores become visible in program order on
x86-64 (TSO), which this relies on exactly as the theta seqlock does (shmarray.ORDERED_STORES).

Nothing here trusts the other side: lengths are checked against the area, and the bytes are decoded and validated by
psrv/protocol.py like any message from the network.
"""
from __future__ import annotations

import collections
import errno
import select
import socket

import numpy as np

from .shmarray import SharedArray

AREA_BYTES = 16 * 1024     # a pull or push header is a few hundred bytes; the reply to one with theta in shm as well
REQ_SEQ, REQ_LEN, REP_SEQ, REP_LEN, AWAKE, WAITING = range(6)
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

    def set_waiting(self, on: bool) -> None:
        self._ctl[WAITING] = 1 if on else 0

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

    def worker_waiting(self) -> bool:
        return self._ctl[WAITING] != 0

    def close(self) -> None:
        for view in (self._ctl, self._req, self._rep):
            view.release()  # a view still held would keep the segment mapped after seg.close()
        del self.ctl, self.req, self.rep, self._ctl, self._req, self._rep
        self.seg.close()


def bell_name(box_name: str) -> str:
    """The bell of the worker that owns the mailbox `box_name`: named after it, so the server needs no message."""
    return box_name + "_bell"


class Bell:
    """A wake-up without data: a Unix datagram socket bound to a name in Linux's abstract namespace (no file to
    remove; the name goes with the socket). ring() sends one byte to a bell by name and never blocks; the owner
    sleeps in wait() (or in a poll on fileno()) and drain()s what came. A ring carries nothing and means only "look
    at the mailbox": a datagram from any other local process wakes the owner once and changes nothing."""

    def __init__(self, name: str):
        self.name = name
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.sock.bind(b"\0" + name.encode())
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise

    @classmethod
    def open(cls, name: str) -> "Bell | None":
        """A bell bound to `name`, or None where that is impossible (no abstract namespace, the name taken)."""
        if not hasattr(socket, "AF_UNIX"):
            return None
        try:
            return cls(name)
        except OSError:
            return None

    def fileno(self) -> int:
        return self.sock.fileno()

    def ring(self, name: str) -> bool:
        """Wake the owner of bell `name`; False if it is not there (gone, or its queue full: it is awake anyway)."""
        try:
            self.sock.sendto(b"!", b"\0" + name.encode())
            return True
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN, errno.ENOBUFS):
                raise
            return False

    def drain(self) -> int:
        """Forget the rings received so far; how many there were."""
        n = 0
        while True:
            try:
                self.sock.recv(64)
            except (BlockingIOError, InterruptedError):
                return n
            n += 1

    def wait(self, timeout_s: float) -> bool:
        """Sleep until a ring comes or timeout_s passes; True if one came (it is left to drain())."""
        return bool(select.select([self.sock], [], [], timeout_s)[0])

    def close(self) -> None:
        self.sock.close()
