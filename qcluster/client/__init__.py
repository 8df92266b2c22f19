"""The Python API (``qcluster.Client``) and the library functions behind the CLI."""

from __future__ import annotations

from qcluster.client.api import Applied, Change, Client, RunRequested

__all__ = ["Applied", "Change", "Client", "RunRequested"]
