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


def patients(bc) -> None:
    """The README walk-through's files, as real exports look: an id column, the diagnosis as text, missing values
    (empty fields and NA, about 2% of the measurements, at seeded random places). The first ten measurements of
    breast_cancer; rows 0..468 in patients.csv (to train on), rows 469..568 in patients_new.csv (new rows)."""
    rng = np.random.default_rng(2024)
    X = bc.data[:, :10]
    gone = rng.random(X.shape) < 0.02
    marker = np.where(rng.random(X.shape) < 0.5, "", "NA")
    for name, rows in (("patients.csv", range(0, 469)), ("patients_new.csv", range(469, 569))):
        with open(os.path.join(HERE, name), "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(["id", *bc.feature_names[:10], "diagnosis"])
            for i in rows:
                w.writerow([f"P{i:04d}", *(marker[i, j] if gone[i, j] else repr(float(X[i, j])) for j in range(10)),
                            bc.target_names[bc.target[i]]])


def main() -> None:
    bc = load_breast_cancer()  # 569 x 30; target 0 = malignant, 1 = benign
    write(os.path.join(HERE, "breast_cancer.csv"), bc.data, bc.target, list(bc.feature_names))
    patients(bc)
    dg = load_digits()         # 1797 x 64, pixel counts 0..16; target 0..9
    write(os.path.join(HERE, "digits.csv"), dg.data, dg.target, list(dg.feature_names))


if __name__ == "__main__":
    main()
