"""What a push may change (psrv/guard.py, and the coordinator's use of it), and a run whose own loss diverges:
pure, with the coordinator harness (tests/coord_harness.py): exact instructions, no sockets, no sleeping."""
from __future__ import annotations

import math

import numpy as np
import pytest

from psrv import events as ev
from psrv.guard import MIN_LOSSES, PER_WORKER, WARMUP, LossWatch, PushGuard
from psrv.store import Store
from psrv.optim import SGD

from .coord_harness import H

BIG = {"shards": [4000, 4000]}   # room for many steps


def warmed(n=2, **kw) -> H:
    """n workers after enough BSP steps that the norm bound applies (every gradient of norm sqrt(3))."""
    h = H(n, **BIG, **kw)
    h.start()
    while h.c.guard.accepted < WARMUP:
        for w in range(n):
            h.push(w)
    return h


# ---------------------------------------------------------------------------------------------------- PushGuard
def test_only_finiteness_is_checked_during_the_warmup():
    g = PushGuard(1000.0)
    for _ in range(WARMUP - 1):
        g.accept(0, 1.0)
    assert g.bound() is None
    assert g.judge(1e100, 1.0) == ""                 # no estimate yet: a huge but representable norm passes
    assert g.judge(math.inf, 1.0) == "outlier"       # a finite gradient whose norm overflows: never
    assert g.judge(math.nan, 1.0) == "outlier"
    assert g.judge(1.0, math.nan) == "nonfinite" and g.judge(1.0, -math.inf) == "nonfinite"


def test_the_bound_is_the_ratio_times_the_median_over_workers_of_their_median_norms():
    g = PushGuard(1000.0)
    for x in [1.0] * 10 + [3.0] * 5 + [1e6]:          # one big one among them does not move worker 0's median
        g.accept(0, x)
    assert g.bound() == 1000.0
    assert g.judge(999.0, 0.5) == "" and g.judge(1001.0, 0.5) == "outlier"
    g.accept(1, 4.0), g.accept(2, 2.0)               # medians 1, 4, 2: the middle one
    assert g.bound() == 2000.0
    g.forget(1)                                      # it left the run: medians 1, 2
    assert g.bound() == 1500.0
    assert PushGuard(0.0).judge(1e200, 1.0) == ""    # 0: no norm bound (finiteness still checked)


def test_a_fast_peer_counts_once_and_refused_norms_never_enter_the_estimate():
    g = PushGuard(10.0)
    for w in (0, 1):
        for _ in range(WARMUP):
            g.accept(w, 1.0)
    for _ in range(1000):
        g.accept(7, 1e-9)                            # a peer pushing tiny gradients as fast as it can
        assert g.judge(100.0, 1.0) == "outlier"     # ... and big ones: refused, never in the estimate
    assert g.bound() == 10.0                         # medians 1, 1, 1e-9: still 1
    assert all(len(d) <= PER_WORKER for d in g.recent.values())


def test_the_guard_state_round_trips():
    g = PushGuard(1000.0)
    for x in range(1, 40):
        g.accept(x % 3, float(x))
    g2 = PushGuard(1000.0)
    g2.load(g.state())
    assert g2.bound() == g.bound() and g2.accepted == g.accepted and g2.state() == g.state()
    g2.load(None)                                    # a checkpoint written before the guard existed
    assert g2.bound() == g.bound()


def test_store_measure_finds_nan_inf_and_overflow():
    store = Store(np.zeros(4), SGD(np.zeros(4)), lambda s: 0.1)
    assert store.measure(np.array([3.0, 4.0, 0.0, 0.0])) == (True, 5.0)
    ok, norm = store.measure(np.array([1e300, 0.0, 0.0, 0.0]))
    assert ok and norm == math.inf                   # finite, but its norm overflows
    assert store.measure(np.array([np.nan, 0.0, 0.0, 0.0]))[0] is False
    assert store.measure(np.array([np.inf, 0.0, 0.0, 0.0]))[0] is False


def test_the_norm_is_numpys_bit_for_bit_and_overflow_warns_nothing():
    """store.l2norm (np.vdot, for speed) against np.linalg.norm itself: equal to the last bit in float64 and float32,
    vectors and matrices; an overflowing sum is inf without a floating-point warning or error."""
    import warnings

    from psrv.store import l2norm
    rng = np.random.default_rng(4)
    for dtype in (np.float64, np.float32):
        for shape in [(1,), (7,), (101,), (4099,), (51, 3)]:
            for scale in (1e-5, 1.0, 1e5):
                a = (rng.standard_normal(shape) * scale).astype(dtype)
                assert l2norm(a) == float(np.linalg.norm(a)) and type(l2norm(a)) is float
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        assert l2norm(np.array([1e300, 1.0])) == math.inf
        assert l2norm(np.array([3e38, 1.0], np.float32)) == math.inf


# ---------------------------------------------------------------------------------------------------- pushes refused
def test_a_nonfinite_loss_is_refused_like_a_nonfinite_gradient():
    h = H(2)
    h.start()
    assert h.P(h.push(0, loss=math.nan, pull=False)) == [("Ack", 0, False, "nonfinite", 5)]
    assert h.P(h.push(1)) == [("Accumulate", (1, 0)), ("ApplyStep", 0, 1), ("Theta", 1, 1, 1, [1, 0, 4, 4], 6)]
    assert h.c.stats.rejected == {"nonfinite": 1} and h.c.stats.bad_messages == 0
    assert h.c.members.peers[0].bad_streak == 1


def test_an_outlier_gradient_is_refused_and_the_step_goes_on_without_it():
    h = warmed()
    clock, rid = h.served[0][0], h.rid
    assert h.c.guard.bound() == pytest.approx(1000 * math.sqrt(3))
    assert h.P(h.push(0, value=1e4)) == []             # refused; its pull waits for the step like any other
    out = h.P(h.push(1))                               # the step is worker 1's gradient alone
    assert out[:2] == [("Accumulate", (1, clock)), ("ApplyStep", clock, clock + 1)]
    assert [(i[0], i[1], i[2], i[5]) for i in out[2:]] == [("Theta", 1, clock + 1, rid + 2),
                                                         ("Theta", 0, clock + 1, rid + 1)]
    assert h.c.stats.rejected == {"outlier": 1} and h.c.members.peers[0].bad_streak == 1
    assert h.P(h.push(0, value=1000.0, pull=False)) == [("Accumulate", (0, clock + 1)), ("Ack", 0, True, "", h.rid)]


def test_a_gradient_whose_norm_overflows_is_refused_from_the_first_push():
    h = H(2)
    h.start()
    assert h.P(h.push(0, value=1e300, pull=False)) == [("Ack", 0, False, "outlier", 5)]
    assert h.c.stats.rejected == {"outlier": 1} and h.c.version == 0


def test_max_grad_ratio_0_turns_the_norm_bound_off():
    h = warmed(server__max_grad_ratio=0.0)
    clock = h.served[0][0]
    assert h.P(h.push(0, value=1e6, pull=False)) == [("Accumulate", (0, clock)), ("Ack", 0, True, "", h.rid)]


def test_outliers_in_a_row_quarantine_a_worker():
    h = warmed(server__max_bad_pushes=2)
    h.push(0, value=1e6)
    h.push(1)
    assert h.P(h.push(0, value=1e6, rid=90)) == [("Error", 0, "quarantined", 90)]
    assert h.c.members.quarantined == [0] and h.c.stats.rejected == {"outlier": 2}
    assert h.c.guard.bound() == pytest.approx(1000 * math.sqrt(3))


def test_a_restored_run_keeps_its_estimate():
    h = warmed()
    h2 = H(2, **BIG, now=100.0)
    h2.c.restore(h.c.state(h.now))
    assert h2.c.guard.bound() == h.c.guard.bound()
    h2.hellos([0, 1]), h2.pull(0), h2.pull(1)
    assert h2.P(h2.push(0, value=1e4, pull=False)) == [("Ack", 0, False, "outlier", h2.rid)]


# ---------------------------------------------------------------------------------------------------- divergence
def test_loss_watch_takes_the_median_and_needs_both_the_best_and_the_start_behind():
    w = LossWatch(factor=100.0)
    for x in [5.0, 4.0, 3.0, 2.0, 1.0]:
        w.add(x)
        assert w.diverged(1) is None
    assert w.first == 5.0 and w.best == 3.0          # medians of the newest MIN_LOSSES
    for x in [1.0] * 5:
        w.add(x)
        assert w.diverged(1) is None
    w.add(1e9)                                       # one huge loss (a lying peer) does not move the median
    assert w.diverged(1) is None
    for _ in range(MIN_LOSSES // 2):
        w.add(1e9)
    assert w.diverged(1) == 1e9
    assert LossWatch().diverged(3) is None            # nothing yet


def test_loss_watch_does_not_take_noise_around_a_tiny_loss_for_divergence():
    w = LossWatch(factor=100.0)
    for x in [1.0] * 5 + [1e-12] * 5 + [0.5] * 5:   # fit to 1e-12, then noisy batches: still below the start
        w.add(x)
        assert w.diverged(1) is None
    for x in [-1.0] * 10 + [50.0] * 10:              # losses <= 0 (a model of one's own): finiteness only
        w2 = LossWatch(factor=2.0)
        w2.add(x)
        assert w2.diverged(1) is None


def test_a_run_whose_loss_grows_fails_with_a_plain_message_and_no_outputs():
    h = H(2, **BIG, train__lr=5.0, train__log_every=1)
    h.start()
    loss, out = 2.0, []
    while not out or not isinstance(out[-1], ev.Fail):
        h.push(0, loss=loss)
        out = h.push(1, loss=loss)
        loss *= 30
    step = h.c.step
    assert isinstance(out[-1], ev.Fail) and not any(isinstance(i, (ev.Log, ev.Finish)) for i in out)
    assert out[-1].message.startswith(f"loss diverged at step {step} with lr = 5; lower train.lr (")
    assert step < 10 and h.c.done and h.c.failed
    assert h.P(h.tick(1.0)) == [] and h.P(h.pull(0, rid=99)) == [("Stop", 0, "diverged", 99)]


def test_a_lying_peer_cannot_end_the_run_by_reporting_a_huge_loss():
    h = H(3, **BIG)
    h.start()
    for _ in range(50):
        h.push(0, loss=1.0), h.push(1, loss=1.0)
        h.push(2, loss=1e300)
    assert not h.c.failed and h.c.step == 50


def test_when_every_worker_is_refused_the_run_diverged_rather_than_each_worker_quarantined():
    h = H(2, server__max_bad_pushes=2)
    h.start()
    h.push(0, value=np.nan), h.push(1, value=np.nan)   # step 0: nothing applied
    out = h.push(0, value=np.nan)                       # worker 0's second in a row; worker 1's last was refused too
    assert out == [ev.Fail("loss diverged at step 1 with lr = 0.05; lower train.lr (every worker's pushes are "
                           "refused; the last: a gradient with NaN or Inf)")]
    assert h.c.members.quarantined == [] and h.c.done and h.c.failed


def test_one_worker_refused_among_good_ones_is_quarantined_not_the_run():
    h = H(3, server__max_bad_pushes=2)
    h.start()
    for _ in range(2):
        h.push(0, value=np.nan), h.push(1), h.push(2)
    assert h.c.members.quarantined == [0] and not h.c.failed
