"""``tests.helpers.toml_dumps``, the one TOML writer of the tests: what it writes,
``tomllib`` reads back as the data it was given, whatever the data."""

from __future__ import annotations

import math
import tomllib
from datetime import UTC, date, datetime, time, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import toml_dumps

ODD_TEXT = ["", " ", "a.b", "a b", "=", "#", "[x]", '"', "'", "\\", "\\u0041", '"""', "'''",
            "\x00", "\x08", "\t", "\n", "\r\n", "\x1f", "\x7f", "\x80", "\u2028", "\ufeff",
            "\uffff", "é", "日本", "\U0001f600", "true", "1", "-", "_", "a-b_C9"]

offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
    lambda m: timezone(timedelta(minutes=m)))
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(),
    st.sampled_from(ODD_TEXT),
    st.datetimes(timezones=st.none() | st.just(UTC) | offsets),
    st.dates(),
    st.times(),
)
keys = st.text(max_size=8) | st.sampled_from(ODD_TEXT)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=12,
)
documents = st.dictionaries(keys, values, max_size=5)


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (nan equals nan; datetimes keep their
    offset)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a):
            return math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, datetime | date | time):
        return bool(a.isoformat() == b.isoformat())
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@given(documents)
def test_tomllib_reads_back_any_document(doc: dict[str, Any]) -> None:
    text = toml_dumps(doc)
    assert same(tomllib.loads(text), doc), text


@pytest.mark.parametrize("text", ODD_TEXT)
def test_odd_text_round_trips_as_a_key_and_as_a_value(text: str) -> None:
    doc = {text: text, "t": {text: [text]}, "job": [{text: text}]}
    assert tomllib.loads(toml_dumps(doc)) == doc


def test_tables_arrays_of_tables_and_inline_tables() -> None:
    doc = {"top": 1, "database": {"url": "sqlite:///x.db"},
           "coordination": {"dblock": {"lease_seconds": 2}},
           "job": [{"id": "a", "kwargs": {"n": 1}}, {"id": "b"}], "empty": {},
           "mixed": [1, "a", [2.5], {"x": {}}]}
    text = toml_dumps(doc)
    assert tomllib.loads(text) == doc
    assert "[database]\n" in text and "[coordination.dblock]\n" in text
    assert text.count("[[job]]\n") == 2 and "kwargs = { n = 1 }" in text
    assert "[coordination]" not in text  # implied by [coordination.dblock]


def test_special_floats_tuples_and_offsets() -> None:
    doc: dict[str, Any] = {"n": [math.inf, -math.inf, -0.0, 1e300, 5e-324], "t": (1, "a"),
                           "at": datetime(1, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=-5))),
                           "d": date(2030, 1, 2), "clock": time(23, 59, 59, 999999)}
    back = tomllib.loads(toml_dumps({**doc, "nan": math.nan}))
    assert math.isnan(back.pop("nan"))
    assert same(back, {**doc, "t": [1, "a"]})


@pytest.mark.parametrize("value", [
    None, b"bytes", {1, 2}, object(), time(1, 2, tzinfo=UTC),
    datetime(2030, 1, 1, tzinfo=timezone(timedelta(seconds=30))),
], ids=["none", "bytes", "set", "object", "time-with-offset", "offset-with-seconds"])
def test_what_toml_cannot_hold_is_a_type_error(value: Any) -> None:
    with pytest.raises(TypeError):
        toml_dumps({"k": value})
