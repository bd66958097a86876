import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss, roc_auc_score

from psrv.metrics_binary import auc, log_loss, log_loss_logits


def _pairs_auc(y, s):
    """The definition, O(n_pos * n_neg): every positive-negative pair, ties counting one half."""
    p, n = s[y == 1], s[y == 0]
    d = p[:, None] - n[None, :]
    return ((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size


@pytest.mark.parametrize("seed", range(6))
def test_auc_matches_sklearn_and_the_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    y = rng.integers(0, 2, n)
    y[:2] = [0, 1]
    # few distinct values, so many ties within and across classes
    s = rng.integers(0, int(rng.integers(1, 8)), n) + (0.3 * y if seed % 2 else 0)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auc(y, s) == pytest.approx(_pairs_auc(y, s.astype(float)), abs=1e-12)


def test_auc_extremes_and_invariance():
    y = np.array([0, 0, 1, 1])
    assert auc(y, [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc(y, [0.4, 0.3, 0.2, 0.1]) == 0.0
    assert auc(y, [1, 1, 1, 1]) == 0.5
    s = np.array([-3.0, 0.5, 0.2, 2.0])
    assert auc(y, s) == auc(y, 1 / (1 + np.exp(-s)))   # any increasing map of the scores
    assert auc(y.astype(bool), s) == auc(y, s)


@pytest.mark.parametrize("y,s,needle", [
    ([1, 1], [0.1, 0.2], "both classes"), ([0, 2], [0.1, 0.2], "0 or 1"),
    ([0, 1], [0.1], "labels but scores"), ([0, 1], [0.1, np.nan], "NaN")])
def test_auc_refuses_what_it_cannot_score(y, s, needle):
    with pytest.raises(ValueError, match=needle):
        auc(y, s)


def test_log_loss_matches_sklearn_and_the_logit_form():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    z = rng.normal(0, 3, 500)
    p = 1 / (1 + np.exp(-z))
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p), rel=1e-12)
    assert log_loss_logits(y, z) == pytest.approx(log_loss(y, p), rel=1e-10)


def test_log_loss_logits_stays_finite_where_p_rounds_to_one():
    # sigmoid(800) is 1.0 in float64; the logit form still charges a wrong label its true cost of ~800
    assert log_loss_logits([0], [800.0]) == pytest.approx(800.0)
    assert 30 < log_loss([0], [1.0]) < 40       # clipped at 1 - 1e-15: about -log(1e-15) = 34.5
    assert log_loss_logits([1, 0], [800.0, -800.0]) == 0.0
