"""Example jobs, added by ``qcluster start --demo``. Each shows what a job can learn."""

from __future__ import annotations

import json
import logging
import os
import random
import time

from qcluster import current_run

log = logging.getLogger(__name__)


def hello(name: str = "world") -> str:
    """Say hello, with the run's own details."""
    run = current_run()
    text = f"hello {name} from {run.worker_id} (run {run.run_id}, attempt {run.attempt})"
    log.info(text)
    return text


def flaky(failure_rate: float = 0.3) -> None:
    """Fail now and then, to show failed runs with their error text."""
    if random.random() < failure_rate:
        raise RuntimeError("the dice said no")


def slow(seconds: float = 2.0) -> None:
    """Take a while."""
    time.sleep(seconds)


def record_run(path: str, sleep: float = 0.0) -> None:
    """Append this run's identity to ``path`` as one JSON line (used by the cluster tests).

    The line is written with one ``write`` on a file opened for appending, so lines from
    concurrent workers on one host never interleave. It writes to any path it is given, so
    no ``[jobs] allow`` pattern admits it: list ``jobs.examples:record_run`` itself
    (``settings/refs.NAMED_ONLY``).
    """
    run = current_run()
    line = json.dumps({
        "job_id": run.job_id, "run_id": run.run_id, "attempt": run.attempt,
        "scheduled_at": run.scheduled_at.timestamp(), "epoch": run.epoch,
        "worker": run.worker_id, "started": time.time(), "shard": run.shard,
        "shards": run.shards,
    }) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    if sleep:
        time.sleep(sleep)
