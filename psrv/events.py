"""What the server's shell and its coordinator say to each other: events in (a decoded request, a timer tick, a
signal), instructions out (a reply to send, an update to apply, a checkpoint to write). Plain data, no behaviour.

`rid` is the request id to echo in the reply (None when the request had none). Arrays travel by reference: a
gradient in an instruction is the frame (or shared-memory slot) it arrived in, valid until the next event.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


# ---------------------------------------------------------------------------------------------------- events
@dataclass(slots=True)
class Hello:
    ident: bytes
    wid: int
    version: int
    role: str = "worker"
    pid: int = 0
    host: str = ""
    local: bool = True
    rid: int | None = None


@dataclass(slots=True)
class Pull:
    ident: bytes
    wid: int
    inc: int
    clock: int
    rid: int | None = None


@dataclass(slots=True)
class Push:
    ident: bytes
    wid: int
    inc: int
    sid: str
    seq: int
    clock: int
    version: int
    loss: float
    count: int
    pull: bool
    compute_s: float = 0.0
    request_s: float = 0.0
    grad: Any = None          # the gradient: a frame, or the worker's shared-memory slot (framed False)
    framed: bool = True
    keys: Any = None          # the rows it carries; None: every row
    rid: int | None = None
    ranges: tuple = ()        # server.shards > 1: each range server's (slice number, finite, sum of squares) of its
                              # slice of this push, in range order (psrv/rangeserver.py)
    notes: Any = None         # group steps: the member's (rows, loss sum, end time) of each sub-step (psrv/group.py)
    state: Any = None         # ... and, for an optimizer with state, the member's at the step's end (a view)


@dataclass(slots=True)
class Heartbeat:
    ident: bytes
    wid: int
    inc: int
    rid: int | None = None


@dataclass(slots=True)
class Bye:
    ident: bytes
    wid: int
    inc: int
    rid: int | None = None


@dataclass(slots=True)
class Malformed:
    """A message the shell could not decode: answered with an error and counted against its connection."""
    ident: bytes
    code: str
    reason: str
    rid: int | None = None


@dataclass(slots=True)
class Tick:
    """Time passed: liveness, the join deadline, the wall-clock limit."""


@dataclass(slots=True)
class Stop:
    """End the run now for `reason` (SIGTERM: "terminated"; a plateau of the loss: "tol")."""
    reason: str
    at_once: bool = False     # do not wait for workers to be told: whoever asks next finds the server gone


# ---------------------------------------------------------------------------------------------------- instructions
@dataclass(slots=True)
class Send:
    """Send this header (a reply with no array) to a connection."""
    ident: bytes
    header: dict


@dataclass(slots=True)
class Welcome:
    """Answer a hello: the run's description for this worker (and its shared-memory slot when p.shm)."""
    ident: bytes
    peer: Any
    rid: int | None


@dataclass(slots=True)
class Theta:
    """Answer a pull: the clock and batch to compute, and theta as of `version` (in the frame unless shm)."""
    ident: bytes
    clock: int
    version: int
    batch: list
    shm: bool
    rid: int | None
    first_step: int = 0    # group steps: the first of BSP's steps this group step holds, and how many it may hold
    step_budget: int = 0


@dataclass(slots=True)
class Accumulate:
    """BSP: add a gradient to the step being collected."""
    grad: Any
    keys: Any
    wid: int = -1             # whose push, for which clock: with server.shards > 1 the range servers' apply names it
    clock: int = -1
    slices: tuple = ()        # ... and each range's number for its slice (ev.Push.ranges)
    state: Any = None         # group steps: the member's optimizer state (ev.Push.state)


@dataclass(slots=True)
class ApplyStep:
    """BSP: apply the mean of the collected gradients with the learning rate of `step`, making `version`."""
    step: int
    version: int
    steps: int = 1            # group steps: the BSP steps the group step held


@dataclass(slots=True)
class Update:
    """SSP/ASP: apply one gradient, weighted by `scale`, with the learning rate of `step`, making `version`."""
    grad: Any
    keys: Any
    step: int
    version: int
    scale: float
    wid: int = -1
    clock: int = -1
    slices: tuple = ()        # server.shards > 1: each range's number for its slice of this push


@dataclass(slots=True)
class Log:
    """A metrics line: the mean training loss of the pushes applied since the last line."""
    step: int
    elapsed_s: float
    samples: int
    loss: float


@dataclass(slots=True)
class Evaluate:
    step: int


@dataclass(slots=True)
class Checkpoint:
    step: int


@dataclass(slots=True)
class Fail:
    """The run cannot go on (workers never joined): the server process ends with this message."""
    message: str


@dataclass(slots=True)
class Finish:
    """Every worker has been told to stop (or the run ends at once): write the outputs and exit."""
    reason: str
