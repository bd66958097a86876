"""The single-process baseline: the same mini-batch SGD as psrv, vectorized numpy, one BLAS thread, one core.

Run as `python -m benchmarks.baseline ARGS` (the benchmarks start it in a fresh process, so the BLAS thread count is
set before numpy loads). Each step takes `per_step` rows, the gradient of their mean loss, and one SGD update, in
preallocated buffers, as psrv's workers and server do. The rows are gathered with np.take(..., out=, mode="clip"):
with numpy's default mode="raise", take with out= goes through a temporary buffer (about twice as slow here, and
slower than fancy indexing); the indices are always in range, so "clip" changes nothing else. Prints one JSON
object: samples/s and the loss trajectory.

With --together DIR:K --window-s W, K copies started at once measure over one common window: they wait until all K
are ready, agree on a start time T0 (the first to see all K writes it, atomically), warm up until T0, then count
the samples each does from its first step boundary at or after T0 to its first at or after T0 + W, and keep
stepping until then, so that every copy's rate is measured while all K run (rates measured over each copy's own
`steps` would let the last copies run alone at the end, and their sum would overstate what K cores give).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--X", required=True)
    p.add_argument("--y", required=True)
    p.add_argument("--model", choices=("linear", "logistic"), required=True)
    p.add_argument("--per-step", type=int, required=True, help="rows per step (workers x batch_size)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--core", type=int, default=-1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--together", default="", help="DIR:K: start training only when K copies are ready in DIR "
                                                    "(so that copies run at the same time, not one after another)")
    p.add_argument("--window-s", type=float, default=0.0, help="with --together: measure over this common window "
                                                                "(seconds) instead of --steps")
    p.add_argument("--warmup-s", type=float, default=0.3, help="with --window-s: warm-up before the window")
    a = p.parse_args(argv)
    if a.core >= 0:
        os.sched_setaffinity(0, {a.core})
    import numpy as np

    from psrv import models
    X = np.load(a.X, mmap_mode="r")
    y = np.load(a.y, mmap_mode="r").astype(X.dtype)
    # standardized once, as psrv's launcher does (statistics in float64, data kept in its dtype)
    mean = X.mean(axis=0, dtype=np.float64)
    scale = X.std(axis=0, dtype=np.float64)
    scale[scale == 0] = 1.0
    Xs = ((X - mean) / scale).astype(X.dtype)
    n, d = Xs.shape
    model = models.make(a.model, d, True, Xs.dtype)
    theta = model.init_theta()
    grad = np.empty_like(theta)
    step_buf = np.empty_like(theta)
    Xb = np.empty((a.per_step, d), Xs.dtype)
    yb = np.empty(a.per_step, Xs.dtype)
    rng = np.random.default_rng(a.seed)
    order, pos = rng.permutation(n), 0
    lines, win_loss, win_rows = [], 0.0, 0

    def one_step():
        nonlocal order, pos, theta
        if pos + a.per_step > n:
            order, pos = rng.permutation(n), 0
        idx = order[pos:pos + a.per_step]
        pos += a.per_step
        np.take(Xs, idx, axis=0, out=Xb, mode="clip")
        np.take(y, idx, out=yb, mode="clip")
        loss = model.loss_grad(theta, Xb, yb, grad)
        theta -= np.multiply(grad, a.lr, out=step_buf)
        return loss

    if a.together and a.window_s > 0:
        folder, k = a.together.rsplit(":", 1)
        start = _common_start(folder, int(k), a.warmup_s)
        return _windowed(one_step, start, start + a.window_s, a.per_step)
    if a.together:
        _wait_for_the_others(*a.together.rsplit(":", 1))
    t0 = time.perf_counter()
    for step in range(a.steps):
        loss = one_step()
        win_loss += loss * a.per_step
        win_rows += a.per_step
        if (step + 1) % a.log_every == 0:
            lines.append({"step": step + 1, "loss": win_loss / win_rows, "elapsed_s": time.perf_counter() - t0})
            win_loss, win_rows = 0.0, 0
    wall = time.perf_counter() - t0
    print(json.dumps({"wall_s": wall, "samples_per_s": a.steps * a.per_step / wall, "lines": lines,
                      "final_loss": float(model.loss(theta, Xs, y))}))
    return 0


def _windowed(one_step, t0_shared: float, t1_shared: float, per_step: int) -> int:
    """Step until T0 (warm-up), then count steps until the first boundary at or after T1; print the rate."""
    mono = time.monotonic
    while True:
        one_step()
        if mono() >= t0_shared:
            break
    start, k = mono(), 0
    while True:
        one_step()
        k += 1
        now = mono()
        if now >= t1_shared:
            break
    print(json.dumps({"wall_s": now - start, "samples_per_s": k * per_step / (now - start), "lines": [],
                      "final_loss": None, "window": [start, now]}))
    return 0


def _common_start(folder: str, k: int, warmup_s: float) -> float:
    """Wait until k copies are ready in `folder`; return the start time they all use (time.monotonic() is one
    clock for every process on the machine): the first copy to see all k ready publishes now + warmup_s."""
    _wait_for_the_others(folder, str(k))
    mine = os.path.join(folder, f"start-{os.getpid()}")
    with open(mine, "w") as fh:
        fh.write(repr(time.monotonic() + warmup_s))
    try:
        os.link(mine, os.path.join(folder, "start"))  # atomic: exactly one copy's time wins
    except FileExistsError:
        pass
    with open(os.path.join(folder, "start")) as fh:
        return float(fh.read())


def _wait_for_the_others(folder: str, k: str, timeout_s: float = 300.0) -> None:
    open(os.path.join(folder, f"ready-{os.getpid()}"), "w").close()
    deadline = time.monotonic() + timeout_s
    while len([f for f in os.listdir(folder) if f.startswith("ready-")]) < int(k):
        if time.monotonic() > deadline:
            raise TimeoutError("the other baseline copies never got ready")
        time.sleep(0.001)


if __name__ == "__main__":
    sys.exit(main())
