"""Arrays in shared memory for the local data plane: theta published under a seqlock, and gradient slots.

The server updates theta in place inside a SeqlockArray: it bumps the sequence number to odd before writing and
back to even after, storing the new version with it. A worker copies theta out and retries if the sequence number
changed meanwhile, so a pull is one memcpy and never sees a half-written theta. A Slot is a plain shared array a
worker writes its gradient into before it notifies the server; the request/reply protocol keeps the two from
touching it at the same time. No sockets here.

The seqlock needs one process's stores to become visible to another in the order they were made. x86-64 guarantees
that (TSO); Python cannot emit the fences weaker memory models need, so elsewhere the server keeps theta private and
every worker pulls it over ZeroMQ (ORDERED_STORES).
"""
from __future__ import annotations

import platform
import time
from multiprocessing import shared_memory

import numpy as np

HEADER_BYTES = 64  # sequence number (u64), version (u64), padding to a cache line
ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def release(shm: shared_memory.SharedMemory, owner: bool) -> None:
    """Unmap a segment, and remove its name when we created it. A view still held elsewhere keeps the mapping
    until the process exits; a name already gone is not an error."""
    try:
        shm.close()
    except BufferError:
        pass
    if owner:
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


class SharedArray:
    """A numpy array over a named shared-memory segment, after a 64-byte header. Only its creator unlinks it."""

    def __init__(self, shm: shared_memory.SharedMemory, shape, dtype, owner: bool):
        self._shm, self.owner = shm, owner
        self.header = np.ndarray((2,), dtype=np.uint64, buffer=shm.buf, offset=0)
        self.array = np.ndarray(tuple(shape), dtype=np.dtype(dtype), buffer=shm.buf, offset=HEADER_BYTES)

    @classmethod
    def create(cls, name: str, shape, dtype):
        nbytes = HEADER_BYTES + int(np.prod(shape)) * np.dtype(dtype).itemsize
        shm = shared_memory.SharedMemory(name=name, create=True, size=nbytes)  # mode 0600
        obj = cls(shm, shape, dtype, owner=True)
        obj.header[:] = 0
        return obj

    @classmethod
    def attach(cls, name: str, shape, dtype):
        shm = shared_memory.SharedMemory(name=name)
        need = HEADER_BYTES + int(np.prod(shape)) * np.dtype(dtype).itemsize
        if shm.size < need:
            shm.close()
            raise ValueError(f"shared memory {name} holds {shm.size} bytes; {need} expected")
        return cls(shm, shape, dtype, owner=False)

    @property
    def name(self) -> str:
        return self._shm.name

    def close(self) -> None:
        del self.header, self.array
        release(self._shm, self.owner)


class SeqlockArray(SharedArray):
    """theta, published: one writer (the server), any number of readers (local workers)."""

    def __init__(self, shm: shared_memory.SharedMemory, shape, dtype, owner: bool):
        super().__init__(shm, shape, dtype, owner)
        # the sequence number and the version (the header's two words) as a memoryview, which every update and
        # every read uses: each access is one aligned 8-byte load or store, as numpy's, and gives a Python int
        # without numpy's scalar machinery, several times slower per access
        self._words = shm.buf[:16].cast("Q")

    def close(self) -> None:
        self._words.release()  # a view still held would keep the segment mapped
        del self._words
        super().close()

    def begin_write(self) -> None:
        w = self._words
        w[0] = w[0] + 1  # odd: a write is under way

    def end_write(self, version: int) -> None:
        w = self._words
        w[1] = version
        w[0] = w[0] + 1  # even again: readers may use what they copy

    def read_into(self, out: np.ndarray, timeout_s: float = 10.0) -> int:
        """Copy a consistent theta into `out`; return its version. Retries while a write overlaps the copy (a write
        takes microseconds to milliseconds); gives up with TimeoutError after timeout_s."""
        w = self._words
        seq = w[0]
        if not seq & 1:  # the common case, once per step: no write under way, and none overlaps the copy
            version = w[1]
            np.copyto(out, self.array)
            if w[0] == seq:
                return version
        return self._consistent(lambda: np.copyto(out, self.array), timeout_s)

    def read_rows(self, rows: np.ndarray, out: np.ndarray, timeout_s: float = 10.0) -> int:
        """Copy theta[rows] (one version's) into `out`; return that version. A keyed read: a sparse worker gathers
        the rows of its batch's keys, O(keys), instead of copying all of theta. rows must be below theta's size."""
        return self._consistent(lambda: np.take(self.array, rows, axis=0, out=out, mode="clip"), timeout_s)

    def _consistent(self, copy, timeout_s: float) -> int:
        """Run copy() until no write overlapped it; the version it saw."""
        deadline = None
        w = self._words
        while True:
            seq = w[0]
            if not seq & 1:
                version = w[1]
                copy()
                if w[0] == seq:
                    return version
            if deadline is None:
                deadline = time.monotonic() + timeout_s
            elif time.monotonic() > deadline:
                raise TimeoutError(f"theta in {self.name} stayed under write for {timeout_s:g} s")
            time.sleep(0)  # let the writer run
