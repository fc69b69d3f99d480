"""The dashboard's device page beyond its charts, in a real browser (Debian's Chromium
driven by Playwright) against the API and ingest as processes and a device on the real
broker: its twin (desired edited with If-Match, a change made meanwhile refused with a
clear message), a method invoked and answered (and one that times out), a
cloud-to-device message sent, delivered and completed with its history, and its alarms
acknowledged and cleared."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import paho.mqtt.client as paho
import pytest
from playwright.async_api import async_playwright, expect

from fleetline_dev.embedded import LocalMosquitto
from tests.e2e.test_dashboard import CHROMIUM, CHROMIUM_ARGS, record_problems, wait_for
from tests.integration.test_api import client
from tests.support import ApiProcess, Device, IngestProcess

pytestmark = pytest.mark.integration


class AnsweringDevice:
    """A device online on the broker that answers methods (``silent`` never) and
    completes every cloud-to-device message (but those whose body says ``hold``), as
    firmware does."""

    def __init__(self, broker_url: str, device_id: str) -> None:
        self.device = Device(broker_url, device_id)
        c = self.device.client
        subscribed = threading.Event()
        c.on_subscribe = lambda *_a: subscribed.set()

        def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
            doc = orjson.loads(msg.payload)
            if msg.topic.endswith("/c2d"):
                if doc["body"] == {"hold": True}:
                    return
                ack = {"id": doc["id"], "outcome": "complete"}
                c.publish(f"devices/{device_id}/c2d/ack", orjson.dumps(ack), qos=1)
                return
            request_id = msg.topic.split("/")[3]
            if doc["method"] == "silent":
                return
            answer = {"status": 200, "payload": {"pong": doc["params"]}}
            c.publish(f"devices/{device_id}/methods/{request_id}/res", orjson.dumps(answer), qos=1)

        c.on_message = on_message
        c.subscribe([(f"devices/{device_id}/c2d", 1), (f"devices/{device_id}/methods/+/req", 1)])
        assert subscribed.wait(10), "the device's subscriptions were not acknowledged"
        self.device.publish(b"online", kind="status").wait_for_publish(10)

    def close(self) -> None:
        self.device.publish(b"offline", kind="status").wait_for_publish(10)
        self.device.close()


@pytest.fixture
def answering(broker: LocalMosquitto) -> Iterator[Callable[[str], AnsweringDevice]]:
    made: list[AnsweringDevice] = []

    def make(device_id: str) -> AnsweringDevice:
        made.append(AnsweringDevice(broker.url, device_id))
        return made[-1]

    yield make
    for dev in made:
        dev.close()


async def test_device_page_twin_methods_messages_and_alarms(
    api: ApiProcess,
    make_key: Callable[..., Any],
    start_ingest: Callable[..., IngestProcess],
    answering: Callable[[str], AnsweringDevice],
    db: asyncpg.Pool[Any],
    uid: str,
    artifacts: Path,
) -> None:
    start_ingest()
    device_id = f"{uid}-d"
    token = await make_key(
        "devices:read", "devices:write", "commands:write", "telemetry:read", "rules:write"
    )
    c = client(api, token)
    made = c.post("/v1/devices", json={"id": device_id, "tags": {"site": uid}})
    assert made.status_code == 201, made.text
    twin_path = f"/v1/devices/{device_id}/twin"
    patched = c.patch(twin_path, json={"interval_s": 10, "mode": "eco"})
    assert patched.status_code == 200, patched.text
    dev = answering(device_id)
    dev.device.publish({"interval_s": 5, "fw": "1.0.3"}, kind="twin/reported")

    async def online() -> bool:
        return bool(
            await db.fetchval("SELECT online FROM device_activity WHERE device_id = $1", device_id)
        )

    async def reported() -> bool:
        return bool(c.get(twin_path).json()["reported_version"] > 0)

    await wait_for(online, "the device online")
    await wait_for(reported, "the reported twin")
    rule = c.post(
        "/v1/rules",
        json={
            "name": f"hot {uid}",
            "metric": "temp",
            "raise": {"op": ">", "value": 30},
            "match": {"devices": [device_id]},
        },
    )
    assert rule.status_code == 201, rule.text
    alarm_id = await db.fetchval(
        "INSERT INTO rule_alarms (rule_id, rule_name, device_id, metric, severity, state, "
        "raised_at, value, peak, message) VALUES ($1, $2, $3, 'temp', 'critical', 'active', "
        "now(), 31.5, 33, $4) RETURNING id",
        rule.json()["id"],
        f"hot {uid}",
        device_id,
        f"{device_id} is hot",
    )

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            problems = record_problems(page)
            await page.goto(f"{api.url}/dashboard/#/device/{device_id}")
            await page.get_by_test_id("api-key").fill(token)
            await page.get_by_test_id("login-submit").click()
            await expect(page.get_by_test_id("device-title")).to_have_text(device_id)

            # The twin: desired, reported and their delta (interval_s differs, mode absent).
            twin = page.get_by_test_id("twin")
            await expect(twin).to_have_attribute("data-desired-version", "1")
            assert orjson.loads(await page.get_by_test_id("twin-desired").text_content() or "") == {
                "interval_s": 10,
                "mode": "eco",
            }
            assert orjson.loads(
                await page.get_by_test_id("twin-reported").text_content() or ""
            ) == {"interval_s": 5, "fw": "1.0.3"}
            assert orjson.loads(await page.get_by_test_id("twin-delta").text_content() or "") == {
                "interval_s": 10,
                "mode": "eco",
            }

            # Someone else changes desired meanwhile: saving the stale edit is refused (412)
            # with a clear message, and nothing is overwritten.
            assert c.patch(twin_path, json={"mode": "boost"}).status_code == 200
            edit = page.get_by_test_id("twin-edit")
            await edit.fill('{"interval_s": 30}')
            await page.get_by_test_id("twin-save").click()
            error = page.get_by_test_id("twin-error")
            await expect(error).to_contain_text("changed by someone else since version 1")
            await expect(edit).to_have_value('{"interval_s": 30}')
            assert c.get(twin_path).json()["desired"] == {"interval_s": 10, "mode": "boost"}
            await page.screenshot(
                path=artifacts / "dashboard-device-twin-conflict.png", full_page=True
            )

            # Reload, edit again: saved as a merge patch (mode removed) with If-Match.
            await page.get_by_test_id("twin-reload").click()
            await expect(twin).to_have_attribute("data-desired-version", "2")
            await expect(error).to_be_hidden()
            await edit.fill('{"interval_s": 30, "led": {"on": true}}')
            await page.get_by_test_id("twin-save").click()
            await expect(page.get_by_test_id("twin-saved")).to_have_text(
                "Saved: desired version 3."
            )
            assert c.get(twin_path).json()["desired"] == {"interval_s": 30, "led": {"on": True}}
            await expect(twin).to_have_attribute("data-desired-version", "3")

            # A method with JSON parameters: the device's answer; a bad JSON is caught
            # before sending; a device that does not answer: the API's 504 detail.
            await page.get_by_test_id("method-name").fill("ping")
            await page.get_by_test_id("method-params").fill('{"n": ')
            await page.get_by_test_id("method-invoke").click()
            await expect(page.get_by_test_id("method-error")).to_contain_text(
                "The parameters is not valid JSON"
            )
            await page.get_by_test_id("method-params").fill('{"n": 7}')
            await page.get_by_test_id("method-invoke").click()
            await expect(page.get_by_test_id("method-status")).to_have_text("200")
            assert orjson.loads(
                await page.get_by_test_id("method-payload").text_content() or ""
            ) == {"pong": {"n": 7}}
            await expect(page.get_by_test_id("method-error")).to_be_hidden()
            await page.screenshot(path=artifacts / "dashboard-device-method.png", full_page=True)
            await page.get_by_test_id("method-name").fill("silent")
            await page.get_by_test_id("method-timeout").fill("1")
            await page.get_by_test_id("method-invoke").click()
            await expect(page.get_by_test_id("method-error")).to_contain_text("504")
            await expect(page.get_by_test_id("method-result")).to_be_hidden()

            # A cloud-to-device message: sent, delivered, completed, with its history.
            await page.get_by_test_id("message-body").fill('{"led": "blink"}')
            await page.get_by_test_id("message-send").click()
            row = page.get_by_test_id("message-row")
            await expect(row).to_have_count(1)
            await expect(row.get_by_test_id("message-body-text")).to_have_text('{"led":"blink"}')

            async def completed() -> bool:
                state = await db.fetchval(
                    "SELECT state FROM c2d_messages WHERE device_id = $1", device_id
                )
                return bool(state == "completed")

            await wait_for(completed, "the message completed")
            await page.locator("#messages-refresh").click()
            await expect(row.get_by_test_id("message-state")).to_have_text("completed")
            history = row.get_by_test_id("message-history").locator("li")
            await expect(history).to_have_count(3)
            await expect(history.locator("strong")).to_have_text(["queued", "sent", "completed"])
            await expect(row.get_by_test_id("message-cancel")).to_be_hidden()

            # One the device keeps without acknowledging: cancelled from the page.
            await page.get_by_test_id("message-body").fill('{"hold": true}')
            await page.get_by_test_id("message-ttl").fill("600")
            await page.get_by_test_id("message-send").click()
            await expect(row).to_have_count(2)
            held = row.first
            await expect(held.get_by_test_id("message-body-text")).to_have_text('{"hold":true}')
            await held.get_by_test_id("message-cancel").click()
            await expect(held.get_by_test_id("message-state")).to_have_text("cancelled")
            await expect(
                held.get_by_test_id("message-history").locator("strong").last
            ).to_have_text("cancelled")
            await expect(held.get_by_test_id("message-cancel")).to_be_hidden()
            await expect(page.get_by_test_id("message-error")).to_be_hidden()

            # Its alarm: acknowledged, then cleared, by this key.
            alarm = page.locator(f'[data-testid="alarm-row"][data-alarm-id="{alarm_id}"]')
            await expect(alarm.get_by_test_id("alarm-state")).to_have_text("active")
            await expect(alarm.get_by_test_id("alarm-severity")).to_have_text("critical")
            await expect(alarm.get_by_test_id("alarm-message")).to_have_text(f"{device_id} is hot")
            await expect(alarm.get_by_test_id("alarm-value")).to_have_text("31.5")
            await page.screenshot(path=artifacts / "dashboard-device-panels.png", full_page=True)
            await alarm.get_by_test_id("alarm-ack").click()
            await expect(alarm.get_by_test_id("alarm-state")).to_have_text("acknowledged")
            await expect(alarm.get_by_test_id("alarm-ack")).to_be_disabled()
            await alarm.get_by_test_id("alarm-clear").click()
            await expect(alarm.get_by_test_id("alarm-state")).to_have_text("cleared")
            await expect(alarm.get_by_test_id("alarm-clear")).to_be_disabled()
            assert c.get(f"/v1/alarms/{alarm_id}").json()["state"] == "cleared"
            # The API's own refusals (the 412 and 504 above) are in the page; nothing else.
            assert [
                p for p in problems if "status of 504" not in p and "status of 412" not in p
            ] == []
        finally:
            await browser.close()
            c.close()
