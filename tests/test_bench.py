"""Smoke test of ``python -m bench``: the whole benchmark, tiny, end to end.

It runs every scenario on qcluster and on bare APScheduler against a fresh PostgreSQL
database and checks only that the report is complete and well formed: figures measured
on a shared test machine say nothing, so there is no timing assertion.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--quick", "--jobs", "10", "--duration", "1", "--burst", "20", "--scale", "100",
        "--lease", "2", "--children", "0.2"]


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_quick_benchmark_reports_every_scenario_on_both_systems(
    pg_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--db-url", pg_url, "--out", str(out), *TINY],
        cwd=ROOT, capture_output=True, text=True, timeout=170, check=False,
    )
    where = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, where
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().count("\n| ") >= 7, where

    assert report["machine"]["cores"] >= 1
    assert report["options"]["jobs"] == 10
    found = {(r["scenario"], r["system"].split()[0]): r for r in report["results"]}
    expected = {(s, sys_) for s in ("steady", "burst", "failover", "sweep") for sys_ in
                ("qcluster", "apscheduler")} | {("scale", "qcluster")}
    assert set(found) == expected, where

    for (scenario, system), r in found.items():
        label = f"{scenario} on {system}: {r}"
        assert r["error"] is None, label
        if scenario == "sweep":  # its steps, whatever this machine's lateness was
            assert r["extra"]["steps"] and "p99" in r["extra"]["steps"][0], label
            assert r["notes"][0].startswith("highest rate with p99 < 100 ms"), label
            if r["lateness"] is None:
                continue  # no step stayed under the bound here
        lateness = r["lateness"]
        assert lateness is not None and lateness["n"] > 0, label
        assert 0 <= lateness["p50"] <= lateness["p95"] <= lateness["p99"] <= lateness["max"]
        assert len(lateness["percentiles"]) == 101, label
        assert r["peak_rss_mb"] is not None and r["peak_rss_mb"] > 0, label
        if scenario != "scale":
            assert r["fires_per_s"] is not None and r["fires_per_s"] > 0, label
        if scenario in ("steady", "failover"):
            extra = r["extra"]
            assert extra["expected"] > 0 and extra["ran"] > 0, label
            assert extra["duplicates"] >= 0 and extra["absent"] >= 0, label

    children = found[("steady", "qcluster")]["extra"]["children"]  # 2 jobs after others
    assert children["runs"] > 0 and children["by_status"].get("succeeded", 0) > 0, children

    scale = found[("scale", "qcluster")]["extra"]
    assert scale["jobs"] == 100
    assert scale["first_fire_after_win_s"] is not None
    assert len(scale["jobs_list_cli_s"]) == 3


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_web_benchmark_reads_every_page_of_a_filled_store(pg_url: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "bench.web", "--db-url", pg_url, "--jobs", "150",
         "--runs", "3000", "--repeat", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=110, check=False,
    )
    where = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, where
    report = json.loads((out / "web.json").read_text())
    assert [r["database"].split()[0] for r in report["results"]] == ["PostgreSQL", "SQLite"]
    for result in report["results"]:
        pages = {p["page"]: p for p in result["pages"]}
        assert {"cluster", "jobs", "runs (trouble)", "run with 2 KiB output"} <= set(pages)
        for page in pages.values():
            assert page["status"] == 200 and page["bytes"] > 500, page
            assert 0 < page["p50_ms"] <= page["max_ms"], page
        # the last page of 150 jobs is page 2, with 50 of them
        assert pages["jobs, last page"]["path"] == "/jobs?page=2"


def test_scrape_benchmark_reports_the_cost_of_a_scrape(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.scrape", "--scrapes", "20", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "scrape.json").read_text())
    assert report["scrapes"] == 20 and report["bytes"] > 5000
    assert report["cpu_us_per_scrape"] > 0 and 0 < report["core_share"] < 1
    assert "of a core" in done.stdout
