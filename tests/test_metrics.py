"""psrv/metrics.py: what is kept in memory stays bounded, and the plateau test and plots see what they saw before."""
import json
import random

import pytest

from psrv.metrics import PLOT_POINTS, Metrics, Thinned


def old_plateaued(losses, tol, window):
    """The rule as it was, over the list of every logged loss."""
    if tol <= 0 or len(losses) <= window:
        return False
    before = min(losses[:-window])
    recent = min(losses[-window:])
    return before - recent <= tol * abs(before)


def log(m, step, loss):
    m.log_train(step, step / 100, step, loss)


@pytest.mark.parametrize("tol,window", [(0.0, 5), (0.01, 1), (0.01, 5), (0.2, 3), (0.05, 40)])
def test_plateaued_agrees_with_the_list_rule(tmp_path, tol, window):
    rng = random.Random(window)
    m = Metrics(str(tmp_path / "m.jsonl"), tol=tol, tol_window=window)
    losses = []
    loss = 10.0
    for step in range(1, 600):
        # mostly falling, sometimes jumping up, sometimes flat: both answers occur
        loss = loss * rng.choice([0.9, 0.999, 1.0, 1.3]) if step % 97 else -loss
        losses.append(loss)
        log(m, step, loss)
        assert m.plateaued() == old_plateaued(losses, tol, window), step
        assert m.last_loss == loss
    assert m.train == [(s, s / 100, x) for s, x in zip(range(1, 600), losses)]   # a short run: every line
    m.close()
    lines = [json.loads(x) for x in open(tmp_path / "m.jsonl")]
    assert [x["loss"] for x in lines] == losses


def test_memory_stays_bounded_over_a_million_lines(tmp_path, monkeypatch):
    m = Metrics(str(tmp_path / "m.jsonl"), tol=0.01, tol_window=5)
    written = []
    monkeypatch.setattr(m, "_write", lambda rec: written.append(1))   # the file is not what this test measures
    n = 1_000_000
    for step in range(1, n + 1):
        log(m, step, 1.0 / step)
        if step % 1000 == 0:
            m.log_eval(step, step / 100, 1.0 / step, 0.5, "accuracy")
    assert len(written) == n + n // 1000
    train = m.train
    assert len(train) <= PLOT_POINTS and len(m._train.kept) < PLOT_POINTS and len(m._window) == 5
    assert train[0][0] == 1 and train[-1][0] == n and m.last_loss == 1.0 / n      # first and last kept
    gaps = {b[0] - a[0] for a, b in zip(train[:-1], train[1:-1])}
    assert len(gaps) == 1 and len(train) > PLOT_POINTS // 2                      # evenly thinned, not starved
    assert len(m.test) <= PLOT_POINTS and m.test[-1][0] == n
    assert m.plateaued() == old_plateaued([1.0 / s for s in range(1, n + 1)], 0.01, 5)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 9, 100, 1000])
def test_thinned_keeps_first_last_and_at_most_cap(n):
    t = Thinned(8)
    for i in range(n):
        t.append(i)
    p = t.points()
    assert len(p) <= 8 and (p[0], p[-1]) == (0, n - 1) if n else p == []
    assert p == list(range(n)) if n < 8 else len(p) >= 4
    assert len({b - a for a, b in zip(p[:-1], p[1:-1])}) <= 1


def test_lines_are_strict_json_even_for_a_number_that_is_not_finite(tmp_path):
    m = Metrics(str(tmp_path / "m.jsonl"))
    m.log_eval(3, 0.5, float("inf"), float("nan"), "r2")
    m.close()
    line = (tmp_path / "m.jsonl").read_text()
    assert "Infinity" not in line and "NaN" not in line
    assert json.loads(line)["test_loss"] is None
