"""Where a run may go (issue 16, items 2, 3 and 6): the dispatcher with fake workers reads
each run's routing (``RunRecord["routing"]``, its row's ``qc_runs.routing``).

Tags send a run only to a live worker that has them all; a run no live worker can take is
parked, without holding up any other run, and goes once a worker with its tags joins. An
affinity group's runs all go to the one worker the group sits on, wait for it while it is
busy, and move together (written through ``groups`` first) when it is no longer a member;
a new dispatcher (a new leader) keeps the placement it reads. A job's own ``route`` picks
its strategy. The routing never travels to a worker.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from backends.base import MemberInfo
from qcluster.leader import dispatch
from qcluster.leader.dispatch import Dispatcher
from qcluster.store.records import UNREADABLE, routing_of
from tests.helpers import wait_for
from tests.leader.test_dispatch import (
    WAIT,
    FakeWorker,
    _add,
    _dispatcher,
    _runs,
    _start,
    accept_all,
    refuse_all,
    started,  # noqa: F401  (a fixture)
    workers,  # noqa: F401  (a fixture)
)
from tests.leader.test_dispatch import (
    _Proxy as Proxy,
)


def tagged(name: str, *tags: str) -> FakeWorker:
    w = FakeWorker(name)
    m = w.member
    w.member = MemberInfo(m.node_id, m.session, m.roles, m.uri, m.capacity, tags=tags)
    return w


def routed(first: int, count: int, **routing: Any) -> list[Any]:
    text = json.dumps(routing, sort_keys=True, separators=(",", ":"))
    return [{**r, "routing": text} for r in _runs(first, count)]


class FakeGroups:
    """``qc_groups`` as a dict; ``fail`` makes the next writes raise."""

    def __init__(self, placed: dict[str, str] | None = None) -> None:
        self.placed = dict(placed or {})
        self.writes: list[tuple[str, str]] = []
        self.fail = False
        self._lock = threading.Lock()

    def load(self) -> dict[str, str]:
        with self._lock:
            return dict(self.placed)

    def place(self, group: str, node_id: str) -> None:
        with self._lock:
            if self.fail:
                raise RuntimeError("the database does not answer")
            self.placed[group] = node_id
            self.writes.append((group, node_id))


def _with(members: list[FakeWorker], groups: FakeGroups | None = None,
          strategy: str = "round_robin", batch_size: int = 100) -> Dispatcher:
    """A dispatcher whose member list is ``members`` as it is when read (a test may change
    it), with ``groups``."""
    d, _ = _dispatcher(members, strategy=strategy, batch_size=batch_size)
    d.members = lambda: [w.member for w in members]
    d.connect = lambda uri: Proxy(next(w for w in members if w.member.uri == uri))
    d.groups = groups
    return d


def _sent(*ws: FakeWorker) -> set[int]:
    return {i for w in ws for i in w.run_ids()}


def test_tags_send_a_run_only_to_a_worker_with_all_of_them(
    workers: dict[str, FakeWorker], started: list[Dispatcher],  # noqa: F811
) -> None:
    gpu, plain, both = _add(workers, tagged("gpu", "gpu"), tagged("plain"),
                            tagged("both", "eu", "gpu"))
    d = _with([gpu, plain, both], batch_size=7)
    d.submit(routed(1, 40, tags=["gpu"]) + routed(100, 20, tags=["eu", "gpu"]) + _runs(200, 30))
    _start(started, d)
    wait_for(lambda: len(_sent(gpu, plain, both)) == 90, WAIT, 0.01, "90 runs sent")
    assert not [i for i in plain.run_ids() if i < 200], "a tagged run went to a worker without"
    assert not [i for i in gpu.run_ids() if 100 <= i < 200], "eu+gpu went to a gpu-only worker"
    assert {i for i in gpu.run_ids() if i < 100} and {i for i in both.run_ids() if i < 100}
    assert [i for i in plain.run_ids() if i >= 200], "untagged runs go to every worker"
    # What travels is the record of nine keys: the routing is the leader's own.
    assert all("routing" not in r for w in (gpu, plain, both) for b in w.batches for r in b)


def test_a_run_no_live_worker_can_take_is_parked_and_holds_up_nobody(
    workers: dict[str, FakeWorker], started: list[Dispatcher],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatch, "REFRESH_WORKERS", 0.05)
    w1 = _add(workers, tagged("w1", "eu"))[0]
    members = [w1]
    d = _with(members, batch_size=5)
    _start(started, d)
    d.submit(routed(1, 10, tags=["tpu"]))
    d.submit(_runs(100, 10))
    wait_for(lambda: _sent(w1) == set(range(100, 110)), WAIT, 0.01, "the untagged runs")
    assert d.pending() == 10  # parked, and parked once each
    d.submit(routed(1, 10, tags=["tpu"]))  # recovery hands them over again: parked once
    wait_for(lambda: d.pending() == 10, WAIT, 0.01, "the same runs parked once")
    tpu = _add(workers, tagged("tpu", "tpu"))[0]
    members.append(tpu)  # a worker with the tag joins: the parked runs go to it
    wait_for(lambda: _sent(tpu) == set(range(1, 11)), WAIT, 0.01, "the parked runs sent")
    assert _sent(w1) == set(range(100, 110)) and d.pending() == 0


def test_a_group_sits_on_one_worker_waits_for_it_and_moves_together_when_it_goes(
    workers: dict[str, FakeWorker], started: list[Dispatcher],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatch, "REFRESH_WORKERS", 0.05)
    refusals = iter([True, True])

    def busy_twice(epoch: int, runs: list[dict[str, Any]]) -> object:
        if next(refusals, False):
            return refuse_all("busy", inflight=4)(epoch, runs)
        return accept_all(epoch, runs)

    ws = _add(workers, *(FakeWorker(f"w{i}", reply=busy_twice) for i in range(3)))
    members = list(ws)
    groups = FakeGroups()
    d = _with(members, groups, batch_size=4)
    _start(started, d)
    d.submit(routed(1, 30, group="etl") + _runs(100, 30))
    wait_for(lambda: len(_sent(*ws)) == 60, WAIT, 0.01, "60 runs sent")
    (home,) = [w for w in ws if set(range(1, 31)) <= _sent(w)]
    assert [w for w in ws if w is not home and _sent(w) & set(range(1, 31))] == []
    assert groups.writes == [("etl", home.member.node_id)]
    # Refused busy (twice, by whichever got the first batches): the group's runs waited
    # for their worker; the untagged ones went wherever.
    members.remove(home)  # its session ends
    time.sleep(0.2)  # the dispatcher reads the member list again (REFRESH_WORKERS)
    d.submit(routed(31, 20, group="etl"))
    wait_for(lambda: len(_sent(*ws)) == 80, WAIT, 0.01, "20 more runs sent")
    (new,) = [w for w in ws if set(range(31, 51)) <= _sent(w)]
    assert new is not home and not (_sent(home) & set(range(31, 51)))
    assert groups.writes == [("etl", home.member.node_id), ("etl", new.member.node_id)]
    assert d.placements() == {"etl": new.member.node_id}


def test_a_new_leader_keeps_the_placement_it_reads(
    workers: dict[str, FakeWorker], started: list[Dispatcher],  # noqa: F811
) -> None:
    ws = _add(workers, *(FakeWorker(f"w{i}") for i in range(3)))
    for node in ("w0", "w1", "w2"):
        groups = FakeGroups({"etl": node})
        d = _with(ws, groups)
        first = 1 + 100 * int(node[1])
        d.submit(routed(first, 10, group="etl"))
        _start(started, d)
        wait_for(lambda f=first: set(range(f, f + 10)) <= _sent(*ws), WAIT, 0.01, "10 runs")
        assert set(range(first, first + 10)) <= _sent(workers[f"PYRO:worker@{node}:1"])
        assert groups.writes == []  # read, not written again


def test_a_group_that_cannot_be_placed_sends_nothing_and_tries_again(
    workers: dict[str, FakeWorker], started: list[Dispatcher],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dispatch, "GROUP_RETRY", 0.1)
    ws = _add(workers, FakeWorker("w0"), FakeWorker("w1"))
    groups = FakeGroups()
    groups.fail = True
    d = _with(ws, groups)
    _start(started, d)
    d.submit(routed(1, 5, group="etl") + _runs(100, 5))
    wait_for(lambda: len(_sent(*ws)) == 5, WAIT, 0.01, "the untagged runs")
    assert _sent(*ws) == set(range(100, 105))  # none of the group's: it sits nowhere yet
    groups.fail = False
    wait_for(lambda: len(_sent(*ws)) == 10, WAIT, 0.01, "the group's runs, once placed")
    (home,) = [w for w in ws if set(range(1, 6)) <= _sent(w)]
    assert groups.placed == {"etl": home.member.node_id}


def test_a_group_whose_worker_lacks_a_jobs_tags_parks_that_jobs_runs(
    workers: dict[str, FakeWorker], started: list[Dispatcher],  # noqa: F811
) -> None:
    plain, gpu = _add(workers, tagged("plain"), tagged("gpu", "gpu"))
    d = _with([plain, gpu], FakeGroups({"etl": "plain"}))
    _start(started, d)
    d.submit(routed(1, 3, group="etl", tags=["gpu"]) + routed(10, 3, group="etl"))
    wait_for(lambda: _sent(plain) == {10, 11, 12}, WAIT, 0.01, "the group's other runs")
    assert d.pending() == 3 and not _sent(gpu)  # not moved for one job: affinity first


def test_a_jobs_own_route_picks_its_strategy(
    workers: dict[str, FakeWorker], started: list[Dispatcher],  # noqa: F811
) -> None:
    ws = _add(workers, *(FakeWorker(f"w{i}") for i in range(3)))
    d = _with(ws, strategy="round_robin", batch_size=30)
    d.submit(routed(1, 15, route="first") + _runs(100, 15))
    _start(started, d)
    wait_for(lambda: len(_sent(*ws)) == 30, WAIT, 0.01, "30 runs sent")
    assert set(range(1, 16)) <= _sent(ws[0])  # all on the first by node id
    assert all(_sent(w) & set(range(100, 115)) for w in ws)  # round robin for the others


def test_bulk_runs_keep_their_tags(
    workers: dict[str, FakeWorker], started: list[Dispatcher],  # noqa: F811
) -> None:
    plain, gpu = _add(workers, tagged("plain"), tagged("gpu", "gpu"))
    d = _with([plain, gpu])
    d.submit(routed(1, 6, tags=["gpu"]) + _runs(100, 6), bulk=True)
    _start(started, d)
    wait_for(lambda: len(_sent(plain, gpu)) == 12, WAIT, 0.01, "12 bulk runs sent")
    assert set(range(1, 7)) <= _sent(gpu) and not (_sent(plain) & set(range(1, 7)))


@pytest.mark.parametrize("text", ["{", "[]", '{"tags": "gpu"}', '{"group": 3}', "null"])
def test_a_routing_text_that_cannot_be_read_goes_nowhere(text: str) -> None:
    assert routing_of(text) == UNREADABLE
