"""The report: a table on the terminal (rich), ``report.json``, ``report.md`` and a
lateness chart, ``lateness.png`` (matplotlib, optional).

The JSON holds everything: the machine, the options, the command, and per result every
count and time measured plus 101 lateness percentiles, so that the Markdown and the chart
can be drawn again from it (``python -m bench report DIR``).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.common import SCENARIOS, describe_machine

COLUMNS = ("scenario", "system", "fires/s", "p50 ms", "p95 ms", "p99 ms", "max ms",
           "peak RSS MB", "notes")


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def rows(report: dict[str, Any]) -> list[list[str]]:
    out = []
    order = {name: i for i, name in enumerate(SCENARIOS)}
    results = sorted(report["results"], key=lambda r: (order.get(r["scenario"], 99),
                                                       r["system"] != "qcluster"))
    for r in results:
        lat = r.get("lateness") or {}
        notes = "; ".join(r["notes"])
        if r.get("error"):
            notes = f"FAILED: {r['error']}" + (f"; {notes}" if notes else "")
        digits = 1 if lat and lat.get("max", 100) < 10 else 0
        out.append([r["scenario"], r["system"], _num(r.get("fires_per_s")),
                    *(_num(lat.get(k), digits) for k in ("p50", "p95", "p99", "max")),
                    _num(r.get("peak_rss_mb")), notes])
    return out


def build(machine: dict[str, Any], options: dict[str, Any], results: Sequence[Any],
          started: str, elapsed: float, argv: Sequence[str]) -> dict[str, Any]:
    return {
        "command": "python -m bench " + shlex.join(argv),
        "started": started, "elapsed_s": round(elapsed, 1), "machine": machine,
        "options": options, "results": [r.to_json() for r in results],
    }


def print_table(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="qcluster vs APScheduler 3.11 (lateness = start on the worker "
                  "minus scheduled time)", title_justify="left")
    for name in COLUMNS:
        table.add_column(name, justify="left" if name in ("scenario", "system", "notes")
                         else "right", overflow="fold")
    for row in rows(report):
        table.add_row(*row)
    console.print(table)
    console.print(f"machine: {describe_machine(report['machine'])}")
    console.print(f"command: {report['command']}  ({report['elapsed_s']:.0f}s)")


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Machine: {describe_machine(report['machine'])}.",
        "",
        f"Command: `{report['command']}` ({report['started']}, {report['elapsed_s']:.0f} s).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" if c in ("scenario", "system", "notes") else "---:"
                          for c in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |"
              for row in rows(report)]
    return "\n".join(lines) + "\n"


def chart(report: dict[str, Any], path: Path) -> str | None:
    """Draw the lateness quantiles of every scenario; return why not, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "the lateness chart needs matplotlib: pip install matplotlib"
    # scale's lateness is ten ticks a second: a sanity check, not a distribution to draw
    results = [r for r in report["results"] if r.get("lateness") and r["scenario"] != "scale"]
    scenarios = [s for s in SCENARIOS if any(r["scenario"] == s for r in results)]
    if not scenarios:
        return "no lateness to draw"
    fig, axes = plt.subplots(1, len(scenarios), figsize=(4.5 * len(scenarios), 4),
                             squeeze=False)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        for r in results:
            if r["scenario"] != scenario:
                continue
            pct = r["lateness"]["percentiles"]
            color = "tab:blue" if r["system"] == "qcluster" else "tab:orange"
            ax.plot(range(101), [max(v, 0.01) for v in pct], label=r["system"], color=color)
        ax.set_yscale("log")
        ax.set_title(scenario)
        ax.set_xlabel("percentile")
        ax.set_ylabel("lateness, ms (log)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = report["machine"]
    fig.suptitle(f"start minus scheduled time; {m['cores']} cores, {m['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write(report: dict[str, Any], out: Path) -> list[str]:
    """Write report.json, report.md and lateness.png into ``out``; return warnings."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))
    problem = chart(report, out / "lateness.png")
    return [] if problem is None else [problem]
