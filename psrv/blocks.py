"""Shared-memory data blocks: create (the owner), attach (everyone else), numpy views, close, unlink.

One block holds the training rows in shard order, then the held-out rows, then the per-column mean and scale used
for standardization. Only the process that created a block unlinks it; attaching never copies the data.
"""
from __future__ import annotations

import os
import secrets
from dataclasses import asdict, dataclass
from multiprocessing import shared_memory

import numpy as np

from .shmarray import release

PREFIX = "psrv_"
_ALIGN = 64  # cache-line alignment for every array in the block


def run_prefix() -> str:
    """A per-run name prefix: psrv_<pid>_<random>_ . The pid lets a later start tell whether the owner is alive."""
    return f"{PREFIX}{os.getpid()}_{secrets.token_hex(3)}_"


def unlink_name(name: str) -> bool:
    """Remove a segment by name if it exists (idempotent); True if there was one."""
    try:
        shm = shared_memory.SharedMemory(name=name)
    except FileNotFoundError:
        return False
    shm.close()
    shm.unlink()
    return True


def unlink_prefix(prefix: str, shm_dir: str = "/dev/shm") -> list[str]:
    """Remove every segment whose name starts with `prefix` (a launcher's own, after its children are gone)."""
    try:
        names = [n for n in os.listdir(shm_dir) if n.startswith(prefix)]
    except FileNotFoundError:  # not Linux: nothing to sweep
        return []
    return [n for n in names if unlink_name(n)]


def sweep_stale(shm_dir: str = "/dev/shm") -> list[str]:
    """Remove segments left by crashed runs: only ours (psrv_<pid>_ prefix, owned by this user) whose launcher pid
    is no longer running. Returns the names removed."""
    removed = []
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return removed
    for name in names:
        parts = name.split("_")
        if not name.startswith(PREFIX) or len(parts) < 3 or not parts[1].isdigit():
            continue
        try:
            if os.stat(os.path.join(shm_dir, name)).st_uid != os.getuid():
                continue
            os.kill(int(parts[1]), 0)  # raises if there is no such process: its run is over
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(shm_dir, name))
                removed.append(name)
            except FileNotFoundError:
                pass
        except (PermissionError, FileNotFoundError):  # alive but someone else's, or already gone
            continue
    return removed


@dataclass(frozen=True)
class BlockSpec:
    name: str
    dtype: str
    d: int           # feature columns
    n_train: int
    n_test: int = 0
    y_cols: int = 0  # 0: y is a vector; >0: y is (n, y_cols)

    def to_dict(self) -> dict:
        return asdict(self)

    def _parts(self) -> list[tuple[str, tuple[int, ...]]]:
        ys = lambda n: (n,) if self.y_cols == 0 else (n, self.y_cols)  # noqa: E731
        return [("X", (self.n_train, self.d)), ("y", ys(self.n_train)),
                ("X_test", (self.n_test, self.d)), ("y_test", ys(self.n_test)),
                ("mean", (self.d,)), ("scale", (self.d,))]

    def offsets(self) -> tuple[dict[str, tuple[int, tuple[int, ...]]], int]:
        itemsize = np.dtype(self.dtype).itemsize
        out, pos = {}, 0
        for key, shape in self._parts():
            out[key] = (pos, shape)
            pos += -(-int(np.prod(shape)) * itemsize // _ALIGN) * _ALIGN
        return out, max(pos, _ALIGN)


class DataBlock:
    """Numpy views over one shared-memory block: X, y, X_test, y_test, mean, scale."""

    def __init__(self, spec: BlockSpec, shm: shared_memory.SharedMemory, owner: bool):
        self.spec, self._shm, self.owner = spec, shm, owner
        layout, _ = spec.offsets()
        dtype = np.dtype(spec.dtype)
        for key, (off, shape) in layout.items():
            setattr(self, key, np.ndarray(shape, dtype=dtype, buffer=shm.buf, offset=off))

    @classmethod
    def create(cls, spec: BlockSpec) -> "DataBlock":
        _, nbytes = spec.offsets()
        # SharedMemory creates the segment with mode 0600: only our user can map it
        shm = shared_memory.SharedMemory(name=spec.name, create=True, size=nbytes)
        return cls(spec, shm, owner=True)

    @classmethod
    def attach(cls, spec: BlockSpec | dict) -> "DataBlock":
        if isinstance(spec, dict):
            spec = BlockSpec(**spec)
        return cls(spec, shared_memory.SharedMemory(name=spec.name), owner=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def close(self) -> None:
        for key, _ in self.spec._parts():
            self.__dict__.pop(key, None)
        release(self._shm, owner=False)

    def unlink(self) -> None:
        """Remove the segment's name (owner only); the memory is freed once every process has unmapped it."""
        if self.owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        self.unlink()
