"""Unit tests of qcluster.settings: resolution, defaults, errors, secrets, the
example file."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcluster.errors import ConfigError
from qcluster.settings import (
    DEFAULTS_SOURCE,
    Settings,
    config_keys,
    is_allowed,
    load_settings,
    load_settings_from_mapping,
    load_settings_from_text,
    redact_url,
    resolve_config_path,
    settings_to_public_dict,
)
from tests.helpers import toml_dumps, write_private

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.toml"
NO_ENV: Mapping[str, str] = {}
#: A secret long enough (32 bytes) to be accepted.
LONG = "a-secret-of-32-bytes-or-more-0123456789"


def load(text: str, env: Mapping[str, str] = NO_ENV) -> Settings:
    return load_settings_from_text(text, "qcluster.toml", env)


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(text)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- resolution ---------------------------------------------------------------------------


def test_explicit_path_wins_over_env_and_cwd(tmp_path: Path) -> None:
    (tmp_path / "qcluster.toml").write_text("")
    got = resolve_config_path(Path("a.toml"), {"QCLUSTER_CONFIG": "b.toml"}, tmp_path)
    assert got == Path("a.toml")


def test_env_wins_over_cwd_file(tmp_path: Path) -> None:
    (tmp_path / "qcluster.toml").write_text("")
    assert resolve_config_path(None, {"QCLUSTER_CONFIG": "b.toml"}, tmp_path) == Path("b.toml")


def test_cwd_file_is_used_when_it_exists(tmp_path: Path) -> None:
    assert resolve_config_path(None, {}, tmp_path) is None
    (tmp_path / "qcluster.toml").write_text("")
    assert (
        resolve_config_path(None, {"QCLUSTER_CONFIG": ""}, tmp_path) == tmp_path / "qcluster.toml"
    )


def test_cwd_defaults_to_the_process_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(None, {}) is None
    (tmp_path / "qcluster.toml").write_text("")
    assert resolve_config_path(None, {}) == Path("qcluster.toml")


# --- defaults -----------------------------------------------------------------------------


def test_no_file_gives_a_cluster_of_one() -> None:
    s = load_settings(None, NO_ENV)
    assert s.source == DEFAULTS_SOURCE
    assert s.is_embedded
    assert s.database_url() == "sqlite:///qcluster.db"
    assert s.coordination.backend == "dblock"
    assert s.node.roles == ("scheduler", "worker")
    assert s.node.id is None
    assert s.worker.host == "127.0.0.1"
    assert s.worker.port == 0
    assert s.scheduler.timezone == "UTC"
    assert s.scheduler.misfire_grace_seconds == 30
    assert s.rpc.max_message_bytes == 4 * 1024 * 1024
    assert s.rpc.tls is None
    assert s.rpc_secret() is None
    assert s.jobs.allow == ("jobs.*",)
    assert s.cluster.member_timeout_seconds == 10.0


def test_empty_file_equals_defaults() -> None:
    assert settings_to_public_dict(load("")) == settings_to_public_dict(load_settings(None, {}))


def test_settings_are_frozen() -> None:
    s = load("")
    with pytest.raises(ValueError):
        s.scheduler.batch_size = 5
    assert isinstance(s.worker.tags, tuple)


def test_source_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "q.toml"
    path.write_text("[cluster]\nname = 'prod'\n")
    s = load_settings(path, NO_ENV)
    assert s.source == str(path)
    assert s.cluster.name == "prod"


def test_a_full_config_loads() -> None:
    s = load(
        """
        [cluster]
        name = "prod-1"
        [node]
        id = "web-1.example"
        roles = ["worker"]
        [database]
        url = "postgresql+psycopg://app@db.internal:5432/qcluster"
        [coordination]
        backend = "zookeeper"
        zookeeper.hosts = ["zk1:2181", "zk2:2181", "[::1]:2181"]
        zookeeper.chroot = "/qcluster"
        [scheduler]
        timezone = "Europe/Berlin"
        poll_seconds = 0.05
        [worker]
        port = 9000
        tags = ["gpu", "zone:a"]
        [rpc]
        serializer = "json"
        [rpc.tls]
        cert = "c.pem"
        key = "k.pem"
        ca = "ca.pem"
        """
    )
    assert not s.is_embedded
    assert s.node.roles == ("worker",)
    assert s.coordination.zookeeper.hosts == ("zk1:2181", "zk2:2181", "[::1]:2181")
    assert s.scheduler.tzinfo().key == "Europe/Berlin"
    assert s.rpc.tls is not None and s.rpc.tls.cert == Path("c.pem")
    assert s.rpc.tls.require_client_cert is True


# --- errors -------------------------------------------------------------------------------


def test_unknown_key_suggests_the_near_one() -> None:
    assert error_of("[scheduler]\ntimezon = 'UTC'\n") == (
        "qcluster.toml: unknown key 'scheduler.timezon', did you mean 'scheduler.timezone'?"
    )


def test_unknown_key_in_the_wrong_table_points_to_the_right_one() -> None:
    assert error_of("[scheduler]\nheartbeat_seconds = 2\n").endswith(
        "did you mean 'worker.heartbeat_seconds'?"
    )


def test_unknown_key_without_a_near_one() -> None:
    assert error_of("[worker]\nzzzz = 1\n") == "qcluster.toml: unknown key 'worker.zzzz'"


def test_unknown_table_suggests_the_near_one() -> None:
    assert error_of("[schedular]\nx = 1\n") == (
        "qcluster.toml: unknown table 'schedular', did you mean 'scheduler'?"
    )


def test_out_of_range_value_names_key_bound_and_value() -> None:
    assert error_of("[scheduler]\nmisfire_grace_seconds = 0\n") == (
        "qcluster.toml: scheduler.misfire_grace_seconds: must be at least 1 (got 0)"
    )
    assert "worker.port: must be at most 65535 (got 70000)" in error_of("[worker]\nport = 70000")
    assert "scheduler.poll_seconds: must be at least 0.05" in error_of(
        "[scheduler]\npoll_seconds = 0"
    )


def test_wrong_types_are_not_coerced() -> None:
    assert error_of("[scheduler]\ncoalesce = 'yes'\n") == (
        "qcluster.toml: scheduler.coalesce: must be true or false (got string)"
    )
    assert "must be an integer (got float)" in error_of("[scheduler]\nbatch_size = 10.0\n")
    assert "must be an integer (got string)" in error_of("[worker]\nport = '80'\n")
    assert "scheduler: must be a table (got integer)" in error_of("scheduler = 5\n")
    assert "worker.tags: must be an array (got string)" in error_of("[worker]\ntags = 'a'\n")


def test_integer_is_accepted_for_a_float_setting() -> None:
    assert load("[runs]\nretention_days = 3\n").runs.retention_days == 3.0


def test_nan_and_inf_are_refused() -> None:
    assert "must be a finite number" in error_of("[worker]\nheartbeat_seconds = nan\n")
    assert "must be a finite number" in error_of("[runs]\nretention_days = inf\n")


def test_a_retry_backoff_bound_below_the_backoff_is_refused() -> None:
    assert error_of("[scheduler]\nretry_max_backoff_seconds = 1\n") == (
        "qcluster.toml: scheduler.retry_max_backoff_seconds: must be at least "
        "scheduler.retry_backoff_seconds (10)")
    assert load("[scheduler]\nretry_backoff_seconds = 1\nretry_max_backoff_seconds = 1\n"
                ).scheduler.retry_max_backoff_seconds == 1


def test_several_problems_are_reported_on_one_line() -> None:
    message = error_of("[worker]\nport = -1\nconcurrency = 0\n")
    assert message == (
        "qcluster.toml: worker.port: must be at least 0 (got -1); "
        "worker.concurrency: must be at least 1 (got 0)"
    )


def test_toml_syntax_error_names_the_line() -> None:
    message = error_of("[cluster]\nname = 'a'\nname = \n")
    assert re.fullmatch(r"qcluster\.toml: line 3: invalid TOML: .+", message), message


def test_missing_file_names_the_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(Path("/nope.toml"), NO_ENV)
    assert str(info.value) == "/nope.toml: cannot read config: No such file or directory"


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "q.toml"
    path.write_bytes(b"\xff\xfe[")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(path, NO_ENV)


def test_unknown_time_zone() -> None:
    assert error_of("[scheduler]\ntimezone = 'Mars/Olympus'\n") == (
        "qcluster.toml: scheduler.timezone: unknown time zone 'Mars/Olympus'"
    )
    assert "unknown time zone" in error_of("[scheduler]\ntimezone = '../etc/passwd'\n")


def test_bad_backend_lists_the_valid_ones() -> None:
    assert error_of("[coordination]\nbackend = 'etcd'\n") == (
        "qcluster.toml: coordination.backend: must be 'dblock', 'zookeeper' or 'redis' (got 'etcd')"
    )


def test_zookeeper_backend_needs_hosts() -> None:
    assert error_of("[coordination]\nbackend = 'zookeeper'\n") == (
        "qcluster.toml: coordination.zookeeper.hosts: must list at least one server "
        "when coordination.backend is 'zookeeper'"
    )


def test_redis_backend_needs_urls() -> None:
    assert "coordination.redis.urls: must list at least one server" in error_of(
        "[coordination]\nbackend = 'redis'\n"
    )


def test_redis_urls_must_be_redis_urls_and_errors_hide_passwords() -> None:
    message = error_of("[coordination.redis]\nurls = ['redis://h', 'http://u:hunter2@h']\n")
    assert "coordination.redis.urls[1]: must be a redis:// or rediss:// URL" in message
    assert "hunter2" not in message


def test_zookeeper_values_are_checked() -> None:
    assert "hosts[1]: must be 'host' or 'host:port'" in error_of(
        "[coordination.zookeeper]\nhosts = ['zk:2181', 'two hosts']\n"
    )
    assert "chroot: must be empty or a path starting with '/'" in error_of(
        "[coordination.zookeeper]\nchroot = 'qcluster'\n"
    )
    message = error_of("[coordination.zookeeper]\nauth = 'hunter2'\n")
    assert message.endswith("coordination.zookeeper.auth: must be 'user:password'")
    assert "hunter2" not in message


def _zk(text: str) -> Settings:
    return load(f"[coordination]\nbackend = 'zookeeper'\n[coordination.zookeeper]\n{text}\n")


@pytest.mark.parametrize(
    ("hosts", "servers", "chroot"),
    [
        ("zk1:2181,zk2:2181/chroot", ("zk1:2181", "zk2:2181"), "/chroot"),
        ("zk1:2181,zk2:2181", ("zk1:2181", "zk2:2181"), ""),
        ("zk1", ("zk1",), ""),
        ("[::1]:2181,zk-2.example:65535/apps/qc/", ("[::1]:2181", "zk-2.example:65535"),
         "/apps/qc"),
        ("zk1:2181/", ("zk1:2181",), ""),
    ],
)
def test_zookeeper_hosts_may_be_kazoos_one_string(
    hosts: str, servers: tuple[str, ...], chroot: str
) -> None:
    zk = _zk(f"hosts = {json.dumps(hosts)}").coordination.zookeeper
    assert (zk.hosts, zk.chroot) == (servers, chroot)
    shown = settings_to_public_dict(_zk(f"hosts = {json.dumps(hosts)}"))
    assert shown["coordination"]["zookeeper"]["hosts"] == list(servers)


def test_zookeeper_hosts_list_and_string_give_the_same_settings() -> None:
    as_list = _zk("hosts = ['zk1:2181', 'zk2:2181']\nchroot = '/qc'").coordination.zookeeper
    as_string = _zk("hosts = 'zk1:2181,zk2:2181/qc'").coordination.zookeeper
    assert as_list == as_string


def test_a_chroot_in_the_hosts_string_may_repeat_the_chroot_key() -> None:
    zk = _zk("hosts = 'zk1:2181/qc'\nchroot = '/qc/'").coordination.zookeeper
    assert zk.chroot == "/qc"
    # a string without a chroot leaves the chroot key alone
    assert _zk("hosts = 'zk1:2181'\nchroot = '/qc'").coordination.zookeeper.chroot == "/qc"


@pytest.mark.parametrize("chroot", ["/other", ""])
def test_a_chroot_in_the_hosts_string_that_disagrees_with_the_chroot_key_is_an_error(
    chroot: str,
) -> None:
    message = error_of(f"[coordination.zookeeper]\nhosts = 'zk1:2181/qc'\nchroot = '{chroot}'\n")
    assert message == (
        f"qcluster.toml: coordination.zookeeper.chroot: is '{chroot}' but "
        "coordination.zookeeper.hosts ends in the chroot '/qc'; give the chroot in one place"
    )


@pytest.mark.parametrize(
    ("hosts", "problem"),
    [
        ("", "must not be empty"),
        ("zk1:2181,,zk2:2181", "server 2 of 'zk1:2181,,zk2:2181' is empty"),
        (",zk1:2181", "server 1 of ',zk1:2181' is empty"),
        ("zk1:2181,", "server 2 of 'zk1:2181,' is empty"),
        ("/qc", "names no server before its chroot"),
        ("zk1:abc", "server 1 of 'zk1:abc': port must be a number from 1 to 65535"),
        ("zk1:", "port must be a number from 1 to 65535"),
        ("zk1:0", "port must be a number from 1 to 65535"),
        ("zk1:2181,zk2:65536", "server 2 of 'zk1:2181,zk2:65536': port must be a number"),
        ("zk1:123456", "port must be a number from 1 to 65535"),
        ("zk1:2181:2182", "port must be a number from 1 to 65535"),
        ("zk!:2181", "server 1 of 'zk!:2181': must be 'host' or 'host:port'"),
        ("zk1:2181//qc", "chroot must be an absolute path"),
        ("zk1:2181/qc//x", "chroot must be an absolute path"),
        ("zk1:2181/qc/../x", "chroot must be an absolute path"),
        ("zk1:2181/./qc", "chroot must be an absolute path"),
        ("zk1:2181, zk2:2181", "must not contain whitespace"),
        (" zk1:2181", "must not contain whitespace"),
        ("zk1:2181 ", "must not contain whitespace"),
        ("zk1:2181/q c", "must not contain whitespace"),
        ("zk1:2181\\t", "must not contain whitespace"),
    ],
)
def test_a_malformed_hosts_string_is_a_one_line_error_naming_the_key(
    hosts: str, problem: str
) -> None:
    message = error_of(f"[coordination.zookeeper]\nhosts = \"{hosts}\"\n")
    assert message.startswith("qcluster.toml: coordination.zookeeper.hosts: "), message
    assert problem in message


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ("zk1:0", "port must be a number from 1 to 65535"),
        ("zk1:65536", "port must be a number from 1 to 65535"),
        ("zk1:x", "port must be a number from 1 to 65535"),
        ("", "must be 'host' or 'host:port'"),
        ("zk1:2181/qc", "must be one 'host' or 'host:port'"),
        ("zk1:2181,zk2:2181", "must be one 'host' or 'host:port'"),
    ],
)
def test_every_item_of_a_hosts_list_is_one_server(item: str, problem: str) -> None:
    message = error_of(f"[coordination.zookeeper]\nhosts = ['zk0:2181', '{item}']\n")
    assert message.startswith("qcluster.toml: coordination.zookeeper.hosts[1]: "), message
    assert problem in message


def test_hosts_must_be_a_list_or_a_string() -> None:
    assert error_of("[coordination.zookeeper]\nhosts = 2181\n") == (
        "qcluster.toml: coordination.zookeeper.hosts: must be an array of 'host:port' or one "
        "string 'host:port,host:port/chroot' (got integer)"
    )


@pytest.mark.parametrize(
    ("chroot", "problem"),
    [
        ("qc", "must be empty or a path starting with '/'"),
        ("/qc//x", "must be an absolute path"),
        ("/qc/..", "must be an absolute path"),
        ("/q c", "must not contain whitespace"),
    ],
)
def test_a_malformed_chroot_is_an_error(chroot: str, problem: str) -> None:
    message = error_of(f"[coordination.zookeeper]\nchroot = '{chroot}'\n")
    assert message.startswith("qcluster.toml: coordination.zookeeper.chroot: "), message
    assert problem in message


def test_a_chroot_keeps_no_trailing_slash() -> None:
    assert _zk("hosts = ['zk1']\nchroot = '/qc/'").coordination.zookeeper.chroot == "/qc"
    assert _zk("hosts = ['zk1']\nchroot = '/'").coordination.zookeeper.chroot == ""


def test_roles_are_a_non_empty_subset() -> None:
    assert "node.roles[0]: must be 'scheduler' or 'worker' (got 'cook')" in error_of(
        "[node]\nroles = ['cook']\n"
    )
    assert "node.roles: must not be empty" in error_of("[node]\nroles = []\n")
    assert "node.roles: must not repeat a role" in error_of("[node]\nroles = ['worker', 'worker']")


def test_names_must_be_safe_identifiers() -> None:
    assert "cluster.name: must be 1-64 letters" in error_of("[cluster]\nname = 'a b'\n")
    assert "cluster.name" in error_of("[cluster]\nname = ''\n")
    assert "node.id" in error_of("[node]\nid = '../x'\n")
    assert "worker.tags[0]" in error_of("[worker]\ntags = ['a b']\n")


def test_heartbeat_must_be_shorter_than_member_timeout() -> None:
    assert error_of("[worker]\nheartbeat_seconds = 10\n") == (
        "qcluster.toml: worker.heartbeat_seconds: must be less than "
        "cluster.member_timeout_seconds (10.0)"
    )


def test_tls_table_needs_all_three_files() -> None:
    assert error_of("[rpc.tls]\ncert = 'c.pem'\n") == (
        "qcluster.toml: rpc.tls.key: required key is missing; rpc.tls.ca: required key is missing"
    )


def test_exclusive_pairs() -> None:
    assert error_of(f"[rpc]\nsecret = '{LONG}'\nsecret_file = 'f'\n") == (
        "qcluster.toml: rpc: secret and secret_file are exclusive (set one)"
    )
    assert error_of("[database]\nurl = 'sqlite://'\nurl_file = 'f'\n") == (
        "qcluster.toml: database: url and url_file are exclusive (set one)"
    )


def test_unknown_database_scheme_is_named() -> None:
    message = error_of("[database]\nurl = 'mysql://root:hunter2@h/db'\n")
    assert message == (
        "qcluster.toml: database.url: unsupported database 'mysql' (use sqlite or postgresql)"
    )
    assert "database.url: must be a URL" in error_of("[database]\nurl = 'qcluster.db'\n")


def test_errors_never_chain_pydantic_text() -> None:
    with pytest.raises(ConfigError) as info:
        load("[database]\nurl = 'mysql://root:hunter2@h/db'\n")
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# --- database -----------------------------------------------------------------------------


def test_postgresql_url_is_rewritten_to_psycopg() -> None:
    s = load("[database]\nurl = 'postgresql://user:pw@host/db'\n")
    assert s.database_url() == "postgresql+psycopg://user:pw@host/db"
    assert s.database.dialect == "postgresql"
    assert not s.is_embedded


def test_explicit_postgresql_driver_is_kept() -> None:
    s = load("[database]\nurl = 'postgresql+psycopg://h/db'\n")
    assert s.database_url() == "postgresql+psycopg://h/db"


def test_url_file_supplies_the_url(tmp_path: Path) -> None:
    url_file = write_private(tmp_path / "db-url", "postgresql://app:hunter2@db/q\n")
    s = load(f"[database]\nurl_file = {json.dumps(str(url_file))}\n")
    assert s.database_url() == "postgresql+psycopg://app:hunter2@db/q"
    assert s.database.url_file == url_file


def test_missing_url_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert error_of(f"[database]\nurl_file = {json.dumps(str(missing))}\n") == (
        f"qcluster.toml: database.url_file: cannot read {missing}: No such file or directory"
    )


# --- secrets ------------------------------------------------------------------------------

SECRET_CONFIG = """
[database]
url = "postgresql://user:hunter2@host/db"
[coordination.zookeeper]
auth = "zkuser:zkhunter2"
[coordination.redis]
urls = ["redis://:redhunter2@r1:6379/0", "rediss://u:redhunter3@r2"]
[rpc]
secret = "rpchunter2-is-at-least-32-bytes-long"
"""
SECRETS = ("hunter2", "zkhunter2", "redhunter2", "redhunter3", "rpchunter2")


def test_secrets_never_appear_in_repr_str_or_dumps() -> None:
    s = load(SECRET_CONFIG)
    texts = [
        repr(s),
        str(s),
        repr(s.model_dump()),
        str(s.model_dump()),
        s.model_dump_json(),
        json.dumps(settings_to_public_dict(s)),
        repr(s.database),
        str(s.database.url),
    ]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text
    assert "postgresql+psycopg://user:***@host/db" in repr(s)


def test_real_secret_values_are_reachable() -> None:
    s = load(SECRET_CONFIG)
    assert s.database_url() == "postgresql+psycopg://user:hunter2@host/db"
    assert s.rpc_secret() == "rpchunter2-is-at-least-32-bytes-long"
    auth = s.coordination.zookeeper.auth
    assert auth is not None and auth.get_secret_value() == "zkuser:zkhunter2"
    assert s.coordination.redis.urls[0].get_secret_value() == "redis://:redhunter2@r1:6379/0"


def test_public_dict_masks_secrets_and_shows_everything_else() -> None:
    d = settings_to_public_dict(load(SECRET_CONFIG))
    assert d["rpc"]["secret"] == "***"
    assert d["coordination"]["zookeeper"]["auth"] == "***"
    assert d["database"]["url"] == "postgresql+psycopg://user:***@host/db"
    assert d["coordination"]["redis"]["urls"] == ["redis://:***@r1:6379/0", "rediss://u:***@r2"]
    empty = settings_to_public_dict(load("[rpc.tls]\ncert = 'c'\nkey = 'k'\nca = 'a'\n"))
    assert empty["rpc"]["secret"] == ""
    assert empty["coordination"]["zookeeper"]["auth"] == ""
    assert empty["rpc"]["tls"]["cert"] == "c"
    assert empty["worker"]["tags"] == []
    json.dumps(empty)  # plain data only
    # A list of tables ([[web.users]]) is one value in the dict, its fields in the keys.
    assert tuple(_flatten(empty)) == tuple(dict.fromkeys(
        re.sub(r"^(web\.(users|tokens))\..*", r"\1", key) for key in config_keys()))


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in d.items():
        out += _flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k]
    return out


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://user:pw@host/db", "postgresql://user:***@host/db"),
        ("redis://:pw@host:6379/0", "redis://:***@host:6379/0"),
        ("postgresql://u:p@ss/w@rd@host/db", "postgresql://u:***@host/db"),
        (
            "postgresql://host/db?user=u&password=pw&x=1",
            "postgresql://host/db?user=u&password=***&x=1",
        ),
        ("postgresql://user@host:5432/db", "postgresql://user@host:5432/db"),
        ("sqlite:////tmp/a@b.db", "sqlite:////tmp/a@b.db"),
        ("sqlite:///qcluster.db", "sqlite:///qcluster.db"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_env_secret_overrides_config_secret_and_file(tmp_path: Path) -> None:
    from_env = "from-env-" + LONG
    env = {"QCLUSTER_RPC_SECRET": from_env}
    assert load(f"[rpc]\nsecret = '{LONG}'\n", env).rpc_secret() == from_env
    s = load("[rpc]\nsecret_file = '/does/not/exist'\n", env)
    assert s.rpc_secret() == from_env
    assert s.rpc.secret_file is None
    assert load_settings(None, env).rpc_secret() == from_env
    assert from_env not in repr(s)


def test_empty_env_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="QCLUSTER_RPC_SECRET is set but empty"):
        load("", {"QCLUSTER_RPC_SECRET": ""})


def test_secret_file_is_read_when_asked(tmp_path: Path) -> None:
    secret_file = write_private(tmp_path / "secret", LONG + "\n")
    s = load(f"[rpc]\nsecret_file = {json.dumps(str(secret_file))}\n")
    assert s.rpc_secret() == LONG
    assert s.rpc.secret_file == secret_file


def test_missing_or_empty_secret_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    s = load(f"[rpc]\nsecret_file = {json.dumps(str(missing))}\n")
    with pytest.raises(ConfigError, match=r"^qcluster\.toml: rpc\.secret_file: cannot read "):
        s.rpc_secret()
    write_private(tmp_path / "empty", "\n")
    s = load(f"[rpc]\nsecret_file = {json.dumps(str(tmp_path / 'empty'))}\n")
    with pytest.raises(ConfigError, match="file is empty"):
        s.rpc_secret()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_world_readable_file_with_a_secret_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "q.toml"
    path.write_text(f"[rpc]\nsecret = 'hunter2{LONG}'\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="qcluster.settings.loading"):
        load_settings(path, NO_ENV)
        load_settings(path, NO_ENV)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "rpc.secret" in warnings[0].getMessage()
    assert "hunter2" not in warnings[0].getMessage()


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_private_file_or_file_without_secrets_does_not_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    private = tmp_path / "private.toml"
    private.write_text(f"[rpc]\nsecret = 'hunter2{LONG}'\n")
    private.chmod(0o600)
    public = tmp_path / "public.toml"
    public.write_text("[database]\nurl = 'postgresql://user@host/db'\n")
    public.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="qcluster.settings.loading"):
        load_settings(private, NO_ENV)
        load_settings(public, NO_ENV)
    assert not caplog.records


# --- allow list ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "patterns", "allowed"),
    [
        ("jobs.examples:hello", ["jobs.*"], True),
        ("jobs.a.b:run", ["jobs.*"], True),
        ("jobs:run", ["jobs.*"], False),  # the package itself is not "under" jobs
        ("jobs:run", ["jobs"], True),
        ("jobsevil:run", ["jobs.*"], False),
        ("os:system", ["jobs.*"], False),
        ("jobs.examples:hello", ["jobs.examples:hello"], True),
        ("jobs.examples:other", ["jobs.examples:hello"], False),
        ("jobs.examples:other", ["jobs.examples:*"], True),
        ("jobs.examples:hello", ["jobs.examples"], True),
        ("jobs.Examples:hello", ["jobs.examples"], False),  # case-sensitive
        ("jobs.examples:hello", [], False),
        ("jobs.examples:hello", ["*"], True),
        # Shapes that are refused whatever the patterns:
        ("jobs.examples:os.system", ["*"], False),
        ("jobs.examples:_private", ["*"], False),
        ("jobs.examples:__import__", ["*"], False),
        ("jobs.examples", ["*"], False),
        ("jobs..x:f", ["*"], False),
        (":f", ["*"], False),
        ("jobs.x:f:g", ["*"], False),
        ("jobs.x:f\n", ["*"], False),
    ],
)
def test_allow_list(ref: str, patterns: list[str], allowed: bool) -> None:
    assert is_allowed(ref, patterns) is allowed


def test_jobs_settings_allows_uses_the_configured_patterns() -> None:
    s = load("[jobs]\nallow = ['jobs.*', 'mypkg.tasks:nightly']\n")
    assert s.jobs.allows("mypkg.tasks:nightly")
    assert not s.jobs.allows("mypkg.tasks:other")


def test_bad_allow_pattern_is_a_config_error() -> None:
    assert "jobs.allow[0]: must be a glob" in error_of("[jobs]\nallow = ['jobs.* ; rm']\n")


# --- the example file ---------------------------------------------------------------------


def _example_keys() -> list[str]:
    """Dotted keys set or shown commented out in the example, under their table."""
    keys, table = [], ""
    for line in EXAMPLE.read_text().splitlines():
        if m := re.fullmatch(r"#?\s*\[\[?([\w.]+)\]\]?\s*", line):
            table = m.group(1)
        elif m := re.fullmatch(r"#?\s*([\w.]+)\s*=.*", line):
            keys.append(f"{table}.{m.group(1)}" if table else m.group(1))
    return keys


def test_example_file_parses_to_the_defaults() -> None:
    s = load_settings(EXAMPLE, NO_ENV)
    assert settings_to_public_dict(s) == settings_to_public_dict(load_settings(None, NO_ENV))


def test_example_file_lists_every_setting_once() -> None:
    listed = _example_keys()
    assert sorted(listed) == sorted(config_keys())


def test_example_file_commented_out_values_are_valid(tmp_path: Path) -> None:
    """Uncommenting every setting gives a valid file (minus files that must exist)."""
    text = EXAMPLE.read_text()
    text = re.sub(r"(?m)^# ((\[\[?[\w.]+\]\]?)|(\w+ = .*))$", r"\1", text)
    text = re.sub(r"(?m)^url_file = .*$", "", text)  # read at load; exclusive with url
    text = re.sub(r"(?m)^secret_file = .*$", "", text)  # exclusive with secret
    s = load(text)
    assert s.rpc.tls is not None
    assert s.node.id == "node-1"
    assert [u.role for u in s.web.users] == ["operator"] and s.web.tokens[0].name == "wallboard"


def test_every_setting_has_a_comment_above_it() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.fullmatch(r"#?\s*\w+\s*=.*", line):
            above = lines[i - 1]
            assert above.startswith("# ") and not re.match(r"#\s*\w+\s*=", above), line


# --- robustness ---------------------------------------------------------------------------

_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["UTC", "zookeeper", "redis", "sqlite:///x.db", "redis://h", "/", "."]),
    st.datetimes(),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3), max_leaves=5)
_known = sorted({part for key in config_keys() for part in key.split(".")})
_keys = st.sampled_from(_known) | st.text(max_size=8)
_tables = st.dictionaries(_keys, _values | st.dictionaries(_keys, _values, max_size=3), max_size=4)
_documents = st.dictionaries(_keys, _tables | _values, max_size=4)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_documents)
def test_random_documents_raise_only_config_error(data: dict[str, Any]) -> None:
    text = toml_dumps(data)
    try:
        load_settings_from_mapping(data, "x.toml", NO_ENV)
    except ConfigError as e:
        assert "\n" not in str(e)
    try:
        load(text)
    except ConfigError as e:
        assert "\n" not in str(e)
        assert "invalid TOML" not in str(e)  # the generator writes valid TOML


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_random_text_raises_only_config_error(text: str) -> None:
    try:
        load(text)
    except ConfigError as e:
        assert "\n" not in str(e)


# --- [jobs] paths -------------------------------------------------------------------------


def _jobs_paths_config(directory: Path, paths: list[str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "qcluster.toml"
    config.write_text(f"[jobs]\npaths = {json.dumps(paths)}\n")
    return config


def test_jobs_paths_default_to_none() -> None:
    assert load("").jobs.paths == ()


def test_relative_jobs_paths_are_relative_to_the_config_file_not_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for d in ("tasks", "more", "elsewhere/tasks"):
        (tmp_path / d).mkdir(parents=True)
    config = _jobs_paths_config(tmp_path / "etc", ["../tasks", str(tmp_path / "more"), "../tasks"])
    monkeypatch.chdir(tmp_path / "elsewhere")
    expected = (tmp_path / "tasks", tmp_path / "more", tmp_path / "tasks")  # order as given
    assert load_settings(config, NO_ENV).jobs.paths == expected
    # A config named by a relative path: relative to where that file is, still.
    assert load_settings(Path("../etc/qcluster.toml"), NO_ENV).jobs.paths == expected
    shown = settings_to_public_dict(load_settings(config, NO_ENV))["jobs"]["paths"]
    assert shown == [str(p) for p in expected]


@pytest.mark.parametrize(("entry", "problem"), [
    ("../nope", "does not exist ('../nope', relative to the config file)"),
    ("../a-file", "is not a directory ('../a-file', relative to the config file)"),
    ("", "must not be empty"),
])  # fmt: skip
def test_a_jobs_path_that_is_no_directory_is_a_one_line_error_naming_the_key(
    tmp_path: Path, entry: str, problem: str
) -> None:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "tasks").mkdir()
    config = _jobs_paths_config(tmp_path / "etc", [str(tmp_path / "tasks"), entry])
    with pytest.raises(ConfigError) as info:
        load_settings(config, NO_ENV)
    message = str(info.value)
    assert message.startswith(f"{config}: jobs.paths[1]: "), message
    assert message.endswith(problem) and "\n" not in message, message


def test_jobs_paths_must_be_an_array_of_strings() -> None:
    assert error_of("[jobs]\npaths = '/tmp'\n") == (
        "qcluster.toml: jobs.paths: must be an array (got string)")
    assert "jobs.paths[0]: must be a path string (got integer)" in error_of("[jobs]\npaths = [1]\n")
    assert "jobs.paths[0]: cannot use" in error_of('[jobs]\npaths = ["a\\u0000b"]\n')


# --- [worker] host ------------------------------------------------------------------------------


@pytest.mark.parametrize("host", [
    "127.0.0.1", "0.0.0.0", "10.0.0.5", "::1", "::", "fe80::1%eth0", "localhost",
    "node1", "node-1.example.com", "node1.example.com.", "1node.example", "a" * 63,
    ".".join(["a" * 63] * 3 + ["b" * 61]),
])  # fmt: skip
def test_worker_host_takes_an_ip_address_or_a_host_name(host: str) -> None:
    assert load(f"[worker]\nhost = {json.dumps(host)}\n").worker.host == host


@pytest.mark.parametrize("host", [
    "not a host!", "node_1", "-node", "node-", "a..b", ".", "node/1", "node:1",
    "10.0.0.256", "1.2.3", "1234", "a" * 64, ".".join(["a" * 63] * 4), "nöde",
    "127.0.0.1 ", "[::1]",
])  # fmt: skip
def test_worker_host_that_is_no_address_nor_host_name_is_a_one_line_error(host: str) -> None:
    message = error_of(f"[worker]\nhost = {json.dumps(host)}\n")
    assert message.startswith("qcluster.toml: worker.host: must be an IP address or a host "
                              "name such as 'node1.example.com' (got "), message
