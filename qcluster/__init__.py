"""qcluster: a Quartz-like clustered cron scheduler for Python."""

from __future__ import annotations

from qcluster.context import RunContext, current_run

__all__ = ["RunContext", "__version__", "current_run"]
__version__ = "0.1.0"
