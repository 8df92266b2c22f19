"""The ``qcluster backend``, ``config`` and ``db`` command groups (typer sub-apps that
:mod:`qcluster.cli.main` registers): the coordination backend's status and migration, the
configuration's check and display, the schema's upgrade."""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated

import typer

from backends.names import BACKENDS
from qcluster.cli import output
from qcluster.cli.common import ConfigOpt, JsonOpt, client, print_json, settings
from qcluster.client import admin, moves
from qcluster.errors import InputError
from qcluster.settings import settings_to_public_dict

config_app = typer.Typer(no_args_is_help=True, help="Check and show the configuration.")
db_app = typer.Typer(no_args_is_help=True, help="The shared database's schema.")
backend_app = typer.Typer(no_args_is_help=True,
                          help="The coordination backend: status, and moving to another.")


# The choices of --to: one member per name of the one list (backends/names.py). mypy
# cannot see members made from a variable; the values are all the command reads.
BackendName = StrEnum("BackendName", [(n, n) for n in BACKENDS])  # type: ignore[misc]


@backend_app.command("status")
def backend_status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show the active backend, the migration phase, and which nodes honour it."""
    status = client(config).backend_status()
    if as_json:
        print_json(status)
    else:
        output.backend_view(status)


@backend_app.command("migrate")
def backend_migrate(
    to: Annotated[BackendName, typer.Option("--to", help="The backend to move to.")],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")]
    = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=1, max=86400, help="Seconds to wait for the move to finish.")] = 120.0,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move the running cluster to another backend, through a joint phase (or roll back)."""
    if not math.isfinite(timeout):
        raise InputError(f"invalid --timeout {timeout}: expected a number of seconds")
    s = settings(config)
    result = moves.migrate_backend(
        s, to.value, dry_run=dry_run, timeout=timeout,
        report=(lambda _line: None) if as_json else _report,
    )
    if as_json:
        print_json(result)
    elif dry_run:
        print(f"plan (dry run, nothing changed): the cluster runs {result['backend']} "
              f"(phase {result['phase']}, config version {result['config_version']})")
        for line in result["plan"]:
            print(f"  {line}")


def _report(line: str) -> None:
    print(line, flush=True)


@config_app.command("check")
def config_check(config: ConfigOpt = None) -> None:
    """Validate the configuration as `start` would (secret, TLS files, address) and reach
    the database."""
    from qcluster.node.preflight import check_node_config

    s = settings(config)
    check_node_config(s)
    if s.web.port:
        from qcluster.web.server import bind, check_web

        check_web(s)
        bind(s.web.host, s.web.port).close()  # free, and an address of this machine
    where = admin.check_database(s)
    print(f"ok: {s.source} is valid; database {where} answers")


@config_app.command("show")
def config_show(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show the effective configuration (secrets hidden)."""
    s = settings(config)
    data = settings_to_public_dict(s)
    if as_json:
        print_json(data)
    else:
        output.config_view(s.source, data)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Create or upgrade the qcluster tables."""
    revision = admin.upgrade_db(settings(config))
    print(f"database schema at revision {revision}")
