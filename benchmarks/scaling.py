"""Benchmark: data-parallel scaling (issue 10). Does psrv with N workers train faster than the plain numpy loop it
replaces, and how close does it come to what N cores can give?

Two jobs, linear least squares in float64, one BLAS thread in every process: compute-bound (n = 100,000 rows,
d = 1000, batch 2000) and small model (n = 200,000, d = 100, batch 256). The data: X with independent standard
normal columns, y = X w + noise (w and the noise standard normal), written once to .npy files that psrv and the
plain loop both read; no intercept (psrv: model.fit_intercept = false, data.standardize = false), so both do the
same arithmetic on the same rows.

- **Plain loop**: `i = rng.integers(0, n, b); Xb = X[i]; g = 2/b * (Xb.T @ (Xb @ th - y[i])); th -= lr * g` in
  its own process, pinned to one core, X in its private memory; the gather is `np.take(..., out=buf,
  mode="clip")` or fancy indexing, whichever its start-up measurement found faster (both are in the notes). It
  takes `batch` rows per step and reports samples/s over its own window after a warm-up (benchmarks/plain.py).
- **Ceiling for N**: N copies of that loop started together behind a barrier, each pinned to its own core (cores
  0..N-1, where psrv's workers go), sharing X's pages read-only; the ceiling is the sum of their rates, each
  counted between the same two timestamps (the common window), as a ratio to one loop alone.
- **psrv** with N workers (pinned to cores 0..N-1, the server on core N), N = 1, 2, 4, 8, ... and cores - 1, under
  BSP, SSP (staleness 2), ASP, and every further mode this psrv's config offers (another train.consistency
  choice; local SGD with train.local_steps = H when that key exists, "localH": H = 8 on the compute-bound job, 32
  on the small model, where a step is short and communication costs more of it; group steps with
  train.group_steps = K when that key exists, "groupK": BSP whose workers average each of K steps' gradients
  among themselves in shared memory, one push per K steps, psrv/group.py; K = 8 on the compute-bound job, 64 on
  the small model: K changes only how often the server is asked, not what is computed). samples/s is psrv's own summary
  figure (rows whose gradient was applied per second of training); the time split per push is the summary's
  time_per_push_ms as psrv measures it. Each run is stopped by train.max_wall_s (the window below).
- **Time to a target loss**: seconds from the start of training (theta = 0) until the logged training loss (the
  mean mini-batch loss over train.log_every steps, computed the same way in both; for localH, whose steps hold H
  batches, train.log_every / H steps, at least 1; groupK's steps are BSP's, logged at the first group step past
  each train.log_every) first reaches the target: the
  least-squares optimum's loss (np.linalg.lstsq on the same rows) x 1.05. The plain loop's figure comes from its
  own runs (copy 0 alone, restarted from theta = 0 at the window's start), psrv's from metrics.jsonl, for N up to
  4. Constant lr. psrv's BSP applies the mean of the N gradients of a step (psrv/store.py), so one BSP step is
  the plain loop's step on N x batch rows, and SSP/ASP weight each gradient 1/N: as a user scaling out would, BSP,
  SSP and ASP run at N x lr (the linear scaling rule for N times the rows per step; Goyal et al., 2017), capped
  at LR_CAP_FACTOR x the plain lr (group steps too: each of their steps is a BSP step); local SGD runs at the
  plain lr (each worker's local steps are plain SGD steps). The "steps" shown are psrv's steps (BSP: synchronized
  steps, groupK's too; SSP/ASP: gradients applied / N; localH: rounds of H batches per worker).
- **Batch order**: psrv's default reads each batch as random rows of its shard (a gather), as the plain loop does.
  The "+blocks" modes use data.batch_order = "blocks" (rows shuffled once at load; a batch is a random block of
  consecutive rows, read in place). So that a gain from the order is never shown as a gain from parallelism, the
  plain loop and its N-copy ceiling are also measured in block order (benchmarks/plain.py), and each "+blocks"
  mode is reported against both: the usual columns (row-order loop) and "x same-order loop / its ceiling"; its
  time to target is compared with the block-order loop's.

PSRV_SCALING_MODES (comma-separated mode names) keeps only those modes: benchmarks/device.sh uses it to fit a short
lease of a 16-core machine.

Every measurement is repeated (3 times in full, once with --quick) in rounds: each round measures, for every N, the
ceiling and then each psrv mode; figures are medians over the rounds and ratios are ratios of medians. The window
(seconds of training per run) is chosen at start so that the whole benchmark fits its time budget (under 10
minutes in full): it is stated in the notes. The CPU that other processes took on the usable cores during each
measurement (/proc/stat minus our own processes' time) is shown per row: figures from rows where it is high are
not to be trusted.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time

import numpy as np

from psrv import config, proc

from .common import CpuMeter, log, median, time_to_target, train
from .plain import PlainLoops

BASE_MODES = ("bsp", "ssp", "asp")
TTT_MAX_N = 4            # time to target: for N up to this
TARGET_FACTOR = 1.05     # target loss = least-squares optimum x this
LR_CAP_FACTOR = 16       # BSP/SSP/ASP run at lr x min(N, this): stable on these standardized problems (lr < 1)
SAME_AT_ONE = ("ssp", "asp")   # with one worker these do what BSP does (no one to wait for): not run at N = 1
ONLY_AT_ONE = ("bsp-inplace",)  # BSP reading its rows in place in shared memory: what the private copy buys
BUDGET_S = {False: 500.0, True: 100.0}       # whole benchmark, full and --quick (10 and 2 minutes asked)
WINDOW_S = {False: (0.8, 2.5), True: (0.6, 1.5)}   # bounds of the training window per run
WARMUP_S = {False: 0.4, True: 0.3}           # the plain loop's warm-up before its window


@dataclasses.dataclass(frozen=True)
class Job:
    key: str
    title: str
    n: int
    quick_n: int
    d: int
    batch: int
    lr: float
    log_every: int
    local_steps: int      # H of the local SGD mode
    group_steps: int      # K of the group steps mode (it changes how often the server is asked, not the result)


JOBS = (Job("compute", "compute-bound", 100_000, 20_000, 1000, 2000, 0.02, 5, 8, 8),
        Job("small", "small model", 200_000, 50_000, 100, 256, 0.002, 20, 32, 64))


def worker_counts(cores: int, quick: bool = False) -> list[int]:
    """N = 1, 2, 4, 8, ... up to cores - 1 (a core is left for the server), and cores - 1 itself. On a 2-core
    machine, where that leaves only N = 1, N = 2 is added (the server then shares a core with a worker; issue 10
    sets a goal for it). --quick keeps the two smallest and the largest."""
    top = max(cores - 1, 1)
    ns = sorted({1 << k for k in range(top.bit_length()) if 1 << k <= top} | {top})
    if cores == 2:
        ns.append(2)
    if quick and len(ns) > 3:
        ns = ns[:2] + ns[-1:]
    return ns


def psrv_modes() -> list[tuple[str, list[str]]]:
    """(name, overrides) of each mode this psrv offers: BSP, SSP (staleness 2), ASP, any further train.consistency
    choice, and local SGD with 8 local steps when train.local_steps exists."""
    fields = {f.name: f for f in dataclasses.fields(config.Train)}
    choices = tuple(fields["consistency"].metadata.get("choices") or BASE_MODES)
    modes = [(m, [f"train.consistency={m}"] + (["train.staleness=2"] if m == "ssp" else []))
             for m in BASE_MODES if m in choices]
    modes += [(m, [f"train.consistency={m}"]) for m in choices if m not in BASE_MODES]
    if "train.local_steps" in config.keys():
        # H comes from the job (Job.local_steps) when the run starts
        modes.append(("localH", ["train.consistency=bsp", "train.local_steps={H}"]))
    if "train.group_steps" in config.keys():   # BSP, the workers averaging K steps among themselves per push
        modes.append(("groupK", ["train.consistency=bsp", "train.group_steps={K}"]))
    if "data.worker_copy" in config.keys():   # BSP without the workers' private copies of their rows (N = 1 only)
        modes.append(("bsp-inplace", ["train.consistency=bsp", "data.worker_copy=off"]))
    if "data.batch_order" in config.keys():  # the same modes reading batches as blocks of consecutive rows
        modes += [(f"{m}+blocks", o + ["data.batch_order=blocks"]) for m, o in list(modes)
                  if m in ("bsp", "asp", "localH", "groupK")]
    return modes


def chosen_modes(modes: list, names: str) -> list:
    """The modes named in `names` (comma-separated, the PSRV_SCALING_MODES environment variable: fewer modes, so
    that more rounds fit a short lease of a large machine, benchmarks/device.sh); all of them when it is empty."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {m for m, _ in modes})
    if unknown:
        raise ValueError(f"PSRV_SCALING_MODES: unknown mode(s) {unknown}; known: {[m for m, _ in modes]}")
    return [(m, o) for m, o in modes if not wanted or m in wanted]


def order_of(mode: str) -> str:
    """The batch order a mode reads in: the plain loop it is compared with reads in the same order."""
    return "blocks" if mode.endswith("+blocks") else "rows"


def orders(modes) -> list[str]:
    return sorted({order_of(m) for m, _ in modes}, key=("rows", "blocks").index)


def _dataset(tmp: str, job: Job, n: int) -> dict:
    """X and y as .npy files, and the least-squares optimum's mean squared error on them."""
    rng = np.random.default_rng([2024, job.d])
    X = rng.standard_normal((n, job.d))
    y = X @ rng.standard_normal(job.d) + rng.standard_normal(n)
    paths = {"X": os.path.join(tmp, f"{job.key}-X.npy"), "y": os.path.join(tmp, f"{job.key}-y.npy")}
    np.save(paths["X"], X)
    np.save(paths["y"], y)
    theta = np.linalg.lstsq(X, y, rcond=None)[0]
    r = X @ theta - y
    paths["optimum"] = float(r @ r / n)
    return paths


def _lr(job: Job, n_workers: int, overrides: list[str]) -> float:
    """The linear scaling rule for the modes that average (or weight 1/N) the N workers' gradients."""
    if any(o.startswith("train.local_steps=") for o in overrides):
        return job.lr
    return job.lr * min(n_workers, LR_CAP_FACTOR)


def _psrv(job: Job, paths: dict, n_workers: int, overrides: list[str], window_s: float, steps: int,
          seed: int, target: float) -> dict:
    overrides = [o.format(H=job.local_steps, K=job.group_steps) for o in overrides]
    # a metrics line per log_every batches of each worker, whatever a step holds (local SGD: H batches; group
    # steps count BSP's steps), so that the time to target is read at the same resolution in every mode
    per_step = max([int(o.split("=")[1]) for o in overrides if o.startswith("train.local_steps=")] or [1])
    log_every = max(1, round(job.log_every / per_step))
    meter = CpuMeter()
    t = time.monotonic()
    try:
        s, lines = train([f"data.source={paths['X']}", f"data.labels={paths['y']}", "data.dtype=float64",
                          "data.standardize=false", "model.kind=linear", "model.fit_intercept=false",
                          f"train.workers={n_workers}", f"train.batch_size={job.batch}", f"train.steps={steps}",
                          f"train.max_wall_s={window_s}", f"train.lr={_lr(job, n_workers, overrides)}",
                          "train.lr_schedule=constant",
                          f"train.log_every={log_every}", "train.pin=true", "train.blas_threads=1",
                          f"train.seed={seed}", *overrides])
    except Exception as e:  # a mode that fails here is reported in its row, the others still run
        log(f"scaling: psrv {overrides} with {n_workers} workers failed: {type(e).__name__}: {e}")
        return {"error": f"{type(e).__name__}: {e}", "total_s": time.monotonic() - t}
    hit = next((x for x in lines if "loss" in x and not x.get("full") and x["loss"] <= target), None)
    return {"samples_per_s": s["samples_per_s"], "wall_s": s["wall_s"], "steps": s["steps"],
            "stopped_by": s["stopped_by"], "split": s.get("time_per_push_ms") or {}, "final_loss": s["final_loss"],
            "ttt": time_to_target(lines, target), "ttt_step": hit["step"] if hit else None,
            "total_s": time.monotonic() - t, "cpu": meter.stop()}


def _plain(loops: PlainLoops, cores: list[int], warmup_s: float, window_s: float, log_every: int, seed: int,
           target: float, order: str = "rows") -> dict:
    meter = CpuMeter()
    r = loops.run(cores, warmup_s, window_s, log_every, seed, order)
    lines = [{"step": k, "loss": loss, "elapsed_s": el} for k, loss, el in r["copies"][0]["lines"]]
    hit = next((x for x in lines if x["loss"] <= target), None)
    return {"samples_per_s": r["samples_per_s"], "per_copy": [c["samples"] / c["seconds"] for c in r["copies"]],
            "ttt": hit["elapsed_s"] if hit else None, "ttt_step": hit["step"] if hit else None,
            "cpu": meter.stop(extra_own_s=r["cpu_s"])}


def modes_at(N: int, modes: list) -> list:
    return [(m, o) for m, o in modes if not (N == 1 and m.split("+")[0] in SAME_AT_ONE)
            and not (N > 1 and m in ONLY_AT_ONE)]


def _overhead(job: Job, paths: dict, ns: list[int], modes) -> dict:
    """The fixed cost of a psrv run of this job (start, data load, stop: its time beyond the training window),
    measured with short runs at the smallest and the largest N, interpolated in N. These runs also bring the data
    files into the page cache."""
    cost = {}
    for N in sorted({ns[0], ns[-1]}):
        r = _psrv(job, paths, N, modes[0][1], 0.2, 10**6, 0, 0.0)
        if "error" in r:
            raise RuntimeError(f"psrv does not run the {job.key} job with {N} workers: {r['error']}")
        cost[N] = r["total_s"] - r["wall_s"]
    lo, hi = ns[0], ns[-1]
    return {N: cost[lo] + (cost[hi] - cost[lo]) * (N - lo) / max(hi - lo, 1) for N in ns}


def _choose_window(quick: bool, spent_s: float, overheads: list[dict], ns: list[int], modes, repeats: int,
                   host_s: float, budget_s: float) -> tuple[float, float]:
    """The training window per run that makes the estimated total fit the budget (within WINDOW_S), and the
    estimated total. overheads: per job, the fixed cost of a psrv run for each N; host_s: starting one job's
    plain-loop host (loading X, choosing the gather)."""
    lo, hi = WINDOW_S[quick]
    per_round = sum(len(modes_at(N, modes)) * 1.15 * o[N] + WARMUP_S[quick] + 0.5 for o in overheads for N in ns)
    fixed = repeats * per_round + len(overheads) * host_s
    per_window = repeats * len(overheads) * sum(len(modes_at(N, modes)) + len(orders(modes)) for N in ns)
    window = min(max((budget_s - spent_s - fixed) / per_window, lo), hi)
    return window, spent_s + fixed + per_window * window


def run(quick: bool = False, budget_s: float | None = None) -> dict:
    t_start = time.monotonic()
    cores = proc.usable_cores()
    ns = worker_counts(len(cores), quick)
    modes = chosen_modes(psrv_modes(), os.environ.get("PSRV_SCALING_MODES", ""))
    repeats = 1 if quick else 3
    log(f"scaling: {len(cores)} usable cores, N = {ns}, modes {[m for m, _ in modes]}, {repeats} round(s)")
    with tempfile.TemporaryDirectory(prefix="psrv-scaling-") as tmp:
        data = {}
        for job in JOBS:
            n = job.quick_n if quick else job.n
            t = time.monotonic()
            data[job.key] = _dataset(tmp, job, n)
            data[job.key]["n"] = n
            log(f"scaling: {job.key} data ({n:,} x {job.d}) and its optimum in {time.monotonic() - t:.1f} s")
        overheads = [_overhead(job, data[job.key], ns, modes) for job in JOBS]
        host_s = 2.0 + sum(data[j.key]["n"] * j.d * 8 for j in JOBS) / len(JOBS) / 1e9   # load at ~1 GB/s
        budget_s = budget_s or BUDGET_S[quick]
        while True:  # fewer rounds (never fewer than 1) rather than a run over the budget
            window, estimate = _choose_window(quick, time.monotonic() - t_start, overheads, ns, modes, repeats,
                                              host_s, budget_s)
            if estimate <= budget_s + 30 or repeats == 1:
                break
            repeats -= 1
            log(f"scaling: {repeats + 1} rounds would take {estimate / 60:.1f} min; {repeats} round(s) instead")
        log(f"scaling: fixed cost of a psrv run {', '.join(f'{o[ns[0]]:.1f}-{o[ns[-1]]:.1f} s' for o in overheads)}"
            f"; training window {window:.2f} s per run; estimated total {estimate / 60:.1f} min")
        if estimate > budget_s + 30:
            log(f"scaling: WARNING: over the {budget_s / 60:.1f} min budget even with the shortest window")
        results = {job.key: _measure(job, data[job.key], cores, ns, modes, repeats, window, quick)
                   for job in JOBS}
    return _report(results, data, cores, ns, modes, repeats, window, quick, time.monotonic() - t_start)


def _measure(job: Job, paths: dict, cores: list[int], ns: list[int], modes, repeats: int, window: float,
             quick: bool) -> dict:
    target = paths["optimum"] * TARGET_FACTOR
    meter = CpuMeter()
    with PlainLoops(paths["X"], paths["y"], job.batch, job.lr, core=cores[0]) as loops:
        info = loops.info
        # a bound on psrv's steps in case max_wall_s did not stop it: 5 windows at the plain loop's step rate
        steps = max(100, math.ceil(5 * window / info["step_s"]))
        plain = {(N, o): [] for N in ns for o in orders(modes)}
        runs = {(N, m): [] for N in ns for m, _ in modes_at(N, modes)}
        for rnd in range(repeats):
            for N in ns:
                log(f"scaling: {job.key}, round {rnd + 1}/{repeats}, N = {N}")
                use = [cores[i % len(cores)] for i in range(N)]
                for o in orders(modes):
                    plain[N, o].append(_plain(loops, use, WARMUP_S[quick], window, job.log_every, rnd, target, o))
                for m, overrides in modes_at(N, modes):
                    runs[N, m].append(_psrv(job, paths, N, overrides, window, steps, rnd, target))
    return {"plain": plain, "runs": runs, "target": target, "info": info, "steps": steps, "cpu": meter.stop()}


# ---------------------------------------------------------------------------------------------- report
def _med(rs: list[dict], key: str):
    xs = [r[key] for r in rs if r.get(key) is not None]
    return median(xs) if xs else None


def _spread(rs: list[dict], key: str) -> str:
    xs = [r[key] for r in rs if r.get(key) is not None]
    if len(xs) < 2:
        return ""
    return f"{min(xs):,.0f}-{max(xs):,.0f}"


def _others(rs: list[dict]) -> str:
    xs = [r["cpu"]["others_frac"] for r in rs if r.get("cpu") and r["cpu"].get("others_frac") is not None]
    return f"{100 * median(xs):.0f}" if xs else "-"


def _ttt(rs: list[dict]) -> str:
    done = [r for r in rs if r.get("ttt") is not None]
    if not done:
        return "not reached"
    s = f"{median([r['ttt'] for r in done]):.3g} ({median([r['ttt_step'] for r in done]):.0f})"
    return s + ("" if len(done) == len(rs) else f" [{len(done)}/{len(rs)} reached]")


def _split(rs: list[dict]) -> str:
    ok = [r for r in rs if r.get("split")]
    if not ok:
        return ""
    mid = sorted(ok, key=lambda r: r["samples_per_s"])[len(ok) // 2]  # the median run's own split
    return ", ".join(f"{k} {v:.3g}" for k, v in mid["split"].items())


def _report(results: dict, data: dict, cores: list[int], ns: list[int], modes, repeats: int, window: float,
            quick: bool, took_s: float) -> dict:
    top = ns[-1]
    rows, ratios, targets, ttt_targets, plots, notes = [], {}, [], [], [], []
    mode_names = [m for m, _ in modes]
    for job in JOBS:
        res = results[job.key]
        ords = orders(modes)
        one = _med(res["plain"][1, "rows"], "samples_per_s")
        # time to target: against the plain loop in the mode's own batch order, so the order's gain is not
        # counted as parallelism's
        one_ttt_of = {o: _med(res["plain"][1, o], "ttt") for o in ords}
        one_same = {o: _med(res["plain"][1, o], "samples_per_s") for o in ords}
        series = {"ceiling (N plain loops)": [], "N x one plain loop": []}
        if "blocks" in ords:
            series["ceiling, block order"] = []
        series.update({f"psrv {m}": [] for m in mode_names})
        for N in ns:
            shared = " (server shares a core)" if N >= len(cores) else ""
            ceiling_of = {}
            for o in ords:
                ceiling_of[o] = c = _med(res["plain"][N, o], "samples_per_s")
                what = "plain loop" + (", block order" if o == "blocks" else "")
                label = f"{what}, alone" if N == 1 else f"ceiling: {N} copies of the {what} together"
                rows.append([job.title, N, label, f"{c:,.0f}", _spread(res["plain"][N, o], "samples_per_s"),
                             f"{c / one:.2f}", "1.00" if o == "rows" else f"{c / ceiling_of['rows']:.2f}",
                             "" if o == "rows" else f"{c / one_same[o]:.2f} / 1.00",
                             _ttt(res["plain"][N, o]) if N == 1 else "", "", "", _others(res["plain"][N, o])])
                if o == "blocks":
                    series["ceiling, block order"].append(c)
            ceiling = ceiling_of["rows"]
            series["ceiling (N plain loops)"].append(ceiling)
            series["N x one plain loop"].append(N * one)
            best_ttt = None
            for m in mode_names:
                rs = res["runs"].get((N, m))
                if rs is None:
                    series[f"psrv {m}"].append(None)
                    continue
                ok = [r for r in rs if "error" not in r]
                if not ok:
                    rows.append([job.title, N, f"psrv {m}{shared}", f"failed: {rs[0]['error'][:120]}", "", "", "",
                                 "", "", "", "", ""])
                    series[f"psrv {m}"].append(None)
                    continue
                sps = _med(ok, "samples_per_s")
                ttt = _med(ok, "ttt") if N <= TTT_MAX_N else None
                one_ttt = one_ttt_of[order_of(m)]
                speedup = f"{one_ttt / ttt:.2f}" if ttt and one_ttt else ""
                o = order_of(m)
                same = f"{sps / one_same[o]:.2f} / {sps / ceiling_of[o]:.2f}"
                rows.append([job.title, N, f"psrv {m}{shared}", f"{sps:,.0f}", _spread(ok, "samples_per_s"),
                             f"{sps / one:.2f}", f"{sps / ceiling:.2f}", same, _ttt(ok) if N <= TTT_MAX_N else "",
                             speedup, _split(ok), _others(ok)])
                series[f"psrv {m}"].append(sps)
                key = f"scaling_{job.key}_n{N}_{m}"
                ratios[f"{key}_vs_plain"] = sps / one
                ratios[f"{key}_vs_ceiling"] = sps / ceiling
                if o != "rows":  # against the plain loop in the same batch order, and its ceiling
                    ratios[f"{key}_vs_plain_same_order"] = sps / one_same[o]
                    ratios[f"{key}_vs_ceiling_same_order"] = sps / ceiling_of[o]
                if ttt and one_ttt:
                    ratios[f"{key}_ttt_speedup"] = one_ttt / ttt
                    if best_ttt is None or one_ttt / ttt > best_ttt[1]:
                        best_ttt = (m, one_ttt / ttt)
            if N == top:
                for m in mode_names:
                    for kind in ("vs_plain", "vs_ceiling", "vs_plain_same_order", "vs_ceiling_same_order"):
                        if f"scaling_{job.key}_n{N}_{m}_{kind}" in ratios:
                            ratios[f"scaling_{job.key}_top_{m}_{kind}"] = ratios[f"scaling_{job.key}_n{N}_{m}_{kind}"]
            if N <= TTT_MAX_N and best_ttt:
                ratios[f"scaling_{job.key}_n{N}_best_ttt_speedup"] = best_ttt[1]
                ttt_targets.append(_target(f"{job.title}, N = {N}: one plain loop's time to the target loss / psrv's "
                                       f"(best mode: {best_ttt[0]})", f"scaling_{job.key}_n{N}_best_ttt_speedup",
                                       0.7 * N, ratios))
        plots.append({"file": f"scaling_{job.key}.png",
                      "title": f"{job.title}: d = {job.d}, batch {job.batch}, {data[job.key]['n']:,} rows",
                      "x": ns, "xlabel": "workers / copies (N)", "ylabel": "samples/s", "series": series,
                      "styles": {"ceiling (N plain loops)": "ko--", "N x one plain loop": "k:",
                                 "ceiling, block order": "kx-."}, "xticks": True})
    # BSP's goals, for a push per step ("bsp") and for group steps ("groupK": the same arithmetic, the workers
    # synchronizing K steps per push among themselves)
    bsps = [(m, "BSP" if m == "bsp" else f"BSP with group steps, {m}") for m in ("bsp", "groupK") if m in mode_names]
    for job in JOBS:
        for m, name in bsps:
            targets.append(_target(f"{job.title}: one worker ({name}) / the plain loop, samples/s",
                                   f"scaling_{job.key}_n1_{m}_vs_plain", 0.9, ratios))
            if f"{m}+blocks" in mode_names:
                targets.append(_target(f"{job.title}: one worker ({name}, block order) / the plain loop in block "
                                       f"order", f"scaling_{job.key}_n1_{m}+blocks_vs_plain_same_order", 0.9, ratios))
    if 2 in ns:
        for m, name in bsps:
            targets.append(_target(f"compute-bound, N = 2: {name} / one plain loop",
                                   f"scaling_compute_n2_{m}_vs_plain", 1.7, ratios))
            targets.append(_target(f"compute-bound, N = 2: {name} / the ceiling (2 plain loops together)",
                                   f"scaling_compute_n2_{m}_vs_ceiling", 0.9, ratios))
    if top > 2:
        for m, name in bsps:
            targets.append(_target(f"compute-bound, N = {top}: {name} / the ceiling",
                                   f"scaling_compute_top_{m}_vs_ceiling", 0.8, ratios))
        targets.append(_target(f"compute-bound, N = {top}: ASP / the ceiling", "scaling_compute_top_asp_vs_ceiling",
                               0.9, ratios))
        for m, name in bsps:
            targets.append(_target(f"small model, N = {top}: {name} / one plain loop",
                                   f"scaling_small_top_{m}_vs_plain", 2.0, ratios))
        saving = [m for m in mode_names if m not in BASE_MODES]
        if saving:
            best = max(saving, key=lambda m: ratios.get(f"scaling_small_top_{m}_vs_ceiling", -1))
            ratios["scaling_small_top_saving_vs_ceiling"] = ratios.get(f"scaling_small_top_{best}_vs_ceiling")
            targets.append(_target(f"small model, N = {top}: a communication-saving mode ({best}) / the ceiling",
                                   "scaling_small_top_saving_vs_ceiling", 0.5, ratios))
    targets += ttt_targets
    notes += _notes(results, data, cores, ns, modes, repeats, window, quick, took_s)
    return {
        "name": "scaling", "title": "Data-parallel scaling: psrv with N workers against the plain loop and N cores",
        "method": __doc__,
        "columns": ["job", "N", "run", "samples/s", "spread (min-max)", "x one plain loop", "x ceiling (N loops)",
                    "x same-order loop / its ceiling", "time to target s (step)", "speed-up to target (goal >= 0.7 N)", "time per push ms",
                    "others' CPU %"],
        "rows": rows, "ratios": ratios, "targets": targets, "notes": notes, "plots": plots,
        "raw": {"worker_counts": ns, "modes": mode_names, "window_s": window, "repeats": repeats,
                "cores": cores, "jobs": {job.key: _raw(results[job.key], data[job.key]) for job in JOBS}},
    }


def _target(what: str, key: str, goal: float, ratios: dict) -> dict:
    val = ratios.get(key)
    ratios.setdefault(key, None)
    return {"what": what, "key": key, "target": f">= {goal:.3g}", "met": val is not None and val >= goal}


def _raw(res: dict, paths: dict) -> dict:
    def strip(r):
        return {k: v for k, v in r.items() if k != "lines"}
    return {"optimum_loss": paths["optimum"], "target_loss": res["target"], "steps_cap": res["steps"],
            "plain_host": res["info"], "cpu": res["cpu"],
            "plain": {f"{N}/{o}": [strip(r) for r in rs] for (N, o), rs in res["plain"].items()},
            "psrv": {f"{N}/{m}": [strip(r) for r in rs] for (N, m), rs in res["runs"].items()}}


def _notes(results, data, cores, ns, modes, repeats, window, quick, took_s) -> list[str]:
    notes = []
    for job in JOBS:
        res, paths = results[job.key], data[job.key]
        info = res["info"]
        cal = ", ".join(f"{k} {1000 * v:.3g} ms" for k, v in info["calibration_step_s"].items())
        cpu = res["cpu"]
        others = "" if cpu.get("others_s") is None else (
            f" Other processes took {cpu['others_s']:.0f} CPU-seconds of the {len(cores)} usable cores during this "
            f"job ({100 * cpu['others_frac']:.0f} % of their time over {cpu['wall_s']:.0f} s).")
        notes.append(
            f"**{job.title}**: {paths['n']:,} rows x {job.d} float64 columns, batch {job.batch} per worker and per "
            f"plain step, lr {job.lr} (constant; psrv BSP/SSP/ASP at N x lr, local SGD at lr; SGD at this lr settles "
            f"about d x lr / batch = "
            f"{100 * job.d * job.lr / job.batch:.2g} % above the optimum on this data, well inside the target's 5 %), "
            f"train.log_every = {job.log_every}. "
            f"Least-squares optimum loss {paths['optimum']:.5g}, target {res['target']:.5g} (x {TARGET_FACTOR}). "
            f"Plain loop's gather: {info['method']} (measured step time: {cal}); "
            f"one plain step {1000 * info['step_s']:.3g} ms.{others}")
    noisy = [r for job in JOBS for rs in [*results[job.key]["plain"].values(), *results[job.key]["runs"].values()]
             for r in rs if (r.get("cpu") or {}).get("others_frac") is not None and r["cpu"]["others_frac"] > 0.1]
    if noisy:
        notes.append(f"**{len(noisy)} measurement(s) ran while other processes took more than 10 % of the usable "
                     f"cores** (the last column; the machine was shared): their figures may be far off, and ratios "
                     f"built on them too.")
    shared = [N for N in ns if N >= len(cores)]
    notes.append(
        f"N = {', '.join(map(str, ns))} on {len(cores)} usable cores"
        + (f"; with N = {', '.join(map(str, shared))} the server shares a core with a worker" if shared else "")
        + f". Modes: {', '.join(m for m, _ in modes)} ({' and '.join(SAME_AT_ONE)} not at N = 1, where they do "
        f"what BSP does; {' and '.join(ONLY_AT_ONE)} only at N = 1: BSP with data.worker_copy = off, every worker "
        f"reading its rows in place in shared memory, which the default's private copies are measured "
        f"against). {repeats} round(s), medians; training window "
        f"{window:.2f} s per run (psrv: train.max_wall_s; plain: the common window after a "
        f"{WARMUP_S[quick]} s warm-up). The whole benchmark took {took_s / 60:.1f} min. Time to target: seconds "
        f"(psrv's step at that line, or the plain loop's step); 'not reached' when the window ended first; the "
        f"speed-up is one plain loop's time over psrv's (goal: at least 0.7 N).")
    return notes
