"""The ``qcluster calendars`` command group (a typer sub-app that :mod:`qcluster.cli.main`
registers): exclusion calendars, the dates a job's ``--exclude`` skips."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qcluster.cli import output
from qcluster.cli.common import ConfigOpt, JsonOpt, client, print_json

calendars_app = typer.Typer(
    no_args_is_help=True,
    help="Exclusion calendars: dates on which the jobs that --exclude them do not run.")


@calendars_app.command("add")
def calendars_add(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The calendar's name.")],
    dates: Annotated[list[str] | None, typer.Option(
        "--dates", help="Dates and ranges: 2026-12-25,2026-12-24..2026-12-26; repeatable.",
    )] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", help="A file of dates: one date or range per line, # comments.")] = None,
    replace: Annotated[bool, typer.Option(
        help="Give an existing calendar these dates instead.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a calendar (or, with --replace, set its dates)."""
    done = client(config).add_calendar(name, dates or [], file=file, replace=replace)
    if as_json:
        print_json({"name": done.name, "status": done.status, "via": done.via})
    else:
        print(f"{done.status} calendar {done.name} (via {done.via})")


@calendars_app.command("list")
def calendars_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List the calendars."""
    found = client(config).calendars()
    if as_json:
        print_json(found)
    else:
        output.calendars_table(found)


@calendars_app.command("show")
def calendars_show(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a calendar's dates and the jobs that exclude it."""
    cal = client(config).calendar(name)
    if as_json:
        print_json(cal)
    else:
        output.calendar_detail(cal)


@calendars_app.command("remove")
def calendars_remove(
    name: Annotated[str, typer.Argument(metavar="NAME")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a calendar (refused while a job excludes it)."""
    done = client(config).remove_calendar(name)
    if as_json:
        print_json({"name": done.name, "status": done.status, "via": done.via})
    else:
        print(f"removed calendar {done.name} (via {done.via})")
