"""Resume checks the job's identity (psrv/identity.py): pure comparisons, then the server refusing a checkpoint of
another job in process (a config error naming the key), and outputs that name their path when they cannot be
written. The real-process resume test is in tests/test_trust.py."""
from __future__ import annotations

import errno
import json
import os

import pytest

from psrv import checkpoint, config, data, blocks, identity
from psrv.errors import ConfigError, RunError
from psrv.identity import ResumeMismatch
from psrv.server import Server


def ident(**changes):
    cfg = config.load({"data": {"n": 100, "d": 3}})
    base = identity.job_identity(cfg, 100, 0, 3, [50, 50], 1234)
    return {**base, **changes}


# ---------------------------------------------------------------------------------------------------- pure
def test_the_same_job_compares_equal():
    assert identity.compare(ident(), ident()) == []
    assert identity.check("ck", ident(), ident(), force=False) == []


@pytest.mark.parametrize("key, value", [
    ("model.kind", "logistic"), ("model.fit_intercept", False), ("train.consistency", "asp"),
    ("train.optimizer", "adam"), ("data.source", "other.csv"), ("data.seed", 7), ("data.checksum", 99)])
def test_each_difference_is_refused_naming_its_key_unless_forced(key, value):
    with pytest.raises(ResumeMismatch) as e:
        identity.check("runs/a/checkpoints", ident(), ident(**{key: value}), force=False)
    assert isinstance(e.value, ConfigError) and e.value.kind == "config" and e.value.key == key
    assert key in str(e.value) and "--force" in str(e.value) and "runs/a/checkpoints" in str(e.value)
    assert identity.check("ck", ident(), ident(**{key: value}), force=True) == [(key, ident()[key], value)]


def test_the_first_key_named_is_the_model_then_the_mode_then_the_data():
    diffs = identity.compare(ident(), ident(**{"data.seed": 1, "model.kind": "logistic", "train.consistency": "asp"}))
    assert [k for k, _, _ in diffs] == ["model.kind", "train.consistency", "data.seed"]


def test_another_shape_cannot_be_forced():
    with pytest.raises(ResumeMismatch) as e:
        identity.check("ck", ident(), ident(**{"data.shards": [60, 40], "model.kind": "logistic"}), force=True)
    assert e.value.key == "data.shards" and not e.value.forceable and "cannot be resumed" in str(e.value)


def test_a_checkpoint_without_identity_is_not_checked():
    assert identity.check("ck", None, ident(), force=False) == []
    assert identity.compare({"model.kind": "linear"}, ident(**{"data.seed": 5})) == []   # only the keys it has


def test_data_identity_follows_the_rows():
    cfg = config.load({"data": {"source": "/a/b/train.csv"}})
    assert identity.job_identity(cfg, 1, 0, 1, [1], 0)["data.source"] == "train.csv"   # its name, not its folder
    assert identity.job_identity(cfg, 1, 0, 1, [1], 0)["data.seed"] is None          # a file's rows ignore it
    cfg = config.load({"data": {"source": "/a/b/train.csv", "test_fraction": 0.1, "seed": 3}})
    assert identity.job_identity(cfg, 1, 0, 1, [1], 0)["data.seed"] == 3             # it picks the held-out rows
    assert identity.data_checksum([1, 2]) != identity.data_checksum([2, 1])


# ---------------------------------------------------------------------------------------------------- the server
@pytest.fixture
def make_server(tmp_path):
    made = []

    def make(out, **sections):
        tree = {"data": {"n": 400, "d": 3}, "train": {"workers": 2, "steps": 5}}
        for k, v in sections.items():
            tree.setdefault(k, {}).update(v)
        cfg = config.load(tree)
        block, layout = data.build(cfg, 2, blocks.run_prefix() + f"id{len(made)}")
        made.append(block)
        return lambda resume=None: Server(cfg, layout.to_dict(), str(out), resume=resume)

    yield make
    for b in made:
        b.close()
        b.unlink()


def test_the_server_refuses_a_checkpoint_of_another_model_kind_naming_it(make_server, tmp_path):
    srv = make_server(tmp_path / "a", data={"seed": 1})()
    srv.save_checkpoint()
    srv.close()
    ckpts = str(tmp_path / "a" / "checkpoints")
    with pytest.raises(ResumeMismatch) as e:
        make_server(tmp_path / "b", data={"seed": 1}, model={"kind": "logistic", "fit_intercept": True},
                    train={"optimizer": "adam"})(ckpts)
    assert e.value.key == "model.kind" and "train.optimizer was 'sgd', now 'adam'" in str(e.value)
    with pytest.raises(ResumeMismatch) as e:
        make_server(tmp_path / "c", data={"seed": 2})(ckpts)             # another synthetic data set
    assert e.value.key == "data.seed" and [k for k, _, _ in e.value.diffs] == ["data.seed", "data.checksum"]
    # a deliberate change: theta carries over, the new optimizer starts afresh
    forced = make_server(tmp_path / "d", data={"seed": 1}, train={"optimizer": "adam", "consistency": "asp"},
                         checkpoint={"resume_force": True})(ckpts)
    assert forced.resumed_from and forced.store.opt.name == "adam"
    forced.close()


def test_a_checkpoint_that_cannot_be_written_names_its_folder(make_server, tmp_path, monkeypatch):
    srv = make_server(tmp_path / "a")()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(checkpoint, "save", full)
    try:
        with pytest.raises(RunError) as e:
            srv.save_checkpoint()
    finally:
        srv.close()
    assert e.value.cause == f"cannot write a checkpoint in {tmp_path / 'a' / 'checkpoints'}: No space left on device"


def test_summary_json_is_strict(tmp_path):
    from psrv.outputs import write_json
    path = str(tmp_path / "s.json")
    write_json(path, {"a": float("inf"), "b": [1.0, float("nan")], "c": {"d": -float("inf")}, "e": "x"})
    with open(path) as fh:
        assert json.loads(fh.read(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}")) == \
            {"a": None, "b": [1.0, None], "c": {"d": None}, "e": "x"}
    assert not os.path.exists(path + ".tmp")
