"""Pyro5 plumbing: process-wide settings, an authenticated daemon, proxies.

Pyro5 has no authentication of its own, so every daemon here is an
:class:`AuthDaemon`: a connection is accepted only if its handshake carries a proof that
the client knows the cluster secret. The proof is an HMAC-SHA256 of a fresh timestamp and
nonce under the secret; the secret itself never crosses the wire, the proof is compared
in constant time, and a proof is accepted once only, within a short window.

Settings (``qcluster.settings``): msgpack serializer by default (about 4x faster than serpent),
a communication timeout, ``MAX_RETRIES = 0`` (a retried dispatch could run twice; we
retry ourselves, idempotently), and a bounded message size.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import secrets
import socket
import ssl
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol

import Pyro5.api
import Pyro5.errors
import Pyro5.protocol
import Pyro5.server

from qcluster.errors import ConfigError

log = logging.getLogger(__name__)


class TlsFiles(Protocol):
    """What :func:`configure_pyro` needs of ``[rpc.tls]``."""

    @property
    def cert(self) -> Path: ...
    @property
    def key(self) -> Path: ...
    @property
    def ca(self) -> Path: ...
    @property
    def require_client_cert(self) -> bool: ...


PROOF_WINDOW = 300.0  # seconds a handshake proof stays valid
_REPLAY_CACHE = 100_000


def configure_pyro(
    *, serializer: str, timeout: float, max_message_bytes: int, threads: int = 64,
    tls: TlsFiles | None = None,
) -> None:
    """Set Pyro5's process-wide settings. Call once, before any daemon or proxy exists.

    With ``tls``, every daemon and proxy of the process speaks TLS with the node's
    certificate, verified against the cluster CA; with ``require_client_cert`` a daemon
    refuses any client that does not present a certificate of that CA (mutual TLS).
    Pyro5 caches its SSL contexts per process, so one process has one identity.
    """
    cfg = Pyro5.config
    cfg.SSL = tls is not None
    if tls is not None:
        cfg.SSL_SERVERCERT = cfg.SSL_CLIENTCERT = str(tls.cert)
        cfg.SSL_SERVERKEY = cfg.SSL_CLIENTKEY = str(tls.key)
        cfg.SSL_CACERTS = str(tls.ca)
        cfg.SSL_REQUIRECLIENTCERT = tls.require_client_cert
    cfg.SERIALIZER = serializer
    cfg.COMMTIMEOUT = timeout
    cfg.MAX_MESSAGE_SIZE = max_message_bytes
    cfg.MAX_RETRIES = 0
    cfg.SERVERTYPE = "thread"
    cfg.THREADPOOL_SIZE = threads
    cfg.THREADPOOL_SIZE_MIN = 4
    cfg.DETAILED_TRACEBACK = False
    _accept_only({"json", "msgpack"})
    Pyro5.protocol.ReceivingMessage = _UncompressedMessage
    cfg.SOCK_NODELAY = True
    cfg.POLLTIMEOUT = 0.5


class _UncompressedMessage(Pyro5.protocol.ReceivingMessage):  # type: ignore[misc]
    """A received message that may not be compressed. Pyro5 inflates a compressed payload
    before anything else looks at it (the handshake included), so ``max_message_bytes``
    would bound only the compressed size: 130 KB of zlib is 128 MiB of memory. qcluster
    never compresses (``COMPRESSION`` stays off), so a compressed message is refused from
    its header, before its payload is read."""

    def __init__(self, header: bytes, payload: bytes | None = None) -> None:
        super().__init__(header, None)
        if self.flags & Pyro5.protocol.FLAGS_COMPRESSED:
            raise Pyro5.errors.ProtocolError("compressed messages are refused")
        if payload is not None:
            self.add_payload(payload)


class _DumpOnly:
    """A serializer that may answer (Pyro5 replies to a refused handshake with marshal) but
    never reads: a peer cannot make a daemon parse serpent or marshal, whose parsers can be
    pushed into deep recursion or large allocations before any authentication."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.serializer_id = inner.serializer_id

    def loads(self, data: bytes) -> Any:
        raise Pyro5.errors.SecurityError("serializer not accepted")

    loadsCall = loads  # Pyro5 reads calls with this one

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _accept_only(names: set[str]) -> None:
    """Let daemons of this process read only the ``names`` serializers."""
    import Pyro5.serializers as ser

    for name, inner in ser.serializers.items():
        if name not in names and not isinstance(inner, _DumpOnly):
            ser.serializers_by_id[inner.serializer_id] = _DumpOnly(inner)


def make_proof(secret: str) -> dict[str, Any]:
    """The handshake payload a client sends: proves it knows ``secret``."""
    stamp = f"{time.time():.6f}"
    nonce = secrets.token_hex(16)
    mac = hmac.new(secret.encode(), f"{stamp}:{nonce}".encode(), hashlib.sha256).hexdigest()
    return {"v": 1, "ts": stamp, "nonce": nonce, "mac": mac}


class ProofChecker:
    """Checks handshake proofs: right MAC, fresh, never seen before."""

    def __init__(self, secret: str) -> None:
        self._key = secret.encode()
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, data: object) -> None:
        if not isinstance(data, dict):
            raise Pyro5.errors.SecurityError("authentication required")
        stamp, nonce, mac = data.get("ts"), data.get("nonce"), data.get("mac")
        if not (isinstance(stamp, str) and isinstance(nonce, str) and isinstance(mac, str)):
            raise Pyro5.errors.SecurityError("authentication required")
        if len(stamp) > 32 or len(nonce) > 64 or len(mac) > 128:
            raise Pyro5.errors.SecurityError("authentication failed")
        expected = hmac.new(self._key, f"{stamp}:{nonce}".encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, mac):
            raise Pyro5.errors.SecurityError("authentication failed")
        try:
            age = abs(time.time() - float(stamp))
        except ValueError:
            raise Pyro5.errors.SecurityError("authentication failed") from None
        if age > PROOF_WINDOW:
            raise Pyro5.errors.SecurityError("authentication failed: stale proof (clock skew?)")
        with self._lock:
            if nonce in self._seen:
                raise Pyro5.errors.SecurityError("authentication failed: replayed proof")
            self._seen[nonce] = time.time()
            while len(self._seen) > _REPLAY_CACHE:
                self._seen.popitem(last=False)


class AuthDaemon(Pyro5.server.Daemon):  # type: ignore[misc]
    """A Pyro5 daemon that refuses connections without a valid secret proof."""

    def __init__(self, secret: str, *, host: str, port: int = 0) -> None:
        try:
            super().__init__(host=host, port=port)  # binds and listens
        except OSError as e:  # socket.gaierror and ssl.SSLError included
            raise ConfigError(_listen_error(host, port, e)) from None
        self._checker = ProofChecker(secret)

    def _handshake(self, conn: Any, denied_reason: str | None = None) -> bool:
        # Pyro5's timeout applies to each read: a client sending a byte now and then would
        # hold a daemon thread for ever, unauthenticated. The whole handshake gets one
        # deadline instead; past it the socket is shut down under the reading thread.
        timer = threading.Timer(max(0.1, Pyro5.config.COMMTIMEOUT or 10.0), _drop, (conn,))
        timer.daemon = True
        timer.start()
        try:
            return bool(super()._handshake(conn, denied_reason))
        finally:
            timer.cancel()

    def validateHandshake(self, conn: Any, data: Any) -> str:
        try:
            self._checker.check(data)
        except Pyro5.errors.SecurityError as e:
            log.warning("refused RPC connection from %s: %s", _peer(conn), e)
            raise
        return "ok"


def _listen_error(host: str, port: int, e: OSError) -> str:
    """One line for a daemon that cannot listen: the address, the keys, the reason."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = e.strerror or str(e) or type(e).__name__
    if isinstance(e, socket.gaierror):
        return f"cannot listen on {where}: cannot resolve [worker] host {host!r} ({reason})"
    tls_files = isinstance(e, ssl.SSLError) or e.errno in (errno.ENOENT, errno.EISDIR)
    if Pyro5.config.SSL and tls_files:
        # Pyro5 loads the certificates as it sets up the listening socket.
        return f"cannot load the [rpc.tls] cert, key or ca for the RPC daemon: {reason}"
    return f"cannot listen on {where} ([worker] host/port): {reason}"


def _drop(conn: Any) -> None:
    log.warning("dropped RPC connection from %s: no handshake within the timeout", _peer(conn))
    with contextlib.suppress(OSError, AttributeError):
        conn.sock.shutdown(socket.SHUT_RDWR)


def _peer(conn: Any) -> str:
    try:
        host, port = conn.sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError):
        return "?"


class DaemonThread:
    """Runs a daemon's request loop in a thread; ``stop()`` is idempotent."""

    def __init__(self, daemon: AuthDaemon, name: str) -> None:
        self.daemon = daemon
        self._thread = threading.Thread(target=daemon.requestLoop, name=name, daemon=True)
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.daemon.shutdown()
        except Exception:  # shutting down: nothing useful to do with the error
            log.debug("daemon shutdown raised", exc_info=True)


def proxy(uri: str, secret: str, timeout: float) -> Pyro5.api.Proxy:
    """A proxy that authenticates with ``secret``. One proxy per thread (Pyro5's rule)."""
    p = Pyro5.api.Proxy(uri)
    p._pyroHandshake = make_proof(secret)
    p._pyroTimeout = timeout
    p._pyroMaxRetries = 0
    return p
