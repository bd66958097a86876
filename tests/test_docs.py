"""The documents must say what the code does: protocol tables, error codes, README commands."""
import ast
import re

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
