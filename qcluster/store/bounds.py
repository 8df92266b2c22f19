"""The one check of numbers that arrive from a peer, bounded by the columns that store them.

Promises:

* :func:`check_int` returns its value only if it is an ``int`` (``bool`` is not) inside the
  given :class:`IntRange`; anything else raises :class:`~qcluster.errors.InputError` with
  one line that names the field and the range. It never raises anything else, whatever the
  value (an integer too long to print included).
* :func:`column_range` derives a range from an integer column of :mod:`qcluster.store.schema`, so
  a value that passes fits that column on every supported database: ``BigInteger`` holds
  -2**63 .. 2**63 - 1, ``Integer`` -2**31 .. 2**31 - 1 (PostgreSQL's ``int8`` and
  ``int4``; SQLite's INTEGER holds 64 bits whatever the declared type). A column's range
  can only be narrowed (ids and attempts start at 1), never widened.
* :func:`check_timestamp` returns a float that the worker can turn into a UTC datetime
  (finite, years 1 to 9999); an ``int`` too large for a float is refused, not an
  OverflowError.

The ranges a worker checks a dispatch against (:data:`RUN_ID`, :data:`ATTEMPT`,
:data:`EPOCH`) are the columns of ``qc_runs`` that the claim and the outcome writes bind.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from qcluster.errors import InputError
from qcluster.store import schema

#: The widest value of each integer type, by the bits of its magnitude; a subclass first
#: (BigInteger and SmallInteger derive from Integer).
_TYPE_BITS: tuple[tuple[type[sa.Integer], int], ...] = (
    (sa.BigInteger, 63), (sa.SmallInteger, 15), (sa.Integer, 31))


@dataclass(frozen=True)
class IntRange:
    """The integers from ``low`` to ``high``, both included."""

    low: int
    high: int

    def __contains__(self, value: object) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool)
                and self.low <= value <= self.high)

    def __str__(self) -> str:
        return f"from {_show(self.low)} to {_show(self.high)}"


def column_range(column: sa.Column[Any], *, low: int | None = None) -> IntRange:
    """The integers ``column`` (an integer column of the schema) holds, from ``low`` if
    given. TypeError if the column is not an integer or ``low`` is outside its range."""
    for kind, bits in _TYPE_BITS:
        if isinstance(column.type, kind):
            full = IntRange(-(2**bits), 2**bits - 1)
            break
    else:
        raise TypeError(f"{column} is not an integer column")
    if low is None:
        return full
    if low not in full:
        raise TypeError(f"{low} is outside the range of {column}")
    return IntRange(low, full.high)


#: A run's id: the BigInteger primary key of qc_runs, which counts from 1.
RUN_ID = column_range(schema.runs.c.id, low=1)
#: A run's attempt: an Integer column; the first attempt is 1.
ATTEMPT = column_range(schema.runs.c.attempt, low=1)
#: A fencing epoch: BigInteger in qc_cluster and qc_runs; a new cluster starts at 0.
EPOCH = column_range(schema.runs.c.epoch, low=0)

#: The seconds since the epoch that ``datetime.fromtimestamp(x, UTC)`` accepts.
TIMESTAMPS = (datetime(1, 1, 1, tzinfo=UTC).timestamp(),
              datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC).timestamp())


def check_int(value: object, name: str, allowed: IntRange) -> int:
    """``value`` if it is an int (not a bool) in ``allowed``; else InputError
    ``"<name> must be an integer from <low> to <high>, not <value>"``."""
    if isinstance(value, int) and value in allowed:  # bool is never in an IntRange
        return value
    raise InputError(f"{name} must be an integer {allowed}, not {_shown(value)}")


def check_timestamp(value: object, name: str) -> float:
    """``value`` as a float if it is an int or float (not a bool) of seconds since the
    epoch from year 1 to 9999 (UTC); else InputError naming ``name``."""
    low, high = TIMESTAMPS
    if isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= high:
        return float(value)  # in range, so neither an OverflowError nor a NaN
    raise InputError(f"{name} must be a number of seconds since 1970 within the years "
                     f"1 to 9999 (UTC), not {_shown(value)}")


def _show(n: int) -> str:
    """A bound as people write it: ``2**63 - 1``, ``-2**31``, ``0``."""
    if n > 2**16 and (n + 1) & n == 0:
        return f"2**{n.bit_length()} - 1"
    if n < -(2**16) and -n & (-n - 1) == 0:
        return f"-2**{(-n).bit_length() - 1}"
    return str(n)


def _shown(value: object) -> str:
    """A short description of a refused value, that cannot itself fail."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        bits = value.bit_length()
        return str(value) if bits <= 100 else f"an integer of {bits} bits"
    if isinstance(value, float):
        return repr(value)
    return f"a {type(value).__name__}"
