"""The routers of ``[dispatch] strategy`` (``qcluster/leader/routing.py``), alone and in the
dispatcher with fake workers: each gives every run to exactly one of the workers offered;
``consistent_hash`` keeps a job on its worker across leaders (new router objects) and moves
only a gone worker's jobs; ``first`` fills the first worker and fails over to the next; a
user's router class is loaded by name, and a bad one is a one-line ConfigError; a router
that leaves a run out, or gives it twice or to a stranger, loses and doubles nothing."""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.base import MemberInfo
from qcluster.errors import ConfigError
from qcluster.leader import routing
from qcluster.leader.dispatch import Dispatcher
from qcluster.settings import load_settings_from_mapping
from qcluster.settings.model import DISPATCH_STRATEGIES
from tests.helpers import run_cli, wait_for, write_config
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


def member(name: str, capacity: int = 4) -> MemberInfo:
    return MemberInfo(name, f"{name}-s", ("worker",), f"PYRO:w@{name}:1", capacity)


def runs_of(jobs: Sequence[str]) -> list[Any]:
    return [{"run_id": i + 1, "job_id": j, "func": "jobs.builtin:noop", "args": "[]",
             "kwargs": "{}", "scheduled_at": 1.0, "attempt": 1, "epoch": 1, "recover": False}
            for i, j in enumerate(jobs)]


def test_every_named_strategy_has_a_router() -> None:
    assert set(routing.STRATEGIES) == set(DISPATCH_STRATEGIES)


@pytest.mark.parametrize("strategy", DISPATCH_STRATEGIES)
@given(jobs=st.lists(st.text(min_size=1, max_size=8), max_size=60),
       count=st.integers(1, 5))
def test_each_run_goes_to_exactly_one_offered_worker(strategy: str, jobs: list[str],
                                                     count: int) -> None:
    offered = [member(f"w{i}") for i in range(count)]
    runs = runs_of(jobs)
    routes = routing.make_router(strategy).route(runs, offered, {})
    assert set(routes) <= {w.uri for w in offered}
    given_ids = sorted(r["run_id"] for chunk in routes.values() for r in chunk)
    assert given_ids == [r["run_id"] for r in runs]


def test_consistent_hash_keeps_each_job_on_its_worker_across_leaders() -> None:
    offered = [member(f"w{i}") for i in range(3)]
    jobs = [f"job-{i}" for i in range(300)]

    def placement(router: routing.Router, live: list[MemberInfo]) -> dict[str, str]:
        routes = router.route(runs_of(jobs), live, {})
        return {r["job_id"]: uri for uri, chunk in routes.items() for r in chunk}

    before = placement(routing.make_router("consistent_hash"), offered)
    assert placement(routing.make_router("consistent_hash"), offered) == before  # new leader
    assert len(set(before.values())) == 3  # all three used
    gone = offered[1].uri
    after = placement(routing.make_router("consistent_hash"), [offered[0], offered[2]])
    moved = {j for j in jobs if before[j] != after[j]}
    assert moved == {j for j in jobs if before[j] == gone}  # only the gone worker's jobs
    assert placement(routing.make_router("consistent_hash"), offered) == before  # it is back


def test_first_gives_everything_to_the_first_by_node_id_and_fails_over(
        workers: dict[str, FakeWorker], started: list[Dispatcher]) -> None:  # noqa: F811
    full = FakeWorker("a-full", reply=refuse_all("busy", inflight=4))
    b, c = FakeWorker("b"), FakeWorker("c")
    _add(workers, c, full, b)
    d, _ = _dispatcher([c, full, b], strategy="first")
    d.submit(_runs(1, 20))
    _start(started, d)
    wait_for(lambda: d.sent == 20, WAIT, 0.01, "20 runs accepted")
    assert full.run_ids() and sorted(b.run_ids()) == list(range(1, 21)) and not c.run_ids()


class LeavesOut:
    """A router of a user's that gives the odd runs to nobody, the even twice, and one to a
    worker that is not offered."""

    calls = 0

    def route(self, runs: Sequence[Any], offered: Sequence[MemberInfo],
              load: Mapping[str, float]) -> dict[str, list[Any]]:
        LeavesOut.calls += 1
        even = [r for r in runs if r["run_id"] % 2 == 0]
        odd = [r for r in runs if r["run_id"] % 2]
        out = {offered[0].uri or "": even + even, "PYRO:w@stranger:1": list(runs)}
        if LeavesOut.calls > 1:  # from the second try on, the odd ones too
            out[offered[-1].uri or ""] = odd
        return out


def _through_two_workers(fakes: dict[str, FakeWorker], running: list[Dispatcher],
                         router: str, count: int) -> list[int]:
    """Send ``count`` runs with this module's ``router`` over two fake workers; the run
    ids each was sent, once all were accepted."""
    a, b = FakeWorker("a"), FakeWorker("b")
    _add(fakes, a, b)
    d, _ = _dispatcher([a, b], strategy=f"{__name__}:{router}")
    d.submit(_runs(1, count))
    _start(running, d)
    wait_for(lambda: d.sent == count, WAIT, 0.01, f"{count} runs accepted")
    return a.run_ids() + b.run_ids()


class NotARouter:
    pass


def test_a_users_router_loses_and_doubles_nothing(
        workers: dict[str, FakeWorker], started: list[Dispatcher]) -> None:  # noqa: F811
    LeavesOut.calls = 0
    sent = collections.Counter(_through_two_workers(workers, started, "LeavesOut", 10))
    assert sorted(sent) == list(range(1, 11)) and set(sent.values()) == {1}


@pytest.mark.parametrize(("strategy", "words"), [
    (f"{__name__}:NotARouter", "no route"), (f"{__name__}:Missing", "no attribute"),
    ("no_such_module_here:Router", "cannot import"),
])
def test_a_bad_router_class_is_a_one_line_config_error(strategy: str, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        routing.make_router(strategy)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value", ["fastest", "module", "a b:C", ":C", ""])
def test_the_strategy_setting_refuses_what_is_neither_a_name_nor_a_class(
        value: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_settings_from_mapping({"dispatch": {"strategy": value}}, "t.toml")
    assert "strategy" in str(e.value) and "consistent_hash" in str(e.value)


def test_random_uses_every_worker() -> None:
    offered = [member("a", 1), member("b", 3)]
    routes = routing.make_router("random").route(runs_of(["j"] * 2000), offered, {})
    counts = {uri: len(chunk) for uri, chunk in routes.items()}
    assert set(counts) == {w.uri for w in offered}
    assert counts[offered[1].uri] > counts[offered[0].uri]  # weighted by capacity: ~3 to 1


def test_accept_all_is_the_default_reply() -> None:  # the fakes above rely on it
    assert accept_all(1, [])["accepted"] == []


def test_config_check_refuses_a_router_class_that_does_not_load(tmp_path: Path,
                                                                sqlite_url: str) -> None:
    config = write_config(tmp_path, sqlite_url,
                          dispatch={"strategy": "no_such_module_here:Router"})
    result = run_cli("config", "check", config=config, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "strategy" in lines[0] and "no_such_module_here" in lines[0]


class Raises:
    def route(self, runs: Sequence[Any], offered: Sequence[MemberInfo],
              load: Mapping[str, float]) -> dict[str, list[Any]]:
        raise RuntimeError("a bug in a user's router")


class Garbage:
    calls = 0

    def route(self, runs: Sequence[Any], offered: Sequence[MemberInfo],
              load: Mapping[str, float]) -> Any:
        Garbage.calls += 1
        if Garbage.calls == 1:
            return [1, 2, 3]  # not a mapping
        forged = {**runs[0], "run_id": 999, "func": "os:system"}
        return {offered[0].uri: [forged, None, {"run_id": [1]}, *runs], 5: []} \
            if Garbage.calls == 2 else {offered[0].uri: list(runs)}


@pytest.mark.parametrize("router", ["Raises", "Garbage"])
def test_a_router_that_raises_or_returns_garbage_stops_no_run(
        workers: dict[str, FakeWorker], started: list[Dispatcher],  # noqa: F811
        router: str) -> None:
    Garbage.calls = 0
    sent = sorted(_through_two_workers(workers, started, router, 6))
    assert sent == list(range(1, 7))  # each once; the forged run 999 never went out


class RouteIsNotAMethod:
    route = 5


class ExitsWhenMade:
    def __init__(self) -> None:
        raise SystemExit(3)


class ExitsWhenRouting:
    def route(self, runs: Sequence[Any], offered: Sequence[MemberInfo],
              load: Mapping[str, float]) -> Any:
        raise SystemExit(3)


@pytest.mark.parametrize("router", ["RouteIsNotAMethod", "ExitsWhenMade"])
def test_a_router_class_that_cannot_route_is_refused_in_one_line(router: str) -> None:
    with pytest.raises(ConfigError) as e:
        routing.make_router(f"{__name__}:{router}")
    assert "\n" not in str(e.value)


def test_a_router_that_exits_still_stops_no_run(
        workers: dict[str, FakeWorker], started: list[Dispatcher]) -> None:  # noqa: F811
    (a,) = _add(workers, FakeWorker("a"))
    d, stale = _dispatcher([a], strategy=f"{__name__}:ExitsWhenRouting")
    d.submit(_runs(1, 3))
    _start(started, d)
    wait_for(lambda: d.sent == 3, WAIT, 0.01, "3 runs accepted")
    assert stale == []


@pytest.mark.parametrize(("entry", "ok"), [
    ("::ffff:0:0/96", False), ("::/32", False), ("::ffff:10.0.0.0/104", True),
    ("::ffff:0.0.0.0/100", False), ("10.0.0.0/8", True), ("2001:db8::/48", True)])
def test_trusted_proxies_written_as_ipv6_are_judged_as_the_ipv4_they_name(
        entry: str, ok: bool) -> None:
    mapping = {"web": {"trusted_proxies": [entry]}}
    if ok:
        load_settings_from_mapping(mapping, "t.toml")
    else:
        with pytest.raises(ConfigError):
            load_settings_from_mapping(mapping, "t.toml")


def test_a_mapped_peer_matches_its_ipv4_proxy_entry() -> None:
    from qcluster.peers import trusted_networks, within

    assert within("::ffff:127.0.0.5", trusted_networks(("127.0.0.5",)))
    assert within("127.0.0.5", trusted_networks(("::ffff:127.0.0.5",)))
    assert not within("::ffff:127.0.0.6", trusted_networks(("127.0.0.5",)))
