"""The server loop in one process (server and an honest worker on threads, real ZeroMQ sockets): malformed
messages get error replies, and the honest worker trains to the end regardless."""
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from psrv import config, data, protocol, blocks
from psrv.server import Server
from workers.client import Client, RemoteError
from workers.worker import Worker

from .conftest import wait_for


@pytest.fixture
def cluster(tmp_path, request):
    """A live server for 2 workers. Worker 0 is a real Worker thread; worker 1 is another one, or the test itself
    when the test is marked `as_worker_1`."""
    cfg = config.load({"data": {"n": 2000, "d": 4}, "train": {"workers": 2, "steps": 30, "batch_size": 16}})
    block, layout = data.build(cfg, 2, blocks.run_prefix() + "srv")
    server = Server(cfg, layout.to_dict(), str(tmp_path))
    result = {}
    st = threading.Thread(target=lambda: result.setdefault("summary", server.run()), daemon=True)
    st.start()
    honest = 1 if request.node.get_closest_marker("as_worker_1") else 2
    workers = [Worker(server.address, w) for w in range(honest)]
    threads = [threading.Thread(target=lambda w=w: result.setdefault(f"worker{w.wid}", w.run()), daemon=True)
               for w in workers]
    for t in threads:
        t.start()
    ctx = zmq.Context()
    yield server, ctx, result, (st, threads[0])
    ctx.destroy(linger=0)
    for t in (st, *threads):
        t.join(20)
    for w in workers:
        w.close()
    server.close()
    block.close()
    block.unlink()


def ask(ctx, address, frames, timeout_ms=5000):
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    s.send_multipart(frames)
    assert s.poll(timeout_ms), "no reply: the server must answer every malformed message"
    h, _ = protocol.decode(s.recv_multipart(), protocol.REPLIES)
    s.close()
    return h


ANONYMOUS = [
    ([b"\x00\xff garbage"], "bad_header"),
    ([b"\x92\x01"], "bad_header"),                                   # truncated msgpack
    ([msgpack.packb({"op": "steal"})], "unknown_op"),
    ([msgpack.packb({"op": "pull", "wid": 0, "inc": 1, "clock": 0})] + [b""] * 4, "bad_frames"),
    ([msgpack.packb({"op": "pull", "wid": 0, "inc": 99, "clock": 0})], "stale_incarnation"),
    ([msgpack.packb({"op": "pull", "wid": 7, "inc": 1, "clock": 0})], "unknown_worker"),
    ([msgpack.packb({"op": "hello", "version": 99, "role": "worker", "wid": 1, "pid": 1, "host": "h",
                     "local": True})], "version_mismatch"),
    ([msgpack.packb({"op": "hello", "version": protocol.VERSION, "role": "worker", "wid": -5, "pid": 1,
                     "host": "h", "local": True})], "bad_wid"),
    ([msgpack.packb({"op": "push", "wid": 0, "inc": 1, "sid": "not-this-server", "seq": 1, "clock": 0,
                     "version": 0, "loss": 0.0, "count": 1, "pull": False, "compute_s": 0.0, "request_s": 0.0,
                     "arrays": [["<f8", [5]]]}), np.zeros(5).tobytes()], "stale_server"),
]


@pytest.mark.as_worker_1
def test_malformed_messages_get_error_replies_and_training_goes_on(cluster):
    server, ctx, result, (st, wt) = cluster
    for frames, code in ANONYMOUS:
        h = ask(ctx, server.address, frames)
        assert h["op"] == "error" and h["code"] == code, (frames, h)
    assert "v99" in ask(ctx, server.address, ANONYMOUS[6][0])["reason"]   # both versions named

    # now behave as worker 1, interleaving bad pushes with honest ones
    me = Client(server.address, timeout_s=10)
    welcome = me.hello(1)
    shape, dtype = tuple(welcome["theta_shape"]), np.dtype(welcome["theta_dtype"])
    h, arrays = me.pull(0)
    bad_pushes = [
        (np.zeros(shape, np.float32), "bad_dtype"),                    # wrong dtype
        (np.zeros((shape[0] + 1,), dtype), "bad_shape"),                # wrong shape
    ]
    nan_sent = False
    while h["op"] == "theta":
        clock = h["clock"]
        if not bad_pushes and not nan_sent:
            # a NaN gradient is not an error of the message: it is refused, counted, and the worker goes on
            ack, _ = me.push(clock, np.full(shape, np.nan, dtype), 0.0, h["batch"][3], pull=False)
            assert ack == {"op": "ack", "applied": False, "reason": "nonfinite", "rid": ack["rid"]}
            nan_sent = True
            h, arrays = me.pull(clock + 1)
            continue
        if bad_pushes:
            g, code = bad_pushes.pop()
            with pytest.raises(RemoteError) as e:
                me.push(clock, g, 0.0, h["batch"][3])
            assert e.value.code == code
            with pytest.raises(RemoteError) as e:
                me.push(clock + 3, np.zeros(shape, dtype), 0.0, h["batch"][3])  # a clock it was not served
            assert e.value.code == "bad_clock"
            # (a loss that is not finite is not an error of the message: it is refused like a NaN gradient)
            for bad in ({"count": h["batch"][3] + 1}, {"version": h["version"] + 5}, {"compute_s": -1.0}):
                args = {"clock": clock, "grad": np.zeros(shape, dtype), "loss": 0.0, "count": h["batch"][3],
                        "version": h["version"], **bad}
                with pytest.raises(RemoteError) as e:  # fields that lie about the batch or the theta it used
                    me.push(**args)
                assert e.value.code == "bad_field", bad
        h, arrays = me.push(clock, np.zeros(shape, dtype), 1.0, h["batch"][3], h["version"])
    assert h["op"] == "stop"
    me.close()
    st.join(20)
    wt.join(20)
    assert not st.is_alive() and not wt.is_alive()
    s = result["summary"]
    assert result["worker0"] == 0 and s["steps"] == 30 and np.isfinite(s["final_loss"])
    assert s["bad_messages"] == len(ANONYMOUS) + 1 + 2 + 2 + 2 * 3
    assert s["stale_pushes"] == 1   # the push for another server (the stale incarnation 99 only pulled)
    assert s["rejected"] == {"nonfinite": 1}


def test_oversized_frame_is_cut_off_without_hurting_others(cluster):
    server, ctx, result, (st, wt) = cluster
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(server.address)
    s.send_multipart([msgpack.packb({"op": "status"}), b"\0" * (4 << 20)])  # over MAXMSGSIZE
    assert not s.poll(500)       # ZeroMQ drops the connection before the message reaches the loop
    s.close()
    st.join(30)
    assert result["summary"]["steps"] == 30


@pytest.mark.as_worker_1
def test_status_reply(cluster):
    """The test is worker 1, so the run cannot end (and the server stop answering) before the test has looked:
    with two honest worker threads a 30-step run can finish between two status polls."""
    server, ctx, result, (st, wt) = cluster
    h = ask(ctx, server.address, [msgpack.packb({"op": "status", "rid": 4})])
    assert h["op"] == "status" and h["rid"] == 4 and h["state"]["steps"] == 30
    me = Client(server.address, timeout_s=10)
    welcome = me.hello(1)
    zeros = np.zeros(tuple(welcome["theta_shape"]), np.dtype(welcome["theta_dtype"]))
    state = wait_for(lambda: (lambda st: st if len(st["workers"]) == 2 else None)(
        ask(ctx, server.address, [msgpack.packb({"op": "status"})])["state"]), 10, what="both workers to join")
    assert sorted(w["wid"] for w in state["workers"]) == [0, 1]
    for w in state["workers"]:
        # a worker is in the run (in the gate, with a clock) from its first pull on; before it, its clock is -1
        assert w["pid"] > 0 and w["host"] and w["clock"] >= (0 if w["ready"] else -1) and w["last_seen_s"] >= 0 \
            and w["alive"] in (True, False)
    assert [w["clock"] for w in state["workers"] if w["wid"] == 1] == [-1]   # hello'd, not yet pulled
    h, _ = me.pull(0)      # then play worker 1 to the end of the run, so that nothing is left waiting
    while h["op"] == "theta":
        h, _ = me.push(h["clock"], zeros, 0.0, h["batch"][3], h["version"])
    assert h["op"] == "stop"
    me.close()
    st.join(20)
    assert result["summary"]["steps"] == 30


def played_server(interval_s: float):
    """A ROUTER the test plays the server on, and a client registered with it as worker 0 of server "srv", its
    heartbeat thread running every interval_s."""
    from psrv import transport
    from workers.client import Heartbeat

    ctx = zmq.Context()
    router, address = transport.router(ctx, "tcp://127.0.0.1:0")
    client = Client(address, timeout_s=30)
    client.wid, client.inc, client.server_id = 0, 1, "srv"
    client.heartbeat = Heartbeat(client.ctx, address, 0, 1, interval_s=interval_s)
    client.heartbeat.start()
    return ctx, router, client


def test_a_burst_of_heartbeat_answers_after_a_stall_is_not_a_lost_request():
    """The test plays a server that stalls (a long checkpoint, say) with the worker's pull and heartbeats queued,
    then answers the heartbeats in a burst before it reads the pull, which it answers right after: the worker
    waits for that answer instead of calling its request lost (and registering again)."""
    ctx, router, client = played_server(interval_s=0.1)
    stop = threading.Event()

    def fake_server():
        # stalled: it answers nothing until the pull and 12 heartbeats (12 heartbeat periods) have come; it reads
        # them as they come rather than sleeping a while, which on a loaded machine may pass before the pull is sent
        held, beats = [], 0
        deadline = time.monotonic() + 30
        while (beats < 12 or not any(protocol.decode(f)[0]["op"] == "pull" for _, *f in held)) \
                and time.monotonic() < deadline:
            if router.poll(20):
                held.append(router.recv_multipart())
                beats += protocol.decode(held[-1][1:])[0]["op"] == "heartbeat"
        for ident, *frames in held:                      # heartbeats first, in a burst
            h, _ = protocol.decode(frames)
            if h["op"] == "heartbeat":
                router.send_multipart([ident, msgpack.packb({"op": "heartbeat", "server_id": "srv", "step": 0,
                                                             "alive": True, "waiting": False})])
        # the client has heard the burst before the pull's answer comes (it once slept 50 ms for this)
        wait_for(lambda: len(client.heartbeat.heard) >= beats, 10, what="the client to hear the burst")
        for ident, *frames in held:                      # then the pull
            h, _ = protocol.decode(frames)
            if h["op"] == "pull":
                router.send_multipart([ident, msgpack.packb({"op": "theta", "clock": 0, "version": 0,
                                                             "batch": [0, 0, 0, 1], "rid": h["rid"]})])
        while not stop.is_set():
            if router.poll(20):
                router.recv_multipart()
    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    try:
        h, _ = client.pull(0)
        assert h["op"] == "theta"
    finally:
        stop.set()
        t.join(5)
        client.close()
        router.close(linger=0)
        ctx.term()


def test_a_lost_request_is_noticed_while_the_server_is_alive():
    """The test plays a server that answers heartbeats, saying it holds nothing of the worker, and never answers
    its pull: the client gives up on that request (and would register again) instead of waiting forever."""
    ctx, router, client = played_server(interval_s=0.05)
    stop = threading.Event()

    def fake_server():
        while not stop.is_set():
            if router.poll(20):
                ident, *frames = router.recv_multipart()
                h, _ = protocol.decode(frames)
                if h["op"] == "heartbeat":
                    router.send_multipart([ident, msgpack.packb({"op": "heartbeat", "server_id": "srv", "step": 0,
                                                                 "alive": True, "waiting": False})])
    t = threading.Thread(target=fake_server, daemon=True)
    t.start()
    try:
        with pytest.raises(RemoteError) as e:
            client.pull(0)
        assert e.value.code == "lost"
    finally:
        stop.set()
        t.join(5)
        client.close()
        router.close(0)
        ctx.term()


@pytest.mark.as_worker_1
def test_a_repeated_pull_gets_the_same_batch_and_a_future_clock_is_refused(cluster):
    server, ctx, result, (st, wt) = cluster
    me = Client(server.address, timeout_s=10)
    welcome = me.hello(1)
    h1, _ = me.pull(0)
    h2, _ = me.pull(0)                   # its reply was lost, say: the same batch again, no rows skipped
    assert (h1["clock"], h1["batch"]) == (h2["clock"], h2["batch"])
    with pytest.raises(RemoteError) as e:
        me.pull(h1["clock"] + 5)         # a clock it has not reached
    assert e.value.code == "bad_clock"
    shape, dtype = tuple(welcome["theta_shape"]), np.dtype(welcome["theta_dtype"])
    h = h1
    while h["op"] == "theta":
        h, _ = me.push(h["clock"], np.zeros(shape, dtype), 1.0, h["batch"][3], h["version"])
    me.close()
    st.join(20)
    assert result["summary"]["steps"] == 30
