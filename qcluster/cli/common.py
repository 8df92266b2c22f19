"""What every command module of the ``qcluster`` command shares: the ``--config`` and
``--json`` options, the command's client and settings, JSON output."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

import typer

from qcluster.client.api import Client
from qcluster.errors import InputError
from qcluster.settings import Settings

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (else $QCLUSTER_CONFIG, ./qcluster.toml)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

# `qcluster --config PATH <command>`: set by the root callback for this invocation.
root_config: ContextVar[Path | None] = ContextVar("qcluster_root_config", default=None)


def client(config: Path | None) -> Client:
    """The command's client: ``--config`` given after the command, or before it (both only
    if they agree), else ``$QCLUSTER_CONFIG``, ``./qcluster.toml``, the defaults."""
    root = root_config.get()
    if root is not None and config is not None and _same_file(root, config) is False:
        raise InputError(f"--config is given twice ({root} before the command, {config} "
                         "after it): give one")
    return Client(config if config is not None else root)


def _same_file(a: Path, b: Path) -> bool | None:
    """Whether ``a`` and ``b`` name one file however spelt (None: neither can be read)."""
    try:
        return a.samefile(b)
    except OSError:
        return None if a == b else False


def settings(config: Path | None) -> Settings:
    return client(config).settings


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def setup_logging(*, quiet: bool = False) -> None:
    level = os.environ.get("QCLUSTER_LOG_LEVEL", "WARNING" if quiet else "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("Pyro5").setLevel(logging.WARNING)
    # Pyro5.client logs "problem getting metadata: cannot connect" at ERROR and then raises;
    # the dispatcher and the CLI catch that error and say which worker or leader it was.
    logging.getLogger("Pyro5.client").setLevel(logging.CRITICAL)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "Context impl ...", per start
    for name in DRIVER_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


DRIVER_LOGGERS = ("kazoo", "backends.zookeeper.kazoo")  # the second: kazoo, through a filter
