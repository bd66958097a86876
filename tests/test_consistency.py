import pytest

from psrv.consistency import ACCUMULATE, APPLY, COMPLETE, LATE, Gate


def gate(mode, n=3, **kw):
    g = Gate(mode, **kw)
    for w in range(n):
        g.join(w)
    g.open = True
    return g


def test_nothing_is_served_before_the_gate_opens():
    g = Gate("asp")
    g.join(0)
    assert not g.may_serve(0, 0)
    g.open = True
    assert g.may_serve(0, 0)
    assert not g.may_serve(7, 0)  # not a member


def test_bsp_step_completes_when_every_live_worker_pushed():
    g = gate("bsp")
    for w in range(3):
        assert g.may_serve(w, 0)
        assert g.serve(w, 0) == 0
    assert g.push(0, 0) == ACCUMULATE
    assert g.push(1, 0) == ACCUMULATE
    assert not g.may_serve(0, 1)        # worker 0 must wait for worker 2
    assert g.push(2, 0) == COMPLETE
    assert g.step == 1
    assert all(g.may_serve(w, 1) for w in range(3))
    assert all(g.staleness_of(w, 0) == 0 for w in range(3))


def test_bsp_death_releases_the_barrier():
    g = gate("bsp")
    for w in range(3):
        g.serve(w, 0)
    g.push(0, 0)
    g.push(1, 0)
    assert g.leave(2) is True           # the dead worker was the last one missing
    assert g.step == 1 and g.may_serve(0, 1)
    assert g.leave(2) is False          # leaving twice is harmless


def test_bsp_leave_of_an_idle_worker_does_not_complete_an_empty_step():
    g = gate("bsp")
    assert g.leave(1) is False and g.step == 0


def test_bsp_backup_workers_drop_late_gradients():
    g = gate("bsp", backup=1)
    for w in range(3):
        g.serve(w, 0)
    assert g.push(0, 0) == ACCUMULATE
    assert g.push(1, 0) == COMPLETE     # N - k = 2 gradients are enough
    assert g.push(2, 0) == LATE         # the straggler's gradient for step 0 is dropped
    assert g.serve(2, 1) == 1
    # a straggler two steps behind is caught up to the current step when served
    g.serve(0, 1), g.serve(1, 1)
    g.push(0, 1), g.push(1, 1)
    assert g.step == 2
    assert g.push(2, 1) == LATE
    assert g.serve(2, 2) == 2


def test_push_must_match_the_served_clock():
    g = gate("asp", n=1)
    g.serve(0, 0)
    with pytest.raises(ValueError, match="served clock 0"):
        g.push(0, 5)
    g.push(0, 0)
    with pytest.raises(ValueError, match="served clock None"):
        g.push(0, 0)                    # a second push for the same clock
    with pytest.raises(ValueError, match="not a live member"):
        g.push(9, 0)


def run_ssp(g, speeds, rounds):
    """Drive the gate with workers of different speeds (ticks per step); returns staleness of every push."""
    clocks = {w: 0 for w in speeds}
    busy = {w: None for w in speeds}     # ticks left on the current step, None if waiting for a pull
    seen = []
    for tick in range(rounds):
        for w, speed in speeds.items():
            if busy[w] is None and g.may_serve(w, clocks[w]):
                clocks[w] = g.serve(w, clocks[w])
                busy[w] = speed
            if busy[w] is not None:
                busy[w] -= 1
                if busy[w] == 0:
                    seen.append(g.staleness_of(w, clocks[w]))
                    g.push(w, clocks[w])
                    clocks[w] += 1
                    busy[w] = None
    return seen, clocks


@pytest.mark.parametrize("s", [0, 1, 3])
def test_ssp_bounds_staleness(s):
    g = gate("ssp", staleness=s)
    seen, clocks = run_ssp(g, {0: 1, 1: 1, 2: 5}, 200)
    assert max(seen) <= s
    assert max(seen) == s                # the fast workers do run ahead as far as allowed
    assert max(clocks.values()) - min(clocks.values()) <= s + 1


def test_asp_staleness_is_unbounded():
    g = gate("asp")
    seen, clocks = run_ssp(g, {0: 1, 1: 1, 2: 10}, 200)
    assert max(seen) > 10


def test_ssp_joiner_starts_at_the_slowest_clock():
    g = gate("ssp", n=2, staleness=2)
    for c in range(3):
        g.serve(0, c)
        g.push(0, c)
    assert g.join(5) == 0                # worker 1 is still at clock 0
    g.leave(1)
    g.leave(5)
    assert g.join(6) == 3                # now the slowest live worker is worker 0, at clock 3


def test_ssp_dead_worker_stops_holding_others_back():
    g = gate("ssp", n=2, staleness=1)
    g.serve(0, 0), g.push(0, 0)
    g.serve(0, 1), g.push(0, 1)
    assert not g.may_serve(0, 2)         # worker 1 is at clock 0; 2 - 0 > 1
    g.leave(1)
    assert g.may_serve(0, 2)


def test_unknown_mode():
    with pytest.raises(ValueError):
        Gate("eventual")


@pytest.mark.parametrize("whole", [False, True])
def test_with_whole_steps_a_worker_that_joins_during_a_step_starts_at_the_next(whole):
    """Group steps (whole_steps): worker 3 (a restarted worker's new incarnation, say) joins once step 0 is under
    way; it is not one of step 0's members, which completes without it, and it is served from step 1 on. Without
    whole_steps (BSP pushing every step) it takes part in step 0."""
    g = gate("bsp", whole_steps=whole)
    for w in range(3):
        g.serve(w, 0)
    assert g.push(0, 0) == ACCUMULATE
    assert g.join(3) == (1 if whole else 0)
    assert g.step_members() == ([0, 1, 2] if whole else [0, 1, 2, 3])
    assert g.may_serve(3, 0) is not whole and g.may_serve(3, 1) is False
    assert g.push(1, 0) == ACCUMULATE
    assert g.push(2, 0) == (COMPLETE if whole else ACCUMULATE)
    if not whole:
        g.serve(3, 0)
        assert g.push(3, 0) == COMPLETE
    assert g.step == 1 and g.step_members() == [0, 1, 2, 3] and g.may_serve(3, 1)


def test_with_whole_steps_a_worker_that_joins_between_steps_takes_the_next_and_leaving_forgets_it():
    g = gate("bsp", whole_steps=True)
    assert g.join(3) == 0 and g.step_members() == [0, 1, 2, 3]   # nothing under way yet: step 0 is its own
    g.serve(0, 0)
    assert g.join(4) == 1 and g.quorum() == 4
    assert not g.leave(4) and g.quorum() == 4 and g.step_members() == [0, 1, 2, 3]


def test_with_whole_steps_a_step_all_of_whose_members_left_is_over():
    """Worker 1 (restarted) waits for step 1 while step 0's only other member, worker 0, leaves without pushing
    (a straggler): step 0 is over with nothing in it (abandoned), else worker 1 would wait for ever."""
    g = Gate("bsp", whole_steps=True)
    g.join(0)
    g.join(1)
    g.open = True
    g.serve(0, 0)
    g.serve(1, 0)
    assert not g.leave(1)
    assert g.join(1) == 1 and not g.may_serve(1, 1)
    assert g.leave(0)                                   # completes step 0, empty
    assert g.step == 1 and g.abandoned and g.may_serve(1, 1)
    g.serve(1, 1)
    assert g.push(1, 1) == COMPLETE and not g.abandoned
