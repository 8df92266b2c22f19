"""Access to the shared database: engines, transactions, the database clock, fencing.

Three kinds of transaction, and every write goes through one of them:

* :meth:`Database.read` — a plain read.
* :meth:`Database.write` — a write transaction. On SQLite it starts with
  ``BEGIN IMMEDIATE``, so it holds the database's write lock from its first statement and
  two processes never interleave their check-then-write steps.
* :meth:`Database.fenced` — a write that commits only if the writer's epoch is still the
  cluster's epoch (docs/DESIGN.md invariant 1). The epoch is read under ``FOR SHARE`` on
  PostgreSQL (a new leader's ``UPDATE`` of the epoch waits for us, and we for it), and
  under the write lock on SQLite. A stale leader's write raises :class:`Fenced` and rolls
  back.

Session timeouts (:class:`~qcluster.settings.SessionTimeouts`, derived from the lease by
``settings/timeouts.py``; :meth:`Database.from_settings`): on PostgreSQL every session
starts with ``lock_timeout``, ``statement_timeout`` and
``idle_in_transaction_session_timeout``, on SQLite a busy timeout of the lock wait. A
lock not granted in time, or a statement or idle transaction cut short, is a
:class:`~qcluster.errors.DatabaseUnavailable` that says which timeout and how long it is.
Without timeouts (tools, tests), SQLite waits 30 s and PostgreSQL as long as it takes.

Driver errors that mean "the server cannot be reached" become
:class:`~qcluster.errors.DatabaseUnavailable` at this boundary, their text through the one
redactor (``settings/urls.redact_text``, with every piece of the URL's passwords).

An SQLite database file is created here, before SQLite opens it, with
``O_CREAT|O_EXCL|O_NOFOLLOW`` and mode 0600; SQLite gives its ``-wal`` and ``-shm``
files the database file's mode. Its directory is checked first
(``settings/private.check_directory``: refused if others can write it, unless it is sticky
and ours; then a database, WAL, shared-memory or journal file found there must be ours).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from qcluster import metrics
from qcluster.errors import DatabaseUnavailable, Fenced
from qcluster.settings import (
    SessionTimeouts,
    Settings,
    check_directory,
    check_planted,
    create_private,
    redact_text,
    redact_url,
    session_timeouts,
    url_secrets,
)
from qcluster.store import schema

log = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA_HEAD = "0010"  # the newest revision in migrations/versions (a test keeps them equal)


class Database:
    """One shared database, SQLite or PostgreSQL."""

    def __init__(self, url: str, *, pool_size: int = 5, connect_timeout: float = 5.0,
                 timeouts: SessionTimeouts | None = None) -> None:
        self.url = url
        self.timeouts = timeouts
        self.display_url = redact_url(url)  # for every message: the password hidden
        self._secrets = url_secrets(url)  # hidden in every driver message
        try:
            parsed = sa.engine.make_url(url)
        except Exception:
            raise DatabaseUnavailable(f"invalid database URL {self.display_url}") from None
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"future": True}
        if self.dialect == "sqlite":
            busy = 30.0 if timeouts is None else timeouts.lock
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy}
            kwargs["poolclass"] = sa.pool.QueuePool
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = 10
        else:
            kwargs["pool_size"] = pool_size
            kwargs["max_overflow"] = 10
            kwargs["pool_pre_ping"] = True
            kwargs["pool_timeout"] = 10
            timeout_ms = int(connect_timeout * 1000)
            kwargs["connect_args"] = {
                "connect_timeout": max(1, int(connect_timeout)),
                # A server that stops answering (paused, cut off) fails our calls in
                # seconds, instead of hanging the leader's threads for minutes.
                "tcp_user_timeout": timeout_ms,
                "keepalives": 1,
                "keepalives_idle": 2,
                "keepalives_interval": 1,
                "keepalives_count": 3,
            }
            # The server's side of the same: a client cut off silently (no RST) leaves a
            # session behind that the server would keep for hours (tcp_keepalives_idle
            # defaults to the kernel's 2 h). Dropped within seconds, such ghosts cannot
            # pile up to max_connections over a day of network blips ("too many clients
            # already" after 26 minutes of cuts in the soak, 2026-12-01).
            server = [("tcp_keepalives_idle", "2"), ("tcp_keepalives_interval", "1"),
                      ("tcp_keepalives_count", "3"), ("tcp_user_timeout", f"{timeout_ms}ms")]
            if timeouts is not None:
                server += [(name, f"{max(1, round(seconds * 1000))}ms") for name, seconds in (
                    ("lock_timeout", timeouts.lock),
                    ("statement_timeout", timeouts.statement),
                    ("idle_in_transaction_session_timeout", timeouts.idle_in_transaction),
                )]
            kwargs["connect_args"]["options"] = " ".join(f"-c {k}={v}" for k, v in server)
        if self.dialect == "sqlite":
            path = sqlite_file(parsed)
            if path is not None:
                prepare_sqlite_file(path)
        try:
            self.engine: Engine = sa.create_engine(url, **kwargs)
        except ModuleNotFoundError as e:  # the driver is an extra (pyproject.toml)
            extra = " (pip install 'qcluster[postgres]')" if self.dialect == "postgresql" else ""
            raise DatabaseUnavailable(f"cannot use database {self.display_url}: the driver "
                                      f"{e.name or ''} is not installed{extra}") from None
        except Exception as e:  # an unknown driver, a bad argument
            raise DatabaseUnavailable(
                f"cannot use database {self.display_url}: {self._shown(e)}") from None
        if self.dialect == "sqlite":
            _setup_sqlite(self.engine, busy_ms=round(kwargs["connect_args"]["timeout"] * 1000))
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        """The database of ``settings``, with session timeouts shorter than its lease."""
        return cls(settings.database_url(), timeouts=session_timeouts(settings))

    def _shown(self, e: BaseException) -> str:
        """The first line of a driver's error, as it may be shown (the password hidden)."""
        return redact_text(_first_line(e), self._secrets)

    @contextmanager
    def _translating(self) -> Iterator[None]:
        """Driver errors that mean "unreachable" as DatabaseUnavailable, text redacted."""
        try:
            yield
        except (OperationalError, PoolTimeout) as e:
            metrics.DATABASE_ERRORS.inc()
            timeout = self._timeout_text(e)
            if timeout:
                raise DatabaseUnavailable(f"database {self.display_url}: {timeout}") from e
            raise DatabaseUnavailable(
                f"database {self.display_url} unavailable: {self._shown(e)}") from e
        except DBAPIError as e:
            if e.connection_invalidated:
                metrics.DATABASE_ERRORS.inc()
                raise DatabaseUnavailable(
                    f"database {self.display_url} unavailable: {self._shown(e)}") from e
            raise

    def _timeout_text(self, e: BaseException) -> str | None:
        """What a session timeout that ended ``e``'s statement was, or None."""
        t = self.timeouts
        code = getattr(getattr(e, "orig", None), "sqlstate", None)
        if self.dialect == "sqlite":
            locked = "database is locked" in str(getattr(e, "orig", e))
            wait = 30.0 if t is None else t.lock
            return f"the write lock was not granted within {wait:g}s (busy timeout)" \
                if locked else None
        if t is None:
            return None
        if code == "55P03":
            return (f"a lock was not granted within {t.lock:g}s (lock_timeout, shorter "
                    f"than the {t.lease:g}s lease): another session holds it")
        if code == "57014":
            return f"a statement ran past {t.statement:g}s (statement_timeout)"
        if code == "25P03":
            return (f"the session was idle in a transaction for {t.idle_in_transaction:g}s "
                    "(idle_in_transaction_session_timeout)")
        return None

    # -- transactions ----------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._translating(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self._translating(), self.engine.connect() as conn:
            if self.dialect == "sqlite":
                conn = conn.execution_options(qc_immediate=True)
            with conn.begin():
                yield conn

    @contextmanager
    def fenced(self, epoch: int) -> Iterator[Connection]:
        """A write transaction that commits only while ``epoch`` is the cluster's epoch."""
        with self.write() as conn:
            check_epoch(conn, epoch)
            yield conn

    # -- the database clock ------------------------------------------------------------

    def now_expr(self) -> sa.ColumnElement[float]:
        """The database server's current time, in seconds since the Unix epoch."""
        return now_expr(self.dialect)

    def now(self, conn: Connection) -> float:
        """The database server's current time, read on ``conn`` (one statement)."""
        return database_now(conn)

    # -- schema --------------------------------------------------------------------------

    def upgrade(self) -> None:
        """Create or upgrade the qcluster tables to the newest revision (Alembic)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(_MIGRATIONS))
        with self.write() as conn:
            # Nodes that start together must not migrate together: the first takes the
            # lock (the write lock on SQLite, an advisory lock on PostgreSQL), the others
            # then find the schema current.
            if self.dialect == "postgresql":
                # A migration of a big table may take longer than a lease, and a node
                # that waits here leads nothing yet: no session timeout in this one.
                for name in ("lock_timeout", "statement_timeout",
                             "idle_in_transaction_session_timeout"):
                    conn.execute(sa.text(f"SET LOCAL {name} = 0"))
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7373001)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def current_revision(self) -> str | None:
        """The schema's Alembic revision, None before the first upgrade."""
        from alembic.runtime.migration import MigrationContext

        with self._translating(), self.engine.connect() as conn:
            return MigrationContext.configure(
                conn, opts={"version_table": "qc_alembic_version"}
            ).get_current_revision()

    def is_current(self) -> bool:
        """Whether the schema is at :data:`SCHEMA_HEAD`. One plain query: every command
        asks, and importing Alembic would double a read-only command's start-up time."""
        v = sa.table("qc_alembic_version", sa.column("version_num"))
        with self._translating(), self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("qc_alembic_version"):
                return False
            return bool(conn.execute(sa.select(v.c.version_num)).scalar() == SCHEMA_HEAD)

    def dispose(self) -> None:
        self.engine.dispose()


def now_expr(dialect: str) -> sa.ColumnElement[float]:
    """The database server's current time in SQL, in seconds since the Unix epoch:
    ``clock_timestamp()`` on PostgreSQL (the time at the statement, not at the start of
    the transaction as ``now()``), ``julianday('now')`` on SQLite, which runs in this
    process, so its clock is this host's (docs/DESIGN.md invariant 8)."""
    if dialect == "postgresql":
        return sa.cast(
            sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Float
        ).label("now")
    return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float).label(
        "now"
    )


def database_now(conn: Connection) -> float:
    """The database server's current time, read on ``conn``: the clock that a write on a
    connection the caller opened (a job change, a cancel, a direct run) stamps and judges
    by, whichever host it runs on."""
    return float(conn.execute(sa.select(now_expr(conn.dialect.name))).scalar_one())


def check_epoch(conn: Connection, epoch: int) -> None:
    """Raise :class:`Fenced` unless ``epoch`` is the cluster's epoch; lock it for the txn."""
    query = sa.select(schema.cluster.c.epoch).where(schema.cluster.c.id == 1)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    current = conn.execute(query).scalar_one_or_none()
    if current != epoch:
        raise Fenced(f"epoch {epoch} is stale (cluster epoch is {current})")


def sqlite_file(url: sa.engine.URL) -> Path | None:
    """The file of an SQLite URL, or None (in memory, or a ``file:`` URI left to SQLite)."""
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    if str(url.query.get("uri", "")).lower() in ("true", "1"):
        return None
    return Path(database)


_warned_modes: set[Path] = set()


def prepare_sqlite_file(path: Path) -> None:
    """Create the database file ``path`` 0600 unless it exists (see the module), after
    the checks of its directory. Warns once when an existing file is open to others."""
    what = "the database"
    shared = check_directory(path.absolute().parent, what)
    if shared:
        check_planted([path, *(Path(f"{path}{end}") for end in ("-wal", "-shm", "-journal"))],
                      what)
    try:
        if create_private(path):
            return
        mode = os.stat(path).st_mode
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        return  # a missing directory, a read-only one: SQLite says so when it opens the file
    if mode & 0o077 and path not in _warned_modes:
        _warned_modes.add(path)
        log.warning("%s can be read by other users (mode %04o), with every job's arguments;"
                    " chmod 600 it", path, mode & 0o7777)


def _setup_sqlite(engine: Engine, *, busy_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event, not pysqlite, decide how transactions start.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("qc_immediate") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__
