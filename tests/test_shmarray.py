import multiprocessing as mp
import os

import numpy as np
import pytest

from psrv import blocks
from psrv.shmarray import SeqlockArray, SharedArray


def name(tag):
    return blocks.run_prefix() + tag


def test_create_attach_and_only_the_owner_unlinks():
    a = SharedArray.create(name("a"), (3, 2), np.float32)
    a.array[:] = 7
    b = SharedArray.attach(a.name, (3, 2), np.float32)
    assert (b.array == 7).all() and not b.owner
    assert oct(os.stat(f"/dev/shm/{a.name}").st_mode & 0o777) == "0o600"
    b.close()
    assert os.path.exists(f"/dev/shm/{a.name}")
    a.close()
    assert not os.path.exists(f"/dev/shm/{a.name}")


def test_attach_refuses_a_segment_too_small():
    a = SharedArray.create(name("small"), (4,), np.float64)
    try:
        with pytest.raises(ValueError, match="holds"):
            SharedArray.attach(a.name, (100,), np.float64)
    finally:
        a.close()


def test_read_returns_the_version_written():
    t = SeqlockArray.create(name("t"), (5,), np.float64)
    try:
        t.begin_write()
        t.array[:] = 3.0
        t.end_write(42)
        out = np.empty(5)
        assert t.read_into(out) == 42 and (out == 3.0).all()
        t.begin_write()                      # a writer that never finishes: the reader gives up, it never hangs
        with pytest.raises(TimeoutError):
            t.read_into(out, timeout_s=0.05)
    finally:
        t.close()


def _writer(seg_name, size, writes):
    w = SeqlockArray.attach(seg_name, (size,), np.float64)
    for k in range(1, writes + 1):
        w.begin_write()
        w.array[:] = k                       # each version is one constant everywhere: a torn copy would mix two
        w.end_write(k)
    del w.array, w.header


def test_reads_are_never_torn_while_another_process_writes():
    size = 1 << 18                           # 2 MiB: a copy takes long enough for writes to overlap it
    t = SeqlockArray.create(name("race"), (size,), np.float64)
    try:
        p = mp.get_context("spawn").Process(target=_writer, args=(t.name, size, 3000))
        p.start()
        out = np.empty(size)
        seen = set()
        while p.is_alive() or not seen:
            v = t.read_into(out)
            assert out[0] == out[-1] == v and (out == v).all()
            seen.add(v)
        p.join(30)
        assert p.exitcode == 0 and len(seen) > 1
    finally:
        t.close()
