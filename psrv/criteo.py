"""A seeded Criteo-like click data set, so that a realistic sparse job runs offline: 13 numeric fields (log-normal
counts, log1p-transformed) and 26 categorical fields (Zipf-distributed over vocabularies from a few values to about a
million), each feature hashed with splitmix64 of (field, value) into 2**log2_buckets columns: 39 entries per row, fewer
only where two of a row's features share a bucket (their values are then summed, as a hashed model would see them).
Labels come from a planted sparse logistic model whose weights (`weights`, `bias`) are kept for tests.

Like sources.synthetic_rows, rows are generated in fixed chunks, each from its own seed, so any process can
regenerate any rows: rows(lo, hi) equals the same rows of rows(0, n) bit for bit, at a cost of O(hi - lo).

    python -m psrv.criteo --rows 1000000 --log2-buckets 22     # generation speed, rows/s
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from .partition import splitmix64
from .sparse import CSR, CSRBlock, CSRSpec, index_dtype

NUMERIC, CATEGORICAL = 13, 26
FIELDS = NUMERIC + CATEGORICAL
CHUNK_ROWS = 8192


def _field_keys(fields) -> np.ndarray:
    """The first half of a feature's hash, one per field (computed once, not per row)."""
    with np.errstate(over="ignore"):
        return splitmix64(np.asarray(fields, np.uint64))


def _hash(field_key: np.ndarray, value: np.ndarray) -> np.ndarray:
    """splitmix64 of (field, value): the field is mixed first, so equal values of two fields land apart."""
    with np.errstate(over="ignore"):
        return splitmix64(field_key ^ np.asarray(value, np.uint64))


def _zipf(u: np.ndarray, vocab: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Values 0..vocab-1 with P(k) roughly proportional to (k + 1)^-s (the continuous power law on [1, vocab + 1),
    inverted and floored): one uniform draw per value, no table of vocab entries."""
    a = 1.0 - s                                   # s > 1, so a < 0
    u = np.log1p(u * np.expm1(a * np.log1p(vocab)))  # log(1 + u ((vocab + 1)^a - 1)), the per-field part once
    u *= 1.0 / a
    np.exp(u, out=u)
    return np.minimum(u.astype(np.int64) - 1, vocab - 1)


def concat(parts: list[CSR]) -> CSR:
    """Rows of several CSRs one after another (same d)."""
    starts = np.cumsum([0] + [p.nnz for p in parts[:-1]])
    indptr = np.concatenate([[0]] + [p.indptr[1:] + s for p, s in zip(parts, starts)])
    return CSR(indptr, np.concatenate([p.indices for p in parts]), np.concatenate([p.values for p in parts]),
               np.concatenate([p.y for p in parts]), parts[0].d)


class Criteo:
    """The data set of one seed: its fields' distributions, the planted model, and any of its rows."""

    def __init__(self, seed: int = 0, log2_buckets: int = 22, density: float = 0.1, weight_std: float = 0.9,
                 ctr: float = 0.25):
        if not 1 <= log2_buckets <= 40:
            raise ValueError(f"log2_buckets must be in 1..40; got {log2_buckets}")
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1]; got {density}")
        self.seed, self.d = int(seed), 2 ** log2_buckets
        rng = np.random.default_rng([self.seed, 0xC217E0])
        self.vocab = np.exp(rng.uniform(np.log(3), np.log(1e6), CATEGORICAL)).astype(np.int64)
        self.zipf_s = rng.uniform(1.05, 1.6, CATEGORICAL)
        self.count_mu = rng.uniform(0.0, 3.0, NUMERIC)        # log-normal counts: median e^mu
        self.count_sigma = rng.uniform(0.5, 1.5, NUMERIC)
        # a numeric field is one feature (its bucket) with the count as value; log1p(1 + count) is about 1..5
        self._numeric_bucket = (_hash(_field_keys(np.arange(NUMERIC)), 0) & np.uint64(self.d - 1)).astype(np.int64)
        self._cat_keys = _field_keys(np.arange(NUMERIC, FIELDS))
        # the planted model: a `density` share of the buckets carry a weight ~ N(0, weight_std^2), the rest 0.
        # With the defaults the true logits rank their own labels with an AUC of about 0.8 (real click logs give
        # models about that), and a quarter to two fifths of the labels are 1 (the bias alone would give ctr).
        self.weights = rng.standard_normal(self.d) * weight_std * (rng.random(self.d) < density)
        self.bias = float(np.log(ctr / (1.0 - ctr)))

    def _chunk(self, c: int, n: int) -> CSR:
        """Chunk c (rows c * CHUNK_ROWS ..) of a data set of n rows, whole."""
        lo = c * CHUNK_ROWS
        m = min(CHUNK_ROWS, n - lo)
        rng = np.random.default_rng([self.seed, 1, c])
        counts = np.floor(rng.lognormal(self.count_mu, self.count_sigma, (m, NUMERIC)))
        cats = _zipf(rng.random((m, CATEGORICAL)), self.vocab, self.zipf_s)
        b = np.empty((m, FIELDS), dtype=np.int64)
        b[:, :NUMERIC] = self._numeric_bucket
        b[:, NUMERIC:] = (_hash(self._cat_keys, cats) & np.uint64(self.d - 1)).astype(np.int64)
        v = np.ones((m, FIELDS))
        v[:, :NUMERIC] = np.log1p(1.0 + counts)
        # sort each row by bucket (bucket and field packed in one integer: a plain sort, cheaper than argsort),
        # then sum the values of a bucket that occurs more than once
        packed = np.sort(b << 6 | np.arange(FIELDS), axis=1)       # FIELDS < 64
        b = packed >> 6
        v = np.take_along_axis(v, packed & 63, 1)
        first = np.ones((m, FIELDS), dtype=bool)
        first[:, 1:] = b[:, 1:] != b[:, :-1]
        starts = np.flatnonzero(first)
        indptr = np.concatenate([[0], np.cumsum(first.sum(axis=1))])
        csr = CSR(indptr, b.ravel()[starts].astype(index_dtype(self.d)), np.add.reduceat(v.ravel(), starts),
                  np.empty(m), self.d)
        p = 1.0 / (1.0 + np.exp(-self.logits(csr)))
        csr.y = (rng.random(m) < p).astype(np.float64)
        return csr

    def logits(self, csr: CSR) -> np.ndarray:
        """The planted model's logit of each row: bias + x . weights."""
        return self.bias + csr.dot(self.weights)

    def rows(self, lo: int, hi: int, n: int) -> CSR:
        """Rows lo..hi-1 of the data set of n rows. Costs O(hi - lo) whatever lo is."""
        if not 0 <= lo <= hi <= n:
            raise ValueError(f"rows {lo}..{hi} of {n}")
        parts = []
        for c in range(lo // CHUNK_ROWS, -(-hi // CHUNK_ROWS)):
            c_lo = c * CHUNK_ROWS
            parts.append(self._chunk(c, n).rows(max(lo, c_lo) - c_lo, min(hi, c_lo + CHUNK_ROWS) - c_lo))
        return concat(parts) if parts else CSR(np.zeros(1, np.int64), np.zeros(0, index_dtype(self.d)),
                                               np.zeros(0), np.zeros(0), self.d)

    def to_block(self, name: str, n: int, step_rows: int = 16 * CHUNK_ROWS) -> CSRBlock:
        """A new shared-memory block of all n rows (the caller unlinks it), generated step_rows at a time so only
        those are ever held outside the segment. Room is made for 39 entries a row; collisions leave a little
        unused."""
        block = CSRBlock.create(CSRSpec(name, n, self.d, FIELDS * n, "float64", index_dtype(self.d)))
        try:
            for lo in range(0, n, step_rows):
                block.write(lo, self.rows(lo, min(lo + step_rows, n), n))
        except BaseException:
            block.close()
            block.unlink()
            raise
        return block


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m psrv.criteo", description="Generation speed of the Criteo-like "
                                "data set: rows/s, one process, in chunks of --step rows.")
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--log2-buckets", type=int, default=22)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=16 * CHUNK_ROWS)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    gen = Criteo(a.seed, a.log2_buckets)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    nnz = pos = 0
    for lo in range(0, a.rows, a.step):
        part = gen.rows(lo, min(lo + a.step, a.rows), a.rows)
        nnz, pos = nnz + part.nnz, pos + int(part.y.sum())
    gen_s = time.perf_counter() - t0
    print(f"{a.rows} rows, 2^{a.log2_buckets} buckets: {a.rows / gen_s:,.0f} rows/s ({gen_s:.2f} s; setup "
          f"{setup_s:.2f} s), {nnz / a.rows:.3f} entries/row, positive share {pos / a.rows:.3f}")


if __name__ == "__main__":
    main()
