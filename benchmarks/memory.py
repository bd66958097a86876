"""Benchmark 4: memory. The summed proportional set size (PSS) of every process of a psrv run against the bytes of
its data set, for 1, 2 and 4 workers, under both settings of data.worker_copy: "off", where the data is held once
(the launcher's shared-memory block, read in place), and "auto" (the default), where each worker also copies the
rows of its own shard into private memory (huge pages make its random-row gathers cheaper), so the data is held
about twice. The two rows of each worker count, side by side, show what the copy costs.

PSS divides each resident page among the processes that map it, so the sum of PSS over all processes of a run
counts every physical page once: the launcher's shared-memory block (written whole by the launcher, read shard by
shard by the workers) adds its size once, whatever the number of workers, and a process that copied the data adds
the copy on top (under "auto", each worker's copy of its shard: the shards together are the training rows, once).

For each setting and each worker count N, `launch.py -q` runs as a subprocess of its own session twice, with the
same columns (data.d): once with a big synthetic data set (full: about 800 MB of float64 X; --quick: about 200 MB)
and once with a tiny one (64 rows per shard). Once training has started (output.dir/metrics.jsonl is non-empty: in
BSP every worker has pushed by then, and a worker makes its copies before its first gradient) and the workers have
mapped every page of their shards (the summed RssShmem of the processes has stopped growing: a reading visits one
process after another, so a page mapped in between would be counted more than once), the summed PSS of the
launcher and every descendant (found from /proc/*/stat parent pids: the server, the N workers and
multiprocessing's resource tracker) is read from /proc/<pid>/smaps_rollup a few times, a little apart, and the
largest sum is kept with its per-process breakdown (PSS split into Pss_Shmem, the shared data and theta segments,
and Pss_Anon, private memory: the workers' copies are there). The run is then stopped with SIGINT, which must end
it with exit status 130 and leave no /dev/shm/psrv_<launcher pid>_* segment.

The dataset bytes are the size of the block the launcher creates (X and y, then mean and scale, float64, each
64-byte aligned). The tiny run's summed PSS is the fixed overhead of those processes (interpreters, numpy, ZeroMQ;
it holds almost no data), and the ratio is (PSS_big - PSS_tiny) / (bytes_big - bytes_tiny): 1.0 means the data
costs exactly its size once, 2.0 twice. The target for "off" is met when the worst ratio over N is <= 1.15 (held
once); for "auto", when it is <= 2.15 (held twice: the block and one private copy of the training rows, each
worker's of its own shard). The plain form, PSS_big <= 1.15 x bytes_big + PSS_tiny (2.15 x for "auto"), is
checked as well. "auto" copies only when all the workers' copies would fit in half of the memory available; the
private column says whether they were made. The server is told apart from the workers by its start time (the
launcher starts it, and waits for it to listen, before starting any worker). Shared libraries are also mapped by
processes outside the run (this benchmark's own interpreter, other jobs), which lowers every PSS a little; the big
and the tiny runs see the same, and the subtraction removes it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from psrv import proc
from psrv.blocks import PREFIX, BlockSpec

from .common import log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch.py")
WORKERS = (1, 2, 4)
D = 50
BIG_N = 2_000_000         # 2e6 x 50 float64 = 800 MB of X
QUICK_BIG_N = 500_000     # 200 MB
TINY_ROWS_PER_SHARD = 64
COPIES = ("off", "auto")   # data.worker_copy: read in place (the data held once), or each worker's shard copied
TARGET = {"off": 1.15, "auto": 2.15}   # the data's bytes held once, or twice, plus 15 %
MB = 1e6


# ---------------------------------------------------------------------------------------------- /proc
def _stat(pid: int) -> tuple[int, int, int, str] | None:
    """(parent pid, process group, start time in clock ticks, state) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            s = fh.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    return int(fields[1]), int(fields[2]), int(fields[19]), fields[0]


def _group(pgid: int) -> list[int]:
    """Live (not zombie) members of a process group."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None and st[1] == pgid and st[3] != "Z":
                out.append(int(name))
    return out


def _tree(root: int) -> list[int]:
    """root and all its live descendants."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rollup(pid: int) -> dict[str, int] | None:
    """The kB lines of /proc/<pid>/smaps_rollup we use (Pss, Pss_Anon, Pss_Shmem, Rss), or None if it is gone."""
    want = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Pss_Shmem")
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    out = {}
    for ln in lines:
        key, _, rest = ln.partition(":")
        if key in want:
            out[key] = int(rest.split()[0])
    return out if "Pss" in out else None


def _heap_kb(pid: int) -> int:
    """Anonymous kB of the process's brk heap (the [heap] mappings of /proc/<pid>/smaps; madvise can split it in
    several): where malloc puts blocks below its mmap threshold, live or freed and not yet returned to the system."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps") as fh:
            in_heap = False
            for ln in fh:
                head = ln.split(None, 1)[0]
                if not head.endswith(":"):  # the first line of a mapping: "start-end perms offset dev inode [name]"
                    in_heap = ln.rstrip().endswith("[heap]")
                elif in_heap and head == "Anonymous:":
                    total += int(ln.split()[1])
    except OSError:
        pass
    return total


def _rss_shmem_kb(root: int) -> int:
    """Resident shared-memory pages summed over the tree, each process counting its own (RssShmem of
    /proc/<pid>/status): grows while the workers fault in their shards' pages, then stays put."""
    total = 0
    for pid in _tree(root):
        try:
            with open(f"/proc/{pid}/status") as fh:
                total += next((int(ln.split()[1]) for ln in fh if ln.startswith("RssShmem:")), 0)
        except OSError:
            pass
    return total


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _sample(root: int) -> dict:
    """One reading: every process of the tree with its role and smaps_rollup figures (kB), and their sum."""
    procs = []
    for pid in _tree(root):
        r, st, cmd = _rollup(pid), _stat(pid), _cmdline(pid)
        if r is None or st is None:
            continue  # gone between the listing and the read
        if pid == root:
            role = "launcher"
        elif "resource_tracker" in cmd:
            role = "resource tracker"
        elif "spawn_main" in cmd:
            role = "spawned"  # server or worker: told apart below by start time
        else:
            role = "other"
        procs.append({"pid": pid, "role": role, "start": st[2], **r, "Heap_Anon": _heap_kb(pid)})
    spawned = sorted((p for p in procs if p["role"] == "spawned"), key=lambda p: (p["start"], p["pid"]))
    for i, p in enumerate(spawned):
        p["role"] = "server" if i == 0 else "worker"
    keys = ("Pss", "Pss_Anon", "Pss_Shmem", "Pss_File", "Rss", "Heap_Anon")
    total = {k: sum(p.get(k, 0) for p in procs) for k in keys}
    return {"procs": procs, **total}


def _shm_left(pid: int) -> list[str]:
    try:
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"{PREFIX}{pid}_"))
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------------------------------- one run
def _wait_for(cond, deadline_s: float, p: subprocess.Popen, what: str, err_path: str) -> None:
    """Poll cond() until it holds; raise if the launcher exits first or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while not cond():
        if p.poll() is not None:
            raise RuntimeError(f"launch.py exited with {p.returncode} before {what}: {_tail(err_path)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"launch.py: no {what} after {deadline_s:.0f} s: {_tail(err_path)}")
        time.sleep(0.05)


def _tail(path: str, n: int = 600) -> str:
    try:
        with open(path, errors="replace") as fh:
            return fh.read()[-n:].strip() or "(no stderr)"
    except OSError:
        return "(no stderr)"


def _leftovers(pgid: int, grace_s: float = 10.0) -> list[str]:
    """Wait (up to grace_s) for every process of the run's group to be gone (the resource tracker leaves a moment
    after the launcher); SIGKILL what is left and return their command lines."""
    deadline = time.monotonic() + grace_s
    while _group(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [f"{pid}: {_cmdline(pid)[:120]}" for pid in _group(pgid)]
    if left:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _settle(p: subprocess.Popen, block_kb: int, deadline_s: float, err_path: str, window_s: float = 0.5) -> bool:
    """Poll until the tree's resident shared pages have grown by less than 0.2 % of the block (at least 256 kB)
    over the last window_s. False if that never happened before the deadline."""
    deadline = time.monotonic() + deadline_s
    history: list[tuple[float, int]] = []
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"launch.py exited with {p.returncode} while starting: {_tail(err_path)}")
        now = time.monotonic()
        history.append((now, _rss_shmem_kb(p.pid)))
        old = [kb for t, kb in history if t <= now - window_s]
        if old and history[-1][1] - old[-1] <= max(256, block_kb // 500):
            return True
        time.sleep(0.05)
    return False


def measure(workers: int, n: int, samples: int, every_s: float, start_timeout_s: float, copy: str = "off") -> dict:
    """One launch.py run of n x D synthetic rows with `workers` workers and data.worker_copy = copy: PSS samples once
    training has started, then a SIGINT stop (exit status and leftover shared memory checked)."""
    spec = BlockSpec(name="-", dtype="float64", d=D, n_train=n)
    res: dict = {"workers": workers, "copy": copy, "n": n, "d": D, "dataset_bytes": spec.offsets()[1]}
    with tempfile.TemporaryDirectory(prefix="psrv-memory-") as tmp:
        out = os.path.join(tmp, "out")
        err_path = os.path.join(tmp, "stderr")
        cmd = [sys.executable, LAUNCH, "-q", "--set", f"output.dir={out}", "--set", f"train.workers={workers}",
               "--set", "train.steps=1000000000", "--set", "checkpoint.every_steps=0", "--set", "output.plot=false",
               "--set", "data.source=\"synthetic\"", "--set", f"data.n={n}", "--set", f"data.d={D}",
               "--set", "data.test_fraction=0.0", "--set", "data.dtype=\"float64\"",
               "--set", f"data.worker_copy=\"{copy}\""]
        metrics = os.path.join(out, "metrics.jsonl")
        with open(os.path.join(tmp, "stdout"), "wb") as out_fh, open(err_path, "wb") as err_fh:
            t0 = time.monotonic()
            p = subprocess.Popen(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out_fh, stderr=err_fh,
                                 start_new_session=True)
            res["launcher_pid"] = p.pid
            try:
                _wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0, start_timeout_s, p,
                          "training step (metrics.jsonl)", err_path)
                res["start_s"] = time.monotonic() - t0
                # a PSS reading visits one process after another: a page a worker maps in between is counted
                # once whole (launcher, read first) and once in part (worker). Read only once the workers have
                # mapped every page of their shards (after about one epoch of each), so the sum is exact.
                res["settled"] = _settle(p, res["dataset_bytes"] // 1024, start_timeout_s, err_path)
                res["settle_s"] = time.monotonic() - t0 - res["start_s"]
                reads = []
                for i in range(samples):
                    if i:
                        time.sleep(every_s)  # spacing between readings, not a wait for a condition
                    if p.poll() is not None:
                        raise RuntimeError(f"launch.py exited with {p.returncode} while being measured: "
                                           f"{_tail(err_path)}")
                    reads.append(_sample(p.pid))
                best = max(reads, key=lambda r: r["Pss"])
                res.update(pss_kb=best["Pss"], pss_samples_kb=[r["Pss"] for r in reads], sample=best)
                t1 = time.monotonic()
                os.kill(p.pid, signal.SIGINT)  # the launcher alone: it stops its children itself
                try:
                    res["exit_code"] = p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    res["exit_code"] = None
                    raise TimeoutError(f"launch.py did not exit within 60 s of SIGINT: {_tail(err_path)}")
                res["stop_s"] = time.monotonic() - t1
            finally:
                # whatever happened, nothing of this run may outlive it
                if p.poll() is None:  # a failure above: no grace
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    try:
                        p.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
                res["killed_leftovers"] = _leftovers(p.pid)
                left = _shm_left(p.pid)
                res["shm_left"] = left
                for name in left:  # ours: named after the launcher we started
                    try:
                        os.unlink(os.path.join("/dev/shm", name))
                    except OSError:
                        pass
        res["stderr"] = _tail(err_path, 300) if res.get("exit_code") != 130 else ""
    return res


def _by_role(sample: dict, key: str = "Pss") -> dict[str, list[int]]:
    roles: dict[str, list[int]] = {}
    for p in sample["procs"]:
        roles.setdefault(p["role"], []).append(p.get(key, 0))
    return roles


def _role_text(sample: dict) -> str:
    order = ["launcher", "server", "worker", "resource tracker", "other"]
    roles = _by_role(sample)
    parts = []
    for r in order:
        if r in roles:
            vals = roles[r]
            parts.append(f"{r} {vals[0] / 1024:.0f}" if len(vals) == 1
                         else f"{r}s {'+'.join(f'{v / 1024:.0f}' for v in vals)}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------- the benchmark
def run(quick: bool = False) -> dict:
    big_n = QUICK_BIG_N if quick else BIG_N
    samples, every_s = (5, 0.2) if quick else (5, 1.0)
    cores = len(proc.usable_cores())
    rows, raw, notes, problems = [], [], [], []
    plot: dict = {"x": list(WORKERS), **{c: [] for c in COPIES}, "once": [], "twice": []}
    ratios: dict[str, dict[int, float]] = {c: {} for c in COPIES}
    plain_ok: dict[str, dict[int, bool]] = {c: {} for c in COPIES}
    for n_workers in WORKERS:
        for copy in COPIES:   # side by side: the same worker count with and without the workers' copies
            pair = {}
            for kind, n in (("tiny", TINY_ROWS_PER_SHARD * n_workers), ("big", big_n)):
                what = f"{n_workers} workers, data.worker_copy = {copy}, {kind} data"
                log(f"memory: {what} ({n:,} x {D} float64)")
                m = measure(n_workers, n, samples, every_s, start_timeout_s=(240 if kind == "big" else 120),
                            copy=copy)
                raw.append({"kind": kind, **m})
                pair[kind] = m
                problems += _problems(m, what, n_workers)
            big, tiny = pair["big"], pair["tiny"]
            pss_big, pss_tiny = big["pss_kb"] * 1024, tiny["pss_kb"] * 1024
            ratio = (pss_big - pss_tiny) / (big["dataset_bytes"] - tiny["dataset_bytes"])
            ratios[copy][n_workers] = ratio
            plain_ok[copy][n_workers] = pss_big <= TARGET[copy] * big["dataset_bytes"] + pss_tiny
            n_procs = len(big["sample"]["procs"])
            label = f"{n_workers}" + (f" (oversubscribed: {cores} cores)" if n_workers > cores else "")
            rows.append([label, copy, f"{n_procs}" + ("" if n_procs == len(tiny["sample"]["procs"])
                                                      else f" (tiny: {len(tiny['sample']['procs'])})"),
                         f"{big['dataset_bytes'] / MB:,.1f}", f"{pss_big / MB:,.1f}", f"{pss_tiny / MB:,.1f}",
                         f"{pss_tiny / len(tiny['sample']['procs']) / MB:.1f}", f"{ratio:.3f}",
                         f"{_growth(raw, n_workers, copy)['Pss_Anon']:+,.1f}", _role_text(big["sample"])])
            plot[copy].append(pss_big / MB)
            if copy == "off":
                plot["once"].append((big["dataset_bytes"] + pss_tiny) / MB)
                plot["twice"].append((2 * big["dataset_bytes"] + pss_tiny) / MB)

    worst = {c: max(ratios[c].values()) for c in COPIES}
    met = {c: worst[c] <= TARGET[c] for c in COPIES}
    data_mb = _big_bytes(raw) / MB
    for c in COPIES:
        plain = ", ".join(f"N={k}: {'yes' if v else 'NO'}" for k, v in plain_ok[c].items())
        notes.append(f"data.worker_copy = {c}, plain form, summed PSS (big) <= {TARGET[c]} x dataset bytes + summed "
                     f"PSS (tiny): {plain}.")
    extra = [ratios["auto"][k] - ratios["off"][k] for k in WORKERS]
    notes.append(f"What the workers' copies cost (data.worker_copy = auto against off, the same worker count): "
                 f"{min(extra):.2f} to {max(extra):.2f} x the data's bytes more "
                 f"({min(extra) * data_mb:,.0f} to {max(extra) * data_mb:,.0f} MB for {data_mb:,.1f} MB of data), "
                 f"in the workers' private memory (Pss_Anon below).")
    # where the memory beyond the fixed overhead is: the shared block (counted once) or private pages
    for c in COPIES:
        split = []
        for n_workers in WORKERS:
            g = _growth(raw, n_workers, c)
            split.append(f"N={n_workers}: shared memory {g['Pss_Shmem']:+,.1f}, private {g['Pss_Anon']:+,.1f} "
                         f"(malloc's brk heap alone {g['Heap_Anon']:+,.1f}), file-backed {g['Pss_File']:+,.1f}")
        notes.append(f"data.worker_copy = {c}, big run minus tiny run by kind of page (smaps_rollup Pss_Shmem, "
                     f"Pss_Anon, Pss_File; MB), for {data_mb:,.1f} MB of data: " + "; ".join(split) + ".")
    over = [k for k in WORKERS if k > cores]
    notes.append(f"PSS columns are the largest of {samples} readings {every_s:g} s apart, taken once training had "
                 f"started and the workers had mapped their shards; \"private MB\" is the big run's Pss_Anon minus "
                 f"the tiny run's (the workers' copies are there); the last column breaks the big run's summed PSS "
                 f"down by process (MB)."
                 + (f" With {' and '.join(map(str, over))} workers there are more workers than the machine's {cores} "
                    f"cores: they share them, which slows training but not what memory holds." if over else ""))
    for c in COPIES:
        if not met[c]:
            n_worst = max(ratios[c], key=ratios[c].get)
            notes.append(f"data.worker_copy = {c}: " + _why_missed(raw, n_worst, worst[c], c))
    notes += problems or ["Every run exited with status 130 after SIGINT and left no psrv_<pid>_ shared memory "
                          "segment and no process behind."]
    across = f"worst of {', '.join(map(str, WORKERS))} workers"
    return {
        "name": "memory",
        "title": "Memory: summed PSS of all processes against the dataset's bytes",
        "method": __doc__,
        "columns": ["workers", "data.worker_copy", "processes counted", "dataset MB", "summed PSS MB (big)",
                    "summed PSS MB (tiny = fixed overhead)", "overhead per process MB",
                    "(PSS big - tiny) / (bytes big - tiny)", "private MB (big - tiny)", "big run: PSS MB by process"],
        "rows": rows,
        "raw": [{k: v for k, v in r.items() if k != "sample"} | {"procs": r["sample"]["procs"]} for r in raw],
        "ratios": {"pss_vs_dataset_bytes": worst["off"], "pss_vs_dataset_bytes_worker_copy": worst["auto"]},
        "targets": [{"what": f"data.worker_copy = off (the data held once): summed PSS of all processes over the "
                             f"dataset's bytes, beyond the fixed overhead per process, {across}",
                     "key": "pss_vs_dataset_bytes", "target": f"<= {TARGET['off']}", "met": met["off"]},
                    {"what": f"data.worker_copy = auto (the default; the data held twice: the block and the "
                             f"workers' copies of their shards): the same ratio, {across}",
                     "key": "pss_vs_dataset_bytes_worker_copy", "target": f"<= {TARGET['auto']}",
                     "met": met["auto"]}],
        "notes": notes,
        "plot": {"x": plot["x"], "xlabel": "workers", "ylabel": "MB", "xticks": True, "series": {
            "summed PSS, big data, data.worker_copy = off": plot["off"],
            "summed PSS, big data, data.worker_copy = auto": plot["auto"],
            "dataset + fixed overhead (data held once)": plot["once"],
            "2 x dataset + fixed overhead (data held twice)": plot["twice"]}},
    }


def _problems(m: dict, what: str, n_workers: int) -> list[str]:
    """What went wrong in one run, if anything: its exit, its leftovers, its readings."""
    out = []
    if m["exit_code"] != 130:
        out.append(f"{what}: launch.py exited {m['exit_code']} after SIGINT, not 130 ({m['stderr']})")
    if m["shm_left"]:
        out.append(f"{what}: shared memory left behind {m['shm_left']} (removed by the benchmark)")
    if m["killed_leftovers"]:
        out.append(f"{what}: processes of the run were still alive after the launcher exited (killed by the "
                   f"benchmark): {m['killed_leftovers']}")
    if not m["settled"]:
        out.append(f"{what}: the workers' shared pages were still growing when the readings were taken, which can "
                   f"count some pages more than once")
    workers_seen = len(_by_role(m["sample"]).get("worker", []))
    if workers_seen != n_workers:
        out.append(f"{what}: {workers_seen} worker processes found")
    return out


def _pair(raw: list[dict], n_workers: int, copy: str) -> tuple[dict, dict]:
    big = next(r for r in raw if r["kind"] == "big" and r["workers"] == n_workers and r["copy"] == copy)
    tiny = next(r for r in raw if r["kind"] == "tiny" and r["workers"] == n_workers and r["copy"] == copy)
    return big, tiny


def _big_bytes(raw: list[dict]) -> int:
    return next(r["dataset_bytes"] for r in raw if r["kind"] == "big")


def _growth(raw: list[dict], n_workers: int, copy: str) -> dict[str, float]:
    """Big run minus tiny run, MB, summed over the processes, by kind of page."""
    big, tiny = _pair(raw, n_workers, copy)
    return {k: (big["sample"][k] - tiny["sample"][k]) * 1024 / MB
            for k in ("Pss", "Pss_Shmem", "Pss_Anon", "Pss_File", "Heap_Anon")}


def _why_missed(raw: list[dict], n_workers: int, ratio: float, copy: str) -> str:
    """Which processes hold the memory beyond the data block (and, under data.worker_copy = auto, the workers'
    copies), from the measured breakdown of the worst run."""
    big, tiny = _pair(raw, n_workers, copy)
    rows = big["n"] - tiny["n"]
    row_bytes = (big["dataset_bytes"] - tiny["dataset_bytes"]) / rows
    growth = []
    for role in ("launcher", "server", "worker", "resource tracker", "other"):
        b, t = _by_role(big["sample"], "Pss_Anon").get(role, []), _by_role(tiny["sample"], "Pss_Anon").get(role, [])
        hb, ht = _by_role(big["sample"], "Heap_Anon").get(role, []), _by_role(tiny["sample"], "Heap_Anon").get(role, [])
        if b:
            growth.append(((sum(b) - sum(t)) * 1024, (sum(hb) - sum(ht)) * 1024, role, len(b)))
    growth.sort(reverse=True)
    parts = [f"{role}{'s' if k > 1 else ''} {g / MB:+,.1f} MB ({g / rows:+.0f} bytes a row; brk heap {h / MB:+,.1f} MB)"
             for g, h, role, k in growth if abs(g) >= 0.5 * MB]
    g = _growth(raw, n_workers, copy)
    data_mb = (big["dataset_bytes"] - tiny["dataset_bytes"]) / MB
    copies = g["Pss_Anon"] / data_mb
    held = (f"The shared block is counted once ({g['Pss_Shmem']:+,.1f} MB of Pss_Shmem for {data_mb:,.1f} MB of "
            f"data)" if abs(g["Pss_Shmem"] - data_mb) <= 0.02 * data_mb else
            f"The shared memory counted ({g['Pss_Shmem']:+,.1f} MB of Pss_Shmem) is not the block's {data_mb:,.1f} MB")
    private = (f"private memory grew by {copies:.2f}x the data (the workers' copies of their shards are 1x)"
               if copy == "auto" else
               f"no process holds a copy of the data (that would be {row_bytes:.0f} bytes a row)" if copies < 0.5 else
               f"private memory grew by {copies:.2f}x the data, as a private copy of it would")
    return (f"Target missed: with {n_workers} workers, the big run's summed PSS grew by {ratio:.3f}x the data's "
            f"bytes over the tiny run. {held}; {private}. The excess is private memory that grows with the "
            f"number of rows, measured by process (big minus tiny run): {', '.join(parts) or 'none over 0.5 MB'}; "
            f"file-backed pages {g['Pss_File']:+,.1f} MB. "
            + (f"It is in malloc's brk heap ({g['Heap_Anon']:+,.1f} MB, read a moment apart from the "
               f"{g['Pss_Anon']:+,.1f} MB of private memory), where numpy puts arrays below glibc's mmap threshold: "
               f"per-row arrays (int64 row orders are 8 bytes a row: the launcher's layout arrays while it builds the "
               f"block, each worker's epoch order of its shard and its sort) and what glibc keeps after they are "
               f"freed; "
               if g["Heap_Anon"] >= 0.5 * g["Pss_Anon"] else
               f"Only {g['Heap_Anon']:,.1f} of {g['Pss_Anon']:,.1f} MB is in malloc's brk heap; the rest is in "
               f"anonymous mappings (large numpy arrays, live or cached); ")
            + f"/proc cannot tell live blocks from freed ones. With data.d = {D} a row is {row_bytes:.0f} bytes, so "
            f"these per-row bytes are a fixed share of the data; more columns would shrink it.")
