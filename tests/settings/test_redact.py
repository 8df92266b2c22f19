"""One URL redactor (``qcluster/settings/urls.redact_url``) behind every place that shows a
URL: ``SecretURL`` (``repr`` of the settings, ``config show``), ``Database.display_url``
(every database error, ``cluster status``, the demo, the node's log), the Redis backend's
``display_urls`` and ``repr``, and the benchmark report.

Before, there were three with different rules: SQLAlchemy's ``render_as_string`` in the
store (query passwords shown), ``urlsplit`` in the Redis backend (query passwords shown,
IPv6 brackets and the case of host names lost, everything after an unencoded ``#`` or
``?`` in a password dropped from the parsing), and the settings' own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backends.redis import RedisBackend
from qcluster.errors import DatabaseUnavailable
from qcluster.settings import (
    SecretURL,
    load_settings_from_mapping,
    redact_url,
    settings_to_public_dict,
)
from qcluster.store.db import Database
from tests.helpers import run_cli, write_config

SECRET = "s3cr3tPW"

# (url, what every place shows); SECRET is never shown.
CASES = [
    # no password
    ("postgresql+psycopg://db.example.com/qc", "postgresql+psycopg://db.example.com/qc"),
    ("postgresql+psycopg://db:5432/qc", "postgresql+psycopg://db:5432/qc"),
    ("redis://r1:6379/0", "redis://r1:6379/0"),
    ("sqlite:///qcluster.db", "sqlite:///qcluster.db"),
    ("sqlite:////tmp/a@b:c.db", "sqlite:////tmp/a@b:c.db"),
    # a user and no password
    ("postgresql+psycopg://app@db:5432/qc", "postgresql+psycopg://app@db:5432/qc"),
    ("redis://default@r1:6379/0", "redis://default@r1:6379/0"),
    # a user and a password
    (f"postgresql+psycopg://app:{SECRET}@db:5432/qc", "postgresql+psycopg://app:***@db:5432/qc"),
    (f"redis://:{SECRET}@r1:6379/0", "redis://:***@r1:6379/0"),
    (f"rediss://app:{SECRET}@R1.Example.com", "rediss://app:***@R1.Example.com"),
    # special characters, encoded or not
    (f"postgresql+psycopg://app:{SECRET}%40%2F%3A%23@db/qc", "postgresql+psycopg://app:***@db/qc"),
    (f"postgresql+psycopg://us%40er:{SECRET}@db/qc", "postgresql+psycopg://us%40er:***@db/qc"),
    (f"postgresql+psycopg://app:{SECRET}@x/y@db/qc", "postgresql+psycopg://app:***@db/qc"),
    (f"postgresql+psycopg://app:a:{SECRET}@db/qc", "postgresql+psycopg://app:***@db/qc"),
    (f"postgresql+psycopg://app:{SECRET}?x@db/qc", "postgresql+psycopg://app:***@db/qc"),
    (f"redis://:{SECRET}#x@r1:6379/0", "redis://:***@r1:6379/0"),
    (f"redis://:{SECRET}/x@r1:6379/0", "redis://:***@r1:6379/0"),
    # IPv6 hosts
    ("postgresql+psycopg://[::1]:5432/qc", "postgresql+psycopg://[::1]:5432/qc"),
    (f"postgresql+psycopg://app:{SECRET}@[::1]:5432/qc",
     "postgresql+psycopg://app:***@[::1]:5432/qc"),
    ("redis://[fe80::1]:6379/0", "redis://[fe80::1]:6379/0"),
    (f"redis://:{SECRET}@[2001:db8::7]:6379/0", "redis://:***@[2001:db8::7]:6379/0"),
    # passwords in the query
    (f"postgresql+psycopg://db/qc?password={SECRET}", "postgresql+psycopg://db/qc?password=***"),
    (f"postgresql+psycopg://db/qc?user=app&password={SECRET}&sslmode=require",
     "postgresql+psycopg://db/qc?user=app&password=***&sslmode=require"),
    (f"postgresql+psycopg://db/qc?PassWord={SECRET}", "postgresql+psycopg://db/qc?PassWord=***"),
    (f"postgresql+psycopg://db/qc?pass%77ord={SECRET}",
     "postgresql+psycopg://db/qc?pass%77ord=***"),
    (f"postgresql+psycopg://db/qc?password={SECRET}#;x&a=1",
     "postgresql+psycopg://db/qc?password=***&a=1"),
    (f"postgresql+psycopg://db/qc?sslkey=/etc/qc/client.key&sslpassword={SECRET}",
     "postgresql+psycopg://db/qc?sslkey=/etc/qc/client.key&sslpassword=***"),
    ("postgresql+psycopg://db/qc?sslkey=/etc/qc/client.key&sslcert=/etc/qc/c.pem",
     "postgresql+psycopg://db/qc?sslkey=/etc/qc/client.key&sslcert=/etc/qc/c.pem"),
    (f"postgresql+psycopg://app:{SECRET}@db/qc?application_name=n@h&pwd={SECRET}",
     "postgresql+psycopg://app:***@db/qc?application_name=n@h&pwd=***"),
    (f"redis://r1:6379/0?password={SECRET}", "redis://r1:6379/0?password=***"),
    (f"rediss://app:{SECRET}@[::1]:6380/1?password={SECRET}&ssl_cert_reqs=none",
     "rediss://app:***@[::1]:6380/1?password=***&ssl_cert_reqs=none"),
    # not a URL: shown as it is
    ("not a url", "not a url"),
]
REDIS = [c for c in CASES if c[0].startswith(("redis://", "rediss://"))]
DATABASE = [c for c in CASES if c[0].startswith(("postgresql", "sqlite"))]


@pytest.mark.parametrize(("url", "shown"), CASES)
def test_redact_url_and_secret_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert str(SecretURL(url)) == shown
    assert repr(SecretURL(url)) == f"SecretURL({shown!r})"
    assert SecretURL(url).has_password is (shown != url)
    assert redact_url(shown) == shown  # what is shown shows nothing more when redacted again


@pytest.mark.parametrize(("url", "shown"), DATABASE)
def test_the_database_shows_the_same(url: str, shown: str) -> None:
    try:
        db = Database(url)
    except DatabaseUnavailable as e:  # SQLAlchemy cannot parse it: the message shows it
        assert str(e) == f"invalid database URL {shown}"
        return
    try:
        assert db.display_url == shown
    finally:
        db.engine.dispose()


def test_the_database_names_an_unparsable_url_without_its_password() -> None:
    with pytest.raises(DatabaseUnavailable) as info:
        Database(f"postgresql+psycopg://app:{SECRET}@db:notaport/qc")
    assert str(info.value) == "invalid database URL postgresql+psycopg://app:***@db:notaport/qc"


@pytest.mark.parametrize(("url", "shown"), REDIS)
def test_the_redis_backend_shows_the_same(url: str, shown: str) -> None:
    backend = RedisBackend([url], cluster="c")
    assert backend.display_urls == [shown]
    assert repr(backend) == f"<RedisBackend urls={[shown]}>"


def test_settings_and_config_show_show_the_same() -> None:
    for url, shown in DATABASE:
        s = load_settings_from_mapping({"database": {"url": url}}, "q.toml", {})
        assert settings_to_public_dict(s)["database"]["url"] == shown
        assert SECRET not in repr(s)
    urls = [url for url, _ in REDIS]
    s = load_settings_from_mapping({"coordination": {"redis": {"urls": urls}}}, "q.toml", {})
    assert settings_to_public_dict(s)["coordination"]["redis"]["urls"] == [sh for _, sh in REDIS]
    assert SECRET not in repr(s)


def test_the_benchmark_report_shows_the_same() -> None:
    from bench.common import redact

    for url, shown in CASES:
        assert redact(url) == shown


def test_config_show_on_the_command_line(tmp_path: Path) -> None:
    url = f"postgresql://app:{SECRET}@[::1]:5432/qc?sslkey=/k.pem&password={SECRET}"
    redis = f"redis://:{SECRET}@[::1]:6379/0"
    config = write_config(tmp_path, url, coordination={"redis": {"urls": [redis]}})
    done = run_cli("config", "show", "--json", config=config)
    assert SECRET not in done.stdout + done.stderr
    shown = json.loads(done.stdout)
    assert shown["database"]["url"] == (
        "postgresql+psycopg://app:***@[::1]:5432/qc?sslkey=/k.pem&password=***")
    assert shown["coordination"]["redis"]["urls"] == ["redis://:***@[::1]:6379/0"]
