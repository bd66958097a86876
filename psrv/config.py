"""The configuration: one dataclass per TOML section, the only place defaults live.

load() merges defaults < file < overrides and checks every key and type; it never touches data or sockets.
`python launch.py --defaults` prints them as commented TOML; that is how configs/default.toml is made.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
from .protocol import is_local


def opt(default, doc: str, choices: tuple | None = None, lo: float | None = None, hi: float | None = None,
        check=None):
    """A config field: its default, a one-line doc (unit, range) and the checks load() applies. `check(value)`
    returns an error message, or None when the value is fine."""
    meta = {"doc": doc, "choices": choices, "lo": lo, "hi": hi, "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


SPARSE_MODELS = ("sparse_logistic",)
SHARDED_DENSE = ("linear", "logistic")   # dense models server.shards > 1 runs: a theta of d + 1 rows
BUILTIN_MODELS = ("linear", "logistic", "softmax") + SPARSE_MODELS
SPARSE_SOURCES = ("criteo",)   # generators of sparse rows (psrv/criteo.py); svmlight files are read sparse too


def _below_one(v: float) -> str | None:
    return None if 0 <= v < 1 else f"must be in [0, 1) (1 would divide by zero); got {v!r}"


def _positive(v: float) -> str | None:
    return None if v > 0 else f"must be > 0; got {v!r}"


def _lr(v: float) -> str | None:
    return None if v > 0 else f"must be > 0 (at {v!r} theta would never move); got {v!r}"


def _model_kind(v: str) -> str | None:
    if v in BUILTIN_MODELS or (":" in v and all(p.strip() for p in v.split(":", 1))):
        return None
    return (f"must be one of {', '.join(repr(k) for k in BUILTIN_MODELS)}, or 'package.module:Name' for a model "
            f"of your own; got {v!r}")


def _entry(v: str) -> str | None:
    module, _, function = v.partition(":")
    if all(p.isidentifier() for p in module.split(".")) and function.isidentifier():
        return None
    return f"must name a function as 'package.module:function'; got {v!r}"


def _column_key(v) -> str | None:
    if isinstance(v, int) and v < 0:
        return f"a column index is 0-based, >= 0; got {v!r}"
    return None


def _column_list(v: list) -> str | None:
    for k in v:
        if isinstance(k, bool) or not isinstance(k, (str, int)) or k == "":
            return f"expected a list of column names (strings) or 0-based indices; got {k!r} in {v!r}"
        if (problem := _column_key(k)):
            return problem
    return None


def _header(v) -> str | None:
    return None if isinstance(v, bool) or v == "auto" else f'must be true, false or "auto"; got {v!r}'


def _delimiter(v: str) -> str | None:
    if v == "" or (len(v) == 1 and v not in "\r\n\"'"):
        return None
    return f'must be one character (e.g. ";" or "\\t"), or "" to sniff it; got {v!r}'


@dataclass
class Data:
    source: str = opt("synthetic", 'where rows come from: "synthetic", or a .npz (X, y), .npy (X; y in data.labels), '
                                   '.csv or svmlight (.svm, .libsvm, .txt) file; "arrays" records a run given '
                                   'in-memory arrays (psrv.train(X=..., y=...)), which no config can reload; '
                                   '"criteo": seeded Criteo-like sparse rows (model.kind = "sparse_logistic")')
    n: int = opt(200_000, "synthetic (and criteo) rows (for a file: checked against it when set to another value)",
                 lo=1)
    d: int = opt(50, "feature columns (for a file: checked against it when set to another value)", lo=1)
    noise: float = opt(0.5, "synthetic label noise: standard deviation added to y = X.w + b", lo=0)
    seed: int = opt(0, "seed of the synthetic (and criteo) generator", lo=0)
    log2_buckets: int = opt(20, 'criteo: features are hashed into 2^log2_buckets columns (theta has that many rows '
                            'and one more, the bias)', lo=1, hi=40)
    target: str | int = opt("", 'CSV column holding y: its name, or its 0-based index as an integer; "" means the '
                            'last column', check=_column_key)
    header: bool | str = opt("auto", 'CSV: whether the first row names the columns; "auto": it does when it has text '
                             'over a column of numbers (else columns are named by index, "0", "1", ...)',
                             check=_header)
    delimiter: str = opt("", 'CSV field delimiter; "" sniffs it among , ; tab | (else ",")', check=_delimiter)
    columns: list = opt([], 'CSV input columns, by name or 0-based index, in this order; [] means every column but '
                        'the target and data.drop_columns', check=_column_list)
    drop_columns: list = opt([], "CSV columns never read (an id, free text), by name or 0-based index",
                             check=_column_list)
    labels: str = opt("", "for a .npy source: the .npy file holding y")
    test_fraction: float = opt(0.0, "share of rows held out (at random, by data.seed) for evaluation", lo=0, hi=0.9)
    test_source: str = opt("", "a separate file of held-out rows, read like data.source (same columns), evaluated "
                           "instead of data.test_fraction's rows (set one or the other); \"\" means none")
    nan_policy: str = opt("error", "rows with NaN or Inf (a CSV's missing fields): stop with an error naming the "
                          "first, drop them, or impute: replace inputs by their mean over the training rows (rows "
                          "without a target are dropped)", choices=("error", "drop", "impute"))
    standardize: bool = opt(True, "scale features internally for SGD; outputs still apply to the data as given")
    partition: str = opt("range", "rows -> shards: contiguous blocks, or a stable hash of the row index",
                         choices=("range", "hash"))
    batch_order: str = opt("rows", "rows: a batch gathers random rows of its shard; blocks: rows are shuffled once "
                           "at load and a batch is a random block of consecutive rows, read in place (faster)",
                           choices=("rows", "blocks"))
    shards: int = opt(0, "shards the training rows are cut into; 0 means one per worker (train.workers)",
                      lo=0, hi=1024)
    worker_copy: str = opt("auto", "auto: a worker on the server's machine copies the rows of the shards it reads "
                           "from shared memory into its own memory, where the kernel gives them huge pages (shared "
                           "memory gets 4 KiB pages, and a batch's random rows then cost a TLB miss each: python -m "
                           "benchmarks --only scaling compares bsp with bsp-inplace), within 1.5 x its share of the training rows, and only if all the "
                           "workers' copies (1.5 x the training rows' bytes) fit in half of the memory available; the "
                           "rest it reads in place. The data is then held about twice. off: always in place (one "
                           "copy of the data in all)", choices=("auto", "off"))
    dtype: str = opt("float64", "dtype of X, y and theta in shared memory and on the wire",
                     choices=("float64", "float32"))


@dataclass
class Model:
    kind: str = opt("linear", 'linear (squared loss), logistic (labels 0/1), softmax (labels 0..K-1), '
                    'sparse_logistic (labels 0/1 over sparse rows: data.source "criteo" or an svmlight file; '
                    'docs/sparse.md), or "package.module:Name" (docs/models.md)', check=_model_kind)
    fit_intercept: bool = opt(True, "learn an intercept (stored last in theta.npy)")
    l2: float = opt(0.0, "L2 penalty: adds l2/2 * |w|^2 to the mean loss (the intercept is not penalized; "
                    "train.optimizer = \"ftrl\": FTRL's own L2, on every key)", lo=0)
    classes: int = opt(0, "softmax: number of classes; 0 means 1 + the largest training label", lo=0, hi=100_000)


@dataclass
class Train:
    workers: int = opt(0, "worker processes; 0 means one per usable CPU core", lo=0, hi=1024)
    batch_size: int = opt(512, "rows per mini-batch per worker (a batch never spans two epochs of a shard)", lo=1)
    lr: float = opt(0.05, "learning rate (peak rate when a schedule is set), > 0", check=_lr)
    lr_schedule: str = opt("cosine", "how lr changes with the step: constant, step decay, 1/sqrt(1+step), cosine",
                           choices=("constant", "step", "inv_sqrt", "cosine"))
    lr_decay: float = opt(0.5, '"step" schedule: lr is multiplied by this every lr_decay_every steps', lo=0, hi=1)
    lr_decay_every: int = opt(1000, '"step" schedule: steps between decays', lo=1)
    lr_min: float = opt(0.0, '"cosine" schedule: the rate reached at the last step', lo=0)
    steps: int = opt(4000, "optimizer steps; each worker pushes one gradient per step (unlimited when only "
                     "train.epochs is set)", lo=1)
    epochs: int = opt(0, "passes over every shard; 0 means no limit (the run stops by train.steps)", lo=0)
    tol: float = opt(0.0, "stop when the logged training loss improves by less than this fraction over "
                     "tol_window log lines; 0 turns it off", lo=0, hi=1)
    tol_window: int = opt(5, "log lines (of train.log_every steps) that train.tol looks back over", lo=1)
    max_wall_s: float = opt(0.0, "stop after this many seconds of training; 0 turns it off", lo=0)
    seed: int = opt(0, "seed of the mini-batch order (and theta's initial value where it is random)", lo=0)
    consistency: str = opt("bsp", "bsp: each step waits for every live worker; ssp: a worker may run at most "
                           "train.staleness steps ahead of the slowest; asp: never wait", choices=("bsp", "ssp", "asp"))
    staleness: int = opt(2, "ssp: how many steps the fastest worker may be ahead of the slowest; 0 is BSP",
                         lo=0, hi=1_000_000)
    backup_workers: int = opt(0, "bsp: apply each step with the first workers - k gradients; later ones are "
                              "dropped and counted", lo=0)
    optimizer: str = opt("sgd", "server-side optimizer (ftrl: FTRL-Proximal, train.lr is its alpha)",
                         choices=("sgd", "momentum", "adagrad", "adam", "ftrl"))
    local_steps: int = opt(1, "local SGD: each worker takes this many plain SGD steps (one batch_size batch each, at "
                           "train.lr) on its own copy of theta between pushes, each gradient clipped to train.clip_norm "
                           "and model.l2's term added as the server would, and pushes their sum, so a BSP step "
                           "averages the workers' models; 1: one push per batch", lo=1, hi=1_000_000)
    group_steps: int = opt(1, "BSP among the workers on the server's machine through shared memory: each push covers "
                           "up to this many steps, in each of which the workers average their gradients themselves "
                           "and apply the mean at the step's rate with train.optimizer's rule (from the server's "
                           "state; not ftrl), each gradient clipped to train.clip_norm and model.l2's term added as "
                           "the server would (psrv/group.py); the result is BSP's, with one server round trip per "
                           "group_steps steps; train.steps, the schedule and the logs still count BSP's steps; 1: "
                           "every step goes through the server; at most 1024 (each reply lists its steps' rates)",
                           lo=1, hi=1024)
    momentum: float = opt(0.9, "momentum: the velocity's decay", lo=0, hi=1)
    nesterov: bool = opt(False, "momentum: use Nesterov's look-ahead form")
    beta1: float = opt(0.9, "adam: decay of the first-moment average, in [0, 1)", check=_below_one)
    beta2: float = opt(0.999, "adam: decay of the second-moment average, in [0, 1)", check=_below_one)
    eps: float = opt(1e-8, "adagrad and adam: added to the denominator, > 0", check=_positive)
    ftrl_beta: float = opt(1.0, "ftrl: beta of the per-coordinate rate alpha / (beta + sqrt(n))", lo=0)
    l1: float = opt(0.0, "ftrl: L1 penalty (weights stay exactly 0 until their evidence outweighs it)", lo=0)
    clip_norm: float = opt(0.0, "scale each pushed gradient down to at most this L2 norm; 0 turns it off", lo=0)
    eval_every: int = opt(0, "steps between held-out evaluations (data.test_fraction > 0); 0: only at the end",
                          lo=0)
    schedule: str = opt("static", "static: each worker reads the shards it holds a lease on; dynamic: every "
                        "batch goes to whoever asks, from the least-read shard", choices=("static", "dynamic"))
    max_restarts: int = opt(2, "times the launcher restarts each worker that dies (killed, not raising)", lo=0)
    log_every: int = opt(10, "steps between entries in metrics.jsonl", lo=1)
    pin: bool = opt(True, "pin each process to one CPU core, round-robin over the usable cores")
    blas_threads: int = opt(1, "BLAS threads per process", lo=1, hi=256)


@dataclass
class Server:
    bind: str = opt("tcp://127.0.0.1:0", 'address the server binds; port 0 picks a free port; "ipc:///path" also works; '
                    "an address other machines can reach needs server.keys or server.insecure")
    keys: str = opt("", "CURVE: a key folder from `launch.py --keygen DIR`; only clients allowed there may talk to "
                        "the server, and traffic is encrypted")
    insecure: bool = opt(False, "allow a bind other machines can reach without server.keys (anyone could connect)")
    max_bad_pushes: int = opt(3, "a worker whose pushes are refused this many times in a row (non-finite gradient or "
                              "loss, an outlier norm, or a stall past server.progress_deadline_s) is quarantined", lo=1)
    max_grad_ratio: float = opt(1000.0, "refuse a pushed gradient whose L2 norm is more than this many times the "
                                "typical accepted one (the median over workers of their median of the last 16; from "
                                "the run's 17th accepted push on): never applied, counted like a non-finite one; 0 "
                                "turns it off", lo=0)
    progress_deadline_s: float = opt(5.0, "a worker that holds a batch or the barrier this long without pushing "
                                     "(or 10 x the median time a batch is held, if longer) while others wait or "
                                     "make progress is a straggler: the others go on, its batch and shards move; 0 "
                                     "turns it off", lo=0)
    heartbeat_timeout_s: float = opt(5.0, "silence after which a worker is declared dead", lo=0.1, hi=3600)
    join_timeout_s: float = opt(60.0, "how long the first step waits for train.workers workers to join "
                                "(a server started alone with --role server waits as long as it takes)",
                                lo=0.1, hi=86400)
    max_restarts: int = opt(2, "times the launcher restarts a server process that dies, from its newest checkpoint "
                            "(with server.shards > 1: range servers, in all)", lo=0)
    spin_s: float = opt(0.005, "when the server has a core of its own (train.workers < usable cores): after each "
                        "request, how long it polls its local workers' shared-memory mailboxes instead of sleeping "
                        "until a worker rings its bell (polling answers within microseconds; a bell costs a system "
                        "call or two, ZeroMQ four thread wake-ups); 0 turns polling off",
                        lo=0, hi=1)
    shards: int = opt(1, "server processes that hold theta, each a key range of its rows (a sparse model, or a "
                      "linear or logistic model's d + 1 rows; docs/sparse.md, \"Several servers\"): server 0 "
                      "coordinates and holds range 0, the launcher starts the other S - 1", lo=1, hi=64)


@dataclass
class Worker:
    heartbeat_interval_s: float = opt(0.5, "seconds between heartbeats, sent from a thread of their own",
                                      lo=0.01, hi=60)
    server_timeout_s: float = opt(10.0, "silence from the server after which a worker gives up", lo=0.1, hi=3600)
    keys: str = opt("", "CURVE key folder of this launcher's workers and status client (default: server.keys)")
    shm: bool = opt(True, "workers on the server's machine read theta from shared memory and push gradients "
                    "through it (false: everything over ZeroMQ)")
    rejoin: bool = opt(True, "a worker declared dead (e.g. it was paused) registers again as a new incarnation; "
                       "false: it exits")
    entry: str = opt("workers.worker:main", 'the function that runs one worker process, "module:function"',
                     check=_entry)


@dataclass
class Checkpoint:
    every_steps: int = opt(1000, "steps between checkpoints (one is always written at the end); 0: only at the end",
                           lo=0)
    keep: int = opt(3, "newest checkpoints kept; older ones are deleted", lo=1)
    dir: str = opt("", 'where checkpoints go; "" means output.dir/checkpoints')
    resume_force: bool = opt(False, "resume a checkpoint of another job (model.kind, data, train.consistency or "
                             "train.optimizer changed) instead of refusing it; `launch.py --resume --force` sets it")


@dataclass
class Output:
    dir: str = opt("", 'folder for theta.npy, summary.json, metrics.jsonl, config.toml; "" means a fresh runs/<time>')
    plot: bool = opt(True, "also write loss.png (training and held-out loss, held-out metric)")
    overwrite: bool = opt(False, "start a new run in an output.dir that holds an earlier run's results, replacing "
                          "them; otherwise that is refused (exit 2); `launch.py --overwrite` sets it")
    live_view: bool = opt(True, "serve a read-only web page of the run (curves, progress, workers, events) on "
                          "127.0.0.1 while it lasts; its address is printed at start")
    live_port: int = opt(0, "port of the live view; 0 picks a free one", lo=0, hi=65535)


@dataclass
class Config:
    data: Data = field(default_factory=Data)
    model: Model = field(default_factory=Model)
    train: Train = field(default_factory=Train)
    server: Server = field(default_factory=Server)
    worker: Worker = field(default_factory=Worker)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    output: Output = field(default_factory=Output)

    explicit: frozenset = field(default=frozenset(), compare=False, repr=False)
    """Keys ("section.key") that the file or an override set to something other than the built-in default, so
    checks can tell a choice from a default (a copy of configs/default.toml chooses nothing by repeating it)."""

    def to_dict(self) -> dict:
        return {s.name: dataclasses.asdict(getattr(self, s.name)) for s in _sections()}

    @classmethod
    def from_dict(cls, tree: Mapping, explicit: frozenset = frozenset()) -> "Config":
        """Build from a plain nested dict (as sent to a child process); checks like load()."""
        return _build(tree, explicit)


def _sections():
    return [f for f in dataclasses.fields(Config) if f.name != "explicit"]


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = {f.name: f.default_factory for f in _sections()}[section]
    return {f.name: f for f in dataclasses.fields(cls)}


def keys() -> list[str]:
    return [f"{s.name}.{k}" for s in _sections() for k in _section_fields(s.name)]


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _show(value: Any) -> str:
    """A value for an error message: an array by its shape and dtype, never its elements; anything else by repr,
    cut short."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"an array of shape {value.shape}, dtype {value.dtype}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(t) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list"}[t]


_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "list": list}


def _check_value(key: str, f: dataclasses.Field, value: Any) -> Any:
    # a field may allow more than one type ("str | int": a column's name or index)
    types = [_TYPES[n.strip()] for n in f.type.split("|")] if isinstance(f.type, str) else [f.type]
    ok = any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in types)
    t = types[0]
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        hint = " (pass arrays as psrv.train(config, X=..., y=...))" if key == "data.source" else ""
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(t) for t in types)}, got {_show(value)} "
                          f"({type(value).__name__}){hint}")
    if t is float and not math.isfinite(value):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    m = f.metadata
    if m["choices"] and value not in m["choices"]:
        allowed = ", ".join(repr(c) for c in m["choices"])
        raise ConfigError(f"{key}: must be one of {allowed}; got {value!r}")
    if m["lo"] is not None and value < m["lo"]:
        raise ConfigError(f"{key}: must be >= {m['lo']}; got {value!r}")
    if m["hi"] is not None and value > m["hi"]:
        raise ConfigError(f"{key}: must be <= {m['hi']}; got {value!r}")
    if m["check"] is not None and (problem := m["check"](value)):
        raise ConfigError(f"{key}: {problem}")
    return value


def _build(tree: Mapping, explicit: frozenset) -> Config:
    sections = {s.name: s for s in _sections()}
    built = {}
    for sname, body in tree.items():
        if sname not in sections:
            raise ConfigError(f"unknown section [{sname}]{_suggest(sname, sections)}; sections are "
                              + ", ".join(sections))
        if not isinstance(body, Mapping):
            raise ConfigError(f"{sname}: expected a [{sname}] table, got {_show(body)}")
        fields = _section_fields(sname)
        values = {}
        for k, v in body.items():
            if k not in fields:
                valid = [f"{sname}.{x}" for x in fields]
                raise ConfigError(f"unknown key '{sname}.{k}'{_suggest(f'{sname}.{k}', keys())}; "
                                  f"[{sname}] has: {', '.join(valid)}")
            values[k] = _check_value(f"{sname}.{k}", fields[k], v)
        built[sname] = sections[sname].default_factory(**values)
    cfg = Config(**built, explicit=explicit)
    check_combinations(cfg)
    return cfg


def check_combinations(cfg: Config) -> None:
    """Rules that involve more than one key."""
    t = cfg.train
    if t.backup_workers and t.consistency != "bsp":
        raise ConfigError(f"train.backup_workers: only applies to train.consistency = 'bsp' (got {t.consistency!r})")
    if t.workers and t.backup_workers >= t.workers:
        raise ConfigError(f"train.backup_workers: must be less than train.workers ({t.workers}); "
                          f"got {t.backup_workers}")
    if t.local_steps > 1:
        other = {"train.optimizer": (t.optimizer, "sgd"), "train.lr_schedule": (t.lr_schedule, "constant")}
        for key, (got, need) in other.items():
            if got != need:
                raise ConfigError(f"train.local_steps: local SGD needs {key} = {need!r} (the workers' local steps "
                                  f"use plain SGD at a constant train.lr); got {got!r}")
    if t.group_steps > 1:
        need = {"train.consistency": (t.consistency, "bsp"), "train.local_steps": (t.local_steps, 1),
                "train.backup_workers": (t.backup_workers, 0), "server.shards": (cfg.server.shards, 1),
                "worker.shm": (cfg.worker.shm, True)}
        for key, (got, want) in need.items():
            if got != want:
                raise ConfigError(f"train.group_steps: group steps need {key} = {want!r} (the workers take BSP's "
                                  f"steps themselves, through the server's shared memory; psrv/group.py); got "
                                  f"{got!r}")
        if t.optimizer == "ftrl":
            raise ConfigError("train.group_steps: group steps need a dense optimizer (sgd, momentum, adagrad or "
                              "adam), which the workers apply themselves at each step; got 'ftrl'")
    dc = cfg.data
    if dc.test_source:
        if dc.test_fraction > 0:
            raise ConfigError(f"data.test_source: the held-out rows come either from data.test_source or from "
                              f"data.test_fraction ({dc.test_fraction:g}), not both; set one of them")
        if dc.source == "synthetic":
            raise ConfigError("data.test_source: needs a file data.source (synthetic data holds out rows with "
                              "data.test_fraction)")
        if dc.test_source.lower().endswith(".npy"):
            raise ConfigError("data.test_source: a .npy file holds X only; use a .npz (X, y), .csv or svmlight file")
    _check_sparse(cfg)
    csv_only = [k for k in ("header", "delimiter", "columns", "drop_columns")
                if getattr(cfg.data, k) != getattr(Data(), k)]
    if csv_only and not dc.source.lower().endswith(".csv"):
        raise ConfigError(f"data.{csv_only[0]}: only applies to a .csv data.source (got {dc.source!r})")
    if cfg.data.source.lower().endswith(".npy") and not cfg.data.labels:
        raise ConfigError("data.labels: a .npy source holds X only; name the .npy file holding y in data.labels")
    if cfg.worker.heartbeat_interval_s * 2 > cfg.server.heartbeat_timeout_s:
        raise ConfigError(f"worker.heartbeat_interval_s: {cfg.worker.heartbeat_interval_s:g} s leaves no margin under "
                          f"server.heartbeat_timeout_s ({cfg.server.heartbeat_timeout_s:g} s); keep it at most half")
    if not is_local(cfg.server.bind) and not cfg.server.keys and not cfg.server.insecure:
        raise ConfigError(f"server.bind: {cfg.server.bind} can be reached from other machines; make keys with "
                          f"`python launch.py --keygen DIR` and set server.keys = DIR (CURVE), or set "
                          f"server.insecure = true to let anyone connect")


def _check_sparse(cfg: Config) -> None:
    """A sparse model needs sparse rows, and sparse rows a sparse model; what the sparse path does not do."""
    dc, t, m = cfg.data, cfg.train, cfg.model
    if t.optimizer != "ftrl" and t.l1 != 0:
        raise ConfigError(f"train.l1: only applies to train.optimizer = 'ftrl' (got {t.optimizer!r})")
    sparse = m.kind in SPARSE_MODELS
    if dc.log2_buckets != Data().log2_buckets and dc.source not in SPARSE_SOURCES:
        raise ConfigError(f"data.log2_buckets: only applies to data.source = 'criteo' (got {dc.source!r}; an "
                          f"svmlight file's width is its largest index, or data.d)")
    if dc.source in SPARSE_SOURCES and not sparse:
        raise ConfigError(f"data.source: {dc.source!r} makes sparse rows; they need model.kind = 'sparse_logistic' "
                          f"(got {m.kind!r})")
    if cfg.server.shards > 1:
        _check_shards(cfg)
    if not sparse:
        return
    svm = dc.source.lower().endswith((".svm", ".libsvm", ".svmlight", ".txt"))
    if dc.source not in SPARSE_SOURCES and not svm:
        raise ConfigError(f"model.kind: 'sparse_logistic' reads sparse rows: data.source must be 'criteo' or an "
                          f"svmlight/libsvm file (.svm, .libsvm, .svmlight, .txt); got {dc.source!r}")
    refused = {"data.test_source": (dc.test_source, ""), "data.partition": (dc.partition, "range"),
               "data.batch_order": (dc.batch_order, "rows"), "data.dtype": (dc.dtype, "float64"),
               "model.fit_intercept": (m.fit_intercept, True), "train.local_steps": (t.local_steps, 1),
               "train.group_steps": (t.group_steps, 1)}
    for key, (got, need) in refused.items():
        if got != need:
            raise ConfigError(f"{key}: model.kind = 'sparse_logistic' needs {key} = {need!r} (docs/sparse.md); "
                              f"got {got!r}")


def _check_shards(cfg: Config) -> None:
    """What several server processes do not do yet (docs/sparse.md, "Several servers")."""
    if cfg.model.kind not in SPARSE_MODELS + SHARDED_DENSE:
        raise ConfigError(f"server.shards: several servers hold the key ranges of a sparse model or of a vector "
                          f"theta ({', '.join(SHARDED_DENSE)}); model.kind = {cfg.model.kind!r} keeps one server "
                          f"(server.shards = 1)")
    need = {"train.clip_norm": (cfg.train.clip_norm, 0.0), "worker.shm": (cfg.worker.shm, True)}
    if cfg.model.kind in SHARDED_DENSE:
        # a range server's theta is float64 rows 0 .. d with the L2 term off the last (the intercept), starting at 0;
        # local SGD is not wired to the slices yet
        need.update({"data.dtype": (cfg.data.dtype, "float64"), "model.fit_intercept": (cfg.model.fit_intercept, True),
                     "train.local_steps": (cfg.train.local_steps, 1)})
    for key, (got, want) in need.items():
        if got != want:
            raise ConfigError(f"{key}: server.shards > 1 needs {key} = {want!r} (docs/sparse.md, \"Several "
                              f"servers\"); got {got!r}")


def parse_override(text: str) -> tuple[str, str, Any]:
    """'section.key=value' -> (section, key, value). The value is read as TOML, else taken as a bare string."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.lr=0.1")
    lhs, raw = text.split("=", 1)
    section, key = lhs.strip().split(".", 1)
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def load(source: str | os.PathLike | Mapping | None = None, overrides=()) -> Config:
    """Defaults < `source` (a TOML path or a nested dict) < overrides ('section.key=value' strings or
    (section, key, value) tuples). Raises ConfigError naming the key for anything unknown or mistyped."""
    tree: dict = {}
    if isinstance(source, Mapping):
        tree = {k: dict(v) if isinstance(v, Mapping) else v for k, v in source.items()}
    elif source is not None:
        path = os.fspath(source)
        try:
            with open(path, "rb") as fh:
                tree = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    for o in overrides:
        section, key, value = parse_override(o) if isinstance(o, str) else o
        body = tree.setdefault(section, {})
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a [{section}] table, got {_show(body)}")
        body[key] = value
    cfg = _build(tree, frozenset())
    defaults = Config()
    cfg.explicit = frozenset(f"{s}.{k}" for s, body in tree.items() if isinstance(body, Mapping) for k in body
                             if getattr(getattr(cfg, s), k) != getattr(getattr(defaults, s), k))
    return cfg


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def to_toml(cfg: Config, comments: bool = False) -> str:
    """The config as TOML; with comments=True each key carries its one-line doc and allowed values."""
    out = []
    for s in _sections():
        out.append(f"[{s.name}]")
        section = getattr(cfg, s.name)
        for name, f in _section_fields(s.name).items():
            line = f"{name} = {_toml_value(getattr(section, name))}"
            if comments:
                note = f.metadata["doc"]
                if f.metadata["choices"]:
                    note += " (" + " | ".join(json.dumps(c) for c in f.metadata["choices"]) + ")"
                line = f"{line:<36} # {note}"
            out.append(line)
        out.append("")
    return "\n".join(out)


DEFAULTS_HEADER = """\
# psrv defaults: `python launch.py` (or `psrv`) with no argument runs these.
# Generated by `python launch.py --defaults > configs/default.toml` from psrv/config.py, the one place defaults live;
# a test checks the two agree. Other configs need only the keys they change.
"""


def defaults_toml() -> str:
    return DEFAULTS_HEADER + "\n" + to_toml(Config(), comments=True)
