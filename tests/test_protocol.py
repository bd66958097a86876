import msgpack
import numpy as np
import pytest

from psrv import protocol
from psrv.errors import ProtocolError


def frames_bytes(frames):
    return [f.tobytes() if isinstance(f, np.ndarray) else bytes(f) for f in frames]


def push(**over):
    h = {"op": "push", "wid": 0, "inc": 1, "sid": "s", "seq": 1, "clock": 0, "version": 0, "loss": 0.5, "count": 4,
         "pull": True, "compute_s": 0.0, "request_s": 0.0, **over}
    return h


def test_round_trip_with_array():
    g = np.arange(6, dtype=np.float64).reshape(2, 3)
    frames = frames_bytes(protocol.encode(push(), [g]))
    assert len(frames) == 2 and len(frames[1]) == g.nbytes
    h, arrays = protocol.decode(frames)
    assert h["op"] == "push" and h["arrays"] == [["<f8", [2, 3]]]
    np.testing.assert_array_equal(arrays[0], g)


def test_fast_and_slow_field_checks_agree():
    # an int where a float is expected takes the slow path and is accepted; a float for an int is refused
    h, _ = protocol.decode(frames_bytes(protocol.encode(push(loss=1), [np.zeros(2)])))
    assert h["loss"] == 1
    with pytest.raises(ProtocolError, match="'clock' must be int, got float"):
        protocol.decode(frames_bytes(protocol.encode(push(clock=1.0), [np.zeros(2)])))
    h, _ = protocol.decode(frames_bytes(protocol.encode(push(rid=7), [np.zeros(2)])))
    assert h["rid"] == 7 and h["arrays"] == [["<f8", [2]]]


def test_header_only_messages():
    h, arrays = protocol.decode(frames_bytes(protocol.encode({"op": "status"})))
    assert h == {"op": "status"} and arrays == []


def test_reply_table():
    th = np.ones(3, dtype=np.float32)
    f = frames_bytes(protocol.encode({"op": "theta", "clock": 1, "version": 2, "batch": [0, 0, 0, 4], "rid": 9},
                                     [th]))
    h, arrays = protocol.decode(f, protocol.REPLIES)
    assert h["rid"] == 9 and arrays[0].dtype == np.float32
    with pytest.raises(ProtocolError, match="unknown op 'theta'"):
        protocol.decode(f, protocol.REQUESTS)  # a reply is not a valid request


def raw(header, *arrays):
    return [msgpack.packb(header)] + list(arrays)


G = np.zeros(3).tobytes()


@pytest.mark.parametrize("frames,code,needle", [
    ([], "bad_frames", "1 to 4 frames"),
    ([b"\xc1"], "bad_header", "not valid msgpack"),
    ([b"\x92\x01"], "bad_header", "not valid msgpack"),                  # truncated array
    ([msgpack.packb([1, 2])], "bad_header", "must be a map"),
    ([msgpack.packb({"x": 1})], "bad_header", "no string 'op'"),
    (raw({"op": "launch"}), "unknown_op", "known ops: bye, get, heartbeat, hello, pull, push, status"),
    (raw({**push(), "arrays": [["<f8", [3]]]}), "bad_frames", "carries 0 or 1 or 2 array"),   # descriptor, no frame
    (raw({**push(), "arrays": [["|O", [3]]]}, G), "bad_dtype", "not allowed"),
    (raw({**push(), "arrays": [[">f8", [3]]]}, G), "bad_dtype", "not allowed"),
    (raw({**push(), "arrays": [["<f8", [4]]]}, G), "bad_size", "needs 32"),
    (raw({**push(), "arrays": [["<f8", [-3]]]}, G), "bad_shape", "shape"),
    (raw({**push(), "arrays": [["<f8", [2**39, 2**39]]]}, G), "too_large", "over the cap"),
    (raw({**push(), "arrays": [["<f8", "3"]]}, G), "bad_array", "[dtype, shape]"),
    (raw({**push(), "arrays": [["<f8", [3]]]}, G, G, G), "bad_frames", "carries 0 or 1 or 2 array"),
    (raw({"op": "pull", "wid": 0, "inc": 1, "clock": 0}, G), "bad_frames", "carries 0 array"),
    ([msgpack.packb({"op": "pull"}), b"", b"", b"", b""], "bad_frames", "1 to 4 frames"),
    (raw({"op": "pull", "wid": "0", "inc": 1, "clock": 0}), "bad_field", "'wid' must be int"),
    (raw({"op": "pull", "wid": True, "inc": 1, "clock": 0}), "bad_field", "'wid' must be int"),
    (raw({"op": "pull", "inc": 1, "clock": 0}), "bad_field", "missing field 'wid'"),
    (raw({"op": "pull", "wid": 0, "inc": 1, "clock": 0, "evil": 1}), "bad_field", "unknown field"),
    (raw({"op": "pull", "wid": 0, "inc": 1, "clock": 0, "rid": "x"}), "bad_field", "'rid' must be int"),
    ([b"\x81\xa2op" + b"\xd9\xff" + b"a" * 10], "bad_header", "not valid msgpack"),  # string longer than data
    ([b"\x80" + b"\x00" * protocol.HEADER_MAX_BYTES], "too_large", "exceeds"),
    ([msgpack.packb({"op": "status"}) + b"\x00"], "bad_header", "not valid msgpack"),  # trailing bytes
    ([msgpack.packb({"op": msgpack.ExtType(5, b"x")})], "bad_header", "extension"),
    ([msgpack.packb({1: "status"})], "bad_header", "not valid msgpack"),  # non-string map keys
])
def test_invalid_messages_raise_protocol_errors(frames, code, needle):
    with pytest.raises(ProtocolError) as e:
        protocol.decode(frames)
    assert e.value.code == code
    assert needle in str(e.value)


def test_encode_refuses_unlisted_dtypes():
    with pytest.raises(ValueError):
        protocol.encode({"op": "push"}, [np.zeros(2, dtype=object)])
    with pytest.raises(ValueError):
        protocol.encode({"op": "push"}, [np.zeros(2, dtype=np.int64)])


def test_non_contiguous_arrays_are_sent_contiguous():
    a = np.arange(12.0).reshape(3, 4)[:, ::2]
    h, arrays = protocol.decode(frames_bytes(protocol.encode(push(), [a])))
    np.testing.assert_array_equal(arrays[0], a)


def test_decoded_arrays_are_read_only_views():
    buf = bytearray(np.ones(3).tobytes())
    _, arrays = protocol.decode([msgpack.packb({**push(), "arrays": [["<f8", [3]]]}), bytes(buf)])
    assert not arrays[0].flags.writeable


# ---------------------------------------------------------------------------------------------- one hardened decoder
def test_one_dtype_table_for_the_wire_and_checkpoints():
    from psrv import checkpoint, safepack
    assert protocol.DTYPES.items() <= safepack.DTYPES.items()   # the wire allows a subset of the one table
    assert checkpoint.DTYPES == safepack.DTYPES
    assert sorted(protocol.DTYPES) == ["<f4", "<f8"]


def test_untrusted_msgpack_is_decoded_in_one_place_only():
    """Every reader of untrusted msgpack goes through safepack.unpack: a second copy of the limits drifts."""
    import ast
    from .conftest import ROOT
    offenders = []
    for path in sorted((ROOT / "psrv").glob("*.py")):
        if path.name == "safepack.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("unpackb", "unpack", "Unpacker") and \
                    getattr(node.value, "id", "") == "msgpack":
                offenders.append(f"{path.name}:{node.lineno}: msgpack.{node.attr}")
    assert offenders == []


@pytest.mark.parametrize("raw,limits,needle", [
    (msgpack.packb({"a": msgpack.ExtType(1, b"x")}), {}, "extension type 1"),
    (msgpack.packb({"a": 1}) + b"\x00", {}, "ExtraData"),
    (msgpack.packb({1: 1}), {}, "ValueError"),
    (b"\x92\x01", {}, "ValueError"),
    (msgpack.packb([1, 2, 3]), {"max_items": 2}, "max_array_len"),
    (msgpack.packb({"a": 1, "b": 2}), {"max_items": 1}, "max_map_len"),
    (msgpack.packb("abc"), {"max_str": 2}, "max_str_len"),
    (msgpack.packb(b"abc", use_bin_type=True), {"max_bin": 0}, "max_bin_len"),
])
def test_safepack_refuses_with_one_error_type(raw, limits, needle):
    from psrv import safepack
    with pytest.raises(safepack.UnpackError, match=needle):
        safepack.unpack(raw, **limits)
    assert safepack.unpack(msgpack.packb({"a": [1, b"x"]}, use_bin_type=True)) == {"a": [1, b"x"]}


# ---------------------------------------------------------------------------------------------- issue 13
@pytest.mark.parametrize("frames,code", [
    (raw({"op": "launch", "rid": 5}), "unknown_op"),
    (raw({"op": "pull", "wid": "0", "inc": 1, "clock": 0, "rid": 5}), "bad_field"),
    (raw({"op": "pull", "wid": 0, "inc": 1, "clock": 0, "rid": 5}, G), "bad_frames"),
    ([msgpack.packb({"op": "pull", "wid": 0, "inc": 1, "clock": 0, "rid": 5})] + [b""] * 4, "bad_frames"),
    (raw({**push(), "rid": 5, "arrays": [["<i8", [3]]]}, G), "bad_dtype"),
    (raw({**push(), "rid": 5, "arrays": [["<f8", [4]]]}, G), "bad_size"),
    (raw({**push(), "rid": 5, "arrays": [["<f8", [-1]]]}, G), "bad_shape"),
    (raw({**push(), "rid": 5, "arrays": [["<f8"]]}, G), "bad_array"),
])
def test_every_error_after_the_header_carries_its_rid(frames, code):
    with pytest.raises(ProtocolError) as e:
        protocol.decode(frames)
    assert (e.value.code, e.value.rid) == (code, 5)


def test_errors_before_a_valid_rid_carry_none():
    for frames in ([b"\xc1"], raw({"op": "pull", "wid": 0, "inc": 1, "clock": 0, "rid": "5"}),
                   [b"", msgpack.packb({"op": "status", "rid": 5})]):
        with pytest.raises(ProtocolError) as e:
            protocol.decode(frames)
        assert e.value.rid is None


def test_bin_where_a_string_belongs_and_a_req_delimiter_are_named():
    with pytest.raises(ProtocolError, match="'host' must be str, got bin") as e:
        protocol.decode([msgpack.packb({"op": "hello", "version": 1, "role": "worker", "wid": 0, "pid": 1,
                                        "host": b"h", "local": True, "rid": 3}, use_bin_type=True)])
    assert (e.value.code, e.value.rid) == ("bad_field", 3)
    with pytest.raises(ProtocolError, match="no string 'op' \\(bin") as e:
        protocol.decode([msgpack.packb({"op": b"status"}, use_bin_type=True)])
    assert e.value.code == "bad_header"
    with pytest.raises(ProtocolError, match="DEALER socket, not REQ") as e:
        protocol.decode([b"", msgpack.packb({"op": "status"})])     # what a REQ socket sends
    assert e.value.code == "empty_header"


def test_replies_may_carry_keys_a_client_does_not_know_requests_may_not():
    h, _ = protocol.decode(raw({"op": "ack", "applied": True, "reason": "", "future": 1}), protocol.REPLIES)
    assert h["future"] == 1
    with pytest.raises(ProtocolError, match="unknown field"):
        protocol.decode(raw({"op": "status", "future": 1}))


def test_op_strings_are_the_ops_values():
    assert {k: v for k, v in vars(protocol.OpStr).items() if k.isupper()} == {o.name: o.value for o in protocol.Op}


def test_encode_makes_msgpacks_own_bytes_in_every_thread():
    """encode keeps a Packer per thread (for speed): its bytes are msgpack.packb's, header-only or with arrays,
    in the main thread and in others encoding at the same time."""
    import threading
    headers = [push(), push(rid=3, loss=float("nan")), {"op": "status"},
               {"op": "theta", "clock": 1, "version": 2, "batch": [0, 1, 2, 3], "rid": 2**40}]
    want = [msgpack.packb(h, use_bin_type=True) for h in headers]
    assert [protocol.encode(h)[0] for h in headers] == want
    g = np.arange(3.0)
    assert protocol.encode(push(), [g])[0] == msgpack.packb({**push(), "arrays": [["<f8", [3]]]}, use_bin_type=True)
    bad = []

    def encode_many():
        for _ in range(2000):
            if [protocol.encode(h)[0] for h in headers] != want:
                bad.append(1)
    threads = [threading.Thread(target=encode_many) for _ in range(3)]
    for t in threads:
        t.start()
    encode_many()
    for t in threads:
        t.join()
    assert not bad


def test_a_nil_rid_or_arrays_reads_as_absent():
    h, arrays = protocol.decode([msgpack.packb({**push(), "rid": None, "arrays": None})])
    assert "rid" not in h and "arrays" not in h and arrays == []
    with pytest.raises(ProtocolError) as e:
        protocol.decode([msgpack.packb({**push(), "rid": None, "extra": 1})])
    assert e.value.code == "bad_field" and "extra" in str(e.value)
