"""The store of one key range: theta, the optimizer and its state, the BSP accumulator, clipping, the L2 term, the
learning-rate schedule, the version and the snapshot that replies send (pure numpy: no sockets, no files).

A key is a row of theta. A push names the rows it carries (`keys`, increasing) or none (every row); only the rows
it carries change, and so only they are penalized, clipped together and updated. The coordinator decides when to
update and which version that makes; the store carries it out.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np


def l2norm(a: np.ndarray) -> float:
    """float(np.linalg.norm(a)), bit for bit (the square root of the flat array's dot with itself, in its dtype),
    in a quarter of its time, which matters once per push: np.vdot raises no floating-point warning when the sum
    overflows (it is then inf), so no np.errstate, itself two microseconds, is needed around it."""
    sq = np.vdot(a, a)
    return math.sqrt(sq) if type(sq) is np.float64 else float(np.sqrt(sq))


def clip_in_place(g: np.ndarray, clip_norm: float) -> bool:
    """Scale g down to norm clip_norm, in place, if it is longer (clip_norm > 0); True when it was. The workers'
    clipping under group steps and local SGD, which must match the store's own (_clip) on the same gradient."""
    if clip_norm > 0:
        norm = l2norm(g)
        if norm > clip_norm:
            g *= clip_norm / norm
            return True
    return False


def workers_penalize(train) -> bool:
    """Whether the workers clip and add the L2 term at each of their steps (group steps, local SGD), so that the
    server's store does neither to their pushes."""
    return train.group_steps > 1 or train.local_steps > 1


class Store:
    def __init__(self, theta: np.ndarray, opt, lr_at: Callable[[int], float], clip_norm: float = 0.0,
                 l2: float = 0.0, l2_mask: np.ndarray | None = None, writer=None, grouped: bool = False):
        """theta is updated in place (it may live in shared memory, published by `writer`, an object with
        begin_write() / end_write(version), e.g. a seqlock). l2_mask: the rows the L2 term applies to (the model's
        weights, never an intercept); None means every row. grouped (group steps, psrv/group.py) with an
        optimizer that has state: each push is how far its member moved theta under the optimizer's rule, with
        the member's optimizer state at the end, and a step applies the pushes' mean and takes their states' mean
        (plain SGD: a push is applied as a gradient at rate 1, which is the same)."""
        self.theta, self.opt, self.lr_at, self.writer = theta, opt, lr_at, writer
        self.clip_norm, self.l2 = clip_norm, l2
        rows = theta.shape[0]
        self.l2_mask = np.ones(rows, bool) if l2_mask is None else np.asarray(l2_mask, bool)
        # the common mask is a prefix of rows (weights, then the intercept): a slice, no gather
        n = int(self.l2_mask.sum())
        self._l2_prefix = n if self.l2_mask[:n].all() else None
        self.version = 0
        self.clipped = 0                          # pushes scaled down to clip_norm
        self.acc = np.zeros_like(theta)           # BSP: the sum of this step's gradients
        self.acc_n = 0
        self._acc_keys: list[np.ndarray] = []     # ... and the keys they touched, when every push named its keys
        self._acc_dense = False
        self._work = np.empty_like(theta)         # a dense update's input when it must be scaled or penalized
        self._work2 = np.empty_like(theta)
        self._finite = np.empty(theta.shape, bool)
        self._lr = (-1, 0.0)
        self._snapshot: np.ndarray | None = None
        self.grouped = grouped
        # grouped: the sum of the step's members' optimizer states (opt.dense_names), and how many
        self._states = np.zeros((len(opt.dense_names), *theta.shape), theta.dtype) \
            if grouped and getattr(opt, "dense_names", ()) else None
        self._states_n = 0

    # ------------------------------------------------------------------ checks
    def check(self, grad: np.ndarray, keys: np.ndarray | None = None) -> None:
        """TypeError unless grad has theta's dtype; ValueError unless it fits theta's shape (all rows, or the rows
        `keys` names, increasing and in range)."""
        t = self.theta
        if keys is not None:
            if keys.ndim != 1 or keys.dtype.kind not in "iu":
                raise ValueError(f"keys must be a vector of integers, got {keys.dtype.str} {list(keys.shape)}")
            if len(keys) and (keys[0] < 0 or keys[-1] >= t.shape[0] or (np.diff(keys) <= 0).any()):
                raise ValueError(f"keys must be increasing row numbers below {t.shape[0]}")
        shape = t.shape if keys is None else (len(keys), *t.shape[1:])
        if grad.dtype != t.dtype:  # TypeError: the wire says bad_dtype, not bad_shape
            raise TypeError(f"gradient dtype {grad.dtype.str} does not match theta's {t.dtype.str}")
        if grad.shape != shape:
            raise ValueError(f"gradient {grad.dtype.str} {list(grad.shape)} does not match theta "
                             f"{t.dtype.str} {list(shape)}")

    def finite(self, grad: np.ndarray) -> bool:
        out = self._finite if grad.shape == self._finite.shape else None  # a reused buffer: no allocation
        return bool(np.isfinite(grad, out=out).all())

    def measure(self, grad: np.ndarray) -> tuple[bool, float]:
        """(every entry finite, the L2 norm) in one pass when the norm is finite (a sum of squares holding a NaN or
        Inf is not). A finite gradient with entries above about 1e154 (float64) has an infinite norm."""
        norm = l2norm(grad)
        if math.isfinite(norm):
            return True, norm
        return self.finite(grad), norm

    def squares(self, grad: np.ndarray) -> tuple[bool, float]:
        """(every entry finite, the sum of squares): one range's part of a whole push's measure when theta's rows
        are split over several servers (server.shards > 1), the norm being the root of the ranges' sum."""
        sq = float(np.vdot(grad, grad))
        return (True, sq) if math.isfinite(sq) else (self.finite(grad), sq)

    # ------------------------------------------------------------------ updates
    def push(self, grad: np.ndarray, keys: np.ndarray | None = None, state: np.ndarray | None = None) -> None:
        """BSP: add a (clipped) gradient to the step being collected (grouped: and the member's optimizer
        state)."""
        if state is not None and self._states is not None:
            self._states += state
            self._states_n += 1
        grad = self._clip(grad)
        if keys is None:
            self.acc += grad
            self._acc_dense = True
        else:
            self.acc[keys] += grad
            self._acc_keys.append(keys)
        self.acc_n += 1

    def apply_step(self, step: int, version: int, steps: int = 1) -> bool:
        """BSP: theta <- optimizer(mean of the step's gradients) with the learning rate of `step` (0-based), which
        makes `version`. False (theta unchanged) when the step has no gradient. Grouped with an optimizer's state:
        theta <- theta - the pushes' mean, the state their states' mean after `steps` more updates (the BSP steps
        the group step held)."""
        if self.acc_n == 0:
            return False
        if self._states is None and self.grouped and self._acc_dense:   # plain SGD: a push applied at rate 1
            self.acc /= self.acc_n
            self._update(self.acc, step, version, None)
            self.opt.steps += steps - 1   # its update count is BSP's, as without group steps
            self.acc[...] = 0.0
        elif self._states is not None and self._states_n:
            self.acc /= self.acc_n
            self._states /= self._states_n
            self._update(self.acc, step, version, None, rule=_subtract)
            self.opt.set_dense(self._states, self.opt.steps + steps)
            self.acc[...] = 0.0
            self._states[...] = 0.0
            self._states_n = 0
        elif self._acc_dense:
            self.acc /= self.acc_n
            self._update(self.acc, step, version, None)
            self.acc[...] = 0.0
        else:
            # the union of the pushes' keys: O(keys touched), never a pass over every row of a large theta
            rows = self._acc_keys[0] if len(self._acc_keys) == 1 else _union(self._acc_keys)
            grad = self.acc[rows] / self.acc_n
            self._update(grad, step, version, rows)
            self.acc[rows] = 0.0
        self.acc_n, self._acc_dense = 0, False
        self._acc_keys = []
        return True

    def update(self, grad: np.ndarray, step: int, version: int, scale: float = 1.0,
               keys: np.ndarray | None = None) -> None:
        """ASP/SSP: one optimizer update from one (clipped) gradient weighted by `scale`, making `version`."""
        self._update(self._clip(grad), step, version, keys, scale)

    def _clip(self, grad: np.ndarray) -> np.ndarray:
        if self.clip_norm > 0:
            norm = l2norm(grad)
            if norm > self.clip_norm:
                self.clipped += 1
                return grad * (self.clip_norm / norm)
        return grad

    def _update(self, grad, step: int, version: int, rows: np.ndarray | None, scale: float = 1.0,
                rule=None) -> None:
        """theta <- the optimizer's rule (or `rule`, called as the optimizer's step) on grad, published as
        `version`."""
        # grad may be a read-only frame or a worker's slot: anything derived goes into other buffers
        if scale != 1.0 or self.l2:
            work = self._work if rows is None else np.empty_like(grad)
            np.multiply(grad, scale, out=work)
            if self.l2:
                self._add_l2(work, rows)
            grad = work
        if self._lr[0] != step:
            self._lr = (step, self.lr_at(step))
        rule = self.opt.step if rule is None else rule
        if self.writer is not None:
            self.writer.begin_write()
            try:
                rule(self.theta, grad, self._lr[1], rows)
            finally:  # never leave the sequence number odd: readers would wait for a write that never ends
                self.writer.end_write(version)
        else:
            rule(self.theta, grad, self._lr[1], rows)
        self.version = version
        self._snapshot = None

    def _add_l2(self, work: np.ndarray, rows: np.ndarray | None) -> None:
        """work += l2 * theta on the penalized rows among those updated."""
        if rows is None and self._l2_prefix is not None:
            r = self._l2_prefix
            np.multiply(self.theta[:r], self.l2, out=self._work2[:r])
            work[:r] += self._work2[:r]
            return
        rows = np.arange(self.theta.shape[0]) if rows is None else rows
        hit = self.l2_mask[rows]
        work[hit] += self.l2 * self.theta[rows[hit]]

    # ------------------------------------------------------------------ reading
    def snapshot(self) -> np.ndarray:
        """An immutable copy of theta for this version. Replies send it zero-copy, so theta itself may change while
        a send is still in flight without corrupting what the peer receives."""
        if self._snapshot is None:
            self._snapshot = self.theta.copy()
        return self._snapshot

    # ------------------------------------------------------------------ checkpoints
    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(plain values, arrays) of everything an update depends on. The BSP accumulator is not saved: the
        coordinator hands back the rows of a step not yet applied."""
        opt = self.opt.state_dict()
        meta = {"version": self.version, "clipped": self.clipped,
                "optimizer": {"name": opt["name"], "steps": opt["steps"]}}
        return meta, {"theta": self.theta, **{f"opt.{k}": v for k, v in opt["arrays"].items()}}

    def load(self, meta: dict, arrays: dict[str, np.ndarray], optimizer: bool = True) -> None:
        """Restore state(); ValueError (theta unchanged) when it does not fit this store. optimizer=False: theta
        only, the optimizer starts afresh (a resume that deliberately changes train.optimizer)."""
        theta = arrays["theta"]
        if theta.shape != self.theta.shape or theta.dtype != self.theta.dtype:
            raise ValueError(f"theta is {theta.dtype} {theta.shape}; this model needs {self.theta.dtype} "
                             f"{self.theta.shape}")
        if optimizer:
            self.opt.load_state_dict({**meta["optimizer"],
                                      "arrays": {k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}})
        if self.writer is not None:
            self.writer.begin_write()
        self.theta[...] = theta
        if self.writer is not None:
            self.writer.end_write(meta["version"])  # local workers read the restored version, not 0
        self.version, self.clipped = meta["version"], meta.get("clipped", 0)
        self._snapshot = None


def _subtract(theta: np.ndarray, mean: np.ndarray, lr: float, rows) -> None:
    """Group steps with an optimizer's state: the pushes' mean is how far the members moved theta, under the rule."""
    theta -= mean


def _union(keys: list[np.ndarray]) -> np.ndarray:
    """The sorted distinct keys of several key arrays: one sort and a comparison with the neighbour (np.unique
    does more work for the same result)."""
    s = np.concatenate(keys)
    s.sort()
    first = np.empty(len(s), dtype=bool)
    first[:1] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    return s[first]
