"""Fault injection for tests and benchmarks: a worker that fails, lags or sends a broken gradient on purpose.

None of it is in the product's loop: a run selects this entry instead of the plain worker with
`--set worker.entry=workers.faults:main`, and describes the faults as JSON in the environment variable PSRV_FAULTS,
which every child inherits at spawn and reads once at start:

    PSRV_FAULTS='{"fail_worker": 1, "fail_at_step": 5}' python launch.py --set worker.entry=workers.faults:main

Keys (all optional): fail_worker + fail_at_step (that worker raises at that step and every later one), slow_worker +
slow_ms (that worker sleeps slow_ms per step; under group steps, per sub-step), nan_worker + nan_steps (that worker
pushes a NaN gradient at those steps, which the server must refuse; under group steps its gradient of the second
sub-step of those group steps is NaN already, which must not reach the other members), outlier_worker +
outlier_steps (the same with a gradient 1000 times too long: under group steps, its copy of theta is), kill_worker +
kill_at_step (that worker kills itself with SIGKILL at that step, before its push (under group steps, before
sub-step kill_sub_step of that group step, the second unless set); only as incarnation 1, so that its restart, which
may be handed the same step again, lives on), hold_worker + hold_at_step + hold_file (that worker waits before its
push at that step for as long as the file exists: a test holds the run where it wants to look at it, and lets it go
on by removing the file).
A worker id of -1 means none.
A step here is the server's clock, the step a theta reply names: under group steps, one group step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np

from psrv import proc
from psrv.spec import WorkerSpec

from . import worker

log = logging.getLogger(__name__)

ENTRY = "workers.faults:main"
ENV = "PSRV_FAULTS"
OVERRIDE = f"worker.entry={ENTRY}"  # the config override (--set) that selects this entry


class Injected(RuntimeError):
    """An error raised on purpose (fail_worker), to test how failures are reported."""


@dataclass(frozen=True)
class Faults:
    fail_worker: int = -1
    fail_at_step: int = 0
    slow_worker: int = -1
    slow_ms: float = 0.0
    nan_worker: int = -1
    nan_steps: tuple = ()
    outlier_worker: int = -1
    outlier_steps: tuple = ()
    kill_worker: int = -1
    kill_at_step: int = 0
    kill_sub_step: int = 1
    hold_worker: int = -1
    hold_at_step: int = 0
    hold_file: str = ""

    @classmethod
    def parse(cls, text: str) -> "Faults":
        """From PSRV_FAULTS's JSON ("" means no faults); ValueError naming what is wrong."""
        if not text.strip():
            return cls()
        try:
            tree = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{ENV} is not JSON ({e}): {text!r}") from None
        if not isinstance(tree, dict):
            raise ValueError(f"{ENV} must be a JSON object such as {{\"fail_worker\": 1, \"fail_at_step\": 5}}; "
                             f"got {text!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(tree) - known)
        if unknown:
            raise ValueError(f"{ENV}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        for k, v in tree.items():
            ok, what = CHECKS[k]
            if not ok(v):
                raise ValueError(f"{ENV}: {k} = {v!r} is not {what}")
        for key in ("nan_steps", "outlier_steps"):
            if key in tree:
                tree[key] = tuple(tree[key])
        return cls(**tree)


def _wid(v) -> bool:
    return type(v) is int and v >= -1


CHECKS = {  # key -> (test, what it must be)
    "fail_worker": (_wid, "a worker id (-1: none)"),
    "fail_at_step": (lambda v: type(v) is int and v >= 0, "a step >= 0"),
    "slow_worker": (_wid, "a worker id (-1: none)"),
    "slow_ms": (lambda v: type(v) in (int, float) and v >= 0, "a number of milliseconds >= 0"),
    "nan_worker": (_wid, "a worker id (-1: none)"),
    "nan_steps": (lambda v: isinstance(v, list) and all(type(x) is int and x >= 0 for x in v),
                  "a list of steps >= 0"),
    "outlier_worker": (_wid, "a worker id (-1: none)"),
    "outlier_steps": (lambda v: isinstance(v, list) and all(type(x) is int and x >= 0 for x in v),
                      "a list of steps >= 0"),
    "kill_worker": (_wid, "a worker id (-1: none)"),
    "kill_at_step": (lambda v: type(v) is int and v >= 0, "a step >= 0"),
    "kill_sub_step": (lambda v: type(v) is int and v >= 0, "a sub-step >= 0"),
    "hold_worker": (_wid, "a worker id (-1: none)"),
    "hold_at_step": (lambda v: type(v) is int and v >= 0, "a step >= 0"),
    "hold_file": (lambda v: isinstance(v, str), "a path"),
}

OUTLIER = 1000.0     # how much too long an outlier gradient is
HOLD_POLL_S = 0.01   # how often a held worker looks whether its hold file is gone
HOLD_MAX_S = 300.0   # ... and how long at most: a test that died without removing it must not leave a worker held


def env(**faults) -> dict[str, str]:
    """{PSRV_FAULTS: their JSON}: the environment to give a launcher subprocess."""
    Faults.parse(json.dumps(faults))  # a typo fails here, in the test, not later in a child
    return {ENV: json.dumps(faults)}


@contextlib.contextmanager
def injected(**faults):
    """Runs started in this process inside the block (psrv.train, with the OVERRIDE) spawn workers with these
    faults: children inherit the environment at spawn."""
    saved = os.environ.get(ENV)
    os.environ.update(env(**faults))
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = saved


class FaultyWorker(worker.Worker):
    def __init__(self, faults: Faults, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.faults = faults
        self._nan_steps = frozenset(faults.nan_steps)
        self._outlier_steps = frozenset(faults.outlier_steps)
        self._slept_subs = False   # this step was a group step: slow_ms was slept at each of its sub-steps

    def after_gradient(self, clock: int, grad: np.ndarray) -> None:
        f = self.faults  # self.wid, not the spec's: an attached worker learns its id from the server
        if f.fail_worker == self.wid and clock >= f.fail_at_step:
            raise Injected(f"injected failure at step {clock} ({ENV} fail_worker = {self.wid})")
        if f.nan_worker == self.wid and clock in self._nan_steps:
            grad[...] = np.nan
        if f.outlier_worker == self.wid and clock in self._outlier_steps:
            grad *= OUTLIER
        if f.slow_worker == self.wid and f.slow_ms and not self._slept_subs:
            time.sleep(f.slow_ms / 1000.0)
        self._slept_subs = False
        if self._kills_at(clock):
            os.kill(os.getpid(), signal.SIGKILL)
        if f.hold_worker == self.wid and clock == f.hold_at_step and f.hold_file:
            deadline = time.monotonic() + HOLD_MAX_S
            while os.path.exists(f.hold_file):   # its heartbeat thread goes on: held, not silent
                if time.monotonic() > deadline:
                    log.warning("worker %d: held at step %d for %g s; %s is still there, going on", self.wid,
                                clock, HOLD_MAX_S, f.hold_file)
                    break
                time.sleep(HOLD_POLL_S)

    def before_sub_step(self, clock: int, k: int, theta: np.ndarray) -> None:
        f = self.faults
        if f.slow_worker == self.wid and f.slow_ms:
            self._slept_subs = True
            time.sleep(f.slow_ms / 1000.0)
        if k == self.faults.kill_sub_step and self._kills_at(clock):
            os.kill(os.getpid(), signal.SIGKILL)
        if k == 1 and self.faults.nan_worker == self.wid and clock in self._nan_steps:
            theta[...] = np.nan   # its gradient of this sub-step is NaN, and everything it computes after it
        if k == 1 and self.faults.outlier_worker == self.wid and clock in self._outlier_steps:
            theta *= OUTLIER      # its gradient of this sub-step (a linear model's) is about as much too long

    def _kills_at(self, clock: int) -> bool:
        f = self.faults
        return f.kill_worker == self.wid and clock == f.kill_at_step and self.client.inc == 1


def main(spec: WorkerSpec, conn, parent_pid: int, core, log_level: int) -> None:
    """Entry point (worker.entry = "workers.faults:main"): the plain worker's, running a FaultyWorker."""
    try:
        faults = Faults.parse(os.environ.get(ENV, ""))
    except ValueError as e:  # reported like any worker failure: the run stops with this message
        proc.Reporter(conn).send("error", process=f"worker {spec.wid}", message=str(e))
        sys.exit(1)
    worker.main(spec, conn, parent_pid, core, log_level, make=functools.partial(FaultyWorker, faults))
