"""Sparse rows: CSR arrays (indptr, indices, values, y), one named shared-memory segment holding them, row-range
shards as contiguous CSR slices, and an svmlight/libsvm reader that fills CSR without densifying.

The block follows blocks.py: the creator (the launcher, under its owned_prefix) makes and unlinks it, everyone else
attaches by name, and a run's prefix sweep removes it with its other segments. A shard of rows lo..hi-1 is
indices/values[indptr[lo]:indptr[hi]]: views, read in place, never gathered.
"""
from __future__ import annotations

import array
import zlib
from dataclasses import asdict, dataclass
from multiprocessing import shared_memory

import numpy as np

from . import sources
from .blocks import _ALIGN, Segment
from .partition import layout
from .shmarray import release


@dataclass
class CSR:
    """Rows of a sparse matrix: row i holds values[indptr[i]:indptr[i+1]] at columns indices[...] (increasing
    within a row), and label y[i]; d columns in all. indptr starts at 0 (a slice is rebased)."""
    indptr: np.ndarray
    indices: np.ndarray
    values: np.ndarray
    y: np.ndarray
    d: int

    @property
    def n(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def rows(self, lo: int, hi: int) -> "CSR":
        """Rows lo..hi-1: indices, values and y are views; indptr (hi - lo + 1 numbers) is rebased to 0."""
        if not 0 <= lo <= hi <= self.n:
            raise IndexError(f"rows {lo}..{hi} of a CSR of {self.n} rows")
        a, b = int(self.indptr[lo]), int(self.indptr[hi])
        return CSR(self.indptr[lo:hi + 1] - a, self.indices[a:b], self.values[a:b], self.y[lo:hi], self.d)

    def row_of_entry(self) -> np.ndarray:
        """The row of each stored entry (nnz numbers), for per-row sums with np.bincount."""
        return np.repeat(np.arange(self.n), np.diff(self.indptr))

    def dot(self, w: np.ndarray) -> np.ndarray:
        """X @ w for a vector w of d weights."""
        return np.bincount(self.row_of_entry(), weights=self.values * w[self.indices], minlength=self.n)

    def take(self, idx: np.ndarray) -> "CSR":
        """Rows idx (any order, repeats allowed) gathered into a new CSR: O(their entries), never O(d)."""
        idx = np.asarray(idx, dtype=np.int64)
        starts = self.indptr[idx]
        lengths = self.indptr[idx + 1] - starts
        indptr = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        # entry j of output row i is input entry starts[i] + j: one arange shifted per row
        pos = np.arange(int(indptr[-1]), dtype=np.int64) + np.repeat(starts - indptr[:-1], lengths)
        return CSR(indptr, self.indices[pos], self.values[pos], self.y[idx], self.d)

    def checksum(self) -> int:
        """CRC-32 of the rows (indptr rebased to 0, indices, values, y; C order, little endian): what data.checksum
        is for a dense shard."""
        crc = zlib.crc32(np.ascontiguousarray(self.indptr - self.indptr[0], dtype="<i8").data)
        for a in (self.indices, self.values, self.y):
            crc = zlib.crc32(np.ascontiguousarray(a).data, crc)
        return crc

    def to_dense(self) -> np.ndarray:
        X = np.zeros((self.n, self.d), dtype=self.values.dtype)
        X[self.row_of_entry(), self.indices] = self.values
        return X


def index_dtype(d: int) -> str:
    """The narrowest column-index type for d columns: half the bytes of int64 for any hashed space up to 2**31."""
    return "int32" if d <= 2**31 else "int64"


def shard_rows(n: int, shards: int) -> list[tuple[int, int]]:
    """(lo, hi) of each row-range shard: partition.py's "range" rule, so sparse and dense shards agree."""
    return [(o, o + s) for o, s in layout(np.arange(n), shards, "range")[1]]


@dataclass(frozen=True)
class CSRSpec:
    name: str
    n: int                # rows
    d: int                # columns (hash buckets)
    nnz: int              # room for this many entries; the rows use indptr[-1] of them
    dtype: str = "float64"
    index_dtype: str = "int32"

    def to_dict(self) -> dict:
        return asdict(self)

    def offsets(self) -> tuple[dict[str, tuple[int, int, str]], int]:
        """{part: (byte offset, length, dtype)} and the segment's size; every part starts on a cache line."""
        out, pos = {}, 0
        for key, length, dtype in (("indptr", self.n + 1, "int64"), ("indices", self.nnz, self.index_dtype),
                                   ("values", self.nnz, self.dtype), ("y", self.n, self.dtype)):
            out[key] = (pos, length, dtype)
            pos += -(-length * np.dtype(dtype).itemsize // _ALIGN) * _ALIGN
        return out, max(pos, _ALIGN)


class CSRBlock(Segment):
    """CSR arrays over one shared-memory segment. `csr` sees the stored rows; `shard(s, k)` a row range of them."""

    def __init__(self, spec: CSRSpec, shm: shared_memory.SharedMemory, owner: bool):
        self.spec, self._shm, self.owner = spec, shm, owner
        parts, _ = spec.offsets()
        self.arrays = {k: np.ndarray((length,), dtype=dt, buffer=shm.buf, offset=off)
                       for k, (off, length, dt) in parts.items()}

    @classmethod
    def create(cls, spec: CSRSpec) -> "CSRBlock":
        _, nbytes = spec.offsets()
        shm = shared_memory.SharedMemory(name=spec.name, create=True, size=nbytes)  # mode 0600
        block = cls(spec, shm, owner=True)
        block.arrays["indptr"][:] = 0   # an unfilled block reads as rows without entries
        return block

    @classmethod
    def attach(cls, spec: CSRSpec | dict) -> "CSRBlock":
        if isinstance(spec, dict):
            spec = CSRSpec(**spec)
        shm = shared_memory.SharedMemory(name=spec.name)
        need = spec.offsets()[1]
        if shm.size < need:   # a spec that does not describe this segment would read past its end
            shm.close()
            raise ValueError(f"shared memory {spec.name} holds {shm.size} bytes; its spec needs {need}")
        return cls(spec, shm, owner=False)

    @classmethod
    def from_csr(cls, name: str, csr: CSR, dtype: str = "float64") -> "CSRBlock":
        """A new block holding a copy of csr's rows (the caller unlinks it)."""
        block = cls.create(CSRSpec(name, csr.n, csr.d, csr.nnz, dtype, index_dtype(csr.d)))
        try:
            block.write(0, csr)
        except BaseException:
            block.close()
            block.unlink()
            raise
        return block

    def write(self, lo: int, part: CSR) -> None:
        """Store `part` as rows lo.., after rows 0..lo-1 (written before it): chunks from a generator or a reader
        go straight into the segment."""
        a, ptr = self.arrays, self.arrays["indptr"]
        start = int(ptr[lo])
        if lo + part.n > self.spec.n or start + part.nnz > self.spec.nnz or part.d != self.spec.d:
            raise ValueError(f"{part.n} rows with {part.nnz} entries and d = {part.d} do not fit {self.spec} "
                             f"at row {lo} (entry {start})")
        a["indices"][start:start + part.nnz] = part.indices
        a["values"][start:start + part.nnz] = part.values
        a["y"][lo:lo + part.n] = part.y
        ptr[lo + 1:lo + part.n + 1] = part.indptr[1:] + start

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def csr(self) -> CSR:
        a = self.arrays
        nnz = int(a["indptr"][-1])   # the room past it (spec.nnz) is unused
        return CSR(a["indptr"], a["indices"][:nnz], a["values"][:nnz], a["y"], self.spec.d)

    def shard(self, s: int, shards: int) -> CSR:
        return self.csr.rows(*shard_rows(self.spec.n, shards)[s])

    def close(self) -> None:
        self.arrays = {}
        release(self._shm, owner=False)


def read_svmlight_csr(path: str, d: int = 0) -> tuple[CSR, int]:
    """(rows as CSR, the file's first index: 0 or 1) of an svmlight/libsvm file, never densified: memory is
    O(non-zeros). The same rules and messages as the dense reader (sources.py checks every token first: index base,
    data.d, comments, qid, duplicates); columns are counted from 0 (column j is the file's index j + first) and
    sorted within each row. NaN values are kept, as the dense reader keeps them."""
    n, d, zero_based = sources._svm_scan(path, d)
    indptr = np.zeros(n + 1, dtype=np.int64)
    y = np.empty(n, dtype=np.float64)
    cols, vals = array.array("q"), array.array("d")
    for i, label, row_cols, row_vals in sources._svm_rows(path, n, zero_based):
        y[i] = label
        cols.extend(row_cols)
        vals.extend(row_vals)
        indptr[i + 1] = len(cols)
    indices = np.frombuffer(cols, dtype=np.int64).astype(index_dtype(d))
    values = np.frombuffer(vals, dtype=np.float64).copy()
    csr = CSR(indptr, indices, values, y, d)
    # files usually list a row's indices in order; sort (by row, then column) only when one does not
    row = csr.row_of_entry()
    if (np.diff(indices.astype(np.int64)) <= 0)[row[1:] == row[:-1]].any():
        order = np.lexsort((indices, row))
        csr.indices, csr.values = indices[order], values[order]
    return csr, 0 if zero_based else 1
