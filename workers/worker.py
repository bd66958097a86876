"""The worker loop: pull theta and a batch name, compute the gradient on those rows of its shard, push, repeat.

The worker reads its rows from shared memory (attached by name, never copied whole) into preallocated buffers.
It leaves when the server says stop, and exits by itself if the launcher or the server goes away.
"""
from __future__ import annotations

import logging
import sys
import time
import traceback

import numpy as np

from psrv import models, proc
from psrv.errors import RunError
from psrv.protocol import Op
from psrv.schedule import epoch_order
from psrv.shards import DataBlock

from .client import Client

log = logging.getLogger(__name__)


class Injected(RuntimeError):
    """An error raised on purpose by debug.fail_worker, to test how failures are reported."""


class Worker:
    def __init__(self, address: str, wid: int, debug: dict | None = None, server_timeout_s: float = 10.0):
        self.wid, self.debug = wid, debug or {}
        self.client = Client(address, timeout_s=server_timeout_s)
        self.block: DataBlock | None = None
        self._order_key: tuple | None = None
        self._order: np.ndarray | None = None
        self.steps_done = 0

    def _rows(self, shard: int, epoch: int, start: int, count: int, seed: int) -> np.ndarray:
        """Storage positions of a batch: the shard's epoch order, sliced, offset to where the shard starts."""
        offset, size = self.shards[shard]
        if self._order_key != (shard, epoch):
            self._order = epoch_order(seed, shard, epoch, size) + offset
            self._order_key = (shard, epoch)
        return self._order[start:start + count]

    def run(self) -> int:
        welcome = self.client.hello(self.wid)
        self.wid = welcome["wid"]
        layout, train, m = welcome["data"], welcome["train"], welcome["model"]
        self.block = DataBlock.attach(layout["block"])
        self.shards = [tuple(s) for s in layout["shards"]]
        d, dtype = self.block.spec.d, self.block.spec.dtype
        model = models.make(m["kind"], d, m["fit_intercept"], dtype, m.get("classes", 0))
        b = train["batch_size"]
        Xb = np.empty((b, d), dtype=dtype)
        yb = np.empty(b, dtype=dtype)
        grad = np.empty(welcome["theta_shape"], dtype=welcome["theta_dtype"])
        slow_s = self.debug.get("slow_ms", 0.0) / 1000.0 if self.debug.get("slow_worker") == self.wid else 0.0
        fail_at = self.debug.get("fail_at_step") if self.debug.get("fail_worker") == self.wid else None
        log.info("worker %d: attached %s, %d rows of shards", self.wid, self.block.name, self.block.spec.n_train)

        h, arrays = self.client.pull(0)
        while h["op"] == Op.THETA.value:
            clock = h["clock"]
            shard, epoch, start, count = h["batch"]
            rows = self._rows(shard, epoch, start, count, train["seed"])
            np.take(self.block.X, rows, axis=0, out=Xb[:count])
            np.take(self.block.y, rows, out=yb[:count])
            loss = model.loss_grad(arrays[0], Xb[:count], yb[:count], grad)
            if fail_at is not None and clock >= fail_at:
                raise Injected(f"injected failure at step {clock} (debug.fail_worker = {self.wid})")
            if slow_s:
                time.sleep(slow_s)
            h, arrays = self.client.push(clock, grad, loss, count, pull=True)
            self.steps_done += 1
        # the server has already counted us out when it says stop; no goodbye needed
        log.info("worker %d: stop (%s) after %d steps", self.wid, h.get("reason"), self.steps_done)
        return 0

    def close(self) -> None:
        self.client.close()
        if self.block is not None:
            self.block.close()


def main(address: str, wid: int, debug: dict, server_timeout_s: float, conn, parent_pid: int, core,
         log_level: int) -> None:
    """Entry point of a worker process started by the launcher (spawn)."""
    proc.child_setup(f"worker-{wid}", parent_pid, core, log_level)
    reporter = proc.Reporter(conn)
    worker = Worker(address, wid, debug, server_timeout_s)
    code = 0
    try:
        worker.run()
    except RunError as e:
        log.error("worker %d: %s", wid, e)
        reporter.send("error", process=f"worker {wid}", message=str(e))
        code = 1
    except Exception as e:
        log.error("worker %d failed:\n%s", wid, traceback.format_exc())
        reporter.send("error", process=f"worker {wid}", message=f"{type(e).__name__}: {e}")
        code = 1
    finally:
        worker.close()
    sys.exit(code)
