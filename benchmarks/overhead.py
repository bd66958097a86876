"""Benchmark: psrv's fixed Python cost per step and per message, in one process, without socket traffic.

On a small model (d = 100, batch 256) a plain numpy SGD step takes tens of microseconds, so what psrv adds around
it (building and checking headers, the coordinator's decisions, the store's bookkeeping, the worker's loop) decides
whether a push per batch can pay. Those costs are pure CPU in one process; measured here with every socket taken
out, they are meaningful even on a busy shared machine (the end-to-end benchmarks, pushpull and serverload, need
a quiet one). Each figure, in µs, is the least over a few passes of a median over millisecond chunks (time.perf_counter):

- **protocol**: protocol.encode of a worker's push header (as workers/client.py builds it) and protocol.decode of
  it as the server does (REQUESTS, every field checked); the same for the theta reply a local worker gets.
- **coordinator**: a pure Coordinator over a Store (d = 100, float64), as psrv/server.py drives it but without its
  shell: each worker pushes with pull = true and is served again, for N = 1 and 2 workers under BSP and ASP.
  Per push: the coordinator's handle() (which checks and measures the gradient through the store), and the
  store's update (the instructions Update / Accumulate / ApplyStep carried out).
- **server + client, through the mailbox**: a real psrv Server object and real workers/client.py Clients in this
  process. The hello goes over ZeroMQ (loopback, once); every pull and push after it goes through the shared-memory
  mailbox, and the client hands the server its turn right after posting (the server's _drain_mailboxes(), what its
  loop does while it polls). Per push: the server's whole path (read the mailbox, decode, coordinator, store,
  encode, answer) and the client's (encode, post, read the reply, decode, copy theta under the seqlock).
- **worker step**: workers/worker.py's own training loop (one worker, BSP, linear model, no intercept) against
  that in-process server, in row order (a gather of random rows) and block order (a view of consecutive rows);
  per step: the whole step, the server's share, and the worker's own (the rest), next to the plain numpy loop's
  whole step on the same data in the same order (benchmarks/plain.py's step, in this process). The worker's own
  time minus the plain step is what psrv's worker adds per step (its loss and gradient are computed as the plain
  loop's are, plus the copy of theta).

- **epoch order**: psrv.schedule.epoch_order on a shard of 200,000 rows (the small scaling job's, one worker), next
  to the same order written out as numpy expressions (how it was computed before: each step makes temporaries of
  the shard's size, and every fresh one faults its pages in) and to an argsort of the same hashes (how its rule is
  stated). Each in a fresh process of its own, as a worker computes it: what a fresh array costs depends on what
  the process allocated and freed before; the page faults per call are in the notes.
- **group sub-step**: psrv/group.py's Member.step for M = 1, 2, 8 and 15 members (d = 100), every other member's
  gradient already in, so no wait: a check that its own gradient is finite, publish, one look at the members'
  counts, the mean of the M gradients, theta updated. Next to it the same mean summed one by one in id order, as
  Member.step summed it before (a 16-core machine runs 15 workers).
- **worker's first step**: one launched worker (the launcher's processes, as a user runs it) on data of the
  compute-bound scaling job's size (100,000 x 1000, batch 2000): the time from the opening of the run to its first
  applied step, next to the median time between the steps after it. The first step used to pay for the pages of
  the worker's fresh batch buffers and its first epoch order inside the training time; workers/worker.py now does
  both before its first pull.

What it leaves out on purpose: ZeroMQ and the operating system (wake-ups, scheduling), which pushpull and serverload
measure end to end.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time

import numpy as np

from .common import log

D = 100
BATCH = 256
ROWS = 50_000
# Timing: many short chunks (about a millisecond each), and the median chunk. On a shared machine a chunk that
# another process interrupted is an outlier the median drops, where a long run's mean would carry it. A chunk holds
# ten pushes per worker (ten steps), so the metrics line psrv writes every train.log_every = 10 steps is in each.
CHUNK = 10
CHUNKS = {False: 400, True: 200}       # per figure (coordinator, mailbox, plain loop, protocol)
PASSES = {False: 5, True: 3}            # the whole set, figure by figure the least of the passes
WORKER_RUNS = {False: 5, True: 3}
WORKER_STEPS = {False: 3000, True: 1500}
FIRST_STEPS, FIRST_ROWS = 8, 100_000   # the first-step figure: steps after the first, and rows: the scaling job's
ENCODE_LOOPS = 20                      # calls per protocol chunk


def _median_chunk(chunks: list[float], per_chunk: int) -> float:
    """The median chunk's time per item (s)."""
    return statistics.median(chunks) / per_chunk


def _per_call(fn, loops: int, chunks: int) -> float:
    """The time of one call of fn (s): the median over chunks of `loops` calls, after one unmeasured chunk."""
    out = []
    for _ in range(chunks + 1):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        out.append(time.perf_counter() - t0)
    return _median_chunk(out[1:], loops)


# ------------------------------------------------------------------------------------------------ protocol
def _push_header(rid: int = 7) -> dict:
    return {"op": "push", "wid": 0, "inc": 1, "sid": "0123456789ab", "seq": 12, "clock": 11, "version": 11,
            "loss": 0.5, "count": BATCH, "pull": True, "compute_s": 1.5e-4, "request_s": 3.0e-5, "rid": rid}


def protocol_costs(chunks: int) -> dict:
    from psrv import protocol
    push = _push_header()
    push_frames = protocol.encode(push)
    theta = {"op": "theta", "clock": 12, "version": 12, "batch": [0, 3, 2560, BATCH], "rid": 7}
    theta_frames = protocol.encode(theta)
    n = ENCODE_LOOPS
    return {
        "encode push": _per_call(lambda: protocol.encode(push), n, chunks),
        "decode push": _per_call(lambda: protocol.decode(push_frames, protocol.REQUESTS), n, chunks),
        "encode theta reply": _per_call(lambda: protocol.encode(theta), n, chunks),
        "decode theta reply": _per_call(lambda: protocol.decode(theta_frames, protocol.REPLIES), n, chunks),
    }


ORDER_ROWS = 200_000   # the epoch-order figure: a shard of the small scaling job run by one worker


def _written_out(key: np.uint64) -> np.ndarray:
    """epoch_order as it was computed before (the same order): splitmix64 and its inverse written as numpy
    expressions, each step making temporaries of the shard's size."""
    from psrv.schedule import _INV_M1, _INV_M2
    with np.errstate(over="ignore"):
        z = key + np.arange(ORDER_ROWS, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h = z ^ (z >> np.uint64(31))
        h.sort()
        t = np.empty_like(h)
        for s, inverse in ((31, _INV_M2), (27, _INV_M1), (30, None)):
            np.right_shift(h, np.uint64(s), out=t)
            h ^= t
            np.right_shift(t, np.uint64(s), out=t)
            h ^= t
            if inverse is not None:
                h *= inverse
        h -= np.uint64(0x9E3779B97F4A7C15) + key
    return h.view(np.int64)


def _order_child(way: str, calls: int) -> tuple[float, float]:
    """In a fresh process, as a worker computes its epoch orders: (seconds per call, minor page faults per call),
    medians over `calls` calls after one unmeasured call. How much a fresh array costs depends on what the process
    allocated and freed before (the C library's allocator), so each way runs in a process of its own."""
    import resource
    from psrv.partition import splitmix64
    from psrv.schedule import epoch_key, epoch_order
    key = np.uint64(epoch_key(1, 0, 3))
    fn = {"epoch_order": lambda: epoch_order(1, 0, 3, ORDER_ROWS),
          "written out": lambda: _written_out(key),
          "argsort": lambda: np.argsort(splitmix64(key + np.arange(ORDER_ROWS, dtype=np.uint64)))}[way]
    fn()
    times, faults = [], []
    for _ in range(calls):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return statistics.median(times), statistics.median(faults)


def order_costs(chunks: int) -> dict:
    """psrv.schedule.epoch_order on a shard of ORDER_ROWS rows, each way in a fresh process: now, written out as
    before (the same order), and the argsort of the same hashes that its rule states."""
    import concurrent.futures
    import multiprocessing
    calls = max(5, chunks // 20)    # a call takes milliseconds: fewer than the microsecond figures' chunks
    out = {}
    for way in ("epoch_order", "written out", "argsort"):
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            out[way], out[way + " faults"] = pool.submit(_order_child, way, calls).result(timeout=300)
    return out


GROUP_MEMBERS = (1, 2, 8, 15)   # group steps' members: up to a 16-core machine's workers


def group_costs(chunks: int) -> dict:
    """psrv/group.py's Member.step, a group sub-step's own cost, with every other member's gradient already in
    (no wait): publish, one look at the members' counts, the mean of M gradients of d = D, theta updated. Next to
    it the same mean summed one by one in id order, as Member.step summed it before (and still does when the ids
    are not consecutive)."""
    from psrv import blocks
    from psrv.group import COUNT, SUBS, Group, Member
    out = {}
    for m in GROUP_MEMBERS:
        seg = Group.create(blocks.run_prefix() + f"overhead{m}", m, (D,), np.float64)
        try:
            for j in range(1, m):   # the others: far ahead, with rows in every sub-step
                seg.set_word(j, COUNT, 1 << 61)
                seg.set_word(j, SUBS, 1 << 60)
            me = Member(seg, 0, 10.0)
            me.begin(0, 1 << 40, 1 << 40, list(range(m)))
            seg.grads[...] = np.random.default_rng(0).standard_normal(seg.grads.shape)
            theta, total, k = np.zeros(D), np.empty(D), [0]

            def step():
                me.step(k[0], theta, 1e-9)
                k[0] += 1

            def one_by_one():
                g = seg.grads[0]
                if m == 1:
                    np.multiply(g[0], 1e-9, out=total)
                else:
                    np.add(g[0], g[1], out=total)
                    for j in range(2, m):
                        np.add(total, g[j], out=total)
                    np.multiply(total, 1e-9 / m, out=total)
                np.subtract(theta, total, out=theta)
            out[m] = {"step": _per_call(step, CHUNK, chunks), "one by one": _per_call(one_by_one, CHUNK, chunks)}
            del me, step, one_by_one
        finally:
            seg.close()
    return out


# ------------------------------------------------------------------------------------------------ coordinator
def coordinator_costs(n: int, mode: str, chunks: int) -> dict:
    """(handle s, store s) per push for n workers pushing with pull = true in turn: medians over chunks."""
    from psrv import config, events as ev
    from psrv.coordinator import Coordinator
    from psrv.optim import SGD
    from psrv.store import Store
    cfg = config.load({"train": {"workers": n, "batch_size": BATCH, "consistency": mode, "steps": 10**9,
                                 "lr": 1e-3}, "server": {"progress_deadline_s": 0.0}})
    theta = np.zeros(D + 1)
    store = Store(theta, SGD(theta), lambda step: 1e-3)
    c = Coordinator(cfg, [ROWS // n] * n, store, "sid", 0.0)
    grad = np.random.default_rng(0).standard_normal(D + 1)
    served: dict[int, ev.Theta] = {}
    seq = dict.fromkeys(range(n), 0)
    rid, clock = [0], [1.0]

    def run(event, now):
        out = c.handle(event, now)
        t0 = time.perf_counter()
        for i in out:
            kind = type(i)
            if kind is ev.Theta:
                served[int(i.ident[1:])] = i
            elif kind is ev.Update:
                store.update(i.grad, i.step, i.version, i.scale, i.keys)
            elif kind is ev.Accumulate:
                store.push(i.grad, i.keys)
            elif kind is ev.ApplyStep:
                store.apply_step(i.step, i.version)
        return time.perf_counter() - t0

    for w in range(n):
        run(ev.Hello(b"w%d" % w, w, 1), 0.0)
    for w in range(n):
        run(ev.Pull(b"w%d" % w, w, 1, 0), 0.0)
    handle_s, store_s = [], []
    for _ in range(chunks + 1):
        total = in_store = 0.0
        for _ in range(CHUNK):
            for w in range(n):
                th = served.pop(w)
                seq[w] += 1
                rid[0] += 1
                clock[0] += 1e-4  # a push every 0.1 ms of the coordinator's clock
                e = ev.Push(th.ident, w, 1, "sid", seq[w], th.clock, th.version, 0.5, th.batch[3], True, 1e-4,
                            1e-5, grad, True, None, rid[0])
                t0 = time.perf_counter()
                in_store += run(e, clock[0])
                total += time.perf_counter() - t0
        handle_s.append(total - in_store)
        store_s.append(in_store)
    return {"handle": _median_chunk(handle_s[1:], CHUNK * n), "store": _median_chunk(store_s[1:], CHUNK * n)}


# ------------------------------------------------------------------------------------------------ in-process server
class _Turns:
    """Hands an in-process server its turn: after a request goes into a mailbox, one pass over the mailboxes; after
    one goes over ZeroMQ (the hello), the socket once the message is there. Adds up the server's time."""

    def __init__(self, server):
        self.server = server
        self.server_s = 0.0
        self.marks: list[tuple[float, float]] = []   # (when a push was sent, server time so far): per-step figures

    def mailbox(self) -> None:
        t0 = time.perf_counter()
        self.server._drain_mailboxes()
        self.server_s += time.perf_counter() - t0

    def socket(self, client) -> None:
        """Serve the socket until `client` has its reply (other messages may come first: a heartbeat its own
        thread sent before it was stopped)."""
        deadline = time.monotonic() + 10.0
        while not client.sock.poll(0):
            if time.monotonic() > deadline:
                raise TimeoutError("the in-process server did not answer over its socket")
            if self.server.sock.poll(10):
                self.server._drain_socket()
        for box in self.server.mailboxes.values():  # as the server's loop does while it polls
            box.set_awake(True)


def _client_class():
    from psrv.protocol import Op
    from workers.client import Client

    class InProcessClient(Client):
        """workers/client.py's Client, with the server's turn taken right after each request is sent."""
        turns: _Turns

        def send(self, header, arrays=(), timeout_s=None):
            if header["op"] == Op.PUSH.value:
                self.turns.marks.append((time.perf_counter(), self.turns.server_s))

            super().send(header, arrays, timeout_s)
            if self._pending[3]:
                self.turns.mailbox()
            else:
                self.turns.socket(self)

        def hello(self, wid, local=True):
            h = super().hello(wid, local)
            self._stop_heartbeat()  # nobody answers it between requests here; the run is seconds long
            return h

    return InProcessClient


@contextlib.contextmanager
def in_process(n: int, mode: str, order: str = "rows", steps: int = 10**9):
    """A psrv Server object in this process (mailboxes on, as when it has a core of its own), and a factory of
    clients that hand it its turn; yields (server, turns, make_client, shared-memory prefix)."""
    from psrv import blocks, config, data
    from psrv.server import Server
    cfg = config.load({"data": {"n": ROWS, "d": D, "standardize": False, "batch_order": order, "seed": 1},
                       "model": {"fit_intercept": False},
                       "train": {"workers": n, "batch_size": BATCH, "consistency": mode, "steps": steps,
                                 "lr": 1e-3, "lr_schedule": "constant"},
                       "server": {"spin_s": 1.0, "progress_deadline_s": 0.0},
                       "checkpoint": {"every_steps": 0}, "output": {"plot": False}})
    Client = _client_class()
    clients = []
    with tempfile.TemporaryDirectory() as out, blocks.owned_prefix() as owner:
        block, layout = data.build(cfg, n, owner.prefix + "data")
        server = Server(cfg, layout.to_dict(), out, shm_prefix=owner.prefix, own_core=True)
        turns = _Turns(server)

        def make_client():
            c = Client(server.address, timeout_s=10)
            c.turns = turns
            clients.append(c)
            return c
        try:
            yield server, turns, make_client, owner.prefix
        finally:
            for c in clients:
                c.close()
            server.close()
            block.close()
            block.unlink()


def server_client_costs(n: int, mode: str, chunks: int) -> dict:
    """(server s, client s) per push through the mailboxes, n clients pushing with pull = true in turn."""
    from workers.worker import Plane
    with in_process(n, mode) as (server, turns, make_client, _):
        clients = [make_client() for _ in range(n)]
        planes = [Plane(c.hello(w)) for w, c in enumerate(clients)]
        try:
            for c in clients:
                c.send({"op": "pull", "wid": c.wid, "inc": c.inc, "clock": 0})
            replies = [c.wait() for c in clients]
            assert server.mailbox_requests >= n, "the pulls did not go through the mailboxes"
            server_s, total_s = [], []
            for _ in range(chunks + 1):
                s0, t0 = turns.server_s, time.perf_counter()
                for _ in range(CHUNK):
                    for c, p, (h, arrays) in zip(clients, planes, replies):
                        p.theta(h, arrays)
                        c.push(h["clock"], None, 0.5, h["batch"][3], h["version"], 1e-4, 1e-5, wait=False)
                    replies = [c.wait() for c in clients]
                total_s.append(time.perf_counter() - t0)
                server_s.append(turns.server_s - s0)
            assert all(h["op"] == "theta" for h, _ in replies)
        finally:
            for p in planes:
                p.close()
    client_s = [t - s for t, s in zip(total_s, server_s)]
    return {"server": _median_chunk(server_s[1:], CHUNK * n), "client": _median_chunk(client_s[1:], CHUNK * n)}


def worker_step_costs(order: str, steps: int, runs: int, chunks: int) -> dict:
    """workers/worker.py's loop against the in-process server (one worker, BSP): per step, medians over chunks of
    CHUNK steps (from a tenth of each run on) of the whole step, the server's part and the worker's own; and the
    plain loop's step."""
    from workers.worker import Worker
    whole, server = [], []
    for _ in range(runs):
        with in_process(1, "bsp", order, steps=steps) as (srv, turns, make_client, prefix):
            w = Worker(srv.address, 0, local=True, prefix=prefix)
            w.client.close()
            w.client = make_client()
            try:
                assert w.run() == 0 and w.steps_done == steps
            finally:
                w.close()
            marks = turns.marks[steps // 10:]  # from a tenth in: caches and buffers warm
            for a, b in zip(marks[::CHUNK], marks[CHUNK::CHUNK]):
                whole.append(b[0] - a[0])
                server.append(b[1] - a[1])
    own = [t - s for t, s in zip(whole, server)]
    return {"step": _median_chunk(whole, CHUNK), "server": _median_chunk(server, CHUNK),
            "worker": _median_chunk(own, CHUNK), "plain": plain_step(order, chunks)}


def first_step_costs(runs: int) -> dict:
    """A launched worker's first step against its later ones, at the compute-bound job's width (d = 1000, batch
    2000, benchmarks/scaling.py), one worker, BSP: the seconds from the opening of the run to the first applied
    step (metrics.jsonl at train.log_every = 1), against the median time between the next FIRST_STEPS steps. A
    launched worker, not an in-process one: what its first step pays (fresh pages of its batch buffers, its first
    epoch order) depends on what its process did before; the medians over the runs."""
    from .common import train
    first, later = [], []
    for _ in range(runs):
        _, lines = train(["data.n=%d" % FIRST_ROWS, "data.d=1000", "model.fit_intercept=false",
                          "train.workers=1", "train.batch_size=2000", f"train.steps={FIRST_STEPS + 1}", "train.lr=0.001",
                          "train.log_every=1", "train.pin=true", "train.blas_threads=1"])
        t = [x["elapsed_s"] for x in lines if "loss" in x and not x.get("full")]
        first.append(t[0])
        later.append(float(statistics.median(np.diff(t))))
    return {"first": statistics.median(first), "later": statistics.median(later)}


def plain_step(order: str, chunks: int) -> float:
    """benchmarks/plain.py's step (the loop a user would write), in this process, on data of the same shape."""
    from .plain import _gather_steps
    rng = np.random.default_rng(0)
    X = rng.standard_normal((ROWS, D))
    y = X @ rng.standard_normal(D) + rng.standard_normal(ROWS)
    th = np.zeros(D)
    bufs = (np.empty((BATCH, D)), np.empty(BATCH))
    step = _gather_steps(X, y, BATCH, 1e-3, "blocks" if order == "blocks" else "take", rng, th, bufs)
    return _per_call(step, CHUNK, chunks)


# ------------------------------------------------------------------------------------------------ the benchmark
def measure_once(quick: bool) -> dict:
    chunks = CHUNKS[quick]
    res: dict = {"protocol": protocol_costs(chunks), "order": order_costs(chunks), "group": group_costs(chunks),
                 "coordinator": {}, "mailbox": {}, "worker": {}}
    for n in (1, 2):
        for mode in ("bsp", "asp"):
            res["coordinator"][f"{n} {mode}"] = coordinator_costs(n, mode, chunks)
            res["mailbox"][f"{n} {mode}"] = server_client_costs(n, mode, chunks)
    for order in ("rows", "blocks"):
        res["worker"][order] = worker_step_costs(order, WORKER_STEPS[quick], WORKER_RUNS[quick], chunks)
    return res


def measure(quick: bool) -> dict:
    """Every figure: the least over PASSES passes of the whole set (each pass's figure a median over chunks). On a
    shared machine another process's burst can slow a whole pass; it never makes one faster."""
    passes = []
    for k in range(PASSES[quick]):
        log(f"overhead: pass {k + 1} of {PASSES[quick]}")
        passes.append(measure_once(quick))
    res = _least(passes)
    # launched runs (seconds each, medians over the runs): once, not per pass
    res["first step"] = first_step_costs(WORKER_RUNS[quick])
    return res


def _least(results: list):
    if isinstance(results[0], dict):
        return {k: _least([r[k] for r in results]) for k in results[0]}
    return min(results)


BEFORE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "overhead_before.json")


def _us(x: float) -> str:
    return f"{1e6 * x:.1f}"


def figures(res: dict) -> list[tuple[str, str, str, float]]:
    """(part, what, where, seconds) of every figure of a measurement."""
    out = [("protocol", what, "", v) for what, v in res["protocol"].items()]
    if "order" in res:    # (not in the reference measurement)
        part = f"epoch order of a shard ({ORDER_ROWS:,} rows)"
        o, where = res["order"], "a fresh process"
        out += [(part, "epoch_order (a sort of the hashes, then splitmix64 inverted in place)", where, o["epoch_order"])]
        if "written out" in o:
            out += [(part, "the same, written out with temporaries (how it was computed before)", where,
                     o["written out"])]
        out += [(part, "an argsort of the hashes (the rule as stated; the same order)", where, o["argsort"])]
    for m, v in res.get("group", {}).items():   # (not in the reference measurement)
        part, where = f"group sub-step (d = {D}, the others' gradients in)", f"M = {m} members"
        out += [(part, "Member.step: check, publish, look, mean of the M gradients, theta updated", where, v["step"]),
                (part, "the mean summed one by one, theta updated (the rule before)", where, v["one by one"])]
    for key, v in res["coordinator"].items():
        n, mode = key.split()
        out.append(("coordinator (no shell)", "handle() per push", f"N = {n}, {mode.upper()}", v["handle"]))
        out.append(("coordinator (no shell)", "store update per push", f"N = {n}, {mode.upper()}", v["store"]))
    for key, v in res["mailbox"].items():
        n, mode = key.split()
        out.append(("server + client, mailbox", "server per push", f"N = {n}, {mode.upper()}", v["server"]))
        out.append(("server + client, mailbox", "client per push", f"N = {n}, {mode.upper()}", v["client"]))
    for order, v in res["worker"].items():
        where, part = f"N = 1, BSP, {order} order", "worker step (d = 100, batch 256)"
        out += [(part, "whole step", where, v["step"]), (part, "of which the server", where, v["server"]),
                (part, "of which the worker", where, v["worker"]),
                (part, "plain numpy loop's whole step", where, v["plain"]),
                (part, "worker minus plain step", where, v["worker"] - v["plain"])]
    if "first step" in res:    # (not in the reference measurement)
        part, where = "worker's first step (d = 1000, batch 2000)", "N = 1, BSP, row order"
        out += [(part, "from the run's opening to its first step", where, res["first step"]["first"]),
                (part, f"between two steps (median of the next {FIRST_STEPS})", where, res["first step"]["later"])]
    return out


def _before() -> dict | None:
    """The reference measurement of psrv before its per-message costs were cut (benchmarks/overhead_before.json:
    this benchmark run on that older tree, on this machine; its command, commit and load are in the file)."""
    try:
        with open(BEFORE) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def run(quick: bool = False) -> dict:
    res = measure(quick)
    before = _before()
    ref = {(p, w, where): v for p, w, where, v in figures(before["raw"])} if before else {}
    rows = []
    for part, what, where, v in figures(res):
        b = ref.get((part, what, where))
        rows.append([part, what, where, _us(v)] + ([] if not before else
                                                   ["" if b is None else _us(b),
                                                    "" if not b or what == "worker minus plain step" else
                                                    f"{v / b:.2f}"]))
    notes = [f"d = {D} (float64), batch {BATCH}, {ROWS:,} rows. Each figure is the least over {PASSES[quick]} "
             "passes of the whole set; in each pass, the median over "
             f"{CHUNKS[quick]} chunks (after one unmeasured chunk) of {CHUNK} pushes per worker "
             f"(coordinator, mailbox), {CHUNK} steps (plain loop) or {ENCODE_LOOPS} calls (protocol), and, "
             f"for the worker, over the chunks of {CHUNK} steps of {WORKER_RUNS[quick]} runs of "
             f"{WORKER_STEPS[quick]:,} steps each (from each run's tenth on): a chunk is about a millisecond, "
             "so the median drops those that another process interrupted. Except the worker's first step: "
             f"{FIRST_ROWS:,} x 1000 rows, the medians over {WORKER_RUNS[quick]} launched runs of "
             f"{FIRST_STEPS + 1} steps. Load average (1, 5, 15 min) when it "
             f"ended: {', '.join(f'{x:.2f}' for x in os.getloadavg())}."]
    o = res.get("order", {})
    if "written out faults" in o:
        notes.append(f"Epoch order, minor page faults per call (the median): epoch_order {o['epoch_order faults']:.0f}, "
                     f"written out with temporaries {o['written out faults']:.0f}, the argsort "
                     f"{o['argsort faults']:.0f}.")
    if before:
        notes.append(f"'before': {before['what']}")
    return {
        "name": "overhead", "title": "Fixed Python cost per step and per message (in one process, no sockets)",
        "method": __doc__,
        "columns": ["part", "what", "where", "µs"] + (["µs before", "now / before"] if before else []),
        "rows": rows, "ratios": {}, "targets": [], "raw": res, "notes": notes,
    }


if __name__ == "__main__":
    r = run(quick="--quick" in sys.argv)
    for row in r["rows"]:
        print(" | ".join(row))
    if "--json" in sys.argv:
        print(json.dumps(r["raw"]))
