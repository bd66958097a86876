"""The processes of one launcher: a server (unless attaching), workers, and what happens when one of them ends.

A worker that raises is a bug: the run stops with its message. A worker that dies (killed, or gone without a word)
is restarted up to train.max_restarts times; after that its shards go to the survivors. A server that dies is
restarted from its newest checkpoint up to server.max_restarts times, on the same address, and the workers
register with it again by themselves. Leaving the `with` block always stops and reaps every child.
"""
from __future__ import annotations

import json
import logging
import multiprocessing.connection as mpc
import os
import signal
import time

import numpy as np

from . import config as config_mod
from . import proc, signals
from .errors import ConfigError, RunError
from .spec import RANGES_FILE, RangeSpec, ServerSpec, WorkerSpec

log = logging.getLogger("psrv")

SERVER_ENTRY = "psrv.server:main"
RANGE_ENTRY = "psrv.rangeserver:main"  # named, not imported: the child imports it (proc.run_entry)
SERVER_START_TIMEOUT_S = 60.0   # spawn + imports + bind (+ loading a checkpoint); generous for a loaded machine
EXIT_GRACE_S = 5.0              # how long children get to leave on their own before SIGTERM, then SIGKILL
FINISH_NOTE_S = 60.0            # a server still writing its outputs after this long is waited for, with a note


class Child:
    def __init__(self, name: str, process, conn, wid: int | None = None):
        self.name, self.process, self.conn, self.wid = name, process, conn, wid
        self.error: str | None = None
        self.error_kind = ""
        self.started_wall = time.time()   # for telling this process's outputs from older ones

    def describe_exit(self) -> str:
        code = self.process.exitcode
        if self.error:
            return self.error
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


class Cluster:
    def __init__(self, cfg: config_mod.Config, out_dir: str, log_level: int, layout=None, address: str = "",
                 resume: str | None = None, alone: bool = False, prefix: str = "", on_worker=None):
        """on_worker(event): called with each worker's "joined" and "left" events (what --attach prints)."""
        self.cfg, self.out_dir, self.log_level, self.layout = cfg, out_dir, log_level, layout
        self.on_worker = on_worker
        self.address, self.resume, self.alone, self.prefix = address, resume, alone, prefix
        self.server: Child | None = None
        self.ranges: list[Child] = []        # server.shards > 1: the range servers of ranges 1 .. S - 1
        self.range_links: list[dict] = []    # ... their address and theta segment, for server 0
        self.cuts: list[int] = []
        self.range_restarts = 0
        self.workers: list[Child] = []
        self.restarts: dict[int, int] = {}   # wid (or launch slot) -> restarts so far
        self.server_restarts = 0
        self.summary: dict | None = None
        self.progress = None
        self.finishing = False   # the server has stopped serving and is writing its outputs
        self.lost = 0        # workers that died with no restart left
        self.lost_kinds: list[str] = []  # why each of them ended ("quarantined", "server_lost", "" ...)
        self.finished = 0    # workers that ended normally
        self.claim = self._claim_cores() if cfg.train.pin else None
        self.cores = self.claim.cores if self.claim is not None else []
        self.server_core = self._core(cfg.train.workers)

    def _claim_cores(self) -> proc.CoreClaim:
        """Cores for this launcher's children that no other live psrv run holds (proc.CoreClaim). When other runs
        hold cores and too few are left for one per child, nothing is pinned (crowding this run's processes onto
        the cores left would starve some of them, a server behind a spinning worker), and the log says so."""
        t = self.cfg.train
        wanted = max(1, (t.workers if not self.alone else 0) + (0 if self.address else self.cfg.server.shards))
        claim = proc.CoreClaim(wanted)
        if claim.held_elsewhere and len(claim.cores) < wanted:
            if claim.cores:
                log.warning("train.pin: cores %s are held by another psrv run on this machine, and the %d free "
                            "one(s) are fewer than this run's %d processes; they are not pinned",
                            _ranges(claim.held_elsewhere), len(claim.cores), wanted)
            else:
                log.warning("train.pin: every usable core (%s) is held by another psrv run on this machine; this "
                            "run's processes are not pinned", _ranges(claim.usable))
            claim.release()
        return claim

    def _core(self, slot: int) -> int | None:
        return self.cores[slot % len(self.cores)] if self.cores else None

    # ------------------------------------------------------------------ starting children
    def _spawn(self, name: str, target, args: tuple, core: int | None, wid: int | None = None) -> Child:
        recv_conn, send_conn = proc.SPAWN.Pipe(duplex=False)
        p = proc.SPAWN.Process(target=target, name=name, daemon=True,
                               args=(*args, send_conn, os.getpid(), core, self.log_level))
        with proc.blas_threads(self.cfg.train.blas_threads), proc.main_hidden():
            p.start()
        send_conn.close()  # the child holds the only write end: EOF tells us it is gone
        return Child(name, p, recv_conn, wid)

    def start_server(self) -> str:
        """Start (or restart) the server and wait until it listens; returns its address."""
        self.finishing = False
        resume = self.resume
        if self.server_restarts:
            ckpt = self.cfg.checkpoint.dir or os.path.join(self.out_dir, "checkpoints")
            from . import checkpoint
            resume = ckpt if checkpoint.checkpoints(ckpt) else None
        if self.cfg.server.shards > 1 and not self.ranges:
            self.start_ranges()
        spec = ServerSpec(cfg=self.cfg.to_dict(), explicit=sorted(self.cfg.explicit), layout=self.layout.to_dict(),
                          out_dir=self.out_dir, bind=self.address or None, resume=resume,
                          server_restarts=self.server_restarts, alone=self.alone, shm_prefix=self.prefix,
                          own_core=self.server_core is not None and (self.alone or
                                                                     len(self.cores) > self.cfg.train.workers),
                          cuts=tuple(self.cuts), ranges=tuple(self.range_links))
        self.server = self._spawn("server", proc.run_entry, (SERVER_ENTRY, spec), self.server_core)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            signals.check()
            if self.server.conn.poll(0.2):
                ev = proc.read_event(self.server.conn)
                if ev is not None and ev["event"] == "error" and ev.get("kind") == "config":
                    raise ConfigError(ev["message"])   # the job cannot run as configured (exit 2)
                if ev is None or ev["event"] == "error":
                    raise RunError(ev.get("process", "server") if ev else "server",
                                   ev["message"] if ev else "exited during start-up")
                if ev["event"] == "ready":
                    self.address = ev["address"]
                    return self.address
            elif not self.server.process.is_alive():
                raise RunError("server", f"exited during start-up ({self.server.describe_exit()})")
        raise RunError("server", f"did not start within {SERVER_START_TIMEOUT_S:g} s")

    def start_ranges(self) -> None:
        """server.shards = S > 1: the range servers of ranges 1 .. S - 1 (server 0 holds range 0), each on a core of
        its own after the workers' and server 0's, started and ready before server 0, which orders their updates."""
        from .keyrange import Ranges
        rows = int(self.layout.block["d"]) + 1    # theta (sparse, or a dense vector): a weight per column, the bias
        # every row of theta holds the same 8 bytes: ranges with the same number of rows hold the same bytes
        self.cuts = [int(c) for c in Ranges.by_bytes(self.cfg.server.shards, np.arange(rows, dtype=np.uint64), 8).cuts]
        for s in range(1, self.cfg.server.shards):
            self.ranges.append(self._start_range(s))
            self.range_links.append(self._ready(self.ranges[-1]))

    def _start_range(self, s: int) -> Child:
        spec = RangeSpec(cfg=self.cfg.to_dict(), explicit=sorted(self.cfg.explicit),
                         rows=int(self.layout.block["d"]) + 1, index=s, cuts=self.cuts, shm_prefix=self.prefix,
                         ckpt_dir=self.cfg.checkpoint.dir or os.path.join(self.out_dir, "checkpoints"))
        return self._spawn(f"range-{s}", proc.run_entry, (RANGE_ENTRY, spec), self._core(self.cfg.train.workers + s))

    def _range_ended(self, c: Child) -> None:
        """A range server died during the run: restart it (up to server.max_restarts times in all), and have
        server 0 take the whole run back to its newest checkpoint, every range loading its own of that step
        (server.py's _rewound); no other process is restarted."""
        s = self.ranges.index(c) + 1
        why = c.error.split(": ", 1)[-1] if c.error else c.describe_exit()
        if self.range_restarts >= self.cfg.server.max_restarts or self.server is None \
                or self.server.process.exitcode is not None:
            raise RunError(c.name, f"{why}; no restarts left (server.max_restarts = {self.cfg.server.max_restarts})")
        self.range_restarts += 1
        log.warning("%s (pid %d) %s; restarting it, and the run goes back to its newest checkpoint (%d of %d)",
                    c.name, c.process.pid, why, self.range_restarts, self.cfg.server.max_restarts)
        if not c.conn.closed:
            c.conn.close()
        self.ranges[s - 1] = self._start_range(s)
        self.range_links[s - 1] = self._ready(self.ranges[s - 1])
        path = os.path.join(self.out_dir, RANGES_FILE)
        with open(path + ".tmp", "w") as fh:
            json.dump(self.range_links, fh)
        os.replace(path + ".tmp", path)   # whole before server 0 reads it
        os.kill(self.server.process.pid, signal.SIGUSR1)

    def _ready(self, child: Child) -> dict:
        """The "ready" event of a range server that has just been started."""
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            signals.check()
            if child.conn.poll(0.2):
                ev = proc.read_event(child.conn)
                if ev is None or ev["event"] == "error":
                    raise RunError(child.name, ev["message"] if ev else "exited during start-up")
                if ev["event"] == "ready":
                    return {"address": ev["address"], "theta": ev["theta"]}
            elif not child.process.is_alive():
                raise RunError(child.name, f"exited during start-up ({child.describe_exit()})")
        raise RunError(child.name, f"did not start within {SERVER_START_TIMEOUT_S:g} s")

    def start_worker(self, wid: int, slot: int, local: bool = True) -> Child:
        """Worker `wid` (-1: the server picks an id) on the core of launch slot `slot`."""
        core = self._core(slot)
        spec = WorkerSpec(address=self.address, wid=wid, server_timeout_s=self._server_timeout_s(), local=local,
                          prefix=self.prefix, keys=self.cfg.worker.keys or self.cfg.server.keys)
        name = f"worker-{wid}" if wid >= 0 else f"attached-{slot}"   # its id comes with the server's welcome
        child = self._spawn(name, proc.run_entry, (self.cfg.worker.entry, spec), core, wid if wid >= 0 else None)
        child.slot = slot
        self.workers.append(child)
        return child

    def _server_timeout_s(self) -> float | None:
        """A worker started for a server of our own uses our setting; an attached one takes the server's, unless
        the user set one here."""
        w = self.cfg.worker
        return w.server_timeout_s if self.server is not None or "worker.server_timeout_s" in self.cfg.explicit \
            else None

    # ------------------------------------------------------------------ following them
    def _drain(self, child: Child) -> None:
        """Handle every event the child has sent; remember an error for when it exits."""
        while not child.conn.closed and child.conn.poll(0):
            ev = proc.read_event(child.conn)
            if ev is None:
                child.conn.close()
            elif ev["event"] == "progress" and self.progress is not None:
                self.progress.update(ev)
            elif ev["event"] == "done":
                self.summary = ev["summary"]
            elif ev["event"] == "finishing":
                self.finishing = True
            elif ev["event"] in ("joined", "left"):
                child.wid = ev["wid"]
                if self.on_worker is not None:
                    self.on_worker(ev)
            elif ev["event"] == "error":
                child.error, child.error_kind = f"{ev.get('process', child.name)}: {ev['message']}", ev.get("kind", "")

    def _children(self) -> list[Child]:
        return [c for c in [self.server, *self.ranges, *self.workers] if c is not None]

    def _worker_ended(self, c: Child) -> None:
        self.workers.remove(c)
        code = c.process.exitcode
        if code == 0:
            self.finished += 1
            return
        if c.error and c.error_kind not in ("server_lost", "declared_dead", "quarantined"):
            raise RunError(c.error.split(": ", 1)[0], c.error.split(": ", 1)[-1])  # a bug: stop the run
        if c.error_kind == "server_lost" and self.server is None and c.wid is None:
            # an attached worker that never heard from the server: nothing answers there, or a CURVE server dropped
            # our handshake (it says nothing to a client it refuses, so the two look the same from here)
            raise RunError(*self._never_answered(c))
        if c.error_kind == "server_lost" and (self.server is None or self.server.process.exitcode is not None):
            raise RunError("server", f"{c.error} (the server did not come back)")
        key = c.wid if c.wid is not None else -1 - c.slot
        used = self.restarts.get(key, 0)
        who = f"worker {c.wid}" if c.wid is not None else c.name
        if used < self.cfg.train.max_restarts and self.summary is None and c.error_kind != "quarantined":
            self.restarts[key] = used + 1
            log.warning("%s (pid %d) %s; restarting it (%d of %d)", who, c.process.pid, c.describe_exit(),
                        used + 1, self.cfg.train.max_restarts)
            self.start_worker(c.wid if c.wid is not None else -1, c.slot, local=self.server is not None)
        else:
            self.lost += 1
            self.lost_kinds.append(c.error_kind)
            log.warning("%s (pid %d) %s; no restarts left, the others take over its shards", who,
                        c.process.pid, c.describe_exit())

    def _never_answered(self, c: Child) -> tuple[str, str]:
        process, _, cause = (c.error or "client: no reply").partition(": ")
        keys = self.cfg.worker.keys or self.cfg.server.keys
        if keys:
            why = (f"no psrv server runs at {self.address}, or it refused this client's CURVE key from {keys} "
                   f"(the key must be in the server's authorized/ folder, and {keys}/server.key must be the "
                   f"server's public key)")
        else:
            why = (f"no psrv server runs at {self.address}, or it requires CURVE keys and this client has none "
                   f"(--keys DIR)")
        return process, f"{cause}: {why}"

    def _summary_on_disk(self, c: Child) -> dict | None:
        """The summary a server wrote before exiting 0 when its "done" event never reached us (we were stopped, or
        not reading, for longer than it waited): summary.json, if this server process wrote it."""
        path = os.path.join(self.out_dir, "summary.json")
        try:
            if os.stat(path).st_mtime < c.started_wall - 1.0:
                return None   # an earlier run's (a resumed run's folder)
            with open(path) as fh:
                summary = json.load(fh)
        except (OSError, ValueError):
            return None
        log.warning("the server's result did not reach the launcher; read it from %s", path)
        return summary

    def _server_ended(self) -> None:
        c = self.server
        if c.process.exitcode == 0 and self.summary is None and not c.error and self.out_dir:
            self.summary = self._summary_on_disk(c)
        if c.process.exitcode == 0 and self.summary is not None:
            return
        if c.error and c.error_kind == "config":
            raise ConfigError(c.error.split(": ", 1)[-1])
        if c.error or c.process.exitcode == 0:  # the server itself gave up (join timeout, bad checkpoint, ...)
            raise RunError("server", c.error.split(": ", 1)[-1] if c.error else "exited without a result")
        if self.ranges:
            raise RunError("server", f"{c.describe_exit()}; with server.shards > 1 server 0 is not restarted")
        if self.server_restarts >= self.cfg.server.max_restarts:
            raise RunError("server", f"{c.describe_exit()}; no restarts left (server.max_restarts = "
                                     f"{self.cfg.server.max_restarts})")
        self.server_restarts += 1
        log.warning("server (pid %d) %s; restarting it from its newest checkpoint (%d of %d)", c.process.pid,
                    c.describe_exit(), self.server_restarts, self.cfg.server.max_restarts)
        if not c.conn.closed:
            c.conn.close()
        self.start_server()

    def wait(self, progress=None) -> dict | None:
        """Follow the run until the server reports done and every worker has left (or, when attaching, until
        every worker has left); RunError on a failure nothing can repair."""
        self.progress = progress
        done_at = idle_since = finishing_since = None
        while True:
            children = self._children()
            waitables = [c.conn for c in children if not c.conn.closed]
            waitables += [c.process.sentinel for c in children if c.process.exitcode is None]
            mpc.wait(waitables, timeout=0.5)
            signals.check()
            for c in children:
                self._drain(c)
            if self.server is not None and self.server.process.exitcode is not None:
                self._server_ended()
            for c in list(self.ranges):
                # after server 0 has read every range (finishing), a range server leaves by itself
                if c.process.exitcode is not None and self.summary is None and (c.process.exitcode != 0
                                                                                or not self.finishing):
                    self._range_ended(c)
            for c in [w for w in self.workers if w.process.exitcode is not None]:
                self._worker_ended(c)
            if self.summary is not None and done_at is None:
                done_at = time.monotonic()
            if not self.workers and (self.server is None or self.server.process.exitcode is not None):
                return self.summary
            if self.server is not None and not self.workers and not self.alone and self.summary is None:
                if not self.finished:
                    raise RunError("workers", self._all_lost())
                now = time.monotonic()
                if self.finishing:
                    # the server has stopped serving and computes its outputs (the full-pass loss, the held-out
                    # evaluation, the plot): how long that takes depends on the data, the model and the machine,
                    # so no clock decides; the server process does, by ending with a summary or without one
                    # (_server_ended says what then)
                    finishing_since = finishing_since or now
                    if now - finishing_since > FINISH_NOTE_S:
                        log.warning("the server (pid %d) is still writing its outputs after %g s; waiting for it "
                                    "(Ctrl-C stops the run)", self.server.process.pid, FINISH_NOTE_S)
                        finishing_since = float("inf")   # said once
                else:
                    # every worker has left and the server still serves: it needs up to its heartbeat timeout to
                    # declare the lost ones dead, then stops; one that does not is waiting for work nobody can do
                    idle_since = idle_since or now
                    limit = self.cfg.server.heartbeat_timeout_s + 2 * EXIT_GRACE_S
                    if now - idle_since > limit:
                        raise RunError("server", f"no worker left ({self.lost} died) and the server has not ended "
                                                 f"the run {limit:g} s later")
            if done_at is not None and time.monotonic() - done_at > EXIT_GRACE_S:
                late = [c.name for c in self.workers if c.process.exitcode is None]
                if late:
                    log.warning("%s still running %g s after the run ended; stopping them", late, EXIT_GRACE_S)
                return self.summary

    def _all_lost(self) -> str:
        if self.lost_kinds and all(k == "quarantined" for k in self.lost_kinds):
            return (f"the server quarantined every worker (each pushed server.max_bad_pushes = "
                    f"{self.cfg.server.max_bad_pushes} bad gradients in a row); none is left to train")
        return f"every worker died and none can be restarted (train.max_restarts = {self.cfg.train.max_restarts})"

    def stop(self) -> None:
        """SIGTERM every live child, then SIGKILL what is left after a grace period; reap all; let go of the
        cores."""
        children = self._children()
        for c in children:
            if c.process.is_alive():
                c.process.terminate()
        deadline = time.monotonic() + EXIT_GRACE_S
        for c in children:
            c.process.join(max(0.0, deadline - time.monotonic()))
        for c in children:
            if c.process.is_alive():
                c.process.kill()
                c.process.join(2.0)
            if not c.conn.closed:
                self._drain(c)   # what they said on the way out (a worker's "left", with its step count)
            if not c.conn.closed:
                c.conn.close()
        if self.claim is not None:
            self.claim.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def _ranges(cores: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out: list[str] = []
    for c in sorted(cores):
        if out and out[-1].split("-")[-1] == str(c - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out) or "none"
