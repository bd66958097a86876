"""The launcher: config -> data in shared memory -> one server and N worker processes -> outputs and exit code.

It owns the shared memory and every child. Whatever ends the run (success, a failed child, Ctrl-C, SIGTERM), it
stops the children and unlinks the memory before returning; children also exit by themselves if it dies.
Exit codes: 0 success, 1 failure at run time (the message names the process), 2 usage or config error.
"""
from __future__ import annotations

import argparse
import logging
import multiprocessing.connection as mpc
import os
import signal
import sys
import time
from typing import NamedTuple

import numpy as np

from . import config as config_mod
from . import data, models, proc, shards
from .errors import ConfigError, PsrvError, RunError

log = logging.getLogger("psrv")

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.toml")
SERVER_START_TIMEOUT_S = 60.0   # spawn + imports + bind; generous for a loaded machine
EXIT_GRACE_S = 5.0              # how long children get to leave on their own before SIGTERM, then SIGKILL


class Result(NamedTuple):
    summary: dict
    theta: np.ndarray
    out_dir: str


class Interrupted(BaseException):
    """SIGTERM (or another signal) arrived; unwinds like KeyboardInterrupt so every cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


# ---------------------------------------------------------------------------------------------- progress
class Progress:
    """The progress line: rewritten in place on a terminal (4 times a second), one line a second otherwise."""

    def __init__(self, stream=sys.stdout):
        self.stream = stream
        self.tty = stream.isatty()
        self.every_s = 0.25 if self.tty else 1.0
        self.last_s = time.monotonic()
        self.shown = False

    def update(self, ev: dict) -> None:
        now = time.monotonic()
        if ev.get("loss") is None or now - self.last_s < self.every_s:
            return
        self.last_s, self.shown = now, True
        of = f"/{ev['steps']}" if ev["steps"] else ""
        line = (f"step {ev['step']:>7}{of}  loss {ev['loss']:<11.6g} {ev['samples_per_s']:>12,.0f} "
                f"samples/s  {ev['elapsed_s']:7.1f} s")
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------- children
class Child:
    def __init__(self, name: str, process, conn):
        self.name, self.process, self.conn = name, process, conn
        self.error: str | None = None

    def describe_exit(self) -> str:
        code = self.process.exitcode
        if self.error:
            return self.error
        if code is not None and code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"


class Cluster:
    """The server and worker processes of one run. Leaving the `with` block always stops and reaps them."""

    def __init__(self, cfg: config_mod.Config, layout: data.Layout, out_dir: str, log_level: int):
        self.cfg, self.layout, self.out_dir, self.log_level = cfg, layout, out_dir, log_level
        self.server: Child | None = None
        self.workers: list[Child] = []
        self.summary: dict | None = None
        cores = proc.usable_cores()
        n = cfg.train.workers
        self.worker_cores = [cores[i % len(cores)] if cfg.train.pin else None for i in range(n)]
        self.server_core = cores[n % len(cores)] if cfg.train.pin else None

    def _spawn(self, name: str, target, args: tuple, core: int | None) -> Child:
        recv_conn, send_conn = proc.SPAWN.Pipe(duplex=False)
        p = proc.SPAWN.Process(target=target, name=name, daemon=True,
                               args=(*args, send_conn, os.getpid(), core, self.log_level))
        with proc.blas_threads(self.cfg.train.blas_threads), proc.main_hidden():
            p.start()
        send_conn.close()  # the child holds the only write end: EOF tells us it is gone
        return Child(name, p, recv_conn)

    def start_server(self) -> str:
        from . import server
        self.server = self._spawn("server", server.main, (
            self.cfg.to_dict(), sorted(self.cfg.explicit), self.layout.to_dict(), self.out_dir), self.server_core)
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.server.conn.poll(0.2):
                ev = proc.read_event(self.server.conn)
                if ev is None or ev["event"] == "error":
                    raise RunError(ev.get("process", "server") if ev else "server",
                                   ev["message"] if ev else "exited during start-up")
                if ev["event"] == "ready":
                    return ev["address"]
            elif not self.server.process.is_alive():
                raise RunError("server", f"exited during start-up ({self.server.describe_exit()})")
        raise RunError("server", f"did not start within {SERVER_START_TIMEOUT_S:g} s")

    def start_workers(self, address: str) -> None:
        from workers import worker
        d = self.cfg.debug
        debug = {"fail_worker": d.fail_worker, "fail_at_step": d.fail_at_step, "slow_worker": d.slow_worker,
                 "slow_ms": d.slow_ms}
        for wid in range(self.cfg.train.workers):
            self.workers.append(self._spawn(f"worker-{wid}", worker.main, (
                address, wid, debug, self.cfg.worker.server_timeout_s), self.worker_cores[wid]))

    def _drain(self, child: Child, progress: Progress | None) -> None:
        """Handle every event the child has sent; an error event becomes a RunError naming the child."""
        while not child.conn.closed and child.conn.poll(0):
            ev = proc.read_event(child.conn)
            if ev is None:
                child.conn.close()
            elif ev["event"] == "progress" and progress is not None:
                progress.update(ev)
            elif ev["event"] == "done":
                self.summary = ev["summary"]
            elif ev["event"] == "error":
                child.error = ev["message"]
                raise RunError(ev.get("process", child.name), ev["message"])

    def wait(self, progress: Progress | None) -> dict:
        """Follow the run until the server reports done and every worker has left; RunError on any failure."""
        children = [self.server, *self.workers]
        done_at = None
        while True:
            waitables = [c.conn for c in children if not c.conn.closed]
            waitables += [c.process.sentinel for c in children if c.process.exitcode is None]
            mpc.wait(waitables, timeout=0.5)
            check_signals()
            for c in children:
                self._drain(c, progress)
            if self.summary is not None and done_at is None:
                done_at = time.monotonic()
            for c in children:
                if c.process.exitcode not in (None, 0):
                    raise RunError(c.name.replace("-", " "), c.describe_exit())
            if self.summary is not None and all(c.process.exitcode is not None for c in children):
                return self.summary
            if self.server.process.exitcode == 0 and self.summary is None:
                raise RunError("server", "exited without reporting a result")
            if done_at is not None and time.monotonic() - done_at > EXIT_GRACE_S:
                late = [c.name for c in self.workers if c.process.exitcode is None]
                log.warning("%s still running %g s after the run ended; stopping them", late, EXIT_GRACE_S)
                return self.summary

    def stop(self) -> None:
        """SIGTERM every live child, then SIGKILL what is left after a grace period; reap all."""
        children = [c for c in [self.server, *self.workers] if c is not None]
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
                c.conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# ---------------------------------------------------------------------------------------------- one run
def resolve(cfg: config_mod.Config) -> config_mod.Config:
    """Fill in what "0" and "" mean: the worker count and a fresh output folder."""
    t = cfg.train
    if t.workers == 0:
        t.workers = len(proc.usable_cores())
        config_mod.check_combinations(cfg)
    if cfg.output.dir == "":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        base = os.path.join("runs", stamp)
        out, k = base, 1
        while os.path.exists(out):
            out, k = f"{base}-{k}", k + 1
        cfg.output.dir = out
    return cfg


def check_model(cfg: config_mod.Config, block: shards.DataBlock) -> int:
    """Load the model once here, so a bad model.kind or labels that do not fit it fail before any process starts.
    Returns the number of classes (softmax) or 0."""
    kind, source = cfg.model.kind, cfg.data.source
    classes = 0
    if kind == "softmax":
        classes = cfg.model.classes or models.infer_classes(block.y, source)
    model = models.make(kind, block.spec.d, cfg.model.fit_intercept, block.spec.dtype, classes)
    model.check_labels(block.y, source)
    model.check_labels(block.y_test, source)
    return classes


def run(cfg: config_mod.Config, progress: Progress | None = None, log_level: int = logging.WARNING) -> Result:
    cfg = resolve(cfg)
    if cfg.model.kind not in config_mod.BUILTIN_MODELS:
        # a model of the user's own sees the data as given: we cannot map its theta back from scaled features
        if cfg.data.standardize and "data.standardize" in cfg.explicit:
            raise ConfigError(f"data.standardize: must be false for a custom model.kind ({cfg.model.kind!r}), "
                              f"which sees the data as given")
        cfg.data.standardize = False
        models.load_custom(cfg.model.kind)
    out = cfg.output.dir
    os.makedirs(out, exist_ok=True)
    name = shards.run_prefix() + "data"
    try:
        return _run_on_data(cfg, progress, log_level, name)
    finally:
        # by name, not by handle: a signal may land after the segment exists but before anyone holds it
        shards.unlink_name(name)


def _run_on_data(cfg, progress, log_level, name) -> Result:
    out = cfg.output.dir
    block, layout = data.build(cfg, cfg.train.workers, name)
    with block:
        check_signals()
        layout.extra["classes"] = check_model(cfg, block)
        # the effective config: what was asked, with the data's real size (so it reruns as-is)
        cfg.data.n, cfg.data.d = block.spec.n_train + block.spec.n_test, block.spec.d
        with open(os.path.join(out, "config.toml"), "w") as fh:
            fh.write(config_mod.to_toml(cfg))
        with Cluster(cfg, layout, out, log_level) as cluster:
            address = cluster.start_server()
            with open(os.path.join(out, "address"), "w") as fh:
                fh.write(address + "\n")
            cluster.start_workers(address)
            summary = cluster.wait(progress)
    theta = np.load(os.path.join(out, "theta.npy"))
    return Result(summary, theta, out)


_PENDING_SIGNALS: list[int] = []


def _on_signal(signum, frame):
    # remembered as well as raised: Python drops an exception raised inside a __del__ or a callback, and the
    # wait loop must still notice
    _PENDING_SIGNALS.append(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)


def check_signals() -> None:
    """Raise for a signal whose exception was lost on the way."""
    if _PENDING_SIGNALS:
        signum = _PENDING_SIGNALS[0]
        raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)


def train(config=None, overrides=(), *, progress: bool = False, log_level: int = logging.WARNING) -> Result:
    """Run one training job and return (summary, theta, out_dir). `config` is a TOML path, a nested dict or
    None (the defaults); `overrides` are 'section.key=value' strings. Raises ConfigError or RunError."""
    cfg = config_mod.load(config, overrides)
    in_main = _is_main_thread()
    old = {}
    if in_main:
        _PENDING_SIGNALS.clear()
        old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = Progress() if progress else None
    try:
        return run(cfg, bar, log_level)
    finally:
        if bar is not None:
            bar.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _is_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description="Train a model with a parameter server and N "
                                "worker processes. With no config, runs configs/default.toml.")
    p.add_argument("config", nargs="?", help="a TOML config (default: configs/default.toml)")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (same as --set train.workers=N)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override one config key; repeatable; the value is read as TOML, else as a string")
    p.add_argument("--defaults", action="store_true", help="print every config key with its default and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress line, only the summary")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-v info, -vv debug)")
    return p


def _print_summary(r: Result, stream=sys.stdout) -> None:
    s = r.summary
    lines = [f"done ({s['stopped_by']}): {s['steps']} steps, {s['workers']} workers ({s['consistency']}), "
             f"{s['rows']} rows x {s['cols']} cols, {s['wall_s']:.2f} s, {s['samples_per_s']:,.0f} samples/s",
             f"final loss (mean {s['model']} loss on the training rows) {s['final_loss']:.6g}, "
             f"{s['metric']} {s['train_metric']:.4g}"]
    if s.get("test_loss") is not None:
        lines.append(f"held-out ({s['test_rows']} rows): loss {s['test_loss']:.6g}, {s['metric']} "
                     f"{s['test_metric']:.4g}")
    lines.append(f"outputs: {r.out_dir}/")
    stream.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.defaults:
        sys.stdout.write(config_mod.defaults_toml())
        return 0
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(processName)s %(levelname)s "
                                                                  "%(message)s")
    overrides = list(args.overrides)
    if args.workers is not None:
        overrides.append(("train", "workers", args.workers))
    path = args.config if args.config is not None else DEFAULT_CONFIG
    try:
        result = train(path, overrides, progress=not args.quiet, log_level=level)
    except ConfigError as e:
        print(f"psrv: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        print(f"psrv: run failed: {e.process}: {e.cause}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("psrv: interrupted; children stopped, shared memory removed", file=sys.stderr)
        return 130
    except Interrupted as e:
        print(f"psrv: stopped by {e}; children stopped, shared memory removed", file=sys.stderr)
        return 128 + e.signum
    except PsrvError as e:
        print(f"psrv: run failed: {e}", file=sys.stderr)
        return 1
    _print_summary(result)
    return 0
