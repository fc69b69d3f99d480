"""The web dashboard in a real browser (Debian's Chromium driven by Playwright), against
the API and ingest as processes, with readings published by a device over MQTT."""

from __future__ import annotations

import asyncio
import json
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

            # Log out: the key is gone, and so is the data.
            await page.get_by_test_id("logout").click()
            await expect(page.get_by_test_id("login-form")).to_be_visible()
            assert await page.evaluate("sessionStorage.length") == 0
            assert problems == []
        finally:
            await browser.close()
            dev.close()
