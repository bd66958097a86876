"""Write the small real data sets used by accuracy tests as CSV files next to this script.

They come from the copies bundled with scikit-learn (no download): `python tests/data/make_datasets.py` rewrites
breast_cancer.csv and digits.csv byte for byte. Values are written so that they read back exactly: integer data as
integers, other data as repr(float), the shortest text that round-trips.
"""
from __future__ import annotations

import csv
import os

import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits

HERE = os.path.dirname(os.path.abspath(__file__))


def write(path: str, X: np.ndarray, y: np.ndarray, names: list[str]) -> None:
    # one rule per file: integer data (digits' pixel counts) as integers, anything else as repr(float)
    text = (lambda v: str(int(v))) if np.array_equal(X, np.round(X)) else (lambda v: repr(float(v)))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow([*names, "target"])
        for row, t in zip(X, y):
            w.writerow([*(text(v) for v in row), str(int(t))])
    back = np.loadtxt(path, delimiter=",", skiprows=1)
    assert np.array_equal(back[:, :-1], X) and np.array_equal(back[:, -1], y), f"{path} does not round-trip"


def main() -> None:
    bc = load_breast_cancer()  # 569 x 30; target 0 = malignant, 1 = benign
    write(os.path.join(HERE, "breast_cancer.csv"), bc.data, bc.target, list(bc.feature_names))
    dg = load_digits()         # 1797 x 64, pixel counts 0..16; target 0..9
    write(os.path.join(HERE, "digits.csv"), dg.data, dg.target, list(dg.feature_names))


if __name__ == "__main__":
    main()
