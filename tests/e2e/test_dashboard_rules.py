"""The dashboard's rules in a real browser (Debian's Chromium driven by Playwright)
against the API and ingest as processes, with readings published over MQTT: a rule
created in the form (the API's validation errors shown next to the fields they name, a
400's detail above the form), edited, listed (sorted by column), and backtested over
the readings."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from playwright.async_api import async_playwright, expect

from fleetline_dev.embedded import LocalMosquitto
from tests.conftest import wait_rows
from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, record_problems
from tests.integration.test_api import client
from tests.support import ApiProcess, Device, IngestProcess

pytestmark = pytest.mark.integration


async def test_rules_create_with_validation_errors_edit_list_and_backtest(
    api: ApiProcess,
    make_key: Callable[..., Any],
    start_ingest: Callable[..., IngestProcess],
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    uid: str,
    artifacts: Path,
) -> None:
    start_ingest()
    # The list shows rules by id, a page at a time: rules earlier tests of this process
    # left (schemathesis makes hundreds) would put this one beyond the first page.
    await db.execute("DELETE FROM rules")
    device_id = f"{uid}-d"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    # An hour ago: the temperature rises above 34 for two readings, then falls back.
    start = datetime.now(UTC) - timedelta(hours=1)
    values = [20.0, 35.0, 36.5, 21.0]
    dev = Device(broker.url, device_id)
    dev.publish_all(
        [
            {"ts": (start + timedelta(minutes=i)).isoformat(), "values": {"temp": v}}
            for i, v in enumerate(values)
        ]
    )
    assert await wait_rows(db, device_id, len(values)) == len(values)
    token = await make_key("rules:write", "telemetry:read", "devices:read")
    c = client(api, token)
    name = f"hot {uid}"

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            problems = record_problems(page)
            await page.goto(f"{api.url}/dashboard/#/rules")
            await page.get_by_test_id("api-key").fill(token)
            await page.get_by_test_id("login-submit").click()
            await page.get_by_test_id("rule-new").click()
            await expect(page.get_by_test_id("rule-title")).to_have_text("New rule")

            # No value and a bad metric name: the API's 422, each error at its field.
            await page.get_by_test_id("rule-name").fill(name)
            await page.get_by_test_id("rule-metric").fill("temp erature")
            await page.get_by_test_id("rule-devices").fill(device_id)
            await page.get_by_test_id("rule-save").click()
            error = page.get_by_test_id("rule-error")
            await expect(error).to_contain_text("422")
            value_field = page.locator('fieldset[data-condition="raise"] [data-field="value"]')
            await expect(value_field.get_by_test_id("field-error")).to_have_text("Field required")
            await expect(page.get_by_test_id("rule-raise-value")).to_have_attribute(
                "aria-invalid", "true"
            )
            metric_field = page.locator('[data-field="metric"]')
            await expect(metric_field.get_by_test_id("field-error")).to_contain_text(
                "should match pattern"
            )
            await page.screenshot(path=artifacts / "dashboard-rule-errors.png", full_page=True)

            # outside with low > high: the route's 400, its detail above the form.
            await page.get_by_test_id("rule-metric").fill("temp")
            await page.get_by_test_id("rule-raise-op").select_option("outside")
            await page.get_by_test_id("rule-raise-low").fill("30")
            await page.get_by_test_id("rule-raise-high").fill("10")
            await page.get_by_test_id("rule-save").click()
            await expect(error).to_contain_text("'outside' needs low <= high")
            await expect(page.get_by_test_id("field-error")).to_have_count(0)

            # Valid: created, and the page is the rule's.
            await page.get_by_test_id("rule-raise-op").select_option(">")
            await page.get_by_test_id("rule-raise-value").fill("30")
            await page.get_by_test_id("rule-severity").select_option("critical")
            await page.get_by_test_id("rule-save").click()
            await expect(page.get_by_test_id("rule-saved")).to_contain_text("created")
            await expect(page.get_by_test_id("rule-title")).to_contain_text(name)
            rule_id = int(page.url.rsplit("/", 1)[1])
            stored = c.get(f"/v1/rules/{rule_id}").json()
            assert (stored["metric"], stored["raise"], stored["severity"]) == (
                "temp",
                {"op": ">", "value": 30.0, "for_s": 0.0},
                "critical",
            )
            assert stored["match"] == {"devices": [device_id], "tags": {}}

            # Edited: above 36 now.
            await expect(page.get_by_test_id("rule-raise-value")).to_have_value("30")
            await page.get_by_test_id("rule-raise-value").fill("36")
            await page.get_by_test_id("rule-save").click()
            await expect(page.get_by_test_id("rule-saved")).to_have_text("Saved: version 2.")
            assert c.get(f"/v1/rules/{rule_id}").json()["raise"]["value"] == 36

            # Backtest over the last day: one alarm, raised by 36.5, cleared by 21.
            await page.get_by_test_id("backtest-run").click()
            result = page.get_by_test_id("backtest-result")
            await expect(result).to_have_attribute("data-alarms", "1")
            await expect(result).to_have_attribute("data-readings", str(len(values)))
            await expect(page.get_by_test_id("backtest-summary")).to_contain_text(
                "1 alarm would have been raised"
            )
            alarm = page.get_by_test_id("backtest-alarm")
            await expect(alarm).to_have_attribute("data-device-id", device_id)
            await expect(alarm.locator("td").nth(3)).to_have_text("36.5")
            await page.screenshot(path=artifacts / "dashboard-rule.png", full_page=True)

            # The list shows it.
            await page.get_by_role("link", name="Rules", exact=True).first.click()
            row = page.locator(f'[data-testid="rule-row"][data-rule-id="{rule_id}"]')
            await expect(row.get_by_test_id("rule-link")).to_have_text(name)
            await expect(row.get_by_test_id("rule-condition")).to_have_text("temp > 36")
            await expect(row.get_by_test_id("rule-enabled")).to_have_text("yes")
            await page.screenshot(path=artifacts / "dashboard-rules.png")
            # Sorted by id as they come; the header sorts them the other way.
            by_id = page.locator('#rules-table th[data-sort="id"]')
            await expect(by_id).to_have_attribute("aria-sort", "ascending")
            await page.get_by_role("button", name="Id", exact=True).click()
            await expect(by_id).to_have_attribute("aria-sort", "descending")
            ids = await page.get_by_test_id("rule-row").evaluate_all(
                "rows => rows.map((row) => Number(row.dataset.ruleId))"
            )
            assert ids == sorted(ids, reverse=True) and rule_id in ids, ids
            assert [
                p for p in problems if "status of 422" not in p and "status of 400" not in p
            ] == []
        finally:
            await browser.close()
            dev.close()
            c.close()
