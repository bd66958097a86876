"""Group steps (train.group_steps = K): BSP among the workers on the server's machine through shared memory, with
one push to the server every K steps instead of every step.

Why: under BSP each step costs a push and a reply per worker, handled one after another by the server's Python
(tens of microseconds each), which a small model's step (tens of microseconds) cannot pay for and which grows with
the number of workers. Within a group step the workers exchange their gradients through this segment and apply the
same mean themselves, so the server is off the critical path for K - 1 steps out of K.

What a group step computes. The server serves its step t (its clock) to every worker with up to K * batch_size
rows, the members of the step (`group`, worker ids) and the learning rates of the BSP steps it holds: lr_s, lr_s+1,
... (s: the BSP steps done before it; K of them, fewer at the end of train.steps). Each worker copies theta_t and,
for each sub-step k, computes its gradient g_i,k on its k-th batch_size rows, publishes it here, waits until every
member has published sub-step k, and applies theta <- theta - lr_s+k / n * sum_i g_i,k (n: the members; a member
whose rows ran out at the end of an epoch adds nothing from then on, but still follows the sub-steps, applying the
others' mean, until one no member has rows for). Every member sums the gradients in the same order (by worker id),
so their copies of theta are the same bit for bit, and each pushes D = theta_t - its last iterate, how far the
step moved theta. The server applies the mean of the pushes at rate 1 (rangeserver.make_store), which gives that
iterate back (up to rounding: the mean of n equal vectors). The result is BSP with batch_size rows per worker and
step, each step at its own rate; train.steps, the schedule and the logs count those steps (the coordinator adds a
group step's longest batch, in sub-steps, once it is applied).

Clipping and L2, which the server applies to each push at a BSP step, are the members' here, at each sub-step:
each clips its own g_i,k to train.clip_norm before publishing it, and each adds model.l2's term, l2 * w_k (w_k:
theta_k's penalized rows, the weights; the intercept row is not), to the mean it applies. They are in D, so the
server neither clips nor penalizes these pushes.

An optimizer with state (train.optimizer momentum, adagrad or adam; its state arrays shaped like theta: the
velocity, the sum of squares, Adam's m and v). Each sub-step then applies the optimizer's rule (psrv/optim.py, the
server's own code) to the mean gradient plus the L2 term at lr_s+k, rather than the plain step above. The rule's
state must be the server's at the group step's start, so the server publishes it in this segment (its line: the
version of theta it belongs to and the update count, Adam's bias correction), and each member loads it after its
reply, checking the version; before pushing, each member writes its state at the step's end in its own area. The
server's step is then theta - the pushes' mean (no rule of its own) and the mean of the members' states, after as
many updates as BSP steps the group step held; it publishes that for the next. The members' states are equal bit
for bit like their thetas, so this is BSP under the optimizer; checkpoints hold the server's state as without group
steps.

The segment, per member i (its worker id): a control line of 64 bytes (COUNT, SUBS, NOTED; a line each, so that
no two workers write the same cache line) and, twice over (sub-steps alternate between the two, so a worker may
publish sub-step k + 1 while a slower one still reads sub-step k), a gradient shaped like theta; then its notes, K
rows of three float64: for each sub-step it applied, its rows (0 when following), their loss sum and when the
sub-step ended (time.monotonic(), one clock for every process on the machine). The server reads a member's notes
when its push arrives and logs a metrics line at every step train.log_every names, as BSP without group steps.

    SUBS: the sub-steps with rows in this group step, written before the step's first publish;
    COUNT: (global sub-step number published, counting from clock * K + 1) << 1 | LEFT;
    NOTED: how many notes of this group step are written (0 at its start; set before the push).

With an optimizer's state (n_state arrays), after the notes: the server's line (VERSION, STEPS), the server's state
(n_state arrays shaped like theta), then each member's.

A wait that outlasts timeout_s (a member died, or stalls) makes the waiting worker leave the group for the rest of
the step: it sets LEFT, takes its remaining sub-steps alone (its own gradients, under the same rule), and pushes
how far it moved; the others stop waiting for it. Each theta reply sets timeout_s anew (wait_s): half the server's
straggler deadline as it stands, which grows with the time a group step takes, so that a member that is merely
slow is waited for, as BSP waits for it, and members leave before the server would call them stragglers. A member
whose own gradient is not finite, or an outlier by the server's rule on its own norms (max_grad_ratio), leaves at
once, without publishing it (the mean would carry it into every member's theta). The server's step is then the
mean of the pushes it gets, the average of the members' models (as local SGD's), not BSP's: the result is exact
only while no member leaves. Stores become visible in program order on x86-64 (TSO), which this relies on as the
theta seqlock does (shmarray.ORDERED_STORES).
"""
from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections import deque
from statistics import median

import numpy as np

from .guard import PER_WORKER, WARMUP
from .shmarray import SharedArray
from .store import clip_in_place

LINE = 64                  # bytes of control per member: a cache line of its own
COUNT, SUBS, NOTED = 0, 1, 2   # u64 words in a member's control line
VERSION, STEPS = 0, 1      # u64 words in the server's line (an optimizer with state): whose state, how many updates
WRITING = (1 << 64) - 1    # VERSION while the server writes its state: no theta has it
NOTE = 3                   # float64 per sub-step in a member's notes: its rows, their loss sum, when it ended
LEFT = 1
FLOAT_MAX = sys.float_info.max

# a gradient whose squared norm overflows is refused like one that is not finite (Member.step), and says so; the
# sum's overflow warning would only repeat it (ndarray.dot warns, np.vdot does not but takes half as long again)
warnings.filterwarnings("ignore", message="overflow encountered in dot", category=RuntimeWarning, module=__name__)
SPIN_S = 0.002             # a wait polls without pausing this long, then with short sleeps
SLEEP_S = 50e-6


def segment_bytes(members: int, size: int, itemsize: int, k_steps: int = 0, n_state: int = 0) -> int:
    state = LINE + (1 + members) * n_state * size * itemsize if n_state else 0
    return members * LINE + 2 * members * size * itemsize + members * k_steps * NOTE * 8 + state


class Group:
    """The shared segment of one run's group steps: `members` control lines, then two buffers of `members`
    gradients of theta's shape, then (k_steps > 0) each member's notes of the last group step's sub-steps; then,
    for an optimizer with state (n_state arrays shaped like theta: momentum's velocity, Adam's m and v), the
    server's line (VERSION, STEPS), the server's state and each member's."""

    def __init__(self, seg: SharedArray, members: int, shape: tuple, dtype, k_steps: int = 0, n_state: int = 0):
        self.seg, self.members, self.shape, self.k_steps = seg, members, tuple(shape), k_steps
        self.n_state = n_state
        self.dtype = np.dtype(dtype)
        raw = seg.array
        ctl_bytes = members * LINE
        self._ctl = memoryview(raw[:ctl_bytes]).cast("B").cast("Q")   # one aligned 8-byte load or store per access
        grads_end = ctl_bytes + 2 * members * int(np.prod(self.shape)) * self.dtype.itemsize   # a multiple of 8
        self.grads = raw[ctl_bytes:grads_end].view(self.dtype).reshape((2, members, *self.shape))
        notes_end = grads_end + members * k_steps * NOTE * 8
        self.notes = raw[grads_end:notes_end].view(np.float64).reshape((members, k_steps, NOTE))
        self._srv = memoryview(raw[notes_end:notes_end + LINE]).cast("B").cast("Q") if n_state else None
        states = raw[notes_end + LINE:].view(self.dtype).reshape((1 + members, n_state, *self.shape)) if n_state \
            else None
        self.server_state = states[0] if n_state else None   # the server's optimizer state, which members start from
        self.states = states[1:] if n_state else None         # each member's at the end of its last group step

    @classmethod
    def create(cls, name: str, members: int, shape: tuple, dtype, k_steps: int = 0, n_state: int = 0) -> "Group":
        n = segment_bytes(members, int(np.prod(shape)), np.dtype(dtype).itemsize, k_steps, n_state)
        return cls(SharedArray.create(name, (n,), np.uint8), members, shape, dtype, k_steps, n_state)

    @classmethod
    def attach(cls, name: str, members: int, shape: tuple, dtype, k_steps: int = 0, n_state: int = 0) -> "Group":
        n = segment_bytes(members, int(np.prod(shape)), np.dtype(dtype).itemsize, k_steps, n_state)
        return cls(SharedArray.attach(name, (n,), np.uint8), members, shape, dtype, k_steps, n_state)

    def publish(self, opt, version: int) -> None:
        """The server's side: its optimizer's state at theta's `version`, for the members to start the next group
        step from. A member reads it after its reply, and the server changes it only once every member of the step
        has pushed, or once it went on without one (a straggler, which may be copying it then): VERSION is WRITING
        meanwhile, and the version last; a member checks it before and after its copy."""
        self._srv[VERSION] = WRITING
        for j, k in enumerate(opt.dense_names):
            self.server_state[j] = opt.state[k]
        self._srv[STEPS] = opt.steps
        self._srv[VERSION] = version

    def server_version(self) -> tuple[int, int]:
        """(VERSION, STEPS) of the server's state."""
        return self._srv[VERSION], self._srv[STEPS]

    def read_notes(self, member: int) -> np.ndarray | None:
        """A copy of `member`'s notes of its last group step, (sub-steps, NOTE), or None when it left none that
        fit (the server reads them when the member's push arrives: the member wrote them before pushing)."""
        n = self._ctl[member * (LINE // 8) + NOTED]
        if not 0 < n <= self.k_steps:
            return None
        return self.notes[member, :n].copy()

    @property
    def name(self) -> str:
        return self.seg.name

    def set_word(self, member: int, which: int, value: int) -> None:
        self._ctl[member * (LINE // 8) + which] = value

    def close(self) -> None:
        self._ctl.release()
        if self._srv is not None:
            self._srv.release()
        del self.grads, self.notes, self._ctl, self._srv, self.server_state, self.states
        self.seg.close()


class Stale(ValueError):
    """The group step is over for the server (it went on without this member, a straggler)."""


def _check_timeout(timeout_s) -> float:
    # NaN too: a wait must end, and must wait at all
    if type(timeout_s) not in (int, float) or not 0 < timeout_s < math.inf:
        raise ValueError(f"the group's timeout_s must be a positive number of seconds; got {timeout_s!r}")
    return float(timeout_s)


class Member:
    """One worker's side of a group step (see the module's docstring)."""

    def __init__(self, group: Group, me: int, timeout_s: float, l2: float = 0.0, l2_rows: int = 0,
                 clip_norm: float = 0.0, opt=None, max_grad_ratio: float = 0.0):
        """l2: model.l2, on theta's first l2_rows rows (the weights, not the intercept); clip_norm:
        train.clip_norm. The server applies neither to a group step's pushes: the members apply them at each
        sub-step, as the server does at each BSP step (see the module's docstring). opt: train.optimizer when it
        is not plain SGD (a psrv.optim optimizer for theta's shape), whose rule each sub-step applies to the mean
        gradient from the server's state (the group's n_state arrays). max_grad_ratio: server.max_grad_ratio, the
        server's bound on a gradient's norm (psrv/guard.py's rule for one worker: more than max_grad_ratio times
        the median of its last PER_WORKER norms, once it has WARMUP of them), which each member applies to its own
        gradients, the bound renewed at each group step's start."""
        if not 0 <= me < group.members:
            raise ValueError(f"worker {me} has no place in a group of {group.members}")
        if not (0 <= l2 < math.inf and 0 <= clip_norm < math.inf and 0 <= l2_rows <= (group.shape or (1,))[0]):
            raise ValueError(f"l2 {l2}, l2_rows {l2_rows} or clip_norm {clip_norm} do not fit theta {group.shape}")
        _check_timeout(timeout_s)
        n_state = len(opt.dense_names) if opt is not None else 0
        if n_state != group.n_state or (opt is not None and (opt.shape, opt.dtype) != (group.shape, group.dtype)):
            raise ValueError(f"the group segment holds {group.n_state} optimizer state arrays, "
                             f"{'none' if opt is None else opt.name} needs {n_state} shaped like theta")
        self.group, self.me, self.timeout_s = group, me, timeout_s
        self.l2, self.l2_rows, self.clip_norm = l2, l2_rows, clip_norm
        self.opt = opt
        if not 0 <= max_grad_ratio < math.inf:
            raise ValueError(f"max_grad_ratio must be a number >= 0; got {max_grad_ratio!r}")
        self.max_grad_ratio = max_grad_ratio
        self._squares: deque[float] = deque(maxlen=PER_WORKER)   # its last accepted gradients' squared norms
        self._seen = 0
        # the squared norm above which its gradient is an outlier (begin renews it); finite, so that an infinite
        # one is never under it
        self._bound_sq = FLOAT_MAX
        self.left = False
        self.left_why = ""           # why it left this group step, for the worker's log
        self.waited_s = 0.0          # time spent waiting for the others (the barrier), over the run
        self.clipped = 0             # own gradients scaled down to clip_norm, over the run
        self._sum = np.empty(group.shape, group.dtype)
        self._own = np.empty(group.shape, group.dtype)   # gradients once it has left: never in the shared buffers
        self._term = np.empty(group.shape, group.dtype) if l2 else None   # a sub-step's L2 term
        # its notes as flat doubles: three item stores per sub-step cost a tenth of a numpy row assignment
        self._notes = memoryview(group.notes[me]).cast("B").cast("d") if group.k_steps else None
        self._mine = (group.grads[0, me], group.grads[1, me])   # its place in each buffer: no view made per sub-step
        self._flat = tuple(g.reshape(-1) for g in self._mine)     # ... flat, for its dot product with itself

    def begin(self, clock: int, k_steps: int, subs: int, members: list[int], version: int = 0,
              timeout_s: float | None = None) -> None:
        """A group step at `clock` of train.group_steps = k_steps sub-steps, `subs` of them with rows here, among
        `members`, from theta's `version` (an optimizer with state starts from the server's at that version),
        waiting at most timeout_s (given: from now on) for the others at each sub-step."""
        if timeout_s is not None:
            self.timeout_s = _check_timeout(timeout_s)
        if self.max_grad_ratio and self._seen >= WARMUP:
            # a product, not ** 2, which raises OverflowError on floats where a product becomes inf
            r = self.max_grad_ratio
            self._bound_sq = min(r * r * median(self._squares), FLOAT_MAX)
        if self.me not in members or any(not 0 <= m < self.group.members for m in members):
            raise ValueError(f"group {members} is not a set of this segment's {self.group.members} members "
                             f"including worker {self.me}")
        if self.opt is not None:
            published, steps = self.group.server_version()
            if published == version:
                self.opt.set_dense(self.group.server_state, steps)
                published = self.group.server_version()[0]   # the same after the copy: it was not being written
            if published != version:
                raise Stale(f"the server's optimizer state is of another theta than the step's (version "
                            f"{'being written' if published == WRITING else published}, not {version}): the server "
                            f"went on without this worker")
        self.base, self.k_steps = clock * k_steps, k_steps
        self.members = sorted(members)
        self.scale = 1.0 / len(self.members)
        per = LINE // 8
        self._words = [(j, j * per + COUNT, j * per + SUBS) for j in self.members]   # where each one's words are
        self.left = False
        self.group.set_word(self.me, NOTED, 0)
        self.group.set_word(self.me, SUBS, subs)

    def note(self, k: int, rows: int, loss: float) -> None:
        """Sub-step k is done here: its rows (0 when following), their mean loss, and the time (time.monotonic(),
        one clock for every process of the machine), for the server's per-step logs."""
        notes = self._notes
        if notes is not None and k < self.group.k_steps:
            i = NOTE * k
            notes[i], notes[i + 1], notes[i + 2] = rows, loss * rows, time.monotonic()

    def seal(self, n: int) -> None:
        """The group step's notes are complete: sub-steps 0 .. n - 1, and its optimizer state is where the server
        reads it (written before the push, which the server reads them at)."""
        if self.opt is not None:
            mine = self.group.states[self.me]
            for j, k in enumerate(self.opt.dense_names):
                mine[j] = self.opt.state[k]
        self.group.set_word(self.me, NOTED, min(n, self.group.k_steps))

    def clip(self, g: np.ndarray) -> None:
        """Scale its own gradient down to clip_norm, in place, before it is published (the server's clipping of
        each worker's gradient at a BSP step, with its norm)."""
        if clip_in_place(g, self.clip_norm):
            self.clipped += 1

    def grad(self, k: int) -> np.ndarray:
        """Where sub-step k's gradient goes: straight into the shared buffer (after leaving, a buffer of its own:
        a member that counted it in may still be reading the shared one)."""
        return self._own if self.left else self._mine[k & 1]

    def step(self, k: int, theta: np.ndarray, lr: float, rows: bool = True) -> bool:
        """Publish sub-step k's gradient (already in grad(k); rows = False: it has none, it only follows), wait
        for the members, and apply their mean (and the L2 term) to theta, this worker's copy. Alone (after
        leaving): apply its own gradient (and the L2 term), by the same rule. False when no member had rows at k:
        nothing was applied, and no later sub-step of this group step has any either."""
        if self.left:
            if rows:
                self._apply_alone(theta, self._own, lr)
            return rows
        own, flat = self._mine[k & 1], self._flat[k & 1]
        sq = flat.dot(flat) if rows else 0.0   # its own gradient's squared norm (NaN or Inf: not finite)
        why = self._judge(sq) if not sq <= self._bound_sq else ""   # NaN and Inf fail the test too
        if why:
            # through the mean, a gradient that is not finite (or an outlier) would reach every member's theta and
            # push, and the server would refuse them all (or apply it): it leaves instead, so that only its own
            # push carries it, which the server refuses as it refuses such a gradient without group steps
            self.leave(why)
            self._apply_alone(theta, own, lr)
            return rows
        if rows:
            self._squares.append(sq)    # the median of squares is the square of the median norm (odd counts)
            self._seen += 1
        target = self.base + k + 1
        self._publish(target)
        included = self._wait(k, target)
        if included is None:
            self.leave(f"waited {self.timeout_s:.1f} s for the others at its barrier")
            if rows:
                self._apply_alone(theta, own, lr)
            return rows
        if not included:
            return False
        g = self.group.grads[k & 1]
        s = self._sum
        # plain SGD folds the rate into the mean; an optimizer's rule takes the mean gradient and the rate
        rate = lr if self.opt is None else 1.0
        # in the members' order, the same in every member, which all get the same `included` and so take the same
        # branch: their copies of theta stay equal bit for bit
        first, n = included[0], len(included)
        if n == 1:
            np.multiply(g[first], rate * self.scale, out=s)
        elif n > 2 and included[-1] - first == n - 1 and s.size > 1:
            # consecutive ids (every member in, the usual case): one call, at a fifth of the loop's cost for 15
            # members at d = 100 (benchmarks/overhead.py). Along the first axis of a C-ordered array numpy adds
            # row after row, as the loop below does; with a single element per row that axis would be the
            # contiguous one, which numpy sums pairwise, in another order
            np.add.reduce(g[first:first + n], axis=0, out=s)
            s *= rate * self.scale
        else:
            np.add(g[first], g[included[1]], out=s)
            for j in included[2:]:
                s += g[j]
            s *= rate * self.scale
        if self.opt is None and self._term is None:   # plain SGD without L2, the common case: no call
            theta -= s
        else:
            self._apply(theta, s, lr, rate)
        return True

    def _apply(self, theta: np.ndarray, s: np.ndarray, lr: float, rate: float) -> None:
        """theta moves by s (already times `rate`) and the L2 term, or by the optimizer's rule at lr."""
        if self._term is not None:
            self._add_l2(s, theta, rate)
        if self.opt is None:
            theta -= s
        else:
            self.opt.step(theta, s, lr)

    def _judge(self, sq: float) -> str:
        """Why its own gradient, of squared norm sq above the bound (or NaN), must not be published, by the server's
        rules (psrv/guard.py)."""
        if not math.isfinite(sq):   # a NaN or Inf makes the sum of squares one (as does an overflow)
            return "its gradient was not finite"
        return (f"its gradient's norm {math.sqrt(sq):.3g} was over {math.sqrt(self._bound_sq):.3g}, "
                f"{self.max_grad_ratio:g} x its typical one")

    def _add_l2(self, s: np.ndarray, theta: np.ndarray, lr: float) -> None:
        """s += lr * l2 * theta on the penalized rows (theta as it is before the sub-step)."""
        r, t = self.l2_rows, self._term
        np.multiply(theta[:r], self.l2 * lr, out=t[:r])
        s[:r] += t[:r]

    def _apply_alone(self, theta: np.ndarray, g: np.ndarray, lr: float) -> None:
        rate = lr if self.opt is None else 1.0
        np.multiply(g, rate, out=self._sum)
        self._apply(theta, self._sum, lr, rate)

    def leave(self, why: str = "") -> None:
        self.left, self.left_why = True, why
        self.group.set_word(self.me, COUNT, (self.base + self.k_steps) << 1 | LEFT)

    def _publish(self, count: int) -> None:
        self.group.set_word(self.me, COUNT, count << 1)

    def _wait(self, k: int, target: int) -> list[int] | None:
        """The members whose sub-step k gradient is in (by worker id), once every member has published it or left;
        None after timeout_s."""
        ctl, words, start = self.group._ctl, self._words, None
        while True:
            included = []
            for j, count_at, subs_at in words:
                c = ctl[count_at]
                if c >> 1 < target:
                    break
                if not c & LEFT and k < ctl[subs_at]:
                    included.append(j)
            else:   # every member has published sub-step k (or left)
                if start is not None:
                    self.waited_s += time.monotonic() - start
                return included
            now = time.monotonic()
            if start is None:
                start = now
            elif now - start > self.timeout_s:
                self.waited_s += now - start
                return None
            if now - start < SPIN_S:
                os.sched_yield()
            else:
                time.sleep(SLEEP_S)
