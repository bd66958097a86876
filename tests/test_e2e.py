"""End to end with real processes: the distributed result against independent numpy oracles."""
import json
import math

import numpy as np
import pytest

import psrv
from psrv import config, data, optim

from .conftest import ROOT

pytestmark = pytest.mark.slow

M64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """splitmix64's output function, written out with Python ints (independent of psrv.partition)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def epoch_order(seed, shard, epoch, size):
    """docs/protocol.md's batch order, in plain Python: positions sorted by sm(key + position)."""
    key = splitmix64((splitmix64((splitmix64(seed) + shard) & M64) + epoch) & M64)
    return sorted(range(size), key=lambda p: (splitmix64((key + p) & M64), p))


def block_order(seed, shard, epoch, size, batch):
    """data.batch_order = "blocks": whole blocks of `batch` rows in epoch_order over the blocks, the tail last."""
    full = size // batch
    return [b * batch + j for b in epoch_order(seed, shard, epoch, full) for j in range(batch)] + \
        list(range(full * batch, size))


def stored(shards, data_seed):
    """data.batch_order = "blocks": each shard's rows as stored, permuted once by epoch_order(seed, s, 2**64 - 1)."""
    return [rows[epoch_order(data_seed, s, M64, len(rows))] for s, rows in enumerate(shards)]


def shard_rows(n, k, how):
    if how == "range":
        return np.array_split(np.arange(n), k)
    owner = np.array([splitmix64(i) % k for i in range(n)])
    return [np.flatnonzero(owner == s) for s in range(k)]


def cosine(lr, steps, lr_min=0.0):
    return lambda t: lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * min(t, steps) / steps))


class Batches:
    """Each shard's rows in its epoch order (docs/protocol.md), handed out `rows` at a time (never across an
    epoch's end, so the last batch of an epoch may be short). blocks: the epoch order is block_order (the shards
    given as stored)."""

    def __init__(self, shards, batch, seed, blocks=False):
        self.shards, self.batch, self.seed, self.blocks = shards, batch, seed, blocks
        self.orders, self.cursor = {}, [(0, 0)] * len(shards)

    def take(self, s, rows):
        epoch, pos = self.cursor[s]
        size = len(self.shards[s])
        if (s, epoch) not in self.orders:
            self.orders[s, epoch] = np.array(block_order(self.seed, s, epoch, size, self.batch) if self.blocks
                                             else epoch_order(self.seed, s, epoch, size))
        idx = self.shards[s][self.orders[s, epoch][pos:pos + rows]]
        pos += len(idx)
        self.cursor[s] = (epoch + 1, 0) if pos == size else (epoch, pos)
        return idx


def standardized(X):
    """(A, unscale): X standardized with an intercept column, and the map from theta on A to theta on X."""
    mean, scale = X.mean(axis=0), X.std(axis=0)

    def unscale(theta):
        w = theta[:-1] / scale
        return np.r_[w, theta[-1] - mean @ w]
    return np.c_[(X - mean) / scale, np.ones(len(X))], unscale


def serial_bsp(X, y, shards, batch, steps, lr_at, seed, skip=frozenset(), local_steps=1, blocks=False, l2=0.0,
               clip_norm=0.0):
    """The same algorithm in one process: standardize, then each step average every shard's mini-batch gradient
    of the mean squared loss, the batches as Batches hands them out. `skip` holds (worker, step) pairs whose
    gradient is left out of that step's mean (a rejected push); the batch is still consumed. With local_steps = H
    (local SGD), each shard's step takes H * batch rows and its gradient is the sum of H plain SGD steps'
    gradients, taken `batch` rows at a time from a copy of theta. Each gradient is scaled down to norm clip_norm
    if longer, and l2 * the weights (theta without the intercept) is added: to the mean at a BSP step, to each
    local step's gradient under local SGD (where the workers apply both)."""
    A, unscale = standardized(X)
    theta = np.zeros(A.shape[1])
    batches = Batches(shards, batch, seed, blocks)
    for t in range(steps):
        g = np.zeros_like(theta)
        used = 0
        for s in range(len(shards)):
            idx = batches.take(s, batch * local_steps)
            if (s, t) not in skip:
                local = theta.copy()
                for lo in range(0, len(idx), batch):
                    part = idx[lo:lo + batch]
                    step_grad = 2.0 / len(part) * A[part].T @ (A[part] @ local - y[part])
                    norm = np.linalg.norm(step_grad)
                    if 0 < clip_norm < norm:
                        step_grad = step_grad * (clip_norm / norm)
                    if local_steps > 1:
                        step_grad = step_grad + l2 * np.r_[local[:-1], 0.0]
                    g += step_grad
                    local -= lr_at(t) * step_grad
                used += 1
        if used:
            term = l2 * np.r_[theta[:-1], 0.0] if local_steps == 1 else 0.0
            theta = theta - lr_at(t) * (g / used + term)
    return unscale(theta)


@pytest.mark.parametrize("how,workers,shm,order,copy", [("range", 2, True, "rows", "auto"),
                                                        ("hash", 3, True, "rows", "auto"),
                                                        ("range", 2, False, "rows", "off"),
                                                        ("hash", 3, True, "blocks", "auto"),
                                                        ("hash", 3, True, "blocks", "off")])
def test_bsp_equals_serial_numpy_on_the_same_batches(tmp_path, how, workers, shm, order, copy):
    """copy: data.worker_copy (rows read from private copies, or in place in shared memory)"""
    n, d, batch, steps, lr = 2000, 5, 32, 80, 0.05   # 80 steps of 32 rows cross an epoch of every shard
    result = psrv.train({"data": {"n": n, "d": d, "partition": how, "seed": 4, "batch_order": order,
                                  "worker_copy": copy},
                         "train": {"workers": workers, "batch_size": batch, "steps": steps, "lr": lr,
                                   "seed": 11, "lr_schedule": "cosine"},
                         "worker": {"shm": shm},      # theta and gradients through shared memory, or ZeroMQ
                         "output": {"dir": str(tmp_path), "plot": False}})
    X, y, _, _ = data.load_arrays(config.load({"data": {"n": n, "d": d, "seed": 4}}).data)
    shards = shard_rows(n, workers, how)
    if order == "blocks":
        shards = stored(shards, data_seed=4)
    expected = serial_bsp(X, y, shards, batch, steps, cosine(lr, steps), seed=11, blocks=order == "blocks")
    got = np.load(tmp_path / "theta.npy")
    assert np.abs(got - expected).max() <= 1e-10 * np.abs(expected).max()
    np.testing.assert_array_equal(result.theta, got)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s == result.summary
    assert s["steps"] == steps and s["workers"] == workers and s["partition"] == how
    assert s["rows"] == n and s["cols"] == d and s["staleness_max"] == 0
    assert s["samples"] == sum(int(v) for v in s["rows_visited"].values())


@pytest.mark.parametrize("order", ["rows", "blocks"])
def test_local_sgd_equals_serial_model_averaging(tmp_path, order):
    """train.local_steps = 4: each worker takes 4 SGD steps on its own copy between pushes; a BSP step then
    averages the workers' models (their summed gradients, applied at the same lr). Under data.batch_order =
    "blocks" each local step reads one block in place."""
    n, d, batch, steps, lr, workers = 3000, 4, 25, 20, 0.02, 3   # 20 steps of 100 rows cross an epoch of each shard
    r = psrv.train({"data": {"n": n, "d": d, "seed": 2, "batch_order": order},
                    "train": {"workers": workers, "batch_size": batch, "steps": steps, "lr": lr, "seed": 5,
                              "lr_schedule": "constant", "local_steps": 4},
                    "output": {"dir": str(tmp_path), "plot": False}})
    X, y, _, _ = data.load_arrays(config.load({"data": {"n": n, "d": d, "seed": 2}}).data)
    shards = shard_rows(n, workers, "range")
    if order == "blocks":
        shards = stored(shards, data_seed=2)
    expected = serial_bsp(X, y, shards, batch, steps, lambda t: lr, seed=5, local_steps=4, blocks=order == "blocks")
    assert np.abs(r.theta - expected).max() <= 1e-10 * np.abs(expected).max()
    assert r.summary["samples"] == steps * workers * 4 * batch


PENALIZED = {"batch_size": 32, "steps": 12, "lr": 0.05}   # the runs with model.l2 and train.clip_norm below


def penalized_run(tmp_path, n: int, workers: int, how: str, data_seed: int, l2: float, train: dict):
    """A run of the synthetic job (d = 5) with model.l2 and PENALIZED + `train`, and what it read:
    (result, X, y, shards)."""
    r = psrv.train({"data": {"n": n, "d": 5, "partition": how, "seed": data_seed}, "model": {"l2": l2},
                    "train": {"workers": workers, **PENALIZED, **train},
                    "output": {"dir": str(tmp_path), "plot": False}})
    X, y, _, _ = data.load_arrays(config.load({"data": {"n": n, "d": 5, "seed": data_seed}}).data)
    return r, X, y, shard_rows(n, workers, how)


@pytest.mark.parametrize("local_steps", [1, 4])
@pytest.mark.parametrize("l2,clip_norm", [(0.05, 0.0), (0.0, 1.5), (0.05, 1.5)])
def test_l2_and_clipping_equal_the_serial_algorithm_with_a_push_per_step_and_with_local_sgd(tmp_path, local_steps,
                                                                                          l2, clip_norm):
    """With a push per batch the server clips each push and adds the L2 term to the step's mean; under local SGD
    each worker clips and penalizes its own local steps (welcome.train.local) and the server does neither: both
    against the serial algorithm doing the same (1e-10)."""
    batch, steps, lr = PENALIZED["batch_size"], PENALIZED["steps"], PENALIZED["lr"]
    r, X, y, shards = penalized_run(tmp_path, 2000, 2, "range", 2, l2, {"seed": 5, "lr_schedule": "constant",
                                                                        "local_steps": local_steps,
                                                                        "clip_norm": clip_norm})
    expected = serial_bsp(X, y, shards, batch, steps, lambda t: lr, seed=5, local_steps=local_steps, l2=l2,
                          clip_norm=clip_norm)
    assert np.abs(r.theta - expected).max() <= 1e-10 * np.abs(expected).max()
    plain = serial_bsp(X, y, shards, batch, steps, lambda t: lr, seed=5, local_steps=local_steps)
    assert np.abs(plain - expected).max() > 1e-4 * np.abs(expected).max()   # the test tells them apart
    # who clipped: the server counts its own; the workers' (local SGD) are theirs to log
    assert (r.summary["clipped"] is None) == (local_steps > 1 and clip_norm > 0)


def rule(name, h):
    """One step of an optimizer's rule, theta <- rule(theta, g, lr), written here from the rules (as
    tests/test_optim.py's reference), its state kept in the closure; h: its hyper-parameters."""
    st = {"a": 0.0, "b": 0.0, "t": 0}

    def step(theta, g, lr):
        st["t"] += 1
        if name == "sgd":
            return theta - lr * g
        if name == "momentum":
            st["a"] = h["momentum"] * st["a"] + g
            return theta - lr * (g + h["momentum"] * st["a"] if h["nesterov"] else st["a"])
        if name == "adagrad":
            st["a"] = st["a"] + g * g
            return theta - lr * g / (np.sqrt(st["a"]) + h["eps"])
        assert name == "adam"
        st["a"] = h["beta1"] * st["a"] + (1 - h["beta1"]) * g
        st["b"] = h["beta2"] * st["b"] + (1 - h["beta2"]) * g * g
        mhat, vhat = st["a"] / (1 - h["beta1"] ** st["t"]), st["b"] / (1 - h["beta2"] ** st["t"])
        return theta - lr * mhat / (np.sqrt(vhat) + h["eps"])
    return step


def serial_group(X, y, shards, batch, steps, lr_at, seed, k_steps, blocks=False, l2=0.0, clip_norm=0.0,
                 optimizer=None):
    """train.group_steps = K in one process: BSP's steps, taken K at a time. A group step takes each shard's next
    min(K, steps left) * batch rows (never across an epoch's end) and holds as many steps as the longest of those
    has batches; its step k (the run's step t) applies theta <- theta - lr_at(t) * (1/N * (sum over the shards
    that still have rows at k of the gradient on their k-th `batch` rows, each scaled down to norm clip_norm if
    longer) + l2 * the weights (theta without the intercept)), N the number of shards (workers); with
    `optimizer` (rule(...)), theta <- optimizer(theta, that mean + the L2 term, lr_at(t)) instead."""
    A, unscale = standardized(X)
    theta = np.zeros(A.shape[1])
    optimizer = optimizer or rule("sgd", {})
    batches = Batches(shards, batch, seed, blocks)
    t = 0
    while t < steps:
        parts = []
        for s in range(len(shards)):
            idx = batches.take(s, batch * min(k_steps, steps - t))
            parts.append([idx[lo:lo + batch] for lo in range(0, len(idx), batch)])
        for k in range(max(len(sub) for sub in parts)):
            grads = []
            for sub in parts:
                if k < len(sub):
                    p = sub[k]
                    gi = 2.0 / len(p) * A[p].T @ (A[p] @ theta - y[p])
                    norm = np.linalg.norm(gi)
                    grads.append(gi * (clip_norm / norm) if 0 < clip_norm < norm else gi)
            weights = np.r_[theta[:-1], 0.0]
            theta = optimizer(theta, sum(grads) / len(shards) + l2 * weights, lr_at(t))
            t += 1
    return unscale(theta)


@pytest.mark.parametrize("order", ["rows", "blocks"])
def test_group_steps_equal_serial_bsp_of_the_sub_steps(tmp_path, order):
    """train.group_steps = 4: each push covers 4 steps that the workers synchronize among themselves through
    shared memory (psrv/group.py); the run equals the serial algorithm's steps, epoch ends included, each at its
    own rate of the schedule, and train.steps counts those steps. Shards of 671, 672 and 657 rows: each epoch is 5
    group steps of 4 steps and one of 1; the last, from step 42, holds the 2 steps left (the schedule's floor
    lr_min, above 0, makes a step past train.steps change theta)."""
    n, d, batch, steps, lr, workers, k = 2000, 5, 32, 44, 0.05, 3, 4   # 44 x 32 rows cross an epoch of each shard
    r = psrv.train({"data": {"n": n, "d": d, "partition": "hash", "seed": 4, "batch_order": order},
                    "train": {"workers": workers, "batch_size": batch, "steps": steps, "lr": lr, "seed": 11,
                              "lr_schedule": "cosine", "lr_min": 0.01, "group_steps": k},
                    "output": {"dir": str(tmp_path), "plot": False}})
    X, y, _, _ = data.load_arrays(config.load({"data": {"n": n, "d": d, "seed": 4}}).data)
    shards = shard_rows(n, workers, "hash")
    if order == "blocks":
        shards = stored(shards, data_seed=4)
    rate = cosine(lr, steps, 0.01)
    expected = serial_group(X, y, shards, batch, steps, rate, seed=11, k_steps=k, blocks=order == "blocks")
    assert np.abs(r.theta - expected).max() <= 1e-10 * np.abs(expected).max()
    assert r.summary["steps"] == steps and r.summary["workers"] == workers
    # the test tells apart a rate held for each group step, and 2 more steps (a last group step of 4)
    held = serial_group(X, y, shards, batch, steps, lambda t: rate(t - t % k), seed=11, k_steps=k,
                        blocks=order == "blocks")
    longer = serial_group(X, y, shards, batch, steps + 2, rate, seed=11, k_steps=k, blocks=order == "blocks")
    for other in (held, longer):
        assert np.abs(other - expected).max() > 1e-6 * np.abs(expected).max()


OPT_HYPER = {"momentum": 0.8, "nesterov": False, "beta1": 0.85, "beta2": 0.95, "eps": 1e-6}


@pytest.mark.parametrize("name,changes,l2", [("momentum", {}, 0.05), ("momentum", {"nesterov": True}, 0.0),
                                             ("adagrad", {}, 0.0), ("adam", {}, 0.05)],
                         ids=["momentum-l2", "nesterov", "adagrad", "adam-l2"])
def test_group_steps_with_the_servers_optimizer_equal_serial_bsp_of_the_sub_steps(tmp_path, name, changes, l2):
    """train.group_steps = 4 with momentum, Adagrad or Adam: the members apply train.optimizer's rule to each
    sub-step's mean gradient (plus the L2 term), starting each group step from the server's optimizer state and
    leaving theirs for it; the run is the serial algorithm's BSP steps under that rule (the epoch ends and the last
    group step cut to the 2 steps left as in the SGD test above)."""
    n, d, batch, steps, lr, workers, k = 2000, 5, 32, 44, 0.05, 3, 4
    h = {**OPT_HYPER, **changes}
    r = psrv.train({"data": {"n": n, "d": d, "partition": "hash", "seed": 4}, "model": {"l2": l2},
                    "train": {"workers": workers, "batch_size": batch, "steps": steps, "lr": lr, "seed": 11,
                              "lr_schedule": "cosine", "lr_min": 0.01, "group_steps": k, "optimizer": name,
                              **{key: h[key] for key in optim.OPTIMIZERS[name].hyper}},
                    "output": {"dir": str(tmp_path), "plot": False}})
    X, y, _, _ = data.load_arrays(config.load({"data": {"n": n, "d": d, "seed": 4}}).data)
    shards = shard_rows(n, workers, "hash")
    rate = cosine(lr, steps, 0.01)
    expected = serial_group(X, y, shards, batch, steps, rate, seed=11, k_steps=k, l2=l2, optimizer=rule(name, h))
    assert np.abs(r.theta - expected).max() <= 1e-10 * np.abs(expected).max()
    assert r.summary["steps"] == steps
    # the test tells apart plain SGD, and an optimizer whose state restarts every k steps
    sgd = serial_group(X, y, shards, batch, steps, rate, seed=11, k_steps=k, l2=l2)
    count, fresh = [0], [None]

    def restarting(theta, g, lr_t):
        if count[0] % k == 0:
            fresh[0] = rule(name, h)
        count[0] += 1
        return fresh[0](theta, g, lr_t)
    restarted = serial_group(X, y, shards, batch, steps, rate, seed=11, k_steps=k, l2=l2, optimizer=restarting)
    for other in (sgd, restarted):
        assert np.abs(other - expected).max() > 1e-6 * np.abs(expected).max()


def test_group_steps_log_the_lines_bsp_logs(tmp_path):
    """metrics.jsonl under group steps: a line at each step train.log_every names, inside group steps too, with
    the loss BSP without group steps logs there (the members note each sub-step's loss and end in shared memory;
    psrv/group.py). The oracle is the same run with a push per step."""
    def lines(k):
        out = tmp_path / f"k{k}"
        psrv.train({"data": {"n": 2000, "d": 5, "partition": "hash", "seed": 4},
                    "train": {"workers": 3, "batch_size": 32, "steps": 57, "lr": 0.05, "seed": 11,
                              "lr_schedule": "cosine", "group_steps": k, "log_every": 5},
                    "output": {"dir": str(out), "plot": False}})
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x]
    plain, grouped = lines(1), lines(4)
    steps = [x["step"] for x in grouped if not x.get("full")]
    assert steps == [x["step"] for x in plain if not x.get("full")] == [*range(5, 56, 5), 57]
    for x, y in zip(plain, grouped):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-9)
    times = [x["elapsed_s"] for x in grouped if not x.get("full")]
    assert times == sorted(times) and times[0] > 0


def test_a_group_step_whose_longest_batch_ends_in_a_part_of_a_step_counts_that_step(tmp_path):
    """Range shards of 600 rows: each epoch ends with a group step of 88 rows, 3 steps of which the last has 24
    rows; the step count (and so every later rate) must count it."""
    n, d, batch, steps, lr, workers, k = 1800, 5, 32, 30, 0.05, 3, 4
    r = psrv.train({"data": {"n": n, "d": d, "partition": "range", "seed": 4},
                    "train": {"workers": workers, "batch_size": batch, "steps": steps, "lr": lr, "seed": 11,
                              "lr_schedule": "cosine", "group_steps": k},
                    "output": {"dir": str(tmp_path), "plot": False}})
    X, y, _, _ = data.load_arrays(config.load({"data": {"n": n, "d": d, "seed": 4}}).data)
    expected = serial_group(X, y, shard_rows(n, workers, "range"), batch, steps, cosine(lr, steps), seed=11,
                            k_steps=k)
    assert r.summary["steps"] == steps
    assert np.abs(r.theta - expected).max() <= 1e-10 * np.abs(expected).max()


@pytest.mark.parametrize("l2,clip_norm", [(0.05, 0.0), (0.0, 1.5), (0.05, 1.5)])
def test_group_steps_with_l2_and_clipping_equal_serial_bsp_of_the_sub_steps(tmp_path, l2, clip_norm):
    """The members clip each gradient and add model.l2's term at every sub-step, as the server does at a BSP step,
    and push how far theta moved; a member whose rows end early (an epoch's end) still follows the sub-steps,
    which the L2 term moves. The serial oracle does the same arithmetic in one process."""
    # shards of 632, 647 and 621 rows: at group step 5 (steps 20 to 23), worker 1's epoch ends after one sub-step
    # of 7 rows while the others take 4 sub-steps of their next epoch, which it follows
    batch, steps, lr, k = PENALIZED["batch_size"], 47, PENALIZED["lr"], 4
    r, X, y, shards = penalized_run(tmp_path, 1900, 3, "hash", 4, l2, {"seed": 11, "lr_schedule": "cosine",
                                                                       "group_steps": k, "clip_norm": clip_norm,
                                                                       "steps": steps})
    expected = serial_group(X, y, shards, batch, steps, cosine(lr, steps), seed=11, k_steps=k, l2=l2,
                            clip_norm=clip_norm)
    assert np.abs(r.theta - expected).max() <= 1e-10 * np.abs(expected).max() and r.summary["steps"] == steps
    # the oracle without the term or the clipping is another run: the test can tell them apart
    plain = serial_group(X, y, shards, batch, steps, cosine(lr, steps), seed=11, k_steps=k)
    assert np.abs(plain - expected).max() > 1e-4 * np.abs(expected).max()
    # the workers clip, which no push tells the server: its summary does not pretend to have counted
    assert r.summary["clipped"] == (None if clip_norm else 0)


def lstsq_loss(X, y):
    A = np.c_[X, np.ones(len(X))]
    theta = np.linalg.lstsq(A, y, rcond=None)[0]
    return float(np.mean((A @ theta - y) ** 2))


@pytest.mark.parametrize("name", ["default.toml", "seed_example.toml"])
def test_shipped_configs_reach_the_least_squares_optimum(tmp_path, name):
    path = ROOT / "configs" / name
    r = psrv.train(path, [f"output.dir={tmp_path}", "output.plot=false"])
    X, y, _, _ = data.load_arrays(config.load(path).data)
    optimum = lstsq_loss(X, y)
    assert abs(r.summary["final_loss"] - optimum) <= 1e-3 * optimum
    # final_loss is the MSE of theta.npy on the data as given (an independent recomputation)
    mse = float(np.mean((X @ r.theta[:-1] + r.theta[-1] - y) ** 2))
    assert r.summary["final_loss"] == pytest.approx(mse, rel=1e-9)


def test_outputs(tmp_path):
    r = psrv.train(None, [f"output.dir={tmp_path}", "output.plot=false", "data.n=3000", "train.steps=25",
                          "train.log_every=10", "train.workers=2"])
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if not x.get("full")] == [10, 20, 25]
    assert all(x["loss"] > 0 and x["elapsed_s"] >= 0 for x in lines)
    assert lines[-1]["full"] and lines[-1]["loss"] == r.summary["final_loss"]
    eff = config.load(tmp_path / "config.toml")
    assert eff.train.workers == 2 and eff.output.dir == str(tmp_path) and eff.data.n == 3000
    assert (tmp_path / "address").read_text().startswith("tcp://127.0.0.1:")
    for key in ("steps", "wall_s", "samples_per_s", "final_loss", "workers", "consistency", "partition", "rows",
                "cols"):
        assert key in r.summary
    assert r.theta.shape == (r.summary["cols"] + 1,)


def test_data_files_train_like_synthetic(tmp_path):
    X, y, _, _ = data.load_arrays(config.load({"data": {"n": 4000, "d": 3}}).data)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    with open(tmp_path / "d.csv", "w") as fh:
        fh.write("a,b,c,target\n")
        np.savetxt(fh, np.c_[X, y], delimiter=",", fmt="%.17g")
    thetas = []
    for src in ("d.npz", "d.csv"):
        r = psrv.train({"data": {"source": str(tmp_path / src)}, "train": {"workers": 2, "steps": 40},
                        "output": {"dir": str(tmp_path / src.replace(".", "_")), "plot": False}})
        thetas.append(r.theta)
    np.testing.assert_allclose(thetas[0], thetas[1], rtol=1e-12)


def test_block_batches_reach_the_same_held_out_loss_as_row_batches(tmp_path):
    """data.batch_order = "blocks" (a batch is a random block of consecutive rows of a shard shuffled once) keeps
    SGD's statistics: the same job, the same number of samples, reaches a held-out loss within 1% of the row
    order's."""
    def held_out(order):
        r = psrv.train({"data": {"n": 20_000, "d": 20, "seed": 3, "test_fraction": 0.2, "batch_order": order},
                        "train": {"workers": 2, "batch_size": 64, "steps": 400, "lr": 0.02,
                                  "lr_schedule": "constant"},
                        "output": {"dir": str(tmp_path / order), "plot": False}})
        return r.summary["test_loss"], r.summary["samples"]
    (rows, n_rows), (blocks, n_blocks) = held_out("rows"), held_out("blocks")
    assert n_rows == n_blocks
    assert abs(blocks - rows) <= 0.01 * rows
