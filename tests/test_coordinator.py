"""The coordinator alone (psrv/coordinator.py): events in, the EXACT instructions out, in order.

No sockets, no processes, no sleeping: time is the `now` each event is handled at (tests/coord_harness.py). Instruction
lists are compared through a compact projection (coord_harness.H.P: type name and key fields; a gradient is named by
the (wid, clock) of the push that carried it, found by identity), or as dataclass instances.
"""
from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from psrv import events as ev, protocol, report
from psrv.membership import MAX_PEERS

from .coord_harness import SID, H, ident

# tests that move time without heartbeats (or without pushes: no progress deadline)
WAIT = {"server__heartbeat_timeout_s": 1000.0, "server__progress_deadline_s": 1000.0}


def snapshot(h: H) -> tuple:
    """What an error reply must leave as it was: theta, the clocks, the batches, the parked pulls, the cursors."""
    c = h.c
    return (c.version, h.theta.tolist(), dict(c.batches), dict(c.parked), c.gate.step, set(c.gate.pending),
            {w: (m.pushed, m.serving) for w, m in c.gate.members.items()}, repr(c.schedule.state()),
            c.stats.applied, c.stats.samples, {w: (p.inc, p.seq, p.alive) for w, p in c.members.peers.items()})


# ---------------------------------------------------------------------------------------------------- joining
def test_join_welcomes_and_the_nth_first_pull_opens_the_gate_for_the_parked_pulls():
    h = H(3)
    assert h.P(h.hello(0)) == [("Welcome", 0, 1, 1)]
    assert h.P(h.pull(0)) == []                      # parked: the gate is closed
    assert h.P(h.hello(1)) == [("Welcome", 1, 1, 3)]
    assert h.P(h.pull(1)) == []
    assert not h.c.gate.open and sorted(h.c.parked) == [0, 1]
    # a hello registers; the worker enters the run (shards, the gate) at its first pull, when its rows are ready
    assert h.hello(2) == [ev.Welcome(ident(2), h.c.members.peers[2], 5)]
    # before the gate opens, shards are leased over every worker it waits for: shard 2 waits for worker 2
    assert not h.c.gate.open and sorted(h.c.gate.members) == [0, 1] and h.c.schedule.lease == {0: 0, 1: 1, 2: 2}
    assert h.P(h.pull(2)) == [("Theta", 0, 0, 0, [0, 0, 0, 4], 2), ("Theta", 1, 0, 0, [1, 0, 0, 4], 4),
                              ("Theta", 2, 0, 0, [2, 0, 0, 4], 6)]   # in the order they asked
    assert h.c.gate.open and h.c.started_s == 0.0 and not h.c.parked


def test_hellos_before_the_gate_opens_get_no_theta():
    h = H(2)
    assert h.P(h.hello(0)) == [("Welcome", 0, 1, 1)]
    assert h.heartbeat(0) == [ev.Send(ident(0), {"op": "heartbeat", "server_id": SID, "step": 0, "alive": True,
                                                 "waiting": False, "rid": 2})]
    assert h.P(h.tick(1.0)) == []
    assert h.P(h.pull(0)) == []
    assert h.P(h.heartbeat(0)) == [("HB", 0, 0, True, True, 4)]   # the server holds its pull
    assert not any(isinstance(i, ev.Theta) for i in h.log)


def test_a_minus_one_hello_gets_the_lowest_id_no_launcher_worker_uses():
    h = H(3)
    assert h.P(h.hello(-1, idt=b"x")) == [("Welcome", 3, 1, 1)]   # even before the launcher's workers
    h.hellos([0, 1, 2])
    assert h.P(h.hello(-1, idt=b"y")) == [("Welcome", 4, 1, 5)]
    assert h.c.members.peers[4].ident == b"y"


# ---------------------------------------------------------------------------------------------------- BSP
@pytest.mark.parametrize("n", [1, 2, 3])
def test_bsp_n_pushes_accumulate_then_one_apply_then_theta_for_the_next_clock(n):
    h = H(n)
    h.start()
    for step in range(3):
        for w in range(n - 1):
            assert h.P(h.push(w)) == [("Accumulate", (w, step))]
            assert w in h.c.parked                    # the fast worker's pull waits for the slowest push
        last = n - 1
        rid_of = {w: h.rid - (n - 2 - w) for w in range(n - 1)}   # the parked pulls' rids
        out = h.P(h.push(last))
        v = step + 1
        assert out == [("Accumulate", (last, step)), ("ApplyStep", step, v),
                       ("Theta", last, v, v, [last, 0, 4 * v, 4], h.rid)] + \
                      [("Theta", w, v, v, [w, 0, 4 * v, 4], rid_of[w]) for w in range(n - 1)]
    assert h.c.stats.applied == 3 * n and h.c.stats.samples == 12 * n and h.c.version == 3


def test_bsp_a_fast_worker_parks_until_the_slowest_pushes():
    h = H(3, **WAIT)
    h.start()
    assert h.P(h.push(2)) == [("Accumulate", (2, 0))]
    assert h.P(h.push(0)) == [("Accumulate", (0, 0))]
    assert h.P(h.pull(2, 1)) == []                    # asking again changes nothing: still parked
    assert h.P(h.tick(3.0)) == []
    assert sorted(h.c.parked) == [0, 2]
    h.now = 4.0
    assert h.P(h.push(1)) == [("Accumulate", (1, 0)), ("ApplyStep", 0, 1), ("Theta", 1, 1, 1, [1, 0, 4, 4], 10),
                              ("Theta", 2, 1, 1, [2, 0, 4, 4], 9), ("Theta", 0, 1, 1, [0, 0, 4, 4], 8)]
    assert h.c.members.peers[0].held_s == h.c.members.peers[2].held_s == 4.0   # held since t=0
    h.now = 5.0
    h.push(2, request_s=3.0)               # it waited 3 s for that theta: all of it, at most, was the barrier
    h.push(0, request_s=6.0)               # 6 s: 4 s of barrier, the rest communication
    h.push(1)                              # (a BSP step's pushes are accounted once it applies)
    assert h.c.stats.wait_s == 3.0 + 4.0 and h.c.stats.request_s == 9.0


# ---------------------------------------------------------------------------------------------------- SSP / ASP
@pytest.mark.parametrize("s", [0, 1, 3])
def test_ssp_a_worker_runs_s_clocks_ahead_then_parks_until_the_slowest_pushes(s):
    h = H(2, train__consistency="ssp", train__staleness=s)
    h.start()
    for k in range(s + 1):
        out = h.P(h.push(0))
        expected = [("Update", (0, k), k // 2, k + 1, 0.5)]
        if k < s:
            expected.append(("Theta", 0, k + 1, k + 1, [0, 0, 4 * (k + 1), 4], h.rid))
        assert out == expected
    parked_rid = h.rid
    assert h.c.parked[0][0] == s + 1                   # its pull for clock s+1 waits
    assert h.P(h.push(1)) == [("Update", (1, 0), (s + 1) // 2, s + 2, 0.5),
                              ("Theta", 1, 1, s + 2, [1, 0, 4, 4], h.rid),
                              ("Theta", 0, s + 1, s + 2, [0, 0, 4 * (s + 1), 4], parked_rid)]


def test_asp_every_push_is_an_update_of_one_nth_at_once():
    h = H(3, train__consistency="asp")
    h.start()
    for k, w in enumerate([0, 0, 2, 0, 1, 2, 2, 2, 0]):
        clock = h.served[w][0]
        assert h.P(h.push(w)) == [("Update", (w, clock), k // 3, k + 1, 1 / 3),
                                  ("Theta", w, clock + 1, k + 1, [w, 0, 4 * (clock + 1), 4], h.rid)]
    assert not h.c.parked and h.c.step == 3


def test_update_carries_the_pushed_array_itself():
    h = H(1, train__consistency="asp")
    h.start()
    g = np.full(3, 2.0)
    out = h.push(0, grad=g)
    assert out[0] == ev.Update(g, None, 0, 1, 1.0, wid=0, clock=0) and out[0].grad is g   # whose push: for range servers
    h2 = H(2)
    h2.start()
    g = np.full(3, 2.0)
    out = h2.push(0, grad=g)
    assert out == [ev.Accumulate(g, None, wid=0, clock=0)] and out[0].grad is g


def test_ssp_the_death_of_the_slowest_is_not_enough_when_another_lags():
    h = H(3, train__consistency="ssp", train__staleness=1, server__progress_deadline_s=100.0)
    h.start()
    h.push(0)
    assert h.P(h.push(0)) == [("Update", (0, 1), 0, 2, 1 / 3)]       # clock 2 is 2 ahead of workers 1 and 2
    h.now = 3.0
    h.heartbeat(0), h.heartbeat(1)
    assert h.P(h.tick(5.5)) == []                                    # worker 2 dies; worker 1 still at clock 0
    assert h.c.members.deaths == 1 and h.c.schedule.lease == {0: 0, 1: 1, 2: 0}
    # worker 1's push releases worker 0, which takes the dead worker's batch first; N is now 2
    assert h.P(h.push(1)) == [("Update", (1, 0), 0, 3, 0.5), ("Theta", 1, 1, 3, [1, 0, 4, 4], 11),
                              ("Theta", 0, 2, 3, [2, 0, 0, 4], 8)]


def test_four_workers_joining_in_order_read_their_own_shards():
    h = H(4)
    out = h.start()
    assert [(i[1], i[4][0]) for i in h.P(out) if i[0] == "Theta"] == [(0, 0), (1, 1), (2, 2), (3, 3)]


# ---------------------------------------------------------------------------------------------------- backup workers
@pytest.mark.parametrize("pull", [True, False])
def test_bsp_backup_worker_step_applies_after_n_minus_1_and_the_late_push_is_dropped(pull):
    h = H(3, train__backup_workers=1)
    h.start()
    assert h.P(h.push(0, loss=1.0)) == [("Accumulate", (0, 0))]
    assert h.P(h.push(1, loss=3.0)) == [("Accumulate", (1, 0)), ("ApplyStep", 0, 1),
                                        ("Theta", 1, 1, 1, [1, 0, 4, 4], 8), ("Theta", 0, 1, 1, [0, 0, 4, 4], 7)]
    out = h.P(h.push(2, loss=100.0, pull=pull))
    assert out == ([("Theta", 2, 1, 1, [2, 0, 4, 4], 9)] if pull else [("Ack", 2, False, "late", 9)])
    s = h.c.stats
    assert s.dropped == {2: 1} and s.applied == 2 and s.samples == 8 and s.pushes == {0: 1, 1: 1}
    assert h.c.loss_sum / h.c.loss_rows == 2.0        # the late loss is not in the metrics
    assert h.c.members.peers[2].pushes == 1


# ---------------------------------------------------------------------------------------------------- death, rejoin
def test_a_silent_worker_dies_on_a_tick_its_batch_is_reserved_and_the_step_it_held_back_applies():
    h = H(3, server__heartbeat_timeout_s=5.0)
    h.start()
    h.now = 1.0
    assert h.P(h.push(0)) == [("Accumulate", (0, 0))]
    assert h.P(h.push(1)) == [("Accumulate", (1, 0))]
    h.now = 4.0
    h.heartbeat(0), h.heartbeat(1)
    assert h.P(h.tick(5.0)) == []                      # silent exactly 5 s: not yet
    assert h.c.members.deaths == 0
    # worker 2 dies holding [2, 0, 0, 4]: the step applies without it, and the batch goes to the next reader of
    # shard 2 (worker 0 now), first
    assert h.P(h.tick(5.5)) == [("ApplyStep", 0, 1), ("Theta", 0, 1, 1, [2, 0, 0, 4], 7),
                                ("Theta", 1, 1, 1, [1, 0, 4, 4], 8)]
    m, s = h.c.members, h.c.stats
    assert (m.deaths, m.restarts, m.stale_pushes, s.bad_messages) == (1, 0, 0, 0)
    assert h.c.schedule.lease == {0: 0, 1: 1, 2: 0} and 2 not in h.c.gate.members
    # the dead incarnation is refused, and told so by its heartbeat
    assert h.P(h.push(2, inc=1)) == [("Error", 2, "dead", 11)]
    assert h.P(h.heartbeat(2)) == [("HB", 2, 1, False, False, 12)]
    assert (m.stale_pushes, s.bad_messages) == (1, 1)
    # a hello makes incarnation 2, which takes its shard back and joins at the current step
    assert h.P(h.hello(2)) == [("Welcome", 2, 2, 13)]
    assert (m.deaths, m.restarts) == (1, 1)
    assert h.P(h.pull(2, 0)) == [("Theta", 2, 1, 1, [2, 0, 4, 4], 14)]
    assert h.P(h.push(2, inc=1, clock=1, seq=99)) == [("Error", 2, "stale_incarnation", 15)]
    assert (m.deaths, m.restarts, m.stale_pushes, s.bad_messages) == (1, 1, 2, 2)
    assert m.incarnations == {0: 1, 1: 1, 2: 2}
    # every row was served once to someone who will push it
    assert [h.served[w][2] for w in range(3)] == [[2, 0, 0, 4], [1, 0, 4, 4], [2, 0, 4, 4]]


def test_asp_a_death_reweights_the_survivors_and_reserves_its_batch():
    h = H(3, train__consistency="asp", server__heartbeat_timeout_s=5.0)
    h.start()
    h.now = 4.0
    h.heartbeat(0), h.heartbeat(1)
    # worker 2 dies holding [2, 0, 0, 4]: nothing waits for it; its batch goes to the next reader of shard 2
    assert h.P(h.tick(5.5)) == []
    assert h.c.schedule.lease == {0: 0, 1: 1, 2: 0} and sorted(h.c.gate.members) == [0, 1]
    out = h.P(h.push(0))
    assert out[0][0] == "Update" and out[0][4] == 0.5          # each gradient now counts 1/2, not 1/3
    assert out[1][:5] == ("Theta", 0, 1, 1, [2, 0, 0, 4])       # the dead worker's rows first


def test_a_hello_for_a_live_worker_replaces_it():
    h = H(2)
    h.start()
    assert h.P(h.push(0)) == [("Accumulate", (0, 0))]
    # the old incarnation held the step back: its leaving completes it; its batch goes back to shard 1, which
    # worker 0 holds until the new incarnation is in the run (its first pull), and reads first
    assert h.P(h.hello(1)) == [("ApplyStep", 0, 1), ("Welcome", 1, 2, 6), ("Theta", 0, 1, 1, [1, 0, 0, 4], 5)]
    m = h.c.members
    assert (m.deaths, m.restarts, m.stale_pushes) == (0, 1, 0)
    assert h.c.schedule.lease == {0: 0, 1: 0} and list(h.c.gate.members) == [0]
    assert h.P(h.push(1, inc=1, clock=0, count=4, version=0)) == [("Error", 1, "stale_incarnation", 7)]
    assert m.stale_pushes == 1
    assert h.P(h.pull(1)) == [("Theta", 1, 1, 1, [1, 0, 4, 4], 8)]    # shard 1 is its own again
    assert h.c.schedule.lease == {0: 0, 1: 1} and sorted(h.c.gate.members) == [0, 1]


def test_bye_hands_the_batch_back_and_releases_the_step():
    h = H(2)
    h.start()
    h.push(0)
    # worker 0 now reads both shards, and the batch handed back first
    assert h.P(h.bye(1)) == [("ApplyStep", 0, 1), ("Bye", 1, 6), ("Theta", 0, 1, 1, [1, 0, 0, 4], 5)]
    assert h.c.members.deaths == 0 and h.c.schedule.lease == {0: 0, 1: 0}
    assert h.P(h.push(0)) == [("Accumulate", (0, 1)), ("ApplyStep", 1, 2), ("Theta", 0, 2, 2, [0, 0, 4, 4], 7)]


# ---------------------------------------------------------------------------------------------------- exactly once
def test_a_repeated_seq_is_acked_as_a_duplicate_and_changes_nothing():
    h = H(2)
    h.start()
    assert h.P(h.push(0, pull=False)) == [("Accumulate", (0, 0)), ("Ack", 0, True, "", 5)]
    before = snapshot(h)
    assert h.P(h.push(0, clock=0, count=4, version=0, seq=1, rid=50)) == [("Ack", 0, False, "duplicate", 50)]
    assert h.P(h.push(0, clock=0, count=4, version=0, seq=0, pull=False, rid=51)) == \
        [("Ack", 0, False, "duplicate", 51)]
    assert snapshot(h) == before
    assert h.c.stats.duplicates == 2 and h.c.stats.bad_messages == 0


def test_a_push_without_pull_is_acked():
    h = H(2)
    h.start()
    assert h.P(h.push(0, pull=False)) == [("Accumulate", (0, 0)), ("Ack", 0, True, "", 5)]
    assert h.P(h.push(1, pull=False)) == [("Accumulate", (1, 0)), ("ApplyStep", 0, 1), ("Ack", 1, True, "", 6)]
    assert h.P(h.pull(0, 1)) == [("Theta", 0, 1, 1, [0, 0, 4, 4], 7)]


@pytest.mark.parametrize("mode", ["bsp", "ssp", "asp"])
def test_a_pull_repeated_before_pushing_gets_the_same_batch_and_clock(mode):
    h = H(2, train__consistency=mode)
    h.start()
    cursors = repr(h.c.schedule.state())
    assert h.P(h.pull(0, 0)) == [("Theta", 0, 0, 0, [0, 0, 0, 4], 5)]
    assert repr(h.c.schedule.state()) == cursors       # no rows handed out twice, none skipped
    h.push(1)
    h.push(0)                                          # the reply to this push (theta for clock 1) is "lost"
    first = h.served[0]
    out = h.P(h.pull(0, 1))
    assert out == [("Theta", 0, first[0], h.c.version, first[2], h.rid)]
    assert first[0] == 1 and first[2] == [0, 0, 4, 4]


# table: (what, request, error code, who the error goes to)
ERRORS = [
    ("wrong count", lambda h: h.push(0, count=3, rid=700), "bad_field", 0),
    ("version never served", lambda h: h.push(0, version=1, rid=700), "bad_field", 0),
    ("negative version", lambda h: h.push(0, version=-1, rid=700), "bad_field", 0),
    ("NaN compute_s", lambda h: h.push(0, compute_s=math.nan, rid=700), "bad_field", 0),
    ("infinite request_s", lambda h: h.push(0, request_s=math.inf, rid=700), "bad_field", 0),
    ("negative compute_s", lambda h: h.push(0, compute_s=-1.0, rid=700), "bad_field", 0),
    ("negative request_s", lambda h: h.push(0, request_s=-0.5, rid=700), "bad_field", 0),
    ("huge compute_s", lambda h: h.push(0, compute_s=1e7, rid=700), "bad_field", 0),
    ("clock not served", lambda h: h.push(0, clock=1, rid=700), "bad_clock", 0),
    ("another server's push", lambda h: h.push(0, sid="server-B", rid=700), "stale_server", 0),
    ("unknown worker push", lambda h: h.push(9, clock=0, count=4, version=0, rid=700), "unknown_worker", 9),
    ("stale incarnation push", lambda h: h.push(0, inc=7, rid=700), "stale_incarnation", 0),
    ("wrong gradient shape", lambda h: h.push(0, grad=np.zeros(4), rid=700), "bad_shape", 0),
    ("wrong gradient dtype", lambda h: h.push(0, grad=np.zeros(3, np.float32), rid=700), "bad_dtype", 0),
    ("no frame and no slot", lambda h: h.push(0, framed=False, rid=700), "bad_frames", 0),
    ("pull ahead of its pushes", lambda h: h.pull(0, 1, rid=700), "bad_clock", 0),
    ("pull of an unknown worker", lambda h: h.pull(9, 0, inc=1, rid=700), "unknown_worker", 9),
    ("pull of a stale incarnation", lambda h: h.pull(0, 0, inc=2, rid=700), "stale_incarnation", 0),
    ("bye of an unknown worker", lambda h: h.handle(ev.Bye(ident(9), 9, 1, 700)), "unknown_worker", 9),
    ("hello with another protocol version", lambda h: h.hello(5, version=protocol.VERSION + 1, rid=700),
     "version_mismatch", 5),
    ("hello with another role", lambda h: h.hello(5, role="server", rid=700), "bad_field", 5),
    ("hello with a wid out of range", lambda h: h.hello(1 << 20, rid=700), "bad_wid", 1 << 20),
    ("malformed message", lambda h: h.handle(ev.Malformed(ident(4), "bad_header", "not msgpack", 700)),
     "bad_header", 4),
]


@pytest.mark.parametrize("what, send, code, who", ERRORS, ids=[e[0] for e in ERRORS])
def test_a_bad_request_gets_an_error_that_echoes_its_rid_and_changes_nothing(what, send, code, who):
    h = H(2)
    h.start()
    h.push(1)                                          # a step in progress: worker 1 pushed, worker 0 holds a batch
    before = snapshot(h)
    stale = h.c.members.stale_pushes
    assert h.P(send(h)) == [("Error", who, code, 700)]
    assert snapshot(h) == before
    assert h.c.stats.bad_messages == 1 and h.c.members.bad_by_conn == {ident(who): 1}
    # only pushes count as stale (a pull of a stale incarnation computes nothing that could be applied)
    assert h.c.members.stale_pushes == stale + (what in ("another server's push", "stale incarnation push"))
    # and the worker goes on as if nothing happened
    if who == 0:
        assert h.P(h.push(0)) == [("Accumulate", (0, 0)), ("ApplyStep", 0, 1),
                                  ("Theta", 0, 1, 1, [0, 0, 4, 4], h.rid), ("Theta", 1, 1, 1, [1, 0, 4, 4], 5)]


def test_an_error_to_a_request_without_rid_has_no_rid():
    h = H(1)
    out = h.handle(ev.Pull(ident(3), 3, 1, 0, None))
    assert out == [ev.Send(ident(3), {"op": "error", "code": "unknown_worker",
                                      "reason": "worker 3 has not said hello to this server"})]


# ---------------------------------------------------------------------------------------------------- non-finite
def test_a_nonfinite_gradient_is_refused_and_the_step_goes_on_without_it():
    h = H(2)
    h.start()
    assert h.P(h.push(0, value=np.nan, pull=False)) == [("Ack", 0, False, "nonfinite", 5)]
    assert h.P(h.push(1)) == [("Accumulate", (1, 0)), ("ApplyStep", 0, 1), ("Theta", 1, 1, 1, [1, 0, 4, 4], 6)]
    assert h.c.stats.rejected == {"nonfinite": 1} and h.c.stats.applied == 1 and h.c.stats.dropped == {}
    assert h.P(h.pull(0, 1)) == [("Theta", 0, 1, 1, [0, 0, 4, 4], 7)]


def test_the_last_push_of_a_step_nonfinite_still_applies_the_others():
    h = H(2)
    h.start()
    h.push(0)
    assert h.P(h.push(1, value=np.inf)) == [("ApplyStep", 0, 1), ("Theta", 1, 1, 1, [1, 0, 4, 4], 6),
                                            ("Theta", 0, 1, 1, [0, 0, 4, 4], 5)]


def test_every_push_of_a_step_nonfinite_applies_nothing():
    h = H(2)
    h.start()
    h.push(0, value=np.nan)
    assert h.P(h.push(1, value=np.nan)) == [("Theta", 1, 1, 0, [1, 0, 4, 4], 6), ("Theta", 0, 1, 0, [0, 0, 4, 4], 5)]
    assert h.c.version == 0 and h.c.gate.step == 1 and h.c.stats.applied == 0


def test_max_bad_pushes_in_a_row_quarantine_a_worker_for_good():
    h = H(2, server__max_bad_pushes=2)
    h.start()
    assert h.P(h.push(0, value=np.nan)) == []          # refused, its pull waits for the step like any other
    assert h.P(h.push(1)) == [("Accumulate", (1, 0)), ("ApplyStep", 0, 1),
                              ("Theta", 1, 1, 1, [1, 0, 4, 4], 6), ("Theta", 0, 1, 1, [0, 0, 4, 4], 5)]
    assert h.P(h.push(0, value=np.nan)) == [("Error", 0, "quarantined", 7)]
    m = h.c.members
    assert m.quarantined == [0] and m.peers[0].quarantined and not m.peers[0].alive
    assert h.c.stats.rejected == {"nonfinite": 2}
    assert h.c.schedule.lease == {0: 1, 1: 1} and list(h.c.gate.members) == [1]
    # from now on, whatever it asks, and whatever incarnation it claims
    assert h.P(h.pull(0, 1, rid=80)) == [("Error", 0, "quarantined", 80)]
    assert h.P(h.push(0, rid=81)) == [("Error", 0, "quarantined", 81)]
    assert h.P(h.hello(0, rid=82)) == [("Error", 0, "quarantined", 82)]
    assert h.P(h.heartbeat(0)) == [("HB", 0, 1, False, False, h.rid)]
    assert m.peers[0].inc == 1 and m.restarts == 0
    # worker 1 finishes the step alone
    assert h.P(h.push(1)) == [("Accumulate", (1, 1)), ("ApplyStep", 1, 2), ("Theta", 1, 2, 2, [0, 0, 8, 4], h.rid)]


def test_a_finite_push_resets_the_bad_streak():
    h = H(1, train__consistency="asp", server__max_bad_pushes=2)
    h.start()
    assert h.P(h.push(0, value=np.nan)) == [("Theta", 0, 1, 0, [0, 0, 4, 4], 3)]
    assert h.P(h.push(0)) == [("Update", (0, 1), 0, 1, 1.0), ("Theta", 0, 2, 1, [0, 0, 8, 4], 4)]
    assert h.P(h.push(0, value=np.nan)) == [("Theta", 0, 3, 1, [0, 0, 12, 4], 5)]
    assert h.c.members.quarantined == [] and h.c.members.peers[0].bad_streak == 1


# ---------------------------------------------------------------------------------------------------- parking
def test_a_worker_without_a_shard_of_its_own_reads_one_with_its_holder():
    """More workers than shards (a worker attached to a run): the extra one reads shard 0 from the same cursor as
    its holder, so each takes the next rows of the epoch, none twice; when a shard frees up it takes it over."""
    h = H(3, shards=[40, 40])
    assert h.P(h.start()) == [("Welcome", 0, 1, 1), ("Welcome", 1, 1, 2), ("Welcome", 2, 1, 3),
                              ("Theta", 0, 0, 0, [0, 0, 0, 4], 4), ("Theta", 1, 0, 0, [1, 0, 0, 4], 5),
                              ("Theta", 2, 0, 0, [0, 0, 4, 4], 6)]
    assert h.c.schedule.lease == {0: 0, 1: 1} and h.c.schedule.held_by(2) == [0] and 2 in h.c.gate.members
    assert h.P(h.push(0)) == [("Accumulate", (0, 0))]
    assert h.P(h.push(2)) == [("Accumulate", (2, 0))]
    # worker 1 leaves holding [1, 0, 0, 4]: the step applies with the two gradients it has, worker 2 takes over
    # shard 1 from that batch (handed back) on, and shard 0 goes on where it stood
    assert h.P(h.bye(1)) == [("ApplyStep", 0, 1), ("Bye", 1, 9), ("Theta", 0, 1, 1, [0, 0, 8, 4], 7),
                             ("Theta", 2, 1, 1, [1, 0, 0, 4], 8)]
    assert h.c.schedule.lease == {0: 0, 1: 2} and h.c.schedule.shared == {}
    assert h.P(h.push(2)) == [("Accumulate", (2, 1))]
    assert h.P(h.push(0)) == [("Accumulate", (0, 1)), ("ApplyStep", 1, 2), ("Theta", 0, 2, 2, [0, 0, 12, 4], 11),
                              ("Theta", 2, 2, 2, [1, 0, 4, 4], 10)]


@pytest.mark.parametrize("mode", ["bsp", "ssp", "asp"])
def test_a_worker_that_joins_a_running_static_run_trains_and_every_row_is_read_once_per_epoch(mode):
    """The attach case: two launcher workers on two shards, a third joins after some steps. It trains at once
    (on a shard it reads with that shard's holder), the shards keep their cursors, and every epoch still reads
    every row exactly once."""
    sizes = [24, 16]
    h = H(2, shards=sizes, train__epochs=2, train__consistency=mode, train__staleness=1)
    h.start()
    for _ in range(3):                                       # a few steps with the launcher's two workers
        h.push(0)
        h.push(1)
    before = {s: (c.epoch, c.pos) for s, c in enumerate(h.c.schedule.cursors)}
    h.hello(2)
    out = h.pull(2, 0)
    assert {s: (c.epoch, c.pos) for s, c in enumerate(h.c.schedule.cursors)} != before   # it was served at once
    served = [i for i in out if isinstance(i, ev.Theta)]
    assert [i.batch[0] for i in served] == [0] and h.c.schedule.held_by(2) == [0]
    h.drive()
    batches = [i.batch for i in h.log if isinstance(i, ev.Theta)]
    pushed = h.c.stats.pushes
    assert pushed.get(2, 0) > 0                              # the joined worker's gradients were applied
    for s, size in enumerate(sizes):                         # each shard, each epoch: its rows once
        for epoch in range(2):
            spans = sorted((b[2], b[3]) for b in batches if b[0] == s and b[1] == epoch)
            assert [a for a, _ in spans] == [sum(c for _, c in spans[:k]) for k in range(len(spans))]
            assert sum(c for _, c in spans) == size
    assert h.c.schedule.rows_visited() == {0: 40, 1: 40} and h.c.done
    assert report.summary(h.c, h.now)["workers"] == 3       # every worker that pushed, the joined one too


def test_status_says_how_many_workers_a_server_still_waits_for():
    from psrv.launch import format_status
    h = H(3, alone=True)                                     # --role server: the gate waits for 3
    h.hellos([0, 1])
    h.pull(0)
    st = report.status(h.c, h.now)
    assert (st["started"], st["workers_expected"], st["workers_in"]) == (False, 3, 1)
    shell = {"server_id": "s", "address": "tcp://127.0.0.1:1", "server_restarts": 0}   # what the server adds
    assert "waiting for 2 of 3 workers to join" in format_status({**shell, **st})
    h.pull(1)
    h.hello(2)
    h.pull(2)
    st = report.status(h.c, h.now)
    assert st["started"] and "waiting" not in format_status({**shell, **st})


@pytest.mark.parametrize("mode", ["bsp", "ssp"])
def test_parked_pulls_are_told_to_stop_when_the_run_stops(mode):
    h = H(3, train__consistency=mode, train__staleness=0)
    h.start()
    h.push(0)
    h.push(1)
    assert sorted(h.c.parked) == [0, 1]
    assert h.P(h.stop("tol")) == [("Stop", 0, "tol", 7), ("Stop", 1, "tol", 8)]
    assert not h.c.parked and not h.c.done
    assert h.P(h.push(2)) == [("Stop", 2, "tol", 9), ("Finish", "tol")]
    assert h.c.done and h.c.version == (0 if mode == "bsp" else 2)


# ---------------------------------------------------------------------------------------------------- epochs
@pytest.mark.parametrize("schedule", ["static", "dynamic"])
@pytest.mark.parametrize("mode", ["bsp", "ssp", "asp"])
def test_uneven_shards_every_row_is_served_once_and_the_run_ends_by_epochs(mode, schedule):
    sizes = [10, 7, 5]
    h = H(2, shards=sizes, train__epochs=1, train__consistency=mode, train__schedule=schedule)
    h.start()
    h.drive()
    batches = [i.batch for i in h.log if isinstance(i, ev.Theta)]
    assert sum(b[3] for b in batches) == sum(sizes)
    for s, size in enumerate(sizes):   # each shard's batches tile its rows exactly once
        spans = sorted((b[2], b[3]) for b in batches if b[0] == s)
        assert all(b[1] == 0 for b in batches if b[0] == s)
        assert [a for a, _ in spans] == [sum(c for _, c in spans[:k]) for k in range(len(spans))]
        assert sum(c for _, c in spans) == size
    stops = [h.proj(i) for i in h.log if isinstance(i, ev.Send)]
    assert [s[:3] for s in stops] in ([("Stop", 0, "epochs"), ("Stop", 1, "epochs")],
                                      [("Stop", 1, "epochs"), ("Stop", 0, "epochs")])
    finishes = [i for i in h.log if isinstance(i, ev.Finish)]
    assert finishes == [ev.Finish("epochs")] and h.log[-1] == ev.Finish("epochs")
    assert h.c.schedule.rows_visited() == {0: 22} and h.c.stats.samples == 22 and h.c.done


def test_uneven_shards_bsp_exact_sequence():
    h = H(2, shards=[10, 7, 5], train__epochs=1)
    h.start()
    h.drive()
    keep = (ev.Theta, ev.ApplyStep, ev.Send, ev.Finish)
    assert [h.proj(i) for i in h.log if isinstance(i, keep)] == [
        ("Theta", 0, 0, 0, [0, 0, 0, 4], 3), ("Theta", 1, 0, 0, [1, 0, 0, 4], 4),
        ("ApplyStep", 0, 1), ("Theta", 1, 1, 1, [1, 0, 4, 3], 6), ("Theta", 0, 1, 1, [2, 0, 0, 4], 5),
        # worker 1 has read its shard once: it stops first, the others finish the steps without it
        ("ApplyStep", 1, 2), ("Stop", 1, "epochs", 8), ("Theta", 0, 2, 2, [0, 0, 4, 4], 7),
        ("ApplyStep", 2, 3), ("Theta", 0, 3, 3, [0, 0, 8, 2], 9),
        ("ApplyStep", 3, 4), ("Theta", 0, 4, 4, [2, 0, 4, 1], 10),
        ("ApplyStep", 4, 5), ("Stop", 0, "epochs", 11), ("Finish", "epochs")]


def test_epochs_with_a_death_every_row_is_applied_once():
    h = H(2, shards=[10, 7, 5], train__epochs=1, server__heartbeat_timeout_s=5.0)
    h.start()
    h.push(0), h.push(1), h.push(0)                    # worker 1 dies holding [1, 0, 4, 3]
    h.now = 4.0
    h.heartbeat(0)
    assert h.P(h.tick(6.0)) == [("ApplyStep", 1, 2), ("Theta", 0, 2, 2, [0, 0, 4, 4], 7)]
    h.drive()
    assert h.c.schedule.rows_visited() == {0: 22} and h.c.stats.samples == 22
    assert [i for i in h.log if isinstance(i, ev.Finish)] == [ev.Finish("epochs")]
    assert sorted(tuple(i.batch) for i in h.log if isinstance(i, ev.Theta)).count((1, 0, 4, 3)) == 2


# ---------------------------------------------------------------------------------------------------- stop rules
@pytest.mark.parametrize("first", [0, 1])
def test_bsp_stops_at_train_steps(first):
    h = H(2, train__steps=2)
    h.start()
    h.push(0), h.push(1)
    other = 1 - first
    # a pull for clock 2 >= steps is answered with stop at once, even before the last step applies
    assert h.P(h.push(first)) == [("Accumulate", (first, 1)), ("Stop", first, "steps", 7)]
    assert h.P(h.push(other)) == [("Accumulate", (other, 1)), ("ApplyStep", 1, 2), ("Stop", other, "steps", 8),
                                  ("Finish", "steps")]
    assert h.c.version == 2 and h.c.stats.applied == 4 and h.c.stopping == "steps"


def test_asp_stops_after_steps_times_n_updates():
    h = H(2, train__consistency="asp", train__steps=2)
    h.start()
    outs = [h.P(h.push(w)) for w in (0, 1, 0, 1, 0)]
    assert outs == [[("Update", (0, 0), 0, 1, 0.5), ("Theta", 0, 1, 1, [0, 0, 4, 4], 5)],
                    [("Update", (1, 0), 0, 2, 0.5), ("Theta", 1, 1, 2, [1, 0, 4, 4], 6)],
                    [("Update", (0, 1), 1, 3, 0.5), ("Theta", 0, 2, 3, [0, 0, 8, 4], 7)],
                    [("Update", (1, 1), 1, 4, 0.5), ("Stop", 1, "steps", 8)],
                    [("Stop", 0, "steps", 9), ("Finish", "steps")]]     # the 5th gradient is not applied
    assert h.c.version == 4 and h.c.stats.applied == 4


def test_max_wall_s_stops_the_run_on_a_tick():
    h = H(2, train__max_wall_s=10.0, **WAIT)
    h.tick(3.0)
    h.start()                                           # the clock starts when the gate opens (t=3)
    h.push(0)
    assert h.P(h.tick(13.0)) == []
    assert h.P(h.tick(13.5)) == [("Stop", 0, "max_wall_s", 5)]
    assert h.P(h.push(1)) == [("Stop", 1, "max_wall_s", 6), ("Finish", "max_wall_s")]
    assert h.c.version == 0


def test_stop_tol_tells_each_worker_at_its_next_request():
    h = H(2)
    h.start()
    assert h.P(h.stop("tol")) == []
    assert h.P(h.hello(5, rid=60)) == [("Error", 5, "finished", 60)]
    assert h.P(h.pull(0, 0, rid=61)) == [("Stop", 0, "tol", 61)]
    assert h.P(h.push(1, rid=62)) == [("Stop", 1, "tol", 62), ("Finish", "tol")]
    assert h.c.version == 0
    # the batches in flight went back to their shards
    assert [c.returned for c in h.c.schedule.cursors] == [[[0, 0, 4]], [[0, 0, 4]]]


def test_stop_terminated_at_once_is_done_immediately():
    h = H(2)
    h.start()
    h.push(0)
    assert h.P(h.stop("terminated", at_once=True)) == [("Stop", 0, "terminated", 5), ("Finish", "terminated")]
    assert h.c.done and h.c.members.peers[1].live    # worker 1 is not waited for


def test_join_timeout_fails_naming_the_missing_ids():
    h = H(3, server__join_timeout_s=10.0, **WAIT)
    h.hello(0), h.hello(2), h.pull(0)
    assert h.P(h.tick(10.0)) == []
    assert h.P(h.tick(10.5)) == [("Fail", "only 1 of 3 workers joined within 10 s (missing worker ids: [1]; said "
                                          "hello but never pulled: [2])")]


def test_a_server_started_alone_waits_for_its_workers_as_long_as_it_takes():
    h = H(2, alone=True, server__join_timeout_s=10.0, **WAIT)
    h.hello(0), h.pull(0)
    assert h.P(h.tick(500.0)) == []
    assert h.P(h.hello(1)) == [("Welcome", 1, 1, 3)] and not h.c.gate.open
    assert h.P(h.pull(1)) == [("Theta", 0, 0, 0, [0, 0, 0, 4], 2), ("Theta", 1, 0, 0, [1, 0, 0, 4], 4)]


def test_finish_is_emitted_exactly_once():
    h = H(1, train__steps=1)
    h.start()
    assert h.P(h.push(0)) == [("Accumulate", (0, 0)), ("ApplyStep", 0, 1), ("Stop", 0, "steps", 3),
                              ("Finish", "steps")]
    assert h.P(h.tick(1.0)) == []
    assert h.P(h.stop("terminated", at_once=True)) == []
    assert h.P(h.heartbeat(0)) == [("HB", 0, 1, True, False, 4)]


def test_finish_is_the_last_instruction():
    h = H(2, has_test=True, train__steps=2, train__log_every=1, checkpoint__every_steps=1, train__eval_every=1)
    h.start()
    h.push(0), h.push(1), h.push(0)
    assert h.P(h.push(1)) == [("Accumulate", (1, 1)), ("ApplyStep", 1, 2), ("Stop", 1, "steps", 8),
                              ("Log", 2, 16, 1.0), ("Evaluate", 2), ("Checkpoint", 2), ("Finish", "steps")]


# ---------------------------------------------------------------------------------------------------- cadence
def test_log_checkpoint_and_evaluate_cadence_with_the_row_weighted_loss():
    # shard 0 has 6 rows: worker 0's batches are 4, 2, 4, 2, ... rows; worker 1's always 4
    h = H(2, shards=[6, 40], has_test=True, train__log_every=2, checkpoint__every_steps=3, train__eval_every=2)
    h.start()
    extra, rows, wsum = [], 0, 0.0
    for step in range(6):
        h.now = step + 1.0
        c0 = h.served[0][2][3]
        h.push(0, loss=float(step))
        out = h.P(h.push(1, loss=10.0))
        rows += c0 + 4
        wsum += step * c0 + 10.0 * 4
        expect = []
        if (step + 1) % 2 == 0:
            expect.append(("Log", step + 1, h.c.stats.samples, wsum / rows))
            rows, wsum = 0, 0.0
            expect.append(("Evaluate", step + 1))
        if (step + 1) % 3 == 0:
            expect.append(("Checkpoint", step + 1))
        assert out[4:] == expect, step
        extra += out[4:]
    assert [e[0] for e in extra] == ["Log", "Evaluate", "Checkpoint", "Log", "Evaluate", "Log", "Evaluate",
                                     "Checkpoint"]
    assert [e[3] for e in extra if e[0] == "Log"] == [(0 * 4 + 1 * 2 + 80) / 14, (2 * 4 + 3 * 2 + 80) / 14,
                                                      (4 * 4 + 5 * 2 + 80) / 14]
    log = [i for i in h.log if isinstance(i, ev.Log)]
    assert log[0] == ev.Log(2, 2.0, 14, (2 + 80) / 14)   # elapsed_s from the gate's opening (t=0)
    assert h.c.last_loss == (4 * 4 + 5 * 2 + 80) / 14


def test_no_evaluate_without_a_test_set():
    h = H(1, train__eval_every=1, train__log_every=1, checkpoint__every_steps=0)
    h.start()
    assert h.P(h.push(0, loss=2.0)) == [("Accumulate", (0, 0)), ("ApplyStep", 0, 1), ("Theta", 0, 1, 1,
                                        [0, 0, 4, 4], 3), ("Log", 1, 4, 2.0)]


def test_ssp_cadence_counts_steps_as_updates_over_n():
    h = H(2, train__consistency="ssp", train__log_every=1, checkpoint__every_steps=2)
    h.start()
    assert h.P(h.push(0, loss=1.0))[1:] == [("Theta", 0, 1, 1, [0, 0, 4, 4], 5)]
    assert h.P(h.push(1, loss=3.0))[2:] == [("Log", 1, 8, 2.0)]
    h.push(0, loss=5.0)
    assert h.P(h.push(1, loss=7.0))[2:] == [("Log", 2, 16, 6.0), ("Checkpoint", 2)]


# ---------------------------------------------------------------------------------------------------- restart
def trained(n=2, steps=3, **kw) -> H:
    """n workers after `steps` BSP steps, each holding the batch of the next one."""
    h = H(n, **kw)
    h.start()
    for _ in range(steps):
        for w in range(n):
            h.push(w)
    return h


def test_restore_serves_the_inflight_batches_again_first_and_resumes_the_clocks():
    h = trained()
    h.now = 7.0
    st = h.c.state(h.now)
    assert st["step"] == 3 and st["version"] == 3 and st["clocks"] == [[0, 3], [1, 3]]
    assert st["schedule"]["cursors"] == [[40, 0, 16, [[0, 12, 4]]], [40, 0, 16, [[0, 12, 4]]]]
    assert h.c.batches == {0: [0, 0, 12, 4], 1: [1, 0, 12, 4]}    # state() leaves the running coordinator alone
    h2 = H(2, now=100.0)
    h2.c.restore(st)
    assert h2.P(h2.hello(0)) == [("Welcome", 0, 2, 1)]
    assert h2.P(h2.pull(0, 0)) == []
    assert h2.P(h2.hello(1)) == [("Welcome", 1, 2, 3)]
    assert h2.P(h2.pull(1, 0)) == [("Theta", 0, 3, 3, [0, 0, 12, 4], 2), ("Theta", 1, 3, 3, [1, 0, 12, 4], 4)]
    assert h2.P(h2.push(0)) == [("Accumulate", (0, 3))]
    assert h2.P(h2.push(1)) == [("Accumulate", (1, 3)), ("ApplyStep", 3, 4), ("Theta", 1, 4, 4, [1, 0, 16, 4], 6),
                                ("Theta", 0, 4, 4, [0, 0, 16, 4], 5)]
    assert h2.c.elapsed_s(100.0) == 7.0 and h2.c.stats.applied == 8 and h2.c.members.incarnations == {0: 2, 1: 2}


def test_restore_opens_with_the_workers_that_were_training():
    h = trained(n=3, steps=1)
    h.bye(2)                                           # two workers were training at the checkpoint
    st = h.c.state(h.now)
    h2 = H(3, now=50.0)
    h2.c.restore(st)
    assert h2.c.n_start == 2
    h2.hello(0), h2.pull(0)
    assert h2.P(h2.hello(1)) == [("Welcome", 1, 2, 3)]
    assert h2.P(h2.pull(1)) == [("Theta", 0, 1, 1, [0, 0, 4, 4], 2), ("Theta", 1, 1, 1, [1, 0, 4, 4], 4)]


def test_restore_join_timeout_opens_without_the_missing_workers():
    h = trained(n=3, steps=2)
    h.now = 7.0
    st = h.c.state(h.now)
    h2 = H(3, now=100.0, server__join_timeout_s=10.0, **WAIT)
    h2.c.restore(st)
    h2.hello(0), h2.pull(0), h2.hello(1), h2.pull(1)
    assert h2.P(h2.tick(110.0)) == []
    # worker 2 never came back: its shard goes to worker 0, its batch in flight first
    assert h2.P(h2.tick(110.5)) == [("Theta", 0, 2, 2, [0, 0, 8, 4], 2), ("Theta", 1, 2, 2, [1, 0, 8, 4], 4)]
    assert h2.c.gate.open and h2.c.schedule.lease == {0: 0, 1: 1, 2: 0} and h2.c.elapsed_s(110.5) == 7.0
    h2.push(0)
    assert h2.P(h2.push(1)) == [("Accumulate", (1, 2)), ("ApplyStep", 2, 3), ("Theta", 1, 3, 3, [1, 0, 12, 4], 6),
                                ("Theta", 0, 3, 3, [2, 0, 8, 4], 5)]


def test_restore_join_timeout_with_nobody_fails():
    h = trained(n=2, steps=1)
    h2 = H(2, now=100.0, server__join_timeout_s=10.0)
    h2.c.restore(h.c.state(h.now))
    assert h2.P(h2.tick(110.5)) == [("Fail", "only 0 of 2 workers joined within 10 s (missing worker ids: [0, 1])")]


def test_restore_in_the_middle_of_a_bsp_step_does_not_deadlock():
    h = trained(n=2, steps=3)
    assert h.P(h.push(0)) == [("Accumulate", (0, 3))]   # worker 0 pushed step 3; worker 1 still computes it
    st = h.c.state(h.now)                                # e.g. SIGTERM now: finish() saves a checkpoint
    h2 = H(2, now=100.0)
    h2.c.restore(st)
    h2.hellos([0, 1])
    # both batches of step 3 were handed back: each worker computes step 3 again
    assert h2.P(h2.pull(0, 0)) == []
    assert h2.P(h2.pull(1, 0)) == [("Theta", 0, 3, 3, [0, 0, 12, 4], 3), ("Theta", 1, 3, 3, [1, 0, 12, 4], 4)]
    h2.push(0)
    assert h2.P(h2.push(1))[:2] == [("Accumulate", (1, 3)), ("ApplyStep", 3, 4)]


@pytest.mark.parametrize("mode", ["bsp", "asp"])
def test_restore_at_train_steps_serves_no_more_steps(mode):
    h = H(2, train__steps=3, train__consistency=mode)
    h.start()
    h.drive()
    assert h.c.version == (3 if mode == "bsp" else 6) and h.c.done
    h2 = H(2, now=100.0, train__steps=3, train__consistency=mode)
    h2.c.restore(h.c.state(h.now))
    h2.hellos([0, 1])
    # worker 1 has only said hello: it is not in the run, and not waited for
    assert h2.P(h2.pull(0, 0)) == [("Stop", 0, "steps", 3), ("Finish", "steps")]


@pytest.mark.parametrize("end", ["steps", "sigterm"])
def test_resume_of_an_ended_run_waits_for_every_worker_and_serves_the_unbroken_runs_batches(end):
    # the oracle: a run of 6 BSP steps that never stopped, and the batch each worker is served for step 3
    whole = H(2, train__steps=6)
    whole.start()
    for _ in range(3):
        whole.push(0), whole.push(1)
    expected = {w: whole.served[w] for w in (0, 1)}
    h = H(2, train__steps=3 if end == "steps" else 6)
    h.start()
    if end == "steps":
        h.drive()
    else:  # stopped while both compute step 3: both are told to stop at their push, and their batches go back
        for _ in range(3):
            h.push(0), h.push(1)
        h.stop("signal")
        h.push(0), h.push(1)
    assert h.c.done and h.c.step == 3 and not h.c.gate.members   # nobody is left in the gate at the end
    h2 = H(2, now=100.0, train__steps=6)
    h2.c.restore(h.c.state(h.now))
    h2.hellos([0, 1])
    assert h2.P(h2.pull(0, 0)) == []   # both were training when the run ended: the gate waits for worker 1
    h2.pull(1, 0)
    assert {w: h2.served[w] for w in (0, 1)} == expected


# ---------------------------------------------------------------------------------------------------- status, scale
def test_status_stays_bounded_after_churn():
    h = H(4, **WAIT)
    h.start()
    h.push(0)
    m = h.c.members
    # 996 more workers register (straight through Membership: each coordinator hello re-leases the shards over
    # every live worker, so 1,000 of them cost seconds), then 900 of them leave
    for i in range(996):
        m.hello(b"x%d" % i, -1, 2 ** 31 - 1, "h" * 1000, False, h.now)
    assert len(m.peers) == 1000
    for p in list(m.peers.values())[:900]:
        p.alive = False
    st = report.status(h.c, h.now + 1.0)
    ws = st["workers"]
    assert len(ws) == report.STATUS_WORKERS and st["workers_total"] == 1000 and st["workers_live"] == 100
    assert all(w["alive"] for w in ws[:100]) and not any(w["alive"] for w in ws[100:])
    assert [w["wid"] for w in ws[:100]] == list(range(900, 1000))        # live first, by wid
    assert [w["wid"] for w in ws[100:]] == list(range(100))
    assert max(len(w["host"]) for w in ws) == 128
    header = {"op": "status", "rid": 2 ** 31, "state": {"server_id": "f" * 12, "address": "tcp://127.0.0.1:65535",
                                                         "pid": 2 ** 31, "server_restarts": 2 ** 31, **st}}
    assert len(msgpack.packb(header)) < protocol.HEADER_MAX_BYTES
    assert len(protocol.encode(header)[0]) < protocol.HEADER_MAX_BYTES


def test_summary_lists_the_noisiest_connections_only():
    h = H(2)
    h.start()
    for i in range(50):
        for _ in range(i % 7 + 1):
            h.handle(ev.Malformed(b"c%d" % i, "bad_header", "x", None))
    s = report.summary(h.c, h.now)
    assert len(s["bad_messages_by_peer"]) == report.SUMMARY_PEERS
    assert sorted(s["bad_messages_by_peer"].values()) == [6] * 3 + [7] * 7
    assert s["bad_messages"] == sum(i % 7 + 1 for i in range(50))


def test_membership_is_bounded_through_the_coordinator():
    h = H(1)
    m = h.c.members
    for w in range(MAX_PEERS):
        m.hello(b"x", w + 10, 1, "h", False, 0.0)
    assert h.P(h.hello(-1, idt=b"y", rid=90)) == [("Error", b"y", "too_many_workers", 90)]


def test_four_workers_five_hundred_bsp_steps():
    h = H(4, shards=[1000] * 4, train__steps=500, train__log_every=50, checkpoint__every_steps=100)
    h.start()
    h.drive()
    kinds: dict = {}
    for i in h.log:
        kinds[type(i).__name__] = kinds.get(type(i).__name__, 0) + 1
    # 4 initial thetas + 4 x 499 after each step but the last; the last step's pulls are told to stop
    assert kinds == {"Welcome": 4, "Theta": 4 * 500, "Accumulate": 2000, "ApplyStep": 500, "Log": 10,
                     "Checkpoint": 5, "Send": 4, "Finish": 1}
    assert [i.step for i in h.log if isinstance(i, ev.ApplyStep)] == list(range(500))
    assert h.c.version == 500 and h.c.stats.applied == 2000 and h.c.stats.samples == 8000
    assert h.c.schedule.rows_visited() == {0: 4000, 1: 4000}
    assert h.c.stopping == "steps" and h.c.done and h.c.stats.wait_s == 0.0


def test_summary_per_worker_counts_stay_bounded():
    counts = {w: w % 7 + 1 for w in range(5000)}
    out = report._per_worker(counts)
    assert len(out) == report.STATUS_WORKERS + 1 and sum(out.values()) == sum(counts.values())
    assert report._per_worker({3: 1, 1: 2}) == {"1": 2, "3": 1}


def test_a_lone_worker_whose_pushes_are_refused_is_quarantined_not_called_diverged():
    h = H(1, server__max_bad_pushes=2)
    h.start()
    h.push(0, value=np.nan)
    out = h.P(h.push(0, value=np.nan))
    assert out[0][:3] == ("Error", 0, "quarantined") and not any(i[0] == "Fail" for i in out)


def test_a_second_push_for_a_clock_already_pushed_is_a_duplicate_and_changes_nothing():
    """Issue 13, point 5: a push with a new seq for a clock this worker pushed already (a client retrying with a
    fresh seq) is acknowledged as a duplicate, like a repeated seq, and never applied; a push for a clock it was
    never served is still bad_clock."""
    h = H(1, train__consistency="asp")
    h.start()
    served = h.served[0]
    out = h.P(h.push(0, pull=False))
    assert out[-1][:4] == ("Ack", 0, True, "")
    version = h.c.version
    again = h.P(h.push(0, clock=served[0], pull=True, rid=900))    # a new seq, the same clock
    assert again == [("Ack", 0, False, "duplicate", 900)]
    assert h.c.version == version and h.c.stats.duplicates == 1
    assert h.P(h.push(0, clock=served[0] + 5, rid=901)) == [("Error", 0, "bad_field", 901)]  # no batch held
    assert h.P(h.pull(0, served[0] + 1))[0][:3] == ("Theta", 0, served[0] + 1)


def _group_run(h, seen: list) -> None:
    """Both workers pull, then push with pull = true until the run stops; each Theta as (clock, first BSP step,
    budget, rows) into `seen`."""
    def note(out):
        seen.extend((i.clock, i.first_step, i.step_budget, i.batch[3]) for i in out if isinstance(i, ev.Theta))
    for w in range(h.n):
        note(h.pull(w, 0))
    for _ in range(100):
        if h.c.stopping:
            return
        for w in range(h.n):
            if w not in h.stopped:
                note(h.push(w))


@pytest.mark.parametrize("steps,last", [(14, (3, 10, 4, 16)), (13, (3, 10, 3, 12))])
def test_group_steps_count_bsp_steps_and_the_last_holds_what_train_steps_has_left(steps, last):
    """train.group_steps = 4, batch 4, shards of 40 rows (10 batches an epoch): a group step serves up to 16 rows
    and the BSP steps from first_step on; the epoch's end cuts one to 8 rows (2 steps), which the count follows; the
    last holds only the steps train.steps has left. The run's step is BSP's."""
    h = H(2, shm=True, train__group_steps=4, train__steps=steps)
    h.hellos(range(2))
    seen = []
    _group_run(h, seen)
    want = [(0, 0, 4, 16), (1, 4, 4, 16), (2, 8, 4, 8), last]
    assert seen == [s for s in want for _ in range(2)]
    assert h.c.step == steps and h.c.stopping == "steps" and h.c.gate.step == 4
    # a pull asked again before its push (a lost reply) gets the same step and budget
    h2 = H(2, shm=True, train__group_steps=4, train__steps=steps)
    h2.hellos(range(2))
    first = [i for i in h2.pull(0, 0) + h2.pull(1, 0) if isinstance(i, ev.Theta) and i.ident == ident(1)]
    again = [i for i in h2.pull(1, 0) if isinstance(i, ev.Theta)]
    assert len(first) == len(again) == 1
    assert (again[0].clock, again[0].first_step, again[0].step_budget, again[0].batch) == (0, 0, 4, first[0].batch)


def test_a_group_steps_checkpoint_resumed_with_other_group_steps_or_none_counts_bsp_steps():
    """The gate's clock counts group steps: resumed without them (or with another K) the run goes on from the BSP
    steps done, every worker at that step; a plain checkpoint resumed with group steps keeps its steps."""
    h = H(2, shm=True, train__group_steps=4, train__steps=14)
    h.hellos(range(2))
    _group_run(h, [])
    st = h.c.state(h.now)
    assert (st["step"], st["gate_step"], st["group_steps"]) == (14, 4, 4)
    for changes in ({}, {"train__group_steps": 2}):
        r = H(2, shm=True, train__steps=20, **changes)
        r.c.restore(st)
        assert (r.c.step, r.c.gate.step, r.c.saved_clocks) == (14, 14, {0: 14, 1: 14})
    same = H(2, shm=True, train__group_steps=4, train__steps=20)
    same.c.restore(st)
    assert (same.c.step, same.c.gate.step, same.c.saved_clocks) == (14, 4, {0: 4, 1: 4})
    plain = H(2, shm=True, train__steps=10)
    plain.hellos(range(2))
    _group_run(plain, [])
    grouped = H(2, shm=True, train__group_steps=4, train__steps=20)
    grouped.c.restore(plain.c.state(plain.now))
    assert (grouped.c.step, grouped.c.gate.step) == (10, 10)


def test_a_members_notes_are_logged_only_when_they_fit_its_push():
    """The notes come from a worker's shared memory: whole rows summing to the push's count, finite losses and
    times, else the push's one loss is logged instead (psrv/coordinator.py, _checked_notes)."""
    from psrv.coordinator import _checked_notes, _merge_notes
    good = np.array([[32.0, 16.0, 5.0], [8.0, 2.0, 6.0], [0.0, 0.0, 7.0]])
    assert _checked_notes(good, 40) is good
    for bad, count in [(good, 41), (good.astype(np.float32), 40), (good[:, :2], 40),
                       (np.array([[32.5, 16.0, 5.0], [7.5, 2.0, 6.0]]), 40),
                       (np.array([[48.0, 16.0, 5.0], [-8.0, 2.0, 6.0]]), 40),
                       (np.array([[40.0, np.nan, 5.0]]), 40), (np.array([[40.0, 1.0, np.inf]]), 40), ([[40, 1, 1]], 40)]:
        assert _checked_notes(bad, count) is None
    merged = _merge_notes(good[:2], np.array([[32.0, 8.0, 5.5], [32.0, 4.0, 5.9], [32.0, 1.0, 7.5]]))
    assert merged.tolist() == [[64.0, 24.0, 5.5], [40.0, 6.0, 6.0], [32.0, 1.0, 7.5]]


@pytest.mark.parametrize("wid,local", [(0, False), (2, True), (-1, True)],
                         ids=["from another machine", "an id past the launcher's", "asking for an id"])
def test_group_steps_take_only_the_launchers_own_workers(wid, local):
    """Their gradients meet in this machine's shared memory, one place per launcher worker: any other hello is
    refused with group_only, and changes nothing; the launcher's own are welcome."""
    h = H(2, shm=True, train__group_steps=4)
    assert h.P(h.hello(wid, local=local, rid=700)) == [("Error", wid, "group_only", 700)]
    assert h.c.members.peers == {}
    assert [x[0] for x in h.P(h.hellos([0, 1]))] == ["Welcome", "Welcome"]


def test_group_steps_go_on_when_every_member_of_a_step_left_before_pushing():
    """Worker 1 is restarted during group step 0 (a new incarnation waits for step 1) and worker 0, the step's other
    member, stalls past the deadline: step 0 is over without a push, none of its steps count, and worker 1 is
    served step 1 (it once waited there for ever)."""
    h = H(2, shm=True, train__group_steps=4, server__progress_deadline_s=1.0, server__heartbeat_timeout_s=1000.0)
    h.hellos([0, 1])
    h.pull(0, 0)
    h.pull(1, 0)
    h.hello(1)                                      # its new incarnation
    assert [i for i in h.pull(1, 0) if isinstance(i, ev.Theta)] == []    # parked: step 0 is under way
    served = [i for i in h.tick(5.0) if isinstance(i, ev.Theta)]          # worker 0 is left behind
    assert [(int(i.ident[1:]), i.clock) for i in served] == [(1, 1)]
    assert h.c.gate.step == 1 and h.c.step == 0 and h.c.stats.straggles == 1


def test_a_group_push_whose_optimizer_state_is_not_finite_is_refused():
    """Adagrad's or Adam's state can overflow while the push itself stays finite: the step must not take it."""
    h = H(2, shm=True, train__group_steps=4)
    h.hellos([0, 1])
    h.pull(0, 0)
    h.pull(1, 0)
    out = h.P(h.push(0, state=np.array([[1.0, np.inf, 0.0]])))
    assert h.c.stats.rejected == {"nonfinite": 1} and not any(o[0] == "Accumulate" for o in out)
    h.push(1, state=np.array([[1.0, 2.0, 3.0]]))
    assert h.c.stats.rejected == {"nonfinite": 1}
