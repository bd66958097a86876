"""The job a checkpoint belongs to, and whether a resumed run is that job (pure: plain values in, differences out).

A checkpoint records the job's identity: the model (kind, intercept), the data (source, seed, shape, shard sizes
and a checksum of the training rows as the server holds them), the consistency mode and the optimizer. Resuming
compares it with the new run's: any difference is refused (ResumeMismatch, a config error: exit 2) naming the key,
unless the run sets checkpoint.resume_force (`launch.py --resume --force`), the deliberate change. A different
shape cannot be forced: theta and the shard cursors would not fit.
"""
from __future__ import annotations

import os
import struct
import zlib

from .errors import ConfigError

# in the order a refusal names them: the first difference is "the key"
KEYS = ("model.kind", "model.fit_intercept", "train.consistency", "train.optimizer", "data.source", "data.seed",
        "data.shape", "data.shards", "data.checksum")
UNFORCEABLE = frozenset({"data.shape", "data.shards"})


class ResumeMismatch(ConfigError):
    """The checkpoint is another job's. `key`: the first config key that differs; `kind`: how a child process
    reports it to its launcher ("config": exit 2)."""
    kind = "config"

    def __init__(self, path: str, diffs: list[tuple[str, object, object]], forceable: bool = True):
        self.path, self.diffs, self.key, self.forceable = path, diffs, diffs[0][0], forceable
        what = "; ".join(f"{k} was {_show(saved)}, now {_show(now)}" for k, saved, now in diffs)
        hint = ("resume with --force (checkpoint.resume_force = true) to change it deliberately" if forceable else
                "a checkpoint of another shape cannot be resumed, even with --force")
        super().__init__(f"--resume: {path} is another job: {what}; {hint}")


def _show(v) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def source_name(source: str) -> str:
    """"synthetic", or a data file's name (not its folder: a run resumed from elsewhere names the same file)."""
    return source if source == "synthetic" else os.path.basename(source)


def data_checksum(shard_checksums: list[int]) -> int:
    """One CRC-32 over the shards' own (data.checksum of each shard's standardized rows), in shard order."""
    return zlib.crc32(b"".join(struct.pack("<I", c & 0xFFFFFFFF) for c in shard_checksums))


def job_identity(cfg, n_train: int, n_test: int, d: int, shard_sizes: list[int], checksum: int) -> dict:
    dc = cfg.data
    ident = {"model.kind": cfg.model.kind, "model.fit_intercept": cfg.model.fit_intercept,
             "train.consistency": cfg.train.consistency, "train.optimizer": cfg.train.optimizer,
             "data.source": source_name(dc.source), "data.shape": [n_train, n_test, d],
             "data.shards": list(shard_sizes), "data.checksum": checksum}
    # the seed makes the rows only for synthetic data, and picks the held-out rows; a file's rows ignore it
    ident["data.seed"] = dc.seed if dc.source == "synthetic" or dc.test_fraction > 0 else None
    return ident


def compare(saved: dict, now: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every key that differs, in KEYS order. A key the checkpoint does not
    record (an older format) is not compared."""
    return [(k, saved[k], now.get(k)) for k in KEYS if k in saved and saved[k] != now.get(k)]


def check(path: str, saved: dict | None, now: dict, force: bool) -> list[tuple[str, object, object]]:
    """Raise ResumeMismatch unless the checkpoint's identity is this run's (or force allows the change); returns the
    differences that were forced."""
    if saved is None:
        return []
    diffs = compare(saved, now)
    hard = [d for d in diffs if d[0] in UNFORCEABLE]
    if hard:
        raise ResumeMismatch(path, hard, forceable=False)
    if diffs and not force:
        raise ResumeMismatch(path, diffs)
    return diffs
