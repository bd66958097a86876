"""Writing a run's outputs: strict JSON (null where a number is not finite: no Infinity, no NaN), and any failure to
write named by its file or folder (a full disk says where)."""
from __future__ import annotations

import contextlib
import json
import math
import os

from .errors import RunError


def num(v):
    """A float for a JSON output: null where it is not finite (strict JSON has no Infinity or NaN)."""
    return v if not isinstance(v, float) or math.isfinite(v) else None


def strict(obj):
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return num(obj)


@contextlib.contextmanager
def writing(what: str, path: str):
    """An output that cannot be written (a full disk, a folder gone) is a run error naming the file or folder."""
    try:
        yield
    except OSError as e:
        raise RunError("server", f"cannot write {what} {path}: {e.strerror or e}") from None


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(strict(obj), indent=2, allow_nan=False) + "\n")


def write_text(path: str, text: str) -> None:
    """Written under another name and renamed: whoever reads `path` (another process, as soon as it exists) finds
    it whole, never empty or cut short."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
