"""The wire format (docs/protocol.md): one msgpack header frame, then one raw frame per array.

encode() builds frames; decode() checks everything a peer could lie about (sizes, op, field types, dtype, shape,
byte counts) before any array is made. No pickle, no eval, no socket code here.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import Any, Sequence

import msgpack
import numpy as np

from .errors import ProtocolError

VERSION = 1
HEADER_MAX_BYTES = 64 * 1024       # checked before msgpack sees the bytes
MAX_FRAMES = 4                     # header + at most 3 arrays; no message needs more
MAX_NDIM = 4
MAX_ARRAY_BYTES = 1 << 34          # 16 GiB: a sanity cap; the server's per-socket cap is theta's own size
DTYPES = {"<f8": np.dtype("<f8"), "<f4": np.dtype("<f4")}   # the allow-list; never object, void or big-endian


class Op(str, Enum):
    # requests (client -> server)
    HELLO = "hello"
    PULL = "pull"
    PUSH = "push"
    HEARTBEAT = "heartbeat"
    BYE = "bye"
    STATUS = "status"
    # replies (server -> client)
    WELCOME = "welcome"
    THETA = "theta"
    ACK = "ack"
    STOP = "stop"
    ERROR = "error"


# Per op: the header fields (name -> type) and how many array frames follow. Every field is required, except
# `rid`, an optional request id that the server echoes in its reply. Fields not listed are an error.
_I, _F, _S, _B, _M, _L = int, float, str, bool, dict, list
REQUESTS: dict[str, tuple[dict[str, type], int]] = {
    Op.HELLO: ({"version": _I, "role": _S, "wid": _I, "pid": _I, "host": _S, "local": _B}, 0),
    Op.PULL: ({"wid": _I, "inc": _I, "clock": _I}, 0),
    Op.PUSH: ({"wid": _I, "inc": _I, "sid": _S, "seq": _I, "clock": _I, "loss": _F, "count": _I, "pull": _B}, 1),
    Op.HEARTBEAT: ({"wid": _I, "inc": _I}, 0),
    Op.BYE: ({"wid": _I, "inc": _I}, 0),
    Op.STATUS: ({}, 0),
}
REPLIES: dict[str, tuple[dict[str, type], int]] = {
    Op.WELCOME: ({"version": _I, "wid": _I, "inc": _I, "server_id": _S, "theta_shape": _L, "theta_dtype": _S,
                  "data": _M, "train": _M, "model": _M}, 2),
    Op.THETA: ({"clock": _I, "version": _I, "batch": _L}, 1),
    Op.ACK: ({"applied": _B, "reason": _S}, 0),
    Op.STOP: ({"reason": _S}, 0),
    Op.HEARTBEAT: ({"server_id": _S, "step": _I, "alive": _B}, 0),
    Op.BYE: ({}, 0),
    Op.STATUS: ({"state": _M}, 0),
    Op.ERROR: ({"code": _S, "reason": _S}, 0),
}


def _reject_ext(code, data):
    raise ProtocolError(f"msgpack extension type {code} is not allowed", "bad_header")


def encode(header: dict, arrays: Sequence[np.ndarray] = ()) -> list:
    """Frames for one message. Arrays go out as their own buffers (the caller's socket decides whether to copy);
    the caller must not modify them until ZeroMQ is done with them."""
    frames: list[Any] = [b""]
    descr = []
    for a in arrays:
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        if a.dtype.str not in DTYPES:
            raise ValueError(f"dtype {a.dtype} is not on the wire allow-list {sorted(DTYPES)}")
        descr.append([a.dtype.str, list(a.shape)])
        frames.append(a)
    if descr:
        header = {**header, "arrays": descr}
    frames[0] = msgpack.packb(header, use_bin_type=True)
    return frames


def _buffer(frame) -> memoryview:
    return frame.buffer if hasattr(frame, "buffer") else memoryview(frame)


def _check_fields(op: str, header: dict, spec: dict[str, type]) -> None:
    for name, t in spec.items():
        if name not in header:
            raise ProtocolError(f"{op}: missing field '{name}'", "bad_field")
        v = header[name]
        ok = isinstance(v, t) and not (t is int and isinstance(v, bool))
        if t is float and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            raise ProtocolError(f"{op}: field '{name}' must be {t.__name__}, got {type(v).__name__}", "bad_field")
        if t is int and not -(2**63) <= v < 2**63:
            raise ProtocolError(f"{op}: field '{name}' out of range", "bad_field")
    extra = set(header) - set(spec) - {"op", "arrays", "rid"}
    if extra:
        raise ProtocolError(f"{op}: unknown field(s) {sorted(extra)}", "bad_field")
    if "rid" in header and not (isinstance(header["rid"], int) and not isinstance(header["rid"], bool)):
        raise ProtocolError(f"{op}: field 'rid' must be int", "bad_field")


def _array(op: str, i: int, descr, frame) -> np.ndarray:
    if not (isinstance(descr, list) and len(descr) == 2 and isinstance(descr[0], str) and isinstance(descr[1], list)):
        raise ProtocolError(f"{op}: arrays[{i}] must be [dtype, shape]", "bad_array")
    dtype_str, shape = descr
    dtype = DTYPES.get(dtype_str)
    if dtype is None:
        raise ProtocolError(f"{op}: arrays[{i}] dtype {dtype_str!r} not allowed; allowed: {sorted(DTYPES)}",
                            "bad_dtype")
    if len(shape) > MAX_NDIM or not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**40
                                        for x in shape):
        raise ProtocolError(f"{op}: arrays[{i}] shape {shape!r} is not a list of at most {MAX_NDIM} sizes",
                            "bad_shape")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    if nbytes > MAX_ARRAY_BYTES:
        raise ProtocolError(f"{op}: arrays[{i}] declares {nbytes} bytes, over the cap", "too_large")
    buf = _buffer(frame)
    if buf.nbytes != nbytes:
        raise ProtocolError(f"{op}: arrays[{i}] is {buf.nbytes} bytes but {dtype_str} x {shape} needs {nbytes}",
                            "bad_size")
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def decode(frames: Sequence, table: dict = REQUESTS) -> tuple[dict, list[np.ndarray]]:
    """(header, arrays) from the frames of one message, or ProtocolError saying what is wrong.
    Arrays are read-only views of the frames (zero-copy)."""
    if not 1 <= len(frames) <= MAX_FRAMES:
        raise ProtocolError(f"a message has 1 to {MAX_FRAMES} frames, got {len(frames)}", "bad_frames")
    raw = _buffer(frames[0])
    if raw.nbytes > HEADER_MAX_BYTES:
        raise ProtocolError(f"header of {raw.nbytes} bytes exceeds {HEADER_MAX_BYTES}", "too_large")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext,
                                 max_array_len=4096, max_map_len=4096,
                                 max_str_len=HEADER_MAX_BYTES, max_bin_len=0)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, StackError, ValueError, ...)
        raise ProtocolError(f"header is not valid msgpack: {type(e).__name__}", "bad_header") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}", "bad_header")
    op = header.get("op")
    if not isinstance(op, str):
        raise ProtocolError("header has no string 'op'", "bad_header")
    if op not in table:
        known = ", ".join(sorted(str(o.value) for o in table))
        raise ProtocolError(f"unknown op {op!r}; known ops: {known}", "unknown_op")
    spec, n_arrays = table[op]
    _check_fields(op, header, spec)
    descr = header.get("arrays", [])
    if not isinstance(descr, list) or len(descr) != n_arrays or len(frames) != 1 + n_arrays:
        raise ProtocolError(f"{op} carries {n_arrays} array frame(s); got {len(frames) - 1} frame(s) and "
                            f"{len(descr) if isinstance(descr, list) else '?'} descriptor(s)", "bad_frames")
    arrays = [_array(op, i, d, f) for i, (d, f) in enumerate(zip(descr, frames[1:]))]
    return header, arrays


def error(code: str, reason: str, rid: int | None = None) -> list:
    h = {"op": Op.ERROR.value, "code": code, "reason": reason}
    if rid is not None:
        h["rid"] = rid
    return encode(h)
