"""The live view and the progress line's percent and ETA: the pure functions behind them, the HTTP server in-process
with a stand-in for the server's status, and a real run looked at during the run with urllib and headless Chromium."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from psrv import livestate
from psrv.launch import Progress
from psrv.liveview import LiveView
from workers import faults

from .conftest import FAST, ROOT, Launch, sets, shm_of, tagged_pids, tcp_listeners, wait_for

ARTIFACTS = ROOT / "tests" / "artifacts"   # git-ignored: the Chromium screenshot is kept here


# ---------------------------------------------------------------------------------------------- percent and ETA
def test_steps_rule_extrapolates_the_rate_so_far():
    assert livestate.completion(250, 1000, 0.0, 0, 10.0, 0.0) == pytest.approx((0.25, 30.0))


def test_epochs_rule_uses_the_epochs_read():
    assert livestate.completion(77, 0, 1.5, 3, 20.0, 0.0) == pytest.approx((0.5, 20.0))


def test_the_rule_that_ends_the_run_first_applies():
    # steps would take 495 s more, the wall limit ends it in 15 s
    assert livestate.completion(10, 1000, 0.0, 0, 5.0, 20.0) == pytest.approx((0.25, 15.0))
    # steps end it in 1 s, long before the wall limit
    assert livestate.completion(900, 1000, 0.0, 0, 9.0, 100.0) == pytest.approx((0.9, 1.0))
    # epochs first
    assert livestate.completion(100, 10_000, 0.8, 1, 8.0, 0.0) == pytest.approx((0.8, 2.0))


def test_unknown_when_only_tol_applies_or_nothing_is_done_yet():
    assert livestate.completion(5, 0, 0.0, 0, 3.0, 0.0) == (None, None)
    assert livestate.completion(0, 100, 0.0, 0, 0.0, 0.0) == (0.0, None)
    f, eta = livestate.completion(0, 100, 0.0, 0, 0.0, 0.0)
    assert (livestate.format_percent(f), livestate.format_eta(eta)) == ("0%", "?")
    assert livestate.format_percent(None) == "?"


def test_past_the_end_is_clamped():
    assert livestate.completion(1200, 1000, 0.0, 0, 12.0, 0.0) == pytest.approx((1.0, 0.0))
    assert livestate.completion(3, 1000, 0.0, 0, 25.0, 20.0) == pytest.approx((1.0, 0.0))


def test_format_eta():
    assert [livestate.format_eta(s) for s in (None, 0.4, 12.4, 59.6, 185, 3600, 7385)] == \
        ["?", "0 s", "12 s", "1:00", "3:05", "1:00:00", "2:03:05"]


def test_progress_line_shows_percent_and_eta():
    out = io.StringIO()
    bar = Progress(out, max_wall_s=10.0)
    bar.last_s = float("-inf")
    bar.update({"step": 40, "steps": 1000, "loss": 0.5, "elapsed_s": 4.0, "samples_per_s": 100.0})
    line = out.getvalue()
    # steps would need 96 s more; the wall limit ends the run in 6 s
    assert line.endswith("  40%  ETA 6 s\n") and "step      40/1000" in line


def test_progress_line_under_epochs_with_an_event_of_an_older_server():
    out = io.StringIO()
    bar = Progress(out, epochs=2)
    bar.last_s = float("-inf")
    bar.update({"step": 40, "steps": 0, "loss": 0.5, "elapsed_s": 4.0, "samples_per_s": 100.0})  # no epochs_read
    assert out.getvalue().endswith("   0%  ETA ?\n")


# ---------------------------------------------------------------------------------------------- curves and state
def _write(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


def test_curves_follow_metrics_jsonl_as_it_grows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    c = livestate.Curves(str(path))
    c.read()   # not there yet
    assert c.train.points() == []
    _write(path, '{"step": 10, "loss": 2.0, "elapsed_s": 0.1}\n{"step": 20, "loss": 1.5, "el')
    c.read()
    assert c.train.points() == [[10, 2.0]]   # the partial line waits for its end
    _write(path, 'apsed_s": 0.2}\n{"step": 20, "elapsed_s": 0.2, "test_loss": 1.7, "test_metric": 0.4, '
                 '"metric": "r2"}\n{"step": 20, "loss": 1.4, "full": true, "metric": "r2"}\n')
    c.read()
    assert c.train.points() == [[10, 2.0], [20, 1.5]]   # the full pass is not a mini-batch point
    assert c.test.points() == [[20, 1.7, 0.4]] and c.metric == "r2"
    path.write_text('{"step": 5, "loss": 9.0}\n')   # a new file in the folder: start over
    c.read()
    assert c.train.points() == [[5, 9.0]]


def test_curves_stay_bounded(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(f'{{"step": {s}, "loss": {1.0 / s}}}\n' for s in range(1, 5001)))
    c = livestate.Curves(str(path), cap=100)
    c.read()
    pts = c.train.points()
    assert len(pts) <= 101 and pts[0] == [1, 1.0] and pts[-1] == [5000, 1 / 5000]


STATUS = {"step": 7, "stopping": "", "consistency": "bsp", "workers_live": 1, "workers_total": 2, "deaths": 1,
          "worker_restarts": 1, "server_restarts": 0, "straggles": 0, "bad_messages": 0, "quarantined": [1],
          "rejected": {}, "workers": [
              {"wid": 0, "inc": 1, "pid": 11, "host": "<b>h</b>", "clock": 7, "last_seen_s": 0.1, "push_rate": 3.5,
               "staleness": 0, "alive": True, "finished": False, "pushes": 7, "shards": [0, 1], "ready": True},
              {"wid": 1, "inc": 2, "pid": 12, "host": "h", "clock": 3, "last_seen_s": 4.0, "push_rate": 0.0,
               "staleness": 1, "alive": False, "finished": False, "pushes": 3, "shards": [], "ready": True}]}


def test_state_joins_progress_status_curves_and_events(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 1.0}\n')
    c = livestate.Curves(str(path))
    c.read()
    ev = {"step": 50, "steps": 200, "loss": float("nan"), "elapsed_s": 5.0, "samples_per_s": 800.0}
    events = [["00:00:%02d" % i, f"warning {i}"] for i in range(livestate.EVENTS_KEPT + 5)]
    s = livestate.state(ev, STATUS, "", c, events, 0, 0.0, "runs/x")
    json.dumps(s, allow_nan=False)   # strict JSON: the NaN loss went out as null
    assert s["loss"] is None and s["step"] == 50 and s["steps"] == 200
    assert (s["fraction"], s["percent"], s["eta_s"], s["eta"]) == (0.25, "25%", 15.0, "15 s")
    assert s["server"] == "ok" and [w["wid"] for w in s["workers"]] == [0, 1]
    assert s["workers"][0]["shards"] == [0, 1] and "ready" not in s["workers"][0]
    assert s["counters"]["deaths"] == 1 and s["counters"]["quarantined"] == [1]
    assert s["train"] == [[5, 1.0]] and s["test"] == []
    assert len(s["events"]) == livestate.EVENTS_KEPT and s["events"][-1][1] == f"warning {livestate.EVENTS_KEPT + 4}"


def test_state_before_any_progress_and_without_a_status_reply(tmp_path):
    s = livestate.state(None, None, "no status reply: timeout", livestate.Curves(str(tmp_path / "m")), [], 0, 0.0,
                        "d")
    assert s["step"] is None and s["percent"] == "?" and s["eta"] == "?"
    assert s["server"] == "no status reply: timeout" and s["workers"] == [] and s["counters"] == {}


# ---------------------------------------------------------------------------------------------- the HTTP server
def _get(url: str, host: str | None = None, method: str = "GET", timeout_s: float = 10.0):
    req = urllib.request.Request(url, method=method, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class FakeServer:
    def __init__(self, fail: bool = False):
        self.calls, self.fail = 0, fail

    def __call__(self):
        self.calls += 1
        if self.fail:
            raise TimeoutError("no reply within 1 s")
        return STATUS


def test_view_serves_the_page_and_the_state_and_asks_the_server_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(LiveView, "STATUS_EVERY_S", 3600.0)   # so "at most once a period" does not hang on timing
    server = FakeServer()
    forwarded = []

    class Line:
        def update(self, ev):
            forwarded.append(ev)

    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "loss": 3.0}\n{"step": 20, "loss": 2.0}\n')
    with LiveView(str(tmp_path), server, port=0, forward=Line()) as view:
        assert view.url == f"http://127.0.0.1:{view.port}/"
        assert view.httpd.server_address[0] == "127.0.0.1"
        code, headers, body = _get(view.url)
        assert code == 200 and headers["Content-Type"].startswith("text/html")
        assert b"/api/state" in body and b"innerHTML" not in body
        assert re.findall(rb"https?://[^\"' ]+", body) == [b"http://www.w3.org/2000/svg"]   # a name, not a fetch
        assert server.calls == 0   # the page alone asks the server nothing
        view.update({"step": 30, "steps": 60, "loss": 1.0, "elapsed_s": 3.0, "samples_per_s": 10.0})
        assert forwarded and forwarded[-1]["step"] == 30   # the progress line still gets every event
        logging.getLogger("psrv.cluster").warning("worker 1 (pid 9) killed by SIGKILL; restarting it (1 of 2)")
        states = [json.loads(_get(view.url + "api/state")[2]) for _ in range(3)]
        assert server.calls == 1   # three requests within the period: one status request
        s = states[-1]
        assert s["step"] == 30 and s["percent"] == "50%" and s["eta"] == "3 s"
        assert s["train"] == [[10, 3.0], [20, 2.0]] and [w["wid"] for w in s["workers"]] == [0, 1]
        assert s["events"][-1][1].startswith("worker 1 (pid 9) killed by SIGKILL")
        port = view.port
    # after the block: the thread is gone, the port closed, the warnings no longer collected
    assert not view.thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert all(not isinstance(h, type(view._warnings)) for h in logging.getLogger("psrv").handlers)


def test_view_refuses_other_hosts_paths_and_methods_without_echoing_them(tmp_path):
    with LiveView(str(tmp_path), FakeServer(), port=0) as view:
        code, _, body = _get(view.url + "api/state", host="evil.example:80")
        assert code == 403 and b"evil" not in body
        code, _, body = _get(view.url + "<script>alert(1)</script>")
        assert code == 404 and b"script" not in body
        assert _get(view.url + "api/state", method="POST")[0] == 501
        assert _get(f"http://localhost:{view.port}/api/state")[0] == 200


def test_view_says_when_the_server_does_not_answer(tmp_path):
    with LiveView(str(tmp_path), FakeServer(fail=True), port=0) as view:
        code, _, body = _get(view.url + "api/state")
    s = json.loads(body)
    assert code == 200 and s["server"] == "no status reply: no reply within 1 s" and s["workers"] == []


def test_an_idle_connection_does_not_hold_the_view_open(tmp_path):
    view = LiveView(str(tmp_path), FakeServer(), port=0)
    idle = socket.create_connection(("127.0.0.1", view.port), timeout=5)   # connects, never sends a request
    try:
        # accepted: its handler thread waits for a request (socketserver keeps the threads that close() joins)
        wait_for(lambda: [t for t in vars(view.httpd).get("_threads", []) if t.is_alive()], 10, what="the handler thread")
        handler = view.httpd._threads[0]
        closing = threading.Thread(target=view.close)
        closing.start()
        closing.join(60)   # the handler gives up after its timeout, and close() returns
        assert not closing.is_alive() and not view.thread.is_alive() and not handler.is_alive()
        assert idle.recv(1) == b""   # the server closed the idle connection
    finally:
        idle.close()


def test_a_taken_port_is_an_os_error(tmp_path):
    with LiveView(str(tmp_path), FakeServer(), port=0) as view:
        with pytest.raises(OSError):
            LiveView(str(tmp_path), FakeServer(), port=view.port)


# ---------------------------------------------------------------------------------------------- a real run
class Run(Launch):
    """launch.py with the live view, its stdout read line by line as the run goes (the address is printed there).
    Worker 0 holds the run before its push of step HOLD_AT_STEP for as long as the file `hold` exists
    (workers/faults.py): the tests that look at the live run cannot find it over, however long a browser takes to
    start on a loaded machine; the last test removes it and the run ends normally."""
    HOLD_AT_STEP = 400   # each gradient sleeps 20 ms: the tests that watch the steps advance have 8 s before it

    def __init__(self, tmp_path: Path):
        self.hold = tmp_path / "hold"
        self.hold.touch()
        env = {"PYTHONPATH": str(ROOT), "PSRV_TEST_GRAD_S": "0.02",
               **faults.env(hold_worker=0, hold_at_step=self.HOLD_AT_STEP, hold_file=str(self.hold))}
        # no progress deadline: it would leave the held worker behind, and the run would go on without it
        super().__init__([*FAST, "--workers", "2",
                          *sets(data__n=2000, data__d=5, train__steps=600, train__log_every=5, data__test_fraction=0.2,
                                train__eval_every=50, model__kind="tests.slow_model:SlowSteps",
                                server__progress_deadline_s=0, worker__entry=faults.ENTRY)], tmp_path, env)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()
        found = wait_for(lambda: [m for line in list(self.lines) if (m := re.match(r"live view: (\S+)$", line))],
                         60, what="the live view's address on stdout")
        self.url = found[0].group(1)

    def state(self) -> dict:
        return json.loads(_get(self.url + "api/state")[2])

    def finish(self, timeout_s: float = 120.0) -> tuple[int, str]:
        self.hold.unlink(missing_ok=True)
        try:
            self.proc.wait(timeout_s)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            err = self.proc.stderr.read()
            self.reader.join(10)
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = Run(tmp_path_factory.mktemp("liveview"))
    yield r
    r.kill()


@pytest.mark.slow
def test_a_run_serves_its_live_state(run):
    assert run.url.startswith("http://127.0.0.1:")
    assert tcp_listeners(_port(run.url)) == ["0100007F"]   # the kernel's view: loopback only
    code, _, page = _get(run.url)
    assert code == 200 and b"psrv live view" in page
    # the status part may be up to a second older than the step (asked at most once a second): wait for the
    # status that has both workers in it
    first = wait_for(lambda: (s := run.state())["step"] and len(s["workers"]) == 2 and s["train"] and s, 60,
                     what="a state with a step, both workers and a loss curve")
    assert first["server"] == "ok" and first["steps"] == 600
    assert sorted(w["wid"] for w in first["workers"]) == [0, 1]
    assert all(w["alive"] and len(w["shards"]) == 1 for w in first["workers"])
    assert 0 < first["fraction"] < 1 and first["percent"].endswith("%") and first["eta"] != "?"
    later = wait_for(lambda: (s := run.state())["step"] > first["step"] and s, 60, what="the step to advance")
    assert later["fraction"] > first["fraction"] and later["train"][-1][0] >= first["train"][-1][0]
    assert all(math.isfinite(p[1]) for p in later["train"])
    # a fault shows among the events: worker 1 killed, the launcher restarts it and the page says so
    os.kill(next(w["pid"] for w in later["workers"] if w["wid"] == 1), signal.SIGKILL)
    told = wait_for(lambda: [e for e in run.state()["events"] if "worker 1" in e[1] and "restarting it" in e[1]],
                    60, what="the restart among the page's events")
    assert "killed by SIGKILL" in told[0][1]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].strip("/"))


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="no chromium binary on PATH (Debian: apt-get install chromium; "
                                                ".ci/run installs it when it runs as root)")
def test_headless_chromium_shows_the_run_while_it_goes(run, tmp_path):
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
               "--virtual-time-budget=3000", "--window-size=1000,1300"]
    before = wait_for(lambda: (s := run.state())["step"] and len(s["workers"]) == 2 and s["train"] and s, 60,
                      what="the run to take steps with both workers")
    dom = subprocess.run([*browser, "--dump-dom", run.url], capture_output=True, text=True, timeout=120).stdout
    after = run.state()
    # what the page drew, after its script ran: the loss curve, a row per worker, the step the run was at
    curve = re.search(r'<path id="train-curve"[^>]* d="([^"]+)"[^>]*data-points="(\d+)"', dom)
    assert curve, dom[-3000:]
    assert int(curve.group(2)) >= 1 and curve.group(1).startswith("M")
    assert sorted(int(w) for w in re.findall(r'<tr data-wid="(\d+)"', dom)) == [0, 1]
    shown = int(re.search(r'<b id="step">(\d+)</b>', dom).group(1))
    assert before["step"] <= shown <= after["step"]
    assert re.search(r'<b id="percent">\d+%</b>', dom) and "/ 600" in dom
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "liveview.png"
    shot.unlink(missing_ok=True)
    subprocess.run([*browser, f"--screenshot={shot}", run.url], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    print(f"live view screenshot: {shot}")


@pytest.mark.slow
def test_the_run_ends_normally_and_closes_the_view(run):
    port = _port(run.url)
    code, err = run.finish()
    assert code == 0, err
    assert any(line.startswith("done (steps): 600 steps") for line in run.lines)
    assert any(re.search(r" \d+%  ETA ", line) for line in run.lines)   # the progress line's percent and ETA
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    wait_for(lambda: not tagged_pids(run.tag), 15, what="every process of the run to exit")
    assert not shm_of(run.proc.pid)
