"""The launcher as a user runs it: exit codes, messages, and nothing left behind whatever happens."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from psrv import proc
from workers import faults

from .conftest import LAUNCH, ROOT, shm_of, tagged_pids, wait_for

pytestmark = pytest.mark.slow

SMALL = ["--set", "data.n=4000", "--set", "train.workers=2"]


def test_normal_run_exits_0_and_leaves_nothing(launch, tmp_path):
    la = launch(*SMALL, "--set", "train.steps=50", "--set", f"output.dir={tmp_path / 'out'}")
    code, out, err = la.wait()
    assert code == 0, err
    assert "done (steps): 50 steps" in out and "final loss" in out
    la.assert_no_leftovers()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 50


def test_default_run_without_arguments(launch, tmp_path):
    la = launch("-q", as_given=True)
    code, out, err = la.wait()
    assert code == 0, err
    runs = list((tmp_path / "runs").iterdir())  # a fresh folder per run under the working directory
    assert len(runs) == 1 and (runs[0] / "theta.npy").exists()
    la.assert_no_leftovers()


def test_worker_that_raises_stops_the_run_with_exit_1(launch, tmp_path):
    la = launch(*SMALL, "--set", "train.steps=100000", "--set", faults.OVERRIDE,
                "--set", f"output.dir={tmp_path / 'out'}", env=faults.env(fail_worker=1, fail_at_step=5))
    code, out, err = la.wait(timeout_s=60)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("psrv: run failed: worker 1:") and "injected failure at step 5" in last
    la.assert_no_leftovers()


@pytest.mark.parametrize("entry,env,message", [
    (faults.ENTRY, {faults.ENV: "{fail_worker: 1}"}, "PSRV_FAULTS is not JSON"),
    ("workers.nowhere:main", {}, "cannot load entry 'workers.nowhere:main': ModuleNotFoundError"),
])
def test_a_worker_entry_that_cannot_start_stops_the_run_with_its_reason(launch, tmp_path, entry, env, message):
    # not a death to restart: every restart would fail the same way
    la = launch(*SMALL, "--set", f"worker.entry={entry}", "--set", f"output.dir={tmp_path / 'out'}", env=env)
    code, out, err = la.wait(timeout_s=60)
    assert code == 1 and message in err.strip().splitlines()[-1], err
    la.assert_no_leftovers()


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_signal_to_the_launcher_stops_everything(launch, tmp_path, sig, code):
    la = launch(*SMALL, "--set", "train.steps=1000000", "--set", f"output.dir={tmp_path / 'out'}")
    metrics = tmp_path / "out" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, 60, what="training to start")
    assert len(tagged_pids(la.tag)) >= 4          # launcher, server, 2 workers (and the resource tracker)
    la.proc.send_signal(sig)
    rc, out, err = la.wait(timeout_s=30)
    assert rc == code, err
    assert "children stopped, shared memory removed" in err
    la.assert_no_leftovers()


def test_children_exit_by_themselves_when_the_launcher_is_killed(launch, tmp_path):
    la = launch(*SMALL, "--set", "train.steps=1000000", "--set", f"output.dir={tmp_path / 'out'}")
    metrics = tmp_path / "out" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, 60, what="training to start")
    la.proc.kill()  # SIGKILL: the launcher gets no chance to clean up
    la.proc.wait()
    # the children die with their parent; the resource tracker, which outlives them, unlinks the memory
    la.assert_no_leftovers(timeout_s=20)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("make_args,needle", [
    (lambda t: [write(t, "c.toml", "[train]\nstepz = 3\n")], "unknown key 'train.stepz' (did you mean 'train.steps'?)"),
    (lambda t: [write(t, "c.toml", "[train]\nsteps = \"many\"\n")], "train.steps: expected an integer, got 'many'"),
    (lambda t: ["--set", "data.source=missing.npz"], "data.source: file not found: missing.npz"),
    (lambda t: ["--set", f"data.source={t / 'd.npz'}", "--set", "data.d=7"], "data.d = 7 but"),
    (lambda t: [str(t / "nope.toml")], "config file not found"),
    (lambda t: ["--set", "train.lr"], "expected section.key=value"),
    (lambda t: ["--set", "train.workers=-1"], "train.workers: must be >= 0"),
    (lambda t: ["--workers", "x"], "invalid int value"),
])
def test_config_errors_exit_2_with_one_line_naming_the_key(launch, tmp_path, make_args, needle):
    np.savez(tmp_path / "d.npz", X=np.zeros((10, 5)), y=np.zeros(10))
    la = launch(*make_args(tmp_path))
    code, out, err = la.wait(timeout_s=60)
    assert code == 2
    assert needle in err
    if "usage:" not in err:  # argparse prints usage first; our own errors are exactly one line
        assert len(err.strip().splitlines()) == 1
    la.assert_no_leftovers()


def test_script_without_main_guard_runs_once(tmp_path):
    # spawn re-imports the caller's main module in children unless told not to; a notebook-style script must work
    script = tmp_path / "s.py"
    script.write_text("import psrv\n"
                      f"r = psrv.train(None, ['data.n=2000', 'train.steps=20', 'train.workers=2', "
                      f"'output.dir={tmp_path / 'o'}'])\n"
                      "print('STEPS', r.summary['steps'])\n")
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("STEPS 20") == 1


def test_launch_py_help(launch):
    la = launch("--help")
    code, out, _ = la.wait()
    assert code == 0 and "--set SECTION.KEY=VALUE" in out and "--workers N" in out


def test_shm_helpers_see_a_live_run(launch, tmp_path):
    # guard against a leak check that passes because it looks in the wrong place
    la = launch(*SMALL, "--set", "train.steps=1000000", "--set", f"output.dir={tmp_path / 'out'}")
    wait_for(lambda: shm_of(la.proc.pid), 60, what="the run's shared memory to appear")
    la.proc.send_signal(signal.SIGINT)
    la.wait()
    la.assert_no_leftovers()


def test_children_are_pinned_with_one_blas_thread(launch, tmp_path):
    probe = proc.CoreClaim(len(proc.usable_cores()))
    held = probe.held_elsewhere
    probe.release()
    if held:  # a run pins only to cores no other live psrv run holds (tests/test_reliability_launcher.py)
        pytest.skip(f"another psrv run on this machine holds cores {held}")
    la = launch(*SMALL, "--set", "train.steps=1000000", "--set", f"output.dir={tmp_path / 'out'}")
    metrics = tmp_path / "out" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.stat().st_size > 0, 60, what="training to start")
    cores = sorted(os.sched_getaffinity(0))
    children = []
    for pid in tagged_pids(la.tag):
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read()
        if b"spawn_main" in cmd:                        # server and workers, not the resource tracker
            children.append(pid)
            allowed = os.sched_getaffinity(pid)
            assert len(allowed) == 1 and allowed <= set(cores)
            with open(f"/proc/{pid}/environ", "rb") as fh:
                assert b"OPENBLAS_NUM_THREADS=1" in fh.read().split(b"\0")
    assert len(children) == 3
    # round-robin: the two workers and the server cover every usable core
    assert set().union(*(os.sched_getaffinity(p) for p in children)) == set(cores[:3])
    la.proc.send_signal(signal.SIGINT)
    la.wait()
    la.assert_no_leftovers()
