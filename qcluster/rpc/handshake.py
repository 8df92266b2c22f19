"""The RPC handshake: a mutual challenge-response on the raw socket, before Pyro5 speaks.

The protocol, its threat model and what it does not cover are in ``docs/SECURITY.md``
("The RPC handshake"). In short, with ``K = HMAC-SHA256(secret, "qcluster rpc v2 key")``::

    daemon -> client   "QCR2" | server_nonce[32] | len[1] | server_id
    client -> daemon   client_nonce[32] | len[1] | object_id | HMAC(K, "client" | T)[32]
    daemon -> client   HMAC(K, "server" | T)[32]

where ``T = "qcluster-rpc-v2" | server_nonce | len | server_id | client_nonce | len |
object_id``. The daemon's nonce is fresh for every connection, so a recorded exchange is
worth nothing on any later connection, to this daemon or another, before or after a
restart. ``server_id`` is the ``host:port`` the daemon publishes in its URIs; the client
refuses a daemon whose id is not the address it dialled, and the daemon refuses a MAC
made for another id, so a peer that relays a handshake between a client and a real daemon
gets nothing. The daemon's MAC proves to the client that the daemon knows the secret too.

Every frame has a fixed layout of at most a few hundred bytes; nothing is deserialized
before the client's MAC has been checked.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import time
from collections.abc import Callable

MAGIC = b"QCR2"
NONCE_BYTES = 32
MAC_BYTES = 32
MAX_FIELD = 255  # server id and object id: one length byte
HELLO_MAX = len(MAGIC) + NONCE_BYTES + 1 + MAX_FIELD

_KEY_LABEL = b"qcluster rpc v2 key"
_TRANSCRIPT = b"qcluster-rpc-v2"


class HandshakeError(Exception):
    """The peer failed the handshake: wrong secret, wrong identity, a malformed or late
    frame, or a closed connection. The message is one line, safe to log."""


def derive_key(secret: str) -> bytes:
    """The handshake key: the secret itself is never used as a MAC key directly."""
    return hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _field(value: str, what: str) -> bytes:
    raw = value.encode()
    if not raw or len(raw) > MAX_FIELD:
        raise HandshakeError(f"{what} must be 1-{MAX_FIELD} bytes")
    return bytes([len(raw)]) + raw


def _transcript(server_nonce: bytes, server_id: bytes, client_nonce: bytes,
                object_id: bytes) -> bytes:
    return _TRANSCRIPT + server_nonce + server_id + client_nonce + object_id


def _mac(key: bytes, role: bytes, transcript: bytes) -> bytes:
    return hmac.new(key, role + b"\0" + transcript, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    """``n`` bytes, read before ``deadline`` (``time.monotonic``), however they trickle in."""
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HandshakeError("handshake not finished in time")
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(data))
        except TimeoutError:
            raise HandshakeError("handshake not finished in time") from None
        except OSError as e:
            raise HandshakeError(f"connection lost during the handshake ({e})") from None
        if not chunk:
            raise HandshakeError("connection closed during the handshake")
        data.extend(chunk)
    return bytes(data)


def _send(sock: socket.socket, data: bytes, deadline: float) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise HandshakeError("handshake not finished in time")
    sock.settimeout(left)
    try:
        sock.sendall(data)
    except OSError as e:
        raise HandshakeError(f"connection lost during the handshake ({e})") from None


def _recv_field(sock: socket.socket, deadline: float) -> bytes:
    size = recv_exact(sock, 1, deadline)
    if size == b"\0":
        raise HandshakeError("malformed handshake")
    return size + recv_exact(sock, size[0], deadline)


class ServerHandshake:
    """The daemon's side, one per connection: ``run`` returns the object id the client
    authenticated for (one that ``known`` admits), or raises :class:`HandshakeError` (the
    caller closes at once, and the client sees a refused handshake)."""

    def __init__(self, key: bytes, server_id: str) -> None:
        self._key = key
        self._id = _field(server_id, "server id")

    def run(self, sock: socket.socket, deadline: float, known: Callable[[str], bool]) -> str:
        server_nonce = secrets.token_bytes(NONCE_BYTES)
        _send(sock, MAGIC + server_nonce + self._id, deadline)
        client_nonce = recv_exact(sock, NONCE_BYTES, deadline)
        object_id = _recv_field(sock, deadline)
        given = recv_exact(sock, MAC_BYTES, deadline)
        transcript = _transcript(server_nonce, self._id, client_nonce, object_id)
        if not hmac.compare_digest(_mac(self._key, b"client", transcript), given):
            raise HandshakeError("authentication failed (wrong secret, or a replayed or "
                                 "relayed handshake)")
        try:
            name = object_id[1:].decode()
        except UnicodeDecodeError:
            raise HandshakeError("malformed object id") from None
        if not known(name):
            raise HandshakeError(f"no object {name[:80]!r} here")
        _send(sock, _mac(self._key, b"server", transcript), deadline)
        return name


def client_handshake(sock: socket.socket, key: bytes, server_id: str, object_id: str,
                     deadline: float) -> None:
    """The client's side: proves the secret for ``object_id`` to the daemon that answers at
    ``server_id``, and checks that the daemon proves it back. Raises :class:`HandshakeError`."""
    expected = _field(server_id, "server address")
    obj = _field(object_id, "object id")
    magic = recv_exact(sock, len(MAGIC), deadline)
    if magic != MAGIC:
        raise HandshakeError("the peer does not speak the qcluster RPC protocol v2")
    server_nonce = recv_exact(sock, NONCE_BYTES, deadline)
    announced = _recv_field(sock, deadline)
    if not hmac.compare_digest(announced, expected):
        shown = announced[1:].decode(errors="replace")
        raise HandshakeError(f"the daemon at {server_id} calls itself {shown!r}")
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    transcript = _transcript(server_nonce, expected, client_nonce, obj)
    _send(sock, client_nonce + obj + _mac(key, b"client", transcript), deadline)
    try:
        proof = recv_exact(sock, MAC_BYTES, deadline)
    except HandshakeError:
        raise HandshakeError("the daemon refused the handshake (is the secret the "
                             "cluster's?)") from None
    if not hmac.compare_digest(proof, _mac(key, b"server", transcript)):
        raise HandshakeError("the daemon could not prove it knows the secret")
