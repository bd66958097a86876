"""The wire protocol as a third party sees it (issue 13): the exchanges written in docs/protocol.md, run against a
live `launch.py --role server` by a client made of raw pyzmq and msgpack only -- nothing on the client side comes
from psrv, so the document, not the reference client, is what is tested. Then the document's data and model rules,
implemented here from the text alone, checked against the server (checksums) and the reference code.

The exchange notation is explained in docs/protocol.md ("Conformance examples").
"""
from __future__ import annotations

import json
import math
import platform
import re
import signal
import zlib

import msgpack
import numpy as np
import pytest
import zmq

from .conftest import ROOT

DOC = ROOT / "docs" / "protocol.md"
REPLY_TIMEOUT_S = 10.0
GROUP = 100   # repeated requests are sent in groups: the server drops replies beyond a client's queue of 1000


# ---------------------------------------------------------------------------------------------- the document
def fenced(kind: str) -> list[tuple[str, list[str]]]:
    """(info after the kind, lines) of every ```kind block of the protocol document."""
    out, cur = [], None
    for line in DOC.read_text().splitlines():
        if cur is None:
            m = re.match(r"^```" + re.escape(kind) + r"\b(.*)$", line)
            if m:
                cur = (m.group(1).strip(), [])
        elif line.startswith("```"):
            out.append(cur)
            cur = None
        else:
            cur[1].append(line)
    assert cur is None, f"unterminated ```{kind} block"
    return out


EXCHANGES = [lines for _, lines in fenced("exchange")]


def test_the_document_has_the_examples_the_suite_runs():
    """Every request op, every error code of the table and the life of a worker appear in an exchange."""
    text = "\n".join("\n".join(b) for b in EXCHANGES)
    ops = {"hello", "pull", "push", "heartbeat", "bye", "status"}
    sent = set(re.findall(r'> \{"op": "(\w+)"', text))
    assert ops <= sent
    table = DOC.read_text().split("### Error codes", 1)[1].split("\n\n", 2)[2]
    codes = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert len(codes) >= 20
    shown = set(re.findall(r'"code": "(\w+)"', text))
    assert codes - shown == set(), f"error codes with no example: {sorted(codes - shown)}"
    assert {"welcome", "theta", "ack", "stop", "heartbeat", "bye", "status", "error"} <= \
        set(re.findall(r'< \{"op": "(\w+)"', text))


# ---------------------------------------------------------------------------------------------- a raw client
class Peer:
    """One DEALER, as a third party would open it."""

    def __init__(self, ctx: zmq.Context, address: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float) -> tuple[dict, list[bytes]] | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        frames = self.sock.recv_multipart()
        return msgpack.unpackb(frames[0], raw=False), frames[1:]


def substitute(v, bound: dict):
    if isinstance(v, str):
        if v.startswith("$"):
            return bound[v[1:]]
        if v.startswith("!bin:"):
            return v[5:].encode()
        return v
    if isinstance(v, list):
        return [substitute(x, bound) for x in v]
    if isinstance(v, dict):
        return {k: substitute(x, bound) for k, x in v.items()}
    return v


TYPES = {"*int": lambda v: type(v) is int, "*str": lambda v: type(v) is str, "*bool": lambda v: type(v) is bool,
         "*float": lambda v: type(v) in (int, float), "*list": lambda v: type(v) is list,
         "*map": lambda v: type(v) is dict}
ABSENT = object()


def match(want, got, bound: dict, where: str) -> None:
    """Raise AssertionError naming the first place where `got` is not what the document shows."""
    if want == "*absent":
        assert got is ABSENT, f"{where}: should be absent, is {got!r}"
        return
    assert got is not ABSENT, f"{where}: missing"
    if isinstance(want, str) and want.startswith("$"):
        name = want[1:]
        if name in bound:
            assert got == bound[name], f"{where}: {got!r}, but ${name} is {bound[name]!r}"
        else:
            bound[name] = got
    elif isinstance(want, str) and want in TYPES:
        assert TYPES[want](got), f"{where}: {got!r} is not {want[1:]}"
    elif isinstance(want, str) and want.startswith("~"):
        assert type(got) is str and want[1:] in got, f"{where}: {got!r} does not contain {want[1:]!r}"
    elif isinstance(want, dict):
        assert type(got) is dict, f"{where}: {got!r} is not a map"
        for k, w in want.items():
            match(w, got.get(k, ABSENT), bound, f"{where}.{k}")
    elif isinstance(want, list):
        assert type(got) is list and len(got) == len(want), f"{where}: {got!r} is not like {want!r}"
        for i, (w, g) in enumerate(zip(want, got)):
            match(w, g, bound, f"{where}[{i}]")
    else:
        assert got == want and type(got) is type(want), f"{where}: {got!r} != {want!r}"


def request_frames(rest: str, bound: dict, theta: dict) -> list[bytes]:
    """The frames of one `X> ...` line (without the X>)."""
    if rest.startswith("raw "):
        return [b"" if h == "-" else bytes.fromhex(h) for h in rest[4:].split()]
    m = re.match(r"^(\{.*\})\s*\+\s*(\S+)$", rest)
    header = substitute(json.loads(m.group(1) if m else rest), bound)
    frames = []
    if m:
        what = m.group(2)
        if what.startswith("bytes:"):
            frames.append(bytes(int(what[6:])))
        else:
            dtype = "<f4" if what == "zeros:<f4" else theta["dtype"]
            a = np.full(theta["shape"], np.nan if what == "nan" else 0.0, dtype=dtype)
            header.setdefault("arrays", [[dtype, list(a.shape)]])
            frames.append(a.tobytes())
    return [msgpack.packb(header, use_bin_type=True)] + frames


def run_exchange(lines: list[str], launch, tmp_path) -> None:
    first = lines[0]
    assert first.startswith("% server "), "an exchange starts with its server"
    if "% x86" in lines and platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the server offers shared memory on x86 only")
    sets = []
    for kv in first.split()[2:]:
        sets += ["--set", kv]
    la = launch("--role", "server", *sets, "--set", f"output.dir={tmp_path / 'out'}")
    address = None
    for _ in range(50):
        line = la.proc.stdout.readline()
        if line.startswith("attach: "):
            address = line.split()[1]
            break
        assert line, f"the server printed no address: {la.wait()}"
    ctx = zmq.Context()
    peers: dict[str, Peer] = {}
    bound: dict = {}
    theta: dict = {}
    exited = False
    try:
        for no, line in enumerate(lines[1:], start=2):
            line = line.strip()
            if not line or line.startswith("%"):
                continue
            where = f"line {no} of the exchange ({line[:60]}...)"
            if line == "= exit 0":
                code, out, err = la.wait(60)
                assert code == 0, err
                exited = True
                continue
            who, arrow, rest = line[0], line[1], line[2:].strip()
            peer = peers.get(who) or peers.setdefault(who, Peer(ctx, address))
            times = 1
            m = re.match(r"^(.*) x (\d+)$", rest)
            if m:
                rest, times = m.group(1), int(m.group(2))
            if arrow == ">":
                frames = request_frames(rest, bound, theta)
                pending = [frames] * times
                if times > 1:  # the matching `<` line reads the replies group by group
                    peer.pending = pending
                    continue
                peer.send(frames)
            elif rest.startswith("nothing "):
                got = peer.recv(float(rest.split()[1]))
                assert got is None, f"{where}: expected no reply, got {got[0]}"
            else:
                want = json.loads(rest)
                for i in range(times):
                    if times > 1 and i % GROUP == 0:
                        for f in peer.pending[i:i + GROUP]:
                            peer.send(f)
                    got = peer.recv(REPLY_TIMEOUT_S)
                    assert got is not None, f"{where}: no reply within {REPLY_TIMEOUT_S} s"
                    header, arrays = got
                    match(want, header, bound, where)
                    if header["op"] == "welcome":
                        theta.update(shape=header["theta_shape"], dtype=header["theta_dtype"])
                    for (dtype, shape), frame in zip(header.get("arrays", []), arrays):
                        assert len(frame) == math.prod(shape) * np.dtype(dtype).itemsize, where
    finally:
        ctx.destroy(linger=0)
        if not exited and la.proc.poll() is None:
            la.proc.send_signal(signal.SIGTERM)   # ends the run as a stopping criterion would
            la.wait(60)
    la.assert_no_leftovers()


@pytest.mark.slow
@pytest.mark.parametrize("block", range(len(EXCHANGES)))
def test_exchange_of_the_document(block, launch, tmp_path):
    run_exchange(EXCHANGES[block], launch, tmp_path)
