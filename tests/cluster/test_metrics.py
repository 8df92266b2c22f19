"""Prometheus metrics on real nodes (issue 17, item 2): a scheduler node and a worker node,
``qcluster start`` processes on PostgreSQL, each serving ``/metrics`` on a port of its
own; what they count is read the way Prometheus reads it.
"""

from __future__ import annotations

import re
import socket
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qcluster import metrics
from tests.helpers import run_cli, start_node, wait_for, write_config
from tests.servers.base import free_port

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
WAIT = 60.0
#: The only label names any series may carry: a few fixed values each, never an id.
LABELS = {"status", "reason", "backend", "operation", "version", "le"}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scraped(port: int) -> Samples:
    """:func:`scrape`, or nothing while the node does not listen yet."""
    try:
        return scrape(port)
    except OSError:
        return {}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_the_leader_and_a_worker_count_fires_runs_and_lateness(pg_url: str,
                                                               tmp_path: Path) -> None:
    ports = {"s1": free_port(), "w1": free_port()}
    configs = {node: write_config(tmp_path, pg_url, name=f"{node}.toml",
                                  metrics={"port": port}) for node, port in ports.items()}
    run_cli("db", "upgrade", config=configs["s1"])
    with (start_node(configs["s1"], node_id="s1", role="scheduler",
                     log_path=tmp_path / "s1.log"),
          start_node(configs["w1"], node_id="w1", role="worker",
                     log_path=tmp_path / "w1.log")):
        wait_for(lambda: value(scraped(ports["s1"]), "qcluster_live_workers") == 1, WAIT,
                 interval=0.5, what="s1 to lead and count w1 live")
        config = configs["s1"]
        run_cli("jobs", "add", "tick", "--func", "jobs.builtin:noop", "--every", "1s",
                config=config)
        # A date two minutes past: past its misfire grace, recorded missed (late).
        past = (datetime.now(UTC) - timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M:%S+00:00")
        run_cli("jobs", "add", "past", "--func", "jobs.builtin:noop", "--at", past,
                config=config)
        # Runs 2.5 s every second with overlap skip: fire times in between are skipped.
        run_cli("jobs", "add", "slow", "--func", "jobs.builtin:shell", "--arg", "sleep 2.5",
                "--every", "1s", "--overlap", "skip", config=config)

        def counted() -> tuple[Samples, Samples] | None:
            leader, worker = scrape(ports["s1"]), scrape(ports["w1"])
            done = value(worker, "qcluster_runs_finished_total", status="succeeded")
            skipped = value(leader, "qcluster_fires_total", status="skipped",
                            reason="overlap_skip")
            slow = (value(worker, "qcluster_run_duration_seconds_bucket", le="+Inf")
                    - value(worker, "qcluster_run_duration_seconds_bucket", le="1.0"))
            return (leader, worker) if done >= 4 and skipped >= 2 and slow >= 1 else None

        found = wait_for(counted, WAIT, interval=0.5, what="runs finished and fires skipped")
        assert found is not None
        leader, worker = found

    assert value(leader, "qcluster_is_leader") == 1
    assert value(leader, "qcluster_epoch") >= 1
    assert value(leader, "qcluster_leader_changes_total") == 1
    assert value(leader, "qcluster_fires_total", status="scheduled", reason="on_time") >= 4
    assert value(leader, "qcluster_fires_total", status="missed", reason="late") == 1
    assert value(leader, "qcluster_leader_pass_seconds_count") >= 4
    assert value(leader, "qcluster_dispatch_seconds_count") >= 1
    # The worker node does not lead; the scheduler node runs nothing.
    assert value(worker, "qcluster_is_leader") == 0
    assert value(leader, "qcluster_runs_finished_total", status="succeeded") == 0
    finished = sum(v for (name, _), v in worker.items() if name == "qcluster_runs_finished_total")
    # Every run that finished started: one lateness and one duration each.
    assert value(worker, "qcluster_run_lateness_seconds_count") == finished
    assert value(worker, "qcluster_run_duration_seconds_count") == finished
    # The 2.5 s runs are above the 1 s bucket; every run is in +Inf.
    assert value(worker, "qcluster_run_duration_seconds_bucket", le="1.0") < finished
    assert value(worker, "qcluster_run_duration_seconds_bucket", le="+Inf") == finished
    assert value(worker, "qcluster_build_info", version=_version()) == 1
    for samples in (leader, worker):
        for name, labels in samples:
            if name.startswith("qcluster_"):
                assert {k for k, _ in labels} <= LABELS, (name, labels)


def _version() -> str:
    from importlib.metadata import version

    return version("qcluster")


def test_a_metrics_port_in_use_is_a_one_line_error_of_config_check_and_start(pg_url: str,
                                                            tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = write_config(tmp_path, pg_url, metrics={"port": port})
        checked = run_cli("config", "check", config=config, check=False)
        assert checked.returncode != 0
        assert checked.stderr.strip().splitlines() == [
            f"error: cannot serve metrics on 127.0.0.1:{port} ([metrics]): Address already "
            "in use"], checked.stderr
        with start_node(config, node_id="m1", role="worker",
                        log_path=tmp_path / "m1.log") as node:
            code = node.wait(timeout=WAIT)
        log = (tmp_path / "m1.log").read_text()
    assert code != 0
    assert f"cannot serve metrics on 127.0.0.1:{port} ([metrics])" in log, log
    assert "Traceback" not in log, log


def test_every_metric_is_documented_and_the_alert_rules_name_only_real_ones() -> None:
    names = {m._name for m in vars(metrics).values()
             if isinstance(m, metrics.Counter | metrics.Gauge | metrics.Histogram)}
    assert len(names) >= 15
    doc = (ROOT / "docs" / "METRICS.md").read_text()
    for name in names:
        shown = f"{name}_total" if f"{name}_total" in doc else name
        assert f"`{shown}`" in doc, f"{name} is not in docs/METRICS.md"
    exposed = {n + s for n in names for s in ("", "_total", "_bucket", "_count", "_sum")}
    rules = (ROOT / "docs" / "alerts.yml").read_text()
    used = set(re.findall(r"\bqcluster_[a-z_]+", rules))
    assert used and used <= exposed, used - exposed
