"""Rows created on first touch: an index from 64-bit keys to dense row numbers, and a store of the rows a key range
has seen, updated by any optimizer of optim.py (or ftrl.py) through its rows= interface. Pure numpy, no I/O.

The index is open addressing with linear probing over a power-of-two table, kept at most half full, probed for a
whole batch of keys at once: each round moves every unresolved key one slot on, so a batch costs a few numpy passes
(the longest probe run) instead of one Python step per key. Rows are numbered 0, 1, 2, ... in order of first touch,
so row r's key is keys[r] and the values live in one growing array.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .partition import splitmix64

_MIN_SLOTS = 16


class KeyIndex:
    """key (uint64) -> row (int64), growing. Every 64-bit value is a valid key: occupancy is a table of rows with
    -1 for empty, not a reserved key."""

    def __init__(self, capacity: int = 1024):
        slots = _MIN_SLOTS
        while slots < 2 * capacity:
            slots *= 2
        self._alloc(slots)
        self.keys = np.empty(max(capacity, 1), dtype=np.uint64)   # keys[r]: the key of row r (first len(self))
        self.size = 0

    def _alloc(self, slots: int) -> None:
        self._slot_key = np.zeros(slots, dtype=np.uint64)
        self._slot_row = np.full(slots, -1, dtype=np.int64)
        self._mask = np.uint64(slots - 1)

    def __len__(self) -> int:
        return self.size

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return (splitmix64(keys) & self._mask).astype(np.int64)

    def find(self, keys) -> np.ndarray:
        """The row of each key, -1 for a key never added. Keys may repeat."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = np.full(len(keys), -1, dtype=np.int64)
        todo = np.arange(len(keys))
        pos = self._home(keys)
        mask = int(self._mask)
        while len(todo):
            row = self._slot_row[pos]
            hit = (row >= 0) & (self._slot_key[pos] == keys[todo])
            out[todo[hit]] = row[hit]
            more = (row >= 0) & ~hit    # occupied by another key: probe on; an empty slot ends the search
            todo, pos = todo[more], (pos[more] + 1) & mask
        return out

    def rows(self, keys) -> np.ndarray:
        """The row of each key, adding the keys never seen (numbered in order of first appearance in `keys`)."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = self.find(keys)
        new = out < 0
        if new.any():
            fresh, first, inverse = np.unique(keys[new], return_index=True, return_inverse=True)
            by_appearance = np.argsort(first, kind="stable")
            rank = np.empty(len(fresh), dtype=np.int64)
            rank[by_appearance] = np.arange(len(fresh))
            rows = self.size + rank
            self._reserve(self.size + len(fresh))
            self.keys[rows] = fresh
            self.size += len(fresh)
            self._insert(fresh, rows)
            out[new] = rows[inverse.reshape(-1)]
        return out

    def _reserve(self, n: int) -> None:
        if n > len(self.keys):
            keys = np.empty(max(n, 2 * len(self.keys)), dtype=np.uint64)
            keys[:self.size] = self.keys[:self.size]
            self.keys = keys
        if 2 * n > len(self._slot_row):   # keep the table at most half full: probe runs stay short
            slots = len(self._slot_row)
            while 2 * n > slots:
                slots *= 2
            self._alloc(slots)
            self._insert(self.keys[:self.size], np.arange(self.size, dtype=np.int64))

    def _insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Place distinct keys, none of them in the table, with their rows. Where several want the same empty slot
        the first takes it and the rest probe on, as they would have one at a time."""
        pos = self._home(keys)
        todo = np.arange(len(keys))
        mask = int(self._mask)
        while len(todo):
            free = self._slot_row[pos] < 0
            slots, winner = np.unique(pos[free], return_index=True)
            take = todo[free][winner]
            self._slot_key[slots] = keys[take]
            self._slot_row[slots] = rows[take]
            placed = np.zeros(len(todo), dtype=bool)
            placed[np.flatnonzero(free)[winner]] = True
            todo, pos = todo[~placed], (pos[~placed] + 1) & mask


class KeyedStore:
    """The rows (each `width` values, zero when created) of the keys one server range has seen, with their
    optimizer state. `make_optimizer(theta)` builds the optimizer for a theta of some number of rows; when the
    rows outgrow their array it is doubled and a new optimizer is given the old one's state padded with zeros (a
    new row's state is what a fresh optimizer's would be), so every optimizer keeps its own update rule."""

    def __init__(self, width: int, make_optimizer: Callable[[np.ndarray], object], capacity: int = 1024,
                 dtype=np.float64):
        self.width, self.dtype, self._make = int(width), np.dtype(dtype), make_optimizer
        self.index = KeyIndex(capacity)
        self.theta = np.zeros((max(capacity, 1), self.width), dtype=self.dtype)
        self.optimizer = make_optimizer(self.theta)

    def __len__(self) -> int:
        return len(self.index)

    def _grow(self, n: int) -> None:
        if n <= len(self.theta):
            return
        cap = max(n, 2 * len(self.theta))
        theta = np.zeros((cap, self.width), dtype=self.dtype)
        theta[:len(self.theta)] = self.theta
        self.theta, self.optimizer = theta, self._optimizer_for(theta, self.optimizer.state_dict())

    def _optimizer_for(self, theta: np.ndarray, state: dict):
        """A new optimizer for theta holding `state` (a state_dict of fewer rows) padded with zeros: a new row's
        state is what a fresh optimizer's would be. ValueError from load_state_dict if the state does not fit."""
        padded = {}
        for k, a in state["arrays"].items():
            big = np.zeros((len(theta),) + a.shape[1:], dtype=a.dtype)
            big[:len(a)] = a
            padded[k] = big
        opt = self._make(theta)
        opt.load_state_dict({**state, "arrays": padded})
        return opt

    def _rows(self, keys) -> np.ndarray:
        rows = self.index.rows(keys)
        self._grow(len(self.index))
        return rows

    def pull(self, keys) -> np.ndarray:
        """The rows of `keys` (a copy, len(keys) x width); a key never seen gets a new zero row."""
        rows = self._rows(keys)   # first: it may replace self.theta with a larger array
        return self.theta[rows]

    def push(self, keys, grad: np.ndarray, lr: float) -> None:
        """One optimizer step on the rows of `keys` (distinct) with gradient rows `grad` (len(keys) x width)."""
        keys = np.asarray(keys, dtype=np.uint64)
        grad = np.asarray(grad)
        if grad.shape != (len(keys), self.width):
            raise ValueError(f"push of {len(keys)} keys needs a gradient of shape {(len(keys), self.width)}; got "
                             f"{grad.shape}")
        rows = self._rows(keys)
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        if len(rows) > 1 and not (np.diff(rows) > 0).all():
            raise ValueError("push: a key appears twice (sum its gradients first)")
        self.optimizer.step(self.theta, np.ascontiguousarray(grad[order], dtype=self.dtype), lr, rows=rows)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """(state, arrays) for checkpoint.save: the keys in row order ("keys"), their rows ("values") and each
        optimizer state array ("optimizer.NAME": FTRL's z and n, Adam's m, v and per-row counts t, ...), the
        len(self) rows in use only, as copies."""
        n = len(self)
        opt = self.optimizer.state_dict()
        arrays = {"keys": self.index.keys[:n].copy(), "values": self.theta[:n].copy()}
        arrays.update({f"optimizer.{k}": a[:n] for k, a in opt["arrays"].items()})
        return {"width": self.width, "dtype": self.dtype.str, "rows": n, "optimizer": opt["name"],
                "steps": opt["steps"]}, arrays

    def load(self, state: dict, arrays: dict[str, np.ndarray]) -> None:
        """Become the store a state() describes (as checkpoint.load returns it): the same keys on the same rows, so
        later pulls and pushes give bit for bit what the saved store would have. ValueError, and this store
        unchanged, if it does not fit (width, dtype, optimizer, shapes, repeated keys)."""
        n = state.get("rows")
        if state.get("width") != self.width or state.get("dtype") != self.dtype.str:
            raise ValueError(f"keyed state is {state.get('dtype')} rows of width {state.get('width')}; this store "
                             f"holds {self.dtype.str} rows of width {self.width}")
        opt = {k[len("optimizer."):]: a for k, a in arrays.items() if k.startswith("optimizer.")}
        if set(arrays) != {"keys", "values", *(f"optimizer.{k}" for k in opt)}:
            raise ValueError(f"keyed state has arrays {sorted(arrays)}; expected keys, values, optimizer.*")
        keys, values = arrays["keys"], arrays["values"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0 or keys.dtype != np.uint64 or keys.shape != (n,) \
                or values.shape != (n, self.width) or any(a.shape[:1] != (n,) for a in opt.values()):
            raise ValueError(f"keyed state of {n!r} rows has keys {keys.dtype} {list(keys.shape)}, values "
                             f"{list(values.shape)} and optimizer arrays {[list(a.shape) for a in opt.values()]}")
        index = KeyIndex(n)
        index.rows(keys)
        if len(index) != n:
            raise ValueError(f"keyed state lists {n - len(index)} key(s) twice")
        theta = np.zeros((max(n, 1), self.width), dtype=self.dtype)
        theta[:n] = values
        optimizer = self._optimizer_for(theta, {"name": state.get("optimizer"), "steps": state.get("steps"),
                                                "arrays": opt})
        self.index, self.theta, self.optimizer = index, theta, optimizer
