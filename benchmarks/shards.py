"""Benchmark: the sparse job's throughput against the number of server processes, server.shards = S = 1, 2, 4
(docs/sparse.md, "Several servers"): rows/s, pushes/s and keys/s of sparse logistic regression with FTRL on the
Criteo-like generator's rows, 2 workers, under ASP and BSP.

Each case is a whole launcher run (python launch.py's psrv.train) of a fixed number of steps; the figures are the
run's own (summary.json: samples over the wall time of training, gradients applied over it), medians over repeats.
keys/s is pushes/s times the mean number of distinct keys in a batch (its columns and the bias), counted on
batches of the same rows. S servers need S + 2 processes (2 workers): on a machine with fewer cores than that, the
range servers share cores with the workers and S > 1 cannot be faster; a worker's step then also pays for the
extra messages (one rget and one rpush per range server and step). The notes give the core count.

    python -m benchmarks --only shards [--quick]
"""
from __future__ import annotations

import os

import numpy as np

from .common import log, median, spread, train

SHARDS = (1, 2, 4)
SIZES = {False: {"n": 400_000, "log2_buckets": 20, "batch": 1000, "steps": 300, "repeats": 3},
         True: {"n": 40_000, "log2_buckets": 16, "batch": 500, "steps": 60, "repeats": 2}}


def keys_per_batch(size: dict, batches: int = 20) -> float:
    """The mean distinct keys (columns, plus the bias) of a batch of `size['batch']` rows of the generator's data."""
    from psrv.criteo import Criteo
    gen = Criteo(0, size["log2_buckets"])
    b = size["batch"]
    counts = [len(np.unique(gen.rows(i * b, (i + 1) * b, size["n"]).indices)) + 1 for i in range(batches)]
    return float(np.mean(counts))


def measure(shards: int, consistency: str, size: dict) -> dict:
    summary, _ = train(["data.source=criteo", f"data.n={size['n']}", f"data.log2_buckets={size['log2_buckets']}",
                        "data.test_fraction=0", "model.kind=sparse_logistic", "train.optimizer=ftrl", "train.lr=0.1",
                        "train.l1=1.0", "train.workers=2", f"train.batch_size={size['batch']}",
                        f"train.steps={size['steps']}", f"train.consistency={consistency}",
                        "train.lr_schedule=constant", "output.live_view=false", f"server.shards={shards}"])
    wall = summary["wall_s"]
    return {"rows_per_s": summary["samples"] / wall, "pushes_per_s": summary["gradients_applied"] / wall,
            "wall_s": wall, "steps": summary["steps"]}


def run(quick: bool = False) -> dict:
    size = SIZES[quick]
    keys = keys_per_batch(size)
    rows, raw, ratios = [], [], {}
    for consistency in ("asp", "bsp"):
        base = None
        for shards in SHARDS:
            ms = [measure(shards, consistency, size) for _ in range(size["repeats"])]
            raw.append({"shards": shards, "consistency": consistency, "runs": ms})
            rps, pps = [m["rows_per_s"] for m in ms], [m["pushes_per_s"] for m in ms]
            base = base or median(rps)
            log(f"shards: {consistency}, S = {shards}: {median(rps):,.0f} rows/s, {median(pps):,.1f} pushes/s")
            rows.append([consistency, shards, f"{median(rps):,.0f}", spread(rps), f"{median(pps):,.1f}",
                         f"{median(pps) * keys:,.0f}", f"{median(rps) / base:.2f}"])
            ratios[f"shards_{consistency}_s{shards}_rows_per_s"] = median(rps)
    cores = len(os.sched_getaffinity(0))
    return {
        "name": "shards", "title": "The sparse job's throughput against server.shards (S = 1, 2, 4)",
        "method": __doc__,
        "columns": ["consistency", "S", "rows/s", "spread (min-max)", "pushes/s", "keys/s", "rows/s over S = 1"],
        "rows": rows, "ratios": ratios, "targets": [], "raw": raw,
        "notes": [f"{size['n']:,} rows, 2^{size['log2_buckets']} buckets, batches of {size['batch']} rows "
                  f"({keys:,.0f} distinct keys each on average), {size['steps']} steps, 2 workers, FTRL; "
                  f"{size['repeats']} runs per case, medians. {cores} usable cores for the S + 2 processes"
                  + (": fewer than S = 2 or 4 need, so those cases share cores and cannot scale here."
                     if cores < 2 + max(SHARDS) else ".")],
    }
