"""psrv as installed from its wheel, not run from a checkout: what it installs, and that it runs from elsewhere."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from psrv import config

from .conftest import ROOT
from .test_models import png_width


@pytest.mark.slow
def test_the_wheel_installs_only_psrv_and_runs_a_job_from_outside_the_repository(tmp_path):
    # build from a copy of the sources, so the checkout gets no build/ or egg-info; benchmarks/ is copied too, so
    # that leaving it out is the project's doing, not its absence
    src = tmp_path / "src"
    for name in ("psrv", "workers", "benchmarks", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "results*"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(dist), str(src)], check=True, capture_output=True, timeout=300, cwd=tmp_path)
    (wheel,) = dist.glob("psrv-*.whl")
    with zipfile.ZipFile(wheel) as z:
        top = {n.split("/")[0] for n in z.namelist() if ".dist-info/" not in n}
        meta = next(z.read(n).decode() for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    assert top == {"psrv", "psrv_workers"}                      # not benchmarks, not a generic `workers`
    assert "Requires-Dist: matplotlib" in meta                   # loss.png by default
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    # -S: no .pth files, so the checkout's editable install cannot supply psrv or workers; the dependencies come
    # from this interpreter's site-packages, named on the path instead
    paths = sysconfig.get_paths()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), paths["purelib"], paths["platlib"]])}
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()

    def py(*args, timeout_s=240):
        return subprocess.run([sys.executable, "-S", *args], capture_output=True, text=True, env=env, cwd=run_dir,
                              timeout=timeout_s)

    where = py("-c", "import importlib.util as u, psrv; print(psrv.__file__, u.find_spec('workers'))").stdout
    assert where == f"{site / 'psrv' / '__init__.py'} None\n"
    r = py("-m", "psrv", "--defaults")
    assert r.returncode == 0 and r.stdout == config.defaults_toml(), r.stderr
    r = subprocess.run([str(site / "bin" / "psrv"), "--defaults"], capture_output=True, text=True, env=env,
                       cwd=run_dir, timeout=60)                  # the console script
    assert r.returncode == 0 and r.stdout == config.defaults_toml(), r.stderr
    r = py("-m", "psrv", "-q", "--set", "data.n=3000", "--set", "data.d=5", "--set", "train.workers=1",
           "--set", "train.steps=40", "--set", "data.test_fraction=0.2", "--set", "output.dir=out")
    assert r.returncode == 0, r.stderr
    assert "done (steps): 40 steps" in r.stdout
    out = run_dir / "out"
    assert (out / "theta.npy").exists()
    assert png_width(out / "loss.png") == 1500                   # with the held-out metric's panel
