"""Progress, not only heartbeats: when each member of the consistency gate last made progress, and who is a
straggler (pure: time is passed in).

A member makes progress when it joins the gate, is served a new batch, or pushes. A member that the server does not
hold (its pull is not parked) and that has made no progress for longer than the deadline, while another member is
waiting on the gate or made progress within the deadline, is a straggler: the coordinator takes it out of the
gate, serves its batch to someone else and moves its shards. The deadline is max(floor, FACTOR x the median time a
batch is held, from being served to its push, over the last WINDOW pushes): long steps of a big model are not taken
for stalls, and a peer that only sends heartbeats, or holds a batch and never pushes, holds the others at most that
long. When every member is equally late (a slow first step) nobody is a straggler: dropping one gains nothing.
"""
from __future__ import annotations

from collections import deque
from statistics import median

FACTOR = 10.0
WINDOW = 64
REFRESH = 8


class Progress:
    def __init__(self, floor_s: float, factor: float = FACTOR, window: int = WINDOW):
        """floor_s: server.progress_deadline_s (0: no deadline)."""
        self.floor_s, self.factor = floor_s, factor
        self.since: dict[int, float] = {}        # gate member -> when it last made progress
        self.served_at: dict[int, float] = {}    # member -> when it was served the batch it holds
        self.held: deque[float] = deque(maxlen=window)  # how long batches were held, served to pushed
        self._n = 0
        self._deadline: float | None = None

    def mark(self, wid: int, now: float) -> None:
        self.since[wid] = now

    def served(self, wid: int, now: float) -> None:
        self.since[wid] = self.served_at[wid] = now

    def pushed(self, wid: int, now: float) -> None:
        t = self.served_at.pop(wid, None)
        if t is not None:
            self.held.append(now - t)
            self._n += 1
            if self._n % REFRESH == 1:
                self._deadline = None
        self.since[wid] = now

    def forget(self, wid: int) -> None:
        self.since.pop(wid, None)
        self.served_at.pop(wid, None)

    def deadline_s(self) -> float:
        if self._deadline is None:
            typical = median(self.held) if self.held else 0.0
            self._deadline = max(self.floor_s, self.factor * typical)
        return self._deadline

    def stragglers(self, now: float, members, parked) -> list[int]:
        """Members (ids, in order) that have made no progress within the deadline while the others have not
        all stalled with them. `parked`: members whose pull the server holds (they are waiting, not stalled)."""
        if not self.floor_s:
            return []
        deadline = self.deadline_s()
        late = [w for w in members if w not in parked and now - self.since.get(w, now) > deadline]
        # every member not late is waiting (parked) or made progress within the deadline
        return late if len(late) < len(members) else []
