"""Loading settings: which file, its TOML, and every problem as one line.

Promises:

- The file is found by :func:`resolve_config_path`: ``--config``, then ``QCLUSTER_CONFIG``,
  then ``./qcluster.toml`` if it exists, else no file (the embedded defaults).
- Every problem (unreadable file, bad TOML, unknown key, bad value) raises
  :class:`~qcluster.errors.ConfigError` with one line that names the file, e.g.
  ``qcluster.toml: scheduler.misfire_grace_seconds: must be at least 1 (got 0)``.
  Nothing else escapes the loaders.
- An unknown key is an error, never a silent no-op (the model is ``settings/model.py``).
- Secrets (passwords in URLs, the RPC secret, ZooKeeper auth) never appear in logs or error
  messages: pydantic's own text, which quotes input values, is never shown.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel, SecretStr, ValidationError

from qcluster.errors import ConfigError
from qcluster.settings.files import read_bounded
from qcluster.settings.model import DEFAULTS_SOURCE, Settings
from qcluster.settings.private import secret_problem
from qcluster.settings.text import one_line, show, toml_type
from qcluster.settings.urls import SecretURL
from qcluster.settings.validators import SOURCE_CONTEXT, KeyedProblem

log = logging.getLogger(__name__)

CONFIG_ENV = "QCLUSTER_CONFIG"
RPC_SECRET_ENV = "QCLUSTER_RPC_SECRET"
DEFAULT_FILE = "qcluster.toml"
MAX_CONFIG_FILE = 1024 * 1024  # a config is a page of TOML; /dev/zero is not
_warned: set[str] = set()


def resolve_config_path(
    explicit: Path | None, env: Mapping[str, str] | None = None, cwd: Path | None = None
) -> Path | None:
    """``explicit``, else ``$QCLUSTER_CONFIG``, else ``qcluster.toml`` in ``cwd`` (default:
    the current directory) if it exists, else None (embedded defaults). Existence of an
    explicit or env path is not checked here: loading it reports the problem."""
    if explicit is not None:
        return explicit
    from_env = (os.environ if env is None else env).get(CONFIG_ENV)
    if from_env:
        return Path(from_env)
    candidate = Path(DEFAULT_FILE) if cwd is None else cwd / DEFAULT_FILE
    return candidate if candidate.exists() else None


def load_settings(path: Path | None, env: Mapping[str, str] | None = None) -> Settings:
    """Load ``path`` (None: the embedded defaults). ``env`` defaults to ``os.environ``.
    Warns once per file when it holds a secret and others may read it."""
    if path is None:
        return load_settings_from_mapping({}, DEFAULTS_SOURCE, env)
    text = read_bounded(path, MAX_CONFIG_FILE, "config")
    settings = load_settings_from_text(text, str(path), env)
    exposed = _inline_secrets(settings)
    if exposed and str(path) not in _warned and _others_may_read(path):
        _warned.add(str(path))
        log.warning(
            "%s holds secrets (%s) and other users can read it; chmod 600 it, or use"
            " url_file/secret_file",
            path,
            ", ".join(exposed),
        )
    return settings


def _others_may_read(path: Path) -> bool:
    """Whether the group or others may read ``path`` (POSIX permission bits)."""
    try:
        return os.name == "posix" and bool(os.stat(path).st_mode & 0o044)
    except (OSError, ValueError):  # gone since it was read: nothing to warn about
        return False


def load_settings_from_text(
    text: str, source: str, env: Mapping[str, str] | None = None
) -> Settings:
    """Parse TOML ``text``; ``source`` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as e:  # RecursionError: deep nesting
        msg = str(e)
        m = re.search(r" \(at line (\d+), column (\d+)\)$", msg)
        where = f"line {m.group(1)}: " if m else ""
        detail = f"{msg[: m.start()]} (column {m.group(2)})" if m else msg
        raise ConfigError(one_line(f"{source}: {where}invalid TOML: {detail}")) from None
    return load_settings_from_mapping(data, source, env)


def load_settings_from_mapping(
    data: Mapping[str, Any], source: str, env: Mapping[str, str] | None = None
) -> Settings:
    """Validate already-parsed TOML data, then apply ``QCLUSTER_RPC_SECRET`` from ``env``
    (default ``os.environ``): when set, it replaces ``rpc.secret`` and ``rpc.secret_file``."""
    try:
        settings = Settings.model_validate(dict(data), context={SOURCE_CONTEXT: source})
    except ValidationError as e:
        # "from None": pydantic's text carries input values, which may be secrets.
        raise ConfigError(one_line(f"{source}: {_describe(e)}")) from None
    env_secret = (os.environ if env is None else env).get(RPC_SECRET_ENV)
    if env_secret is not None:
        if not env_secret:
            raise ConfigError(f"{source}: {RPC_SECRET_ENV} is set but empty")
        problem = secret_problem(env_secret)
        if problem:
            raise ConfigError(f"{source}: {RPC_SECRET_ENV} {problem}")
        rpc = settings.rpc.model_copy(update={"secret": SecretStr(env_secret), "secret_file": None})
        settings = settings.model_copy(update={"rpc": rpc})
    settings._source = source
    return settings


def settings_to_public_dict(s: Settings) -> dict[str, Any]:
    """Every setting as plain data for ``qcluster config show``, shaped like the TOML:
    secrets as ``"***"`` (``""`` when unset), URLs redacted, paths and tuples as str/list."""
    out = _public(s)
    assert isinstance(out, dict)
    return out


@functools.cache
def config_keys(model: type[BaseModel] = Settings, prefix: str = "") -> tuple[str, ...]:
    """Every setting's dotted key (``scheduler.timezone``), in declaration order."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        sub = _submodel(info.annotation)
        keys.extend(config_keys(sub, f"{prefix}{name}.") if sub else [prefix + name])
    return tuple(keys)


# --- helpers -----------------------------------------------------------------------------


def _inline_secrets(s: Settings) -> list[str]:
    """Keys whose secret is written in the file itself (before the env override)."""
    found = [
        ("database.url", s.database.url_file is None and s.database.url.has_password),
        ("rpc.secret", s.rpc.secret is not None),
        ("coordination.zookeeper.auth", s.coordination.zookeeper.auth is not None),
        ("coordination.redis.urls", any(u.has_password for u in s.coordination.redis.urls)),
    ]
    return [key for key, present in found if present]


def _parts(annotation: Any) -> Iterator[Any]:
    """The annotation and every type nested in it (through ``X | None``, ``Annotated``)."""
    yield annotation
    for arg in get_args(annotation):
        yield from _parts(arg)


def _submodel(annotation: Any) -> type[BaseModel] | None:
    subs = (t for t in _parts(annotation) if isinstance(t, type) and issubclass(t, BaseModel))
    return next(subs, None)


def _public(value: Any) -> Any:
    if isinstance(value, BaseModel):
        out: dict[str, Any] = {}
        for name, info in type(value).model_fields.items():
            v = getattr(value, name)
            secret = any(t is SecretStr for t in _parts(info.annotation))
            out[name] = "" if v is None and secret else _public(v)
        return out
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, SecretURL | Path):
        return str(value)
    if isinstance(value, tuple):
        return [_public(v) for v in value]
    return value


_TYPE_ERRORS = {
    "string": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
    "tuple": "an array", "list": "an array", "model": "a table", "dict": "a table",
    "path": "a path string",
}  # fmt: skip
_FIXED = {"missing": "required key is missing", "finite_number": "must be a finite number"}
_FIXED |= dict.fromkeys(("too_short", "string_too_short"), "must not be empty")
_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "greater than"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}  # fmt: skip


def _dotted(loc: Iterable[int | str]) -> str:
    parts = ""
    for p in loc:
        if isinstance(p, int):
            parts += f"[{p}]"
        else:
            part = p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else json.dumps(p)
            parts += f".{part}" if parts else part
    return parts


def _describe(e: ValidationError) -> str:
    """Pydantic's errors as ``key: problem`` phrases joined by "; ". Input values are shown
    only for bounds and choices, which are never secrets."""
    errors = e.errors()
    locs = [tuple(err["loc"]) for err in errors]
    # Drop an error on a container when one of its items has its own error.
    kept = [
        err
        for err, loc in zip(errors, locs, strict=True)
        if not any(o[: len(loc)] == loc and len(o) > len(loc) for o in locs)
    ]
    return "; ".join(_phrase(err) for err in kept)


def _phrase(err: Any) -> str:
    kind, loc, value = err["type"], tuple(err["loc"]), err.get("input")
    ctx = err.get("ctx") or {}
    key = _dotted(loc)
    cause = ctx.get("error")
    if isinstance(cause, KeyedProblem):
        return f"{cause.key}: {cause}"
    if kind == "extra_forbidden":
        noun = "table" if isinstance(value, dict) else "key"
        return f"unknown {noun} '{key}'{_suggest(loc)}"
    if kind in _BOUNDS:
        name, words = _BOUNDS[kind]
        problem = f"must be {words} {ctx.get(name)} (got {value!r})"
    elif kind.removesuffix("_type") in _TYPE_ERRORS:
        problem = f"must be {_TYPE_ERRORS[kind.removesuffix('_type')]} (got {toml_type(value)})"
    elif kind == "literal_error":
        got = show(value) if isinstance(value, str) else toml_type(value)
        problem = f"must be {ctx.get('expected')} (got {got})"
    else:
        problem = _FIXED.get(kind) or str(cause or err["msg"])
    return f"{key}: {problem}" if key else problem


def _suggest(loc: tuple[int | str, ...]) -> str:
    """A hint for an unknown key: the same key in another table, else a near sibling."""
    parent, leaf = _dotted(loc[:-1]), str(loc[-1])
    keys = config_keys()
    prefix = f"{parent}." if parent else ""
    siblings = sorted({k[len(prefix) :].split(".")[0] for k in keys if k.startswith(prefix)})
    elsewhere = [k for k in keys if k.rsplit(".", 1)[-1] == leaf]
    close = [prefix + c for c in difflib.get_close_matches(leaf, siblings, n=1)]
    return f", did you mean '{(elsewhere or close)[0]}'?" if elsewhere or close else ""
