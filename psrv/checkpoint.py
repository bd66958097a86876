"""Atomic save and verified load of server checkpoints: pure file I/O, no sockets, no processes, no pickle.

File format (all integers little-endian):

    offset 0   MAGIC, 8 bytes: b"PSRVCKP1"
    offset 8   SHA-256 digest, 32 bytes, of every byte after it (offset 40 to the end of the file)
    offset 40  u64: length M of the manifest
    offset 48  manifest, M bytes of msgpack: a map
                   {"format": FORMAT_VERSION, "step": int, "state": {...},
                    "arrays": [[name, dtype_str, shape_list, offset, nbytes], ...]}
    48 + M     the array section: each array's raw bytes in C order, starting at its `offset` (relative to the
               start of this section, a multiple of 8), zero-padded between arrays; nothing after the last one

dtype_str is one of "<f8", "<f4", "<i8", "<u8" (arrays of another byte order are stored little-endian), and
nbytes == prod(shape) * itemsize. `state` holds str-keyed maps, lists, str, int (64-bit), float, bool, None and
bytes; tuples come back as lists.

Writing: a temporary `.tmp-ckpt-*` file in the same directory is written, flushed and fsynced, then renamed with
os.replace onto `ckpt-{step:010d}.psrv` and the directory is fsynced, so a crash leaves either the old set of
checkpoints or the new one, never a half-written file under a final name. Old checkpoints are deleted only after
that. Reading trusts nothing: magic, length, digest, then every manifest field is checked before an array is made,
and arrays are copies (writable, not tied to the file's buffer). The checkpoint directory belongs to one server:
clean_temporaries() would also delete the temporary file of a save running concurrently in another process.
"""
from __future__ import annotations

import hashlib
import logging
import math
import operator
import os
import re
import secrets
import struct

import msgpack
import numpy as np

from . import safepack
from .errors import PsrvError

MAGIC = b"PSRVCKP1"
FORMAT_VERSION = 1

log = logging.getLogger(__name__)

DTYPES = safepack.dtypes("<f8", "<f4", "<i8", "<u8")   # the allow-list: theta, optimizer slots, counters
_HEAD = len(MAGIC) + 32 + 8             # magic, digest, manifest length
_ALIGN = 8
MAX_MANIFEST_BYTES = 64 * 1024 * 1024   # the state is small bookkeeping; bulk data belongs in arrays
_MAX_NDIM = 32
_MAX_DIM = 1 << 48
_MAX_DEPTH = 64                         # nesting of the state; also stops reference cycles
_TMP_PREFIX = ".tmp-ckpt-"
_NAME = re.compile(r"ckpt-(\d{10,})\.psrv")
_CHUNK = 1 << 24                        # digest and write big arrays in pieces of this many bytes


class CheckpointError(PsrvError):
    """A file that is not a valid checkpoint (bad magic, truncated, checksum mismatch, bad manifest).
    `reason` says what is wrong, `path` which file (None when unknown)."""

    def __init__(self, reason: str, path: str | None = None):
        super().__init__(f"{path}: {reason}" if path else reason)
        self.reason = reason
        self.path = path


# ---------------------------------------------------------------------------------------------------- writing

def _check_state(v, where: str, err, depth: int = 0) -> None:
    """Raise err(TypeError or ValueError, message), naming the first value of `v` the format cannot hold exactly."""
    if depth > _MAX_DEPTH:
        raise err(ValueError, f"{where}: nested deeper than {_MAX_DEPTH} levels (a reference cycle?)")
    if v is None or isinstance(v, (bool, str, bytes)):
        return
    if isinstance(v, int):
        if not -(2**63) <= v < 2**64:
            raise err(ValueError, f"{where}: int {v} does not fit in 64 bits")
        return
    if isinstance(v, float):
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, str):
                raise err(TypeError, f"{where}: key {k!r} is {type(k).__name__}; keys must be str")
            _check_state(x, f"{where}[{k!r}]", err, depth + 1)
        return
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            _check_state(x, f"{where}[{i}]", err, depth + 1)
        return
    hint = "; convert it with int()/float()/.tolist()" if isinstance(v, (np.generic, np.ndarray)) else ""
    raise err(TypeError, f"{where}: {type(v).__name__} cannot be stored in a checkpoint's state{hint}")


def _plain(kind, message) -> Exception:
    return kind(message)


def _prepare(arrays: dict) -> list[tuple[str, np.ndarray]]:
    """The arrays to write: C-contiguous, little-endian, of an allowed dtype."""
    if not isinstance(arrays, dict):
        raise TypeError(f"arrays must be a dict of name -> numpy array, got {type(arrays).__name__}")
    out = []
    for name, a in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"array name {name!r} is {type(name).__name__}; names must be str")
        if not isinstance(a, np.ndarray):
            raise TypeError(f"arrays[{name!r}] is {type(a).__name__}, not a numpy array")
        le = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if le.str not in DTYPES:
            raise ValueError(f"arrays[{name!r}] has dtype {a.dtype}; allowed: float64, float32, int64, uint64")
        out.append((name, np.asarray(a, dtype=DTYPES[le.str], order="C")))   # not ascontiguousarray: it makes 0-d 1-d
    return out


def _pad(n: int) -> int:
    return -n % _ALIGN


def _encode_manifest(step: int, state: dict, arrays: list[tuple[str, np.ndarray]]) -> bytes:
    entries, offset = [], 0
    for name, a in arrays:
        entries.append([name, a.dtype.str, list(a.shape), offset, a.nbytes])
        offset += a.nbytes + _pad(a.nbytes)
    manifest = msgpack.packb({"format": FORMAT_VERSION, "step": step, "state": state, "arrays": entries},
                             use_bin_type=True)
    if len(manifest) > MAX_MANIFEST_BYTES:
        raise ValueError(f"the checkpoint's state packs to {len(manifest)} bytes, over {MAX_MANIFEST_BYTES}; "
                         "put bulk data in arrays")
    return manifest


def _write(fh, manifest: bytes, arrays: list[tuple[str, np.ndarray]]) -> None:
    """The whole file, into an open binary file at offset 0. The digest is written last, once it is known."""
    h = hashlib.sha256()

    def put(b) -> None:
        h.update(b)
        fh.write(b)

    fh.write(MAGIC + bytes(32))
    put(struct.pack("<Q", len(manifest)))
    put(manifest)
    for k, (_, a) in enumerate(arrays):
        flat = a.reshape(-1).view(np.uint8)      # a view: contiguous by construction, 0-d and empty included
        for i in range(0, flat.size, _CHUNK):
            put(memoryview(flat[i:i + _CHUNK]))
        if _pad(a.nbytes) and k < len(arrays) - 1:
            put(bytes(_pad(a.nbytes)))
    fh.seek(len(MAGIC))
    fh.write(h.digest())


def _fsync_dir(directory: str) -> None:
    """Make a rename in `directory` durable; some platforms cannot open or fsync a directory, which is fine."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def path_for(directory: str, step: int) -> str:
    """The path save() gives the checkpoint of `step` in `directory`."""
    return os.path.join(os.fspath(directory), f"ckpt-{step:010d}.psrv")


def save(directory: str, step: int, state: dict, arrays: dict[str, np.ndarray], keep: int = 3) -> str:
    """Write checkpoint `ckpt-{step:010d}.psrv` in `directory` atomically and return its path; then delete all but the
    newest `keep` checkpoints of that directory. `state` is any msgpack-serializable dict (str keys; ints, floats,
    str, bool, None, lists, nested dicts with str keys); `arrays` maps names to numpy arrays of dtype float64,
    float32, int64 or uint64 (any shape, C order is written).

    Bad input raises TypeError or ValueError before anything is written. The caller must not modify the arrays
    while this runs. The checkpoint just written is never deleted, even when `keep` checkpoints of later steps
    already exist (then keep + 1 files remain)."""
    if isinstance(step, bool):
        raise TypeError("step must be an int, not bool")
    step, keep = operator.index(step), operator.index(keep)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    _check_state(state, "state", _plain)
    prepared = _prepare(arrays)
    manifest = _encode_manifest(step, state, prepared)

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    final = path_for(directory, step)
    tmp = os.path.join(directory, f"{_TMP_PREFIX}{step:010d}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            _write(fh, manifest, prepared)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)

    for old in checkpoints(directory)[:-keep]:
        if old == final:
            continue
        try:
            os.remove(old)
        except FileNotFoundError:
            pass
        except OSError as e:  # the new checkpoint is in place; a stale old one is not worth failing the save for
            log.warning("could not delete old checkpoint %s: %s", old, e)
    return final


# ---------------------------------------------------------------------------------------------------- reading

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _diagnose(data: bytes) -> str:
    """Why the digest does not match: name truncation when the header or manifest can show it."""
    size = len(data)
    mlen = struct.unpack_from("<Q", data, len(MAGIC) + 32)[0]
    if _HEAD + mlen > size:
        return f"truncated: the manifest ends at byte {_HEAD + mlen} but the file has {size} bytes"
    try:
        entries = safepack.unpack(data[_HEAD:_HEAD + mlen])["arrays"]
        end = _HEAD + mlen + max((e[3] + e[4] for e in entries), default=0)
    except Exception:
        end = 0
    if isinstance(end, int) and end > size:
        return f"truncated: the arrays end at byte {end} but the file has {size} bytes"
    return "checksum mismatch: the file's contents do not match its SHA-256 digest (corrupt)"


def _read(path: str) -> tuple[int, dict, dict[str, np.ndarray]]:
    """(step, state, arrays) of one checkpoint, fully verified; OSError if it cannot be read."""
    with open(path, "rb") as fh:
        data = fh.read()

    def bad(reason: str):
        return CheckpointError(reason, path)

    size = len(data)
    if data[:len(MAGIC)] != MAGIC[:min(size, len(MAGIC))]:
        raise bad(f"bad magic {data[:len(MAGIC)]!r}, expected {MAGIC!r}: not a psrv checkpoint")
    if size < _HEAD:
        raise bad(f"truncated: {size} bytes, a checkpoint has at least {_HEAD}")
    if hashlib.sha256(memoryview(data)[_HEAD - 8:]).digest() != data[len(MAGIC):_HEAD - 8]:
        raise bad(_diagnose(data))

    mlen = struct.unpack_from("<Q", data, _HEAD - 8)[0]
    if mlen > min(size - _HEAD, MAX_MANIFEST_BYTES):
        raise bad(f"bad manifest: length {mlen} does not fit in the file ({size} bytes) or over the cap")
    try:
        manifest = safepack.unpack(data[_HEAD:_HEAD + mlen])
    except safepack.UnpackError as e:
        raise bad(f"bad manifest: not valid msgpack ({e})") from None
    if not isinstance(manifest, dict) or set(manifest) != {"format", "step", "state", "arrays"}:
        keys = sorted(manifest) if isinstance(manifest, dict) else type(manifest).__name__
        raise bad(f"bad manifest: expected the keys format, step, state, arrays; got {keys}")
    fmt, step, state, entries = (manifest[k] for k in ("format", "step", "state", "arrays"))
    if fmt != FORMAT_VERSION or not _is_int(fmt):
        raise bad(f"format version {fmt!r}; this code reads version {FORMAT_VERSION}")
    if not _is_int(step) or step < 0:
        raise bad(f"bad manifest: step {step!r} is not a non-negative int")
    if not isinstance(state, dict):
        raise bad(f"bad manifest: state is {type(state).__name__}, not a map")

    _check_state(state, "state", lambda kind, message: bad(f"bad manifest: {message}"))
    if not isinstance(entries, list):
        raise bad("bad manifest: arrays is not a list")

    section = _HEAD + mlen
    room = size - section
    arrays: dict[str, np.ndarray] = {}
    spans = []
    for i, e in enumerate(entries):
        if not (isinstance(e, list) and len(e) == 5):
            raise bad(f"bad manifest: arrays[{i}] is not [name, dtype, shape, offset, nbytes]")
        name, dstr, shape, offset, nbytes = e
        if not isinstance(name, str) or name in arrays:
            raise bad(f"bad manifest: arrays[{i}] name {name!r} is not a str or is repeated")
        dtype = DTYPES.get(dstr) if isinstance(dstr, str) else None
        if dtype is None:
            raise bad(f"bad manifest: array {name!r} has dtype {dstr!r}; allowed: {sorted(DTYPES)}")
        if not (isinstance(shape, list) and len(shape) <= _MAX_NDIM
                and all(_is_int(d) and 0 <= d < _MAX_DIM for d in shape)):
            raise bad(f"bad manifest: array {name!r} shape {shape!r} is not a list of non-negative sizes")
        if not (_is_int(offset) and _is_int(nbytes) and offset >= 0 and offset % _ALIGN == 0):
            raise bad(f"bad manifest: array {name!r} offset {offset!r} / nbytes {nbytes!r} are not "
                      "non-negative ints with an 8-aligned offset")
        need = math.prod(shape) * dtype.itemsize   # Python ints: no overflow
        if nbytes != need:
            raise bad(f"bad manifest: array {name!r} declares {nbytes} bytes but {dstr} x {shape} is {need}")
        if offset + nbytes > room:
            raise bad(f"bad manifest: array {name!r} spans bytes {offset}..{offset + nbytes} of the array "
                      f"section, which has {room}")
        spans.append((offset, offset + nbytes, name))
        try:
            if nbytes == 0:
                arrays[name] = np.zeros(shape, dtype)
            else:
                arrays[name] = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize,
                                             offset=section + offset).reshape(shape).copy()
        except (ValueError, MemoryError) as x:
            raise bad(f"bad manifest: array {name!r} cannot be built: {x}") from None
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            raise bad(f"bad manifest: arrays {a!r} and {b!r} overlap")
    return step, state, arrays


def load(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Read and fully verify one checkpoint; CheckpointError saying what is wrong (OSError if it cannot be read)."""
    _, state, arrays = _read(os.fspath(path))
    return state, arrays


def _step_of(name: str) -> int | None:
    m = _NAME.fullmatch(name)
    if m is None:
        return None
    step = int(m.group(1))
    return step if name == f"ckpt-{step:010d}.psrv" else None  # one spelling per step: "ckpt-00000000001" is not


def checkpoints(directory: str) -> list[str]:
    """Paths of the checkpoint files in directory, oldest first (by step in the name; ignore other files)."""
    directory = os.fspath(directory)
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        step = _step_of(entry.name)
        if step is not None and entry.is_file():
            found.append((step, os.path.join(directory, entry.name)))
    return [p for _, p in sorted(found)]


def steps(directory: str) -> list[int]:
    """The steps of the checkpoints in directory, oldest first."""
    return [_step_of(os.path.basename(p)) for p in checkpoints(directory)]


def load_latest(directory: str) -> tuple[dict, dict[str, np.ndarray], str] | None:
    """The newest checkpoint that verifies, as (state, arrays, path); a newer one that fails verification is skipped
    with a logging WARNING naming the file and the reason (truncated / checksum mismatch / ...). None if there is no
    valid checkpoint (or no directory)."""
    try:
        paths = checkpoints(directory)
    except NotADirectoryError:
        return None
    for path in reversed(paths):
        try:
            step, state, arrays = _read(path)
        except CheckpointError as e:
            log.warning("skipping checkpoint %s: %s", path, e.reason)
            continue
        except OSError as e:
            log.warning("skipping checkpoint %s: cannot read it: %s", path, e)
            continue
        named = _step_of(os.path.basename(path))
        if step != named:
            log.warning("skipping checkpoint %s: its manifest says step %d, its name step %d", path, step, named)
            continue
        return state, arrays, path
    return None


def clean_temporaries(directory: str) -> int:
    """Delete leftover temporary files of interrupted saves; return how many."""
    try:
        entries = list(os.scandir(os.fspath(directory)))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    n = 0
    for entry in entries:
        if entry.name.startswith(_TMP_PREFIX) and not entry.is_dir(follow_symlinks=False):
            try:
                os.remove(entry.path)
                n += 1
            except FileNotFoundError:
                pass
    return n
