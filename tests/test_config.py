import tomllib

import pytest

from psrv import config
from psrv.errors import ConfigError

from .conftest import ROOT


def test_default_toml_is_generated_from_the_dataclasses():
    # configs/default.toml is the defaults, written out with comments; they must never drift apart
    assert (ROOT / "configs" / "default.toml").read_text() == config.defaults_toml()


def test_every_key_has_a_doc():
    cfg = config.Config()
    text = config.to_toml(cfg, comments=True)
    for key in config.keys():
        section, name = key.split(".")
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{name} = ") or ln.startswith(f"{name} ="))
        assert "#" in line, key


def test_precedence_defaults_file_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[train]\nlr = 0.2\nsteps = 7\n")
    cfg = config.load(p, ["train.lr=0.3", ("data", "n", 50), ("train", "batch_size", config.Train().batch_size)])
    assert cfg.train.lr == 0.3          # override beats file
    assert cfg.train.steps == 7         # file beats default
    assert cfg.train.batch_size == config.Train().batch_size
    assert cfg.data.n == 50
    # what differs from the defaults counts as chosen; repeating a default chooses nothing
    assert cfg.explicit == {"train.lr", "train.steps", "data.n"}


def test_the_default_file_chooses_nothing():
    assert config.load(ROOT / "configs" / "default.toml").explicit == frozenset()


def test_dict_source_and_int_for_float():
    cfg = config.load({"train": {"lr": 1}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize("override,expected", [
    ("data.source=my file.csv", "my file.csv"),   # bare strings need no quotes
    ('data.source="x.npz"', "x.npz"),
    ("data.standardize=false", False),
    ("train.steps=12", 12),
])
def test_override_values_are_read_as_toml(override, expected):
    section, key, _ = override.split("=")[0].split(".") + [None]
    cfg = config.load(None, [override])
    assert getattr(getattr(cfg, section), key) == expected


@pytest.mark.parametrize("tree,needle", [
    ({"train": {"lrr": 0.1}}, "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ({"trian": {"lr": 0.1}}, "unknown section [trian] (did you mean 'train'?)"),
    ({"train": {"lr": "fast"}}, "train.lr: expected a number, got 'fast'"),
    ({"train": {"steps": 1.5}}, "train.steps: expected an integer"),
    ({"train": {"steps": True}}, "train.steps: expected an integer"),
    ({"data": {"standardize": 1}}, "data.standardize: expected true or false"),
    ({"data": {"partition": "round"}}, "data.partition: must be one of 'range', 'hash'; got 'round'"),
    ({"train": {"steps": 0}}, "train.steps: must be >= 1"),
    ({"train": {"lr": float("nan")}}, "train.lr: expected a finite number"),
    ({"train": 3}, "train: expected a [train] table"),
    ({"train": {"local_steps": 4, "optimizer": "adam"}}, "train.local_steps: local SGD needs train.optimizer = 'sgd'"),
    ({"train": {"local_steps": 4}}, "train.local_steps: local SGD needs train.lr_schedule = 'constant'"),
    ({"train": {"group_steps": 4, "consistency": "asp"}}, "train.group_steps: group steps need train.consistency = 'bsp'"),
    ({"train": {"group_steps": 4, "optimizer": "ftrl"}}, "train.group_steps: group steps need a dense optimizer"),
    ({"train": {"group_steps": 1025}}, "train.group_steps: must be <= 1024"),
    ({"train": {"group_steps": 4, "local_steps": 2, "lr_schedule": "constant"}},
     "train.group_steps: group steps need train.local_steps = 1"),
    ({"train": {"group_steps": 4}, "worker": {"shm": False}}, "train.group_steps: group steps need worker.shm = True"),
    ({"train": {"group_steps": 2, "workers": 3, "backup_workers": 1}},
     "train.group_steps: group steps need train.backup_workers = 0"),
])
def test_bad_configs_name_the_key(tree, needle):
    with pytest.raises(ConfigError) as e:
        config.load(tree)
    assert needle in str(e.value)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        config.load(None, ["lr=0.1"])


def test_missing_and_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)


def test_to_toml_round_trips():
    cfg = config.load(None, ["data.source=a \"quoted\" path.csv", "train.lr=0.125", "output.dir=x/y"])
    again = config.load(tomllib.loads(config.to_toml(cfg)))
    assert again.to_dict() == cfg.to_dict()


def test_shipped_configs_load():
    for p in (ROOT / "configs").glob("*.toml"):
        config.load(p)


def test_force_applies_only_to_resume(capsys):
    from psrv.launch import main
    assert main(["--force"]) == 2
    assert "--force only applies to --resume" in capsys.readouterr().err
