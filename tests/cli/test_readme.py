"""README.md against the code: the "Job policies" example runs as written (with the
allow entry README shows for ``jobs.builtin:shell``, and the calendar it excludes made
first), and the facts README states about policies are the code's: each field's bounds,
the fields of ``current_run()``, the reasons the run-statuses table quotes."""

from __future__ import annotations

import dataclasses
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from qcluster import RunContext
from qcluster.definitions.policy import COUNT_RANGES, DURATION_RANGES
from qcluster.definitions.triggers import format_duration
from tests.cli.test_cli import config_with_tables
from tests.helpers import assert_cli_error, cli_env, run_cli, run_json, write_config

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def section(title: str) -> str:
    """The text of README's section ``## title``, up to the next ``## ``."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def commands(block: str) -> list[list[str]]:
    """The commands of a ``sh`` block: continuation lines joined, comments dropped."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def readme_allow() -> list[str]:
    (toml,) = [b for b in blocks(section("Using it"), "toml") if "[jobs]" in b]
    allow: list[str] = tomllib.loads(toml)["jobs"]["allow"]
    return allow


def test_the_job_policies_example_runs_as_written(tmp_path: Path, sqlite_url: str) -> None:
    example = commands(blocks(section("Job policies"), "sh")[0])
    assert [c[:3] for c in example] == [["qcluster", "calendars", "add"],
                                        ["qcluster", "jobs", "add"]]
    assert "jobs.builtin:shell" in readme_allow()
    config = config_with_tables(tmp_path, sqlite_url)
    write_config(tmp_path, sqlite_url, jobs={"allow": readme_allow()})
    plain = write_config(tmp_path, sqlite_url, name="plain.toml",  # the default allow list
                         jobs={"allow": ["jobs.*"]})
    add_job = example[1][1:]
    # Without the allow entry, or before its calendar exists, the job is refused.
    assert_cli_error(run_cli(*add_job, config=plain, check=False), "jobs.builtin:shell",
                     "not allowed by [jobs] allow")
    assert_cli_error(run_cli(*add_job, config=config, check=False),
                     "excludes calendar 'holidays', which does not exist")
    for command in example:
        run_cli(*command[1:], config=config)
    etl = run_json("jobs", "show", "etl", "--json", config=config)
    assert (etl["func"], etl["exclude"], etl["retries"], etl["timeout"], etl["overlap"]) == (
        "jobs.builtin:shell", ["holidays"], 3, 3600.0, "skip")


def test_the_shell_examples_of_using_it_run_with_its_allow_entry(
    tmp_path: Path, sqlite_url: str
) -> None:
    config = config_with_tables(tmp_path, sqlite_url)
    write_config(tmp_path, sqlite_url, jobs={"allow": readme_allow()})
    (first, *_rest) = [c for c in commands(blocks(section("Using it"), "sh")[0])
                       if c[1:3] == ["jobs", "add"] and "jobs.builtin:shell" in c]
    run_cli(*first[1:], config=config)


@pytest.mark.parametrize("key", sorted(DURATION_RANGES))
def test_readme_gives_each_duration_fields_bounds(key: str) -> None:
    low, high = (format_duration(b) for b in DURATION_RANGES[key])
    assert f"(`{key}`, {low} to {high}" in section("Job policies"), key


@pytest.mark.parametrize("key", sorted(COUNT_RANGES))
def test_readme_gives_each_count_fields_bounds(key: str) -> None:
    low, high = COUNT_RANGES[key]
    assert f"(`{key}`, {low} to {high})" in section("Job policies"), key


def test_readme_names_the_fields_of_current_run() -> None:
    text = " ".join(section("Using it").split())
    found = re.search(r"`qcluster\.current_run\(\)` gives a `qcluster\.RunContext` with the "
                      r"fields (.*?)\.", text)
    assert found is not None
    named = re.findall(r"`(\w+)`", found.group(1))
    assert named == [f.name for f in dataclasses.fields(RunContext)]


def test_the_run_statuses_table_quotes_the_reasons_the_leader_writes() -> None:
    source = (Path(__file__).resolve().parents[2] / "qcluster/leader/scheduler.py").read_text()
    table = {m.group(1): m.group(2) for m in
             re.finditer(r"^\| `(\w+)`[^|]*\| (.*) \|$", section("Run statuses"), re.M)}
    for status, reason in [("cancelled", "overlap cancel-other: replaced by the fire at "),
                           ("skipped", "a later fire time replaced it in the same pass")]:
        assert reason.strip() in " ".join(source.split()).replace('" "', ""), reason
        assert reason.strip() in table[status], status
    assert "misfire `skip` records `missed`" in table["skipped"].lower()


def test_the_dependent_jobs_example_runs_as_written(tmp_path: Path, sqlite_url: str) -> None:
    text = README[README.index("\n### Dependent jobs\n"):]
    text = text[:text.index("\n## ")]
    example = commands(blocks(text, "sh")[0])
    package = tmp_path / "code" / "acme_tasks"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "etl.py").write_text("".join(f"def {name}() -> None:\n    pass\n"
                                            for name in ("extract", "load", "report", "alert")))
    config_with_tables(tmp_path, sqlite_url)
    config = write_config(tmp_path, sqlite_url, jobs={"allow": ["acme_tasks.*"]})
    env = {**cli_env(config), "PYTHONPATH": str(tmp_path / "code")}
    for command in example:
        run_cli(*command[1:], config=config, env=env)
    extract = run_json("jobs", "show", "extract", "--json", config=config)
    assert extract["children"] == ["load", "report"]
    report = run_json("jobs", "show", "report", "--json", config=config)
    assert report["trigger_spec"]["parents"] == [{"job": "extract", "on": "always"},
                                                 {"job": "load", "on": "success"}]
