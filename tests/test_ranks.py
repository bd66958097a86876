"""psrv/ranks.py without processes: a rank's place from the scheduler's variables, Slurm's host lists, the
rendezvous file and the address rank 0 publishes."""
from __future__ import annotations

import json
import os
import threading

import pytest

from psrv import config as config_mod
from psrv import ranks
from psrv.errors import ConfigError, RunError


@pytest.mark.parametrize("text, hosts", [
    ("node7", ["node7"]),
    ("node[1-3,5],gpu7", ["node1", "node2", "node3", "node5", "gpu7"]),
    ("n[08-11]", ["n08", "n09", "n10", "n11"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("a,b[3],c-[1-2]x", ["a", "b3", "c-1x", "c-2x"]),
    ("psrv-node[10-9999]", [f"psrv-node{i}" for i in range(10, 10000)]),
])
def test_hostlists_expand_in_order(text, hosts):
    assert ranks.expand_hostlist(text) == hosts


@pytest.mark.parametrize("text, why", [("node[1-3", "unbalanced"), ("node1]", "unbalanced"),
                                       ("n[[1]]", "nested"), ("n[3-1]", "backwards"), ("n[a-b]", "not a number"),
                                       ("a,,b", "empty"), ("", "names no host")])
def test_bad_hostlists_say_what_is_wrong(text, why):
    with pytest.raises(ConfigError, match=why):
        ranks.expand_hostlist(text)


def test_slurm_place_from_its_variables():
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_JOB_ID": "4711", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "cn[003-005]"}
    assert ranks.place("slurm", env) == ranks.Place(rank=2, world=3, job="4711.0", first_host="cn003")
    # a step may run on part of the allocation: its own node list comes first
    env["SLURM_STEP_NODELIST"] = "cn[004-005]"
    assert ranks.place("slurm", env).first_host == "cn004"


def test_mpirun_place_from_open_mpi_variables():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4", "PMIX_NAMESPACE": "prterun-x-123@1"}
    assert ranks.place("mpirun", env) == ranks.Place(0, 4, "prterun-x-123@1", "")


@pytest.mark.parametrize("env, why", [({}, "SLURM_PROCID is not set"),
                                      ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "not an integer"),
                                      ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, "outside 0..1")])
def test_a_rank_outside_a_job_is_a_usage_error(env, why):
    with pytest.raises(ConfigError, match=why):
        ranks.place("slurm", env)


def test_the_job_port_is_the_same_on_every_rank_and_in_range():
    assert ranks.job_port("4711.0") == ranks.job_port("4711") == 24711
    assert ranks.job_port("123456789") == ranks.PORT_BASE + 123456789 % ranks.PORT_SPAN
    with pytest.raises(ConfigError, match="--rendezvous"):
        ranks.job_port("")


def test_a_wildcard_bind_is_published_under_the_host_name():
    assert ranks.reachable("tcp://0.0.0.0:5555", "cn003") == "tcp://cn003:5555"
    assert ranks.reachable("tcp://10.1.2.3:5555", "cn003") == "tcp://10.1.2.3:5555"
    with pytest.raises(ConfigError, match="set server.bind"):
        ranks.reachable("tcp://0.0.0.0:5555", "")


def _cfg(*overrides):
    return config_mod.load(None, list(overrides))


def test_rank_zero_binds_every_interface_on_the_job_port_unless_told():
    me = ranks.Place(0, 3, "4711.0", "cn003")
    assert ranks._bind(_cfg(), me, None) == ("*", 24711)
    assert ranks._bind(_cfg(), me, "/shared/rv") == ("*", 0)   # the file says which port
    keyed = ("server.keys=/k",)
    assert ranks._bind(_cfg("server.bind=tcp://10.0.0.1:0", *keyed), me, None) == ("10.0.0.1", 24711)
    assert ranks._bind(_cfg("server.bind=tcp://10.0.0.1:6000", *keyed), me, None) == ("10.0.0.1", 6000)
    with pytest.raises(ConfigError, match="over tcp only"):
        ranks._bind(_cfg("server.bind=ipc:///tmp/x"), me, None)


def test_the_rendezvous_file_is_read_once_rank_zero_writes_it(tmp_path):
    path = str(tmp_path / "rv")
    writer = threading.Timer(0.3, ranks.publish, (path, "tcp://10.0.0.1:5000", "4711.0"))
    writer.start()
    try:
        assert ranks.read_rendezvous(path, "4711.0", timeout_s=30) == "tcp://10.0.0.1:5000"
    finally:
        writer.cancel()
    assert json.loads(open(path).read()) == {"address": "tcp://10.0.0.1:5000", "job": "4711.0"}
    assert os.listdir(tmp_path) == ["rv"]    # the temporary file was renamed, not left


class FakeClock:
    def __init__(self):
        self.now_s = 0.0

    def __call__(self):
        return self.now_s

    def sleep(self, s):
        self.now_s += s


def test_an_earlier_jobs_rendezvous_file_is_not_taken(tmp_path):
    path = str(tmp_path / "rv")
    ranks.publish(path, "tcp://10.0.0.1:5000", "4710.0")
    clock = FakeClock()
    with pytest.raises(RunError, match=r"within 3 s \(found the address of another job \('4710.0', this is "
                                       r"'4711.0'\)\)"):
        ranks.read_rendezvous(path, "4711.0", 3, clock=clock, sleep=clock.sleep)


@pytest.mark.parametrize("content, found", [(None, "no file"), ("{not json", "an unreadable file"),
                                            ("[1, 2]", "a file that is not a psrv rendezvous file")])
def test_a_missing_or_broken_rendezvous_file_times_out_naming_it(tmp_path, content, found):
    path = tmp_path / "rv"
    if content is not None:
        path.write_text(content)
    clock = FakeClock()
    with pytest.raises(RunError, match=f"rank 0 did not publish .*found {found}.*every rank shares"):
        ranks.read_rendezvous(str(path), "1.0", 2, clock=clock, sleep=clock.sleep)
