"""Membership alone (psrv/membership.py): incarnations, worker ids, bounded tables, liveness and push rate with an
injected clock. No sockets, no processes, no sleeping."""
from __future__ import annotations

import pytest

from psrv.errors import ProtocolError
from psrv.membership import BAD_PEERS_KEPT, HOST_CHARS, MAX_PEERS, MAX_WID, RATE_WINDOW_S, Membership


def code_of(fn, *args) -> str:
    with pytest.raises(ProtocolError) as e:
        fn(*args)
    return e.value.code


def hello(m: Membership, wid: int, now: float = 0.0, host: str = "h", local: bool = False, idt: bytes = b""):
    return m.hello(idt or b"c%d" % wid, wid, 100 + wid, host, local, now)


# ---------------------------------------------------------------------------------------------------- ids
@pytest.mark.parametrize("wid, ok", [(0, True), (MAX_WID - 1, True), (MAX_WID, False), (-2, False),
                                     (-(1 << 40), False), (1 << 40, False)])
def test_worker_id_range(wid, ok):
    m = Membership(4, 3)
    if ok:
        p, replaced = hello(m, wid)
        assert (p.wid, p.inc, replaced) == (wid, 1, None)
    else:
        assert code_of(hello, m, wid) == "bad_wid"
        assert m.peers == {} and m.incarnations == {}


def test_minus_one_gets_an_id_no_launcher_worker_uses_and_nobody_has_had():
    m = Membership(4, 3)
    assert hello(m, -1, idt=b"a")[0].wid == 4          # before any launcher worker said hello
    assert hello(m, -1, idt=b"b")[0].wid == 5
    hello(m, 0), hello(m, 9)
    new = hello(m, -1, idt=b"c")[0].wid
    assert new not in (0, 1, 2, 3, 4, 5, 9) and new < MAX_WID
    assert m.incarnations[new] == 1


def test_minus_one_never_reuses_the_id_of_a_forgotten_worker():
    m = Membership(1, 3)
    p, _ = hello(m, -1, idt=b"a")
    m.expired(100.0, 5.0)
    del m.peers[p.wid]                                  # forgotten (as MAX_PEERS does with dead ones)
    assert hello(m, -1, idt=b"b")[0].wid == p.wid + 1


def test_minus_one_still_gets_an_id_after_someone_took_the_highest():
    m = Membership(4, 3)
    hello(m, MAX_WID - 1)
    p, _ = hello(m, -1, idt=b"late")
    assert p.wid == 4


def test_incarnations_and_restarts():
    m = Membership(2, 3)
    p1, r = hello(m, 1)
    assert (p1.inc, r, m.restarts) == (1, None, 0)
    p2, r = hello(m, 1, now=1.0)                         # replaces a live incarnation
    assert (p2.inc, r, m.restarts) == (2, p1, 1) and not p1.alive and m.peers[1] is p2
    m.expired(10.0, 5.0)
    p3, r = hello(m, 1, now=11.0)                        # after its death: nothing to replace
    assert (p3.inc, r, m.restarts, m.deaths) == (3, None, 2, 1)
    assert m.incarnations == {1: 3}


def test_shared_memory_only_for_the_launchers_local_workers():
    m = Membership(2, 3, shm=True)
    assert hello(m, 0, local=True)[0].shm
    assert not hello(m, 1, local=False)[0].shm
    assert not hello(m, 2, local=True)[0].shm           # local, but not one of the launcher's
    assert not hello(Membership(2, 3, shm=False), 0, local=True)[0].shm


def test_host_is_truncated():
    m = Membership(1, 3)
    p, _ = hello(m, 0, host="x" * 10 + "y" * 1000)
    assert len(p.host) == HOST_CHARS == 128 and p.host == ("x" * 10 + "y" * 1000)[:HOST_CHARS]


# ---------------------------------------------------------------------------------------------------- requests
def test_current_names_every_way_a_request_can_be_refused():
    m = Membership(3, 2)
    hello(m, 0), hello(m, 1), hello(m, 2)
    assert m.current(0, 1).wid == 0
    assert code_of(m.current, 7, 1) == "unknown_worker"
    assert code_of(m.current, 0, 2) == "stale_incarnation"
    assert m.stale_pushes == 0
    assert code_of(m.current, 0, 2, True) == "stale_incarnation" and m.stale_pushes == 1
    m.peers[1].finished = True
    assert code_of(m.current, 1, 1, True) == "finished" and m.stale_pushes == 1
    m.expired(100.0, 5.0)
    assert code_of(m.current, 0, 1) == "dead" and m.stale_pushes == 1
    assert code_of(m.current, 0, 1, True) == "dead" and m.stale_pushes == 2
    assert code_of(hello, m, 1) == "finished"
    assert m.bad_push(m.peers[2]) is False
    assert m.bad_push(m.peers[2]) is True
    assert code_of(m.current, 2, 1) == "quarantined" and m.quarantined == [2]
    assert code_of(hello, m, 2) == "quarantined"


def test_bad_pushes_quarantine_only_in_a_row():
    m = Membership(1, 3)
    p, _ = hello(m, 0)
    assert [m.bad_push(p), m.bad_push(p)] == [False, False]
    p.bad_streak = 0                                    # the coordinator does this on a finite push
    assert [m.bad_push(p), m.bad_push(p), m.bad_push(p)] == [False, False, True]
    assert p.quarantined and not p.alive and not p.live and m.quarantined == [0]


# ---------------------------------------------------------------------------------------------------- bounds
def test_max_peers_forgets_dead_workers_then_refuses():
    m = Membership(0, 3)
    for w in range(10):
        hello(m, w, now=0.0)                            # these go silent
    for w in range(10, MAX_PEERS):
        hello(m, w, now=10.0)
    assert len(m.peers) == MAX_PEERS
    assert code_of(hello, m, MAX_PEERS) == "too_many_workers"
    assert code_of(hello, m, -1) == "too_many_workers"
    p, replaced = hello(m, 10, now=10.0)                # a live one may still be replaced
    assert replaced is not None and len(m.peers) == MAX_PEERS
    assert [p.wid for p in m.expired(12.0, 5.0)] == list(range(10))
    m.bad_push(m.peers[0]), m.bad_push(m.peers[0]), m.bad_push(m.peers[0])   # a dead one quarantined: kept
    m.peers[1].alive = True
    m.peers[1].finished = True                          # a finished one: kept
    hello(m, MAX_PEERS, now=12.0)
    assert len(m.peers) == MAX_PEERS - 8 + 1
    assert 0 in m.peers and 1 in m.peers and not any(w in m.peers for w in range(2, 10))
    for w in range(MAX_PEERS + 1, MAX_PEERS + 8):
        hello(m, w, now=12.0)
    assert len(m.peers) == MAX_PEERS
    assert code_of(hello, m, 2 * MAX_PEERS) == "too_many_workers"
    assert m.incarnations[5] == 1                       # forgotten peers keep their incarnation number


def test_a_forgotten_worker_comes_back_with_a_new_incarnation():
    m = Membership(0, 3)
    for w in range(MAX_PEERS):
        hello(m, w, now=0.0 if w in (7, 8) else 10.0)
    m.expired(12.0, 5.0)
    hello(m, MAX_PEERS, now=12.0)                       # forgets workers 7 and 8 (every dead one at once)
    assert 7 not in m.peers and 8 not in m.peers and len(m.peers) == MAX_PEERS - 1
    assert code_of(m.current, 7, 1, True) == "unknown_worker"
    p, replaced = hello(m, 7, now=13.0)                 # there is room again for exactly one
    assert (p.inc, replaced, m.restarts) == (2, None, 0)
    assert code_of(hello, m, 8) == "too_many_workers"


def test_bad_connection_counts_are_bounded_forgetting_the_least_noisy():
    m = Membership(1, 3)
    for i in range(BAD_PEERS_KEPT):
        m.count_bad(b"n%d" % i)
        if i != 500:
            m.count_bad(b"n%d" % i)                     # everyone twice, except n500
    assert len(m.bad_by_conn) == BAD_PEERS_KEPT
    m.count_bad(b"new")
    assert len(m.bad_by_conn) == BAD_PEERS_KEPT and b"n500" not in m.bad_by_conn and m.bad_by_conn[b"new"] == 1
    m.count_bad(b"n7")                                  # a known one: counted, nothing forgotten
    assert m.bad_by_conn[b"n7"] == 3 and len(m.bad_by_conn) == BAD_PEERS_KEPT
    for i in range(300):
        m.count_bad(b"flood%d" % i)
    assert len(m.bad_by_conn) == BAD_PEERS_KEPT
    assert all(m.bad_by_conn.get(b"n%d" % i) == 2 + (i == 7) for i in range(BAD_PEERS_KEPT) if i != 500)


# ---------------------------------------------------------------------------------------------------- liveness
def test_expired_with_an_injected_clock():
    m = Membership(4, 3)
    for w in range(4):
        hello(m, w, now=0.0)
    assert m.heartbeat(0, 1, 3.0) is True
    m.touch(m.peers[1], b"new-conn", 4.0)
    m.peers[3].finished = True                          # a finished worker is never declared dead
    assert m.expired(5.0, 5.0) == []                    # silent exactly the timeout: not yet
    assert [p.wid for p in m.expired(5.25, 5.0)] == [2]
    assert m.deaths == 1 and m.expired(5.5, 5.0) == []  # declared once
    assert [p.wid for p in m.expired(8.5, 5.0)] == [0]
    assert [p.wid for p in m.expired(9.5, 5.0)] == [1] and m.peers[1].ident == b"new-conn"
    assert m.deaths == 3 and [p.wid for p in m.live()] == []
    assert m.heartbeat(0, 1, 10.0) is False and not m.peers[0].alive   # no coming back without a hello
    assert m.heartbeat(42, 1, 10.0) is False            # unknown id (a restarted server): alive false
    with pytest.raises(ProtocolError) as e:             # another incarnation of a known id: refused, like a pull
        m.heartbeat(0, 2, 10.0)
    assert e.value.code == "stale_incarnation"


def test_heartbeats_keep_a_worker_alive_forever():
    m = Membership(1, 3)
    hello(m, 0)
    for t in range(1, 200):
        assert m.heartbeat(0, 1, t * 2.0)
        assert m.expired(t * 2.0 + 4.9, 5.0) == []


# ---------------------------------------------------------------------------------------------------- push rate
def pushes(p, start: float, stop: float, per_s: float) -> float:
    n, t = 0, start
    while t < stop - 1e-9:
        t = start + (n + 1) / per_s
        p.pushed(t)
        n += 1
    return t


def test_push_rate_is_measured_over_the_window():
    m = Membership(1, 3)
    p, _ = hello(m, 0, now=0.0)
    assert p.push_rate(0.0) == 0.0 and p.push_rate(3.0) == 0.0          # nothing pushed yet
    t = pushes(p, 0.0, 3.0, 10.0)
    assert p.push_rate(t) == pytest.approx(10.0, rel=0.05)
    t = pushes(p, t, 30.0, 50.0)
    assert p.push_rate(t) == pytest.approx(50.0, rel=0.05)
    t = pushes(p, t, 60.0, 1.0)                         # slowed down: the window forgets the fast past
    assert p.push_rate(t) == pytest.approx(1.0, rel=0.3)
    assert len(p.rate_marks) <= 64 and p.pushes == 30 + 1350 + 30
    p.alive = False
    assert p.push_rate(t) == 0.0


def test_push_rate_of_a_stalled_worker_is_zero():
    m = Membership(1, 3)
    p, _ = hello(m, 0, now=0.0)
    t = pushes(p, 0.0, 5.0, 10.0)                       # 50 pushes in the first 5 s, then nothing
    assert p.push_rate(t + RATE_WINDOW_S + 10.0) == 0.0
