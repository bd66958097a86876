"""One job over several machines (`launch.py CONFIG --cluster slurm|mpirun`): where this process sits in it, and how
the ranks find the server.

The scheduler starts the same command once per rank. Rank 0 runs the server and its own workers, like a plain run;
every other rank attaches workers to it, like --attach (they load their shards themselves, checked by CRC). The ranks
find the server in one of two ways:
  - a rendezvous file on a path every rank can read (--rendezvous PATH): rank 0 writes the address it bound there,
    atomically, tagged with the job's id; the others wait for a file with this job's tag;
  - with Slurm and no rendezvous file: the first host of SLURM_JOB_NODELIST (where Slurm puts rank 0) and a port
    every rank derives from SLURM_JOB_ID; the others wait until the server answers there.
Off loopback the server requires CURVE keys (server.keys, or --keys) from a directory every rank can read.
Workers per rank: --workers N (default 1), so the job has N x ranks workers.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from dataclasses import dataclass

from . import config as config_mod
from .errors import ConfigError, RunError, ServerLost

log = logging.getLogger("psrv")

SCHEDULERS = ("slurm", "mpirun")
PORT_BASE, PORT_SPAN = 20000, 20000   # a Slurm job with no rendezvous file listens on PORT_BASE + job id % SPAN
POLL_S = 0.2                          # how often a waiting rank looks again for the file or the server
WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]")


@dataclass(frozen=True)
class Place:
    rank: int
    world: int
    job: str            # the job's id, to tell its rendezvous file from an earlier job's ("" when unknown)
    first_host: str     # where rank 0 runs ("" when the scheduler does not say)


def _int_env(env, name: str) -> int:
    raw = env.get(name)
    if raw is None:
        raise ConfigError(f"--cluster: {name} is not set; run this under the scheduler (srun, sbatch, mpirun) so "
                          f"that every rank knows its place")
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"--cluster: {name}={raw!r} is not an integer") from None


def place(scheduler: str, env=os.environ) -> Place:
    """This process's rank, the number of ranks, the job's id and rank 0's host, from the scheduler's variables."""
    if scheduler == "slurm":
        rank, world = _int_env(env, "SLURM_PROCID"), _int_env(env, "SLURM_NTASKS")
        job = ".".join(env[k] for k in ("SLURM_JOB_ID", "SLURM_STEP_ID") if env.get(k))
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        first = expand_hostlist(nodes)[0] if nodes else ""
    elif scheduler == "mpirun":
        rank, world = _int_env(env, "OMPI_COMM_WORLD_RANK"), _int_env(env, "OMPI_COMM_WORLD_SIZE")
        job, first = env.get("PMIX_NAMESPACE") or env.get("OMPI_MCA_orte_jobid", ""), ""
    else:
        raise ConfigError(f"--cluster: {scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if not 0 <= rank < world:
        raise ConfigError(f"--cluster {scheduler}: rank {rank} is outside 0..{world - 1} (world size {world})")
    return Place(rank, world, job, first)


# ------------------------------------------------------------------ Slurm's hostlist syntax
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list, expanded in order: "node[1-3,5],gpu7" -> node1 node2 node3 node5 gpu7;
    zero padding is kept ("n[08-10]" -> n08 n09 n10) and several bracket groups multiply ("r[1-2]n[1-2]")."""
    hosts: list[str] = []
    for item in _top_level_split(text.strip()):
        if not item:
            raise ConfigError(f"host list {text!r}: an empty entry")
        hosts += _expand_item(item, text)
    if not hosts:
        raise ConfigError(f"host list {text!r} names no host")
    return hosts


def _top_level_split(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise ConfigError(f"host list {text!r}: unbalanced or nested brackets")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ConfigError(f"host list {text!r}: unbalanced brackets")
    return parts + [cur] if text else []


def _expand_item(item: str, text: str) -> list[str]:
    open_at = item.find("[")
    if open_at < 0:
        return [item]
    close_at = item.index("]", open_at)
    head, body, tail = item[:open_at], item[open_at + 1:close_at], item[close_at + 1:]
    values = []
    for r in body.split(","):
        m = _RANGE.match(r)
        if not m:
            raise ConfigError(f"host list {text!r}: {r!r} is not a number or a range LO-HI")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ConfigError(f"host list {text!r}: the range {r!r} runs backwards")
        width = len(lo) if lo.startswith("0") else 0   # "08-10": keep the padding
        values += [str(v).zfill(width) for v in range(int(lo), int(hi) + 1)]
    return [head + v + rest for v in values for rest in _expand_item(tail, text)] if tail else \
        [head + v for v in values]


# ------------------------------------------------------------------ the server's address
def job_port(job: str) -> int:
    """The port a Slurm job's server listens on when no rendezvous file is used: the same on every rank."""
    digits = job.split(".")[0]
    if not digits.isdigit():
        raise ConfigError(f"--cluster: no numeric SLURM_JOB_ID ({job!r}) to derive the server's port from; use "
                          f"--rendezvous PATH or set a port in server.bind")
    return PORT_BASE + int(digits) % PORT_SPAN


def reachable(bound: str, host: str) -> str:
    """The address other hosts use for a server that bound `bound`: a wildcard host replaced by `host`."""
    scheme, _, rest = bound.partition("://")
    bhost, _, port = rest.rpartition(":")
    if bhost in WILDCARD_HOSTS:
        if not host:
            raise ConfigError(f"the server bound {bound} (every interface) and nothing names this host for the other "
                              f"ranks; set server.bind to an address of this host that they can reach")
        return f"{scheme}://{host}:{port}"
    return bound


def publish(path: str, address: str, job: str) -> None:
    """Write the rendezvous file atomically (a reader sees the whole file or none): a temporary file next to it,
    flushed to disk, then renamed over it."""
    tmp = f"{path}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"address": address, "job": job}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_rendezvous(path: str, job: str, timeout_s: float, clock=time.monotonic, sleep=time.sleep) -> str:
    """The address rank 0 published in `path` for this job, waiting up to timeout_s for it; ConfigError naming
    what was found instead (nothing, or an earlier job's file) when it does not come."""
    deadline = clock() + timeout_s
    seen = "no file"
    while True:
        try:
            with open(path) as fh:
                got = json.load(fh)
            if not isinstance(got, dict) or not isinstance(got.get("address"), str):
                seen = "a file that is not a psrv rendezvous file"
            elif job and got.get("job") != job:
                seen = f"the address of another job ({got.get('job')!r}, this is {job!r})"
            else:
                return got["address"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            seen = f"an unreadable file ({e})"
        if clock() >= deadline:
            raise RunError("launcher", f"rank 0 did not publish the server's address in {path} within "
                                       f"{timeout_s:g} s (found {seen}); is rank 0 running, and is {path} on a "
                                       f"file system every rank shares?")
        sleep(POLL_S)


def wait_for_server(address: str, keys: str, timeout_s: float) -> None:
    """Return once the server at `address` answers a status request (it listens, and accepts our key)."""
    from .launch import status
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            status(address, timeout_s=min(2.0, timeout_s), keys=keys)
            return
        except ServerLost:
            if time.monotonic() >= deadline:
                raise RunError("launcher", f"no psrv server answered at {address} within {timeout_s:g} s: rank 0 "
                                           f"is not running or not listening there, or it refused this rank's CURVE "
                                           f"key from {keys or '(none)'}") from None
        time.sleep(POLL_S)


# ------------------------------------------------------------------ one rank of the job
def _bind(cfg: config_mod.Config, me: Place, rendezvous: str | None) -> tuple[str, int]:
    """(host, port) rank 0's server binds: server.bind when set (a host of rank 0's that the others reach), else
    every interface; its port, else any free one with a rendezvous file (which says which) and the job's port
    without one (which every rank derives alike)."""
    host, port = "*", 0
    if "server.bind" in cfg.explicit:
        scheme, _, rest = cfg.server.bind.partition("://")
        if scheme != "tcp":
            raise ConfigError(f"server.bind: {cfg.server.bind}: ranks on other hosts reach the server over tcp only")
        host, _, raw = rest.rpartition(":")
        if not host or not raw.isdigit():
            raise ConfigError(f"server.bind: {cfg.server.bind}: expected tcp://HOST:PORT")
        port = int(raw)
    if port == 0 and not rendezvous and me.world > 1:
        port = job_port(me.job)
    return host, port


def run_rank(scheduler: str, config, overrides: list, workers: int | None, rendezvous: str | None,
             log_level: int, env=os.environ) -> int:
    """Run this process's part of the job; returns the exit status (rank 0 prints the summary)."""
    from . import launch
    me = place(scheduler, env)
    per_rank = 1 if workers is None else workers
    if per_rank < 1:
        raise ConfigError(f"--workers: {per_rank} workers on this rank; with --cluster each rank needs at least 1")
    # one key folder serves both sides (the server's key pair and a client's): --keys, which sets worker.keys, is
    # the server's too, before the config is checked (a server bound off loopback without keys is an error)
    named = [config_mod.parse_override(o) if isinstance(o, str) else o for o in overrides]
    given = [v for s, k, v in named if (s, k) == ("worker", "keys")]
    if given:
        overrides = [*overrides, ("server", "keys", given[-1])]
    cfg = config_mod.load(config, overrides)
    keys = cfg.server.keys or cfg.worker.keys
    extra = [("train", "workers", per_rank * me.world)]
    if keys:
        extra += [("server", "keys", keys), ("worker", "keys", keys)]
    if me.world > 1 and not rendezvous and not me.first_host:
        raise ConfigError(f"--cluster {scheduler}: the scheduler does not say where rank 0 runs; pass "
                          f"--rendezvous PATH (a file on a path every rank shares)")
    bind_host, port = _bind(cfg, me, rendezvous)
    if me.rank == 0:
        if me.world > 1:
            extra.append(("server", "bind", f"tcp://{bind_host}:{port}"))
        host = me.first_host or socket.gethostname()

        def announce(bound: str) -> None:
            address = reachable(bound, host)
            print(f"rank 0 of {me.world}: server at {address}", flush=True)
            if rendezvous:
                publish(rendezvous, address, me.job)

        result = launch.train(config, [*overrides, *extra], role="all", log_level=log_level, local=per_rank,
                              on_address=announce)
        launch._print_summary(result)
        return 0
    if rendezvous:
        address = read_rendezvous(rendezvous, me.job, cfg.server.join_timeout_s)
    else:
        address = f"tcp://{me.first_host}:{port}"
        wait_for_server(address, keys, cfg.server.join_timeout_s)
    print(f"rank {me.rank} of {me.world}: attaching {per_rank} worker(s) to {address}", flush=True)
    return launch.attach(address, per_rank, [*overrides, *extra], log_level)
