"""psrv/checkpoint.py: round trips, retention, corruption of every kind, crashes during a save, lying manifests."""
from __future__ import annotations

import hashlib
import logging
import os
import struct

import msgpack
import numpy as np
import pytest

from psrv import checkpoint as ck
from psrv.checkpoint import CheckpointError

STATE = {"step": 7, "lr": 0.05, "mode": "ssp", "done": False, "none": None, "big": 2**64 - 1, "neg": -(2**63),
         "nan": float("nan"), "clocks": [3, 4, 5],
         "workers": {"0": {"inc": 2, "alive": True}, "1": {"inc": 1, "alive": False, "tags": ["a", [], {}]}},
         "blob": b"\x00\xff"}


def arrays_of_every_kind() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for dt in ("<f8", "<f4", "<i8", "<u8"):
        for shape in [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 4)]:
            n = int(np.prod(shape))
            bits = rng.integers(0, 2**63, size=n, dtype=np.uint64).view(np.uint8)  # arbitrary bit patterns
            out[f"{dt}{shape}"] = bits[:n * np.dtype(dt).itemsize].view(dt).reshape(shape)
    out["theta"] = rng.standard_normal(11)
    out["odd"] = np.arange(3, dtype=np.float32)          # 12 bytes: the next array starts after padding
    out["strided"] = np.arange(20.0).reshape(4, 5)[:, ::2]
    out["fortran"] = np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3))
    out["bigendian"] = np.arange(4, dtype=">f8")
    return out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype.kind == b.dtype.kind and a.itemsize == b.itemsize and \
        np.ascontiguousarray(a, a.dtype.newbyteorder("<")).tobytes() == b.tobytes()


def save_steps(d, steps, keep=3):
    return [ck.save(str(d), s, {"step": s}, {"theta": np.full(4, float(s))}, keep=keep) for s in steps]


def layout(path):
    """(manifest length, offset of the array section) of a file written by save()."""
    data = open(path, "rb").read()
    mlen = struct.unpack_from("<Q", data, 40)[0]
    return mlen, 48 + mlen


def craft(path, manifest: dict, payload: bytes = b"", magic: bytes = ck.MAGIC) -> str:
    """A file with a valid digest around whatever manifest: only the checks after the digest can reject it."""
    m = msgpack.packb(manifest, use_bin_type=True)
    body = struct.pack("<Q", len(m)) + m + payload
    with open(path, "wb") as fh:
        fh.write(magic + hashlib.sha256(body).digest() + body)
    return str(path)


# ------------------------------------------------------------------------------------------------ round trip

def test_round_trip_is_bit_identical(tmp_path):
    arrays = arrays_of_every_kind()
    path = ck.save(str(tmp_path), 7, STATE, arrays)
    assert os.path.basename(path) == "ckpt-0000000007.psrv"
    state, got = ck.load(path)
    assert list(got) == list(arrays)
    for name, a in arrays.items():
        b = got[name]
        assert same_bits(a, b), name
        assert b.flags.writeable and b.flags.c_contiguous and b.flags.owndata, name
        assert b.dtype.str in ck.DTYPES, name
    nan = state.pop("nan")
    assert nan != nan
    assert state == {k: v for k, v in STATE.items() if k != "nan"}
    with open(path, "rb") as fh:
        assert fh.read(8) == ck.MAGIC
    mlen, section = layout(path)
    entries = msgpack.unpackb(open(path, "rb").read()[48:section])["arrays"]
    assert all(off % 8 == 0 for _, _, _, off, _ in entries)
    assert os.path.getsize(path) == section + entries[-1][3] + entries[-1][4]


def test_no_arrays_and_tuples_come_back_as_lists(tmp_path):
    path = ck.save(tmp_path / "new" / "dir", 0, {"t": (1, (2, 3))}, {})
    assert ck.load(path) == ({"t": [1, [2, 3]]}, {})


# ------------------------------------------------------------------------------------------------ retention

def test_keep_the_newest_and_list_them_in_step_order(tmp_path):
    paths = save_steps(tmp_path, [1, 2, 3, 4, 5, 6])
    assert ck.checkpoints(str(tmp_path)) == paths[3:]
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000000004.psrv", "ckpt-0000000005.psrv", "ckpt-0000000006.psrv"]
    # order is by step, not by name or time; other files are ignored
    ck.save(str(tmp_path), 12_345_678_901, {}, {}, keep=10)
    for junk in ["ckpt-7.psrv", "ckpt-00000000009.psrv", "ckpt-0000000008.psrv.bak", "notes.txt", ".tmp-ckpt-x"]:
        (tmp_path / junk).write_bytes(b"x")
    (tmp_path / "ckpt-0000000010.psrv").mkdir()
    names = [os.path.basename(p) for p in ck.checkpoints(str(tmp_path))]
    assert names == ["ckpt-0000000004.psrv", "ckpt-0000000005.psrv", "ckpt-0000000006.psrv",
                     "ckpt-12345678901.psrv"]
    state, arrays, path = ck.load_latest(str(tmp_path))
    assert path.endswith("ckpt-12345678901.psrv")


def test_the_checkpoint_just_written_is_never_deleted(tmp_path):
    save_steps(tmp_path, [10, 11, 12])
    path = ck.save(str(tmp_path), 5, {}, {}, keep=3)
    assert os.path.exists(path) and len(ck.checkpoints(str(tmp_path))) == 4


def test_same_step_replaces(tmp_path):
    save_steps(tmp_path, [3])
    path = ck.save(str(tmp_path), 3, {"again": True}, {})
    assert ck.checkpoints(str(tmp_path)) == [path]
    assert ck.load(path) == ({"again": True}, {})


# ------------------------------------------------------------------------------------------------ corruption

def flip(offset_of):
    def corrupt(path):
        data = bytearray(open(path, "rb").read())
        data[offset_of(path)] ^= 0x01
        open(path, "wb").write(bytes(data))
    return corrupt


def truncate_to(size_of):
    def corrupt(path):
        data = open(path, "rb").read()
        open(path, "wb").write(data[:size_of(path, len(data))])
    return corrupt


CORRUPTIONS = {
    "array byte": (flip(lambda p: layout(p)[1] + 5), "checksum mismatch"),
    "manifest byte": (flip(lambda p: 48 + layout(p)[0] // 2), "checksum mismatch"),
    "digest byte": (flip(lambda p: 20), "checksum mismatch"),
    "length byte": (flip(lambda p: 46), "truncated"),             # the manifest now claims to run past the end
    "cut in arrays": (truncate_to(lambda p, n: n - 3), "truncated"),
    "cut in manifest": (truncate_to(lambda p, n: 50), "truncated"),
    "cut in header": (truncate_to(lambda p, n: 20), "truncated"),
    "zero length": (truncate_to(lambda p, n: 0), "truncated"),
    "wrong magic": (flip(lambda p: 3), "bad magic"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_newest_is_rejected_and_skipped(tmp_path, caplog, kind):
    corrupt, reason = CORRUPTIONS[kind]
    old, new = save_steps(tmp_path, [1, 2])
    corrupt(new)
    with pytest.raises(CheckpointError) as e:
        ck.load(new)
    assert reason in str(e.value) and new in str(e.value)
    assert e.value.path == new and reason in e.value.reason
    with caplog.at_level(logging.WARNING, logger="psrv.checkpoint"):
        state, arrays, path = ck.load_latest(str(tmp_path))
    assert path == old and state == {"step": 1} and np.array_equal(arrays["theta"], np.full(4, 1.0))
    [rec] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert new in rec.getMessage() and reason in rec.getMessage()


def test_all_corrupt_or_nothing_gives_none(tmp_path):
    for p in save_steps(tmp_path, [1, 2, 3]):
        truncate_to(lambda p, n: n // 2)(p)
    assert ck.load_latest(str(tmp_path)) is None
    assert ck.load_latest(str(tmp_path / "missing")) is None
    (tmp_path / "file").write_bytes(b"")
    assert ck.load_latest(str(tmp_path / "file")) is None
    assert ck.checkpoints(str(tmp_path / "missing")) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ck.load_latest(str(empty)) is None


def test_a_renamed_checkpoint_is_not_taken_for_another_step(tmp_path, caplog):
    old, new = save_steps(tmp_path, [1, 2])
    os.replace(old, tmp_path / "ckpt-0000000009.psrv")
    with caplog.at_level(logging.WARNING, logger="psrv.checkpoint"):
        assert ck.load_latest(str(tmp_path))[2] == new
    assert "ckpt-0000000009.psrv" in caplog.text and "step 1" in caplog.text


# ------------------------------------------------------------------------------------------------ crashes

@pytest.mark.parametrize("victim", ["replace", "fsync", "write"])
def test_a_crash_during_save_leaves_the_old_set_untouched(tmp_path, monkeypatch, victim):
    [old] = save_steps(tmp_path, [1])
    before = open(old, "rb").read()

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    if victim == "write":  # fail half-way through the array bytes
        monkeypatch.setattr(ck, "_CHUNK", 8)
        real = ck.hashlib.sha256
        calls = []

        class Hash:
            def __init__(self):
                self.h = real()

            def update(self, b):
                calls.append(1)
                if len(calls) > 3:
                    boom()
                self.h.update(b)

        monkeypatch.setattr(ck.hashlib, "sha256", Hash)
    else:
        monkeypatch.setattr(os, victim, boom)
    with pytest.raises(OSError, match="No space"):
        ck.save(str(tmp_path), 2, {"step": 2}, {"theta": np.arange(100.0)}, keep=1)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["ckpt-0000000001.psrv"]
    assert open(old, "rb").read() == before
    assert ck.load_latest(str(tmp_path))[2] == old


def test_clean_temporaries(tmp_path):
    [good] = save_steps(tmp_path, [1])
    (tmp_path / ".tmp-ckpt-0000000002-abc").write_bytes(ck.MAGIC + b"half")   # a save killed with -9
    (tmp_path / ".tmp-ckpt-dir").mkdir()                                      # not ours: left alone
    (tmp_path / "other.tmp").write_bytes(b"")
    assert ck.checkpoints(str(tmp_path)) == [good]
    assert ck.clean_temporaries(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == [".tmp-ckpt-dir", "ckpt-0000000001.psrv", "other.tmp"]
    assert ck.clean_temporaries(str(tmp_path)) == 0
    assert ck.clean_temporaries(str(tmp_path / "missing")) == 0


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("a", [np.array([1, "x"], dtype=object), np.zeros(2, complex), np.zeros(2, bool),
                               np.zeros(2, np.int32), np.zeros(2, "V8"), np.array(["ab"])])
def test_unsupported_dtype_is_refused_before_writing(tmp_path, a):
    with pytest.raises(ValueError, match="dtype"):
        ck.save(str(tmp_path), 1, {}, {"a": a})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("state", [{"s": {1, 2}}, {"x": [1, object()]}, {"n": np.int64(3)}, {1: "int key"},
                                   {"d": {"k": {b"bytes key": 1}}}, {"big": 2**64}, {"a": np.zeros(2)}])
def test_state_that_msgpack_cannot_hold_exactly_is_refused(tmp_path, state):
    with pytest.raises((TypeError, ValueError), match="state"):
        ck.save(str(tmp_path), 1, state, {})
    assert os.listdir(tmp_path) == []


def test_a_state_too_big_for_the_manifest_cap_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(ValueError, match="bulk data in arrays"):
        ck.save(str(tmp_path), 1, {"rows": list(range(1000))}, {})
    assert os.listdir(tmp_path) == []


def test_a_reference_cycle_is_refused(tmp_path):
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="nested"):
        ck.save(str(tmp_path), 1, {"loop": loop}, {})


@pytest.mark.parametrize("kwargs, exc", [({"step": -1}, ValueError), ({"step": True}, TypeError),
                                         ({"step": 1.0}, TypeError), ({"keep": 0}, ValueError),
                                         ({"state": [1]}, TypeError), ({"arrays": {"a": [1.0]}}, TypeError),
                                         ({"arrays": {1: np.zeros(1)}}, TypeError)])
def test_bad_arguments(tmp_path, kwargs, exc):
    args = {"directory": str(tmp_path), "step": 1, "state": {}, "arrays": {}, **kwargs}
    with pytest.raises(exc):
        ck.save(**args)


# ------------------------------------------------------------------------------------------------ lying files

def manifest(*entries, **over):
    return {"format": ck.FORMAT_VERSION, "step": 1, "state": {}, "arrays": list(entries), **over}


LIES = {
    "nbytes not shape": (manifest(["a", "<f8", [3], 0, 16]), bytes(24), "declares 16 bytes"),
    "offset past end": (manifest(["a", "<f8", [2], 64, 16]), bytes(16), "spans bytes"),
    "nbytes past end": (manifest(["a", "<u8", [4], 0, 32]), bytes(16), "spans bytes"),
    "object dtype": (manifest(["a", "|O", [2], 0, 16]), bytes(16), "dtype '|O'"),
    "big-endian": (manifest(["a", ">f8", [2], 0, 16]), bytes(16), "dtype '>f8'"),
    "dtype not str": (manifest(["a", 8, [2], 0, 16]), bytes(16), "dtype 8"),
    "negative dim": (manifest(["a", "<f8", [-2], 0, -16]), bytes(16), "shape"),
    "bool dim": (manifest(["a", "<f8", [True], 0, 8]), bytes(8), "shape"),
    "shape not list": (manifest(["a", "<f8", 2, 0, 16]), bytes(16), "shape"),
    "huge empty": (manifest(["a", "<f8", [0, 2**60], 0, 0]), b"", "shape"),
    "negative offset": (manifest(["a", "<f8", [1], -8, 8]), bytes(16), "offset"),
    "unaligned offset": (manifest(["a", "<f8", [1], 4, 8]), bytes(16), "8-aligned"),
    "overlap": (manifest(["a", "<f8", [2], 0, 16], ["b", "<f8", [1], 8, 8]), bytes(16), "overlap"),
    "repeated name": (manifest(["a", "<f8", [1], 0, 8], ["a", "<f8", [1], 8, 8]), bytes(16), "repeated"),
    "short entry": (manifest(["a", "<f8", [1], 0]), bytes(8), "is not [name"),
    "arrays not list": (manifest(arrays={"a": 1}), b"", "arrays is not a list"),
    "state not map": (manifest(state=[1]), b"", "state is list"),
    "bytes key in state": (manifest(state={"a": {b"k": 1}}), b"", "keys must be str"),
    "format 2": (manifest(format=2), b"", "format version 2"),
    "format true": (manifest(format=True), b"", "format version True"),
    "step negative": (manifest(step=-1), b"", "step -1"),
    "extra key": ({**manifest(), "pickle": b"..."}, b"", "expected the keys"),
    "not a map": ([1, 2, 3], b"", "expected the keys"),
}


@pytest.mark.parametrize("kind", list(LIES))
def test_a_lying_manifest_is_a_checkpoint_error(tmp_path, kind):
    m, payload, reason = LIES[kind]
    path = craft(tmp_path / "ckpt-0000000001.psrv", m, payload)
    with pytest.raises(CheckpointError, match="bad manifest|format version") as e:
        ck.load(path)
    assert reason in str(e.value)
    assert ck.load_latest(str(tmp_path)) is None


def test_crafted_file_that_tells_the_truth_loads(tmp_path):
    # the same helper as the lies, so those fail for their lie and not for the helper
    payload = np.arange(2.0).tobytes() + bytes(8) + np.array([7], "<u8").tobytes()
    path = craft(tmp_path / "x", manifest(["a", "<f8", [2], 0, 16], ["b", "<u8", [], 24, 8]), payload)
    state, arrays = ck.load(path)
    assert arrays["a"].tolist() == [0.0, 1.0] and arrays["b"].shape == () and arrays["b"] == 7


@pytest.mark.parametrize("raw", [b"\xc1", b"\x81\xa1a", b"\xd4\x05\x00", b"\x80\x80"])
def test_manifest_that_is_not_msgpack(tmp_path, raw):
    body = struct.pack("<Q", len(raw)) + raw
    path = tmp_path / "bad"
    path.write_bytes(ck.MAGIC + hashlib.sha256(body).digest() + body)
    with pytest.raises(CheckpointError, match="not valid msgpack"):
        ck.load(str(path))


def test_manifest_length_beyond_the_file_with_a_valid_digest(tmp_path):
    body = struct.pack("<Q", 2**63) + b"\x80"
    path = tmp_path / "bad"
    path.write_bytes(ck.MAGIC + hashlib.sha256(body).digest() + body)
    with pytest.raises(CheckpointError, match="length"):
        ck.load(str(path))


def test_missing_file_is_an_os_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        ck.load(str(tmp_path / "ckpt-0000000001.psrv"))


def test_no_pickle_anywhere():
    src = open(ck.__file__).read()
    for banned in ("import pickle", "from pickle", "allow_pickle", "np.load(", "marshal", "eval("):
        assert banned not in src, banned


def test_an_extension_type_in_the_manifest_is_refused(tmp_path):
    path = craft(tmp_path / "x", manifest(state={"x": msgpack.ExtType(3, b"\x00")}))
    with pytest.raises(CheckpointError, match="not valid msgpack .*extension type 3"):
        ck.load(path)
