"""How child processes are started: typed specs, entry functions named "module:function", and the one-way rule that
psrv never imports the workers package (workers depend on psrv; the launcher names their entry)."""
import ast
import json
import pickle

import numpy as np
import pytest

from psrv import config
from psrv.errors import ConfigError
from psrv.schedule import Cursor
from psrv.spec import ServerSpec, WorkerSpec
from workers import faults
from workers.worker import _next_batch

from .conftest import ROOT


def imported_modules(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_psrv_never_imports_the_workers_package():
    offenders = [(p.name, m) for p in sorted((ROOT / "psrv").rglob("*.py")) for m in imported_modules(p)
                 if m == "workers" or m.startswith("workers.")]
    assert offenders == []


def test_specs_survive_pickle_and_are_frozen():
    for spec in (ServerSpec({"train": {}}, ["train.steps"], {"block": {}}, "/tmp/out", shm_prefix="p_"),
                 WorkerSpec("tcp://127.0.0.1:5555", 3, server_timeout_s=2.0, local=False, keys="k")):
        assert pickle.loads(pickle.dumps(spec)) == spec
        with pytest.raises(AttributeError):
            spec.out_dir = "elsewhere"  # frozen (dataclasses.FrozenInstanceError is an AttributeError)


@pytest.mark.parametrize("entry", ["workers.worker", "workers.worker:", "workers worker:main", ":main",
                                   "workers..worker:main"])
def test_worker_entry_must_name_a_function(entry):
    with pytest.raises(ConfigError, match="worker.entry"):
        config.load(None, [f"worker.entry={entry}"])
    assert config.load(None, [f"worker.entry={faults.ENTRY}"]).worker.entry == faults.ENTRY


def test_next_batch_guess_follows_the_servers_cursor():
    # the batch a worker gathers ahead is the one the server's cursor hands out next, across epoch ends
    for size, batch_size in [(10, 4), (10, 5), (10, 10), (10, 20), (1, 1), (7, 3), (256, 100)]:
        cursor = Cursor(size=size)
        served = [[7, *cursor.take(batch_size)] for _ in range(3 * size // batch_size + 4)]
        for this, after in zip(served, served[1:]):
            assert _next_batch(this, size, batch_size) == after


@pytest.mark.parametrize("text,message", [
    ("{fail_worker: 1}", "not JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"fail_wroker": 1}', "unknown key(s) fail_wroker"),
    ('{"slow_ms": -1}', "slow_ms = -1"),
    ('{"nan_steps": [1.5]}', "nan_steps"),
    ('{"fail_worker": true}', "fail_worker = True"),
    ('{"hold_file": 3}', "hold_file = 3"),
])
def test_malformed_faults_are_a_clear_error(text, message):
    with pytest.raises(ValueError, match="PSRV_FAULTS") as e:
        faults.Faults.parse(text)
    assert message in str(e.value)


def test_faults_from_the_environment():
    f = faults.Faults.parse(faults.env(fail_worker=1, fail_at_step=5, nan_steps=[3])[faults.ENV])
    assert (f.fail_worker, f.fail_at_step, f.nan_steps, f.slow_worker) == (1, 5, (3,), -1)
    assert faults.Faults.parse("") == faults.Faults()
    assert json.loads(faults.env(slow_worker=0, slow_ms=2)[faults.ENV]) == {"slow_worker": 0, "slow_ms": 2}


def test_faulty_worker_hook_fails_slows_and_breaks_only_its_worker():
    f = faults.Faults(fail_worker=1, fail_at_step=5, nan_worker=1, nan_steps=(2,))
    for wid in (0, 1):
        w = faults.FaultyWorker(f, "tcp://127.0.0.1:9", wid)  # never connects: only the hook is called
        try:
            grad = np.zeros(3)
            w.after_gradient(2, grad)
            assert np.isnan(grad).all() == (wid == 1)
            if wid == 1:
                with pytest.raises(faults.Injected, match="injected failure at step 6"):
                    w.after_gradient(6, grad)
            else:
                w.after_gradient(6, grad)
        finally:
            w.close()


def test_a_held_worker_waits_at_its_step_until_the_file_is_gone_and_only_a_first_incarnation_kills(tmp_path):
    import threading
    hold = tmp_path / "hold"
    hold.touch()
    f = faults.Faults(hold_worker=1, hold_at_step=3, hold_file=str(hold), kill_worker=1, kill_at_step=5)
    w = faults.FaultyWorker(f, "tcp://127.0.0.1:9", 1)   # never connects: only the hook is called
    other = faults.FaultyWorker(f, "tcp://127.0.0.1:9", 0)
    try:
        w.after_gradient(2, np.zeros(3))                  # another step, another worker: no wait
        other.after_gradient(3, np.zeros(3))
        held = threading.Thread(target=w.after_gradient, args=(3, np.zeros(3)), daemon=True)
        held.start()
        held.join(0.2)
        assert held.is_alive()                            # still waiting for the file to go
        hold.unlink()
        held.join(30)
        assert not held.is_alive()
        # (_kills_at, not after_gradient: the kill is a real SIGKILL)
        w.client.inc = 1
        assert w._kills_at(5) and not w._kills_at(4) and not other._kills_at(5)
        w.client.inc = 2                                  # a restart of it, handed step 5 again, lives on
        assert not w._kills_at(5)
    finally:
        hold.unlink(missing_ok=True)
        w.close()
        other.close()


def test_a_workers_entry_resolves_to_the_installed_name_when_there_is_no_workers_package(tmp_path, monkeypatch):
    """Installed from the wheel, the repository's workers/ is psrv_workers: `worker.entry = "workers.worker:main"`
    (the default) must still load, and only when no `workers` package is importable."""
    import sys

    from psrv import proc
    pkg = tmp_path / "psrv_workers"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "worker.py").write_text("def main():\n    return 'installed'\n")
    (pkg / "broken.py").write_text("import no_such_module_here\ndef main():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert proc.load_entry("workers.worker:main") is sys.modules["workers.worker"].main   # a checkout: workers/
    for name in [m for m in sys.modules if m == "workers" or m.startswith("workers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "workers", None)        # as if no `workers` package were importable
    assert proc.load_entry("workers.worker:main")() == "installed"
    with pytest.raises(ModuleNotFoundError, match="no_such_module_here"):   # its own import errors show as such
        proc.load_entry("workers.broken:main")
    with pytest.raises(ModuleNotFoundError):                 # only names under workers. are mapped
        proc.load_entry("workerz.worker:main")
