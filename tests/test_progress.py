"""Progress, not only heartbeats (psrv/progress.py, psrv/roster.py): a worker enters the run at its first pull, and a
member that holds a batch or the barrier without pushing past the deadline is a straggler. Pure, with an injected
clock (tests/coord_harness.py): exact instructions, no sockets, no sleeping."""
from __future__ import annotations

from psrv import report
from psrv.progress import FACTOR, Progress

from .coord_harness import H

HB = {"server__heartbeat_timeout_s": 1000.0}   # time moves by hand, without heartbeats
DL = {"server__progress_deadline_s": 2.0, **HB}


# ---------------------------------------------------------------------------------------------------- Progress
def test_the_deadline_is_the_floor_or_factor_times_the_median_hold_time():
    p = Progress(2.0)
    assert p.deadline_s() == 2.0                     # nothing measured yet
    for w, held in enumerate([0.01, 0.5, 0.5, 0.5, 9.0]):
        p.served(w, 0.0)
        p.pushed(w, held)
    assert p.deadline_s() == FACTOR * 0.5


def test_a_member_is_a_straggler_only_while_someone_else_is_not_stalled():
    p = Progress(2.0)
    for w in (0, 1, 2):
        p.served(w, 0.0)
    members = {0: None, 1: None, 2: None}
    assert p.stragglers(3.0, members, {}) == []      # all late alike (a slow first step): nobody gains
    p.pushed(0, 0.1)
    assert p.deadline_s() == 2.0
    assert p.stragglers(3.0, members, {0: ()}) == [1, 2]   # worker 0 waits on them
    assert p.stragglers(3.0, members, {0: (), 1: ()}) == [2]  # a parked pull is waiting, not stalled
    assert Progress(0.0).stragglers(100.0, members, {0: ()}) == []  # 0: no deadline


# ---------------------------------------------------------------------------------------------------- joining
def test_a_hello_alone_holds_nothing_and_the_run_ends_without_it():
    h = H(2, train__steps=5, **HB)
    h.start()
    assert h.P(h.hello(-1, idt=b"x")) == [("Welcome", 2, 1, 5)]    # and then only heartbeats
    assert h.c.schedule.lease == {0: 0, 1: 1} and sorted(h.c.gate.members) == [0, 1]
    assert not h.c.members.peers[2].ready and h.c.members.peers[2].live
    h.drive()                                        # BSP never waits for it
    assert h.c.step == 5 and h.c.done and h.log[-1].reason == "steps"
    st = report.status(h.c, h.now)
    assert [(w["ready"], w["alive"], w["shards"]) for w in st["workers"] if w["wid"] == 2] == [(False, True, [])]


def test_a_new_worker_enters_the_gate_and_takes_shards_at_its_first_pull():
    h = H(2, shards=[40, 40, 40], **HB)
    h.start()
    h.push(0), h.push(1)
    assert h.P(h.hello(2)) == [("Welcome", 2, 1, 7)]                # still loading its rows, say
    assert sorted(h.c.gate.members) == [0, 1] and h.c.schedule.lease == {0: 0, 1: 1, 2: 0}
    assert h.P(h.push(0)) == [("Accumulate", (0, 1))]
    assert h.P(h.pull(2, 5)) == [("Theta", 2, 1, 1, [2, 0, 4, 4], 9)]  # joins at the current step, whatever it asks
    assert sorted(h.c.gate.members) == [0, 1, 2] and h.c.schedule.lease == {0: 0, 1: 1, 2: 2}
    assert h.P(h.push(1)) == [("Accumulate", (1, 1))]                 # the step now waits for it too
    assert h.P(h.push(2))[:3] == [("Accumulate", (2, 1)), ("ApplyStep", 1, 2), ("Theta", 2, 2, 2, [2, 0, 8, 4], 11)]


# ---------------------------------------------------------------------------------------------------- stragglers
def test_bsp_a_member_that_holds_its_batch_past_the_deadline_is_left_behind_and_comes_back_with_its_push():
    h = H(3, **DL)
    h.start()
    h.now = 0.1
    assert h.P(h.push(0)) == [("Accumulate", (0, 0))]
    assert h.P(h.push(1)) == [("Accumulate", (1, 0))]
    assert h.P(h.tick(2.0)) == []                    # worker 2 has held [2, 0, 0, 4] for 2 s: not yet
    # past the deadline: the step applies without it; its shard and its batch go to worker 0, which reads it first
    assert h.P(h.tick(2.5)) == [("ApplyStep", 0, 1), ("Theta", 0, 1, 1, [2, 0, 0, 4], 7),
                                ("Theta", 1, 1, 1, [1, 0, 4, 4], 8)]
    c = h.c
    assert sorted(c.gate.members) == [0, 1] and c.schedule.lease == {0: 0, 1: 1, 2: 0}
    assert c.stats.straggles == 1 and c.members.peers[2].bad_streak == 1 and c.members.peers[2].live
    assert report.status(c, h.now)["straggles"] == 1 and report.summary(c, h.now)["straggles"] == 1
    # its push arrives: dropped as late (its rows went to worker 0), and it is back, at the current step
    assert h.P(h.push(2)) == [("Theta", 2, 1, 1, [2, 0, 4, 4], 9)]
    assert c.stats.dropped == {2: 1} and c.members.peers[2].bad_streak == 0
    assert sorted(c.gate.members) == [0, 1, 2] and c.schedule.lease == {0: 0, 1: 1, 2: 2}
    h.push(0), h.push(1)
    assert h.P(h.push(2))[:2] == [("Accumulate", (2, 1)), ("ApplyStep", 1, 2)]


def test_a_late_push_without_pull_is_acked_late_and_its_next_pull_brings_it_back():
    h = H(2, **DL)
    h.start()
    h.now = 0.1
    h.push(0)
    h.tick(3.0)
    assert h.P(h.push(1, pull=False)) == [("Ack", 1, False, "late", h.rid)]
    assert sorted(h.c.gate.members) == [0]
    assert h.P(h.pull(1, 1)) == [("Theta", 1, 1, 1, [1, 0, 4, 4], h.rid)]


def test_nobody_is_left_behind_when_nobody_waits():
    h = H(2, **DL)
    h.start()
    assert h.P(h.tick(60.0)) == []                   # both hold their first batch for a minute: a slow step
    assert h.c.stats.straggles == 0 and sorted(h.c.gate.members) == [0, 1]


def test_the_deadline_grows_with_the_measured_hold_time():
    h = H(2, **DL)
    h.start()
    for t in range(1, 4):                           # every batch takes a second
        h.now = float(t)
        h.push(0), h.push(1)
    h.now = 3.5
    h.push(0)
    assert h.c.progress.deadline_s() == FACTOR * 1.0
    assert h.P(h.tick(12.0)) == []                   # 9 s: long, but under 10 x the usual second
    assert h.P(h.tick(13.1))[:1] == [("ApplyStep", 3, 4)]


def test_a_peer_that_pulls_and_stalls_again_and_again_is_quarantined():
    h = H(2, shards=[40, 40, 40], server__max_bad_pushes=3, **DL)
    h.start()
    h.hello(2)                                       # an extra peer: pull, then only heartbeats
    now = 0.0
    for k in range(3):
        h.pull(2)
        for w in (0, 1):
            h.push(w) if w in h.c.batches else None
        now += 3.0
        h.tick(now)
    assert h.c.members.quarantined == [2] and h.c.stats.straggles == 3
    assert h.P(h.pull(2, rid=70)) == [("Error", 2, "quarantined", 70)]


def test_asp_a_stalled_holder_loses_its_shard_and_the_epochs_still_end():
    h = H(2, shards=[8, 8], train__consistency="asp", train__epochs=1, **DL)
    h.start()
    h.now = 0.1
    assert h.P(h.push(0)) == [("Update", (0, 0), 0, 1, 0.5), ("Theta", 0, 1, 1, [0, 0, 4, 4], 5)]
    assert h.P(h.tick(2.05)) == [] and h.c.schedule.lease == {0: 0, 1: 0}
    h.drive()                                        # worker 0 reads both shards, worker 1's batch again first
    assert h.c.schedule.rows_visited() == {0: 16} and h.log[-1].reason == "epochs"


def test_ssp_a_straggler_comes_back_not_behind_the_others():
    h = H(3, train__consistency="ssp", train__staleness=2, **DL)
    h.start()
    h.now = 0.1
    for _ in range(3):
        h.push(0), h.push(1)
    assert sorted(h.c.parked) == [0, 1]              # clock 3: too far ahead of worker 2, still at 0
    h.tick(2.5)                                      # worker 2 never pushed its clock 0
    assert sorted(h.c.gate.members) == [0, 1] and not h.c.parked
    out = h.P(h.push(2))                             # its late push for clock 0
    assert out[0][:3] == ("Theta", 2, 3)             # back at the slowest clock of the others, not at 1


def test_the_launchers_workers_are_told_the_shards_they_will_hold_when_all_say_hello_before_any_pulls():
    """Before the gate opens, the hint counts every worker it waits for: told each shard of the run, a worker
    copied the first into its memory and read the one it was given in place (data.worker_copy)."""
    h = H(3, shards=[40, 40, 40], **HB)            # a shard per worker, as the launcher cuts them
    hints = {}
    for w in (2, 0, 1):                              # all hellos first, in any order, as the launcher's come
        h.hello(w)
        hints[w] = h.c.expected_shards(w)
    for w in (1, 2, 0):
        h.pull(w)
    assert h.c.gate.open
    assert {w: h.c.schedule.held_by(w) for w in (0, 1, 2)} == hints == {0: [0], 1: [1], 2: [2]}


def test_with_more_shards_than_workers_the_hints_and_the_opening_lease_do_not_depend_on_the_pull_order():
    for order in [(1, 2, 0), (0, 1, 2), (2, 0, 1)]:
        h = H(3, shards=[40] * 6, **HB)
        for w in (2, 0, 1):
            h.hello(w)
        hints = {w: h.c.expected_shards(w) for w in (0, 1, 2)}
        for w in order:
            h.pull(w)
        assert h.c.gate.open
        assert {w: h.c.schedule.held_by(w) for w in (0, 1, 2)} == hints == {0: [0, 3], 1: [1, 4], 2: [2, 5]}, order


def test_a_new_worker_is_told_which_shards_to_load_before_its_first_pull():
    h = H(2, shards=[40, 40, 40, 40], **HB)
    h.start()
    h.hello(-1, idt=b"x")
    assert h.c.schedule.lease == {0: 0, 1: 1, 2: 0, 3: 1}
    assert h.c.expected_shards(2) == [2]             # what it gets when it pulls (shard s goes to worker s)
    h.pull(2)
    assert h.c.schedule.held_by(2) == [2]
    assert H(2, train__schedule="dynamic").c.expected_shards(5) == [0, 1]
