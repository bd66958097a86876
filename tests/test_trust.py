"""No local peer can break a run (issue 11), with real processes: a push far outside what the run has seen is
refused and the run goes on; a run that diverges by itself stops with a plain message; a peer that only sends
heartbeats, or holds a batch and never pushes, does not hold a BSP run beyond the progress deadline; a resume of
another job is refused naming the key; a full disk names the file. Every wait is on a condition with a deadline."""
import json
import os
import re

import numpy as np
import pytest

from psrv.launch import status
from workers import faults
from workers.client import Client

from .conftest import FAST, ROOT, address_of, sets, wait_for

pytestmark = pytest.mark.slow





def step_of(address):
    return status(address, timeout_s=10)["step"]


def strict_json_lines(path):
    """Every line of a .jsonl file parses as strict JSON (no Infinity, no NaN)."""
    def refuse(c):
        raise AssertionError(f"{path}: {c} is not JSON")
    with open(path) as fh:
        return [json.loads(line, parse_constant=refuse) for line in fh]


# ---------------------------------------------------------------------------------------------------- finding 1
def test_a_push_of_1e300_is_refused_and_the_run_finishes_normally(launch, tmp_path):
    out = tmp_path / "out"
    # 1000 steps: under BSP the run cannot end while the peer below holds a step, and the loss is at its floor
    # (the noise's variance, 0.25) well before. The 1000 steps take about half a second, so until the peer is in,
    # worker 0 holds the run before its push of step 60 (workers/faults.py; no progress deadline, which would
    # leave it behind): however slow the test, the peer joins a live run past the guard's warm-up
    hold = tmp_path / "hold"
    hold.touch()
    la = launch(*sets(data__n=20000, data__d=10, data__shards=4, train__workers=2, train__steps=1000,
                      train__batch_size=32, server__progress_deadline_s=0, worker__entry=faults.ENTRY), *FAST,
                "--set", f"output.dir={out}", env=faults.env(hold_worker=0, hold_at_step=60, hold_file=str(hold)))
    address = address_of(out)
    wait_for(lambda: step_of(address) >= 50, 60, what="step 50 (past the guard's warm-up)")
    peer = Client(address, timeout_s=10)        # a peer on loopback, speaking the protocol
    try:
        welcome = peer.hello(-1, local=False)
        shape, dtype = tuple(welcome["theta_shape"]), np.dtype(welcome["theta_dtype"])
        h, _ = peer.pull(0)
        assert h["op"] == "theta"
        hold.unlink()                           # the peer holds the run now
        # one finite gradient of 1e300 (its norm overflows), then one "merely" 1e10 times too big
        for value in (1e300, 1e10):
            ack, _ = peer.push(h["clock"], np.full(shape, value, dtype), 0.5, h["batch"][3], h["version"],
                               pull=False)
            assert (ack["applied"], ack["reason"]) == (False, "outlier"), ack
            h, _ = peer.pull(h["clock"] + 1)
            assert h["op"] == "theta"
        peer.bye()
    finally:
        peer.close()
    code, stdout, err = la.wait()
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 1000 and s["rejected"] == {"outlier": 2} and s["quarantined"] == []
    theta = np.load(out / "theta.npy")
    assert np.isfinite(theta).all() and np.abs(theta).max() < 100 and s["final_loss"] < 1.0
    assert re.search(r"worker \d+ pushed a gradient of norm inf (\(bound [\d.e+]+\) )?at clock \d+; refused "
                     r"\(outlier, 1 in a row\)", err)
    la.assert_no_leftovers()


def test_a_run_that_diverges_by_itself_stops_with_a_plain_message(launch, tmp_path):
    out = tmp_path / "out"
    la = launch("-q", "--set", "train.lr=5", "--set", f"output.dir={out}")     # the default job, lr far too high
    code, stdout, err = la.wait()
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert re.match(r"psrv: run failed: server: loss diverged at step \d+ with lr = 5; lower train\.lr \(", last), err
    assert "bad_field" not in err and "plausible" not in err
    lines = strict_json_lines(out / "metrics.jsonl")
    assert all(np.isfinite(ln["loss"]) for ln in lines if "loss" in ln)
    la.assert_no_leftovers()


# ---------------------------------------------------------------------------------------------------- finding 3
def test_a_heartbeat_only_peer_and_a_stalled_peer_do_not_hold_bsp(launch, tmp_path):
    out = tmp_path / "out"
    la = launch(*sets(data__n=20000, data__d=10, data__shards=4, train__workers=2, train__steps=10**9,
                      train__max_wall_s=8, server__progress_deadline_s=1), *FAST,
                "--set", f"output.dir={out}")
    address = address_of(out)
    wait_for(lambda: step_of(address) >= 20, 60, what="training to start")
    # the waits below take about 2.5 s of the run's 8 (train.max_wall_s) on a machine with five times more runnable
    # processes than cores
    idle, stalled = Client(address, timeout_s=10), Client(address, timeout_s=10)
    try:
        idle.hello(-1, local=False)              # and from now on only its heartbeat thread speaks
        s0 = step_of(address)
        wait_for(lambda: step_of(address) >= s0 + 200, 15, what="BSP to go on past a peer that only heartbeats")
        stalled.hello(-1, local=False)
        h, _ = stalled.pull(0)                   # it holds a batch, and the barrier, and never pushes
        assert h["op"] == "theta"
        s1 = step_of(address)
        # held at most the deadline (1 s; 10 x the median step is less), then the others go on without it
        wait_for(lambda: step_of(address) >= s1 + 200, 15, what="BSP to go on past a peer that never pushes")
        st = status(address, timeout_s=10)
        assert st["straggles"] == 1
        peers = {w["wid"]: w for w in st["workers"]}
        assert peers[idle.wid]["alive"] and not peers[idle.wid]["ready"]
        assert peers[stalled.wid]["alive"] and not peers[stalled.wid]["ready"]
        # the run ends on time without waiting for either of them (they never stop talking)
        code, stdout, err = la.wait(timeout_s=120)
    finally:
        idle.close()
        stalled.close()
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["stopped_by"] == "max_wall_s" and s["straggles"] == 1
    assert re.search(rf"worker {stalled.wid} \(pid \d+ on \S+\) made no progress for [\d.]+ s \(deadline [\d.]+ s\)",
                     err)
    la.assert_no_leftovers()


# ---------------------------------------------------------------------------------------------------- finding 8
def _trained(launch, out, *extra):
    la = launch(*sets(data__source=ROOT / "tests" / "data" / "breast_cancer.csv", train__workers=2,
                      train__steps=200, train__batch_size=16), *extra, "--set", f"output.dir={out}")
    code, _, err = la.wait()
    assert code == 0, err
    return la


def test_resume_with_other_shards_is_refused_with_that_error_alone(launch, tmp_path):
    """3 workers' shards resumed with 2 workers (data.shards follows them): refused, exit 2, with the error and
    no noise from the refusing server's shared memory as its process exits (it once printed a BufferError
    traceback, its segments collected while numpy views of them were alive)."""
    out = tmp_path / "out"
    la = launch(*sets(train__workers=3, train__steps=50, data__n=3000), "--set", f"output.dir={out}")
    assert la.wait()[0] == 0
    la = launch(*sets(train__workers=2, train__steps=100, data__n=3000), "--resume", str(out))
    code, _, err = la.wait()
    assert code == 2 and "data.shards was" in err and "cannot be resumed" in err, err
    assert "Exception ignored" not in err and "BufferError" not in err, err
    la.assert_no_leftovers()


def test_resume_with_another_model_kind_is_refused_naming_model_kind(launch, tmp_path):
    out = tmp_path / "out"
    _trained(launch, out)
    again = sets(data__source=ROOT / "tests" / "data" / "breast_cancer.csv", train__workers=2, train__steps=400,
                 train__batch_size=16)
    la = launch(*again, "--set", "model.kind=logistic", "--resume", str(out))
    code, _, err = la.wait()
    assert code == 2
    assert "model.kind was 'linear', now 'logistic'" in err and "--force" in err and str(out) in err
    la.assert_no_leftovers()
    # the deliberate change: theta carries over
    la = launch(*again, "--set", "model.kind=logistic", "--force", "--resume", str(out), "-v")
    code, _, err = la.wait()
    assert code == 0, err
    assert "resuming" in err and "as another job (checkpoint.resume_force): model.kind was 'linear'" in err
    s = json.loads((out / "summary.json").read_text())
    assert s["model"] == "logistic" and s["steps"] == 400 and s["resumed_from"]
    la.assert_no_leftovers()


def test_resume_of_another_job_is_a_config_error_exit_2(launch, tmp_path):
    # the server reports the refusal as an error of kind "config"; psrv/cluster.py raises ConfigError for it
    out = tmp_path / "out"
    _trained(launch, out)
    la = launch(*sets(data__source=ROOT / "tests" / "data" / "breast_cancer.csv", train__workers=2,
                      train__consistency="asp"), "--resume", str(out))
    code, _, err = la.wait()
    assert code == 2 and "train.consistency was 'bsp', now 'asp'" in err, err


# ---------------------------------------------------------------------------------------------------- finding 9
def test_a_full_disk_names_the_file(launch, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.symlink("/dev/full", out / "metrics.jsonl")   # every write there fails with ENOSPC
    la = launch(*sets(data__n=4000, data__d=5, train__workers=2, train__steps=100), "--set", f"output.dir={out}")
    code, _, err = la.wait()
    assert code == 1
    assert f"cannot write the metrics {out / 'metrics.jsonl'}: No space left on device" in err, err
    la.assert_no_leftovers()


def test_a_hello_with_the_highest_worker_id_does_not_block_later_attaches(launch, tmp_path):
    """Finding 6: one hello asking for id 2^20 - 1 must not exhaust the ids the server hands out to --attach."""
    from psrv.membership import MAX_WID
    out = tmp_path / "out"
    srv = launch(*sets(data__n=4000, data__d=5, train__workers=1, train__steps=200), *FAST, "--role", "server",
                 "--set", f"output.dir={out}")
    address = srv.proc.stdout.readline().split()[1]
    squatter = Client(address, timeout_s=10)
    try:
        assert squatter.hello(MAX_WID - 1, local=False)["wid"] == MAX_WID - 1
    finally:
        squatter.close()
    workers = launch("--attach", address, "--workers", "1")
    assert workers.wait()[0] == 0
    code, _, err = srv.wait()
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 200 and "1" in s["pushes_applied"]     # the attached worker got id 1 and trained
    workers.assert_no_leftovers()
    srv.assert_no_leftovers()


def test_a_long_run_keeps_its_status_summary_and_checkpoint_small(launch, tmp_path):
    """Finding 5: thousands of epochs on a tiny shard; what the server reports and saves does not grow with them."""
    from psrv import protocol
    import msgpack
    out = tmp_path / "out"
    la = launch(*sets(data__n=16, data__d=3, data__test_fraction=0, train__workers=1, train__batch_size=8,
                      train__epochs=6000, train__log_every=1000, checkpoint__every_steps=4000), *FAST,
                "--set", f"output.dir={out}")
    address = address_of(out)
    wait_for(lambda: step_of(address) >= 4000, 120, what="4,000 steps (2,000 epochs)")
    st = status(address, timeout_s=10)
    assert len(msgpack.packb(st)) < 4096 < protocol.HEADER_MAX_BYTES and len(st["rows_visited"]) <= 8
    code, _, err = la.wait(timeout_s=180)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["stopped_by"] == "epochs" and len(s["rows_visited"]) <= 8
    assert sum(s["rows_visited"].values()) + s["rows_visited_before"] == 16 * 6000   # every row of every epoch
    assert (out / "summary.json").stat().st_size < 8192
    assert max(p.stat().st_size for p in (out / "checkpoints").iterdir()) < 16384
    la.assert_no_leftovers()
