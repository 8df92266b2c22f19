"""Job definitions: what a user asks for, validated once at the edge.

A :class:`JobDef` comes from ``jobs add`` flags, a ``jobs apply`` file, or an RPC call.
Whatever its source, it goes through :func:`validate_job` before anything is written, so
the store only ever holds readable, well-formed data: an id, a ``module:function``
reference that the allow list admits, a trigger spec, and JSON arguments of bounded size
and depth.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from qcluster.definitions.imports import resolve_func
from qcluster.definitions.limits import DEFAULT_MIN_INTERVAL, check_schedule
from qcluster.definitions.policy import FIELDS as POLICY_FIELDS
from qcluster.definitions.policy import NONE, Policy, check_policy
from qcluster.definitions.triggers import JOB_ID_RE, TriggerSpec, validate_spec
from qcluster.errors import InputError, NotAllowed
from qcluster.settings import is_allowed, is_func_ref, named_only, ref_problem

MAX_ARGS_BYTES = 64 * 1024
MAX_ARGS_DEPTH = 16



@dataclasses.dataclass(frozen=True)
class JobDef:
    """One job, as stored: every field is plain data."""

    id: str
    func: str
    trigger: TriggerSpec
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    misfire_grace_seconds: int | None = None
    coalesce: bool | None = None
    recover: bool = False
    max_attempts: int | None = None  # None: [runs] max_attempts
    policy: Policy = NONE  # retries, timeout, overlap, misfire, bounds: definitions/policy

    def to_wire(self) -> dict[str, Any]:
        """A JSON-able dict, for RPC and ``--json`` output."""
        return {
            "id": self.id,
            "func": self.func,
            "trigger": dict(self.trigger),
            "args": list(self.args),
            "kwargs": dict(self.kwargs),
            "misfire_grace_seconds": self.misfire_grace_seconds,
            "coalesce": self.coalesce,
            "recover": self.recover,
            "max_attempts": self.max_attempts,
            **self.policy.to_wire(),
        }


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not JOB_ID_RE.fullmatch(job_id):
        raise InputError(
            f"invalid job id {_short(job_id)}: use 1-200 letters, digits and _ . : @ / -"
        )
    return job_id


def check_func_ref(ref: object, allow: Sequence[str], *, import_it: bool = False) -> str:
    """Check a ``module:function`` reference (its shape: ``settings/refs.py``) against the
    allow list (and import it)."""
    if not is_func_ref(ref):
        raise InputError(f"invalid job reference {_short(ref)}: {ref_problem(ref)}")
    if not is_allowed(ref, list(allow)):
        why = (f" (it runs a process or writes a file: list {ref!r} itself to allow it, a"
               " pattern does not)" if named_only(ref) else "")
        raise NotAllowed(f"job reference {ref!r} is not allowed by [jobs] allow{why}")
    if import_it:
        resolve_func(ref)
    return ref


def check_args(args: object, kwargs: object) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Arguments must be JSON data of bounded size and nesting."""
    if not isinstance(args, list | tuple):
        raise InputError("job args must be a list")
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise InputError("job kwargs must be a table of string keys")
    _check_depth(args, 0)
    _check_depth(kwargs, 0)
    try:
        encoded = json.dumps([list(args), dict(kwargs)], allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InputError(f"job arguments must be JSON data: {_oneline(e)}") from e
    if len(encoded) > MAX_ARGS_BYTES:
        raise InputError(f"job arguments are too large ({len(encoded)} > {MAX_ARGS_BYTES} bytes)")
    return tuple(args), dict(kwargs)


def _check_depth(value: object, depth: int) -> None:
    if depth > MAX_ARGS_DEPTH:
        raise InputError(f"job arguments are nested more than {MAX_ARGS_DEPTH} deep")
    if isinstance(value, Mapping):
        for v in value.values():
            _check_depth(v, depth + 1)
    elif isinstance(value, list | tuple):
        for v in value:
            _check_depth(v, depth + 1)
    elif not (value is None or isinstance(value, str | int | float | bool)):
        raise InputError(f"job arguments must be JSON data, not {type(value).__name__}")


_FIELDS = {"id", "func", "trigger", "args", "kwargs", "misfire_grace_seconds", "coalesce",
           "recover", "max_attempts", *POLICY_FIELDS}


def validate_job(data: object, allow: Sequence[str], *, import_it: bool = False,
                 min_interval: float = DEFAULT_MIN_INTERVAL) -> JobDef:
    """Build a :class:`JobDef` from wire data (RPC, stored rows). InputError if malformed,
    or if its trigger fires more often than ``min_interval`` seconds or (a cron) has no
    fire time within the bounded search (``definitions/limits.check_schedule``). Every
    error after the id names the job, once (``job 'x': ...``), in the class it was raised
    in (a NotAllowed stays one)."""
    if not isinstance(data, Mapping):
        raise InputError("a job must be a table")
    unknown = set(data) - _FIELDS
    if unknown:
        raise InputError(f"unknown job field {sorted(map(str, unknown))[0]!r}")
    job_id = check_job_id(data.get("id"))
    try:
        return _job(job_id, data, allow, import_it=import_it, min_interval=min_interval)
    except InputError as e:
        raise type(e)(f"job {job_id!r}: {e}") from None


def _job(job_id: str, data: Mapping[str, Any], allow: Sequence[str], *, import_it: bool,
         min_interval: float) -> JobDef:
    func = check_func_ref(data.get("func"), allow, import_it=import_it)
    trigger = validate_spec(data.get("trigger"))
    check_schedule(trigger, min_interval=min_interval)
    args, kwargs = check_args(data.get("args", []), data.get("kwargs", {}))
    grace = data.get("misfire_grace_seconds")
    if grace is not None and (not isinstance(grace, int) or isinstance(grace, bool)
                              or not 1 <= grace <= 2**31 - 1):  # an int4 column; timedelta
        raise InputError("misfire_grace_seconds must be a whole number of seconds between "
                         "1 and 2147483647")
    coalesce = data.get("coalesce")
    if coalesce is not None and not isinstance(coalesce, bool):
        raise InputError("coalesce must be true or false")
    recover = data.get("recover", False)
    if not isinstance(recover, bool):
        raise InputError("recover must be true or false")
    max_attempts = data.get("max_attempts")
    if max_attempts is not None and (not isinstance(max_attempts, int)
                                     or isinstance(max_attempts, bool)
                                     or not 1 <= max_attempts <= 2**31 - 1):  # int4 columns
        raise InputError("max_attempts must be a whole number between 1 and 2147483647")
    policy = check_policy({k: data[k] for k in POLICY_FIELDS if k in data})
    if trigger["type"] == "after":
        _check_after(job_id, trigger, policy, coalesce)
    if trigger["type"] == "date" and (policy.start is not None or policy.end is not None):
        raise InputError("start and end bound a repeating schedule; a job with a date "
                         "(--at) fires once, at that date")
    if coalesce is not None and policy.misfire is not None \
            and coalesce != (policy.misfire == "run-once"):
        raise InputError(f"coalesce = {str(coalesce).lower()} contradicts "
                         f"misfire = {policy.misfire!r} (give one of them)")
    return JobDef(job_id, func, trigger, args, kwargs, grace, coalesce, recover, max_attempts,
                  policy)


#: Policies about a schedule's fire times: a job that runs after others has none.
_SCHEDULE_ONLY = ("overlap", "misfire", "catch_up", "start", "end", "max_runs", "jitter",
                  "exclude")


def _check_after(job_id: str, trigger: TriggerSpec, policy: Policy,
                 coalesce: bool | None) -> None:
    if any(p["job"] == job_id for p in trigger["parents"]):
        raise InputError("a job cannot run after itself")
    given = [f for f in _SCHEDULE_ONLY if getattr(policy, f) not in (None, ())]
    if coalesce is not None:
        given.append("coalesce")
    if given:
        raise InputError(f"{given[0]} applies to a schedule's fire times; a job that runs "
                         "after others has none (it runs once per parent fire)")
    if policy.shards is not None or policy.broadcast:
        raise InputError("a job that runs after others runs once per parent fire time; it "
                         "cannot be sharded or broadcast (its parents can)")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _oneline(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
