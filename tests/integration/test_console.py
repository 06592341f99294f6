"""The operator console in a real browser: headless Chromium driving the console of a fleet.

The fleet is real (Postgres, Redis, a ``celery worker`` running tests/integration/
console_flows.py); the console is the ASGI app served by uvicorn on a free loopback
port, over the same record. Screenshots go to the test's tmp dir, and to
``$CRUXTEST_SCREENSHOTS`` (docs/img when refreshing the docs) when that is set.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from crux_workers.ui import create_app
from tests.support.fleet import Fleet

TERMINAL = ("completed", "failed", "cancelled", "expired")


class ConsoleFleet(Fleet):
    flows_module = "tests.integration.console_flows"


class Served:
    """The console on a free loopback port, served by uvicorn in a thread."""

    def __init__(self, app: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the console did not start in 20s"
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


class Browser:
    """Headless Chromium with the screenshots a test takes."""

    def __init__(self, shots: Path) -> None:
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        driver = shutil.which("chromedriver")
        if chromium is None or driver is None:
            pytest.fail("chromium and chromedriver are needed: bash scripts/test.sh installs them")
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for arg in (
            "--headless=new",
            "--no-sandbox",
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1440,960",
            "--force-device-scale-factor=1",
        ):
            options.add_argument(arg)
        self.driver: WebDriver = webdriver.Chrome(
            options=options, service=webdriver.ChromeService(executable_path=driver)
        )
        self.shots = shots
        shots.mkdir(parents=True, exist_ok=True)

    def shot(self, name: str) -> Path:
        path = self.shots / f"console-{name}.png"
        self.driver.save_screenshot(str(path))
        publish = os.environ.get("CRUXTEST_SCREENSHOTS")
        if publish:
            Path(publish).mkdir(parents=True, exist_ok=True)
            shutil.copy(path, Path(publish) / path.name)
        return path

    def close(self) -> None:
        self.driver.quit()


def until(
    browser: Browser, what: str, check: Callable[[WebDriver], Any], timeout: float = 30
) -> Any:
    """Wait (bounded) for ``check`` to hold; on failure, a screenshot and the page's text."""

    def safe_check(d: WebDriver) -> Any:
        try:
            return check(d)
        except (StaleElementReferenceException, WebDriverException):
            return False

    try:
        return WebDriverWait(browser.driver, timeout, poll_frequency=0.2).until(safe_check)
    except Exception as exc:
        browser.shot("failure")
        body = browser.driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"timed out waiting for {what}; page:\n{body[:3000]}") from exc


def text_of(driver: WebDriver, css: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, css).text


@pytest.fixture
def fleet(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[ConsoleFleet]:
    f = ConsoleFleet(pg_url, redis_url, tmp_path)
    f.env["CRUXTEST_CONSOLE_FIX"] = str(tmp_path / "fix-deployed")
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def console(fleet: ConsoleFleet) -> Iterator[Served]:
    served = Served(create_app(fleet.app))
    try:
        yield served
    finally:
        served.close()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "shots")
    try:
        yield b
    finally:
        b.close()


def wait_status(fleet: Fleet, flow_id: str, status: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while fleet.statuses().get(flow_id) != status:
        assert time.monotonic() < deadline, (
            f"{flow_id} is {fleet.statuses().get(flow_id)}, not {status}\n{fleet.logs_tail()}"
        )
        time.sleep(0.2)


def test_an_operator_finds_a_suspended_flow_and_approves_it_through_the_signal_form(
    fleet: ConsoleFleet, console: Served, browser: Browser
) -> None:
    fleet.worker()
    fleet.beat()
    approval, payment = fleet.flows["approval"], fleet.flows["payment"]
    waiting = [
        approval.run(input={"order": f"A-10{i}", "amount": 40 + i}).flow_id for i in range(3)
    ]
    failed = payment.run(input={"order": "P-7", "amount": 99}).flow_id
    for flow_id in waiting:
        wait_status(fleet, flow_id, "suspended")
    wait_status(fleet, failed, "failed")
    d = browser.driver

    d.get(console.url + "/")
    until(
        browser,
        "the flows list",
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "table.flows tbody tr")) == 4,
    )
    assert text_of(d, '.count[data-status="suspended"] b') == "3"
    assert text_of(d, '.count[data-status="failed"] b') == "1"
    browser.shot("flows")

    # Filter to suspended with the form: only the three waiting flows remain.
    Select(d.find_element(By.ID, "f-status")).select_by_value("suspended")
    d.find_element(By.CSS_SELECTOR, "#filters button[type=submit]").click()
    until(browser, "the suspended filter", lambda d: "status=suspended" in d.current_url)
    rows = d.find_elements(By.CSS_SELECTOR, "table.flows tbody tr")
    assert len(rows) == 3
    assert all("suspended" in r.text and "approval" in r.text for r in rows)
    assert "deadline in" in rows[0].text  # the 1h timeout as a countdown

    d.get(console.url + "/waiting")
    row = until(
        browser,
        "the waiting group",
        lambda d: d.find_element(By.CSS_SELECTOR, "table.waiting tbody tr"),
    )
    assert "approval" in row.text and "signal" in row.text and "3" in row.text
    browser.shot("waiting")
    d.back()

    target = waiting[0]
    d.find_element(By.LINK_TEXT, target).click()
    until(browser, "the flow page", lambda d: target in text_of(d, ".flow-head h1"))
    assert "suspended" in text_of(d, ".flow-head h1")
    assert "approval" in text_of(d, ".waiting-now")
    assert "reserve" in text_of(d, "table.timeline")
    browser.shot("flow")

    # The wait's recorded schema gives the form its fields; the send is checked at once:
    # "by" is required, and its error shows next to it; nothing is recorded.
    assert "*" in d.find_element(By.XPATH, "//label[contains(., 'By')]").text
    d.find_element(By.NAME, "field.note").send_keys("<b>rush</b>")
    d.find_element(By.CSS_SELECTOR, "#signal-form button[type=submit]").click()
    until(browser, "the field error", lambda d: d.find_elements(By.CSS_SELECTOR, ".field-error"))
    errors = d.find_elements(By.CSS_SELECTOR, ".field-error")
    assert [(e.get_attribute("data-field"), e.text) for e in errors] == [("by", "Field required")]
    assert d.find_element(By.NAME, "field.note").get_attribute("value") == "<b>rush</b>"
    assert fleet.app.get_flow(target).signals == []
    browser.shot("signal-invalid")
    d.find_element(By.NAME, "field.approved").click()
    d.find_element(By.NAME, "field.by").send_keys("dana (ops)")
    d.find_element(By.CSS_SELECTOR, "#signal-form button[type=submit]").click()
    until(browser, "the notice", lambda d: "Signal delivered" in text_of(d, ".notice"))
    until(
        browser,
        "the flow completing (live refresh)",
        lambda d: "completed" in text_of(d, ".flow-head h1"),
    )
    assert '"approved": true' in text_of(d, ".okbox")
    assert "notify" in text_of(d, "table.timeline")
    assert fleet.statuses()[target] == "completed"
    assert not d.find_elements(By.ID, "signal-form")  # nothing to send to a finished flow
    browser.shot("flow-completed")

    # The failed flow: its error and traceback, where an operator looks first.
    d.get(console.url + "/flows?status=failed")
    d.find_element(By.LINK_TEXT, failed).click()
    until(
        browser,
        "the failed flow",
        lambda d: "payment gateway refused 99" in text_of(d, ".errorbox"),
    )
    assert "Traceback" in text_of(d, ".errorbox")
    browser.shot("flow-failed")

    d.get(console.url + "/fleet")
    until(browser, "a sweep on the fleet page", lambda d: "on time" in text_of(d, ".cards"))
    assert "due backlog" in text_of(d, ".cards").lower()
    assert "crux.signals" in text_of(d, "table.queues")
    browser.shot("fleet")


def test_an_operator_cancels_a_flow_with_a_reason(
    fleet: ConsoleFleet, console: Served, browser: Browser
) -> None:
    fleet.worker()
    flow_id = fleet.flows["approval"].run(input={"order": "C-1"}).flow_id
    other = fleet.flows["approval"].run(input={"order": "C-2"}).flow_id
    wait_status(fleet, flow_id, "suspended")
    wait_status(fleet, other, "suspended")
    d = browser.driver
    d.get(f"{console.url}/flows/{flow_id}")
    until(browser, "the flow page", lambda d: "suspended" in text_of(d, ".flow-head h1"))

    # No reason: refused in place, nothing cancelled.
    d.find_element(By.CSS_SELECTOR, "#cancel-form input[name=reason]").get_attribute("required")
    d.execute_script("document.querySelector('#cancel-form input[name=reason]').required = false")
    d.find_element(By.CSS_SELECTOR, "#cancel-form button[type=submit]").click()
    until(browser, "the reason error", lambda d: "Say why" in text_of(d, "#cancel .alert"))
    assert fleet.statuses()[flow_id] == "suspended"

    d.find_element(By.CSS_SELECTOR, "#cancel-form input[name=reason]").send_keys("duplicate order")
    d.find_element(By.CSS_SELECTOR, "#cancel-form button[type=submit]").click()
    until(browser, "the cancelled flow", lambda d: "cancelled" in text_of(d, ".flow-head h1"))
    assert "duplicate order" in text_of(d, ".reason")
    assert "Flow cancelled" in text_of(d, ".notice")
    assert fleet.statuses() == {flow_id: "cancelled", other: "suspended"}
    browser.shot("flow-cancelled")


def test_an_operator_retries_a_failed_flow_after_the_fix_then_forks_it(
    fleet: ConsoleFleet, console: Served, browser: Browser, tmp_path: Path
) -> None:
    fleet.worker()
    flow_id = fleet.flows["payment"].run(input={"order": "R-1", "amount": 25}).flow_id
    wait_status(fleet, flow_id, "failed")
    d = browser.driver
    d.get(f"{console.url}/flows/{flow_id}")
    until(browser, "the error", lambda d: "payment gateway refused 25" in text_of(d, ".errorbox"))

    (tmp_path / "fix-deployed").touch()  # the fix ships; the failed step can run again
    d.find_element(By.CSS_SELECTOR, "#retry-form button[type=submit]").click()
    until(browser, "the notice", lambda d: "Retry requested" in text_of(d, ".notice"))
    until(
        browser, "the retried flow completing", lambda d: "completed" in text_of(d, ".flow-head h1")
    )
    assert '"charged": 25' in text_of(d, ".okbox")
    assert "retried 1" in text_of(d, ".facts")
    steps = [r.text for r in d.find_elements(By.CSS_SELECTOR, "table.timeline tbody tr")]
    assert len(steps) == 2 and "reserve" in steps[0] and "charge" in steps[1]
    browser.shot("flow-retried")

    # Fork after the first checkpoint (reserve is copied, not re-run) with a new amount.
    Select(d.find_element(By.CSS_SELECTOR, "#fork-form select[name=at]")).select_by_value("1")
    box = d.find_element(By.CSS_SELECTOR, "#fork-form textarea[name=input]")
    box.clear()
    box.send_keys('{"order": "R-1", "amount": 4}')
    browser.shot("fork-form")
    d.find_element(By.CSS_SELECTOR, "#fork-form button[type=submit]").click()
    until(browser, "the fork's page", lambda d: "forked from" in text_of(d, ".notice").lower())
    until(browser, "the fork completing", lambda d: "completed" in text_of(d, ".flow-head h1"))
    fork = d.find_element(By.CSS_SELECTOR, ".flow-head .fid").text
    assert fork != flow_id
    assert f"forked from {flow_id} at checkpoint 1" in text_of(d, ".facts")
    assert '"charged": 4' in text_of(d, ".okbox")
    state = fleet.app.get_flow(fork)
    assert state.forked_from is not None and state.forked_from.flow_id == flow_id
    assert fleet.app.get_flow(flow_id).result == {"charged": 25}  # the original is untouched
    browser.shot("flow-forked")
