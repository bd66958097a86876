"""The consistency gate for BSP, SSP and ASP: which pulls may be answered now and what to do with a push.

A pure state machine over worker clocks (events in, decisions out; no sockets, no clocks of the wall kind), so it
tests in milliseconds. A worker's clock counts the gradients it has had accounted for (applied or dropped);
"live" means joined and not yet left; only live workers hold the others back.
"""
from __future__ import annotations

from dataclasses import dataclass

APPLY = "apply"            # ASP/SSP: apply this gradient now
ACCUMULATE = "accumulate"  # BSP: add to the current step, which still waits for others
COMPLETE = "complete"      # BSP: add to the current step, which is now complete: apply the aggregate
LATE = "late"              # BSP with backup workers: that step was already applied; drop and count


@dataclass
class Member:
    pushed: int          # gradients accounted for so far = the clock of the next pull
    serving: int | None  # the clock it was served and has not pushed yet
    min_at_serve: int = 0  # the slowest live clock when that theta was served (for the staleness record)


class Gate:
    def __init__(self, mode: str, staleness: int = 0, backup: int = 0, whole_steps: bool = False):
        """whole_steps (BSP; group steps): a worker that joins while a step is under way starts at the next one,
        whose members are then fixed: a group step's members work it out among themselves, and one that came in
        half way through would read the others' sub-steps out of turn."""
        if mode not in ("bsp", "ssp", "asp"):
            raise ValueError(f"unknown consistency {mode!r}")
        self.mode, self.staleness, self.backup = mode, staleness, backup
        self.whole_steps = whole_steps and mode == "bsp"
        self.members: dict[int, Member] = {}
        self.step = 0            # BSP: steps applied so far; the step being collected
        self.pending: set[int] = set()  # BSP: who has pushed for `step`
        self.later: set[int] = set()    # whole_steps: members that joined during `step`, for the next one
        self.abandoned = False   # the last step completed had no push: its members all left (whole_steps)
        self.open = False        # nothing is served until the launcher's workers have joined

    # ------------------------------------------------------------------ membership
    def join(self, wid: int, clock: int | None = None) -> int:
        """Add a live worker; returns the clock it starts at: `clock` when given (a worker resumed from a
        checkpoint), else never behind the others (BSP: the current step; SSP/ASP: the slowest live clock)."""
        if clock is None:
            clock = self.step if self.mode == "bsp" else (self.min_clock() if self.members else self.step)
        elif self.mode == "bsp":
            clock = max(clock, self.step)
        if self.whole_steps and clock == self.step and self._under_way():
            clock = self.step + 1
            self.later.add(wid)
        self.members[wid] = Member(pushed=clock, serving=None)
        return clock

    def _under_way(self) -> bool:
        """Some member was served the step being collected, or pushed for it."""
        return bool(self.pending) or any(m.serving == self.step for m in self.members.values())

    def step_members(self) -> list[int]:
        """The members of the step being collected, in id order (whole_steps: not those that wait for the next)."""
        return sorted(w for w in self.members if w not in self.later)

    def leave(self, wid: int) -> bool:
        """Remove a worker (done, gone or dead). Returns True when that completes the BSP step being collected."""
        if self.members.pop(wid, None) is None:
            return False
        self.pending.discard(wid)
        self.later.discard(wid)
        return self._bsp_complete()

    def min_clock(self) -> int:
        # a list, not a generator: asked at every SSP/ASP serve, and a generator's frames cost more than the list
        return min([m.pushed for m in self.members.values()]) if self.members else self.step

    # ------------------------------------------------------------------ pulls
    def check_pull(self, wid: int, clock: int) -> None:
        """A pull may ask for the member's next clock or an earlier one (it is then moved forward), never a later
        one: a client cannot jump ahead of its own pushes, nor drag the slowest clock back."""
        m = self.members.get(wid)
        if m is not None and clock > m.pushed:
            raise ValueError(f"worker {wid} pulled clock {clock} but has pushed only up to clock {m.pushed - 1}")

    def _effective(self, m: Member, clock: int) -> int:
        # max() spelled out: this runs for every pull, and a builtin call costs more than the comparisons
        if clock < m.pushed:
            clock = m.pushed
        if self.mode == "bsp" and clock < self.step:
            return self.step
        return clock

    def may_serve(self, wid: int, clock: int) -> bool:
        m = self.members.get(wid)
        if not self.open or m is None:
            return False
        if self.mode == "asp":
            return True
        clock = self._effective(m, clock)
        if self.mode == "bsp":
            return clock <= self.step
        return clock - self.min_clock() <= self.staleness

    def serve(self, wid: int, clock: int) -> int:
        """Record that `wid` gets theta now; returns the clock it must compute (a member behind its own clock or,
        under BSP, behind the step is moved forward)."""
        m = self.members[wid]
        clock = self._effective(m, clock)
        m.pushed = clock
        m.serving = clock
        # under BSP theta holds every step before `step`, whoever lags (a backup-worker straggler catches up)
        m.min_at_serve = self.step if self.mode == "bsp" else self.min_clock()
        return clock

    # ------------------------------------------------------------------ pushes
    def push(self, wid: int, clock: int) -> str:
        """Decide what a gradient computed at `clock` becomes. Raises ValueError for a clock it was not served."""
        m = self.members.get(wid)
        if m is None:
            raise ValueError(f"worker {wid} is not a live member")
        if m.serving != clock:
            raise ValueError(f"worker {wid} pushed clock {clock} but was served clock {m.serving}")
        m.serving = None
        m.pushed = clock + 1
        if self.mode != "bsp":
            return APPLY
        if clock < self.step:
            return LATE
        self.pending.add(wid)
        return COMPLETE if self._bsp_complete() else ACCUMULATE

    def staleness_of(self, wid: int, clock: int) -> int:
        """The pushing worker's clock minus the slowest live clock when its theta was served."""
        return clock - self.members[wid].min_at_serve

    def quorum(self) -> int:
        return max(1, len(self.members) - len(self.later) - self.backup)

    def _bsp_complete(self) -> bool:
        if self.mode != "bsp":
            return False
        # whole_steps: when every member of the step left before pushing and the others wait for the next one,
        # the step is over with nothing in it (else they would wait for ever)
        abandoned = not self.pending and bool(self.later) and len(self.later) >= len(self.members)
        if not abandoned and (not self.pending or len(self.pending) < self.quorum()):
            return False
        self.step += 1
        self.pending.clear()
        self.later.clear()
        self.abandoned = abandoned
        return True
