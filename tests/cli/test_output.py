"""What ``runs show`` prints of a run's output and return value (found by an outside attack
on issue 17): text as written, apart from the escaping of what a terminal would act on."""

from __future__ import annotations

import pytest

from qcluster.cli import output


def _run(result: str | None, text: str | None) -> dict[str, object]:
    fields = dict.fromkeys(("job_id", "scheduled_at", "status", "attempt", "worker",
                            "dispatched_at", "started_at", "finished_at", "duration",
                            "error", "retries_left"), "-")
    return {**fields, "run_id": 7, "attempts": [{"attempt": 1, "result": result,
                                                 "output": text}]}


def test_runs_show_prints_long_lines_whole_and_escapes_what_a_terminal_acts_on(
    capsys: pytest.CaptureFixture[str]
) -> None:
    long = "y" * 500
    output.run_detail(_run("'first\nsecond'", f"{long}\nbidi \u202eevil\u202c here\n"
                                              "bell \x07 [red]x[/red]\n"))
    printed = capsys.readouterr().out
    assert long in printed  # one line, however wide the terminal
    assert "returned: 'first\\nsecond'" in printed  # a repr's newline cannot fake a line
    assert "bidi \\u202eevil\\u202c here" in printed and "\u202e" not in printed
    assert "bell \\x07 [red]x[/red]" in printed
