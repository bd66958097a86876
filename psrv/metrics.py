"""The training record: metrics.jsonl lines, the loss history for plots, and the plateau test behind train.tol.

The training loss logged every log_every steps is the row-weighted mean of the mini-batch losses pushed since the
previous line (each batch at the theta it was computed at): it costs nothing extra, unlike a pass over all rows.
"""
from __future__ import annotations

import json


class Metrics:
    def __init__(self, path: str, log_every: int, tol: float = 0.0, tol_window: int = 5, append: bool = False):
        # line-buffered: `tail -f` and a crash both see whole lines; a resumed run appends to its own record
        self.fh = open(path, "a" if append else "w", buffering=1)
        self.log_every, self.tol, self.tol_window = log_every, tol, tol_window
        self.win_loss = 0.0
        self.win_rows = 0
        self.logged_step = 0
        self.train: list[tuple[int, float, float]] = []        # (step, elapsed_s, loss)
        self.test: list[tuple[int, float, float, float]] = []  # (step, elapsed_s, test_loss, test_metric)

    @property
    def last_loss(self) -> float | None:
        return self.train[-1][2] if self.train else None

    def add_batch(self, loss: float, rows: int) -> None:
        self.win_loss += loss * rows
        self.win_rows += rows

    def due(self, step: int) -> bool:
        return step >= self.logged_step + self.log_every

    def log_train(self, step: int, elapsed_s: float, samples: int) -> None:
        """One line for the batches since the last line (nothing if there were none)."""
        if self.win_rows == 0:
            return
        loss = self.win_loss / self.win_rows
        self._write({"step": step, "loss": loss, "elapsed_s": round(elapsed_s, 4),
                     "samples_per_s": round(samples / elapsed_s, 1) if elapsed_s > 0 else None})
        self.train.append((step, elapsed_s, loss))
        self.win_loss, self.win_rows, self.logged_step = 0.0, 0, step

    def log_eval(self, step: int, elapsed_s: float, test_loss: float, test_metric: float, metric_name: str) -> None:
        self._write({"step": step, "elapsed_s": round(elapsed_s, 4), "test_loss": test_loss,
                     "test_metric": test_metric, "metric": metric_name})
        self.test.append((step, elapsed_s, test_loss, test_metric))

    def log_final(self, step: int, elapsed_s: float, loss: float, metric: float, metric_name: str) -> None:
        self._write({"step": step, "elapsed_s": round(elapsed_s, 4), "loss": loss, "metric": metric_name,
                     "train_metric": metric, "full": True})

    def plateaued(self) -> bool:
        """True when the best logged loss of the last tol_window lines is not better than the best before them
        by more than tol (relative)."""
        if self.tol <= 0 or len(self.train) <= self.tol_window:
            return False
        before = min(x[2] for x in self.train[:-self.tol_window])
        recent = min(x[2] for x in self.train[-self.tol_window:])
        return before - recent <= self.tol * abs(before)

    def _write(self, rec: dict) -> None:
        self.fh.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if not self.fh.closed:
            self.fh.close()
