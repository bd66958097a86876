"""ZeroMQ sockets: the only module that imports zmq. Factories with safe options, send, and receive-with-timeout.

Every socket has LINGER 0 (closing never blocks on unsent messages), bounded queues, and reconnect backoff.
Nothing here blocks without a timeout.
"""
from __future__ import annotations

import glob
import os
import shutil

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .errors import ConfigError, ProtocolError

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


# ------------------------------------------------------------------ CURVE (a key directory made by keygen())
# DIR/server.key, DIR/server.key_secret: the server's key pair; DIR/authorized/*.key: the client public keys the
# server accepts; DIR/NAME.key, DIR/NAME.key_secret: a client's key pair. A client needs only server.key and its own
# NAME.key_secret (client.key_secret unless there is a single other one).

def keygen(directory: str, name: str = "client") -> list[str]:
    """Create the server key pair (once) and the client key pair `name`, and allow `name`. Secret files get mode
    0600. Returns the files written."""
    os.makedirs(os.path.join(directory, "authorized"), exist_ok=True)
    os.chmod(directory, 0o700)
    written = []
    for who in ("server", name) if not os.path.exists(os.path.join(directory, "server.key_secret")) else (name,):
        public, secret = zmq.auth.create_certificates(directory, who)
        os.chmod(secret, 0o600)
        written += [public, secret]
    allowed = os.path.join(directory, "authorized", f"{name}.key")
    shutil.copyfile(os.path.join(directory, f"{name}.key"), allowed)
    return written + [allowed]


def _load(path: str, want_secret: bool) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read CURVE key {path}: {e}") from None
    if want_secret and not secret:
        raise ConfigError(f"{path} holds no secret key")
    return public, secret


def use_curve_server(sock: zmq.Socket, keys: str) -> None:
    public, secret = _load(os.path.join(keys, "server.key_secret"), True)
    sock.curve_publickey, sock.curve_secretkey, sock.curve_server = public, secret, True


def authenticator(ctx: zmq.Context, keys: str) -> ThreadAuthenticator:
    """Accept CURVE clients whose public key is in keys/authorized; refuse everyone else before any of their
    messages reaches a socket."""
    allowed = os.path.join(keys, "authorized")
    if not glob.glob(os.path.join(allowed, "*.key")):
        raise ConfigError(f"server.keys: {allowed} holds no client key; python launch.py --keygen {keys} makes one")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=allowed)
    return auth


def use_curve_client(sock: zmq.Socket, keys: str) -> None:
    server_public, _ = _load(os.path.join(keys, "server.key"), False)
    secrets = sorted(p for p in glob.glob(os.path.join(keys, "*.key_secret")) if not p.endswith("server.key_secret"))
    mine = os.path.join(keys, "client.key_secret")
    if mine not in secrets:
        if len(secrets) != 1:
            raise ConfigError(f"{keys}: need client.key_secret (or exactly one NAME.key_secret) next to server.key")
        mine = secrets[0]
    public, secret = _load(mine, True)
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_public, public, secret


def router(ctx: zmq.Context, bind: str, max_frame_bytes: int = -1, keys: str = "") -> tuple[zmq.Socket, str]:
    """A bound ROUTER; returns (socket, the address actually bound, with the real port when port 0 was asked).
    With `keys`, it speaks CURVE as a server (start authenticator() on the same context first)."""
    sock = _common(ctx.socket(zmq.ROUTER))
    if keys:
        use_curve_server(sock, keys)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # a send to a gone peer fails fast instead of vanishing
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)  # a larger frame disconnects the peer before buffering it
    sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
    try:
        sock.bind(bind)
    except zmq.ZMQError as e:
        sock.close()
        raise OSError(f"cannot bind {bind}: {e}") from None
    return sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)


def dealer(ctx: zmq.Context, address: str, keys: str = "") -> zmq.Socket:
    """A DEALER connected to `address`; with `keys`, a CURVE client of that server. On any error the socket is
    closed before raising: one left open would make ctx.term() wait for ever."""
    sock = _common(ctx.socket(zmq.DEALER))
    try:
        if keys:
            use_curve_client(sock, keys)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)
        sock.connect(address)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise ConfigError(f"cannot connect to {address!r}: {e}") from None
    except BaseException:
        sock.close(linger=0)
        raise
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


def writable(sock: zmq.Socket, timeout_ms: int) -> bool:
    """A message can be queued within timeout_ms (a full queue empties as the peer reads)."""
    return bool(sock.poll(timeout_ms, zmq.POLLOUT))


def poller(*socks: zmq.Socket) -> zmq.Poller:
    p = zmq.Poller()
    for s in socks:
        p.register(s, zmq.POLLIN)
    return p


__all__ = ["keygen", "authenticator", "use_curve_server", "use_curve_client", "context", "router", "dealer", "send", "recv", "readable", "writable", "recv_now", "poller", "Again",
           "ZMQError", "ProtocolError"]
