"""The coordination backends a config may name: the one list of their names.

Everything that lists the backends derives from :data:`BackendName` (the settings'
``coordination.backend``, the CLI's ``--to``, ``backends.loader.BACKENDS``). This module
imports nothing of qcluster, so that the settings, below the backends in the layers
(docs/DESIGN.md, Module map), may import it.

``memory`` is not here on purpose: it is a backend for tests inside one process
(:mod:`backends.memory`), never chosen by a config.
"""

from __future__ import annotations

from typing import Literal, get_args

BackendName = Literal["dblock", "zookeeper", "redis"]
"""A backend a config may choose (``coordination.backend``), and a migration may move to."""

BACKENDS: tuple[BackendName, ...] = get_args(BackendName)
"""The same names, in the order they are offered: the default (``dblock``) first."""
