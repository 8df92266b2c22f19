"""``[rpc.tls]``: the process's two TLS contexts, made from the cluster's files only.

Pyro5's own TLS support trusts the system's certificate store beside the given CA, and
handshakes on the daemon's accept thread; qcluster makes its contexts here and wraps
sockets itself (:mod:`qcluster.rpc.server`, :mod:`qcluster.rpc.pyro`). The client context
trusts the cluster CA and nothing else, and checks the daemon's name against the host of
the URI it dials. One process has one identity: the same certificate serves both sides.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Protocol

from qcluster.errors import ConfigError


class TlsFiles(Protocol):
    """What :func:`load` needs of ``[rpc.tls]``."""

    @property
    def cert(self) -> Path: ...
    @property
    def key(self) -> Path: ...
    @property
    def ca(self) -> Path: ...
    @property
    def require_client_cert(self) -> bool: ...


_contexts: tuple[ssl.SSLContext, ssl.SSLContext] | None = None


def load(files: TlsFiles | None) -> None:
    """Make (or, with None, forget) the server and client contexts of this process.
    A file that cannot be read or does not match is one :class:`ConfigError` line."""
    global _contexts
    if files is None:
        _contexts = None
        return
    try:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
        for ctx in (server, client):
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(str(files.cert), str(files.key))
            ctx.load_verify_locations(cafile=str(files.ca))
    except (OSError, ssl.SSLError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        raise ConfigError(
            f"cannot load the [rpc.tls] cert, key or ca ({files.cert}, {files.key}, "
            f"{files.ca}): {reason}"
        ) from None
    server.verify_mode = ssl.CERT_REQUIRED if files.require_client_cert else ssl.CERT_NONE
    _contexts = (server, client)


def server_context() -> ssl.SSLContext | None:
    return None if _contexts is None else _contexts[0]


def client_context() -> ssl.SSLContext | None:
    return None if _contexts is None else _contexts[1]
