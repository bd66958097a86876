"""Safe on a network: who may connect (loopback by default, CURVE otherwise), what the server accepts (no pickle,
ever), bad numbers (NaN pushes rejected, repeat offenders quarantined) and what is left in /dev/shm."""
import ast
import json
import os
import pickle
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import zmq
import zmq.auth

import psrv
from psrv import config, data, protocol, blocks, transport
from psrv.errors import ConfigError, ProtocolError
from psrv.launch import status
from workers import faults

from .conftest import LAUNCH, ROOT, curve_server, tcp_listeners, wait_for
from .test_e2e import cosine, serial_bsp, shard_rows


# ---------------------------------------------------------------------------------------------- who may connect
@pytest.mark.parametrize("address,local", [
    ("tcp://127.0.0.1:0", True), ("tcp://127.8.9.1:5555", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:80", True), ("ipc:///tmp/x.sock", True), ("inproc://x", True),
    ("tcp://0.0.0.0:0", False), ("tcp://*:5555", False), ("tcp://10.1.2.3:5555", False),
    ("tcp://eth0:5555", False), ("tcp://[::]:1", False),
])
def test_which_addresses_count_as_local(address, local):
    assert protocol.is_local(address) is local


def test_a_public_bind_needs_keys_or_insecure(tmp_path):
    with pytest.raises(ConfigError, match="server.bind: tcp://0.0.0.0:0 .* `python launch.py --keygen DIR`"):
        psrv.train(None, ["server.bind=tcp://0.0.0.0:0", "data.n=1000", f"output.dir={tmp_path}"])


@pytest.mark.slow
def test_insecure_public_bind_warns_loudly(launch, tmp_path):
    la = launch("--set", "server.bind=tcp://0.0.0.0:0", "--set", "server.insecure=true", "--set", "data.n=2000",
                "--set", "train.steps=20", "--set", f"output.dir={tmp_path / 'out'}")
    code, out, err = la.wait()
    assert code == 0, err
    assert "WARNING" in err and "server.insecure" in err and "anyone" in err


@pytest.mark.slow
def test_default_config_listens_on_loopback_only(launch, tmp_path):
    la = launch("--set", "train.steps=1000000", "--set", "data.n=4000", "--set", f"output.dir={tmp_path / 'out'}")
    address = wait_for(lambda: (tmp_path / "out" / "address").exists() and
                       (tmp_path / "out" / "address").read_text().strip(), 60, what="the address")
    assert address.startswith("tcp://127.0.0.1:")
    port = int(address.rsplit(":", 1)[1])
    # the kernel's own view: the listening socket is bound to 127.0.0.1, not to 0.0.0.0
    assert tcp_listeners(port) == ["0100007F"]
    la.proc.send_signal(2)
    la.wait()
    la.assert_no_leftovers()


def test_keygen_writes_owner_only_secrets(tmp_path):
    out = subprocess.run([sys.executable, LAUNCH, "--keygen", str(tmp_path / "keys")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    k = tmp_path / "keys"
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key"):
        assert (k / name).exists(), name
    for secret in k.rglob("*.key_secret"):
        assert oct(secret.stat().st_mode & 0o777) == "0o600", secret

    def public(name):
        return zmq.auth.load_certificate(str(k / name))[0]

    # what a client is handed is the public half of the server's pair; the server admits the client's own key
    server_public = public("server.key")
    assert server_public == public("server.key_secret") != public("client.key")
    assert public("authorized/client.key") == public("client.key") == public("client.key_secret")
    server_files = {n: (k / n).read_bytes() for n in ("server.key", "server.key_secret")}
    out = subprocess.run([sys.executable, LAUNCH, "--keygen", str(k), "--name", "laptop"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and (k / "authorized" / "laptop.key").exists()
    # a second keygen keeps the server pair (clients already hold its public key) and allows the new client
    assert {n: (k / n).read_bytes() for n in server_files} == server_files
    assert public("authorized/laptop.key") == public("laptop.key_secret") not in (server_public, public("client.key"))


@pytest.mark.slow
def test_curve_refuses_unknown_clients_and_admits_allowed_ones(launch, tmp_path):
    keys, other, srv, address = curve_server(launch, tmp_path, steps=200)
    ctx = zmq.Context()

    def attempt(client_dir):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if client_dir is not None:
            transport.use_curve_client(s, str(client_dir))
        s.connect(address)
        s.send_multipart([msgpack.packb({"op": "status"})])
        got = s.poll(1500)
        s.close()
        return got

    assert not attempt(None)          # no key: the handshake fails, nothing comes back
    assert not attempt(other)         # a key the server does not know: refused the same way
    st = status(address, keys=str(keys))  # an allowed key
    assert st["bad_messages"] == 0 and st["workers"] == []  # nothing of the refused clients reached the loop
    workers = launch("--attach", address, "--workers", "1", "--keys", str(keys))
    assert workers.wait()[0] == 0
    code, out, err = srv.wait()
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 200
    ctx.term()


# ---------------------------------------------------------------------------------------------- no pickle, ever
class Canary:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):  # unpickling this calls open(path, "w"): the marker file appears
        return (open, (self.path, "w"))


def test_pickle_canary_never_fires_in_decode(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Canary(str(marker)))
    assert not marker.exists()
    good = msgpack.packb({"op": "status"})
    push = msgpack.packb({"op": "push", "wid": 0, "inc": 1, "sid": "s", "seq": 1, "clock": 0, "version": 0,
                          "loss": 0.0, "count": 1, "pull": True, "compute_s": 0.0, "request_s": 0.0,
                          "arrays": [["<f8", [len(evil) // 8]]]})
    cases = [[evil], [good, evil], [push, evil], [evil, evil, evil], [msgpack.packb({"op": evil}), b""],
             [msgpack.packb({"op": "status", "x": msgpack.ExtType(1, evil)})]]
    for frames in cases:
        for table in (protocol.REQUESTS, protocol.REPLIES):
            try:
                protocol.decode(frames, table)
            except ProtocolError:
                pass
    assert not marker.exists()
    pickle.loads(evil)  # the canary itself works: a test that could not fail would prove nothing
    assert marker.exists()


def test_no_pickle_on_any_network_path():
    """No module that touches the network or its data may call pickle, recv_pyobj or allow_pickle=True."""
    offenders = []
    for path in list((ROOT / "psrv").glob("*.py")) + list((ROOT / "workers").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name in ("pickle", "cPickle", "dill") for a in node.names):
                offenders.append(f"{path.name}: import pickle")
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill"):
                offenders.append(f"{path.name}: from pickle")
            if isinstance(node, ast.Attribute) and node.attr in ("recv_pyobj", "send_pyobj", "loads") and \
                    getattr(node.value, "id", "") in ("pickle", "sock", "socket"):
                offenders.append(f"{path.name}: {node.attr}")
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle" and \
                    not (isinstance(node.value, ast.Constant) and node.value.value is False):
                offenders.append(f"{path.name}: allow_pickle")
    assert offenders == []


@pytest.mark.slow
def test_pickle_canary_against_a_live_server(launch, tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Canary(str(marker)))
    la = launch("--role", "server", "--set", "train.workers=1", "--set", "data.n=1000",
                "--set", f"output.dir={tmp_path / 'out'}")
    address = la.proc.stdout.readline().split()[1]
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    heads = [msgpack.packb({"op": op, "arrays": [["|O", [1]]]}) for op in ("push", "hello", "pull", "heartbeat")]
    for frames in ([evil], [evil, evil], *[[h, evil] for h in heads], [evil, evil, evil, evil]):
        s.send_multipart(frames)
        assert s.poll(5000)
        h, _ = protocol.decode(s.recv_multipart(), protocol.REPLIES)
        assert h["op"] == "error"
    s.close()
    ctx.term()
    assert not marker.exists()
    la.proc.send_signal(2)
    la.wait()


# ---------------------------------------------------------------------------------------------- bad numbers
@pytest.mark.slow
def test_nan_pushes_are_rejected_and_the_run_equals_one_that_skipped_them(tmp_path):
    n, d, batch, steps, lr = 2000, 5, 32, 60, 0.05
    bad = [3, 4, 17, 40]                       # worker 1 pushes NaN at these clocks
    with faults.injected(nan_worker=1, nan_steps=bad):
        r = psrv.train({"data": {"n": n, "d": d, "seed": 4},
                        "train": {"workers": 2, "batch_size": batch, "steps": steps, "lr": lr, "seed": 11},
                        "worker": {"entry": faults.ENTRY}, "output": {"dir": str(tmp_path), "plot": False}})
    s = r.summary
    assert s["rejected"] == {"nonfinite": len(bad)} and s["quarantined"] == []
    assert np.isfinite(r.theta).all()
    X, y, _, _ = data.load_arrays(config.load({"data": {"n": n, "d": d, "seed": 4}}).data)
    expected = serial_bsp(X, y, shard_rows(n, 2, "range"), batch, steps, cosine(lr, steps), seed=11,
                          skip={(1, c) for c in bad})
    assert np.abs(r.theta - expected).max() <= 1e-10 * np.abs(expected).max()


@pytest.mark.slow
def test_a_worker_that_keeps_pushing_nan_is_quarantined(tmp_path):
    with faults.injected(nan_worker=1, nan_steps=list(range(5, 200))):
        r = psrv.train({"data": {"n": 4000, "d": 5}, "train": {"workers": 2, "steps": 200, "consistency": "asp"},
                        "server": {"max_bad_pushes": 3},
                        "worker": {"entry": faults.ENTRY}, "output": {"dir": str(tmp_path), "plot": False}})
    s = r.summary
    assert s["quarantined"] == [1] and s["rejected"]["nonfinite"] == 3
    assert s["steps"] == 200 and np.isfinite(r.theta).all()


@pytest.mark.slow
def test_under_group_steps_a_worker_whose_gradients_are_nan_is_quarantined_alone(tmp_path):
    """train.group_steps = 4: from group step 5 on, worker 1's gradient of each group step's second sub-step is
    NaN. It leaves the group step rather than publish it (else the mean would carry it into every member's theta
    and push, and the server would refuse them all), so only its pushes are refused; it is quarantined after
    server.max_bad_pushes of them, and the other two finish the run."""
    with faults.injected(nan_worker=1, nan_steps=list(range(5, 200))):
        r = psrv.train({"data": {"n": 4000, "d": 5}, "train": {"workers": 3, "steps": 200, "group_steps": 4},
                        "server": {"max_bad_pushes": 3},
                        "worker": {"entry": faults.ENTRY}, "output": {"dir": str(tmp_path), "plot": False}})
    s = r.summary
    assert s["quarantined"] == [1] and s["rejected"] == {"nonfinite": 3}
    assert s["steps"] == 200 and np.isfinite(r.theta).all() and s["final_loss"] < 1.0


@pytest.mark.slow
def test_under_group_steps_a_worker_whose_gradients_are_outliers_is_quarantined_alone(tmp_path):
    """train.group_steps = 4: from group step 20 on, worker 1's gradient of each group step's second sub-step is
    about 1000 times too long (server.max_grad_ratio = 100). Its own check, the server's rule on its own norms,
    keeps it from publishing it (the mean would carry it into every member's theta and push); it leaves, its push
    alone is refused as an outlier, and it is quarantined after server.max_bad_pushes of them."""
    with faults.injected(outlier_worker=1, outlier_steps=list(range(20, 200))):
        r = psrv.train({"data": {"n": 4000, "d": 5}, "train": {"workers": 3, "steps": 200, "group_steps": 4},
                        "server": {"max_bad_pushes": 3, "max_grad_ratio": 100.0},
                        "worker": {"entry": faults.ENTRY}, "output": {"dir": str(tmp_path), "plot": False}})
    s = r.summary
    assert s["quarantined"] == [1] and s["rejected"] == {"outlier": 3}
    assert s["steps"] == 200 and np.isfinite(r.theta).all() and s["final_loss"] < 1.0


# ---------------------------------------------------------------------------------------------- shared memory
def test_stale_segments_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = f"psrv_{dead}_abcdef_data"
    live = f"psrv_{os.getpid()}_abcdef_data"
    other = "someone_elses_segment"
    for name in (stale, live, other):
        with open(f"/dev/shm/{name}", "wb") as fh:
            fh.write(b"x")
    try:
        removed = blocks.sweep_stale()
        assert stale in removed
        assert not os.path.exists(f"/dev/shm/{stale}")
        assert os.path.exists(f"/dev/shm/{live}") and os.path.exists(f"/dev/shm/{other}")
    finally:
        for name in (stale, live, other):
            if os.path.exists(f"/dev/shm/{name}"):
                os.unlink(f"/dev/shm/{name}")



@pytest.mark.slow
def test_a_peer_that_never_reads_cannot_block_or_bloat_the_server(launch, tmp_path):
    la = launch("--set", "train.workers=1", "--set", "train.consistency=asp", "--set", "train.steps=1000000000",
                "--set", faults.OVERRIDE, "--set", "data.n=4000",
                "--set", f"output.dir={tmp_path / 'out'}", env=faults.env(slow_worker=0, slow_ms=1))
    addr_file = tmp_path / "out" / "address"
    address = wait_for(lambda: addr_file.exists() and addr_file.read_text().strip(), 60, what="the address")
    wait_for(lambda: status(address)["step"] > 10, 60, what="training to start")
    st0 = status(address)
    pid = st0["pid"]

    def rss_kb():
        with open(f"/proc/{pid}/status") as fh:
            return int(next(ln.split()[1] for ln in fh if ln.startswith("VmRSS:")))

    rss0 = rss_kb()
    ctx = zmq.Context()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.setsockopt(zmq.RCVHWM, 1)             # it reads nothing: its side fills at once
    rogue.setsockopt(zmq.SNDHWM, 0)
    rogue.connect(address)
    request = [msgpack.packb({"op": "status"})]  # each answer is a few kilobytes
    for _ in range(50_000):
        rogue.send_multipart(request)
    # the server keeps serving the honest worker and the status of others...
    wait_for(lambda: status(address)["step"] > st0["step"] + 500, 60, what="training to go on")
    # ...and what it holds for the rogue is bounded by the send high-water mark, not by what it was asked
    assert rss_kb() - rss0 < 50_000
    rogue.close()
    ctx.term()
    la.proc.send_signal(2)
    la.wait()
    la.assert_no_leftovers()
