"""Whether the worker session of a claim has stopped running it (docs/DESIGN.md invariant
7): the leader's word before it records a run ``lost`` and makes a new attempt.

A worker missing from the database's member list may only be cut off from the database:
it may still run the run, or have finished it and be unable to write the outcome. So a
session is *known stopped* only when

* it says so: asked over RPC (``report``), it answers that it does not hold the attempt,
  or a new session answers at its address;
* its member record is gone: it left (a stopping worker records what it ran, and gives
  back what it did not start, before it leaves);
* its node's record is another session's (the node restarted, or a second process was
  given the same id) since ``lease + FENCE_MARGIN``: the first heartbeat of the other
  session took the row, and this one's next heartbeat fails and ends its process
  (``qcluster.node``, exit status 78), or its lease runs out;
* or it has been silent past its claim lease: the database has not heard it for
  ``lease + FENCE_MARGIN`` seconds, and neither has this leader (its ``report`` calls
  failed) for as long, counted from this term's start. A worker whose lease ran out
  with ``--recover`` code running has ended itself by then (:mod:`qcluster.worker.lease`).

Otherwise the verdict is *alive* (with what it holds, and the outcomes it could not
write, which the leader records) or *unknown* (wait and ask again on the next pass).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Any, Protocol

from qcluster.errors import InputError
from qcluster.rpc.pyro import proxy
from qcluster.store.db import Database
from qcluster.store.members import last_heard
from qcluster.store.reports import MAX_KEYS, HeldReport, Key, report_from_wire

log = logging.getLogger(__name__)

#: Seconds one ``report`` call may take; a worker slower than that is not an answer.
ASK_TIMEOUT = 2.0
#: A session still unknown is logged at most once in this many seconds.
LOG_EVERY = 10.0
_ASKERS = 8


class Kind(StrEnum):
    ALIVE = "alive"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


@dataclasses.dataclass(frozen=True)
class Verdict:
    kind: Kind
    reason: str
    report: HeldReport | None = None  # what it holds (ALIVE only)


class Reporter(Protocol):
    """The ``report`` method of a worker's RPC object (a Pyro5 proxy, or a test's fake)."""

    def report(self, epoch: int, keys: list[list[int]]) -> object: ...


#: Asks the worker at a URI; a context manager that releases the connection.
Connect = Callable[[str], Any]
class Judge(Protocol):
    def __call__(self, suspects: Mapping[str, Sequence[Key]],
                 nodes: Mapping[str, str] | None = None) -> dict[str, Verdict]: ...


class SessionJudge:
    """One term's judge: it remembers when each session last answered this leader."""

    def __init__(self, db: Database, *, epoch: int, secret: str, lease_seconds: float,
                 margin: float, connect: Connect | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 leading: Callable[[], bool] = lambda: True) -> None:
        """``leading`` says whether this leader's lease is still valid by its own
        deadline: a leader past it (a paused process that woke up, say) asks no one, so
        that a deposed leader never renews a worker's claim lease behind the next
        leader's back."""
        self.db = db
        self.epoch = epoch
        self.secret = secret
        self.quiet_for = lease_seconds + margin
        self.connect: Connect = connect or (lambda uri: proxy(uri, secret, ASK_TIMEOUT))
        self._clock = clock
        self._leading = leading
        self.began = clock()
        self._answered: dict[str, float] = {}
        self._logged: dict[str, float] = {}
        self._replaced: dict[str, float] = {}  # when each replaced session was first seen

    def __call__(self, suspects: Mapping[str, Sequence[Key]],
                 nodes: Mapping[str, str] | None = None) -> dict[str, Verdict]:
        """A verdict for each session of ``suspects`` (session -> the attempts the
        database says it holds; ``nodes``: session -> its node id). Raises what reading
        ``qc_members`` raises."""
        heard = last_heard(self.db, suspects, nodes)
        asks = ({s: (h.uri, list(suspects[s])) for s, h in heard.items()
                 if h.uri and not h.replaced} if self._leading() else {})
        answers = self._ask_all(asks)
        out: dict[str, Verdict] = {}
        for session in suspects:
            h = heard.get(session)
            if h is None:
                out[session] = Verdict(Kind.STOPPED, "its member record is gone (it left, or "
                                                     "its node restarted)")
                continue
            if h.replaced:
                # Another process holds the node's row: this one may still run (two
                # processes given one id), until its next heartbeat ends it or its lease
                # runs out. Counted from when this leader first saw it replaced.
                seen = self._replaced.setdefault(session, self._clock())
                waited = self._clock() - max(self.began, seen)
                if waited >= self.quiet_for:
                    out[session] = Verdict(Kind.STOPPED, (
                        f"its node {h.node_id} was registered by another session "
                        f"{waited:.0f}s ago (a restart, or two processes with one id)"))
                else:
                    out[session] = v = Verdict(Kind.UNKNOWN, (
                        f"its node {h.node_id} was registered by another session; it is "
                        f"counted out {self.quiet_for:.0f}s after that was seen"))
                    self._note(session, h.node_id, v)
                continue
            answer = answers.get(session, "it has no RPC address" if not h.uri
                                 else "not asked: this leader's lease is past its deadline")
            if isinstance(answer, HeldReport):
                if answer.session != session:
                    out[session] = Verdict(Kind.STOPPED, f"its address now answers as "
                                                         f"another session of {h.node_id}")
                else:
                    self._answered[session] = self._clock()
                    out[session] = Verdict(Kind.ALIVE, "it answered", answer)
                continue
            quiet = self._clock() - max(self.began, self._answered.get(session, self.began))
            if h.silent >= self.quiet_for and quiet >= self.quiet_for:
                out[session] = Verdict(Kind.STOPPED, (
                    f"silent past its claim lease: the database has not heard it for "
                    f"{h.silent:.0f}s, and it has not answered this leader for "
                    f"{quiet:.0f}s, since "
                    f"{'its last answer' if session in self._answered else 'the term began'}"
                    f" ({answer})"))
            else:
                out[session] = v = Verdict(Kind.UNKNOWN, (
                    f"not in the database's member list for {h.silent:.0f}s and did not "
                    f"answer ({answer}); it is counted out after {self.quiet_for:.0f}s"))
                self._note(session, h.node_id, v)
        return out

    def _note(self, session: str, node_id: str, verdict: Verdict) -> None:
        now = self._clock()
        if now - self._logged.get(session, -LOG_EVERY) >= LOG_EVERY:
            self._logged[session] = now
            log.warning("the runs of worker %s (session %s) wait: %s", node_id, session,
                        verdict.reason)

    def _ask_all(self, asks: Mapping[str, tuple[str, list[Key]]]) -> dict[str, HeldReport | str]:
        if not asks:
            return {}
        with ThreadPoolExecutor(max_workers=min(_ASKERS, len(asks)),
                                thread_name_prefix="qc-ask") as pool:
            futures = {s: pool.submit(self._ask, uri, keys) for s, (uri, keys) in asks.items()}
            return {s: f.result() for s, f in futures.items()}

    def _ask(self, uri: str, keys: list[Key]) -> HeldReport | str:
        """The worker's checked answer, or why there is none (never raises)."""
        if not keys:
            return "nothing to ask"
        running: set[Key] = set()
        finished: dict[Key, Any] = {}
        session = None
        try:
            with self.connect(uri) as worker:
                for start in range(0, len(keys), MAX_KEYS):
                    chunk = keys[start:start + MAX_KEYS]
                    raw = worker.report(self.epoch, [list(k) for k in chunk])
                    part = report_from_wire(raw, chunk)
                    if session not in (None, part.session):
                        return "it changed sessions between two calls"
                    session = part.session
                    running |= part.running
                    finished |= part.finished
        except InputError as e:
            log.warning("worker %s sent a report that is not one: %s", uri, e)
            return f"a malformed report: {e}"
        except Exception as e:  # unreachable, refused, timed out: no answer
            return f"{type(e).__name__}: {e}"[:300]
        assert session is not None
        return HeldReport(session, frozenset(running), finished)
