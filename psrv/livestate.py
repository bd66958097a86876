"""What the progress line and the live view show, as pure functions: how far the run is and how long it has left
(by the stop rule that ends it first), the curves read from metrics.jsonl as it grows, and the live view's JSON
state made from the launcher's latest progress event and the server's status reply."""
from __future__ import annotations

import json
import os

from .metrics import Thinned
from .outputs import strict

CURVE_POINTS = 600   # points of each curve sent to the page: a second's poll stays small whatever the run's length
EVENTS_KEPT = 50     # newest launcher warnings (restarts, deaths) listed on the page


def completion(step: int, steps: int, epochs_read: float, epochs: int, elapsed_s: float,
               max_wall_s: float) -> tuple[float | None, float | None]:
    """(fraction done in [0, 1], seconds left) by the stop rule that will end the run first: train.steps (`steps`
    0: none), train.epochs (`epochs` 0: none; `epochs_read` are the epochs of rows applied so far) or
    train.max_wall_s (0: none). Steps and epochs extrapolate the rate so far; the wall limit is exact. The seconds
    are None while no rule can say (nothing done yet, or only train.tol applies: its plateau cannot be foreseen);
    the fraction is None only when no rule counts at all."""
    rules = []   # (fraction, seconds left or None)
    for done, total in ((step, steps), (epochs_read, epochs)):
        if total > 0:
            f = min(max(done / total, 0.0), 1.0)
            rules.append((f, elapsed_s * (1.0 - f) / f if f > 0 and elapsed_s > 0 else None))
    if max_wall_s > 0:
        rules.append((min(max(elapsed_s / max_wall_s, 0.0), 1.0), max(max_wall_s - elapsed_s, 0.0)))
    if not rules:
        return None, None
    timed = [r for r in rules if r[1] is not None]
    if timed:
        return min(timed, key=lambda r: r[1])
    return max(r[0] for r in rules), None


def format_eta(seconds: float | None) -> str:
    """12 s, 3:05, 2:03:05; "?" when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def format_percent(fraction: float | None) -> str:
    return "?" if fraction is None else f"{100 * fraction:.0f}%"


def progress_of(ev: dict, epochs: int, max_wall_s: float) -> tuple[float | None, float | None]:
    """completion() for a launcher progress event (events from an older server lack epochs_read)."""
    return completion(ev.get("step", 0), ev.get("steps", 0) or 0, ev.get("epochs_read", 0.0) or 0.0, epochs,
                      ev.get("elapsed_s", 0.0) or 0.0, max_wall_s)


class Curves:
    """The training loss and held-out curves of a run, read from its metrics.jsonl as it grows: each call reads the
    lines written since the last one (a partial last line waits for its end), and keeps at most CURVE_POINTS of
    each curve, evenly spaced (metrics.Thinned)."""

    def __init__(self, path: str, cap: int = CURVE_POINTS):
        self.path, self.cap = path, cap
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self.train = Thinned(self.cap)   # [step, loss]
        self.test = Thinned(self.cap)    # [step, test_loss, test_metric]
        self.metric = ""

    def read(self) -> None:
        try:
            size = os.path.getsize(self.path)
        except OSError:
            return   # not written yet
        if size < self.offset:   # a new file (the folder reused): start over
            self._reset()
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(size - self.offset)
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue   # not ours to judge here; the record stays on disk as written
            if not isinstance(rec, dict) or rec.get("full"):
                continue   # the end-of-run full pass is not a point of the mini-batch curve
            if "test_loss" in rec:
                self.test.append([rec.get("step"), rec.get("test_loss"), rec.get("test_metric")])
                self.metric = str(rec.get("metric", ""))
            elif "loss" in rec:
                self.train.append([rec.get("step"), rec.get("loss")])


WORKER_FIELDS = ("wid", "inc", "pid", "host", "clock", "last_seen_s", "push_rate", "staleness", "alive",
                 "finished", "pushes", "shards")
COUNTERS = ("workers_live", "workers_total", "deaths", "worker_restarts", "server_restarts", "straggles",
            "bad_messages", "quarantined", "rejected")


def state(ev: dict | None, status: dict | None, status_error: str, curves: Curves, events: list,
          epochs: int, max_wall_s: float, out_dir: str) -> dict:
    """The live view's JSON: progress from the launcher's newest progress event `ev`, the worker table and fault
    counters from the server's newest status reply `status` (None, with `status_error` saying why, when it did not
    answer), the curves, and the launcher's warnings `events` ([elapsed_s, text], oldest first). Strict JSON:
    numbers that are not finite become null."""
    ev = ev or {}
    fraction, eta_s = progress_of(ev, epochs, max_wall_s) if ev else (None, None)
    st = status or {}
    return strict({
        "out_dir": out_dir, "step": ev.get("step"), "steps": ev.get("steps") or None,
        "loss": ev.get("loss"), "samples_per_s": ev.get("samples_per_s"), "elapsed_s": ev.get("elapsed_s"),
        "fraction": fraction, "percent": format_percent(fraction), "eta_s": eta_s, "eta": format_eta(eta_s),
        "stopping": st.get("stopping") or "", "consistency": st.get("consistency"),
        "server": "ok" if status is not None else (status_error or "not asked yet"),
        "workers": [{k: w.get(k) for k in WORKER_FIELDS} for w in st.get("workers", [])],
        "counters": {k: st[k] for k in COUNTERS if k in st},
        "train": curves.train.points(), "test": curves.test.points(), "metric": curves.metric,
        "events": [list(e) for e in events[-EVENTS_KEPT:]],
    })
