"""The dashboard's gateways (docs/gateways.md) in a real browser (Debian's Chromium driven
by Playwright), on a backend of its own with the broker's auth plugin, which alone lets a
gateway publish for its children and records what it refuses: a gateway (a real paho
client logged in with its key) reports its child online and publishes its readings and
its module's, is refused a device that is not its child, then drops its connection; the
dashboard shows the family, the reason the child went offline, the refusal and the
module's series."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Locator, Page, Request, async_playwright, expect

from fleetline import apikeys
from fleetline_dev.certs import TlsFiles
from tests.e2e.test_dashboard import (
    CHROMIUM,
    CHROMIUM_ARGS,
    LIVE_TIMEOUT_MS,
    record_problems,
    wait_for,
)
from tests.integration.test_gateways import GRANTED, NOT_AUTHORIZED, Gateway, reading
from tests.stack import Backend, serve_stack

pytestmark = pytest.mark.integration

# A gateway's children per page on its page (device.js), as the fleet list pages devices.
CHILDREN_PAGE = 50


@pytest.fixture(scope="module")
async def stack(
    admin_url: str, tls_files: TlsFiles, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Backend]:
    async with serve_stack(admin_url, tls_files, tmp_path_factory, "dashgw") as served:
        yield served


async def sign_in(page: Page, url: str, token: str) -> None:
    await page.goto(url)
    await page.get_by_test_id("api-key").fill(token)
    await page.get_by_test_id("login-submit").click()


def fleet_row(page: Page, device_id: str) -> Locator:
    return page.locator(f'[data-testid="device-row"][data-device-id="{device_id}"]')


def iso_z(iso: str) -> str:
    """An API time as the browser's toISOString() writes it (UTC, milliseconds)."""
    t = datetime.fromisoformat(iso).astimezone(UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


async def test_dashboard_shows_a_gateway_its_children_refusals_and_module_series(
    stack: Backend, uid: str, artifacts: Path
) -> None:
    gw_id, child, solo = f"{uid}-gw", f"{uid}-c1", f"{uid}-solo"
    # Enough more children (their ids after the first's) for a second page of them.
    extra = [f"{uid}-k{i:02d}" for i in range(CHILDREN_PAGE)]
    offline = f"gateway '{gw_id}' offline"
    headers = {"Authorization": f"Bearer {stack.key}"}
    async with httpx.AsyncClient(base_url=stack.api.url, timeout=10, headers=headers) as rest:

        async def create(body: dict[str, Any]) -> dict[str, Any]:
            made = await rest.post("/v1/devices", json=body)
            assert made.status_code == 201, made.text
            return dict(made.json())

        async def device(device_id: str) -> dict[str, Any]:
            got = await rest.get(f"/v1/devices/{device_id}")
            assert got.status_code == 200, got.text
            return dict(got.json())

        async def module_points() -> int:
            got = await rest.get(
                f"/v1/devices/{child}/telemetry", params={"metric": "env/temperature"}
            )
            assert got.status_code == 200, got.text
            return len(got.json()["items"])

        async def refused() -> list[Any]:
            got = await rest.get(f"/v1/devices/{gw_id}/refusals")
            assert got.status_code == 200, got.text
            return list(got.json())

        site = {"site": uid}
        policy = {
            "create_children": True,
            "child_id_pattern": f"{uid}-c[0-9]+",
            "child_tags": {"kind": "ble"},
        }
        made = await create({"id": gw_id, "tags": site, "gateway": policy})
        await create({"id": child, "tags": site, "parent": gw_id, "issue_key": False})
        await create({"id": solo, "tags": site})
        for extra_id in extra:
            await create({"id": extra_id, "parent": gw_id, "issue_key": False})

        gw = Gateway(stack, gw_id, made["credentials"]["key"])
        connected = True
        try:
            # Refused first: the plugin adds its counts to the database every 5 s.
            now = int(time.time() * 1000)
            assert gw.publish(f"devices/{solo}/telemetry", reading(now, t=1)) == NOT_AUTHORIZED
            assert gw.publish(f"devices/{child}/status", b"online", retain=True) == GRANTED
            rssi = reading(now - 2000, rssi=-61)
            assert gw.publish(f"devices/{child}/telemetry", rssi) == GRANTED
            module = f"devices/{child}/modules/env/telemetry"
            history = [reading(now - 2000, temperature=4.5), reading(now - 1000, temperature=5.25)]
            assert gw.publish(module, history) == GRANTED
            await wait_for(lambda: module_points(), "the module's readings")
            assert await module_points() == 2
            assert (await device(child))["online"] is True

            async with stack.db.acquire() as con:
                scopes = ["devices:read", "telemetry:read"]
                token = (await apikeys.create_key(con, name="dashboard", scopes=scopes)).token
            fleet_url = f"{stack.api.url}/dashboard/#/fleet?tag=site%3D{uid}"
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                try:
                    page = await browser.new_page(viewport={"width": 1280, "height": 800})
                    problems = record_problems(page)
                    telemetry_urls: list[str] = []

                    def note(request: Request) -> None:
                        if "/telemetry?" in request.url:
                            telemetry_urls.append(request.url)

                    page.on("request", note)

                    # The fleet, filtered to this test's devices: the gateway marked, the
                    # child linking to it, the device of its own neither.
                    await sign_in(page, fleet_url, token)
                    await expect(page.get_by_test_id("device-row")).to_have_count(3)
                    gw_row, child_row, solo_row = (fleet_row(page, d) for d in (gw_id, child, solo))
                    await expect(gw_row.get_by_test_id("gateway-marker")).to_be_visible()
                    await expect(gw_row.get_by_test_id("device-parent")).to_be_empty()
                    await expect(child_row.get_by_test_id("gateway-marker")).to_be_hidden()
                    parent_link = child_row.get_by_test_id("device-parent-link")
                    await expect(parent_link).to_have_text(gw_id)
                    await expect(parent_link).to_have_attribute("href", f"#/device/{gw_id}")
                    await expect(child_row.get_by_test_id("device-status")).to_have_text("online")
                    await expect(child_row.get_by_test_id("device-offline-reason")).to_be_hidden()
                    await expect(
                        child_row.locator(
                            '[data-metric="env/temperature"] [data-testid="latest-value"]'
                        )
                    ).to_have_text("5.25")
                    await expect(solo_row.get_by_test_id("gateway-marker")).to_be_hidden()
                    await expect(solo_row.get_by_test_id("device-parent")).to_be_empty()
                    await page.screenshot(path=artifacts / "dashboard-gateways-fleet.png")

                    # The child's page: behind its gateway, online, the module's series
                    # charted from its history (metric=env%2Ftemperature) and then live.
                    await child_row.get_by_role("link", name=child).click()
                    await expect(page.get_by_test_id("device-title")).to_have_text(child)
                    link = page.get_by_test_id("device-parent-link")
                    await expect(link).to_have_text(gw_id)
                    await expect(link).to_have_attribute("href", f"#/device/{gw_id}")
                    await expect(page.get_by_test_id("gateway-marker")).to_be_hidden()
                    await expect(page.get_by_test_id("gateway")).to_be_hidden()
                    status = page.get_by_test_id("device-status")
                    reason = page.get_by_test_id("device-offline-reason")
                    await expect(status).to_have_text("online")
                    await expect(reason).to_be_hidden()
                    chart = page.locator('[data-testid="chart"][data-metric="env/temperature"]')
                    await expect(chart).to_have_attribute("data-points", "2")
                    await expect(chart).to_have_attribute("data-last-value", "5.25")
                    await expect(chart.locator(".metric-name")).to_have_text("env/temperature")
                    await expect(chart.locator("canvas")).to_have_count(1)
                    rssi_chart = page.locator('[data-testid="chart"][data-metric="rssi"]')
                    await expect(rssi_chart).to_have_attribute("data-points", "1")
                    assert any("metric=env%2Ftemperature" in u for u in telemetry_urls), (
                        telemetry_urls
                    )
                    await expect(page.get_by_test_id("live-status")).to_have_attribute(
                        "data-state", "live", timeout=LIVE_TIMEOUT_MS
                    )
                    live = reading(int(time.time() * 1000), temperature=6.5)
                    assert gw.publish(module, live) == GRANTED
                    await expect(chart).to_have_attribute(
                        "data-points", "3", timeout=LIVE_TIMEOUT_MS
                    )
                    await expect(chart).to_have_attribute("data-last-value", "6.5")
                    await page.screenshot(
                        path=artifacts / "dashboard-gateways-child.png", full_page=True
                    )

                    # The fleet open in another tab too, live.
                    fleet = await browser.new_page(viewport={"width": 1280, "height": 800})
                    fleet_problems = record_problems(fleet)
                    await sign_in(fleet, fleet_url, token)
                    live_child = fleet_row(fleet, child)
                    await expect(live_child.get_by_test_id("device-status")).to_have_text("online")
                    await expect(fleet.get_by_test_id("live-status")).to_have_attribute(
                        "data-state", "live", timeout=LIVE_TIMEOUT_MS
                    )

                    # The gateway's connection drops (its Will): the child goes offline
                    # with it, and both open pages say so, with the reason.
                    gw.cut()
                    connected = False
                    await expect(status).to_have_text("offline", timeout=LIVE_TIMEOUT_MS)
                    await expect(reason).to_have_text(offline)
                    await expect(reason).to_be_visible()
                    assert (await device(child))["offline_reason"] == offline
                    await page.screenshot(
                        path=artifacts / "dashboard-gateways-child-offline.png", full_page=True
                    )
                    await expect(live_child.get_by_test_id("device-status")).to_have_text(
                        "offline", timeout=LIVE_TIMEOUT_MS
                    )
                    await expect(live_child.get_by_test_id("device-offline-reason")).to_have_text(
                        offline
                    )
                    await expect(
                        fleet_row(fleet, gw_id).get_by_test_id("device-status")
                    ).to_have_text("offline")
                    await expect(
                        fleet_row(fleet, gw_id).get_by_test_id("device-offline-reason")
                    ).to_be_hidden()  # it went offline itself
                    await fleet.screenshot(path=artifacts / "dashboard-gateways-fleet-offline.png")
                    assert fleet_problems == []
                    await fleet.close()

                    # The gateway's page: its policy, its children (paged), the refusal.
                    await wait_for(refused, "the refusal recorded", timeout=15)
                    await link.click()
                    await expect(page.get_by_test_id("device-title")).to_have_text(gw_id)
                    await expect(page.get_by_test_id("gateway-marker")).to_be_visible()
                    await expect(page.get_by_test_id("device-parent")).to_be_hidden()
                    await expect(status).to_have_text("offline")
                    await expect(reason).to_be_hidden()
                    shown = page.get_by_test_id("gateway-policy")
                    await expect(
                        shown.locator('[data-option="create_children"] dd')
                    ).to_contain_text("yes")
                    await expect(
                        shown.locator('[data-option="child_id_pattern"] code')
                    ).to_have_text(policy["child_id_pattern"])
                    await expect(shown.locator('[data-option="child_tags"] .chip')).to_have_text(
                        ["kind=ble"]
                    )
                    children = page.get_by_test_id("child-row")
                    await expect(children).to_have_count(CHILDREN_PAGE)
                    first = children.first
                    await expect(first).to_have_attribute("data-device-id", child)
                    await expect(first.get_by_role("link", name=child)).to_have_attribute(
                        "href", f"#/device/{child}"
                    )
                    await expect(first.get_by_test_id("child-status")).to_have_text("offline")
                    await expect(first.get_by_test_id("child-offline-reason")).to_have_text(offline)
                    refusal = page.get_by_test_id("refusal-row")
                    await expect(refusal).to_have_count(1)
                    await expect(refusal.get_by_test_id("refusal-child")).to_have_text(solo)
                    await expect(refusal.get_by_test_id("refusal-reason")).to_have_text(
                        f"'{solo}' is not a child of '{gw_id}'"
                    )
                    await expect(refusal.get_by_test_id("refusal-topic")).to_have_text(
                        f"devices/{solo}/telemetry"
                    )
                    await expect(refusal.get_by_test_id("refusal-count")).to_have_text("1")
                    [recorded] = await refused()
                    last = refusal.get_by_test_id("refusal-last")
                    await expect(last).to_have_attribute(
                        "datetime", iso_z(recorded["last_refused_at"])
                    )
                    await expect(last).not_to_be_empty()
                    await page.screenshot(
                        path=artifacts / "dashboard-gateways-gateway.png", full_page=True
                    )

                    # The second page of children holds the last one; back to the first.
                    await page.locator("#children-next").click()
                    await expect(page.get_by_test_id("children-page")).to_have_text("Page 2")
                    await expect(children).to_have_count(1)
                    await expect(children).to_have_attribute("data-device-id", extra[-1])
                    await page.locator("#children-prev").click()
                    await expect(children).to_have_count(CHILDREN_PAGE)

                    # A child's link leads to its page, read afresh with the reason.
                    await first.get_by_role("link", name=child).click()
                    await expect(page.get_by_test_id("device-title")).to_have_text(child)
                    await expect(reason).to_have_text(offline)
                    assert problems == []
                finally:
                    await browser.close()
        finally:
            if connected:
                gw.close()
