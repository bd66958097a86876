"""Shared-memory data blocks: create (the owner), attach (everyone else), numpy views, close, unlink.

One block holds the training rows in shard order, then the held-out rows, then the per-column mean and scale used
for standardization. Only the process that created a block unlinks it; attaching never copies the data.
"""
from __future__ import annotations

import fcntl
import logging
import os
import secrets
from dataclasses import asdict, dataclass
from multiprocessing import shared_memory

import numpy as np

from .shmarray import release

PREFIX = "psrv_"
LOCK = "lock"     # <prefix>lock: the owner's lock file, beside its segments
SHM_DIR = "/dev/shm"
_ALIGN = 64  # cache-line alignment for every array in the block

log = logging.getLogger("psrv")


def run_prefix() -> str:
    """A per-run name prefix: psrv_<pid>_<random>_ . Ownership does not rest on the pid (see owned_prefix); it
    names the launcher for people and tests."""
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


def unlink_prefix(prefix: str, shm_dir: str = SHM_DIR) -> list[str]:
    """Remove every segment whose name starts with `prefix` (a launcher's own, after its children are gone). The
    owner's lock file is left to its holder, who removes it last (owned_prefix)."""
    try:
        names = [n for n in os.listdir(shm_dir) if n.startswith(prefix) and n != prefix + LOCK]
    except FileNotFoundError:  # not Linux: nothing to sweep
        return []
    return [n for n in names if unlink_name(n)]


class Owner:
    """A run's claim on its prefix: an exclusive flock on /dev/shm/<prefix>lock, held for the run's whole life.

    The kernel drops a flock lock when its holder dies, in whatever PID namespace it lived, so another run can
    prove the owner dead by taking the lock, where os.kill(pid, 0) only sees its own namespace. The file is made
    under a name the sweep ignores, locked, then linked into place: no one ever sees it unlocked. It is also
    registered with multiprocessing's resource tracker, which removes it with the segments when the owner is
    killed with SIGKILL."""

    def __init__(self, shm_dir: str = SHM_DIR):
        self.shm_dir, self.fd = shm_dir, None
        for _ in range(100):
            self.prefix = run_prefix()
            if not os.path.isdir(shm_dir):   # no /dev/shm (not Linux): nothing to sweep, nothing to claim
                return
            tmp = os.path.join(shm_dir, f".{self.prefix}{LOCK}")
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.link(tmp, self.lock_path)  # never replaces: the same pid and random part in another namespace
            except OSError:
                os.close(fd)
                fd = None
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            if fd is None:
                continue
            self.fd = fd
            if os.path.realpath(shm_dir) == os.path.realpath(SHM_DIR):  # where shm_unlink looks
                _track(self.prefix + LOCK, register=True)
            return
        raise OSError(f"cannot create a lock file in {shm_dir}")

    @property
    def lock_path(self) -> str:
        return os.path.join(self.shm_dir, self.prefix + LOCK)

    def release(self) -> list[str]:
        """Remove the run's segments, then its lock file, then let go of the lock."""
        removed = unlink_prefix(self.prefix, self.shm_dir)
        if self.fd is not None:
            try:
                os.unlink(self.lock_path)
            except FileNotFoundError:
                pass
            if os.path.realpath(self.shm_dir) == os.path.realpath(SHM_DIR):
                _track(self.prefix + LOCK, register=False)
            os.close(self.fd)
            self.fd = None
        return removed

    def __enter__(self) -> "Owner":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def owned_prefix(shm_dir: str = SHM_DIR) -> Owner:
    """`with owned_prefix() as owner:` a fresh prefix (owner.prefix) whose segments no other run's sweep removes
    while this process lives; they are removed when the block is left."""
    return Owner(shm_dir)


def _track(name: str, register: bool) -> None:
    """Tell multiprocessing's resource tracker about the lock file (it unlinks /dev/shm/<name> by shm_unlink)."""
    try:
        from multiprocessing import resource_tracker
        (resource_tracker.register if register else resource_tracker.unregister)("/" + name, "shared_memory")
    except Exception:  # no tracker (an exotic platform): the next run's sweep removes the file instead
        pass


def try_lock(fd: int) -> int | None:
    """fd, now holding an exclusive lock on its file; None (fd closed) if another process holds one. The kernel
    drops a lock when its holder dies, in any PID namespace: that is what ownership rests on here."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _owner_dead(lock_path: str) -> int | None:
    """An open descriptor holding the owner's lock when its owner is dead (the caller unlinks, then closes it);
    None while the owner lives (or the file went away)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return None
    return try_lock(fd)


def sweep_stale(shm_dir: str = SHM_DIR) -> list[str]:
    """Remove segments left by runs that are over: only ours (psrv_<pid>_<random>_ names, owned by this user).

    A run with a lock file (<prefix>lock) is over when its lock can be taken: the kernel drops it when the owner
    dies, in any PID namespace. Segments without a lock file were written by a psrv from before lock files; for
    those alone the old rule applies (the launcher pid is not running in this namespace), and the log says so.
    Returns the names removed."""
    removed: list[str] = []
    try:
        names = os.listdir(shm_dir)
    except FileNotFoundError:
        return removed
    runs: dict[str, list[str]] = {}
    for name in names:
        parts = name.split("_")
        if not name.startswith(PREFIX) or len(parts) < 4 or not parts[1].isdigit():
            continue
        runs.setdefault("_".join(parts[:3]) + "_", []).append(name)
    uid = os.getuid()
    for prefix, group in runs.items():
        try:
            if os.stat(os.path.join(shm_dir, group[0])).st_uid != uid:
                continue
        except FileNotFoundError:
            continue
        lock = prefix + LOCK
        if lock in group:
            fd = _owner_dead(os.path.join(shm_dir, lock))
            if fd is None:
                continue   # its owner holds the lock: alive, wherever it runs
            try:
                gone = [n for n in group if n != lock and _unlink_file(shm_dir, n)]
                _unlink_file(shm_dir, lock)
            finally:
                os.close(fd)
            if gone:
                log.warning("removed shared memory %s left by a run that is no longer running (nobody holds its "
                            "lock)", ", ".join(sorted(gone)))
            removed += gone
            continue
        pid = int(prefix.split("_")[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            log.warning("shared memory %s has no lock file (written by a psrv from before lock files): removed "
                        "because process %d is not running in this PID namespace", ", ".join(sorted(group)), pid)
            removed += [n for n in group if _unlink_file(shm_dir, n)]
        except PermissionError:
            pass
        else:
            log.info("shared memory %s has no lock file (written by a psrv from before lock files); process %d "
                     "is running, so it is left alone", ", ".join(sorted(group)), pid)
    return removed


def _unlink_file(shm_dir: str, name: str) -> bool:
    try:
        os.unlink(os.path.join(shm_dir, name))
        return True
    except FileNotFoundError:
        return False


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


class Segment:
    """The lifetime shared by the blocks over one segment (self._shm, self.owner): close() unmaps (the subclass
    drops its views first), unlink() removes the name (owner only), and `with` does both."""

    _shm: shared_memory.SharedMemory
    owner: bool

    def close(self) -> None:
        raise NotImplementedError

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


class DataBlock(Segment):
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
