"""ZeroMQ sockets: the only module that imports zmq. Factories with safe options, send, and receive-with-timeout.

Every socket has LINGER 0 (closing never blocks on unsent messages), bounded queues, and reconnect backoff.
Nothing here blocks without a timeout.
"""
from __future__ import annotations

import zmq

from .errors import ProtocolError

ZERO_COPY_MIN_BYTES = 64 * 1024   # below this a copy is cheaper than zero-copy bookkeeping
HWM_MESSAGES = 1000

Again = zmq.Again
ZMQError = zmq.ZMQError


def context() -> zmq.Context:
    """A fresh context for this process. Never share one across fork (we only ever spawn)."""
    return zmq.Context()


def _common(sock: zmq.Socket) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM_MESSAGES)
    sock.setsockopt(zmq.RCVHWM, HWM_MESSAGES)
    sock.copy_threshold = ZERO_COPY_MIN_BYTES
    return sock


def router(ctx: zmq.Context, bind: str, max_frame_bytes: int = -1) -> tuple[zmq.Socket, str]:
    """A bound ROUTER; returns (socket, the address actually bound, with the real port when port 0 was asked)."""
    sock = _common(ctx.socket(zmq.ROUTER))
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # a send to a gone peer fails fast instead of vanishing
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)  # a larger frame disconnects the peer before buffering it
    sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
    try:
        sock.bind(bind)
    except zmq.ZMQError as e:
        sock.close()
        raise OSError(f"cannot bind {bind}: {e}") from None
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = _common(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
    sock.connect(address)
    return sock


def send(sock: zmq.Socket, frames: list, ident: bytes | None = None, block: bool = True) -> bool:
    """Send one message (arrays above ZERO_COPY_MIN_BYTES go zero-copy). With block=False a full queue or a gone
    peer returns False instead of waiting: the server never blocks on a client that does not read."""
    if ident is not None:
        frames = [ident, *frames]
    try:
        sock.send_multipart(frames, flags=0 if block else zmq.DONTWAIT, copy=False)
        return True
    except zmq.Again:
        return False
    except zmq.ZMQError as e:
        if e.errno == zmq.EHOSTUNREACH:
            return False
        raise


def recv(sock: zmq.Socket, timeout_ms: int) -> list | None:
    """The frames of one message, or None when nothing arrives within timeout_ms."""
    if sock.poll(timeout_ms, zmq.POLLIN):
        return sock.recv_multipart(copy=False)
    return None


def readable(sock: zmq.Socket) -> bool:
    """A whole message is waiting (checking is much cheaper than a non-blocking receive that raises Again)."""
    return bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)


def recv_now(sock: zmq.Socket) -> list:
    """The frames of a message known to be waiting (see readable())."""
    return sock.recv_multipart(copy=False)


def recv_nowait(sock: zmq.Socket) -> list | None:
    try:
        return sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None


def poller(*socks: zmq.Socket) -> zmq.Poller:
    p = zmq.Poller()
    for s in socks:
        p.register(s, zmq.POLLIN)
    return p


__all__ = ["context", "router", "dealer", "send", "recv", "recv_nowait", "readable", "recv_now", "poller", "Again",
           "ZMQError", "ProtocolError"]
