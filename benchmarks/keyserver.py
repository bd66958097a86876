"""Benchmark: the pushes/s and keys/s one KeyedStore sustains in one process, and what cutting a push or pull into S
key ranges and putting it back together costs (psrv/keyrange.py), for S = 1, 2, 4. No sockets and no other
processes: this is the compute ceiling of one range server (and of the client's slicing) that a multi-process
benchmark can later stand beside.

The pushes are what a sparse logistic-regression or embedding job sends: each one the distinct keys of a batch, drawn
Zipf-like (exponent 1.1) over the ranks of 2^22 hashed buckets (a rank's bucket is splitmix64 of the rank, as
psrv.criteo hashes features), so a few hot keys come in every push and new tail keys keep arriving; the draws per
push are set so a push holds about 5,000 or 40,000 distinct keys. Each store first takes warm-up pushes (rows created,
not timed), then rounds of pushes are timed (SIZES; the notes say how many) (store.push: the key lookup, new rows, the optimizer step
on the touched rows), and the same keys pulled (store.pull: the lookup and a gather); figures are medians over the
rounds. FTRL-Proximal on width-1 rows (logistic-regression weights) and Adagrad on width-1 and width-16 rows
(embeddings). The split/merge rows time Ranges.even(S).split(keys, grad) (a push) and Ranges.merge(parts) (putting
a pull's answers back in key order, each part checked to be in its range) on pushes drawn the same way, and report
the most keys any range got in any of those pushes over the mean (1.000 is a perfect split).

    python -m benchmarks --only keyserver [--quick]
"""
from __future__ import annotations

import time

import numpy as np

from .common import log, median, spread

BUCKETS = 1 << 22
ZIPF_A = 1.1
TARGETS = (5_000, 40_000)
CASES = (("ftrl", 1), ("adagrad", 1), ("adagrad", 16))
SIZES = {False: {"warm": 30, "pushes": 20, "repeats": 5}, True: {"warm": 10, "pushes": 6, "repeats": 3}}


def _buckets(rng, draws: int) -> np.ndarray:
    """The sorted distinct buckets of `draws` Zipf draws over the ranks of BUCKETS buckets."""
    from psrv.partition import splitmix64
    ranks = rng.zipf(ZIPF_A, draws)
    ranks = ranks[ranks <= BUCKETS].astype(np.uint64)
    return np.unique(splitmix64(ranks) & np.uint64(BUCKETS - 1))


def _draws_for(target: int) -> int:
    """How many draws give about `target` distinct keys (bisection on one seed; distinct keys grow with draws)."""
    lo, hi = target, 64 * target
    rng_seed = 12345
    while hi - lo > target // 100:
        mid = (lo + hi) // 2
        if len(_buckets(np.random.default_rng(rng_seed), mid)) < target:
            lo = mid
        else:
            hi = mid
    return hi


def _make(name: str):
    from psrv import optim
    from psrv.ftrl import FTRL
    if name == "ftrl":
        return lambda t: FTRL(t, ftrl_beta=1.0, l1=1.0, l2=1.0)
    return lambda t: optim.Adagrad(t, eps=1e-8)


def _timed(fn, calls) -> float:
    t0 = time.perf_counter()
    for args in calls:
        fn(*args)
    return time.perf_counter() - t0


def measure_store(opt: str, width: int, draws: int, sizes: dict, seed: int) -> dict:
    from psrv.keyed import KeyedStore
    rng = np.random.default_rng(seed)
    store = KeyedStore(width, _make(opt), capacity=1 << 16)
    for _ in range(sizes["warm"]):
        keys = _buckets(rng, draws)
        store.push(keys, rng.normal(size=(len(keys), width)), 0.05)
    push_s, pull_s, counts = [], [], []
    for _ in range(sizes["repeats"]):
        batch = [_buckets(rng, draws) for _ in range(sizes["pushes"])]
        grads = [(k, rng.normal(size=(len(k), width)), 0.05) for k in batch]
        counts += [len(k) for k in batch]
        push_s.append(_timed(store.push, grads) / len(batch))
        pull_s.append(_timed(store.pull, [(k,) for k in batch]) / len(batch))
    return {"keys_per_push": float(np.mean(counts)), "push_s": push_s, "pull_s": pull_s, "rows": len(store)}


def measure_ranges(shards: int, draws: int, sizes: dict, seed: int) -> dict:
    from psrv.keyrange import Ranges
    rng = np.random.default_rng(seed)
    ranges = Ranges.even(shards)
    split_s, merge_s, counts, imbalance = [], [], [], []
    for _ in range(sizes["repeats"]):
        batch = [(k, rng.normal(size=(len(k), 1))) for k in (_buckets(rng, draws) for _ in range(sizes["pushes"]))]
        counts += [len(k) for k, _ in batch]
        split_s.append(_timed(ranges.split, batch) / len(batch))
        answers = [ranges.split(k, g) for k, g in batch]
        merge_s.append(_timed(ranges.merge, [(a,) for a in answers]) / len(batch))
        imbalance += [max(len(k) for k, _ in a) / (len(k0) / shards) for a, (k0, _) in zip(answers, batch)]
    return {"keys_per_push": float(np.mean(counts)), "split_s": split_s, "merge_s": merge_s,
            "max_over_mean_keys": float(np.max(imbalance))}


def _row(what: str, width: int, keys: float, seconds: list, rows_in_store="", imbalance="") -> list:
    """A table row of one operation: per second (median over rounds, and the rounds' spread), keys per second."""
    s = median(seconds)
    log(f"keyserver: {what}, width {width}, {keys:,.0f} keys: {1 / s:,.1f} per s, {keys / s:,.0f} keys/s, "
        f"{1e3 * s:.3f} ms each")
    return [what, width, f"{keys:,.0f}", f"{1 / s:,.1f}", spread([1 / x for x in seconds]), f"{keys / s:,.0f}",
            f"{1e3 * s:.3f}", rows_in_store, imbalance]


def run(quick: bool = False) -> dict:
    sizes = SIZES[quick]
    rows, ratios, raw = [], {}, []
    draws = {t: _draws_for(t) for t in TARGETS}
    for opt, width in CASES:
        for target in TARGETS:
            m = measure_store(opt, width, draws[target], sizes, seed=target + width)
            raw.append({"optimizer": opt, "width": width, "target": target, **m})
            for op in ("push", "pull"):
                rows.append(_row(f"store {op}, {opt}", width, m["keys_per_push"], m[f"{op}_s"], f"{m['rows']:,}"))
            ratios[f"keyserver_{opt}_w{width}_{target}_push_keys_per_s"] = m["keys_per_push"] / median(m["push_s"])
    for target in TARGETS:
        for shards in (1, 2, 4):
            m = measure_ranges(shards, draws[target], sizes, seed=target)
            raw.append({"shards": shards, "target": target, **m})
            for op in ("split", "merge"):
                rows.append(_row(f"{op}, S = {shards}", 1, m["keys_per_push"], m[f"{op}_s"],
                                 imbalance=f"{m['max_over_mean_keys']:.3f}"))
    return {
        "name": "keyserver", "title": "Pushes and keys per second one KeyedStore sustains, and the cost of key ranges",
        "method": __doc__,
        "columns": ["operation", "width", "keys per push", "per second", "spread (min-max)", "keys per second",
                    "ms per push", "rows in store", "most keys in one range / mean"],
        "rows": rows, "ratios": ratios, "targets": [], "raw": raw,
        "notes": [f"{sizes['warm']} warm-up pushes, then {sizes['repeats']} rounds of {sizes['pushes']} timed pushes "
                  f"per case; one process, one thread (numpy's element-wise work is single-threaded); float64 rows. "
                  "The split/merge figures are per push or pull of about that many keys; S = 1 returns its "
                  "arguments after checking them, so it is the cost of the checks alone."],
    }
