"""Fire-ahead with real ``qcluster start`` processes (one node of both roles, PostgreSQL,
``fire_ahead_seconds = 5``): a run sent ahead of its time and held by the worker is
withdrawn by a pause inside the window and never starts; an update inside the window
that keeps the schedule runs that fire time once, under the new definition (issue 18,
item 1)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from qcluster.client import Client
from tests.helpers import (
    TEST_SETTINGS,
    NodeProcess,
    parse_time,
    read_records,
    run_cli,
    runs_json,
    start_node,
    wait_for,
    wait_leading,
    write_config,
)

pytestmark = pytest.mark.cluster

RECORD = "jobs.examples:record_run"
WAIT = 60.0


def _held_ahead(client: Client, job_id: str, node: NodeProcess) -> dict[str, Any]:
    """A run of ``job_id`` claimed by the worker more than 2 s before its time (read and
    changed through the Python API, in this process: a CLI process takes a second or two
    to start on a loaded machine)."""
    def held() -> dict[str, Any] | None:
        for run in client.runs(job=job_id, limit=5):
            ahead = parse_time(run["scheduled_at"]).timestamp() - time.time()
            if run["status"] == "dispatched" and ahead > 2.0:
                return run
        return None

    found = wait_for(held, WAIT, interval=0.2, what=f"a run of {job_id} held ahead",
                     details=node.log_tail)
    assert found is not None
    return found


def test_a_change_inside_the_window_applies_to_the_run_already_sent(
    tmp_path: Path, pg_url: str
) -> None:
    config = write_config(tmp_path, pg_url,
                          scheduler={**TEST_SETTINGS["scheduler"], "fire_ahead_seconds": 5})
    run_cli("db", "upgrade", config=config)
    paused, old, new = (tmp_path / f"{n}.jsonl" for n in ("paused", "old", "new"))
    with start_node(config, node_id="n1", role="all", log_path=tmp_path / "n1.log") as node:
        wait_leading(config, node)
        client = Client(config)
        for job_id, path in (("p", paused), ("u", old)):
            client.add(job_id, RECORD, every="10s", kwargs={"path": str(path)})
        held = _held_ahead(client, "p", node)
        client.pause("p")
        changed = _held_ahead(client, "u", node)
        client.add("u", RECORD, every="10s", kwargs={"path": str(new)}, replace=True)
        latest = max(parse_time(r["scheduled_at"]).timestamp() for r in (held, changed))
        time.sleep(max(0.0, latest - time.time()) + 3.0)

        (gone,) = [r for r in runs_json(config, job="p") if r["run_id"] == held["run_id"]]
        assert (gone["status"], gone["error"]) == ("cancelled", "withdrawn: its job was paused")
        assert held["run_id"] not in {r["run_id"] for r in read_records(paused)}

        def ran() -> list[dict[str, Any]] | None:
            got = [r for r in read_records(new) if r["run_id"] == changed["run_id"]]
            return got or None

        again = wait_for(ran, WAIT, interval=0.2, what="the updated fire time to run",
                         details=node.log_tail)
        assert again is not None and [r["attempt"] for r in again] == [2]
        assert changed["run_id"] not in {r["run_id"] for r in read_records(old)}
        (row,) = [r for r in runs_json(config, job="u") if r["run_id"] == changed["run_id"]]
        assert (row["status"], row["attempt"]) == ("succeeded", 2)
