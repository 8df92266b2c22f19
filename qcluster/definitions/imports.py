"""Importing a job's function by its ``module:function`` reference, and the job import
path (``[jobs] paths``): what a slot process needs of the definitions, kept apart so that
it imports nothing heavy (no pydantic, no APScheduler: a slot process starts in about a
third of the time it took with :mod:`qcluster.definitions.jobdefs`). The reference's
shape and the allow list are checked before, by :func:`~qcluster.definitions.jobdefs.
check_func_ref`, in the worker.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from qcluster.errors import InputError

MAX_WHERE_CHARS = 400  # each list of directories in an import error, at most

_added_paths: set[str] = set()  # every directory extend_import_path put on sys.path


def extend_import_path(paths: Iterable[Path]) -> None:
    """Put the directories of ``[jobs] paths`` at the front of ``sys.path``, in the order
    given, before everything else (as ``PYTHONPATH`` would), so that job modules in them
    are found whatever the current directory. Idempotent: a directory already on the path
    is moved there, never added twice, so calling it again changes nothing."""
    wanted = list(dict.fromkeys(os.path.abspath(p) for p in paths))
    if not wanted:
        return
    _added_paths.update(wanted)
    sys.path[:] = wanted + [p for p in sys.path if p not in wanted]
    importlib.invalidate_caches()


def resolve_func(ref: str) -> Any:
    """Import ``module:function`` and return the callable; InputError if it cannot.

    The error is one line. A module that cannot be found says where it was looked for
    (``[jobs] paths`` and the rest of the Python path, or the package that should hold
    it); a module that raised while importing names the exception."""
    module_name, _, attr_path = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # import errors of user code come in every shape
        raise InputError(_import_error(module_name, ref, e)) from e
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError as e:
            raise InputError(f"{ref!r}: {module_name} has no attribute {attr_path!r}") from e
    if not callable(obj):
        raise InputError(f"{ref!r} is not callable")
    # The allow list names modules; a name a module merely imported (``from os import
    # system``) must not ride on it.
    if getattr(obj, "__module__", module_name) != module_name:
        raise InputError(f"{ref!r} is not defined in {module_name} (it is imported there)")
    return obj


def _import_error(module_name: str, ref: str, e: Exception) -> str:
    head = f"cannot import {module_name!r} for {ref!r}"
    missing = e.name if isinstance(e, ModuleNotFoundError) else None
    if not missing or not (module_name == missing or module_name.startswith(missing + ".")):
        # The module (or a package above it) exists but raised, perhaps a ModuleNotFoundError
        # of its own (a dependency that is not installed).
        detail = f"{type(e).__name__}: {_oneline(e)}" if str(e).strip() else type(e).__name__
        return _flat(f"{head}: importing it raised {detail}")
    job_paths = [p for p in sys.path if p in _added_paths]
    parent = missing.rpartition(".")[0]
    package_dirs = list(getattr(sys.modules.get(parent), "__path__", None) or []) if parent else []
    if package_dirs:
        # The package was found; its submodule was looked for in the package alone.
        configured = (f"[jobs] paths: {_dirs(job_paths)}" if job_paths
                      else "no [jobs] paths in use")
        where = f"looked in package {parent!r} at {_dirs(package_dirs)}; {configured}"
    else:
        rest = _dirs([p for p in sys.path if p not in _added_paths])
        python = f"the Python path of {sys.executable or 'python'}: {rest}"
        where = (f"looked in [jobs] paths {_dirs(job_paths)} and {python}" if job_paths
                 else f"looked in {python}; no [jobs] paths in use")
    return _flat(f"{head}: no module named {missing!r} ({where})")


def _flat(message: str, limit: int = 1000) -> str:
    """``message`` on one line, at most ``limit`` characters."""
    message = " ".join(message.splitlines())
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _dirs(paths: Sequence[str]) -> str:
    """``paths`` joined by ", " in at most about MAX_WHERE_CHARS characters."""
    shown: list[str] = []
    used = 0
    for path in paths:
        text = path or "'' (the current directory)"
        if shown and used + len(text) > MAX_WHERE_CHARS:
            shown.append(f"... ({len(paths) - len(shown)} more)")
            break
        text = text if len(text) <= MAX_WHERE_CHARS else text[: MAX_WHERE_CHARS - 3] + "..."
        shown.append(text)
        used += len(text) + 2
    return ", ".join(shown) if shown else "(none)"


def _oneline(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
