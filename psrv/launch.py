"""The launcher: config -> data in shared memory -> one server and N worker processes -> outputs and exit code.

Four ways in: train (the default: server + workers), --role server (the server alone, others attach), --attach
(workers for a server that is already running), --status (print a running server's state). The launcher owns the
shared memory and every child: whatever ends it (success, a failure, Ctrl-C, SIGTERM), it stops the children and
unlinks the memory before returning; children also exit by themselves if it dies.
Exit codes: 0 success, 1 failure at run time (the message names the process), 2 usage or config error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import NamedTuple

import numpy as np

from . import config as config_mod
from . import data, livestate, models, outputs, proc, blocks, report, signals, sources, sparse_data
from .liveview import LiveView
from .cluster import Cluster
from .errors import AlreadyFinished, ConfigError, DataError, PsrvError, RunError, ServerLost
from .signals import Interrupted

log = logging.getLogger("psrv")


class Result(NamedTuple):
    summary: dict
    theta: np.ndarray
    out_dir: str


# ---------------------------------------------------------------------------------------------- progress
class Progress:
    """The progress line: rewritten in place on a terminal (4 times a second), one line a second otherwise."""

    def __init__(self, stream=sys.stdout, epochs: int = 0, max_wall_s: float = 0.0):
        """epochs, max_wall_s: the run's train.epochs and train.max_wall_s, for the percentage and the ETA (the
        step budget comes with each event)."""
        self.stream, self.epochs, self.max_wall_s = stream, epochs, max_wall_s
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
        fraction, eta_s = livestate.progress_of(ev, self.epochs, self.max_wall_s)
        line = (f"step {ev['step']:>7}{of}  loss {ev['loss']:<11.6g} {ev['samples_per_s']:>12,.0f} "
                f"samples/s  {ev['elapsed_s']:7.1f} s  {livestate.format_percent(fraction):>4}  "
                f"ETA {livestate.format_eta(eta_s):<8}")
        self.stream.write(("\r" + line) if self.tty else (line.rstrip() + "\n"))  # padded only to overwrite
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.shown:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------------------------- one run
def resolve(cfg: config_mod.Config, resume: str | None = None) -> config_mod.Config:
    """Fill in what "0" and "" mean: the worker count and the output folder (a fresh one, or the resumed run's)."""
    t = cfg.train
    if t.workers == 0:
        t.workers = len(proc.usable_cores())
        config_mod.check_combinations(cfg)
    if cfg.output.dir == "":
        if resume:
            cfg.output.dir = os.path.dirname(resume.rstrip("/")) if os.path.basename(
                resume.rstrip("/")) == "checkpoints" else resume
        else:
            base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
            out, k = base, 1
            while os.path.exists(out):
                out, k = f"{base}-{k}", k + 1
            cfg.output.dir = out
    return cfg


def check_model(cfg: config_mod.Config, block: blocks.DataBlock, layout: data.Layout | None = None) -> int:
    """Load the model once here, so a bad model.kind or labels that do not fit it fail before any process starts.
    Returns the number of classes (softmax) or 0."""
    kind, source = cfg.model.kind, cfg.data.source
    if layout is not None and layout.classes is not None and kind == "linear":
        raise DataError(f"{source}: the target column holds text labels ({_few(layout.classes)}); model.kind = "
                        f"'linear' needs numbers: set model.kind = 'logistic' (2 classes) or 'softmax'")
    classes = 0
    if kind == "softmax":
        classes = cfg.model.classes or models.infer_classes(block.y, source)
    model = models.make(kind, block.spec.d, cfg.model.fit_intercept, block.spec.dtype, classes)
    model.check_labels(block.y, source)
    model.check_labels(block.y_test, source)
    if kind == "softmax":
        gaps = models.missing_classes(block.y, classes)
        if gaps:
            log.warning("%s: softmax with %d classes, but no training row has label %s: those classes are learned "
                        "from no example and never predicted. If the labels start at 1 (or skip values), relabel "
                        "them 0..K-1, or write them as text labels in a CSV, which psrv maps to 0..K-1", source,
                        classes, _few(gaps))
    return classes


def check_batch(cfg: config_mod.Config, layout: data.Layout) -> None:
    """Warn when train.batch_size is larger than a shard: a batch never spans two epochs of a shard, so such a shard
    gives batches of its own size (summary.json's batch_size is the size actually used)."""
    b, sizes = cfg.train.batch_size, [size for _, size in layout.shards]
    small = [s for s in sizes if s < b]
    if not small:
        return
    used = report.batch_used(b, sizes)
    every = "every shard" if len(small) == len(sizes) else f"{len(small)} of {len(sizes)} shards"
    log.warning("train.batch_size = %d is larger than %s (the smallest has %d rows): a batch never spans two epochs "
                "of a shard, so each batch there is the whole shard (%d rows at most are used per batch) and every "
                "step is a full pass over it; lower train.batch_size, or use fewer shards (data.shards, "
                "train.workers) for the batch size you asked for", b, every, min(sizes), used)


def _few(items: list, k: int = 5) -> str:
    return ", ".join(repr(v) for v in items[:k]) + (f", ... ({len(items)} in all)" if len(items) > k else "")


def _find_checkpoints(resume: str) -> str:
    from . import checkpoint
    for d in (os.path.join(resume, "checkpoints"), resume):
        if checkpoint.checkpoints(d):
            return d
    raise ConfigError(f"--resume {resume}: no checkpoint there (looked in {resume}/checkpoints and {resume})")


RESULTS = ("theta.npy", "summary.json", "metrics.jsonl")


def _refuse_used(cfg: config_mod.Config) -> None:
    """A new run must not silently replace an earlier run's results: ConfigError when output.dir holds some."""
    from . import checkpoint
    out = cfg.output.dir
    found = [n for n in RESULTS if os.path.isfile(os.path.join(out, n)) and os.path.getsize(os.path.join(out, n))]
    ckpt = cfg.checkpoint.dir or os.path.join(out, "checkpoints")
    if checkpoint.checkpoints(ckpt):
        found.append(f"checkpoints in {ckpt}")
    if found:
        raise ConfigError(f"output.dir: {out} holds an earlier run's results ({', '.join(found)}); choose another "
                          f"folder, continue that run with --resume {out}, or replace its results with --overwrite "
                          f"(output.overwrite = true)")


def _refuse_finished(cfg: config_mod.Config, ckpt: str) -> None:
    """AlreadyFinished when the newest checkpoint in `ckpt` has already reached the step or epoch budget of `cfg`
    (the resumed job's, overrides included): resuming would change nothing but a finished run's outputs."""
    from . import checkpoint
    from .coordinator import run_steps
    found = checkpoint.load_latest(ckpt)
    if found is None:
        return  # the server says what is wrong with them
    state, _, path = found
    steps, epochs, step = run_steps(cfg), cfg.train.epochs, state["step"]
    sched = state.get("coordinator", {}).get("schedule")
    if steps is not None and step >= steps:
        why = f"it is at step {step} and train.steps = {steps}; raise train.steps (--set train.steps=N)"
    elif epochs and sched is not None and _epochs_done(sched, epochs):
        why = f"every shard has had train.epochs = {epochs}; raise train.epochs"
    else:
        return
    raise AlreadyFinished(f"the run in {cfg.output.dir} is finished ({path}): {why} to train on; nothing changed")


def _epochs_done(sched: dict, epochs: int) -> bool:
    from .schedule import Schedule
    s = Schedule([c[0] for c in sched["cursors"]])
    s.load_state(sched)
    return s.all_done(epochs)


def run(cfg: config_mod.Config, progress: Progress | None = None, log_level: int = logging.WARNING,
        role: str = "all", resume: str | None = None, arrays=None, local: int | None = None,
        on_address=None) -> Result:
    """One run: role "all" starts a server and train.workers workers; role "server" the server alone. `arrays`:
    (X, y, columns) in memory (sources.from_arrays), with cfg.data.source = "arrays". `local`: start only this many
    of the train.workers workers here (the others attach from other hosts: psrv/ranks.py); on_address(address):
    called once the server listens."""
    ckpt = _find_checkpoints(resume) if resume else None
    cfg = resolve(cfg, resume)
    if cfg.train.group_steps > 1 and (role == "server" or (local is not None and local < cfg.train.workers)):
        # the server would refuse every worker that attaches (group_only) and wait for them for ever
        raise ConfigError("train.group_steps: group steps take only the launcher's own workers, on the server's "
                          "machine; with workers that attach (--role server, or several hosts) set "
                          "train.group_steps = 1")
    if cfg.model.kind not in config_mod.BUILTIN_MODELS:
        # a model of the user's own sees the data as given: we cannot map its theta back from scaled features
        if cfg.data.standardize and "data.standardize" in cfg.explicit:
            raise ConfigError(f"data.standardize: must be false for a custom model.kind ({cfg.model.kind!r}), "
                              f"which sees the data as given")
        cfg.data.standardize = False
        models.load_custom(cfg.model.kind)
    elif cfg.model.kind in config_mod.SPARSE_MODELS:
        # sparse values are used as given: centring would make every row dense
        if cfg.data.standardize and "data.standardize" in cfg.explicit:
            raise ConfigError("data.standardize: must be false for model.kind = 'sparse_logistic' (values are used "
                              "as given; centring would make every row dense)")
        cfg.data.standardize = False
    if ckpt is not None:
        _refuse_finished(cfg, ckpt)
    elif not cfg.output.overwrite:
        _refuse_used(cfg)
    os.makedirs(cfg.output.dir, exist_ok=True)
    blocks.sweep_stale()  # it logs what it removes, and why
    # the owner holds a lock on its prefix for the whole run: no other run's sweep removes these segments meanwhile
    # (whatever PID namespace it runs in); leaving the block removes them by name, not by handle: a signal may land
    # after a segment exists but before anyone holds it, and a server killed -9 leaves its theta and slots behind
    with blocks.owned_prefix() as owner:
        return _run_on_data(cfg, progress, log_level, owner.prefix, role, ckpt, arrays, local, on_address)


ARRAYS_NOTE = """\
# data.source = "arrays": this run trained on in-memory arrays passed to psrv.train(X=..., y=...). They were not
# saved, so this file cannot rerun it as-is: save them with numpy.savez(PATH, X=X, y=y) and set data.source = PATH.
"""


def _run_on_data(cfg, progress, log_level, prefix, role, ckpt, arrays=None, local=None, on_address=None) -> Result:
    out = cfg.output.dir
    n_shards = cfg.data.shards or cfg.train.workers
    sparse = cfg.model.kind in config_mod.SPARSE_MODELS
    if sparse:
        if arrays is not None:
            raise ConfigError("model.kind = 'sparse_logistic' reads data.source ('criteo' or an svmlight file), not "
                              "in-memory arrays")
        block, layout = sparse_data.build(cfg, n_shards, prefix + "data")
    else:
        block, layout = data.build(cfg, n_shards, prefix + "data", arrays)
    with block:
        signals.check()
        layout.extra["classes"] = 0 if sparse else check_model(cfg, block, layout)
        check_batch(cfg, layout)
        path = os.path.join(out, "data.json")
        with outputs.writing("data.json", path):
            outputs.write_json(path, data.saved(layout))
        # the effective config: what was asked, with the data's real size (so it reruns as-is)
        cfg.data.n, cfg.data.d = (block.spec.n, block.spec.d) if sparse else \
            (block.spec.n_train + block.spec.n_test, block.spec.d)
        with open(os.path.join(out, "config.toml"), "w") as fh:
            fh.write((ARRAYS_NOTE if arrays is not None else "") + config_mod.to_toml(cfg))
        # which rows were held out, so the split and the held-out metric can be reproduced (README, Outputs)
        np.save(os.path.join(out, "heldout.npy"), layout.heldout)
        with Cluster(cfg, out, log_level, layout=layout, resume=ckpt, alone=role == "server",
                     prefix=prefix) as cluster:
            address = cluster.start_server()
            # whole or not there: `--attach RUN_DIR`, `--status RUN_DIR` and scripts read it as soon as it exists
            outputs.write_text(os.path.join(out, "address"), address + "\n")
            if on_address is not None:
                on_address(address)
            if role == "server":
                print(f"attach: {address}", flush=True)   # the first line, for whoever reads it
            with _live_view(cfg, address, progress) as view:
                if role != "server":
                    for wid in range(cfg.train.workers if local is None else local):
                        cluster.start_worker(wid, slot=wid)
                summary = cluster.wait(view or progress)
    theta = np.load(os.path.join(out, "theta.npy"))
    return Result(summary, theta, out)


@contextlib.contextmanager
def _live_view(cfg: config_mod.Config, address: str, progress: Progress | None):
    """The live view of this run (psrv/liveview.py) while the block lasts, its address printed; None when
    output.live_view is off or its port cannot be had (the run goes on without it)."""
    o, t = cfg.output, cfg.train
    if not o.live_view:
        yield None
        return
    keys = cfg.worker.keys or cfg.server.keys
    try:
        view = LiveView(o.dir, lambda: status(address, LiveView.STATUS_TIMEOUT_S, keys), t.epochs, t.max_wall_s,
                        o.live_port, forward=progress)
    except OSError as e:
        log.warning("output.live_view: cannot listen on 127.0.0.1:%d (%s); no live view for this run",
                    o.live_port, e.strerror or e)
        yield None
        return
    print(f"live view: {view.url}", flush=True)
    with view:
        yield view


def train(config=None, overrides=(), *, X=None, y=None, progress: bool = False, log_level: int = logging.WARNING,
          role: str = "all", resume: str | None = None, local: int | None = None, on_address=None) -> Result:
    """Run one training job and return (summary, theta, out_dir). `config` is a TOML path, a nested dict or
    None (the defaults); `overrides` are 'section.key=value' strings. `X`, `y`: train on these arrays (rows x
    columns, and one label per row) instead of data.source; their rows are copied once, straight into shared
    memory. Raises ConfigError (DataError for unusable data) or RunError."""
    cfg = config_mod.load(config, overrides)
    arrays = None
    if X is not None or y is not None:
        arrays = _in_memory(cfg, X, y, role)
    bar = Progress(epochs=cfg.train.epochs, max_wall_s=cfg.train.max_wall_s) if progress else None
    with signals.handled():
        try:
            return run(cfg, bar, log_level, role, resume, arrays, local, on_address)
        finally:
            if bar is not None:
                bar.close()


def _in_memory(cfg: config_mod.Config, X, y, role: str):
    """Check arrays given to train() and point data.source at them."""
    if X is None or y is None:
        raise ConfigError(f"psrv.train: pass both X and y (got only {'X' if y is None else 'y'})")
    if cfg.data.source not in ("synthetic", data.ARRAYS):
        raise ConfigError(f"psrv.train: X and y were given, and data.source = {cfg.data.source!r}; use one or the "
                          f"other")
    if role != "all":
        raise ConfigError("psrv.train: arrays in memory need role 'all': workers attached from elsewhere could "
                          "not load their rows")
    cfg.data.source = data.ARRAYS
    config_mod.check_combinations(cfg)
    return sources.from_arrays(X, y)


# ---------------------------------------------------------------------------------------------- attach and status
def attach(address: str, workers: int, overrides=(), log_level: int = logging.WARNING) -> int:
    """Start `workers` workers that join the server at `address`; they load their own rows. Returns when they
    have all left (the run ended, or they were stopped). Their shared memory is removed whatever happens."""
    cfg = config_mod.load(None, overrides)
    cfg.train.workers = workers
    blocks.sweep_stale()
    left: list[dict] = []

    def said(ev: dict) -> None:
        if ev["event"] == "joined":
            print(f"joined {address} as worker {ev['wid']} (shards {ev['shards']})", flush=True)
        else:
            left.append(ev)

    with signals.handled(), blocks.owned_prefix() as owner:
        try:
            with Cluster(cfg, "", log_level, address=address, prefix=owner.prefix, on_worker=said) as cluster:
                for slot in range(workers):
                    cluster.start_worker(-1, slot=slot, local=False)
                cluster.wait()
                if cluster.lost:  # each one's end is in the log; the exit status must not call it a success
                    raise RunError("workers", f"{cluster.lost} of the {workers} attached workers ended early and "
                                              f"could not be restarted (train.max_restarts = "
                                              f"{cfg.train.max_restarts})")
        finally:
            if left:
                print(f"left {address}: " + ", ".join(f"worker {e['wid']} after {e['steps']} steps"
                                                      + (f" ({e['reason']})" if e["reason"] else "")
                                                      for e in sorted(left, key=lambda e: e["wid"])), flush=True)
    return 0


def server_address(where: str) -> str:
    """The server address that `where` names: an address, a run folder (its `address` file) or that file.
    ConfigError (a usage error) naming the forms allowed when it is none of them."""
    from .protocol import ADDRESS_FORMS, check_address
    path = os.path.join(where, "address") if os.path.isdir(where) else where
    if os.path.isdir(where) and not os.path.isfile(path):
        raise ConfigError(f"{where} is a folder without an address file (a run folder has one from the moment its "
                          f"server listens); expected {ADDRESS_FORMS}, a run folder or its address file")
    if os.path.isfile(path):
        with open(path) as fh:
            where = fh.read().strip()
    try:
        return check_address(where)
    except ValueError as e:
        raise ConfigError(f"{e}, a run folder or its address file") from None


def status(address: str, timeout_s: float = 5.0, keys: str = "") -> dict:
    """The state of the server at `address` (keys: a CURVE key folder, if the server requires one). One request on a
    socket of its own, not through workers.client: psrv never imports the workers package, which depends on it."""
    from . import protocol, transport
    ctx = transport.context()
    sock = None
    try:
        sock = transport.dealer(ctx, address, keys)
        transport.send(sock, protocol.encode({"op": protocol.Op.STATUS.value, "rid": 1}))
        frames = transport.recv(sock, int(timeout_s * 1000))
        if frames is None:
            raise ServerLost("client", f"no reply from {address} to status within {timeout_s:g} s")
        h, _ = protocol.decode(frames, protocol.REPLIES)
        if h["op"] == protocol.Op.ERROR.value:
            raise RunError("server", f"{h['code']}: {h['reason']}")
        return h["state"]
    finally:
        if sock is not None:
            sock.close(linger=0)
        ctx.term()


def format_status(st: dict) -> str:
    lines = [f"server {st['server_id']} at {st['address']}: step {st['step']}"
             + (f"/{st['steps']}" if st["steps"] else "")
             + f", theta version {st['theta_version']}, {st['consistency']}/{st['schedule']}, loss "
             + (f"{st['loss']:.6g}" if st["loss"] is not None else "-")
             + f", {st['elapsed_s']:.1f} s" + (f", stopping ({st['stopping']})" if st["stopping"] else ""),
             *([f"waiting for {st['workers_expected'] - st['workers_in']} of {st['workers_expected']} workers to "
                f"join (training starts when all have)"] if not st["started"] and "workers_expected" in st else []),
             f"deaths {st['deaths']}, worker restarts {st['worker_restarts']}, server restarts "
             f"{st['server_restarts']}",
             f"{'wid':>5} {'inc':>4} {'pid':>8} {'host':<16} {'clock':>8} {'seen':>7} {'push/s':>8} "
             f"{'stale':>5} {'state':<9} shards"]
    for w in sorted(st["workers"], key=lambda w: w["wid"]):
        state = "finished" if w["finished"] else ("alive" if w["alive"] else "dead")
        lines.append(f"{w['wid']:>5} {w['inc']:>4} {w['pid']:>8} {w['host'][:16]:<16} {w['clock']:>8} "
                     f"{w['last_seen_s']:>6.1f}s {w['push_rate']:>8.1f} {w['staleness']:>5} {state:<9} "
                     f"{w['shards']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch.py", description="Train a model with a parameter server and N "
                                "worker processes. With no config, runs the defaults (configs/default.toml, "
                                "psrv --defaults). `launch.py predict RUN_DIR --data FILE [--out FILE]` applies a "
                                "finished run's model to new rows.")
    p.add_argument("config", nargs="?", help="a TOML config (default: the built-in defaults, as listed in "
                   "configs/default.toml)")
    p.add_argument("--workers", type=int, metavar="N", help="worker processes (same as --set train.workers=N)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="override one config key; repeatable; the value is read as TOML, else as a string")
    p.add_argument("--role", choices=("all", "server"), default="all",
                   help="server: start only the server; workers join with --attach")
    p.add_argument("--cluster", choices=("slurm", "mpirun"), help="run as one rank of a job started by srun/sbatch "
                   "or mpirun: rank 0 runs the server and --workers N workers (default 1), every other rank attaches N "
                   "workers to it (README, More than one machine)")
    p.add_argument("--rendezvous", metavar="PATH", help="with --cluster: a file on a shared path where rank 0 "
                   "publishes the server's address (default with slurm: the first host of the job, on a port from "
                   "the job id)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its newest valid checkpoint")
    p.add_argument("--force", action="store_true", help="with --resume: continue as another job (model.kind, data, "
                                                        "train.consistency or train.optimizer changed)")
    p.add_argument("--overwrite", action="store_true", help="start a new run in an output.dir that holds an "
                   "earlier run's results, replacing them (same as --set output.overwrite=true)")
    p.add_argument("--attach", metavar="ADDRESS", help="start --workers N workers that join the server at ADDRESS "
                   "(tcp://HOST:PORT, ipc://PATH, a run folder or its address file)")
    p.add_argument("--status", metavar="ADDRESS", help="print the state of the server at ADDRESS (tcp://HOST:PORT, "
                   "ipc://PATH, a run folder or its address file) and exit")
    p.add_argument("--json", action="store_true", help="with --status: print JSON")
    p.add_argument("--keys", metavar="DIR", help="with --attach or --status: the CURVE key folder to present "
                   "(server.key and a client secret key); same as --set worker.keys=DIR")
    p.add_argument("--keygen", metavar="DIR", help="create CURVE keys in DIR (the server pair once, a client pair "
                   "named by --name, allowed by the server) and exit")
    p.add_argument("--name", default="client", help="with --keygen: the client key's name (default client)")
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
    if s["worker_deaths"] or s["worker_restarts"] or s["server_restarts"]:
        lines.append(f"faults survived: {s['worker_deaths']} worker deaths, {s['worker_restarts']} worker "
                     f"re-registrations, {s['server_restarts']} server restarts")
    hint = group_steps_hint(s)
    if hint:
        lines.append(hint)
    lines.append(f"outputs: {r.out_dir}/")
    stream.write("\n".join(lines) + "\n")


def group_steps_hint(s: dict) -> str:
    """The summary's line naming the train.group_steps K the server suggests (report.group_steps_hint), "" when
    it suggests none."""
    k = s.get("group_steps_hint") or 0
    split = s.get("time_per_push_ms") or {}
    if not k or not split:
        return ""
    return (f"hint: each push waited {split['communication']:.3g} ms on the server's round trip, for "
            f"{split['compute']:.3g} ms of gradient.\n"
            f"      train.group_steps = {k} takes the same BSP steps with one push per {k} (the launcher's workers, "
            f"on one\n      machine): the same result, faster.")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:  # a subcommand of its own; every other form is the training CLI, as before
        from . import model
        return model.predict_main(argv[1:])
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
    if args.keys:
        overrides.append(("worker", "keys", args.keys))
    if args.overwrite:
        overrides.append(("output", "overwrite", True))
    if args.force:
        if not args.resume:
            print("psrv: error: --force only applies to --resume", file=sys.stderr)
            return 2
        overrides.append(("checkpoint", "resume_force", True))
    try:
        if args.keygen:
            from . import transport
            for path in transport.keygen(args.keygen, args.name):
                print(path)
            print(f"server: --set server.keys={args.keygen}; other machines need {args.keygen}/server.key and "
                  f"{args.keygen}/{args.name}.key_secret (--keys DIR)")
            return 0
        if args.status:
            st = status(server_address(args.status), keys=args.keys or "")
            print(json.dumps(st, indent=2) if args.json else format_status(st))
            return 0
        if args.cluster:
            from . import ranks
            return ranks.run_rank(args.cluster, args.config, overrides, args.workers, args.rendezvous, level)
        if args.attach:
            return attach(server_address(args.attach), args.workers or len(proc.usable_cores()), overrides, level)
        # no config: the built-in defaults (configs/default.toml is generated from them), so that an installed
        # psrv, which has no configs/ folder, runs the same job as a checkout
        result = train(args.config, overrides, progress=not args.quiet and args.role == "all", log_level=level,
                       role=args.role, resume=args.resume)
    except AlreadyFinished as e:
        print(f"psrv: {e}", file=sys.stderr)
        return 0
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


def cli() -> int:
    """The `psrv` command, `python launch.py` and `python -m psrv`: main(), in a process named "psrv launcher" (in
    ps and top; main() itself also runs inside other programs, which keep their names)."""
    proc.set_title("psrv launcher")
    return main()
