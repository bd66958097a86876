"""The live view: a read-only web page about the run, served by the launcher on loopback while the run lasts.

A standard-library HTTP server in a thread of the launcher (ThreadingHTTPServer), bound to 127.0.0.1 only, GET only.
The page is one HTML string with a small inline script that asks /api/state once a second and draws the curves as
inline SVG: nothing is fetched from anywhere else. The state comes from what the launcher already has (its
newest progress event, metrics.jsonl in the run folder, its own warnings) plus the server's status reply (the same
request as `--status`), asked at most once a second and only while a page asks: the server does no more work when
nobody looks. Leaving the `with` block stops the thread and closes the port.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from . import livestate

log = logging.getLogger("psrv")



SHUTDOWN_POLL_S = 0.02

class LiveView:
    STATUS_EVERY_S = 1.0    # the most often the server is asked for its status, however many pages are open
    STATUS_TIMEOUT_S = 1.0  # a server that does not answer (restarting, writing its outputs) holds a page this long

    def __init__(self, out_dir: str, poll_status, epochs: int = 0, max_wall_s: float = 0.0, port: int = 0,
                 forward=None):
        """poll_status(): the server's status reply (raises when it gets none). forward: the progress line, which
        gets every progress event the view gets (None: no line)."""
        self.out_dir, self.poll_status, self.forward = out_dir, poll_status, forward
        self.epochs, self.max_wall_s = epochs, max_wall_s
        self.curves = livestate.Curves(os.path.join(out_dir, "metrics.jsonl"))
        self.last_ev: dict | None = None
        self.events: deque = deque(maxlen=livestate.EVENTS_KEPT)
        self._events_lock = threading.Lock()
        self._lock = threading.Lock()        # one reader of the status and the curves at a time
        self._status: dict | None = None
        self._status_error = ""
        self._status_at = float("-inf")
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _Handler)   # OSError: the port is taken
        self.httpd.daemon_threads = False   # so that closing joins every handler thread: none outlives the run
        self.httpd.view = self
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/"
        self._warnings = _Warnings(self)
        logging.getLogger("psrv").addHandler(self._warnings)
        # the serving loop checks for shutdown this often: closing (at every run's end) waits up to this long
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": SHUTDOWN_POLL_S},
                                       name="psrv-live-view", daemon=True)
        self.thread.start()

    # the launcher's side
    def update(self, ev: dict) -> None:
        """A progress event from the server (through the launcher's pipe)."""
        self.last_ev = ev
        if self.forward is not None:
            self.forward.update(ev)

    def close(self) -> None:
        logging.getLogger("psrv").removeHandler(self._warnings)
        self.httpd.shutdown()       # waits for serve_forever to return
        self.httpd.server_close()
        self.thread.join(timeout=5.0)   # serve_forever has returned by now; a bound, never a hang

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # the page's side (handler threads)
    def state(self) -> dict:
        with self._lock:
            now = time.monotonic()
            if now - self._status_at >= self.STATUS_EVERY_S:
                self._status_at = now
                try:
                    self._status, self._status_error = self.poll_status(), ""
                except Exception as e:   # noqa: BLE001 -- whatever it was, the page says so and the run goes on
                    self._status, self._status_error = None, f"no status reply: {e}"
            self.curves.read()
            with self._events_lock:
                events = list(self.events)
            return livestate.state(self.last_ev, self._status, self._status_error, self.curves, events,
                                   self.epochs, self.max_wall_s, self.out_dir)


class _Warnings(logging.Handler):
    """The launcher's warnings (worker restarts, deaths with no restart left, server restarts) as page events."""

    def __init__(self, view: LiveView):
        super().__init__(logging.WARNING)
        self.view = view

    def emit(self, record: logging.LogRecord) -> None:
        with self.view._events_lock:
            self.view.events.append([time.strftime("%H:%M:%S", time.localtime(record.created)),
                                     record.getMessage()])


class _Handler(BaseHTTPRequestHandler):
    server_version = "psrv-live-view"
    # a connection that sends nothing (a browser's preconnect, or anyone's idle socket) holds its thread this long
    # at most: closing the view waits for every handler thread, so this bounds how long a run's exit can be held
    timeout = 2.0

    def do_GET(self) -> None:   # noqa: N802 -- the name http.server calls
        view: LiveView = self.server.view
        # a page elsewhere may point a name of its own at 127.0.0.1 (DNS rebinding) to read this one: only the
        # names of loopback itself are served
        host = self.headers.get("Host", "")
        if host not in (f"127.0.0.1:{view.port}", f"localhost:{view.port}"):
            return self._reply(403, "text/plain; charset=utf-8", b"forbidden: use the address the run printed\n")
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self._reply(200, "text/html; charset=utf-8", PAGE.encode())
        if path == "/api/state":
            return self._reply(200, "application/json", json.dumps(view.state(), allow_nan=False).encode())
        return self._reply(404, "text/plain; charset=utf-8", b"not found\n")   # the path is not echoed

    def _reply(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # the browser itself refuses anything but this page's own script and style and requests to this server
        self.send_header("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; connect-src 'self'; img-src 'self'")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:   # noqa: A002 -- http.server's signature
        log.debug("live view: " + format, *args)


# Rendered by the browser with textContent and DOM calls only (never innerHTML): nothing from the run, a host name
# or an error message, can become markup.
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>psrv live view</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1000px; }
h1 { font-size: 1.3em; margin: 0 0 .3em; } h2 { font-size: 1.05em; margin: 1.2em 0 .3em; }
.muted { color: #777; } .bad { color: #b00; }
#bar { height: 10px; background: #eee; border-radius: 5px; overflow: hidden; margin: .4em 0; }
#bar-fill { height: 100%; width: 0; background: #3a7bd5; }
svg { background: #fafafa; border: 1px solid #ddd; width: 100%; max-width: 700px; height: auto; }
.train { stroke: #3a7bd5; fill: none; stroke-width: 1.5; } .test { stroke: #e07b00; fill: none; stroke-width: 2; }
.axis { stroke: #999; fill: none; } svg text { font-size: 11px; fill: #555; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; text-align: right; border-bottom: 1px solid #eee; }
th { font-weight: 600; } .dead { color: #b00; } .finished { color: #777; }
</style></head><body>
<h1>psrv run <span id="dir" class="muted"></span></h1>
<div id="conn" class="muted">connecting...</div>
<div id="bar"><div id="bar-fill"></div></div>
<p>step <b id="step">-</b><span id="steps"></span> &middot; <b id="percent">?</b> done &middot; ETA <b id="eta">?</b>
&middot; loss <b id="loss">-</b> &middot; <b id="sps">-</b> samples/s &middot; <b id="elapsed">-</b> s
<span id="stopping" class="muted"></span></p>
<h2>Loss <span class="muted">(<span style="color:#3a7bd5">training, mini-batches</span>,
<span style="color:#e07b00">held-out</span>)</span></h2>
<svg id="loss-chart" viewBox="0 0 700 250" role="img" aria-label="loss curves"></svg>
<div id="metric-box" hidden><h2>Held-out <span id="metric-name"></span></h2>
<svg id="metric-chart" viewBox="0 0 700 250" role="img" aria-label="held-out metric"></svg></div>
<h2>Workers <span id="live" class="muted"></span></h2>
<table id="workers"><thead><tr><th>id</th><th>inc</th><th>pid</th><th>host</th><th>clock</th><th>seen</th>
<th>push/s</th><th>pushes</th><th>stale</th><th>state</th><th>shards</th></tr></thead><tbody></tbody></table>
<h2>Events</h2><p id="counters"></p><ul id="events"></ul>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";
const fmt = (x, p) => (x === null || x === undefined) ? "-" : Number(x).toPrecision(p || 4);
const num = (x) => (x === null || x === undefined) ? "-" : Math.round(x).toLocaleString("en-US");

function el(tag, attrs, text) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVGNS, tag.slice(4)) : document.createElement(tag);
  for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}

// series: [{id, cls, pts: [[x, y], ...]}]; y on a log scale when every value is positive
function chart(svg, series) {
  svg.replaceChildren();
  const W = 700, H = 250, L = 64, R = 12, T = 10, B = 28;
  const ok = (p) => p[0] !== null && p[1] !== null && isFinite(p[1]);
  const all = series.flatMap((s) => s.pts.filter(ok));
  if (!all.length) { svg.appendChild(el("svg:text", {x: W / 2 - 40, y: H / 2}, "no data yet")); return; }
  const log = all.every((p) => p[1] > 0);
  const fy = (y) => log ? Math.log10(y) : y;
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  let y0 = Math.min(...all.map((p) => fy(p[1]))), y1 = Math.max(...all.map((p) => fy(p[1])));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => T + (1 - (fy(y) - y0) / (y1 - y0)) * (H - T - B);
  svg.appendChild(el("svg:path", {class: "axis", d: `M${L} ${T} V${H - B} H${W - R}`}));
  const ylab = (v) => fmt(log ? Math.pow(10, v) : v, 3);
  svg.appendChild(el("svg:text", {x: 4, y: T + 10}, ylab(y1)));
  svg.appendChild(el("svg:text", {x: 4, y: H - B}, ylab(y0)));
  svg.appendChild(el("svg:text", {x: L, y: H - 8}, "step " + x0));
  svg.appendChild(el("svg:text", {x: W - R - 80, y: H - 8}, "step " + x1));
  for (const s of series) {
    const pts = s.pts.filter(ok);
    if (!pts.length) continue;
    const d = pts.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
    svg.appendChild(el("svg:path", {id: s.id, class: s.cls, d: d, "data-points": pts.length}));
    if (pts.length === 1) {
      svg.appendChild(el("svg:circle", {class: s.cls, cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 3}));
    }
  }
}

function render(s) {
  $("dir").textContent = s.out_dir;
  $("step").textContent = s.step === null ? "-" : String(s.step);
  $("steps").textContent = s.steps ? " / " + s.steps : "";
  $("percent").textContent = s.percent;
  $("eta").textContent = s.eta;
  $("bar-fill").style.width = (s.fraction === null ? 0 : 100 * s.fraction) + "%";
  $("loss").textContent = fmt(s.loss, 6);
  $("sps").textContent = num(s.samples_per_s);
  $("elapsed").textContent = s.elapsed_s === null ? "-" : s.elapsed_s.toFixed(1);
  $("stopping").textContent = s.stopping ? "stopping (" + s.stopping + ")" : "";
  chart($("loss-chart"), [{id: "train-curve", cls: "train", pts: s.train},
                          {id: "test-curve", cls: "test", pts: s.test.map((p) => [p[0], p[1]])}]);
  $("metric-box").hidden = !s.test.length;
  $("metric-name").textContent = s.metric;
  if (s.test.length) chart($("metric-chart"), [{id: "metric-curve", cls: "test", pts: s.test.map((p) => [p[0], p[2]])}]);
  const c = s.counters;
  $("live").textContent = c.workers_live === undefined ? "" : `(${c.workers_live} live of ${c.workers_total})`;
  const body = $("workers").tBodies[0];
  body.replaceChildren();
  for (const w of s.workers) {
    const state = w.finished ? "finished" : (w.alive ? "alive" : "dead");
    const tr = el("tr", {"data-wid": w.wid, class: state});
    for (const v of [w.wid, w.inc, w.pid, w.host, w.clock, fmt(w.last_seen_s, 2) + " s", fmt(w.push_rate, 3),
                     w.pushes, w.staleness, state, (w.shards || []).join(" ")]) tr.appendChild(el("td", {}, String(v)));
    body.appendChild(tr);
  }
  const parts = [];
  if (c.deaths !== undefined) {
    parts.push(`worker deaths ${c.deaths}`, `worker re-registrations ${c.worker_restarts}`,
               `server restarts ${c.server_restarts}`, `stragglers ${c.straggles}`,
               `quarantined ${c.quarantined.length ? c.quarantined.join(", ") : "none"}`,
               `bad messages ${c.bad_messages}`);
  }
  $("counters").textContent = parts.join(" \\u00b7 ");
  const ul = $("events");
  ul.replaceChildren();
  for (const e of s.events.slice().reverse()) ul.appendChild(el("li", {}, e[0] + "  " + e[1]));
  if (!s.events.length) ul.appendChild(el("li", {class: "muted"}, "no warnings"));
  const conn = $("conn");
  conn.textContent = s.server === "ok" ? "live" : "server: " + s.server;
  conn.className = s.server === "ok" ? "muted" : "bad";
}

async function poll() {
  try {
    const r = await fetch("/api/state", {cache: "no-store"});
    render(await r.json());
  } catch (e) {
    $("conn").textContent = "the launcher does not answer (the run has ended?)";
    $("conn").className = "bad";
  }
  setTimeout(poll, 1000);
}
poll();
</script></body></html>
"""
