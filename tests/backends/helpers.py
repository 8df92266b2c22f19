"""Small helpers of the contract suite."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from tests.helpers import wait_for


class MovableClock:
    """Wall-clock time plus an offset that a test may add to: a server clock that moves
    on by itself, and jumps when told to (a lease lapses without a sleep)."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return time.time() + self._offset

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._offset += seconds


class LossRecorder:
    """An ``on_lost`` callback that remembers its calls."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.at: float | None = None
        self._event = threading.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.at = time.monotonic()
        self._event.set()

    @property
    def calls(self) -> int:
        return len(self.reasons)

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    return wait_for(predicate, timeout=timeout, interval=interval,
                    what="the contract condition")
