"""The training record: metrics.jsonl lines (all of them), a bounded loss history for plots, and the plateau test
behind train.tol.

The training loss logged every train.log_every steps is the row-weighted mean of the mini-batch losses pushed since the
previous line (each batch at the theta it was computed at): it costs nothing extra, unlike a pass over all rows.
"""
from __future__ import annotations

import json
from collections import deque

from .outputs import strict

PLOT_POINTS = 2000  # points of each curve kept for loss.png; metrics.jsonl has every line


class Thinned:
    """At most `cap` points of a growing series, evenly spaced over it: every stride-th point, the stride doubling
    (every other point dropped) whenever the cap is reached, plus always the newest. A series of fewer than `cap`
    points is kept whole, so a short run plots exactly what it logged; a long one costs memory independent of its
    length."""

    def __init__(self, cap: int = PLOT_POINTS):
        self.cap, self.stride, self.n = max(cap, 2), 1, 0
        self.kept: list = []   # points whose index is a multiple of stride: the first always among them
        self.last = None

    def append(self, point) -> None:
        if self.n % self.stride == 0:
            self.kept.append(point)
            if len(self.kept) >= self.cap:  # one place stays free for the newest point
                self.kept = self.kept[::2]
                self.stride *= 2
        self.last = point
        self.n += 1

    def points(self) -> list:
        if self.n and self.kept[-1] is not self.last:
            return self.kept + [self.last]
        return list(self.kept)


class Metrics:
    def __init__(self, path: str, tol: float = 0.0, tol_window: int = 5, append: bool = False):
        # line-buffered: `tail -f` and a crash both see whole lines; a resumed run appends to its own record
        self.fh = open(path, "a" if append else "w", buffering=1)
        self.tol, self.tol_window = tol, tol_window
        # Bounded whatever the run's length (a list of every line was 3 GB a day at 2,000 steps/s): the plotted
        # curves thinned, and for plateaued() the best loss before the window plus the window itself.
        self._train = Thinned()   # (step, elapsed_s, loss)
        self._test = Thinned()    # (step, elapsed_s, test_loss, test_metric)
        self._window: deque[float] = deque(maxlen=tol_window)  # the newest tol_window losses
        self._best_before: float | None = None                 # the best loss logged before them

    @property
    def train(self) -> list[tuple[int, float, float]]:
        """(step, elapsed_s, loss) of the logged lines; thinned to at most PLOT_POINTS, first and last kept."""
        return self._train.points()

    @property
    def test(self) -> list[tuple[int, float, float, float]]:
        """(step, elapsed_s, test_loss, test_metric) of the evaluations; thinned like train."""
        return self._test.points()

    @property
    def last_loss(self) -> float | None:
        return self._train.last[2] if self._train.n else None

    def log_train(self, step: int, elapsed_s: float, samples: int, loss: float) -> None:
        """One line: `loss` is the row-weighted mean loss of the batches since the last line (the coordinator
        keeps that window)."""
        self._write({"step": step, "loss": loss, "elapsed_s": round(elapsed_s, 4),
                     "samples_per_s": round(samples / elapsed_s, 1) if elapsed_s > 0 else None})
        self._train.append((step, elapsed_s, loss))
        if len(self._window) == self._window.maxlen:  # the oldest loss leaves the window: fold it into the best
            old = self._window[0]
            if self._best_before is None or old < self._best_before:  # min()'s rule, so NaN behaves as before
                self._best_before = old
        self._window.append(loss)

    def log_eval(self, step: int, elapsed_s: float, test_loss: float, test_metric: float, metric_name: str) -> None:
        self._write({"step": step, "elapsed_s": round(elapsed_s, 4), "test_loss": test_loss,
                     "test_metric": test_metric, "metric": metric_name})
        self._test.append((step, elapsed_s, test_loss, test_metric))

    def log_final(self, step: int, elapsed_s: float, loss: float, metric: float, metric_name: str) -> None:
        self._write({"step": step, "elapsed_s": round(elapsed_s, 4), "loss": loss, "metric": metric_name,
                     "train_metric": metric, "full": True})

    def plateaued(self) -> bool:
        """True when the best logged loss of the last tol_window lines is not better than the best before them
        by more than tol (relative)."""
        if self.tol <= 0 or self._best_before is None:  # None: no more than tol_window lines yet
            return False
        before, recent = self._best_before, min(self._window)
        return before - recent <= self.tol * abs(before)

    def _write(self, rec: dict) -> None:
        # strict JSON whatever reaches here: a number that is not finite is written as null
        self.fh.write(json.dumps(strict(rec), allow_nan=False) + "\n")

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()
