"""Benchmark 3: one slow worker. Two workers (one per core) train linear regression; worker 1 sleeps `slow_ms`
extra on every step (workers/faults.py, slow_worker). Time to a target loss and samples/s under BSP, SSP (staleness 3), ASP,
BSP with one backup worker (each step applied with the first gradient to arrive), and ASP with dynamic scheduling
(batches to whoever asks), against the same BSP run without the straggler. Medians over repeats.

Time to target: seconds of training until the logged training loss (the mean mini-batch loss over 10 steps) first
reaches the least-squares optimum plus 2 %.
"""
from __future__ import annotations

from psrv import config
from workers import faults

from .common import log, lstsq_loss, median, time_to_target, train

VARIANTS = [  # label, overrides
    ("BSP, no straggler", ["train.consistency=bsp"], False),
    ("BSP", ["train.consistency=bsp"], True),
    ("SSP (s = 3)", ["train.consistency=ssp", "train.staleness=3"], True),
    ("ASP", ["train.consistency=asp"], True),
    ("BSP + 1 backup worker", ["train.consistency=bsp", "train.backup_workers=1"], True),
    ("ASP + dynamic schedule", ["train.consistency=asp", "train.schedule=dynamic"], True),
]


def run(quick: bool = False) -> dict:
    n, d, batch, steps, slow_ms = (50_000, 100, 256, 1500, 2.0) if quick else (200_000, 100, 256, 4000, 2.0)
    repeats = 1 if quick else 3
    data = [f"data.n={n}", f"data.d={d}", "data.noise=1.0", "data.seed=3"]
    target = lstsq_loss(config.load(None, data).data) * 1.02
    rows, ttts = [], {}
    for label, over, slow in VARIANTS:
        log(f"stragglers: {label}")
        # the straggler runs the fault-injecting worker entry; the others the plain one
        straggle = [faults.OVERRIDE] if slow else []
        with faults.injected(slow_worker=1, slow_ms=slow_ms):
            runs = [train(data + over + straggle + ["train.workers=2", f"train.batch_size={batch}",
                                                     f"train.steps={steps}", "train.lr=0.01",
                                                     "train.lr_schedule=constant", "train.log_every=10"])
                    for _ in range(repeats)]
        times = [time_to_target(lines, target) for _, lines in runs]
        reached = [t for t in times if t is not None]
        ttt = median(reached) if reached else None
        ttts[label] = ttt
        s = runs[len(runs) // 2][0]
        pushes = s.get("pushes_applied", {})
        rows.append([label, "yes" if slow else "no",
                     f"{ttt:.2f}" if ttt is not None else "not reached",
                     f"{median([r['samples_per_s'] for r, _ in runs]):,.0f}",
                     f"{pushes.get('0', 0)} / {pushes.get('1', 0)}",
                     s["staleness_max"], sum(s["dropped_grads"].values())])
    base = ttts.get("BSP")
    notes = [f"Data: {n:,} rows x {d} columns, batch {batch} per worker, lr 0.01 constant, up to {steps} steps; "
             f"worker 1 sleeps {slow_ms} ms per step; {repeats} repeat(s). Target loss {target:.4g}."]
    if base:
        best = min((t, k) for k, t in ttts.items() if t is not None and k != "BSP, no straggler")
        notes.append(f"With the straggler, BSP reaches the target in {base:.2f} s; the fastest variant is "
                     f"{best[1]} ({best[0]:.2f} s, {base / best[0]:.1f}x faster).")
    return {
        "name": "stragglers", "title": "One slow worker: BSP, SSP, ASP, backup workers, dynamic scheduling",
        "method": __doc__,
        "columns": ["variant", "straggler", "time to target (s)", "samples/s", "gradients applied (worker 0 / 1)",
                    "max staleness", "late gradients dropped"],
        "rows": rows, "ratios": {}, "notes": notes,
    }
