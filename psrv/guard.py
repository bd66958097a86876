"""Bounds on what a push may change, and the run's own divergence (pure: no sockets, no clocks, no numpy).

PushGuard judges one push before anything is applied: a loss that is not finite is "nonfinite" (like a gradient with
NaN or Inf, which the store finds); a gradient whose L2 norm is more than `ratio` times the typical accepted norm is
an "outlier". Typical: the median over the workers in the run of each one's median of its last PER_WORKER accepted
norms, so each worker counts once however fast it pushes, and a minority of peers can move the estimate neither up
(their big norms are refused and never enter it) nor down (their tiny ones are one vote each). For the first WARMUP
accepted pushes of a run there is no estimate yet and only finiteness is checked, except that a finite gradient
whose norm overflows (entries above about 1e154) is an outlier from the first push on.

LossWatch watches the losses of the pushes that were applied: the run has diverged when the median of the newest
few (the last step's, at least MIN_LOSSES) is more than DIVERGED_FACTOR times the best such median seen and above
the first one (the loss at the start). A median, not a mean, so a minority of peers cannot end the run by
reporting a huge loss; and the start as a floor, so a run that has fit its data to a tiny loss does not count a
noisy batch as divergence. Losses <= 0 (a model of one's own may report them) are only checked for finiteness.
"""
from __future__ import annotations

import math
from collections import deque
from itertools import islice
from statistics import median

WARMUP = 16             # accepted pushes before the norm bound applies
PER_WORKER = 16         # accepted norms remembered per worker
WINDOW = 64             # applied losses the divergence median looks back over
REFRESH = 8             # the median norm is recomputed every REFRESH accepted pushes (a sort per push is waste)
MIN_LOSSES = 5          # losses in the divergence median, at least (more when more workers are in the step)
DIVERGED_FACTOR = 1e4   # the loss median over the best one that counts as divergence


finite = math.isfinite  # checked several times per push: the C function itself, not a Python wrapper around it


class PushGuard:
    def __init__(self, ratio: float, warmup: int = WARMUP, per_worker: int = PER_WORKER):
        """ratio: server.max_grad_ratio (0: no norm bound; finiteness is always checked)."""
        self.ratio, self.warmup, self.per_worker = ratio, warmup, per_worker
        self.recent: dict[int, deque[float]] = {}   # wid -> its newest accepted norms
        self.accepted = 0
        self._median: float | None = None

    def bound(self) -> float | None:
        """The largest norm accepted now (None: no bound yet, or none configured)."""
        if not self.ratio or self.accepted < self.warmup or not self.recent:
            return None
        if self._median is None:
            self._median = median(median(d) for d in self.recent.values())
        return self.ratio * self._median if self._median > 0 else None

    def judge(self, norm: float, loss: float) -> str:
        """"" (acceptable), "nonfinite" (the loss) or "outlier" (the gradient's norm). The caller checks the
        gradient's own finiteness first: a norm of inf or nan here belongs to a finite gradient that overflowed."""
        if not finite(loss):
            return "nonfinite"
        if not finite(norm):
            return "outlier"
        b = self.bound()
        return "outlier" if b is not None and norm > b else ""

    def accept(self, wid: int, norm: float) -> None:
        """A push of worker wid judged acceptable: its norm joins the estimate."""
        d = self.recent.get(wid)
        if d is None:
            d = self.recent[wid] = deque(maxlen=self.per_worker)
            self._median = None
        d.append(norm)
        self.accepted += 1
        if self.accepted % REFRESH == 0 or self.accepted == self.warmup:
            self._median = None

    def forget(self, wid: int) -> None:
        """wid has left the run: its norms leave the estimate."""
        if self.recent.pop(wid, None) is not None:
            self._median = None

    def state(self) -> dict:
        return {"recent": [[w, list(d)] for w, d in self.recent.items()], "accepted": self.accepted}

    def load(self, st: dict | None) -> None:
        if st:
            self.recent = {int(w): deque((float(x) for x in xs), maxlen=self.per_worker) for w, xs in st["recent"]}
            self.accepted = int(st["accepted"])
            self._median = None


class LossWatch:
    def __init__(self, factor: float = DIVERGED_FACTOR, window: int = WINDOW):
        self.factor = factor
        self.losses: deque[float] = deque(maxlen=window)
        self.first: float | None = None
        self.best: float | None = None

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def diverged(self, k: int) -> float | None:
        """The loss median of the newest max(k, MIN_LOSSES) applied pushes when it says the run diverged, else None
        (k: the workers in a step)."""
        if not self.losses:
            return None
        n = len(self.losses)
        k = min(n, max(k, MIN_LOSSES))
        # statistics.median of the newest k, as it computes it (sort, middle or mean of the middle two), without
        # copying the whole window first: this runs after every applied step
        newest = sorted(islice(self.losses, n - k, None))
        m = newest[k // 2] if k % 2 else (newest[k // 2 - 1] + newest[k // 2]) / 2
        if not finite(m):
            return m
        if self.first is None:
            self.first = m
        if self.best is None or m < self.best:
            self.best = m
            return None
        if self.best > 0 and self.first > 0 and m > self.factor * self.best and m > self.first:
            return m
        return None
