"""The two messages of a dispatch: the record of a run that a leader sends to a worker, and
the worker's reply. Both sides import them from here (the leader and the worker may not
import each other: the layers of pyproject.toml). Promises:

* A :class:`RunRecord` is its own wire form, a map of exactly its nine keys as every
  version sends it; :func:`from_wire` is the one check of a record from a peer (types,
  bounds, sizes; one-line InputError), and it raises nothing else, whatever the input.
  Its one other key, ``routing``, is the leader's own (where the run may go:
  :class:`Routing`), and never travels (:func:`to_wire` leaves it out).
* A :class:`SubmitReply` is the one answer to ``submit``: every run of the batch is either
  accepted or refused with a :class:`Refusal`. :func:`reply_from_wire` is the one check of a
  reply from a peer: exactly its keys, each of its type and range, each run that was sent
  answered once and nothing else; anything else is a one-line InputError, never another
  exception, so a broken or hostile worker cannot stop the leader's dispatcher.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NotRequired, TypedDict, get_type_hints

from qcluster.errors import InputError
from qcluster.store import bounds

#: The epoch of a leader, as it travels: a leader's first epoch is 1 (a new cluster is at 0,
#: and ``take_epoch`` adds 1), and it fits the BigInteger ``epoch`` columns.
SENT_EPOCH = bounds.IntRange(1, bounds.EPOCH.high)
#: How far ahead of the worker's clock a run may be due. A leader sends runs at most its
#: fire-ahead window early (``[scheduler] fire_ahead_seconds`` is at most 5 s); a day also
#: covers any sane clock skew, and keeps a run from holding a queue place for years.
MAX_AHEAD = 86400.0


class RunRecord(TypedDict):
    """One run, as the leader sends it to a worker (a msgpack or JSON map on the wire). The
    worker claims the row by ``run_id`` and ``attempt`` and runs what the row holds; the
    other fields are what the leader believes the row holds."""

    run_id: int
    job_id: str
    func: str
    args: str  # JSON list
    kwargs: str  # JSON object
    scheduled_at: float
    attempt: int
    epoch: int  # the epoch that recorded the row, or that sent it; shown to the job
    recover: bool
    #: The leader's own, never sent: its row's ``routing`` (:func:`routing_of`), if any.
    routing: NotRequired[str]


_FIELDS: dict[str, Any] = {k: v for k, v in get_type_hints(RunRecord).items()
                           if k != "routing"}
_KEYS = frozenset(_FIELDS)
#: The bound of each integer: the qc_runs column it is stored in or compared with.
_INTS = {"run_id": bounds.RUN_ID, "attempt": bounds.ATTEMPT, "epoch": SENT_EPOCH}
_MAX_TEXT = {"job_id": 200, "func": 400, "args": 65536, "kwargs": 65536}


def run_record(
    run_id: int, job_id: str, func: str, args_json: str, kwargs_json: str,
    scheduled_at: float, attempt: int, epoch: int, recover: bool,
    routing: str | None = None,
) -> RunRecord:
    """The record of one run, from the values of its row (plain Python types)."""
    run: RunRecord = {"run_id": int(run_id), "job_id": job_id, "func": func,
                      "args": args_json, "kwargs": kwargs_json,
                      "scheduled_at": float(scheduled_at), "attempt": int(attempt),
                      "epoch": int(epoch), "recover": bool(recover)}
    if routing is not None:
        run["routing"] = routing
    return run


def to_wire(run: RunRecord) -> Mapping[str, Any]:
    """What travels: the record itself, whose keys are the wire format, without the
    leader's ``routing``."""
    if "routing" not in run:
        return run
    return {k: v for k, v in run.items() if k != "routing"}


@dataclass(frozen=True)
class Routing:
    """Where a run may go, as its job asked when it fired (``qc_runs.routing``; the
    fields of ``definitions/policy``): only to a live worker with every one of ``tags``;
    to the worker its affinity ``group`` sits on; by the strategy ``route`` (a built-in
    ``[dispatch] strategy`` name) instead of the cluster's; only to ``worker``, a
    broadcast job's run on that worker."""

    tags: frozenset[str] = frozenset()
    group: str | None = None
    route: str | None = None
    worker: str | None = None  # a broadcast job's run: this worker's (its node id) only


ANYWHERE = Routing()
#: A ``routing`` text that cannot be read (a row changed by hand): a tag that no worker
#: can declare (it has spaces), so the run goes nowhere and is missed, saying so.
UNREADABLE = Routing(frozenset({"(unreadable routing)"}))


@functools.lru_cache(maxsize=4096)
def routing_of(text: str | None) -> Routing:
    """The :class:`Routing` of a run's ``routing`` text (a leader wrote it from a checked
    policy; one it cannot read is :data:`UNREADABLE`, never :data:`ANYWHERE`)."""
    if not text:
        return ANYWHERE
    try:
        data = json.loads(text)
        tags = data.get("tags", [])
        group, route, worker = data.get("group"), data.get("route"), data.get("worker")
    except (ValueError, AttributeError, RecursionError):
        return UNREADABLE
    if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)
            and all(isinstance(v, str | None) for v in (group, route, worker))):
        return UNREADABLE
    return Routing(frozenset(tags), group, route, worker)


def from_wire(data: object, *, now: float | None = None) -> RunRecord:
    """A record from a peer, checked: exactly the keys of :class:`RunRecord`, each of its
    type; ids from 1 to 2**63 - 1, the attempt from 1 to 2**31 - 1, the epoch from 1 to
    2**63 - 1; ``scheduled_at`` finite, from year 1, and at most :data:`MAX_AHEAD` after
    ``now`` (this clock by default), as a float; the texts within their limits.
    InputError (one line) otherwise.

    A time in the past is not refused: a run may rightly be old (a misfire grace of up to
    68 years; a ``recover`` job's retry keeps its fire time), and it is started at once."""
    if not isinstance(data, dict) or data.keys() != _KEYS:
        raise InputError("malformed run record")
    try:
        for key, allowed_range in _INTS.items():
            bounds.check_int(data[key], key, allowed_range)
        scheduled_at = bounds.check_timestamp(data["scheduled_at"], "scheduled_at")
    except InputError as e:
        raise InputError(f"malformed run record: {e}") from None
    now = time.time() if now is None else now
    if scheduled_at > now + MAX_AHEAD:
        raise InputError("malformed run record: scheduled_at is more than a day ahead of "
                         "this worker's clock")
    for key, kind in _FIELDS.items():
        if key != "scheduled_at" and not isinstance(data[key], kind):
            raise InputError(f"malformed run record: {key}")
    if any(len(data[key]) > limit for key, limit in _MAX_TEXT.items()):
        raise InputError("run record too large")
    return {"run_id": data["run_id"], "job_id": data["job_id"], "func": data["func"],
            "args": data["args"], "kwargs": data["kwargs"], "scheduled_at": scheduled_at,
            "attempt": data["attempt"], "epoch": data["epoch"], "recover": data["recover"]}


# -- the reply ----------------------------------------------------------------------------


class Refusal(StrEnum):
    """Why a worker did not take one run of a well-formed batch; the value is what travels.
    A malformed call, or one whose epoch the cluster row does not confirm, is not answered
    with these: it is refused as a whole (``ValueError("refused: ...")`` over Pyro5)."""

    #: The worker has seen a newer epoch, confirmed by the cluster row: the sender must step
    #: down (docs/DESIGN.md invariants 4 and 5).
    STALE_EPOCH = "stale epoch"
    #: The worker is stopping and takes nothing new: send it elsewhere.
    SHUTTING_DOWN = "shutting down"
    #: Its queue is full: send it again, elsewhere or later.
    BUSY = "busy"
    #: It took this (run id, attempt) already: nothing to do.
    DUPLICATE = "duplicate"
    #: Its database claim took nothing: another worker has it, or the row is no longer
    #: ``scheduled`` at this attempt. Nothing to do.
    ALREADY_CLAIMED = "already claimed"
    #: The worker could not reach the database (to confirm the epoch, or to claim): nothing
    #: was taken; send it again.
    UNAVAILABLE = "database unavailable"


_REASONS = {str(r): r for r in Refusal}
#: The load a worker reports with every reply, and alone to ``ping``.
LOAD_KEYS = ("inflight", "capacity", "max_queue", "epoch")
_REPLY_KEYS = frozenset({"accepted", "refused", *LOAD_KEYS})
_COUNT = bounds.IntRange(0, 2**63 - 1)


@dataclass(frozen=True)
class SubmitReply:
    """A worker's answer to ``submit(epoch, runs)``: each run of the batch once, in
    ``accepted`` (claimed in the database, and handed to its pool) or in ``refused``; then
    its load after the call, and the newest epoch it has seen."""

    accepted: tuple[int, ...]
    refused: tuple[tuple[int, Refusal], ...]
    inflight: int
    capacity: int
    max_queue: int
    epoch: int

    def to_wire(self) -> dict[str, Any]:
        """The map that travels (lists and plain strings, for msgpack and JSON alike)."""
        return {"accepted": list(self.accepted),
                "refused": [[run_id, str(why)] for run_id, why in self.refused],
                "inflight": self.inflight, "capacity": self.capacity,
                "max_queue": self.max_queue, "epoch": self.epoch}


def reply_from_wire(data: object, sent: Sequence[int]) -> SubmitReply:
    """A worker's reply to the batch of run ids ``sent``, checked: a map of exactly the keys
    of :class:`SubmitReply`; ``accepted`` a list of run ids, ``refused`` a list of
    ``[run id, reason]`` pairs with a reason of :class:`Refusal`; the counts and the epoch
    non-negative int64s; and every id of ``sent`` answered once (as often as it was sent),
    nothing else. InputError (one line) otherwise, whatever ``data`` is."""
    if not isinstance(data, dict) or data.keys() != _REPLY_KEYS:
        raise InputError("malformed reply")
    accepted, refused = data["accepted"], data["refused"]
    if not isinstance(accepted, list) or not isinstance(refused, list):
        raise InputError("malformed reply: accepted and refused must be lists")
    if len(accepted) + len(refused) != len(sent):
        raise InputError(f"the reply answers {len(accepted) + len(refused)} runs, "
                         f"not the {len(sent)} sent")
    try:
        ok = tuple(bounds.check_int(x, "a run id", bounds.RUN_ID) for x in accepted)
        no = tuple(_refusal(x) for x in refused)
        load = {k: bounds.check_int(data[k], k, _COUNT) for k in LOAD_KEYS}
    except InputError as e:
        raise InputError(f"malformed reply: {e}") from None
    if Counter(ok + tuple(run_id for run_id, _ in no)) != Counter(sent):
        raise InputError("the reply does not answer the runs that were sent")
    return SubmitReply(ok, no, **load)


def _refusal(item: object) -> tuple[int, Refusal]:
    if not isinstance(item, list | tuple) or len(item) != 2:
        raise InputError("a refusal must be a [run id, reason] pair")
    run_id = bounds.check_int(item[0], "a run id", bounds.RUN_ID)
    why = item[1]
    if not isinstance(why, str) or why not in _REASONS:
        raise InputError("unknown refusal reason")
    return run_id, _REASONS[why]
