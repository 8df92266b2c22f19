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
    redact_text,
    redact_url,
    settings_to_public_dict,
    url_secrets,
)
from qcluster.store.db import Database
from tests.helpers import assert_cli_error, run_cli, write_config

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
    # an "@" in a query value: the user info runs to the last "@", so the host is hidden
    # too (the safe side of an ambiguity: it could be a password's "@")
    (f"postgresql+psycopg://app:{SECRET}@db/qc?application_name=n@h&pwd={SECRET}",
     "postgresql+psycopg://app:***@h&pwd=***"),
    ("postgresql+psycopg://db/qc?application_name=n@h", "postgresql+psycopg://db/qc?application_name=n@h"),
    # unencoded "@", "#" and "?" in a password, together
    (f"postgresql+psycopg://app:{SECRET}@x#y?z@db/qc", "postgresql+psycopg://app:***@db/qc"),
    (f"postgresql+psycopg://app:a@{SECRET}#b?c@db:5432/qc?sslmode=require",
     "postgresql+psycopg://app:***@db:5432/qc?sslmode=require"),
    (f"postgresql+psycopg://u@127.0.0.1:1/db?password={SECRET}",
     "postgresql+psycopg://u@127.0.0.1:1/db?password=***"),
    (f"postgresql+psycopg://db/qc?password=a@{SECRET}", "postgresql+psycopg://db/qc?password=***"),
    # every parameter named like a password, and not sslkey (a path)
    (f"postgresql+psycopg://db/qc?passwd={SECRET}&Secret={SECRET}&token={SECRET}&KEY={SECRET}"
     f"&api_key={SECRET}&access_token={SECRET}&sslkey=/k.pem",
     "postgresql+psycopg://db/qc?passwd=***&Secret=***&token=***&KEY=***&api_key=***"
     "&access_token=***&sslkey=/k.pem"),
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


# -- driver messages (issue 13, point 6) -------------------------------------------------------

#: A password with an unencoded "@", "#" and "?": SQLAlchemy takes "ter2#xyz" for the host,
#: and the driver names that host in its error.
SPLIT = "hun@ter2#xyz?abc"
PIECES = ("hunter2xyz", "hun", "ter2", "xyz", "abc")
UNREACHABLE = [
    "postgresql+psycopg://u@127.0.0.1:1/db?password=hunter2xyz",
    f"postgresql+psycopg://u:{SPLIT}@127.0.0.1:1/db",
    f"postgresql+psycopg://u@127.0.0.1:1/db?sslpassword={SPLIT}&sslmode=disable",
]


def test_every_piece_of_a_password_is_hidden_in_a_drivers_message() -> None:
    url = f"postgresql+psycopg://u:{SPLIT}@127.0.0.1:1/db"
    message = "failed to resolve host 'ter2#xyz': [Errno -2] Name or service not known"
    shown = redact_text(message, url_secrets(url))
    assert shown == "failed to resolve host '***': [Errno -2] Name or service not known"
    # Without knowing the URL: URLs and password=... pairs in the text are still hidden.
    text = (f"cannot connect to postgresql://u:{SECRET}@h/db (password={SECRET} "
            f"token='{SECRET} x' sslkey=/k.pem)")
    assert redact_text(text) == ("cannot connect to postgresql://u:***@h/db (password=*** "
                                 "token=*** sslkey=/k.pem)")


def test_the_database_hides_the_pieces_the_driver_shows() -> None:
    db = Database(f"postgresql+psycopg://u:{SPLIT}@127.0.0.1:1/db", connect_timeout=1)
    try:
        with pytest.raises(DatabaseUnavailable) as info, db.read():
            pass
    finally:
        db.dispose()
    message = str(info.value)
    assert message.startswith("database postgresql+psycopg://u:***@127.0.0.1:1/db unavailable")
    for piece in PIECES:
        assert piece not in message, message


@pytest.mark.parametrize("url", UNREACHABLE)
def test_no_piece_of_a_password_in_the_output_of_jobs_list_or_config_show(
    tmp_path: Path, url: str
) -> None:
    config = write_config(tmp_path, url)
    listed = run_cli("jobs", "list", config=config, check=False)
    assert_cli_error(listed, "unavailable", "127.0.0.1:1")
    results = [listed, run_cli("config", "show", config=config),
               run_cli("config", "show", "--json", config=config)]
    assert "127.0.0.1:1/db" in results[1].stdout
    for result in results:
        for piece in PIECES:
            assert piece not in result.stdout + result.stderr, (piece, result)
