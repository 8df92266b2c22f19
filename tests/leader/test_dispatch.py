"""The dispatcher (``qcluster.leader.dispatch.Dispatcher``) with fake workers: no Pyro5, no
database, no server.

Routing (round robin, least loaded by the load that workers report), a worker that
cannot be reached set aside while its runs go to the next one, a busy worker's runs sent
again, a stale epoch stopping it, a reply of the wrong shape treated as a failed dispatch
to that worker, and ``stop()``: nothing is sent after it returns.

The fakes reach the dispatcher through its ``connect`` seam: a callable from a worker's
URI to a proxy-like context manager (by default an authenticated Pyro5 proxy).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any, Self

import Pyro5.errors
import pytest

from backends.base import MemberInfo
from qcluster.leader.dispatch import Dispatcher
from qcluster.store.records import Refusal
from tests.helpers import wait_for

WAIT = 5.0

Reply = Callable[[int, list[dict[str, Any]]], object]


def accept_all(epoch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"accepted": [r["run_id"] for r in runs], "refused": [], "inflight": 0,
            "capacity": 4, "max_queue": 1000, "epoch": epoch}


def refuse_all(why: str, inflight: int = 0) -> Reply:
    def reply(epoch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
        return accept_all(epoch, []) | {"refused": [[r["run_id"], why] for r in runs],
                                        "inflight": inflight}
    return reply


class FakeWorker:
    """What a worker's ``submit`` answers, and every batch it was sent."""

    def __init__(self, name: str, capacity: int = 4, reply: Reply = accept_all) -> None:
        self.member = MemberInfo(name, f"{name}-session", ("worker",),
                                 f"PYRO:worker@{name}:1", capacity)
        self.reply = reply
        self.batches: list[list[dict[str, Any]]] = []
        self.opened = 0
        self.closed = 0
        self._lock = threading.Lock()

    def submit(self, epoch: int, runs: list[dict[str, Any]]) -> object:
        with self._lock:
            self.batches.append([dict(r) for r in runs])
        return self.reply(epoch, runs)

    def run_ids(self) -> list[int]:
        with self._lock:
            return [r["run_id"] for batch in self.batches for r in batch]


class _Proxy:
    """What ``connect`` returns: a context manager whose exit is the release."""

    def __init__(self, worker: FakeWorker) -> None:
        self._worker = worker
        worker.opened += 1

    def submit(self, epoch: int, runs: list[dict[str, Any]]) -> object:
        return self._worker.submit(epoch, list(runs))

    def _pyroClaimOwnership(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._worker.closed += 1


@pytest.fixture
def workers() -> dict[str, FakeWorker]:
    """The fake workers by URI; the dispatchers' ``connect`` reaches them."""
    return {}


def _add(workers: dict[str, FakeWorker], *made: FakeWorker) -> list[FakeWorker]:
    for w in made:
        workers[w.member.uri or ""] = w
    return list(made)


def _runs(first: int, count: int) -> list[Any]:
    """Run records as the scheduler hands them over: plain maps with the keys of the
    store's run record (whatever type the dispatcher names them by). Run ids start at 1."""
    return [{"run_id": i, "job_id": f"job-{i}", "func": "jobs.builtin:noop", "args": "[]",
             "kwargs": "{}", "scheduled_at": 1_000_000.0 + i, "attempt": 1, "epoch": 7,
             "recover": False} for i in range(first, first + count)]


def _dispatcher(
    members: list[FakeWorker], strategy: str = "round_robin", batch_size: int = 100
) -> tuple[Dispatcher, list[str]]:
    stale: list[str] = []
    by_uri = {w.member.uri: w for w in members}
    d = Dispatcher(epoch=7, secret="not-used", timeout=1.0, strategy=strategy,
                   batch_size=batch_size, members=lambda: [w.member for w in members],
                   on_stale=stale.append, connect=lambda uri: _Proxy(by_uri[uri]))
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
    d.submit(_runs(1, 30))  # queued before the loop starts: one batch of 30
    _start(started, d)
    wait_for(_all_sent([w1, w2, w3], 30), WAIT, 0.01, "30 runs sent")
    assert [len(w.run_ids()) for w in (w1, w2, w3)] == [10, 10, 10]
    assert sorted(w1.run_ids() + w2.run_ids() + w3.run_ids()) == list(range(1, 31))

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
    d.submit(_runs(1, 8))
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
    for first in (1, 11, 21):  # three batches, well inside the 2 s it is set aside
        d.submit(_runs(first, 10))
        wait_for(_all_sent([alive], first + 9), WAIT, 0.01, "runs sent")
    assert sorted(alive.run_ids()) == list(range(1, 31))
    assert len(dead.batches) == 1  # tried once, then left aside
    assert stale == []


def test_a_worker_whose_call_hangs_does_not_hold_the_others_runs(
    workers: dict[str, FakeWorker], started: list[Dispatcher]
) -> None:
    """Issue 14 point 12 (an attack found 10 s stalls): a worker whose claim hangs (its
    database path stalled, not cut) gets its batch's runs taken to the other worker after
    SEND_WAIT, and nothing more until it answers; then it is used again."""
    release = threading.Event()

    def hangs(epoch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
        release.wait(30)
        return accept_all(epoch, runs)

    stuck, alive = _add(workers, FakeWorker("stuck", reply=hangs), FakeWorker("alive"))
    d, _ = _dispatcher([stuck, alive])
    _start(started, d)
    d.submit(_runs(1, 10))
    # While its call still hangs (not released): a stall would wait for it, 30 s.
    wait_for(_all_sent([alive], 10), WAIT, 0.01, "the stuck worker's runs sent elsewhere")
    assert not release.is_set()
    d.submit(_runs(11, 10))
    wait_for(_all_sent([alive], 20), WAIT, 0.01, "the next batch, to the other worker only")
    assert len(stuck.batches) == 1, "a second call went to a worker whose call hangs"
    release.set()
    wait_for(lambda: not d._busy, WAIT, 0.01, "the stuck worker to answer")
    d.submit(_runs(21, 10))
    wait_for(lambda: len(stuck.batches) > 1 or len(alive.run_ids()) >= 30, WAIT, 0.01,
             "the third batch")
    assert len(alive.run_ids()) + len(stuck.run_ids()) >= 30


@pytest.mark.parametrize("why", [Refusal.BUSY, Refusal.SHUTTING_DOWN, Refusal.UNAVAILABLE])
def test_a_busy_workers_runs_are_sent_again(
    workers: dict[str, FakeWorker], started: list[Dispatcher], why: Refusal
) -> None:
    refusals = iter([True])

    def busy_once(epoch: int, runs: list[dict[str, Any]]) -> object:
        if next(refusals, False):
            return refuse_all(why, inflight=4)(epoch, runs)
        return accept_all(epoch, runs)

    (worker,) = _add(workers, FakeWorker("w1", reply=busy_once))
    d, _ = _dispatcher([worker])
    d.submit(_runs(1, 5))
    _start(started, d)
    wait_for(lambda: len(worker.batches) >= 2, WAIT, 0.01, "the runs sent again")
    assert worker.batches[0] == worker.batches[1] == _runs(1, 5)
    wait_for(lambda: d.sent == 5, WAIT, 0.01, "5 runs accepted")


@pytest.mark.parametrize("why", [Refusal.DUPLICATE, Refusal.ALREADY_CLAIMED])
def test_runs_another_claim_has_are_not_sent_again(
    workers: dict[str, FakeWorker], started: list[Dispatcher], why: Refusal
) -> None:
    w1, w2 = _add(workers, FakeWorker("w1", reply=refuse_all(why)), FakeWorker("w2"))
    d, stale = _dispatcher([w1, w2], batch_size=1)
    d.submit(_runs(1, 2))  # one to each
    _start(started, d)
    wait_for(_all_sent([w1, w2], 2), WAIT, 0.01, "2 runs sent")
    time.sleep(0.5)
    assert (len(w1.run_ids()), len(w2.run_ids()), d.sent) == (1, 1, 1)
    assert stale == []


def test_a_stale_epoch_stops_the_dispatcher_and_calls_on_stale(
    workers: dict[str, FakeWorker], started: list[Dispatcher]
) -> None:
    (worker,) = _add(workers, FakeWorker("w1", reply=refuse_all(Refusal.STALE_EPOCH)))
    d, stale = _dispatcher([worker], batch_size=1)
    d.submit(_runs(1, 3))
    _start(started, d)
    wait_for(lambda: stale, WAIT, 0.01, "on_stale")
    assert "newer epoch" in stale[0]
    d.submit(_runs(10, 3))  # refused: it stopped
    assert d.pending() == 0
    assert len(worker.batches) == 1


def _answer(**change: Any) -> Reply:
    """accept_all's reply to a batch, with ``change`` applied (a callable value gets the
    run ids sent)."""
    def reply(epoch: int, runs: list[dict[str, Any]]) -> object:
        ids = [r["run_id"] for r in runs]
        return accept_all(epoch, runs) | {k: v(ids) if callable(v) else v
                                          for k, v in change.items()}
    return reply


def _extra_key(epoch: int, runs: list[dict[str, Any]]) -> object:
    return accept_all(epoch, runs) | {"extra": 1}


def _missing_key(epoch: int, runs: list[dict[str, Any]]) -> object:
    reply = accept_all(epoch, runs)
    del reply["inflight"]
    return reply


#: Replies a broken or hostile worker might send, each not one of the expected shape.
BAD_REPLIES: dict[str, Reply] = {
    "none": lambda epoch, runs: None,
    "text": lambda epoch, runs: "accepted",
    "list": lambda epoch, runs: [[r["run_id"]] for r in runs],
    "empty-map": lambda epoch, runs: {},
    "extra-key": _extra_key,
    "missing-key": _missing_key,
    "accepted-not-a-list": _answer(accepted=lambda ids: set(ids)),
    "accepted-bools": _answer(accepted=lambda ids: [True] * len(ids)),
    "accepted-ids-not-sent": _answer(accepted=lambda ids: [i + 1000 for i in ids]),
    "one-run-not-answered": _answer(accepted=lambda ids: ids[1:]),
    "one-run-answered-twice": _answer(accepted=lambda ids: [*ids[1:], ids[1]]),
    "accepted-and-refused": _answer(refused=lambda ids: [[ids[0], "busy"]]),
    "id-past-int64": _answer(accepted=lambda ids: [2**64, *ids[1:]]),
    "unknown-reason": _answer(accepted=[], refused=lambda ids: [[i, "nope"] for i in ids]),
    "reason-not-text": _answer(accepted=[], refused=lambda ids: [[i, ["busy"]] for i in ids]),
    "refusal-of-three": _answer(accepted=[], refused=lambda ids: [[i, "busy", 1] for i in ids]),
    "refusal-a-map": _answer(accepted=[], refused=lambda ids: [{i: "busy"} for i in ids]),
    "negative-inflight": _answer(inflight=-1),
    "inflight-as-text": _answer(inflight="3"),
    "huge-epoch": _answer(epoch=2**70),
}


@pytest.mark.parametrize("bad", sorted(BAD_REPLIES))
def test_a_reply_of_the_wrong_shape_is_a_failed_dispatch_to_that_worker(
    workers: dict[str, FakeWorker], started: list[Dispatcher], bad: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broken or hostile worker's reply neither kills the dispatcher's thread nor is
    believed: that worker is set aside (one log line) and its runs go to the next one."""
    liar, good = _add(workers, FakeWorker("liar", reply=BAD_REPLIES[bad]), FakeWorker("good"))
    d, stale = _dispatcher([liar, good])
    d.submit(_runs(1, 10))  # one batch: 5 runs for each worker
    _start(started, d)
    wait_for(_all_sent([good], 10), WAIT, 0.01, "the liar's runs sent to the other worker")
    assert sorted(good.run_ids()) == list(range(1, 11)) and len(liar.batches) == 1
    d.submit(_runs(11, 4))  # the thread still serves; the liar is still set aside
    wait_for(_all_sent([good], 14), WAIT, 0.01, "a later batch")
    assert len(liar.batches) == 1 and d.sent == 14 and stale == []
    (line,) = [r.getMessage() for r in caplog.records if "worker PYRO:worker@liar" in
               r.getMessage()]
    assert "sent a reply that is not one" in line and "\n" not in line, line


def test_proxies_come_from_connect_and_are_released_when_it_stops(
    workers: dict[str, FakeWorker], started: list[Dispatcher]
) -> None:
    w1, w2 = _add(workers, FakeWorker("w1"), FakeWorker("w2"))
    d, _ = _dispatcher([w1, w2], batch_size=1)
    d.submit(_runs(1, 6))
    _start(started, d)
    wait_for(_all_sent([w1, w2], 6), WAIT, 0.01, "6 runs sent")
    assert (w1.opened, w2.opened, w1.closed, w2.closed) == (1, 1, 0, 0)  # one per worker
    d.stop()
    wait_for(lambda: w1.closed == w2.closed == 1, WAIT, 0.01, "both proxies released")


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
    d.submit(_runs(1, 1))
    _start(started, d)
    assert entered.wait(WAIT)
    d.submit(_runs(10, 20))  # queued behind the send under way
    d.stop()
    assert d.pending() == 0  # the queue is dropped: those runs stay for the next leader
    d.submit(_runs(100, 5))  # after stop: refused
    assert d.pending() == 0
    release.set()  # the send under way returns; nothing may follow it
    time.sleep(0.5)
    assert w1.run_ids() + w2.run_ids() == [1]


class SlotWorker(FakeWorker):
    """A worker with ``capacity`` slots that holds what it accepts until ``finish``: its
    replies say how many it holds (as a real worker's ``inflight``)."""

    def __init__(self, name: str, capacity: int) -> None:
        super().__init__(name, capacity, reply=self._hold)
        self.held: list[int] = []

    def _hold(self, epoch: int, runs: list[dict[str, Any]]) -> dict[str, Any]:
        self.held.extend(r["run_id"] for r in runs)
        return accept_all(epoch, runs) | {"inflight": len(self.held),
                                          "capacity": self.member.capacity}

    def finish(self, count: int) -> None:
        with self._lock:
            del self.held[:count]


def test_bulk_runs_fill_only_free_slots_and_live_runs_go_first(
    workers: dict[str, FakeWorker], started: list[Dispatcher]
) -> None:
    """A backfill's runs (the bulk lane) never queue on a worker beyond its free slots,
    so a live fire submitted while the backfill waits is sent at once; a full worker is
    asked its load with an empty batch, and the backlog drains as its slots free up. The
    same (run, attempt) submitted twice to the bulk lane is sent once."""
    w = _add(workers, SlotWorker("w", capacity=2))[0]
    assert isinstance(w, SlotWorker)
    d, _ = _dispatcher([w])
    d.submit(_runs(1, 10), bulk=True)
    d.submit(_runs(1, 10), bulk=True)  # recovery hands the same ones again
    _start(started, d)
    wait_for(lambda: len(w.run_ids()) == 2, WAIT, 0.01, "2 bulk runs sent")
    time.sleep(1.2)  # more than two probes' worth
    assert w.run_ids() == [1, 2] and d.pending() == 8
    assert any(batch == [] for batch in w.batches)  # asked its load, sent nothing
    d.submit(_runs(100, 1))  # a live fire: not behind the 8 waiting bulk runs
    wait_for(lambda: 100 in w.run_ids(), WAIT, 0.01, "the live run sent")
    assert w.run_ids() == [1, 2, 100]
    for _ in range(5):
        w.finish(2)
        time.sleep(0.7)
    wait_for(lambda: len(w.run_ids()) == 11, WAIT, 0.05, "the backlog sent")
    assert sorted(w.run_ids()) == [*range(1, 11), 100]  # each once
    assert max(len(b) for b in w.batches) <= 2 and d.pending() == 0
