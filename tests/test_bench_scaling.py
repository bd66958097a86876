"""benchmarks/scaling.py's pure parts: which worker counts and modes a run measures (the measurements themselves
run in `python -m benchmarks`, never in the tests: no wall-clock assertions here)."""
import pytest

from benchmarks import scaling


def test_worker_counts_reach_cores_minus_one_and_add_two_on_two_cores():
    assert scaling.worker_counts(16) == [1, 2, 4, 8, 15]
    assert scaling.worker_counts(16, quick=True) == [1, 2, 15]
    assert scaling.worker_counts(2) == [1, 2]


def test_the_modes_env_keeps_only_the_named_modes_in_their_order_and_refuses_unknown_names():
    modes = scaling.psrv_modes()
    names = [m for m, _ in modes]
    assert scaling.chosen_modes(modes, "") == modes
    kept = scaling.chosen_modes(modes, " groupK, bsp ")
    assert [m for m, _ in kept] == [m for m in names if m in ("bsp", "groupK")]
    assert dict(kept)["groupK"] == dict(modes)["groupK"]
    with pytest.raises(ValueError, match=r"unknown mode\(s\) \['bspp'\]"):
        scaling.chosen_modes(modes, "bsp,bspp")
