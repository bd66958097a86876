"""Benchmark 5: psrv against PyTorch DistributedDataParallel (gloo backend, CPU) on the same job, in the same run.

The job: synthetic linear regression (psrv's generator, 200,000 rows x 100 columns, float32), columns standardized
as psrv does it (column mean and population standard deviation of the training rows), 2 workers = 2 DDP ranks, each
training on its own contiguous half of the rows (psrv's "range" partition), 256 rows per worker per step drawn from a
fresh random permutation of its half every epoch, plain SGD at a constant learning rate of 0.01, the mean squared
loss, a linear model with an intercept initialized to zero. DDP averages the two ranks' gradients before each step,
which is psrv's BSP update (theta -= lr * mean of the workers' gradients).

- torch: each rank is a spawned process (not pinned: see below), with torch.set_num_threads(1) and OMP/MKL/OpenBLAS
  at 1 thread; the batch gathered with index_select; nn.Linear(d, 1) in DistributedDataParallel, torch.optim.SGD,
  F.mse_loss, init_process_group("gloo") over loopback TCP. Samples/s is timed over the training loop
  only (from a barrier after start-up to the last step).
- psrv: `psrv.train` with data.partition=range, train.workers=2, train.consistency=bsp and the same batch, lr,
  constant schedule, dtype and steps. Samples/s is the run's own figure (training only, start-up excluded).

Time to target: seconds of training until the logged training loss (the mean mini-batch loss over the last 10 steps,
averaged over both workers, each batch at the parameters it was computed at) first reaches the target, the
least-squares optimum's mean squared error times 1.02. Both systems run the same number of steps; the repeats
alternate which system goes first; figures are medians over the repeats.

This tiny model (d = 100, 256 rows per step) measures mostly fixed per-step costs, so the comparison is also run on
benchmarks/scaling.py's two jobs (its JOBS and its data files, scaling._dataset: float64, no intercept, no
standardization; compute-bound n = 100,000, d = 1000, batch 2000, and small model n = 200,000, d = 100, batch 256;
--quick: scaling's quick_n rows). DDP (2 ranks, nn.Linear without bias in float64) against psrv with 2 workers under
BSP and with train.group_steps = K (scaling's groupK, K = the job's group_steps: BSP whose workers average K steps'
gradients among themselves in shared memory, one push per K steps), run through scaling._psrv exactly as
`python -m benchmarks --only scaling` runs them (pinned, one BLAS thread, the range partition). All three use the
same batch per worker and the same constant lr, scaling's BSP lr at N = 2 (the job's lr x 2: DDP and BSP both apply
the mean of the two workers' gradients), and read the same number of batches per worker (psrv's group steps count
BSP's steps, as DDP's). Samples/s as above; the ratios are psrv / DDP of the medians.

Fairness, rechecked (2026-11-30): same job (the same rows, split the same way, the same per-epoch shuffled batches
of the same size per worker, the same update, lr and initial parameters); same threads (one BLAS/OpenMP/torch
intra-op thread per process; psrv's server takes a third process on the 2 cores, DDP has none, which is psrv's
design and stays in the figures; psrv pins each process to a core, its default; DDP's ranks are left to the OS,
because pinned to one core each they ran 10-20 % slower here: gloo's communication thread then shares its rank's
core); same timed region (the
training loop only: DDP from a barrier after loading its rows and joining the group, psrv from the moment all
workers joined, both to the last step). One unfairness was found and fixed: DDP gathered its batch as X[idx]
(advanced indexing), which took 3.7 ms for 2000 rows x 1000 float64 against 1.4 ms for X.index_select(0, idx),
while psrv's workers gather with the faster of np.take and fancy indexing; DDP now uses index_select (on the
compute-bound job this doubled DDP's samples/s). What the original job lacked besides was a job where the per-step
arithmetic is not negligible, hence the scaling jobs. Measured here besides: one DDP rank alone takes 4.2 ms per
step on the compute-bound job, two take about 8-10 ms per step each, so on this machine DDP's gradient all-reduce
(gloo, loopback TCP) costs about as much as the step's arithmetic. Run it on a quiet machine.
"""
from __future__ import annotations

import os
import queue
import socket
import tempfile
import time

import numpy as np

from psrv import config, data, proc

from . import scaling
from .common import log, lstsq_loss, median, spread, time_to_target, train

N, D, BATCH, LR = 200_000, 100, 256, 0.01
WORKERS = 2
PIN_RANKS = False   # measured: DDP ranks pinned to one core each ran 10-20 % slower (see the docstring)
LOG_EVERY = 10
TARGET_REL = 0.02                 # target = least-squares MSE * (1 + TARGET_REL)
STEPS, QUICK_STEPS = 3_000, 1_000
RANK_TIMEOUT_S = 300.0
TORCH_PIN = "torch==2.13.0"
SCALING_MODES = ("bsp", "groupK")   # psrv's modes run against DDP on scaling's jobs: BSP and its fastest form
# batches per worker on scaling's jobs, full and --quick
SCALING_STEPS = {"compute": (400, 200), "small": (1536, 512)}
SCALING_REPEATS = {False: 3, True: 1}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, core: int | None, paths: dict, steps: int, batch: int,
              lr: float, bias: bool, seed: int, log_every: int, results) -> None:
    """One DDP rank: train on its contiguous block of rows of paths["X"], paths["y"] (.npy, in their own dtype),
    report (history, timing, final loss) on `results`."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    try:
        X_all = np.load(paths["X"], mmap_mode="r")
        y_all = np.load(paths["y"], mmap_mode="r")
        # psrv's range partition: the first n % world blocks get one row more (as np.array_split)
        lo, hi = [(int(a[0]), int(a[-1]) + 1) for a in np.array_split(np.arange(len(X_all)), world)][rank]
        X = torch.from_numpy(np.array(X_all[lo:hi]))
        y = torch.from_numpy(np.array(y_all[lo:hi])).unsqueeze(1)
        n_local = len(X)

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        lin = torch.nn.Linear(X.shape[1], 1, bias=bias, dtype=X.dtype)  # the data's dtype, as psrv computes in
        with torch.no_grad():
            for p in lin.parameters():
                p.zero_()
        model = DDP(lin)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed * 1000 + rank)

        perm, pos, samples, acc, acc_n = None, n_local, 0, 0.0, 0
        history = []
        dist.barrier()
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            if pos >= n_local:  # a batch never spans two epochs, as in psrv
                perm, pos = torch.randperm(n_local, generator=gen), 0
            idx = perm[pos:pos + batch]
            pos += len(idx)
            # index_select: torch's fastest gather of rows (X[idx] took 2.6x as long for 2000 x 1000 float64 here),
            # as psrv's workers gather with the faster of np.take and fancy indexing
            loss = F.mse_loss(model(X.index_select(0, idx)), y.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP all-reduces (averages) the gradients here
            opt.step()
            samples += len(idx)
            acc += loss.item()
            acc_n += 1
            if step % log_every == 0 or step == steps:
                history.append((step, time.perf_counter() - t0, acc / acc_n))
                acc, acc_n = 0.0, 0
        elapsed_s = time.perf_counter() - t0

        with torch.no_grad():
            err = (lin(X) - y).double()
            totals = torch.tensor([float((err * err).sum()), float(n_local), float(samples)], dtype=torch.float64)
        dist.all_reduce(totals)
        results.put({"rank": rank, "elapsed_s": elapsed_s, "history": history,
                     "final_loss": float(totals[0] / totals[1]), "samples": int(totals[2])})
        dist.destroy_process_group()
    except BaseException as e:
        results.put({"rank": rank, "error": f"{type(e).__name__}: {e}"})
        raise


def run_ddp(paths: dict, steps: int, batch: int = BATCH, lr: float = LR, bias: bool = True, seed: int = 0,
            log_every: int = LOG_EVERY) -> dict:
    """One DDP run with WORKERS ranks, `batch` rows per rank per step; returns samples/s, the loss history (mean
    over ranks) and the final loss."""
    cores = proc.usable_cores()
    port = _free_port()
    results = proc.SPAWN.Queue()
    procs = []
    env = {"GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    saved = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)
        with proc.blas_threads(1), proc.main_hidden():
            for rank in range(WORKERS):
                core = cores[rank % len(cores)] if PIN_RANKS else None
                p = proc.SPAWN.Process(target=_ddp_rank, daemon=True,
                                       args=(rank, WORKERS, port, core, paths, steps, batch,
                                             lr, bias, seed, log_every, results))
                p.start()
                procs.append(p)
        got: dict[int, dict] = {}
        deadline = time.monotonic() + RANK_TIMEOUT_S
        while len(got) < WORKERS:
            try:
                r = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"torch DDP rank exited with code {dead[0]} before reporting")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"torch DDP ranks did not finish within {RANK_TIMEOUT_S:g} s")
                continue
            if "error" in r:
                raise RuntimeError(f"torch DDP rank {r['rank']}: {r['error']}")
            got[r["rank"]] = r
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        for p in procs:
            p.join(15)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
    r0 = got[0]
    lines = [{"step": s, "elapsed_s": t, "loss": float(np.mean([got[k]["history"][i][2] for k in got]))}
             for i, (s, t, _) in enumerate(r0["history"])]
    elapsed_s = max(g["elapsed_s"] for g in got.values())
    return {"samples_per_s": r0["samples"] / elapsed_s, "wall_s": elapsed_s, "lines": lines,
            "final_loss": r0["final_loss"], "steps": steps}


def run_psrv(steps: int, seed: int = 0) -> dict:
    summary, lines = train([f"data.n={N}", f"data.d={D}", "data.dtype=float32", "data.partition=range",
                            f"data.seed={seed}", f"train.workers={WORKERS}", "train.consistency=bsp",
                            f"train.batch_size={BATCH}", f"train.lr={LR}", "train.lr_schedule=constant",
                            f"train.steps={steps}", f"train.log_every={LOG_EVERY}", f"train.seed={seed}"])
    return {"samples_per_s": summary["samples_per_s"], "wall_s": summary["wall_s"], "lines": lines,
            "final_loss": summary["final_loss"], "steps": summary["steps"]}


def run_scaling_job(job: scaling.Job, paths: dict, steps: int, repeats: int) -> dict:
    """DDP and psrv (BSP, and group steps where this psrv has them) with WORKERS workers on one of scaling's jobs:
    `steps` batches of job.batch rows per worker in every system. {system: [run, ...]}"""
    lr = scaling._lr(job, WORKERS, [])   # job.lr x N, as scaling runs BSP; DDP makes the same averaged step
    target = paths["optimum"] * scaling.TARGET_FACTOR
    modes = [(m, o) for m, o in scaling.psrv_modes() if m in SCALING_MODES]
    systems = ["torch", *[m for m, _ in modes]]
    runs: dict[str, list[dict]] = {x: [] for x in systems}
    for r in range(repeats):
        for system in systems[r % len(systems):] + systems[:r % len(systems)]:   # who goes first rotates
            log(f"peers: {job.key} job, {system}, repeat {r + 1} of {repeats}, {steps} batches per worker")
            if system == "torch":
                x = run_ddp(paths, steps, job.batch, lr, bias=False, seed=r, log_every=job.log_every)
                x["ttt"], x["ttt_step"] = time_to_target(x["lines"], target), steps_to_target(x["lines"], target)
            else:
                # group steps count BSP's steps: as many batches per worker as DDP's
                x = scaling._psrv(job, paths, WORKERS, dict(modes)[system], RANK_TIMEOUT_S, steps, r, target)
                if "error" in x:
                    raise RuntimeError(f"psrv {system} on the {job.key} job: {x['error']}")
            runs[system].append(x)
    return runs


def _skipped() -> dict:
    return {"name": "peers", "title": "psrv against PyTorch DDP (gloo, CPU)", "method": __doc__, "rows": [],
            "ratios": {"samples_per_s_vs_torch_ddp": None},
            "targets": [_target(None)],
            "notes": [f"Skipped: PyTorch is not installed (pip install {TORCH_PIN} — a CPU wheel is on this "
                      "machine)"]}


def _target(ratio: float | None) -> dict:
    return {"what": "psrv is at least as fast as PyTorch DDP/gloo on the same job, in samples/s",
            "key": "samples_per_s_vs_torch_ddp", "target": ">= 1", "met": None if ratio is None else ratio >= 1}


def _row(job: str, label: str, rs: list[dict]) -> list:
    sps = [x["samples_per_s"] for x in rs]
    ttt, stt = [x["ttt"] for x in rs], [x["ttt_step"] for x in rs]
    t_med, t_spread = _fmt_s(ttt)
    st_med = "-" if None in stt else f"{median(stt):.0f}"
    return [job, label, f"{rs[0]['steps']:,}", f"{median(sps):,.0f}", spread(sps), t_med, t_spread, st_med,
            f"{median([x['wall_s'] for x in rs]):.2f}", f"{median([x['final_loss'] for x in rs]):.5f}"]


def _stats(rs: list[dict]) -> dict:
    return {"samples_per_s": [x["samples_per_s"] for x in rs], "time_to_target_s": [x["ttt"] for x in rs],
            "steps_to_target": [x["ttt_step"] for x in rs], "wall_s": [x["wall_s"] for x in rs],
            "final_loss": [x["final_loss"] for x in rs]}


def steps_to_target(lines: list[dict], target: float) -> int | None:
    """The step of the first logged training loss at or below `target` (None if none is)."""
    return next((x["step"] for x in lines if "loss" in x and not x.get("full") and x["loss"] <= target), None)


def _fmt_s(xs: list) -> tuple[str, str]:
    got = [x for x in xs if x is not None]
    if not got:
        return "not reached", "-"
    med = f"{median(got):.3f}" + ("" if len(got) == len(xs) else f" ({len(got)} of {len(xs)} runs)")
    return med, spread(got)


def run(quick: bool = False) -> dict:
    try:
        import torch
    except ImportError:
        return _skipped()
    steps = QUICK_STEPS if quick else STEPS
    repeats = 3 if quick else 5
    dcfg = config.load({"data": {"n": N, "d": D}}).data
    best = lstsq_loss(dcfg)
    target = best * (1 + TARGET_REL)
    runs: dict[str, list[dict]] = {"psrv": [], "torch": []}
    with tempfile.TemporaryDirectory(prefix="psrv_bench_peers_") as tmp:
        X, y, _, _ = data.load_arrays(dcfg)
        mean, scale = X.mean(axis=0), X.std(axis=0)  # float64 statistics over all (training) rows, ddof 0
        paths = {"X": os.path.join(tmp, "X.npy"), "y": os.path.join(tmp, "y.npy")}
        np.save(paths["X"], ((X - mean) / scale).astype(np.float32))
        np.save(paths["y"], y.astype(np.float32))
        del X, y
        for r in range(repeats):
            order = ("psrv", "torch") if r % 2 == 0 else ("torch", "psrv")
            for system in order:
                log(f"peers: {system}, repeat {r + 1} of {repeats}, {steps} steps")
                runs[system].append(run_psrv(steps) if system == "psrv" else run_ddp(paths, steps))
        scaled: dict[str, dict] = {}
        for job in scaling.JOBS:
            jpaths = scaling._dataset(tmp, job, job.quick_n if quick else job.n)
            scaled[job.key] = {"job": job, "runs": run_scaling_job(job, jpaths, SCALING_STEPS[job.key][quick],
                                                                   SCALING_REPEATS[quick])}
            for f in ("X", "y"):
                os.remove(jpaths[f])
    ddp_label = f"PyTorch {torch.__version__} DDP, gloo (2 ranks)"
    rows, stats = [], {}
    for system, label in (("psrv", "psrv (BSP, 2 workers + server)"), ("torch", ddp_label)):
        rs = runs[system]
        for x in rs:
            x["ttt"] = time_to_target(x["lines"], target)
            x["ttt_step"] = steps_to_target(x["lines"], target)
        rows.append(_row(f"original: n = {N:,}, d = {D}, float32, intercept", label, rs))
        stats[system] = _stats(rs)
    ratio = median(stats["psrv"]["samples_per_s"]) / median(stats["torch"]["samples_per_s"])
    ratios = {"samples_per_s_vs_torch_ddp": ratio}
    scaled_notes = []
    for key, sj in scaled.items():
        job, jruns = sj["job"], sj["runs"]
        n = job.quick_n if quick else job.n
        what = f"{job.title}: n = {n:,}, d = {job.d}, float64, no intercept"
        labels = {"torch": ddp_label, "bsp": "psrv BSP (2 workers + server)",
                  "groupK": f"psrv BSP, group steps K = {job.group_steps} (2 workers + server)"}
        ddp = median([x["samples_per_s"] for x in jruns["torch"]])
        parts = []
        for system, rs in jruns.items():
            rows.append(_row(what, labels[system], rs))
            stats[f"{key}/{system}"] = _stats(rs)
            if system != "torch":
                ratios[f"peers_{key}_{system}_vs_torch_ddp"] = median([x["samples_per_s"] for x in rs]) / ddp
                parts.append(f"{system} {ratios[f'peers_{key}_{system}_vs_torch_ddp']:.2f}")
        scaled_notes.append(
            f"{job.title} job (benchmarks/scaling.py's, its data and lr): batch {job.batch} per worker, lr "
            f"{scaling._lr(job, WORKERS, []):g} (the job's {job.lr:g} x 2 workers, constant) in all three, "
            f"{SCALING_STEPS[key][quick]:,} batches per worker, {SCALING_REPEATS[quick]} repeat(s); target loss the "
            f"optimum x {scaling.TARGET_FACTOR:g}. psrv / DDP samples/s: {', '.join(parts)}.")
    return {
        "name": "peers",
        "title": "psrv against PyTorch DDP (gloo, CPU)",
        "method": __doc__,
        "columns": ["job", "system", "steps", "samples/s (median)", "samples/s (min-max)", "time to target s (median)",
                    "time to target s (min-max)", "steps to target (median)", "training s (median)",
                    "final training MSE"],
        "rows": rows,
        "raw": stats,
        "ratios": ratios,
        "targets": [_target(ratio)],
        "notes": [
            f"{repeats} repeats per system, {steps:,} steps each ({WORKERS} x {BATCH} rows per step), n = {N:,}, "
            f"d = {D}, lr = {LR} constant. Target loss: the least-squares optimum's MSE {best:.5f} x "
            f"{1 + TARGET_REL:g} = {target:.5f}; runs that reach it: psrv "
            f"{sum(t is not None for t in stats['psrv']['time_to_target_s'])} of {repeats}, DDP "
            f"{sum(t is not None for t in stats['torch']['time_to_target_s'])} of {repeats}. The final training MSE "
            "is on all rows with the final parameters.",
            f"psrv / DDP samples/s = {ratio:.2f}. psrv runs 3 processes (server + 2 workers) on "
            f"{len(proc.usable_cores())} cores; DDP runs 2 ranks, placed by the OS (not pinned), with no server.",
            *scaled_notes,
        ],
    }
