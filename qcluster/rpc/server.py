"""The RPC daemon: Pyro5's thread-pool server, guarded so that no single peer can stop it.

Pyro5's own server accepts and (with TLS) handshakes on its one accept thread, so one
client that never speaks stops every other connection. Here the accept thread only
accepts: each connection goes to a pool thread at once, where the TLS handshake and
ours (:mod:`qcluster.rpc.handshake`) run under one short deadline
(:data:`HANDSHAKE_SECONDS`). Connections still in their handshake are capped per peer
address and in all, so that authenticated work always finds a thread; a connection over
a cap, or with no free thread, is closed at once. Refusals are logged one line each, with
the peer's address, at most once per :data:`LOG_EVERY` seconds per peer and
:data:`LOG_BURST` times in all (:class:`RefusalLog`).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections import Counter, OrderedDict
from typing import Any

import Pyro5.callcontext
import Pyro5.core
import Pyro5.errors
import Pyro5.server
import Pyro5.socketutil
import Pyro5.svr_threads

from qcluster.errors import ConfigError
from qcluster.rpc.handshake import HandshakeError, ServerHandshake, derive_key
from qcluster.rpc.tls import server_context

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 2.0  # TLS and our handshake together, per connection
PENDING_PER_PEER = 4  # connections from one address still in their handshake
LOG_EVERY = 10.0  # seconds between two refusal lines about one peer
LOG_BURST = 20  # refusal lines in all per LOG_EVERY seconds

_bound = threading.local()  # the object this thread's connection authenticated for


class _Objects(dict[str, Any]):
    """``Daemon.objectsById``: a connection reaches the object it authenticated for and
    the daemon's own object (metadata, ping), nothing else registered beside them."""

    def get(self, key: str, default: Any = None) -> Any:
        allowed = getattr(_bound, "object_id", None)
        if allowed is not None and key not in (allowed, Pyro5.core.DAEMON_NAME):
            return default
        return super().get(key, default)


class RefusalLog:
    """One warning line per refusal, at most one per peer address per :data:`LOG_EVERY`
    seconds, and at most :data:`LOG_BURST` lines in all per :data:`LOG_EVERY` seconds
    (a flood of bad connections, from one address or many, is not a flood of log lines);
    the next line says how many were left out."""

    def __init__(self, what: str = "connection") -> None:
        self._what = what
        self._last: dict[str, float] = {}
        self._quiet = 0
        self._window, self._in_window = -LOG_EVERY, 0
        self._lock = threading.Lock()

    def __call__(self, peer: str, why: str) -> None:
        host = peer.rsplit(":", 1)[0]
        now = time.monotonic()
        with self._lock:
            if now - self._window >= LOG_EVERY:
                self._window, self._in_window = now, 0
            if (now - self._last.get(host, -LOG_EVERY) < LOG_EVERY
                    or self._in_window >= LOG_BURST):
                self._quiet += 1
                return
            self._last[host] = now
            self._in_window += 1
            quiet, self._quiet = self._quiet, 0
            if len(self._last) > 10_000:  # a scan from many addresses: forget the oldest
                for old in sorted(self._last, key=self._last.__getitem__)[:5_000]:
                    del self._last[old]
        more = f" ({quiet} more refused and not logged since the last line)" if quiet else ""
        log.warning("refused RPC %s from %s: %s%s", self._what, peer, why, more)


_calls = RefusalLog("call")


def refuse_call(method: str, why: str) -> None:
    """Log a call that an object refuses (bad arguments, an epoch no leader holds): one
    line with the caller's address, rate-limited as refused connections are. Call it from
    the Pyro5 thread serving the call."""
    addr = getattr(Pyro5.callcontext.current_context, "client_sock_addr", None)
    peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) and len(addr) >= 2 else "?"
    _calls(peer, f"{method}: {why}")


class _GuardedServer(Pyro5.svr_threads.SocketServer_Threadpool):  # type: ignore[misc]
    """Accepts only; every handshake runs on a pool thread, under a deadline and caps.

    One address may have :data:`PENDING_PER_PEER` connections in their handshake; more
    from it are closed at once. In all, at most half the pool's threads wait on
    handshakes; past that, the oldest waiting connection is dropped to make room (a
    legitimate handshake takes milliseconds, a silent one waits for its deadline), so
    silent clients from many addresses cannot keep a new legitimate one out either."""

    def __init__(self, handshake: ServerHandshake, tls: ssl.SSLContext | None,
                 refused: RefusalLog) -> None:
        super().__init__()
        self.handshake, self.tls, self.refused = handshake, tls, refused
        self.pending: Counter[str] = Counter()
        self.waiting: OrderedDict[_Connection, None] = OrderedDict()
        self.pending_lock = threading.Lock()
        self.max_pending = max(2, Pyro5.config.THREADPOOL_SIZE // 2)

    def events(self, eventsockets: list[Any]) -> None:
        with contextlib.suppress(TimeoutError):
            if not self._selector.select(Pyro5.config.POLLTIMEOUT):
                return
            csock, caddr = self.sock.accept()
        if self.shutting_down:
            csock.close()
            return
        host = str(caddr[0]) if isinstance(caddr, tuple) else "?"
        peer = f"{host}:{caddr[1]}" if isinstance(caddr, tuple) else "?"
        job = _Connection(self, csock, host, peer)
        evict: _Connection | None = None
        with self.pending_lock:
            over = self.pending[host] >= PENDING_PER_PEER
            if not over:
                if len(self.waiting) >= self.max_pending:
                    evict = next(iter(self.waiting))
                    del self.waiting[evict]
                self.pending[host] += 1
                self.waiting[job] = None
        if over:
            _close(csock)
            self.refused(peer, "too many connections still in their handshake")
            return
        if evict is not None:
            _shutdown(evict.sock)
            self.refused(evict.peer, "dropped while in its handshake, to make room")
        try:
            self.pool.process(job)
        except Pyro5.svr_threads.NoFreeWorkersError:
            self.done_pending(job)
            _close(csock)
            self.refused(peer, "no free RPC thread")

    def done_pending(self, job: _Connection) -> None:
        """Forget ``job`` as a connection in its handshake (once, whatever called)."""
        with self.pending_lock:
            if job.settled:
                return
            job.settled = True
            self.waiting.pop(job, None)
            self.pending[job.host] -= 1
            if self.pending[job.host] <= 0:
                del self.pending[job.host]


class _Connection:
    """One client connection, on a pool thread: handshakes, then serves Pyro5 requests."""

    def __init__(self, server: _GuardedServer, sock: socket.socket, host: str,
                 peer: str) -> None:
        self.server, self.sock, self.host, self.peer = server, sock, host, peer
        self.settled = False  # no longer counted as in its handshake

    def __call__(self) -> None:
        try:
            object_id = self._authenticate()
        finally:
            self.server.done_pending(self)
        if object_id is None:
            _close(self.sock)
            return
        daemon = self.server.daemon
        conn = Pyro5.socketutil.SocketConnection(self.sock, object_id)
        _bound.object_id = object_id
        try:
            while True:
                try:
                    daemon.handleRequest(conn)
                except (OSError, Pyro5.errors.ConnectionClosedError):
                    break
                except Pyro5.errors.TimeoutError:
                    # idle past the socket timeout (a leader's proxy between batches), or
                    # stalled mid-message: closed either way, and not worth a warning
                    log.debug("closed the idle connection of %s", self.peer)
                    break
                except Exception as e:  # a protocol error: one line, then close
                    text = str(e).splitlines()[0] if str(e) else ""
                    self.server.refused(self.peer, f"closed after the handshake: "
                                        f"{type(e).__name__}: {text[:200]}".rstrip(": "))
                    break
        finally:
            _bound.object_id = None
            with contextlib.suppress(Exception):
                daemon._clientDisconnect(conn)
            conn.close()

    def _authenticate(self) -> str | None:
        deadline = time.monotonic() + HANDSHAKE_SECONDS
        # The backstop for a TLS handshake that trickles: shut the socket under it.
        timer = threading.Timer(HANDSHAKE_SECONDS, _shutdown, (self.sock,))
        timer.daemon = True
        timer.start()
        try:
            if self.server.tls is not None:
                self.sock.settimeout(HANDSHAKE_SECONDS)
                self.sock = self.server.tls.wrap_socket(self.sock, server_side=True)
            object_id = self.server.handshake.run(self.sock, deadline,
                                                  self.server.daemon.objectsById.__contains__)
        except HandshakeError as e:
            self.server.refused(self.peer, str(e))
            return None
        except (OSError, ssl.SSLError, ValueError) as e:
            self.server.refused(self.peer, f"TLS handshake failed ({_reason(e)})")
            return None
        finally:
            timer.cancel()
        self.sock.settimeout(Pyro5.config.COMMTIMEOUT or None)
        return object_id


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, TimeoutError):
        return "not finished in time"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


class AuthDaemon(Pyro5.server.Daemon):  # type: ignore[misc]
    """A Pyro5 daemon that serves only clients that pass the handshake.

    ``tls`` is the server context of ``[rpc.tls]`` (see :func:`qcluster.rpc.pyro.configure_pyro`,
    which the process calls first). Without TLS the daemon listens on loopback only: off
    loopback an observer of the network could take over an authenticated connection, so
    a non-loopback address without ``[rpc.tls]`` is a :class:`ConfigError`."""

    def __init__(self, secret: str, *, host: str, port: int = 0,
                 tls: ssl.SSLContext | None = None) -> None:
        tls = tls if tls is not None else server_context()
        try:
            super().__init__(host=host, port=port)  # binds and listens, in plain TCP
        except OSError as e:  # socket.gaierror included
            raise ConfigError(_listen_error(host, port, e)) from None
        bound = self.sock.getsockname()[0]
        if tls is None and not loopback(bound):
            self.close()
            raise ConfigError(off_loopback_error(host, bound))
        state: dict[str, Any] = self.__dict__
        plain = state["transportServer"]
        guarded = _GuardedServer(ServerHandshake(derive_key(secret), self.locationStr), tls,
                                 RefusalLog())
        # Keep Pyro5's listening socket, selector, pool and housekeeper; only accepting
        # changes. The plain server lets go of them, or its __del__ would close them.
        for name in ("daemon", "sock", "_socketaddr", "locationStr", "pool", "housekeeper",
                     "_selector"):
            setattr(guarded, name, getattr(plain, name))
            setattr(plain, name, None)
        state["transportServer"] = guarded
        state["objectsById"] = _Objects(state["objectsById"])


def off_loopback_error(host: str, address: str) -> str:
    """The one line for a daemon asked to listen off loopback without ``[rpc.tls]``."""
    return (f"[worker] host {host} ({address}) is not a loopback address: RPC off loopback "
            "needs [rpc.tls], or an observer of the network could take over a connection")


def loopback(address: str) -> bool:
    """Whether ``address`` (an IP, maybe with an IPv6 zone) is a loopback address."""
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _listen_error(host: str, port: int, e: OSError) -> str:
    """One line for a daemon that cannot listen: the address, the keys, the reason."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = e.strerror or str(e) or type(e).__name__
    if isinstance(e, socket.gaierror):
        return f"cannot listen on {where}: cannot resolve [worker] host {host!r} ({reason})"
    if e.errno == errno.EADDRINUSE:
        return f"cannot listen on {where} ([worker] host/port): {reason}"
    return f"cannot listen on {where} ([worker] host/port): {reason}"
