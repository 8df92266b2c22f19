"""The third message between a leader and a worker: ``report``, the worker's word on the
run attempts of its session that the leader cannot see it holding (docs/DESIGN.md
invariant 7, "known stopped"). Both sides import it from here. Promises:

* :func:`check_keys` is the worker's one check of the call (a list of at most
  :data:`MAX_KEYS` ``[run id, attempt]`` pairs, in the columns' ranges); a one-line
  InputError otherwise.
* A :class:`HeldReport` says, for the session that answers, which of the asked attempts
  it still holds unfinished (claimed, queued or running: it may yet run them) and which
  it finished with the outcome it could not write. An asked attempt in neither is not
  held: that session will never run it (its start needs the row ``dispatched`` to it,
  see :func:`qcluster.store.runs.start`).
* :func:`report_from_wire` is the leader's one check of the answer: exactly its keys,
  only asked attempts, an outcome status a worker may write, the texts bounded; a
  one-line InputError otherwise, whatever the input.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from qcluster.errors import InputError
from qcluster.store import bounds
from qcluster.store.runs import Outcome, RunStatus
from qcluster.store.runs.states import ENDS

Key = tuple[int, int]  # (run id, attempt)

# -- the claim lease: the bargain between a worker and the leaders (qcluster.worker.lease,
#    qcluster.leader.liveness) --------------------------------------------------------

#: Beyond ``member_timeout``: time for a leader to notice a worker missing from the
#: database's member list (its recovery pass runs every second) and ask it (``report``),
#: so that a worker cut off from the database only is asked, and renewed, before its
#: lease runs out.
PROBE_SECONDS = 3.0
#: What a leader adds to the lease before it counts a silent worker out: the worker's
#: self-fence check period and its exit, with room to spare.
FENCE_MARGIN = 1.5


def lease_seconds(member_timeout: float) -> float:
    """The claim lease of a cluster whose ``[cluster] member_timeout_seconds`` is given."""
    return member_timeout + PROBE_SECONDS


#: Attempts one call may ask about (a worker holds at most its queue).
MAX_KEYS = 10_000
MAX_ERROR = 4000
_KEYS = frozenset({"session", "running", "finished"})


def check_keys(data: object) -> list[Key]:
    """The ``[run id, attempt]`` pairs of a ``report`` call, checked."""
    if not isinstance(data, list | tuple) or len(data) > MAX_KEYS:
        raise InputError(f"keys must be a list of at most {MAX_KEYS} [run id, attempt] pairs")
    return [_key(item) for item in data]


def _key(item: object) -> Key:
    if not isinstance(item, list | tuple) or len(item) != 2:
        raise InputError("a key must be a [run id, attempt] pair")
    return (bounds.check_int(item[0], "a run id", bounds.RUN_ID),
            bounds.check_int(item[1], "an attempt", bounds.ATTEMPT))


@dataclass(frozen=True)
class HeldReport:
    """A worker's answer to ``report(epoch, keys)``: its session, and of the keys asked,
    those it still holds unfinished and those it finished (with the outcome)."""

    session: str
    running: frozenset[Key]
    finished: Mapping[Key, Outcome]

    def to_wire(self) -> dict[str, Any]:
        return {"session": self.session,
                "running": [list(k) for k in sorted(self.running)],
                "finished": [[k[0], k[1], str(o.status), o.started, o.finished, o.error]
                             for k, o in sorted(self.finished.items())]}


def report_from_wire(data: object, asked: Collection[Key]) -> HeldReport:
    """A worker's report, checked against the keys ``asked``."""
    if not isinstance(data, dict) or data.keys() != _KEYS:
        raise InputError("malformed report")
    session, running, finished = data["session"], data["running"], data["finished"]
    if not isinstance(session, str) or not 0 < len(session) <= 64:
        raise InputError("malformed report: session")
    if not isinstance(running, list) or not isinstance(finished, list):
        raise InputError("malformed report: running and finished must be lists")
    wanted = set(asked)
    held = frozenset(_key(k) for k in running)
    done = dict(_finished(item) for item in finished)
    if not held <= wanted or not done.keys() <= wanted or held & done.keys():
        raise InputError("malformed report: it answers attempts that were not asked")
    return HeldReport(session, held, done)


def _finished(item: object) -> tuple[Key, Outcome]:
    if not isinstance(item, list | tuple) or len(item) != 6:
        raise InputError("malformed report: a finished run is six fields")
    key = _key(item[:2])
    status, started, ended, error = item[2:]
    if not isinstance(status, str) or status not in {str(s) for s in ENDS}:
        raise InputError("malformed report: not an outcome status")
    for t in (started, ended):
        if not isinstance(t, float | int) or isinstance(t, bool) or not math.isfinite(t):
            raise InputError("malformed report: a time")
    if error is not None and (not isinstance(error, str) or len(error) > MAX_ERROR):
        raise InputError("malformed report: error")
    return key, Outcome(RunStatus(status), float(started), float(ended), error)
