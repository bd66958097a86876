"""The wire format (docs/protocol.md): one msgpack header frame, then one raw frame per array.

encode() builds frames; decode() checks everything a peer could lie about (sizes, op, field types, dtype, shape,
byte counts) before any array is made. No pickle, no eval, no socket code here.
"""
from __future__ import annotations

import ipaddress
import math
import threading
from enum import Enum
from typing import Any, Sequence

import msgpack
import numpy as np

from . import safepack
from .errors import ProtocolError

VERSION = 1
HEADER_MAX_BYTES = 64 * 1024       # checked before msgpack sees the bytes
MAX_FRAMES = 4                     # header + at most 3 arrays; no message needs more
MAX_NDIM = 4
MAX_ARRAY_BYTES = 1 << 34          # 16 GiB: a sanity cap; the server's per-socket cap is theta's own size
DTYPES = safepack.dtypes("<f8", "<f4")   # the wire allow-list: the floats theta and gradients travel as
KEY_DTYPES = safepack.dtypes("<u8")      # a keys frame's only dtype (and the only place it is allowed)
MAX_KEYS = 1 << 26                       # keys in one frame: a sanity cap; the server's is theta's row count


class Op(str, Enum):
    # requests (client -> server)
    HELLO = "hello"
    PULL = "pull"
    PUSH = "push"
    HEARTBEAT = "heartbeat"
    BYE = "bye"
    STATUS = "status"
    GET = "get"
    # replies (server -> client)
    WELCOME = "welcome"
    THETA = "theta"
    ACK = "ack"
    STOP = "stop"
    ERROR = "error"
    VALUES = "values"
    # between the processes of a run with server.shards = S > 1 (docs/protocol.md, "Several servers")
    RPUSH = "rpush"
    RGET = "rget"
    APPLY = "apply"
    SYNC = "sync"
    SAVE = "save"
    LOAD = "load"
    MEASURED = "measured"


class OpStr:
    """Each op's value as a plain str (OpStr.PUSH == Op.PUSH.value == "push"), for the paths every message takes:
    reading an Enum member's .value costs about 0.4 µs, and comparing a str with the member 0.2 µs."""
    HELLO, PULL, PUSH, HEARTBEAT, BYE, STATUS, GET = "hello", "pull", "push", "heartbeat", "bye", "status", "get"
    WELCOME, THETA, ACK, STOP, ERROR, VALUES = "welcome", "theta", "ack", "stop", "error", "values"
    RPUSH, RGET, APPLY, SYNC, SAVE, LOAD = "rpush", "rget", "apply", "sync", "save", "load"
    MEASURED = "measured"


# Per op: the header fields (name -> type) and how many array frames may follow. Every field is required, except
# `rid`, an optional request id that the server echoes in its reply. Fields not listed are an error. A push or a
# theta reply has no array frame when the array travels through shared memory instead (docs/protocol.md).
_I, _F, _S, _B, _M, _L = int, float, str, bool, dict, list
REQUESTS: dict[str, tuple[dict[str, type], int]] = {
    Op.HELLO: ({"version": _I, "role": _S, "wid": _I, "pid": _I, "host": _S, "local": _B}, (0,)),
    Op.PULL: ({"wid": _I, "inc": _I, "clock": _I}, (0,)),
    Op.PUSH: ({"wid": _I, "inc": _I, "sid": _S, "seq": _I, "clock": _I, "version": _I, "loss": _F, "count": _I,
               "pull": _B, "compute_s": _F, "request_s": _F}, (0, 1, 2)),
    Op.HEARTBEAT: ({"wid": _I, "inc": _I}, (0,)),
    Op.BYE: ({"wid": _I, "inc": _I}, (0,)),
    Op.STATUS: ({}, (0,)),
    Op.GET: ({"wid": _I, "inc": _I}, (1,)),
}
# With this many array frames, an op's first array is a keys frame: sorted, distinct "<u8" keys (rows of theta).
# A keyed push carries keys and the gradient's values on them; a get carries the keys whose values it asks for.
# what a range server (psrv/rangeserver.py) accepts: a worker's slice of a push and its read at a version, and the
# coordinator's (server 0's) orders: which held slices make an update, and a sign of life
RANGE_REQUESTS: dict[str, tuple[dict[str, type], int]] = {
    Op.RPUSH: ({"sid": _S, "wid": _I, "clock": _I}, (2,)),
    Op.RGET: ({"version": _I}, (1,)),
    Op.APPLY: ({"step": _I, "version": _I, "pushes": _L, "mean": _B, "scale": _F}, (0,)),
    Op.SYNC: ({"sid": _S, "version": _I}, (0,)),
    Op.SAVE: ({"step": _I, "version": _I}, (0,)),
    Op.LOAD: ({"sid": _S, "step": _I, "dir": _S}, (0,)),
    Op.STATUS: ({}, (0,)),
}
# what server 0 reads from a range server: its measurement of each slice as it arrives (`slice`: the range's number
# for it, which an apply names), on which server 0 judges the whole push; and an error reply to a bad order
RANGE_REPORTS: dict[str, tuple[dict[str, type], int]] = {
    Op.MEASURED: ({"sid": _S, "wid": _I, "clock": _I, "slice": _I, "finite": _B, "sq": _F}, (0,)),
    Op.ERROR: ({"code": _S, "reason": _S}, (0,)),
}
KEY_FRAMES = {Op.PUSH: 2, Op.GET: 1, Op.RPUSH: 2, Op.RGET: 1}
REPLIES: dict[str, tuple[dict[str, type], int]] = {
    Op.WELCOME: ({"version": _I, "protocol": _I, "wid": _I, "inc": _I, "server_id": _S, "theta_shape": _L, "theta_dtype": _S,
                  "data": _M, "train": _M, "model": _M}, (2,)),
    Op.THETA: ({"clock": _I, "version": _I, "batch": _L}, (0, 1)),
    Op.ACK: ({"applied": _B, "reason": _S}, (0,)),
    Op.STOP: ({"reason": _S}, (0,)),
    Op.HEARTBEAT: ({"server_id": _S, "step": _I, "alive": _B, "waiting": _B}, (0,)),
    Op.BYE: ({}, (0,)),
    Op.STATUS: ({"state": _M}, (0,)),
    Op.ERROR: ({"code": _S, "reason": _S}, (0,)),
    Op.VALUES: ({"version": _I}, (1,)),
}


ADDRESS_FORMS = "tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555) or ipc://PATH"


def check_address(address: str) -> str:
    """`address` if it is one a worker or --status can connect to; else ValueError naming the forms allowed (zmq's
    own error, "Invalid argument", names neither the address's problem nor the fix)."""
    scheme, sep, rest = address.strip().partition("://")
    if scheme == "tcp" and sep:
        host, colon, port = rest.rpartition(":")
        if host and colon and port.isdigit() and 0 < int(port) < 65536:
            return address.strip()
    elif scheme == "ipc" and sep and rest:
        return address.strip()
    raise ValueError(f"{address!r} is not a server address: expected {ADDRESS_FORMS}")


def is_local(address: str) -> bool:
    """True for addresses only this machine can reach: ipc://, inproc://, tcp on a loopback host."""
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name: reachable from elsewhere
        return False



_packers = threading.local()


def _packb(header: dict) -> bytes:
    """msgpack.packb(header, use_bin_type=True), the same bytes, with this thread's Packer kept rather than made per
    message (a third of packb's time). One per thread: a Packer holds its buffer between calls."""
    try:
        pack = _packers.pack
    except AttributeError:
        pack = _packers.pack = msgpack.Packer(use_bin_type=True).pack
    return pack(header)


def encode(header: dict, arrays: Sequence[np.ndarray] = ()) -> list:
    """Frames for one message. Arrays go out as their own buffers (the caller's socket decides whether to copy);
    the caller must not modify them until ZeroMQ is done with them."""
    if len(arrays) == 0:  # most messages: a header alone (len: `arrays` may be any sequence, even an ndarray)
        return [_packb(header)]
    frames: list[Any] = [b""]
    descr = []
    for a in arrays:
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        if a.dtype.str not in DTYPES and a.dtype.str not in KEY_DTYPES:
            raise ValueError(f"dtype {a.dtype} is not on the wire allow-list {sorted(DTYPES | KEY_DTYPES)}")
        descr.append([a.dtype.str, list(a.shape)])
        frames.append(a)
    if descr:
        header = {**header, "arrays": descr}
    frames[0] = _packb(header)
    return frames


def _buffer(frame) -> memoryview:
    if type(frame) is bytes:  # a mailbox's message; hasattr() on bytes would raise and catch an AttributeError
        return memoryview(frame)
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


_MISSING = object()
# table id, op -> (the exact key sets allowed: without and with `rid`, then with `arrays` too; the field names;
# their exact types), for the common case
_FAST: dict = {}


def _fast_spec(table: dict, op: str):
    key = (id(table), op)
    spec = _FAST.get(key)
    if spec is None:
        fields = table[op][0]
        base = frozenset(fields) | {"op"}
        spec = _FAST[key] = ((base, base | {"rid"}, base | {"arrays"}, base | {"rid", "arrays"}), tuple(fields),
                             tuple(fields.values()))
    return spec


def _check_fields(op: str, header: dict, spec: dict[str, type], strict: bool = True) -> None:
    """Every listed field present with its type (an int is accepted for a float), no other field but `op`,
    `arrays` and an integer `rid` (unless not strict: a reply may carry keys a newer server added, which a client
    ignores). Python ints cannot overflow, so no range is checked here."""
    for name, t in spec.items():
        v = header.get(name, _MISSING)
        tv = type(v)
        if tv is t or (t is float and tv is int):
            continue
        if v is _MISSING:
            raise ProtocolError(f"{op}: missing field '{name}'", "bad_field")
        got = "bin (strings are msgpack str, UTF-8, never bin)" if tv is bytes else tv.__name__
        raise ProtocolError(f"{op}: field '{name}' must be {t.__name__}, got {got}", "bad_field")
    if strict and len(header) != len(spec) + 1 + ("arrays" in header) + ("rid" in header):
        extra = set(header) - set(spec) - {"op", "arrays", "rid"}
        raise ProtocolError(f"{op}: unknown field(s) {sorted(extra)}", "bad_field")
    if "rid" in header and type(header["rid"]) is not int:
        raise ProtocolError(f"{op}: field 'rid' must be int", "bad_field")


def _fields_ok(table: dict, op: str, header: dict) -> bool:
    """The common case in a few C-level operations: exactly the listed keys (plus arrays and rid), exact types. A
    nil `rid` or `arrays` is dropped from the header, as if it had not been sent."""
    keysets, names, types = _fast_spec(table, op)
    rid = header.get("rid", _MISSING)
    if rid is None:
        del header["rid"]
        rid = _MISSING
    arrays = header.get("arrays", _MISSING)
    if arrays is None:
        del header["arrays"]
        arrays = _MISSING
    return header.keys() == keysets[(rid is not _MISSING) + 2 * (arrays is not _MISSING)] \
        and tuple(map(type, map(header.__getitem__, names))) == types and (rid is _MISSING or type(rid) is int)


def _array(op: str, i: int, descr, frame, keys: bool = False) -> np.ndarray:
    if not (type(descr) is list and len(descr) == 2 and type(descr[0]) is str and type(descr[1]) is list):
        raise ProtocolError(f"{op}: arrays[{i}] must be [dtype, shape]", "bad_array")
    dtype_str, shape = descr
    allowed = KEY_DTYPES if keys else DTYPES
    dtype = allowed.get(dtype_str)
    if dtype is None:
        what = "a keys frame" if keys else f"arrays[{i}]"
        raise ProtocolError(f"{op}: {what} dtype {dtype_str!r} not allowed; allowed: {sorted(allowed)}",
                            "bad_dtype")
    if len(shape) > MAX_NDIM or not all(type(x) is int and 0 <= x < 2**40 for x in shape):
        raise ProtocolError(f"{op}: arrays[{i}] shape {shape!r} is not a list of at most {MAX_NDIM} sizes",
                            "bad_shape")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if nbytes > MAX_ARRAY_BYTES:
        raise ProtocolError(f"{op}: arrays[{i}] declares {nbytes} bytes, over the cap", "too_large")
    buf = _buffer(frame)
    if buf.nbytes != nbytes:
        raise ProtocolError(f"{op}: arrays[{i}] is {buf.nbytes} bytes but {dtype_str} x {shape} needs {nbytes}",
                            "bad_size")
    a = np.frombuffer(buf, dtype=dtype).reshape(shape)
    if keys:
        check_keys(op, a)
    return a


def check_keys(op: str, keys: np.ndarray) -> None:
    """ProtocolError bad_keys unless `keys` is a vector of at most MAX_KEYS strictly increasing keys (the range is
    the server's to check: theta's rows)."""
    if keys.ndim != 1:
        raise ProtocolError(f"{op}: the keys frame must be 1-D, got shape {list(keys.shape)}", "bad_keys")
    if len(keys) > MAX_KEYS:
        raise ProtocolError(f"{op}: {len(keys)} keys, over the cap of {MAX_KEYS}", "bad_keys")
    if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
        raise ProtocolError(f"{op}: keys must be strictly increasing (sorted, distinct)", "bad_keys")


def decode(frames: Sequence, table: dict = REQUESTS) -> tuple[dict, list[np.ndarray]]:
    """(header, arrays) from the frames of one message, or ProtocolError saying what is wrong. Once the header is a
    map with a valid integer `rid`, the error carries it (e.rid), so that the reply names the request it refuses.
    Arrays are read-only views of the frames (zero-copy)."""
    if not frames:
        raise ProtocolError(f"a message has 1 to {MAX_FRAMES} frames, got 0", "bad_frames")
    header = _header(frames[0])
    rid = header.get("rid")
    try:
        return _check(header, frames, table)
    except ProtocolError as e:
        if type(rid) is int:
            e.rid = rid
        raise


def _header(frame) -> dict:
    raw = frame if type(frame) is bytes else _buffer(frame)   # msgpack reads bytes as they are
    nbytes = len(raw) if type(raw) is bytes else raw.nbytes
    if nbytes == 0:
        # a REQ socket sends an empty delimiter frame first; this protocol is spoken from a DEALER
        raise ProtocolError("frame 0 is empty: the header must be the first frame (use a DEALER socket, not REQ, "
                            "and send no empty delimiter)", "empty_header")
    if nbytes > HEADER_MAX_BYTES:
        raise ProtocolError(f"header of {nbytes} bytes exceeds {HEADER_MAX_BYTES}", "too_large")
    try:
        # bin is decoded (as bytes) so that a bin where a str belongs is named as such by the field checks
        header = safepack.unpack(raw, max_items=4096, max_str=HEADER_MAX_BYTES, max_bin=HEADER_MAX_BYTES)
    except safepack.UnpackError as e:
        raise ProtocolError(f"header is not valid msgpack: {e}", "bad_header") from None
    if type(header) is not dict:
        raise ProtocolError(f"header must be a map, got {type(header).__name__}", "bad_header")
    op = header.get("op")
    if type(op) is not str:
        got = "bin: strings are msgpack str (UTF-8), never bin" if type(op) is bytes else "none"
        raise ProtocolError(f"header has no string 'op' ({got})", "bad_header")
    return header


def _check(header: dict, frames: Sequence, table: dict) -> tuple[dict, list[np.ndarray]]:
    op = header["op"]
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"a message has 1 to {MAX_FRAMES} frames, got {len(frames)}", "bad_frames")
    entry = table.get(op)
    if entry is None:
        known = ", ".join(sorted(str(o.value) for o in table))
        raise ProtocolError(f"unknown op {op!r}; known ops: {known}", "unknown_op")
    spec, n_arrays = entry
    if not _fields_ok(table, op, header):
        # the slow path: accepts ints for floats (and, in replies, keys it does not know), or says what is wrong
        _check_fields(op, header, spec, strict=table is not REPLIES)
    descr = header.get("arrays", [])
    n = len(frames) - 1
    if type(descr) is not list or len(descr) != n or n not in n_arrays:
        allowed = " or ".join(str(k) for k in n_arrays)
        raise ProtocolError(f"{op} carries {allowed} array frame(s); got {n} frame(s) and "
                            f"{len(descr) if type(descr) is list else '?'} descriptor(s)", "bad_frames")
    keyed = KEY_FRAMES.get(op) == n and table is not REPLIES
    arrays = [_array(op, i, d, f, keyed and i == 0) for i, (d, f) in enumerate(zip(descr, frames[1:]))] if n else []
    return header, arrays


def error(code: str, reason: str, rid: int | None = None) -> list:
    h = {"op": Op.ERROR.value, "code": code, "reason": reason}
    if rid is not None:
        h["rid"] = rid
    return encode(h)
