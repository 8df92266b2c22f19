"""A user's own job package, found through ``[jobs] paths``, with a normal install.

The unit tests drive :func:`~qcluster.definitions.imports.extend_import_path` and the import
errors of :func:`~qcluster.definitions.imports.resolve_func` in this process. The process
test builds a wheel of this project once per session, installs it (not editable) with ``pip
install --target``, and runs that installed qcluster from an unrelated current directory,
with a config in another directory whose ``[jobs] paths = ["../tasks"]`` names the directory
of the user's package ``acme_tasks``: ``jobs add`` checks it, a real node runs it, the
example jobs of qcluster's own ``jobs`` package still resolve beside it, and a reference
that cannot be imported is one ``error:`` line that says where it was looked for."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from qcluster.definitions import imports
from qcluster.definitions.imports import extend_import_path, resolve_func
from qcluster.definitions.jobdefs import check_func_ref
from qcluster.errors import InputError, NotAllowed
from tests.conftest import unavailable
from tests.helpers import (
    STOP_TIMEOUT,
    NodeProcess,
    assert_cli_error,
    describe_result,
    run_cli,
    wait_for,
    write_config,
)

PROJECT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "qcluster", "backends", "jobs")  # what a wheel needs
BUILD_TIMEOUT = 600.0
WAIT = 60.0  # generous: the machine is shared and small; nothing here measures speed


# -- in this process: the import path and the errors ----------------------------------------


@pytest.fixture
def clean_import_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """sys.path and the record of added paths as they were; test modules forgotten after."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(imports, "_added_paths", set())
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("qct_"):
            del sys.modules[name]
    importlib.invalidate_caches()


def make_package(root: Path, files: dict[str, str]) -> str:
    """Write a package of unique name ``qct_<hex>`` under ``root``; return its name.
    ``files`` maps module names ("__init__", "tasks") to their source."""
    name = f"qct_{uuid.uuid4().hex[:10]}"
    package = root / name
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for module, source in files.items():
        (package / f"{module}.py").write_text(textwrap.dedent(source))
    return name


def import_error(ref: str) -> str:
    with pytest.raises(InputError) as info:
        resolve_func(ref)
    message = str(info.value)
    assert "\n" not in message and len(message) <= 1000, message
    return message


@pytest.mark.usefixtures("clean_import_state")
def test_extend_import_path_puts_the_paths_first_in_order_and_only_once(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    rest = list(sys.path)
    extend_import_path([a, b])
    assert sys.path == [str(a), str(b), *rest]
    extend_import_path([a, b])
    assert sys.path == [str(a), str(b), *rest], "a second call changed the path"
    extend_import_path([b, a, b])  # repeats in one call count once
    assert sys.path == [str(b), str(a), *rest]
    extend_import_path([])
    assert sys.path == [str(b), str(a), *rest]


@pytest.mark.usefixtures("clean_import_state")
def test_a_module_in_a_jobs_path_resolves(tmp_path: Path) -> None:
    name = make_package(tmp_path, {"tasks": "def run():\n    return 'ran'\n"})
    extend_import_path([tmp_path])
    assert resolve_func(f"{name}.tasks:run")() == "ran"


@pytest.mark.usefixtures("clean_import_state")
def test_a_missing_package_says_it_looked_in_the_jobs_paths_and_the_python_path(
    tmp_path: Path,
) -> None:
    extend_import_path([tmp_path / "tasks"])
    message = import_error("qct_absent.nightly:run")
    assert message.startswith(
        "cannot import 'qct_absent.nightly' for 'qct_absent.nightly:run': "
        "no module named 'qct_absent' (looked in [jobs] paths "
        f"{tmp_path / 'tasks'} and the Python path of {sys.executable}: "
    ), message
    assert sys.path[1] in message  # the first entry after the [jobs] paths


@pytest.mark.usefixtures("clean_import_state")
def test_a_missing_package_without_jobs_paths_says_none_are_set() -> None:
    message = import_error("qct_absent:run")
    assert "no module named 'qct_absent' (looked in the Python path of" in message, message
    assert message.endswith("; no [jobs] paths in use)"), message


@pytest.mark.usefixtures("clean_import_state")
def test_a_missing_module_of_a_found_package_says_which_package(tmp_path: Path) -> None:
    name = make_package(tmp_path, {})
    extend_import_path([tmp_path])
    message = import_error(f"{name}.missing:run")
    assert message == (
        f"cannot import '{name}.missing' for '{name}.missing:run': no module named "
        f"'{name}.missing' (looked in package '{name}' at {tmp_path / name}; "
        f"[jobs] paths: {tmp_path})"
    )


@pytest.mark.usefixtures("clean_import_state")
def test_a_long_python_path_is_cut_short(tmp_path: Path) -> None:
    sys.path[:] = [f"/nowhere/{'x' * 90}/{i}" for i in range(500)]
    message = import_error("qct_absent:run")
    assert re.search(r"\.\.\. \(\d+ more\)", message), message


@pytest.mark.usefixtures("clean_import_state")
def test_a_module_that_raises_names_the_exception_not_a_search(tmp_path: Path) -> None:
    name = make_package(tmp_path, {
        "broken": "x = 1 / 0\n",
        "needs": "import qct_not_installed_dependency\n\ndef run():\n    pass\n",
    })
    extend_import_path([tmp_path])
    message = import_error(f"{name}.broken:run")
    assert message == (f"cannot import '{name}.broken' for '{name}.broken:run': "
                       "importing it raised ZeroDivisionError: division by zero")
    message = import_error(f"{name}.needs:run")
    assert message == (
        f"cannot import '{name}.needs' for '{name}.needs:run': importing it raised "
        "ModuleNotFoundError: No module named 'qct_not_installed_dependency'"
    )


@pytest.mark.usefixtures("clean_import_state")
def test_the_allow_list_and_the_defined_here_checks_stay_as_strict(tmp_path: Path) -> None:
    name = make_package(tmp_path, {
        "tasks": "from os.path import join\n\ndef run():\n    pass\n",
    })
    extend_import_path([tmp_path])
    with pytest.raises(NotAllowed, match=r"not allowed by \[jobs\] allow"):
        check_func_ref(f"{name}.tasks:run", ["jobs.*"], import_it=True)
    assert f"{name}.tasks" not in sys.modules, "a refused reference was imported"
    assert check_func_ref(f"{name}.tasks:run", [f"{name}.*"], import_it=True)
    assert "is not defined in" in import_error(f"{name}.tasks:join")


@pytest.mark.usefixtures("clean_import_state")
def test_a_node_puts_its_jobs_paths_on_the_import_path_when_built(tmp_path: Path) -> None:
    from qcluster.node import Node
    from qcluster.settings import load_settings

    (tmp_path / "tasks").mkdir()
    (tmp_path / "etc").mkdir()
    config = write_config(tmp_path / "etc", f"sqlite:///{tmp_path / 'qcluster.db'}",
                          jobs={"paths": ["../tasks"]})
    name = make_package(tmp_path / "tasks", {"tasks": "def run():\n    pass\n"})
    Node(load_settings(config, env={}), node_id="n1")  # built, not started
    assert sys.path[0] == str(tmp_path / "tasks")
    assert callable(resolve_func(f"{name}.tasks:run"))


# -- a normal install, as a user has it -------------------------------------------------------


def _build_requirements_met() -> bool:
    """Whether this interpreter has the build-system requirements of pyproject.toml (then
    the wheel builds offline, without build isolation)."""
    requires = tomllib.loads((PROJECT / "pyproject.toml").read_text())["build-system"]["requires"]
    for requirement in requires:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:>=\s*([\d.]+))?", requirement.strip())
        if m is None:
            return False
        try:
            have = metadata.version(m.group(1))
        except metadata.PackageNotFoundError:
            return False
        if m.group(2) and _version(have) < _version(m.group(2)):
            return False
    return True


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def _pip(*args: str, timeout: float = BUILD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False)


@pytest.fixture(scope="session")
def installed_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding qcluster installed from a wheel (``pip install --target``).

    The wheel is built from a copy of the sources, so the checkout gets no build/ files.
    Without setuptools and wheel here, pip builds it in an isolated environment, which
    needs the package index: outside CI a failure of that skips, with ``CI=true`` it fails.
    """
    if _pip("--version", timeout=60).returncode != 0:
        unavailable(f"pip is not available to {sys.executable}")
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:
        if (PROJECT / name).is_dir():
            shutil.copytree(PROJECT / name, source / name,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(PROJECT / name, source / name)
    offline = _build_requirements_met()
    args = ["wheel", "--no-deps", *(["--no-build-isolation"] if offline else []),
            "--wheel-dir", str(root / "dist"), str(source)]
    built = _pip(*args)
    if built.returncode != 0:
        what = (f"`pip {' '.join(args[:-3])}` could not build a wheel of qcluster:\n"
                f"{built.stdout[-3000:]}{built.stderr[-3000:]}")
        if offline:  # everything was here: the packaging itself is broken
            pytest.fail(what, pytrace=False)
        unavailable(what)  # most likely no index to fetch setuptools and wheel from
    (wheel,) = (root / "dist").glob("qcluster-*.whl")
    site = root / "site"
    installed = _pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel))
    assert installed.returncode == 0, f"pip install failed:\n{installed.stdout}{installed.stderr}"
    return site


ACME_NIGHTLY = '''\
"""The user's job: it says where qcluster, qcluster's jobs and itself were imported from."""

import json
import os

import jobs
import qcluster


def run(marker: str) -> None:
    seen = {"qcluster": qcluster.__file__, "jobs": jobs.__file__, "self": __file__}
    with open(marker + ".tmp", "w") as f:
        json.dump(seen, f)
    os.replace(marker + ".tmp", marker)
'''


class Installed:
    """The installed qcluster, run from an unrelated directory with one config."""

    def __init__(self, site: Path, cwd: Path, config: Path) -> None:
        self.site, self.cwd, self.config = site, cwd, config
        self.env = {"PYTHONPATH": str(site)}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, config=self.config, check=check, cwd=self.cwd, env=self.env)

    def json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        try:
            return json.loads(result.stdout)
        except ValueError:
            raise AssertionError(f"output is not JSON\n{describe_result(result)}") from None

    def runs(self, job_id: str) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self.json("runs", "list", "--job", job_id, "--limit", "0")
        return runs


@pytest.mark.slow
@pytest.mark.cluster
def test_a_users_package_on_jobs_paths_runs_beside_the_example_jobs(
    installed_site: Path, tmp_path: Path,
) -> None:
    etc, tasks, elsewhere, data = (tmp_path / d for d in ("etc", "tasks", "elsewhere", "data"))
    for d in (etc, tasks, elsewhere, data):
        d.mkdir()
    (tasks / "acme_tasks").mkdir()
    (tasks / "acme_tasks" / "__init__.py").write_text("")
    (tasks / "acme_tasks" / "nightly.py").write_text(ACME_NIGHTLY)
    config = write_config(etc, f"sqlite:///{data / 'qcluster.db'}",
                          jobs={"paths": ["../tasks"], "allow": ["jobs.*", "acme_tasks.*"]})
    qc = Installed(installed_site, elsewhere, config)

    # The qcluster that runs is the installed one, not this checkout (editable or not).
    probe = subprocess.run(
        [sys.executable, "-c", "import jobs, qcluster; print(qcluster.__file__); "
         "print(jobs.__file__)"],
        capture_output=True, text=True, cwd=elsewhere, env={**os.environ, **qc.env},
        timeout=60, check=True,
    )  # fmt: skip
    for module_file in probe.stdout.split():
        assert Path(module_file).is_relative_to(installed_site), probe.stdout
    assert not Path(probe.stdout.split()[0]).is_relative_to(PROJECT)

    qc.cli("db", "upgrade")
    marker = data / "acme.json"
    qc.cli("jobs", "add", "acme", "--func", "acme_tasks.nightly:run", "--every", "1s",
           "--kwarg", f"marker={marker}")
    qc.cli("jobs", "add", "hello", "--func", "jobs.examples:hello", "--every", "1s",
           "--kwarg", "name=beside acme")
    jobs_before = qc.json("jobs", "list")
    assert [(j["id"], j["func"]) for j in jobs_before] == [
        ("acme", "acme_tasks.nightly:run"), ("hello", "jobs.examples:hello")]

    def add_missing() -> str:
        failed = qc.cli("jobs", "add", "missing", "--func", "acme_tasks.missing:run",
                        "--every", "1s", check=False)
        return assert_cli_error(failed, "acme_tasks.missing", str(tasks))

    line = add_missing()  # no leader yet: the CLI would write the database itself
    assert "no module named 'acme_tasks.missing'" in line, line
    assert qc.json("jobs", "list") == jobs_before

    node_log = tmp_path / "node.log"
    args = ["start", "--role", "all", "--config", os.path.relpath(config, elsewhere),
            "--node-id", "n1"]
    with NodeProcess(args, config=None, log_path=node_log, cwd=elsewhere, env=qc.env) as node:

        def both_succeeded() -> bool:
            assert node.running(), f"node exited with {node.returncode}\n{node.log_tail()}"
            return marker.exists() and all(
                any(r["status"] == "succeeded" for r in qc.runs(job)) for job in ("acme", "hello"))

        wait_for(both_succeeded, WAIT, interval=0.5, details=node.log_tail,
                 what="a succeeded run of acme (the marker written) and of hello")
        seen = json.loads(marker.read_text())
        assert Path(seen["self"]) == tasks / "acme_tasks" / "nightly.py", seen
        assert Path(seen["qcluster"]).is_relative_to(installed_site), seen
        assert Path(seen["jobs"]).is_relative_to(installed_site), seen
        assert not any(r["status"] == "failed" for job in ("acme", "hello") for r in qc.runs(job))

        add_missing()  # now through the leader: refused the same way
        assert [j["id"] for j in qc.json("jobs", "list")] == ["acme", "hello"]

        node.terminate()
        try:
            code = node.wait(STOP_TIMEOUT)
        except AssertionError:
            node.kill()
            raise
        assert code == 0, node.log_tail()
    assert "Traceback" not in node_log.read_text(), node_log.read_text()[-4000:]
