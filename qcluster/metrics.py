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

import collections
import contextlib
import logging
import socket
import sys
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import Counter, Gauge, Histogram, make_wsgi_app

from qcluster.peers import client_key

log = logging.getLogger(__name__)

#: Lateness and other waits, in seconds: 1 ms to 2 min (a lateness past the misfire
#: grace is a missed run; the last bucket catches slow recoveries).
LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0)
#: Durations of the leader's pass and of a dispatch call.
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

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
#: Every (status, reason) a fire time is recorded with: each series exists from the start,
#: at 0, so that a rate or a sum over it is never empty (an alert on the first miss).
FIRE_KINDS = (("scheduled", "on_time"), ("buffered", "buffered"),
              ("buffered", "overlap_cancel_other"), ("missed", "late"),
              ("missed", "coalesced"), ("missed", "misfire_skip"), ("skipped", "excluded"),
              ("skipped", "overlap_skip"), ("skipped", "overlap_buffer_one"),
              ("skipped", "overlap_cancel_other"), ("scheduled", "after_parents"),
              ("skipped", "after_parents"), ("missed", "after_parents"),
              ("missed", "no_worker"))
for _status, _reason in FIRE_KINDS:
    FIRES.labels(status=_status, reason=_reason)
for _status in ("succeeded", "failed", "timed_out", "cancelled", "interrupted"):
    RUNS_FINISHED.labels(status=_status)
for _status in ("missed", "lost"):
    RECORDED_BY_LEADER.labels(status=_status)
for _reason in ("busy", "duplicate", "already_claimed", "database_unavailable",
                "shutting_down", "stale_epoch", "unreachable", "refused_batch", "bad_reply"):
    DISPATCH_REFUSED.labels(reason=_reason)


#: Connections the endpoint serves at once; more are closed at once, unanswered.
MAX_CONNECTIONS = 128
#: Connections one address may hold at once (a scraper needs one).
MAX_PER_ADDRESS = 4
#: Seconds a connection may take in all (request and answer); then it is cut.
CONNECTION_SECONDS = 3.0
#: Seconds one read of a request may wait.
READ_SECONDS = 2.0


class _Handler(WSGIRequestHandler):
    timeout = READ_SECONDS  # each read of the request

    def log_message(self, format: str, *args: Any) -> None:
        """Nothing per request: a scraper every few seconds would flood the node's log."""


class _Server(ThreadingMixIn, WSGIServer):
    """``wsgiref``'s server with a thread per connection, as ``prometheus_client``'s own,
    but bounded: at most :data:`MAX_CONNECTIONS` at once and :data:`MAX_PER_ADDRESS`
    from one address (the others are closed at once), each cut after
    :data:`CONNECTION_SECONDS` in all, so that silent, slow or many peers cost a bounded
    number of threads for a bounded time, and one address's cannot keep a scraper's
    out."""

    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        self._open: dict[socket.socket, tuple[float, str]] = {}
        self._by_address: collections.Counter[str] = collections.Counter()
        self._open_lock = threading.Lock()
        self._stopping = threading.Event()  # before the bind: a failed one closes the server
        super().__init__(address, _Handler)
        self._reaper = threading.Thread(target=self._reap, name="qc-metrics-reaper",
                                        daemon=True)
        self._reaper.start()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = client_key(str(client_address[0])) if client_address else ""
        with self._open_lock:
            if len(self._open) >= MAX_CONNECTIONS or self._by_address[peer] >= MAX_PER_ADDRESS:
                return False  # closed unanswered: the others are served
            self._open[request] = (time.monotonic() + CONNECTION_SECONDS, peer)
            self._by_address[peer] += 1
        return True

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            entry = self._open.pop(request, None)
            if entry is not None:
                self._by_address[entry[1]] -= 1
                if self._by_address[entry[1]] <= 0:
                    del self._by_address[entry[1]]
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A peer that went away or was cut: one debug line, no traceback."""
        log.debug("metrics request from %s ended: %s", client_address, sys.exc_info()[1])

    def _reap(self) -> None:
        while not self._stopping.wait(0.5):
            now = time.monotonic()
            with self._open_lock:
                late = [sock for sock, (deadline, _peer) in self._open.items()
                        if deadline <= now]
            for sock in late:  # its thread's read or write fails at once, and it ends
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def server_close(self) -> None:
        self._stopping.set()
        super().server_close()


def _only_metrics(app: Any) -> Any:
    """``app`` at ``/metrics`` (and ``/``, where prometheus_client answers too), 404
    elsewhere."""
    def serve(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO", "") not in ("/metrics", "/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: the metrics are at /metrics\n"]
        return app(environ, start_response)
    return serve


class MetricsServer:
    """The ``/metrics`` endpoint (:class:`_Server`); :meth:`close` stops it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Listen and serve on a thread of its own; OSError if the address cannot be
        bound (in use, not this machine's, a name that does not resolve)."""
        infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        server = _Server((str(address[0]), self.port), family)
        server.set_app(_only_metrics(make_wsgi_app()))
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.5,),
                                        name="qc-metrics", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
