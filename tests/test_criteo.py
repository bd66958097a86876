import os

import numpy as np
import pytest

from psrv import blocks
from psrv.criteo import CATEGORICAL, CHUNK_ROWS, FIELDS, NUMERIC, Criteo, _hash, _field_keys, _zipf
from psrv.metrics_binary import auc
from psrv.partition import splitmix64

N = 2 * CHUNK_ROWS + 1000


@pytest.fixture(scope="module")
def gen():
    return Criteo(seed=3, log2_buckets=14)


@pytest.fixture(scope="module")
def whole(gen):
    return gen.rows(0, N, N)


def _same(a, b):
    for k in ("indptr", "indices", "values", "y"):
        x, y = getattr(a, k), getattr(b, k)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_chunked_generation_equals_whole_generation_bit_for_bit(gen, whole):
    cuts = [0, 1, 999, CHUNK_ROWS - 1, CHUNK_ROWS, CHUNK_ROWS + 5, 2 * CHUNK_ROWS + 3, N]
    from psrv.criteo import concat
    _same(concat([gen.rows(a, b, N) for a, b in zip(cuts, cuts[1:])]), whole)
    _same(gen.rows(7000, 9000, N), whole.rows(7000, 9000))          # across a chunk boundary
    _same(Criteo(seed=3, log2_buckets=14).rows(0, N, N), whole)      # another process: the same rows
    assert not np.array_equal(Criteo(seed=4, log2_buckets=14).rows(0, 100, N).indices, whole.rows(0, 100).indices)


def test_rows_are_39_hashed_features_with_collisions_summed(gen, whole):
    X = whole.rows(0, 2000)
    per_row = np.diff(X.indptr)
    assert per_row.max() == FIELDS and per_row.min() >= FIELDS - 3
    assert whole.nnz / whole.n > FIELDS - 0.1                 # collisions are rare in 2**14 buckets ... and exist
    assert (per_row < FIELDS).any()
    assert X.indices.min() >= 0 and X.indices.max() < gen.d
    for i in range(X.n):                                      # sorted, distinct buckets within a row
        assert (np.diff(X.indices[X.indptr[i]:X.indptr[i + 1]]) > 0).all()
    # each row's values add up to its 26 categorical ones plus its 13 numeric log1p(1 + count) >= log 2
    sums = np.add.reduceat(X.values, X.indptr[:-1])
    assert (sums >= CATEGORICAL + NUMERIC * np.log(2) - 1e-9).all()
    assert set(np.unique(whole.y)) == {0.0, 1.0}


def test_hash_is_splitmix64_of_field_then_value():
    f, v = np.array([17], np.uint64), np.array([123456], np.uint64)
    with np.errstate(over="ignore"):
        assert _hash(_field_keys(f), v) == splitmix64(splitmix64(f) ^ v)
    assert _hash(_field_keys(13), 5) != _hash(_field_keys(14), 5)


def test_zipf_values_stay_in_the_vocabulary_and_follow_a_power_law():
    rng = np.random.default_rng(0)
    u = rng.random((200_000, 2))
    vocab, s = np.array([5, 1_000_000]), np.array([1.3, 1.3])
    k = _zipf(u, vocab, s)
    assert k.min() == 0 and k[:, 0].max() == 4 and k[:, 1].max() < 1_000_000
    # P(k) ~ (k + 1)^-s for ranks well inside the range: frequency ratio of ranks 10 and 20 is 2^1.3 = 2.46
    counts = np.bincount(k[:, 1], minlength=100)
    ratio = counts[9:12].sum() / counts[19:22].sum()
    assert 2.1 < ratio < 2.9


def test_labels_follow_the_planted_model(gen, whole):
    z = gen.logits(whole)
    assert 0.15 < whole.y.mean() < 0.45                      # a click-through-like share of positives
    assert auc(whole.y, z) > 0.72                             # the true logits rank the labels they drew
    assert abs(whole.y.mean() - np.mean(1 / (1 + np.exp(-z)))) < 0.02   # calibrated
    w = gen.weights
    assert 0.05 < np.mean(w != 0) < 0.15                      # sparse: about `density` of the buckets


def test_to_block_holds_the_same_rows_in_shared_memory(gen, whole):
    with blocks.owned_prefix() as owner:
        block = gen.to_block(owner.prefix + "criteo", N, step_rows=5000)
        _same(block.csr, whole)
        path = f"/dev/shm/{block.name}"
        assert os.path.exists(path)
        block.close()
    assert not os.path.exists(path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="log2_buckets"):
        Criteo(log2_buckets=0)
    with pytest.raises(ValueError, match="rows 5..4"):
        Criteo(log2_buckets=4).rows(5, 4, 10)
