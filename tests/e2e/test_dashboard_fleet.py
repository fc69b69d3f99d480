"""The dashboard's fleet page, charts and dead letters in a real browser (Debian's
Chromium driven by Playwright) against the API and ingest as processes, with devices
publishing over MQTT: the fleet's counts, a search by id prefix and sorting by column;
a device whose readings are two days old opens on a range that shows them, a boolean
metric on a 0/1 axis, and the unit its twin reports on its chart; dead letters with
their date, sorted by column."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import async_playwright, expect

from fleetline_dev.embedded import LocalMosquitto
from tests.conftest import wait_rows
from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, record_problems, wait_for
from tests.integration.test_api import client
from tests.support import ApiProcess, Device, IngestProcess

pytestmark = pytest.mark.integration


async def test_fleet_counts_search_sorting_chart_ranges_and_dead_letter_dates(
    api: ApiProcess,
    make_key: Callable[..., Any],
    start_ingest: Callable[..., IngestProcess],
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
    artifacts: Path,
) -> None:
    start_ingest()
    token = await make_key("devices:read", "devices:write", "telemetry:read")
    c = client(api, token)
    alpha1, alpha2, beta = f"{uid}-alpha-1", f"{uid}-alpha-2", f"{uid}-beta"
    for device_id in (alpha1, alpha2, beta):
        made = c.post("/v1/devices", json={"id": device_id, "tags": {"site": uid}})
        assert made.status_code == 201, made.text
    # alpha-2 is online; its readings are two days old: a temperature and a door that
    # opens and closes (booleans, stored as 1 and 0).
    dev = Device(broker.url, alpha2)
    dev.publish(b"online", kind="status")
    start = datetime.now(UTC) - timedelta(days=2, hours=3)
    times = [start + timedelta(minutes=20 * i) for i in range(6)]
    dev.publish_all(
        [
            {"ts": ts.isoformat(), "values": {"temp": 18.0 + i, "door": i % 2 == 1}}
            for i, ts in enumerate(times)
        ]
    )
    # The unit of its temperature (the door has none), in its reported twin.
    dev.publish({"units": {"temp": "°C"}}, kind="twin/reported")
    # Payloads ingest refuses: dead letters (9 and 2 bytes).
    dev.publish_all([b"{not json", b"[]"])
    assert await wait_rows(db, alpha2, 12) == 12

    async def online() -> bool:
        return bool(
            await db.fetchval("SELECT online FROM device_activity WHERE device_id = $1", alpha2)
        )

    async def dead_letters() -> bool:
        count = await db.fetchval(
            "SELECT count(*) FROM dead_letters WHERE topic = $1", f"devices/{alpha2}/telemetry"
        )
        return bool(count == 2)

    async def units_reported() -> bool:
        return bool(c.get(f"/v1/devices/{alpha2}/twin").json()["reported"].get("units"))

    await wait_for(online, "alpha-2 online")
    await wait_for(dead_letters, "the dead letters")
    await wait_for(units_reported, "the reported units")

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            problems = record_problems(page)
            await page.goto(f"{api.url}/dashboard/#/fleet?tag=site%3D{uid}")
            await page.get_by_test_id("api-key").fill(token)
            await page.get_by_test_id("login-submit").click()

            # Counts of the devices under the tag filter.
            await expect(page.get_by_test_id("count-total")).to_have_text("3")
            await expect(page.get_by_test_id("count-online")).to_have_text("1")
            await expect(page.get_by_test_id("count-offline")).to_have_text("2")
            rows = page.get_by_test_id("device-row")
            await expect(rows.locator("th a")).to_have_text([alpha1, alpha2, beta])

            # Sorting: by status (online first), by id descending.
            await page.get_by_role("button", name="Status", exact=True).click()
            await expect(rows.locator("th a")).to_have_text([alpha2, alpha1, beta])
            await expect(page.locator('#fleet-table th[data-sort="status"]')).to_have_attribute(
                "aria-sort", "ascending"
            )
            await page.get_by_role("button", name="Device", exact=True).click()
            await page.get_by_role("button", name="Device", exact=True).click()
            await expect(rows.locator("th a")).to_have_text([beta, alpha2, alpha1])
            await page.screenshot(path=artifacts / "dashboard-fleet-counts.png")

            # Search by id prefix (with the tag filter still on).
            await page.get_by_test_id("search-id").fill(f"{uid}-alpha")
            await page.get_by_test_id("search-submit").click()
            await expect(page.get_by_test_id("tag-chip")).to_have_count(1)
            await expect(rows.locator("th a")).to_have_text([alpha1, alpha2])
            await expect(rows.nth(1).get_by_test_id("device-status")).to_have_text("online")
            await page.screenshot(path=artifacts / "dashboard-fleet-search.png")
            await page.get_by_test_id("search-id").fill(f"{uid}-gamma")
            await page.get_by_test_id("search-submit").click()
            await expect(rows).to_have_count(0)
            await expect(page.locator("#fleet-empty")).to_contain_text("No device id starts")
            await page.get_by_test_id("search-clear").click()
            await expect(rows).to_have_count(3)

            # Its device page opens on a range that holds its two-day-old readings: 7 days
            # of hourly buckets; the door on a 0/1 axis, the temperature not.
            await page.goto(f"{api.url}/dashboard/#/device/{alpha2}")
            mode = page.get_by_test_id("device-mode")
            await expect(mode).to_have_attribute("data-range", "7d")
            await expect(mode).to_contain_text("Chosen for the data present")
            await expect(page.get_by_test_id("range-7d")).to_be_checked()
            temp = page.locator('[data-testid="chart"][data-metric="temp"]')
            door = page.locator('[data-testid="chart"][data-metric="door"]')
            hours = {int(ts.timestamp()) // 3600 for ts in times}
            await expect(temp).to_have_attribute("data-points", str(len(hours)))
            await expect(temp).to_have_attribute("data-mode", "buckets")
            await expect(temp).to_have_attribute("data-kind", "number")
            await expect(door).to_have_attribute("data-kind", "boolean")
            await expect(door).to_have_attribute("data-last-value", "1")
            await expect(door).to_have_attribute("data-y-ticks", "0,1")
            await expect(temp).not_to_have_attribute("data-y-ticks", "0,1")
            # The temperature's unit, from the twin: beside its name, with its last value
            # and in the legend under the cursor; the door has none.
            await expect(temp).to_have_attribute("data-unit", "°C")
            await expect(temp.get_by_test_id("chart-unit")).to_have_text("in °C")
            await expect(temp.get_by_test_id("chart-last-value")).to_have_text("23 °C")
            await temp.locator(".u-over").hover()
            await expect(temp.locator(".u-legend")).to_contain_text("°C")
            await expect(door).not_to_have_attribute("data-unit", re.compile(".*"))
            await expect(door.get_by_test_id("chart-unit")).to_be_hidden()
            await expect(door.get_by_test_id("chart-last-value")).to_have_text("1")
            await page.screenshot(
                path=artifacts / "dashboard-device-auto-range.png", full_page=True
            )
            # Ranges reach as far back as the hourly rollups keep (2 years by default).
            await page.locator('label[for="range-2y"]').click()
            await expect(mode).to_have_attribute("data-range", "2y")
            await expect(mode).to_contain_text("average per 1 d")
            days = {int(ts.timestamp()) // 86400 for ts in times}
            await expect(temp).to_have_attribute("data-points", str(len(days)))

            # Dead letters carry their date, not only the time of day.
            await page.get_by_role("link", name="Dead letters").click()
            await page.get_by_test_id("dl-device").fill(alpha2)
            await page.get_by_test_id("dl-device").press("Enter")
            letter = page.get_by_test_id("dead-letter-row")
            await expect(letter).to_have_count(2)
            received = await letter.first.locator("time.received").inner_text()
            assert str(datetime.now().year) in received and ":" in received, received
            # Sorted by size, smallest first, then largest first.
            size = page.locator('#dl-table th[data-sort="size"]')
            payloads = letter.get_by_test_id("dead-letter-payload")
            await page.get_by_role("button", name="Size", exact=True).click()
            await expect(payloads).to_have_text(["[]", "{not json"])
            await expect(size).to_have_attribute("aria-sort", "ascending")
            await page.get_by_role("button", name="Size", exact=True).click()
            await expect(payloads).to_have_text(["{not json", "[]"])
            await expect(size).to_have_attribute("aria-sort", "descending")
            await page.screenshot(path=artifacts / "dashboard-dead-letters-sorted.png")
            assert problems == []
        finally:
            await browser.close()
            dev.close()
            c.close()
