"""Quality of a binary model's scores: ROC AUC and log loss, pure numpy (metrics.py is the metrics.jsonl writer).

Both take labels in {0, 1}. AUC takes any scores whose order means something (logits or probabilities give the same
value); log loss takes probabilities, or logits through log_loss_logits, which never rounds p to 0 or 1.
"""
from __future__ import annotations

import numpy as np


def _labels(y) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be a vector, got shape {y.shape}")
    if y.dtype != bool and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    return y.astype(bool)


def auc(y, score) -> float:
    """The area under the ROC curve: the probability that a random positive scores above a random negative, a tie
    counting one half (the Mann-Whitney U statistic over n_pos * n_neg). O(n log n): one sort, tied scores given
    their average rank. ValueError when only one class is present, where AUC is undefined."""
    pos = _labels(y)
    score = np.asarray(score, dtype=np.float64)
    if score.shape != pos.shape:
        raise ValueError(f"{len(pos)} labels but scores of shape {score.shape}")
    if np.isnan(score).any():
        raise ValueError("scores contain NaN")
    n_pos = int(pos.sum())
    n_neg = len(pos) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUC needs both classes; got {n_pos} positive and {n_neg} negative labels")
    order = np.argsort(score, kind="stable")
    s = score[order]
    # a run of equal scores occupies ranks first+1 .. last+1 (1-based); each member gets their mean
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    ends = np.append(starts[1:], len(s))
    mean_rank = (starts + 1 + ends) / 2.0
    ranks = np.repeat(mean_rank, ends - starts)
    rank_sum_pos = float(ranks[pos[order]].sum())   # integers and halves below 2**53: exact
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def log_loss(y, p, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood of labels under probabilities p of the positive class, p clipped to
    [eps, 1 - eps] so that one confident mistake costs -log(eps) instead of infinity."""
    pos = _labels(y)
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    if p.shape != pos.shape:
        raise ValueError(f"{len(pos)} labels but probabilities of shape {p.shape}")
    return float(-np.mean(np.where(pos, np.log(p), np.log1p(-p))))


def log_loss_logits(y, z) -> float:
    """log_loss of p = sigmoid(z), computed from the logits as log(1 + e^z) - y z: exact where p would round to
    0 or 1, so no clipping is needed."""
    pos = _labels(y)
    z = np.asarray(z, dtype=np.float64)
    if z.shape != pos.shape:
        raise ValueError(f"{len(pos)} labels but logits of shape {z.shape}")
    return float(np.mean(np.logaddexp(0.0, z) - np.where(pos, z, 0.0)))
