"""The server's decisions: one handle(event, now) -> instructions over membership, the consistency gate, shard
leases, parked pulls and the stop rules (pure: no sockets, no files, no clock of its own).

Every reply, update and checkpoint is an instruction the shell carries out in order, after handle() returns; an
instruction that sends theta comes after the updates it must include. Transitions never call each other in a
cycle: leaving, applying a step and stopping only change state, and one work loop (_settle) answers the parked
pulls that the new state allows until none is left to answer.

Split over a few modules, one state machine: who is in the run, joining at the first pull and stragglers
(psrv/roster.py); refused pushes and a diverging run (psrv/sanctions.py, with the bounds of psrv/guard.py and the
deadline of psrv/progress.py); its part of a checkpoint (psrv/resume.py).
"""
from __future__ import annotations

import logging
import math

import numpy as np

from . import events as ev
from . import resume
from .consistency import APPLY, COMPLETE, LATE, Gate
from .errors import ProtocolError
from .guard import LossWatch, PushGuard
from .membership import Membership, Peer
from .progress import Progress
from .protocol import VERSION, Op
from .report import Record, Stats
from .roster import Roster
from .sanctions import Sanctions
from .schedule import Schedule

log = logging.getLogger("psrv.server")


def run_steps(cfg) -> int | None:
    """The step count that ends the run: train.steps, unless only train.epochs was asked for (None)."""
    t = cfg.train
    return t.steps if (t.epochs == 0 or "train.steps" in cfg.explicit) else None


class Coordinator(Roster, Sanctions):
    def __init__(self, cfg, shard_sizes: list[int], store, server_id: str, now: float, alone: bool = False,
                 shm: bool = False, has_test: bool = False):
        """cfg: a psrv.config.Config (read only). store: checks and measures pushed gradients (check, measure); the
        shell applies the updates this coordinator orders to it."""
        t = cfg.train
        self.cfg, self.store, self.server_id, self.alone, self.has_test = cfg, store, server_id, alone, has_test
        self.n_expected = t.workers
        self.n_start = t.workers                  # joins that open the gate (after a restart: who was training)
        self.members = Membership(t.workers, cfg.server.max_bad_pushes, shm)
        self.gate = Gate(t.consistency, staleness=t.staleness, backup=t.backup_workers,
                         whole_steps=t.group_steps > 1)
        self.schedule = Schedule(shard_sizes, dynamic=t.schedule == "dynamic")
        self.max_steps = run_steps(cfg)
        # local SGD: one pull serves every local step's rows (group steps: _group_budget)
        self.rows_per_pull = t.batch_size * t.local_steps
        # group steps: each gate step holds up to K of BSP's steps, which train.steps, the schedule and the logs
        # count: bsp_steps of them are done, and the group step being served holds group_len (its longest batch)
        self.group_k = t.group_steps if t.group_steps > 1 else 0
        self.bsp_steps = 0
        self.group_len = 0
        self.group_first = 0   # ... and the first BSP step of the group step applied last
        self.stats = Stats()
        self.version = 0                          # updates ordered so far (the store's version once carried out)
        self.batches: dict[int, list] = {}        # wid -> the batch it was served and has not pushed
        self.parked: dict[int, tuple] = {}        # wid -> (clock, rid, since_s) of a pull waiting for the gate
        self.step_records: list[tuple] = []       # BSP: pushes in the accumulator, accounted once their step applies
        self.applied_records: list[tuple] = []    # applied, accounted after the replies went out
        self.saved_clocks: dict[int, int] = {}    # wid -> clock at the checkpoint this run resumed from
        self.finished_at: dict[int, int] = {}     # wid -> clock of a worker told to stop (psrv/resume.py)
        self.rejoin_at: dict[int, int] = {}       # straggler -> the clock it resumes at when it pulls again
        self.late: dict[int, tuple] = {}          # straggler -> (clock, count) of the batch it held: dropped as late
        self.guard = PushGuard(cfg.server.max_grad_ratio)   # what a push may change (psrv/guard.py)
        self.watch = LossWatch()                  # the run's own loss: divergence
        self.progress = Progress(cfg.server.progress_deadline_s)  # stragglers (psrv/progress.py)
        self.stopping = ""                        # why the run is ending ("" while it is not)
        self.done = False
        self.finish_sent = False
        self.failed = False                       # the run diverged: it ends with ev.Fail
        self.t0, self.started_s, self.elapsed_before_s = now, None, 0.0
        self.join_deadline_s = now + cfg.server.join_timeout_s
        self.resumed = False
        self.updated = False
        self.loss_sum, self.loss_rows, self.last_loss = 0.0, 0, None
        self.logged_step = self.evaluated_step = self.checkpointed_step = self.checkpointed_version = 0
        self._out: list = []
        self._handlers = {ev.Hello: self._on_hello, ev.Pull: self._on_pull, ev.Push: self._on_push,
                          ev.Heartbeat: self._on_heartbeat, ev.Bye: self._on_bye, ev.Malformed: self._on_malformed,
                          ev.Tick: self._on_tick, ev.Stop: self._on_stop}

    # ------------------------------------------------------------------ the one entry point
    def handle(self, event, now: float) -> list:
        """The instructions that answer `event`, in the order they must be carried out."""
        self._out = out = []
        self._now = now
        try:
            self._handlers[type(event)](event)
        except ProtocolError as e:
            self._refuse(event.ident, e.code, str(e), event.rid)
        # both are no-ops in the common case that did not park a pull or apply a gradient: skipped for speed
        if self.parked or self.stopping:
            self._settle()
        if self.applied_records or self.updated:
            self._bookkeeping()
        if self.done and not self.finish_sent:  # once, and after the outputs it must include
            self.finish_sent = True
            out.append(ev.Finish(self.stopping))
        return out

    def _refuse(self, ident: bytes, code: str, reason: str, rid) -> None:
        self.stats.bad_messages += 1
        self.members.count_bad(ident)
        log.debug("refused a message from %r: %s", ident, reason)
        self._send(ident, {"op": Op.ERROR.value, "code": code, "reason": reason}, rid)

    def _send(self, ident: bytes, header: dict, rid) -> None:
        if rid is not None:
            header["rid"] = rid
        self._out.append(ev.Send(ident, header))

    # ------------------------------------------------------------------ events
    def _on_malformed(self, e: ev.Malformed) -> None:
        self._refuse(e.ident, e.code, e.reason, e.rid)

    def _on_hello(self, e: ev.Hello) -> None:
        if e.version != VERSION:
            raise ProtocolError(f"protocol version mismatch: client speaks v{e.version}, server speaks v{VERSION}",
                                "version_mismatch")
        if e.role != "worker":
            raise ProtocolError(f"hello: role must be 'worker', got {e.role!r}", "bad_field")
        if self.stopping:
            raise ProtocolError(f"the run is ending ({self.stopping}); no new workers", "finished")
        if self.cfg.train.group_steps > 1 and not (e.local and self.members.shm and 0 <= e.wid < self.n_expected):
            # the group's gradients meet in this machine's shared memory, one place per launcher worker
            raise ProtocolError(f"train.group_steps > 1 takes only the launcher's own workers (ids 0 .. "
                                f"{self.n_expected - 1}) on the server's machine", "group_only")
        p, replaced = self.members.hello(e.ident, e.wid, e.pid, e.host, e.local, self._now)
        if replaced is not None:
            log.warning("worker %d re-registered from pid %d; incarnation %d replaces %d", p.wid, e.pid, p.inc,
                        replaced.inc)
            self._leave(replaced)
        self.late.pop(p.wid, None)
        self.rejoin_at.pop(p.wid, None)
        self.finished_at.pop(p.wid, None)
        # registered, not yet in the run: it takes shards and enters the gate at its first pull, when its rows are
        # ready, so that nobody waits for a worker still loading (or one that only sends heartbeats)
        log.info("worker %d said hello (pid %d on %s, incarnation %d)", p.wid, p.pid, p.host, p.inc)
        self._out.append(ev.Welcome(e.ident, p, e.rid))

    def _on_pull(self, e: ev.Pull) -> None:
        p = self.members.current(e.wid, e.inc)
        if not p.ready:  # joining the run: the server gives it its clock
            self.members.touch(p, e.ident, self._now)
            closed = not self.gate.open
            clock = self._take_part(p)
            if closed and self.gate.open:  # it opened the gate: the waiting pulls are served in the order they came
                self.parked[p.wid] = (clock, e.rid, self._now)
            else:
                self._pull(p, clock, e.rid)
            return
        try:
            self.gate.check_pull(p.wid, e.clock)
        except ValueError as x:
            raise ProtocolError(f"pull: {x}", "bad_clock") from None
        self.members.touch(p, e.ident, self._now)
        self._pull(p, e.clock, e.rid)

    def _on_push(self, e: ev.Push) -> None:
        if e.sid != self.server_id:
            # computed against theta from another server process (one that died): never applied
            self.members.stale_pushes += 1
            raise ProtocolError(f"push for server {e.sid}, but this is server {self.server_id}; say hello again",
                                "stale_server")
        p = self.members.current(e.wid, e.inc, is_push=True)
        if e.seq <= p.seq or self._pushed_before(p, e):
            self.stats.duplicates += 1
            self._send(e.ident, {"op": Op.ACK.value, "applied": False, "reason": "duplicate"}, e.rid)
            return
        if e.grad is None or (not e.framed and not p.shm):
            raise ProtocolError(f"push: no gradient frame, and worker {p.wid} has no shared-memory slot", "bad_frames")
        try:
            self.store.check(e.grad, e.keys)
        except TypeError as x:
            raise ProtocolError(f"push: {x}", "bad_dtype") from None
        except ValueError as x:
            raise ProtocolError(f"push: {x}", "bad_shape") from None
        batch = self.batches.get(p.wid)
        late = self.late.get(p.wid) if batch is None else None   # a straggler's push, dropped as late
        if late is not None and late != (e.clock, e.count):
            late = None
        if late is None and (batch is None or e.count != batch[3]):
            raise ProtocolError(f"push: count {e.count} is not the size of the batch served "
                                f"({batch[3] if batch else 'none'})", "bad_field")
        if not 0 <= e.version <= self.version:
            raise ProtocolError(f"push: theta version {e.version} was never served (now {self.version})", "bad_field")
        if not (0 <= e.compute_s < 1e6 and 0 <= e.request_s < 1e6):  # NaN fails too
            key = "compute_s" if not 0 <= e.compute_s < 1e6 else "request_s"
            raise ProtocolError(f"push: {key} = {getattr(e, key)!r} is not a plausible number", "bad_field")
        self.members.touch(p, e.ident, self._now)
        if self.stopping:  # the run is ending: nothing more is applied, the worker is told to leave
            p.seq = e.seq
            self._finish(p, e.rid, self.stopping)
            return
        # what a push may change (psrv/guard.py): never a non-finite gradient or loss, nor an outlier norm
        if e.ranges:
            # server.shards > 1: the whole push's, from range 0's slice here and each range server's own measure of
            # its slice (what it will apply if ordered; never the worker's word)
            finite, sq = self.store.squares(e.grad)
            for _, ok, part in e.ranges:
                finite, sq = finite and ok, sq + part
            norm = math.sqrt(sq)
        else:
            finite, norm = self.store.measure(e.grad)
        if e.state is not None and finite:   # group steps: the member's optimizer state, which the step takes too
            finite = bool(np.isfinite(e.state).all())
        refused = self.guard.judge(norm, e.loss) if finite else "nonfinite"
        if late is not None:
            self._late_push(p, e, refused, norm)
            return
        try:
            decision = self.gate.push(p.wid, e.clock)
        except ValueError as x:
            raise ProtocolError(f"push: {x}", "bad_clock") from None
        p.seq = e.seq
        del self.batches[p.wid]
        self.progress.pushed(p.wid, self._now)
        if refused:
            # counted as this worker's (missing) part of the step: theta never sees it; a BSP step goes on with
            # the others' gradients
            if decision == COMPLETE:
                self._apply_step()
            if self._refuse_push(p, refused, e, norm):
                return
        else:
            p.bad_streak = 0
            self.guard.accept(p.wid, norm)
        applied = decision != LATE and not refused
        if applied:
            # request_s is the worker's wait for the theta it computed this on: of that wait, the server held the
            # pull for held_s (the barrier or the staleness bound), at most all of it
            held_s = p.held_s if p.held_s <= e.request_s else e.request_s  # min(), spelled out
            record = Record(p, batch, e.count, e.loss, e.compute_s, e.request_s, held_s,
                            self.gate.staleness_of(p.wid, e.clock), self.version - e.version,
                            _checked_notes(e.notes, e.count) if e.notes is not None else None)
            if decision == APPLY:
                # each gradient counts 1/N, so N pushes move theta as far as one BSP step (exactly so for SGD)
                self.version += 1
                self._out.append(ev.Update(e.grad, e.keys, self.step, self.version,
                                           1.0 / (len(self.gate.members) or 1), p.wid, e.clock,
                                           tuple(m[0] for m in e.ranges)))
                self.stats.applied += 1
                self.applied_records.append(record)
                self._updated()
            else:
                # its rows count as visited, and it in the statistics, once the step it belongs to is applied
                self._out.append(ev.Accumulate(e.grad, e.keys, p.wid, e.clock, tuple(m[0] for m in e.ranges),
                                               e.state))
                self.step_records.append(record)
                if decision == COMPLETE:
                    self._apply_step()
        p.held_s = 0.0
        if e.pull:
            self._pull(p, e.clock + 1, e.rid)
        else:
            reason = "" if applied else (refused or "late")
            self._send(e.ident, {"op": Op.ACK.value, "applied": applied, "reason": reason}, e.rid)
        p.pushed(self._now)
        if not applied and not refused:
            self.stats.dropped[p.wid] = self.stats.dropped.get(p.wid, 0) + 1

    def _pushed_before(self, p: Peer, e: ev.Push) -> bool:
        """A push (with a new seq) for a clock this worker has pushed already, or was moved past: a repeat, not a
        gradient for a batch it holds (a straggler's push for the batch it held is dropped as late instead)."""
        m = self.gate.members.get(p.wid)
        held = self.late.get(p.wid)
        return m is not None and e.clock < m.pushed and (held is None or held[0] != e.clock)

    def _on_heartbeat(self, e: ev.Heartbeat) -> None:
        live = self.members.heartbeat(e.wid, e.inc, self._now)
        # `alive: false` tells a worker paused past the timeout that it was declared dead, even while it waits
        # for a reply that will never come. `waiting`: the server holds a pull of this worker; a worker waiting
        # while the server holds nothing of it knows its request or the reply was lost, and starts over.
        self._send(e.ident, {"op": Op.HEARTBEAT.value, "server_id": self.server_id, "step": self.step,
                             "alive": live, "waiting": live and e.wid in self.parked}, e.rid)

    def _on_bye(self, e: ev.Bye) -> None:
        p = self.members.current(e.wid, e.inc)
        log.info("worker %d (pid %d on %s) left at clock %d", p.wid, p.pid, p.host, self.clock_of(p.wid))
        p.alive = False
        self._leave(p)
        self._send(e.ident, {"op": Op.BYE.value}, e.rid)

    def _on_tick(self, e: ev.Tick) -> None:
        now = self._now
        timeout_s = self.cfg.server.heartbeat_timeout_s
        for p in self.members.expired(now, timeout_s):
            log.error("worker %d declared dead: pid %d on %s, clock %d, silent for %.1f s (timeout %g s)", p.wid,
                      p.pid, p.host, self.clock_of(p.wid), now - p.last_seen_s, timeout_s)
            self._leave(p)
        if not self.gate.open and not self.alone and now > self.join_deadline_s:
            joined = sorted(p.wid for p in self.members.participants())
            if self.resumed and joined:  # a worker lost for good before the restart is not waited for
                log.warning("resuming with %d of the %d workers that were training: %s", len(joined), self.n_start,
                            joined)
                self._open()
            else:
                said = sorted(p.wid for p in self.members.live() if not p.ready)
                missing = [w for w in range(self.n_expected) if w not in joined and w not in said]
                self._out.append(ev.Fail(f"only {len(joined)} of {self.n_start} workers joined within "
                                         f"{self.cfg.server.join_timeout_s:g} s (missing worker ids: {missing}"
                                         + (f"; said hello but never pulled: {said})" if said else ")")))
        limit_s = self.cfg.train.max_wall_s
        if self.started_s is not None and limit_s and self.elapsed_s(now) > limit_s:
            self._stop_all("max_wall_s")
        self._check_progress(now)

    def _on_stop(self, e: ev.Stop) -> None:
        self._stop_all(e.reason)
        if e.at_once:
            self.done = True

    # ------------------------------------------------------------------ pulls and batches
    @property
    def step(self) -> int:
        """Steps done: BSP steps applied; under SSP/ASP, gradients applied / workers."""
        if self.group_k:
            return self.bsp_steps
        if self.gate.mode == "bsp":
            return self.gate.step
        n = self.n_expected
        return self.stats.applied // (n if n > 1 else 1)

    def clock_of(self, wid: int) -> int:
        m = self.gate.members.get(wid)
        return m.pushed if m is not None else -1

    def _pull(self, p: Peer, clock: int, rid) -> None:
        limit = self.max_steps
        if self.stopping:
            self._finish(p, rid, self.stopping)
        elif limit is not None and self.step >= limit:  # resumed from its last step
            self._stop_all("steps")
            self._finish(p, rid, "steps")
        elif limit is not None and clock >= limit and self.gate.mode == "bsp" and not self.group_k:
            self._finish(p, rid, "steps")  # the others finish the last step without it
        elif self.gate.may_serve(p.wid, clock):
            self._serve(p, clock, rid)
        else:
            self.parked[p.wid] = (clock, rid, self._now)

    def _serve(self, p: Peer, clock: int, rid) -> None:
        serving = self.gate.members[p.wid].serving
        batch = self.batches.get(p.wid)
        if batch is not None and serving is not None:
            # asked again before pushing (its reply was lost, or the client repeats itself): the same batch and
            # clock again, so that no rows are handed out and skipped
            self._out.append(ev.Theta(p.ident, serving, self.version, batch, p.shm, rid, *self._group_budget()))
            return
        rows, budget = self.rows_per_pull, None
        if self.group_k:   # the run's last group step holds only the steps train.steps has left
            budget = self._group_budget()
            rows = budget[1] * self.cfg.train.batch_size
        batch = self.schedule.next_batch(p.wid, rows, self.cfg.train.epochs)
        if batch is None:
            if self.schedule.held_by(p.wid):
                # every shard it reads has had its epochs; the others finish their steps without it
                self._finish(p, rid, "epochs")
                if self.schedule.all_done(self.cfg.train.epochs) and not self.batches:
                    self._stop_all("epochs")
            else:  # no shard to read (none left to share): it waits, out of the gate, until one frees up
                self.parked[p.wid] = (clock, rid, self._now)
                self._gate_leave(p.wid)
            return
        clock = self.gate.serve(p.wid, clock)
        self.batches[p.wid] = batch
        self.progress.served(p.wid, self._now)
        if budget is not None:
            b = self.cfg.train.batch_size
            self.group_len = max(self.group_len, (batch[3] + b - 1) // b)
            self._out.append(ev.Theta(p.ident, clock, self.version, batch, p.shm, rid, *budget))
        else:
            self._out.append(ev.Theta(p.ident, clock, self.version, batch, p.shm, rid))

    def _group_budget(self) -> tuple[int, int]:
        """Group steps: (the first BSP step of the group step being served, how many BSP steps it may hold: K, or
        fewer at the end of train.steps)."""
        limit = self.max_steps
        return self.bsp_steps, self.group_k if limit is None else max(1, min(self.group_k, limit - self.bsp_steps))

    def _settle(self) -> None:
        """The work loop: answer every parked pull the gate now allows (or tell it to stop), until answering one
        changes nothing more; then note whether the run is over."""
        progressed = True
        while progressed:
            progressed = False
            for wid in list(self.parked):
                entry = self.parked.get(wid)
                p = self.members.peers.get(wid)
                if entry is None:
                    continue
                if p is None or not p.live:
                    del self.parked[wid]
                elif self.stopping or self.gate.may_serve(wid, entry[0]):
                    del self.parked[wid]
                    p.held_s = self._now - entry[2]
                    self._pull(p, entry[0], entry[1])
                    progressed = True
        if self.stopping and not self.members.participants():  # one only registered is not waited for
            self.done = True

    # ------------------------------------------------------------------ updates
    def _apply_step(self) -> None:
        """BSP: the gate has moved on; the collected gradients (group steps: how far the members moved theta)
        become one update (none: theta stays)."""
        self.applied_records += self.step_records
        n = len(self.step_records)
        self.step_records = []
        # group steps: the members took the step's sub-steps whatever the server makes of their pushes
        self.group_first = self.bsp_steps
        if not self.gate.abandoned:   # nobody took an abandoned step's sub-steps; its rows are served again
            self.bsp_steps += self.group_len
        self.group_len = 0
        if n == 0:
            return
        self.stats.applied += n
        self.version += 1
        self._out.append(ev.ApplyStep(self.gate.step - 1, self.version,
                                      self.bsp_steps - self.group_first if self.group_k else 1))
        self._updated()

    def _updated(self) -> None:
        self.updated = True
        if self.max_steps is not None and self.step >= self.max_steps:
            self._stop_all("steps")

    def flush_loss(self, now: float) -> ev.Log | None:
        """The metrics line of the pushes applied since the last one (at the end of the run), if any."""
        if not self.loss_rows:
            return None
        self.last_loss = self.loss_sum / self.loss_rows
        self.loss_sum, self.loss_rows, self.logged_step = 0.0, 0, self.step
        return ev.Log(self.step, self.elapsed_s(now), self.stats.samples, self.last_loss)

    def _bookkeeping(self) -> None:
        """After the replies: account the applied gradients, then the metrics line, evaluation and checkpoint."""
        samples, notes = self.stats.samples, None
        for r in self.applied_records:
            if r.batch is not None:
                self.schedule.commit(r.batch)
            self.stats.account(r)
            if r.notes is not None and self.group_k:
                notes = r.notes if notes is None else _merge_notes(notes, r.notes)
            else:
                self.loss_sum += r.loss * r.count
                self.loss_rows += r.count
            self.watch.add(r.loss)
        if notes is not None:
            self._log_group_step(notes, samples)
        if self.applied_records and not self.stopping:
            self._check_divergence()
        self.applied_records.clear()
        if not self.updated or self.failed:
            return
        self.updated = False
        step = self.step
        if step >= self.logged_step + self.cfg.train.log_every and self.loss_rows:
            self._out.append(self.flush_loss(self._now))
        every = self.cfg.train.eval_every
        if every and self.has_test and step >= self.evaluated_step + every:
            self.evaluated_step = step - step % every
            self._out.append(ev.Evaluate(step))
        every = self.cfg.checkpoint.every_steps
        if every and step >= self.checkpointed_step + every:
            self.checkpointed_step, self.checkpointed_version = step, self.version
            self._out.append(ev.Checkpoint(step))

    # ------------------------------------------------------------------ stopping (joining, leaving: psrv/roster.py)
    def _log_group_step(self, notes, samples: int) -> None:
        """Group steps: a metrics line at each of the applied group step's BSP steps that train.log_every names, as
        BSP without group steps writes it (the loss of the rows since the last line, the time the step ended),
        from the members' notes summed over members (psrv/group.py)."""
        every = self.cfg.train.log_every
        for k, (rows, loss_sum, end_s) in enumerate(notes.tolist()):
            self.loss_sum += loss_sum
            self.loss_rows += int(rows)
            samples += int(rows)
            step = self.group_first + k + 1
            if step >= self.logged_step + every and self.loss_rows:
                self.last_loss = self.loss_sum / self.loss_rows
                # a worker's clock reading, never later than the push that brought it
                self._out.append(ev.Log(step, self.elapsed_s(min(end_s, self._now)), samples, self.last_loss))
                self.loss_sum, self.loss_rows, self.logged_step = 0.0, 0, step

    def _stop_all(self, reason: str) -> None:
        """End the run: every worker is told to stop at its next request; waiting ones are told by _settle."""
        if not self.stopping:
            self.stopping = reason
            log.info("stopping: %s", reason)

    def elapsed_s(self, now: float) -> float:
        return self.elapsed_before_s + now - (self.started_s if self.started_s is not None else self.t0)

    # ------------------------------------------------------------------ checkpoints (psrv/resume.py)
    def state(self, now: float) -> dict:
        """Plain values of everything a restarted server needs (resume.state)."""
        return resume.state(self, now)

    def restore(self, st: dict) -> None:
        resume.restore(self, st)


def _checked_notes(notes, count: int):
    """A member's notes (psrv/group.py) as a (sub-steps, 3) float64 array, if they make sense for a push of `count`
    rows: whole non-negative rows summing to count, finite losses and times; None otherwise (its push's one loss
    is then logged instead, at the group step's end)."""
    if not (isinstance(notes, np.ndarray) and notes.ndim == 2 and notes.shape[1] == 3 and notes.dtype == np.float64):
        return None
    rows = notes[:, 0]
    if not (np.isfinite(notes).all() and (rows >= 0).all() and (rows == np.floor(rows)).all()
            and int(rows.sum()) == count):
        return None
    return notes


def _merge_notes(a, b):
    """Two members' notes of one group step, summed per sub-step (rows, loss sums), the later end time kept."""
    n = max(len(a), len(b))
    out = np.zeros((n, 3))
    for x in (a, b):
        out[:len(x), :2] += x[:, :2]
        np.maximum(out[:len(x), 2], x[:, 2], out=out[:len(x), 2])
    return out
