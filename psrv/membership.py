"""Who is who: worker incarnations, their connections, liveness, exactly-once pushes and quarantine (pure).

A worker id (wid) names a seat; each hello for it starts a new incarnation (inc), and only the newest live one may
pull or push. Time is passed in (`now`, seconds on any monotonic clock), so every rule here tests without waiting.
Tables are bounded: a hostile or buggy peer cannot make the server remember without limit.
No sockets, no clocks, no numpy.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

from .errors import ProtocolError

MAX_WID = 1 << 20        # worker ids a client may ask for
MAX_PEERS = 4096         # workers remembered (live, dead, finished); beyond it dead ones are forgotten
BAD_PEERS_KEPT = 1024    # per-connection counts of malformed messages
HOST_CHARS = 128
RATE_WINDOW_S = 5.0      # push rate in status: pushes over about this many seconds
RATE_MARK_S = 0.25
QUARANTINE_WHY = "its pushes were refused server.max_bad_pushes times in a row: non-finite or outlier gradients or " \
                 "losses, or stalls"


@dataclass
class Peer:
    """One worker incarnation."""
    wid: int
    inc: int
    ident: bytes                  # its connection: where replies go
    pid: int
    host: str
    local: bool
    shm: bool                     # reads theta from shared memory and pushes through its slot
    joined_s: float
    last_seen_s: float
    alive: bool = True
    finished: bool = False
    quarantined: bool = False
    seq: int = -1                 # last push sequence number taken
    pushes: int = 0
    samples: int = 0
    last_staleness: int = 0
    bad_streak: int = 0           # refused pushes (non-finite, outlier) and stalls in a row
    ready: bool = False           # in the run: it has pulled since its hello and is not a straggler since
    held_s: float = 0.0           # how long the server held (parked) the pull it answered last
    # (time, pushes) marks at most every RATE_MARK_S: the push rate over the last RATE_WINDOW_S in O(1) memory
    rate_marks: collections.deque = field(default_factory=lambda: collections.deque(maxlen=64))

    @property
    def live(self) -> bool:
        return self.alive and not self.finished

    @property
    def participates(self) -> bool:
        """Live and ready: it holds leases and belongs to the consistency gate (a hello alone does neither)."""
        return self.alive and not self.finished and self.ready

    def pushed(self, now: float) -> None:
        self.pushes += 1
        if not self.rate_marks or now - self.rate_marks[-1][0] >= RATE_MARK_S:
            self.rate_marks.append((now, self.pushes))

    def push_rate(self, now: float) -> float:
        if not self.alive:
            return 0.0
        marks = [m for m in self.rate_marks if now - m[0] <= RATE_WINDOW_S]
        if not marks:  # no push for a whole window (marks are made at pushes), unless it only just joined
            if now - self.joined_s > RATE_WINDOW_S:
                return 0.0
            marks = [(self.joined_s, 0)]
        return (self.pushes - marks[0][1]) / max(now - marks[0][0], 1e-3)


class Membership:
    def __init__(self, n_launched: int, max_bad_pushes: int, shm: bool = False):
        self.n_launched = n_launched        # ids below this are the launcher's own workers
        self.max_bad_pushes = max_bad_pushes
        self.shm = shm                      # the server offers the shared-memory plane to its launcher's workers
        self.peers: dict[int, Peer] = {}    # wid -> current incarnation
        self.incarnations: dict[int, int] = {}  # wid -> last incarnation handed out (kept across restarts)
        self.bad_by_conn: dict[bytes, int] = {}
        self.deaths = 0
        self.restarts = 0                   # hellos for a wid that had an incarnation already
        self.stale_pushes = 0               # pushes from a dead or replaced incarnation, or for another server
        self.quarantined: list[int] = []

    # ------------------------------------------------------------------ joining
    def hello(self, ident: bytes, wid: int, pid: int, host: str, local: bool, now: float
              ) -> tuple[Peer, Peer | None]:
        """Register a new incarnation of `wid` (-1: the lowest id no launcher worker uses and nobody has had).
        Returns it and the live incarnation it replaces (which the caller must take out), or raises ProtocolError."""
        if wid == -1:
            wid = self.n_launched
            while wid in self.incarnations:
                wid += 1
        if not 0 <= wid < MAX_WID:
            raise ProtocolError(f"hello: worker id {wid} is outside -1..{MAX_WID - 1}", "bad_wid")
        old = self.peers.get(wid)
        if old is None and len(self.peers) >= MAX_PEERS:
            for gone in [w for w, q in self.peers.items() if not q.alive and not q.quarantined]:
                del self.peers[gone]
            if len(self.peers) >= MAX_PEERS:
                raise ProtocolError(f"{MAX_PEERS} workers are registered already", "too_many_workers")
        if old is not None and old.quarantined:
            raise ProtocolError(f"worker {wid} is quarantined ({QUARANTINE_WHY})", "quarantined")
        if old is not None and old.finished:
            raise ProtocolError(f"worker {wid} has already finished", "finished")
        replaced = None
        if old is not None:
            self.restarts += 1
            if old.alive:
                old.alive = False
                replaced = old
        inc = self.incarnations.get(wid, 0) + 1
        self.incarnations[wid] = inc
        # shared-memory slots only for the launcher's own workers: a bounded number, however many say they are local
        p = Peer(wid=wid, inc=inc, ident=ident, pid=pid, host=host[:HOST_CHARS], local=local,
                 shm=self.shm and local and wid < self.n_launched, joined_s=now, last_seen_s=now)
        self.peers[wid] = p
        return p, replaced

    # ------------------------------------------------------------------ requests
    def current(self, wid: int, inc: int, is_push: bool = False) -> Peer:
        """The live incarnation named by (wid, inc); anything else is refused (a push from one is counted)."""
        p = self.peers.get(wid)
        if p is None:
            raise ProtocolError(f"worker {wid} has not said hello to this server", "unknown_worker")
        if p.quarantined:
            raise ProtocolError(f"worker {wid} is quarantined ({QUARANTINE_WHY})", "quarantined")
        if p.inc != inc:
            self.stale_pushes += is_push
            raise ProtocolError(f"worker {wid} incarnation {inc} is stale (current: {p.inc})", "stale_incarnation")
        if not p.alive:
            self.stale_pushes += is_push
            raise ProtocolError(f"worker {wid} incarnation {inc} was declared dead", "dead")
        if p.finished:
            raise ProtocolError(f"worker {wid} has finished", "finished")
        return p

    @staticmethod
    def touch(p: Peer, ident: bytes, now: float) -> None:
        """A valid request: its connection is where replies go now, and it is a sign of life."""
        p.ident, p.last_seen_s = ident, now

    def heartbeat(self, wid: int, inc: int, now: float) -> bool:
        """A heartbeat from (wid, inc); True when that incarnation is alive, False when it is the current one but
        was declared dead (a paused worker learns it while it waits), or when the worker id is unknown (a restarted
        server: the reply's server_id tells the worker). Another incarnation of a known id is refused
        (stale_incarnation), like its other requests."""
        p = self.peers.get(wid)
        if p is not None and p.inc != inc:
            raise ProtocolError(f"worker {wid} incarnation {inc} is stale (current: {p.inc})", "stale_incarnation")
        live = p is not None and p.alive
        if live:
            p.last_seen_s = now
        return live

    def expired(self, now: float, timeout_s: float) -> list[Peer]:
        """Live workers silent for longer than timeout_s: they are declared dead here, and returned."""
        dead = [p for p in self.peers.values() if p.live and now - p.last_seen_s > timeout_s]
        for p in dead:
            p.alive = False
            self.deaths += 1
        return dead

    def bad_push(self, p: Peer) -> bool:
        """A refused push (or a stall) of p; True when that quarantines it (max_bad_pushes in a row)."""
        p.bad_streak += 1
        if p.bad_streak < self.max_bad_pushes:
            return False
        p.quarantined, p.alive = True, False
        self.quarantined.append(p.wid)
        return True

    def count_bad(self, ident: bytes) -> None:
        """A malformed message from a connection; the least noisy one is forgotten when the table is full."""
        if ident not in self.bad_by_conn and len(self.bad_by_conn) >= BAD_PEERS_KEPT:
            del self.bad_by_conn[min(self.bad_by_conn, key=self.bad_by_conn.get)]
        self.bad_by_conn[ident] = self.bad_by_conn.get(ident, 0) + 1

    def live(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.live]

    def participants(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.participates]
