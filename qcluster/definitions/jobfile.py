"""``jobs apply`` files: an array of ``[[job]]`` tables, checked whole before any write.

Fields: ``id``, ``func``, one of ``cron``/``every``/``at``/``after`` (a list of parent
job ids, each ``"A"`` or ``"A:success|failure|always"``), and optional ``tz``,
``args``, ``kwargs``, ``recover``, ``max_attempts``, ``misfire_grace_seconds``,
``coalesce``, and the policy fields of :mod:`qcluster.definitions.policy` (``retries``,
``retry_backoff``, ``timeout``, ``overlap``, ``misfire``, ``catch_up``, ``start``, ``end``,
``max_runs``, ``jitter``, ``exclude``). An unknown
field, a bad value or a duplicate id is an error that names the job; nothing is written.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from qcluster.definitions.jobdefs import JobDef, check_func_ref, validate_job
from qcluster.definitions.limits import DEFAULT_MIN_INTERVAL
from qcluster.definitions.policy import FIELDS as POLICY_FIELDS
from qcluster.definitions.triggers import JOB_ID_RE, make_spec
from qcluster.errors import InputError
from qcluster.settings import read_bounded

_FIELDS = {"id", "func", "cron", "every", "at", "after", "tz", "args", "kwargs", "recover",
           "max_attempts", "misfire_grace_seconds", "coalesce", *POLICY_FIELDS}
MAX_FILE_BYTES = 64 * 1024 * 1024


def parse_cli_value(text: str) -> Any:
    """A ``--arg``/``--kwarg`` value: JSON if it parses as JSON, else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text
    except RecursionError:
        raise InputError(f"value {text[:20]!r}... is nested too deeply") from None


def load_job_file(path: Path, *, allow: list[str], default_tz: str,
                  min_interval: float = DEFAULT_MIN_INTERVAL) -> list[JobDef]:
    # Bytes: a file that is not UTF-8 is "invalid TOML", with the decoder's reason.
    raw = read_bounded(path, MAX_FILE_BYTES, "job file", error=InputError, text=False)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{path}: invalid TOML: {str(e).splitlines()[0]}") from None
    extra = set(data) - {"job"}
    if extra:
        raise InputError(f"{path}: unknown top-level key {sorted(extra)[0]!r} (expected [[job]])")
    entries = data.get("job", [])
    if not isinstance(entries, list):
        raise InputError(f"{path}: 'job' must be an array of tables ([[job]])")
    defs: list[JobDef] = []
    imported: set[str] = set()
    seen: set[str] = set()
    for n, entry in enumerate(entries, 1):
        where = f"{path}: job #{n}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: must be a table")
        named = isinstance(entry.get("id"), str) and JOB_ID_RE.fullmatch(entry["id"])
        if named:
            where = f"{path}: job {entry['id']!r}"
        try:
            wire = _wire(entry, default_tz)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        try:
            jd = validate_job(wire, allow, min_interval=min_interval)
        except InputError as e:  # past a valid id, validate_job names the job itself
            raise type(e)(f"{path if named else where}: {e}") from None
        if jd.id in seen:
            raise InputError(f"{where}: the id is used twice")
        seen.add(jd.id)
        _check_import(jd.func, allow, imported, where)
        defs.append(jd)
    return defs


def _check_import(func: str, allow: list[str], imported: set[str], where: str) -> None:
    """Import each distinct reference once: 10,000 jobs of one function import it once."""
    if func in imported:
        return
    try:
        check_func_ref(func, allow, import_it=True)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None
    imported.add(func)


def _wire(entry: dict[str, Any], default_tz: str) -> dict[str, Any]:
    """The wire form of a ``[[job]]`` table (its trigger made from ``cron``/``every``/
    ``at``/``tz``), for :func:`validate_job`."""
    unknown = set(entry) - _FIELDS
    if unknown:
        raise InputError(f"unknown field {sorted(unknown)[0]!r}")
    for key in ("cron", "every", "at", "tz"):
        if key in entry and not isinstance(entry[key], str | int | float):
            raise InputError(f"{key} must be a string")
    if "every" in entry and not isinstance(entry["every"], str | int | float):
        raise InputError("every must be a duration such as \"30s\"")
    after = entry.get("after")
    if after is not None and (not isinstance(after, list)
                              or not all(isinstance(a, str) for a in after)):
        raise InputError('after must be a list of parent job ids, e.g. ["extract"]')
    if after == []:
        raise InputError('after is empty: name at least one parent job, e.g. ["extract"]')
    spec = make_spec(
        cron=_str(entry, "cron"), every=entry.get("every"), at=_str(entry, "at"),
        after=after, tz=_str(entry, "tz"), default_tz=default_tz,
    )
    wire = {k: v for k, v in entry.items() if k not in ("cron", "every", "at", "after", "tz")}
    wire["trigger"] = spec
    return wire


def _str(entry: dict[str, Any], key: str) -> str | None:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(f"{key} must be a string")
    return value
