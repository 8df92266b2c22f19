"""The ``qcluster`` command: thin typer commands over :mod:`qcluster.client.api`."""

from __future__ import annotations

from qcluster.cli.main import main

__all__ = ["main"]
