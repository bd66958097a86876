"""The data of a sparse job (model.kind = "sparse_logistic"): built once by the launcher into one CSRBlock in shared
memory, training rows first (shards as row ranges of them), then the held-out rows; attached by the server and the
local workers. The dense block's counterpart (data.build), with the same held-out rule (data.holdout over the rows
in file order) and the same "range" partition of the training rows, so a sparse file and its densified copy give
the same shards and batches.

Sources: "criteo" (psrv/criteo.py: data.n rows, 2^data.log2_buckets columns, data.seed) or an svmlight/libsvm file
(read as CSR, never densified). Values are used as given: no standardization.
"""
from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

from . import sources
from .criteo import CHUNK_ROWS, FIELDS, Criteo, concat
from .data import Layout, holdout
from .errors import DataError
from .sparse import CSR, CSRBlock, CSRSpec, index_dtype, read_svmlight_csr, shard_rows
from .sparse_model import SparseLogistic

CRITEO = "criteo"
STEP_ROWS = 16 * CHUNK_ROWS   # rows generated at a time: only they are held outside the segment


def is_sparse_layout(layout: dict) -> bool:
    return "csr" in layout.get("extra", {})


def _split(part: CSR, lo: int, is_test: np.ndarray) -> tuple[CSR, CSR]:
    """(training rows, held-out rows) of `part`, rows lo.. of the data as read."""
    t = is_test[lo:lo + part.n]
    if not t.any():
        return part, None
    return part.take(np.flatnonzero(~t)), part.take(np.flatnonzero(t))


def build(cfg, n_shards: int, name: str) -> tuple[CSRBlock, Layout]:
    """Generate or read the rows into a new CSRBlock named `name` (the caller closes and unlinks it)."""
    dc = cfg.data
    if dc.source == CRITEO:
        gen = Criteo(dc.seed, dc.log2_buckets)
        n, d = dc.n, gen.d
        chunks = ((lo, gen.rows(lo, min(lo + STEP_ROWS, n), n)) for lo in range(0, n, STEP_ROWS))
        room = FIELDS * n
    else:
        if os.path.splitext(dc.source)[1].lower() not in sources.SVM_KINDS:
            raise DataError(f"{dc.source}: model.kind = 'sparse_logistic' reads sparse rows: data.source must be "
                            f"'criteo' or an svmlight/libsvm file ({', '.join(sources.SVM_KINDS)})")
        if not os.path.exists(dc.source):
            raise DataError(f"file not found: {dc.source}")
        csr, _ = read_svmlight_csr(dc.source, dc.d if "data.d" in cfg.explicit else 0)
        if not np.isfinite(csr.values).all() or not np.isfinite(csr.y).all():
            raise DataError(f"{dc.source}: holds NaN or Inf values; a sparse job needs finite values and labels")
        n, d = csr.n, csr.d
        chunks = iter([(0, csr)])
        room = csr.nnz
    test_rows = holdout(n, dc.test_fraction, dc.seed)
    if dc.test_fraction > 0 and len(test_rows) == 0:
        raise DataError(f"data.test_fraction = {dc.test_fraction} holds out no row of {n}; raise it or set it to 0")
    n_train = n - len(test_rows)
    if n_train < n_shards:
        raise DataError(f"{dc.source}: {n_train} training rows cannot fill {n_shards} shards; use fewer shards "
                        f"(data.shards, train.workers)")
    is_test = np.zeros(n, dtype=bool)
    is_test[test_rows] = True
    block = CSRBlock.create(CSRSpec(name, n, d, max(room, 1), "float64", index_dtype(d)))
    try:
        at, held = 0, []
        for lo, part in chunks:
            train, test = _split(part, lo, is_test)
            block.write(at, train)
            at += train.n
            if test is not None:
                held.append(test)
        if held:
            block.write(at, concat(held))
        SparseLogistic.check_labels(block.csr.y, dc.source)
    except BaseException:
        block.close()
        block.unlink()
        raise
    shards = [[lo, hi - lo] for lo, hi in shard_rows(n_train, n_shards)]
    layout = Layout(block=block.spec.to_dict(), shards=shards, columns=[], source=dc.source, heldout=test_rows,
                    extra={"csr": {"n_train": n_train, "n_test": len(test_rows)}})
    return block, layout


class SparseData:
    """A process's view of the block: training rows X (CSR) and y, held-out X_test and y_test, and a `spec` with
    the fields the server reads of a dense block's (d, dtype, n_train, n_test). mean and scale are empty: values
    are used as given."""

    def __init__(self, layout: dict):
        self.block = CSRBlock.attach(layout["block"])
        n_train, n_test = layout["extra"]["csr"]["n_train"], layout["extra"]["csr"]["n_test"]
        csr = self.block.csr
        self.X, self.X_test = csr.rows(0, n_train), csr.rows(n_train, n_train + n_test)
        self.y, self.y_test = self.X.y, self.X_test.y
        self.mean = self.scale = np.zeros(0)
        self.spec = SimpleNamespace(d=csr.d, dtype="float64", n_train=n_train, n_test=n_test)

    def shard(self, offset: int, size: int) -> CSR:
        return self.X.rows(offset, offset + size)

    def close(self) -> None:
        self.X = self.X_test = self.y = self.y_test = None
        self.block.close()
