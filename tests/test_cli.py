"""The command line as a user meets it: addresses in plain words, attaching to a running job, what a finished or
reused run folder does, process names."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from psrv import launch as launch_mod
from psrv.launch import main, server_address

from .conftest import FAST, LAUNCH, NO_PLOT, address_of, sets, wait_for


# ---------------------------------------------------------------------------------------------- addresses
@pytest.mark.parametrize("flag", ["--status", "--attach"])
@pytest.mark.parametrize("bad", ["foo", "127.0.0.1:5555", "localhost:5555", "tcp://127.0.0.1", "tcp://h:0",
                                 "tcp://h:70000", "ipc://", "http://127.0.0.1:80"])
def test_a_bad_address_is_a_usage_error_naming_the_expected_form(flag, bad, capsys):
    assert main([flag, bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{bad!r} is not a server address" in err and "tcp://HOST:PORT" in err and "run folder" in err


def test_status_takes_an_address_a_run_folder_or_its_address_file(tmp_path):
    assert server_address("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    assert server_address("ipc:///tmp/x.sock") == "ipc:///tmp/x.sock"
    (tmp_path / "address").write_text("tcp://127.0.0.1:4242\n")
    assert server_address(str(tmp_path)) == "tcp://127.0.0.1:4242"
    assert server_address(str(tmp_path / "address")) == "tcp://127.0.0.1:4242"
    (tmp_path / "address").write_text("garbage\n")
    with pytest.raises(launch_mod.ConfigError, match="'garbage' is not a server address"):
        server_address(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(launch_mod.ConfigError, match="folder without an address file"):
        server_address(str(empty))


@pytest.mark.slow
def test_a_run_folders_address_file_appears_whole(tmp_path, monkeypatch):
    """`--attach RUN_DIR`, `--status RUN_DIR` and scripts read the address file as soon as it exists: it is written
    under another name and renamed into place, so that no reader finds it empty or cut short (an empty one is
    "'' is not a server address")."""
    import psrv
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        with open(src) as fh:
            renamed.append((os.fspath(dst), fh.read()))   # what a reader finds the moment `dst` appears
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)   # in this process, the launcher's: the children spawn afresh
    r = psrv.train(None, ["data.n=200", "data.d=2", "train.workers=1", "train.steps=2", "output.plot=false",
                          "output.live_view=false", f"output.dir={tmp_path}"])
    address = (tmp_path / "address").read_text()
    assert address == r.summary["address"] + "\n"
    assert (str(tmp_path / "address"), address) in renamed


def test_status_of_a_folder_with_no_address_is_a_usage_error(tmp_path, capsys):
    assert main(["--status", str(tmp_path)]) == 2
    assert "without an address file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- attach
def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as fh:
        return fh.read().strip()


@pytest.mark.slow
def test_a_worker_attached_to_a_static_run_trains_and_everyone_stops_on_the_servers_sigterm(launch, tmp_path):
    """The default schedule (static, one shard per launcher worker): a third worker attached to the run reads a
    shard with its holder and trains; the attach launcher says what it joined and, when it leaves, after how many
    steps and why. kill -TERM on the server ends the run with its results, and every worker hears "stop"
    (none is left waiting for a server that is gone), so the summary counts the three that pushed."""
    out = tmp_path / "out"
    la = launch(*sets(data__n=20000, data__d=10, train__workers=2, train__steps=10**9), *FAST,
                "--set", f"output.dir={out}", "-q")
    address = address_of(out)
    wait_for(lambda: launch_mod.status(address)["step"] >= 20, 60, what="the run to train")
    attach = launch("--attach", str(out), "--workers", "1")               # the run folder names the server
    joined = attach.proc.stdout.readline()
    assert joined == f"joined {address} as worker 2 (shards [0])\n"
    wait_for(lambda: next((w["pushes"] for w in launch_mod.status(address)["workers"] if w["wid"] == 2), 0) > 10,
             60, what="the attached worker to train")
    text = subprocess.run([sys.executable, LAUNCH, "--status", str(out / "address")], capture_output=True,
                          text=True, timeout=30).stdout
    assert f"at {address}" in text and "[0]" in text
    # process names, as ps and top show them (Linux comm)
    st = launch_mod.status(address)
    server_pid = st["pid"]
    assert comm(la.proc.pid) == comm(attach.proc.pid) == "psrv launcher" and comm(server_pid) == "psrv server"
    assert {w["wid"]: comm(w["pid"]) for w in st["workers"]} == {w: f"psrv worker {w}" for w in (0, 1, 2)}
    os.kill(server_pid, signal.SIGTERM)
    code, out_a, err_a = attach.wait(timeout_s=60)
    assert code == 0, err_a
    assert out_a.startswith("left ") and "worker 2 after" in out_a and "(terminated)" in out_a
    code, _, err = la.wait(timeout_s=60)
    assert code == 0, err
    assert "still running" not in err                                      # no worker was left to be killed
    s = json.loads((out / "summary.json").read_text())
    assert s["stopped_by"] == "terminated" and s["workers"] == 3 and set(s["pushes_applied"]) == {"0", "1", "2"}
    attach.assert_no_leftovers()
    la.assert_no_leftovers()


@pytest.mark.slow
def test_attach_to_an_address_where_nothing_answers_fails_once_in_plain_words(launch):
    la = launch("--attach", "tcp://127.0.0.1:9", "--workers", "2", "--set", "worker.server_timeout_s=1",
                "--set", "train.pin=false")
    code, out, err = la.wait(timeout_s=60)
    assert code == 1 and out == ""
    assert "Traceback" not in err and "restarting" not in err and "worker--1" not in err
    assert err.splitlines() == ["psrv: run failed: client: no reply from tcp://127.0.0.1:9 to hello within 1 s: "
                                "no psrv server runs at tcp://127.0.0.1:9, or it requires CURVE keys and this client "
                                "has none (--keys DIR)"]
    la.assert_no_leftovers()
    # with -v the workers' own log lines show; one without its id yet is "worker-?", not "worker--1"
    la = launch("--attach", "tcp://127.0.0.1:9", "--workers", "1", "--set", "worker.server_timeout_s=1",
                "--set", "train.pin=false", "-v")
    code, _, err = la.wait(timeout_s=60)
    assert code == 1 and " worker-? INFO client: no reply from tcp://127.0.0.1:9" in err and "worker--1" not in err
    la.assert_no_leftovers()


@pytest.mark.slow
def test_an_attach_whose_workers_die_for_good_exits_non_zero(launch, tmp_path):
    out = tmp_path / "out"
    la = launch(*sets(data__n=4000, data__d=3, train__workers=1, train__steps=10**9), *FAST,
                "--set", f"output.dir={out}", "-q")
    address = address_of(out)
    attach = launch("--attach", address, "--workers", "1", "--set", "train.max_restarts=0")
    assert attach.proc.stdout.readline().startswith(f"joined {address} as worker 1")
    pid = wait_for(lambda: next((w["pid"] for w in launch_mod.status(address)["workers"] if w["wid"] == 1), None),
                   30, what="the attached worker in the status")
    os.kill(pid, signal.SIGKILL)
    code, _, err = attach.wait(timeout_s=60)
    assert code == 1 and "1 of the 1 attached workers ended early and could not be restarted" in err, err
    attach.assert_no_leftovers()
    la.proc.send_signal(signal.SIGINT)
    assert la.wait(timeout_s=60)[0] == 130
    la.assert_no_leftovers()


# ---------------------------------------------------------------------------------------------- run folders
@pytest.mark.slow
def test_a_used_output_dir_is_refused_unless_overwrite_and_a_finished_run_is_not_resumed(tmp_path, capsys):
    out = tmp_path / "run"
    job = [*sets(data__n=2000, data__d=3, train__workers=1, train__steps=20), "--set", f"output.dir={out}", "-q",
           *NO_PLOT]
    assert main(job) == 0
    before = {n: (out / n).read_bytes() for n in ("theta.npy", "summary.json", "metrics.jsonl")}
    capsys.readouterr()
    # the same folder again: refused, naming what is there and the ways on; nothing touched
    assert main(job) == 2
    err = capsys.readouterr().err
    assert f"{out} holds an earlier run's results (theta.npy, summary.json, metrics.jsonl, checkpoints" in err
    assert "--resume" in err and "--overwrite" in err
    assert {n: (out / n).read_bytes() for n in before} == before
    # resuming the finished run: it says so, exits 0 and changes nothing
    assert main([*job, "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert "is finished" in err and "train.steps = 20" in err and "nothing changed" in err
    assert {n: (out / n).read_bytes() for n in before} == before
    # with a higher step budget it trains on
    assert main([*job, "--set", "train.steps=30", "--resume", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 30
    # --overwrite: a new run replaces the results
    assert main([*job, "--overwrite"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 20 and s["resumed_from"] is None


DEFAULT_SPLIT = {"compute": 0.219, "wait": 0.08, "communication": 0.243}   # the default job's, measured here


def test_a_bsp_run_that_waits_on_round_trips_is_told_about_group_steps():
    """The default job's own split (python launch.py): the round trip costs more than the gradient, so the
    summary suggests K with K gradients >= 20 round trips (32 here); the printed line says that the result stays."""
    from psrv import config
    from psrv.launch import group_steps_hint
    from psrv.report import group_steps_hint as hint_k
    cfg = config.load(None)
    assert hint_k(cfg, DEFAULT_SPLIT) == 32
    line = group_steps_hint({"group_steps_hint": 32, "time_per_push_ms": DEFAULT_SPLIT})
    assert "train.group_steps = 32 " in line and "0.243 ms" in line and "0.219 ms" in line
    assert "the same BSP steps" in line and "the same result" in line
    assert group_steps_hint({"group_steps_hint": 0, "time_per_push_ms": DEFAULT_SPLIT}) == ""
    # a round trip far longer than the gradient: K stops at 64; the shortest hinted at, a quarter: 8 x 1 >= 20 x 0.25
    assert hint_k(cfg, {"compute": 0.01, "communication": 1.0}) == 64
    assert hint_k(cfg, {"compute": 1.0, "communication": 0.25}) == 8


@pytest.mark.parametrize("change", [{"train": {"consistency": "asp"}}, {"train": {"optimizer": "ftrl"}},
                                    {"train": {"group_steps": 8}}, {"train": {"local_steps": 4,
                                                                              "lr_schedule": "constant"}},
                                    {"train": {"workers": 3, "backup_workers": 1}}, {"worker": {"shm": False}},
                                    {"server": {"shards": 2}},
                                    {"model": {"kind": "sparse_logistic"}, "train": {"optimizer": "sgd"},
                                     "data": {"source": "criteo"}}])
def test_no_group_steps_hint_where_the_config_refuses_them(change):
    """Not for a run that group steps cannot take, by the config's own rules (ASP, FTRL, a mode that talks less
    already, backup workers, no shared memory, several servers, a sparse model)."""
    from psrv import config
    from psrv.report import group_steps_hint as hint_k
    assert hint_k(config.load(None), DEFAULT_SPLIT) == 32   # the same split would be hinted at in the default job
    assert hint_k(config.load({"train": {"optimizer": "adam"}}), DEFAULT_SPLIT) == 32   # as with plain SGD
    assert hint_k(config.load(change), DEFAULT_SPLIT) == 0


@pytest.mark.parametrize("split", [{}, {"compute": 1.0, "wait": 5.0, "communication": 0.2}])
def test_no_group_steps_hint_without_a_split_or_with_a_short_round_trip(split):
    """A long barrier wait is another worker's slowness, which group steps do not remove."""
    from psrv import config
    from psrv.report import group_steps_hint as hint_k
    assert hint_k(config.load(None), split) == 0


@pytest.mark.parametrize("how", [{"role": "server"}, {"local": 1}], ids=["--role server", "workers of other hosts"])
def test_group_steps_with_workers_that_attach_are_refused_at_start(tmp_path, how):
    """The server would refuse every attaching worker (group_only) and wait for them for ever: the launcher says
    so before it loads anything."""
    from psrv import config
    from psrv.errors import ConfigError
    from psrv.launch import run
    cfg = config.load({"train": {"workers": 2, "group_steps": 4}, "output": {"dir": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match="with workers that attach .* set train.group_steps = 1"):
        run(cfg, **how)
    assert not (tmp_path / "out").exists()


def test_no_group_steps_hint_for_a_run_whose_workers_attached():
    """Group steps would refuse them: a server started alone, or one that a worker of another machine joined."""
    from psrv.report import group_steps_hint as hint_k
    from psrv.report import run_hint
    from .coord_harness import H
    h = H(2, shm=True)
    h.hellos([0, 1])
    assert run_hint(h.c, DEFAULT_SPLIT) == hint_k(h.c.cfg, DEFAULT_SPLIT) > 0   # the launcher's own workers
    h.hello(2, local=False)
    assert run_hint(h.c, DEFAULT_SPLIT) == 0
    alone = H(2, shm=True, alone=True)
    alone.hellos([0, 1])
    assert run_hint(alone.c, DEFAULT_SPLIT) == 0
