"""The shared tables, as SQLAlchemy Core objects.

Alembic migrations in ``qcluster/store/migrations`` create and change them; this module is what
the code queries. Every time column holds seconds since the Unix epoch, UTC, as a float:
one type on SQLite and PostgreSQL, cheap to index and compare, and the same as the
database clock expressions in :mod:`qcluster.store.db`.

No column holds pickle. Job state is readable data: a trigger spec (JSON), a
``module:function`` reference and JSON arguments.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid (and so autoincrementing).
BigId = BigInteger().with_variant(Integer(), "sqlite")

jobs = Table(
    "qc_jobs",
    metadata,
    Column("id", String(200), primary_key=True),
    Column("func", String(400), nullable=False),
    Column("trigger", Text, nullable=False),  # JSON trigger spec, see qcluster.definitions.triggers
    Column("args", Text, nullable=False, default="[]"),  # JSON list
    Column("kwargs", Text, nullable=False, default="{}"),  # JSON object
    Column("next_run_time", Float, nullable=True),  # NULL: paused or no fire time left
    Column("paused", Boolean, nullable=False, default=False),
    Column("misfire_grace_seconds", Integer, nullable=True),  # NULL: the scheduler default
    Column("coalesce", Boolean, nullable=True),  # NULL: the scheduler default
    Column("recover", Boolean, nullable=False, default=False),
    Column("max_attempts", Integer, nullable=True),  # NULL: [runs] max_attempts
    # JSON: the policies given (definitions/policy.Policy.stored); NULL: none, all defaults.
    Column("policy", Text, nullable=True),
    Column("runs_made", Integer, nullable=False, default=0, server_default="0"),  # max_runs
    Column("broken", Text, nullable=True),  # why the row could not be loaded; set aside
    Column("version", Integer, nullable=False, default=1),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_qc_jobs_next_run_time", "next_run_time"),
)

cluster = Table(
    "qc_cluster",
    metadata,
    Column("id", Integer, primary_key=True),  # always 1
    Column("name", String(100), nullable=False),
    Column("backend", String(20), nullable=False),  # the active coordination backend
    Column("phase", String(40), nullable=False, default="stable"),
    Column("target_backend", String(20), nullable=True),  # set during a migration
    Column("config_version", Integer, nullable=False, default=1),
    Column("epoch", BigInteger, nullable=False, default=0),
    Column("leader_id", String(200), nullable=True),
    Column("leader_uri", String(400), nullable=True),
    Column("leader_since", Float, nullable=True),
    Column("leader_backend", String(20), nullable=True),
    Column("leader_token", BigInteger, nullable=False, default=0),
    # JSON {backend: token}: the newest token each backend's leaders have used, so that a
    # lease on any backend (or a joint lease on two) is checked against its own history.
    Column("leader_tokens", Text, nullable=True),
    Column("phase_since", Float, nullable=True),  # when the current phase began (DB clock)
)

lease = Table(
    "qc_lease",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("holder", String(200), nullable=True),
    Column("token", BigInteger, nullable=False, default=0),
    Column("expires_at", Float, nullable=True),  # on the database's clock
)

members = Table(
    "qc_members",
    metadata,
    Column("node_id", String(200), primary_key=True),
    Column("session", String(64), nullable=False),
    Column("roles", String(100), nullable=False),
    Column("uri", String(400), nullable=True),
    Column("capacity", Integer, nullable=False, default=0),
    Column("tags", Text, nullable=False, default="[]"),
    Column("backends", String(100), nullable=False, default=""),
    Column("config_version", Integer, nullable=False, default=0),  # the phase it honours
    Column("started_version", Integer, nullable=False, default=0),  # the phase at its start
    Column("status", Text, nullable=False, default=""),
    Column("last_seen", Float, nullable=False),  # on the database's clock
)

calendars = Table(
    "qc_calendars",
    metadata,
    Column("name", String(100), primary_key=True),
    # JSON list of [first, last] ISO dates (inclusive): the excluded days.
    Column("dates", Text, nullable=False),
    Column("version", Integer, nullable=False, default=1),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

runs = Table(
    "qc_runs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("job_id", String(200), nullable=False),
    Column("scheduled_at", Float, nullable=False),
    Column("func", String(400), nullable=False),
    Column("args", Text, nullable=False),
    Column("kwargs", Text, nullable=False),
    Column("status", String(16), nullable=False),  # a qcluster.store.runs.RunStatus
    Column("attempt", Integer, nullable=False, default=1),
    Column("recover", Boolean, nullable=False, default=False),
    Column("epoch", BigInteger, nullable=False),
    Column("leader", String(200), nullable=False),
    Column("worker", String(200), nullable=True),
    Column("worker_session", String(64), nullable=True),
    Column("created_at", Float, nullable=False),
    Column("dispatched_at", Float, nullable=True),
    Column("started_at", Float, nullable=True),
    Column("finished_at", Float, nullable=True),
    Column("duration", Float, nullable=True),
    Column("error", Text, nullable=True),
    # The job's max_attempts when it fired (NULL: [runs] max_attempts, read by the leader).
    Column("max_attempts", Integer, nullable=True),
    # Attempts that ended with their worker gone while the run was `running`: two is a
    # poison run, quarantined (qcluster/leader/recovery.py).
    Column("deaths", Integer, nullable=False, default=0, server_default="0"),
    # When a cancel was asked while it ran: its worker stops it (store/runs.cancel_asked),
    # and it gets no new attempt.
    Column("cancel_requested", Float, nullable=True),
    # When it is to start: its fire time plus its jitter, a retry's backoff, a backfill's
    # now. NULL: at scheduled_at.
    Column("due_at", Float, nullable=True),
    Column("timeout", Float, nullable=True),  # seconds an attempt may run; NULL: no bound
    # Retries still allowed after a failed or timed-out attempt, and their backoff (the
    # job's policy when it fired). A `failed`/`timed_out` row with retries_left > 0 is the
    # leader's to retry or settle (leader/recovery.py).
    Column("retries_left", Integer, nullable=False, default=0, server_default="0"),
    Column("retry_backoff", Float, nullable=True),
    Column("retry_max_backoff", Float, nullable=True),
    # Written by `jobs backfill`: sent as workers have free slots, after live runs, and
    # not missed for waiting its turn (leader/recovery.py, leader/dispatch.py).
    Column("backfill", Boolean, nullable=False, default=False, server_default=sa.false()),
    # The job's own misfire grace when it fired (NULL: [scheduler] misfire_grace_seconds):
    # what recovery judges an unstarted run by, also once its job is gone.
    Column("grace", Integer, nullable=True),
    # The run of its parent whose end recorded this one (a dependent job's run; else NULL).
    Column("parent_run", BigInteger, nullable=True),
    # TRUE: its job had children when it was recorded, and the leader has not decided their
    # runs yet (leader/chains.py); NULL once decided, or for a job with none.
    Column("chain", Boolean, nullable=True),
    # Where the run may go, as its job asked when it fired: its tags, affinity group and
    # routing strategy as JSON (definitions/policy.routing_text); NULL: anywhere.
    Column("routing", Text, nullable=True),
    # Which run of its fire time it is: "" (the one run of most jobs), "3/8" (shard 3 of
    # 8), "@w1" (a broadcast job's run on worker w1); part of the run's key.
    Column("slot", String(210), nullable=False, default="", server_default=""),
    UniqueConstraint("job_id", "scheduled_at", "slot", name="uq_qc_runs_job_time_slot"),
    # By status, then fire time: the dashboard's "failing in 24 h" reads it alone
    # (migrations/versions/0007); queries by status alone read its prefix.
    Index("ix_qc_runs_status_time", "status", "scheduled_at", "job_id"),
    Index("ix_qc_runs_job_status", "job_id", "status"),
    # The few rows with a retry to come, read by every recovery pass (a partial index: the
    # failed rows of the retention window do not weigh on it).
    Index("ix_qc_runs_retry", "status", postgresql_where=sa.text("retries_left > 0"),
          sqlite_where=sa.text("retries_left > 0")),
    Index("ix_qc_runs_scheduled_at", "scheduled_at"),
    # The runs whose children are still to be decided: a handful, read by every chain pass
    # in this order (migrations/versions/0010: so the planner reads it, never the table).
    Index("ix_qc_runs_chain_time", "scheduled_at", "id", postgresql_where=sa.text("chain"),
          sqlite_where=sa.text("chain")),
)

# Dependent jobs: one row per (child, parent) edge, written with the child job from its
# ``after`` trigger (store/catalog.py). ``condition``: success, failure or always.
job_deps = Table(
    "qc_job_deps",
    metadata,
    Column("child_id", String(200), primary_key=True),
    Column("parent_id", String(200), primary_key=True),
    Column("condition", String(16), nullable=False),
    Index("ix_qc_job_deps_parent", "parent_id"),
)

# Affinity groups (a job's ``group``): the worker each sits on, placed by the leader's
# dispatcher when the group's first run is sent, and moved (fenced, by the leader of
# ``epoch``) only when that worker is no longer a live member (store/groups.py).
groups = Table(
    "qc_groups",
    metadata,
    Column("name", String(100), primary_key=True),
    Column("worker", String(200), nullable=False),  # its node id
    Column("placed_at", Float, nullable=False),
    Column("epoch", BigInteger, nullable=False),
    Column("moves", Integer, nullable=False, default=0, server_default="0"),
)

# The tail of what each run attempt wrote to stdout/stderr (log records included) and the
# short repr of its return value (qcluster/worker/output.py), written with its outcome by
# the worker of its claim; pruned with its run. A table of its own: qc_runs stays narrow
# for the hot path, and every attempt keeps its own.
run_output = Table(
    "qc_run_output",
    metadata,
    Column("run_id", BigInteger, primary_key=True, autoincrement=False),
    Column("attempt", Integer, primary_key=True, autoincrement=False),
    Column("output", Text, nullable=True),
    Column("result", Text, nullable=True),
)
