"""The ``qcluster`` command. Thin: parse, call one library function, print.

One error funnel (:func:`main`): a :class:`~qcluster.errors.QClusterError` or a usage
error prints one ``error: ...`` line on stderr and exits non-zero; no traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, NoReturn

import typer

from qcluster import __version__
from qcluster.cli import output
from qcluster.cli.admin_commands import backend_app, config_app, db_app
from qcluster.cli.calendar_commands import calendars_app
from qcluster.cli.common import (
    DRIVER_LOGGERS,
    ConfigOpt,
    JsonOpt,
    client,
    print_json,
    root_config,
    settings,
    setup_logging,
)
from qcluster.cli.web_commands import web
from qcluster.client.api import Change
from qcluster.definitions.jobfile import parse_cli_value
from qcluster.errors import InputError, QClusterError
from qcluster.settings import NODE_ID_PATTERN, redact_text


def _click_exception(name: str) -> type[Exception]:
    """Click's exception class ``name``, found through what typer exports: typer 0.2x
    raises its vendored copy of click's exceptions, older releases click's own, and
    ``typer.BadParameter`` derives from ``UsageError`` and ``ClickException`` in both."""
    for cls in typer.BadParameter.__mro__:
        if cls.__name__ == name and issubclass(cls, Exception):
            return cls
    raise ImportError(f"typer.BadParameter does not derive from {name}")  # pragma: no cover


_UsageError = _click_exception("UsageError")
_ClickException = _click_exception("ClickException")

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="qcluster: a clustered cron scheduler.")
jobs_app = typer.Typer(no_args_is_help=True, help="Add, list and change jobs.")
runs_app = typer.Typer(no_args_is_help=True, help="The runs of jobs.")
cluster_app = typer.Typer(no_args_is_help=True, help="The cluster's leader and members.")
app.add_typer(jobs_app, name="jobs")
app.add_typer(runs_app, name="runs")
app.add_typer(cluster_app, name="cluster")
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(backend_app, name="backend")
app.add_typer(calendars_app, name="calendars")
app.command("web")(web)


def _show_version(value: bool) -> None:
    if value:
        print(f"qcluster {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    config: ConfigOpt = None,
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_show_version,
        help="Print the version and exit.")] = False,
) -> None:
    """qcluster: a clustered cron scheduler."""
    root_config.set(config)


# -- start ------------------------------------------------------------------------------------


@app.command()
def start(
    config: ConfigOpt = None,
    role: Annotated[str | None, typer.Option(
        help="all, scheduler or worker (default: \\[node] roles, both).")] = None,
    node_id: Annotated[str | None, typer.Option("--node-id", help="This node's id.")] = None,
    demo: Annotated[bool, typer.Option(help="Add the example jobs and show their runs.")] = False,
) -> None:
    """Start a node (by default both a scheduler and a worker)."""
    from qcluster.node import Node

    roles = None if role is None else {"all": ("scheduler", "worker"),
                                         "scheduler": ("scheduler",),
                                         "worker": ("worker",)}.get(role)
    if role is not None and roles is None:
        raise InputError(f"invalid --role {role!r}: use all, scheduler or worker")
    if node_id is not None and not re.fullmatch(NODE_ID_PATTERN, node_id):
        raise InputError(f"invalid --node-id {node_id!r}: use 1-128 letters, digits, "
                         "'_', '.' or '-', starting with a letter or digit")
    s = settings(config)
    if roles is None:
        roles = s.node.roles
    setup_logging(quiet=demo)
    dashboard = None
    if s.web.port:  # bound first: a port in use or a missing login stops the start here
        from qcluster.web.server import WebServer

        dashboard = WebServer(s)
    node = Node(s, node_id=node_id, roles=roles)

    def _signal(signum: int, _frame: FrameType | None) -> None:
        node.request_stop()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    try:
        if demo:
            from qcluster.cli.demo import run_demo

            run_demo(s, node)
        else:
            node.start()
            if dashboard is not None:
                dashboard.start()
                logging.getLogger("qcluster.web").info("serving the dashboard on %s",
                                                       dashboard.url)
            node.wait()
    finally:
        if dashboard is not None:
            dashboard.close()
        node.stop()
        _NODE_RAN.set()


# -- jobs -------------------------------------------------------------------------------------


@jobs_app.command("add")
def jobs_add(
    job_id: Annotated[str, typer.Argument(metavar="ID", help="The job's id.")],
    func: Annotated[str, typer.Option("--func", help="module:function to run.")],
    cron: Annotated[str | None, typer.Option(help="Cron expression (crontab(5)).")] = None,
    every: Annotated[str | None, typer.Option(help="Interval: 30s, 5m, 1h.")] = None,
    at: Annotated[str | None, typer.Option(help="One run at this ISO 8601 time.")] = None,
    after: Annotated[list[str] | None, typer.Option(
        "--after", metavar="JOB[:success|failure|always]",
        help="Run after this job's run (default: when it succeeded); repeatable: after all "
             "of them, for the same fire time.")] = None,
    arg: Annotated[
        list[str] | None, typer.Option("--arg", help="Positional (JSON or text).")
    ] = None,
    kwarg: Annotated[
        list[str] | None, typer.Option("--kwarg", help="K=V (V: JSON or text).")
    ] = None,
    tz: Annotated[str | None, typer.Option(help="Time zone of the trigger.")] = None,
    replace: Annotated[bool, typer.Option(help="Replace a job with the same id.")] = False,
    recover: Annotated[bool, typer.Option(help="Run again if its worker dies mid-run.")] = False,
    misfire_grace: Annotated[int | None, typer.Option(help="Seconds a fire may be late.")] = None,
    coalesce: Annotated[bool | None, typer.Option("--coalesce/--no-coalesce")] = None,
    max_attempts: Annotated[int | None, typer.Option(
        help="Attempts of one run in all, with --recover (default: \\[runs] max_attempts).",
    )] = None,
    retries: Annotated[str | None, typer.Option(
        help="Try a failed or timed-out run again this many times (0-100).")] = None,
    retry_backoff: Annotated[str | None, typer.Option(
        help="Wait before the first retry (doubles each time, with jitter): 10s.")] = None,
    retry_max_backoff: Annotated[str | None, typer.Option(
        help="The longest wait between retries: 5m.")] = None,
    timeout: Annotated[str | None, typer.Option(
        help="Stop a run still running after this long (recorded timed_out): 30s.")] = None,
    overlap: Annotated[str | None, typer.Option(
        help="When the previous run is still open: allow, skip, buffer-one, buffer-all, "
             "cancel-other.")] = None,
    misfire: Annotated[str | None, typer.Option(
        help="Fire times later than the grace: run-once, run-all, skip.")] = None,
    catch_up: Annotated[str | None, typer.Option(
        help="How far back missed fire times are caught up (default: the grace).")] = None,
    start_at: Annotated[str | None, typer.Option(
        "--start", help="No fire before this ISO 8601 time.")] = None,
    end_at: Annotated[str | None, typer.Option(
        "--end", help="No fire after this ISO 8601 time.")] = None,
    max_runs: Annotated[str | None, typer.Option(
        help="The job ends after this many fire times ran.")] = None,
    jitter: Annotated[str | None, typer.Option(
        help="Start each run up to this long after its fire time (fixed per fire).")] = None,
    exclude: Annotated[list[str] | None, typer.Option(
        help="A calendar (qcluster calendars) whose dates are skipped; repeatable.")] = None,
    tags: Annotated[list[str] | None, typer.Option(
        "--tags", metavar="TAG[,TAG...]",
        help="Run only on a live worker with all these \\[worker] tags; repeatable.")] = None,
    group: Annotated[str | None, typer.Option(
        help="An affinity group: every run of its jobs goes to one worker while it "
             "lives.")] = None,
    route: Annotated[str | None, typer.Option(
        help="This job's routing: round-robin, least-loaded, consistent-hash, first, "
             "random (default: \\[dispatch] strategy).")] = None,
    shards: Annotated[str | None, typer.Option(
        help="Each fire time is this many runs (2-1000), spread over the workers; "
             "current_run() gives shard and shards.")] = None,
    broadcast: Annotated[bool, typer.Option(
        "--broadcast", help="Each fire time is one run per live worker (with its "
                            "--tags).")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a job."""
    c = client(config)
    kwargs: dict[str, Any] = {}
    for item in kwarg or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"invalid --kwarg {item!r}: expected KEY=VALUE")
        kwargs[key] = parse_cli_value(value)
    done = c.add(job_id, func, cron=cron, every=every, at=at, after=after or None, tz=tz,
                 args=[parse_cli_value(a) for a in arg or []], kwargs=kwargs,
                 replace=replace, recover=recover, misfire_grace=misfire_grace,
                 coalesce=coalesce, max_attempts=max_attempts, retries=_whole(retries),
                 retry_backoff=retry_backoff, retry_max_backoff=retry_max_backoff,
                 timeout=timeout, overlap=overlap, misfire=misfire, catch_up=catch_up,
                 start=start_at, end=end_at, max_runs=_whole(max_runs), jitter=jitter,
                 exclude=[n for item in exclude or [] for n in item.split(",")],
                 tags=[n for item in tags or [] for n in item.split(",")], group=group,
                 route=route, shards=_whole(shards), broadcast=broadcast or None)
    _done(as_json, {"id": done.job_id, "status": done.status, "via": done.via},
          f"{done.status} job {done.job_id} (via {done.via})")


def _whole(text: str | None) -> int | str | None:
    """A count flag's value: the number it spells, else the text, which the policy check
    refuses with the message a job file or ``Client.add`` gets."""
    if text is not None and re.fullmatch(r"-?[0-9]+", text, re.ASCII):
        return int(text)  # (int() takes "+5", " 3" and other scripts' digits too)
    return text


@jobs_app.command("apply")
def jobs_apply(
    file: Annotated[Path, typer.Argument(metavar="FILE.toml", help="\\[\\[job]] definitions.")],
    prune: Annotated[bool, typer.Option(help="Remove jobs the file does not name.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create and update jobs from a file (declarative)."""
    r = client(config).apply(file, prune=prune)
    summary = {"created": len(r.created), "updated": len(r.updated),
               "unchanged": len(r.unchanged), "removed": len(r.removed)}
    _done(as_json, {**summary, "via": r.via},
          f"created {summary['created']}, updated {summary['updated']}, unchanged "
          f"{summary['unchanged']}, removed {summary['removed']} (via {r.via})")


@jobs_app.command("list")
def jobs_list(
    limit: Annotated[int, typer.Option(min=0, max=2**31 - 1,
                                       help="At most this many (0: all).")] = 0,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List jobs."""
    jobs = client(config).list(limit=limit)
    if as_json:
        print_json(jobs)
    else:
        output.jobs_table(jobs)


@jobs_app.command("show")
def jobs_show(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one job and its latest runs."""
    job = client(config).show(job_id)
    if as_json:
        print_json(job)
    else:
        output.job_detail(job)


def _action(name: str, doc: str) -> Callable[..., None]:
    def command(
        job_id: Annotated[str, typer.Argument(metavar="ID")],
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        done: Change = getattr(client(config), name)(job_id)
        _done(as_json, {"id": job_id, "status": done.status, "via": done.via},
              f"{done.status} job {job_id} (via {done.via})")

    command.__doc__ = doc
    return command


jobs_app.command("pause")(_action("pause", "Pause a job: it fires no more until resumed."))
jobs_app.command("resume")(_action("resume", "Resume a paused job, from now on."))
jobs_app.command("remove")(_action(
    "remove", "Remove a job (its runs stay; its open runs get no further attempt)."))


@jobs_app.command("run")
def jobs_run(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Fire a job now, once."""
    r = client(config).run(job_id)
    note = "" if r.via != "database" else "; no leader is running, it runs when one is"
    _done(as_json, {"id": job_id, "run_id": r.run_id, "via": r.via},
          f"run {r.run_id} of job {job_id} recorded (via {r.via}){note}")


@jobs_app.command("backfill")
def jobs_backfill(
    job_id: Annotated[str, typer.Argument(metavar="ID")],
    start: Annotated[str, typer.Option("--from", help="The first fire time (ISO 8601; "
                                       "without an offset, in the job's zone).")],
    end: Annotated[str, typer.Option("--to", help="The last fire time (not later than now).")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run each fire time of a job in [--from, --to] once (at most 10,000). Those that
    already have a run get none, so a second backfill writes nothing."""
    r = client(config).backfill(job_id, start, end)
    skipped = f", {r.skipped} skipped (excluded by a calendar)" if r.skipped else ""
    note = "" if r.via != "database" else "; no leader is running, they run when one is"
    _done(as_json, {**dataclasses.asdict(r)},
          f"job {job_id}: {r.new} new runs{skipped}, {r.already} already recorded, of "
          f"{r.fire_times} fire times from {r.start} to {r.end} (via {r.via}){note}")


def _done(as_json: bool, data: dict[str, Any], text: str) -> None:
    if as_json:
        print_json(data)
    else:
        print(text)


# -- runs, cluster -------------------------------------------------------------------------


@runs_app.command("list")
def runs_list(
    job: Annotated[str | None, typer.Option(help="Only this job's runs.")] = None,
    status: Annotated[str | None, typer.Option(help="Only runs with this status.")] = None,
    since: Annotated[str | None, typer.Option(help="Scheduled at or after (ISO 8601).")] = None,
    limit: Annotated[int, typer.Option(min=0, max=2**31 - 1,
                                       help="At most this many (0: all).")] = 50,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    runs = client(config).runs(job=job, status=status, since=since, limit=limit)
    if as_json:
        print_json(runs)
    else:
        output.runs_table(runs)


@runs_app.command("show")
def runs_show(
    run_id: Annotated[int, typer.Argument(metavar="RUN", help="The run's id (runs list).")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show one run: its fields, and for each attempt the repr of what it returned and the
    tail of what it wrote to stdout and stderr (log records included; the last
    \\[runs] output_max_bytes)."""
    run = client(config).show_run(run_id)
    if as_json:
        print_json(run)
    else:
        output.run_detail(run)


@runs_app.command("cancel")
def runs_cancel(
    run_id: Annotated[int, typer.Argument(metavar="RUN", help="The run's id (runs list).")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a run. One not started yet is recorded cancelled and never starts. A running
    one is stopped by its worker within about a heartbeat (its process group is killed)
    and recorded cancelled; it gets no new attempt."""
    r = client(config).cancel(run_id)
    if r.status == "cancelled":
        text = f"cancelled run {r.run_id} (attempt {r.attempt}; via {r.via})"
    else:
        text = (f"run {r.run_id} is running (attempt {r.attempt}): its worker stops it "
                f"within about a second and records it cancelled; no further attempt "
                f"(via {r.via})")
    _done(as_json, {"run_id": r.run_id, "status": r.status, "attempt": r.attempt,
                    "via": r.via}, text)


@cluster_app.command("status")
def cluster_status(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Show the leader and the live members."""
    status = client(config).cluster_status()
    if as_json:
        print_json(status)
    else:
        output.cluster_view(status)


# -- the error funnel -------------------------------------------------------------------------


def _fail(message: str, code: int = 1) -> NoReturn:
    # One line (\r, \x0b, \u2028... as well as \n), through the one redactor: a URL or a
    # password=... pair in a driver's text is hidden even where no layer below knew it.
    message = redact_text(" ".join(message.splitlines()))
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _click_message(e: Exception) -> str:
    format_message = getattr(e, "format_message", None)
    return str(format_message() if callable(format_message) else e).replace("\n", " ")


#: Set once ``start`` has stopped its node: the process then ends with ``os._exit``.
_NODE_RAN = threading.Event()


def main(argv: list[str] | None = None) -> None:
    """The console script. After ``start`` has stopped its node (runs recorded, members
    left, connections closed), the process ends at once with ``os._exit``: a job's thread
    that never ends is a daemon, but Python's exit would still join the threads of a
    job's own ``ThreadPoolExecutor`` (and run a job's ``atexit`` hooks), so a node would
    say "stopped" and never exit (issue 14 point 3)."""
    try:
        _main(argv)
    except SystemExit as e:
        if _NODE_RAN.is_set():
            _exit_now(e.code)
        raise
    if _NODE_RAN.is_set():
        _exit_now(0)


def _exit_now(code: object) -> None:
    status = code if isinstance(code, int) else (0 if code is None else 1)
    if isinstance(code, str):
        print(code, file=sys.stderr)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _main(argv: list[str] | None) -> None:
    # A command prints one line per problem: a driver's own connection chatter (kazoo
    # retrying an unreachable server) stays out of it. `start` sets up real logging.
    for name in DRIVER_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        app(args=argv, prog_name="qcluster", standalone_mode=False)
    except _UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # the help is printed: not an error
            raise SystemExit(2) from None
        _fail(_click_message(e), 2)
    except _ClickException as e:
        _fail(_click_message(e), getattr(e, "exit_code", 1) or 1)
    except typer.Abort:
        _fail("aborted", 130)
    except typer.Exit as e:
        raise SystemExit(e.exit_code) from None
    except QClusterError as e:
        _fail(str(e).replace("\n", " "))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        raise SystemExit(1) from None
    except Exception as e:  # a bug: still one line, with the details in the log if asked
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        _fail(f"internal error: {type(e).__name__}: {e}".replace("\n", " "))
