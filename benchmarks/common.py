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


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return ""


def machine() -> dict:
    """The processor (model name from /proc/cpuinfo), the usable cores, memory, transparent huge pages (the plain
    loop's private arrays may get them where psrv's shared memory does not), and the software versions."""
    model = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                  if ln.startswith("model name")), "")
    mem_kb = next((int(ln.split()[1]) for ln in _read("/proc/meminfo").splitlines() if ln.startswith("MemTotal:")),
                  0)
    thp = _read("/sys/kernel/mm/transparent_hugepage/enabled").strip()
    if "[" in thp:
        thp = thp.split("[", 1)[1].split("]", 1)[0]
    import msgpack
    import zmq
    return {"cores": len(proc.usable_cores()), "cpu": model, "online_cpus": os.cpu_count(),
            "memory_gib": round(mem_kb / 2**20, 1), "transparent_hugepages": thp or "unknown",
            "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(),
            "numpy": np.__version__, "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
            "msgpack": ".".join(map(str, msgpack.version)), "platform": platform.platform()}


class CpuMeter:
    """CPU time spent on the usable cores during a stretch of a benchmark, split into ours and other processes'.

    All of it: the busy jiffies (user, nice, system, irq, softirq, steal) of the usable cores' lines in /proc/stat.
    Ours: this process and its children that have exited and been waited for (os.times(); psrv's server and
    workers, the baseline processes), plus `extra_own_s` that a still-running helper reports. Other processes' is
    the difference: how much of the cores' time something else took while we measured (shared machines, tests run
    by others). Where /proc/stat has no per-core lines, the machine-wide line is used (and `scope` says so)."""

    BUSY = (0, 1, 2, 5, 6, 7)   # user nice system [idle iowait] irq softirq steal

    def __init__(self):
        self.cores = proc.usable_cores()
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.t0, self.busy0, self.own0 = time.monotonic(), self._busy(), self._own()

    def _busy(self) -> float | None:
        per, total = {}, None
        for ln in _read("/proc/stat").splitlines():
            if not ln.startswith("cpu"):
                continue
            name, *vals = ln.split()
            busy = sum(int(vals[i]) for i in self.BUSY if i < len(vals))
            if name == "cpu":
                total = busy
            else:
                per[int(name[3:])] = busy
        if per and all(c in per for c in self.cores):
            self.scope = "usable cores"
            return sum(per[c] for c in self.cores) / self.tick
        self.scope = "all CPUs"
        return None if total is None else total / self.tick

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def stop(self, extra_own_s: float = 0.0) -> dict:
        """{wall_s, busy_s, own_s, others_s, others_frac (of the usable cores' time), scope}; busy and others are
        None where /proc/stat cannot be read."""
        wall = time.monotonic() - self.t0
        busy1, own = self._busy(), self._own() - self.own0 + extra_own_s
        if busy1 is None or self.busy0 is None:
            return {"wall_s": wall, "busy_s": None, "own_s": own, "others_s": None, "others_frac": None,
                    "scope": "unavailable"}
        busy = busy1 - self.busy0
        cores = len(self.cores) if self.scope == "usable cores" else (os.cpu_count() or 1)
        others = max(busy - own, 0.0)
        return {"wall_s": round(wall, 3), "busy_s": round(busy, 2), "own_s": round(own, 2),
                "others_s": round(others, 2), "others_frac": round(others / (cores * wall), 4) if wall > 0 else None,
                "scope": self.scope}


@contextlib.contextmanager
def psrv_server(overrides: list[str], workers: int = 1):
    """A psrv server process (no workers) for a benchmark to be the client of; yields its address."""
    cfg = resolve(config.load(None, overrides + [f"train.workers={workers}"]))
    with tempfile.TemporaryDirectory() as out, blocks.owned_prefix() as owner:
        # owned: another run's start-up sweep leaves these segments alone while we live (and they go with us)
        cfg.output.dir = out
        block, layout = data.build(cfg, workers, owner.prefix + "data")
        with block, Cluster(cfg, out, logging.WARNING, layout=layout, alone=True, prefix=owner.prefix) as cluster:
            yield cluster.start_server()


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
