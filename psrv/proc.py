"""Process plumbing shared by the server and workers: spawn, core pinning, BLAS threads, parent-death exit.

The launcher starts children with the 'spawn' method only: a forked child would inherit a ZeroMQ context, which
libzmq does not survive. Each child calls child_setup() first thing.
"""
from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import multiprocessing as mp
import os
import select
import signal
import sys
import tempfile
import threading
import time

from .blocks import try_lock

BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
            "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
TITLE_BYTES = 15  # the kernel keeps 15 bytes of a process name (16 with the NUL)

SPAWN = mp.get_context("spawn")


def usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


# not /dev/shm: that holds only shared-memory segments, and a listing of it is how a leaked one is found
CORE_LOCK_DIR = os.path.join(tempfile.gettempdir(), "psrv-cores")


class CoreClaim:
    """The cores a launcher may pin its children to: cores no other live psrv run on this machine holds.

    A run holds each core it pins to by an exclusive flock on CORE_LOCK_DIR/psrv_core_<N>.lock for as long as its
    launcher lives (the kernel drops the lock when the launcher dies, in any PID namespace, and its children die
    with it). A core another run holds is skipped; with none left, nothing is pinned. The lock files stay: removing
    a file others may be about to lock is a race, and they are empty."""

    def __init__(self, wanted: int, cores: list[int] | None = None, lock_dir: str = CORE_LOCK_DIR):
        self.usable = cores if cores is not None else usable_cores()
        self.wanted, self.held_elsewhere = wanted, []
        self._fds: dict[int, int] = {}
        for core in self.usable:
            if len(self._fds) >= wanted:
                break
            fd = _lock_core(lock_dir, core)
            if fd is None:
                self.held_elsewhere.append(core)
            else:
                self._fds[core] = fd   # -1: no lock could be taken here; the core counts as free
        self.cores = sorted(self._fds)

    def release(self) -> None:
        for fd in self._fds.values():
            if fd >= 0:
                os.close(fd)
        self._fds.clear()
        self.cores = []


def _lock_core(lock_dir: str, core: int) -> int | None:
    """A descriptor holding the core's lock; None if another run holds it; -1 if there is no lock to take (the
    file cannot be opened): the core is then treated as free, as before core locks."""
    path = os.path.join(lock_dir, f"psrv_core_{core}.lock")
    try:
        if not os.path.isdir(lock_dir):
            os.makedirs(lock_dir, exist_ok=True)
            os.chmod(lock_dir, 0o1777)  # every user's runs lock here; the sticky bit keeps their files theirs
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError:
        return -1
    try:
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o644)  # other users' runs must be able to open it to take the lock in turn
    except OSError:
        pass
    return try_lock(fd)


@contextlib.contextmanager
def blas_threads(n: int):
    """Set the BLAS thread count in the environment a child inherits at spawn (it reads it when numpy loads)."""
    saved = {k: os.environ.get(k) for k in BLAS_ENV}
    os.environ.update({k: str(n) for k in BLAS_ENV})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def main_hidden():
    """Start children without re-running the caller's __main__ module in them. Spawn normally re-imports the
    parent's main script in each child (to find functions defined there); our children's code lives in importable
    modules, and a script that calls psrv.train() without an `if __name__ == "__main__"` guard would otherwise
    start a second run inside every child."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        for k in saved:
            setattr(main, k, None) if k == "__spec__" else delattr(main, k)
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


INSTALLED_WORKERS = "psrv_workers"  # the name pip installs the repository's workers/ under (pyproject.toml)


def load_entry(entry: str):
    """The function named "package.module:function" (how config names a worker's entry, like model.kind). A name
    under `workers.` is the repository's workers/ package, found under its installed name when psrv runs from an
    installed copy rather than a checkout."""
    module_name, _, name = entry.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if module_name.split(".")[0] != "workers" or not (module_name + ".").startswith(f"{e.name}."):
            raise  # a module inside the entry's package failed to import: that error is the one to show
        module = importlib.import_module(INSTALLED_WORKERS + module_name[len("workers"):])
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ImportError(f"{entry!r}: {module_name} has no function {name!r}")
    return fn


def run_entry(entry: str, spec, conn, parent_pid: int, core: int | None, log_level: int) -> None:
    """What every spawned child runs: import its entry function here, in the child, and call it with the spec.
    The launcher names entries rather than passing functions, so psrv never imports the code that runs in its
    children (workers depend on psrv, not the other way round)."""
    try:
        fn = load_entry(entry)
    except Exception as e:  # a wrong name is a failure to report, not a death to restart
        Reporter(conn).send("error", process=mp.current_process().name,
                            message=f"cannot load entry {entry!r}: {type(e).__name__}: {e}")
        sys.exit(1)
    fn(spec, conn, parent_pid, core, log_level)


def _die_with_parent(parent_pid: int, interval_s: float = 0.5) -> None:
    """Exit when the parent dies: prctl(PDEATHSIG) on Linux, and a watchdog thread everywhere (also covers the
    race where the parent died before prctl took effect)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)
            time.sleep(interval_s)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def set_title(title: str) -> bool:
    """Name this process `title` where ps, top and pgrep look (Linux: the 15-byte comm, via prctl; `ps -f` and
    `ps aux` still show the command line). False where the system has no such call: the name is a convenience, and
    a dependency that rewrites argv (setproctitle) would cost a compiled package for what `ps -o comm` shows anyway."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_NAME, ctypes.c_char_p(title.encode()[:TITLE_BYTES]), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def name_process(role: str) -> None:
    """The name this child logs under ("worker-3") and shows in ps and top ("psrv worker 3")."""
    mp.current_process().name = role
    set_title("psrv " + role.replace("-", " "))


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through `finally`: sockets closed, shared memory released


def child_setup(role: str, parent_pid: int, core: int | None, log_level: int) -> None:
    """First call in every child: die with the parent, leave Ctrl-C to the launcher, pin, set up logging."""
    _die_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group; the launcher alone decides how to shut down, then sends SIGTERM.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if core is not None:
        try:
            os.sched_setaffinity(0, {core})
        except (AttributeError, OSError):
            pass
    name_process(role)
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(processName)s %(levelname)s %(message)s", force=True)


@contextlib.contextmanager
def profiled(role: str):
    """With PSRV_PROFILE_DIR set, profile this process with cProfile and write <dir>/<role>-<pid>.prof at exit:
    how the benchmarks explain a missed target from a profile rather than a guess."""
    out = os.environ.get("PSRV_PROFILE_DIR")
    if not out:
        yield
        return
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        os.makedirs(out, exist_ok=True)
        prof.dump_stats(os.path.join(out, f"{role}-{os.getpid()}.prof"))


DROPPABLE = frozenset({"progress"})  # events that a newer one of the same kind replaces: dropped when the pipe is full
REPORT_WAIT_S = 30.0     # how long any other event may wait for a launcher that does not read
PIPE_BUF = getattr(select, "PIPE_BUF", 512)  # a pipe write of at most this many bytes is all or nothing


class Reporter:
    """A child's one-way line to the launcher: small JSON events over a multiprocessing pipe (never the data).

    Sending never blocks the child on its launcher (stopped, or not reading): a progress event is written only if
    the pipe has room for all of it at once, and is dropped otherwise (the next one carries newer numbers); any
    other event ("ready", "joined", "finishing", "done", "error") is never dropped for a full pipe: it is written
    from a thread of its own, and the caller waits for it at most `wait_s` seconds. An event still unwritten then is
    written if the launcher reads before this process exits; the server's summary is on disk either way."""

    def __init__(self, conn, wait_s: float = REPORT_WAIT_S):
        self.conn, self.wait_s = conn, wait_s
        self.dropped = 0                            # progress events not sent because the pipe was full
        self._lock = threading.Lock()
        self._writer: threading.Thread | None = None  # the last blocking write, while it is still going
        self.gave_up = False   # an event went unread for wait_s: later ones do not wait again

    def send(self, event: str, **fields) -> bool:
        """True if the event was written to the pipe."""
        if self.conn is None:
            return False
        data = json.dumps({"event": event, **fields}).encode()
        with self._lock:
            if event in DROPPABLE:
                return self._send_now(data)
            return self._send_waiting(event, data)

    def _send_now(self, data: bytes) -> bool:
        busy = self._writer is not None and self._writer.is_alive()
        if busy or len(data) + 4 > PIPE_BUF:   # behind an unfinished message, or too big to write atomically
            self.dropped += 1
            return False
        try:
            fd = self.conn.fileno()
            os.set_blocking(fd, False)
        except (OSError, ValueError):  # closed
            return False
        try:
            self.conn.send_bytes(data)  # the 4-byte length and the data in one write: all of it, or EAGAIN
            return True
        except BlockingIOError:
            self.dropped += 1
            return False
        except (OSError, ValueError):  # the launcher is gone; the parent watch ends us soon
            return False
        finally:
            try:
                os.set_blocking(fd, True)
            except OSError:
                pass

    def _send_waiting(self, event: str, data: bytes) -> bool:
        deadline = time.monotonic() + self.wait_s
        if self._writer is not None:
            # a launcher that has already left one event unread for wait_s is not waited for again
            self._writer.join(0.0 if self.gave_up else max(0.0, deadline - time.monotonic()))
            if self._writer.is_alive():
                logging.getLogger("psrv").warning("the launcher has read nothing for %g s; event %r not sent",
                                                  self.wait_s, event)
                return False
        sent = []

        def write():
            try:
                self.conn.send_bytes(data)
                sent.append(True)
            except (OSError, ValueError):  # the launcher is gone
                pass

        self._writer = threading.Thread(target=write, name=f"report-{event}", daemon=True)
        self._writer.start()
        self._writer.join(max(0.0, deadline - time.monotonic()))
        if self._writer.is_alive():
            logging.getLogger("psrv").warning("the launcher has not read event %r for %g s; going on without "
                                              "waiting for it", event, self.wait_s)
            self.gave_up = True
            return False
        self._writer = None
        return bool(sent)


def read_event(conn) -> dict | None:
    try:
        return json.loads(conn.recv_bytes().decode())
    except (EOFError, OSError):
        return None
