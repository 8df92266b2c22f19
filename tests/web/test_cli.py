"""The dashboard's commands and settings from outside (issue 17, item 4): ``qcluster
web`` refuses to serve an open dashboard, ``config hash-password`` makes the hashes
``[web]`` holds, and a bad ``[web]`` is one line and a non-zero exit."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from qcluster.settings.passwords import verify
from tests.helpers import cli_env, qcluster_command, run_cli, write_config
from tests.servers.base import free_port
from tests.web.conftest import HASH


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def hash_from_stdin(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(qcluster_command("config", "hash-password"), input=text,
                          capture_output=True, text=True, env=cli_env(None), timeout=60,
                          check=False)


def test_web_without_users_or_tokens_refuses_to_serve(tmp_path: Path,
                                                      sqlite_url: str) -> None:
    config = write_config(tmp_path, sqlite_url)
    line = one_line_error(run_cli("web", "--port", str(free_port()), config=config,
                                  check=False))
    assert "users" in line and "tokens" in line


def test_web_on_a_public_address_without_tls_is_refused(tmp_path: Path,
                                                        sqlite_url: str) -> None:
    config = write_config(tmp_path, sqlite_url, web={
        "users": [{"name": "ops", "password_hash": HASH, "role": "operator"}]})
    line = one_line_error(run_cli("web", "--host", "0.0.0.0", "--port", str(free_port()),
                                  config=config, check=False))
    assert "tls" in line.lower()


def test_hash_password_reads_one_line_and_refuses_a_short_one() -> None:
    made = hash_from_stdin("a long enough password\n")
    assert made.returncode == 0, made.stderr
    value = made.stdout.strip().removeprefix('password_hash = "').removesuffix('"')
    assert verify("a long enough password", value)
    assert not verify("another password here", value)
    assert "12 characters" in one_line_error(hash_from_stdin("short\n"))


def test_a_new_token_is_printed_with_a_hash_that_verifies_it() -> None:
    made = subprocess.run(qcluster_command("config", "hash-password", "--new-token"),
                          capture_output=True, text=True, env=cli_env(None), timeout=60,
                          check=False)
    assert made.returncode == 0, made.stderr
    token_line, hash_line = made.stdout.strip().splitlines()
    token = token_line.rsplit(" ", 1)[1]
    assert verify(token, hash_line.split('"')[1])


@pytest.mark.parametrize(("web", "expected"), [
    ({"users": [{"name": "ops", "password_hash": "plain-text", "role": "operator"}]},
     "password_hash"),
    ({"users": [{"name": "ops", "password_hash": HASH, "role": "admin"}]}, "role"),
    ({"users": [{"name": "ops", "password_hash": HASH},
                {"name": "ops", "password_hash": HASH}]}, "ops"),
    ({"tls_cert": "/nonexistent.pem"}, "tls_key"),
    ({"refresh_seconds": 0.1}, "refresh_seconds"),
    ({"allowed_hosts": ["evil example"]}, "allowed_hosts"),
    ({"trusted_proxies": ["10.0.0.0/33"]}, "trusted_proxies"),
    ({"trusted_proxies": ["0.0.0.0/0"]}, "trusts too much"),
    ({"trusted_proxies": ["::/0"]}, "trusts too much"),
    ({"port": 70000}, "port"),
])
def test_config_check_refuses_a_bad_web_section_in_one_line(
        tmp_path: Path, sqlite_url: str, web: dict[str, Any], expected: str) -> None:
    config = write_config(tmp_path, sqlite_url, web=web)
    assert expected in one_line_error(run_cli("config", "check", config=config,
                                              check=False))


def test_config_check_refuses_a_web_port_in_use(tmp_path: Path, sqlite_url: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write_config(tmp_path, sqlite_url, web={
            "port": taken.getsockname()[1],
            "users": [{"name": "ops", "password_hash": HASH, "role": "viewer"}]})
        line = one_line_error(run_cli("config", "check", config=config, check=False))
    assert "web" in line.lower()


def test_tls_files_that_do_not_load_are_refused_before_serving(tmp_path: Path,
                                                               sqlite_url: str) -> None:
    """They passed ``config check``, and ``qcluster start`` ran on with a traceback in the
    dashboard's thread and no dashboard."""
    cert = tmp_path / "web.crt"
    key = tmp_path / "web.key"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n"
                    "-----END CERTIFICATE-----\n")
    key.write_text("not a key\n")
    key.chmod(0o600)
    config = write_config(tmp_path, sqlite_url, web={
        "port": free_port(), "tls_cert": str(cert), "tls_key": str(key),
        "users": [{"name": "ops", "password_hash": HASH, "role": "operator"}]})
    for command in (("config", "check"), ("web",), ("start",)):
        line = one_line_error(run_cli(*command, config=config, check=False, timeout=60))
        assert "tls_cert" in line and "web.crt" in line, (command, line)


def test_help_texts_keep_their_config_section_names() -> None:
    """rich markup took ``[web]`` for a style and dropped it from the help."""
    from typer.main import get_command
    from typer.testing import CliRunner

    from qcluster.cli.main import app

    root = get_command(app)
    runner = CliRunner()

    def walk(command: Any, path: list[str]) -> Any:
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])

    sections = re.compile(r"\[\[?[a-z][a-z._]*\]\]?")  # [web], [[web.users]]
    seen = 0
    for path in walk(root, []):
        shown = " ".join(runner.invoke(app, [*path, "--help"], terminal_width=400)
                         .output.split())
        command = root
        for name in path:
            command = command.commands[name]
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        for text in texts:
            for section in sections.findall(text.replace("\\", "")):
                seen += 1
                assert section in shown, (path, section)
    assert seen >= 7
