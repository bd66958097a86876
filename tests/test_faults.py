"""Faults with real processes: killed and paused workers, a killed server, corrupt checkpoints, workers that attach
and leave, uneven shards. Every wait is on a condition with a deadline; nothing sleeps blindly."""
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
from psrv import checkpoint
from psrv.errors import ServerLost
from psrv.launch import status
from workers import faults

from .conftest import FAST, LAUNCH, address_of, shm_of, tagged_pids, wait_for
from .conftest import sets as args

pytestmark = pytest.mark.slow

DATA = ["--set", "data.n=20000", "--set", "data.d=10"]




def state(address):
    return status(address, timeout_s=10)


def answer(address):
    """The state, or None while no server answers (between a server's death and its restart)."""
    try:
        return status(address, timeout_s=3)
    except ServerLost:
        return None


def worker_pid(address, wid):
    return next(w["pid"] for w in state(address)["workers"] if w["wid"] == wid and w["alive"])


def reach_step(address, step):
    wait_for(lambda: state(address)["step"] >= step, 60, what=f"step {step}")


def summary(out):
    return json.loads((out / "summary.json").read_text())


def reference_loss(tmp_path, extra):
    """The same run without the fault (in process)."""
    r = psrv.train(None, [a for a in extra if a != "--set"] + [f"output.dir={tmp_path / 'ref'}",
                                                                "output.plot=false"])
    return r.summary["final_loss"]


def test_killed_worker_is_survived(launch, tmp_path):
    # what a death does under SSP and ASP (the gate, leases, batches handed back) is decided by the coordinator and
    # tested there, for every mode, without processes (tests/test_coordinator.py); here: a real SIGKILL end to end
    # 1500 steps: the loss has reached its floor by step 1000 with 3 workers or 2, so the run that loses one at
    # step 300 and the reference run without the fault must end at the same loss. Worker 1 sends itself the
    # SIGKILL at step 300 (workers/faults.py): the 1500 steps take under a second, so a kill from the test after
    # it saw step 300 could come after the run's end
    run = DATA + args(train__workers=3, train__steps=1500, train__max_restarts=0)
    la = launch(*run, *FAST, "--set", faults.OVERRIDE, "--set", f"output.dir={tmp_path / 'out'}", "-v",
                env=faults.env(kill_worker=1, kill_at_step=300))
    code, out, err = la.wait()
    assert code == 0, err
    s = summary(tmp_path / "out")
    assert s["worker_deaths"] == 1 and s["steps"] == 1500
    deaths = re.findall(r"worker (\d+) declared dead: pid \d+ on \S+, clock \d+, silent for", err)
    assert deaths == ["1"]                                           # logged once, naming it
    assert s["final_loss"] == pytest.approx(reference_loss(tmp_path, run), rel=0.01)
    la.assert_no_leftovers()


def test_a_worker_killed_during_group_steps_is_survived(launch, tmp_path):
    """train.group_steps = 4: a member killed in the middle of a group step holds the others at the shared-memory
    barrier for at most their timeout (server.progress_deadline_s); they leave the group for that step, push, and
    the run goes on among the two that are left, to the loss of the run without the fault."""
    run = DATA + args(train__workers=3, train__steps=600, train__max_restarts=0, train__group_steps=4,
                      server__progress_deadline_s=1.0)
    la = launch(*run, *FAST, "--set", faults.OVERRIDE, "--set", f"output.dir={tmp_path / 'out'}", "-v",
                env=faults.env(kill_worker=1, kill_at_step=100))    # killed in its second sub-step of step 100
    code, out, err = la.wait()
    assert code == 0, err
    s = summary(tmp_path / "out")
    # the server left it behind as a straggler (server.progress_deadline_s), or declared it dead first if the run
    # lasted past server.heartbeat_timeout_s
    assert s["worker_deaths"] + s["straggles"] >= 1 and s["steps"] == 600
    assert "worker 1 (pid" in err and "killed by SIGKILL" in err
    assert sorted(re.findall(r"worker (\d+): left group step 100 ", err)) == ["0", "2"], err   # a timeout, no hang
    # they leave at half the server's deadline, so that neither is still at its barrier when the server calls
    # the holders of batches stragglers (it once did, for one of them in most runs)
    assert re.findall(r"worker (\d+) \(pid \d+ on \S+\) made no progress", err) in ([], ["1"]), err
    assert s["final_loss"] == pytest.approx(reference_loss(tmp_path, run), rel=0.01)
    la.assert_no_leftovers()


def test_a_member_restarted_during_a_group_step_comes_back_at_the_next(launch, tmp_path):
    """train.group_steps = 4: worker 1 is killed before the fourth sub-step of group step 2 and restarted at once.
    Its new incarnation is served from group step 3 on: joining step 2 half way through, it would read sub-steps
    its peers had already overwritten in the shared buffers and push a step of its own making. The peers leave
    step 2 after their wait (half of server.progress_deadline_s, far longer than the restart), and the run ends
    with every step."""
    run = DATA + args(train__workers=3, train__steps=48, train__max_restarts=1, train__group_steps=4,
                      train__batch_size=32)
    la = launch(*run, *FAST, "--set", faults.OVERRIDE, "--set", f"output.dir={tmp_path / 'out'}", "-v",
                env=faults.env(kill_worker=1, kill_at_step=2, kill_sub_step=3))
    code, out, err = la.wait()
    assert code == 0, err
    assert "worker 1 (pid" in err and "restarting it (1 of 1)" in err
    s = summary(tmp_path / "out")
    assert s["steps"] == 48 and s["worker_restarts"] == 1
    # 12 group steps: worker 1 pushed for 0, 1 and, restarted, 3 .. 11
    assert s["pushes_applied"] == {"0": 12, "1": 11, "2": 12}, s["pushes_applied"]
    assert sorted(re.findall(r"worker (\d+): left group step 2 ", err)) == ["0", "2"], err
    la.assert_no_leftovers()


def test_under_group_steps_a_slow_member_is_waited_for_as_bsp_waits_for_it(launch, tmp_path):
    """train.group_steps = 4: worker 1 takes 150 ms per sub-step, the others about a millisecond, and
    server.progress_deadline_s is 0.2. Before any push the members wait half of that, 0.1 s, and leave the first
    group step; each later reply's wait_s is half the server's deadline as it adapts to how long a group step's
    batch is held (10 x), so the others wait for the slow member as the server (and BSP) waits for it: no later
    group step is left, and nobody is called a straggler."""
    run = DATA + args(train__workers=3, train__steps=40, train__group_steps=4, server__progress_deadline_s=0.2)
    la = launch(*run, *FAST, "--set", faults.OVERRIDE, "--set", f"output.dir={tmp_path / 'out'}", "-v",
                env=faults.env(slow_worker=1, slow_ms=150))
    code, out, err = la.wait()
    assert code == 0, err
    s = summary(tmp_path / "out")
    assert set(re.findall(r"worker \d+: left group step (\d+) ", err)) <= {"0"}, err
    assert s["straggles"] == 0 and s["steps"] == 40
    la.assert_no_leftovers()


def test_killed_worker_is_restarted_and_rows_are_not_skipped(launch, tmp_path):
    # epochs: every row must be visited once per epoch, even though a worker dies mid-epoch with a batch in flight
    # worker 1 sends itself the SIGKILL at step 50, its batch computed and not pushed (workers/faults.py): the whole
    # run is a second or two, so a kill from the test after it saw step 50 could come after the run's end
    run = DATA + args(train__workers=2, train__epochs=3, train__batch_size=64, train__max_restarts=1)
    la = launch(*run, *FAST, "--set", faults.OVERRIDE, "--set", f"output.dir={tmp_path / 'out'}", "-v",
                env=faults.env(kill_worker=1, kill_at_step=50))
    code, out, err = la.wait()
    assert code == 0, err
    assert "worker 1 (pid" in err and "restarting it (1 of 1)" in err
    s = summary(tmp_path / "out")
    assert s["worker_restarts"] == 1 and s["stopped_by"] == "epochs"
    assert s["rows_visited"] == {"0": 20000, "1": 20000, "2": 20000}
    la.assert_no_leftovers()


@pytest.mark.parametrize("rejoin", [True, False])
def test_paused_worker_is_declared_dead_and_its_late_push_refused(launch, tmp_path, rejoin):
    # worker 1 is slow (it sleeps 300 ms a step), so the pause almost surely catches it between pull and push.
    # The run lasts until the test ends it, once it has seen what it waits for: a run that ends by itself (it
    # once had train.max_wall_s = 5) could end on a loaded machine before the test has seen the death or the rejoin
    run = DATA + args(train__workers=3, train__steps=10**9, train__consistency="asp",
                      train__max_restarts=0, worker__rejoin=str(rejoin).lower())
    la = launch(*run, *FAST, "--set", faults.OVERRIDE, "--set", f"output.dir={tmp_path / 'out'}", "-v",
                env=faults.env(slow_worker=1, slow_ms=300))
    address = address_of(tmp_path / "out")
    wait_for(lambda: any(w["wid"] == 1 and w["pushes"] >= 1 for w in state(address)["workers"]), 60,
             what="worker 1 to push")
    pid = worker_pid(address, 1)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: state(address)["deaths"] == 1, 30, what="the paused worker to be declared dead")
    finally:
        os.kill(pid, signal.SIGCONT)
    # resumed, it pushes what it computed as the dead incarnation (refused), and then comes back as incarnation 2
    # or, not allowed to, exits
    if rejoin:
        wait_for(lambda: any(w["wid"] == 1 and w["inc"] == 2 and w["alive"] for w in state(address)["workers"]),
                 30, what="worker 1 to rejoin")
    else:
        wait_for(lambda: pid not in tagged_pids(la.tag), 30, what="worker 1 to exit")
    os.kill(state(address)["pid"], signal.SIGTERM)      # ends the run, keeping its results
    code, out, err = la.wait()
    assert code == 0, err
    s = summary(tmp_path / "out")
    assert s["stopped_by"] == "terminated"
    assert s["worker_deaths"] == 1
    assert s["stale_pushes"] >= 1                        # its push from the dead incarnation was refused
    assert s["worker_restarts"] == (1 if rejoin else 0)
    if not rejoin:
        assert "not registering again (worker.rejoin = false)" in err
    la.assert_no_leftovers()


def test_killed_server_is_restarted_and_matches_a_resumed_run(launch, tmp_path):
    # the run lasts until the test ends it (SIGTERM to the restarted server, which keeps the results): a run of a
    # fixed number of steps could end (in about a second) between its first checkpoint and the test's kill. A
    # constant rate, so that run b, resumed by hand to the step where run a ended, takes the same steps
    run = DATA + args(train__workers=2, train__lr_schedule="constant", checkpoint__every_steps=500,
                      checkpoint__keep=100)
    la = launch(*run, *args(train__steps=10**9), *FAST, "--set", f"output.dir={tmp_path / 'a'}", "-v")
    address = address_of(tmp_path / "a")
    ckpts = tmp_path / "a" / "checkpoints"
    wait_for(lambda: checkpoint.checkpoints(str(ckpts)), 60, what="a first checkpoint")
    os.kill(state(address)["pid"], signal.SIGKILL)
    # the launcher restarts it (at the same address) from its newest checkpoint, and it trains on from there
    restarted = wait_for(lambda: (lambda st: st if st and st["server_restarts"] == 1 else None)(answer(address)),
                         60, what="the server's restart")
    reach_step(address, restarted["step"] + 200)
    os.kill(state(address)["pid"], signal.SIGTERM)
    code, out, err = la.wait()
    assert code == 0, err
    assert "server (pid" in err and "restarting it from its newest checkpoint (1 of 2)" in err
    s = summary(tmp_path / "a")
    assert s["server_restarts"] == 1 and s["stopped_by"] == "terminated" and s["resumed_from"]
    # the same checkpoint, resumed by hand in a fresh folder to the same step: the same theta
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(s["resumed_from"], tmp_path / "b" / "checkpoints")
    lb = launch(*run, *args(train__steps=s["steps"]), "--resume", str(tmp_path / "b"),
                "--set", f"output.dir={tmp_path / 'b'}")
    code, out, err = lb.wait()
    assert code == 0, err
    a, b = np.load(tmp_path / "a" / "theta.npy"), np.load(tmp_path / "b" / "theta.npy")
    assert np.abs(a - b).max() <= 1e-9 * np.abs(a).max()
    la.assert_no_leftovers()
    lb.assert_no_leftovers()


@pytest.mark.slow
@pytest.mark.parametrize("group_steps,optimizer", [(1, "sgd"), (4, "sgd"), (4, "adam")])
def test_resume_of_an_ended_bsp_run_with_more_steps_is_the_run_that_never_stopped(launch, tmp_path, group_steps,
                                                                                  optimizer):
    # BSP, the static schedule and a constant rate: the batches and updates are fixed, so a run of 8 steps resumed
    # from its end to 16 must give a 16-step run's theta to the bit (it once started with 1 of the 2 workers)
    # (group_steps = 4: the same steps, taken 4 at a time by the workers among themselves in shared memory; with
    # Adam, the members start from the server's state, which the checkpoint holds)
    run = DATA + args(train__workers=2, train__batch_size=50, train__lr_schedule="constant", output__plot="false",
                      train__group_steps=group_steps, train__optimizer=optimizer)
    la = launch(*run, *args(train__steps=16, output__dir=tmp_path / "a"))
    assert la.wait()[0] == 0
    lb = launch(*run, *args(train__steps=8, output__dir=tmp_path / "b"))
    assert lb.wait()[0] == 0
    lc = launch(*run, *args(train__steps=16), "--resume", tmp_path / "b", "-v")
    code, out, err = lc.wait()
    assert code == 0, err
    assert "2 workers joined; training resumes at step 8" in err
    s = summary(tmp_path / "b")
    assert s["steps"] == 16 and s["resumed_from"].endswith("ckpt-0000000008.psrv")
    assert np.array_equal(np.load(tmp_path / "a" / "theta.npy"), np.load(tmp_path / "b" / "theta.npy"))
    for la in (la, lb, lc):
        la.assert_no_leftovers()


def test_corrupt_newest_checkpoint_is_skipped(launch, tmp_path):
    run = DATA + args(train__workers=2, train__steps=600, checkpoint__every_steps=200, checkpoint__keep=5)
    la = launch(*run, "--set", f"output.dir={tmp_path / 'a'}")
    assert la.wait()[0] == 0
    paths = checkpoint.checkpoints(str(tmp_path / "a" / "checkpoints"))
    assert [os.path.basename(p) for p in paths][-2:] == ["ckpt-0000000400.psrv", "ckpt-0000000600.psrv"]
    with open(paths[-1], "r+b") as fh:  # flip one byte in the middle of the newest
        fh.seek(os.path.getsize(paths[-1]) // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    lb = launch(*run, "--set", "train.steps=800", "--resume", str(tmp_path / "a"), "-v")
    code, out, err = lb.wait()
    assert code == 0, err
    assert "ckpt-0000000600.psrv" in err and "checksum" in err  # the warning names the bad file
    s = summary(tmp_path / "a")
    assert s["resumed_from"].endswith("ckpt-0000000400.psrv") and s["steps"] == 800
    lb.assert_no_leftovers()


def test_workers_attach_mid_run_show_in_status_and_leave(launch, tmp_path):
    # it runs until the test stops it (about 2,500 steps a second: a step budget would be a race with the attach)
    la = launch(*DATA, *args(train__workers=2, data__shards=6, train__steps=10**9, train__consistency="asp"),
                *FAST, "--set", f"output.dir={tmp_path / 'out'}")
    address = address_of(tmp_path / "out")
    reach_step(address, 100)
    attach = launch("--attach", address, "--workers", "1")
    # it is in the status at its hello, and in the run (with shards) from its first pull, once its rows are loaded
    st = wait_for(lambda: (lambda s: s if len(s["workers"]) == 3 and all(w["alive"] and w["shards"]
                                                                          for w in s["workers"])
                           else None)(state(address)), 60, what="the attached worker in the run")
    joined = next(w for w in st["workers"] if w["wid"] >= 2)
    assert len(joined["shards"]) == 2                           # 6 shards over 3 workers: it took 2
    wait_for(lambda: next(w for w in state(address)["workers"] if w["wid"] == joined["wid"])["pushes"] > 10, 60,
             what="the attached worker to train")
    step_before = state(address)["step"]
    attach.proc.send_signal(signal.SIGINT)                      # it leaves (saying bye)
    code, out, _ = attach.wait()
    assert code == 130 and f"left {address}: worker {joined['wid']} after " in out and "(stopped)" in out
    attach.assert_no_leftovers()
    left = next(w for w in state(address)["workers"] if w["wid"] == joined["wid"])
    assert not left["alive"] and state(address)["deaths"] == 0   # it left, it did not die
    reach_step(address, step_before + 200)                       # and the run goes on
    text = subprocess.run([sys.executable, LAUNCH, "--status", address], capture_output=True, text=True,
                          timeout=30).stdout
    assert f"server {state(address)['server_id']}" in text and "wid" in text
    la.proc.send_signal(signal.SIGINT)
    la.wait()
    la.assert_no_leftovers()


def test_role_server_with_attached_workers(launch, tmp_path):
    srv = launch(*DATA, *args(train__workers=2, train__steps=300, data__test_fraction=0.1), *FAST,
                 "--role", "server", "--set", f"output.dir={tmp_path / 'out'}")
    line = srv.proc.stdout.readline()
    assert line.startswith("attach: tcp://127.0.0.1:")
    address = line.split()[1]
    assert (tmp_path / "out" / "address").read_text().strip() == address
    text = subprocess.run([sys.executable, LAUNCH, "--status", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=30).stdout                 # the run folder names the server
    assert "waiting for 2 of 2 workers to join" in text
    workers = launch("--attach", address, "--workers", "2")
    assert workers.wait()[0] == 0
    code, out, err = srv.wait()
    assert code == 0, err
    s = summary(tmp_path / "out")
    assert s["steps"] == 300 and s["test_rows"] == 2000 and s["test_metric"] > 0.9
    workers.assert_no_leftovers()
    srv.assert_no_leftovers()
    assert not shm_of(workers.proc.pid)


def test_uneven_shards_finish_under_bsp(tmp_path):
    # 3 shards for 2 workers: one worker reads two thirds of the rows; 10001 rows do not divide evenly
    r = psrv.train(None, ["data.n=10001", "data.shards=3", "train.workers=2", "train.epochs=2",
                          "train.batch_size=100", f"output.dir={tmp_path}", "output.plot=false"])
    s = r.summary
    assert s["stopped_by"] == "epochs" and s["rows_visited"] == {"0": 10001, "1": 10001}


def test_dynamic_schedule_gives_a_slow_worker_fewer_batches(tmp_path):
    with faults.injected(slow_worker=1, slow_ms=20):
        r = psrv.train(None, ["data.n=20000", "train.workers=2", "train.schedule=dynamic", "train.consistency=asp",
                              "train.epochs=1", "train.batch_size=100", faults.OVERRIDE, f"output.dir={tmp_path}",
                              "output.plot=false"])
    s = r.summary
    assert s["rows_visited"] == {"0": 20000} and s["stopped_by"] == "epochs"   # every row once, whoever read it
    fast, slow = s["pushes_applied"]["0"], s["pushes_applied"]["1"]
    assert fast + slow == 200 and slow < fast / 2                              # the fast worker took the most


def test_no_server_means_a_clear_worker_error(launch, tmp_path):
    # attaching to nothing: the workers give up after worker.server_timeout_s, naming the address
    la = launch("--attach", "tcp://127.0.0.1:9", "--workers", "1", "--set", "worker.server_timeout_s=1")
    code, out, err = la.wait(timeout_s=60)
    assert code == 1 and "tcp://127.0.0.1:9" in err
    la.assert_no_leftovers()
    assert not tagged_pids(la.tag)


def test_attached_workers_exit_with_a_clear_error_when_the_server_is_gone(launch, tmp_path):
    srv = launch(*DATA, *args(train__workers=1, train__steps=10**9), *FAST, "--role", "server",
                 "--set", f"output.dir={tmp_path / 'out'}")
    address = srv.proc.stdout.readline().split()[1]
    workers = launch("--attach", address, "--workers", "1", "--set", "worker.server_timeout_s=2")
    reach_step(address, 50)
    srv.proc.kill()                  # the launcher and, with it, its server: nobody restarts it
    code, out, err = workers.wait(timeout_s=60)
    assert code == 1
    assert re.search(rf"no word from the server at {re.escape(address)} for [\d.]+ s", err)
    workers.assert_no_leftovers()
    srv.assert_no_leftovers(timeout_s=20)
