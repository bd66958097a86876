"""Held-out accuracy of psrv's logistic and softmax models against scikit-learn's LogisticRegression, on the two
real data sets in tests/data, with the same split, the same standardization and the same objective (C = 1).

    python -m benchmarks.accuracy          (needs scikit-learn: pip install -e '.[test]')
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import psrv
from psrv import data

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
CASES = (("breast_cancer.csv", "logistic"), ("digits.csv", "softmax"))


def compare(csv: str, kind: str, test_fraction: float = 0.2, seed: int = 0, workers: int = 2) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    X, y, _ = data.read_file(str(DATA / csv), "target")
    test = data.holdout(len(X), test_fraction, seed)
    train = np.setdiff1d(np.arange(len(X)), test)
    scaler = StandardScaler().fit(X[train])
    sk = LogisticRegression(C=1.0, max_iter=10_000).fit(scaler.transform(X[train]), y[train])
    with tempfile.TemporaryDirectory() as out:
        r = psrv.train({"data": {"source": str(DATA / csv), "target": "target", "test_fraction": test_fraction,
                                 "seed": seed},
                        "model": {"kind": kind, "l2": 1.0 / len(train)},
                        "train": {"workers": workers, "batch_size": 1024, "steps": 3000, "optimizer": "adam",
                                  "lr": 0.05},
                        "output": {"dir": out, "plot": False}})
    return {"data": csv, "model": kind, "rows": len(X), "test_rows": len(test),
            "psrv_accuracy": r.summary["test_metric"], "sklearn_accuracy": float(sk.score(scaler.transform(X[test]),
                                                                                            y[test]))}


def run(quick: bool = False) -> dict:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return {"name": "accuracy", "title": "Accuracy against scikit-learn", "method": __doc__, "rows": [],
                "notes": ["Skipped: scikit-learn is not installed (pip install -e '.[test]')."]}
    rows = []
    for csv, kind in CASES:
        r = compare(csv, kind)
        rows.append([csv, kind, r["test_rows"], f"{r['psrv_accuracy']:.4f}", f"{r['sklearn_accuracy']:.4f}",
                     f"{100 * (r['psrv_accuracy'] - r['sklearn_accuracy']):+.2f}"])
    return {"name": "accuracy", "title": "Accuracy against scikit-learn", "method": __doc__,
            "columns": ["data", "model", "held-out rows", "psrv accuracy", "scikit-learn accuracy",
                        "difference (points)"], "rows": rows}


def main() -> int:
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("scikit-learn is not installed: pip install -e '.[test]'", file=sys.stderr)
        return 1
    print(f"{'data':<20} {'model':<9} {'test rows':>9} {'psrv':>8} {'sklearn':>8} {'diff (points)':>14}")
    for csv, kind in CASES:
        r = compare(csv, kind)
        diff = 100 * (r["psrv_accuracy"] - r["sklearn_accuracy"])
        print(f"{csv:<20} {kind:<9} {r['test_rows']:>9} {r['psrv_accuracy']:>8.4f} {r['sklearn_accuracy']:>8.4f} "
              f"{diff:>+14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
