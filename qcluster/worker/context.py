"""``current_run()``: what a job can learn about the run it is part of."""

from __future__ import annotations

import dataclasses
from contextvars import ContextVar, Token
from datetime import datetime


@dataclasses.dataclass(frozen=True)
class RunContext:
    """The run a job function is executing in."""

    job_id: str
    run_id: int
    scheduled_at: datetime  # timezone-aware, UTC
    attempt: int
    epoch: int
    worker_id: str
    #: A sharded job's run (``jobs add --shards N``): which shard, from 0, and how many;
    #: None for every other job's.
    shard: int | None = None
    shards: int | None = None


_current: ContextVar[RunContext | None] = ContextVar("qcluster_current_run", default=None)


def current_run() -> RunContext:
    """The run being executed by the calling thread. RuntimeError outside a run."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError("qcluster.current_run() called outside a qcluster run")
    return ctx


def enter_run(ctx: RunContext) -> Token[RunContext | None]:
    return _current.set(ctx)


def leave_run(token: Token[RunContext | None]) -> None:
    _current.reset(token)
