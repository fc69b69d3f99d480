"""The web dashboard in a real browser (Debian's Chromium driven by Playwright), against
the API and ingest as processes, with readings published by a device over MQTT, and a
firmware rollout created over REST; an address the dashboard does not know."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import ConsoleMessage, Page, async_playwright, expect

from fleetline_dev.embedded import LocalMosquitto
from tests.conftest import wait_rows
from tests.integration.test_api import client
from tests.integration.test_rollouts import release
from tests.support import ApiProcess, Device, IngestProcess

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
# Ingest batches, stores, notifies; the API sends: well under a second here.
LIVE_TIMEOUT_MS = 10_000


async def wait_for(query: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := await query()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.1)
    return value


def record_problems(page: Page) -> list[str]:
    """Script errors and console errors (a CSP violation is one), except the 401 the
    bad key gets on purpose."""
    problems: list[str] = []

    def console(message: ConsoleMessage) -> None:
        if message.type == "error" and "status of 401" not in message.text:
            problems.append(message.text)

    page.on("console", console)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    return problems


async def test_dashboard_shows_fleet_history_live_readings_and_dead_letters(
    api: ApiProcess, make_key: Callable[..., Any], start_ingest: Callable[..., IngestProcess],
    broker: LocalMosquitto, db: asyncpg.Pool[Any], uid: str, artifacts: Path,
) -> None:
    start_ingest()
    device_id = f"{uid}-d"
    await db.execute("INSERT INTO devices (id, tags) VALUES ($1, $2::jsonb)", device_id,
                     json.dumps({"site": uid, "room": "lab"}))
    now = datetime.now(UTC)
    history = [(now - timedelta(minutes=10 - 2 * i), 20.0 + i) for i in range(5)]
    dev = Device(broker.url, device_id)
    dev.publish(b"online", kind="status")
    dev.publish_all([{"ts": ts.isoformat(), "values": {"temp": v, "door": "closed"}}
                     for ts, v in history])
    assert await wait_rows(db, device_id, 10) == 10
    await wait_for(lambda: db.fetchval(
        "SELECT online FROM device_status WHERE device_id = $1", device_id), "status online")
    token = await make_key("devices:read", "telemetry:read")

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            problems = record_problems(page)

            # / redirects to the dashboard, served with a strict CSP.
            response = await page.goto(f"{api.url}/")
            assert response is not None and response.url == f"{api.url}/dashboard/"
            csp = response.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "script-src 'self'" in csp

            # Sign in: a wrong key is refused with the problem's detail.
            await expect(page.get_by_test_id("api-key")).to_be_focused()
            await page.get_by_test_id("api-key").fill("flk_nope")
            await page.get_by_test_id("login-submit").click()
            await expect(page.get_by_test_id("login-error")).to_contain_text(
                "401 Unauthorized: unknown or revoked API key")
            await page.get_by_test_id("api-key").fill(token)
            await page.get_by_test_id("login-submit").click()

            # Fleet: filtered by this test's tag, the device online with its latest values.
            await page.get_by_test_id("filter-tag").fill(f"site={uid}")
            await page.get_by_test_id("filter-tag-add").click()
            await expect(page.get_by_test_id("tag-chip")).to_have_count(1)
            rows = page.get_by_test_id("device-row")
            await expect(rows).to_have_count(1)
            row = page.locator(f'[data-testid="device-row"][data-device-id="{device_id}"]')
            await expect(row.get_by_test_id("device-status")).to_have_text("online")
            await expect(row.locator('[data-metric="temp"] [data-testid="latest-value"]')
                         ).to_have_text("24")
            await expect(row.locator('[data-metric="door"]')).to_contain_text("closed")
            await page.screenshot(path=artifacts / "dashboard-fleet.png")

            # Device page: the history on its chart, then a reading arriving live.
            await row.get_by_role("link", name=device_id).click()
            await expect(page.get_by_test_id("device-title")).to_have_text(device_id)
            chart = page.locator('[data-testid="chart"][data-metric="temp"]')
            await expect(chart).to_have_attribute("data-points", "5")
            await expect(chart).to_have_attribute("data-last-value", "24")
            await expect(chart.locator("canvas")).to_have_count(1)
            # Its twin states no unit: the chart shows none.
            await expect(page.get_by_test_id("charts")).to_have_attribute("data-units", "0")
            await expect(chart).not_to_have_attribute("data-unit", re.compile(".*"))
            await expect(chart.get_by_test_id("chart-unit")).to_be_hidden()
            await expect(page.get_by_test_id("live-status")).to_have_attribute(
                "data-state", "live", timeout=LIVE_TIMEOUT_MS)
            live_ms = int(time.time() * 1000)
            dev.publish_all([{"ts": live_ms, "values": {"temp": 31.5, "door": "open"}}])
            await expect(chart).to_have_attribute("data-points", "6", timeout=LIVE_TIMEOUT_MS)
            await expect(chart).to_have_attribute("data-last-value", "31.5")
            await expect(chart.get_by_test_id("chart-last-value")).to_have_text("31.5")
            await expect(page.locator('[data-testid="text-metric"][data-metric="door"]')
                         ).to_have_attribute("data-value", "open")
            await page.screenshot(path=artifacts / "dashboard-device.png", full_page=True)

            # A long range reads 5-minute buckets (avg with the min-max band).
            await page.locator('label[for="range-24h"]').click()
            await expect(chart).to_have_attribute("data-mode", "buckets")
            buckets = {int(ts.timestamp()) // 300 for ts, _ in history} | {live_ms // 300_000}
            await expect(chart).to_have_attribute("data-points", str(len(buckets)))
            await expect(chart).to_have_attribute("data-last-value", "31.5")
            await page.screenshot(path=artifacts / "dashboard-device-24h.png", full_page=True)

            # Dead letters: a malformed payload the device published.
            dev.publish_all([b'{"values": oops'])
            await wait_for(lambda: db.fetchval(
                "SELECT count(*) FROM dead_letters WHERE topic = $1",
                f"devices/{device_id}/telemetry"), "the dead letter")
            await page.get_by_role("link", name="Dead letters").click()
            await page.get_by_test_id("dl-device").fill(device_id)
            await page.get_by_test_id("dl-device").press("Enter")
            letter = page.get_by_test_id("dead-letter-row")
            await expect(letter).to_have_count(1)
            await expect(letter.get_by_test_id("dead-letter-payload")).to_have_text(
                '{"values": oops')
            await expect(letter.get_by_test_id("dead-letter-reason")).not_to_be_empty()
            await page.screenshot(path=artifacts / "dashboard-dead-letters.png")

            # An address the dashboard does not know: a page that says so, a way back.
            await page.goto(f"{api.url}/dashboard/#/no-such-page")
            await expect(page.get_by_role("heading", name="Not found")).to_be_focused()
            await expect(page).to_have_title("Not found · fleetline")
            await expect(page.locator("#mainnav [aria-current]")).to_have_count(0)
            await page.screenshot(path=artifacts / "dashboard-not-found.png")
            await page.get_by_role("link", name="Go to the fleet").click()
            await expect(page.get_by_role("heading", name="Fleet")).to_be_visible()

            # Log out: the key is gone, and so is the data.
            await page.get_by_test_id("logout").click()
            await expect(page.get_by_test_id("login-form")).to_be_visible()
            assert await page.evaluate("sessionStorage.length") == 0
            assert problems == []
        finally:
            await browser.close()
            dev.close()


async def test_dashboard_follows_a_rollout_and_pauses_resumes_and_cancels_it(
    api: ApiProcess, make_key: Callable[..., Any], uid: str, artifacts: Path,
) -> None:
    c = client(api, await make_key("devices:write", "firmware:write", "commands:write"))
    ids = [f"{uid}-{i}" for i in range(3)]
    for device_id in ids:
        made = c.post("/v1/devices", json={"id": device_id, "tags": {"run": uid}})
        assert made.status_code == 201, made.text
    fw = release(c, "2.0.0", f"board-{uid}")
    created = c.post("/v1/jobs", json={"type": "rollout", "query": f"tags.run = '{uid}'",
                                       "firmware_id": fw["id"], "canary": 1})
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    # The canary (wave 0) is notified at once; none of these devices is connected, so it
    # stays notified, and the other two wait for it in wave 1.
    waves = {r["device_id"]: r["wave"]
             for r in c.get(f"/v1/jobs/{job_id}/devices").json()["items"]}
    assert sorted(waves.values()) == [0, 1, 1]
    [canary] = [d for d, wave in waves.items() if wave == 0]
    by_wave = sorted(ids, key=lambda d: (waves[d], d))
    token = await make_key("devices:read", "commands:write")

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            problems = record_problems(page)

            # A link to the rollouts goes there once signed in.
            await page.goto(f"{api.url}/dashboard/#/rollouts")
            await page.get_by_test_id("api-key").fill(token)
            await page.get_by_test_id("login-submit").click()
            nav = page.get_by_role("navigation", name="Main")
            await expect(nav.get_by_role("link", name="Rollouts")).to_have_attribute(
                "aria-current", "page")

            # The list: its version, state and progress (the canary updating, two pending).
            row = page.locator(f'[data-testid="rollout-row"][data-job-id="{job_id}"]')
            await expect(row.get_by_test_id("rollout-version")).to_have_text("2.0.0")
            await expect(row.get_by_test_id("rollout-state")).to_have_text("running")
            progress = row.get_by_test_id("rollout-progress")
            await expect(progress).to_have_attribute("data-total", "3")
            await expect(progress).to_have_attribute("data-running", "1")
            await expect(progress).to_have_attribute("data-pending", "2")
            await expect(progress.get_by_test_id("progress-done")).to_have_text(
                "0 of 3 done (0 %)")
            await expect(progress).to_contain_text("0 succeeded")
            await expect(progress).to_contain_text("0 rolled back")
            await page.screenshot(path=artifacts / "dashboard-rollouts.png")

            # The rollout: its options, the canary notified, its devices by wave then id.
            await row.get_by_role("link", name=f"#{job_id}").click()
            await expect(page.get_by_test_id("rollout-title")).to_have_text(
                f"Rollout #{job_id}: firmware 2.0.0")
            state = page.get_by_test_id("rollout-state")
            await expect(state).to_have_text("running")
            options = page.get_by_test_id("rollout-options")
            await expect(options.locator('[data-option="canary"] dd')).to_have_text(
                "1 device first")
            await expect(options.locator('[data-option="wave_size"] dd')).to_have_text(
                "all the rest at once")
            await expect(options.locator('[data-option="failure_threshold"] dd')).to_have_text(
                "more than 10 % failed or rolled back, then pause")
            await expect(page.get_by_test_id("rollout-phases").locator(
                '[data-phase="notified"] dd')).to_have_text("1")
            devices = page.get_by_test_id("rollout-device-row")
            await expect(devices.locator("th")).to_have_text(by_wave)
            first = devices.first
            await expect(first).to_have_attribute("data-device-id", canary)
            await expect(first.get_by_test_id("rollout-device-state")).to_have_text("running")
            await expect(first.get_by_test_id("rollout-device-wave")).to_have_text("0")
            await expect(first.get_by_test_id("rollout-device-phase")).to_have_text("notified")
            await expect(first.get_by_test_id("rollout-device-download")).to_have_text("—")
            await expect(devices.nth(2).get_by_test_id("rollout-device-state")).to_have_text(
                "pending")
            # The Device column sorts by id.
            await page.get_by_role("button", name="Device", exact=True).click()
            await expect(devices.locator("th")).to_have_text(sorted(ids))
            await expect(page.locator('th[data-sort="device_id"]')).to_have_attribute(
                "aria-sort", "ascending")

            # Pause: paused by this key, only Resume and Cancel allowed; then resume.
            pause = page.get_by_test_id("rollout-pause")
            resume = page.get_by_test_id("rollout-resume")
            cancel = page.get_by_test_id("rollout-cancel")
            await expect(resume).to_be_disabled()
            await pause.click()
            await expect(state).to_have_text("paused")
            await expect(page.get_by_test_id("rollout-paused")).to_contain_text("by test (key ")
            await expect(pause).to_be_disabled()
            await expect(resume).to_be_enabled()
            await expect(cancel).to_be_enabled()
            assert c.get(f"/v1/jobs/{job_id}").json()["state"] == "paused"
            await page.screenshot(path=artifacts / "dashboard-rollout.png", full_page=True)
            await resume.click()
            await expect(state).to_have_text("running")
            await expect(page.get_by_test_id("rollout-paused")).to_be_hidden()
            await expect(pause).to_be_enabled()
            await expect(resume).to_be_disabled()

            # Cancel, once confirmed: the two pending devices are cancelled.
            page.once("dialog", lambda dialog: dialog.accept())
            await cancel.click()
            await expect(state).to_have_text("cancelled")
            for button in (pause, resume, cancel):
                await expect(button).to_be_disabled()
            await expect(page.get_by_test_id("rollout-progress")).to_have_attribute(
                "data-cancelled", "2")
            await expect(page.get_by_test_id("rollout-device-state")).to_have_text(
                ["running" if d == canary else "cancelled" for d in sorted(ids)])
            await expect(page.get_by_test_id("rollout-error")).to_be_hidden()
            assert problems == []
        finally:
            await browser.close()
            # Whatever happened, no device of this rollout is left to start.
            c.post(f"/v1/jobs/{job_id}/cancel")
            c.close()
