"""The plain numpy SGD loop a user would write, and N independent copies of it run together (the machine's ceiling
for N-way data parallelism). Used by benchmarks/scaling.py.

Linear least squares, no intercept, the loop of issue 10:

    i = rng.integers(0, n, b); Xb = X[i]; g = 2/b * (Xb.T @ (Xb @ th - y[i])); th -= lr * g

with the row gather done whichever way is faster on this machine and data, measured at start-up: fancy indexing
(`X[i]`), or `np.take(X, i, axis=0, out=buf, mode="clip")` into a preallocated buffer (with the default
mode="raise", numpy's take with out= goes through a temporary buffer, which is slower). In block order (psrv's
data.batch_order = "blocks", for comparison) the loop reads a random whole block of b consecutive rows instead,
in place: `s = b * rng.integers(0, n // b); Xb = X[s:s + b]` (X's rows are already in random order here, as psrv
shuffles them once at load). The loop also sums r @ r
(the mini-batch loss, O(b) next to the O(b d) gather) so that its time to a target loss can be read, as psrv's
workers compute their loss too.

`PlainLoops` starts one host process (`python -m benchmarks.plain`, one BLAS thread, numpy loaded after the thread
count is set) that loads X and y once, privately, as a user's script would. Each measurement forks K copies of the
loop from it (they share X's pages copy-on-write and only read them, as psrv's workers share one data block), each
pinned to its own core; they wait at a barrier, warm up, and then count the samples they do between two shared
timestamps T0 and T1 (a copy's window runs from its first step boundary at or after T0 to its first one at or after
T1, so all windows agree to within one step). Every copy restarts from theta = 0 at T0, so copy 0's loss lines
(elapsed from T0) give the loop's time to a target loss.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------------------------- the loop (host side)
def _gather_steps(X, y, batch: int, lr: float, method: str, rng, th, bufs):
    """One step function for `method` ("take": np.take(mode="clip") into buffers; "fancy": X[i]; "blocks": a
    random block of consecutive rows, in place). Returns the step's sum of squared residuals."""
    import numpy as np
    n = len(X)
    Xb, yb = bufs
    scale = 2.0 / batch
    if method == "blocks":
        blocks = n // batch

        def step():
            s = batch * int(rng.integers(0, blocks))
            xb = X[s:s + batch]
            r = xb @ th - y[s:s + batch]
            th.__isub__(lr * (scale * (xb.T @ r)))
            return r @ r
    elif method == "take":
        def step():
            i = rng.integers(0, n, batch)
            np.take(X, i, axis=0, out=Xb, mode="clip")
            np.take(y, i, out=yb, mode="clip")
            r = Xb @ th - yb
            th.__isub__(lr * (scale * (Xb.T @ r)))
            return r @ r
    else:
        def step():
            i = rng.integers(0, n, batch)
            xb = X[i]
            r = xb @ th - y[i]
            th.__isub__(lr * (scale * (xb.T @ r)))
            return r @ r
    return step


def _copy(X, y, batch, lr, method, seed, core, ready, go, times, log_every, conn):
    """One copy of the loop, in a forked child: pin, wait for the others, warm up until T0, then train from
    theta = 0 until T1, counting its own samples and logging the loss."""
    import numpy as np
    try:
        os.sched_setaffinity(0, {core})
    except (AttributeError, OSError):
        pass
    d = X.shape[1]
    rng = np.random.default_rng([seed, core])
    th = np.zeros(d, X.dtype)
    step = _gather_steps(X, y, batch, lr, method, rng, th, (np.empty((batch, d), X.dtype), np.empty(batch, X.dtype)))
    ready.wait()
    go.wait()
    t0_shared, t1_shared = times[0], times[1]
    mono = time.monotonic
    warm = 0
    while True:  # warm-up: caches, buffers, the allocator; at least one step
        step()
        warm += 1
        if mono() >= t0_shared:
            break
    th[:] = 0.0
    lines, acc, k = [], 0.0, 0
    t0 = mono()
    while True:
        acc += step()
        k += 1
        now = mono()
        if k % log_every == 0:
            lines.append([k, acc / (log_every * batch), now - t0])
            acc = 0.0
        if now >= t1_shared:
            break
    conn.send({"core": core, "steps": k, "samples": k * batch, "seconds": now - t0, "start": t0, "end": now,
               "warmup_steps": warm, "lines": lines})
    conn.close()


def _calibrate(X, y, batch: int, lr: float, core: int, budget_s: float) -> dict:
    """Median step time of each gather method, alternating, pinned to `core`: the loop then uses the faster."""
    import numpy as np
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {core})
    try:
        d = X.shape[1]
        rng = np.random.default_rng(12345)
        th = np.zeros(d, X.dtype)
        bufs = (np.empty((batch, d), X.dtype), np.empty(batch, X.dtype))
        steps = {m: _gather_steps(X, y, batch, lr, m, rng, th, bufs) for m in ("take", "fancy")}
        times = {m: [] for m in steps}
        for _ in range(2):  # warm-up of both
            for s in steps.values():
                s()
        end = time.monotonic() + budget_s
        while time.monotonic() < end or min(len(t) for t in times.values()) < 5:
            for m, s in steps.items():
                t = time.perf_counter()
                for _ in range(4):
                    s()
                times[m].append((time.perf_counter() - t) / 4)
        med = {m: float(np.median(t)) for m, t in times.items()}
    finally:
        os.sched_setaffinity(0, old)
    return {"method": min(med, key=med.get), "step_s": med}


def host(argv=None) -> int:
    """The host process: load the data, calibrate, then run the commands read from stdin (one JSON per line)."""
    p = argparse.ArgumentParser()
    p.add_argument("--X", required=True)
    p.add_argument("--y", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--core", type=int, default=0, help="where the gather calibration runs")
    p.add_argument("--method", choices=("auto", "take", "fancy"), default="auto")
    p.add_argument("--calibrate-s", type=float, default=0.4)
    a = p.parse_args(argv)
    import multiprocessing as mp

    import numpy as np
    t = time.monotonic()
    X = np.load(a.X)            # private copies in memory, as a user's script would hold them
    y = np.load(a.y)
    load_s = time.monotonic() - t
    cal = _calibrate(X, y, a.batch, a.lr, a.core, a.calibrate_s)
    method = cal["method"] if a.method == "auto" else a.method
    out = sys.stdout
    out.write(json.dumps({"ready": True, "load_s": load_s, "method": method, "calibration_step_s": cal["step_s"],
                          "step_s": cal["step_s"][method]}) + "\n")
    out.flush()
    fork = mp.get_context("fork")
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        cores, warmup_s, window_s = cmd["cores"], float(cmd["warmup_s"]), float(cmd["window_s"])
        how = "blocks" if cmd.get("order") == "blocks" else method
        cpu0 = os.times()
        ready = fork.Barrier(len(cores) + 1)
        go = fork.Event()
        times = fork.RawArray("d", 2)
        pipes, procs = [], []
        for j, core in enumerate(cores):
            r, w = fork.Pipe(duplex=False)
            pr = fork.Process(target=_copy, args=(X, y, a.batch, a.lr, how, int(cmd.get("seed", 0)) * 1000 + j,
                                                  core, ready, go, times, int(cmd.get("log_every", 10)), w),
                              daemon=True)
            pr.start()
            w.close()
            pipes.append(r)
            procs.append(pr)
        ready.wait(timeout=120)
        times[0] = time.monotonic() + warmup_s
        times[1] = times[0] + window_s
        go.set()
        copies = []
        for r, pr in zip(pipes, procs):
            if not r.poll(warmup_s + 10 * window_s + 120):
                raise TimeoutError(f"a copy of the loop (pid {pr.pid}) sent nothing")
            copies.append(r.recv())
        for pr in procs:
            pr.join(30)
        cpu1 = os.times()
        cpu_s = sum(getattr(cpu1, f) - getattr(cpu0, f) for f in ("user", "system", "children_user",
                                                                  "children_system"))
        res = {"t0": times[0], "t1": times[1], "copies": copies, "cpu_s": cpu_s,
               "samples_per_s": sum(c["samples"] / c["seconds"] for c in copies)}
        out.write(json.dumps(res) + "\n")
        out.flush()
    return 0


# ---------------------------------------------------------------------------------------------- the benchmark's side
class PlainLoops:
    """The host process, started with one BLAS thread; `run(cores, ...)` measures len(cores) copies together."""

    def __init__(self, X_path: str, y_path: str, batch: int, lr: float, core: int = 0, method: str = "auto"):
        from psrv import proc
        env = {**os.environ, **{k: "1" for k in proc.BLAS_ENV}}
        self.p = subprocess.Popen([sys.executable, "-m", "benchmarks.plain", "--X", X_path, "--y", y_path,
                                   "--batch", str(batch), "--lr", repr(lr), "--core", str(core),
                                   "--method", method],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                  cwd=os.path.dirname(HERE))
        self.info = self._read()

    def _read(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            rc = self.p.wait(30)
            raise RuntimeError(f"the plain-loop host exited ({rc}) without an answer; see its stderr above")
        return json.loads(line)

    def run(self, cores: list[int], warmup_s: float, window_s: float, log_every: int = 10, seed: int = 0,
            order: str = "rows") -> dict:
        """{"samples_per_s": the sum of the copies' rates over the common window, "copies": each copy's steps,
        samples, seconds and (copy 0's) loss lines, "cpu_s": CPU the host and the copies used}. order: "rows"
        (random rows, the calibrated gather) or "blocks" (a random block of consecutive rows)."""
        self.p.stdin.write(json.dumps({"cores": list(cores), "warmup_s": warmup_s, "window_s": window_s,
                                       "log_every": log_every, "seed": seed, "order": order}) + "\n")
        self.p.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.write(json.dumps({"quit": True}) + "\n")
                self.p.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


if __name__ == "__main__":
    sys.exit(host())
