"""qcluster: a Quartz-like clustered cron scheduler for Python.

``qcluster.Client`` is the Python API (:mod:`qcluster.client.api`); ``qcluster.current_run()``
tells a running job which run it is. ``Client`` is imported on first use, so that a job
module importing ``current_run`` does not load the database and RPC machinery with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qcluster.worker.context import RunContext, current_run

if TYPE_CHECKING:
    from qcluster.client.api import Client

__all__ = ["Client", "RunContext", "__version__", "current_run"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "Client":
        from qcluster.client.api import Client

        return Client
    raise AttributeError(f"module 'qcluster' has no attribute {name!r}")
