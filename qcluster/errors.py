"""The one exception tree of qcluster.

Driver exceptions (SQLAlchemy, kazoo, redis-py, Pyro5) are turned into these at the
boundary, so callers (the node loop, the CLI's error funnel) handle one family.
Messages are one line, for people, and never carry secrets.
"""

from __future__ import annotations


class QClusterError(Exception):
    """Root of every error qcluster raises on purpose."""


class ConfigError(QClusterError):
    """The configuration is unreadable or invalid."""


class InputError(QClusterError):
    """A user or peer gave bad input: a cron expression, a zone, a reference, a job file."""


class JobNotFound(InputError):
    """No job with that id."""


class JobExists(InputError):
    """A job with that id exists and the caller did not ask to replace it."""


class NotAllowed(InputError):
    """A job reference does not match the ``[jobs] allow`` list."""


class BackendUnavailable(QClusterError):
    """A coordination server or the database cannot be reached right now."""


class DatabaseUnavailable(BackendUnavailable):
    """The shared database cannot be reached."""


class MemberReplaced(QClusterError):
    """Another process registered this node's id: two live nodes must not share an id."""


class Fenced(QClusterError):
    """A write was refused because the writer's epoch is no longer the cluster's epoch."""


#: The refusals that have a class of their own, by the ``kind`` the control API answers
#: with: a caller raises the same class whether its change went through the leader or
#: straight to the database.
INPUT_KINDS: dict[str, type[InputError]] = {
    "not_found": JobNotFound, "exists": JobExists, "not_allowed": NotAllowed}
