"""One job over several hosts, each host a network namespace of its own (tests/cluster/netns.py): the ranks of a
`--cluster` job and --attach workers talk to the server over TCP with CURVE across veth pairs and a bridge, never
over loopback. The scheduler's part is played by the environment variables srun sets (SLURM_PROCID, ...)."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

import psrv
from psrv import config, data

from .cluster import netns
from .conftest import LAUNCH, Launch, wait_for
from .test_e2e import lstsq_loss

pytestmark = pytest.mark.slow

JOB = ["--set", "data.n=4000", "--set", "data.d=10", "--set", "train.consistency=bsp", "--set",
       "train.schedule=static", "--set", "train.steps=600", "--set", "train.batch_size=64", "--set", "train.lr=0.05"]
FAST = ["--set", "server.heartbeat_timeout_s=1.5", "--set", "worker.heartbeat_interval_s=0.2"]


@pytest.fixture
def net(request):
    why = netns.unavailable()
    if why:
        pytest.skip(why)
    with netns.Network(getattr(request, "param", 2)) as n:   # down() runs whatever the test did
        yield n


@pytest.fixture
def keys(tmp_path):
    k = tmp_path / "keys"
    subprocess.run([sys.executable, LAUNCH, "--keygen", str(k)], check=True, capture_output=True, timeout=60)
    return k


def Rank(net, host: int, args, tmp_path, env=None) -> Launch:
    """launch.py on one host of the network."""
    return Launch([str(a) for a in args], tmp_path, env, prefix=net.prefix(host))


def slurm_env(rank: int, world: int, nodelist: str, job: str = "4711") -> dict:
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world), "SLURM_JOB_ID": job, "SLURM_STEP_ID": "0",
            "SLURM_JOB_NODELIST": nodelist}


def test_a_two_host_slurm_job_equals_the_same_job_on_one_host(net, keys, tmp_path):
    # no rendezvous file: rank 0 listens on every interface of its host on the job's port, and rank 1 finds it at the
    # first host of the node list; here the hosts' names are their addresses (nothing resolves names in the test)
    nodes = ",".join(net.addresses)
    args = ["--cluster", "slurm", *JOB, "--set", f"server.keys={keys}", "--set", f"output.dir={tmp_path / 'out'}"]
    r1 = Rank(net, 1, args, tmp_path, slurm_env(1, 2, nodes))   # before rank 0: it waits for the server
    r0 = Rank(net, 0, args, tmp_path, slurm_env(0, 2, nodes))
    (c0, out0, err0), (c1, out1, err1) = r0.wait(), r1.wait()
    assert c0 == 0 and c1 == 0, (err0, err1)
    address = f"tcp://{net.addresses[0]}:24711"
    assert f"rank 0 of 2: server at {address}" in out0 and "done (steps): 600 steps, 2 workers (bsp)" in out0
    assert f"rank 1 of 2: attaching 1 worker(s) to {address}" in out1 and "after 600 steps (steps)" in out1
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["workers"] == 2 and s["steps"] == 600
    theta = np.load(tmp_path / "out" / "theta.npy")
    one = psrv.train(None, [a for a in JOB if a != "--set"] + ["train.workers=2", f"output.dir={tmp_path / 'one'}",
                                                                "output.plot=false"])
    assert np.abs(theta - one.theta).max() <= 1e-10 * np.abs(one.theta).max()
    X, y, _, _ = data.load_arrays(config.load(None, [a for a in JOB if a != "--set"]).data)
    optimum = lstsq_loss(X, y)
    assert abs(s["final_loss"] - optimum) <= 1e-3 * optimum
    r0.assert_no_leftovers()
    r1.assert_no_leftovers()


def _steps_logged(out) -> int:
    """The step of the last whole line of the run's metrics.jsonl (the server may be writing the next one)."""
    path = out / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    lines = text[:text.rfind("\n") + 1].splitlines()
    return json.loads(lines[-1])["step"] if lines else 0


@pytest.mark.parametrize("net", [3], indirect=True)
def test_sigterm_to_an_attached_rank_or_to_rank_zero_ends_cleanly(net, keys, tmp_path):
    # a rendezvous file: rank 0 binds its own address (port 0) and publishes it there; the others wait for it
    out = tmp_path / "out"
    args = ["--cluster", "slurm", "--rendezvous", tmp_path / "rv", *JOB, *FAST, "--set", "train.steps=1000000000",
            "--set", f"server.bind=tcp://{net.addresses[0]}:0", "--keys", keys, "--set", f"output.dir={out}"]
    nodes = "h[0-2]"   # names nothing resolves: only the rendezvous file says where the server is
    ranks = [Rank(net, i, args, tmp_path, slurm_env(i, 3, nodes)) for i in range(3)]
    wait_for(lambda: _steps_logged(out) >= 100, 60, what="the 3-rank job to train")
    # an attached rank's launcher that gets SIGTERM: its worker says bye, and it exits; the run goes on without it
    ranks[2].proc.send_signal(signal.SIGTERM)
    code, text, err = ranks[2].wait()
    assert code == 128 + signal.SIGTERM and "(stopped)" in text, err
    ranks[2].assert_no_leftovers()
    after = _steps_logged(out)
    wait_for(lambda: _steps_logged(out) >= after + 100, 60, what="the run to go on with 2 ranks")
    # SIGTERM to rank 0: the server ends the run, keeping its results, and tells every worker to stop
    ranks[0].proc.send_signal(signal.SIGTERM)
    (c0, _, err0), (c1, out1, err1) = ranks[0].wait(), ranks[1].wait()
    assert c0 == 128 + signal.SIGTERM, err0
    assert c1 == 0 and "(terminated)" in out1, err1
    s = json.loads((out / "summary.json").read_text())
    assert s["stopped_by"] == "terminated" and s["steps"] > after + 100
    assert np.load(out / "theta.npy").shape == (11,)
    for r in ranks[:2]:
        r.assert_no_leftovers()
    assert not net.pids()


def test_an_attached_worker_with_a_wrong_or_no_key_is_refused(net, keys, tmp_path):
    other = tmp_path / "other"
    subprocess.run([sys.executable, LAUNCH, "--keygen", str(other)], check=True, capture_output=True, timeout=60)
    server = Rank(net, 0, ["--role", "server", *JOB, "--set", "train.workers=1", "--set", f"server.keys={keys}",
                           "--set", f"server.bind=tcp://{net.addresses[0]}:0", "--set",
                           f"output.dir={tmp_path / 'out'}"], tmp_path)
    address = server.proc.stdout.readline().split()[1]
    assert address.startswith(f"tcp://{net.addresses[0]}:")
    try:
        for key_args, why in [(["--keys", other], f"refused this client's CURVE key from {other}"),
                              ([], "it requires CURVE keys and this client has none")]:
            w = Rank(net, 1, ["--attach", address, "--workers", "1", "--set", "worker.server_timeout_s=2",
                              *key_args], tmp_path)
            code, _, err = w.wait(60)
            assert code == 1 and why in err and address in err, err
            w.assert_no_leftovers()
        # (the right key is admitted: the other tests here train with it)
        server.proc.send_signal(signal.SIGTERM)
        code, _, err = server.wait()
        assert code == 128 + signal.SIGTERM, err
    finally:
        server.proc.kill()
    server.assert_no_leftovers()
