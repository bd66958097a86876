"""Benchmark: how many pushes one psrv server process sustains, and what each costs it, at d = 100 and d = 100,000
(issue 10: "measure the pushes/s one server process sustains ... and keep it off the critical path").

W clients (separate processes, float64 theta) push gradients of zeros as fast as the protocol lets them, each
waiting for its reply (a push that asks for theta back, as a psrv worker does under ASP): over the ZeroMQ path
(the gradient in a frame, theta back in a frame) and over the shared-memory path (the gradient in the client's
slot, the request in its mailbox, theta read back under the seqlock), with the server polling the mailboxes (it has
a core of its own: server.spin_s) and with it sleeping (server.spin_s = 0, as when it shares a core with a worker:
each request rings its bell, and it rings the client's once that sleeps for its reply). The server runs train.consistency = asp with lr = 0 (theta stays put, but
every push is decoded, checked, applied and answered as in training). Measured over a common window:

- **pushes/s**: pushes the clients got answers to, per second;
- **server CPU per push**: the server process's own CPU time (/proc/PID/stat) over the window divided by those
  pushes; its inverse, **capacity**, is the pushes/s one server core could sustain if nothing else waited;
- **baseline**: the same clients against a raw pyzmq echo (a ROUTER that answers each header + array with the
  same bytes, nothing else), measured the same way: the cost ZeroMQ and Python themselves put on a round trip.

On a machine with few cores the clients and the server share them, so pushes/s there is bounded by the clients;
the CPU per push is the figure that carries over to a larger machine.
"""
from __future__ import annotations

import os
import time

import numpy as np

from .common import log, median, server_core, spread

DIMS = (100, 100_000)
WINDOW_S = {False: 2.0, True: 0.8}
REPEATS = {False: 3, True: 1}


def _cpu_s(pid: int) -> float:
    """A process's user + system CPU seconds so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _client(address: str, wid: int, local: bool, raw_d: int, core, start_at: float, stop_at: float, q) -> None:
    """One client: psrv's own worker client (raw_d = 0) or a raw DEALER (raw_d = d), pushing until stop_at; puts
    the pushes answered between start_at and stop_at."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    if raw_d:
        import msgpack
        import zmq
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        grad = np.zeros(raw_d, np.float64)
        head = msgpack.packb({"op": "push", "wid": wid, "clock": 0, "count": 1, "arrays": [["<f8", [raw_d]]]})

        def step():
            sock.send_multipart([head, grad], copy=False)
            if not sock.poll(30_000):
                raise TimeoutError("the raw echo peer did not answer")
            frames = sock.recv_multipart(copy=False)
            np.frombuffer(frames[-1].buffer, np.float64)

        def close():
            sock.close()
            ctx.term()
    else:
        from workers.client import Client
        from workers.worker import Plane
        client = Client(address, timeout_s=30)
        welcome = client.hello(wid, local=local)
        plane = Plane(welcome)
        plane.grad[...] = 0.0
        state = {"h": client.pull(0)}

        def step():
            h, arrays = state["h"]
            plane.theta(h, arrays)
            state["h"] = client.push(h["clock"], plane.grad_frame(), 0.0, h["batch"][3], h.get("version", 0))

        def close():
            plane.close()
            client.close()
    try:
        done = 0
        while time.monotonic() < start_at:
            step()
        while time.monotonic() < stop_at:
            step()
            done += 1
        q.put(done)
    finally:
        close()


def _load(address: str, pid: int, clients: int, local: bool, raw_d: int, window_s: float) -> dict:
    """Run `clients` clients against the server at `address` (process `pid`) over one window."""
    from psrv import proc
    q = proc.SPAWN.Queue()
    cores = proc.usable_cores()
    srv = server_core(clients)
    others = [c for c in cores if c != srv] or cores
    start_at = time.monotonic() + 3.0 + 0.3 * clients   # spawning and connecting first
    stop_at = start_at + window_s
    ps = [proc.SPAWN.Process(target=_client, daemon=True,
                             args=(address, i, local, raw_d, others[i % len(others)], start_at, stop_at, q))
          for i in range(clients)]
    with proc.main_hidden():
        for p in ps:
            p.start()
    while time.monotonic() < start_at:
        time.sleep(0.01)
    cpu0 = _cpu_s(pid)
    while time.monotonic() < stop_at:
        time.sleep(0.01)
    cpu1 = _cpu_s(pid)
    pushes = sum(q.get(timeout=60) for _ in ps)
    for p in ps:
        p.join(30)
    return {"pushes_per_s": pushes / window_s, "server_cpu_per_push_s": (cpu1 - cpu0) / max(pushes, 1),
            "server_busy": (cpu1 - cpu0) / window_s}


def _raw_server(d: int):
    """A raw pyzmq echo process (benchmarks/pushpull.py's) on the server's core; yields (address, pid)."""
    from .pushpull import _echo
    from psrv import proc
    q = proc.SPAWN.Queue()
    p = proc.SPAWN.Process(target=_echo, args=(q, server_core(1), d), daemon=True)
    with proc.main_hidden():
        p.start()
    return p, q.get(timeout=60)


def measure(d: int, clients: int, window_s: float, repeats: int) -> dict:
    from .common import psrv_server
    from workers.client import Client
    res: dict = {"d": d, "clients": clients}
    for rnd in range(repeats):
        p, address = _raw_server(d)
        try:
            res.setdefault("raw", []).append(_load(address, p.pid, clients, False, d, window_s))
        finally:
            p.terminate()
            p.join(10)
        overrides = ["data.n=4096", f"data.d={d - 1}", "data.standardize=false", "train.consistency=asp",
                     "train.steps=1000000000", "train.lr=1e-30", "train.lr_schedule=constant", "train.batch_size=1"]
        for local, path, extra in ((False, "zmq", []), (True, "shm", []), (True, "bell", ["server.spin_s=0"])):
            with psrv_server(overrides + extra, workers=clients) as address:
                c = Client(address, timeout_s=30)
                pid = c.status()["pid"]
                c.close()
                res.setdefault(path, []).append(_load(address, pid, clients, local, 0, window_s))
    return res


def run(quick: bool = False) -> dict:
    from psrv import proc
    window_s, repeats = WINDOW_S[quick], REPEATS[quick]
    clients = max(1, min(4, len(proc.usable_cores()) - 1))
    rows, raw, ratios = [], [], {}
    for d in DIMS:
        log(f"serverload: d = {d:,}, {clients} client(s)")
        m = measure(d, clients, window_s, repeats)
        raw.append(m)
        paths = (("raw", "raw pyzmq echo"), ("zmq", "psrv, ZeroMQ path"), ("shm", "psrv, shared memory, polled"),
                 ("bell", "psrv, shared memory, server asleep (bells)"))
        med = {k: {f: median([r[f] for r in m[k]]) for f in m[k][0]} for k, _ in paths}
        for k, label in paths:
            cost = med[k]["server_cpu_per_push_s"]
            rows.append([f"{d:,}", label, f"{med[k]['pushes_per_s']:,.0f}",
                         spread([r["pushes_per_s"] for r in m[k]]), f"{cost * 1e6:,.1f}", f"{1 / cost:,.0f}",
                         f"{100 * med[k]['server_busy']:.0f}",
                         "1.00" if k == "raw" else f"{cost / med['raw']['server_cpu_per_push_s']:.2f}"])
            if k != "raw":
                ratios[f"server_cost_d{d}_{k}_vs_raw"] = cost / med["raw"]["server_cpu_per_push_s"]
                ratios[f"server_capacity_d{d}_{k}_pushes_per_s"] = 1 / cost
    return {
        "name": "serverload", "title": "Pushes one server process sustains, and its CPU per push",
        "method": __doc__,
        "columns": ["d", "server", "pushes/s", "spread (min-max)", "server CPU per push µs",
                    "capacity: pushes per server-core-second", "server busy %", "CPU per push / raw echo's"],
        "rows": rows, "ratios": ratios, "targets": [], "raw": raw,
        "notes": [f"{clients} client process(es), each with one push in flight; {repeats} round(s) of a "
                  f"{window_s} s window, medians. The server is pinned to core {server_core(clients)}; the clients "
                  f"share the other usable cores ({len(proc.usable_cores())} in all)."],
    }
