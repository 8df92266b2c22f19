"""A private PostgreSQL server, and database creation on any PostgreSQL server."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from tests.servers.base import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    Server,
    ServerStartError,
    ServerUnavailable,
    port_open,
)


def find_pg_bindir() -> Path:
    """The directory of ``postgres`` and ``initdb``: $QCLUSTER_PG_BINDIR, else Debian's
    newest /usr/lib/postgresql/N/bin, else the one on PATH."""
    candidates: list[Path] = []
    if env := os.environ.get("QCLUSTER_PG_BINDIR"):
        candidates.append(Path(env))
    debian = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(
        debian,
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    if on_path := shutil.which("postgres"):
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if (bindir / "postgres").is_file() and (bindir / "initdb").is_file():
            return bindir
    raise ServerUnavailable(
        "PostgreSQL server programs (postgres, initdb) not found: install the 'postgresql' "
        "package or set QCLUSTER_PG_BINDIR"
    )


class PostgresServer(Server):
    """A PostgreSQL cluster made by initdb, with trust authentication on loopback.

    The superuser is ``postgres``. As root, the server runs as the ``postgres`` OS user
    (PostgreSQL refuses to run as root) and the directory belongs to that user.
    """

    kind = "postgres"
    # SIGINT is the "fast" shutdown; SIGTERM ("smart") would wait for every client to leave.
    stop_signal = signal.SIGINT
    user = "postgres"

    def __init__(
        self,
        *,
        port: int | None = None,
        max_connections: int = 200,
        settings: Mapping[str, str] | None = None,
        start_timeout: float = START_TIMEOUT,
        stop_timeout: float = STOP_TIMEOUT,
    ) -> None:
        self.bindir = find_pg_bindir()
        os_user = None
        if os.geteuid() == 0:
            try:
                os_user = pwd.getpwnam("postgres")
            except KeyError:
                raise ServerUnavailable(
                    "PostgreSQL refuses to run as root, and there is no 'postgres' OS user "
                    "to run it as"
                ) from None
        super().__init__(port=port, start_timeout=start_timeout, stop_timeout=stop_timeout)
        self.os_user = os_user
        if os_user is not None:
            os.chown(self.dir, os_user.pw_uid, os_user.pw_gid)
        self.data_dir = self.dir / "data"
        self.settings: dict[str, str] = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.dir),
            "max_connections": str(max_connections),
            "shared_buffers": "64MB",
            # No fsync: a commit still reaches the OS before it is acknowledged, so it
            # survives kill -9 of the server (not a crash of the machine). Leave
            # synchronous_commit on: off would lose acknowledged commits on kill -9.
            "fsync": "off",
            "full_page_writes": "off",
            "log_line_prefix": "%m [%p] ",
            **(settings or {}),
        }

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/postgres"

    @property
    def conninfo(self) -> str:
        """libpq connection string of the ``postgres`` database (for psycopg)."""
        return f"host={self.host} port={self.port} user={self.user} dbname=postgres"

    def create_database(self, name: str) -> str:
        """Create database ``name``; return its SQLAlchemy URL."""
        return create_database(self.url, name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, ending its connections."""
        drop_database(self.url, name)

    def _env(self) -> dict[str, str]:
        # PGDATA, PGPORT and friends from the caller's shell must not steer this server.
        return {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def _prepare(self) -> None:
        command = [
            str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", self.user,
            "--auth=trust", "-E", "UTF8", "--no-locale", "--no-sync",
        ]  # fmt: skip
        user = self._run_as()
        with open(self.log_path, "ab") as logfile:
            done = subprocess.run(
                command, stdin=subprocess.DEVNULL, stdout=logfile, stderr=subprocess.STDOUT,
                cwd=self.dir, env=self._env(), check=False, **user,
            )  # fmt: skip
        if done.returncode != 0:
            hint = ""
            if self.os_user is not None:
                hint = f" (can the '{self.os_user.pw_name}' OS user reach {self.dir}?)"
            raise ServerStartError(
                f"initdb failed with code {done.returncode}{hint}; log {self.log_path}:\n"
                f"{self.log_tail()}"
            )

    def _command(self) -> list[str]:
        command = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in self.settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _ready(self) -> bool:
        # postmaster.pid: line 1 is the pid, line 8 the status ("ready" once it accepts
        # connections). Checking the pid ignores a stale file left by a killed server.
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            len(lines) >= 8
            and lines[0].strip() == str(self.pid)
            and lines[7].strip() == "ready"
            and port_open(self.host, self.port)
        )


def _libpq_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL without its ``+driver``, which libpq accepts."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0]))


def database_url(url: str, name: str) -> str:
    """``url`` with its database replaced by ``name``."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def create_database(admin_url: str, name: str) -> str:
    """Create database ``name`` on the server of ``admin_url``; return the new URL."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(_libpq_url(admin_url), autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return database_url(admin_url, name)


def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` if it exists, ending the sessions still connected to it."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(_libpq_url(admin_url), autocommit=True, connect_timeout=10) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
