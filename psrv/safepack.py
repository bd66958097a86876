"""Reading bytes nobody vouches for (a peer's message header, a checkpoint's manifest): one hardened msgpack decoder
and one dtype allow-list, shared by protocol.py and checkpoint.py so the two cannot drift apart. Pure: no I/O.
"""
from __future__ import annotations

import msgpack
import numpy as np

# Every dtype an array may be read as; callers allow a subset (the wire: floats only). Never object, void, complex or
# big-endian: object would unpickle, the others have no use here and widen what a reader must get right.
DTYPES = {s: np.dtype(s) for s in ("<f8", "<f4", "<i8", "<u8")}


def dtypes(*names: str) -> dict[str, np.dtype]:
    """The allow-list of one caller: a subset of DTYPES (KeyError for a name not in it)."""
    return {s: DTYPES[s] for s in names}


class UnpackError(ValueError):
    """Bytes that are not exactly one msgpack object within the limits, or that use an extension type."""


def _refuse_ext(code, data):
    raise UnpackError(f"msgpack extension type {code} is not allowed")


def unpack(raw, *, max_items: int | None = None, max_str: int | None = None, max_bin: int | None = None):
    """One msgpack object from untrusted bytes, or UnpackError. Maps need str keys, arrays come back as lists, str
    must be UTF-8, no extension types, no trailing bytes; max_items bounds every array and map, max_str every str,
    max_bin every bin (each defaults to the length of raw, which bounds the memory a lie can claim)."""
    if max_items is None or max_str is None or max_bin is None:
        n = memoryview(raw).nbytes
        max_items = n if max_items is None else max_items
        max_str = n if max_str is None else max_str
        max_bin = n if max_bin is None else max_bin
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext,
                               max_array_len=max_items, max_map_len=max_items, max_str_len=max_str,
                               max_bin_len=max_bin)
    except UnpackError:
        raise
    except Exception as e:  # msgpack raises several types (ExtraData, FormatError, StackError, ValueError, ...)
        raise UnpackError(f"{type(e).__name__}: {e}") from None
