"""The dashboard's alarms page in a real browser (Debian's Chromium driven by
Playwright) against the API as a process: alarms filtered by device, state and severity
(kept in the address), sorted by column, acknowledged and cleared from the page, and one
acknowledged elsewhere shown at once (the stream announces it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import async_playwright, expect

from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, LIVE_TIMEOUT_MS, record_problems
from tests.integration.test_api import client
from tests.support import ApiProcess, IngestProcess

pytestmark = pytest.mark.integration

INSERT_ALARM = """
INSERT INTO rule_alarms (rule_id, rule_name, device_id, metric, severity, state, raised_at,
                         acknowledged_at, acknowledged_by, cleared_at, cleared_by, value,
                         peak, count, message)
VALUES ($1, $2, $3, 'temp', $4, $5, now() - make_interval(mins => $6),
        CASE WHEN $5 <> 'active' THEN now() END, CASE WHEN $5 <> 'active' THEN 'someone' END,
        CASE WHEN $5 = 'cleared' THEN now() END, CASE WHEN $5 = 'cleared' THEN 'someone' END,
        $7, $7, 2, $8)
RETURNING id
"""


async def test_alarms_filter_acknowledge_clear_and_live_moves(
    api: ApiProcess,
    make_key: Callable[..., Any],
    start_ingest: Callable[..., IngestProcess],
    db: asyncpg.Pool[Any],
    uid: str,
    artifacts: Path,
) -> None:
    # The stream confirms a subscription once ingest has heard of the API (workers/stream.py).
    start_ingest()
    token = await make_key("rules:write", "telemetry:read", "devices:read")
    c = client(api, token)
    one, two = f"{uid}-one", f"{uid}-two"
    # Registered: the stream announces events of registered devices only.
    await db.execute("INSERT INTO devices (id) SELECT unnest($1::text[])", [one, two])
    rules = {}
    for kind in ("hot", "warm"):
        made = c.post(
            "/v1/rules",
            json={
                "name": f"{kind} {uid}",
                "metric": "temp",
                "raise": {"op": ">", "value": 30},
                "match": {"devices": [one, two]},
            },
        )
        assert made.status_code == 201, made.text
        rules[kind] = made.json()
    name = rules["hot"]["name"]

    async def alarm(
        device: str, severity: str, state: str, minutes: int, value: float, kind: str = "hot"
    ) -> int:
        rule = rules[kind]
        return int(
            await db.fetchval(
                INSERT_ALARM,
                rule["id"],
                rule["name"],
                device,
                severity,
                state,
                minutes,
                value,
                f"{device} at {value}",
            )
        )

    # One open alarm per rule and device.
    cleared = await alarm(one, "major", "cleared", 30, 35.0)
    acked = await alarm(two, "minor", "acknowledged", 20, 31.0)
    active = await alarm(one, "critical", "active", 10, 33.5)
    other = await alarm(two, "warning", "active", 5, 30.5, "warm")

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 800})
            problems = record_problems(page)
            await page.goto(f"{api.url}/dashboard/#/alarms?device_id={one}")
            await page.get_by_test_id("api-key").fill(token)
            await page.get_by_test_id("login-submit").click()
            rows = page.get_by_test_id("alarm-row")

            # One device's alarms, newest first, with their rule, severity and state.
            await expect(rows).to_have_count(2)
            await expect(rows.first).to_have_attribute("data-alarm-id", str(active))
            await expect(rows.get_by_test_id("alarm-state")).to_have_text(["active", "cleared"])
            await expect(rows.get_by_test_id("alarm-severity")).to_have_text(["critical", "major"])
            await expect(rows.first.get_by_test_id("alarm-rule")).to_contain_text(name)
            await expect(rows.first.get_by_test_id("alarm-message")).to_have_text(f"{one} at 33.5")
            await expect(rows.nth(1).get_by_test_id("alarm-ack")).to_be_disabled()
            await expect(rows.nth(1).get_by_test_id("alarm-clear")).to_be_disabled()

            # The column headers sort the page: by value rising, then falling.
            value = page.get_by_role("button", name="Value", exact=True)
            value_header = page.locator('[data-testid="alarm-table"] th[data-sort="value"]')
            await value.click()
            await expect(rows.get_by_test_id("alarm-value")).to_have_text(["33.5", "35"])
            await expect(value_header).to_have_attribute("aria-sort", "ascending")
            await value.click()
            await expect(rows.get_by_test_id("alarm-value")).to_have_text(["35", "33.5"])
            await expect(value_header).to_have_attribute("aria-sort", "descending")
            await page.screenshot(path=artifacts / "dashboard-alarms-sorted.png")

            # Filters: state, then severity across devices; kept in the address.
            await page.get_by_test_id("alarms-state").select_option("active")
            await expect(rows).to_have_count(1)
            assert "state=active" in page.url and f"device_id={one}" in page.url
            await page.get_by_test_id("alarms-device").fill(two)
            await page.get_by_test_id("alarms-apply").click()
            await expect(rows).to_have_count(1)
            await expect(rows).to_have_attribute("data-alarm-id", str(other))
            await page.get_by_test_id("alarms-state").select_option("")
            await page.get_by_test_id("alarms-severity").select_option("minor")
            await expect(rows).to_have_count(1)
            await expect(rows).to_have_attribute("data-alarm-id", str(acked))
            await expect(rows.get_by_test_id("alarm-state")).to_have_text("acknowledged")
            await page.get_by_test_id("alarms-severity").select_option("warning")
            await expect(rows).to_have_attribute("data-alarm-id", str(other))
            await page.screenshot(path=artifacts / "dashboard-alarms-filtered.png")

            # Acknowledged elsewhere: the stream says so, the row follows.
            await expect(page.get_by_test_id("live-status")).to_have_attribute(
                "data-state", "live", timeout=LIVE_TIMEOUT_MS
            )
            assert c.post(f"/v1/alarms/{other}/ack").status_code == 200
            await expect(rows.get_by_test_id("alarm-state")).to_have_text(
                "acknowledged", timeout=LIVE_TIMEOUT_MS
            )

            # Acknowledge, then clear, from the page.
            await page.goto(f"{api.url}/dashboard/#/alarms?device_id={one}")
            row = page.locator(f'[data-testid="alarm-row"][data-alarm-id="{active}"]')
            await row.get_by_test_id("alarm-ack").click()
            await expect(row.get_by_test_id("alarm-state")).to_have_text("acknowledged")
            await expect(row).to_contain_text("by test (key ")
            await expect(row.get_by_test_id("alarm-ack")).to_be_disabled()
            assert c.get(f"/v1/alarms/{active}").json()["state"] == "acknowledged"
            await row.get_by_test_id("alarm-clear").click()
            await expect(row.get_by_test_id("alarm-state")).to_have_text("cleared")
            await expect(row.get_by_test_id("alarm-clear")).to_be_disabled()
            assert c.get(f"/v1/alarms/{active}").json()["state"] == "cleared"
            await page.get_by_test_id("alarms-state").select_option("cleared")
            await expect(rows).to_have_count(2)
            await expect(rows.get_by_test_id("alarm-state")).to_have_text(["cleared", "cleared"])
            await page.screenshot(path=artifacts / "dashboard-alarms.png")
            await expect(page.get_by_test_id("alarms-error")).to_be_hidden()
            assert cleared and problems == []
        finally:
            await browser.close()
            c.close()
