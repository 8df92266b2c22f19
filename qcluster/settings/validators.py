"""The checks of single values that the settings model (``settings/model.py``) runs.

Each raises ``ValueError`` with a phrase that completes "key: ...", or
:class:`KeyedProblem` when the problem belongs to another key than the one checked.
Nothing here reads the value back into an error unless it cannot be a secret.
"""

from __future__ import annotations

import re
import zoneinfo
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, SecretStr

from qcluster.settings.private import secret_problem
from qcluster.settings.refs import pattern_problem
from qcluster.settings.text import one_line, show
from qcluster.settings.urls import SecretURL

#: Validation context key: the config file being loaded, for ``[jobs] paths`` and the
#: files that settings name.
SOURCE_CONTEXT = "source"


class KeyedProblem(ValueError):
    """A validation problem that names its own (absolute, dotted) key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def like(regex: str, expected: str) -> AfterValidator:
    """A check that the whole string matches ``regex`` (ASCII), described as ``expected``."""
    pattern = re.compile(regex, re.ASCII)

    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"must be {expected} (got {show(value)})")
        return value

    return AfterValidator(check)


def known_zone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
        raise ValueError(f"unknown time zone {show(name)}") from None
    return name


def user_password(value: SecretStr) -> SecretStr:
    if ":" not in value.get_secret_value():
        raise ValueError("must be 'user:password'")
    return value


def strong_secret(value: SecretStr) -> SecretStr:
    """An RPC secret of at least 32 bytes (``settings/private.secret_problem``)."""
    problem = secret_problem(value.get_secret_value())
    if problem:
        raise ValueError(problem)
    return value


def redis_url(url: SecretURL) -> SecretURL:
    if url.scheme not in ("redis", "rediss"):
        raise ValueError(f"must be a redis:// or rediss:// URL (got {show(str(url))})")
    return url


def no_repeats(roles: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(roles)) != len(roles):
        raise ValueError("must not repeat a role")
    return roles


def allow_pattern(pattern: str) -> str:
    """A ``[jobs] allow`` glob (``settings/refs.pattern_problem``)."""
    problem = pattern_problem(pattern)
    if problem:
        raise ValueError(f"{problem} (got {show(pattern)})")
    return pattern


# TOML arrays arrive as lists and become tuples (frozen); their items stay strictly typed.
TUPLE = Field(strict=False)
FilePath = Annotated[Path, Field(strict=False)]
Word = Annotated[str, like(r"[A-Za-z0-9][\w.:-]{0,63}", "letters, digits, '.', ':', '-', '_'")]
Pattern = Annotated[str, AfterValidator(allow_pattern)]
_ZK_SERVER_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[\w.-]+)(?::(.*))?", re.ASCII | re.DOTALL)
_ZK_PORT_RE = re.compile(r"[0-9]{1,5}", re.ASCII)


def zk_server(server: str) -> str:
    """One ZooKeeper server: "host" (kazoo's default port 2181) or "host:port"."""
    if "," in server or "/" in server:
        raise ValueError(
            f"must be one 'host' or 'host:port' (got {show(server)}): list the servers one "
            "by one and the chroot as chroot, or give hosts as one string "
            "'host:port,host:port/chroot'"
        )
    m = _ZK_SERVER_RE.fullmatch(server)
    if m is None:
        raise ValueError(f"must be 'host' or 'host:port' (got {show(server)})")
    port = m.group(2)
    # Checked here, not left to kazoo: it reads port 0 as "no port" (2181), and fails on
    # a port out of range only when it connects.
    if port is not None and not (_ZK_PORT_RE.fullmatch(port) and 1 <= int(port) <= 65535):
        raise ValueError(f"port must be a number from 1 to 65535 (got {show(server)})")
    return server


def zk_chroot(path: str) -> str:
    """A ZooKeeper chroot: "" (the root) or an absolute path such as "/qcluster/prod",
    returned without a trailing "/" ("/" is the root, "")."""
    if path in ("", "/"):
        return ""
    if not path.startswith("/"):
        raise ValueError(f"must be empty or a path starting with '/' (got {show(path)})")
    if any(c.isspace() or not c.isprintable() for c in path):
        raise ValueError(f"must not contain whitespace or control characters (got {show(path)})")
    parts = path[1:].removesuffix("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        # kazoo would normalise these away, to a path that is not the one written.
        raise ValueError(
            f"must be an absolute path such as '/qcluster', with no empty, '.' or '..' "
            f"part (got {show(path)})"
        )
    return "/" + "/".join(parts)


def zk_connect_string(text: str) -> tuple[list[str], str | None]:
    """kazoo's one-string form "host:port,host:port/chroot": (the servers, the chroot,
    or None when the string names none)."""
    if not text:
        raise ValueError(
            "must not be empty: give 'host:port[,host:port...][/chroot]' or a list of servers"
        )
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"must not contain whitespace or control characters (got {show(text)})")
    servers, slash, rest = text.partition("/")
    if not servers:
        raise ValueError(f"names no server before its chroot (got {show(text)})")
    chroot: str | None = None
    if slash:
        try:
            chroot = zk_chroot("/" + rest)
        except ValueError as e:
            raise ValueError(f"chroot {e}") from None
    hosts = servers.split(",")
    for i, host in enumerate(hosts, 1):
        if not host:
            raise ValueError(f"server {i} of {show(text)} is empty")
        try:
            zk_server(host)
        except ValueError as e:
            raise ValueError(f"server {i} of {show(text)}: {e}") from None
    return hosts, chroot


ZkHost = Annotated[str, AfterValidator(zk_server)]


def job_dir(index: int, path: Path, base: Path) -> Path:
    """``path`` (relative: to ``base``) as an absolute path; it must be a directory."""
    key = f"jobs.paths[{index}]"
    given = "" if path.is_absolute() else f" ({show(str(path))}, relative to the config file)"
    try:
        full = (path if path.is_absolute() else base / path).resolve()
        is_dir = full.is_dir()
        exists = is_dir or full.exists()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, a loop
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise KeyedProblem(key, f"cannot use {show(str(path))}: {one_line(reason)[:100]}"
                           ) from None
    if not exists:
        raise KeyedProblem(key, f"{show(str(full))} does not exist{given}")
    if not is_dir:
        raise KeyedProblem(key, f"{show(str(full))} is not a directory{given}")
    return full
