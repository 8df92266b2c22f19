"""The run state machine: the statuses of a ``qc_runs`` row, every transition, who may
make it and through which function of :mod:`qcluster.store.runs`. The writes filter on
these sources (``*_FROM``), so the table and the code cannot disagree."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from enum import StrEnum

import sqlalchemy as sa

from qcluster.store import schema


class RunStatus(StrEnum):
    """The ``status`` of a ``qc_runs`` row; the values are what the column stores."""

    SCHEDULED = "scheduled"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    MISSED = "missed"
    LOST = "lost"
    #: Asked by ``runs cancel`` or ``jobs remove``, or replaced by a later fire (overlap
    #: ``cancel-other``), before it started: it never starts.
    CANCELLED = "cancelled"
    #: Its worker stopped (SIGTERM) before it finished, and said so; no new attempt.
    INTERRUPTED = "interrupted"
    #: Still running at its job's ``timeout``: stopped (its process group killed).
    TIMED_OUT = "timed_out"
    #: Not run, by a policy: overlap ``skip``/``buffer-one``, ``cancel-other`` (a fire
    #: time superseded by a later one of the same pass), an exclusion calendar (``error``
    #: says which). Misfire ``skip`` records ``missed``.
    SKIPPED = "skipped"
    #: Waiting for the job's open run to end (overlap ``buffer-one``/``buffer-all``,
    #: ``cancel-other``); then ``scheduled``.
    BUFFERED = "buffered"


#: Not finished yet: what recovery looks after.
OPEN = (RunStatus.SCHEDULED, RunStatus.DISPATCHED, RunStatus.RUNNING, RunStatus.BUFFERED)
#: Ended badly, and retried while the row's ``retries_left`` is above 0.
RETRIABLE = (RunStatus.FAILED, RunStatus.TIMED_OUT)
#: Finished: what retention may delete.
FINISHED = tuple(s for s in RunStatus if s not in OPEN)


class Writer(StrEnum):
    LEADER = "leader"  # fenced on its epoch (or a client with no leader, on the one it read)
    WORKER = "worker"  # over its own claim, not fenced


@dataclasses.dataclass(frozen=True)
class Transition:
    source: RunStatus | None  # None: the row is inserted
    target: RunStatus | None  # None: the row is deleted
    by: Writer
    via: str  # the function of this module that makes it


_S, _L, _W = RunStatus, Writer.LEADER, Writer.WORKER

#: Every change a run row may go through, who may make it, and the function that does.
TRANSITIONS: tuple[Transition, ...] = (
    Transition(None, _S.SCHEDULED, _L, "insert_runs"),  # a fire, or run now
    Transition(None, _S.MISSED, _L, "insert_runs"),  # past the grace, or coalesced
    Transition(None, _S.SKIPPED, _L, "insert_runs"),  # by a policy, with the reason
    Transition(None, _S.BUFFERED, _L, "insert_runs"),  # the job's previous run is open
    # Sent ahead of its fire time (fire-ahead) and taken back before it came due: its job
    # was paused, updated or removed. A worker holding it drops it at its start.
    Transition(_S.SCHEDULED, _S.CANCELLED, _L, "withdraw"),
    Transition(_S.DISPATCHED, _S.CANCELLED, _L, "withdraw"),
    Transition(_S.BUFFERED, _S.CANCELLED, _L, "withdraw"),
    # A withdrawn fire time fired again (its job resumed, or updated with that time still
    # in its schedule): the same row, attempt + 1 (WITHDRAWN marks which rows).
    *(Transition(_S.CANCELLED, s, _L, "insert_runs")
      for s in (_S.SCHEDULED, _S.MISSED, _S.SKIPPED, _S.BUFFERED)),
    # Its job's open run ended (or was stopped): it is sent now.
    Transition(_S.BUFFERED, _S.SCHEDULED, _L, "unbuffer"),
    Transition(_S.BUFFERED, _S.MISSED, _L, "mark_missed"),  # waited past its grace
    Transition(_S.BUFFERED, _S.CANCELLED, _L, "cancel"),
    Transition(_S.SCHEDULED, _S.MISSED, _L, "mark_missed"),  # never sent within the grace
    Transition(_S.DISPATCHED, _S.MISSED, _L, "mark_missed"),  # never started within it
    Transition(_S.SCHEDULED, _S.CANCELLED, _L, "cancel"),
    Transition(_S.DISPATCHED, _S.CANCELLED, _L, "cancel"),  # claimed, not started
    Transition(_S.SCHEDULED, _S.DISPATCHED, _W, "claim"),
    Transition(_S.DISPATCHED, _S.RUNNING, _W, "start"),  # before the job's code runs
    Transition(_S.DISPATCHED, _S.SCHEDULED, _W, "release"),  # a stopping worker's, unstarted
    Transition(_S.RUNNING, _S.SUCCEEDED, _W, "write_outcomes"),
    Transition(_S.RUNNING, _S.FAILED, _W, "write_outcomes"),
    Transition(_S.RUNNING, _S.INTERRUPTED, _W, "write_outcomes"),  # stopped past its grace
    Transition(_S.RUNNING, _S.TIMED_OUT, _W, "write_outcomes"),  # stopped at its timeout
    # Stopped on a cancel (``runs cancel``, overlap ``cancel-other``) while it ran.
    Transition(_S.RUNNING, _S.CANCELLED, _W, "write_outcomes"),
    # Late: the worker could not write while it was cut off, and the leader, which could
    # not reach it either, recorded the attempt lost. Same attempt only (a retry moved it).
    Transition(_S.LOST, _S.SUCCEEDED, _W, "write_outcomes"),
    Transition(_S.LOST, _S.FAILED, _W, "write_outcomes"),
    Transition(_S.LOST, _S.INTERRUPTED, _W, "write_outcomes"),
    Transition(_S.LOST, _S.TIMED_OUT, _W, "write_outcomes"),
    Transition(_S.LOST, _S.CANCELLED, _W, "write_outcomes"),
    # The worker cannot reach the database and told the leader (``report``), which writes
    # it over the same claim (session and attempt), fenced.
    Transition(_S.RUNNING, _S.SUCCEEDED, _L, "record_reported"),
    Transition(_S.RUNNING, _S.FAILED, _L, "record_reported"),
    Transition(_S.RUNNING, _S.INTERRUPTED, _L, "record_reported"),
    Transition(_S.RUNNING, _S.TIMED_OUT, _L, "record_reported"),
    Transition(_S.RUNNING, _S.CANCELLED, _L, "record_reported"),
    Transition(_S.DISPATCHED, _S.LOST, _L, "mark_lost"),  # its worker left
    Transition(_S.RUNNING, _S.LOST, _L, "mark_lost"),
    Transition(_S.LOST, _S.SCHEDULED, _L, "retry"),  # a recover job: attempt + 1, bounded
    # A failed or timed-out attempt with retries left: attempt + 1, after its backoff.
    Transition(_S.FAILED, _S.SCHEDULED, _L, "retry_failed"),
    Transition(_S.TIMED_OUT, _S.SCHEDULED, _L, "retry_failed"),
    # Claimed, never started, and its worker known stopped: its code never ran (a run
    # starts only once `running`), so it is sent again at the same attempt, any job.
    Transition(_S.DISPATCHED, _S.SCHEDULED, _L, "unclaim"),
    *(Transition(s, None, _L, "prune") for s in FINISHED),  # past the retention window
)


def sources(target: RunStatus | None, by: Writer, via: str | None = None
            ) -> tuple[RunStatus, ...]:
    """The statuses from which ``by`` (through ``via``, if given) may make ``target``
    (None: delete), in enum order."""
    found = {t.source for t in TRANSITIONS
             if t.target == target and t.by == by and via in (None, t.via)}
    return tuple(s for s in RunStatus if s in found)


CREATES = frozenset(t.target for t in TRANSITIONS if t.source is None and t.by == _L)
assert frozenset(t.target for t in TRANSITIONS if t.via == "insert_runs") == CREATES
#: The ``error`` prefix of a withdrawn run: only such a ``cancelled`` row is fired again.
WITHDRAWN = "withdrawn: "
WITHDRAW_FROM = sources(_S.CANCELLED, _L, "withdraw")
REVIVE_FROM = tuple(s for s in RunStatus if any(
    t.source == s for t in TRANSITIONS if t.via == "insert_runs"))
ENDS = frozenset(t.target for t in TRANSITIONS if t.via == "write_outcomes")
CLAIM_FROM = sources(_S.DISPATCHED, _W)
START_FROM = sources(_S.RUNNING, _W)
RELEASE_FROM = sources(_S.SCHEDULED, _W)
END_FROM = sources(_S.SUCCEEDED, _W)
REPORTED_FROM = sources(_S.SUCCEEDED, _L, "record_reported")
REPORTED_ENDS = frozenset(t.target for t in TRANSITIONS if t.via == "record_reported")
MISSED_FROM = sources(_S.MISSED, _L, "mark_missed")
CANCEL_FROM = sources(_S.CANCELLED, _L, "cancel")
LOST_FROM = sources(_S.LOST, _L)
RETRY_FROM = sources(_S.SCHEDULED, _L, "retry")
UNCLAIM_FROM = sources(_S.SCHEDULED, _L, "unclaim")
RETRY_FAILED_FROM = sources(_S.SCHEDULED, _L, "retry_failed")
UNBUFFER_FROM = sources(_S.SCHEDULED, _L, "unbuffer")
PRUNE_FROM = sources(None, _L)
assert all(sources(s, _W) == END_FROM for s in ENDS)  # one outcome statement for all
assert all(sources(s, _L, "record_reported") == REPORTED_FROM for s in ENDS)


def status_is(statuses: Sequence[RunStatus]) -> sa.ColumnElement[bool]:
    return sa.or_(*(schema.runs.c.status == s for s in statuses))


def retries_kept(status: sa.ColumnElement[str] | sa.BindParameter[str]
                 ) -> sa.ColumnElement[int]:
    """What ``retries_left`` becomes when a run ends as ``status``: kept for a failed or
    timed-out attempt (recovery retries it), 0 for every other end, so that only a row that
    can still be retried has retries left (and is in the partial index ``ix_qc_runs_retry``)."""
    kept = sa.or_(*(status == s for s in RETRIABLE))  # no IN: it runs in executemany too
    return sa.case((kept, schema.runs.c.retries_left), else_=0)


def sql_status(statuses: Sequence[RunStatus]) -> str:
    """``= 'a'`` or ``IN ('a', 'b')``, for SQL text (constants of this module, never input)."""
    if len(statuses) == 1:
        return f"= '{statuses[0]}'"
    return "IN (" + ", ".join(f"'{s}'" for s in statuses) + ")"
