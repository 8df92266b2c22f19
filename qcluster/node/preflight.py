"""What ``qcluster start`` would refuse, checked without starting: ``config check``.

A node refuses to start on a weak, example or badly kept secret, on ``[rpc.tls]`` files
that do not load, and on an address off loopback without TLS. ``config check`` runs the
same checks (the same functions, not copies), so that an operator learns of them before a
deploy, not from a node that exits.
"""

from __future__ import annotations

import socket

from qcluster.errors import ConfigError
from qcluster.leader.routing import make_router
from qcluster.metrics import MetricsServer
from qcluster.rpc import tls
from qcluster.rpc.server import loopback, off_loopback_error
from qcluster.settings import Settings


def check_node_config(settings: Settings) -> None:
    """Raise the ConfigError that ``qcluster start`` would raise for ``settings`` before it
    listens, or return. Creates nothing: an embedded cluster's secret file is checked only
    if it exists (``start`` creates it)."""
    from qcluster.node import cluster_secret, sqlite_path

    if settings.rpc_secret() or not settings.is_embedded:
        cluster_secret(settings)
    else:
        path = sqlite_path(settings.database_url())
        if path is not None and path.with_name(path.name + ".secret").exists():
            cluster_secret(settings)
    tls.load(settings.rpc.tls)  # the files load and match
    try:
        if settings.rpc.tls is None:
            _check_loopback(settings.worker.host, settings.worker.port)
    finally:
        tls.load(None)
    if "scheduler" in settings.node.roles:
        make_router(settings.dispatch.strategy)  # a router class of the user's: it loads
    served = open_metrics(settings)  # the port is free, the address this machine's
    if served is not None:
        served.close()


def open_metrics(settings: Settings) -> MetricsServer | None:
    """Serve ``/metrics`` as ``[metrics]`` says (None: port 0, no endpoint); ConfigError
    if its address cannot be bound (in use, not this machine's, a name that does not
    resolve)."""
    m = settings.metrics
    if not m.port:
        return None
    server = MetricsServer(m.host, m.port)
    try:
        server.start()
    except OSError as e:  # socket.gaierror too
        raise ConfigError(f"cannot serve metrics on {m.host}:{m.port} ([metrics]): "
                          f"{e.strerror or e}") from None
    return server


def _check_loopback(host: str, port: int) -> None:
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"[worker] host {host!r}: cannot resolve it ({e.strerror})") from None
    for *_, address in found:
        ip = str(address[0])
        if not loopback(ip):
            raise ConfigError(off_loopback_error(host, ip))
