import os

import numpy as np
import pytest

from psrv import blocks, sources
from psrv.errors import DataError
from psrv.sparse import CSR, CSRBlock, CSRSpec, read_svmlight_csr, shard_rows


def _svm(tmp_path, text, name="d.svm"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def random_csr(seed, n=40, d=25):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)) * (rng.random((n, d)) < 0.2)
    X[3] = 0                                    # a row without entries
    ptr = np.concatenate([[0], np.cumsum((X != 0).sum(axis=1))])
    r, c = np.nonzero(X)
    return CSR(ptr, c.astype(np.int32), X[r, c], rng.normal(size=n), d), X


@pytest.mark.parametrize("text,d,name", [
    ("# a header comment\n1 1:0.5 3:-2   # trailing comment 9:9\n\n-1 qid:7 2:1e3\n   \n0.25\n2 3:4 1:1\n", 0,
     "d.libsvm"),
    ("1 0:1 2:3\n0 1:2\n", 0, "d.txt"),
    ("1 1:1\n0 2:2\n1 1:3\n", 4, "d.svmlight"),
    ("1 5:1 2:2 9:3 1:4\n0 7:1 3:2\n2 4:nan\n", 0, "d.svm"),   # unsorted rows, a NaN kept as the dense reader does
])
def test_csr_reader_equals_the_dense_reader(tmp_path, text, d, name):
    p = _svm(tmp_path, text, name)
    X, y, cols = sources.read_file(p, d=d)
    csr, first = read_svmlight_csr(p, d)
    np.testing.assert_array_equal(csr.to_dense(), X)
    np.testing.assert_array_equal(csr.y, y)
    assert cols[0] == f"x{first}" and csr.d == X.shape[1]
    assert csr.nnz == np.count_nonzero(X)      # every entry stored once (NaN counts as non-zero)
    for i in range(csr.n):                      # columns increase within every row
        assert (np.diff(csr.indices[csr.indptr[i]:csr.indptr[i + 1]]) > 0).all()


@pytest.mark.parametrize("text,d", [
    ("1 1:2\nx 1:2\n", 0), ("1 1:2\n\n# c\n1 1-2\n", 0), ("1 a:2\n", 0), ("1 1.5:2\n", 0), ("1 -1:2\n", 0),
    ("1 1:two\n", 0), ("1 1:\n", 0), ("1 qid:a 1:1\n", 0), ("1 2:1 2:3\n", 0), ("# only a comment\n\n", 0),
    ("1\n0\n", 0), ("1 1:1\n0 2:2\n", 1), ("1 3:1 0:2\n", 3),
])
def test_csr_reader_refuses_what_the_dense_reader_refuses_with_the_same_message(tmp_path, text, d):
    p = _svm(tmp_path, text, "bad.svm")
    with pytest.raises(DataError) as dense:
        sources.read_file(p, d=d)
    with pytest.raises(DataError) as sparse:
        read_svmlight_csr(p, d)
    assert str(sparse.value) == str(dense.value) and "bad.svm" in str(sparse.value)


def test_csr_reader_reads_a_file_the_dense_reader_refuses_for_its_width(tmp_path, monkeypatch):
    p = _svm(tmp_path, "1 1:1 4000000000:2\n0 7:3\n")
    monkeypatch.setattr(sources, "available_memory_bytes", lambda: 10_000)
    with pytest.raises(DataError, match="would need .* GiB dense .*read_svmlight_csr"):
        sources.read_file(p)
    csr, first = read_svmlight_csr(p)
    assert (csr.d, first, csr.indices.dtype) == (4_000_000_000, 1, np.int64)   # past 2**31: 64-bit indices
    np.testing.assert_array_equal(csr.indptr, [0, 2, 3])
    np.testing.assert_array_equal(csr.indices, [0, 3_999_999_999, 6])
    np.testing.assert_array_equal(csr.values, [1, 2, 3])


@pytest.mark.parametrize("seed", range(4))
def test_row_slices_and_products_match_the_dense_matrix(seed):
    csr, X = random_csr(seed)
    w = np.random.default_rng(seed).normal(size=X.shape[1])
    np.testing.assert_allclose(csr.dot(w), X @ w, rtol=1e-12, atol=1e-12)
    for lo, hi in [(0, 40), (3, 4), (5, 5), (17, 39)]:
        part = csr.rows(lo, hi)
        np.testing.assert_array_equal(part.to_dense(), X[lo:hi])
        assert part.indptr[0] == 0 and part.n == hi - lo
        assert np.shares_memory(part.values, csr.values) or part.nnz == 0   # a view, never a gather
    with pytest.raises(IndexError):
        csr.rows(5, 41)


def test_block_in_shared_memory_owner_attach_shards_and_sweep():
    csr, X = random_csr(7)
    with blocks.owned_prefix() as owner:
        block = CSRBlock.from_csr(owner.prefix + "csr", csr)
        path = f"/dev/shm/{block.name}"
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        other = CSRBlock.attach(block.spec.to_dict())
        np.testing.assert_array_equal(other.csr.to_dense(), X)
        np.testing.assert_array_equal(other.csr.y, csr.y)
        spans = shard_rows(csr.n, 3)
        assert spans[0][0] == 0 and spans[-1][1] == csr.n and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        for s, (lo, hi) in enumerate(spans):
            np.testing.assert_array_equal(other.shard(s, 3).to_dense(), X[lo:hi])
        other.unlink()                               # not the owner: a no-op
        assert os.path.exists(path)
        with pytest.raises(ValueError, match="its spec needs"):
            CSRBlock.attach(CSRSpec(block.name, csr.n, csr.d, 10 * csr.nnz + 1000))
        other.close()
        block.close()                                # left for the prefix's owner to remove
    assert not os.path.exists(path)


def test_block_written_in_chunks_equals_one_copy():
    csr, X = random_csr(8)
    name = blocks.run_prefix() + "chunks"
    with CSRBlock.create(CSRSpec(name, csr.n, csr.d, csr.nnz + 5)) as block:   # room to spare is fine
        for lo, hi in [(0, 7), (7, 8), (8, 30), (30, 40)]:
            block.write(lo, csr.rows(lo, hi))
        np.testing.assert_array_equal(block.csr.to_dense(), X)
        assert block.csr.nnz == csr.nnz
        with pytest.raises(ValueError, match="do not fit"):
            block.write(35, csr.rows(0, 10))
    assert not os.path.exists(f"/dev/shm/{name}")
