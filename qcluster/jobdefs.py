"""Job definitions: what a user asks for, validated once at the edge.

A :class:`JobDef` comes from ``jobs add`` flags, a ``jobs apply`` file, or an RPC call.
Whatever its source, it goes through :func:`validate_job` before anything is written, so
the store only ever holds readable, well-formed data: an id, a ``module:function``
reference that the allow list admits, a trigger spec, and JSON arguments of bounded size
and depth.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from qcluster.errors import InputError, NotAllowed
from qcluster.triggers import TriggerSpec, validate_spec

JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,199}$")
FUNC_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
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
        }

    def same_schedule(self, other: JobDef) -> bool:
        return self.trigger == other.trigger


def check_job_id(job_id: object) -> str:
    if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
        raise InputError(
            f"invalid job id {_short(job_id)}: use 1-200 letters, digits and _ . : @ / -"
        )
    return job_id


def check_func_ref(ref: object, allow: Sequence[str], *, import_it: bool = False) -> str:
    """Check a ``module:function`` reference against the allow list (and import it)."""
    from qcluster.config import is_allowed

    if not isinstance(ref, str) or len(ref) > 400 or not FUNC_RE.match(ref):  # the column
        raise InputError(f"invalid job reference {_short(ref)}: expected module:function")
    if not is_allowed(ref, list(allow)):
        raise NotAllowed(f"job reference {ref!r} is not allowed by [jobs] allow")
    if import_it:
        resolve_func(ref)
    return ref


def resolve_func(ref: str) -> Any:
    """Import ``module:function`` and return the callable; InputError if it cannot."""
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # import errors of user code come in every shape
        raise InputError(f"cannot import {module_name!r} for {ref!r}: {_oneline(e)}") from e
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as e:
            raise InputError(f"{ref!r}: {module_name} has no attribute {attr_path!r}") from e
    if not callable(obj):
        raise InputError(f"{ref!r} is not callable")
    # The allow list names modules; a name a module merely imported (``from os import
    # system``) must not ride on it.
    if getattr(obj, "__module__", module_name) != module_name:
        raise InputError(f"{ref!r} is not defined in {module_name} (it is imported there)")
    return obj


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
           "recover"}


def validate_job(data: object, allow: Sequence[str], *, import_it: bool = False) -> JobDef:
    """Build a :class:`JobDef` from wire data (RPC, stored rows). InputError if malformed."""
    if not isinstance(data, Mapping):
        raise InputError("a job must be a table")
    unknown = set(data) - _FIELDS
    if unknown:
        raise InputError(f"unknown job field {sorted(map(str, unknown))[0]!r}")
    job_id = check_job_id(data.get("id"))
    func = check_func_ref(data.get("func"), allow, import_it=import_it)
    trigger = validate_spec(data.get("trigger"))
    args, kwargs = check_args(data.get("args", []), data.get("kwargs", {}))
    grace = data.get("misfire_grace_seconds")
    if grace is not None and (not isinstance(grace, int) or isinstance(grace, bool)
                              or not 1 <= grace <= 2**31 - 1):  # an int4 column; timedelta
        raise InputError(f"job {job_id!r}: misfire_grace_seconds must be a whole number "
                         "between 1 and 2147483647")
    coalesce = data.get("coalesce")
    if coalesce is not None and not isinstance(coalesce, bool):
        raise InputError(f"job {job_id!r}: coalesce must be true or false")
    recover = data.get("recover", False)
    if not isinstance(recover, bool):
        raise InputError(f"job {job_id!r}: recover must be true or false")
    return JobDef(job_id, func, trigger, args, kwargs, grace, coalesce, recover)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _oneline(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
