"""The dashboard in a real browser (issue 17, item 5): Debian's headless ``chromium``,
driven through its ``chromedriver`` by Selenium (nothing is downloaded), against a real
``qcluster start`` node on PostgreSQL that serves ``[web]`` beside its scheduler and
worker.

A screenshot of each page goes to ``$QCLUSTER_TEST_ARTIFACTS/screenshots`` (default
``artifacts/screenshots`` in the checkout), and, with ``QCLUSTER_SCREENSHOTS=DIR``, to
DIR as well (``docs/screenshots`` holds the README's).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable
from tests.helpers import run_cli, run_json, start_node, wait_for, write_config
from tests.servers.base import free_port
from tests.web.conftest import HASH, PASSWORD

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
WAIT = 30.0


def _first(paths: tuple[str, ...]) -> str | None:
    return next((p for p in paths if os.access(p, os.X_OK)), None)


def shots_dirs() -> list[Path]:
    base = Path(os.environ.get("QCLUSTER_TEST_ARTIFACTS", ROOT / "artifacts"))
    dirs = [base / "screenshots"]
    if extra := os.environ.get("QCLUSTER_SCREENSHOTS"):
        dirs.append(Path(extra))
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    return dirs


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed")
    binary, driver = _first(CHROMIUM), _first(CHROMEDRIVER)
    if binary is None or driver is None:
        unavailable("Debian's chromium and chromium-driver are not installed")
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--disable-gpu", "--window-size=1280,900", "--no-first-run"):
        options.add_argument(arg)
    options.binary_location = binary
    d = webdriver.Chrome(service=Service(driver), options=options)
    d.set_page_load_timeout(WAIT)
    try:
        yield d
    finally:
        d.quit()


def shot(d: Any, name: str) -> None:
    """The whole page: the window is made as tall as the document for the picture."""
    first, *more = shots_dirs()
    height = int(d.execute_script("return document.documentElement.scrollHeight"))
    d.set_window_size(1280, max(900, min(height + 20, 3000)))
    d.save_screenshot(str(first / f"{name}.png"))
    d.set_window_size(1280, 900)
    for other in more:
        shutil.copy(first / f"{name}.png", other / f"{name}.png")


def fresh(d: Any, action: Any) -> Any:
    """Run ``action`` on the page, again if the page's refresh swapped the element out
    between finding and using it (the refresh replaces ``<main>`` every second)."""
    from selenium.common.exceptions import StaleElementReferenceException

    for _ in range(20):
        try:
            return action()
        except StaleElementReferenceException:
            continue
    return action()


def text(d: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return str(fresh(d, lambda: d.find_element(By.ID, element_id).text))


def click(d: Any, by: str, value: str) -> None:
    fresh(d, lambda: d.find_element(by, value).click())


def test_an_operator_logs_in_sees_the_leader_and_works_on_jobs_in_chromium(
        browser: Any, pg_url: str, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    port = free_port()
    config = write_config(tmp_path, pg_url, web={
        "port": port, "refresh_seconds": 1,
        "users": [{"name": "ops", "password_hash": HASH, "role": "operator"}]})
    run_cli("db", "upgrade", config=config)
    base = f"http://127.0.0.1:{port}"
    with start_node(config, node_id="n1", log_path=tmp_path / "n1.log") as node:
        wait_for(lambda: (run_json("cluster", "status", "--json", config=config)
                          .get("leader") or {}).get("node_id") == "n1", WAIT,
                 what="n1 to lead", details=node.log_tail)

        # Without a login, every page sends the browser to the login page.
        for path in ("/", "/jobs", "/jobs/x", "/runs", "/runs/1"):
            d.get(base + path)
            assert "/login" in d.current_url, path
        shot(d, "login")

        d.find_element(By.ID, "login-user").send_keys("ops")
        d.find_element(By.ID, "login-password").send_keys(PASSWORD)
        d.find_element(By.ID, "login-submit").click()
        wait_for(lambda: "/login" not in d.current_url, WAIT, what="the login to pass")
        cookies = {c["name"]: c for c in d.get_cookies()}
        assert cookies["qc_session"]["httpOnly"] and cookies["qc_session"]["sameSite"] == "Strict"

        d.get(base + "/")
        assert "n1" in text(d, "leader") and "epoch" in text(d, "leader")
        assert "n1" in text(d, "members")
        shot(d, "cluster")

        # A job added through the CLI appears on the open page, without a reload.
        d.get(base + "/jobs")
        marker = d.execute_script("window.qcMarker = 42; return window.qcMarker;")
        run_cli("jobs", "add", "hello", "--func", "jobs.examples:hello", "--every", "1s",
                config=config)
        run_cli("jobs", "add", "weekday", "--func", "jobs.examples:hello", "--cron",
                "0 9 * * 1-5", config=config)
        wait_for(lambda: "hello" in text(d, "jobs") and "weekday" in text(d, "jobs"), WAIT,
                 what="the new jobs on the open page")
        assert d.execute_script("return window.qcMarker;") == marker  # not reloaded
        assert "Monday through Friday" in text(d, "jobs")
        wait_for(lambda: "succeeded" in text(d, "jobs"), WAIT, what="hello's first run")
        shot(d, "jobs")

        # Pause it from the page: tick its box, press Pause.
        click(d, By.CSS_SELECTOR, 'input[name="job"][value="hello"]')
        d.find_element(By.ID, "bulk-pause").click()
        wait_for(lambda: "pause: 1 done" in d.page_source, WAIT, what="the pause notice")
        shown = run_json("jobs", "show", "hello", "--json", config=config)
        assert shown["paused"] is True

        # A change sent without the CSRF token, from the page's own origin: refused.
        status = d.execute_async_script("""
            const done = arguments[arguments.length - 1];
            fetch('/jobs/action', {method: 'POST', credentials: 'same-origin',
                headers: {'Content-Type': 'application/x-www-form-urlencoded'},
                body: 'action=resume&job=hello'}).then(r => done(r.status));""")
        assert status == 403
        assert run_json("jobs", "show", "hello", "--json", config=config)["paused"] is True

        # The job's page: its next fire times, its runs, the lateness chart; a run's output.
        d.get(base + "/jobs/weekday")
        assert fresh(d, lambda: len(d.find_elements(By.CSS_SELECTOR, "#next-fires li"))) == 10
        d.get(base + "/jobs/hello")
        assert d.find_elements(By.ID, "lateness-chart")
        assert "paused" in text(d, "job-state")
        shot(d, "job")
        click(d, By.LINK_TEXT, "output")
        wait_for(lambda: "/runs/" in d.current_url, WAIT, what="the run's page")
        assert "hello world from n1" in text(d, "output-1")
        assert text(d, "run-status") == "succeeded"
        shot(d, "run")

        # Runs: a failure shows up among the recent failures and misses, with its error.
        run_cli("jobs", "add", "boom", "--func", "jobs.builtin:shell", "--arg",
                "sh -c 'echo going down; exit 3'", "--every", "1h", config=config)
        run_cli("jobs", "run", "boom", config=config)
        d.get(base + "/runs")
        wait_for(lambda: "boom" in text(d, "runs"), WAIT, what="boom's failure listed",
                 details=lambda: f"{run_json('runs', 'list', '--json', config=config)}"
                                 f"\n{text(d, 'runs')}")
        assert "failed" in text(d, "runs") and "exit status 3" in text(d, "runs")
        shot(d, "runs")

        # Logged out: the pages ask for the login again.
        d.get(base + "/jobs")
        click(d, By.CSS_SELECTOR, "form.who button")
        wait_for(lambda: "/login" in d.current_url, WAIT, what="the logout")
        d.get(base + "/runs")
        assert "/login" in d.current_url
