"""A worker's fence: the newest leader epoch it has seen, raised only as far as the cluster
row confirms (docs/DESIGN.md invariant 4).

Promises:

* :attr:`EpochFence.epoch` only grows, and only to an epoch that ``qc_cluster.epoch`` held
  when this worker read it: never to a caller's word. A call with an epoch above the
  cluster row's is refused (:class:`EpochNotConfirmed`) and leaves the fence where it was,
  so no peer can fence out the real leader by claiming a huge epoch.
* A batch older than the fence is stale. So is a batch whose epoch the cluster row has
  already passed: the fence rises to the row's epoch, and the sender, fenced out of the
  database too, is told to step down at once.
* The database is read only when a call names an epoch above the fence: once per new
  leader, not once per batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from qcluster.errors import InputError
from qcluster.store.cluster import read_cluster
from qcluster.store.db import Database
from qcluster.store.records import Refusal


class EpochNotConfirmed(InputError):
    """The call's epoch is above the cluster row's: no leader holds it."""


def cluster_epoch(db: Database) -> int | None:
    """``qc_cluster.epoch`` as it is now (None: no cluster row yet). Raises what the
    database raises (a QClusterError when it cannot be reached)."""
    state = read_cluster(db)
    return None if state is None else state.epoch


class EpochFence:
    """The newest confirmed epoch; thread-safe. ``read_epoch`` reads the cluster row's."""

    def __init__(self, read_epoch: Callable[[], int | None]) -> None:
        self._read_epoch = read_epoch
        self._lock = threading.Lock()
        self._epoch = 0

    @property
    def epoch(self) -> int:
        with self._lock:
            return self._epoch

    def admit(self, epoch: int) -> Refusal | None:
        """None if a batch sent at ``epoch`` may be taken; :attr:`Refusal.STALE_EPOCH` if a
        newer epoch is confirmed. Raises :class:`EpochNotConfirmed` (the fence unchanged)
        if the cluster row is below ``epoch``, and whatever reading the row raises."""
        with self._lock:
            if epoch < self._epoch:
                return Refusal.STALE_EPOCH
            if epoch == self._epoch:
                return None  # confirmed when the fence was raised to it
        current = self._read_epoch()  # outside the lock: a slow database holds no one else
        if current is None or epoch > current:
            raise EpochNotConfirmed(f"epoch {epoch} is not confirmed: the cluster row is at "
                                    f"{'no epoch' if current is None else current}")
        with self._lock:
            self._epoch = max(self._epoch, current)  # epochs only grow: never lower it
            return Refusal.STALE_EPOCH if epoch < self._epoch else None
