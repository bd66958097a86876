"""Benchmark 2: training throughput and time to a target loss, linear and logistic regression, psrv with N workers
under BSP, SSP (staleness 2) and ASP, against the single-process baseline (benchmarks/baseline.py: the same
mini-batch SGD on `batch` rows per step, as one psrv worker takes, vectorized numpy, one BLAS thread, one core), all
in the same run. Every N is compared with that one baseline: a baseline of N x batch rows per step would run slower
per row (a bigger gather) and flatter the ratio.

The configuration is compute-bound on purpose (d = 1000 float32 columns, large batches): each step moves megabytes
through memory and the round trip is a small part of it. Samples/s counts rows whose gradient was applied per
second of training. Time to target: seconds until the logged training loss (the mean mini-batch loss over 10
steps, the same in psrv and the baseline) first reaches the target: the least-squares optimum plus 20 % for linear
regression (constant-lr SGD settles about d x lr / rows-per-step above it); for logistic, the lowest loss the
one-worker baseline logged, plus 5 %. The time split (psrv) is per applied push: computing
the gradient, waiting at the server (barrier or staleness bound), and the rest of the round trip. N above the number
of cores is oversubscribed: the processes then share cores. "N independent single processes at once" runs N
unrelated baselines of `batch` rows per step side by side, one per core, with no communication, each counting its
samples over the same window (they wait for each other, warm up, and count between two shared timestamps, so no
copy runs alone at the end): the speedup the cores themselves allow today (memory bandwidth, caches, and neighbours
on a shared host), a ceiling for psrv.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

from psrv import config, data, proc

from .common import log, median, time_to_target, train

MODES = ("bsp", "ssp", "asp")


def _dataset(tmp: str, n: int, d: int) -> dict:
    """X (float32) and y for linear regression, and 0/1 labels (y above its median) for logistic, as .npy files."""
    X, y, _, _ = data.load_arrays(config.load({"data": {"n": n, "d": d, "noise": 1.0, "seed": 7}}).data)
    paths = {"X": os.path.join(tmp, "X.npy"), "linear": os.path.join(tmp, "y.npy"),
             "logistic": os.path.join(tmp, "labels.npy")}
    np.save(paths["X"], X.astype(np.float32))
    np.save(paths["linear"], y)
    np.save(paths["logistic"], (y > np.median(y)).astype(np.float64))
    A = np.c_[X, np.ones(n)]
    theta = np.linalg.lstsq(A, y, rcond=None)[0]
    paths["linear_optimum"] = float(np.mean((A @ theta - y) ** 2))
    return paths


def _baseline(paths: dict, model: str, per_step: int, steps: int, lr: float, copies: int = 1,
              window_s: float = 0.0) -> dict:
    """The single-process baseline; with copies > 1, that many independent ones at once, one per core, each rate
    counted over the same window of window_s seconds: what the cores give together with no communication at all
    (the ceiling of any data-parallel speedup on this machine)."""
    env = {**os.environ, **{k: "1" for k in proc.BLAS_ENV}}
    cores = proc.usable_cores()
    together = tempfile.mkdtemp()
    procs = [subprocess.Popen([sys.executable, "-m", "benchmarks.baseline", "--X", paths["X"], "--y", paths[model],
                               "--model", model, "--per-step", str(per_step), "--steps", str(steps), "--lr", str(lr),
                               "--core", str(cores[i % len(cores)]), "--seed", str(i),
                               "--together", f"{together}:{copies}",
                               *(["--window-s", str(window_s)] if copies > 1 else [])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
             for i in range(copies)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode:
            raise RuntimeError(f"baseline failed: {err.strip().splitlines()[-1] if err.strip() else p.returncode}")
        outs.append(json.loads(out))
    shutil.rmtree(together, ignore_errors=True)
    if copies == 1:
        return outs[0]
    return {"samples_per_s": sum(o["samples_per_s"] for o in outs), "lines": [], "final_loss": None}


def _psrv(paths: dict, model: str, workers: int, mode: str, batch: int, steps: int, lr: float) -> tuple[dict, list]:
    return train([f"data.source={paths['X']}", f"data.labels={paths[model]}", "data.dtype=float32",
                  f"model.kind={model}", f"train.workers={workers}", f"train.consistency={mode}", "train.staleness=2",
                  f"train.batch_size={batch}", f"train.steps={steps}", f"train.lr={lr}",
                  "train.lr_schedule=constant", "train.log_every=10"])


def run(quick: bool = False) -> dict:
    cores = len(proc.usable_cores())
    n, d, batch, steps = (40_000, 1000, 2048, 60) if quick else (100_000, 1000, 4096, 200)
    worker_counts = (1, 2) if quick else (1, 2, 3)
    modes = ("bsp", "asp") if quick else MODES
    repeats = 1 if quick else 3
    lrs = {"linear": 0.1, "logistic": 0.5}
    rows, ratios, series, splits = [], {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = _dataset(tmp, n, d)
        for model in ("linear", "logistic"):
            lr = lrs[model]
            # one baseline of `batch` rows per step, the denominator of every N's ratio
            base = [_baseline(paths, model, batch, steps, lr) for _ in range(repeats)]
            target = paths["linear_optimum"] * 1.2 if model == "linear" else \
                median([min(x["loss"] for x in b["lines"]) for b in base]) * 1.05
            b_sps = median([b["samples_per_s"] for b in base])
            window_s = max(median([b["wall_s"] for b in base]), 0.5)
            for N in worker_counts:
                if N == 1:
                    b_ttt = [time_to_target(b["lines"], target) for b in base]
                    rows.append([model, N, "single process", f"{b_sps:,.0f}", "1.00", _fmt(b_ttt), "", "", ""])
                if 1 < N <= cores:
                    ceiling = median([_baseline(paths, model, batch, steps, lr, copies=N,
                                                window_s=window_s)["samples_per_s"] for _ in range(repeats)])
                    rows.append([model, N, f"{N} independent single processes at once (no communication)",
                                 f"{ceiling:,.0f}", f"{ceiling / b_sps:.2f}", "", "", "", ""])
                    if model == "linear" and N == 2:
                        ratios["independent2_vs_single_process"] = ceiling / b_sps
                for mode in modes:
                    log(f"training: {model}, {N} workers, {mode}")
                    runs = [_psrv(paths, model, N, mode, batch, steps, lr) for _ in range(repeats)]
                    sps = median([s["samples_per_s"] for s, _ in runs])
                    split = runs[len(runs) // 2][0]["time_per_push_ms"]
                    over = " (oversubscribed)" if N > cores else ""
                    rows.append([model, N, f"psrv {mode}{over}", f"{sps:,.0f}", f"{sps / b_sps:.2f}",
                                 _fmt([time_to_target(lines, target) for _, lines in runs]),
                                 f"{split.get('compute', 0):.2f}", f"{split.get('wait', 0):.2f}",
                                 f"{split.get('communication', 0):.2f}"])
                    series.setdefault(f"{model} psrv {mode}", []).append(sps)
                    splits[model, N, mode] = split
                    if model == "linear" and N == 2 and mode == "bsp":
                        ratios["bsp2_vs_single_process"] = sps / b_sps
                series.setdefault(f"{model} single process", []).append(b_sps)  # the same one for every N
    notes = [f"Data: {n:,} rows x {d} float32 columns (synthetic, noise 1); {steps} steps of {batch} rows per "
             f"worker; lr {lrs['linear']} (linear), {lrs['logistic']} (logistic), constant; "
             f"{repeats} repeat(s), medians. Target loss: linear, the least-squares optimum x 1.2 "
             f"({paths['linear_optimum'] * 1.2:.4g}); logistic, the lowest loss the one-worker baseline logged x 1.05."]
    if ratios.get("bsp2_vs_single_process", 0) < 1.7:
        notes.append(_why_bsp2(ratios, splits, modes))
    return {
        "name": "training", "title": "Training throughput and time to target loss", "method": __doc__,
        "columns": ["model", "N", "system", "samples/s", "vs single process", "time to target (s)",
                    "compute ms/push", "wait ms/push", "communication ms/push"],
        "rows": rows,
        "ratios": ratios,
        "targets": [{"what": "BSP with 2 workers, samples/s / single-process baseline (linear, d = 1000, "
                             f"batch {batch} per worker)", "key": "bsp2_vs_single_process", "target": ">= 1.7",
                     "met": ratios.get("bsp2_vs_single_process", 0) >= 1.7}],
        "notes": notes,
        "plot": {"x": list(worker_counts), "xlabel": "workers (N)", "ylabel": "samples/s", "series": series},
    }


def _why_bsp2(ratios: dict, splits: dict, modes) -> str:
    """The measured reasons when BSP with two workers misses 1.7x: from the per-push time split of this run."""
    one, two = splits.get(("linear", 1, "bsp"), {}), splits.get(("linear", 2, "bsp"), {})
    asp = splits.get(("linear", 2, "asp"), {})
    if not all(k in x for x in (one, two) for k in ("compute", "wait", "communication")):
        return ""
    ceiling = ratios.get("independent2_vs_single_process")
    text = (f"**Why BSP with 2 workers misses 1.7x here** (linear, from this run's per-push time split): one "
            f"worker computes a push in {one['compute']:.2f} ms; with two workers in BSP each takes "
            f"{two['compute']:.2f} ms to compute and then waits {two['wait']:.2f} ms at the barrier for the slower "
            f"one, and {two['communication']:.2f} ms on the rest of the round trip. ")
    if asp.get("compute") is not None and asp["compute"] < 0.85 * two["compute"]:
        text += (f"Under ASP, where the two workers drift out of step, a push takes {asp['compute']:.2f} ms to "
                 f"compute: the gradient work (a gather of random rows, memory bound) slows down when both "
                 f"workers do it at the same moments, as BSP's lockstep makes them. ")
    if ceiling:
        text += (f"Two independent single-process baselines, which also drift apart, reach {ceiling:.2f}x together "
                 f"(over a common window), so the cores can deliver the speed-up. ")
    text += ("(The split is psrv's summary time_per_push_ms: 'wait' is the part of a worker's idle wait for theta "
             "during which the server held its pull, 'communication' the rest of that idle wait; work done while "
             "waiting, such as gathering the next batch, is in 'compute'.)")
    return text


def _fmt(times: list) -> str:
    done = [t for t in times if t is not None]
    if not done:
        return "not reached"
    return f"{median(done):.2f}" + ("" if len(done) == len(times) else f" ({len(done)}/{len(times)} reached)")
