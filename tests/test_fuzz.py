"""Bad input, everywhere (issue 7, point 6): hypothesis and raw bytes against every edge.

What each edge must do with anything it is given:

- the CLI (``qcluster.cli.main.main``, in this process): succeed, or print exactly one line
  ``error: ...`` on stderr and exit non-zero, never a traceback nor an "internal error";
  a failed command leaves the jobs, runs and cluster tables as they were;
- the config loader: raise only ConfigError, on one line (``test_config.py`` fuzzes random
  documents; here every real key gets random values, plus deep nesting and values too
  large for the clock);
- ``jobs apply`` files: ``load_job_file`` raises only InputError; a bad file applied
  through the CLI writes nothing;
- the worker's payloads: ``check_batch`` raises only InputError and passes only integers
  that fit their columns (integers of any size are drawn on purpose, with the edges of
  int4 and int8); over a real daemon every ``submit`` is refused or answered, the daemon
  keeps serving, and the runs table does not change (no run in it is claimable);
- the control object: junk is answered ``{"ok": False, ...}``, never raised, and a
  refused call writes nothing;
- raw bytes to a worker node's Pyro5 port, a real ``qcluster start --role worker`` in a
  subprocess (a crash of its interpreter shows as a dead node, not a dead test run): the
  node keeps serving authenticated clients; silent, unauthenticated and oversized
  connections are dropped (points 1 and 4).

A gap found and not yet fixed is pinned as a strict xfail (none at present).
The number of cases run per target is printed at the end of the module (and written to
``fuzz-counts.json`` in pytest's base temp directory). Each target names its count for the
"ci" and "dev" hypothesis profiles; "fuzz" multiplies them (``tests/fuzzing.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import math
import os
import resource
import socket
import struct
import subprocess
import time
import tomllib
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import Pyro5
import Pyro5.api
import Pyro5.errors
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from qcluster.cli.main import main as cli_main
from qcluster.client.admin import upgrade_db
from qcluster.definitions.jobdefs import JobDef
from qcluster.definitions.jobfile import load_job_file
from qcluster.definitions.triggers import JOB_ID_RE, make_spec
from qcluster.errors import INPUT_KINDS, ConfigError, InputError
from qcluster.leader.control import ControlService
from qcluster.leader.role import LeaderRole
from qcluster.leader.scheduler import FireExecutor
from qcluster.rpc.handshake import MAGIC, client_handshake, derive_key, recv_exact
from qcluster.rpc.pyro import AuthDaemon, DaemonThread, configure_pyro, proxy
from qcluster.rpc.server import HANDSHAKE_SECONDS
from qcluster.settings import (
    config_keys,
    load_settings_from_mapping,
    load_settings_from_text,
)
from qcluster.store import bounds, catalog, schema
from qcluster.store.cluster import read_cluster
from qcluster.store.db import Database
from qcluster.store.jobstore import SqlJobStore
from qcluster.store.records import Refusal
from qcluster.store.runs import FireRow, insert_runs
from qcluster.worker.runner import Worker, WorkerService, check_batch
from tests.fuzzing import max_examples as scaled
from tests.helpers import (
    TEST_SECRET,
    NodeProcess,
    cli_env,
    qcluster_command,
    start_node,
    toml_dumps,
    wait_for,
    write_config,
    write_private,
)

# -- running and counting cases ----------------------------------------------------------------

CASES: Counter[str] = Counter()
_SETTINGS = settings(deadline=None, database=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def fuzz(target: str, max_examples: int, **strategies: st.SearchStrategy[Any],
         ) -> Callable[[Callable[..., str]], Counter[str]]:
    """Run the decorated body at once on ``max_examples`` generated cases (scaled by the
    hypothesis profile); it returns its outcome ("ok", "refused"...). The result counts
    the outcomes, so that a test can check its generator reached both sides of the edge."""

    def run(body: Callable[..., str]) -> Counter[str]:
        outcomes: Counter[str] = Counter()

        @given(**strategies)
        @settings(_SETTINGS, max_examples=scaled(max_examples))
        def case(**kwargs: Any) -> None:
            outcomes[body(**kwargs)] += 1
            CASES[target] += 1

        case()
        return outcomes

    return run


def examples(db_url: str, sqlite: int, postgresql: int) -> int:
    """Fewer cases on PostgreSQL: every call there is a round trip to a server."""
    return sqlite if db_url.startswith("sqlite") else postgresql


@pytest.fixture(scope="module", autouse=True)
def _report_case_counts(request: pytest.FixtureRequest,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    yield
    total = sum(CASES.values())
    lines = [f"fuzz cases run: {total}", *(f"  {k}: {v}" for k, v in sorted(CASES.items()))]
    (tmp_path_factory.getbasetemp() / "fuzz-counts.json").write_text(
        json.dumps({"total": total, **CASES}, indent=2))
    # Output capture is on during a fixture's teardown: suspend it, or the lines vanish.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print("\n" + "\n".join(lines), flush=True)


@contextlib.contextmanager
def pyro_settings(*, timeout: float, max_message_bytes: int) -> Iterator[None]:
    """configure_pyro for a test; Pyro5's settings are process-wide, so put them back."""
    keys = ("SSL", "SERIALIZER", "COMMTIMEOUT", "MAX_MESSAGE_SIZE", "MAX_RETRIES",
            "SERVERTYPE", "THREADPOOL_SIZE", "THREADPOOL_SIZE_MIN", "DETAILED_TRACEBACK",
            "SOCK_NODELAY", "POLLTIMEOUT")
    saved = {k: getattr(Pyro5.config, k) for k in keys}
    configure_pyro(serializer="msgpack", timeout=timeout, max_message_bytes=max_message_bytes)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(Pyro5.config, k, v)


# -- values ------------------------------------------------------------------------------------

#: The edges of the integer columns (int4, int8), of msgpack's native integers (uint64) and
#: of a float, with their neighbours: where a value stops fitting.
EDGE_INTS = sorted({n + d for n in (0, 2**31, 2**53, 2**63, 2**64) for d in (-1, 0, 1)}
                   | {-n + d for n in (2**31, 2**63, 2**64) for d in (-1, 0, 1)}
                   | {2**200, -(2**200), 10**400})
#: Integers of any size: Hypothesis's unbounded ones, and the edges on purpose.
any_ints = st.integers() | st.sampled_from(EDGE_INTS)

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**64), max_value=2**64),
    st.integers(min_value=2**63 - 2, max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.binary(max_size=30),
)
#: Nested data of every type msgpack carries: what a peer can put on the wire.
wire_junk = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
#: Any TOML value.
toml_junk = st.recursive(
    st.one_of(st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
              st.datetimes(timezones=st.none() | st.just(UTC))),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=6,
)

# Valid values and near misses; ``pick`` mixes them with anything at all.
FUNCS = ["jobs.examples:hello", "jobs.builtin:noop", "jobs.examples:nope", "jobs.nope:x",
         "os:system", "jobs.examples:_private", "jobs:x", "jobs.examples.hello", ""]
CRONS = ["*/5 * * * *", "0 9 * * mon-fri", "@hourly", "second=*/10", "0 0 29 2 *",
         "61 * * * *", "* * *", "@reboot", "fri-mon * * * *", "day=last fri", "*/0 * * * *"]
EVERY = ["30s", "1h30m", "250ms", "0s", "-1s", "1e400", "3651d", "5x", ""]
ATS = ["2030-01-01T09:00", "2030-01-01T09:00+01:00", "2026-03-29T02:30",
       "0001-01-01T00:00:00", "9999-12-31T23:59:59", "yesterday", ""]
ZONES = ["UTC", "Europe/Paris", "America/New_York", "Pacific/Kiritimati", "Etc/GMT+12",
         "Mars/Olympus", "../../etc/passwd", "", "utc"]
IDS = ["seed-interval", "seed-cron", "seed-date", "new-1", "new.2:x@y/z", "-dash", "a" * 201,
       "sp ace", ""]


def pick(pool: list[str], other: st.SearchStrategy[Any] | None = None) -> st.SearchStrategy[Any]:
    return st.sampled_from(pool) | (st.text(max_size=20) if other is None else other)


def test_the_toml_writer_writes_what_tomllib_reads() -> None:
    """The fuzzers write their documents with tests/helpers.py's toml_dumps
    (tests/test_helpers.py tests it on anything)."""
    doc = {"job": [{"id": "x", "at": datetime(2030, 1, 1, tzinfo=UTC), "n": -math.inf,
                    "k": {"a": [1, "\x7f\n"], "b": 2**63 - 1, "c": 1.5}}]}
    assert tomllib.loads(toml_dumps(doc)) == doc


# -- the database, before and after ------------------------------------------------------------


def snapshot(url: str) -> tuple[list[Any], ...]:
    """Every row of the jobs, runs and cluster tables, in a stable order."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return tuple(
                [tuple(r) for r in conn.execute(sa.select(t).order_by(*t.primary_key.columns))]
                for t in (schema.jobs, schema.runs, schema.cluster)
            )
    finally:
        engine.dispose()


def seed(url: str) -> None:
    """Three jobs, and runs that no worker may claim (none is ``scheduled``)."""
    upgrade_db(load_settings_from_mapping({"database": {"url": url}}, "seed", {}))
    db = Database(url)
    try:
        defs = [
            JobDef("seed-interval", "jobs.examples:hello", make_spec(every="30s"),
                   kwargs={"name": "seed"}),
            JobDef("seed-cron", "jobs.builtin:noop",
                   make_spec(cron="0 9 * * mon-fri", tz="Europe/Paris")),
            JobDef("seed-date", "jobs.examples:hello", make_spec(at="2030-01-01T00:00")),
        ]
        state = read_cluster(db)
        assert state is not None
        fires = [FireRow(d.id, d.func, "[]", "{}", 1000.0 + i, "missed", False, "seeded")
                 for i, d in enumerate(defs)]
        r = schema.runs
        with db.fenced(state.epoch) as conn:
            catalog.upsert_jobs(conn, defs, replace=False)
            assert insert_runs(conn, fires, state.epoch, "seed") == []  # missed: not for sending
            for status, job in (("succeeded", "seed-cron"), ("failed", "seed-date")):
                conn.execute(r.update().where(r.c.job_id == job).values(status=status))
    finally:
        db.dispose()


# -- the CLI -----------------------------------------------------------------------------------


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def call_cli(argv: list[str]) -> CliResult:
    out, err = io.StringIO(), io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main(argv)
        except SystemExit as e:
            code = e.code
    return CliResult(0 if code is None else int(code), out.getvalue(), err.getvalue())


def check_cli_contract(argv: list[str], result: CliResult) -> str:
    """Success, or one ``error: ...`` line with a non-zero exit; never a traceback or an
    internal error. Returns "ok" or "refused"."""
    shown = (f"argv={argv!r}\nexit {result.code}\nstdout={result.out[-500:]!r}\n"
             f"stderr={result.err[-2000:]!r}")
    assert "Traceback" not in result.out + result.err, shown
    if result.code == 0:
        return "ok"
    if not result.err and "Usage" in result.out:  # a command group without its subcommand
        return "refused"
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    assert not lines[0].startswith("error: internal error"), f"a bug, not bad input\n{shown}"
    return "refused"


@pytest.fixture
def cli_db(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A seeded database; $QCLUSTER_CONFIG names its config; the cwd is a scratch
    directory; ``tmp_path/files`` holds config and job files good and bad."""
    seed(db_url)
    for key in [k for k in os.environ if k.startswith("QCLUSTER_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("QCLUSTER_CONFIG", str(write_config(tmp_path, db_url)))
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # an empty config means ./qcluster.db: here
    files = tmp_path / "files"
    files.mkdir()
    for name, text in {"empty.toml": "", "bad.toml": "[database\nurl = 1",
                       "typo.toml": "[databse]\nurl = 'sqlite:///x.db'\n"}.items():
        write_private(files / name, text)
    job = '[[job]]\nid = "{}"\nfunc = "jobs.builtin:noop"\nevery = "{}"\n'
    (files / "jobs-ok.toml").write_text(job.format("from-file", "1m"))
    (files / "jobs-half.toml").write_text(job.format("half-1", "1m") + job.format("half-2", "x"))
    (files / "jobs-deep.toml").write_text("[[job]]\nid = 'deep'\nargs = " + "[" * 2000)
    (files / "binary.toml").write_bytes(b"\xff\xfe\x00[[job]]")
    return db_url


def _paths(root: Path) -> list[str]:
    return [*map(str, sorted((root / "files").iterdir())), str(root / "missing.toml"),
            str(root), "", "-"]


_CLI_VALUES = st.sampled_from(["[1, 2]", '{"a": 1}', "NaN", "1e400", "9" * 5000, "[" * 3000,
                               '"x"', "null", "x=1", "=1", "a=", 'k=[1,{"b":null}]']) | st.text(
    max_size=30)
_CLI_NUMBERS = st.integers(min_value=-(2**70), max_value=2**70).map(str) | st.sampled_from(
    ["0", "-1", "2147483648", "9223372036854775808", "1e3", "", "ten"])
_SINCE = st.sampled_from(["2026-01-01", "2026-01-01T00:00:00Z", "0001-01-01T00:00:00+01:00",
                          "9999-12-31T23:59:59-23:59", "+999999999-01-01", ""]) | st.text(
    max_size=20)


def _command(words: list[str], positional: st.SearchStrategy[str] | None,
             options: dict[str, st.SearchStrategy[str] | None],
             paths: list[str]) -> st.SearchStrategy[list[str]]:
    """``words``, up to two positionals, up to seven options (flags have None) with values,
    and now and then a stray word."""
    opts = {**options, "--config": st.sampled_from(paths), "--json": None}

    def option(name: str) -> st.SearchStrategy[list[str]]:
        values = opts[name]
        return st.just([name]) if values is None else values.map(lambda v: [name, v])

    chosen = st.lists(st.sampled_from(sorted(opts)), max_size=7).flatmap(
        lambda names: st.tuples(*map(option, names)))
    pos = st.just([]) if positional is None else st.lists(positional, max_size=2)
    stray = st.lists(st.text(max_size=12) | st.sampled_from(["--", "-x", "--help", "--nope"]),
                     max_size=1)
    return st.tuples(pos, chosen, stray).map(
        lambda t: [*words, *t[0], *(w for pair in t[1] for w in pair), *t[2]])


def command_lines(root: Path) -> st.SearchStrategy[list[str]]:
    paths, ids = _paths(root), pick(IDS)
    add = {"--func": pick(FUNCS), "--cron": pick(CRONS), "--every": pick(EVERY),
           "--at": pick(ATS), "--tz": pick(ZONES), "--arg": _CLI_VALUES,
           "--kwarg": _CLI_VALUES, "--misfire-grace": _CLI_NUMBERS, "--replace": None,
           "--recover": None, "--coalesce": None, "--no-coalesce": None}
    return st.one_of(
        _command(["jobs", "add"], ids, add, paths),
        _command(["jobs", "apply"], pick(paths), {"--prune": None}, paths),
        _command(["jobs", "list"], None, {"--limit": _CLI_NUMBERS}, paths),
        *(_command(["jobs", verb], ids, {}, paths)
          for verb in ("show", "pause", "resume", "remove", "run")),
        _command(["runs", "list"], None, {"--job": ids, "--status": pick(["failed", "FAILED"]),
                                          "--since": _SINCE, "--limit": _CLI_NUMBERS}, paths),
        *(_command(words, None, {}, paths) for words in (
            ["cluster", "status"], ["config", "show"], ["config", "check"], ["db", "upgrade"])),
        st.lists(st.text(max_size=10) | st.sampled_from(["jobs", "runs", "--json", "-c"]),
                 max_size=3).filter(lambda argv: argv[:1] != ["start"]),  # it would run
    )


def test_random_command_lines_fail_with_one_error_line_and_write_nothing(
    cli_db: str, tmp_path: Path
) -> None:
    @fuzz("cli: command lines", examples(cli_db, 200, 50), argv=command_lines(tmp_path))
    def outcomes(argv: list[str]) -> str:
        before = snapshot(cli_db)
        outcome = check_cli_contract(argv, call_cli(argv))
        if outcome != "ok":
            assert snapshot(cli_db) == before, f"failed command {argv!r} changed the database"
        return outcome

    assert outcomes["ok"] and outcomes["refused"], outcomes


_ROLES = ("all", "scheduler", "worker")


def test_start_with_a_bad_role_or_node_id_fails_with_one_error_line() -> None:
    @fuzz("cli: start", 40, role=pick([*_ROLES, "both", "", "ALL"]),
          node_id=pick([*IDS, "ok-node"]), demo=st.booleans())
    def outcomes(role: str, node_id: str, demo: bool) -> str:
        assume(role not in _ROLES or not JOB_ID_RE.match(node_id))  # never start a node
        argv = ["start", "--role", role, "--node-id", node_id, *(["--demo"] * demo)]
        return check_cli_contract(argv, call_cli(argv))

    assert set(outcomes) == {"refused"}


_ADD = ["jobs", "add", "edge", "--func", "jobs.builtin:noop", "--every", "1m"]
#: (argv, must it fail?): what the fuzzers found, kept as plain cases.
EDGE_CASES = [
    ([*_ADD, "--arg", "[" * 5000 + "]" * 5000], True),  # was json.loads' RecursionError
    # 2**31 does not fit PostgreSQL's integer column; 10**15 s is past timedelta's range,
    # where the leader's pass failed for every job due with this one.
    *[([*_ADD, "--misfire-grace", str(n)], True) for n in (2**31, 10**15, 10**20)],
    *[([*c, "--limit", str(n)], False) for c in (["runs", "list"], ["jobs", "list"])
      for n in (2**31, 2**63, 10**20)],  # were SQLite's OverflowError
    (["jobs", "apply", "bad\rname.toml"], True),  # a carriage return made two lines
    (["jobs", "show", "x\u2028y"], True),
]


def test_extreme_values_on_the_command_line_fail_cleanly_and_write_nothing(cli_db: str) -> None:
    for argv, must_fail in EDGE_CASES:
        before = snapshot(cli_db)
        if check_cli_contract(argv, result := call_cli(argv)) == "refused" or must_fail:
            assert result.code != 0 and snapshot(cli_db) == before, argv


# -- the config loader -------------------------------------------------------------------------


def _nested(path: str, value: Any) -> dict[str, Any]:
    head, _, rest = path.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_every_config_key_given_random_values_raises_only_config_error() -> None:
    plausible = st.one_of(st.booleans(), st.integers(0, 100), st.floats(0.05, 60),
                          st.sampled_from(["UTC", "dblock", "msgpack", "127.0.0.1", "jobs.*"]),
                          st.lists(st.sampled_from(["jobs.*", "scheduler", "a:2181"]),
                                   max_size=2))

    @fuzz("config: real keys, random values", 200, pairs=st.lists(
        st.tuples(st.sampled_from(config_keys()), plausible | toml_junk), min_size=1,
        max_size=4))
    def outcomes(pairs: list[tuple[str, Any]]) -> str:
        doc: dict[str, Any] = {}
        for key, value in pairs:
            doc = _merged(doc, _nested(key, value))
        try:
            load_settings_from_text(toml_dumps(doc), "fuzz.toml", {})
        except ConfigError as e:
            assert "\n" not in str(e) and str(e).startswith("fuzz.toml: "), str(e)
            return "refused"
        return "ok"

    assert outcomes["ok"] and outcomes["refused"], outcomes


@pytest.mark.parametrize("text", [
    "a = " + "[" * 3000, "a = " + "[" * 3000 + "]" * 3000, "a = " + "{b = " * 3000,
], ids=["array", "closed-array", "inline-table"])
def test_deeply_nested_config_raises_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^deep\.toml: invalid TOML") as info:
        load_settings_from_text(text, "deep.toml", {})
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("table", [
    {"scheduler": {"misfire_grace_seconds": 10**15}},  # timedelta() in every leader pass
    {"runs": {"retention_days": 1e6}},  # now - timedelta(): before year 1, every pass
    {"rpc": {"timeout_seconds": 1e12}},  # socket timeouts in Pyro5's accept loop
    {"worker": {"heartbeat_seconds": 1e11}, "cluster": {"member_timeout_seconds": 1e12}},
    {"coordination": {"dblock": {"lease_seconds": 1e11}}},  # Event.wait in the lease loop
], ids=["misfire-grace", "retention", "rpc-timeout", "heartbeat", "lease"])
def test_time_settings_too_large_for_the_clock_are_refused(table: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="must be at most"):
        load_settings_from_text(toml_dumps(table), "big.toml", {})


# -- job files ---------------------------------------------------------------------------------

_good_ids = st.sampled_from(["seed-interval", "new-1", "new.2:x@y/z", "z" * 200])
_good_funcs = st.sampled_from(["jobs.examples:hello", "jobs.builtin:noop"])
#: A job that may well be valid: the file as a whole then stands or falls with the others.
_good_job_entry = st.one_of(*(
    st.fixed_dictionaries(
        {"id": _good_ids, "func": _good_funcs, kind: st.sampled_from(pool[:3])},
        optional={"tz": st.sampled_from(ZONES[:5]), "recover": st.booleans(),
                  "coalesce": st.booleans(), "args": st.lists(st.integers() | st.text()),
                  "misfire_grace_seconds": st.integers(min_value=-1, max_value=2**63 - 1)})
    for kind, pool in (("cron", CRONS), ("every", EVERY), ("at", ATS))))
_job_entry = st.fixed_dictionaries(
    {"id": pick(IDS, toml_junk)},
    optional={
        "func": pick(FUNCS[:3], toml_junk), "cron": pick(CRONS, toml_junk),
        "every": pick(EVERY, toml_junk), "at": pick(ATS, toml_junk), "tz": pick(ZONES, toml_junk),
        "args": st.lists(toml_junk, max_size=3) | toml_junk,
        "kwargs": st.dictionaries(st.text(max_size=5), toml_junk, max_size=3) | toml_junk,
        "recover": st.booleans() | toml_junk, "coalesce": st.booleans() | toml_junk,
        "misfire_grace_seconds": st.integers(min_value=-(2**63), max_value=2**63 - 1)
        | toml_junk,
        "bogus": toml_junk,
    },
)
job_documents = st.one_of(
    st.fixed_dictionaries({"job": st.lists(_good_job_entry, max_size=3, unique_by=lambda j: j[
        "id"])}),
    st.fixed_dictionaries({"job": st.lists(_good_job_entry | _job_entry | toml_junk,
                                           max_size=4)}),
    st.fixed_dictionaries({"job": st.lists(_job_entry, min_size=1, max_size=3)},
                          optional={"jobs": toml_junk}),
    st.dictionaries(st.text(max_size=6), toml_junk, max_size=3),
)


def check_job_file(path: Path) -> str:
    """Load ``path``; only InputError may escape, one line that names the file."""
    try:
        defs = load_job_file(path, allow=["jobs.*"], default_tz="UTC")
    except InputError as e:
        assert "\n" not in str(e) and str(e).startswith(f"{path}: "), str(e)
        return "refused"
    assert len({d.id for d in defs}) == len(defs)
    return "ok"


def test_random_job_files_raise_only_input_error(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"

    @fuzz("job files: documents", 300, doc=job_documents)
    def documents(doc: dict[str, Any]) -> str:
        path.write_text(toml_dumps(doc), encoding="utf-8")
        return check_job_file(path)

    @fuzz("job files: bytes", 150, raw=st.binary(max_size=300) | st.text(max_size=300).map(
        str.encode))
    def raw_bytes(raw: bytes) -> str:
        path.write_bytes(raw)
        return check_job_file(path)

    assert documents["ok"] and documents["refused"] and raw_bytes["refused"]


@pytest.mark.parametrize("text", [
    "job = " + "[" * 3000, "[[job]]\nid = 'x'\nkwargs = " + "{a = " * 3000,
    "[[job]]\nid = 'x'\nfunc = 'jobs.builtin:noop'\nevery = '1m'\nargs = " + "[" * 100
    + "]" * 100,
], ids=["array", "inline-table", "args-100-deep"])
def test_deeply_nested_job_file_raises_input_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "deep.toml").write_text(text)
    assert check_job_file(tmp_path / "deep.toml") == "refused"


def test_bad_job_files_applied_through_the_cli_write_nothing(cli_db: str,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "apply.toml"

    @fuzz("cli: jobs apply", examples(cli_db, 100, 30), doc=job_documents, prune=st.booleans())
    def outcomes(doc: dict[str, Any], prune: bool) -> str:
        path.write_text(toml_dumps(doc), encoding="utf-8")
        argv = ["jobs", "apply", str(path), "--json", *(["--prune"] * prune)]
        before = snapshot(cli_db)
        if check_cli_contract(argv, call_cli(argv)) == "refused":
            assert snapshot(cli_db) == before, f"a refused file changed the database: {doc!r}"
            return "refused"
        named, stored = {j["id"] for j in doc.get("job", [])}, {r[0] for r in snapshot(cli_db)[0]}
        assert named == stored if prune else named <= stored, (doc, stored)
        return "ok"

    assert outcomes["ok"] and outcomes["refused"], outcomes


def _memory_limit(limit: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


@pytest.mark.parametrize("argv", [
    ["jobs", "apply", "/dev/zero"],
    ["config", "show", "--config", "/dev/zero"],
], ids=["job-file", "config"])
def test_an_endless_input_file_is_refused_without_reading_it_all(tmp_path: Path,
                                                                 argv: list[str]) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}")
    # A subprocess with a memory limit: reading until the host runs out is a MemoryError.
    done = subprocess.run(qcluster_command(*argv), capture_output=True, text=True, timeout=60,
                          env=cli_env(config), cwd=tmp_path, stdin=subprocess.DEVNULL,
                          preexec_fn=_memory_limit(1 << 30), check=False)
    assert check_cli_contract(argv, CliResult(done.returncode, done.stdout, done.stderr)) \
        == "refused"


# -- the worker's payloads and the control object, on an in-process daemon --------------------

def _oversized() -> str:
    """An argument string past the worker's limit (built, so the strategy's repr stays
    short: hypothesis warns about a 70 kB one)."""
    return "x" * 70000


_RUN: dict[str, st.SearchStrategy[Any]] = {
    "run_id": st.integers(min_value=-5, max_value=2**70) | any_ints, "job_id": pick(IDS),
    "func": st.sampled_from(FUNCS),
    "args": st.sampled_from(["[]", "[1]", "{"]) | st.builds(_oversized),
    "kwargs": st.sampled_from(["{}", '{"name": "z"}', "[]"]),
    "scheduled_at": st.floats(allow_nan=True, allow_infinity=True) | any_ints
    | st.sampled_from([*bounds.TIMESTAMPS, 253402300800, -62135596801, 1e300]),
    "attempt": st.integers(min_value=-1, max_value=2**64) | any_ints, "epoch": any_ints,
    "recover": st.booleans(),
}
_run_records = st.one_of(
    st.fixed_dictionaries(_RUN), st.fixed_dictionaries(_RUN, optional={"extra": wire_junk}),
    st.fixed_dictionaries({k: v | wire_junk for k, v in _RUN.items()}),
    st.dictionaries(st.sampled_from(sorted(_RUN)), wire_junk), wire_junk,
)
epochs = st.integers(min_value=-1, max_value=3) | any_ints | wire_junk
batches = st.lists(_run_records, max_size=4) | wire_junk


def test_check_batch_raises_only_input_error() -> None:
    @fuzz("worker: check_batch", 500, epoch=epochs, runs=batches)
    def outcomes(epoch: Any, runs: Any) -> str:
        try:
            checked = check_batch(epoch, runs)
        except InputError as e:
            assert "\n" not in str(e)
            return "refused"
        assert epoch in bounds.EPOCH
        for r in checked:
            assert r["run_id"] in bounds.RUN_ID and r["attempt"] in bounds.ATTEMPT, r
            assert r["epoch"] in bounds.EPOCH, r
            assert isinstance(r["scheduled_at"], float), r
            datetime.fromtimestamp(r["scheduled_at"], UTC)  # what the worker does with it
        return "ok"

    assert outcomes["ok"] and outcomes["refused"], outcomes


def leading_role(db: Database) -> LeaderRole:
    """A LeaderRole that leads at the cluster's epoch, with no scheduler or dispatcher:
    the control object's writes really run, fenced, and nothing is sent anywhere."""
    role = LeaderRole(load_settings_from_mapping({}, "fuzz", {}), db, members=list,
                      node_id="fuzz", control_uri="PYRO:x@127.0.0.1:1", secret=TEST_SECRET,
                      revoke=lambda reason: None)
    state = read_cluster(db)
    assert state is not None
    role.epoch = state.epoch
    return role


@dataclass
class InProcessDaemon:
    url: str
    worker_uri: str
    control_uri: str


@pytest.fixture
def daemon(sqlite_url: str) -> Iterator[InProcessDaemon]:
    """A Worker and the control object of a leading node on one AuthDaemon."""
    seed(sqlite_url)
    with pyro_settings(timeout=5.0, max_message_bytes=1 << 20):
        db = Database(sqlite_url)
        worker = Worker(db, node_id="fuzz", session="s-fuzz", concurrency=2, allow=["jobs.*"])
        worker.start()
        d = AuthDaemon(TEST_SECRET, host="127.0.0.1")
        worker_uri = str(d.register(WorkerService(worker), "qcluster.worker.runner"))
        control = ControlService(db, leading_role(db), ["jobs.*"], "fuzz")
        control_uri = str(d.register(control, "qcluster.leader.control"))
        thread = DaemonThread(d, "fuzz-rpc")
        thread.start()
        try:
            yield InProcessDaemon(sqlite_url, worker_uri, control_uri)
        finally:
            thread.stop()
            worker.stop(grace=5)
            db.dispose()


_REFUSED_RUN = {str(r) for r in Refusal}


def test_worker_refuses_or_answers_every_submit_and_keeps_serving(
    daemon: InProcessDaemon,
) -> None:
    before = snapshot(daemon.url)

    @fuzz("worker: submit over RPC", 200, epoch=epochs, runs=batches)
    def outcomes(epoch: Any, runs: Any) -> str:
        outcome = "answered"
        with proxy(daemon.worker_uri, TEST_SECRET, 5.0) as p:
            try:
                reply = p.submit(epoch, runs)
            except ValueError as e:  # the worker's own refusal, re-raised here by Pyro5
                assert str(e).startswith("refused: "), repr(e)
                outcome = "refused"
            except Pyro5.errors.PyroError:
                outcome = "unreadable"  # e.g. an int of 5,000 digits: Pyro5 cannot load it
            else:
                assert reply["accepted"] == [], reply  # no run here may be claimed
                assert {why for _, why in reply["refused"]} <= _REFUSED_RUN, reply
        with proxy(daemon.worker_uri, TEST_SECRET, 5.0) as p:  # a new connection
            assert p.ping()["capacity"] == 2
        assert snapshot(daemon.url) == before
        return outcome

    assert outcomes["answered"] and outcomes["refused"], outcomes


_keys = st.one_of(
    st.lists(st.lists(st.integers(min_value=-2, max_value=2**64), max_size=3), max_size=5),
    wire_junk,
)


def test_worker_refuses_or_answers_every_report_and_keeps_serving(
    daemon: InProcessDaemon,
) -> None:
    """``report`` (a leader asking what a worker holds) with any epoch and keys: answered
    with a well-formed report of nothing held, or refused, never an error of the worker;
    the database is left as it was."""
    before = snapshot(daemon.url)

    @fuzz("worker: report over RPC", 200, epoch=epochs, keys=_keys)
    def outcomes(epoch: Any, keys: Any) -> str:
        outcome = "answered"
        with proxy(daemon.worker_uri, TEST_SECRET, 5.0) as p:
            try:
                reply = p.report(epoch, keys)
            except ValueError as e:
                assert str(e).startswith("refused: "), repr(e)
                outcome = "refused"
            except Pyro5.errors.PyroError:
                outcome = "unreadable"
            else:
                assert reply == {"session": "s-fuzz", "running": [], "finished": []}, reply
        with proxy(daemon.worker_uri, TEST_SECRET, 5.0) as p:
            assert p.ping()["capacity"] == 2
        assert snapshot(daemon.url) == before
        return outcome

    assert outcomes["answered"] and outcomes["refused"], outcomes


_SPECS = [
    {"type": "cron", "expr": "*/5 * * * *", "tz": "UTC"},
    {"type": "interval", "seconds": 30.0, "start": "2026-01-01T00:00:00+00:00", "tz": "UTC"},
    {"type": "interval", "seconds": 0.001, "start": "0001-01-01T00:00:00+00:00",
     "tz": "Etc/GMT+12"},
    {"type": "date", "at": "9999-12-31T23:59:59+00:00", "tz": "Pacific/Kiritimati"},
    {"type": "date", "at": "2030-01-01T00:00:00", "tz": "UTC"},
    {"type": "cron", "expr": "0 0 29 2 *", "tz": "Europe/Paris"},
]
_triggers = st.one_of(
    st.sampled_from(_SPECS),
    st.fixed_dictionaries({"type": pick(["cron", "interval", "date"], wire_junk)},
                          optional={k: wire_junk | st.sampled_from(ZONES + CRONS + ATS)
                                    for k in ("expr", "seconds", "start", "at", "tz")}),
    wire_junk,
)
#: Jobs that may well pass validate_job: the write path (fenced upsert, first fire time)
#: then runs on whatever values the trigger spec and the fields hold.
_likely_jobs = st.lists(st.fixed_dictionaries(
    {"id": _good_ids, "func": st.sampled_from(["jobs.builtin:noop", f"jobs.{'a' * 400}:f"]),
     "trigger": st.sampled_from(_SPECS)},
    optional={"args": st.lists(st.integers() | st.text(max_size=5), max_size=2),
              "misfire_grace_seconds": st.integers(min_value=-1, max_value=2**63),
              "coalesce": st.booleans(), "recover": st.booleans()},
), min_size=1, max_size=2, unique_by=lambda j: j["id"])
_junk_jobs = st.lists(st.fixed_dictionaries(
    {"id": pick(IDS, wire_junk), "func": pick(FUNCS, wire_junk), "trigger": _triggers},
    optional={"args": wire_junk, "kwargs": wire_junk, "recover": wire_junk,
              "misfire_grace_seconds": wire_junk, "coalesce": wire_junk, "nope": wire_junk},
) | wire_junk, max_size=3) | wire_junk
control_calls = st.one_of(
    st.tuples(st.sampled_from(["add_jobs", "apply_jobs"]),
              st.tuples(_likely_jobs | _junk_jobs, st.booleans() | wire_junk)),
    st.tuples(st.sampled_from(["pause_job", "resume_job", "remove_job", "run_job"]),
              st.tuples(_good_ids | pick(IDS, wire_junk))),
    st.just(("whoami", ())),
)


def check_control_reply(call: Any, reply: Any, *, leading: bool) -> str:
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), (call, reply)
    if reply["ok"]:
        assert leading or call[0] == "whoami", (call, reply)
        return "ok"
    refusals = {"input", *INPUT_KINDS, "not_leader", "unavailable"}
    assert reply["kind"] in refusals, f"{call!r} -> {reply!r}"
    assert isinstance(reply["error"], str) and "\n" not in reply["error"], reply
    return "refused"


def test_control_object_answers_junk_and_writes_nothing_when_it_refuses(db_url: str) -> None:
    seed(db_url)
    db = Database(db_url)
    follower = LeaderRole(load_settings_from_mapping({}, "fuzz", {}), db, members=list,
                          node_id="f", control_uri="u", secret="s", revoke=lambda reason: None)
    services = {True: ControlService(db, leading_role(db), ["jobs.*"], "fuzz"),
                False: ControlService(db, follower, ["jobs.*"], "fuzz")}

    @fuzz("control: direct calls", examples(db_url, 300, 100), call=control_calls,
          leading=st.booleans())
    def outcomes(call: tuple[str, tuple[Any, ...]], leading: bool) -> str:
        before = snapshot(db_url)
        outcome = check_control_reply(call, getattr(services[leading], call[0])(*call[1]),
                                      leading=leading)
        if outcome == "refused":
            assert snapshot(db_url) == before, f"refused {call!r} changed the database"
        return outcome

    try:
        assert outcomes["ok"] and outcomes["refused"], outcomes
    finally:
        db.dispose()


def test_control_object_over_rpc_answers_junk(daemon: InProcessDaemon) -> None:
    @fuzz("control: calls over RPC", 100, call=control_calls)
    def outcomes(call: tuple[str, tuple[Any, ...]]) -> str:
        before = snapshot(daemon.url)
        with proxy(daemon.control_uri, TEST_SECRET, 5.0) as p:
            try:
                reply = getattr(p, call[0])(*call[1])
            except Pyro5.errors.PyroError:
                return "unreadable"  # Pyro5 could not carry it; the method never ran
        outcome = check_control_reply(call, reply, leading=True)
        if outcome == "refused":
            assert snapshot(daemon.url) == before, f"refused {call!r} changed the database"
        return outcome

    assert outcomes["ok"] and outcomes["refused"], outcomes


_UNPRINTABLE = 10**5000  # past Python's 4300 digits: str() of it raises ValueError
_NOOP_JOB: dict[str, Any] = {"id": "big", "func": "jobs.builtin:noop", "trigger": _SPECS[1]}


@pytest.mark.parametrize("call", [
    ("pause_job", (_UNPRINTABLE,)), ("run_job", (_UNPRINTABLE,)),
    ("add_jobs", ([{**_NOOP_JOB, "id": _UNPRINTABLE}], False)),
    ("apply_jobs", ([{**_NOOP_JOB, "trigger": {**_NOOP_JOB["trigger"],
                                                "seconds": _UNPRINTABLE}}], True)),
    ("add_jobs", ([{**_NOOP_JOB, "misfire_grace_seconds": 2**31}], False)),
    ("add_jobs", ([{**_NOOP_JOB, "misfire_grace_seconds": 2**63}], False)),
    ("add_jobs", ([{**_NOOP_JOB, "misfire_grace_seconds": True}], False)),
], ids=["pause-huge-id", "run-huge-id", "add-huge-id", "apply-huge-seconds",
        "grace-2**31", "grace-2**63", "grace-bool"])
def test_control_object_refuses_integers_out_of_range_in_one_line(
    sqlite_url: str, call: tuple[str, tuple[Any, ...]]
) -> None:
    """Integers too large for their column, or even to print, are refused calls: answered
    ``input`` in one line (they were a ValueError raised through the daemon), nothing
    written."""
    seed(sqlite_url)
    db = Database(sqlite_url)
    try:
        control = ControlService(db, leading_role(db), ["jobs.*"], "fuzz")
        before = snapshot(sqlite_url)
        reply = getattr(control, call[0])(*call[1])
        assert reply["ok"] is False and reply["kind"] == "input", reply
        assert "\n" not in reply["error"] and len(reply["error"]) < 200, reply
        assert snapshot(sqlite_url) == before
    finally:
        db.dispose()


def test_a_stored_job_that_cannot_be_planned_does_not_stop_the_others(sqlite_url: str) -> None:
    seed(sqlite_url)
    db = Database(sqlite_url)
    try:
        j = schema.jobs
        with db.write() as conn:  # as an older version, or a hand edit, could have left it
            conn.execute(j.update().where(j.c.id == "seed-cron")
                         .values(misfire_grace_seconds=10**15))
            conn.execute(j.update().values(next_run_time=time.time() - 5))
        state = read_cluster(db)
        assert state is not None
        store = SqlJobStore(db, lambda: state.epoch)
        sent: list[dict[str, Any]] = []
        executor = FireExecutor(store, state.epoch, "fuzz", sent.extend, retention_seconds=86400)
        now = datetime.now(UTC)
        executor.fire(store.get_due_jobs(now), now)
        assert {r["job_id"] for r in sent} >= {"seed-interval", "seed-date"}
        with db.read() as conn:
            broken = conn.execute(sa.select(j.c.broken).where(j.c.id == "seed-cron")).scalar()
        assert broken is not None and "cannot plan" in broken
    finally:
        db.dispose()


# -- a worker node, and raw bytes to its port --------------------------------------------------

NODE_TIMEOUT = 2.0  # its [rpc] timeout_seconds: a silent client is dropped after this
NODE_MAX_MESSAGE = 1 << 20
NODE_MEMORY_CAP = 1536 << 20  # its RLIMIT_AS: a runaway allocation fails, not the host
MSG_CONNECT, MSG_CONNECTFAIL, MSG_INVOKE, MSG_PING = 1, 3, 4, 6
SERPENT, MARSHAL, JSON, MSGPACK = 1, 2, 3, 4


@dataclass
class WorkerNode:
    node: NodeProcess
    uri: str
    host: str
    port: int

    def reset_peak_memory(self) -> int:
        """Start measuring the node's peak resident memory afresh; return the current KiB."""
        Path(f"/proc/{self.node.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        return self.peak_memory()

    def peak_memory(self) -> int:
        """The node's peak resident memory (KiB) since the last reset."""
        status = Path(f"/proc/{self.node.pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0])

    def assert_serving(self, what: str = "") -> None:
        assert self.node.running(), f"the node died {what}\n{self.node.log_tail()}"
        with proxy(self.uri, TEST_SECRET, 5.0) as p:
            assert p.ping()["capacity"] == 2, what


def _member_uri(url: str, node_id: str) -> str | None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            m = schema.members
            return conn.execute(sa.select(m.c.uri).where(m.c.node_id == node_id)).scalar()
    except sa.exc.OperationalError:
        return None  # no tables yet
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def worker_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerNode]:
    tmp = tmp_path_factory.mktemp("fuzz-node")
    url = f"sqlite:///{tmp / 'qcluster.db'}"
    config = write_config(tmp, url, worker={"concurrency": 2}, rpc={
        "timeout_seconds": NODE_TIMEOUT, "max_message_bytes": NODE_MAX_MESSAGE})
    with start_node(config, node_id="fuzz-worker", role="worker", log_path=tmp / "node.log",
                    env={"MALLOC_ARENA_MAX": "2"}) as node:

        def uri() -> str | None:
            assert node.running(), f"the node exited\n{node.log_tail()}"
            return _member_uri(url, "fuzz-worker")

        found = wait_for(uri, 30, what="the worker node's URI", details=node.log_tail)
        resource.prlimit(node.pid, resource.RLIMIT_AS, (NODE_MEMORY_CAP, NODE_MEMORY_CAP))
        host, _, port = found.rpartition("@")[2].rpartition(":")
        # our side may send more than the node accepts: the oversized case
        with pyro_settings(timeout=5.0, max_message_bytes=64 << 20):
            yield WorkerNode(node, found, host, int(port))
        assert TEST_SECRET not in node.log(), "the RPC secret is in the node's log"


def exchange(node: WorkerNode, data: bytes, *, wait: float = 5.0) -> bytes:
    """Send ``data``, close our side, and read until the node hangs up; fail if it keeps
    the connection open."""
    with socket.create_connection((node.host, node.port), timeout=wait) as s:
        with contextlib.suppress(OSError):  # the node may hang up before reading it all
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        return _until_closed(s)[0]


def _until_closed(s: socket.socket) -> tuple[bytes, float]:
    """What the node sends until it closes the connection, and how long that took."""
    start, got = time.monotonic(), b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except TimeoutError:
        raise AssertionError(f"the node kept the connection open (sent back {got[:80]!r})"
                             ) from None
    except ConnectionResetError:
        pass
    return got, time.monotonic() - start


def frame(msgtype: int, serializer: int, payload: bytes, *, flags: int = 0,
          annotations: bytes = b"", data_size: int | None = None,
          annotations_size: int | None = None) -> bytes:
    """A Pyro5 wire message: the 40-byte header, then annotations and payload."""
    header = struct.pack("!4sHBBHHII16sHH", b"PYRO", 502, msgtype, serializer, flags, 0,
                         len(payload) if data_size is None else data_size,
                         len(annotations) if annotations_size is None else annotations_size,
                         b"\0" * 16, 0, 0x4DC5)
    return header + annotations + payload


def refused(reply: bytes) -> bool:
    """Nothing, or the daemon's hello and nothing after it: what a client that does not
    pass the handshake may get back (the daemon speaks first, then closes)."""
    return reply == b"" or (reply[:4] == MAGIC and len(reply) > 36
                            and len(reply) == 37 + reply[36])


def client_reply(hello: bytes, *, key: bytes = b"", object_id: bytes = b"qcluster.worker.runner",
                 mac: bytes | None = None, nonce: bytes = bytes(32)) -> bytes:
    """A client's answer to ``hello``: right for ``key`` unless ``mac`` is given."""
    sid = hello[36:]
    obj = bytes([len(object_id)]) + object_id
    transcript = b"qcluster-rpc-v2" + hello[4:36] + sid + nonce + obj
    if mac is None:
        mac = hmac.new(key, b"client\0" + transcript, hashlib.sha256).digest()
    return nonce + obj + mac


def answer(node: WorkerNode, make: Callable[[bytes], bytes]) -> bytes:
    """Read the node's hello, send ``make(hello)``, close our side, and return what the
    node sends after the hello until it hangs up."""
    with socket.create_connection((node.host, node.port), timeout=5) as s:
        hello = recv_exact(s, 37 + len(f"{node.host}:{node.port}"), time.monotonic() + 5)
        with contextlib.suppress(OSError):
            s.sendall(make(hello))
            s.shutdown(socket.SHUT_WR)
        return _until_closed(s)[0]


_frames = st.builds(
    frame,
    msgtype=st.sampled_from([MSG_CONNECT, MSG_INVOKE, MSG_PING]) | st.integers(0, 255),
    serializer=st.sampled_from([SERPENT, MARSHAL, JSON, MSGPACK]) | st.integers(0, 255),
    payload=st.binary(max_size=200), flags=st.sampled_from([0, 2]) | st.integers(0, 0xFFFF),
    annotations=st.binary(max_size=24), data_size=st.none() | st.integers(0, 2**32 - 1),
    annotations_size=st.none() | st.integers(0, 300),
)


def test_random_bytes_to_the_worker_port_leave_it_serving(worker_node: WorkerNode) -> None:
    @fuzz("node: raw bytes to the RPC port", 200, data=st.binary(max_size=400) | _frames)
    def outcomes(data: bytes) -> str:
        reply = exchange(worker_node, data)
        assert refused(reply), f"{data[:80]!r} got {reply[:80]!r}"
        worker_node.assert_serving(f"after {data[:80]!r}")
        return "answered" if reply else "dropped"

    assert outcomes["answered"], outcomes


def test_random_answers_to_the_hello_are_refused(worker_node: WorkerNode) -> None:
    """A client that read the hello and answers anything but the right MAC: refused, and
    nothing after the hello comes back (no server MAC to learn from)."""
    key = derive_key(TEST_SECRET)

    @fuzz("node: answers to the handshake", 150,
          tail=st.binary(max_size=400), obj=st.binary(min_size=0, max_size=300),
          mac=st.binary(min_size=32, max_size=32), nonce=st.binary(min_size=32, max_size=32))
    def outcomes(tail: bytes, obj: bytes, mac: bytes, nonce: bytes) -> str:
        reply = answer(worker_node, lambda hello: (
            tail if not obj else client_reply(hello, object_id=obj[:255], mac=mac,
                                              nonce=nonce)))
        assert reply == b"", reply[:80]
        return "refused"

    assert outcomes["refused"]
    # the same frame with the right MAC is accepted: the generator is near the edge
    good = answer(worker_node, lambda hello: client_reply(hello, key=key))
    assert len(good) == 32, good  # the server's MAC
    worker_node.assert_serving()


_NEST = 200_000
CRAFTED = {
    "huge-size-field": frame(MSG_CONNECT, MSGPACK, b"x", data_size=2**32 - 1),
    "size-larger-than-sent": frame(MSG_CONNECT, MSGPACK, b"x" * 10, data_size=100_000),
    "annotation-overrun": frame(MSG_CONNECT, MSGPACK, b"", annotations=b"CORR\xff\xff\xff\xff",
                                annotations_size=8),
    "bad-magic": frame(MSG_CONNECT, MSGPACK, b"x")[:38] + b"\0\0",
    "old-protocol": b"PYRO\x01\xf4" + bytes(34),
    "unknown-serializer": frame(MSG_CONNECT, 99, b"{}"),
    "serpent-deep-list": frame(MSG_CONNECT, SERPENT, b"[" * _NEST + b"]" * _NEST),
    "serpent-deep-sum": frame(MSG_CONNECT, SERPENT, b"1" + b"+1" * _NEST),
    "serpent-deep-unary": frame(MSG_CONNECT, SERPENT, b"-" * _NEST + b"1"),
    "json-deep": frame(MSG_CONNECT, JSON, b'{"handshake":' + b"[" * _NEST + b"]" * _NEST + b"}"),
    "msgpack-deep": frame(MSG_CONNECT, MSGPACK, b"\x91" * _NEST + b"\xc0"),
    "msgpack-huge-array-header": frame(MSG_CONNECT, MSGPACK, b"\xdd\xff\xff\xff\xff"),
    "marshal-deep": frame(MSG_CONNECT, MARSHAL, b"[\x01\x00\x00\x00" * 5000 + b"N"),
    "marshal-huge-tuple": frame(MSG_CONNECT, MARSHAL, b"(\xff\xff\xff\x7f"),
    "compressed-garbage": frame(MSG_CONNECT, MSGPACK, b"not zlib", flags=2),
    "invoke-before-handshake": frame(MSG_INVOKE, MSGPACK, b"\x94\xa1a\xa1b\x90\x80"),
    "ping-before-handshake": frame(MSG_PING, 42, b"ping"),
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "tls-client-hello": bytes.fromhex("160301002a010000260303") + bytes(32),
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_frames_are_refused_and_the_node_keeps_serving(worker_node: WorkerNode,
                                                               name: str) -> None:
    reply = exchange(worker_node, CRAFTED[name])
    assert refused(reply), f"{name} got {reply[:80]!r}"
    worker_node.assert_serving(f"after {name}")


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_frames_after_the_handshake_close_the_connection_only(
    worker_node: WorkerNode, name: str
) -> None:
    """Even a peer with the secret cannot hurt the node with a malformed frame."""
    before = worker_node.reset_peak_memory()
    with authenticated_socket(worker_node) as s:
        with contextlib.suppress(OSError):
            s.sendall(CRAFTED[name])
            s.shutdown(socket.SHUT_WR)
        _until_closed(s)
    grown = worker_node.peak_memory() - before
    assert grown < 64 << 10, f"{name}: peak memory grew by {grown >> 10} MiB"
    worker_node.assert_serving(f"after {name}")


@contextlib.contextmanager
def authenticated_socket(node: WorkerNode, source: str = "127.0.0.1"
                         ) -> Iterator[socket.socket]:
    """A raw socket past the handshake: what a peer with the secret can write on. A
    ``source`` address of its own keeps its refusal lines apart from other tests' (the
    daemon logs one line per address per 10 s)."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(5.0)
        s.connect((node.host, node.port))
        client_handshake(s, derive_key(TEST_SECRET), f"{node.host}:{node.port}",
                         "qcluster.worker.runner", time.monotonic() + 5)
        yield s


@pytest.mark.parametrize("serializer", [MARSHAL, SERPENT], ids=["marshal", "serpent"])
def test_marshal_and_serpent_are_never_parsed(worker_node: WorkerNode, serializer: int) -> None:
    # marshal would build a tuple of 2**25 slots (256 MiB) for these 5 bytes
    payload = b"(" + struct.pack("<i", 1 << 25) if serializer == MARSHAL else b"1" + b"+1" * 9999
    before = worker_node.reset_peak_memory()
    reply = exchange(worker_node, frame(MSG_INVOKE, serializer, payload))
    assert refused(reply), reply
    with authenticated_socket(worker_node) as s:  # with the secret: still not parsed
        s.sendall(frame(MSG_INVOKE, serializer, payload))
        after = _until_closed(s)[0]
    grown = worker_node.peak_memory() - before
    assert b"serializer not accepted" in after, after
    assert grown < 64 << 10, f"peak memory grew by {grown >> 10} MiB for {len(payload)} bytes"
    worker_node.assert_serving()


@pytest.mark.parametrize("first", [b"", b"\x00" * 20, bytes(32) + b"\x16qcluster.worker"],
                         ids=["nothing", "part-of-a-nonce", "nonce-and-object-no-mac"])
def test_silent_connection_is_closed_within_the_handshake_deadline(
    worker_node: WorkerNode, first: bytes
) -> None:
    with socket.create_connection((worker_node.host, worker_node.port), timeout=10) as s:
        s.sendall(first)  # then nothing, our side left open
        reply, waited = _until_closed(s)
    assert refused(reply), reply
    assert waited < HANDSHAKE_SECONDS * 3 + 1, waited
    worker_node.assert_serving()


def test_oversized_message_is_refused_and_the_node_survives(worker_node: WorkerNode) -> None:
    run = {"run_id": 1, "job_id": "j", "func": "jobs.builtin:noop", "args": "x" * 60_000,
           "kwargs": "{}", "scheduled_at": 1.0, "attempt": 1, "epoch": 1, "recover": False}
    with proxy(worker_node.uri, TEST_SECRET, 5.0) as p, \
            pytest.raises(Pyro5.errors.CommunicationError):
        p.submit(1, [run] * (2 * NODE_MAX_MESSAGE // 60_000))
    # A header that announces too much is refused before anything is read after it.
    with authenticated_socket(worker_node, source="127.0.0.77") as s:
        s.sendall(frame(MSG_INVOKE, MSGPACK, b"", data_size=NODE_MAX_MESSAGE + 1))
        reply = _until_closed(s)[0]
    assert reply == b"", reply
    worker_node.assert_serving()
    assert "too large" in worker_node.node.log()


def test_pyro5_clients_without_the_handshake_are_refused(worker_node: WorkerNode) -> None:
    """A plain Pyro5 proxy, whatever it sends as its own handshake, gets nowhere."""
    for handshake in (None, "hello", {"v": 1, "ts": "1", "nonce": "n", "mac": "m"},
                      TEST_SECRET):
        p = Pyro5.api.Proxy(worker_node.uri)
        p._pyroHandshake = handshake
        p._pyroTimeout = 5.0
        with p, pytest.raises(Pyro5.errors.CommunicationError):
            p.submit(1, [])
    worker_node.assert_serving()


def test_a_compressed_message_cannot_expand_past_the_message_limit(
    worker_node: WorkerNode,
) -> None:
    bomb = zlib.compress(bytes(128 << 20), 9)  # 128 MiB of zeros in about 130 KB
    assert len(bomb) < NODE_MAX_MESSAGE
    before = worker_node.reset_peak_memory()
    exchange(worker_node, frame(MSG_INVOKE, MSGPACK, bomb, flags=2))
    with authenticated_socket(worker_node) as s:
        s.sendall(frame(MSG_INVOKE, MSGPACK, bomb, flags=2))
        _until_closed(s)
    grown = worker_node.peak_memory() - before
    worker_node.assert_serving()
    assert grown < 64 << 10, f"peak memory grew by {grown >> 10} MiB from {len(bomb)} bytes"


def test_a_client_dripping_bytes_is_dropped_within_the_deadline(worker_node: WorkerNode) -> None:
    with socket.create_connection((worker_node.host, worker_node.port), timeout=10) as s:
        deadline = time.monotonic() + HANDSHAKE_SECONDS * 4
        for byte in bytes(32) + b"\x16qcluster.worker.runner" + bytes(32):
            if time.monotonic() > deadline:
                break
            try:
                s.sendall(bytes([byte]))
            except OSError:
                return  # dropped, as it should be
            time.sleep(HANDSHAKE_SECONDS / 4)
        s.settimeout(0.1)
        with contextlib.suppress(TimeoutError):
            while chunk := s.recv(4096):
                if not chunk:
                    return
            return
    raise AssertionError(f"still connected after {HANDSHAKE_SECONDS * 4}s of dripping")
