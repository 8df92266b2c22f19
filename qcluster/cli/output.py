"""Tables for people, with rich. ``--json`` output does not come through here."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qcluster.definitions.policy import FIELDS as POLICY_FIELDS
from qcluster.definitions.triggers import format_duration
from qcluster.settings.text import printable
from qcluster.store.cluster import Phase
from qcluster.store.runs import RunStatus

console = Console(highlight=False)

_STATUS_STYLE = {RunStatus.SUCCEEDED: "green", RunStatus.FAILED: "red",
                 RunStatus.MISSED: "yellow", RunStatus.LOST: "magenta",
                 RunStatus.RUNNING: "cyan", RunStatus.DISPATCHED: "blue",
                 RunStatus.SCHEDULED: "white", RunStatus.CANCELLED: "bright_black",
                 RunStatus.INTERRUPTED: "bright_magenta", RunStatus.TIMED_OUT: "red",
                 RunStatus.SKIPPED: "bright_black", RunStatus.BUFFERED: "white"}


_DURATION_FIELDS = ("retry_backoff", "retry_max_backoff", "timeout", "catch_up", "jitter")


def _t(value: str | None) -> str:
    """An ISO time, shortened for a table: date and time to the millisecond."""
    if value is None:
        return "-"
    return value.replace("T", " ").replace("Z", "")[:23]


def jobs_table(jobs: list[dict[str, Any]]) -> None:
    table = Table(title=f"{len(jobs)} jobs")
    for col in ("id", "func", "trigger", "next run (UTC)", "state"):
        table.add_column(col)
    for j in jobs:
        state = "broken" if j["broken"] else ("paused" if j["paused"] else "active")
        table.add_row(j["id"], j["func"], j["trigger"], _t(j["next_run_time"]), state)
    console.print(table)


def job_detail(job: Mapping[str, Any]) -> None:
    table = Table(show_header=False, title=f"job {job['id']}")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in ("func", "trigger", "next_run_time", "paused", "args", "kwargs", "recover",
                "max_attempts", "misfire_grace_seconds", "coalesce", *POLICY_FIELDS,
                "group_worker", "runs_made", "broken", "children"):
        value = job.get(key)
        if key in (*POLICY_FIELDS, "children", "group_worker") and value in (None, []):
            continue  # not set: the [scheduler] default
        if key in _DURATION_FIELDS and isinstance(value, int | float):
            value = format_duration(value)
        table.add_row(key, escape(json.dumps(value) if isinstance(value, list | dict)
                                  else str(value)))
    console.print(table)
    runs_table(job.get("recent_runs", []), title="latest runs")


def runs_table(runs: list[dict[str, Any]], title: str | None = None) -> None:
    table = Table(title=title or f"{len(runs)} runs")
    for col in ("run", "job", "scheduled (UTC)", "status", "try", "worker", "took", "out",
                "error"):
        table.add_column(col)
    for r in runs:
        took = "-" if r.get("duration") is None else f"{r['duration'] * 1000:.0f} ms"
        style = _STATUS_STYLE.get(r["status"], "white")
        job = r["job_id"] + (f" [{r['slot']}]" if r.get("slot") else "")  # a shard's
        table.add_row(str(r["run_id"]), escape(job), _t(r["scheduled_at"]),
                      f"[{style}]{r['status']}[/]", str(r["attempt"]),
                      escape(r["worker"] or "-"), took, "yes" if r.get("has_output") else "",
                      escape(printable(r["error"] or "")[:60]))
    console.print(table)


def run_detail(run: Mapping[str, Any]) -> None:
    """``runs show``: the run's fields, then what each attempt returned and wrote."""
    table = Table(show_header=False, title=f"run {run['run_id']}")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in ("job_id", "scheduled_at", "status", "attempt", "worker", "dispatched_at",
                "started_at", "finished_at", "duration", "error", "retries_left", "parent_run",
                "slot"):
        value = run.get(key)
        if key == "duration" and isinstance(value, int | float):
            value = f"{value * 1000:.1f} ms"
        table.add_row(key, escape(printable("-" if value is None else str(value))))
    console.print(table)
    if not run["attempts"]:
        console.print("no output kept (the run wrote nothing and returned None, or has not "
                      "ended yet)")
    for kept in run["attempts"]:
        console.print(f"[bold]attempt {kept['attempt']}[/]")
        if kept["result"] is not None:  # on one line: a repr's newlines cannot fake lines
            console.print(f"returned: {escape(printable(kept['result'], newlines=False))}",
                          soft_wrap=True)
        if kept["output"] is not None:
            console.print("output:")
            # As written: the terminal wraps long lines, none is cut into several.
            console.print(printable(kept["output"]).rstrip("\n"), markup=False,
                          soft_wrap=True, highlight=False)


def cluster_view(status: Mapping[str, Any]) -> None:
    leader = status["leader"]
    who = "none" if leader is None else f"{leader['node_id']} since {_t(leader['since'])}"
    console.print(f"cluster [bold]{status['cluster']}[/] on [bold]{status['backend']}[/] "
                  f"(phase {status['phase']}), epoch {status['epoch']}, leader: {who}")
    table = Table(title=f"{len(status['members'])} live members")
    for col in ("node", "roles", "uri", "capacity", "tags", "status", "last seen (UTC)"):
        table.add_column(col)
    for m in status["members"]:
        table.add_row(escape(m["node_id"]), ",".join(m["roles"]), escape(m["uri"] or "-"),
                      str(m["capacity"]), escape(",".join(m.get("tags", [])) or "-"),
                      escape(m["status"]), _t(m["last_seen"]))
    console.print(table)
    placed = status.get("groups", [])
    if placed:
        groups = Table(title=f"{len(placed)} affinity groups")
        for col in ("group", "worker", "since (UTC)", "moves"):
            groups.add_column(col)
        for g in placed:
            groups.add_row(escape(g["name"]), escape(g["worker"]), _t(g["since"]),
                           str(g["moves"]))
        console.print(groups)


def backend_view(status: Mapping[str, Any]) -> None:
    moving = (f", moving to [bold]{status['target_backend']}[/]"
              if status["phase"] == Phase.JOINT else "")
    console.print(
        f"backend [bold]{status['backend']}[/]{moving}: phase {status['phase']} since "
        f"{_t(status['phase_since'])}, config version {status['config_version']}, epoch "
        f"{status['epoch']}, leader {escape(str(status['leader'] or 'none'))} "
        f"(lease on {status['leader_lease'] or '-'})"
    )
    table = Table(title=f"{len(status['schedulers'])} live scheduler nodes")
    for col in ("node", "config can use", "honours version", "status"):
        table.add_column(col)
    for m in status["schedulers"]:
        table.add_row(escape(m["node_id"]), ",".join(m["backends"]),
                      str(m["config_version"] or "-"), escape(m["status"]))
    console.print(table)
    for w in status["waiting"]:
        console.print(f"waiting for {escape(w['node_id'])}: {escape(w['why'])}")


def config_view(source: str, data: Mapping[str, Any]) -> None:
    console.print(f"# effective configuration from {source}")
    for section, values in data.items():
        _section(section, values)


def _section(name: str, values: Any) -> None:
    if not isinstance(values, Mapping):
        console.print(f"{name} = {json.dumps(values)}")
        return
    console.print(f"[{name}]", markup=False)
    nested = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            nested.append((f"{name}.{key}", value))
        else:
            console.print(f"{key} = {json.dumps(value)}", markup=False)
    for sub, value in nested:
        _section(sub, value)


def calendars_table(found: list[dict[str, Any]]) -> None:
    table = Table(title=f"{len(found)} calendars")
    for col in ("name", "ranges", "days", "first", "last", "jobs", "version"):
        table.add_column(col)
    for c in found:
        table.add_row(escape(c["name"]), str(c["ranges"]), str(c["days"]), c["first"],
                      c["last"], str(c["jobs"]), str(c["version"]))
    console.print(table)


def calendar_detail(cal: Mapping[str, Any]) -> None:
    console.print(f"calendar [bold]{escape(cal['name'])}[/] (version {cal['version']}): "
                  f"{cal['days']} days in {len(cal['dates'])} ranges")
    for item in cal["dates"]:
        console.print(f"  {item}", markup=False)
    jobs = cal["jobs"]
    plural = "" if len(jobs) == 1 else "s"
    console.print(f"excluded by {len(jobs)} job{plural}" + (": " if jobs else ""),
                  markup=False, end="")
    console.print(", ".join(jobs), markup=False)
