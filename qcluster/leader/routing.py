"""Which live worker gets which run: ``[dispatch] strategy`` (issue 16, item 6).

A strategy is a :class:`Router`. The dispatcher (``leader/dispatch.py``) hands it the runs
to send and the live workers that may take them now, and sends each worker its share.
Failover is the dispatcher's, whatever the strategy: the runs a worker refuses, or does
not answer for, are routed again over the workers left, so no strategy can strand a run
on a dead worker.

- ``round_robin`` (the default): consecutive slices of the batch, starting at the next
  worker in turn.
- ``least_loaded``: each run to the worker with the smallest share of its capacity in
  use, as its last answer said.
- ``consistent_hash``: each run to the live worker with the highest rendezvous hash of
  (job id, node id) (Thaler and Ravishankar's highest random weight). Every leader
  computes the same choice from the same live workers, so a job stays on its worker
  across leader changes. When a worker goes, only its own jobs move, and when it
  comes back they return. Its runs go to the next worker by the same hash when it
  refuses them.
- ``first``: every run to the first live worker by node id; the others take what it
  refuses (it is full or gone).
- ``random``: each run to a worker picked at random, weighted by capacity.

A strategy of your own is a class path, ``strategy = "package.module:Class"``. It is
importable on the scheduler nodes, is made with no arguments, and has a
:meth:`Router.route` method. It is checked when the config is loaded by a scheduler
(``config check`` and ``start``).
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from backends.base import MemberInfo
from qcluster.errors import ConfigError
from qcluster.store.records import RunRecord

Routes = dict[str, list[RunRecord]]  # worker URI -> its runs


@runtime_checkable
class Router(Protocol):
    """Spreads runs over workers."""

    def route(self, runs: Sequence[RunRecord], workers: Sequence[MemberInfo],
              load: Mapping[str, float]) -> Routes:
        """The runs for each worker, by its ``uri``. ``workers`` are live, not busy and
        sorted by node id, never empty; ``load`` is each worker's runs in flight as it
        last said (0 when unknown). A run left out of every list waits for the next try."""
        ...


class RoundRobin:
    def __init__(self) -> None:
        self._turn = itertools.count()

    def route(self, runs: Sequence[RunRecord], workers: Sequence[MemberInfo],
              load: Mapping[str, float]) -> Routes:
        out: Routes = {}
        k = len(workers)
        first = next(self._turn)
        size = -(-len(runs) // k)
        for i in range(k):
            chunk = runs[i * size:(i + 1) * size]
            if chunk:
                out.setdefault(workers[(first + i) % k].uri or "", []).extend(chunk)
        return out


class LeastLoaded:
    def route(self, runs: Sequence[RunRecord], workers: Sequence[MemberInfo],
              load: Mapping[str, float]) -> Routes:
        out: Routes = {}
        now = {w.uri or "": load.get(w.uri or "", 0.0) for w in workers}
        cap = {w.uri or "": float(max(1, w.capacity)) for w in workers}
        for run in runs:
            uri = min(now, key=lambda u: now[u] / cap[u])
            now[uri] += 1
            out.setdefault(uri, []).append(run)
        return out


def rendezvous(job_id: str, node_id: str) -> int:
    """The weight of ``node_id`` for ``job_id``: the same on every leader and release."""
    digest = hashlib.blake2b(f"{job_id}\0{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class ConsistentHash:
    def route(self, runs: Sequence[RunRecord], workers: Sequence[MemberInfo],
              load: Mapping[str, float]) -> Routes:
        out: Routes = {}
        for run in runs:
            best = max(workers, key=lambda w: rendezvous(run["job_id"], w.node_id))
            out.setdefault(best.uri or "", []).append(run)
        return out


class First:
    def route(self, runs: Sequence[RunRecord], workers: Sequence[MemberInfo],
              load: Mapping[str, float]) -> Routes:
        return {workers[0].uri or "": list(runs)} if runs else {}


class Random:
    def __init__(self) -> None:
        self._random = random.Random()

    def route(self, runs: Sequence[RunRecord], workers: Sequence[MemberInfo],
              load: Mapping[str, float]) -> Routes:
        out: Routes = {}
        weights = [max(1, w.capacity) for w in workers]
        for run, worker in zip(runs, self._random.choices(workers, weights, k=len(runs)),
                               strict=True):
            out.setdefault(worker.uri or "", []).append(run)
        return out


STRATEGIES: dict[str, type[Router]] = {
    "round_robin": RoundRobin, "least_loaded": LeastLoaded,
    "consistent_hash": ConsistentHash, "first": First, "random": Random,
}


def make_router(strategy: str) -> Router:
    """The router ``[dispatch] strategy`` names: one of :data:`STRATEGIES`, or a
    ``module:Class`` of the user's; ConfigError if it is neither."""
    known = STRATEGIES.get(strategy)
    if known is not None:
        return known()
    from qcluster.definitions.imports import resolve_func
    from qcluster.errors import InputError

    try:
        made = resolve_func(strategy)()
    except InputError as e:
        raise ConfigError(f"[dispatch] strategy {strategy!r}: {e}") from None
    except (Exception, SystemExit) as e:  # the user's constructor
        raise ConfigError(f"[dispatch] strategy {strategy!r} could not be made: "
                          f"{type(e).__name__}: {e}") from None
    if not isinstance(made, Router) or not callable(getattr(made, "route", None)):
        raise ConfigError(f"[dispatch] strategy {strategy!r} has no route(runs, workers, "
                          "load) method")
    return made
