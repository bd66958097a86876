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
import signal
import sys
import threading
import time

BLAS_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
            "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
PR_SET_PDEATHSIG = 1

SPAWN = mp.get_context("spawn")


def usable_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


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


def load_entry(entry: str):
    """The function named "package.module:function" (how config names a worker's entry, like model.kind)."""
    module_name, _, name = entry.partition(":")
    fn = getattr(importlib.import_module(module_name), name, None)
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
    mp.current_process().name = role
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


class Reporter:
    """A child's one-way line to the launcher: small JSON events over a multiprocessing pipe (never the data)."""

    def __init__(self, conn):
        self.conn = conn

    def send(self, event: str, **fields) -> None:
        if self.conn is None:
            return
        try:
            self.conn.send_bytes(json.dumps({"event": event, **fields}).encode())
        except (OSError, ValueError):  # the launcher is gone; the parent watch ends us soon
            pass


def read_event(conn) -> dict | None:
    try:
        return json.loads(conn.recv_bytes().decode())
    except (EOFError, OSError):
        return None
