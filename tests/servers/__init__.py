"""Private PostgreSQL, ZooKeeper and Redis servers on loopback, for tests.

``base`` holds the life cycle that all share; ``postgres``, ``zookeeper`` and ``redis``
one kind of server each. Import them from here: ``from tests.servers import RedisServer``.

Each server is an object. ``start()`` runs it in the foreground as a child process, on a
free 127.0.0.1 port, with its files in a private temporary directory, and returns only once
it accepts connections. ``stop()`` shuts it down gracefully and ``kill()`` with SIGKILL;
both keep the port and the data directory, so a later ``start()`` brings back the same
server with the same data (Redis keeps data only with ``persist=True``). ``pause()`` and
``resume()`` freeze and thaw the server and every process under it, PostgreSQL backends
included (SIGSTOP/SIGCONT): its clients hang rather than fail. ``close()`` stops the server
and deletes its directory; a ``with`` block calls ``start()`` and ``close()``.

Promises:

- a server listens on 127.0.0.1 only, on a port below the kernel's ephemeral range, so
  that no client socket can hold its port while it is stopped;
- a failed start raises :class:`ServerStartError` with the tail of the server's log; a
  missing program raises :class:`ServerUnavailable`; both derive from :class:`ServerError`;
- nothing outlives the interpreter: an atexit hook kills every server not yet closed and
  deletes its directory. Where util-linux's ``setpriv`` exists, the kernel also kills a
  server when the thread that started it dies (PR_SET_PDEATHSIG), which covers a test run
  killed with SIGKILL. So start servers from a thread that lives as long as they should
  (pytest's main thread does).
"""

from __future__ import annotations

from tests.servers.base import (
    LOCALHOST,
    Server,
    ServerError,
    ServerStartError,
    ServerUnavailable,
    free_port,
    port_open,
    tcp_request,
)
from tests.servers.postgres import (
    PostgresServer,
    create_database,
    database_url,
    drop_database,
    find_pg_bindir,
)
from tests.servers.redis import RedisServer
from tests.servers.zookeeper import ZooKeeperServer

__all__ = [
    "LOCALHOST",
    "PostgresServer",
    "RedisServer",
    "Server",
    "ServerError",
    "ServerStartError",
    "ServerUnavailable",
    "ZooKeeperServer",
    "create_database",
    "database_url",
    "drop_database",
    "find_pg_bindir",
    "free_port",
    "port_open",
    "tcp_request",
]
