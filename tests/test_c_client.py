"""A second-language client (issue 13): clients/c/psrv_worker.c, written from docs/protocol.md alone (libzmq and a
hand-written msgpack subset), trains the linear model against a live `launch.py --role server`. Independent oracle:
the closed-form minimizer of the same objective the document defines -- mean squared error on the standardized
columns plus the server's own L2 term l2/2 |W|^2 -- solved here with numpy from the CSV file itself."""
from __future__ import annotations

import ctypes.util
import json
import shutil
import subprocess

import numpy as np
import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow

SOURCE = ROOT / "clients" / "c" / "psrv_worker.c"


def build(tmp_path) -> str:
    """Compile the client, or skip saying what is missing (a compiler, or libzmq's header and library)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc or gcc) on PATH")
    if ctypes.util.find_library("zmq") is None:
        pytest.skip("libzmq is not installed (Debian: apt-get install libzmq3-dev)")
    exe = str(tmp_path / "psrv_worker")
    done = subprocess.run([cc, "-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", "-o", exe, str(SOURCE), "-lzmq",
                           "-lm"], capture_output=True, text=True)
    if done.returncode != 0 and "zmq.h" in done.stderr:
        pytest.skip(f"libzmq's header is missing (Debian: apt-get install libzmq3-dev): {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    return exe


def test_the_c_client_trains_to_the_closed_form_solution(launch, tmp_path):
    exe = build(tmp_path)
    rng = np.random.default_rng(11)
    n, d, l2 = 400, 3, 0.05
    X = rng.normal([5.0, -2.0, 0.0], [3.0, 0.5, 10.0], (n, d))     # unequal scales: standardization matters
    y = X @ [0.7, -1.5, 0.2] + 4.0 + rng.normal(0.0, 0.1, n)
    rows = ["x0,x1,x2,target"] + [",".join(repr(float(v)) for v in (*X[i], y[i])) for i in range(n)]
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    sets = ["data.source=rows.csv", "data.shards=2", "data.partition=hash", "train.workers=1", "train.steps=600",
            "train.batch_size=16", "train.lr=0.05", f"model.l2={l2}", f"output.dir={out}"]
    srv = launch("--role", "server", *[a for kv in sets for a in ("--set", kv)])
    address = srv.proc.stdout.readline().split()[1]
    client = subprocess.run([exe, address], capture_output=True, text=True, timeout=120)
    assert client.returncode == 0, client.stderr
    code, _, err = srv.wait(60)
    assert code == 0, err
    srv.assert_no_leftovers()

    lines = client.stdout.splitlines()
    losses = [float(ln.split()[2]) for ln in lines if ln.startswith("push ")]
    assert lines[-1] == f"stop steps pushes {len(losses)}"
    summary = json.loads((out / "summary.json").read_text())
    wid = lines[0].split()[1]
    assert summary["steps"] == 600 and summary["pushes_applied"] == {wid: len(losses)} == {wid: 600}
    assert np.mean(losses[-50:]) < 0.05 * np.mean(losses[:10])          # the loss falls

    # the oracle: minimize mean((A t - y)^2) + l2/2 |W|^2 on standardized columns, then map back to the raw ones
    mean, scale = X.mean(axis=0), X.std(axis=0)
    A = np.c_[(X - mean) / scale, np.ones(n)]
    penalty = np.diag([l2] * d + [0.0])                                   # the intercept is not penalized
    t = np.linalg.solve(2 * A.T @ A / n + penalty, 2 * A.T @ y / n)
    W = t[:d] / scale
    oracle = np.r_[W, t[d] - mean @ W]
    theta = np.load(out / "theta.npy")
    np.testing.assert_allclose(theta, oracle, rtol=0, atol=0.01)          # measured: within 0.002
    plain_ls = np.linalg.lstsq(np.c_[X, np.ones(n)], y, rcond=None)[0]
    assert np.abs(theta - plain_ls).max() > 0.05    # the L2 term the server adds moved it off plain LS (by 0.15)
