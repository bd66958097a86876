"""Benchmark 5: psrv against PyTorch DistributedDataParallel (gloo backend, CPU) on the same job, in the same run.

The job: synthetic linear regression (psrv's generator, 200,000 rows x 100 columns, float32), columns standardized
as psrv does it (column mean and population standard deviation of the training rows), 2 workers = 2 DDP ranks, each
training on its own contiguous half of the rows (psrv's "range" partition), 256 rows per worker per step drawn from a
fresh random permutation of its half every epoch, plain SGD at a constant learning rate of 0.01, the mean squared
loss, a linear model with an intercept initialized to zero. DDP averages the two ranks' gradients before each step,
which is psrv's BSP update (theta -= lr * mean of the workers' gradients).

- torch: each rank is a spawned process pinned to its own core, with torch.set_num_threads(1) and OMP/MKL/OpenBLAS
  at 1 thread; nn.Linear(d, 1) in DistributedDataParallel, torch.optim.SGD, F.mse_loss, init_process_group("gloo")
  over loopback TCP. Samples/s is timed over the training loop only (from a barrier after start-up to the last step).
- psrv: `psrv.train` with data.partition=range, train.workers=2, train.consistency=bsp and the same batch, lr,
  constant schedule, dtype and steps. Samples/s is the run's own figure (training only, start-up excluded).

Time to target: seconds of training until the logged training loss (the mean mini-batch loss over the last 10 steps,
averaged over both workers, each batch at the parameters it was computed at) first reaches the target, the
least-squares optimum's mean squared error times 1.02. Both systems run the same number of steps; the repeats
alternate which system goes first; figures are medians over the repeats.
"""
from __future__ import annotations

import os
import queue
import socket
import tempfile
import time

import numpy as np

from psrv import config, data, proc

from .common import log, lstsq_loss, median, spread, time_to_target, train

N, D, BATCH, LR = 200_000, 100, 256, 0.01
WORKERS = 2
LOG_EVERY = 10
TARGET_REL = 0.02                 # target = least-squares MSE * (1 + TARGET_REL)
STEPS, QUICK_STEPS = 3_000, 1_000
RANK_TIMEOUT_S = 300.0
TORCH_PIN = "torch==2.13.0"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_rank(rank: int, world: int, port: int, core: int | None, data_dir: str, steps: int, batch: int,
              lr: float, seed: int, log_every: int, results) -> None:
    """One DDP rank: train on its contiguous block of rows, report (history, timing, final loss) on `results`."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    try:
        X_all = np.load(os.path.join(data_dir, "X.npy"), mmap_mode="r")
        y_all = np.load(os.path.join(data_dir, "y.npy"), mmap_mode="r")
        # psrv's range partition: the first n % world blocks get one row more (as np.array_split)
        lo, hi = [(int(a[0]), int(a[-1]) + 1) for a in np.array_split(np.arange(len(X_all)), world)][rank]
        X = torch.from_numpy(np.array(X_all[lo:hi]))
        y = torch.from_numpy(np.array(y_all[lo:hi])).unsqueeze(1)
        n_local = len(X)

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        lin = torch.nn.Linear(X.shape[1], 1)
        with torch.no_grad():
            lin.weight.zero_()
            lin.bias.zero_()
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
            loss = F.mse_loss(model(X[idx]), y[idx])
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


def run_ddp(data_dir: str, steps: int, seed: int = 0) -> dict:
    """One DDP run with WORKERS ranks; returns samples/s, the loss history (mean over ranks) and the final loss."""
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
                p = proc.SPAWN.Process(target=_ddp_rank, daemon=True,
                                       args=(rank, WORKERS, port, cores[rank % len(cores)], data_dir, steps, BATCH,
                                             LR, seed, LOG_EVERY, results))
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


def _skipped() -> dict:
    return {"name": "peers", "title": "psrv against PyTorch DDP (gloo, CPU)", "method": __doc__, "rows": [],
            "ratios": {"samples_per_s_vs_torch_ddp": None},
            "targets": [_target(None)],
            "notes": [f"Skipped: PyTorch is not installed (pip install {TORCH_PIN} — a CPU wheel is on this "
                      "machine)"]}


def _target(ratio: float | None) -> dict:
    return {"what": "psrv is at least as fast as PyTorch DDP/gloo on the same job, in samples/s",
            "key": "samples_per_s_vs_torch_ddp", "target": ">= 1", "met": None if ratio is None else ratio >= 1}


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
        np.save(os.path.join(tmp, "X.npy"), ((X - mean) / scale).astype(np.float32))
        np.save(os.path.join(tmp, "y.npy"), y.astype(np.float32))
        del X, y
        for r in range(repeats):
            order = ("psrv", "torch") if r % 2 == 0 else ("torch", "psrv")
            for system in order:
                log(f"peers: {system}, repeat {r + 1} of {repeats}, {steps} steps")
                runs[system].append(run_psrv(steps) if system == "psrv" else run_ddp(tmp, steps))
    rows, stats = [], {}
    for system, label in (("psrv", "psrv (BSP, 2 workers + server)"),
                          ("torch", f"PyTorch {torch.__version__} DDP, gloo (2 ranks)")):
        rs = runs[system]
        sps = [x["samples_per_s"] for x in rs]
        ttt = [time_to_target(x["lines"], target) for x in rs]
        stats[system] = {"samples_per_s": sps, "time_to_target_s": ttt, "wall_s": [x["wall_s"] for x in rs],
                         "final_loss": [x["final_loss"] for x in rs]}
        stt = [steps_to_target(x["lines"], target) for x in rs]
        stats[system]["steps_to_target"] = stt
        t_med, t_spread = _fmt_s(ttt)
        st_med = "-" if None in stt else f"{median(stt):.0f}"
        rows.append([label, f"{rs[0]['steps']:,}", f"{median(sps):,.0f}", spread(sps), t_med, t_spread, st_med,
                     f"{median([x['wall_s'] for x in rs]):.2f}", f"{median([x['final_loss'] for x in rs]):.5f}"])
    ratio = median(stats["psrv"]["samples_per_s"]) / median(stats["torch"]["samples_per_s"])
    return {
        "name": "peers",
        "title": "psrv against PyTorch DDP (gloo, CPU)",
        "method": __doc__,
        "columns": ["system", "steps", "samples/s (median)", "samples/s (min-max)", "time to target s (median)",
                    "time to target s (min-max)", "steps to target (median)", "training s (median)",
                    "final training MSE"],
        "rows": rows,
        "raw": stats,
        "ratios": {"samples_per_s_vs_torch_ddp": ratio},
        "targets": [_target(ratio)],
        "notes": [
            f"{repeats} repeats per system, {steps:,} steps each ({WORKERS} x {BATCH} rows per step), n = {N:,}, "
            f"d = {D}, lr = {LR} constant. Target loss: the least-squares optimum's MSE {best:.5f} x "
            f"{1 + TARGET_REL:g} = {target:.5f}; runs that reach it: psrv "
            f"{sum(t is not None for t in stats['psrv']['time_to_target_s'])} of {repeats}, DDP "
            f"{sum(t is not None for t in stats['torch']['time_to_target_s'])} of {repeats}. The final training MSE "
            "is on all rows with the final parameters.",
            f"psrv / DDP samples/s = {ratio:.2f}. psrv runs 3 processes (server + 2 workers) on "
            f"{len(proc.usable_cores())} cores; DDP runs 2 ranks, one per core, with no server.",
        ],
    }
