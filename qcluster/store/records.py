"""The record of a run that a leader sends to a worker. Promises:

* A :class:`RunRecord` is its own wire form, a map of exactly its nine keys as every
  version sends it; :func:`from_wire` is the one check of a record from a peer (types,
  bounds from :mod:`qcluster.store.bounds`, sizes; one-line InputError).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypedDict, get_type_hints

from qcluster.errors import InputError
from qcluster.store import bounds


class RunRecord(TypedDict):
    """One run, as the leader sends it to a worker (a msgpack or JSON map on the wire)."""

    run_id: int
    job_id: str
    func: str
    args: str  # JSON list
    kwargs: str  # JSON object
    scheduled_at: float
    attempt: int
    epoch: int  # the epoch that sent it; only shown to the job
    recover: bool


_FIELDS: dict[str, Any] = get_type_hints(RunRecord)
_KEYS = frozenset(_FIELDS)
#: The bound of each integer: the qc_runs column it is stored in or compared with.
_INTS = {"run_id": bounds.RUN_ID, "attempt": bounds.ATTEMPT, "epoch": bounds.EPOCH}
_MAX_TEXT = {"job_id": 200, "func": 400, "args": 65536, "kwargs": 65536}


def run_record(
    run_id: int, job_id: str, func: str, args_json: str, kwargs_json: str,
    scheduled_at: float, attempt: int, epoch: int, recover: bool,
) -> RunRecord:
    """The record of one run, from the values of its row (plain Python types)."""
    return {"run_id": int(run_id), "job_id": job_id, "func": func, "args": args_json,
            "kwargs": kwargs_json, "scheduled_at": float(scheduled_at),
            "attempt": int(attempt), "epoch": int(epoch), "recover": bool(recover)}


def to_wire(run: RunRecord) -> Mapping[str, Any]:
    """What travels: the record itself, whose keys are the wire format."""
    return run


def from_wire(data: object) -> RunRecord:
    """A record from a peer, checked: exactly the keys of :class:`RunRecord`, each of its
    type, the numbers within their columns' ranges, the texts within theirs;
    ``scheduled_at`` comes back as a float. InputError (one line) otherwise."""
    if not isinstance(data, dict) or data.keys() != _KEYS:
        raise InputError("malformed run record")
    try:
        for key, allowed_range in _INTS.items():
            bounds.check_int(data[key], key, allowed_range)
        scheduled_at = bounds.check_timestamp(data["scheduled_at"], "scheduled_at")
    except InputError as e:
        raise InputError(f"malformed run record: {e}") from None
    for key, kind in _FIELDS.items():
        if key != "scheduled_at" and not isinstance(data[key], kind):
            raise InputError(f"malformed run record: {key}")
    if any(len(data[key]) > limit for key, limit in _MAX_TEXT.items()):
        raise InputError("run record too large")
    return {"run_id": data["run_id"], "job_id": data["job_id"], "func": data["func"],
            "args": data["args"], "kwargs": data["kwargs"], "scheduled_at": scheduled_at,
            "attempt": data["attempt"], "epoch": data["epoch"], "recover": data["recover"]}
