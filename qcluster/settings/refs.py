"""What a job reference is, and which ones ``[jobs] allow`` admits: the one definition.

A reference is ``module:function``: a dotted module path of ASCII identifiers none of
which starts with ``_`` (so not ``pkg.__init__:f``, not ``pkg._private:f``), one colon, and
one plain function name that does not start with ``_`` either (so not ``mod:obj.attr``,
not ``mod:__import__``), at most :data:`MAX_REF_CHARS` characters (the column). Job
definitions (``definitions/jobdefs.check_func_ref``), the allow list (:func:`is_allowed`)
and the check of allow patterns (:func:`pattern_problem`) are all built on it.

Some shipped jobs do whatever their arguments say: run a process, write a path. They are
:data:`NAMED_ONLY`: no glob admits them (not the default ``jobs.*``, not
``jobs.builtin:*``), only an entry that is exactly their ``module:function``. So whoever
can add a job (or write the jobs table) cannot run commands on every worker unless the
operator chose, by name, to let them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fnmatch import fnmatchcase
from typing import TypeGuard

MAX_REF_CHARS = 400  # qc_jobs.func and qc_runs.func
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"  # a Python identifier, ASCII only
_PUBLIC = r"[A-Za-z][A-Za-z0-9_]*"  # an identifier that does not start with "_"
_ANY_MODULE = rf"{_IDENT}(?:\.{_IDENT})*"
_MODULE = rf"{_PUBLIC}(?:\.{_PUBLIC})*"
#: ``module:function``; use ``fullmatch`` (``match`` with ``$`` would admit a final "\n").
REF_RE = re.compile(rf"(?P<module>{_MODULE}):(?P<function>{_PUBLIC})")

#: The shipped jobs that run a process or write a path chosen by their arguments: allowed
#: only by an exact entry in ``[jobs] allow`` (see the module). A test reads ``jobs/`` and
#: fails when a job there that starts processes or opens files is missing here.
NAMED_ONLY = frozenset({"jobs.builtin:shell", "jobs.examples:record_run"})

# An allow pattern is a reference in which any character may also be glob syntax:
# ``*``, ``?`` and ``[...]`` classes (with ``!`` and ``-`` inside them).
_GLOB = r"*?\[\]!-"
_PATTERN_RE = re.compile(rf"[A-Za-z0-9_.{_GLOB}]+(?::[A-Za-z0-9_{_GLOB}]+)?")


def is_func_ref(ref: object) -> TypeGuard[str]:
    """Whether ``ref`` is a well-formed ``module:function`` reference (see the module)."""
    return isinstance(ref, str) and len(ref) <= MAX_REF_CHARS and bool(REF_RE.fullmatch(ref))


def ref_problem(ref: object) -> str:
    """Why ``ref`` (not a reference, see :func:`is_func_ref`) is not one, in a few words."""
    if not isinstance(ref, str):
        return "expected module:function"
    if len(ref) > MAX_REF_CHARS:
        return f"longer than {MAX_REF_CHARS} characters"
    module, colon, function = ref.partition(":")
    private_module = bool(re.fullmatch(_ANY_MODULE, module, re.ASCII)
                          and not re.fullmatch(_MODULE, module, re.ASCII))
    if colon and private_module and re.fullmatch(_ANY_MODULE, function, re.ASCII):
        return "expected module:function, and no module name that starts with '_'"
    if colon and re.fullmatch(_MODULE, module, re.ASCII):
        if function.startswith("_") and re.fullmatch(_IDENT, function, re.ASCII):
            return "expected module:function, and a function name that does not start with '_'"
        if re.fullmatch(rf"{_IDENT}(?:\.{_IDENT})+", function, re.ASCII):
            return "expected module:function, one function name after the colon, not a path"
    return "expected module:function"


def named_only(ref: str) -> bool:
    """Whether ``ref`` is allowed only by an exact entry (:data:`NAMED_ONLY`)."""
    return ref in NAMED_ONLY


def is_allowed(ref: str, patterns: Iterable[str]) -> bool:
    """Whether a worker may run ``ref``, a ``module:function`` reference.

    ``ref`` must be a reference (:func:`is_func_ref`); anything else (``mod:obj.attr``,
    ``mod:__import__``, ``pkg._private:f``) is refused, whatever the patterns. A
    :data:`NAMED_ONLY` job is allowed only by a pattern equal to it. Patterns are case-sensitive
    :func:`fnmatch.fnmatchcase` globs (``*`` also crosses dots). A pattern with a colon is
    matched against the whole ``module:function``; a pattern without one against the module
    only. So ``jobs.*`` allows every function of every module under ``jobs``
    (``jobs.examples:hello``) but not the package itself (``jobs:x``); allow that with
    ``jobs``.
    """
    if not is_func_ref(ref):
        return False
    if named_only(ref):
        return ref in tuple(patterns)
    module = ref.partition(":")[0]
    return any(fnmatchcase(ref if ":" in p else module, p) for p in patterns)


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a ``[jobs] allow`` pattern, or None when it can be one.

    A pattern is a glob of ``module[:function]``: letters, digits, ``_`` and ``.``, glob
    syntax, at most one colon. A pattern whose function part, or one of whose module
    names, starts with a plain ``_`` would match only references that are refused whatever
    the patterns: it is refused too, rather than allow nothing in silence."""
    if not _PATTERN_RE.fullmatch(pattern):
        return "must be a glob of module[:function]"
    module, _, function = pattern.partition(":")
    if function.startswith("_"):
        return "must be a glob of module[:function], and a function name cannot start with '_'"
    if any(part.startswith("_") for part in module.split(".")):
        return "must be a glob of module[:function], and a module name cannot start with '_'"
    return None
