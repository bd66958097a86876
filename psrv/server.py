"""The parameter server: one ROUTER socket, a poll loop with a timeout, handlers by op (on_<op>).

It owns theta and the optimizer, asks the consistency gate when a pull may be answered, hands out mini-batches,
tracks liveness, decides when to stop, and writes theta.npy, summary.json, metrics.jsonl. A bad message gets an
error reply; the loop keeps serving.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field

import numpy as np

from . import config as config_mod
from . import data, models, optim, plot, protocol, proc, transport
from .consistency import APPLY, COMPLETE, LATE, Gate
from .errors import ProtocolError, RunError
from .metrics import Metrics
from .protocol import Op
from .schedule import Shards
from .shards import DataBlock

log = logging.getLogger(__name__)

POLL_MS = 50
DRAIN_MAX = 256          # messages handled per wake-up before the timers get a turn
PROGRESS_INTERVAL_S = 0.5


@dataclass
class Peer:
    """What the server knows about one worker incarnation."""
    wid: int
    inc: int
    ident: bytes
    pid: int
    host: str
    joined_s: float
    last_seen_s: float
    alive: bool = True
    finished: bool = False
    seq: int = -1                 # last push sequence number seen
    clock: int = 0
    shard: int | None = None
    pushes: int = 0
    samples: int = 0
    served_version: int = 0       # theta version of its last pull (for the version lag)


@dataclass
class Stats:
    applied: int = 0              # gradients that went into an update (BSP: every one of a step's)
    samples: int = 0
    rejected: dict = field(default_factory=dict)      # reason -> pushes refused
    dropped: dict = field(default_factory=dict)       # wid -> late gradients dropped (backup workers)
    clipped: int = 0
    duplicates: int = 0
    bad_messages: int = 0
    staleness_hist: dict = field(default_factory=dict)
    version_lag_max: int = 0
    deaths: int = 0


class Server:
    def __init__(self, cfg: config_mod.Config, layout: dict, out_dir: str, reporter: proc.Reporter | None = None,
                 bind: str | None = None):
        self.cfg, self.out_dir, self.reporter = cfg, out_dir, reporter or proc.Reporter(None)
        self.layout = data.Layout.from_dict(layout)
        self.block = DataBlock.attach(self.layout.block)
        t = cfg.train
        self.n_expected = t.workers
        self.model = models.make(cfg.model.kind, self.block.spec.d, cfg.model.fit_intercept, self.block.spec.dtype,
                                 self.layout.extra.get("classes", 0))
        self.theta = self.model.init_theta()
        self.opt = optim.make(t.optimizer, self.theta, t)
        # l2 penalizes the weights, never the intercept row; a custom model's theta is penalized whole
        self.l2_rows = self.block.spec.d if isinstance(self.model, models._Glm) else self.theta.shape[0]
        self.version = 0                         # updates applied to theta
        self._published: np.ndarray | None = None
        self.gate = Gate(t.consistency, staleness=t.staleness, backup=t.backup_workers)
        self.shards = Shards([s for _, s in self.layout.shards])
        self.acc = np.zeros_like(self.theta)     # BSP: the sum of this step's gradients
        self.acc_n = 0
        # train.steps bounds the run unless only train.epochs was asked for
        self.max_steps = t.steps if (t.epochs == 0 or "train.steps" in cfg.explicit) else None
        self.peers: dict[int, Peer] = {}         # wid -> current incarnation
        self.incarnations: dict[int, int] = {}   # wid -> last incarnation number handed out
        self.parked: dict[int, tuple[bytes, int, int | None]] = {}  # wid -> (ident, clock, rid) of a waiting pull
        self.stats = Stats()
        self.server_id = uuid.uuid4().hex[:12]
        self.started_s: float | None = None
        self.t0 = time.monotonic()
        self.last_progress_s = 0.0
        self.stopping = ""                       # why the run is ending ("" while it is not)
        self.last_limit = ""                     # the limit ("steps" or "epochs") that last sent a worker home
        self.evaluated_step = -1
        self.done = False
        self.ctx = transport.context()
        self.sock, self.address = transport.router(
            self.ctx, bind or cfg.server.bind,
            max_frame_bytes=max(self.theta.nbytes, protocol.HEADER_MAX_BYTES) + 1024)
        os.makedirs(out_dir, exist_ok=True)
        self.metrics = Metrics(os.path.join(out_dir, "metrics.jsonl"), t.log_every, t.tol, t.tol_window)

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict:
        self.reporter.send("ready", address=self.address, pid=os.getpid())
        log.info("listening on %s; waiting for %d worker(s)", self.address, self.n_expected)
        join_deadline = time.monotonic() + self.cfg.server.join_timeout_s
        poller = transport.poller(self.sock)
        while not self.done:
            if poller.poll(POLL_MS):
                for _ in range(DRAIN_MAX):
                    frames = transport.recv_nowait(self.sock)
                    if frames is None:
                        break
                    self.handle(frames)
            now = time.monotonic()
            self.check_liveness(now)
            if not self.gate.open and now > join_deadline:
                joined = sorted(w for w, p in self.peers.items() if p.alive)
                missing = [w for w in range(self.n_expected) if w not in joined]
                raise RunError("server", f"only {len(joined)} of {self.n_expected} workers joined within "
                                         f"{self.cfg.server.join_timeout_s:g} s (missing worker ids: {missing})")
            if self.started_s is not None:
                if self.cfg.train.max_wall_s and now - self.started_s > self.cfg.train.max_wall_s:
                    self.stop_all("max_wall_s")
                if now - self.last_progress_s >= PROGRESS_INTERVAL_S:
                    self.report_progress(now)
        return self.finish()

    def handle(self, frames: list) -> None:
        if len(frames) < 2:  # a ROUTER always prefixes the peer's id; an empty message has nothing to answer
            return
        ident, body = frames[0].bytes, frames[1:]
        rid = None
        try:
            header, arrays = protocol.decode(body, protocol.REQUESTS)
            rid = header.get("rid")
            getattr(self, "on_" + header["op"])(ident, header, arrays)
        except ProtocolError as e:
            self.stats.bad_messages += 1
            log.debug("bad message from %r: %s", ident, e)
            transport.send(self.sock, protocol.error(e.code, str(e), rid), ident, block=False)

    def reply(self, ident: bytes, header: dict, arrays=(), rid: int | None = None) -> None:
        if rid is not None:
            header["rid"] = rid
        transport.send(self.sock, protocol.encode(header, arrays), ident, block=False)

    # ------------------------------------------------------------------ handlers
    def on_hello(self, ident, h, arrays):
        if h["version"] != protocol.VERSION:
            raise ProtocolError(f"protocol version mismatch: client speaks v{h['version']}, server speaks "
                                f"v{protocol.VERSION}", "version_mismatch")
        if h["role"] != "worker":
            raise ProtocolError(f"hello: role must be 'worker', got {h['role']!r}", "bad_field")
        wid = h["wid"]
        if wid < 0 or wid >= self.n_expected:
            raise ProtocolError(f"hello: worker id {wid} is outside 0..{self.n_expected - 1}", "bad_wid")
        old = self.peers.get(wid)
        if old is not None and old.finished:
            raise ProtocolError(f"worker {wid} has already finished", "finished")
        if old is not None and old.alive:
            log.warning("worker %d re-registered from pid %d; incarnation %d replaces %d", wid, h["pid"],
                        self.incarnations[wid] + 1, old.inc)
            self._remove(old)
        inc = self.incarnations.get(wid, 0) + 1
        now = time.monotonic()
        peer = Peer(wid=wid, inc=inc, ident=ident, pid=h["pid"], host=h["host"], joined_s=now, last_seen_s=now)
        peer.shard = self.shards.acquire(wid, preferred=wid)
        if peer.shard is None:
            raise ProtocolError(f"no free shard for worker {wid}", "no_shard")
        self.incarnations[wid] = inc
        self.peers[wid] = peer
        peer.clock = self.gate.join(wid)
        log.info("worker %d joined (pid %d on %s, incarnation %d, shard %d)", wid, peer.pid, peer.host, inc,
                 peer.shard)
        if not self.gate.open and sum(p.alive for p in self.peers.values()) >= self.n_expected:
            self.gate.open = True
            self.started_s = time.monotonic()
            log.info("all %d workers joined; training starts", self.n_expected)
        t, m = self.cfg.train, self.cfg.model
        self.reply(ident, {
            "op": Op.WELCOME.value, "version": protocol.VERSION, "wid": wid, "inc": inc,
            "server_id": self.server_id, "theta_shape": list(self.theta.shape), "theta_dtype": self.theta.dtype.str,
            "data": self.layout.to_dict(),
            "train": {"batch_size": t.batch_size, "seed": t.seed, "steps": t.steps,
                      "heartbeat_interval_s": self.cfg.worker.heartbeat_interval_s},
            "model": {"kind": m.kind, "fit_intercept": m.fit_intercept, "classes": self.layout.extra.get("classes", 0)},
        }, rid=h.get("rid"))
        self.release_parked()

    def _peer(self, h) -> Peer:
        """The live incarnation named by a request's (wid, inc); anything else is refused."""
        p = self.peers.get(h["wid"])
        if p is None:
            raise ProtocolError(f"worker {h['wid']} has not said hello", "unknown_worker")
        if p.inc != h["inc"]:
            raise ProtocolError(f"worker {h['wid']} incarnation {h['inc']} is stale (current: {p.inc})",
                                "stale_incarnation")
        if not p.alive:
            raise ProtocolError(f"worker {h['wid']} incarnation {h['inc']} was declared dead", "dead")
        p.last_seen_s = time.monotonic()
        return p

    def on_pull(self, ident, h, arrays):
        p = self._peer(h)
        p.ident = ident
        self.pull(p, h["clock"], h.get("rid"))

    def on_push(self, ident, h, arrays):
        p = self._peer(h)
        p.ident = ident
        rid = h.get("rid")
        if h["seq"] <= p.seq:
            self.stats.duplicates += 1
            self.reply(ident, {"op": Op.ACK.value, "applied": False, "reason": "duplicate"}, rid=rid)
            return
        grad = arrays[0]
        if grad.dtype != self.theta.dtype or grad.shape != self.theta.shape:
            raise ProtocolError(f"push: gradient {grad.dtype.str} {list(grad.shape)} does not match theta "
                                f"{self.theta.dtype.str} {list(self.theta.shape)}", "bad_shape")
        if h["count"] < 1:
            raise ProtocolError("push: count must be >= 1", "bad_field")
        if not np.isfinite(grad).all():
            self._count_rejected("nonfinite")
            p.seq = h["seq"]
            raise ProtocolError(f"push: gradient from worker {p.wid} has NaN or Inf; not applied", "nonfinite")
        if self.stopping:  # the run is ending: nothing more is applied, the worker is told to leave
            p.seq = h["seq"]
            self._finish_peer(p, rid, self.stopping)
            return
        clock = h["clock"]
        try:
            decision = self.gate.push(p.wid, clock)
        except ValueError as e:
            raise ProtocolError(f"push: {e}", "bad_clock") from None
        p.seq = h["seq"]
        p.pushes += 1
        p.clock = clock + 1
        if decision == LATE:
            self.stats.dropped[p.wid] = self.stats.dropped.get(p.wid, 0) + 1
        else:
            self._record(p, h, self.gate.staleness_of(p.wid, clock))
            grad = self._clip(grad)
            if decision == APPLY:
                # each gradient counts 1/N, so N pushes move theta as far as one BSP step (exactly so for SGD)
                self._update(grad * (1.0 / max(1, len(self.gate.members))), self.step)
            else:
                self.acc += grad
                self.acc_n += 1
                if decision == COMPLETE:
                    self._apply_step()
        if h["pull"]:
            self.pull(p, clock + 1, rid)
        else:
            self.reply(ident, {"op": Op.ACK.value, "applied": decision != LATE,
                               "reason": "late" if decision == LATE else ""}, rid=rid)
        self.release_parked()

    def on_heartbeat(self, ident, h, arrays):
        p = self.peers.get(h["wid"])
        if p is not None and p.inc == h["inc"] and p.alive:
            p.last_seen_s = time.monotonic()
        self.reply(ident, {"op": Op.HEARTBEAT.value, "server_id": self.server_id, "step": self.step},
                   rid=h.get("rid"))

    def on_bye(self, ident, h, arrays):
        p = self._peer(h)
        self._remove(p)
        self.reply(ident, {"op": Op.BYE.value}, rid=h.get("rid"))

    def on_status(self, ident, h, arrays):
        self.reply(ident, {"op": Op.STATUS.value, "state": self.status()}, rid=h.get("rid"))

    # ------------------------------------------------------------------ pulls and batches
    @property
    def step(self) -> int:
        """Steps done: BSP steps applied; under SSP/ASP, gradients applied / workers."""
        if self.gate.mode == "bsp":
            return self.gate.step
        return self.stats.applied // max(1, self.n_expected)

    def pull(self, p: Peer, clock: int, rid) -> None:
        if self.stopping:
            self._finish_peer(p, rid, self.stopping)
        elif self.max_steps is not None and clock >= self.max_steps:
            self._finish_peer(p, rid, "steps")
        elif self.gate.may_serve(p.wid, clock):
            self.serve(p, clock, rid)
        else:
            self.parked[p.wid] = (p.ident, clock, rid)

    def serve(self, p: Peer, clock: int, rid) -> None:
        clock = self.gate.serve(p.wid, clock)
        if self.max_steps is not None and clock >= self.max_steps:
            self._finish_peer(p, rid, "steps")
            return
        if self.cfg.train.epochs and self.shards.cursors[p.shard].epoch >= self.cfg.train.epochs:
            self._finish_peer(p, rid, "epochs")  # its shard is done; the others finish their steps without it
            return
        batch = self.shards.next_batch(p.shard, self.cfg.train.batch_size)
        p.clock = clock
        p.served_version = self.version
        self.reply(p.ident, {"op": Op.THETA.value, "clock": clock, "version": self.version, "batch": batch},
                   [self.published()], rid=rid)

    def release_parked(self) -> None:
        """Answer every parked pull the gate now allows. Answering one can end a step or a worker and so call this
        again; each entry is re-read before use, so a nested call's work is never redone."""
        for wid in list(self.parked):
            entry = self.parked.get(wid)
            if entry is None:
                continue
            p = self.peers.get(wid)
            if p is None or not p.alive:
                del self.parked[wid]
            elif self.stopping or self.gate.may_serve(wid, entry[1]):
                del self.parked[wid]
                self.pull(p, entry[1], entry[2])

    def published(self) -> np.ndarray:
        """An immutable snapshot of theta for this version. Replies send it zero-copy, so theta itself may change
        while a send is still in flight without corrupting what the peer receives."""
        if self._published is None:
            self._published = self.theta.copy()
        return self._published

    # ------------------------------------------------------------------ updates
    def _record(self, p: Peer, h, staleness: int) -> None:
        s = self.stats
        s.staleness_hist[staleness] = s.staleness_hist.get(staleness, 0) + 1
        s.version_lag_max = max(s.version_lag_max, self.version - p.served_version)
        s.samples += h["count"]
        p.samples += h["count"]
        self.metrics.add_batch(h["loss"], h["count"])

    def _count_rejected(self, reason: str) -> None:
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1

    def _clip(self, grad: np.ndarray) -> np.ndarray:
        limit = self.cfg.train.clip_norm
        if limit > 0:
            norm = float(np.linalg.norm(grad))
            if norm > limit:
                self.stats.clipped += 1
                return grad * (limit / norm)
        return grad

    def _update(self, grad: np.ndarray, step: int) -> None:
        """One optimizer update with the learning rate of `step` (0-based), after the L2 term."""
        t = self.cfg.train
        if self.cfg.model.l2:
            if not grad.flags.writeable:  # a zero-copy view of a received frame
                grad = grad.copy()
            grad[:self.l2_rows] += self.cfg.model.l2 * self.theta[:self.l2_rows]
        lr = optim.lr_at(step, t.lr, t.lr_schedule, self.max_steps or t.steps, t.lr_decay, t.lr_decay_every,
                         t.lr_min)
        self.opt.step(self.theta, grad, lr)
        self.version += 1
        self._published = None
        self._after_update()

    def _apply_step(self) -> None:
        """BSP: theta <- optimizer(mean of this step's gradients). The gate has already moved on to the next step."""
        self.acc /= self.acc_n
        self.stats.applied += self.acc_n
        self._update(self.acc, self.gate.step - 1)
        self.acc[...] = 0.0
        self.acc_n = 0

    def _after_update(self) -> None:
        if self.gate.mode != "bsp":
            self.stats.applied += 1
        step = self.step
        if self.metrics.due(step):
            self.metrics.log_train(step, self.elapsed_s(), self.stats.samples)
            if self.metrics.plateaued():
                self.stop_all("tol")
        every = self.cfg.train.eval_every
        if every and self.block.spec.n_test and step % every == 0 and step != self.evaluated_step:
            self.evaluated_step = step
            self.evaluate(step)

    def evaluate(self, step: int) -> tuple[float, float] | None:
        if self.block.spec.n_test == 0:
            return None
        loss = self.model.loss(self.theta, self.block.X_test, self.block.y_test)
        metric = self.model.metric(self.theta, self.block.X_test, self.block.y_test)
        self.metrics.log_eval(step, self.elapsed_s(), loss, metric, self.model.metric_name)
        return loss, metric

    def elapsed_s(self) -> float:
        return time.monotonic() - (self.started_s or self.t0)

    # ------------------------------------------------------------------ membership and stopping
    def stop_all(self, reason: str) -> None:
        """End the run: every worker is told to stop at its next request; waiting ones are told now."""
        if self.stopping:
            return
        self.stopping = reason
        log.info("stopping: %s", reason)
        self.release_parked()
        self._check_done()

    def _finish_peer(self, p: Peer, rid, reason: str) -> None:
        p.finished = True
        self.last_limit = reason
        self.reply(p.ident, {"op": Op.STOP.value, "reason": reason}, rid=rid)
        self._leave(p)

    def _remove(self, p: Peer) -> None:
        p.alive = False
        self._leave(p)

    def _leave(self, p: Peer) -> None:
        self.parked.pop(p.wid, None)
        self.shards.release(p.wid)
        if self.gate.leave(p.wid) and not self.stopping:
            self._apply_step()
        self.release_parked()
        self._check_done()

    def _check_done(self) -> None:
        if self.gate.open and not self.gate.members and not self.done:
            self.done = True
            self.stopping = self.stopping or self.last_limit

    def check_liveness(self, now: float) -> None:
        timeout = self.cfg.server.heartbeat_timeout_s
        for p in list(self.peers.values()):
            if p.alive and not p.finished and now - p.last_seen_s > timeout:
                self.stats.deaths += 1
                log.error("worker %d declared dead: pid %d on %s, clock %d, silent for %.1f s (timeout %g s)",
                          p.wid, p.pid, p.host, p.clock, now - p.last_seen_s, timeout)
                self._remove(p)

    # ------------------------------------------------------------------ outputs
    def report_progress(self, now: float) -> None:
        self.last_progress_s = now
        elapsed = now - self.started_s
        self.reporter.send("progress", step=self.step, steps=self.max_steps or 0, loss=self.metrics.last_loss,
                           elapsed_s=elapsed, samples_per_s=self.stats.samples / elapsed if elapsed > 0 else 0.0)

    def status(self) -> dict:
        now = time.monotonic()
        return {
            "server_id": self.server_id, "address": self.address, "step": self.step, "steps": self.max_steps or 0,
            "theta_version": self.version, "consistency": self.gate.mode, "loss": self.metrics.last_loss,
            "workers": [{"wid": p.wid, "inc": p.inc, "pid": p.pid, "host": p.host, "clock": p.clock,
                         "last_seen_s": round(now - p.last_seen_s, 3), "alive": p.alive, "finished": p.finished,
                         "pushes": p.pushes, "shard": p.shard} for p in self.peers.values()],
            "deaths": self.stats.deaths,
        }

    def finish(self) -> dict:
        wall = self.elapsed_s()
        step = self.step
        self.metrics.log_train(step, wall, self.stats.samples)
        X, y = self.block.X, self.block.y
        final_loss = self.model.loss(self.theta, X, y)
        train_metric = self.model.metric(self.theta, X, y)
        self.metrics.log_final(step, wall, final_loss, train_metric, self.model.metric_name)
        test = self.evaluate(step)
        self.metrics.close()
        if isinstance(self.model, models._Glm):
            theta_out = data.unscale(self.theta, self.block.mean, self.block.scale, self.cfg.model.fit_intercept)
        else:
            theta_out = self.theta.astype(np.float64)
        s = self.stats
        summary = {
            "steps": step, "wall_s": wall, "samples_per_s": s.samples / wall if wall > 0 else None,
            "final_loss": final_loss, "train_metric": train_metric, "metric": self.model.metric_name,
            "test_loss": test[0] if test else None, "test_metric": test[1] if test else None,
            "stopped_by": self.stopping, "workers": self.n_expected, "consistency": self.gate.mode,
            "staleness": self.cfg.train.staleness if self.gate.mode == "ssp" else None,
            "backup_workers": self.cfg.train.backup_workers, "partition": self.cfg.data.partition,
            "rows": self.block.spec.n_train, "test_rows": self.block.spec.n_test, "cols": self.block.spec.d,
            "model": self.cfg.model.kind, "optimizer": self.cfg.train.optimizer,
            "batch_size": self.cfg.train.batch_size, "lr": self.cfg.train.lr, "theta_version": self.version,
            "gradients_applied": s.applied, "samples": s.samples, "rejected": s.rejected, "clipped": s.clipped,
            "duplicates": s.duplicates, "bad_messages": s.bad_messages, "worker_deaths": s.deaths,
            "staleness_max": max(s.staleness_hist, default=0),
            "staleness_hist": {str(k): v for k, v in sorted(s.staleness_hist.items())},
            "version_lag_max": s.version_lag_max,
            "dropped_grads": {str(k): v for k, v in sorted(s.dropped.items())},
            "rows_visited": {str(k): v for k, v in self.shards.rows_visited().items()},
            "rows_dropped": self.layout.rows_dropped, "address": self.address,
        }
        np.save(os.path.join(self.out_dir, "theta.npy"), theta_out)
        _write_json(os.path.join(self.out_dir, "summary.json"), summary)
        if self.cfg.output.plot:
            plot.loss_curves(os.path.join(self.out_dir, "loss.png"), self.metrics.train, self.metrics.test,
                             f"{self.cfg.model.kind}, {self.n_expected} workers, {self.gate.mode}")
        log.info("done (%s): %d steps in %.2f s, final loss %.6g", self.stopping, step, wall, final_loss)
        return summary

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()
        self.metrics.close()
        self.block.close()


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def main(cfg_dict: dict, explicit: list, layout: dict, out_dir: str, conn, parent_pid: int, core, log_level: int):
    """Entry point of the server process (started with spawn by the launcher)."""
    proc.child_setup("server", parent_pid, core, log_level)
    reporter = proc.Reporter(conn)
    server = None
    try:
        cfg = config_mod.Config.from_dict(cfg_dict, frozenset(explicit))
        server = Server(cfg, layout, out_dir, reporter)
        summary = server.run()
        reporter.send("done", summary=summary)
    except RunError as e:
        log.error("%s", e)
        reporter.send("error", process=e.process, message=e.cause)
        sys.exit(1)
    except Exception as e:
        log.error("server failed:\n%s", traceback.format_exc())
        reporter.send("error", process="server", message=f"{type(e).__name__}: {e}")
        sys.exit(1)
    finally:
        if server is not None:
            server.close()
