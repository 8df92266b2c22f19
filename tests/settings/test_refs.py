"""One definition of a ``module:function`` job reference (``qcluster/settings/refs.py``).

Before it, ``definitions/jobdefs.FUNC_RE`` and the settings' ``is_allowed`` disagreed: the
first took ``mod:obj.attr``, ``mod:_private``, non-ASCII names and a final newline, which
the second refused whatever the patterns, so such a reference got past the shape check and
was refused as "not allowed by [jobs] allow" even with ``allow = ["*"]``. Now the job
definitions, the allow list and the check of allow patterns agree."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcluster.definitions.jobdefs import check_func_ref
from qcluster.errors import ConfigError, InputError, NotAllowed
from qcluster.settings import (
    MAX_REF_CHARS,
    is_allowed,
    is_func_ref,
    load_settings_from_text,
    ref_problem,
)

VALID = [
    "jobs.examples:hello",
    "jobs.a.b:run",
    "jobs:run",
    "a:B",
    "jobs.x:f_1",
    "jobs.x:F",
    "_private_pkg.tasks:run",  # a module may start with "_"; a function may not
    "jobs._internal:run",
    "m" * (MAX_REF_CHARS - 2) + ":f",  # exactly the column's width
]

# Where the two definitions disagreed: FUNC_RE took these, is_allowed refused them.
DISAGREED = [
    "jobs.examples:os.system",
    "jobs.examples:Class.method",
    "jobs.examples:_private",
    "jobs.examples:__import__",
    "jobs.x:f\n",  # FUNC_RE.match: "$" matches before a final newline
    "jobs.xé:f",  # non-ASCII identifiers: \w without re.ASCII
    "jobs.x:fé",
    "jobs.x:f\u0661",  # an Arabic-Indic digit is \w too
]
# Refused by both, before and now.
INVALID = [
    "",
    "jobs",
    "jobs.examples",
    "jobs.examples.hello",
    ":f",
    "jobs:",
    "jobs..x:f",
    ".jobs:f",
    "jobs.:f",
    "jobs.x:f:g",
    "1jobs:f",
    "jobs.1x:f",
    "jobs.x:1f",
    "jobs x:f",
    " jobs.x:f",
    "jobs.x:f ",
    "jobs-x:f",
    "jobs/x:f",
    "m" * (MAX_REF_CHARS - 1) + ":f",  # one character past the column
]


@pytest.mark.parametrize("ref", VALID)
def test_a_valid_reference_is_one_everywhere(ref: str) -> None:
    assert is_func_ref(ref)
    assert is_allowed(ref, ["*"])
    assert check_func_ref(ref, ["*"]) == ref


@pytest.mark.parametrize("ref", DISAGREED + INVALID)
def test_an_invalid_reference_is_an_input_error_not_a_refusal_of_the_allow_list(
    ref: str,
) -> None:
    assert not is_func_ref(ref)
    assert not is_allowed(ref, ["*"])
    with pytest.raises(InputError) as info:
        check_func_ref(ref, ["*"])
    assert not isinstance(info.value, NotAllowed)
    message = str(info.value)
    assert message.startswith("invalid job reference ")
    assert "expected module:function" in message or "longer than" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("ref", "problem"),
    [
        ("jobs.examples:_private", "expected module:function, and a function name that does "
                                   "not start with '_'"),
        ("jobs.examples:os.system", "expected module:function, one function name after the "
                                    "colon, not a path"),
        ("jobs.x:f\n", "expected module:function"),
        ("m" * 400 + ":f", "longer than 400 characters"),
        (None, "expected module:function"),
        (42, "expected module:function"),
    ],
)
def test_the_error_says_what_is_wrong(ref: object, problem: str) -> None:
    assert ref_problem(ref) == problem
    with pytest.raises(InputError, match="^invalid job reference .*: " + problem):
        check_func_ref(ref, ["*"])


def test_a_valid_reference_outside_the_patterns_is_still_not_allowed() -> None:
    with pytest.raises(NotAllowed, match=r"not allowed by \[jobs\] allow"):
        check_func_ref("os:system", ["jobs.*"])


_IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,5}", fullmatch=True)
_refs = st.builds(lambda mods, fn: ".".join(mods) + ":" + fn,
                  st.lists(_IDENT, min_size=1, max_size=3), _IDENT)
_near = st.text(alphabet="ab_1.:é\n -", max_size=12)


@given(st.one_of(_refs, _near, st.text(max_size=12)))
def test_job_definitions_and_the_allow_list_agree_on_every_string(ref: str) -> None:
    try:
        check_func_ref(ref, ["*"])
        passed = True
    except NotAllowed:
        raise AssertionError(f"{ref!r}: a reference '*' does not allow") from None
    except InputError:
        passed = False
    assert passed is is_allowed(ref, ["*"]) is is_func_ref(ref)


# --- the [jobs] allow patterns: globs of the same references -----------------------------


@pytest.mark.parametrize(
    "pattern",
    ["jobs.*", "acme_tasks.*", "jobs", "jobs.examples:hello", "jobs.examples:*", "*",
     "jobs.[!_]*", "jobs.*:[a-z]*", "jobs.?x:run", "jobs[.]x", "*:run_*", "_pkg.*"],
)
def test_allow_patterns_that_can_match_a_reference_are_accepted(pattern: str) -> None:
    s = load_settings_from_text(f"[jobs]\nallow = [{pattern!r}]\n", "q.toml", {})
    assert s.jobs.allow == (pattern,)


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("jobs.* ; rm", "must be a glob of module[:function] (got 'jobs.* ; rm')"),
        ("jobs.x:f:g", "must be a glob of module[:function] (got 'jobs.x:f:g')"),
        ("jobs.x:a.b", "must be a glob of module[:function] (got 'jobs.x:a.b')"),
        ("", "must be a glob of module[:function] (got '')"),
        # Accepted before, though it matched only references refused whatever the patterns:
        ("jobs.examples:_private", "must be a glob of module[:function], and a function "
                                   "name cannot start with '_' (got 'jobs.examples:_private')"),
        ("jobs.*:_*", "must be a glob of module[:function], and a function name cannot "
                      "start with '_' (got 'jobs.*:_*')"),
    ],
)
def test_allow_patterns_that_cannot_are_refused(pattern: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings_from_text(f"[jobs]\nallow = [{pattern!r}]\n", "q.toml", {})
    assert str(info.value) == f"q.toml: jobs.allow[0]: {problem}"
