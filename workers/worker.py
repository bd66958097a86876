"""The worker loop: pull theta and a batch name, compute the gradient on those rows, push, repeat.

A worker started by the launcher reads the launcher's shared-memory block (attached by name, never copied whole).
A worker attached to a running server (launch.py --attach) loads the rows of each shard it is given itself, from the
same file or synthetic seed, into a shared-memory segment of its own, and checks them against the server's
checksum. A worker declared dead, or whose server restarted, registers again as a new incarnation; it exits when
the server says stop, when the server is gone, or when its launcher is.
"""
from __future__ import annotations

import logging
import math
import sys
import time
import traceback

import numpy as np

from psrv import config as config_mod
from psrv import data, models, proc, blocks, sources, sparse_model
from psrv import group as group_mod
from psrv import optim
from psrv.sparse_data import SparseData
from psrv.errors import RunError, ServerLost
from psrv.protocol import OpStr
from psrv.schedule import block_order, epoch_order
from psrv.spec import WorkerSpec
from psrv.blocks import BlockSpec, DataBlock
from psrv.keyrange import Ranges
from psrv.rangeserver import range_rows
from psrv.shmarray import SeqlockArray, SharedArray
from psrv.store import clip_in_place

from .client import Client, RangeClients, RemoteError, ServerRestarted

log = logging.getLogger(__name__)

REJOIN_CODES = {"dead", "stale_incarnation", "unknown_worker", "stale_server", "lost"}
MAX_SESSIONS = 1000  # re-registrations before a worker gives up (a loop, not a recovery, by then)


class DeclaredDead(RunError):
    """This worker was declared dead (or its server restarted) and worker.rejoin is false: it leaves."""


class Rows:
    """Where a worker reads shard rows from: the launcher's block, or segments it loads for itself."""

    def __init__(self, welcome: dict, local: bool, prefix: str, wid: int):
        self.spec, self.local, self.prefix, self.wid = welcome["data"], local, prefix, wid
        self.mean, self.scale = welcome["mean"], welcome["scale"]
        self.shards = [tuple(s) for s in self.spec["shards"]]
        self.blocks: dict[int, DataBlock] = {}
        self.block = DataBlock.attach(self.spec["block"]) if local else None
        self.d = self.spec["block"]["d"]
        self.dtype = self.spec["block"]["dtype"]
        # data.worker_copy = "auto": private copies of the shards read, within 1.5 x this worker's share of the rows
        self.copy_budget = self._copy_budget(welcome) if local else 0
        self.copies: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _copy_budget(self, welcome: dict) -> int:
        """Bytes of private copies this worker may hold: 1.5 x its share of the training rows, or 0. The launcher's
        workers all get here (at their hello) before any of them copies: their first batches come together when
        the gate opens. So each must allow for all of them at once: copies are made only if every worker's budget
        together, 1.5 x the training rows' bytes, fits in half of the memory available now (a check per shard,
        against what each saw before the others copied, let N workers take N times what each allowed for)."""
        if self.spec["config"].get("worker_copy", "off") != "auto":
            return 0
        workers = max(welcome["train"].get("workers", 1), 1)
        budget = int(1.5 * self.spec["block"]["n_train"] / workers * (self.d + 1) * np.dtype(self.dtype).itemsize)
        free = sources.available_memory_bytes()
        if free is None or workers * budget > free // 2:
            log.info("worker %d: data.worker_copy = auto: the workers' copies (%.1f MB in all) would not fit in half "
                     "of the memory available (%s); shards are read in place", self.wid, workers * budget / 1e6,
                     "unknown" if free is None else f"{free / 1e6:.1f} MB")
            return 0
        return budget

    def get(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """(X, y) of a shard, in storage order."""
        if self.local:
            if shard in self.copies:
                return self.copies[shard]
            off, size = self.shards[shard]
            X, y = self.block.X[off:off + size], self.block.y[off:off + size]
            if self._may_copy(X.nbytes + y.nbytes):
                # np.array allocates privately; numpy asks the kernel for huge pages on large allocations
                t0 = time.monotonic()
                X, y = self.copies[shard] = (np.array(X), np.array(y))
                log.info("worker %d: shard %d's rows copied into private memory (%.1f MB in %.2f s)", self.wid,
                         shard, (X.nbytes + y.nbytes) / 1e6, time.monotonic() - t0)
            return X, y
        if shard not in self.blocks:
            self.blocks[shard] = self._load(shard)
        b = self.blocks[shard]
        return b.X, b.y

    def _may_copy(self, nbytes: int) -> bool:
        return sum(X.nbytes + y.nbytes for X, y in self.copies.values()) + nbytes <= self.copy_budget

    def _load(self, shard: int) -> DataBlock:
        expected = dict((s, c) for s, c in self.spec["checksums"])[shard]
        spec = BlockSpec(name=f"{self.prefix}w{self.wid}_s{shard}", dtype=self.dtype, d=self.d,
                         n_train=self.shards[shard][1])
        try:  # a predecessor of this worker (same wid) may have loaded it already
            b = DataBlock.attach(spec)
            if data.checksum(b.X, b.y) == expected:
                return b
            b.close()
        except FileNotFoundError:
            pass
        blocks.unlink_name(spec.name)
        cfg = config_mod.load({"data": self.spec["config"]})
        explicit = frozenset(self.spec["explicit"])
        n_shards = len(self.shards)
        t0 = time.monotonic()
        X, y = data.shard_rows(cfg.data, explicit, n_shards, shard, self.mean, self.scale, self.dtype)
        if data.checksum(X, y) != expected:
            raise RunError(f"worker {self.wid}", f"shard {shard} as loaded here from {cfg.data.source} differs from "
                                                 f"the server's (checksum); is it the same data on this machine?")
        b = DataBlock.create(spec)
        b.X[:], b.y[:] = X, y
        log.info("worker %d: loaded shard %d (%d rows) in %.2f s", self.wid, shard, len(X), time.monotonic() - t0)
        return b

    def close(self) -> None:
        self.copies.clear()
        for b in self.blocks.values():
            b.close()  # never unlinked here: the attach launcher removes its segments when it ends
        if self.block is not None:
            self.block.close()


class Plane:
    """How theta comes in and gradients go out: through shared memory when the server offered it (a seqlock copy
    in, the worker's slot out), else as ZeroMQ frames. Buffers are allocated once per session."""

    def __init__(self, welcome: dict):
        shape, dtype = tuple(welcome["theta_shape"]), np.dtype(welcome["theta_dtype"])
        shm = welcome["data"].get("shm")
        self.shared = shm is not None
        if self.shared:
            self.theta_shm = SeqlockArray.attach(shm["theta"], shape, dtype)
            self.slot = SharedArray.attach(shm["slot"], shape, dtype)
            self.grad = self.slot.array      # the gradient is computed straight into the slot
            self.buf = np.empty(shape, dtype)
        else:
            self.grad = np.empty(shape, dtype)

    def theta(self, h: dict, arrays: list) -> tuple[np.ndarray, int]:
        """theta for this step and its version."""
        if arrays:
            return arrays[0], h["version"]
        return self.buf, self.theta_shm.read_into(self.buf)

    def grad_frame(self):
        return None if self.shared else self.grad

    def close(self) -> None:
        if self.shared:
            del self.grad
            self.theta_shm.close()
            self.slot.close()


class RangePlane:
    """server.shards = S > 1 for a dense theta: its keys are its rows, range s holding rangeserver.range_rows(...).
    theta comes in as range 0's rows from server 0's shared memory and every other range's from its server (`rget`,
    all ranges asked first); the gradient goes out as each range's slice to its server, then range 0's slice with
    the push to server 0: the sparse path's messages. Same interface as Plane."""

    def __init__(self, welcome: dict, client: Client):
        shape, dtype = tuple(welcome["theta_shape"]), np.dtype(welcome["theta_dtype"])
        shm, layout = welcome["data"].get("shm"), welcome["data"]["ranges"]
        if shm is None:
            raise RunError(f"worker {welcome['wid']}", "server.shards > 1 reads range 0's rows from server 0's "
                                                       "shared memory; a worker elsewhere is not supported yet")
        ranges = Ranges(layout["cuts"])
        self.parts = [range_rows(ranges, s, shape[0]) for s in range(len(ranges))]
        self.theta_shm = SeqlockArray.attach(shm["theta"], shape, dtype)
        self.links = RangeClients(client, layout["addresses"][1:])
        self.buf, self.grad = np.empty(shape, dtype), np.empty(shape, dtype)
        self.clock = 0

    def theta(self, h: dict, arrays: list) -> tuple[np.ndarray, int]:
        self.clock = h["clock"]
        self.links.send_gets(h["version"], self.parts[1:])
        version = self.theta_shm.read_into(self.buf)   # range 0's rows are these; the others' are overwritten
        for s, (keys, values) in enumerate(zip(self.parts[1:], self.links.wait_gets()), start=1):
            if values.shape != keys.shape:   # a length-1 reply would broadcast silently
                raise RunError("worker", f"range server {s} sent {list(values.shape)} values for {len(keys)} rows")
            self.buf[keys] = values
        return self.buf, version

    def grad_frame(self):
        """The slices to ranges 1 .. S - 1 sent now; range 0's (keys, values), for the push to server 0."""
        self.links.push(self.clock, [(keys, self.grad[keys]) for keys in self.parts[1:]])
        return self.parts[0], self.grad[self.parts[0]]

    def close(self) -> None:
        self.theta_shm.close()
        self.links.close()


class Worker:
    def __init__(self, address: str, wid: int, server_timeout_s: float | None = None, local: bool = True,
                 prefix: str = "", reporter: proc.Reporter | None = None, keys: str = ""):
        self.wid, self.local, self.prefix = wid, local, prefix
        self.reporter = reporter or proc.Reporter(None)
        self.client = Client(address, timeout_s=server_timeout_s, keys=keys)
        self.rows: Rows | None = None
        self.sparse_rows: SparseData | None = None
        self._orders: dict[int, tuple[int, np.ndarray]] = {}  # shard -> (epoch, its order)
        self.block_rows = 0  # data.batch_order = "blocks": the block size (batch_size), else 0
        self.steps_done = 0
        self.stopped_by = ""   # the reason the server gave when it said stop
        self.sessions = 0
        self.rejoin = True
        self._group: group_mod.Group | None = None   # train.group_steps > 1: the shared segment, attached once

    def run(self) -> int:
        """Sessions until the server says stop: a session ends early when this incarnation is declared dead or
        the server restarts, and the worker then registers again (if allowed)."""
        while True:
            try:
                return self.session()
            except (RemoteError, ServerRestarted) as e:
                if isinstance(e, RemoteError) and e.code not in REJOIN_CODES:
                    raise
                if not self.rejoin or self.sessions >= MAX_SESSIONS:
                    why = "worker.rejoin = false" if not self.rejoin else f"{MAX_SESSIONS} registrations"
                    raise DeclaredDead(f"worker {self.wid}", f"{e.cause}; not registering again ({why})") from None
                log.warning("worker %d: %s; registering again", self.wid, e.cause)

    def session(self) -> int:
        self.sessions += 1
        welcome = self.client.hello(self.wid, local=self.local)
        if self.wid < 0:
            proc.name_process(f"worker-{welcome['wid']}")
            self.reporter.send("joined", wid=welcome["wid"], shards=welcome["data"].get("expected_shards", []))
        self.wid = welcome["wid"]
        train, m = welcome["train"], welcome["model"]
        self.rejoin = train.get("rejoin", True)
        if m["kind"] == sparse_model.KIND:
            return self._sparse_session(welcome, train)
        if self.rows is None:
            self.rows = Rows(welcome, self.local, self.prefix, self.wid)
        # load the rows it will read before its first pull: only then does it enter the run (a local worker copies
        # them into its own memory here, under data.worker_copy = "auto": a second or so per GB, before training)
        for shard in welcome["data"].get("expected_shards", []):
            self.rows.get(shard)
        plane = RangePlane(welcome, self.client) if welcome["data"].get("ranges") else Plane(welcome)
        try:
            return self._steps(welcome, train, m, plane)
        finally:
            plane.close()

    def _steps(self, welcome: dict, train: dict, m: dict, plane: "Plane") -> int:
        d, dtype = self.rows.d, self.rows.dtype
        model = models.make(m["kind"], d, m["fit_intercept"], dtype, m.get("classes", 0))
        b = train["batch_size"]
        blocks = self.rows.spec["config"].get("batch_order") == "blocks"
        self.block_rows = b if blocks else 0
        Xb = np.empty((b, d), dtype=dtype)
        yb = np.empty(b, dtype=dtype)
        request_s = 0.0

        local_steps, lr = train.get("local_steps", 1), train.get("lr", 0.0)
        group_steps = train.get("group_steps", 1)
        member = self._member(welcome) if group_steps > 1 else None
        penalties = self._penalties(train.get("local") or {}, plane.grad) if local_steps > 1 else None
        # local SGD and group steps: a copy of theta of its own (and local SGD: each local step's gradient)
        work, step_grad = (np.empty_like(plane.grad), np.empty_like(plane.grad)) \
            if local_steps > 1 or member is not None else (None, None)
        self._warm(welcome, train["seed"], Xb, yb)
        h, arrays = self.client.pull(0)
        ready = None      # the batch whose rows are already in Xb, yb (gathered while waiting for the server)
        hits = misses = 0  # of those guesses; guessing pauses while they mostly miss (a worker holding several
        carried_s = 0.0    # shards alternates between them). carried_s: gathering after a push, part of the next step
        while h["op"] == OpStr.THETA:
            t0 = time.perf_counter()
            clock = h["clock"]
            theta, version = plane.theta(h, arrays)
            batch = h["batch"]
            X, y = self.rows.get(batch[0])
            count = batch[3]
            steps = 1
            if member is not None:
                loss, steps = self._group_step(model, theta, X, y, batch, train["seed"], b, h, member, group_steps,
                                               Xb, yb, work, plane.grad)
            elif work is not None:
                loss = self._local_steps(model, theta, X, y, batch, train["seed"], b, lr, Xb, yb, work, step_grad,
                                         plane.grad, penalties)
            else:
                if ready is not None:
                    hits, misses = (hits + 1, misses) if batch == ready else (hits, misses + 1)
                    if hits + misses >= 64:  # forget slowly: leases change when workers come and go
                        hits, misses = hits // 2, misses // 2
                if blocks:  # one block of consecutive rows: read in place
                    Xr, yr = self._rows(X, y, batch, train["seed"], Xb, yb)
                else:
                    if batch != ready:
                        self._gather(X, y, batch, train["seed"], Xb, yb)
                    Xr, yr = Xb[:count], yb[:count]
                loss = model.loss_grad(theta, Xr, yr, plane.grad)
            self.after_gradient(clock, plane.grad)
            t1 = time.perf_counter()
            self.client.push(clock, plane.grad_frame(), loss, count, version, t1 - t0 + carried_s, request_s,
                             wait=False)
            # while the server answers, gather the rows of the batch that most likely comes next: the rest of the
            # same shard in its epoch order. A wrong guess costs one gather; a right one hides the round trip.
            ready = _next_batch(batch, len(X), b) if not blocks and work is None and misses <= hits + 1 else None
            if ready is not None:
                self._gather(X, y, ready, train["seed"], Xb, yb)
            t2 = time.perf_counter()
            h, arrays = self.client.wait()
            carried_s, request_s = t2 - t1, time.perf_counter() - t2
            self.steps_done += steps   # BSP's steps, as the server counts them
        # the server has already counted us out when it says stop; no goodbye needed
        self.stopped_by = h.get("reason", "")
        log.info("worker %d: stop (%s) after %d steps", self.wid, h.get("reason"), self.steps_done)
        clipped = member.clipped if member is not None else penalties.clipped if penalties is not None else 0
        if clipped:   # the server's summary cannot count these: it never sees them
            log.info("worker %d: %d of its gradients clipped to train.clip_norm", self.wid, clipped)
        return 0

    def _warm(self, welcome: dict, seed: int, Xb: np.ndarray, yb: np.ndarray) -> None:
        """Before the first pull (which lets this worker into the run and starts its clock): touch the batch
        buffers and build the first epoch order of each shard it expects. Else the first step pays for them inside
        the training time: after the copy of its rows, a fresh 16 MB batch buffer (d = 1000, 2000 rows) faults in
        page by page (python -m benchmarks --only overhead times the first step against the later ones)."""
        Xb.fill(0.0)
        yb.fill(0.0)
        for shard in welcome["data"].get("expected_shards", []):
            self._positions(shard, 0, seed, len(self.rows.get(shard)[0]))

    def _sparse_session(self, welcome: dict, train: dict) -> int:
        """A sparse model's steps: each batch's keys read from theta (a keyed read from shared memory under the
        seqlock, else a `get`), the gradient on those keys pushed with them. The next batch's rows and keys are
        prepared while the server answers the push."""
        if not self.local:
            raise RunError(f"worker {self.wid}", "a sparse model's rows are read from the launcher's shared memory; "
                                                 "workers attached from elsewhere are not supported yet "
                                                 "(docs/sparse.md)")
        if self.sparse_rows is None:
            self.sparse_rows = SparseData(welcome["data"])
        rows, shards = self.sparse_rows, [tuple(s) for s in welcome["data"]["shards"]]
        shm = welcome["data"].get("shm")
        theta_shm = SeqlockArray.attach(shm["theta"], tuple(welcome["theta_shape"]), np.dtype(welcome["theta_dtype"])) \
            if shm else None
        seed, b = train["seed"], train["batch_size"]

        views = {}   # shard -> its rows (a slice rebases indptr: made once, not per batch)

        # server.shards = S > 1: range s's keys are read from and pushed to range server s, range 0's to server 0
        layout = welcome["data"].get("ranges")
        ranges = Ranges(layout["cuts"]) if layout else None
        links = RangeClients(self.client, layout["addresses"][1:]) if layout else None

        def prepare(batch):
            shard, epoch, start, count = batch
            if shard not in views:
                views[shard] = rows.shard(*shards[shard])
            pos = self._positions(shard, epoch, seed, shards[shard][1])[start:start + count]
            prep = sparse_model.prepare(views[shard].take(pos))
            if ranges is not None:   # where each range's keys sit among the batch's (each part stays sorted)
                owner = ranges.owner(prep.keys)
                order = np.argsort(owner, kind="stable")
                ends = np.cumsum(np.bincount(owner, minlength=len(ranges)))
                prep.parts = np.split(order, ends[:-1])
            return prep

        def read(keys):
            if theta_shm is None:
                return self.client.get(keys)
            w = np.empty(len(keys))
            return w, theta_shm.read_rows(keys.view(np.int64), w)   # keys < 2^63: the server checked them

        def read_ranges(prep, version):
            """Every range's rows: the range servers asked first, then range 0 read, then their replies."""
            links.send_gets(version, [prep.keys[p] for p in prep.parts[1:]])
            w = np.empty(len(prep.keys))
            w[prep.parts[0]], seen = read(prep.keys[prep.parts[0]])
            for p, values in zip(prep.parts[1:], links.wait_gets()):
                w[p] = values
            return w, seen

        try:
            h, _ = self.client.pull(0)
            ready, request_s, carried_s = None, 0.0, 0.0
            while h["op"] == OpStr.THETA:
                t0 = time.perf_counter()
                clock, batch = h["clock"], h["batch"]
                prep = ready[1] if ready is not None and ready[0] == batch else prepare(batch)
                w, version = read(prep.keys) if ranges is None else read_ranges(prep, h["version"])
                grad, loss = sparse_model.loss_grad(prep, w)
                self.after_gradient(clock, grad)
                t1 = time.perf_counter()
                if ranges is None:
                    pushed = (prep.keys, grad)
                else:   # the slices first: server 0 orders their step once its own push arrives
                    links.push(clock, [(prep.keys[p], grad[p]) for p in prep.parts[1:]])
                    pushed = (prep.keys[prep.parts[0]], grad[prep.parts[0]])
                self.client.push(clock, pushed, loss, prep.m, version, t1 - t0 + carried_s, request_s,
                                 wait=False)
                # while the server answers: the rows and keys of the batch that most likely comes next
                nxt = _next_batch(batch, shards[batch[0]][1], b)
                ready = (nxt, prepare(nxt))
                t2 = time.perf_counter()
                h, _ = self.client.wait()
                carried_s, request_s = t2 - t1, time.perf_counter() - t2
                self.steps_done += 1
        finally:
            if theta_shm is not None:
                theta_shm.close()
            if links is not None:
                links.close()
        self.stopped_by = h.get("reason", "")
        log.info("worker %d: stop (%s) after %d steps", self.wid, h.get("reason"), self.steps_done)
        return 0

    def after_gradient(self, clock: int, grad: np.ndarray) -> None:
        """Called once per step between computing the gradient and pushing it: nothing here; a subclass may
        change the step (workers/faults.py injects failures, delays and broken gradients this way)."""

    def before_sub_step(self, clock: int, k: int, theta: np.ndarray) -> None:
        """Called before each sub-step of a group step, with the copy of theta its gradient is taken at: nothing
        here; workers/faults.py kills a worker there, or breaks its gradient."""

    def _gather(self, X, y, batch, seed: int, Xb, yb) -> None:
        """Copy a batch's rows into the preallocated buffers."""
        shard, epoch, start, count = batch
        _take(X, y, self._positions(shard, epoch, seed, len(X))[start:start + count], Xb, yb)

    def _rows(self, X, y, batch, seed: int, Xb, yb):
        """A batch's rows: a view under data.batch_order = "blocks", else gathered into the buffers."""
        shard, epoch, start, count = batch
        return _rows(X, y, self._positions(shard, epoch, seed, len(X))[start:start + count], Xb, yb,
                     self.block_rows > 0)

    def _local_steps(self, model, theta, X, y, batch, seed: int, b: int, lr: float, Xb, yb, work, g, out,
                     penalties=None) -> float:
        """Local SGD: plain SGD steps at `lr` on a copy of theta over the batch's rows, b at a time, in the batch
        order, each gradient clipped and given the L2 term as the server would (`penalties`, _penalties); `out`
        gets the sum of those steps' gradients (theta - lr * out is the local model). Returns the mean loss of the
        rows."""
        def apply(k, g):
            g *= lr
            np.subtract(work, g, out=work)
        return self._sub_steps(model, theta, X, y, batch, seed, b, Xb, yb, work, out, lambda k: g, apply,
                               None if penalties is None else lambda g: penalties(g, work))

    def _penalties(self, spec: dict, like: np.ndarray):
        """Local SGD's clipping and L2 term (welcome.train.local, which the server leaves to the workers): a
        function g, w -> g clipped to clip_norm, plus l2 * w on the first l2_rows rows, in place; None when both
        are off."""
        l2, rows, clip_norm = spec.get("l2", 0.0), spec.get("l2_rows", 0), spec.get("clip_norm", 0.0)
        shape = like.shape
        if not (type(l2) is float and type(clip_norm) is float and type(rows) is int and 0 <= l2 < math.inf
                and 0 <= clip_norm < math.inf and 0 <= rows <= (shape or (1,))[0]):
            raise RunError(f"worker {self.wid}", f"welcome.train.local needs floats l2, clip_norm >= 0 and an int "
                                                 f"l2_rows within theta {shape}; got {spec!r}")
        if not l2 and not clip_norm:
            return None
        term = np.empty_like(like)

        def penalize(g, w):
            if clip_in_place(g, clip_norm):
                penalize.clipped += 1
            if l2:
                np.multiply(w[:rows], l2, out=term[:rows])
                g[:rows] += term[:rows]
        penalize.clipped = 0   # gradients scaled down, over the run: logged at its end (the server never sees them)
        return penalize

    def _sub_steps(self, model, theta, X, y, batch, seed: int, b: int, Xb, yb, work, out, grad_of, apply,
                   clip=None, after=None) -> float:
        """What local SGD and group steps share: a copy of theta in `work`, then the batch's rows b at a time in its
        order, sub-step k's gradient computed at `work` into grad_of(k) (then clip(gradient), if given), added to
        `out` (the push; out None: no sum), then apply(k, gradient) changes `work`, then after(k, rows, their mean
        loss), if given. Returns the mean loss of the rows."""
        shard, epoch, start, count = batch
        idx = self._positions(shard, epoch, seed, len(X))[start:start + count]
        np.copyto(work, theta)
        if out is not None:
            out[...] = 0.0
        total = 0.0
        for k, lo in enumerate(range(0, count, b)):
            rows = min(b, count - lo)
            Xr, yr = _rows(X, y, idx[lo:lo + rows], Xb, yb, self.block_rows > 0)
            g = grad_of(k)
            loss = model.loss_grad(work, Xr, yr, g)
            total += loss * rows
            if clip is not None:
                clip(g)
            if out is not None:
                out += g
            apply(k, g)
            if after is not None:
                after(k, rows, loss)
        return total / count

    def _member(self, welcome: dict) -> group_mod.Member:
        """This worker's place in the group steps' shared segment (psrv/group.py)."""
        spec = (welcome["data"].get("shm") or {}).get("group")
        if not isinstance(spec, dict):
            raise RunError(f"worker {self.wid}", "train.group_steps > 1 needs the server's shared memory (a worker on "
                                                 "its machine, worker.shm = true)")
        if self._group is not None:   # a session before this one (the worker registered again)
            self._group.close()
            self._group = None
        shape, dtype = tuple(welcome["theta_shape"]), np.dtype(welcome["theta_dtype"])
        try:
            opt = _group_optimizer(spec.get("optimizer"), shape, dtype)
            g = group_mod.Group.attach(spec["name"], spec["members"], shape, dtype, welcome["train"]["group_steps"],
                                       len(opt.dense_names) if opt is not None else 0)
            self._group = g
            return group_mod.Member(g, welcome["wid"], float(spec["timeout_s"]), float(spec.get("l2", 0.0)),
                                    int(spec.get("l2_rows", 0)), float(spec.get("clip_norm", 0.0)), opt,
                                    float(spec.get("max_grad_ratio", 0.0)))
        except (TypeError, ValueError, KeyError) as e:
            raise RunError(f"worker {self.wid}", f"group steps: {e}") from None

    def _group_step(self, model, theta, X, y, batch, seed: int, b: int, h: dict, member, k_steps: int, Xb, yb,
                    work, out) -> tuple[float, int]:
        """Group steps (train.group_steps = K, psrv/group.py): the batch's rows b at a time, each sub-step's
        gradient averaged with the other members' through shared memory and applied to a copy of theta at that
        step's rate, with train.clip_norm and model.l2 as the server would apply them; `out` gets the push: how
        far the sub-steps moved theta (theta - the copy). Returns (the mean loss of the rows, the sub-steps it
        applied)."""
        count = batch[3]
        lrs, members = h.get("lr"), h.get("group")
        if type(lrs) is not list or not 0 < len(lrs) <= k_steps \
                or not all(type(r) is float and 0 <= r < math.inf for r in lrs) \
                or type(members) is not list or not all(type(m) is int for m in members):
            raise RunError(f"worker {self.wid}", f"a theta reply for group steps needs a list of 1 to {k_steps} "
                                                 f"learning rates (floats >= 0) and a list of worker ids; got lr "
                                                 f"{lrs!r}, group {members!r}")
        budget = len(lrs)   # the step's sub-steps: K, or fewer at the end of train.steps
        subs = -(-count // b)
        if subs > budget:
            raise RunError(f"worker {self.wid}", f"{count} rows are more than {budget} sub-steps of {b}")
        try:
            member.begin(h["clock"], k_steps, subs, members, h["version"], h.get("wait_s"))
        except group_mod.Stale as e:
            # left behind as a straggler (paused, say) while it had the reply: the server has served its rows again
            # and drops its push for this step as late, which takes it back; a zero push, so nothing it computed
            # from a state of another theta reaches anyone
            log.warning("worker %d: group step %d: %s; its push will be dropped", self.wid, h["clock"], e)
            out[...] = 0.0
            member.seal(0)
            return 0.0, 0
        except ValueError as e:
            raise RunError(f"worker {self.wid}", str(e)) from None
        clock = h["clock"]

        def grad_of(k):
            self.before_sub_step(clock, k, work)
            return member.grad(k)
        loss = self._sub_steps(model, theta, X, y, batch, seed, b, Xb, yb, work, None, grad_of,
                               lambda k, g: member.step(k, work, lrs[k]),
                               member.clip if member.clip_norm > 0 else None, member.note)
        # rows ended early (an epoch's end): it follows the others' sub-steps without a gradient, so that every
        # member ends the group step at the same theta, and the server's step theta - (the pushes' mean) is that
        # theta (psrv/group.py)
        k = subs
        while k < budget and member.step(k, work, lrs[k], rows=False):
            member.note(k, 0, 0.0)
            k += 1
        member.seal(k)   # its sub-steps' losses and times, which the server logs per step
        np.subtract(theta, work, out=out)
        if member.left:
            log.warning("worker %d: left group step %d (%s); it finished the step alone", self.wid, clock,
                        member.left_why)
        return loss, k

    def _positions(self, shard: int, epoch: int, seed: int, size: int) -> np.ndarray:
        """A shard's epoch order, cached per shard (a worker holding several shards alternates between them; a
        sort per step would cost more than the gradient)."""
        cached = self._orders.get(shard)
        if cached is None or cached[0] != epoch:
            order = (block_order(seed, shard, epoch, size, self.block_rows) if self.block_rows
                     else epoch_order(seed, shard, epoch, size))
            cached = self._orders[shard] = (epoch, order)
        return cached[1]

    def close(self, bye: bool = False) -> None:
        if bye:
            self.client.bye()
        self.client.close()
        if self.rows is not None:
            self.rows.close()
        if self.sparse_rows is not None:
            self.sparse_rows.close()
        if self._group is not None:
            self._group.close()


def _group_optimizer(spec, shape: tuple, dtype) -> optim._Optimizer | None:
    """The optimizer a group member applies (the welcome's data.shm.group.optimizer: its name and
    hyper-parameters), None for plain SGD (no spec). ValueError for anything else."""
    if spec is None:
        return None
    cls = optim.OPTIMIZERS.get(spec.get("name")) if isinstance(spec, dict) else None
    if cls is None or not cls.state_names:
        raise ValueError(f"optimizer {spec!r} is not one with state among {sorted(optim.OPTIMIZERS)}")
    hyper = {k: spec.get(k) for k in cls.hyper}
    if any(type(v) not in (int, float, bool) for v in hyper.values()):
        raise ValueError(f"{cls.name}: hyper-parameters {hyper!r} must be numbers")
    return cls(np.empty(shape, dtype), **hyper)


def _take(X, y, idx, Xb, yb) -> None:
    """Xb[:k], yb[:k] <- the rows idx of X, y. mode="clip": the indices come from an epoch order, always in range,
    and numpy's default mode ("raise") with out= goes through a temporary buffer, several times slower."""
    k = len(idx)
    # the methods, not np.take: numpy's wrapper costs about a microsecond a call, at tens of calls a millisecond
    X.take(idx, axis=0, out=Xb if k == len(Xb) else Xb[:k], mode="clip")
    y.take(idx, out=yb if k == len(yb) else yb[:k], mode="clip")


def _rows(X, y, idx, Xb, yb, blocks: bool):
    """(X[idx], y[idx]): under data.batch_order = "blocks" a view, since a batch (or a local step's part of one)
    starts at a multiple of the block size in block_order and so is a run of consecutive positions; else copies
    into Xb, yb."""
    k = len(idx)
    first = int(idx[0])
    if blocks and int(idx[-1]) - first == k - 1:
        return X[first:first + k], y[first:first + k]
    _take(X, y, idx, Xb, yb)
    return Xb[:k], yb[:k]


def _next_batch(batch: list[int], size: int, batch_size: int) -> list[int]:
    """The batch the server hands out after `batch` when nothing else intervenes."""
    shard, epoch, start, count = batch
    # psrv.schedule.Cursor.take's arithmetic, twice (the batch just served, then the next), without making a
    # Cursor every step: a batch never crosses the end of its epoch, and the next epoch starts at row 0
    pos = start + min(count, size - start)
    if pos >= size:
        epoch, pos = epoch + 1, 0
    return [shard, epoch, pos, min(batch_size, size - pos)]


def main(spec: WorkerSpec, conn, parent_pid: int, core, log_level: int, make=Worker) -> None:
    """Entry point of a worker process started by a launcher ("workers.worker:main", the default worker.entry).
    `make`: the Worker class (or a factory with its arguments) another entry runs instead, e.g. workers.faults."""
    wid = spec.wid
    proc.child_setup(f"worker-{wid}" if wid >= 0 else "worker-?", parent_pid, core, log_level)  # ?: not known yet
    reporter = proc.Reporter(conn)
    worker = make(spec.address, wid, spec.server_timeout_s, spec.local, spec.prefix, reporter, spec.keys)
    code, leaving = 0, False
    try:
        with proc.profiled(f"worker-{wid}" if wid >= 0 else "worker-attached"):
            worker.run()
    except SystemExit:  # SIGTERM: say goodbye, so the server counts a departure, not a death
        leaving = True
    except ServerLost as e:
        log.info("%s", e)  # the launcher says it, once for all its workers
        reporter.send("error", process=e.process, message=e.cause, kind="server_lost")
        code = 1
    except DeclaredDead as e:
        log.warning("%s", e)
        reporter.send("error", process=e.process, message=e.cause, kind="declared_dead")
        code = 3
    except RemoteError as e:
        log.error("worker %d: %s", worker.wid, e.cause)
        # quarantined: the server refuses it for good; anything else the server says is a failure of this worker
        reporter.send("error", process=f"worker {worker.wid}", message=e.cause,
                      kind="quarantined" if e.code == "quarantined" else "")
        code = 1
    except RunError as e:
        log.error("%s", e)
        reporter.send("error", process=f"worker {worker.wid}", message=str(e.cause))
        code = 1
    except Exception as e:
        log.error("worker %d failed:\n%s", worker.wid, traceback.format_exc())
        reporter.send("error", process=f"worker {worker.wid}", message=f"{type(e).__name__}: {e}")
        code = 1
    finally:
        worker.close(bye=leaving)
    if code == 0 and worker.wid >= 0:  # it was in the run (a worker stopped before its welcome never joined)
        reporter.send("left", wid=worker.wid, steps=worker.steps_done,
                      reason=worker.stopped_by or ("stopped" if leaving else ""))
    sys.exit(code)
