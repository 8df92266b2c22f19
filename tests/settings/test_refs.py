"""One definition of a ``module:function`` job reference (``qcluster/settings/refs.py``).

Before it, ``definitions/jobdefs.FUNC_RE`` and the settings' ``is_allowed`` disagreed: the
first took ``mod:obj.attr``, ``mod:_private``, non-ASCII names and a final newline, which
the second refused whatever the patterns, so such a reference got past the shape check and
was refused as "not allowed by [jobs] allow" even with ``allow = ["*"]``. Now the job
definitions, the allow list and the check of allow patterns agree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcluster.definitions.imports import resolve_func
from qcluster.definitions.jobdefs import check_func_ref
from qcluster.errors import ConfigError, InputError, NotAllowed
from qcluster.settings import (
    MAX_REF_CHARS,
    NAMED_ONLY,
    is_allowed,
    is_func_ref,
    load_settings_from_text,
    ref_problem,
)
from tests.helpers import assert_cli_error, run_cli, write_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"

VALID = [
    "jobs.examples:hello",
    "jobs.a.b:run",
    "jobs:run",
    "a:B",
    "jobs.x:f_1",
    "jobs.x:F",
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
# Taken before (a module name could start with "_"), refused now (issue 13, point 7):
# ``pkg.*`` admitted ``pkg.__init__:f``.
PRIVATE_MODULES = [
    "_private_pkg.tasks:run",
    "jobs._internal:run",
    "pkg.__init__:f",
    "pkg._private:f",
    "jobs.__main__:main",
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


@pytest.mark.parametrize("ref", DISAGREED + PRIVATE_MODULES + INVALID)
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
        ("pkg.__init__:f", "expected module:function, and no module name that starts with '_'"),
        ("_pkg.tasks:run", "expected module:function, and no module name that starts with '_'"),
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
     "jobs.[!_]*", "jobs.*:[a-z]*", "jobs.?x:run", "jobs[.]x", "*:run_*", "jobs.builtin:shell"],
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
        ("_pkg.*", "must be a glob of module[:function], and a module name cannot start "
                   "with '_' (got '_pkg.*')"),
        ("pkg.__init__:f", "must be a glob of module[:function], and a module name cannot "
                           "start with '_' (got 'pkg.__init__:f')"),
    ],
)
def test_allow_patterns_that_cannot_are_refused(pattern: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings_from_text(f"[jobs]\nallow = [{pattern!r}]\n", "q.toml", {})
    assert str(info.value) == f"q.toml: jobs.allow[0]: {problem}"


# --- jobs that run a process or write a file: allowed by name only (issue 13, point 7) ---


@pytest.mark.parametrize("ref", sorted(NAMED_ONLY))
@pytest.mark.parametrize("patterns", [
    ["jobs.*"], ["*"], ["jobs"], ["jobs.builtin", "jobs.examples"], ["jobs.builtin:*",
    "jobs.examples:*"], ["jobs.*:*"], ["*:shell", "*:record_run"], ["jobs.builtin:sh?ll",
    "jobs.examples:record_ru[n]"],
])  # fmt: skip
def test_no_pattern_admits_a_job_that_runs_a_process_or_writes_a_file(
    ref: str, patterns: list[str]
) -> None:
    assert not is_allowed(ref, patterns)
    with pytest.raises(NotAllowed, match=f"list '{ref}' itself to allow it"):
        check_func_ref(ref, patterns)


@pytest.mark.parametrize("ref", sorted(NAMED_ONLY))
def test_an_exact_entry_admits_it(ref: str) -> None:
    assert is_allowed(ref, ["jobs.*", ref])
    assert check_func_ref(ref, [ref], import_it=True) == ref
    s = load_settings_from_text(f"[jobs]\nallow = ['jobs.*', {ref!r}]\n", "q.toml", {})
    assert s.jobs.allows(ref)


def test_the_default_allow_list_admits_the_harmless_jobs_only() -> None:
    s = load_settings_from_text("", "q.toml", {})
    assert s.jobs.allow == ("jobs.*",)
    for ref in ("jobs.builtin:noop", "jobs.builtin:sleep", "jobs.examples:hello",
                "jobs.examples:flaky", "jobs.examples:slow"):
        assert s.jobs.allows(ref), ref
    for ref in NAMED_ONLY:
        assert not s.jobs.allows(ref), ref


#: Calls by which a job runs a process or writes a path.
_DANGEROUS = re.compile(r"^(subprocess\..*|os\.(system|popen|open|exec.*|spawn.*|posix_spawn.*"
                        r"|remove|unlink|rename|replace)|open|shutil\..*|.*\.write_(text|bytes))$")


def _calls(node: ast.AST) -> set[str]:
    names = set()
    for call in ast.walk(node):
        if isinstance(call, ast.Call):
            names.add(ast.unparse(call.func))
    return names


def test_every_shipped_job_that_runs_a_process_or_writes_a_file_is_named_only() -> None:
    """Read ``jobs/*.py``: a function that calls subprocess, os.open, open, ... is in
    NAMED_ONLY, and everything in NAMED_ONLY exists."""
    found = set()
    for path in sorted(JOBS.glob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in tree.body:
            if isinstance(fn, ast.FunctionDef) and not fn.name.startswith("_") and any(
                    _DANGEROUS.match(c) for c in _calls(fn)):
                found.add(f"jobs.{path.stem}:{fn.name}")
    assert found == set(NAMED_ONLY)
    for ref in NAMED_ONLY:
        assert callable(resolve_func(ref))


def test_the_cli_refuses_them_by_default_and_accepts_an_exact_entry(tmp_path: Path,
                                                                      sqlite_url: str) -> None:
    default = write_config(tmp_path, sqlite_url, name="default.toml", jobs=None)
    for ref in sorted(NAMED_ONLY):
        refused = run_cli("jobs", "add", "x", "--func", ref, "--every", "1h", config=default,
                          check=False)
        assert_cli_error(refused, "not allowed by [jobs] allow", "itself")
    named = write_config(tmp_path, sqlite_url, name="named.toml",
                         jobs={"allow": ["jobs.*", "jobs.builtin:shell"]})
    run_cli("jobs", "add", "x", "--func", "jobs.builtin:shell", "--every", "1h",
            "--arg", "true", config=named)
