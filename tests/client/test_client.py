"""The Python API, ``qcluster.Client``, on SQLite and on PostgreSQL.

No node runs here, so every change goes "via database" (the leader path is the CLI's,
shown in ``test_process.py``). The CLI is a thin layer over this class: the same bad
input gives the same message from both, and neither writes anything.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import qcluster
from qcluster import Client
from qcluster.errors import InputError, JobExists, JobNotFound, NotAllowed, QClusterError
from qcluster.settings import load_settings
from tests.cli.test_cli import config_with_tables, table_rows
from tests.helpers import assert_cli_error, run_cli, run_json, write_config, write_job_file

HELLO = "jobs.examples:hello"


@pytest.fixture
def config(tmp_path: Path, db_url: str) -> Path:
    return config_with_tables(tmp_path, db_url)


def test_client_is_exported_from_the_package_and_loads_its_config(config: Path) -> None:
    assert qcluster.Client is Client
    assert Client(config).settings == load_settings(config)
    assert Client(settings=load_settings(config)).settings.source == str(config)
    with pytest.raises(InputError, match="not both"):
        Client(config, settings=load_settings(config))


def test_every_job_operation_from_python(config: Path) -> None:
    c = Client(str(config))
    added = c.add("tick", HELLO, every="30s", kwargs={"name": "ops"})
    assert (added.job_id, added.status, added.via) == ("tick", "added", "database")
    assert c.add("daily", HELLO, cron="0 2 * * mon-fri", tz="Europe/Paris",
                 args=["x"], recover=True, misfire_grace=60).status == "added"
    when = datetime.now(UTC) + timedelta(days=1)
    assert c.add("once", HELLO, at=when).status == "added"
    assert c.add("delta", HELLO, every=timedelta(minutes=5)).status == "added"
    assert c.add("tick", HELLO, every="30s", kwargs={"name": "ops"},
                 replace=True).status == "unchanged"
    assert c.add("tick", HELLO, every="1m", replace=True).status == "replaced"

    jobs = {j["id"]: j for j in c.list()}
    assert sorted(jobs) == ["daily", "delta", "once", "tick"]
    assert len(c.list(limit=2)) == 2
    # What Python wrote is what the CLI reads, field for field.
    assert run_json("jobs", "list", "--json", config=config) == c.list()
    assert jobs["daily"]["recover"] is True and jobs["daily"]["args"] == ["x"]

    assert c.pause("tick").status == "paused"
    assert c.show("tick")["paused"] is True
    assert c.resume("tick").status == "resumed"
    assert c.show("tick")["paused"] is False
    run = c.run("tick")
    assert run.via == "database" and run.run_id > 0
    runs = c.runs(job="tick")
    assert [r["run_id"] for r in runs] == [run.run_id]
    assert c.runs(status="scheduled", since=datetime.now(UTC) - timedelta(hours=1))
    assert c.runs(job="tick", since="2999-01-01T00:00:00Z") == []
    assert c.remove("once").status == "removed"
    with pytest.raises(JobNotFound):
        c.show("once")


def test_apply_from_a_file_and_from_definitions(config: Path, tmp_path: Path) -> None:
    c = Client(config)
    file = write_job_file(tmp_path / "jobs.toml", [
        {"id": "a", "func": HELLO, "every": "10s"},
        {"id": "b", "func": HELLO, "cron": "0 3 * * *"},
    ])
    first = c.apply(file)
    assert (sorted(first.created), first.updated, first.via) == (["a", "b"], [], "database")
    again = c.apply(tmp_path / "jobs.toml")
    assert sorted(again.unchanged) == ["a", "b"]
    pruned = c.apply([c.job("a", HELLO, every="20s")], prune=True)
    assert (pruned.updated, pruned.removed) == (["a"], ["b"])
    assert [j["id"] for j in c.list()] == ["a"]
    with pytest.raises(InputError, match="twice"):
        c.apply([c.job("x", HELLO, every="1s"), c.job("x", HELLO, every="2s")])
    with pytest.raises(InputError, match="JobDef"):
        c.apply(["not a job"])  # type: ignore[list-item]


@pytest.mark.parametrize(("cli", "call", "error"), [
    pytest.param(["jobs", "add", "bad id", "--func", HELLO, "--every", "1s"],
                 lambda c: c.add("bad id", HELLO, every="1s"), InputError, id="bad-id"),
    pytest.param(["jobs", "add", "x", "--func", "os:system", "--every", "1s"],
                 lambda c: c.add("x", "os:system", every="1s"), NotAllowed, id="not-allowed"),
    pytest.param(["jobs", "add", "x", "--func", "jobs.examples:nothing", "--every", "1s"],
                 lambda c: c.add("x", "jobs.examples:nothing", every="1s"), InputError,
                 id="no-such-function"),
    pytest.param(["jobs", "add", "x", "--func", HELLO], lambda c: c.add("x", HELLO),
                 InputError, id="no-trigger"),
    pytest.param(["jobs", "add", "x", "--func", HELLO, "--every", "1s", "--misfire-grace", "0"],
                 lambda c: c.add("x", HELLO, every="1s", misfire_grace=0), InputError,
                 id="misfire-grace"),
    pytest.param(["jobs", "add", "x", "--func", HELLO, "--cron", "0 0 31 2 *"],
                 lambda c: c.add("x", HELLO, cron="0 0 31 2 *"), InputError, id="never-fires"),
    pytest.param(["jobs", "add", "seed", "--func", HELLO, "--every", "1s"],
                 lambda c: c.add("seed", HELLO, every="1s"), JobExists, id="exists"),
    pytest.param(["jobs", "pause", "ghost"], lambda c: c.pause("ghost"), JobNotFound,
                 id="unknown-job"),
    pytest.param(["runs", "list", "--status", "finished"],
                 lambda c: c.runs(status="finished"), InputError, id="bad-status"),
    pytest.param(["runs", "list", "--since", "yesterday"],
                 lambda c: c.runs(since="yesterday"), InputError, id="bad-since"),
])  # fmt: skip
def test_python_and_cli_refuse_the_same_input_with_the_same_message(
    config: Path, db_url: str, cli: list[str], call: object, error: type[QClusterError]
) -> None:
    c = Client(config)
    c.add("seed", HELLO, every="1h")
    before = table_rows(db_url)
    with pytest.raises(error) as raised:
        call(c)  # type: ignore[operator]
    line = assert_cli_error(run_cli(*cli, config=config, check=False))
    assert line == f"error: {raised.value}"
    assert table_rows(db_url) == before


def test_python_only_inputs_are_checked_too(config: Path, db_url: str) -> None:
    c = Client(config)
    before = table_rows(db_url)
    for call, fragment in [
        (lambda: c.add("x", HELLO, every="1s", args="not a list"), "must be a list"),  # type: ignore[arg-type]
        (lambda: c.add("x", HELLO, every="1s", kwargs={1: "v"}), "string keys"),  # type: ignore[dict-item]
        (lambda: c.add("x", HELLO, every="1s", args=[object()]), "JSON data"),
        (lambda: c.add("x", HELLO, every="1s", recover="yes"), "recover"),  # type: ignore[arg-type]
        (lambda: c.list(limit=-1), "limit"),
        (lambda: c.runs(limit=2**31), "limit"),
        (lambda: c.runs(since=float("nan")), "since"),
        (lambda: c.runs(since=object()), "since"),  # type: ignore[arg-type]
        (lambda: c.runs(since=10**400), "since"),
        (lambda: c.add("x", HELLO, every="1s", tz=5), "tz must be a string"),  # type: ignore[arg-type]
        (lambda: c.add("x", HELLO, cron=5), "cron must be a string"),  # type: ignore[arg-type]
        (lambda: c.add("x", HELLO, every=True), "every must be"),
        (lambda: c.add("x", HELLO, every=object()), "every must be"),  # type: ignore[arg-type]
        (lambda: c.add("x", HELLO, at="9999-12-31T23:59:59.99999"), "out of range"),
        (lambda: c.apply(None), "apply takes"),  # type: ignore[arg-type]
        (lambda: c.apply(5), "apply takes"),  # type: ignore[arg-type]
        (lambda: Client(5), "config must be a path"),  # type: ignore[arg-type]
        (lambda: Client(settings=5), "settings must be Settings"),  # type: ignore[arg-type]
    ]:
        with pytest.raises(InputError, match=fragment):
            call()
    assert table_rows(db_url) == before


def test_client_reads_the_config_as_the_cli_does(tmp_path: Path, sqlite_url: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_config(tmp_path, sqlite_url, name="elsewhere.toml")
    monkeypatch.setenv("QCLUSTER_CONFIG", str(config))
    assert Client().settings.source == str(config)


def test_a_leader_winning_during_a_change_makes_it_try_again_not_fail(
    config: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of a node starting as the command runs: a new epoch is taken between the
    client's read of the cluster row and its fenced write. The write is refused (nothing
    written) and the change is made again, once."""
    import sqlalchemy as sa

    from qcluster.client import changes

    real = changes._leader_alive
    calls: list[int] = []

    def leader_wins_once(settings: object, db: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            engine = sa.create_engine(db_url)
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE qc_cluster SET epoch = epoch + 1"))
            engine.dispose()
        return real(settings, db)  # type: ignore[arg-type]

    monkeypatch.setattr(changes, "_leader_alive", leader_wins_once)
    c = Client(config)
    assert c.add("raced", HELLO, every="1h").status == "added"
    assert len(calls) == 2
    assert [j["id"] for j in c.list()] == ["raced"]


def test_a_concurrent_add_of_the_same_id_is_reported_as_existing_not_crashed(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two direct changes of one new id at once (no leader), on PostgreSQL, where fenced
    writers share the cluster row's lock (SQLite runs one writer at a time): the other
    one's row is committed between this change's read and its insert. The unique
    violation makes the change try again, and it then refuses the existing id, as it
    would have if it had come second."""
    from qcluster.store import catalog

    config = config_with_tables(tmp_path, pg_url)
    real = catalog.first_fire
    raced: list[bool] = []

    def other_adds_it_first(jd: object, now: float) -> object:
        if not raced:
            raced.append(True)
            Client(config).add("same", HELLO, every="1h")  # its own connection, committed
        return real(jd, now)  # type: ignore[arg-type]

    monkeypatch.setattr(catalog, "first_fire", other_adds_it_first)
    with pytest.raises(JobExists):
        Client(config).add("same", HELLO, every="2h")
    assert raced
    jobs = Client(config).list()
    assert [(j["id"], j["trigger"]) for j in jobs] == [("same", "every 1h")]


def test_definitions_built_by_hand_are_checked_again_before_apply(config: Path,
                                                                  db_url: str) -> None:
    """A JobDef can be made without :meth:`Client.job` (or changed with
    ``dataclasses.replace``): apply checks each one as the leader would, and a bad one
    writes nothing, the good ones beside it included."""
    import dataclasses

    c = Client(config)
    good = c.job("good", HELLO, every="1s")
    before = table_rows(db_url)
    for bad, error, fragment in [
        (dataclasses.replace(good, id="bad", func="os:system"), NotAllowed, "not allowed"),
        (dataclasses.replace(good, id="a b"), InputError, "invalid job id"),
        (dataclasses.replace(good, id="bad", misfire_grace_seconds=-5), InputError,
         "misfire_grace_seconds"),
        (dataclasses.replace(good, id="bad", misfire_grace_seconds=2**40), InputError,
         "misfire_grace_seconds"),
        (dataclasses.replace(good, id="bad", args=(object(),)), InputError, "JSON data"),
        (dataclasses.replace(good, id="bad", trigger={"type": "date", "at": "never"}),  # type: ignore[arg-type]
         InputError, "trigger"),
    ]:
        with pytest.raises(error, match=fragment):
            c.apply([good, bad])
    assert table_rows(db_url) == before


def test_refusals_raise_the_same_class_through_a_running_leader(
    tmp_path: Path, sqlite_url: str
) -> None:
    """With a leader the change goes over the control API; the refusal must still be
    ``JobExists`` / ``JobNotFound`` / ``NotAllowed``, not a bare InputError."""
    from tests.helpers import start_node, wait_for

    config = config_with_tables(tmp_path, sqlite_url)
    c = Client(config)
    with start_node(config, node_id="n1", log_path=tmp_path / "n1.log") as node:
        wait_for(lambda: c.cluster_status()["leader"], timeout=30, what="a leader",
                 details=node.log_tail)
        assert c.add("seed", HELLO, every="1h").via == "leader n1"
        with pytest.raises(JobExists):
            c.add("seed", HELLO, every="1h")
        with pytest.raises(JobNotFound):
            c.pause("ghost")
        with pytest.raises(JobNotFound):
            c.run("ghost")
        node.terminate()
        node.wait()


def test_the_control_api_refuses_what_the_cli_refuses(tmp_path: Path, sqlite_url: str) -> None:
    """Issue 13, point 8: the leader's control object runs the CLI's own check
    (``validate_job(import_it=True)``): a function that does not import, or that the allow
    list refuses, is refused over RPC too, with the CLI's message, and nothing is stored.
    Called through the client's own path to the leader, past the client's checks."""
    from qcluster.client.changes import _call_leader
    from qcluster.settings import load_settings
    from tests.helpers import start_node, wait_for

    config = write_config(tmp_path, sqlite_url, jobs=None)  # the default allow list
    settings = load_settings(config, env={})
    c = Client(settings=settings)
    good = c.job("good", HELLO, every="1h").to_wire()
    with start_node(config, node_id="n1", log_path=tmp_path / "n1.log") as node:
        leader = wait_for(lambda: c.cluster_status()["leader"], timeout=30, what="a leader",
                          details=node.log_tail)
        before = table_rows(sqlite_url)
        for func, kind, fragment in [
            ("jobs.examples:nothing", "input", "has no attribute 'nothing'"),
            ("jobs.nosuchmodule:run", "input", "cannot import 'jobs.nosuchmodule'"),
            ("jobs.builtin:shell", "not_allowed", "not allowed by [jobs] allow"),
            ("jobs.examples:record_run", "not_allowed", "not allowed by [jobs] allow"),
            ("os:system", "not_allowed", "not allowed by [jobs] allow"),
            ("pkg.__init__:f", "input", "no module name that starts with '_'"),
        ]:
            bad = {**good, "id": "bad", "func": func}
            for method, args in (("add_jobs", ([good, bad], False)),
                                 ("apply_jobs", ([good, bad], False))):
                reply = _call_leader(settings, leader["uri"], method, args)
                assert reply["ok"] is False and reply["kind"] == kind, (func, reply)
                assert fragment in reply["error"], (func, reply)
            cli = run_cli("jobs", "add", "bad", "--func", func, "--every", "1h",
                          config=config, check=False)
            if func != "jobs.nosuchmodule:run":  # where it looked: each process's own path
                assert assert_cli_error(cli) == f"error: {reply['error']}"
        assert table_rows(sqlite_url) == before
        reply = _call_leader(settings, leader["uri"], "add_jobs", ([good], False))
        assert reply["ok"] is True, reply
        node.terminate()
        node.wait()


def test_cancel_and_max_attempts_from_python(config: Path) -> None:
    c = Client(config)
    c.add("bounded", HELLO, every="1h", recover=True, max_attempts=4)
    assert c.show("bounded")["max_attempts"] == 4
    assert c.job("j", HELLO, every="1h", max_attempts=2).max_attempts == 2
    for bad in (0, -1, True, "3", 2**31):
        with pytest.raises(InputError, match="max_attempts"):
            c.job("j", HELLO, every="1h", max_attempts=bad)  # type: ignore[arg-type]
    run = c.run("bounded")
    done = c.cancel(run.run_id)
    assert (done.run_id, done.status, done.attempt, done.via) == (
        run.run_id, "cancelled", 1, "database")
    assert [r["status"] for r in c.runs(job="bounded")] == ["cancelled"]
    assert c.runs(status="cancelled")[0]["run_id"] == run.run_id
    with pytest.raises(InputError, match="already finished"):
        c.cancel(run.run_id)
    for bad_id in (0, 2**63, "7", None):
        with pytest.raises(InputError, match="run id"):
            c.cancel(bad_id)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no run 424242"):
        c.cancel(424242)


def test_policies_from_python_take_timedeltas_and_datetimes(config: Path, db_url: str) -> None:
    c = Client(config)
    start = datetime(2026, 12, 1, 9, 0, tzinfo=ZoneInfo("Europe/Berlin"))
    c.add("pol", HELLO, every="1m", retries=2, retry_backoff=timedelta(seconds=5),
          timeout=timedelta(minutes=2), overlap="buffer-all", misfire="skip", start=start,
          max_runs=10, jitter=1.5)
    shown = c.show("pol")
    assert (shown["retries"], shown["retry_backoff"], shown["timeout"]) == (2, 5.0, 120.0)
    assert (shown["overlap"], shown["misfire"], shown["max_runs"], shown["jitter"]) == (
        "buffer-all", "skip", 10, 1.5)
    assert shown["start"] == "2026-12-01T08:00:00+00:00"
    assert c.job("x", HELLO, every="1m", timeout="30s").policy.timeout == 30.0
    before = table_rows(db_url)
    for call, fragment in [
        (lambda: c.add("bad1", HELLO, every="1m", overlap="forbid"), "overlap"),
        (lambda: c.add("bad2", HELLO, every="1m", retries=True), "retries"),
        (lambda: c.add("bad3", HELLO, every="1m", no_such_policy=1), "no_such_policy"),
        (lambda: c.add("bad4", HELLO, every="1m", start=datetime(2026, 1, 1)), "offset"),
    ]:
        with pytest.raises(InputError, match=fragment):
            call()
    assert table_rows(db_url) == before
