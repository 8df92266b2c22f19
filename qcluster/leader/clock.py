"""The leader's clock: the shared database's time, sampled, and carried between samples
on this host's monotonic clock (docs/DESIGN.md invariant 8, "Clocks").

Every decision a leader makes on time is made on this clock, not on its host's wall
clock: which fire times are due, how late a fire is, whether it is past its misfire
grace, what is coalesced, how long to sleep until the next fire, when a recorded run is
stale or past its grace (recovery), the retention horizon, and the times it writes
(``created_at``, ``finished_at`` of ``missed``/``lost``, ``leader_since``). So two
leaders whose hosts' wall clocks disagree (NTP off, a VM resumed) judge the same fire
alike, and a hand-over between them neither records fires not yet due as coalesced (a
leader ahead) nor fires every run late (a leader behind).

A *sample* reads the database's time (``store/db.Database.now``: ``clock_timestamp()`` on
PostgreSQL; on SQLite, which runs in this process, this host's clock) between two
readings of ``time.monotonic()``. Of :data:`SAMPLES` samples on one connection, the one
with the smallest round trip is kept: the database's time at the middle of that round trip
is known to within half of it (:attr:`Sample.error`), wherever inside it the server read
its clock. Between samples the clock runs on ``time.monotonic()``, which a step or a fake
of the wall clock does not move; the two clocks' rates differ by at most
:data:`MAX_DRIFT` (a quartz's error plus an NTP slew on the database's host), so an old
sample's error grows with its age (:meth:`Sample.error_at`).

Rules:

* :meth:`LeaderClock.now` raises :class:`~qcluster.errors.DatabaseUnavailable` until one
  sample has been taken: a leader never judges a fire on a clock it has not read. The
  leader samples at every term's start, before the first pass (``leader/role.py``); a
  term whose first sample fails does not start (it could not reach the database anyway).
* :meth:`LeaderClock.sync` never makes the clock worse: a sample that fails (the database
  away) keeps the old one, and a new sample replaces the old one only if its error is no
  larger than the old one's grown with its age, so one slow round trip on a loaded host
  does not move the clock by tens of milliseconds. The leader's maintenance thread calls
  :meth:`LeaderClock.sync_if_due` every pass; it samples every :data:`RESAMPLE_SECONDS`.
* The clock logs one WARNING when this host's wall clock is more than
  :data:`WARN_SKEW` s off the database's (and how far), and one INFO once it is back
  within half that: the leader is not misled by it, but the workers start runs on their
  own clocks, and an operator should know.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any, Protocol

from qcluster.errors import DatabaseUnavailable, QClusterError

log = logging.getLogger(__name__)

#: Round trips per sync; the shortest is kept.
SAMPLES = 3
#: How often :meth:`LeaderClock.sync_if_due` samples again.
RESAMPLE_SECONDS = 5.0
#: The largest rate difference assumed between this host's monotonic clock and the
#: database's clock (100 ppm of quartz, 500 ppm of NTP slew at most).
MAX_DRIFT = 600e-6
#: A wall clock this far off the database's is worth a WARNING.
WARN_SKEW = 1.0


class TimeSource(Protocol):
    """What the clock reads: :class:`qcluster.store.db.Database` (``read()``, ``now()``)."""

    def read(self) -> AbstractContextManager[Any]: ...

    def now(self, conn: Any) -> float: ...


@dataclasses.dataclass(frozen=True)
class Sample:
    """The database's time ``db_time`` at ``at`` on this host's monotonic clock, the
    middle of a round trip of ``rtt`` seconds."""

    db_time: float
    at: float
    rtt: float

    @property
    def error(self) -> float:
        """The bound on ``db_time``'s error at ``at``: half the round trip."""
        return self.rtt / 2

    def error_at(self, mono: float) -> float:
        """The bound on the error of the time this sample gives at ``mono``."""
        return self.error + MAX_DRIFT * abs(mono - self.at)

    def time_at(self, mono: float) -> float:
        """The database's time at ``mono`` (seconds since the Unix epoch)."""
        return self.db_time + (mono - self.at)


class LeaderClock:
    """The database's time, for the leader's decisions. Thread-safe: :meth:`now` reads
    one immutable :class:`Sample`; :meth:`sync` calls are serialized."""

    def __init__(
        self,
        db: TimeSource,
        *,
        samples: int = SAMPLES,
        resample_seconds: float = RESAMPLE_SECONDS,
        warn_skew: float = WARN_SKEW,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if samples < 1:
            raise ValueError("a sync takes at least one sample")
        self._db = db
        self._samples = samples
        self._resample = resample_seconds
        self._warn_skew = warn_skew
        self._monotonic = monotonic
        self._wall = wall
        self._sample: Sample | None = None
        self._tried: float | None = None  # monotonic time of the last sync attempt
        self._warned = False
        self._lock = threading.Lock()

    @property
    def sample(self) -> Sample | None:
        """The sample in use, or None before the first one."""
        return self._sample

    @property
    def skew(self) -> float | None:
        """This host's wall clock minus the database's, now (None before a sample)."""
        sample = self._sample
        if sample is None:
            return None
        return self._wall() - sample.time_at(self._monotonic())

    def now(self) -> float:
        """The database's time now, in seconds since the Unix epoch, within
        ``sample.error_at(now)``. DatabaseUnavailable before the first sample."""
        sample = self._sample
        if sample is None:
            raise DatabaseUnavailable("the database's time has not been read yet")
        return sample.time_at(self._monotonic())

    def now_datetime(self) -> datetime:
        """:meth:`now` as an aware UTC datetime."""
        return datetime.fromtimestamp(self.now(), UTC)

    def sync(self) -> bool:
        """Sample the database's time; whether the clock has a sample now. A failure
        (the database away) keeps the sample it had, and is logged, not raised."""
        with self._lock:
            self._tried = self._monotonic()
            taken: list[Sample] = []
            try:
                with self._db.read() as conn:
                    for _ in range(self._samples):
                        before = self._monotonic()
                        db_time = self._db.now(conn)
                        after = self._monotonic()
                        taken.append(Sample(db_time, (before + after) / 2, after - before))
            except QClusterError as e:
                # The samples already taken are as good as any: the failure came after.
                log.debug("reading the database's time failed after %d samples: %s",
                          len(taken), e)
            if not taken:
                return self._sample is not None
            self._adopt(min(taken, key=lambda s: s.rtt))
            return True

    def sync_if_due(self) -> bool:
        """:meth:`sync` if the last attempt is :data:`RESAMPLE_SECONDS` old (or there
        was none); whether the clock has a sample."""
        tried = self._tried
        if tried is None or self._monotonic() - tried >= self._resample:
            return self.sync()
        return self._sample is not None

    def _adopt(self, new: Sample) -> None:
        old = self._sample
        if old is not None and new.error > old.error_at(new.at):
            return  # a slower round trip than the drift the old sample can have had
        self._sample = new
        skew = self._wall() - new.time_at(self._monotonic())
        if abs(skew) > self._warn_skew and not self._warned:
            self._warned = True
            log.warning(
                "this host's wall clock is %.3fs %s the database's (±%.3fs): the leader "
                "schedules on the database's clock, but the workers start runs on their "
                "own; check NTP on this host", abs(skew),
                "ahead of" if skew > 0 else "behind", new.error)
        elif abs(skew) <= self._warn_skew / 2 and self._warned:
            self._warned = False
            log.info("this host's wall clock is back within %.3fs of the database's",
                     abs(skew))
