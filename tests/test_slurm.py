"""A real Slurm on this machine (tests/cluster/slurm_up.sh): slurmctld and three slurmd nodes, each node a network
namespace of its own on a bridge, and `srun -N 3 -n 3 python launch.py --cluster slurm` across them. Skips, saying
why, where Slurm, munge or network namespaces cannot be had (.ci/run installs the packages when it can)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import psrv
from psrv import blocks, config, data

from .cluster import netns
from .conftest import LAUNCH, Launch, ROOT, tagged_pids, wait_for
from .test_e2e import lstsq_loss
from .test_multihost import JOB, _steps_logged

pytestmark = pytest.mark.slow

SLURM_UP = ROOT / "tests" / "cluster" / "slurm_up.sh"
TOOLS = ("slurmctld", "slurmd", "srun", "scancel", "munged", "nsenter")
NODE1 = "10.78.0.1"   # rank 0's node (slurm_up.sh)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = netns.unavailable() or ", ".join(f"no {t}" for t in TOOLS if shutil.which(t) is None)
    if why:
        pytest.skip(f"{why} (Debian: apt-get install slurmd slurmctld slurm-client munge)")
    where = tmp_path_factory.mktemp("slurm") / "cluster"
    try:
        up = subprocess.run(["bash", str(SLURM_UP), "up", str(where)], capture_output=True, text=True, timeout=120)
        assert up.returncode == 0, f"slurm_up.sh failed:\n{up.stdout}\n{up.stderr}"
        yield where
    finally:   # whatever happened: no daemon, namespace or job process left
        subprocess.run(["bash", str(SLURM_UP), "down", str(where)], capture_output=True, timeout=120)


@pytest.fixture
def keys(tmp_path):
    k = tmp_path / "keys"
    subprocess.run([sys.executable, LAUNCH, "--keygen", str(k)], check=True, capture_output=True, timeout=60)
    return k


def srun(slurm, tmp_path, *args) -> Launch:
    """`srun -N 3 -n 3 python launch.py ARGS` from the cluster's control host (its own namespace)."""
    return Launch([str(a) for a in args], tmp_path, prefix=[str(slurm / "run"), "srun", "-N", "3", "-n", "3"])


def job_args(tmp_path, keys, *more):
    # node names resolve nowhere here: rank 0 binds its node's address and publishes it in a rendezvous file
    return ["--cluster", "slurm", "--rendezvous", tmp_path / "rv", "--keys", keys,
            "--set", f"server.bind=tcp://{NODE1}:0", *JOB, *more, "--set", f"output.dir={tmp_path / 'out'}"]


def pids_on(slurm, node: str, tag: str) -> list[int]:
    ns = dict(line.split() for line in (slurm / "namespaces").read_text().splitlines())[node]
    inside = set(map(int, subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                         timeout=30).stdout.split()))
    return [p for p in tagged_pids(tag) if p in inside]


def deaths(slurm, out, keys) -> int:
    """Workers the server has declared dead, asked from the control host (the server listens on node1's address
    only); -1 when it does not answer in time (a loaded machine: the caller asks again)."""
    r = subprocess.run([str(slurm / "run"), sys.executable, LAUNCH, "--status", str(out), "--keys", str(keys),
                        "--json"], capture_output=True, text=True, timeout=60)
    return json.loads(r.stdout)["deaths"] if r.returncode == 0 else -1


def psrv_shm_of(pids) -> list[str]:
    return [n for n in os.listdir("/dev/shm") for p in pids if n.startswith(f"psrv_{p}_")]


def test_a_three_node_slurm_job_equals_the_same_job_on_one_node(slurm, keys, tmp_path):
    job = srun(slurm, tmp_path, *job_args(tmp_path, keys))
    code, out, err = job.wait(180)
    assert code == 0, err
    assert re.search(rf"rank 0 of 3: server at tcp://{re.escape(NODE1)}:\d+", out)
    assert out.count("attaching 1 worker(s)") == 2 and out.count("after 600 steps (steps)") == 2
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["workers"] == 3 and s["steps"] == 600 and s["consistency"] == "bsp"
    theta = np.load(tmp_path / "out" / "theta.npy")
    one = psrv.train(None, [a for a in JOB if a != "--set"] + ["train.workers=3", f"output.dir={tmp_path / 'one'}",
                                                                "output.plot=false"])
    assert np.abs(theta - one.theta).max() <= 1e-10 * np.abs(one.theta).max()
    X, y, _, _ = data.load_arrays(config.load(None, [a for a in JOB if a != "--set"]).data)
    assert abs(s["final_loss"] - lstsq_loss(X, y)) <= 1e-3 * lstsq_loss(X, y)
    wait_for(lambda: not tagged_pids(job.tag), 15, what="every process of the job to exit")


def test_a_killed_rank_is_declared_dead_and_scancel_ends_the_job_leaving_nothing(slurm, keys, tmp_path):
    # a heartbeat timeout short enough for a quick test, long enough that no live worker misses it on a loaded machine
    beats = ["--set", "server.heartbeat_timeout_s=3", "--set", "worker.heartbeat_interval_s=0.3"]
    job = srun(slurm, tmp_path, *job_args(tmp_path, keys, *beats, "--set", "train.steps=1000000000"))
    out = tmp_path / "out"
    wait_for(lambda: _steps_logged(out) >= 100, 90, what="the 3-node job to train")
    seen = set(tagged_pids(job.tag))   # every launcher and worker (and srun): their shared memory is checked below
    # rank 2 dies at once, launcher and worker (kill -9, nothing said): the server declares its worker dead and the
    # others go on
    victims = pids_on(slurm, "node3", job.tag)
    assert len(victims) >= 2, victims   # its launcher and worker (and a multiprocessing helper)
    for p in victims:
        os.kill(p, signal.SIGKILL)
    wait_for(lambda: deaths(slurm, out, keys) >= 1, 60, what="the killed rank's worker to be declared dead")
    after = _steps_logged(out)
    wait_for(lambda: _steps_logged(out) >= after + 100, 60, what="the run to go on with 2 nodes")
    # scancel: SIGTERM to every process of the job; rank 0's server writes its results and stops the workers
    squeue = subprocess.run([str(slurm / "run"), "squeue", "-h", "-o", "%i"], capture_output=True, text=True,
                            timeout=30).stdout.split()
    assert len(squeue) == 1
    subprocess.run([str(slurm / "run"), "scancel", squeue[0]], check=True, timeout=30)
    code, text, err = job.wait(60)
    assert code != 0   # srun reports the killed and the cancelled tasks
    assert re.search(r"worker \d+ declared dead: pid (\d+) .*\(timeout 3 s\)", err), err
    dead_pid = int(re.search(r"worker \d+ declared dead: pid (\d+)", err).group(1))
    assert dead_pid in victims
    assert (out / "summary.json").exists(), err
    s = json.loads((out / "summary.json").read_text())
    assert s["stopped_by"] == "terminated" and s["worker_deaths"] == 1 and s["steps"] >= after + 100
    wait_for(lambda: not tagged_pids(job.tag), 20, what="every process of the job to exit")
    # what scancel stopped cleans up after itself; what kill -9 stopped cannot, and the next psrv start on that node
    # removes it (its lock is free: blocks.sweep_stale, which every launcher runs first)
    wait_for(lambda: not psrv_shm_of(seen - set(victims)), 20, what="the cancelled ranks' shared memory to go")
    left = [n for n in psrv_shm_of(victims) if not n.endswith("_lock")]
    removed = blocks.sweep_stale()
    assert set(left) <= set(removed) and not psrv_shm_of(seen), (left, removed, psrv_shm_of(seen))


def test_the_example_batch_script_runs_a_job(slurm, keys, tmp_path):
    script = ROOT / "examples" / "slurm" / "job.sbatch"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])}
    config = tmp_path / "job.toml"
    config.write_text("[train]\nconsistency = \"bsp\"\n")
    # the nodes have fewer CPUs than the script asks for; the rest as in the README
    r = subprocess.run([str(slurm / "run"), "sbatch", "--parsable", "--cpus-per-task=1", "-D", str(tmp_path),
                        str(script), str(config), str(keys), "--rendezvous", str(tmp_path / "rv"), "--set",
                        f"server.bind=tcp://{NODE1}:0", *JOB, "--set", "train.steps=100"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    log = tmp_path / f"slurm-{job}.out"

    def finished():
        q = subprocess.run([str(slurm / "run"), "squeue", "-h", "-j", job], capture_output=True, text=True,
                           timeout=30)
        return q.returncode == 0 and not q.stdout.strip()

    wait_for(finished, 120, interval_s=0.5, what=f"batch job {job} to end")
    text = log.read_text()
    s = json.loads((tmp_path / "runs" / f"slurm-{job}" / "summary.json").read_text())
    assert s["workers"] == 3 and s["steps"] == 100, text
    assert text.count("after 100 steps (steps)") == 2
