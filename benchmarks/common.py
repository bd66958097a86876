"""What every benchmark shares: timing (medians over repeats), pinning, machine facts, a psrv server to talk to
directly, training runs with their metrics, and time-to-target-loss."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

import psrv
from psrv import config, data, proc, blocks
from psrv.cluster import Cluster
from psrv.launch import resolve


def median(xs) -> float:
    return float(statistics.median(xs))


def spread(xs) -> str:
    """min-max of the repeats, to show the noise next to the median."""
    return f"{min(xs):.3g}-{max(xs):.3g}"


@contextlib.contextmanager
def pinned(core: int | None):
    """Run the block on one core (as psrv's processes are), restoring the mask afterwards."""
    if core is None or not hasattr(os, "sched_setaffinity"):
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    import msgpack
    import zmq
    return {"cores": len(proc.usable_cores()), "cpu": model, "python": platform.python_version(),
            "numpy": np.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "msgpack": ".".join(map(str, msgpack.version)), "platform": platform.platform()}


@contextlib.contextmanager
def psrv_server(overrides: list[str], workers: int = 1):
    """A psrv server process (no workers) for a benchmark to be the client of; yields its address."""
    cfg = resolve(config.load(None, overrides + [f"train.workers={workers}"]))
    with tempfile.TemporaryDirectory() as out:
        cfg.output.dir = out
        prefix = blocks.run_prefix()
        try:
            block, layout = data.build(cfg, workers, prefix + "data")
            with block, Cluster(cfg, out, logging.WARNING, layout=layout, alone=True, prefix=prefix) as cluster:
                yield cluster.start_server()
        finally:
            blocks.unlink_prefix(prefix)


def server_core(workers: int = 1) -> int:
    """The core psrv pins its server to with this many workers (the benchmark client takes another)."""
    cores = proc.usable_cores()
    return cores[workers % len(cores)]


def other_core(core: int) -> int:
    cores = proc.usable_cores()
    return next((c for c in cores if c != core), core)


def train(overrides: list[str]) -> tuple[dict, list[dict]]:
    """One quiet psrv run: (summary, metrics lines)."""
    with tempfile.TemporaryDirectory() as out:
        r = psrv.train(None, overrides + [f"output.dir={out}", "output.plot=false", "checkpoint.every_steps=0"])
        with open(os.path.join(out, "metrics.jsonl")) as fh:
            lines = [json.loads(x) for x in fh]
    return r.summary, lines


def time_to_target(lines: list[dict], target: float) -> float | None:
    """Seconds of training until the logged training loss first reaches `target` (None if it never does)."""
    for x in lines:
        if "loss" in x and not x.get("full") and x["loss"] <= target:
            return x["elapsed_s"]
    return None


def lstsq_loss(dcfg) -> float:
    X, y, _, _ = data.load_arrays(dcfg)
    A = np.c_[X, np.ones(len(X))]
    theta = np.linalg.lstsq(A, y, rcond=None)[0]
    return float(np.mean((A @ theta - y) ** 2))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.s = time.perf_counter() - self.t0
