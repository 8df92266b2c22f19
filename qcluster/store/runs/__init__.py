"""The owner of ``qc_runs``: the run state machine and every write to the table. Promises:

* Nothing outside this package writes ``qc_runs`` (tests/store/test_owners.py checks);
  reading is fine. Its modules: :mod:`~qcluster.store.runs.states` (the state machine),
  :mod:`~qcluster.store.runs.leader` (the leader's writes) and
  :mod:`~qcluster.store.runs.worker` (a worker's); callers import from the package.
* A write makes only the transitions of :data:`TRANSITIONS`, for the writer named there:
  its SQL filters on the statuses they start from, so a row in any other state is left
  alone (the function says it wrote nothing); a status it cannot make is a ValueError.
* The leader's writes (:func:`insert_runs`, :func:`mark_missed`, :func:`mark_lost`,
  :func:`retry`, :func:`retry_failed`, :func:`give_up_retries`, :func:`unbuffer`,
  :func:`record_reported`, :func:`cancel`, :func:`cancel_job_runs`,
  :func:`chain_decided`, :func:`prune`) run on the
  caller's connection, in the transaction it fenced on its epoch (docs/DESIGN.md
  invariants 1, 3, 6, 7). A worker's writes (:func:`claim`, :func:`start`,
  :func:`write_outcomes`, :func:`release`) are not fenced (invariant 4): each is its own
  transaction, only over the worker's claim (the attempt; after the claim, its session).
  Its one read, :func:`cancel_asked`, finds the running runs it is asked to stop.
* A run's code starts only after :func:`start` moved its row ``dispatched`` ->
  ``running``: the leader's ``dispatched`` -> ``missed``/``cancelled`` and the worker's
  start filter on the same source status, so exactly one of them wins, and a run recorded
  missed or cancelled never starts.
* The record of a run that a leader sends to a worker, :class:`RunRecord`, and its wire
  functions are in :mod:`qcluster.store.records`.
"""

from qcluster.store.runs.leader import (
    Cancelled,
    FireRow,
    ahead,
    cancel,
    cancel_job_runs,
    chain_decided,
    give_up_job_retries,
    give_up_retries,
    insert_runs,
    mark_lost,
    mark_missed,
    prune,
    record_reported,
    retry,
    retry_failed,
    unbuffer,
    unclaim,
    withdraw,
)
from qcluster.store.runs.states import (
    FINISHED,
    OPEN,
    RETRIABLE,
    TRANSITIONS,
    WITHDRAWN,
    RunStatus,
    Transition,
    Writer,
    sources,
)
from qcluster.store.runs.worker import (
    Claimed,
    Outcome,
    cancel_asked,
    check_outcome,
    claim,
    release,
    start,
    still_ours,
    write_outcomes,
)

__all__ = [
    "FINISHED",
    "OPEN",
    "RETRIABLE",
    "TRANSITIONS",
    "WITHDRAWN",
    "Cancelled",
    "Claimed",
    "FireRow",
    "Outcome",
    "RunStatus",
    "Transition",
    "Writer",
    "ahead",
    "cancel",
    "cancel_asked",
    "cancel_job_runs",
    "chain_decided",
    "check_outcome",
    "claim",
    "give_up_job_retries",
    "give_up_retries",
    "insert_runs",
    "mark_lost",
    "mark_missed",
    "prune",
    "record_reported",
    "release",
    "retry",
    "retry_failed",
    "sources",
    "start",
    "still_ours",
    "unbuffer",
    "unclaim",
    "withdraw",
    "write_outcomes",
]
