"""Shared test helpers: run the CLI as a real process, wait on conditions (never sleep blindly), find leftovers."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = str(ROOT / "launch.py")


def wait_for(cond, timeout_s: float = 30.0, interval_s: float = 0.05, what: str = "condition"):
    """Poll cond() until it returns something truthy; fail the test (never hang) after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


# fast fault detection for process tests, so that each takes seconds
FAST = ["--set", "server.heartbeat_timeout_s=1.5", "--set", "worker.heartbeat_interval_s=0.2"]


def sets(**kv) -> list[str]:
    """--set arguments from keyword arguments: train__steps=5 -> ["--set", "train.steps=5"]."""
    out = []
    for k, v in kv.items():
        out += ["--set", f"{k.replace('__', '.')}={v}"]
    return out


def address_of(out) -> str:
    """The address a run writes into its output folder, once it has."""
    path = out / "address"
    return wait_for(lambda: path.exists() and path.read_text().strip(), 60, what="the server's address")


def tcp_listeners(port: int) -> list[str]:
    """The kernel's own view: local addresses (hex, as /proc/net/tcp writes them: 0100007F is 127.0.0.1) of the
    IPv4 sockets listening on `port`."""
    with open("/proc/net/tcp") as fh:
        listening = [ln.split()[1] for ln in fh.readlines()[1:] if ln.split()[3] == "0A"]
    return [x.split(":")[0] for x in listening if x.endswith(f":{port:04X}")]


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries PSRV_TEST_TAG=tag: a launcher and every child it started."""
    needle = f"PSRV_TEST_TAG={tag}".encode()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    with open(f"/proc/{d}/stat") as st:
                        if st.read().split(")")[-1].split()[0] != "Z":
                            out.append(int(d))
        except OSError:
            pass
    return out


def shm_of(pid: int) -> list[str]:
    """Shared-memory segments created by the launcher with this pid (names start psrv_<pid>_)."""
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"psrv_{pid}_")]


NO_PLOT = ["--set", "output.plot=false"]


class Launch:
    """launch.py as a subprocess, tagged so that its children can be found afterwards. Its runs write no loss.png
    unless the test sets output.plot itself: the figure costs a run about a second of CPU at its end (matplotlib's
    import and layout), and the tests that look at it (tests/test_training.py, tests/test_packaging.py) ask."""

    def __init__(self, args, tmp_path: Path, env=None, prefix=(), as_given: bool = False):
        """prefix: a command that runs the launcher, e.g. in a network namespace (`ip netns exec NS`: it execs
        in the same process, so the launcher's pid, which its shared-memory names carry, is still proc.pid).
        as_given: exactly these arguments (output.plot=false is not added)."""
        if not as_given and args[:1] != ["predict"] and not any("output.plot" in a for a in args):
            args = [*args, *NO_PLOT]
        self.tag = uuid.uuid4().hex
        e = {**os.environ, "PSRV_TEST_TAG": self.tag, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.out = tmp_path / "out"
        self.proc = subprocess.Popen([*prefix, sys.executable, LAUNCH, *args], cwd=tmp_path, env=e,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait(self, timeout_s: float = 120.0):
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"launch.py did not finish in {timeout_s} s\nstdout:\n{out}\nstderr:\n{err}")
        return self.proc.returncode, out, err

    def kill(self) -> None:
        """Whatever the test did, leave nothing running: the launcher and every child it started."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in tagged_pids(self.tag):
            try:
                os.kill(pid, 9)
            except OSError:
                pass

    def assert_no_leftovers(self, timeout_s: float = 15.0):
        wait_for(lambda: not tagged_pids(self.tag), timeout_s, what="every process of the run to exit")
        wait_for(lambda: not shm_of(self.proc.pid), timeout_s, what="the run's shared memory to be unlinked")


@pytest.fixture
def launch(tmp_path):
    started = []

    def start(*args, env=None, as_given=False):
        la = Launch([str(a) for a in args], tmp_path, env, as_given=as_given)
        started.append(la)
        return la

    yield start
    for la in started:
        la.kill()


def curve_server(launch, tmp_path, steps: int):
    """A --role server for one worker that requires CURVE keys (tmp_path/keys), and a second key folder it does not
    allow (tmp_path/other). Returns (keys, other, the server's Launch, its address)."""
    keys, other = tmp_path / "keys", tmp_path / "other"
    for d in (keys, other):
        subprocess.run([sys.executable, LAUNCH, "--keygen", str(d)], check=True, capture_output=True, timeout=60)
    srv = launch("--role", "server", "--set", f"server.keys={keys}", "--set", "train.workers=1",
                 "--set", "data.n=2000", "--set", f"train.steps={steps}", "--set", f"output.dir={tmp_path / 'out'}")
    return keys, other, srv, srv.proc.stdout.readline().split()[1]


@pytest.fixture
def made():
    """Data blocks a test built (build() appends them): closed and unlinked after it."""
    made = []
    yield made
    for b in made:
        b.close()
        b.unlink()


def build(c, k, made, tag: str = "t"):
    """data.build() of config c into k shards, the block kept in `made` for cleanup."""
    from psrv import blocks, data
    b, layout = data.build(c, k, blocks.run_prefix() + tag)
    made.append(b)
    return b, layout
