"""The web dashboard in real headless Chromium (Debian's chromium + chromium-driver, driven by selenium) against
the real server: sign-in with an admin token, nothing readable without one, the fleet, a rollout whose waves and
gate results update live, per-version field statistics with plots, the audit log, device-sent text shown
escaped, and no request leaving the server (offline: the dashboard's and /docs' files are served by it)."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet_support import SimDevice, upload, wait_for

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver "
                                "(scripts/setup-test-system.sh installs them)")
HOSTILE = 'other:<img src=x onerror="document.title=\'pwned\'"><script>document.title="pwned"</script>'


@pytest.fixture
def fleet_db(tmp_path: Path) -> str:
    """SQLite only: this test is about the browser; the API's own tests cover PostgreSQL."""
    return f"sqlite:///{tmp_path / 'fleet.db'}"


@pytest.fixture
def browser() -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="edgekit-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def until(predicate, timeout: float = 20.0):  # noqa: ANN001, ANN201
    """wait_for, also retrying while the element asked for is not on the page yet."""
    from selenium.common.exceptions import WebDriverException

    def attempt():  # noqa: ANN202
        try:
            return predicate()
        except WebDriverException:
            return None

    return wait_for(attempt, timeout=timeout)


def _text(driver) -> str:  # noqa: ANN001
    return driver.find_element("tag name", "body").text


def _click(driver, selector: str) -> None:  # noqa: ANN001
    driver.find_element("css selector", selector).click()


def _resources_stay_on(driver, url: str) -> None:  # noqa: ANN001
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert names and all(n.startswith(url) for n in names), names


def test_dashboard_in_a_real_browser(live_server, fleet_bundles, browser) -> None:
    admin = live_server.admin
    for v in ("v1", "v2"):
        assert upload(admin, "digits", [fleet_bundles.ekb[v]["raspberry-pi-5"]]).status_code == 201
    devices = [SimDevice(live_server, f"shop-pi-{i}", tags=["web"]).enroll() for i in range(3)]
    ro = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.2.3", "waves": [100]}).json()
    for d in devices:
        d.install(d.poll())
    wait_for(lambda: admin.get(f"/v1/rollouts/{ro['id']}").json()["state"] == "completed")
    sha = admin.get("/v1/models/digits/versions/1.2.3").json()["artifacts"][0]["sha256"]
    now = dt.datetime.now(dt.timezone.utc).replace(second=0, microsecond=0)
    for i, d in enumerate(devices):
        points = [{"minute": (now - dt.timedelta(minutes=m)).strftime("%Y-%m-%dT%H:%M:%SZ"), "model_sha256": sha, "model_version": "1.2.3",
                   "count": 100, "escalations": 10 + m + i, "errors": 0, "degraded": 0, "latency_ms": {"p50": 1.0, "p95": 2.0 + m / 10, "p99": 3.0 + m / 10, "max": 8.0},
                   "confidence_hist": [0] * 8 + [30, 70], "sources": {"device": 100}} for m in range(0, 40, 5)]
        assert d.http.post("/v1/device/telemetry", json={"points": points}).status_code in (200, 202)

    # nothing without a token: the page is a sign-in form, the API answers 401
    browser.get(live_server.url + "/")
    assert browser.current_url.endswith("/dashboard")
    assert browser.find_element("id", "login").is_displayed() and "shop-pi" not in _text(browser)
    assert live_server.client().get("/v1/devices").status_code == 401
    headers = live_server.client().get("/dashboard").headers
    assert "script-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    browser.find_element("id", "token").send_keys("ekadm_wrong")
    _click(browser, "#login-form button")
    until(lambda: "refused" in browser.find_element("id", "login-error").text or "failed" in browser.find_element("id", "login-error").text)
    assert "shop-pi" not in _text(browser)

    # sign in: the overview
    browser.find_element("id", "token").clear()
    browser.find_element("id", "token").send_keys(live_server.admin_token)
    _click(browser, "#login-form button")
    until(lambda: browser.find_element("id", "card-devices").text.startswith("3"))
    assert "digits 1.2.3" in _text(browser)

    # devices: profile, active version, last on-device profile, last seen
    _click(browser, "button[data-view=devices]")
    until(lambda: "shop-pi-2" in _text(browser))
    text = _text(browser)
    assert "raspberry-pi-5" in text and "1.2.3: p95 2.00 ms, golden passed" in text

    # a rollout of 1.3.0 whose device reports a hostile reason: its waves and gate results update live
    ro2 = admin.post("/v1/rollouts", json={"model": "digits", "version": "1.3.0", "waves": [30, 100],
                                           "gates": {"max_failure_rate": 0.0}}).json()
    _click(browser, "button[data-view=rollouts]")
    until(lambda: ro2["id"] in _text(browser))
    browser.find_element("link text", ro2["id"]).click()
    until(lambda: "Rollout " + ro2["id"] in _text(browser))
    assert "running" in browser.find_element("id", "rollout-detail").text
    victim = next(d for d in devices if d.device_id == ro2["waves"][0]["devices"][0]["device_id"])
    victim.install(victim.poll(), fail=HOSTILE)
    until(lambda: "max_failure_rate failed" in _text(browser), timeout=30)  # no reload: the page polls
    text = _text(browser)
    assert HOSTILE in text and "FAIL" in text  # shown as text
    assert browser.title == "edgekit fleet" and not browser.find_elements("css selector", "main img, main script")
    assert browser.execute_script("return document.title") != "pwned"

    # versions: the side-by-side table and the plots (escalation rate and p95 over time)
    _click(browser, "button[data-view=versions]")
    until(lambda: len(browser.find_elements("css selector", "svg.plot polyline")) >= 2)
    text = _text(browser)
    assert "digits: field statistics" in text and "2400" in text and "PSI" in text
    shots = os.environ.get("EDGEKIT_DASHBOARD_SCREENSHOTS")  # a directory: docs/images is made this way (docs/server.md)
    if shots:
        browser.save_screenshot(str(Path(shots) / "dashboard-versions.png"))

    # the audit log: the rollouts created above, by the admin token
    _click(browser, "button[data-view=audit]")
    until(lambda: "POST /v1/rollouts" in _text(browser))
    assert "127.0.0.1" in _text(browser)
    _resources_stay_on(browser, live_server.url)
    _click(browser, "button[data-view=rollouts]")
    until(lambda: "Rollout " + ro2["id"] in _text(browser))
    if shots:
        browser.save_screenshot(str(Path(shots) / "dashboard-rollout.png"))

    # signing out forgets the token
    _click(browser, "#logout")
    assert browser.find_element("id", "login").is_displayed() and "shop-pi" not in _text(browser)
    browser.refresh()
    assert browser.find_element("id", "login").is_displayed()


def test_api_docs_load_without_a_cdn(live_server, browser) -> None:
    browser.get(live_server.url + "/docs")
    until(lambda: len(browser.find_elements("css selector", ".opblock")) > 10, timeout=30)
    assert "/v1/rollouts" in _text(browser)
    _resources_stay_on(browser, live_server.url)
    html = live_server.client().get("/docs").text
    assert "cdn" not in html.lower() and "/docs/assets/swagger-ui-bundle.js" in html
    assert live_server.client().get("/docs/assets/../../etc/passwd").status_code == 404
    assert live_server.client().get("/dashboard/assets/index.html").status_code == 404
