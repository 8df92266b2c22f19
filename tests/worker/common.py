"""What the worker tests share: a worker on a real authenticated Pyro5 daemon, and run rows
recorded as a leader records them (its epoch in the cluster row)."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from backends.base import MemberInfo
from qcluster.rpc.pyro import AuthDaemon, DaemonThread
from qcluster.store import schema
from qcluster.store.db import Database
from qcluster.store.records import RunRecord
from qcluster.store.runs import FireRow, RunStatus, insert_runs
from qcluster.worker.runner import Worker, WorkerService

SECRET = "test-secret-for-workers-5d0e8b3a9c1f4726"  # 32 bytes or more, as every secret
#: What the workers run: the jobs that start a process or write a file are allowed by name.
ALLOW = ["jobs.*", "jobs.builtin:shell", "jobs.examples:record_run"]


class RunningWorker:
    """A :class:`Worker` served by an :class:`AuthDaemon` on loopback, as a node serves it."""

    def __init__(self, db: Database, node_id: str, allow: list[str] | None = None) -> None:
        self.worker = Worker(db, node_id=node_id, session=f"s-{node_id}", concurrency=4,
                             allow=ALLOW if allow is None else allow)
        self.worker.start()
        daemon = AuthDaemon(SECRET, host="127.0.0.1")
        self.uri = str(daemon.register(WorkerService(self.worker), "qcluster.worker.runner"))
        self.thread = DaemonThread(daemon, f"rpc-{node_id}")
        self.thread.start()
        self.member = MemberInfo(node_id, f"s-{node_id}", ("worker",), self.uri, 4)

    def stop(self) -> None:
        self.thread.stop()
        self.worker.stop(grace=5)


def lead(db: Database, epoch: int) -> None:
    """What a leader's ``take_epoch`` leaves in the cluster row: at least ``epoch`` (tests
    may write the row; the workers only confirm epochs against it)."""
    c = schema.cluster
    with db.write() as conn:
        conn.execute(c.update().where(c.c.epoch < epoch).values(epoch=epoch))


def record(db: Database, n: int, func: str = "jobs.examples:record_run",
           args: str = "[]", kwargs: str = "{}", epoch: int = 1,
           prefix: str = "job") -> list[RunRecord]:
    """``n`` scheduled runs, recorded by a leader at ``epoch`` (the cluster row's, or older)."""
    lead(db, epoch)
    fires = [FireRow(f"{prefix}{i}", func, args, kwargs, 1000.0 + i, RunStatus.SCHEDULED, False)
             for i in range(n)]
    with db.write() as conn:
        return insert_runs(conn, fires, epoch, "leader")


def wait_runs(db: Database, n: int, timeout: float = 20.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        with db.read() as conn:
            rows = conn.execute(
                sa.select(schema.runs).where(schema.runs.c.finished_at.is_not(None))
                .order_by(schema.runs.c.id)
            ).all()
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def all_runs(db: Database) -> list[tuple[Any, ...]]:
    with db.read() as conn:
        return [tuple(r) for r in conn.execute(
            sa.select(schema.runs).order_by(schema.runs.c.id))]
