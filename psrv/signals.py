"""SIGINT and SIGTERM in a launcher: turned into exceptions in the main thread, and remembered.

Python drops an exception raised inside a __del__ or a callback; remembering the signal lets the wait loops notice
it anyway (check()), so a Ctrl-C is never lost.
"""
from __future__ import annotations

import contextlib
import signal
import threading

_pending: list[int] = []


class Interrupted(BaseException):
    """SIGTERM (or another signal) arrived; unwinds like KeyboardInterrupt so every cleanup runs."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signal.Signals(signum).name}")
        self.signum = signum


def _raise(signum: int):
    raise KeyboardInterrupt if signum == signal.SIGINT else Interrupted(signum)


def _on_signal(signum, frame):
    _pending.append(signum)
    _raise(signum)


def check() -> None:
    """Raise for a signal whose exception was lost on the way."""
    if _pending:
        _raise(_pending[0])


@contextlib.contextmanager
def handled():
    """Within the block, SIGINT raises KeyboardInterrupt and SIGTERM raises Interrupted (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _pending.clear()
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
