"""Serving the dashboard: uvicorn (h11) on a socket bound before it starts, so that a port
in use or an address this machine does not have is a one-line error at start.

``qcluster web`` runs :meth:`WebServer.serve` in its main thread; ``qcluster start`` with
``[web] port`` set runs it in a thread beside the node (:meth:`WebServer.start`).

Peers are bounded: a connection that has not sent a whole request head within
:data:`HEAD_SECONDS` of its start or of its last answer is closed, a head is at most
``web/app.MAX_HEAD`` bytes, a body at most ``web/app.MAX_BODY`` bytes and read within
``web/app.BODY_SECONDS``, an idle keep-alive connection is closed after 5 s, one address
may hold at most :data:`MAX_PER_ADDRESS` connections (more are closed at once; a trusted
proxy's are not counted), and beyond :data:`MAX_CONNECTIONS` at once the server answers
503 at once rather than queue. An asyncio server: a slow peer holds a socket, not a
thread.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import socket
import ssl
import threading
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from qcluster.errors import ConfigError
from qcluster.peers import Networks, client_key, trusted_networks, within
from qcluster.settings import Settings
from qcluster.web.app import MAX_HEAD, build_app

log = logging.getLogger(__name__)

HEAD_SECONDS = 5.0
MAX_CONNECTIONS = 512
MAX_PER_ADDRESS = 16
DEFAULT_PORT = 8321


class _BoundedH11(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose next request head has not
    arrived within :data:`HEAD_SECONDS` (uvicorn waits for ever while bytes trickle
    in), and one from an address that already holds :data:`MAX_PER_ADDRESS`. A subclass
    per server (:func:`_protocol`) holds that server's counts."""

    open_by_address: ClassVar[collections.Counter[str]]
    trusted: ClassVar[Networks]
    _head_timer: asyncio.TimerHandle | None = None
    _counted: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        raw = self.client[0] if self.client else ""
        peer = client_key(raw)
        if not within(raw, self.trusted):
            if self.open_by_address[peer] >= MAX_PER_ADDRESS:
                self.transport.close()
                return
            self.open_by_address[peer] += 1
            self._counted = peer
        self._arm()

    def _arm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self._head_timer = self.loop.call_later(HEAD_SECONDS, self._head_too_slow)

    def _head_too_slow(self) -> None:
        if self.cycle is None or self.cycle.response_complete:  # no request being served
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next head, too, within HEAD_SECONDS

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        if self._counted is not None:
            self.open_by_address[self._counted] -= 1
            if self.open_by_address[self._counted] <= 0:
                del self.open_by_address[self._counted]
            self._counted = None
        super().connection_lost(exc)


def _protocol(settings: Settings) -> type[_BoundedH11]:
    return type("BoundedH11", (_BoundedH11,), {
        "open_by_address": collections.Counter(),
        "trusted": trusted_networks(settings.web.trusted_proxies)})


def check_web(settings: Settings, host: str | None = None) -> None:
    """ConfigError unless ``[web]`` can be served safely on ``host`` (else ``[web]
    host``): a login configured, TLS files that load and match (or a TLS proxy said to
    be in front) beyond loopback."""
    web = settings.web
    host = web.host if host is None else host
    if not web.users and not web.tokens:
        raise ConfigError(
            "[web] has no users or tokens: the dashboard can run jobs, so it needs a login "
            "(add [[web.users]] with a password_hash from `qcluster config hash-password`)")
    if not _loopback(host) and not web.tls and not web.behind_tls_proxy:
        raise ConfigError(
            f"the dashboard's host {host} is beyond loopback without TLS: set tls_cert and "
            "tls_key, or behind_tls_proxy = true if a TLS proxy serves it")
    if web.tls:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                str(web.tls_cert), str(web.tls_key))
        except ssl.SSLError as e:  # reason None: "PEM lib", the files are no PEM
            raise ConfigError(f"[web] tls_cert {web.tls_cert} and tls_key {web.tls_key} do "
                              "not load as a PEM certificate and its key: "
                              f"{e.reason or 'not PEM'}") from None
        except OSError as e:
            raise ConfigError(f"[web] tls_cert {web.tls_cert} or tls_key {web.tls_key} "
                              f"cannot be read: {e.strerror or e}") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket; ConfigError naming the address when it cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as e:
        raise ConfigError(f"cannot serve the dashboard on {host}:{port} ([web]): "
                          f"{e.strerror or e}") from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot serve the dashboard on {host}:{port} ([web]): "
                          f"{e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


class WebServer:
    """The dashboard on ``host:port`` (``[web]``'s when not given)."""

    def __init__(self, settings: Settings, *, host: str | None = None,
                 port: int | None = None) -> None:
        web = settings.web
        self.host = web.host if host is None else host
        check_web(settings, self.host)
        chosen = web.port if port is None else port
        self.socket = bind(self.host, chosen)
        self.port = int(self.socket.getsockname()[1])
        self.app, self.dashboard = build_app(settings)
        options: dict[str, Any] = {}
        if web.tls:
            options.update(ssl_certfile=str(web.tls_cert), ssl_keyfile=str(web.tls_key))
        config = uvicorn.Config(
            self.app, http=_protocol(settings), log_level="warning", access_log=False,
            lifespan="on", timeout_keep_alive=5, limit_concurrency=MAX_CONNECTIONS,
            h11_max_incomplete_event_size=MAX_HEAD, server_header=False,
            proxy_headers=False, forwarded_allow_ips="", **options)  # app.Guard reads them
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.scheme = "https" if web.tls else "http"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    def serve(self) -> None:
        """Serve until :meth:`close` (or SIGINT/SIGTERM in the main thread)."""
        try:
            self.server.run(sockets=[self.socket])
        except OSError as e:
            raise ConfigError(f"cannot serve the dashboard: {e}") from None
        finally:
            self.socket.close()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve, name="qcluster-web", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.dashboard.close()
