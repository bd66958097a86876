"""What a launcher hands to each child process it spawns: plain fields only (dicts, lists, strings, numbers), so a
spec pickles for spawn and reads the same in any entry function ("module:function", see proc.run_entry)."""
from __future__ import annotations

from dataclasses import dataclass


RANGES_FILE = "ranges.json"   # in output.dir: the range servers' links after the launcher restarted one (server.shards > 1)


@dataclass(frozen=True)
class ServerSpec:
    cfg: dict                 # Config.to_dict()
    explicit: list            # sorted Config.explicit keys ("section.key")
    layout: dict              # data.Layout.to_dict(): the shared data block and its shards
    out_dir: str
    bind: str | None = None   # address to listen on; None: pick one
    resume: str | None = None  # checkpoint folder to start from
    server_restarts: int = 0  # how many times the launcher has restarted the server before this one
    alone: bool = False       # --role server: workers come from elsewhere (--attach)
    shm_prefix: str = ""      # names of this run's shared-memory segments start with it
    own_core: bool = False    # pinned to a core no worker of this launcher uses: it may busy-poll (server.spin_s)
    cuts: tuple = ()          # server.shards > 1: keyrange.Ranges(cuts), and each range server's address and theta
    ranges: tuple = ()        # segment, ({"address": ..., "theta": ...} for ranges 1 .. S - 1)


@dataclass(frozen=True)
class WorkerSpec:
    address: str
    wid: int                           # -1: the server picks one
    server_timeout_s: float | None = None  # None: the server's setting
    local: bool = True                 # reads the launcher's data block (same machine), else loads its own rows
    prefix: str = ""                   # shared-memory name prefix of this launcher
    keys: str = ""                     # CURVE key folder ("" : no encryption)


@dataclass(frozen=True)
class RangeSpec:
    """What the launcher hands a range server process (server.shards > 1, psrv/rangeserver.py)."""
    cfg: dict
    explicit: list
    rows: int                 # theta's rows (d + 1)
    index: int                # this range: 1 .. S - 1
    cuts: list                # keyrange.Ranges(cuts): the S ranges
    shm_prefix: str
    ckpt_dir: str             # the run's checkpoint folder: this range's checkpoints go in rangeserver.range_dir() of it
