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
    ops = {"hello", "pull", "push", "heartbeat", "bye", "status", "get"}
    sent = set(re.findall(r'> \{"op": "(\w+)"', text))
    assert ops <= sent
    table = DOC.read_text().split("### Error codes", 1)[1].split("\n\n", 2)[2]
    codes = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert len(codes) >= 20
    shown = set(re.findall(r'"code": "(\w+)"', text))
    # group_only: a server running group steps starts only with its launcher's workers, so an exchange (a server
    # started alone) cannot show it; tests/test_coordinator.py does
    assert codes - shown == {"group_only"}, f"error codes with no example: {sorted(codes - shown)}"
    assert {"welcome", "theta", "ack", "stop", "heartbeat", "bye", "status", "error", "values"} <= \
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
    m = re.match(r"^(\{.*\})((?:\s*\+\s*\S+)+)$", rest)
    header = substitute(json.loads(m.group(1) if m else rest), bound)
    frames, descr = [], []
    for what in (m.group(2).split("+")[1:] if m else []):
        what = what.strip()
        if what.startswith("bytes:"):
            frames.append(bytes(int(what[6:])))
            continue
        if what.startswith(("keys:", "f8:")):   # a keys frame ("<u8") or float64 values, listed
            kind, _, listed = what.partition(":")
            a = np.array([int(v) if kind == "keys" else float(v) for v in listed.split(",")],
                         dtype="<u8" if kind == "keys" else "<f8")
        else:
            dtype = "<f4" if what == "zeros:<f4" else theta["dtype"]
            a = np.full(theta["shape"], np.nan if what == "nan" else 0.0, dtype=dtype)
        descr.append([a.dtype.str, list(a.shape)])
        frames.append(a.tobytes())
    if descr:
        header.setdefault("arrays", descr)
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
                rest, _, values = rest.partition(" = ")   # `= [v, ...]`: the reply's array holds these values
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
                    if values:
                        got_values = np.frombuffer(arrays[0], header["arrays"][0][0]).tolist()
                        assert got_values == json.loads(values), f"{where}: values {got_values}"
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


# ---------------------------------------------------------------------------------------------- a server to ask
def start_server(launch, tmp_path, *sets: str) -> tuple[object, str]:
    args = []
    for kv in sets:
        args += ["--set", kv]
    la = launch("--role", "server", *args, "--set", f"output.dir={tmp_path / 'out'}")
    for _ in range(50):
        line = la.proc.stdout.readline()
        if line.startswith("attach: "):
            return la, line.split()[1]
        assert line, f"the server printed no address: {la.wait()}"
    raise AssertionError("no address")


def stop_server(la) -> None:
    la.proc.send_signal(signal.SIGTERM)   # the launcher stops its server, removes its memory and exits 143
    la.wait(60)
    la.assert_no_leftovers()


def hello(address: str, local: bool = False) -> tuple[dict, list[np.ndarray]]:
    ctx = zmq.Context()
    try:
        peer = Peer(ctx, address)
        peer.send([msgpack.packb({"op": "hello", "version": 1, "role": "worker", "wid": -1, "pid": 1,
                                  "host": "conformance", "local": local, "rid": 1})])
        got = peer.recv(REPLY_TIMEOUT_S)
        assert got is not None, "no welcome"
        h, frames = got
        assert h["op"] == "welcome", h
        arrays = [np.frombuffer(f, dtype=dt).reshape(shape) for (dt, shape), f in zip(h["arrays"], frames)]
        return h, arrays
    finally:
        ctx.destroy(linger=0)


# ---------------------------------------------------------------------------------------------- the data, from the text
M64 = (1 << 64) - 1


def sm(x: np.ndarray) -> np.ndarray:
    """splitmix64's output function on uint64, as the document writes it."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def doc_epoch_order(seed: int, shard: int, epoch: int, size: int) -> np.ndarray:
    """Positions 0..size-1 sorted by sm(key + position), ties by position; key = sm(sm(sm(seed) + shard) + epoch)."""
    with np.errstate(over="ignore"):
        key = sm(sm(sm(np.array([seed], np.uint64)) + np.uint64(shard)) + np.uint64(epoch))
        return np.argsort(sm(key + np.arange(size, dtype=np.uint64)), kind="stable")


def doc_synthetic(seed: int, n: int, d: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0x5EED])
    w = rng.standard_normal(d)
    b = rng.standard_normal()
    mean = rng.uniform(-1.0, 1.0, d)
    scale = np.exp(rng.uniform(np.log(0.5), np.log(2.0), d))
    xs, ys = [], []
    for c in range(-(-n // 8192)):
        rows = min(8192 * (c + 1), n) - 8192 * c
        r = np.random.default_rng([seed, 1, c])
        X = r.standard_normal((rows, d)) * scale + mean
        xs.append(X)
        ys.append(X @ w + b + noise * r.standard_normal(rows))
    return np.concatenate(xs), np.concatenate(ys)


def doc_csv(path: str, target: str) -> tuple[np.ndarray, np.ndarray]:
    import csv
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = [h.strip() for h in rows[0]]
    t = len(header) - 1 if target == "" else header.index(target)
    missing = {"", "na", "n/a", "nan", "null"}
    data = [[math.nan if v.strip().lower() in missing else float(v) for v in r]
            for r in rows[1:] if r and not (len(r) == 1 and not r[0].strip())]
    A = np.array(data, dtype=np.float64)
    return np.delete(A, t, axis=1), A[:, t]


def doc_svmlight(path: str, d_set: int) -> tuple[np.ndarray, np.ndarray]:
    lines = []
    for line in open(path, "rb"):
        toks = line.split(b"#")[0].split()
        if toks:
            lines.append((float(toks[0]), [(int(k), float(v)) for k, v in (t.split(b":") for t in toks[1:])
                                           if k != b"qid"]))
    idx = [i for _, feats in lines for i, _ in feats]
    base = 0 if min(idx) == 0 else 1
    d = d_set or (max(idx) + 1 - base)
    X = np.zeros((len(lines), d))
    for r, (_, feats) in enumerate(lines):
        for i, v in feats:
            X[r, i - base] = v
    return X, np.array([y for y, _ in lines])


def doc_rows(cfg: dict, explicit: list[str]) -> tuple[np.ndarray, np.ndarray]:
    src = cfg["source"]
    if src == "synthetic":
        return doc_synthetic(cfg["seed"], cfg["n"], cfg["d"], cfg["noise"])
    if src.endswith(".csv"):
        return doc_csv(src, cfg["target"])
    if src.endswith(".npy"):
        return np.load(src).astype(np.float64), np.load(cfg["labels"]).astype(np.float64).reshape(-1)
    return doc_svmlight(src, cfg["d"] if "data.d" in explicit else 0)


def doc_shards(welcome: dict, mean: np.ndarray, scale: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Every shard's (X, y), standardized, exactly by the steps of "The data" in docs/protocol.md."""
    cfg, explicit = welcome["data"]["config"], welcome["data"]["explicit"]
    X, y = doc_rows(cfg, explicit)                                               # 1. read
    file_index = np.arange(len(X))
    if cfg["nan_policy"] in ("drop", "impute"):                                  # 2. drop
        keep = np.isfinite(y) & (np.isfinite(X).all(axis=1) | (cfg["nan_policy"] == "impute"))
        X, y, file_index = X[keep], y[keep], file_index[keep]
    k = round(len(X) * cfg["test_fraction"])                                     # 3. hold out
    test = np.zeros(len(X), bool)
    if cfg["test_fraction"] > 0:
        test[np.sort(np.random.default_rng([cfg["seed"], 0x7E57]).choice(len(X), k, replace=False))] = True
    X, y, file_index = X[~test], y[~test], file_index[~test]
    n_shards = len(welcome["data"]["shards"])                                    # 4. partition
    if cfg["partition"] == "range":
        parts = np.array_split(np.arange(len(X)), n_shards)
    else:
        owner = sm(file_index.astype(np.uint64)) % np.uint64(n_shards)
        parts = [np.flatnonzero(owner == np.uint64(s)) for s in range(n_shards)]
    dtype = np.dtype(welcome["data"]["block"]["dtype"])
    if cfg["nan_policy"] == "impute":     # each column's mean over its finite training values (one 65536-row block)
        assert len(X) <= 65536
        ok = np.isfinite(X)
        impute = np.where(ok, X, 0.0).sum(axis=0) / ok.sum(axis=0)
    out = []
    for s, rows in enumerate(parts):
        if cfg["batch_order"] == "blocks":                                       # 4b. stored permuted once
            rows = rows[doc_epoch_order(cfg["seed"], s, (1 << 64) - 1, len(rows))]
        Xs, ys = X[rows].astype(dtype), y[rows].astype(dtype)                   # 5. convert (and impute)
        if cfg["nan_policy"] == "impute":
            Xs = np.where(np.isfinite(Xs), Xs, impute.astype(dtype))
        Xs = (Xs - mean) / scale                                                 # 6. standardize, in dtype
        out.append((Xs, ys))
    return out


def crc(X: np.ndarray, y: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(y).tobytes(), zlib.crc32(np.ascontiguousarray(X).tobytes()))


def write_sources(tmp_path) -> None:
    rng = np.random.default_rng(7)
    X = rng.normal(3.0, 2.0, (300, 4))
    y = X @ [1.0, -2.0, 0.5, 0.0] + rng.normal(0, 0.1, 300)
    lines = ["f1, label ,f2,f3,f4"]
    for i in range(300):
        if i % 50 == 7:
            lines.append("")                                   # a blank line: skipped
        x = [repr(float(v)) for v in X[i]]
        vals = [x[0], repr(float(y[i])), x[1], f'"{x[2]}"', f" {x[3]} "]     # quoted, padded: still numbers
        if i == 11:
            vals[2] = "nan"                                    # dropped with nan_policy = "drop", else imputed
        if i == 12:
            vals[0] = "NA"
        lines.append(",".join(vals))
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    svm = ["# a comment line", ""]
    for i in range(300):
        feats = " ".join(f"{j + 1}:{float(X[i, j])!r}" for j in range(3) if (i + j) % 4)   # some entries missing
        svm.append(f"{float(y[i])!r} qid:{i % 3} {feats}  # row {i}")
    (tmp_path / "rows.svm").write_text("\n".join(svm) + "\n")
    np.save(tmp_path / "X.npy", X.astype(np.float32))
    np.save(tmp_path / "y.npy", y.reshape(-1, 1))


SOURCES = {
    "synthetic float64, held-out rows, hash partition, 3 chunks": [
        "data.n=20000", "data.d=4", "data.test_fraction=0.1", "data.partition=hash", "data.shards=3"],
    "synthetic float32, range partition": [
        "data.n=5001", "data.d=3", "data.dtype=float32", "data.test_fraction=0.25", "data.shards=2", "data.seed=5"],
    "csv, target in the middle, a NaN row dropped, no intercept": [
        "data.source=rows.csv", "data.target=label", "data.nan_policy=drop", "data.test_fraction=0.2",
        "data.shards=2", "data.partition=hash", "model.fit_intercept=false"],
    "svmlight, 1-based, qid and comments": ["data.source=rows.svm", "data.shards=3"],
    "csv, missing inputs imputed, float32": [
        "data.source=rows.csv", "data.target=label", "data.nan_policy=impute", "data.test_fraction=0.1",
        "data.dtype=float32", "data.shards=2"],
    "csv in block order, held-out rows from data.test_source": [
        "data.source=rows.csv", "data.target=label", "data.nan_policy=drop", "data.test_source=rows.csv",
        "data.batch_order=blocks", "data.shards=2", "data.seed=9"],
    "npy with a labels path relative to the launcher": [
        "data.source=X.npy", "data.labels=y.npy", "data.dtype=float32", "data.shards=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SOURCES))
def test_a_remote_worker_rebuilds_every_shard_from_the_document(case, launch, tmp_path):
    """Points 2 and 3 of issue 13: the rows of each shard, rebuilt by the document's rules from welcome.data.config
    and standardized with welcome's mean and scale as sent, have the server's checksum."""
    write_sources(tmp_path)
    la, address = start_server(launch, tmp_path, *SOURCES[case], "train.workers=1")
    try:
        welcome, (mean, scale) = hello(address)
    finally:
        stop_server(la)
    # point 9: every key the server sends is in the document (a client ignores keys it does not know, but a key
    # the document does not name is one nobody can use)
    text = DOC.read_text()
    for where, keys in (("welcome", welcome), ("welcome.data", welcome["data"]), ("welcome.train", welcome["train"]),
                        ("welcome.model", welcome["model"]), ("welcome.data.block", welcome["data"]["block"])):
        missing = [k for k in keys if f"`{k}`" not in text]
        assert missing == [], f"{where} keys the document does not name: {missing}"
    cfg = welcome["data"]["config"]
    if cfg["labels"]:
        assert cfg["labels"] == str(tmp_path / "y.npy")      # absolute, resolved where the launcher runs
    assert mean.dtype == np.dtype(welcome["data"]["block"]["dtype"]) == scale.dtype
    shards = doc_shards(welcome, mean, scale)
    assert [len(X) for X, _ in shards] == [size for _, size in welcome["data"]["shards"]]
    assert [crc(X, y) for X, y in shards] == [c for _, c in sorted(welcome["data"]["checksums"])]


# ---------------------------------------------------------------------------------------------- CSV examples
def test_the_csv_examples_of_the_document_are_what_the_reader_does(tmp_path):
    """The document's CSV rules, tied to the reader on main: each ```csv-example is parsed by psrv.sources."""
    from psrv.sources import CsvOptions, read_table
    examples = fenced("csv-example")
    assert len(examples) >= 4
    for i, (info, lines) in enumerate(examples):
        keys = dict(kv.split("=", 1) for kv in info.split())
        opt = CsvOptions(target=keys.get("target", ""), delimiter=keys.get("delimiter", ""),
                         drop_columns=keys["drop_columns"].split(",") if "drop_columns" in keys else [])
        arrow = next(j for j, line in enumerate(lines) if line.startswith("-> "))
        path = tmp_path / f"example{i}.csv"
        path.write_text("\n".join(lines[:arrow]) + "\n")
        m = re.match(r"^-> X (.*); y (.*)$", lines[arrow])
        table = read_table(str(path), "", 0, opt)
        want_X, want_y = (np.array(json.loads(g), dtype=float) for g in m.groups())
        np.testing.assert_array_equal(table.X, want_X, err_msg=f"example {i}")
        np.testing.assert_array_equal(table.y, want_y, err_msg=f"example {i}")


# ---------------------------------------------------------------------------------------------- the models
def doc_gradient(kind: str, theta: np.ndarray, X: np.ndarray, y: np.ndarray, intercept: bool):
    """(mean loss, gradient) by the formulas of "Models" in docs/protocol.md."""
    m, d = X.shape
    W = theta[:d]
    z = X @ W + (theta[d] if intercept else 0.0)
    if kind == "linear":
        r = z - y
        loss, r = np.mean(r ** 2), 2.0 * r
    elif kind == "logistic":
        loss = np.mean(np.log1p(np.exp(z)) - y * z)
        r = 1.0 / (1.0 + np.exp(-z)) - y
    else:
        e = np.exp(z - z.max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        loss = np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(m), y.astype(int)])
        r = p.copy()
        r[np.arange(m), y.astype(int)] -= 1.0
    g = np.zeros_like(theta)
    g[:d] = X.T @ r / m
    if intercept:
        g[d] = r.sum(axis=0) / m
    return loss, g


@pytest.mark.parametrize("kind", ["linear", "logistic", "softmax"])
@pytest.mark.parametrize("intercept", [True, False])
def test_the_documented_losses_and_gradients_are_the_workers(kind, intercept):
    from psrv import models
    rng = np.random.default_rng(3)
    m, d, k = 17, 4, 3
    X = rng.standard_normal((m, d))
    y = {"linear": rng.standard_normal(m), "logistic": (rng.random(m) < 0.5).astype(float),
         "softmax": rng.integers(0, k, m).astype(float)}[kind]
    model = models.make(kind, d, intercept, np.float64, k if kind == "softmax" else 0)
    theta = rng.standard_normal(model.theta_shape) * 0.3
    rows = d + intercept
    assert model.theta_shape == ((rows, k) if kind == "softmax" else (rows,))   # the documented layout
    out = np.empty_like(theta)
    loss = model.loss_grad(theta, X, y, out)
    want_loss, want = doc_gradient(kind, theta, X, y, intercept)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose(out, want, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------- CURVE key files
def key_of(path, which: str) -> bytes:
    """A key from a ZeroMQ certificate file, read as the document describes it (`public-key = "..."`)."""
    m = re.search(which + r'-key = "(.{40})"', path.read_text())
    assert m, f"{path} holds no {which} key"
    return m.group(1).encode()


@pytest.mark.slow
def test_the_documented_key_files_let_a_raw_client_through_curve(launch, tmp_path):
    """Point 15: `launch.py --keygen DIR` writes the files the document names, and a client that uses them as the
    document says (server.key's public key, its own NAME.key_secret pair) is served; one with other keys is not."""
    keys = tmp_path / "keys"
    code, out, err = launch("--keygen", keys, "--name", "alice").wait(60)
    assert code == 0, err
    table = DOC.read_text().split("`launch.py --keygen DIR [--name NAME]` makes them:", 1)[1].split("\n\n", 2)[1]
    names = re.findall(r"^\| `DIR/([\w/.]+)` \|", table, re.M)
    assert names == ["server.key", "server.key_secret", "NAME.key", "NAME.key_secret", "authorized/NAME.key"]
    for name in names:
        assert (keys / name.replace("NAME", "alice")).is_file(), name
    la, address = start_server(launch, tmp_path, "data.n=64", "data.d=3", "train.workers=1",
                               f"server.keys={keys}", "server.bind=tcp://127.0.0.1:0")
    try:
        ctx = zmq.Context()
        try:
            for secret_file, served in ((keys / "alice.key_secret", True), (None, False)):
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.curve_serverkey = key_of(keys / "server.key", "public")
                if secret_file is None:          # a key pair the server never authorized
                    sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
                else:
                    sock.curve_publickey = key_of(secret_file, "public")
                    sock.curve_secretkey = key_of(secret_file, "secret")
                sock.connect(address)
                sock.send_multipart([msgpack.packb({"op": "status", "rid": 1})])
                if served:
                    assert sock.poll(int(REPLY_TIMEOUT_S * 1000)), "an authorized client got no reply"
                    assert msgpack.unpackb(sock.recv_multipart()[0])["state"]["protocol"] == 1
                else:
                    assert not sock.poll(1000), "a client with unknown keys was answered"
                sock.close()
        finally:
            ctx.destroy(linger=0)
    finally:
        stop_server(la)
