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

Driver errors that mean "the server cannot be reached" become
:class:`~qcluster.errors.DatabaseUnavailable` at this boundary.
"""

from __future__ import annotations

import logging
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

from qcluster.errors import DatabaseUnavailable, Fenced
from qcluster.settings import redact_url
from qcluster.store import schema

log = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).parent / "migrations"
SCHEMA_HEAD = "0002"  # the newest revision in migrations/versions (a test keeps them equal)


class Database:
    """One shared database, SQLite or PostgreSQL."""

    def __init__(self, url: str, *, pool_size: int = 5, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.display_url = redact_url(url)  # for every message: the password hidden
        try:
            parsed = sa.engine.make_url(url)
        except Exception as e:
            raise DatabaseUnavailable(f"invalid database URL {self.display_url}") from e
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {"future": True}
        if self.dialect == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
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
        self.engine: Engine = sa.create_engine(url, **kwargs)
        if self.dialect == "sqlite":
            _setup_sqlite(self.engine)
        self._lock = threading.Lock()

    # -- transactions ----------------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with _translate(self.display_url), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with _translate(self.display_url), self.engine.connect() as conn:
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
        if self.dialect == "postgresql":
            return sa.cast(
                sa.func.extract("epoch", sa.func.clock_timestamp()), sa.Float
            ).label("now")
        return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float).label(
            "now"
        )

    def now(self, conn: Connection) -> float:
        return float(conn.execute(sa.select(self.now_expr())).scalar_one())

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
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(7373001)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def current_revision(self) -> str | None:
        """The schema's Alembic revision, None before the first upgrade."""
        from alembic.runtime.migration import MigrationContext

        with _translate(self.display_url), self.engine.connect() as conn:
            return MigrationContext.configure(
                conn, opts={"version_table": "qc_alembic_version"}
            ).get_current_revision()

    def is_current(self) -> bool:
        """Whether the schema is at :data:`SCHEMA_HEAD`. One plain query: every command
        asks, and importing Alembic would double a read-only command's start-up time."""
        v = sa.table("qc_alembic_version", sa.column("version_num"))
        with _translate(self.display_url), self.engine.connect() as conn:
            if not sa.inspect(conn).has_table("qc_alembic_version"):
                return False
            return bool(conn.execute(sa.select(v.c.version_num)).scalar() == SCHEMA_HEAD)

    def dispose(self) -> None:
        self.engine.dispose()


def check_epoch(conn: Connection, epoch: int) -> None:
    """Raise :class:`Fenced` unless ``epoch`` is the cluster's epoch; lock it for the txn."""
    query = sa.select(schema.cluster.c.epoch).where(schema.cluster.c.id == 1)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(read=True)
    current = conn.execute(query).scalar_one_or_none()
    if current != epoch:
        raise Fenced(f"epoch {epoch} is stale (cluster epoch is {current})")


def _setup_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event, not pysqlite, decide how transactions start.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("qc_immediate") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


@contextmanager
def _translate(display_url: str) -> Iterator[None]:
    try:
        yield
    except (OperationalError, PoolTimeout) as e:
        raise DatabaseUnavailable(f"database {display_url} unavailable: {_first_line(e)}") from e
    except DBAPIError as e:
        if e.connection_invalidated:
            raise DatabaseUnavailable(
                f"database {display_url} unavailable: {_first_line(e)}"
            ) from e
        raise


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__
