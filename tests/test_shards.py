"""server.shards = S > 1: range servers (psrv/rangeserver.py) hold key ranges of a sparse model's theta and apply only
what server 0 orders. In-process: S ranges fed the pushes of one server, in any arrival order, give its theta bit
for bit (BSP and ASP, each row-wise optimizer); the holding rules; the wire's range messages; the config's refusals;
a push a single server would refuse for its slice on range 1 alone is refused whole and applied on no range.
Two short multi-process runs: S = 2 against S = 1 under BSP; a range server killed mid-run and restarted, the run
exact."""
import json
import math
import os
import signal
from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from psrv import config, events as ev, protocol, transport
from psrv.errors import ConfigError, ProtocolError
from psrv.keyrange import Ranges
from psrv.rangeserver import RangeLinks, RangeStore, make_store, range_rows
from psrv.server import Server
from tests.coord_harness import H, SID

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


def _range_store(cfg, ranges, s: int) -> RangeStore:
    """Range s as a range server builds it: a store over only its own rows of theta."""
    keys = range_rows(ranges, s, ROWS)
    return RangeStore(make_store(cfg, np.zeros(len(keys)), ROWS - 1, rows=keys), ranges, s, keys, ROWS)


def _ranged(optimizer: str, shards: int):
    ranges = Ranges.by_bytes(shards, np.arange(ROWS, dtype=np.uint64), 8)
    cfg = _cfg(optimizer)
    own = make_store(cfg, np.zeros(ROWS), ROWS - 1)   # server 0's: range 0
    others = [_range_store(cfg, ranges, s) for s in range(1, shards)]
    return ranges, own, others


def _compose(ranges, own, others) -> np.ndarray:
    out = own.theta.copy()
    for rs in others:
        out[rs.keys.astype(np.int64)] = rs.store.theta
    return out


def test_a_range_store_holds_only_its_own_rows():
    ranges, _, others = _ranged("adagrad", 4)
    owner = ranges.owner(np.arange(ROWS, dtype=np.uint64))
    for rs in others:
        assert np.array_equal(rs.keys, np.flatnonzero(owner == rs.index))
        assert rs.store.theta.shape == (len(rs.keys),) and rs.store.acc.shape == (len(rs.keys),)
        assert len(rs.keys) < ROWS / 2    # about ROWS / 4 each
    assert sum(len(rs.keys) for rs in others) == np.count_nonzero(owner != 0)
    with pytest.raises(ValueError, match="holds"):
        RangeStore(make_store(_cfg("sgd"), np.zeros(ROWS), ROWS - 1), ranges, 1, others[0].keys, ROWS)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "adam", "ftrl"])
@pytest.mark.parametrize("mode", ["bsp", "asp"])
def test_ranges_give_one_servers_theta_bit_for_bit(optimizer, mode):
    """One Store fed every push (what S = 1 does) against S = 3: range 0 in server 0's store, ranges 1 and 2 in
    RangeStores that get their slices and server 0's apply orders in a shuffled order."""
    rng = np.random.default_rng(7)
    one = make_store(_cfg(optimizer), np.zeros(ROWS), ROWS - 1)
    ranges, own, others = _ranged(optimizer, 3)
    numbers = {rs.index: {} for rs in others}      # (wid, clock) -> the range's number for that slice
    waiting = {rs.index: deque() for rs in others}  # orders not sent yet: a slice they name is not measured
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
        # a random arrival order, except that each range's orders keep theirs (they come over one connection) and
        # none goes out before the range has measured every slice it names (server 0 waits for the measurements)
        when = rng.random(len(events))
        for rs in others:
            mine = [i for i, e in enumerate(events) if e[0] is rs and e[1] == "order"]
            when[mine] = np.sort(when[mine])
        for i in np.argsort(when):
            rs, what, args = events[i]
            if what == "slice":
                numbers[rs.index][args[:2]] = rs.slice(*args)[0]
            else:
                waiting[rs.index].append(args)
            q = waiting[rs.index]
            while q and all(tuple(p) in numbers[rs.index] for p in q[0][2]):
                at, v, pushes, mean, scale = q.popleft()
                rs.order(at, v, [[*p, numbers[rs.index][tuple(p)]] for p in pushes], mean, scale)
            rs.run()
    for rs in others:
        assert rs.run() == 0 and not rs.orders and not rs.slices and rs.version == version
    assert np.abs(one.theta).max() > 0.01
    assert np.array_equal(_compose(ranges, own, others), one.theta)


def test_an_apply_waits_for_its_slices_and_a_read_for_its_version():
    ranges, own, (rs,) = _ranged("sgd", 2)
    mine = np.flatnonzero(ranges.owner(np.arange(ROWS, dtype=np.uint64)) == 1).astype(np.uint64)
    keys = mine[:3]
    rs.read(b"w0", 5, 1, keys)
    assert rs.answerable() == []                  # version 1 is not reached
    rs.order(0, 1, [[0, 0, 1], [1, 0, 2]], True, 1.0)   # the slices' numbers: they arrive first and second
    assert rs.slice(0, 0, keys, np.array([1.0, 2.0, 3.0])) == (1, True, 14.0)
    assert rs.run() == 0 and rs.version == 0      # worker 1's slice has not arrived
    assert rs.slice(1, 0, keys[:1], np.array([3.0])) == (2, True, 9.0)
    assert rs.run() == 1 and rs.version == 1
    (ident, rid, got), = rs.answerable()
    assert (ident, rid) == (b"w0", 5) and np.array_equal(rs.keys[got], keys)   # the range's own rows of the keys
    # the mean of the two slices, sgd at lr 0.3, L2 0.1 on weights at 0: -0.3 * [(1 + 3) / 2, 2 / 2, 3 / 2]
    assert np.allclose(rs.values(keys), [-0.6, -0.3, -0.45], atol=1e-15)


def test_slices_never_named_are_dropped_when_a_later_push_of_that_worker_applies():
    ranges, own, (rs,) = _ranged("sgd", 2)
    k = np.flatnonzero(ranges.owner(np.arange(ROWS, dtype=np.uint64)) == 1)[:1].astype(np.uint64)
    rs.slice(0, 0, k, np.ones(1))   # refused by server 0 (never named)
    rs.slice(0, 1, k, np.ones(1))
    rs.slice(1, 1, k, np.ones(1))
    rs.slice(0, 1, k, np.full(1, 2.0))   # the same clock again (a resent push): server 0 judged and names the first
    rs.order(1, 1, [[0, 1, 2]], False, 0.5)
    assert rs.run() == 1 and set(rs.slices) == {3}
    assert rs.values(k)[0] == -0.3 * 0.5   # sgd at lr 0.3, scale 0.5, on the first slice's 1.0


def test_a_save_waits_for_the_orders_before_it_and_only_the_current_sids_slices_apply(tmp_path):
    ranges, own, (rs,) = _ranged("ftrl", 2)
    saved = []
    rs.on_save = lambda step: saved.append((step, rs.version))
    k = np.flatnonzero(ranges.owner(np.arange(ROWS, dtype=np.uint64)) == 1)[:2].astype(np.uint64)
    rs.synced("A")
    rs.order(0, 1, [[0, 0, 2]], True, 1.0)
    with pytest.raises(ValueError, match="not the 1"):
        rs.save(0, 0)
    rs.save(1, 1)
    rs.slice(0, 0, k, np.ones(2), sid="B")        # computed for another server 0 (before it went back)
    assert rs.run() == 0 and saved == []
    rs.slice(0, 0, k, np.ones(2), sid="A")
    assert rs.run() == 1 and saved == [(1, 1)]
    rs.slice(1, 1, k, np.ones(2), sid="A")
    rs.synced("C")
    assert rs.slices == {}
    # the range's checkpoint (keyrange's format, a Store's state) restores it bit for bit after more updates
    from psrv.keyrange import load_range, save_range
    save_range(str(tmp_path), 1, rs.store, ranges, 1)
    theta, opt = rs.store.theta.copy(), rs.store.opt.state_dict()
    rs.order(1, 2, [[0, 1, 4]], True, 1.0)
    rs.slice(0, 1, k, np.full(2, 3.0), sid="C")
    assert rs.run() == 1 and not np.array_equal(rs.store.theta, theta)
    load_range(str(tmp_path), 1, rs.store, ranges, 1)
    rs.loaded("D")
    assert rs.version == 1 and rs.ordered == 1 and np.array_equal(rs.store.theta, theta)
    assert all(np.array_equal(v, opt["arrays"][n]) for n, v in rs.store.opt.state_dict()["arrays"].items())
    with pytest.raises(ValueError, match="does not follow"):
        rs.order(1, 3, [[0, 1, 5]], True, 1.0)


def test_a_range_holds_a_bounded_number_of_slices_per_worker():
    ranges, _, (rs,) = _ranged("sgd", 2)
    rs.max_held = 3
    k = range_rows(ranges, 1, ROWS)[:2]
    numbers = [rs.slice(0, clock, k, np.ones(2))[0] for clock in range(3)]   # e.g. a refused streak
    with pytest.raises(ProtocolError) as e:
        rs.slice(0, 3, k, np.ones(2))
    assert e.value.code == "too_many_slices" and set(rs.slices) == set(numbers)   # not held
    rs.slice(1, 0, k, np.ones(2))                 # another worker's are its own
    rs.order(0, 1, [[0, 2, numbers[2]]], False, 1.0)
    assert rs.run() == 1                          # worker 0's push for clock 2 applied: its older slices go
    assert [v[1] for v in rs.slices.values()] == [1]
    rs.slice(0, 3, k, np.ones(2))                 # and it may push again


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
    for bad in ([], [[0]], [[0, 0]], [[0, 0, "1"]], [[0, 0, 1.0]], "x"):
        with pytest.raises(ValueError):
            rs.order(0, 1, bad, True, 1.0)
    with pytest.raises(ValueError, match="does not follow"):
        rs.order(0, 2, [[0, 0, 1]], True, 1.0)
    with pytest.raises(ValueError, match="exactly one"):
        rs.order(0, 1, [[0, 0, 1], [1, 0, 2]], False, 1.0)
    n, _, _ = rs.slice(0, 0, mine, np.ones(2))
    rs.order(0, 1, [[1, 0, n]], True, 1.0)   # a number that is another push's slice: a bug in server 0
    with pytest.raises(ValueError, match="not"):
        rs.run()


def test_range_messages_on_the_wire():
    keys = np.array([3, 9], dtype=np.uint64)
    h, (k, v) = protocol.decode(protocol.encode({"op": "rpush", "sid": "a", "wid": 1, "clock": 4}, (keys, np.ones(2))),
                                protocol.RANGE_REQUESTS)
    assert h["clock"] == 4 and k.tolist() == [3, 9]
    h, _ = protocol.decode(protocol.encode({"op": "apply", "step": 0, "version": 1, "pushes": [[0, 0, 1]],
                                            "mean": True, "scale": 1}), protocol.RANGE_REQUESTS)
    assert h["pushes"] == [[0, 0, 1]]
    h, _ = protocol.decode(protocol.encode({"op": "measured", "sid": "a", "wid": 1, "clock": 4, "slice": 7,
                                            "finite": False, "sq": math.nan}), protocol.RANGE_REPORTS)
    assert h["slice"] == 7 and not h["finite"] and math.isnan(h["sq"])
    with pytest.raises(ProtocolError) as e:
        protocol.decode(protocol.encode({"op": "measured", "sid": "a", "wid": 1, "clock": 4, "slice": 7}),
                        protocol.RANGE_REPORTS)
    assert e.value.code == "bad_field"
    bad = [({"op": "rpush", "sid": "a", "wid": 1, "clock": 4}, (np.array([9, 3], dtype=np.uint64), np.ones(2)), "bad_keys"),
           ({"op": "rpush", "sid": "a", "wid": 1, "clock": 4}, (keys,), "bad_frames"),
           ({"op": "rpush", "wid": 1, "clock": 4}, (keys, np.ones(2)), "bad_field"),
           ({"op": "rget", "version": "1"}, (keys,), "bad_field"),
           ({"op": "apply", "step": 0, "version": 1, "pushes": [], "mean": True}, (), "bad_field"),
           ({"op": "push", "wid": 1}, (), "unknown_op")]      # a worker's push goes to server 0, not to a range
    for header, arrays, code in bad:
        with pytest.raises(ProtocolError) as e:
            protocol.decode(protocol.encode(header, arrays), protocol.RANGE_REQUESTS)
        assert e.value.code == code, header


class _Range1:
    """Range 1 as server 0 meets it, in-process: a RangeStore behind a ROUTER on an inproc address, so that server
    0's RangeLinks (the real one) gets its measurements and sends its orders over the real messages."""

    def __init__(self, ctx, ranges, cfg):
        self.rs = _range_store(cfg, ranges, 1)
        self.rs.synced(SID)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.bind("inproc://range1")
        self.links = RangeLinks(ctx, ranges, [{"address": "inproc://range1", "theta": ""}], 5.0, SID)
        self.links.sync(0, 1.0)   # server 0's first message: the range learns who it is
        self.peer = transport.recv(self.sock, 1000)[0].bytes

    def rpush(self, wid: int, clock: int, keys, values) -> tuple:
        """A worker's slice arrives; the range reports its measurement; server 0 reads it: its measurements."""
        n, finite, sq = self.rs.slice(wid, clock, keys, values, SID)
        transport.send(self.sock, protocol.encode({"op": "measured", "sid": SID, "wid": wid, "clock": clock,
                                                   "slice": n, "finite": finite, "sq": sq}), self.peer)
        for _ in range(100):
            if (wid, clock) in self.links.receive():
                return self.links.measurements(wid, clock)
            self.links.socks[0].poll(10)
        raise AssertionError(f"no measurement of ({wid}, {clock}) reached server 0")

    def orders(self) -> None:
        """Carry out what server 0 ordered."""
        while (frames := transport.recv(self.sock, 0)) is not None:
            h, _ = protocol.decode(frames[1:], protocol.RANGE_REQUESTS)
            if h["op"] == "apply":
                self.rs.order(h["step"], h["version"], h["pushes"], h["mean"], h["scale"])
        self.rs.run()

    def close(self) -> None:
        self.links.close()
        self.sock.close(linger=0)


@pytest.mark.parametrize("mode", ["bsp", "asp"])
@pytest.mark.parametrize("bad", ["nonfinite", "outlier", "overflow"])
def test_a_slice_one_server_would_refuse_is_refused_whole_and_applied_on_no_range(bad, mode):
    """Two workers, BSP or ASP, the same pushes to one server (a coordinator over the whole theta) and to two
    (range 0 in server 0's store, range 1 in a RangeStore reached over the real messages). After the norm bound's
    warm-up, worker 0's push carries a NaN, a norm 1e6 (the bound is 1000 x about 4) or entries of 1e200 (a norm
    that overflows) only in its slice of range 1. Server 0 refuses it on range 1's measurement exactly as one
    server does: the same instructions and replies, one refused push counted against worker 0, and theta on both
    ranges bit for bit the single server's, every entry finite (the slice was applied nowhere)."""
    rng = np.random.default_rng(3)
    cfg = _cfg("sgd")
    ranges = Ranges.by_bytes(2, np.arange(ROWS, dtype=np.uint64), 8)
    one, two = H(2, train__consistency=mode), H(2, train__consistency=mode)
    one.c.store = make_store(cfg, np.zeros(ROWS), ROWS - 1)    # S = 1: the whole theta
    two.c.store = own = make_store(cfg, np.zeros(ROWS), ROWS - 1)   # S = 2: range 0's rows of it
    ctx = transport.context()
    r1 = _Range1(ctx, ranges, cfg)
    shell = SimpleNamespace(store=own, links=r1.links)   # what server.py's instructions act on
    do = {ev.Accumulate: Server._accumulate, ev.ApplyStep: Server._apply_step, ev.Update: Server._update}
    single = {ev.Accumulate: lambda i: one.c.store.push(i.grad, i.keys),
              ev.ApplyStep: lambda i: one.c.store.apply_step(i.step, i.version),
              ev.Update: lambda i: one.c.store.update(i.grad, i.step, i.version, i.scale, i.keys)}
    try:
        one.start()
        two.start()
        bad_at = 9   # steps: the first 8 (16 pushes) are the guard's warm-up
        for step in range(bad_at + 2):
            for wid, (keys, g) in enumerate(_pushes(rng, 2)):
                if step == bad_at and wid == 0:
                    keys = np.union1d(keys, np.flatnonzero(ranges.owner(np.arange(ROWS, dtype=np.uint64)) == 1)[:2]
                                      ).astype(np.uint64)
                    g = np.ones(len(keys))
                    on1 = np.flatnonzero(ranges.owner(keys) == 1)[:2]
                    g[on1] = {"nonfinite": [np.nan, 1.0], "outlier": [1e6, 1.0], "overflow": [1e200, 1e200]}[bad]
                (k0, v0), (k1, v1) = ranges.split(keys, g)
                out1 = one.push(wid, grad=g, keys=keys)
                out2 = two.push(wid, grad=v0, keys=k0, ranges=r1.rpush(wid, two.served[wid][0], k1, v1))
                assert two.P(out2) == one.P(out1)
                if step == bad_at and wid == 0:   # counted against the worker, as one server counts it
                    assert two.c.members.peers[0].bad_streak == one.c.members.peers[0].bad_streak == 1
                for i in out1:
                    if type(i) in single:
                        single[type(i)](i)
                for i in out2:
                    if type(i) in do:
                        do[type(i)](shell, i)
                r1.orders()
        why = "nonfinite" if bad == "nonfinite" else "outlier"
        assert one.c.stats.rejected == two.c.stats.rejected == {why: 1}
        assert two.c.members.peers[0].bad_streak == 0 and two.c.stats.applied == one.c.stats.applied
        theta = _compose(ranges, own, [r1.rs])
        assert np.isfinite(theta).all() and np.abs(theta).max() > 0.01
        assert np.array_equal(theta, one.c.store.theta)
        assert r1.rs.version == own.version == one.c.store.version and not r1.rs.orders
        last = bad_at + 1   # the refused slice and its measurement went with worker 0's next push
        assert not r1.rs.slices and set(r1.links.measured) == {(0, last), (1, last)}
    finally:
        r1.close()
        ctx.term()


SHARDED = {"data": {"source": "criteo"}, "model": {"kind": "sparse_logistic"}, "server": {"shards": 2}}


def test_several_servers_for_a_sparse_model():
    assert config.Config.from_dict(SHARDED, frozenset()).server.shards == 2


@pytest.mark.parametrize("key,value", [("model.kind", "softmax"), ("train.clip_norm", 1.0), ("worker.shm", False)])
def test_what_several_servers_refuse(key, value):
    section, name = key.split(".")
    cfg = {**SHARDED, section: {**SHARDED.get(section, {}), name: value}}
    if key == "model.kind":
        cfg["data"] = {}   # a dense model's synthetic data
    with pytest.raises(ConfigError, match="server.shards" if key == "model.kind" else key):
        config.Config.from_dict(cfg, frozenset())


DENSE = {"model": {"kind": "linear"}, "server": {"shards": 3}}


@pytest.mark.parametrize("kind", ["linear", "logistic"])
def test_several_servers_for_a_dense_vector_theta(kind):
    assert config.Config.from_dict({**DENSE, "model": {"kind": kind}}, frozenset()).server.shards == 3


@pytest.mark.parametrize("key,value", [("data.dtype", "float32"), ("model.fit_intercept", False),
                                       ("train.local_steps", 2), ("train.clip_norm", 1.0)])
def test_what_several_servers_refuse_for_a_dense_model(key, value):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=key):
        config.Config.from_dict({**DENSE, section: {**DENSE.get(section, {}), name: value}}, frozenset())


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


def _pid_named(pids: list[int], comm: str) -> int:
    for pid in pids:
        try:
            with open(f"/proc/{pid}/comm") as fh:
                if fh.read().strip() == comm:
                    return pid
        except OSError:
            pass
    raise AssertionError(f"no process {comm!r} among {pids}")


@pytest.mark.slow
def test_a_killed_range_server_is_restarted_and_the_run_stays_exact(launch, tmp_path):
    """Range server 1 killed mid-run (SIGKILL, after every range's first checkpoint): the launcher restarts it, the
    run goes back to that step (server 0 and range 1 from their checkpoints of it, in their own processes), and the
    final theta is a serial numpy FTRL's on the same batches (what an uninterrupted run gives, tests/
    test_sparse_job.py) to 1e-9; server 0 and the workers are the same processes throughout."""
    from psrv import checkpoint
    from psrv.criteo import Criteo
    from tests.conftest import tagged_pids, wait_for
    from tests.test_sparse_job import RUN as SPARSE_RUN, _serial_ftrl
    from workers import faults
    n, k, steps = 4000, 9, 120
    # worker 0 holds the run before its push of step 45 until the test removes the hold file, so that the range
    # server is killed after its checkpoint of step 30 and before the run's end, however slow the test is; no
    # progress deadline, which would leave the held worker behind and change the batches
    hold = tmp_path / "hold"
    hold.touch()
    la = launch(*SPARSE_RUN, "--set", "data.source=criteo", "--set", f"data.n={n}", "--set", f"data.log2_buckets={k}",
                "--set", "model.kind=sparse_logistic", "--set", "train.optimizer=ftrl", "--set", "train.lr=0.2",
                "--set", "train.l1=0.5", "--set", "model.l2=0.1", "--set", f"train.steps={steps}",
                "--set", "train.eval_every=20", "--set", "checkpoint.every_steps=30", "--set", "checkpoint.keep=10",
                "--set", "server.shards=2", "--set", "server.progress_deadline_s=0", "--set", faults.OVERRIDE,
                "--set", f"output.dir={tmp_path / 'a'}",
                env=faults.env(hold_worker=0, hold_at_step=45, hold_file=str(hold)))
    wait_for(lambda: checkpoint.checkpoints(str(tmp_path / "a" / "checkpoints" / "range1")), 60,
             what="range 1's first checkpoint")
    pids = tagged_pids(la.tag)
    others = {_pid_named(pids, n) for n in ("psrv server", "psrv worker 0", "psrv worker 1")}
    os.kill(_pid_named(pids, "psrv range1"), signal.SIGKILL)
    wait_for(lambda: (tmp_path / "a" / "ranges.json").exists(), 60, what="range 1's restart")
    assert others <= set(tagged_pids(la.tag))      # nothing else was restarted
    hold.unlink()
    code, _, err = la.wait()
    assert code == 0, err
    assert "restarting it, and the run goes back to its newest checkpoint (1 of 2)" in err
    s = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert s["range_restarts"] == 1 and s["server_restarts"] == 0 and s["worker_restarts"] == 0
    assert s["steps"] == steps
    la.assert_no_leftovers()
    want, _ = _serial_ftrl(Criteo(0, k), n, steps, 200, 0.2, 1.0, 0.5, 0.1)
    theta = np.load(tmp_path / "a" / "theta.npy")
    assert np.abs(want).max() > 0.01 and np.abs(theta - want).max() < 1e-9


@pytest.mark.slow
def test_two_servers_give_one_servers_theta_for_a_dense_model(launch, tmp_path):
    """A dense linear model's d + 1 rows split over S = 2 servers (range 1's rows read with rget, pushed as slices):
    under BSP the same theta as S = 1 to 1e-10, on the same batches."""
    theta = {}
    for s in (1, 2):
        la = launch("--set", "train.workers=2", "--set", "train.batch_size=50", "--set", "data.n=1000",
                    "--set", "data.d=30", "--set", "model.kind=linear", "--set", "train.optimizer=adam",
                    "--set", "train.lr=0.05", "--set", "train.steps=30", "--set", "train.eval_every=10",
                    "--set", "checkpoint.every_steps=0", "--set", "output.plot=false",
                    "--set", "output.live_view=false", "-q", "--set", "train.consistency=bsp",
                    "--set", f"server.shards={s}", "--set", f"output.dir={tmp_path / str(s)}")
        code, _, err = la.wait()
        assert code == 0, err
        la.assert_no_leftovers()
        theta[s] = np.load(tmp_path / str(s) / "theta.npy")
        assert json.loads((tmp_path / str(s) / "summary.json").read_text())["steps"] == 30
    assert theta[1].shape == (31,) and np.abs(theta[1]).max() > 0.1
    assert np.abs(theta[1] - theta[2]).max() < 1e-10
