"""The documents must say what the code does: protocol tables, error codes, README commands."""
import ast
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from psrv import protocol

from .conftest import ROOT

DOC = (ROOT / "docs" / "protocol.md").read_text()


def table_rows(heading):
    section = DOC.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `(\w+)` \| (.*?) \|", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_every_message_and_field_is_documented():
    for heading, table in (("## Requests", protocol.REQUESTS), ("## Replies", protocol.REPLIES)):
        rows = table_rows(heading)
        assert set(rows) == {str(op.value) for op in table}, heading
        for op, (fields, _) in table.items():
            documented = set(re.findall(r"`(\w+)`", rows[op.value]))
            assert set(fields) <= documented, (op, set(fields) - documented)


def error_codes_in_code():
    """The code argument of every ProtocolError(...) raised in psrv/."""
    codes = set()
    for path in (ROOT / "psrv").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ProtocolError" \
                    and len(node.args) == 2:
                codes.add(node.args[1].value)
    return codes


def test_every_error_code_is_documented():
    codes = error_codes_in_code()
    assert {"bad_dtype", "bad_frames", "stale_incarnation", "quarantined"} <= codes  # the scan sees them all
    documented = set(re.findall(r"`(\w+)`", DOC.split("### Error codes", 1)[1].split("\n## ", 1)[0]))
    assert codes and codes <= documented, codes - documented


def test_readme_opens_with_the_two_commands_that_ci_runs():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(block) == 2 and block[0].endswith("launch.py") and "pytest" in block[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert block[1].split("&& ", 2)[-1] in ci or block[1] in ci


def walkthrough_blocks():
    """The README walk-through's code blocks, in order: (language, code)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Walk-through", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, re.S)


@pytest.mark.slow
def test_readme_walkthrough_runs_as_written(tmp_path):
    """Every block of the walk-through, exactly as written, in a fresh folder holding what it names (launch.py and
    the data files); then its results against an independent computation from theta.npy and data.json."""
    blocks = walkthrough_blocks()
    assert [lang for lang, _ in blocks] == ["python", "bash", "python", "python"]
    (tmp_path / "launch.py").symlink_to(ROOT / "launch.py")
    (tmp_path / "tests" / "data").mkdir(parents=True)
    for name in ("patients.csv", "patients_new.csv"):
        shutil.copy(ROOT / "tests" / "data" / name, tmp_path / "tests" / "data" / name)
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}  # `python` is this one
    out = []
    for lang, code in blocks:
        cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
        p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (code, p.stdout, p.stderr)
        out.append(p.stdout)

    # the oracle: the new rows read here with the csv module, missing inputs replaced by data.json's means,
    # the logistic rule of docs/models.md applied to theta.npy
    run = tmp_path / "runs" / "patients"
    theta, saved = np.load(run / "theta.npy"), json.loads((run / "data.json").read_text())
    with open(tmp_path / "tests" / "data" / "patients_new.csv", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    X = np.array([[float(v) if v not in ("", "NA") else np.nan for v in r[1:11]] for r in rows])
    X = np.where(np.isnan(X), saved["impute_means"], X)
    truth = np.array([r[11] for r in rows])
    pred = np.array(saved["classes"])[(X @ theta[:-1] + theta[-1] > 0).astype(int)]
    accuracy = float(np.mean(pred == truth))
    assert accuracy > 0.85
    written = (tmp_path / "predictions.csv").read_text().splitlines()
    assert written[0] == "prediction" and written[1:] == pred.tolist()
    assert f"accuracy {accuracy:.6g} on 100 rows" in out[1]
    assert f"{accuracy:.3f}" in out[2]
    pipeline_accuracy = float(out[3].split()[-1])
    assert abs(pipeline_accuracy - accuracy) < 0.05
