"""Prometheus metrics (issue 17, item 2): what every node counts, and the endpoint that
serves them (``[metrics] port``; off by default, on loopback unless ``[metrics] host``
says otherwise). ``docs/METRICS.md`` lists each with its meaning; ``docs/alerts.yml`` has
example alert rules.

Promises:

* Names follow the Prometheus conventions: the ``qcluster_`` prefix, base units
  (seconds), ``_total`` counters, ``_seconds`` histograms, and labels of a few fixed values
  only (a status, a reason, a backend name): never a job id, a run id or a worker id, so
  a series count does not grow with the jobs.
* Counting costs a lock and an addition (``prometheus_client``); nothing here does I/O,
  and nothing here raises into the caller's path.
* Each process has one registry (``prometheus_client``'s default): a node's roles share
  it. Tests that run several nodes' parts in one process see their sums.
"""

from __future__ import annotations

import threading
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

#: Lateness and other waits, in seconds: 1 ms to 2 min (a lateness past the misfire
#: grace is a missed run; the last bucket catches slow recoveries).
LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0)
#: Durations of the leader's pass and of a dispatch call.
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Why a fire time was recorded as it was: the ``reason`` label of :data:`FIRES`.
REASONS = ("on_time", "late", "coalesced", "misfire_skip", "excluded", "overlap_skip",
           "overlap_buffer_one", "overlap_cancel_other", "buffered")

FIRES = Counter(
    "qcluster_fires", "Fire times the leader recorded, by the status they were recorded "
    "with (scheduled, buffered, missed, skipped) and why (reason).", ["status", "reason"])
PASS_SECONDS = Histogram(
    "qcluster_leader_pass_seconds", "Duration of the leader's scheduling passes (read due "
    "jobs, record their fires, advance them; one fenced transaction).",
    buckets=PASS_BUCKETS)
DISPATCH_SECONDS = Histogram(
    "qcluster_dispatch_seconds", "Duration of the leader's dispatch calls to workers (send "
    "a batch of runs, the worker claims them, the reply).", buckets=PASS_BUCKETS)
DISPATCH_REFUSED = Counter(
    "qcluster_dispatch_refused_runs", "Runs of the leader's dispatch calls that a worker did "
    "not take, by reason: the worker's (busy, duplicate, already_claimed, "
    "database_unavailable, shutting_down, stale_epoch) or the call's (unreachable, "
    "refused_batch, bad_reply). Most are sent elsewhere or again.", ["reason"])
LEADER_CHANGES = Counter(
    "qcluster_leader_changes", "Terms this node began as the leader (summed over the nodes: "
    "the cluster's leader changes).")
IS_LEADER = Gauge("qcluster_is_leader", "1 while this node leads the cluster, else 0.")
EPOCH = Gauge("qcluster_epoch", "The epoch of this node's current term as leader (0: not "
              "leading).")
LIVE_WORKERS = Gauge(
    "qcluster_live_workers", "Workers the leader counts live (member heartbeats within "
    "the member timeout); set on the leader only.")
LATENESS = Histogram(
    "qcluster_run_lateness_seconds", "How late runs started on this worker: the start of "
    "the job's code minus its fire time (its due time when jittered).",
    buckets=LATENESS_BUCKETS)
RUN_SECONDS = Histogram(
    "qcluster_run_duration_seconds", "Duration of runs on this worker, start to end.",
    buckets=LATENESS_BUCKETS)
RUNS_FINISHED = Counter(
    "qcluster_runs_finished", "Runs this worker finished, by status (succeeded, failed, "
    "timed_out, cancelled, interrupted).", ["status"])
IN_FLIGHT = Gauge(
    "qcluster_worker_runs_in_flight", "Runs this worker holds: claimed, waiting for their "
    "time or a slot, or running.")
RECORDED_BY_LEADER = Counter(
    "qcluster_runs_recorded_by_leader", "Runs the leader recorded without a worker's "
    "outcome, by status (missed: not started within the grace; lost: its worker died).",
    ["status"])
DATABASE_ERRORS = Counter(
    "qcluster_database_errors", "Database calls of this node that failed because the "
    "database could not be reached or did not answer in time.")
BACKEND_ERRORS = Counter(
    "qcluster_backend_errors", "Calls to the coordination backend that failed, by backend "
    "(dblock, zookeeper, redis, joint) and operation (campaign, renew).",
    ["backend", "operation"])
BUILD = Gauge("qcluster_build_info", "Always 1; the version of qcluster this node runs.",
              ["version"])

try:
    _VERSION = version("qcluster")
except PackageNotFoundError:  # a source tree that is not installed
    _VERSION = "unknown"
BUILD.labels(version=_VERSION).set(1)
for _status in ("scheduled", "buffered"):  # the series a dashboard expects from the start
    FIRES.labels(status=_status, reason="on_time" if _status == "scheduled" else "buffered")
for _status in ("succeeded", "failed", "timed_out", "cancelled", "interrupted"):
    RUNS_FINISHED.labels(status=_status)


class MetricsServer:
    """The ``/metrics`` endpoint: ``prometheus_client``'s threaded HTTP server (a thread
    per connection, so a slow scraper holds only its own). :meth:`close` stops it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Listen and serve; the port (the one given, or the one the OS chose for 0 is not
        used: 0 means off). OSError if the address cannot be bound."""
        self._server, self._thread = start_http_server(self.port, addr=self.host)
        return int(self._server.server_address[1])

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
