"""What the coordinator does with pushes it refuses, members that stall and a run that diverges (pure, like the
coordinator: a mixin of psrv/coordinator.py's Coordinator, on its state; the rules themselves are psrv/guard.py's
and psrv/progress.py's).

- A refused push (a non-finite gradient or loss, an outlier norm) is never applied; it counts as the worker's part
  of its step, and against the worker: server.max_bad_pushes in a row quarantine it, unless every other worker's
  latest push was refused too, which is the run diverging, not a peer misbehaving.
- A run whose own loss diverges ends with ev.Fail and a plain message naming the step and the learning rate.
"""
from __future__ import annotations

import logging

from . import events as ev
from .membership import Peer
from .protocol import Op

log = logging.getLogger("psrv.server")


class Sanctions:
    def _refuse_push(self, p: Peer, why: str, e: ev.Push, norm: float) -> bool:
        """Count a refused push ("nonfinite" or "outlier") against p; True when that ends p (quarantined) or the
        run (every worker's pushes refused: the run itself diverged)."""
        self.stats.rejected[why] = self.stats.rejected.get(why, 0) + 1
        bound = self.guard.bound()
        if why == "outlier":
            what = f"a gradient of norm {norm:.3g}" + (f" (bound {bound:.3g})" if bound is not None else "")
        else:
            what = "a gradient with NaN or Inf" if norm != norm or norm == float("inf") else f"loss {e.loss!r}"
        log.warning("worker %d pushed %s at clock %d; refused (%s, %d in a row)", p.wid, what, e.clock, why,
                    p.bad_streak + 1)
        others = [w for w in self.gate.members if w != p.wid]
        if p.bad_streak + 1 >= self.members.max_bad_pushes and others and \
                all(self.members.peers[w].bad_streak > 0 for w in others):
            # not one peer misbehaving: nobody's pushes are accepted any more
            self._diverged(f"every worker's pushes are refused; the last: {what}")
            return True
        if not self.members.bad_push(p):
            return False
        log.error("worker %d quarantined: %d refused pushes in a row (pid %d on %s, clock %d)", p.wid, p.bad_streak,
                  p.pid, p.host, e.clock)
        self._send(p.ident, {"op": Op.ERROR.value, "code": "quarantined",
                             "reason": f"worker {p.wid} made {p.bad_streak} refused pushes in a row (the last: {why})"},
                   e.rid)
        self._leave(p)
        return True

    def _check_divergence(self) -> None:
        loss = self.watch.diverged(len(self.gate.members))
        if loss is not None:
            self._diverged(f"the median loss of the last pushes is {loss:.3g}, over {self.watch.factor:g} x the "
                           f"best, {self.watch.best:.3g}")

    def _diverged(self, why: str) -> None:
        """The run's own loss diverged: it ends here with a plain message (the shell exits with it)."""
        msg = f"loss diverged at step {self.step} with lr = {self.cfg.train.lr:g}; lower train.lr ({why})"
        self._out.append(ev.Fail(msg))  # the shell logs it and exits with it
        self.stopping = self.stopping or "diverged"
        self.done = self.finish_sent = self.failed = True  # a failure, not a finish: no outputs
