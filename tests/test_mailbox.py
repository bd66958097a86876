"""The shared-memory mailbox of a local worker (psrv/mailbox.py): unit tests in milliseconds, then a run that uses
it against the serial oracle."""
import numpy as np
import pytest

import psrv
from psrv import blocks, config, data, protocol
from psrv.mailbox import AREA_BYTES, REQ_LEN, TOKEN_PREFIX, Mailbox, token

from .test_e2e import cosine, serial_bsp, shard_rows


@pytest.fixture
def pair():
    server = Mailbox.create(blocks.run_prefix() + "mbtest")
    worker = Mailbox.attach(server.name)
    yield server, worker
    worker.close()
    server.close()


def test_request_and_reply_round_trip_in_order(pair):
    server, worker = pair
    assert server.request() is None and worker.reply() is None
    for k in range(3):
        req = protocol.encode({"op": "pull", "wid": 0, "inc": 1, "clock": k, "rid": k + 1})
        assert worker.post(req)
        got = server.request()
        assert got == bytes(req[0]) and server.request() is None     # each request is seen once
        h, arrays = protocol.decode([got], protocol.REQUESTS)
        assert h["clock"] == k and arrays == []
        assert server.answer(protocol.encode({"op": "stop", "reason": "x", "rid": k + 1}))
        h, _ = protocol.decode([worker.reply()], protocol.REPLIES)
        assert h["rid"] == k + 1 and worker.reply() is None


def test_what_does_not_fit_goes_the_other_way(pair):
    server, worker = pair
    assert not worker.post([b"x" * (AREA_BYTES + 1)])
    assert not worker.post([b"header", b"an array frame"])        # arrays never go through a mailbox
    assert not server.answer([b"header", np.zeros(3)])
    assert server.request() is None                                 # nothing was rung


def test_a_length_beyond_the_area_is_cut_and_then_refused_by_the_decoder(pair):
    server, worker = pair
    worker.post([b"\x81\xa2op\xa4pull"])
    worker.ctl[REQ_LEN] = 10 * AREA_BYTES                         # a worker gone wrong
    got = server.request()
    assert len(got) == AREA_BYTES
    with pytest.raises(protocol.ProtocolError):
        protocol.decode([got], protocol.REQUESTS)


def test_awake_flag_and_token(pair):
    server, worker = pair
    assert not worker.server_awake()
    server.set_awake(True)
    assert worker.server_awake()
    assert token(3, 1).startswith(TOKEN_PREFIX) and TOKEN_PREFIX[0] == 0   # no ZeroMQ peer can choose it
    assert token(3, 1) != token(3, 2) != token(31, 2)


def _one_process_run(tmp_path, steps: int, spin_s: float, own_core: bool) -> dict:
    """A server loop on a thread and a local worker on this one (BSP, linear); the run checked against the serial
    oracle. Returns the summary."""
    import sys
    import threading

    from psrv.server import Server
    from workers.worker import Worker
    n, d, batch, lr = 800, 3, 20, 0.05
    cfg = config.load({"data": {"n": n, "d": d, "seed": 2},
                       "train": {"workers": 1, "steps": steps, "batch_size": batch, "lr": lr, "seed": 5,
                                 "lr_schedule": "cosine"},
                       "server": {"spin_s": spin_s}})
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # two threads that poll share one interpreter lock: hand it over often
    with blocks.owned_prefix() as owner:
        block, layout = data.build(cfg, 1, owner.prefix + "data")
        server = Server(cfg, layout.to_dict(), str(tmp_path), shm_prefix=owner.prefix, own_core=own_core)
        result = {}
        st = threading.Thread(target=lambda: result.setdefault("summary", server.run()), daemon=True)
        st.start()
        worker = Worker(server.address, 0, local=True, prefix=owner.prefix)
        try:
            assert worker.run() == 0
            st.join(30)
        finally:
            worker.close()
            server.close()
            block.close()
            block.unlink()
            sys.setswitchinterval(switch)
    s = result["summary"]
    assert s["steps"] == steps
    X, y, _, _ = data.load_arrays(cfg.data)
    expected = serial_bsp(X, y, shard_rows(n, 1, "range"), batch, steps, cosine(lr, steps), seed=5)
    theta = np.load(tmp_path / "theta.npy")
    assert np.abs(theta - expected).max() <= 1e-10 * np.abs(expected).max()
    return s


def test_server_and_worker_in_one_process_through_the_mailbox(tmp_path):
    """The server loop on a thread with a core "of its own" and a local worker on another: every pull and push
    after the hello goes through the mailbox (the server polls throughout), and the result is the serial oracle's."""
    s = _one_process_run(tmp_path, steps=40, spin_s=1.0, own_core=True)
    assert s["mailbox_requests"] >= 40 - 1


@pytest.mark.slow
def test_a_worker_on_the_servers_machine_trains_through_its_mailbox(tmp_path):
    """One worker, so the server has a core of its own and polls the mailbox: the run equals the serial oracle
    and its pulls and pushes went through the mailbox (unless no core was free to pin to, where it must not)."""
    n, d, batch, steps, lr = 1000, 4, 25, 60, 0.05
    r = psrv.train({"data": {"n": n, "d": d, "seed": 6},
                    "train": {"workers": 1, "batch_size": batch, "steps": steps, "lr": lr, "seed": 3,
                              "lr_schedule": "cosine"},
                    "server": {"spin_s": 1.0},
                    "output": {"dir": str(tmp_path), "plot": False}})
    X, y, _, _ = data.load_arrays(config.load({"data": {"n": n, "d": d, "seed": 6}}).data)
    expected = serial_bsp(X, y, shard_rows(n, 1, "range"), batch, steps, cosine(lr, steps), seed=3)
    assert np.abs(r.theta - expected).max() <= 1e-10 * np.abs(expected).max()
    if len(__import__("os").sched_getaffinity(0)) >= 2 and r.summary["mailbox_requests"] == 0:
        pytest.skip("the server was not given a core of its own (another psrv run holds the cores)")
    assert r.summary["mailbox_requests"] >= steps // 2


@pytest.mark.slow
def test_a_server_that_shares_a_core_or_does_not_poll_is_woken_by_its_bell(tmp_path):
    """Where the server may not poll (a worker on every core, or spin_s = 0) it sleeps; workers still post to
    their mailboxes and ring its bell, which wakes it, and it rings theirs once they sleep for a reply."""
    import os
    for i, over in enumerate([{"train": {"workers": len(os.sched_getaffinity(0))}},
                              {"train": {"workers": 1}, "server": {"spin_s": 0.0}}]):
        steps = 20
        r = psrv.train({"data": {"n": 600, "d": 3}, **over,
                        "train": {**over["train"], "steps": steps, "batch_size": 10},
                        "output": {"dir": str(tmp_path / str(i)), "plot": False}})
        assert r.summary["steps"] == steps
        assert r.summary["mailbox_requests"] >= steps and r.summary["mailbox_rings"] >= 1


def test_no_bells_means_zeromq_while_the_server_sleeps(tmp_path, monkeypatch):
    """Where no bell can be bound (another OS, the name taken) a server that does not poll gets every request over
    ZeroMQ, and the run is the same."""
    from psrv import mailbox
    monkeypatch.setattr(mailbox.Bell, "open", classmethod(lambda cls, name: None))
    s = _one_process_run(tmp_path, steps=12, spin_s=0.005, own_core=False)
    assert s["mailbox_requests"] == 0 and s["mailbox_rings"] == 0


def test_a_server_on_a_shared_core_in_one_process_sleeps_and_is_rung(tmp_path):
    s = _one_process_run(tmp_path, steps=12, spin_s=0.005, own_core=False)
    assert s["mailbox_requests"] >= 12 and s["mailbox_rings"] >= 1


def test_a_bell_wakes_its_owner_and_carries_nothing():
    import os

    from psrv.mailbox import Bell
    name = f"psrv_test_bell_{os.getpid()}"
    owner, other = Bell.open(name), Bell.open(name + "_other")
    try:
        assert Bell.open(name) is None                    # a name is one socket's: a second bind is refused
        assert not owner.wait(0.0) and owner.drain() == 0
        assert other.ring(name) and other.ring(name)
        assert owner.wait(5.0)
        assert owner.drain() == 2 and owner.drain() == 0  # rings are forgotten once drained
        assert not owner.wait(0.01)
        assert not other.ring(name + "_nobody")           # nobody there: no error, nothing sent
    finally:
        owner.close()
        other.close()
    again = Bell.open(name)
    assert again is not None                              # the name went with the socket
    again.close()


def test_the_waiting_flag(pair):
    server, worker = pair
    assert not server.worker_waiting()
    worker.set_waiting(True)
    assert server.worker_waiting()
    worker.set_waiting(False)
    assert not server.worker_waiting()


def test_each_incarnation_gets_its_own_mailbox_and_the_old_one_goes(tmp_path):
    """A worker that registers again (a restarted process, whose request ids start again from 1) gets a fresh
    mailbox; its predecessor's is removed, so a late reply meant for the old one can never be read as its own."""
    import os
    import threading

    from psrv.server import Server
    from workers.client import Client
    cfg = config.load({"data": {"n": 400, "d": 3}, "train": {"workers": 1, "steps": 5, "batch_size": 10},
                       "server": {"spin_s": 1.0, "join_timeout_s": 5.0}})
    with blocks.owned_prefix() as owner:
        block, layout = data.build(cfg, 1, owner.prefix + "data")
        server = Server(cfg, layout.to_dict(), str(tmp_path), shm_prefix=owner.prefix, own_core=True)
        st = threading.Thread(target=server.run, daemon=True)
        st.start()
        first, second = Client(server.address, timeout_s=10), Client(server.address, timeout_s=10)
        try:
            w1 = first.hello(0)
            name1 = w1["data"]["shm"]["mailbox"]
            assert first.mailbox is not None and os.path.exists(f"/dev/shm/{name1}")
            w2 = second.hello(0)                       # the same worker id, registering again
            name2 = w2["data"]["shm"]["mailbox"]
            assert w2["inc"] > w1["inc"] and name2 != name1
            assert not os.path.exists(f"/dev/shm/{name1}") and os.path.exists(f"/dev/shm/{name2}")
        finally:
            for c in (first, second):
                c.close()
            server.terminate = True
            st.join(20)
            server.close()
            block.close()
            block.unlink()


def test_the_protocol_document_states_the_mailbox_layout_the_code_uses():
    from psrv import mailbox, server

    from .conftest import ROOT
    doc = (ROOT / "docs" / "protocol.md").read_text()
    assert f"a {mailbox.AREA_BYTES:,}-byte request area, a {mailbox.AREA_BYTES:,}-byte reply area" in doc
    assert "(REQ_SEQ, REQ_LEN, REP_SEQ, REP_LEN, AWAKE, WAITING,\n  then 2 unused)" in doc
    assert (mailbox.REQ_SEQ, mailbox.REQ_LEN, mailbox.REP_SEQ, mailbox.REP_LEN, mailbox.AWAKE,
            mailbox.WAITING) == tuple(range(6))
    assert "abstract name `<mailbox>_bell`" in doc and mailbox.bell_name("m") == "m_bell"
    assert mailbox.CONTROL_BYTES == 8 * 8
    assert f"when its socket poll times out ({server.POLL_MS} ms)" in doc


def test_a_reply_that_does_not_fit_a_mailbox_fails_the_run(tmp_path):
    """Dropped, the worker would wait for it, register again and wait again, for ever: the server fails the run,
    saying why."""
    from psrv.errors import RunError
    from psrv.server import Server
    cfg = config.load({"data": {"n": 200, "d": 4}, "train": {"workers": 1, "steps": 5}})
    block, layout = data.build(cfg, 1, blocks.run_prefix() + "srvbig")
    server = Server(cfg, layout.to_dict(), str(tmp_path))
    box = Mailbox.create(blocks.run_prefix() + "bigbox", token(0, 1))
    server.by_token[box.token] = box
    try:
        with pytest.raises(RunError, match=f"a reply of {AREA_BYTES + 1} bytes does not fit a worker's mailbox"):
            server._out([b"x" * (AREA_BYTES + 1)], box.token)
    finally:
        box.close()
        server.close()
        block.close()
        block.unlink()
