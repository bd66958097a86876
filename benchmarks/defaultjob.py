"""Benchmark: the default job (`python launch.py` with no argument: synthetic linear regression, 200,000 rows x 50
columns, batch 512, one worker per usable core, BSP) as it comes, and with train.group_steps = K, against the
plain numpy loop and its N-copy ceiling, in the same run.

- **psrv, as it comes**: the built-in defaults, a push per step (train.steps = 4000), checkpoints included.
- **psrv, group steps**: the same with train.group_steps = K, K what the first run's summary hints at
  (summary.json's group_steps_hint, psrv/report.py; 16 if it names none), nothing else changed: its 4000 steps
  are BSP's, each at its own rate of the schedule, so the final loss is the same (it is shown beside each, with
  the rows read per worker).
- **psrv, momentum**: the same two runs with train.optimizer = "momentum" (the server's heavy-ball momentum, 0.9),
  a push per step and then with group steps of the same K, where each worker applies momentum's rule from the
  server's state. The plain loop stays plain SGD: momentum adds one vector update per step to it (d = 51), nothing
  next to the loop's gather and products.
- **Plain loop** and **ceiling**: benchmarks/plain.py's loop on the same rows (X and y as psrv generates them),
  batch 512, one process pinned to a core; the ceiling is N copies together, N the default job's worker count.

samples/s is psrv's own summary figure (rows whose gradient was applied per second of training) and the loops'
rate over their common window; medians over the repeats. What it shows: whether the job a user runs first pays for
its processes, and what the hint buys.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

import psrv
from psrv import config, data, proc

from .common import CpuMeter, log, median, spread
from .plain import PlainLoops

STEPS = 4000            # the default train.steps (checked at start against psrv's defaults)
K_NO_HINT = 16          # group steps' K when the default run's summary names none
REPEATS = {False: 5, True: 1}
WINDOW_S = {False: 2.0, True: 1.0}


def _psrv(extra: list[str]) -> dict:
    """One run of the default job (its checkpoints included, unlike common.train's runs), quiet."""
    meter = CpuMeter()
    with tempfile.TemporaryDirectory() as out:
        s = psrv.train(None, extra + [f"output.dir={out}", "output.plot=false"]).summary
    return {"samples_per_s": s["samples_per_s"], "wall_s": s["wall_s"], "final_loss": s["final_loss"],
            "steps": s["steps"], "rows_per_worker": s["samples"] / s["workers"],
            "split": s.get("time_per_push_ms") or {}, "hint_k": s.get("group_steps_hint") or 0,
            "rows": s["rows"], "cpu": meter.stop()}


def run(quick: bool = False) -> dict:
    cfg = config.load(None)
    if cfg.train.steps != STEPS:
        raise RuntimeError(f"train.steps defaults to {cfg.train.steps}, this benchmark expects {STEPS}")
    cores = proc.usable_cores()
    n = cfg.train.workers or len(cores)
    X, y, _, _ = data.load_arrays(cfg.data)
    runs: dict[str, list[dict]] = {"plain": [], "ceiling": [], "default": [], "group": [], "momentum": [],
                                   "momentum_group": []}
    k = 0
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"X": os.path.join(tmp, "X.npy"), "y": os.path.join(tmp, "y.npy")}
        np.save(paths["X"], np.ascontiguousarray(X, np.float64))
        np.save(paths["y"], np.ascontiguousarray(y, np.float64))
        del X, y
        with PlainLoops(paths["X"], paths["y"], cfg.train.batch_size, cfg.train.lr, core=cores[0]) as loops:
            for r in range(REPEATS[quick]):
                log(f"defaultjob: round {r + 1} of {REPEATS[quick]}")
                runs["plain"].append(loops.run([cores[0]], 0.3, WINDOW_S[quick], seed=r))
                runs["ceiling"].append(loops.run(cores[:n], 0.3, WINDOW_S[quick], seed=r))
                runs["default"].append(_psrv([]))
                k = k or runs["default"][0]["hint_k"] or K_NO_HINT   # the first run's hint, for every round
                runs["group"].append(_psrv([f"train.group_steps={k}"]))
                runs["momentum"].append(_psrv(["train.optimizer=momentum"]))
                runs["momentum_group"].append(_psrv(["train.optimizer=momentum", f"train.group_steps={k}"]))
    plain = median([x["samples_per_s"] for x in runs["plain"]])
    ceiling = median([x["samples_per_s"] for x in runs["ceiling"]])
    labels = {"plain": "plain loop, alone", "ceiling": f"ceiling: {n} copies of the plain loop together",
              "default": f"psrv as it comes ({n} workers, BSP, a push per step, {STEPS} steps)",
              "group": f"psrv, train.group_steps = {k} (the same {STEPS} steps, a push per {k})",
              "momentum": "psrv, train.optimizer = momentum, a push per step",
              "momentum_group": f"psrv, momentum and train.group_steps = {k}"}
    rows, raw = [], {}
    for key, rs in runs.items():
        rates = [x["samples_per_s"] for x in rs]
        rate = median(rates)
        psrv_run = key not in ("plain", "ceiling")
        split = rs[len(rs) // 2]["split"] if psrv_run else {}
        rows.append([labels[key], f"{rate:,.0f}", spread(rates), f"{rate / plain:.2f}",
                     f"{rate / ceiling:.2f}" if key != "plain" else "",
                     f"{median([x['final_loss'] for x in rs]):.6g}" if psrv_run else "",
                     f"{median([x['wall_s'] for x in rs]):.2f}" if psrv_run else "",
                     f"{median([x['rows_per_worker'] for x in rs]):,.0f}" if psrv_run else "",
                     ", ".join(f"{k} {v:.3g}" for k, v in split.items())])
        raw[key] = {"samples_per_s": rates}
    ratios = {"defaultjob_vs_plain": median(raw["default"]["samples_per_s"]) / plain,
              "defaultjob_group_vs_plain": median(raw["group"]["samples_per_s"]) / plain,
              "defaultjob_momentum_group_vs_momentum": median(raw["momentum_group"]["samples_per_s"])
              / median(raw["momentum"]["samples_per_s"])}
    hinted = runs["default"][0]["hint_k"]
    notes = [f"The first run's summary hinted at train.group_steps = {hinted}." if hinted else
             f"The first run's summary named no train.group_steps; K = {K_NO_HINT}.",
             f"{REPEATS[quick]} round(s), medians; the loops' window {WINDOW_S[quick]} s after a 0.3 s warm-up; "
             f"{n} workers on {len(cores)} usable cores (the server shares a core when they are as many)."]
    return {
        "name": "defaultjob", "title": "The default job: as it comes, with group steps, and the plain loop",
        "method": __doc__,
        "columns": ["run", "samples/s", "spread (min-max)", "x one plain loop", "x ceiling", "final loss",
                    "training s", "rows read per worker", "time per push ms"],
        "rows": rows, "raw": raw, "ratios": ratios, "targets": [], "notes": notes,
    }
