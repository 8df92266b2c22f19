"""One owner per table: each qcluster table is written by exactly one module of
``qcluster/`` and ``backends/`` (Alembic's revisions aside), and the others call its
functions (docs/DESIGN.md, "Tables").

The check reads the source, not the database: an ``.insert()``/``.update()``/``.delete()``
of ``schema.<table>`` or of a name bound to it (``j = schema.jobs``, ``t, c = schema.lease,
schema.cluster``, an alias of an alias, ``from ... schema import jobs as table``),
``insert(schema.<table>)`` and the like (``sa.update``, a dialect's ``insert``), and SQL
text that inserts into, updates, deletes from or truncates the table. Docstrings are prose,
not SQL. ``tests/store/test_runs.py`` keeps its own check of ``qc_runs``; this one covers
every table, that one included.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Alembic's revisions create and drop the tables: schema changes, not row writes.
MIGRATIONS = ROOT / "qcluster" / "store" / "migrations"
_WRITES = {"insert", "update", "delete"}

#: (attribute in qcluster/store/schema.py, table name, the one module (or package) that
#: writes it)
OWNERS = [
    ("jobs", "qc_jobs", "qcluster/store/catalog.py"),
    ("runs", "qc_runs", "qcluster/store/runs"),  # a package: its modules together
    ("run_output", "qc_run_output", "qcluster/store/runs"),
    ("calendars", "qc_calendars", "qcluster/store/calendars.py"),
    ("job_deps", "qc_job_deps", "qcluster/store/catalog.py"),
    ("groups", "qc_groups", "qcluster/store/groups.py"),
    ("cluster", "qc_cluster", "qcluster/store/cluster.py"),
    ("lease", "qc_lease", "backends/dblock.py"),
    ("members", "qc_members", "backends/dblock.py"),
]


def _sql_write(table: str) -> re.Pattern[str]:
    return re.compile(rf"\b(insert\s+into|update|delete\s+from|truncate(\s+table)?)\s+"
                      rf"(\w+\.)?\"?{table}\b", re.IGNORECASE)


class _Table:
    """What names ``schema.<attr>`` goes by in one module's syntax tree."""

    def __init__(self, tree: ast.AST, attr: str) -> None:
        self.attr, self.schemas, self.names = attr, {"schema"}, set[str]()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                self.schemas |= {a.asname for a in node.names
                                 if a.name == "schema" and a.asname}
                if (node.module or "").endswith("schema"):
                    self.names |= {a.asname or a.name for a in node.names if a.name == attr}
        for _ in range(3):  # aliases of aliases
            for node in ast.walk(tree):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        self.names |= self._bound(target, node.value)
                elif isinstance(node, ast.AnnAssign) and node.value is not None:
                    self.names |= self._bound(node.target, node.value)

    def __contains__(self, node: ast.AST) -> bool:
        """Whether ``node`` is the table: ``schema.<attr>`` or a name bound to it."""
        if isinstance(node, ast.Attribute) and node.attr == self.attr:
            return (getattr(node.value, "id", None)
                    or getattr(node.value, "attr", None)) in self.schemas
        return isinstance(node, ast.Name) and node.id in self.names

    def _bound(self, target: ast.AST, value: ast.AST) -> set[str]:
        if isinstance(target, ast.Name) and value in self:
            return {target.id}
        if isinstance(target, ast.Tuple | ast.List) and isinstance(value, ast.Tuple | ast.List):
            return {n for t, v in zip(target.elts, value.elts, strict=False)
                    for n in self._bound(t, v)}
        return set()


def table_writes(source: str, attr: str, table: str) -> list[int]:
    """The lines of ``source`` that write the table ``schema.<attr>`` (SQL name ``table``)."""
    tree = ast.parse(source)
    it = _Table(tree, attr)
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    sql = _sql_write(table)
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
            if name in _WRITES and (
                (isinstance(f, ast.Attribute) and f.value in it) or any(a in it for a in node.args)
            ):
                found.add(node.lineno)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings and sql.search(node.value):
            found.add(node.lineno)
    return sorted(found)


def _sources() -> list[Path]:
    return [
        path
        for folder in ("qcluster", "backends")
        for path in sorted((ROOT / folder).rglob("*.py"))
        if MIGRATIONS not in path.parents
    ]


@pytest.mark.parametrize(("attr", "table", "owner"), OWNERS, ids=[t for _, t, _ in OWNERS])
def test_each_table_is_written_by_its_owner_alone(attr: str, table: str, owner: str) -> None:
    own = ROOT / owner
    owned = sorted(own.rglob("*.py")) if own.is_dir() else [own]
    assert any(table_writes(p.read_text(), attr, table) for p in owned), (
        f"the check no longer sees {owner}")
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in _sources()
        if path not in owned
        for line in table_writes(path.read_text(), attr, table)
    ]
    assert offenders == [], f"{table} written outside {owner}: {offenders}"


def test_every_table_of_the_schema_has_an_owner() -> None:
    from qcluster.store import schema

    assert {t.name for t in schema.metadata.sorted_tables} == {t for _, t, _ in OWNERS}


@pytest.mark.parametrize("snippet", [
    "schema.jobs.insert().values(x=1)",
    "conn.execute(schema.jobs.update().where(x))",
    "from qcluster.store import schema\nj = schema.jobs\nconn.execute(j.delete())",
    "j = schema.jobs\nt = j\nt.update()",
    "t, j = schema.lease, schema.jobs\nj.update()",
    "from qcluster.store.schema import jobs as table\ntable.insert()",
    "from qcluster.store import schema as s\ns.jobs.delete()",
    "sqlite.insert(schema.jobs).on_conflict_do_nothing()",
    "j: Table = schema.jobs\nsa.update(j).values(paused=True)",
    "sa.text('UPDATE qc_jobs SET paused = 1')",
    "sa.text(f'INSERT INTO qc_jobs ({cols}) VALUES (1)')",
    "conn.exec_driver_sql('truncate table public.qc_jobs')",
])
def test_the_check_finds_a_write(snippet: str) -> None:
    assert table_writes(snippet, "jobs", "qc_jobs")


@pytest.mark.parametrize("snippet", [
    "sa.select(schema.jobs).where(schema.jobs.c.paused)",
    "j = schema.jobs\nconn.execute(sa.select(j.c.id))",
    "t, j = schema.jobs, schema.lease\nj.update()",
    "changes.update(x)\njobs.update(x)\ncatalog.delete_job(conn, 'a')",
    "schema.runs.update().values(x=1)\nsa.text('SELECT * FROM qc_jobs')",
    "sa.text('UPDATE qc_jobs_archive SET x = 1')",
    '"""The leader updates qc_jobs rows (a docstring)."""',
])
def test_the_check_lets_reads_and_other_tables_be(snippet: str) -> None:
    assert table_writes(snippet, "jobs", "qc_jobs") == []
