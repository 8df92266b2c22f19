"""``python -m bench.web``: the dashboard's page times with a big store (issue 17).

    python -m bench.web                         # 10,000 jobs, 1,000,000 runs, PostgreSQL and SQLite
    python -m bench.web --jobs 500 --runs 20000 --db sqlite   # small, in seconds
    python -m bench.web --db-url postgresql+psycopg://user@host/scratch

The store is filled straight through the tables (PostgreSQL ``COPY``, SQLite
``executemany``), with what a busy cluster leaves: ``--jobs`` jobs, half of them
``*/15 * * * *`` crons and half 15-minute intervals, a tenth paused; ``--runs`` runs spread
evenly over the jobs, one every 15 minutes back from now (100 per job at full size: 25
hours, so the last 24 h counts have work to do), 94 % succeeded and the rest failed, timed
out, missed or lost; one run in a hundred has 2 KiB of output. Then a real ``qcluster web``
process serves the dashboard on loopback, and this process logs in and reads each page
``--repeat`` times one after the other (after two reads to warm the caches), over a new
HTTP connection each time, as a browser tab would: the wall time from sending the request
to the last byte of the page. On PostgreSQL the store is vacuumed after the fill, as
autovacuum would have done it in a live cluster.

No scheduler node runs (the cluster page shows no leader): the page times are the
dashboard's and its database's alone. Every figure is wall time on this machine; run it on
an idle one. The report goes to the terminal and to ``--out``/web.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.common import machine_info, percentile, redact
from bench.qc import JOB_COLUMNS, copy_rows, interval_spec, job_row
from qcluster.definitions.triggers import validate_spec
from qcluster.settings.passwords import MIN_LOG2_N, hash_password
from qcluster.store import schema
from qcluster.store.db import Database
from qcluster.store.runs.states import RunStatus
from tests.helpers import cli_env, qcluster_command, run_cli, wait_for, write_config
from tests.servers.base import free_port
from tests.web.conftest import Client

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "bench password, not a secret"
TARGET_MS = 300.0
STEP = 900.0  # seconds between a job's runs: every 15 minutes
RUN_COLUMNS = ("job_id", "scheduled_at", "func", "args", "kwargs", "status", "attempt",
               "recover", "epoch", "leader", "worker", "worker_session", "created_at",
               "dispatched_at", "started_at", "finished_at", "duration", "error",
               "deaths", "retries_left", "backfill")
#: (status, share of runs): what the runs are, in proportion.
MIX = ((RunStatus.SUCCEEDED, 0.94), (RunStatus.FAILED, 0.03), (RunStatus.TIMED_OUT, 0.01),
       (RunStatus.MISSED, 0.01), (RunStatus.LOST, 0.01))
ERRORS = {RunStatus.FAILED: "RuntimeError: the report could not be built",
          RunStatus.TIMED_OUT: "timed out after 60 s",
          RunStatus.MISSED: "missed: no live worker within the grace",
          RunStatus.LOST: "lost: its worker died"}
OUTPUT = ("line of output from a run that went wrong somewhere\n" * 40)[:2048]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.web", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=10_000, help="stored jobs (10000)")
    p.add_argument("--runs", type=int, default=1_000_000, help="stored runs (1000000)")
    p.add_argument("--db", choices=("both", "postgresql", "sqlite"), default="both",
                   help="which database (both)")
    p.add_argument("--db-url", help="a scratch PostgreSQL database instead of a private one")
    p.add_argument("--repeat", type=int, default=20, help="reads of each page (20)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out",
                   help="where web.json goes (bench/out)")
    a = p.parse_args(argv)
    if a.jobs < 1 or a.runs < 0 or a.repeat < 1:
        p.error("--jobs and --repeat must be at least 1, --runs at least 0")
    return a


# -- the store ----------------------------------------------------------------------------


def cron_spec(expr: str) -> str:
    return json.dumps(validate_spec({"type": "cron", "expr": expr, "tz": "UTC"}),
                      sort_keys=True)


def job_rows(n: int, now: float) -> Iterator[tuple[Any, ...]]:
    cron, interval = cron_spec("*/15 * * * *"), interval_spec(STEP, now - 30 * 86400)
    for i in range(n):
        row = list(job_row(job_id(i), "jobs.builtin:noop", cron if i % 2 else interval,
                           now + STEP - now % STEP, now=now))
        if i % 10 == 9:  # paused: no next fire
            row[JOB_COLUMNS.index("paused")], row[JOB_COLUMNS.index("next_run_time")] = True, None
        yield tuple(row)


def job_id(i: int) -> str:
    return f"report-{i:05d}"


def run_rows(jobs: int, runs: int, now: float) -> Iterator[tuple[Any, ...]]:
    """``runs`` rows, round robin over the jobs, newest first: run k of job j is due
    ``k`` steps before the last quarter hour."""
    rng = random.Random(17)
    statuses = [s for s, _ in MIX]
    weights = [w for _, w in MIX]
    last = now - now % STEP
    for n in range(runs):
        j, k = n % jobs, n // jobs
        at = last - k * STEP
        status = rng.choices(statuses, weights)[0]
        late = rng.uniform(0.005, 0.2)
        started = None if status in (RunStatus.MISSED, RunStatus.LOST) else at + late
        finished = None if started is None else started + rng.uniform(0.01, 2.0)
        error = ERRORS.get(status)
        worker = None if status == RunStatus.MISSED else f"w{1 + j % 2}"
        yield (job_id(j), at, "jobs.builtin:noop", "[]", "{}", str(status), 1, False, 1, "s1",
               worker, None if worker is None else "bench", at, at, started, finished,
               None if finished is None or started is None else finished - started, error,
               0, 0, False)


def fill(db_url: str, jobs: int, runs: int) -> dict[str, float]:
    """Write the store; return how long each part took (seconds)."""
    now = time.time()
    took: dict[str, float] = {}
    t0 = time.perf_counter()
    db = Database(db_url)
    try:
        with db.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM qc_run_output"))
            conn.execute(sa.text("DELETE FROM qc_runs"))
            conn.execute(sa.text("DELETE FROM qc_jobs"))
        if db.engine.dialect.name == "postgresql":
            copy_rows(db, "qc_jobs", JOB_COLUMNS, job_rows(jobs, now))
            copy_rows(db, "qc_runs", RUN_COLUMNS, run_rows(jobs, runs, now))
        else:
            _insert(db, "qc_jobs", JOB_COLUMNS, job_rows(jobs, now))
            _insert(db, "qc_runs", RUN_COLUMNS, run_rows(jobs, runs, now))
        took["write jobs and runs"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with db.engine.begin() as conn:  # 1 % of runs, the failed ones first, have output
            conn.execute(sa.text(
                "INSERT INTO qc_run_output (run_id, attempt, output, result) "
                "SELECT id, 1, :out, NULL FROM qc_runs WHERE id % 100 = 0"), {"out": OUTPUT})
            if db.engine.dialect.name != "postgresql":
                conn.execute(sa.text("ANALYZE"))
        if db.engine.dialect.name == "postgresql":
            # What autovacuum does to a table within a minute of a million inserts: the
            # statistics, and the visibility map that index-only scans need (without it,
            # every index entry costs a visit to its row, as in a store just loaded).
            with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
                c.execute(sa.text("VACUUM ANALYZE"))
        took["output and VACUUM/ANALYZE"] = time.perf_counter() - t0
    finally:
        db.dispose()
    return took


def _insert(db: Database, table: str, columns: tuple[str, ...],
            rows: Iterator[tuple[Any, ...]]) -> None:
    path = db.engine.url.database
    assert path, "an SQLite file"
    conn = sqlite3.connect(path)
    try:
        sql = (f"INSERT INTO {table} ({', '.join(columns)}) "
               f"VALUES ({', '.join('?' * len(columns))})")
        batch: list[tuple[Any, ...]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= 20_000:
                conn.executemany(sql, batch)
                batch.clear()
        conn.executemany(sql, batch)
        conn.commit()
    finally:
        conn.close()


# -- the pages ----------------------------------------------------------------------------


def pages(db_url: str, jobs: int) -> list[tuple[str, str]]:
    """(what, path) of every page an operator opens, with its heaviest variants."""
    db = Database(db_url)
    try:
        with db.read() as conn:
            r = schema.runs
            failed = conn.execute(sa.select(r.c.id).where(r.c.status == RunStatus.FAILED)
                                  .order_by(r.c.id.desc()).limit(1)).scalar()
            with_output = conn.execute(sa.select(schema.run_output.c.run_id)
                                       .order_by(schema.run_output.c.run_id.desc())
                                       .limit(1)).scalar()
    finally:
        db.dispose()
    middle = job_id(jobs // 2)
    found = [("cluster", "/"), ("jobs", "/jobs"),
             ("jobs, last page", f"/jobs?page={max(1, -(-jobs // 100))}"),
             ("jobs, failing in 24 h", "/jobs?status=failing"),
             ("jobs, paused", "/jobs?status=paused"),
             ("jobs, search one", f"/jobs?q={middle}"),
             ("job (100 runs, chart, next 10 fires)", f"/jobs/{middle}"),
             ("runs (trouble)", "/runs"),
             ("runs, all statuses", "/runs?" + "&".join(f"status={s}" for s in RunStatus)),
             ("runs of one job", f"/runs?job={middle}"),
             ("runs, a job that matches none", "/runs?job=no-such-job")]
    if failed is not None:
        found.append(("run (failed)", f"/runs/{failed}"))
    if with_output is not None:
        found.append(("run with 2 KiB output", f"/runs/{with_output}"))
    return found


def serve(db_url: str, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    config = write_config(tmp, db_url, name="web.toml", web={
        "port": port,
        "users": [{"name": "bench", "role": "viewer",
                   "password_hash": hash_password(PASSWORD, MIN_LOG2_N)}]})
    proc = subprocess.Popen(qcluster_command("web", "--config", str(config)),
                            env=cli_env(config), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def up() -> bool:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise SystemExit(f"error: qcluster web exited {proc.returncode}: {err[-500:]}")
        with contextlib.suppress(OSError):
            return Client(port).get("/login").status == 200
        return False

    wait_for(up, 60, what="qcluster web to serve")
    return proc, port


def measure(port: int, paths: list[tuple[str, str]], repeat: int) -> list[dict[str, Any]]:
    client = Client(port)
    r = client.login("bench", PASSWORD)
    if r.status != 303:
        raise SystemExit(f"error: the login was refused ({r.status})")
    out = []
    for what, path in paths:
        times, size, status = [], 0, 0
        for i in range(repeat + 2):
            t0 = time.perf_counter()
            page = client.get(path)
            took = (time.perf_counter() - t0) * 1000
            status, size = page.status, len(page.body.encode())
            if status != 200:
                raise SystemExit(f"error: {path} answered {status}")
            if i >= 2:
                times.append(took)
        out.append({"page": what, "path": path, "status": status, "bytes": size,
                    "p50_ms": statistics.median(times), "p95_ms": percentile(sorted(times), 95),
                    "max_ms": max(times), "under_target": max(times) < TARGET_MS})
    return out


def bench_one(db_url: str, where: str, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    print(f"{where}: the schema, then {a.jobs:,} jobs and {a.runs:,} runs ...", flush=True)
    run_cli("db", "upgrade", config=write_config(tmp, db_url, name="db.toml"))
    took = fill(db_url, a.jobs, a.runs)
    print("  filled in " + ", ".join(f"{k} {v:.1f} s" for k, v in took.items()), flush=True)
    proc, port = serve(db_url, tmp)
    try:
        rows = measure(port, pages(db_url, a.jobs), a.repeat)
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
    print(table(rows), flush=True)
    return {"database": where, "fill_seconds": took, "pages": rows}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"  {'page':38} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'KiB':>6}  "
             f"under {TARGET_MS:g} ms"]
    for r in rows:
        lines.append(f"  {r['page']:38} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} "
                     f"{r['max_ms']:8.1f} {r['bytes'] / 1024:6.1f}  "
                     f"{'yes' if r['under_target'] else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    report: dict[str, Any] = {"machine": machine_info(), "jobs": a.jobs, "runs": a.runs,
                              "repeat": a.repeat, "argv": sys.argv[1:], "results": []}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qc-bench-web-")))
        if a.db in ("both", "postgresql"):
            if a.db_url:
                url, where = a.db_url, f"PostgreSQL at {redact(a.db_url)}"
            else:
                from tests.servers.postgres import PostgresServer

                pg = stack.enter_context(PostgresServer())
                url, where = pg.create_database("qcwebbench"), "private PostgreSQL"
            report["results"].append(bench_one(url, where, a, tmp))
        if a.db in ("both", "sqlite"):
            url = f"sqlite:///{tmp / 'web.db'}"
            report["results"].append(bench_one(url, "SQLite (a file)", a, tmp))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "web.json").write_text(json.dumps(report, indent=2) + "\n")
    slow = [(r["database"], p["page"]) for r in report["results"] for p in r["pages"]
            if not p["under_target"]]
    print(f"report: {a.out / 'web.json'}; " + (
        f"over {TARGET_MS:g} ms: {slow}" if slow else f"every page under {TARGET_MS:g} ms"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
