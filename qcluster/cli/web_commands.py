"""``qcluster web`` (the dashboard as its own process) and ``qcluster config
hash-password`` (the hashes ``[web] users`` and ``tokens`` hold)."""

from __future__ import annotations

import getpass
import secrets
import sys
from typing import Annotated

import typer

from qcluster.cli.admin_commands import config_app
from qcluster.cli.common import ConfigOpt, settings, setup_logging
from qcluster.errors import InputError
from qcluster.settings.passwords import MAX_PASSWORD_BYTES, hash_password

MIN_PASSWORD_CHARS = 12


def web(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on (else \\[web] host).")]
    = None,
    port: Annotated[int | None, typer.Option(
        min=0, max=65535, help="Port (else \\[web] port, else 8321; 0: any free one).")] = None,
) -> None:
    """Serve the web dashboard (needs \\[web] users or tokens)."""
    from qcluster.settings.model import check_host
    from qcluster.web.server import DEFAULT_PORT, WebServer

    s = settings(config)
    if host is not None:
        try:
            check_host(host)
        except ValueError as e:
            raise InputError(f"invalid --host: {e}") from None
    chosen = port if port is not None else (s.web.port or DEFAULT_PORT)
    setup_logging()
    server = WebServer(s, host=host, port=chosen)
    print(f"qcluster web: serving the dashboard on {server.url}", flush=True)
    server.serve()


@config_app.command("hash-password")
def hash_password_command(
    new_token: Annotated[bool, typer.Option(
        "--new-token", help="Make a random token and print it with its hash.")] = False,
) -> None:
    """Print the hash of a password (read from the terminal, or one line of stdin) for
    \\[\\[web.users]] password_hash, or make a token for \\[\\[web.tokens]] token_hash."""
    if new_token:
        token = secrets.token_urlsafe(32)
        print(f"token (give it to its user; it is not stored): {token}")
        print(f"token_hash = \"{hash_password(token)}\"")
        return
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            raise InputError("the two passwords differ")
    else:
        password = sys.stdin.readline(MAX_PASSWORD_BYTES + 2).rstrip("\r\n")
    if len(password) < MIN_PASSWORD_CHARS:
        raise InputError(f"a password has at least {MIN_PASSWORD_CHARS} characters")
    if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
        raise InputError(f"a password has at most {MAX_PASSWORD_BYTES} bytes")
    print(f"password_hash = \"{hash_password(password)}\"")
