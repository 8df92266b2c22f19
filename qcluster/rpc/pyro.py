"""Pyro5 plumbing: process-wide settings, the authenticated daemon, proxies.

Pyro5 has no authentication of its own (and its TLS trusts the system CA store and
handshakes on the accept thread), so qcluster opens every connection itself: TCP, then
TLS with the cluster's contexts when ``[rpc.tls]`` is set (:mod:`qcluster.rpc.tls`), then
the mutual challenge-response of :mod:`qcluster.rpc.handshake`, and only then hands the
socket to Pyro5. The daemon side is :class:`qcluster.rpc.server.AuthDaemon`; the protocol
and its threat model are in ``docs/SECURITY.md``.

Settings: msgpack serializer by default (about 4x faster than serpent), a communication
timeout, ``MAX_RETRIES = 0`` (a retried dispatch could run twice; we retry ourselves,
idempotently), and a bounded message size.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from typing import Any

import Pyro5.api
import Pyro5.client
import Pyro5.core
import Pyro5.errors
import Pyro5.protocol

from qcluster.rpc import tls as tls_contexts
from qcluster.rpc.handshake import HandshakeError, client_handshake, derive_key
from qcluster.rpc.server import HANDSHAKE_SECONDS, AuthDaemon
from qcluster.rpc.tls import TlsFiles

__all__ = ["AuthDaemon", "DaemonThread", "TlsFiles", "configure_pyro", "proxy"]

log = logging.getLogger(__name__)


def configure_pyro(
    *, serializer: str, timeout: float, max_message_bytes: int, threads: int = 64,
    tls: TlsFiles | None = None,
) -> None:
    """Set Pyro5's process-wide settings. Call once, before any daemon or proxy exists.

    With ``tls``, every daemon and proxy of the process speaks TLS with the node's
    certificate, verified against the cluster CA only; with ``require_client_cert`` a
    daemon refuses any client that does not present a certificate of that CA (mutual TLS).
    """
    tls_contexts.load(tls)
    cfg = Pyro5.config
    cfg.SSL = False  # qcluster wraps sockets itself, with its own contexts
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
    before anything else looks at it, so ``max_message_bytes`` would bound only the
    compressed size: 130 KB of zlib is 128 MiB of memory. qcluster never compresses
    (``COMPRESSION`` stays off), so a compressed message is refused from its header,
    before its payload is read."""

    def __init__(self, header: bytes, payload: bytes | None = None) -> None:
        super().__init__(header, None)
        if self.flags & Pyro5.protocol.FLAGS_COMPRESSED:
            raise Pyro5.errors.ProtocolError("compressed messages are refused")
        if payload is not None:
            self.add_payload(payload)


class _DumpOnly:
    """A serializer that may answer but never reads: even a peer with the secret cannot
    make a daemon parse serpent or marshal, whose parsers can be pushed into deep
    recursion or large allocations."""

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


class _Credentials:
    """What a proxy needs to open its connection (kept in ``_pyroHandshake``, the one
    per-proxy slot Pyro5 lets us set; Pyro5 never sends it, our connect replaces its own)."""

    def __init__(self, secret: str) -> None:
        self.key = derive_key(secret)

    def __repr__(self) -> str:
        return "<credentials>"


class _AuthProxy(Pyro5.api.Proxy):  # type: ignore[misc]
    """A proxy whose every connection is opened by :func:`_open`. Pyro5 calls its private
    ``__pyroCreateConnection`` to (re)connect; this override gives it an authenticated
    socket, and Pyro5 then speaks over it exactly as over its own."""

    def _Proxy__pyroCreateConnection(self, replaceUri: bool = False,
                                     connected_socket: socket.socket | None = None) -> bool:
        if self._pyroConnection is not None:
            return False
        if connected_socket is None:
            connected_socket = _open(self._pyroUri, self._pyroHandshake, self._pyroTimeout)
        made = bool(Pyro5.client.Proxy._Proxy__pyroCreateConnection(
            self, replaceUri, connected_socket))
        conn: Any = self._pyroConnection
        conn.keep_open = False  # ours: closed with the proxy
        return made


def _open(uri: Any, credentials: Any, timeout: float | None) -> socket.socket:
    """A connected, authenticated socket to ``uri``'s daemon, or CommunicationError."""
    if not isinstance(credentials, _Credentials):
        raise Pyro5.errors.CommunicationError("proxy made without qcluster credentials")
    uri = Pyro5.core.resolve(uri)
    host, port = uri.host, uri.port
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    deadline = time.monotonic() + max(HANDSHAKE_SECONDS, timeout or HANDSHAKE_SECONDS)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise Pyro5.errors.CommunicationError(f"cannot connect to {where}: {e}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = tls_contexts.client_context()
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=host)
        client_handshake(sock, credentials.key, where, uri.object, deadline)
        sock.settimeout(timeout)
    except (HandshakeError, OSError, ssl.SSLError, ValueError) as e:
        with contextlib.suppress(OSError):
            sock.close()
        reason = getattr(e, "reason", None) or str(e) or type(e).__name__
        raise Pyro5.errors.CommunicationError(f"connection to {where} rejected: {reason}"
                                              ) from None
    return sock


def proxy(uri: str, secret: str, timeout: float) -> Pyro5.api.Proxy:
    """A proxy that authenticates with ``secret``. One proxy per thread (Pyro5's rule)."""
    p = _AuthProxy(uri)
    p._pyroHandshake = _Credentials(secret)
    p._pyroTimeout = timeout
    p._pyroMaxRetries = 0
    return p


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
