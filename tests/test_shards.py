"""server.shards = S > 1: range servers (psrv/rangeserver.py) hold key ranges of a sparse model's theta and apply only
what server 0 orders. In-process: S ranges fed the pushes of one server, in any arrival order, give its theta bit
for bit (BSP and ASP, each row-wise optimizer); the holding rules; the wire's range messages; the config's refusals.
One short multi-process run: S = 2 against S = 1 under BSP."""
import json

import numpy as np
import pytest

from psrv import config, protocol
from psrv.errors import ConfigError, ProtocolError
from psrv.keyrange import Ranges
from psrv.rangeserver import RangeStore, make_store

ROWS = 61   # 60 weights, then the bias


def _cfg(optimizer: str) -> config.Config:
    cfg = config.Config()
    cfg.train.optimizer, cfg.train.lr, cfg.train.lr_schedule = optimizer, 0.3, "constant"
    cfg.train.l1 = 0.05 if optimizer == "ftrl" else 0.0
    cfg.model.l2 = 0.1
    return cfg


def _pushes(rng, workers: int):
    """Each worker's sorted distinct keys (the bias always) and gradient on them."""
    out = []
    for _ in range(workers):
        keys = np.union1d(rng.choice(ROWS - 1, rng.integers(1, 20), replace=False), [ROWS - 1]).astype(np.uint64)
        out.append((keys, rng.standard_normal(len(keys))))
    return out


def _ranged(optimizer: str, shards: int):
    ranges = Ranges.by_bytes(shards, np.arange(ROWS, dtype=np.uint64), 8)
    cfg = _cfg(optimizer)
    own = make_store(cfg, np.zeros(ROWS), ROWS - 1)   # server 0's: range 0
    others = [RangeStore(make_store(cfg, np.zeros(ROWS), ROWS - 1), ranges, s) for s in range(1, shards)]
    return ranges, own, others


def _compose(ranges, own, others) -> np.ndarray:
    owner = ranges.owner(np.arange(ROWS, dtype=np.uint64))
    out = own.theta.copy()
    for rs in others:
        out[owner == rs.index] = rs.store.theta[owner == rs.index]
    return out


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam", "ftrl"])
@pytest.mark.parametrize("mode", ["bsp", "asp"])
def test_ranges_give_one_servers_theta_bit_for_bit(optimizer, mode):
    """One Store fed every push (what S = 1 does) against S = 3: range 0 in server 0's store, ranges 1 and 2 in
    RangeStores that get their slices and server 0's apply orders in a shuffled order."""
    rng = np.random.default_rng(7)
    one = make_store(_cfg(optimizer), np.zeros(ROWS), ROWS - 1)
    ranges, own, others = _ranged(optimizer, 3)
    version = 0
    for step in range(6):
        pushes = _pushes(rng, 3)
        events = []   # what reaches each range server, shuffled below: slices and orders race
        for wid, (keys, g) in enumerate(pushes):
            parts = ranges.split(keys, g)
            for rs in others:
                events.append((rs, "slice", (wid, step, *parts[rs.index])))
            if mode == "bsp":
                one.push(g, keys)
                own.push(*parts[0][::-1])
            else:
                version += 1
                one.update(g, step, version, 1 / 3, keys)
                own.update(parts[0][1], step, version, 1 / 3, parts[0][0])
                for rs in others:
                    events.append((rs, "order", (step, version, [[wid, step]], False, 1 / 3)))
        if mode == "bsp":
            version += 1
            one.apply_step(step, version)
            own.apply_step(step, version)
            for rs in others:
                events.append((rs, "order", (step, version, [[w, step] for w in range(3)], True, 1.0)))
        # a random arrival order, except that each range's orders keep theirs (they come over one connection)
        when = rng.random(len(events))
        for rs in others:
            mine = [i for i, e in enumerate(events) if e[0] is rs and e[1] == "order"]
            when[mine] = np.sort(when[mine])
        for i in np.argsort(when):
            rs, what, args = events[i]
            rs.slice(*args) if what == "slice" else rs.order(*args)
            rs.run()
    for rs in others:
        assert rs.run() == 0 and not rs.applies and not rs.slices and rs.version == version
    assert np.abs(one.theta).max() > 0.01
    assert np.array_equal(_compose(ranges, own, others), one.theta)


def test_an_apply_waits_for_its_slices_and_a_read_for_its_version():
    ranges, own, (rs,) = _ranged("sgd", 2)
    mine = np.flatnonzero(ranges.owner(np.arange(ROWS, dtype=np.uint64)) == 1).astype(np.uint64)
    keys = mine[:3]
    rs.read(b"w0", 5, 1, keys)
    assert rs.answerable() == []                  # version 1 is not reached
    rs.order(0, 1, [[0, 0], [1, 0]], True, 1.0)
    rs.slice(0, 0, keys, np.array([1.0, 2.0, 3.0]))
    assert rs.run() == 0 and rs.version == 0      # worker 1's slice has not arrived
    rs.slice(1, 0, keys[:1], np.array([3.0]))
    assert rs.run() == 1 and rs.version == 1
    (ident, rid, got), = rs.answerable()
    assert (ident, rid) == (b"w0", 5) and got is keys
    # the mean of the two slices, sgd at lr 0.3, L2 0.1 on weights at 0: -0.3 * [(1 + 3) / 2, 2 / 2, 3 / 2]
    assert np.allclose(rs.store.theta[keys.astype(np.int64)], [-0.6, -0.3, -0.45], atol=1e-15)


def test_slices_never_named_are_dropped_when_a_later_push_of_that_worker_applies():
    ranges, own, (rs,) = _ranged("sgd", 2)
    k = np.flatnonzero(ranges.owner(np.arange(ROWS, dtype=np.uint64)) == 1)[:1].astype(np.uint64)
    rs.slice(0, 0, k, np.ones(1))   # refused by server 0 (never named)
    rs.slice(0, 1, k, np.ones(1))
    rs.slice(1, 1, k, np.ones(1))
    rs.order(1, 1, [[0, 1]], False, 0.5)
    assert rs.run() == 1 and set(rs.slices) == {(1, 1)}


def test_a_range_refuses_keys_of_another_range_and_orders_out_of_sequence():
    ranges, own, (rs,) = _ranged("sgd", 2)
    owner = ranges.owner(np.arange(ROWS, dtype=np.uint64))
    theirs = np.flatnonzero(owner == 0)[:2].astype(np.uint64)
    with pytest.raises(ProtocolError) as e:
        rs.slice(0, 0, theirs, np.ones(2))
    assert e.value.code == "bad_keys" and "belongs to range 0" in str(e.value)
    with pytest.raises(ProtocolError) as e:
        rs.read(b"x", 1, 0, np.array([ROWS], dtype=np.uint64))
    assert e.value.code == "bad_keys"
    mine = np.flatnonzero(owner == 1)[:2].astype(np.uint64)
    with pytest.raises(ProtocolError) as e:
        rs.slice(0, 0, mine, np.ones(3))   # values not one per key
    assert e.value.code == "bad_shape"
    for bad in ([], [[0]], [[0, "1"]], [[0, 1.0]], "x"):
        with pytest.raises(ValueError):
            rs.order(0, 1, bad, True, 1.0)
    with pytest.raises(ValueError, match="does not follow"):
        rs.order(0, 2, [[0, 0]], True, 1.0)
    with pytest.raises(ValueError, match="exactly one"):
        rs.order(0, 1, [[0, 0], [1, 0]], False, 1.0)


def test_range_messages_on_the_wire():
    keys = np.array([3, 9], dtype=np.uint64)
    h, (k, v) = protocol.decode(protocol.encode({"op": "rpush", "wid": 1, "clock": 4}, (keys, np.ones(2))),
                                protocol.RANGE_REQUESTS)
    assert h["clock"] == 4 and k.tolist() == [3, 9]
    h, _ = protocol.decode(protocol.encode({"op": "apply", "step": 0, "version": 1, "pushes": [[0, 0]],
                                            "mean": True, "scale": 1}), protocol.RANGE_REQUESTS)
    assert h["pushes"] == [[0, 0]]
    bad = [({"op": "rpush", "wid": 1, "clock": 4}, (np.array([9, 3], dtype=np.uint64), np.ones(2)), "bad_keys"),
           ({"op": "rpush", "wid": 1, "clock": 4}, (keys,), "bad_frames"),
           ({"op": "rget", "version": "1"}, (keys,), "bad_field"),
           ({"op": "apply", "step": 0, "version": 1, "pushes": [], "mean": True}, (), "bad_field"),
           ({"op": "push", "wid": 1}, (), "unknown_op")]      # a worker's push goes to server 0, not to a range
    for header, arrays, code in bad:
        with pytest.raises(ProtocolError) as e:
            protocol.decode(protocol.encode(header, arrays), protocol.RANGE_REQUESTS)
        assert e.value.code == code, header


SHARDED = {"data": {"source": "criteo"}, "model": {"kind": "sparse_logistic"}, "server": {"shards": 2},
           "checkpoint": {"every_steps": 0}}


def test_several_servers_for_a_sparse_model():
    assert config.Config.from_dict(SHARDED, frozenset()).server.shards == 2


@pytest.mark.parametrize("key,value", [("model.kind", "logistic"), ("train.clip_norm", 1.0),
                                       ("checkpoint.every_steps", 10), ("worker.shm", False)])
def test_what_several_servers_refuse(key, value):
    section, name = key.split(".")
    cfg = {**SHARDED, section: {**SHARDED.get(section, {}), name: value}}
    if key == "model.kind":
        cfg["data"] = {}   # a dense model's synthetic data
    with pytest.raises(ConfigError, match="server.shards" if key == "model.kind" else key):
        config.Config.from_dict(cfg, frozenset())


RUN = ["--set", "train.workers=2", "--set", "train.batch_size=100", "--set", "data.source=criteo",
       "--set", "data.n=3000", "--set", "data.test_fraction=0.2", "--set", "data.log2_buckets=9", "--set", "model.kind=sparse_logistic",
       "--set", "train.optimizer=adagrad", "--set", "train.lr=0.5", "--set", "train.lr_schedule=constant",
       "--set", "train.steps=24", "--set", "train.eval_every=8", "--set", "checkpoint.every_steps=0",
       "--set", "output.plot=false", "--set", "output.live_view=false", "-q"]


@pytest.mark.slow
def test_two_servers_give_one_servers_theta_under_bsp(launch, tmp_path):
    """The same job with server.shards = 1 and 2 (same batches: BSP, the same shards): the same theta to 1e-10,
    the same held-out AUC; every process and segment gone after."""
    out = {}
    for s in (1, 2):
        la = launch(*RUN, "--set", "train.consistency=bsp", "--set", f"server.shards={s}",
                    "--set", f"output.dir={tmp_path / str(s)}")
        code, _, err = la.wait()
        assert code == 0, err
        la.assert_no_leftovers()
        out[s] = (np.load(tmp_path / str(s) / "theta.npy"), json.loads((tmp_path / str(s) / "summary.json").read_text()))
    (a, sa), (b, sb) = out[1], out[2]
    assert np.abs(a).max() > 0.05 and np.abs(a - b).max() < 1e-10
    assert sb["steps"] == sa["steps"] == 24 and abs(sa["test_metric"] - sb["test_metric"]) < 1e-9
