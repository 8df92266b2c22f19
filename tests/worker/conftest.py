"""Fixtures of the worker tests: Pyro5's settings, and two running workers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qcluster.rpc.pyro import configure_pyro
from qcluster.store.db import Database
from tests.worker.common import RunningWorker


@pytest.fixture(autouse=True)
def _pyro() -> None:
    """Pyro5's settings for the workers' daemons and the tests' proxies (``db`` is the
    shared fixture of tests/conftest.py)."""
    configure_pyro(serializer="msgpack", timeout=5.0, max_message_bytes=1 << 20)


@pytest.fixture
def workers(db: Database) -> Iterator[list[RunningWorker]]:
    made = [RunningWorker(db, "w1"), RunningWorker(db, "w2")]
    yield made
    for w in made:
        w.stop()
