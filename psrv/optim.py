"""Server-side optimizers (SGD, momentum, Adagrad, Adam) and the learning-rate schedule, in pure numpy: each updates
theta in place with buffers allocated once, and saves/restores its state for checkpoints. No I/O here; the config
is only read, by make(), for hyper-parameters."""
from __future__ import annotations

import math

import numpy as np


def lr_at(step: int, lr: float, schedule: str, total_steps: int, decay: float = 0.5, decay_every: int = 1000,
          lr_min: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`."""
    if schedule == "constant":
        return lr
    if schedule == "step":
        return lr * decay ** (step // decay_every)
    if schedule == "inv_sqrt":
        return lr / math.sqrt(1.0 + step / decay_every)
    if schedule == "cosine":
        frac = min(step, total_steps) / max(total_steps, 1)
        return lr_min + (lr - lr_min) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def lr_range(start: int, count: int, lr: float, schedule: str, total_steps: int, decay: float = 0.5,
             decay_every: int = 1000, lr_min: float = 0.0) -> list[float]:
    """lr_at for steps start .. start + count - 1, in one numpy pass (group steps send a step's rates in each
    reply; 64 calls of lr_at took the server longer than the rest of the reply). Equal to lr_at to rounding."""
    if schedule == "constant":
        return [float(lr)] * count
    step = np.arange(start, start + count, dtype=np.float64)
    if schedule == "step":
        rates = lr * np.power(decay, np.floor(step / decay_every))
    elif schedule == "inv_sqrt":
        rates = lr / np.sqrt(1.0 + step / decay_every)
    elif schedule == "cosine":
        frac = np.minimum(step, total_steps) / max(total_steps, 1)
        rates = lr_min + (lr - lr_min) * 0.5 * (1.0 + np.cos(np.pi * frac))
    else:
        raise ValueError(f"unknown lr schedule {schedule!r}")
    return rates.tolist()


class _Optimizer:
    """The shared part: state arrays shaped like theta, the step count, row-wise updates, state_dict / load_state_dict.

    Subclasses list their state arrays in `state_names` (zero at the start, saved in checkpoints) and the Train
    config fields they read in `hyper`; `self.scratch` is one more buffer for intermediate results, never saved.
    Every rule is elementwise, so an update of some rows (a push that touches only some keys) runs the same
    arithmetic on those rows' values and state and leaves every other row bit-identical.
    """

    name = ""
    state_names: tuple[str, ...] = ()
    counts: tuple[str, ...] = ()   # state arrays of one count per row, kept by _count(), not by the rule
    hyper: tuple[str, ...] = ()

    def __init__(self, theta: np.ndarray):
        self.shape, self.dtype = theta.shape, theta.dtype
        self.steps = 0
        self.state = {k: np.zeros_like(theta) for k in self.state_names}
        # Allocated once here: lr * grad and the like would otherwise make a theta-sized temporary every step.
        self.scratch = np.empty_like(theta)

    def _check(self, theta: np.ndarray, grad: np.ndarray, rows: np.ndarray | None) -> None:
        # Cheap guard: numpy would otherwise broadcast or silently cast into the preallocated buffers.
        shape = self.shape if rows is None else (len(rows), *self.shape[1:])
        if theta.shape != self.shape or grad.shape != shape or theta.dtype != self.dtype or grad.dtype != self.dtype:
            for what, a, want in (("theta", theta, self.shape), ("grad", grad, shape)):
                if a.shape != want or a.dtype != self.dtype:
                    raise ValueError(f"{self.name}: {what} is {a.dtype.str} {list(a.shape)}, but this optimizer "
                                     f"was built for {self.dtype.str} {list(want)}")
        if rows is not None and len(rows) and (rows.ndim != 1 or rows[0] < 0 or rows[-1] >= self.shape[0]
                                               or (len(rows) > 1 and not (np.diff(rows) > 0).all())):
            raise ValueError(f"{self.name}: rows must be increasing indices below {self.shape[0]}")

    def step(self, theta: np.ndarray, grad: np.ndarray, lr: float, rows: np.ndarray | None = None) -> None:
        """Apply one update to theta in place; `self.steps` counts them. With `rows` (increasing row indices),
        grad holds the gradient of those rows only, and only they and their state change."""
        self._check(theta, grad, rows)
        self.steps += 1
        if rows is None:
            self._update(theta, grad, lr, self.state, self.scratch, self._count(None))
            return
        t = self._count(rows)
        sub = theta[rows]  # fancy indexing copies: the same rule runs on the copies, which are written back
        state = {k: a[rows] for k, a in self.state.items() if k not in self.counts}
        self._update(sub, grad, lr, state, np.empty_like(sub), t)
        theta[rows] = sub
        for k, a in state.items():
            self.state[k][rows] = a

    def _count(self, rows: np.ndarray | None):
        """The update count a rule needs (Adam's bias correction); None for rules without one."""
        return None

    def _update(self, theta, grad, lr, state: dict, s: np.ndarray, t) -> None:
        raise NotImplementedError

    def _expected(self, key: str) -> tuple[tuple, np.dtype]:
        return self.shape, self.dtype

    def state_dict(self) -> dict:
        """{"name", "steps", "arrays": copies of the state arrays} - copies, so later steps do not change it."""
        return {"name": self.name, "steps": self.steps, "arrays": {k: a.copy() for k, a in self.state.items()}}

    def load_state_dict(self, d: dict) -> None:
        """Restore a state_dict() exactly; ValueError (and nothing changed) if it does not fit this optimizer."""
        d = self._upgrade(d)
        if d.get("name") != self.name:
            raise ValueError(f"optimizer state is for {d.get('name')!r}, not {self.name!r}")
        steps = d.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"{self.name}: optimizer state has steps = {steps!r}; expected an integer >= 0")
        arrays = d.get("arrays", {})
        if set(arrays) != set(self.state):
            raise ValueError(f"{self.name}: optimizer state has arrays {sorted(arrays)}; expected "
                             f"{sorted(self.state)}")
        for k, a in arrays.items():
            a = np.asarray(a)
            shape, dtype = self._expected(k)
            if a.shape != shape or a.dtype != dtype:
                raise ValueError(f"{self.name}: optimizer state array {k!r} is {a.dtype.str} {list(a.shape)}; "
                                 f"expected {dtype.str} {list(shape)}")
        # Checked everything first so a bad state leaves this optimizer as it was; copy so the caller's arrays
        # are not aliased by the buffers we keep updating.
        for k, a in arrays.items():
            np.copyto(self.state[k], a)
        self.steps = int(steps)
        self._loaded()

    def _loaded(self) -> None:
        pass

    @property
    def dense_names(self) -> tuple[str, ...]:
        """The state arrays shaped like theta (every one but the per-row counts)."""
        return tuple(k for k in self.state_names if k not in self.counts)

    def set_dense(self, arrays, steps: int) -> None:
        """The state after `steps` dense updates: dense_names' arrays (copied), every row's count `steps`. Group
        steps (psrv/group.py): the members start each group step from the server's state, and the server takes
        the members' at its end."""
        for k, a in zip(self.dense_names, arrays, strict=True):
            np.copyto(self.state[k], a)
        for k in self.counts:
            self.state[k].fill(steps)
        self.steps = steps
        self._loaded()

    def _upgrade(self, d: dict) -> dict:
        """A state_dict() of an earlier version, in this version's form."""
        return d


class SGD(_Optimizer):
    """theta <- theta - lr * grad."""

    name = "sgd"

    def _update(self, theta, grad, lr, state, s, t):
        theta -= np.multiply(grad, lr, out=s)


class Momentum(_Optimizer):
    """Heavy-ball momentum, PyTorch form: v <- mu v + g; theta <- theta - lr v (or lr (g + mu v) for Nesterov)."""

    name = "momentum"
    state_names = ("velocity",)
    hyper = ("momentum", "nesterov")

    def __init__(self, theta: np.ndarray, *, momentum: float, nesterov: bool):
        super().__init__(theta)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def _update(self, theta, grad, lr, state, s, t):
        v, mu = state["velocity"], self.momentum
        v *= mu
        v += grad
        if self.nesterov:
            np.multiply(v, mu, out=s)
            s += grad
            s *= lr
        else:
            np.multiply(v, lr, out=s)
        theta -= s


def _check_eps(name: str, eps: float) -> float:
    # eps = 0 turns a coordinate whose gradient has been exactly 0 so far (an all-zero feature) into 0/0 = NaN.
    if not eps > 0:
        raise ValueError(f"{name}: eps must be > 0 (it keeps never-updated coordinates from 0/0); got {eps!r}")
    return float(eps)


class Adagrad(_Optimizer):
    """G <- G + g^2; theta <- theta - lr g / (sqrt(G) + eps)."""

    name = "adagrad"
    state_names = ("sum_sq",)
    hyper = ("eps",)

    def __init__(self, theta: np.ndarray, *, eps: float):
        super().__init__(theta)
        self.eps = _check_eps(self.name, eps)

    def _update(self, theta, grad, lr, state, s, t):
        G = state["sum_sq"]
        np.multiply(grad, grad, out=s)
        G += s
        np.sqrt(G, out=s)
        s += self.eps
        np.divide(grad, s, out=s)
        s *= lr
        theta -= s


class Adam(_Optimizer):
    """Adam with bias correction (PyTorch form, eps added after the square root of the corrected v).

    The bias correction counts the updates of each row (state "t"): a row that only some pushes touch is
    corrected for its own updates, as sparse Adam does; while every update is dense all counts are equal and
    the corrections are scalars."""

    name = "adam"
    state_names = ("m", "v", "t")
    counts = ("t",)
    hyper = ("beta1", "beta2", "eps")

    def __init__(self, theta: np.ndarray, *, beta1: float, beta2: float, eps: float):
        super().__init__(theta)
        for k, b in (("beta1", beta1), ("beta2", beta2)):
            # beta = 1 makes the bias correction 1 - beta**t zero, so every step would be 0/0.
            if not 0 <= b < 1:
                raise ValueError(f"adam: {k} must be in [0, 1); got {b!r}")
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.eps = _check_eps(self.name, eps)
        self.state["t"] = np.zeros(self.shape[0], dtype=np.int64)
        self._uniform_t: int | None = 0   # every row's count, while they are all equal

    def _expected(self, key):
        return ((self.shape[0],), np.dtype(np.int64)) if key == "t" else (self.shape, self.dtype)

    def _upgrade(self, d):
        # before per-row counts every row had had every update: its count is the optimizer's step count
        arrays, steps = d.get("arrays", {}), d.get("steps")
        if "t" not in arrays and isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
            return {**d, "arrays": {**arrays, "t": np.full(self.shape[0], steps, np.int64)}}
        return d

    def _loaded(self):
        t = self.state["t"]
        self._uniform_t = int(t[0]) if len(t) and (t == t[0]).all() else None

    def _count(self, rows):
        t = self.state["t"]
        if rows is None:
            t += 1
            if self._uniform_t is not None:
                self._uniform_t += 1
                return self._uniform_t
            return t
        t[rows] += 1
        if len(rows) != len(t):
            self._uniform_t = None
        elif self._uniform_t is not None:
            self._uniform_t += 1
        return t[rows]

    def _scalars(self, lr: float, t, theta: np.ndarray):
        """(1 - beta2^t, lr / (1 - beta1^t)): Python floats for one count; for an array of counts, per row, computed
        once per distinct count with the same scalar arithmetic and rounded to theta's dtype as a scalar operand
        would be, so a row gets bit for bit what a dense update would give it."""
        b1, b2 = self.beta1, self.beta2
        if not isinstance(t, np.ndarray):
            return 1.0 - b2 ** t, lr / (1.0 - b1 ** t)
        counts, where = np.unique(t, return_inverse=True)
        shape = (-1,) + (1,) * (theta.ndim - 1)
        c2 = np.array([1.0 - b2 ** int(k) for k in counts], dtype=theta.dtype)[where].reshape(shape)
        k = np.array([lr / (1.0 - b1 ** int(k)) for k in counts], dtype=theta.dtype)[where].reshape(shape)
        return c2, k

    def _update(self, theta, grad, lr, state, s, t):
        m, v = state["m"], state["v"]
        b1, b2 = self.beta1, self.beta2
        c2, k = self._scalars(lr, t, theta)
        m *= b1
        m += np.multiply(grad, 1.0 - b1, out=s)
        v *= b2
        np.multiply(grad, grad, out=s)
        s *= 1.0 - b2
        v += s
        # s <- sqrt(v / (1 - b2^t)) + eps, then theta -= lr / (1 - b1^t) * m / s
        np.divide(v, c2, out=s)
        np.sqrt(s, out=s)
        s += self.eps
        np.divide(m, s, out=s)
        s *= k
        theta -= s


OPTIMIZERS = {cls.name: cls for cls in (SGD, Momentum, Adagrad, Adam)}


def make(name: str, theta: np.ndarray, train_cfg, l2: float = 0.0) -> _Optimizer:
    """The optimizer `name` for theta, with its hyper-parameters read from a psrv.config.Train; `l2` (model.l2) is
    FTRL's own L2 term (the other optimizers get it from the store, as a gradient term)."""
    if name == "ftrl":
        from .ftrl import FTRL   # ftrl.py builds on this module
        return FTRL(theta, ftrl_beta=train_cfg.ftrl_beta, l1=train_cfg.l1, l2=l2)
    cls = OPTIMIZERS.get(name)
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join([*OPTIMIZERS, 'ftrl'])}")
    return cls(theta, **{k: getattr(train_cfg, k) for k in cls.hyper})
