"""The settings model: frozen, validated sections, one class per TOML table.

Build a :class:`Settings` with the loaders of ``settings/loading.py`` (``from qcluster.settings
import load_settings``), which turn every problem into one ConfigError line. Every model
forbids unknown keys, is frozen and strict (TOML arrays become tuples). Secrets are
``SecretStr`` or :class:`~qcluster.settings.urls.SecretURL`: they never appear in ``repr``,
``str`` or ``model_dump``; the real values are reached only through
:meth:`Settings.database_url`, :meth:`Settings.rpc_secret` and ``get_secret_value()``.
Relative paths (sqlite files, ``url_file``, ``secret_file``, TLS files) are relative to the
current directory of the process, as SQLAlchemy treats sqlite paths. ``[jobs] paths`` are
the exception: relative to the directory of the config file that names them.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from backends.names import BackendName
from qcluster.errors import ConfigError
from qcluster.settings.files import read_bounded
from qcluster.settings.passwords import hash_problem
from qcluster.settings.private import operator_file_problem, secret_problem
from qcluster.settings.refs import is_allowed
from qcluster.settings.text import show, toml_type
from qcluster.settings.urls import SecretURL
from qcluster.settings.validators import (
    SOURCE_CONTEXT,
    TUPLE,
    FilePath,
    KeyedProblem,
    Pattern,
    Word,
    ZkHost,
    job_dir,
    known_zone,
    like,
    no_repeats,
    redis_url,
    strong_secret,
    user_password,
    zk_chroot,
    zk_connect_string,
)

DEFAULTS_SOURCE = "<defaults>"
MAX_SECRET_FILE = 64 * 1024  # url_file, secret_file


def _source_of(info: ValidationInfo) -> str:
    """The config file being validated (the loaders pass it as context), or the defaults."""
    context = info.context if isinstance(info.context, Mapping) else {}
    source = context.get(SOURCE_CONTEXT)
    return source if isinstance(source, str) else DEFAULTS_SOURCE


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ClusterSettings(_Section):
    """``[cluster]``: the name scopes election and membership; the member timeout."""

    name: Annotated[str, like(r"[\w-]{1,64}", "1-64 letters, digits, '-' or '_'")] = "qcluster"
    member_timeout_seconds: float = Field(default=10.0, gt=0, le=86400)


NODE_ID_PATTERN = r"[A-Za-z0-9][\w.-]{0,127}"


class NodeSettings(_Section):
    """``[node]``: ``id`` None means "<hostname>-<pid>", chosen at start, not here."""

    id: Annotated[str, like(NODE_ID_PATTERN, "a hostname-like id")] | None = None
    roles: Annotated[
        tuple[Literal["scheduler", "worker"], ...],
        Field(strict=False, min_length=1),
        AfterValidator(no_repeats),
    ] = ("scheduler", "worker")


class DatabaseSettings(_Section):
    """``[database]``: ``url`` holds the URL read from ``url_file`` when that is set;
    ``postgresql://`` is rewritten to ``postgresql+psycopg://``."""

    url: SecretURL = SecretURL("sqlite:///qcluster.db")
    url_file: FilePath | None = None

    @model_validator(mode="before")
    @classmethod
    def _read_url_file(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("url_file"), str | Path):
            return data
        if "url" in data:
            raise ValueError("url and url_file are exclusive (set one)")
        # A ConfigError, not a ValueError: pydantic lets it through, whole, to the loader.
        url = read_bounded(data["url_file"], MAX_SECRET_FILE, "database.url_file",
                           source=_source_of(info), check=operator_file_problem).strip()
        if not url:
            raise KeyedProblem("database.url_file", "file is empty")
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

    hosts: Annotated[tuple[ZkHost, ...], TUPLE] = ()
    chroot: Annotated[str, AfterValidator(zk_chroot)] = ""
    session_timeout: float = Field(default=10.0, gt=0, le=3600)
    auth: Annotated[SecretStr, AfterValidator(user_password)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _split_connect_string(cls, data: Any) -> Any:
        # Split here, before the fields are checked, so that everything after the loader
        # (the backends, `config show`) sees one shape: the servers and the chroot.
        key = "coordination.zookeeper"
        if not isinstance(data, dict) or isinstance(data.get("hosts", ()), list | tuple):
            return data
        if not isinstance(data["hosts"], str):
            raise KeyedProblem(
                f"{key}.hosts",
                "must be an array of 'host:port' or one string 'host:port,host:port/chroot'"
                f" (got {toml_type(data['hosts'])})",
            )
        try:
            hosts, chroot = zk_connect_string(data["hosts"])
        except ValueError as e:
            raise KeyedProblem(f"{key}.hosts", str(e)) from None
        out = {**data, "hosts": hosts}
        if chroot is None:
            return out
        if "chroot" not in data:
            out["chroot"] = chroot
            return out
        given = data["chroot"]
        try:
            same = not isinstance(given, str) or zk_chroot(given) == chroot
        except ValueError:
            same = True  # not a chroot at all: the chroot key's own check reports that
        if not same:
            raise KeyedProblem(
                f"{key}.chroot",
                f"is {show(given)} but {key}.hosts ends in the chroot {show(chroot or '/')};"
                " give the chroot in one place",
            )
        return out


class RedisSettings(_Section):
    urls: Annotated[tuple[Annotated[SecretURL, AfterValidator(redis_url)], ...], TUPLE] = ()
    lease_seconds: float = Field(default=10.0, ge=1, le=3600)
    key_prefix: Word = "qcluster"


class CoordinationSettings(_Section):
    """``[coordination]``: the chosen backend always has servers configured."""

    backend: BackendName = "dblock"  # the one list of names: backends/names.py
    dblock: DblockSettings = DblockSettings()
    zookeeper: ZookeeperSettings = ZookeeperSettings()
    redis: RedisSettings = RedisSettings()

    @model_validator(mode="after")
    def _check_backend_has_servers(self) -> CoordinationSettings:
        servers = {"zookeeper": self.zookeeper.hosts, "redis": self.redis.urls}
        if self.backend in servers and not servers[self.backend]:
            key = "hosts" if self.backend == "zookeeper" else "urls"
            raise KeyedProblem(
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
    timezone: Annotated[str, AfterValidator(known_zone)] = "UTC"
    misfire_grace_seconds: int = Field(default=30, ge=1, le=2**31 - 1)  # timedelta, int4
    coalesce: bool = True
    poll_seconds: float = Field(default=1.0, ge=0.05, le=60)
    batch_size: int = Field(default=1000, ge=1, le=100_000)
    database_timeout_seconds: float = Field(default=10.0, ge=1, le=3600)
    fire_ahead_seconds: float = Field(default=0.0, ge=0, le=5)
    # No job fires more often (definitions/limits.DEFAULT_MIN_INTERVAL is the same 1 s):
    # refused at add/apply, a stored one set aside by the leader.
    min_interval_seconds: float = Field(default=1.0, ge=0.001, le=86400)
    # A job's retries, and their backoff, when it gives none (definitions/policy.py).
    retries: int = Field(default=0, ge=0, le=100)
    retry_backoff_seconds: float = Field(default=10.0, ge=0.001, le=86400)
    retry_max_backoff_seconds: float = Field(default=300.0, ge=0.001, le=31 * 86400)

    @model_validator(mode="after")
    def _check_backoff_bound(self) -> SchedulerSettings:
        if self.retry_max_backoff_seconds < self.retry_backoff_seconds:
            raise KeyedProblem("scheduler.retry_max_backoff_seconds",
                               f"must be at least scheduler.retry_backoff_seconds "
                               f"({self.retry_backoff_seconds:g})")
        return self

    def tzinfo(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)


def check_host(v: str) -> str:
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
            f"(got {show(v)})"
        )
    return v


class WorkerSettings(_Section):
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=0, ge=0, le=65535)
    concurrency: int = Field(default=8, ge=1, le=1024)
    heartbeat_seconds: float = Field(default=1.0, gt=0, le=3600)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0, le=86400)
    tags: Annotated[tuple[Word, ...], TUPLE] = ()

    @field_validator("host")
    @classmethod
    def _check_host(cls, v: str) -> str:
        return check_host(v)


#: The routers of ``leader/routing.py``; ``module:Class`` names one of the user's.
DISPATCH_STRATEGIES = ("round_robin", "least_loaded", "consistent_hash", "first", "random")


class DispatchSettings(_Section):
    strategy: str = "round_robin"
    batch_size: int = Field(default=500, ge=1, le=100_000)

    @field_validator("strategy")
    @classmethod
    def _check_strategy(cls, v: str) -> str:
        if v in DISPATCH_STRATEGIES or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", v):
            return v
        raise ValueError(f"must be one of {', '.join(DISPATCH_STRATEGIES)}, or a router "
                         f"class as 'package.module:Class' (got {show(v)})")


class TlsSettings(_Section):
    """``[rpc.tls]``: mutual TLS for RPC. Files are not opened at load."""

    cert: FilePath
    key: FilePath
    ca: FilePath
    require_client_cert: bool = True


class RpcSettings(_Section):
    """``[rpc]``: at most one of ``secret`` and ``secret_file``; ``tls`` None means plain TCP."""

    secret: Annotated[SecretStr, AfterValidator(strong_secret)] | None = None
    secret_file: FilePath | None = None
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
    """``[jobs]``: ``allow`` holds glob patterns, see :func:`~qcluster.settings.refs.is_allowed`;
    ``paths`` are
    directories that every process importing job code puts first on its import path
    (:func:`~qcluster.definitions.imports.extend_import_path`): relative ones are resolved
    against the directory of the config file (``Settings.source``; the current directory when the
    settings come from no file), and each must be an existing directory."""

    allow: Annotated[tuple[Pattern, ...], TUPLE] = ("jobs.*",)
    paths: Annotated[tuple[FilePath, ...], TUPLE] = ()

    @field_validator("paths", mode="before")
    @classmethod
    def _no_empty_path(cls, value: Any) -> Any:
        # Path("") would silently be the config file's directory.
        if isinstance(value, list | tuple):
            for i, item in enumerate(value):
                if item == "":
                    raise KeyedProblem(f"jobs.paths[{i}]", "must not be empty")
        return value

    @field_validator("paths")
    @classmethod
    def _resolve_paths(cls, paths: tuple[Path, ...], info: ValidationInfo) -> tuple[Path, ...]:
        source = _source_of(info)
        base = Path(source).parent if source != DEFAULTS_SOURCE else Path()
        return tuple(job_dir(i, path, base) for i, path in enumerate(paths))

    def allows(self, ref: str) -> bool:
        """Whether workers may run ``ref``; see :func:`~qcluster.settings.refs.is_allowed`."""
        return is_allowed(ref, self.allow)


class RunsSettings(_Section):
    retention_days: float = Field(default=7.0, gt=0, le=36500)  # now - it: past year 1
    # Attempts of one run in all (a `recover` job's retries after its worker died); a job's
    # own max_attempts wins. An int4 column holds a job's.
    max_attempts: int = Field(default=3, ge=1, le=2**31 - 1)
    # The tail of each attempt's stdout/stderr kept (qcluster/worker/output.py); 0: none.
    output_max_bytes: int = Field(default=65536, ge=0, le=1 << 20)

    @property
    def retention_seconds(self) -> float:
        """``retention_days`` in seconds: runs older (by fire time) are pruned, so no run
        older is written (a long-past ``--at``, a backfill ``--from``)."""
        return self.retention_days * 86400.0


class MetricsSettings(_Section):
    """``[metrics]``: the node's Prometheus endpoint (``qcluster/metrics.py``); ``port``
    0, the default, serves none. It listens on loopback unless ``host`` says otherwise:
    the metrics name no secret, but say what the cluster runs and how often."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=0, ge=0, le=65535)

    @field_validator("host")
    @classmethod
    def _check_host(cls, v: str) -> str:
        return check_host(v)


def _stored_hash(value: str) -> str:
    problem = hash_problem(value)
    if problem:
        raise ValueError(problem)
    return value


StoredHash = Annotated[str, AfterValidator(_stored_hash)]
WebRole = Literal["viewer", "operator"]


class WebUser(_Section):
    """One ``[[web.users]]`` login: ``operator`` may pause, resume and run jobs;
    ``viewer`` only reads."""

    name: Word
    password_hash: StoredHash
    role: WebRole = "viewer"


class WebToken(_Section):
    """One ``[[web.tokens]]`` login by a token alone (a long random string, hashed as a
    password is); ``name`` is who it is shown as."""

    name: Word
    token_hash: StoredHash
    role: WebRole = "viewer"


class WebSettings(_Section):
    """``[web]``: the dashboard (``qcluster/web/``). ``qcluster web`` serves it; a node
    serves it too when ``port`` is not 0 (the default: none). Nobody can use it before a
    user or token is configured, and it listens on loopback unless ``host`` says
    otherwise; beyond loopback it needs TLS (``tls_cert``/``tls_key``) or
    ``behind_tls_proxy = true``, since a login sent in clear is a login given away."""

    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=0, ge=0, le=65535)
    users: Annotated[tuple[WebUser, ...], TUPLE] = ()
    tokens: Annotated[tuple[WebToken, ...], TUPLE] = ()
    tls_cert: FilePath | None = None
    tls_key: FilePath | None = None
    behind_tls_proxy: bool = False
    allowed_hosts: Annotated[tuple[str, ...], TUPLE] = ()
    trusted_proxies: Annotated[tuple[str, ...], TUPLE] = ()
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    refresh_seconds: float = Field(default=2.0, ge=0.5, le=3600)

    @field_validator("host")
    @classmethod
    def _check_host(cls, v: str) -> str:
        return check_host(v)

    @field_validator("allowed_hosts")
    @classmethod
    def _check_allowed_hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_host(h).lower().removesuffix(".") for h in v)

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from qcluster.peers import network_of, too_wide

        for entry in v:
            try:
                net = network_of(entry)
            except ValueError:
                raise ValueError("must be IP addresses or networks such as '10.0.0.0/8' "
                                 f"(got {show(entry)})") from None
            if too_wide(net):
                raise ValueError(f"{show(entry)} trusts too much of the internet: every client "
                                 "in it could name its own address; list your proxies")
        return v

    @model_validator(mode="after")
    def _check_logins(self) -> WebSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (set both or neither)")
        names = [u.name for u in self.users] + [t.name for t in self.tokens]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"the login name {show(twice[0])} is used twice")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


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
    metrics: MetricsSettings = MetricsSettings()
    web: WebSettings = WebSettings()
    _source: str = PrivateAttr(default=DEFAULTS_SOURCE)

    @model_validator(mode="after")
    def _check_liveness(self) -> Settings:
        # A member that checks in less often than the timeout would be declared dead
        # between two of its own heartbeats.
        if self.worker.heartbeat_seconds >= self.cluster.member_timeout_seconds:
            limit = self.cluster.member_timeout_seconds
            raise KeyedProblem(
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
        Raises ConfigError when the file is missing, unreadable, not private
        (``settings/private.operator_file_problem``), empty or shorter than 32 bytes."""
        if self.rpc.secret is not None:
            return self.rpc.secret.get_secret_value()
        if self.rpc.secret_file is None:
            return None
        path = self.rpc.secret_file
        secret = read_bounded(path, MAX_SECRET_FILE, "rpc.secret_file", source=self.source,
                              check=operator_file_problem).strip()
        if not secret:
            raise ConfigError(f"{self.source}: rpc.secret_file: file is empty")
        problem = secret_problem(secret)
        if problem:
            raise ConfigError(f"{self.source}: rpc.secret_file: the secret in {path} {problem}")
        return secret
