"""What a run reports: the counters the coordinator keeps, and the status reply and summary made from its state
(pure: reads a Coordinator, changes nothing). Both stay bounded whatever the run's length or churn."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from . import config
from .errors import ConfigError

STATUS_WORKERS = 200   # workers listed in a status reply (live ones first), so it stays far under the header cap
SUMMARY_PEERS = 10     # connections named in the summary's count of malformed messages


class Record(NamedTuple):
    """One applied gradient, as the coordinator saw it when it was pushed."""
    peer: Any                     # membership.Peer
    batch: list | None
    count: int
    loss: float
    compute_s: float
    request_s: float
    held_s: float                 # of request_s, the time the server held the pull (barrier, staleness bound)
    staleness: int
    lag: int                      # theta versions between the one it was computed at and the one it updated
    notes: Any = None             # group steps: the member's checked (rows, loss sum, end time) per sub-step


@dataclass
class Stats:
    applied: int = 0              # gradients that went into an update (BSP: every one of a step's)
    samples: int = 0
    rejected: dict = field(default_factory=dict)      # reason -> pushes refused
    dropped: dict = field(default_factory=dict)       # wid -> late gradients dropped (backup workers)
    duplicates: int = 0
    bad_messages: int = 0
    straggles: int = 0            # members taken out of the gate for making no progress within the deadline
    staleness_hist: dict = field(default_factory=dict)
    version_lag_max: int = 0
    pushes: dict = field(default_factory=dict)        # wid -> gradients applied (every incarnation)
    compute_s: float = 0.0        # summed over applied pushes: time workers spent computing (gradient and gathers)
    request_s: float = 0.0        # ... waiting idle for the theta they computed on (network + server + barrier)
    wait_s: float = 0.0           # ... of which the server held their pull (barrier or staleness bound)

    MAPS = ("rejected", "dropped", "staleness_hist", "pushes")

    def account(self, r: Record) -> None:
        self.staleness_hist[r.staleness] = self.staleness_hist.get(r.staleness, 0) + 1
        self.pushes[r.peer.wid] = self.pushes.get(r.peer.wid, 0) + 1
        if r.lag > self.version_lag_max:  # max() spelled out: once per applied gradient
            self.version_lag_max = r.lag
        self.samples += r.count
        self.compute_s += r.compute_s
        self.request_s += r.request_s
        self.wait_s += r.held_s
        r.peer.samples += r.count
        r.peer.last_staleness = r.staleness

    def to_state(self) -> dict:
        d = dict(self.__dict__)
        for k in self.MAPS:
            d[k] = [[key, v] for key, v in d[k].items()]
        return d

    @classmethod
    def from_state(cls, d: dict) -> "Stats":
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in cls.MAPS:
            d[k] = {key: v for key, v in d.get(k, [])}
        return cls(**d)


def time_split(s: Stats) -> dict:
    """Where a worker's step goes, per applied push, all measured directly: its own work (the gradient and the
    gathers), and its idle wait for theta, split into the part the server held its pull (the barrier or the
    staleness bound: "wait") and the rest (the network and the server's own work: "communication")."""
    n = sum(s.pushes.values())
    if not n:
        return {}
    return {"compute": 1000 * s.compute_s / n, "wait": 1000 * s.wait_s / n,
            "communication": 1000 * (s.request_s - s.wait_s) / n}


def status(c, now: float) -> dict:
    """The run's state for `--status`: at most STATUS_WORKERS workers listed (live ones first), with the totals."""
    peers = sorted(c.members.peers.values(), key=lambda p: (not p.live, p.wid))
    workers = [{"wid": p.wid, "inc": p.inc, "pid": p.pid, "host": p.host, "clock": c.clock_of(p.wid),
                "last_seen_s": round(now - p.last_seen_s, 3), "alive": p.alive, "finished": p.finished,
                "pushes": p.pushes, "push_rate": round(p.push_rate(now), 2), "staleness": p.last_staleness,
                "ready": p.ready, "shards": c.schedule.held_by(p.wid) if p.participates else []}
               for p in peers[:STATUS_WORKERS]]
    m, s = c.members, c.stats
    return {"step": c.step, "steps": c.max_steps or 0, "theta_version": c.version, "consistency": c.gate.mode,
            "schedule": c.cfg.train.schedule, "loss": c.last_loss, "started": c.gate.open, "stopping": c.stopping,
            "workers_expected": c.n_start, "workers_in": len(c.members.participants()),
            "elapsed_s": round(c.elapsed_s(now), 3), "workers": workers, "workers_total": len(peers),
            "workers_live": len(m.live()), "deaths": m.deaths, "bad_messages": s.bad_messages,
            "rejected": s.rejected, "quarantined": m.quarantined[-STATUS_WORKERS:],
            "worker_restarts": m.restarts, "straggles": s.straggles,
            "progress_deadline_s": round(c.progress.deadline_s(), 3),
            "rows_visited": [[e, k] for e, k in c.schedule.rows_visited().items()],
            "rows_visited_before": c.schedule.rows_visited_before()}


def _per_worker(counts: dict) -> dict:
    """{wid: count} as JSON, at most STATUS_WORKERS of them (the largest counts), the rest summed as "others"."""
    if len(counts) <= STATUS_WORKERS:
        return {str(k): v for k, v in sorted(counts.items())}
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:STATUS_WORKERS]
    return {**{str(k): v for k, v in sorted(top)}, "others": sum(counts.values()) - sum(v for _, v in top)}


def batch_used(batch_size: int, shard_sizes: list[int]) -> int:
    """The rows a batch actually holds: a batch never spans two epochs of a shard, so one larger than every shard is
    the largest shard, whole."""
    return min(batch_size, max(shard_sizes, default=batch_size))


HINT_SHARE = 0.25      # a round trip at least this share of a step's gradient time is worth saving
HINT_TARGET = 20       # ... by enough steps per push that their gradients take this many round trips (a round of
                       # group steps costs more than the round trip measured here: the server's work then interrupts
                       # a worker on a shared core; 20 keeps that to a few per cent, benchmarks/defaultjob.py)
HINT_MAX_K = 64


def group_steps_hint(cfg, split: dict) -> int:
    """The train.group_steps K to suggest after a run (0: none): when its pushes waited on the server's round trip
    (`split`, the run's own time_per_push_ms) for HINT_SHARE of their gradient's time or more, the least power of 2
    from 8 whose K gradients take HINT_TARGET round trips, at most HINT_MAX_K; and only if the config's own rules
    accept the run with group steps (BSP, not ftrl, a dense model, worker.shm, one server, ...: check_combinations),
    which then takes BSP's steps asking the server once per K (docs/protocol.md, Group steps)."""
    t = cfg.train
    compute, trip = split.get("compute") or 0.0, split.get("communication") or 0.0
    if t.group_steps != 1 or t.local_steps != 1 or compute <= 0 or trip < HINT_SHARE * compute:
        return 0
    k = 8   # the least that a round trip of HINT_SHARE of the gradient's time asks for (8 >= 20 x 0.25)
    while k < HINT_MAX_K and k * compute < HINT_TARGET * trip:
        k *= 2
    grouped = dataclasses.replace(cfg, train=dataclasses.replace(t, group_steps=k))
    try:
        config.check_combinations(grouped)
    except ConfigError:
        return 0
    return k


def run_hint(c, split: dict) -> int:
    """group_steps_hint for the run of coordinator c: none when its server was started alone or a worker attached
    (not one of the launcher's, on its machine), whom group steps would refuse."""
    if c.alone or not all(p.shm for p in c.members.peers.values()):
        return 0
    return group_steps_hint(c.cfg, split)


def summary(c, now: float) -> dict:
    """The coordinator's part of summary.json."""
    s, m, t = c.stats, c.members, c.cfg.train
    wall = c.elapsed_s(now)
    split = time_split(s)
    noisy = sorted(m.bad_by_conn.items(), key=lambda kv: -kv[1])[:SUMMARY_PEERS]
    return {
        "steps": c.step, "wall_s": wall, "samples_per_s": s.samples / wall if wall > 0 else None,
        # every worker whose gradients were applied, attached ones included (the launcher's count if none was)
        "stopped_by": c.stopping, "workers": len(s.pushes) or c.n_expected, "consistency": c.gate.mode,
        "staleness": t.staleness if c.gate.mode == "ssp" else None, "backup_workers": t.backup_workers,
        "schedule": t.schedule, "optimizer": t.optimizer, "lr": t.lr, "local_steps": t.local_steps,
        "group_steps": t.group_steps,
        "batch_size": batch_used(t.batch_size, [cur.size for cur in c.schedule.cursors]),
        "theta_version": c.version, "gradients_applied": s.applied, "samples": s.samples, "rejected": s.rejected,
        "duplicates": s.duplicates, "stale_pushes": m.stale_pushes, "bad_messages": s.bad_messages,
        "bad_messages_by_peer": {k.hex(): v for k, v in noisy}, "quarantined": m.quarantined[-STATUS_WORKERS:],
        "worker_deaths": m.deaths, "worker_restarts": m.restarts, "straggles": s.straggles,
        "staleness_max": max(s.staleness_hist, default=0),
        "staleness_hist": {str(k): v for k, v in sorted(s.staleness_hist.items())},
        "version_lag_max": s.version_lag_max,
        "dropped_grads": _per_worker(s.dropped), "pushes_applied": _per_worker(s.pushes),
        "time_per_push_ms": split,
        "group_steps_hint": run_hint(c, split),
        "rows_visited": {str(k): v for k, v in c.schedule.rows_visited().items()},
        "rows_visited_before": c.schedule.rows_visited_before(),
    }
