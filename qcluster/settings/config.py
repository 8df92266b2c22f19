"""qcluster settings: frozen, validated objects, parsed once at the edge from TOML.

Promises:

- The file is found by :func:`resolve_config_path`: ``--config``, then ``QCLUSTER_CONFIG``,
  then ``./qcluster.toml`` if it exists, else no file (the embedded defaults).
- Every problem (unreadable file, bad TOML, unknown key, bad value) raises
  :class:`~qcluster.errors.ConfigError` with one line that names the file, e.g.
  ``qcluster.toml: scheduler.misfire_grace_seconds: must be at least 1 (got 0)``.
  Nothing else escapes the loaders.
- An unknown key is an error, never a silent no-op. Every model is frozen.
- Secrets (passwords in URLs, the RPC secret, ZooKeeper auth) never appear in ``repr``,
  ``str``, ``model_dump``, logs or error messages. The real values are reached only through
  :meth:`Settings.database_url`, :meth:`Settings.rpc_secret` and ``get_secret_value()``.
- Relative paths (sqlite files, ``url_file``, ``secret_file``, TLS files) are relative to
  the current directory of the process, as SQLAlchemy treats sqlite paths. ``[jobs] paths``
  are the exception: relative to the directory of the config file that names them.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import re
import tomllib
import zoneinfo
from collections.abc import Iterable, Iterator, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from qcluster.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULTS_SOURCE = "<defaults>"
CONFIG_ENV = "QCLUSTER_CONFIG"
RPC_SECRET_ENV = "QCLUSTER_RPC_SECRET"
DEFAULT_FILE = "qcluster.toml"
_MAX_SECRET_FILE = 64 * 1024
_MAX_CONFIG_FILE = 1024 * 1024  # a config is a page of TOML; /dev/zero is not
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_QUERY_PASSWORD_RE = re.compile(r"([?&](?:password|pass|pwd)=)[^&#]*", re.IGNORECASE)
_REF_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z]\w*", re.ASCII)
_SOURCE_CONTEXT = "source"  # validation context: the config file, for [jobs] paths
_warned: set[str] = set()


def redact_url(url: str) -> str:
    """Return ``url`` with the password of its user info (and any ``password=`` query
    value) replaced by ``***``. Errs on the side of hiding too much."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    # The last "@" before the query ends the user info, so an unencoded "@" or "/" in a
    # password is hidden too.
    userinfo, at, host = authority.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if at and colon and "/" not in user:
        authority = f"{user}:***@{host}"
    tail = _QUERY_PASSWORD_RE.sub(r"\1***", tail)
    return f"{scheme}://{authority}{tail}"


class SecretURL:
    """A URL that may carry a password. ``str``/``repr``/serialisation show it redacted."""

    __slots__ = ("_url",)

    def __init__(self, url: str) -> None:
        self._url = url

    def get_secret_value(self) -> str:
        """The whole URL, password included. Give it to a driver, never to a log."""
        return self._url

    @property
    def scheme(self) -> str:
        """The lower-cased scheme (``postgresql+psycopg``), or "" when not a URL."""
        m = _SCHEME_RE.match(self._url)
        return m.group(1).lower() if m else ""

    @property
    def has_password(self) -> bool:
        return redact_url(self._url) != self._url

    def __str__(self) -> str:
        return redact_url(self._url)

    def __repr__(self) -> str:
        return f"SecretURL({redact_url(self._url)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretURL) and other._url == self._url

    def __hash__(self) -> int:
        return hash(self._url)

    @classmethod
    def _coerce(cls, value: object) -> SecretURL:
        if isinstance(value, SecretURL):
            return value
        if isinstance(value, str) and value:
            return cls(value)
        raise ValueError(f"must be a non-empty URL string (got {_toml_type(value)})")

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls._coerce, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )


class _KeyedProblem(ValueError):
    """A validation problem that names its own (absolute, dotted) key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _like(regex: str, expected: str) -> AfterValidator:
    pattern = re.compile(regex, re.ASCII)

    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"must be {expected} (got {_show(value)})")
        return value

    return AfterValidator(check)


def _known_zone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
        raise ValueError(f"unknown time zone {_show(name)}") from None
    return name


def _user_password(value: SecretStr) -> SecretStr:
    if ":" not in value.get_secret_value():
        raise ValueError("must be 'user:password'")
    return value


def _redis_url(url: SecretURL) -> SecretURL:
    if url.scheme not in ("redis", "rediss"):
        raise ValueError(f"must be a redis:// or rediss:// URL (got {_show(str(url))})")
    return url


def _no_repeats(roles: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(roles)) != len(roles):
        raise ValueError("must not repeat a role")
    return roles


# TOML arrays arrive as lists and become tuples (frozen); their items stay strictly typed.
_Tuple = Field(strict=False)
_FilePath = Annotated[Path, Field(strict=False)]
_Word = Annotated[str, _like(r"[A-Za-z0-9][\w.:-]{0,63}", "letters, digits, '.', ':', '-', '_'")]
_Pattern = Annotated[str, _like(r"[\w.*?\[\]!-]+(:[\w*?\[\]!-]+)?", "a glob of module[:function]")]
_ZK_SERVER_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[\w.-]+)(?::(.*))?", re.ASCII | re.DOTALL)
_ZK_PORT_RE = re.compile(r"[0-9]{1,5}", re.ASCII)


def _zk_server(server: str) -> str:
    """One ZooKeeper server: "host" (kazoo's default port 2181) or "host:port"."""
    if "," in server or "/" in server:
        raise ValueError(
            f"must be one 'host' or 'host:port' (got {_show(server)}): list the servers one "
            "by one and the chroot as chroot, or give hosts as one string "
            "'host:port,host:port/chroot'"
        )
    m = _ZK_SERVER_RE.fullmatch(server)
    if m is None:
        raise ValueError(f"must be 'host' or 'host:port' (got {_show(server)})")
    port = m.group(2)
    # Checked here, not left to kazoo: it reads port 0 as "no port" (2181), and fails on
    # a port out of range only when it connects.
    if port is not None and not (_ZK_PORT_RE.fullmatch(port) and 1 <= int(port) <= 65535):
        raise ValueError(f"port must be a number from 1 to 65535 (got {_show(server)})")
    return server


def _zk_chroot(path: str) -> str:
    """A ZooKeeper chroot: "" (the root) or an absolute path such as "/qcluster/prod",
    returned without a trailing "/" ("/" is the root, "")."""
    if path in ("", "/"):
        return ""
    if not path.startswith("/"):
        raise ValueError(f"must be empty or a path starting with '/' (got {_show(path)})")
    if any(c.isspace() or not c.isprintable() for c in path):
        raise ValueError(f"must not contain whitespace or control characters (got {_show(path)})")
    parts = path[1:].removesuffix("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        # kazoo would normalise these away, to a path that is not the one written.
        raise ValueError(
            f"must be an absolute path such as '/qcluster', with no empty, '.' or '..' "
            f"part (got {_show(path)})"
        )
    return "/" + "/".join(parts)


def _zk_connect_string(text: str) -> tuple[list[str], str | None]:
    """kazoo's one-string form "host:port,host:port/chroot": (the servers, the chroot,
    or None when the string names none)."""
    if not text:
        raise ValueError(
            "must not be empty: give 'host:port[,host:port...][/chroot]' or a list of servers"
        )
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"must not contain whitespace or control characters (got {_show(text)})")
    servers, slash, rest = text.partition("/")
    if not servers:
        raise ValueError(f"names no server before its chroot (got {_show(text)})")
    chroot: str | None = None
    if slash:
        try:
            chroot = _zk_chroot("/" + rest)
        except ValueError as e:
            raise ValueError(f"chroot {e}") from None
    hosts = servers.split(",")
    for i, host in enumerate(hosts, 1):
        if not host:
            raise ValueError(f"server {i} of {_show(text)} is empty")
        try:
            _zk_server(host)
        except ValueError as e:
            raise ValueError(f"server {i} of {_show(text)}: {e}") from None
    return hosts, chroot


_ZkHost = Annotated[str, AfterValidator(_zk_server)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ClusterSettings(_Section):
    """``[cluster]``: the name scopes election and membership; the member timeout."""

    name: Annotated[str, _like(r"[\w-]{1,64}", "1-64 letters, digits, '-' or '_'")] = "qcluster"
    member_timeout_seconds: float = Field(default=10.0, gt=0, le=86400)


NODE_ID_PATTERN = r"[A-Za-z0-9][\w.-]{0,127}"


class NodeSettings(_Section):
    """``[node]``: ``id`` None means "<hostname>-<pid>", chosen at start, not here."""

    id: Annotated[str, _like(NODE_ID_PATTERN, "a hostname-like id")] | None = None
    roles: Annotated[
        tuple[Literal["scheduler", "worker"], ...],
        Field(strict=False, min_length=1),
        AfterValidator(_no_repeats),
    ] = ("scheduler", "worker")


class DatabaseSettings(_Section):
    """``[database]``: ``url`` holds the URL read from ``url_file`` when that is set;
    ``postgresql://`` is rewritten to ``postgresql+psycopg://``."""

    url: SecretURL = SecretURL("sqlite:///qcluster.db")
    url_file: _FilePath | None = None

    @model_validator(mode="before")
    @classmethod
    def _read_url_file(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("url_file"), str | Path):
            return data
        if "url" in data:
            raise ValueError("url and url_file are exclusive (set one)")
        try:
            url = _read_small(Path(data["url_file"])).strip()
        except ValueError as e:
            raise _KeyedProblem("database.url_file", str(e)) from None
        if not url:
            raise _KeyedProblem("database.url_file", "file is empty")
        return {**data, "url": url}

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: SecretURL) -> SecretURL:
        scheme = v.scheme
        if not scheme:
            raise ValueError("must be a URL such as sqlite:///qcluster.db or postgresql://host/db")
        if scheme in ("postgresql", "postgres"):  # SQLAlchemy's default driver is psycopg2
            return SecretURL("postgresql+psycopg://" + v.get_secret_value().split("://", 1)[1])
        if scheme.split("+")[0] not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {scheme!r} (use sqlite or postgresql)")
        return v

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.url.scheme.split("+")[0]


class DblockSettings(_Section):
    lease_seconds: float = Field(default=10.0, ge=1, le=3600)


class ZookeeperSettings(_Section):
    """``[coordination.zookeeper]``: ``hosts`` is a list of "host:port", or kazoo's own
    form, one string "zk1:2181,zk2:2181/chroot"; either way it is kept as the list of
    servers, and a chroot at the end of the string becomes ``chroot``."""

    hosts: Annotated[tuple[_ZkHost, ...], _Tuple] = ()
    chroot: Annotated[str, AfterValidator(_zk_chroot)] = ""
    session_timeout: float = Field(default=10.0, gt=0, le=3600)
    auth: Annotated[SecretStr, AfterValidator(_user_password)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _split_connect_string(cls, data: Any) -> Any:
        # Split here, before the fields are checked, so that everything after the loader
        # (the backends, `config show`) sees one shape: the servers and the chroot.
        key = "coordination.zookeeper"
        if not isinstance(data, dict) or isinstance(data.get("hosts", ()), list | tuple):
            return data
        if not isinstance(data["hosts"], str):
            raise _KeyedProblem(
                f"{key}.hosts",
                "must be an array of 'host:port' or one string 'host:port,host:port/chroot'"
                f" (got {_toml_type(data['hosts'])})",
            )
        try:
            hosts, chroot = _zk_connect_string(data["hosts"])
        except ValueError as e:
            raise _KeyedProblem(f"{key}.hosts", str(e)) from None
        out = {**data, "hosts": hosts}
        if chroot is None:
            return out
        if "chroot" not in data:
            out["chroot"] = chroot
            return out
        given = data["chroot"]
        try:
            same = not isinstance(given, str) or _zk_chroot(given) == chroot
        except ValueError:
            same = True  # not a chroot at all: the chroot key's own check reports that
        if not same:
            raise _KeyedProblem(
                f"{key}.chroot",
                f"is {_show(given)} but {key}.hosts ends in the chroot {_show(chroot or '/')};"
                " give the chroot in one place",
            )
        return out


class RedisSettings(_Section):
    urls: Annotated[tuple[Annotated[SecretURL, AfterValidator(_redis_url)], ...], _Tuple] = ()
    lease_seconds: float = Field(default=10.0, ge=1, le=3600)
    key_prefix: _Word = "qcluster"


class CoordinationSettings(_Section):
    """``[coordination]``: the chosen backend always has servers configured."""

    backend: Literal["dblock", "zookeeper", "redis"] = "dblock"
    dblock: DblockSettings = DblockSettings()
    zookeeper: ZookeeperSettings = ZookeeperSettings()
    redis: RedisSettings = RedisSettings()

    @model_validator(mode="after")
    def _check_backend_has_servers(self) -> CoordinationSettings:
        servers = {"zookeeper": self.zookeeper.hosts, "redis": self.redis.urls}
        if self.backend in servers and not servers[self.backend]:
            key = "hosts" if self.backend == "zookeeper" else "urls"
            raise _KeyedProblem(
                f"coordination.{self.backend}.{key}",
                f"must list at least one server when coordination.backend is '{self.backend}'",
            )
        return self

    def capabilities(self) -> tuple[str, ...]:
        """The backends this config can use: the one it names first, then every other
        one it has servers for (``dblock`` needs only the shared database). A migration
        needs nodes that can use both its backends."""
        usable = ["dblock"]
        if self.zookeeper.hosts:
            usable.append("zookeeper")
        if self.redis.urls:
            usable.append("redis")
        return (self.backend, *(b for b in usable if b != self.backend))


class SchedulerSettings(_Section):
    timezone: Annotated[str, AfterValidator(_known_zone)] = "UTC"
    misfire_grace_seconds: int = Field(default=30, ge=1, le=2**31 - 1)  # timedelta, int4
    coalesce: bool = True
    poll_seconds: float = Field(default=1.0, ge=0.05, le=60)
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    database_timeout_seconds: float = Field(default=10.0, ge=1, le=3600)
    fire_ahead_seconds: float = Field(default=0.0, ge=0, le=5)

    def tzinfo(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)


class WorkerSettings(_Section):
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=0, ge=0, le=65535)
    concurrency: int = Field(default=8, ge=1, le=1024)
    heartbeat_seconds: float = Field(default=1.0, gt=0, le=3600)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0, le=86400)
    tags: Annotated[tuple[_Word, ...], _Tuple] = ()

    @field_validator("host")
    @classmethod
    def _check_host(cls, v: str) -> str:
        """An IP address or an RFC 1123 host name, so that a typo is a config error here
        and not a failure to resolve when the node binds. Whether this machine has that
        address is known only then (start reports it)."""
        import ipaddress

        try:
            ipaddress.ip_address(v)
            return v
        except ValueError:
            pass
        name = v.removesuffix(".")  # a fully qualified "node1.example.com."
        labels = name.split(".")
        label = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
        # An all-digit last label is no host name: "10.0.0.256" is a mistyped address.
        if (len(name) > 253 or labels[-1].isdigit()
                or not all(re.fullmatch(label, part) for part in labels)):
            raise ValueError(
                f"must be an IP address or a host name such as 'node1.example.com' "
                f"(got {_show(v)})"
            )
        return v


class DispatchSettings(_Section):
    strategy: Literal["round_robin", "least_loaded"] = "round_robin"
    batch_size: int = Field(default=500, ge=1, le=100_000)


class TlsSettings(_Section):
    """``[rpc.tls]``: mutual TLS for RPC. Files are not opened at load."""

    cert: _FilePath
    key: _FilePath
    ca: _FilePath
    require_client_cert: bool = True


class RpcSettings(_Section):
    """``[rpc]``: at most one of ``secret`` and ``secret_file``; ``tls`` None means plain TCP."""

    secret: SecretStr | None = Field(default=None, min_length=1)
    secret_file: _FilePath | None = None
    serializer: Literal["msgpack", "json"] = "msgpack"
    timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    tls: TlsSettings | None = None

    @model_validator(mode="after")
    def _check_exclusive(self) -> RpcSettings:
        if self.secret is not None and self.secret_file is not None:
            raise ValueError("secret and secret_file are exclusive (set one)")
        return self


class JobsSettings(_Section):
    """``[jobs]``: ``allow`` holds glob patterns, see :func:`is_allowed`. ``paths`` are
    directories that every process importing job code puts first on its import path
    (:func:`~qcluster.definitions.jobdefs.extend_import_path`): relative ones are resolved
    against the directory of the config file (``Settings.source``; the current directory when the
    settings come from no file), and each must be an existing directory."""

    allow: Annotated[tuple[_Pattern, ...], _Tuple] = ("jobs.*",)
    paths: Annotated[tuple[_FilePath, ...], _Tuple] = ()

    @field_validator("paths", mode="before")
    @classmethod
    def _no_empty_path(cls, value: Any) -> Any:
        # Path("") would silently be the config file's directory.
        if isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if item == "":
                    raise _KeyedProblem(f"jobs.paths[{i}]", "must not be empty")
        return value

    @field_validator("paths")
    @classmethod
    def _resolve_paths(cls, paths: tuple[Path, ...], info: ValidationInfo) -> tuple[Path, ...]:
        context = info.context if isinstance(info.context, Mapping) else {}
        source = context.get(_SOURCE_CONTEXT)
        base = Path(source).parent if isinstance(source, str) else Path()
        return tuple(_job_dir(i, path, base) for i, path in enumerate(paths))

    def allows(self, ref: str) -> bool:
        """Whether workers may run ``ref``; see :func:`is_allowed`."""
        return is_allowed(ref, self.allow)


def _job_dir(index: int, path: Path, base: Path) -> Path:
    """``path`` (relative: to ``base``) as an absolute path; it must be a directory."""
    key = f"jobs.paths[{index}]"
    given = "" if path.is_absolute() else f" ({_show(str(path))}, relative to the config file)"
    try:
        full = (path if path.is_absolute() else base / path).resolve()
        is_dir = full.is_dir()
        exists = is_dir or full.exists()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a name too long, a loop
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise _KeyedProblem(key, f"cannot use {_show(str(path))}: {_one_line(reason)[:100]}"
                            ) from None
    if not exists:
        raise _KeyedProblem(key, f"{_show(str(full))} does not exist{given}")
    if not is_dir:
        raise _KeyedProblem(key, f"{_show(str(full))} is not a directory{given}")
    return full


class RunsSettings(_Section):
    retention_days: float = Field(default=7.0, gt=0, le=36500)  # now - it: past year 1


class Settings(_Section):
    """All of qcluster's settings. Build it with the loaders; ``source`` names the file."""

    cluster: ClusterSettings = ClusterSettings()
    node: NodeSettings = NodeSettings()
    database: DatabaseSettings = DatabaseSettings()
    coordination: CoordinationSettings = CoordinationSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    worker: WorkerSettings = WorkerSettings()
    dispatch: DispatchSettings = DispatchSettings()
    rpc: RpcSettings = RpcSettings()
    jobs: JobsSettings = JobsSettings()
    runs: RunsSettings = RunsSettings()
    _source: str = PrivateAttr(default=DEFAULTS_SOURCE)

    @model_validator(mode="after")
    def _check_liveness(self) -> Settings:
        # A member that checks in less often than the timeout would be declared dead
        # between two of its own heartbeats.
        if self.worker.heartbeat_seconds >= self.cluster.member_timeout_seconds:
            limit = self.cluster.member_timeout_seconds
            raise _KeyedProblem(
                "worker.heartbeat_seconds",
                f"must be less than cluster.member_timeout_seconds ({limit})",
            )
        return self

    @property
    def source(self) -> str:
        """The config file as given, or ``"<defaults>"``."""
        return self._source

    @property
    def is_embedded(self) -> bool:
        """True when the database is SQLite: one host, the embedded default."""
        return self.database.dialect == "sqlite"

    def database_url(self) -> str:
        """The real database URL (password included) for the engine."""
        return self.database.url.get_secret_value()

    def rpc_secret(self) -> str | None:
        """The cluster's RPC secret: ``rpc.secret`` (or ``QCLUSTER_RPC_SECRET``, applied at
        load), else the stripped contents of ``rpc.secret_file``, read now, else None.
        Raises ConfigError when the file is missing, unreadable or empty."""
        if self.rpc.secret is not None:
            return self.rpc.secret.get_secret_value()
        if self.rpc.secret_file is None:
            return None
        try:
            secret = _read_small(self.rpc.secret_file).strip()
        except ValueError as e:
            raise ConfigError(f"{self.source}: rpc.secret_file: {e}") from None
        if not secret:
            raise ConfigError(f"{self.source}: rpc.secret_file: file is empty")
        return secret


def is_allowed(ref: str, patterns: Iterable[str]) -> bool:
    """Whether a worker may run ``ref``, a ``module:function`` reference.

    ``ref`` must be a dotted module path, one colon and one plain function name that does
    not start with ``_``; anything else (``mod:obj.attr``, ``mod:__import__``) is refused,
    whatever the patterns. Patterns are case-sensitive :func:`fnmatch.fnmatchcase` globs
    (``*`` also crosses dots). A pattern with a colon is matched against the whole
    ``module:function``; a pattern without one against the module only. So ``jobs.*``
    allows every function of every module under ``jobs`` (``jobs.examples:hello``) but not
    the package itself (``jobs:x``); allow that with ``jobs``.
    """
    if not _REF_RE.fullmatch(ref):
        return False
    module = ref.partition(":")[0]
    return any(fnmatchcase(ref if ":" in p else module, p) for p in patterns)


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
    try:
        with open(path, "rb") as f:
            raw, mode = f.read(_MAX_CONFIG_FILE + 1), os.fstat(f.fileno()).st_mode
        if len(raw) > _MAX_CONFIG_FILE:
            raise ConfigError(f"{path}: cannot read config: larger than {_MAX_CONFIG_FILE} bytes")
        text = raw.decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read config: not UTF-8 text") from None
    settings = load_settings_from_text(text, str(path), env)
    exposed = _inline_secrets(settings)
    if os.name == "posix" and mode & 0o044 and exposed and str(path) not in _warned:
        _warned.add(str(path))
        log.warning(
            "%s holds secrets (%s) and other users can read it; chmod 600 it, or use"
            " url_file/secret_file",
            path,
            ", ".join(exposed),
        )
    return settings


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
        raise ConfigError(_one_line(f"{source}: {where}invalid TOML: {detail}")) from None
    return load_settings_from_mapping(data, source, env)


def load_settings_from_mapping(
    data: Mapping[str, Any], source: str, env: Mapping[str, str] | None = None
) -> Settings:
    """Validate already-parsed TOML data, then apply ``QCLUSTER_RPC_SECRET`` from ``env``
    (default ``os.environ``): when set, it replaces ``rpc.secret`` and ``rpc.secret_file``."""
    try:
        settings = Settings.model_validate(dict(data), context={_SOURCE_CONTEXT: source})
    except ValidationError as e:
        # "from None": pydantic's text carries input values, which may be secrets.
        raise ConfigError(_one_line(f"{source}: {_describe(e)}")) from None
    env_secret = (os.environ if env is None else env).get(RPC_SECRET_ENV)
    if env_secret is not None:
        if not env_secret:
            raise ConfigError(f"{source}: {RPC_SECRET_ENV} is set but empty")
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


def _read_small(path: Path) -> str:
    """A small UTF-8 file's text; ValueError with a one-line reason otherwise."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_SECRET_FILE + 1)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > _MAX_SECRET_FILE:
        raise ValueError(f"{path} is larger than {_MAX_SECRET_FILE} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None


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


def _show(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:57] + "...")


_TOML_TYPES = {"bool": "boolean", "int": "integer", "str": "string", "list": "array"}
_TYPE_ERRORS = {
    "string": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
    "tuple": "an array", "list": "an array", "model": "a table", "dict": "a table",
    "path": "a path string",
}  # fmt: skip
_FIXED = {"missing": "required key is missing", "finite_number": "must be a finite number"}
_FIXED |= dict.fromkeys(("too_short", "string_too_short"), "must not be empty")
_BOUNDS = {"greater_than_equal": ("ge", "at least"), "greater_than": ("gt", "greater than"),
           "less_than_equal": ("le", "at most"), "less_than": ("lt", "less than")}  # fmt: skip


def _toml_type(value: object) -> str:
    name = type(value).__name__
    return _TOML_TYPES.get(name, name)


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
    if isinstance(cause, _KeyedProblem):
        return f"{cause.key}: {cause}"
    if kind == "extra_forbidden":
        noun = "table" if isinstance(value, dict) else "key"
        return f"unknown {noun} '{key}'{_suggest(loc)}"
    if kind in _BOUNDS:
        name, words = _BOUNDS[kind]
        problem = f"must be {words} {ctx.get(name)} (got {value!r})"
    elif kind.removesuffix("_type") in _TYPE_ERRORS:
        problem = f"must be {_TYPE_ERRORS[kind.removesuffix('_type')]} (got {_toml_type(value)})"
    elif kind == "literal_error":
        got = _show(value) if isinstance(value, str) else _toml_type(value)
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


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())
