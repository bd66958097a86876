"""Reading a large CSV: psrv's reader against the alternatives it could use, on two files of 1,000,000 rows x 20
input columns + a target ("%.8g" values, a header row, about 220 MB): one all numbers, one with 1 % of the input
fields empty (what pandas writes for NaN). Each reader runs in a fresh process of its own, so its peak resident
memory (VmHWM, less the process's own before it reads) is its alone; the time is from opening the file to a float64
X and y in memory. One run each (the bigger readers take tens of seconds), on a shared machine: expect noise.

- psrv: psrv.sources.read_file, the reader psrv uses: the first 1,000 rows with the standard csv module (header,
  kind of labels), then the whole file with np.loadtxt, 4 MiB of text at a time, missing fields first written as
  "nan" (str.replace; a regular expression when the text has letters), text labels by a second loadtxt pass;
- csv + float(): the standard csv module and float() on every field, row by row (psrv's reader before, which knew
  neither missing values nor string labels);
- np.loadtxt: numpy's C reader (numpy >= 1.23); no missing values (an empty field is an error), no strings;
- np.genfromtxt: numpy's Python reader, which fills missing values;
- pyarrow.csv: Apache Arrow's multi-threaded C++ reader, then to numpy (only when pyarrow is importable; it is not a
  psrv dependency).

    python -m benchmarks.csvread [--rows N] [--cols D] [--keep FILE]
    python -m benchmarks --only csvread         (the same, written into RESULTS.md)
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

MISSING = 0.01   # the share of input fields left empty in the second file
# (reader, file): every reader on the file of numbers; those that read missing values on the other
READERS = [("psrv", "numbers"), ("csv + float()", "numbers"), ("np.loadtxt", "numbers"), ("np.genfromtxt", "numbers"),
           ("pyarrow.csv", "numbers"), ("psrv", "1 % empty"), ("np.genfromtxt", "1 % empty"),
           ("pyarrow.csv", "1 % empty")]


def make_csv(path: str, rows: int, cols: int, seed: int = 0, missing: float = 0.0) -> None:
    """rows x (cols inputs + y) of random numbers with a header row, written block by block; a share `missing` of
    the input fields left empty."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as fh:
        fh.write(",".join([f"x{j}" for j in range(cols)] + ["y"]) + "\n")
        for lo in range(0, rows, 100_000):
            block = rng.standard_normal((min(100_000, rows - lo), cols + 1))
            block[:, :-1][rng.random((len(block), cols)) < missing] = np.nan
            text = io.StringIO()
            np.savetxt(text, block, fmt="%.8g", delimiter=",")
            fh.write(text.getvalue().replace("nan", ""))


def _old_psrv(path: str):
    """psrv's CSV reader before missing values and string labels (a header row, float() on every field)."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        next(reader)
        A = np.asarray([[float(v) for v in row] for row in reader if row], dtype=np.float64)
    return A[:, :-1], A[:, -1]


def _read(name: str, path: str):
    if name == "psrv":
        from psrv import sources
        X, y, _ = sources.read_file(path)
        return X, y
    if name == "csv + float()":
        return _old_psrv(path)
    if name == "np.loadtxt":
        A = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    elif name == "np.genfromtxt":
        A = np.genfromtxt(path, delimiter=",", skip_header=1, dtype=np.float64)
    elif name == "pyarrow.csv":
        from pyarrow import csv as pacsv
        t = pacsv.read_csv(path)
        A = np.column_stack([c.to_numpy() for c in t.columns]).astype(np.float64, copy=False)
    else:
        raise ValueError(name)
    return A[:, :-1], A[:, -1]


def _peak_kib() -> int:
    """This process's peak resident memory (VmHWM): unlike ru_maxrss, it starts afresh at exec, so a large parent
    does not count."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))


def one(name: str, path: str) -> dict:
    """Time one reader in this process (a fresh one: see measure())."""
    if name == "psrv":
        import psrv.sources  # noqa: F401  (the import is not part of reading)
    before_kib = _peak_kib()
    t0 = time.perf_counter()
    X, y = _read(name, path)
    wall_s = time.perf_counter() - t0
    peak_kib = _peak_kib()
    return {"reader": name, "wall_s": wall_s, "peak_mib": (peak_kib - before_kib) / 1024, "shape": list(X.shape),
            "checksum": float(np.nansum(X[:1000]) + np.nansum(y[:1000]))}


def measure(name: str, path: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.csvread", "--one", name, path]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["?"])[-1]
        return {"reader": name, "error": tail}
    return json.loads(p.stdout)


def available(name: str) -> bool:
    if name != "pyarrow.csv":
        return True
    try:
        import pyarrow.csv  # noqa: F401
        return True
    except ImportError:
        return False


def compare(rows: int, cols: int, keep: str | None = None) -> tuple[list[dict], int]:
    with tempfile.TemporaryDirectory() as tmp:
        path = keep or os.path.join(tmp, "big.csv")
        if not (keep and os.path.exists(keep)):
            make_csv(path, rows, cols)
        holes = os.path.join(tmp, "holes.csv")
        make_csv(holes, rows, cols, missing=MISSING)
        size = os.path.getsize(path)
        out = [{**(measure(n, holes if f != "numbers" else path) if available(n) else
                   {"reader": n, "error": "not installed"}), "file": f} for n, f in READERS]
    for f in {f for _, f in READERS}:
        sums = {r["checksum"] for r in out if "checksum" in r and r["file"] == f}
        if len(sums) > 1 and max(sums) - min(sums) > 1e-6 * max(abs(s) for s in sums):
            raise AssertionError(f"readers disagree on the data: {out}")
    return out, size


def run(quick: bool = False) -> dict:
    rows, cols = (100_000, 20) if quick else (1_000_000, 20)
    results, size = compare(rows, cols)
    base = next((r["wall_s"] for r in results if r["reader"] == "np.loadtxt" and "wall_s" in r), None)
    table = []
    for r in results:
        if "error" in r:
            table.append([r["reader"], r["file"], "-", "-", "-", r["error"]])
            continue
        table.append([r["reader"], r["file"], f"{r['wall_s']:.2f}", f"{rows * (cols + 1) / r['wall_s'] / 1e6:.2f}",
                      f"{r['peak_mib']:.0f}", f"{r['wall_s'] / base:.2f}" if base else "-"])
    return {"name": "csvread", "title": "Reading a large CSV", "method": __doc__,
            "columns": ["reader", "file", "seconds", "million values/s", "peak memory MiB (beyond the process)",
                        "time / np.loadtxt"],
            "rows": table, "notes": [f"{rows:,} rows x {cols + 1} columns, {size / 2**20:.0f} MiB on disk; float64 "
                                     f"X and y take {rows * (cols + 1) * 8 / 2**20:.0f} MiB."]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.csvread", description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--cols", type=int, default=20, help="input columns (plus one target column)")
    p.add_argument("--keep", metavar="FILE", help="write the CSV here (or reuse it when it exists)")
    p.add_argument("--one", nargs=2, metavar=("READER", "FILE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one)))
        return 0
    results, size = compare(args.rows, args.cols, args.keep)
    print(f"{args.rows:,} rows x {args.cols + 1} columns, {size / 2**20:.0f} MiB")
    print(f"{'reader':<16} {'file':<10} {'seconds':>8} {'peak MiB':>9}")
    for r in results:
        if "error" in r:
            print(f"{r['reader']:<16} {r['file']:<10} {r['error']}")
        else:
            print(f"{r['reader']:<16} {r['file']:<10} {r['wall_s']:>8.2f} {r['peak_mib']:>9.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
