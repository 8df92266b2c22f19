"""The worker: a Pyro5 object that accepts runs, and a bounded pool that runs them.

Promises (docs/DESIGN.md invariant 4, workers fence too):

* A dispatch is checked before anything is read, taken or written
  (:func:`check_batch`): the batch epoch and each run's from 1 to 2**63 - 1, run ids from 1
  to 2**63 - 1, attempts from 1 to 2**31 - 1, ``bool`` not a number, fire times finite and
  at most a day ahead, texts bounded (:func:`qcluster.store.records.from_wire`). Anything
  else refuses the whole call with one line (``refused: ...``), and the worker goes on
  serving with its state unchanged.
* The worker's fence (:class:`~qcluster.worker.fence.EpochFence`) rises only to an epoch
  that the cluster row confirms. A batch older than it is refused ``stale epoch``; a batch
  whose epoch the row does not hold is refused as a whole, and the fence stays put.
* A second copy of a run attempt it took is refused ``duplicate``. Across workers, a run
  attempt starts at most once: a worker claims it in the database
  (``scheduled`` -> ``dispatched``, naming itself; :func:`qcluster.store.runs.claim`)
  before running it, and only the one claim that commits runs it.
* It runs what the claim returns, the run as its row holds it (function, arguments, fire
  time, epoch), never what the caller sent: a dispatch that disagrees with the row is
  logged (one line, the run id) and the row's run is run. A caller cannot make a worker run
  anything that the database does not say is due.
* Whatever ``accept`` raises, it first gives back every queue place it took and forgets
  every run it did not start, so they may come again.
* A claimed run's code starts only after its row moved to ``running``
  (:class:`~qcluster.worker.starts.StartGate`): a run the leader recorded ``missed`` (no
  free slot within its grace) or ``cancelled`` while it waited is dropped, not run.
  When due runs queue up behind busy slots, a pool thread takes up to
  :data:`START_TOGETHER` of those whose job's last run took under :data:`SHORT_RUN`, starts
  them in one write and runs them one after another in its slot (docs/DESIGN.md, "Short
  runs start together"): their rows say ``running`` at most a few milliseconds before
  their code begins, and each outcome records when its code really began.
* Only references that match ``[jobs] allow`` run; a refused run is recorded ``failed``
  with the reason. Outcomes are written by :class:`~qcluster.worker.outcomes.OutcomeWriter`.
* ``report(epoch, keys)`` answers a leader that cannot see this worker in the database's
  member list (a :class:`~qcluster.store.reports.HeldReport`): which of those attempts it
  still holds unfinished, and which it finished with the outcome it could not write. It
  renews the claim lease (:mod:`qcluster.worker.lease`); a call below the fence is
  refused and renews nothing. An attempt is held from its claim until its outcome is
  with the writer, and its outcome is with the writer before it stops being held, so
  every asked attempt is in one of the answers until the outcome is written.
* While its database heartbeats fail, the worker refuses every run at once (``database
  unavailable``), so that the leader sends them elsewhere rather than waiting on a claim
  that cannot commit.
* A job's code runs in its slot's own process (:mod:`qcluster.worker.slots`), never in
  the worker's: a run still running ``timeout`` seconds (its row's, from the job's policy)
  after it started is stopped (its process group killed) and recorded ``timed_out``; a
  running run whose row has ``cancel_requested`` is stopped within about
  ``cancel_check_seconds`` and recorded ``cancelled``; a job whose process dies makes its
  run ``failed`` ("its process died: ...") and costs only that slot's process.
* A claimed run starts at its row's ``due_at`` if it has one, else at ``scheduled_at``,
  never before. One that arrived ahead of that time (the leader's fire-ahead window, a
  jitter, a retry's backoff) has its start written up to :data:`START_LEAD` before it,
  so that the write is not part of its lateness; its code begins at its time
  (docs/DESIGN.md, "Starts written ahead").
* ``stop(grace)`` returns within about ``grace`` + :data:`~qcluster.worker.slots.KILL_GRACE`
  seconds whatever the jobs do: what has not started by then is given back (``scheduled``
  again, for another worker), and what still runs is stopped (its process group killed)
  and recorded ``interrupted``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import Pyro5.server

from qcluster import metrics
from qcluster.definitions.jobdefs import check_func_ref
from qcluster.definitions.policy import shard_of
from qcluster.errors import InputError, QClusterError
from qcluster.rpc.server import refuse_call
from qcluster.store import bounds
from qcluster.store.db import Database
from qcluster.store.records import (
    SENT_EPOCH,
    Refusal,
    RunRecord,
    SubmitReply,
    from_wire,
)
from qcluster.store.reports import HeldReport, check_keys
from qcluster.store.runs import (
    Claimed,
    Outcome,
    RunStatus,
    cancel_asked,
    claim,
    release,
    still_ours,
    write_outcomes,
)
from qcluster.worker.fence import EpochFence, EpochNotConfirmed, cluster_epoch
from qcluster.worker.lease import ClaimLease, lease_seconds
from qcluster.worker.outcomes import OutcomeWriter
from qcluster.worker.output import flush_stdout_echo
from qcluster.worker.pool import JobPool
from qcluster.worker.slots import KILL_GRACE, Key, Slot, SlotError
from qcluster.worker.slotset import SlotSet
from qcluster.worker.starts import StartGate
from qcluster.worker.timer import StartTimer

log = logging.getLogger(__name__)

MAX_BATCH = 5000
#: Due runs a pool thread may take and start in one write, when slots are all busy.
START_TOGETHER = 8
#: A job whose last run here took less than this (seconds) may start with others.
SHORT_RUN = 0.002
_DURATIONS = 100_000  # jobs whose last run time is remembered, at most
_SEEN = 200_000
_ON_TIME = 0.002  # a run due this close is started at once
#: How long before its time a run that waited for it has its start written (its row
#: says ``running`` this long, at most, before its code begins).
START_LEAD = 0.05
#: The fields a dispatch states about a run's row; if one differs, the row's value is run.
_STATED = ("job_id", "func", "args", "kwargs", "scheduled_at", "recover")


def check_batch(epoch: object, runs: object, *, now: float | None = None) -> list[RunRecord]:
    """Validate a dispatch payload from the wire; return its runs (each checked by
    :func:`~qcluster.store.records.from_wire` against ``now``, ``scheduled_at`` as a float).
    InputError (one line) on anything malformed or out of its range."""
    bounds.check_int(epoch, "epoch", SENT_EPOCH)
    if not isinstance(runs, list) or len(runs) > MAX_BATCH:
        raise InputError(f"runs must be a list of at most {MAX_BATCH}")
    now = time.time() if now is None else now
    return [from_wire(run, now=now) for run in runs]


@Pyro5.server.expose
class WorkerService:
    """The object a leader calls. Every argument is checked; bad calls are refused."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def submit(self, epoch: Any, runs: Any) -> dict[str, Any]:
        """A :class:`~qcluster.store.records.SubmitReply` as its wire map; ValueError
        ``refused: ...`` for a malformed call or an epoch the cluster row does not hold."""
        try:
            batch = check_batch(epoch, runs)
            return self._worker.accept(epoch, batch).to_wire()
        except InputError as e:
            refuse_call("submit", str(e))
            raise ValueError(f"refused: {e}") from None

    def report(self, epoch: Any, keys: Any) -> dict[str, Any]:
        """A :class:`~qcluster.store.reports.HeldReport` as its wire map; ValueError
        ``refused: ...`` for a malformed call or an epoch below this worker's fence."""
        try:
            sent = bounds.check_int(epoch, "the epoch", SENT_EPOCH)
            return self._worker.report(sent, check_keys(keys)).to_wire()
        except InputError as e:
            refuse_call("report", str(e))
            raise ValueError(f"refused: {e}") from None

    def ping(self) -> dict[str, int]:
        return self._worker.load()


class Worker:
    """Accepts runs over RPC and runs them in a bounded pool."""

    def __init__(
        self,
        db: Database,
        *,
        node_id: str,
        session: str,
        concurrency: int,
        allow: Sequence[str],
        max_queue: int | None = None,
        lease: ClaimLease | None = None,
        database_silent_after: float | None = None,
        job_paths: Sequence[str] = (),
        cancel_check_seconds: float = 1.0,
        kill_grace: float = KILL_GRACE,
        output_max_bytes: int = 0,
    ) -> None:
        """``lease`` is renewed by the node's database heartbeats (by default one of
        ``lease_seconds(10)``, the default member timeout). A worker whose heartbeats
        have failed, or not answered for ``database_silent_after`` seconds, refuses runs at
        once (``database unavailable``). ``job_paths`` are ``[jobs] paths`` (already on
        ``sys.path``; the slot processes name them in import errors); running runs are
        checked for a cancel every ``cancel_check_seconds``; a stopped run's process group
        gets SIGKILL ``kill_grace`` seconds after SIGTERM; each run keeps the last
        ``output_max_bytes`` of its output (0: none, :mod:`qcluster.worker.output`)."""
        self.db = db
        self.node_id = node_id
        self.session = session
        self.concurrency = concurrency
        self.allow = list(allow)
        self.max_queue = max_queue or max(1000, concurrency * 100)
        self.writer = OutcomeWriter(db, session)
        self.slots = SlotSet(lambda keys: cancel_asked(db, session, keys),
                             check_seconds=cancel_check_seconds, job_paths=job_paths,
                             kill_grace=kill_grace, frozen=self._judge_frozen,
                             output_max_bytes=output_max_bytes)
        self._kill_grace = kill_grace
        self._pool: JobPool[Claimed] = JobPool(
            concurrency, self._execute, on_start=lambda: self._ready(self.slots.mine()),
            on_exit=self.slots.close_mine, run_many=self._execute_together,
            joinable=self._short, max_batch=START_TOGETHER)
        self._durations: dict[str, float] = {}  # job id -> its last run's seconds, here
        metrics.IN_FLIGHT.set_function(lambda: self._inflight)
        self._timer = StartTimer(self._pool.submit, lead=START_LEAD)
        self._stopping = threading.Event()
        self._idle = threading.Event()  # set whenever a run gives its place back
        self._gate = StartGate(db, session, self._stopping)
        self._running: dict[tuple[int, int], float] = {}  # starting or started: when
        self._recovering: set[tuple[int, int]] = set()  # of those, --recover runs
        self._held: set[tuple[int, int]] = set()  # claimed, outcome not yet with the writer
        self.lease = lease or ClaimLease(lease_seconds(10.0))
        self._db_failed = False  # the node's last database heartbeat failed
        self._db_ok_at = time.monotonic()  # when the last one that committed was sent
        self._db_silent_after = database_silent_after
        self._fence = EpochFence(lambda: cluster_epoch(db))
        self._lock = threading.RLock()
        self._seen: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._inflight = 0
        self._accepting = True
        self._refs: dict[str, None] = {}  # references checked against [jobs] allow

    def start(self) -> None:
        self.writer.start()
        self._timer.start()
        self.slots.start()
        # One slot's process is started now, so that the first run does not wait for it;
        # the others as work comes.
        self._pool.grow()

    def stop(self, grace: float) -> None:
        """Refuse new runs; let queued and running ones go on for up to ``grace`` s; then
        start nothing more, give back (``scheduled``) what never started, stop what still
        runs (SIGTERM to its process group, SIGKILL ``kill_grace`` s later) and record it
        ``interrupted``, end the slot processes, and flush outcomes. Returns in about
        ``grace`` + ``kill_grace`` s plus the database writes, whatever the jobs do.
        Idempotent."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + grace
        while self.inflight() and time.monotonic() < deadline:
            self._idle.wait(min(0.05, max(0.0, deadline - time.monotonic())))
            self._idle.clear()
        self._stopping.set()
        self._gate.close()  # from here on no start of ours can commit
        waiting = self._timer.stop() + self._pool.stop()
        with self._lock:
            self._inflight -= len(waiting)
            self._held.difference_update(c.key for c in waiting)
        try:
            given_back = release(self.db, session=self.session)
        except QClusterError as e:
            given_back = 0
            log.warning("could not give back the runs that did not start: %s", e)
        if given_back:
            log.info("gave back %d runs that had not started", given_back)
        reason = (f"interrupted: the worker stopped before the run finished (shutdown "
                  f"grace {grace:g}s; its process group was stopped)")
        stopped = self.slots.stop_all(RunStatus.INTERRUPTED, reason)
        if stopped:
            log.warning("stopping with %d runs still running: stopping them, recorded "
                        "interrupted", stopped)
        # Each run's pool thread records it once its process group is gone: SIGTERM, then
        # SIGKILL after the kill grace.
        deadline = time.monotonic() + self._kill_grace + 2.0
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running:
                    break
            self._idle.wait(0.05)
            self._idle.clear()
        with self._lock:
            running = dict(self._running)
        now = time.time()
        for (run_id, attempt), started in running.items():
            # A thread that did not come back in time (it should not happen). Only a row
            # still `running` over our claim takes it (write_outcomes filters), so a run
            # that was starting but did not start is left alone.
            self.writer.finished(run_id, attempt, RunStatus.INTERRUPTED, started, now, reason)
        self.slots.stop_watching()
        self.slots.kill_all()
        self._pool.join(1.0)  # each idle thread ends its slot's process on its way out
        flush_stdout_echo(1.0)
        self.writer.stop()

    def fence_exit(self, flush_seconds: float) -> None:
        """The self-fence's last act (``worker/lease.py``): take the finished outcomes not
        yet written, SIGKILL every slot's process group (the ``--recover`` code stops now;
        the failures its pool threads then record are never written), and write what was
        taken, waiting at most ``flush_seconds`` (the database may be what is cut off)."""
        self._stopping.set()
        self._gate.close()  # no start of ours commits from here on
        finished = self.writer.seal()
        self.slots.kill_all()
        if not finished:
            return
        thread = threading.Thread(target=self._write_sealed, args=(finished,),
                                  name="qc-fence-flush", daemon=True)
        thread.start()
        thread.join(flush_seconds)

    def _write_sealed(self, finished: dict[tuple[int, int], Outcome]) -> None:
        try:
            write_outcomes(self.db, self.session, finished)
            log.warning("self-fencing: wrote the outcomes of %d finished runs", len(finished))
        except QClusterError as e:
            log.warning("self-fencing: could not write %d finished runs' outcomes: %s",
                        len(finished), e)

    def _judge_frozen(self, keys: list[Key]) -> tuple[set[Key], set[Key]]:
        """Runs whose slot stopped with this worker (it was paused): which to continue,
        which to kill. Within the claim lease no leader has counted them out: all go on.
        Past it, a ``--recover`` run waits for the self-fence (which kills it and ends
        the process), and another goes on only if its row is still ``running`` over our
        claim; one a leader recorded ``lost`` (its overlap policy may have started the
        next run) or cancelled is killed. QClusterError if the database does not answer:
        asked again at the next look, the runs still stopped."""
        if not self.lease.expired():
            return set(keys), set()
        with self._lock:
            others = [k for k in keys if k not in self._recovering]
        ours = still_ours(self.db, self.session, others)
        return ours, set(others) - ours

    def inflight(self) -> int:
        with self._lock:
            return self._inflight

    def recovering(self) -> int:
        """How many ``--recover`` runs' code runs now (what the self-fence looks at)."""
        with self._lock:
            return len(self._recovering)

    def database_heard(self, ok: bool, sent_at: float) -> None:
        """What the node's database heartbeat, sent at ``sent_at`` (monotonic), did."""
        with self._lock:
            self._db_failed = not ok
            if ok:
                self._db_ok_at = max(self._db_ok_at, sent_at)
        if ok:
            self.lease.renew(sent_at)

    def database_silent(self) -> bool:
        """Whether the node's database heartbeats fail, or have not answered for long."""
        with self._lock:
            failed, ok_at = self._db_failed, self._db_ok_at
        limit = self._db_silent_after
        return failed or (limit is not None and time.monotonic() - ok_at > limit)

    def report(self, epoch: int, keys: list[tuple[int, int]]) -> HeldReport:
        """Which of ``keys`` this worker holds; renews the lease. InputError for an epoch
        below the fence (a deposed leader's call)."""
        arrived = time.monotonic()
        if epoch < self._fence.epoch:
            raise InputError(f"epoch {epoch} is below this worker's fence "
                             f"({self._fence.epoch})")
        self.lease.renew(arrived)
        with self._lock:  # held first: an outcome reaches the writer before it is not held
            running = {k for k in keys if k in self._held}
        finished = self.writer.unwritten(keys)
        return HeldReport(self.session, frozenset(running - finished.keys()), finished)

    def load(self) -> dict[str, int]:
        """What ``ping`` answers, and every reply carries (``records.LOAD_KEYS``)."""
        return {"inflight": self.inflight(), "capacity": self.concurrency,
                "max_queue": self.max_queue, "epoch": self._fence.epoch}

    def accept(self, epoch: int, runs: list[RunRecord]) -> SubmitReply:
        """Take ``runs`` (checked by :func:`check_batch`), sent by a leader at ``epoch``:
        each is accepted (claimed and handed to the pool or the start timer) or refused
        with its reason. Raises :class:`EpochNotConfirmed` when the cluster row does not
        hold ``epoch`` (nothing taken, the fence unchanged). An empty batch reads nothing
        and changes nothing."""
        with self._lock:
            accepting = self._accepting
        if not accepting:
            return self._reply([], [(r["run_id"], Refusal.SHUTTING_DOWN) for r in runs])
        if not runs:
            return self._reply([], [])
        if self.database_silent():  # a claim could not commit: do not make them wait
            return self._reply([], [(r["run_id"], Refusal.UNAVAILABLE) for r in runs])
        verdict = self._admit(epoch, len(runs))
        if verdict is not None:
            return self._reply([], [(r["run_id"], verdict) for r in runs])
        fresh, refused = self._take_places(runs)
        accepted = self._claim_and_start(fresh, refused)
        return self._reply(accepted, refused)

    def _admit(self, epoch: int, count: int) -> Refusal | None:
        try:
            return self._fence.admit(epoch)
        except EpochNotConfirmed:
            raise  # logged with the caller's address by WorkerService.submit
        except QClusterError as e:
            log.warning("could not confirm epoch %d (runs refused): %s", epoch, e)
            return Refusal.UNAVAILABLE

    def _reply(self, accepted: list[int], refused: list[tuple[int, Refusal]]) -> SubmitReply:
        load = self.load()
        return SubmitReply(tuple(accepted), tuple(refused), inflight=load["inflight"],
                           capacity=load["capacity"], max_queue=load["max_queue"],
                           epoch=load["epoch"])

    def _take_places(self, runs: list[RunRecord]
                     ) -> tuple[list[RunRecord], list[tuple[int, Refusal]]]:
        """The runs that get a queue place (and are remembered), and the refusals of the
        others: a second copy of an attempt, or no room left."""
        refused: list[tuple[int, Refusal]] = []
        fresh: list[RunRecord] = []
        with self._lock:
            room = self.max_queue - self._inflight
            for run in runs:
                key = (run["run_id"], run["attempt"])
                if key in self._seen:
                    refused.append((run["run_id"], Refusal.DUPLICATE))
                elif room <= 0:
                    refused.append((run["run_id"], Refusal.BUSY))
                else:
                    room -= 1
                    self._seen[key] = None
                    fresh.append(run)
            while len(self._seen) > _SEEN:
                self._seen.popitem(last=False)
            self._inflight += len(fresh)
        return fresh, refused

    def _claim_and_start(self, fresh: list[RunRecord],
                         refused: list[tuple[int, Refusal]]) -> list[int]:
        """Claim ``fresh`` (their places taken), start each claimed run as its row holds
        it, and add the others to ``refused``; the ids started. Whatever happens, raising
        included, the place of each run not started is given back, and each run not
        started is forgotten, unless the database said another claim has it."""
        started: set[int] = set()  # indexes into fresh
        settled: set[int] = set()  # answered "already claimed": stays remembered
        try:
            claimed = self._claim(fresh)
            if claimed is None:
                refused.extend((r["run_id"], Refusal.UNAVAILABLE) for r in fresh)
                return []
            accepted: list[int] = []
            for i, run in enumerate(fresh):
                stored = claimed.get((run["run_id"], run["attempt"]))
                if stored is None:
                    settled.add(i)
                    refused.append((run["run_id"], Refusal.ALREADY_CLAIMED))
                    continue
                _note_differences(run, stored.record)
                with self._lock:
                    self._held.add(stored.key)
                self._start(stored)
                started.add(i)
                accepted.append(run["run_id"])
            return accepted
        finally:
            with self._lock:
                self._inflight -= len(fresh) - len(started)
                for i, run in enumerate(fresh):
                    if i not in started and i not in settled:
                        self._seen.pop((run["run_id"], run["attempt"]), None)

    def _claim(self, runs: list[RunRecord]) -> dict[tuple[int, int], Claimed] | None:
        """Take the runs in the database, as their rows hold them: only the claim that
        commits may run them. None when the database cannot be reached."""
        try:
            return claim(self.db, runs, worker=self.node_id, session=self.session)
        except QClusterError as e:
            log.warning("could not claim %d runs: %s", len(runs), e)
            return None

    def _start(self, run: Claimed) -> None:
        """Hand a claimed run to the pool, or to the start timer if it is not due yet."""
        if run.start_at > time.time() + _ON_TIME:  # sent ahead, or due later: start on time
            self._timer.add(run)
            self._pool.grow()  # its slot's process starts while it waits
        else:
            self._pool.submit(run)

    def _execute(self, claimed: Claimed) -> None:
        """Start one claimed run (if its row still lets it), run it, record how it ended;
        never raises, and gives back its place. A job's failure (or a run that cannot even
        be set up) is data: ``failed``."""
        self._execute_together([claimed])

    def _execute_together(self, batch: list[Claimed]) -> None:
        """:meth:`_execute` for runs of one pool thread, started in one write and run one
        after another (see :meth:`_short`)."""
        started = time.time()
        with self._lock:
            for claimed in batch:
                self._running[claimed.key] = started
        done = 0
        try:
            # The slot's process is up before the start commits: its start (an import of
            # qcluster, once per slot) is not counted in the run's time.
            slot = self.slots.mine()
            broken = self._ready(slot)
            moved = self._gate.begin_many(c.key for c in batch)
            for claimed in batch:
                if claimed.key in moved:
                    _wait_until(claimed.start_at)  # written ahead: its code begins on time
                    self._run(claimed, time.time(), broken)
                elif not self._stopping.is_set():
                    log.info("run %d (attempt %d) of job %s was not started: its row is no "
                             "longer dispatched to us (missed or cancelled)", claimed.key[0],
                             claimed.key[1], claimed.record["job_id"])
                self._done(claimed.key)
                done += 1
        finally:
            for claimed in batch[done:]:  # only if something above raised
                self._done(claimed.key)

    def _done(self, key: tuple[int, int]) -> None:
        with self._lock:  # after _run gave its outcome to the writer
            self._running.pop(key, None)
            self._recovering.discard(key)
            self._held.discard(key)
            self._inflight -= 1
        self._idle.set()

    def _short(self, claimed: Claimed) -> bool:
        """Whether a due run may start together with others: its job's last run here took
        less than :data:`SHORT_RUN` (a job not yet run here may not)."""
        last = self._durations.get(claimed.record["job_id"])
        return last is not None and last < SHORT_RUN

    def _ready(self, slot: Slot) -> str | None:
        """Start the slot's process if it has none; None, or why it could not."""
        try:
            slot.ensure()
        except SlotError as e:
            log.warning("%s", e)
            return str(e)
        return None

    def _run(self, claimed: Claimed, started: float, broken: str | None) -> None:
        run, key = claimed.record, claimed.key
        with self._lock:
            self._running[key] = started
            if run["recover"]:  # its code runs from here: the self-fence's business
                self._recovering.add(key)
        status: RunStatus = RunStatus.FAILED
        error: str | None = broken
        output = result = None
        try:
            if broken is None:
                self._check_ref(run["func"])
                with self.slots.running(key) as slot:
                    status, error, output, result = slot.run(
                        self._request(run, claimed.slot), claimed.timeout)
        except QClusterError as e:
            status, error = RunStatus.FAILED, f"refused: {e}"
        except Exception as e:  # a bug of ours must not stop the pool thread
            log.exception("run %d failed in the worker", run["run_id"])
            status, error = RunStatus.FAILED, f"{type(e).__name__}: {e}"[:4000]
        finally:
            finished = time.time()
            self.writer.finished(run["run_id"], run["attempt"], status, started, finished, error,
                                 output=output, result=result)
            metrics.RUNS_FINISHED.labels(status=str(status)).inc()
            metrics.LATENESS.observe(max(0.0, started - claimed.start_at))
            metrics.RUN_SECONDS.observe(max(0.0, finished - started))
            if len(self._durations) >= _DURATIONS:
                self._durations.clear()
            self._durations[run["job_id"]] = finished - started

    def _request(self, run: RunRecord, slot: str = "") -> dict[str, Any]:
        """The slot's ``run`` message (:mod:`qcluster.worker.frames`); a sharded run's
        ``shard`` and ``shards`` from its row's ``slot``."""
        shard, shards = shard_of(slot) or (None, None)
        return {"op": "run", "run_id": run["run_id"], "job_id": run["job_id"],
                "func": run["func"], "args": run["args"], "kwargs": run["kwargs"],
                "scheduled_at": run["scheduled_at"], "attempt": run["attempt"],
                "epoch": run["epoch"], "worker_id": self.node_id, "shard": shard,
                "shards": shards}

    def _check_ref(self, ref: str) -> None:
        """InputError unless ``ref`` is a reference ``[jobs] allow`` admits (the slot's
        process imports it)."""
        if ref not in self._refs:
            check_func_ref(ref, self.allow)
            self._refs[ref] = None


def _wait_until(at: float) -> None:
    """Sleep until ``at`` (the wall clock's), if it is to come: at most :data:`START_LEAD`
    for a run the timer handed over early, and the longest a run's start can have been
    written ahead of it."""
    wait = at - time.time()
    if wait > 0:
        time.sleep(min(wait, START_LEAD))


def _note_differences(sent: RunRecord, stored: RunRecord) -> None:
    """Log (one line) what a dispatch stated about a run that its row does not hold."""
    said: Mapping[str, object] = sent
    held: Mapping[str, object] = stored
    differ = [k for k in _STATED if said[k] != held[k]]
    if differ:
        log.warning("run %d: the dispatch differs from its row in %s; running the row's run",
                    stored["run_id"], ", ".join(differ))
