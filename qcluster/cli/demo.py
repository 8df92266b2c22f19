"""``qcluster start --demo``: a whole cluster of one, with the example jobs, showing runs."""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from rich.console import Console

from qcluster.client import admin, changes
from qcluster.definitions.jobdefs import JobDef
from qcluster.definitions.triggers import make_spec
from qcluster.node import Node
from qcluster.settings import Settings
from qcluster.store import catalog, schema

DEMO_JOBS: list[tuple[str, str, dict[str, str], dict[str, Any]]] = [
    ("demo-hello", "jobs.examples:hello", {"every": "2s"}, {"name": "qcluster"}),
    ("demo-flaky", "jobs.examples:flaky", {"every": "3s"}, {"failure_rate": 0.3}),
    ("demo-slow", "jobs.examples:slow", {"every": "5s"}, {"seconds": 1.5}),
    ("demo-cron", "jobs.builtin:noop", {"cron": "* * * * *"}, {}),
]


def demo_jobs(settings: Settings) -> list[JobDef]:
    tz = settings.scheduler.timezone
    return [
        JobDef(id=i, func=f, kwargs=kw,
               trigger=make_spec(cron=trig.get("cron"), every=trig.get("every"), default_tz=tz))
        for i, f, trig, kw in DEMO_JOBS
    ]


def run_demo(settings: Settings, node: Node) -> None:
    console = Console(highlight=False, soft_wrap=True)  # a piped line is not cut at 80
    admin.upgrade_db(settings)  # a new PostgreSQL database too, not only the embedded one
    changes.apply_jobs(settings, demo_jobs(settings), prune=False)
    t0 = time.monotonic()
    node.start()
    console.print(f"[bold]qcluster demo[/]: node {node.node_id}, database "
                  f"{node.db.display_url if node.db else '?'}; Ctrl-C to stop")
    assert node.db is not None
    r = schema.runs
    seen = time.time() - 1
    first = True
    while not node.wait(0.5):
        with node.db.read() as conn:
            rows = conn.execute(
                sa.select(r).where(r.c.finished_at > seen).order_by(r.c.finished_at)
            ).all()
        for row in rows:
            seen = max(seen, row.finished_at)
            view = catalog.run_view(row)
            if first:
                console.print(f"first run finished {time.monotonic() - t0:.2f}s after start")
                first = False
            took = "" if row.duration is None else f" in {row.duration * 1000:.0f} ms"
            err = f"  [red]{row.error}[/]" if row.error else ""
            console.print(f"{view['scheduled_at']}  {row.job_id:<11} {row.status:<9} "
                          f"on {row.worker or '-'}{took}{err}")
    console.print("stopping...")
