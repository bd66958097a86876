"""Inputs that cannot train what the user meant are refused (exit 2) or warned about, in plain words, with what to do:
softmax on a continuous target, train.lr = 0, class labels that skip 0, a batch larger than a shard."""
import json
import logging

import numpy as np
import pytest

import psrv
from psrv import config, launch, models
from psrv.errors import ConfigError, DataError

from .conftest import build


def npz(tmp_path, X, y, name="d.npz"):
    p = tmp_path / name
    np.savez(p, X=X, y=y)
    return str(p)


def run_cli(capsys, *args):
    rc = launch.main(list(args))
    return rc, capsys.readouterr().err


def test_softmax_on_a_continuous_target_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = npz(tmp_path, rng.standard_normal((50, 2)), rng.standard_normal(50) * 3 + 10)
    rc, err = run_cli(capsys, "--set", f"data.source={src}", "--set", "model.kind=softmax", "--set", "train.workers=1",
                      "--set", f"output.dir={tmp_path / 'o'}")
    assert rc == 2
    assert "model.kind = 'softmax' needs integer labels 0..K-1" in err
    assert "the target looks continuous: use model.kind = 'linear'" in err
    with pytest.raises(DataError, match="looks continuous"):
        models.make("softmax", 1, classes=3).check_labels(np.array([0, 1.5]), "f")


def test_lr_zero_is_refused(capsys):
    with pytest.raises(ConfigError, match=r"train.lr: must be > 0 \(at 0.0 theta would never move\)"):
        config.load(None, ["train.lr=0"])
    rc, err = run_cli(capsys, "--set", "train.lr=0")
    assert rc == 2 and "train.lr: must be > 0" in err


@pytest.mark.parametrize("kind,y,needle", [
    ("logistic", [1, 2, 1, 2], "labels start at 1, not 0: subtract 1, or write them as text labels"),
    ("logistic", [-1, 1, -1, 1], "map -1 to 0"),
    ("softmax", [0, 2.5, 1, 0], "looks continuous"),
    ("softmax", [0, -1, 1, 0], "the first is row 1 with -1"),
])
def test_labels_a_classifier_cannot_take_say_what_to_do(kind, y, needle):
    y = np.array(y, dtype=float)
    with pytest.raises(DataError, match=needle):
        if kind == "softmax":
            models.infer_classes(y, "f")
        else:
            models.make(kind, 1).check_labels(y, "f")


def test_softmax_labels_that_skip_a_class_are_warned_about(tmp_path, made, caplog):
    y = np.array([1, 2, 3, 1, 2, 3, 5, 1.0])   # no 0 and no 4
    c = config.load({"data": {"source": npz(tmp_path, np.arange(16.0).reshape(8, 2), y)},
                     "model": {"kind": "softmax"}})
    b, layout = build(c, 1, made)
    with caplog.at_level(logging.WARNING, logger="psrv"):
        assert launch.check_model(c, b, layout) == 6
    [rec] = [r for r in caplog.records if "learned from no example" in r.getMessage()]
    assert "no training row has label 0, 4" in rec.getMessage() and "relabel them 0..K-1" in rec.getMessage()
    assert models.missing_classes(np.array([0, 1, 2.0]), 3) == []


def test_batch_used_is_capped_by_the_largest_shard():
    from psrv.report import batch_used
    assert batch_used(512, [100, 101]) == 101
    assert batch_used(64, [100, 101]) == 64
    assert batch_used(64, []) == 64


@pytest.mark.slow
def test_batch_larger_than_a_shard_is_warned_and_summary_records_the_batch_used(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="psrv"):
        r = psrv.train({"data": {"n": 120, "d": 3}, "train": {"workers": 2, "steps": 5, "batch_size": 512},
                        "output": {"dir": str(tmp_path / "o"), "plot": False}})
    msgs = [rec.getMessage() for rec in caplog.records]
    assert any("train.batch_size = 512 is larger than every shard (the smallest has 60 rows)" in m for m in msgs)
    assert r.summary["batch_size"] == 60
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["batch_size"] == 60
    assert r.summary["samples"] == 5 * 2 * 60   # every batch was a whole shard
