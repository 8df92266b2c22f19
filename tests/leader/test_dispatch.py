"""The dispatcher (``qcluster.leader.dispatch.Dispatcher``) with fake workers: no Pyro5, no
database, no server.

Routing (round robin, least loaded by the load that workers report), a worker that
cannot be reached set aside while its runs go to the next one, a busy worker's runs sent
again, a stale epoch stopping it, and ``stop()``: nothing is sent after it returns.

The dispatcher builds its Pyro5 proxies itself (``qcluster.rpc.pyro.proxy``, imported by
``qcluster.leader.dispatch``), so the fakes replace that name with ``monkeypatch``. A
``connect`` argument of the constructor would be the cleaner seam.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import Pyro5.errors
import pytest

import qcluster.leader.dispatch as dispatch
from backends.base import MemberInfo
from qcluster.leader.dispatch import Dispatcher
from tests.helpers import wait_for

WAIT = 5.0

Reply = Callable[[int, list[dict[str, Any]]], dict[str, Any]]


def accept_all(epoch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"accepted": [r["run_id"] for r in runs], "refused": [], "inflight": 0}


class FakeWorker:
    """What a worker's ``submit`` answers, and every batch it was sent."""

    def __init__(self, name: str, capacity: int = 4, reply: Reply = accept_all) -> None:
        self.member = MemberInfo(name, f"{name}-session", ("worker",),
                                 f"PYRO:worker@{name}:1", capacity)
        self.reply = reply
        self.batches: list[list[dict[str, Any]]] = []
        self._lock = threading.Lock()

    def submit(self, epoch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
        with self._lock:
            self.batches.append([dict(r) for r in runs])
        return self.reply(epoch, runs)

    def run_ids(self) -> list[int]:
        with self._lock:
            return [r["run_id"] for batch in self.batches for r in batch]


class _Proxy:
    def __init__(self, worker: FakeWorker) -> None:
        self._worker = worker

    def submit(self, epoch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
        return self._worker.submit(epoch, list(runs))

    def _pyroClaimOwnership(self) -> None:
        pass

    def _pyroRelease(self) -> None:
        pass


@pytest.fixture
def workers(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeWorker]:
    """The fake workers by URI; the dispatcher's proxies reach them."""
    found: dict[str, FakeWorker] = {}

    def fake_proxy(uri: str, secret: str, timeout: float) -> _Proxy:
        return _Proxy(found[uri])

    monkeypatch.setattr(dispatch, "proxy", fake_proxy)
    return found


def _add(workers: dict[str, FakeWorker], *made: FakeWorker) -> list[FakeWorker]:
    for w in made:
        workers[w.member.uri or ""] = w
    return list(made)


def _runs(first: int, count: int) -> list[Any]:
    """Run records as the scheduler hands them over: plain maps with the keys of the
    store's run record (whatever type the dispatcher names them by)."""
    return [{"run_id": i, "job_id": f"job-{i}", "func": "jobs.builtin:noop", "args": "[]",
             "kwargs": "{}", "scheduled_at": 1_000_000.0 + i, "attempt": 1, "epoch": 7,
             "recover": False} for i in range(first, first + count)]


def _dispatcher(
    members: list[FakeWorker], strategy: str = "round_robin", batch_size: int = 100
) -> tuple[Dispatcher, list[str]]:
    stale: list[str] = []
    d = Dispatcher(epoch=7, secret="not-used", timeout=1.0, strategy=strategy,
                   batch_size=batch_size, members=lambda: [w.member for w in members],
                   on_stale=stale.append)
    return d, stale


@pytest.fixture
def started() -> Iterator[list[Dispatcher]]:
    """Dispatchers to stop after the test, whatever it asserted."""
    made: list[Dispatcher] = []
    yield made
    for d in made:
        d.stop()


def _start(started: list[Dispatcher], d: Dispatcher) -> Dispatcher:
    started.append(d)
    d.start()
    return d


def _all_sent(workers: list[FakeWorker], count: int) -> Callable[[], bool]:
    return lambda: sum(len(w.run_ids()) for w in workers) >= count


def test_round_robin_splits_a_batch_evenly_and_turns_between_batches(
    workers: dict[str, FakeWorker], started: list[Dispatcher]
) -> None:
    w1, w2, w3 = _add(workers, FakeWorker("w1"), FakeWorker("w2"), FakeWorker("w3"))
    d, stale = _dispatcher([w1, w2, w3])
    d.submit(_runs(0, 30))  # queued before the loop starts: one batch of 30
    _start(started, d)
    wait_for(_all_sent([w1, w2, w3], 30), WAIT, 0.01, "30 runs sent")
    assert [len(w.run_ids()) for w in (w1, w2, w3)] == [10, 10, 10]
    assert sorted(w1.run_ids() + w2.run_ids() + w3.run_ids()) == list(range(30))

    one_by_one, _ = _dispatcher([w1, w2, w3], batch_size=1)
    before = {w.member.node_id: len(w.run_ids()) for w in (w1, w2, w3)}
    one_by_one.submit(_runs(100, 3))
    _start(started, one_by_one)
    wait_for(_all_sent([w1, w2, w3], 33), WAIT, 0.01, "3 more runs sent")
    # Three batches of one: each goes to the next worker in turn.
    assert all(len(w.run_ids()) == before[w.member.node_id] + 1 for w in (w1, w2, w3))
    assert stale == []


def test_least_loaded_routes_by_load_per_capacity_and_follows_reported_load(
    workers: dict[str, FakeWorker], started: list[Dispatcher]
) -> None:
    busy = {"small": 0}

    def small_reply(epoch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
        return accept_all(epoch, runs) | {"inflight": busy["small"]}

    small, big = _add(workers, FakeWorker("small", capacity=1, reply=small_reply),
                      FakeWorker("big", capacity=3))
    d, _ = _dispatcher([small, big], strategy="least_loaded")
    d.submit(_runs(0, 8))
    _start(started, d)
    wait_for(_all_sent([small, big], 8), WAIT, 0.01, "8 runs sent")
    assert (len(small.run_ids()), len(big.run_ids())) == (2, 6)  # 1:3, as the capacities

    busy["small"] = 50  # its next reply says it is swamped
    d.submit(_runs(100, 4))
    wait_for(_all_sent([small, big], 12), WAIT, 0.01, "4 more runs sent")
    busy["small"] = 0
    d.submit(_runs(200, 4))
    wait_for(_all_sent([small, big], 16), WAIT, 0.01, "4 more runs sent")
    assert [i for i in small.run_ids() if i >= 200] == []  # the load it reported counts


def test_an_unreachable_worker_is_set_aside_and_its_runs_go_to_the_next_one(
    workers: dict[str, FakeWorker], started: list[Dispatcher]
) -> None:
    def unreachable(epoch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
        raise Pyro5.errors.CommunicationError("connection refused")

    dead, alive = _add(workers, FakeWorker("dead", reply=unreachable), FakeWorker("alive"))
    d, stale = _dispatcher([dead, alive])
    _start(started, d)
    for first in (0, 10, 20):  # three batches, well inside the 2 s it is set aside
        d.submit(_runs(first, 10))
        wait_for(_all_sent([alive], first + 10), WAIT, 0.01, "runs sent")
    assert sorted(alive.run_ids()) == list(range(30))
    assert len(dead.batches) == 1  # tried once, then left aside
    assert stale == []


def test_a_busy_workers_runs_are_sent_again(
    workers: dict[str, FakeWorker], started: list[Dispatcher]
) -> None:
    refusals = iter([True])

    def busy_once(epoch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
        if next(refusals, False):
            return {"accepted": [], "refused": [[r["run_id"], "busy"] for r in runs],
                    "inflight": 4}
        return accept_all(epoch, runs)

    (worker,) = _add(workers, FakeWorker("w1", reply=busy_once))
    d, _ = _dispatcher([worker])
    d.submit(_runs(0, 5))
    _start(started, d)
    wait_for(lambda: len(worker.batches) >= 2, WAIT, 0.01, "the runs sent again")
    assert worker.batches[0] == worker.batches[1] == _runs(0, 5)
    wait_for(lambda: d.sent == 5, WAIT, 0.01, "5 runs accepted")


def test_a_stale_epoch_stops_the_dispatcher_and_calls_on_stale(
    workers: dict[str, FakeWorker], started: list[Dispatcher]
) -> None:
    def newer_epoch_seen(epoch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
        return {"accepted": [], "refused": [[r["run_id"], "stale epoch"] for r in runs]}

    (worker,) = _add(workers, FakeWorker("w1", reply=newer_epoch_seen))
    d, stale = _dispatcher([worker], batch_size=1)
    d.submit(_runs(0, 3))
    _start(started, d)
    wait_for(lambda: stale, WAIT, 0.01, "on_stale")
    assert "newer epoch" in stale[0]
    d.submit(_runs(10, 3))  # refused: it stopped
    assert d.pending() == 0
    assert len(worker.batches) == 1


def test_nothing_is_sent_after_stop_returns(
    workers: dict[str, FakeWorker], started: list[Dispatcher]
) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(epoch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
        entered.set()
        release.wait(WAIT)  # a send under way while the leader steps down
        return accept_all(epoch, runs)

    w1, w2 = _add(workers, FakeWorker("w1", reply=slow), FakeWorker("w2", reply=slow))
    d, _ = _dispatcher([w1, w2], batch_size=1)
    d.submit(_runs(0, 1))
    _start(started, d)
    assert entered.wait(WAIT)
    d.submit(_runs(10, 20))  # queued behind the send under way
    d.stop()
    assert d.pending() == 0  # the queue is dropped: those runs stay for the next leader
    d.submit(_runs(100, 5))  # after stop: refused
    assert d.pending() == 0
    release.set()  # the send under way returns; nothing may follow it
    time.sleep(0.5)
    assert w1.run_ids() + w2.run_ids() == [0]
