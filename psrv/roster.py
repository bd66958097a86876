"""Who is in the run (pure, like the coordinator: a mixin of psrv/coordinator.py's Coordinator, on its state).

A worker's hello registers it; its first pull puts it in the run: it takes shards (leases) and enters the
consistency gate then, when its rows are ready, so nobody waits for a worker that is still loading, or one that
only sends heartbeats. The gate opens once the workers it waits for (the launcher's, or those training at the
checkpoint a run resumed from) are all in. A member that makes no progress within the deadline while others wait
(psrv/progress.py) is a straggler: it leaves the gate and its shards, its batch is served again, its push for that
batch is dropped as late and its next pull brings it back; a stall counts like a refused push (quarantine after
server.max_bad_pushes). A worker that leaves, dies, is replaced, quarantined or finished gives back its batch and
its shards.
"""
from __future__ import annotations

import logging

from . import events as ev
from .membership import Peer
from .protocol import Op
from .schedule import assign, share

log = logging.getLogger("psrv.server")


class Roster:
    def _open(self) -> None:
        self.gate.open = True
        self.started_s = self._now
        log.info("%d workers joined; training %s", len(self.members.participants()),
                 f"resumes at step {self.step}" if self.resumed else "starts")
        self._membership_changed()   # leased over the workers in only: a resumed run may open without some

    def _lease_wids(self, also: int | None = None) -> list[int]:
        """The workers the shards are leased over: those in the run (and `also`); before the gate opens, also
        every worker it waits for, whether it has pulled yet or not (the launcher's, or those training at the
        checkpoint the run resumes from). Counting only those already in, each of the launcher's workers, all
        saying hello before any pulls, was told it would hold every shard: it copied the first
        (data.worker_copy) and then read the one it was given in place."""
        wids = {p.wid for p in self.members.participants()}
        if also is not None:
            wids.add(also)
        if not self.gate.open:
            wids |= set(self.saved_clocks) if self.resumed else set(range(self.n_start))
        return sorted(wids)

    def _membership_changed(self) -> None:
        """Re-lease the shards over the live workers, and let into the gate exactly those with work to do: a
        member that lost its last lease and is not computing leaves it (it waits, parked, for a shard). Before
        the gate opens, the shards are leased over every worker it waits for, in or not: the lease it opens with
        is then the same whatever order they pulled in, and the one each was told at its hello
        (expected_shards), so a worker copies the rows it will read (data.worker_copy)."""
        live = self.members.participants()
        self.schedule.rebalance(self._lease_wids())
        for p in live:
            held = self.schedule.held_by(p.wid)
            member = self.gate.members.get(p.wid)
            if member is None and held:
                clock = self.saved_clocks.pop(p.wid, None)
                back = self.rejoin_at.pop(p.wid, None)
                if back is not None:  # a straggler: at its own next clock, never behind the others
                    clock = max(back, self.gate.min_clock()) if self.gate.members else back
                self.gate.join(p.wid, clock)
                self.progress.mark(p.wid, self._now)
            elif member is not None and not held and member.serving is None:
                self._gate_leave(p.wid)

    def _gate_leave(self, wid: int) -> None:
        """Take a worker out of the gate; if that completes the BSP step, apply it."""
        self.progress.forget(wid)
        if self.gate.leave(wid) and not self.stopping:
            self._apply_step()

    def _take_part(self, p: Peer) -> int:
        """p pulls for the first time since its hello (or since it was a straggler): it takes shards and enters
        the gate now; the gate opens once the workers it waits for are all in. Returns the clock to serve it at."""
        p.ready = True
        self.late.pop(p.wid, None)  # a batch it held as a straggler is abandoned: its push for it is refused
        self._membership_changed()
        if not self.gate.open and len(self.members.participants()) >= self.n_start:
            self._open()
        m = self.gate.members.get(p.wid)
        return m.pushed if m is not None else 0

    def expected_shards(self, wid: int) -> list[int]:
        """The shards wid would read if it entered the run now: a hint for a worker that loads its own rows, to
        load them before its first pull (leases move as workers come and go; a shard it is given later is loaded
        then)."""
        if self.schedule.dynamic:
            return list(range(len(self.schedule.cursors)))
        live = self._lease_wids(also=wid)   # as _membership_changed leases them
        n = len(self.schedule.cursors)
        lease = assign(n, live, self.schedule.lease)
        held = sorted(s for s, w in lease.items() if w == wid)
        return held or [s for w, s in share(n, live, lease).items() if w == wid]

    def _leave(self, p: Peer, straggler: bool = False) -> None:
        """p is gone (finished, left, dead, replaced or quarantined), or a straggler: its pull and its unpushed
        batch go back."""
        if not straggler:
            self.late.pop(p.wid, None)
            self.rejoin_at.pop(p.wid, None)
            self.guard.forget(p.wid)
        self.parked.pop(p.wid, None)
        batch = self.batches.pop(p.wid, None)
        if batch is not None:  # never pushed: hand it out again
            self.schedule.give_back(batch)
        self._gate_leave(p.wid)
        self._membership_changed()

    def _finish(self, p: Peer, rid, reason: str) -> None:
        p.finished = True
        m = self.gate.members.get(p.wid)
        if m is not None:  # done, not lost: a checkpoint of the run's end counts it in (psrv/resume.py)
            self.finished_at[p.wid] = m.pushed
        self._send(p.ident, {"op": Op.STOP.value, "reason": reason}, rid)
        self._leave(p)

    def _late_push(self, p: Peer, e: ev.Push, refused: str, norm: float) -> None:
        """A straggler's push for the batch it held when the others went on without it: never applied (its rows
        were served again); with it, the straggler is back in the run."""
        del self.late[p.wid]
        p.seq = e.seq
        if refused:
            if self._refuse_push(p, refused, e, norm):
                return
        else:
            p.bad_streak = 0
            self.stats.dropped[p.wid] = self.stats.dropped.get(p.wid, 0) + 1
        p.pushed(self._now)
        if e.pull:
            self._pull(p, self._take_part(p), e.rid)
        else:
            self._send(e.ident, {"op": Op.ACK.value, "applied": False, "reason": refused or "late"}, e.rid)

    def _check_progress(self, now: float) -> None:
        if self.gate.open and not self.stopping:
            for wid in self.progress.stragglers(now, self.gate.members, self.parked):
                self._straggle(self.members.peers[wid])

    def _straggle(self, p: Peer) -> None:
        """p made no progress within the deadline while others wait: the gate goes on without it, its batch is
        served again and its shards move to the others; its push for that batch is dropped as late, and its next
        pull brings it back. A stall counts like a refused push (quarantine after server.max_bad_pushes)."""
        m = self.gate.members[p.wid]
        log.warning("worker %d (pid %d on %s) made no progress for %.1f s (deadline %.1f s) at clock %d; the others "
                    "go on without it", p.wid, p.pid, p.host, self._now - self.progress.since.get(p.wid, self._now),
                    self.progress.deadline_s(), m.pushed)
        self.stats.straggles += 1
        batch = self.batches.get(p.wid)
        if batch is not None:
            self.late[p.wid] = (m.serving, batch[3])
        self.rejoin_at[p.wid] = m.serving + 1 if m.serving is not None else m.pushed
        p.ready = False
        if self.members.bad_push(p):
            log.error("worker %d quarantined: %d stalls or refused pushes in a row", p.wid, p.bad_streak)
        self._leave(p, straggler=not p.quarantined)
