"""Modules: the registry, module twins (desired over REST to a real device, reported
through the real ingest) and module methods, on the real broker."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import paho.mqtt.client as paho
import pytest

from fleetline_dev.embedded import LocalMosquitto
from tests.integration.test_api import assert_problem, client
from tests.support import ApiProcess, Device, IngestProcess, wait_until

pytestmark = pytest.mark.integration
MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}


class Listener:
    """Everything a device receives on the topics it subscribes to."""

    def __init__(self, device: Device, *topics: str) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()

        def on_message(_c: Any, _u: Any, message: paho.MQTTMessage) -> None:
            with self._lock:
                self.messages.append(message)

        device.client.on_message = on_message
        device.client.on_subscribe = lambda *_a: subscribed.set()
        device.client.subscribe([(t, 1) for t in topics])
        assert subscribed.wait(10), "the subscription was not acknowledged"

    def on(self, topic: str) -> list[paho.MQTTMessage]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]


async def _registered(api: ApiProcess, make_key: Callable[..., Any], device_id: str) -> Any:
    c = client(api, await make_key("devices:read", "devices:write", "commands:write"))
    assert c.post("/v1/devices", json={"id": device_id}).status_code == 201
    return c


async def test_the_module_registry(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    device_id = f"{uid}-gw"
    c = await _registered(api, make_key, device_id)
    made = c.put(f"/v1/devices/{device_id}/modules/modbus")
    assert made.status_code == 201, made.text
    assert made.json()["module_id"] == "modbus" and made.json()["device_id"] == device_id
    again = c.put(f"/v1/devices/{device_id}/modules/modbus")
    assert again.status_code == 200 and again.json() == made.json()
    assert c.put(f"/v1/devices/{device_id}/modules/ble.scan").status_code == 201
    listed = c.get(f"/v1/devices/{device_id}/modules").json()["items"]
    assert [m["module_id"] for m in listed] == ["ble.scan", "modbus"]
    assert c.get(f"/v1/devices/{device_id}/modules/modbus").json() == made.json()

    assert_problem(c.put(f"/v1/devices/{uid}-nobody/modules/modbus"), 404, "not found")
    assert_problem(c.get(f"/v1/devices/{uid}-nobody/modules"), 404)
    assert_problem(c.get(f"/v1/devices/{device_id}/modules/zigbee"), 404,
                   f"module {device_id}/zigbee not found")
    assert_problem(c.put(f"/v1/devices/{device_id}/modules/{'m' * 65}"), 422)
    assert_problem(c.put(f"/v1/devices/{device_id}/modules/a b"), 422)
    assert_problem(c.get(f"/v1/devices/{device_id}/modules/zigbee/twin"), 404)
    assert_problem(
        c.patch(f"/v1/devices/{device_id}/modules/zigbee/twin", content=b"{}",
                headers=MERGE_PATCH), 404, "module")

    assert c.delete(f"/v1/devices/{device_id}/modules/modbus").status_code == 204
    assert_problem(c.delete(f"/v1/devices/{device_id}/modules/modbus"), 404)
    assert [m["module_id"] for m in c.get(f"/v1/devices/{device_id}/modules").json()["items"]] \
        == ["ble.scan"]
    read_only = client(api, await make_key("devices:read"))
    assert_problem(read_only.put(f"/v1/devices/{device_id}/modules/x"), 403)


async def test_module_twins_are_their_own(
    api: ApiProcess, make_key: Callable[..., Any], broker: LocalMosquitto, db: asyncpg.Pool[Any],
    start_ingest: Callable[..., IngestProcess], uid: str,
) -> None:
    start_ingest()
    device_id = f"{uid}-gw"
    c = await _registered(api, make_key, device_id)
    assert c.put(f"/v1/devices/{device_id}/modules/pump").status_code == 201
    module_topic = f"devices/{device_id}/modules/pump/twin/desired"
    device_topic = f"devices/{device_id}/twin/desired"

    patched = c.patch(f"/v1/devices/{device_id}/modules/pump/twin",
                      content=orjson.dumps({"rpm": 1200, "mode": {"auto": True}}),
                      headers=MERGE_PATCH)
    assert patched.status_code == 200, patched.text
    twin = patched.json()
    assert twin["module_id"] == "pump" and twin["desired_version"] == 1
    assert patched.headers["etag"] == '"1"'
    assert c.get(f"/v1/devices/{device_id}/twin").json()["desired_version"] == 0
    stale = c.patch(f"/v1/devices/{device_id}/modules/pump/twin", content=b'{"rpm": 1}',
                    headers={**MERGE_PATCH, "If-Match": '"0"'})
    assert_problem(stale, 412)

    # A device connecting later gets the module's document, retained, and no device one.
    dev = Device(broker.url, device_id)
    try:
        inbox = Listener(dev, module_topic, device_topic)
        got = wait_until(lambda: inbox.on(module_topic), what="the module's desired document")
        assert orjson.loads(got[0].payload) == {"version": 1, "desired": {"rpm": 1200,
                                                                          "mode": {"auto": True}}}
        assert got[0].retain and not inbox.on(device_topic)

        # Reported, from the module's topic, through ingest.
        dev.publish({"rpm": 1180, "mode": {"auto": True}}, kind="modules/pump/twin/reported")
        dev.publish({"fw": "2.0"}, kind="twin/reported")
        dev.publish({"x": 1}, kind="modules/ghost/twin/reported")

        def reported() -> Any:
            twin = c.get(f"/v1/devices/{device_id}/modules/pump/twin").json()
            return twin if twin["reported_version"] == 1 else None

        twin = wait_until(reported, what="the module's reported patch")
        assert twin["reported"] == {"rpm": 1180, "mode": {"auto": True}}
        assert twin["delta"] == {"rpm": 1200}
        device_twin = wait_until(
            lambda: (t := c.get(f"/v1/devices/{device_id}/twin").json())["reported_version"] == 1
            and t, what="the device's reported patch")
        assert device_twin["reported"] == {"fw": "2.0"}
    finally:
        dev.close()
    ghost = await _wait_dead_letter(db, f"devices/{device_id}/modules/ghost/twin/reported")
    assert "module ghost, which is not registered" in ghost

    # Deleting the module takes its twin and its retained document along.
    assert c.delete(f"/v1/devices/{device_id}/modules/pump").status_code == 204
    assert await db.fetchval(
        "SELECT count(*) FROM twin_desired WHERE device_id = $1 AND module_id = 'pump'",
        device_id) == 0
    assert await db.fetchval(
        "SELECT count(*) FROM twin_reported WHERE device_id = $1 AND module_id = 'pump'",
        device_id) == 0
    assert c.put(f"/v1/devices/{device_id}/modules/pump").status_code == 201
    fresh = c.get(f"/v1/devices/{device_id}/modules/pump/twin").json()
    assert fresh["desired_version"] == 0 and fresh["reported"] == {}
    late = Device(broker.url, device_id)
    try:
        inbox = Listener(late, module_topic)
        time.sleep(1)
        assert not [m for m in inbox.on(module_topic) if m.payload]
    finally:
        late.close()


async def _wait_dead_letter(db: asyncpg.Pool[Any], topic: str) -> str:
    async with asyncio.timeout(20):
        while True:
            reason = await db.fetchval("SELECT reason FROM dead_letters WHERE topic = $1", topic)
            if reason is not None:
                return str(reason)
            await asyncio.sleep(0.1)


async def test_module_methods_reach_the_module_only(
    api: ApiProcess, make_key: Callable[..., Any], broker: LocalMosquitto, db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    device_id = f"{uid}-gw"
    c = await _registered(api, make_key, device_id)
    assert c.put(f"/v1/devices/{device_id}/modules/relay").status_code == 201
    await db.execute(
        "INSERT INTO device_activity (device_id, last_seen, online, status_changed_at) "
        "VALUES ($1, now(), true, now())", device_id)
    dev = Device(broker.url, device_id)
    requests: list[str] = []

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        requests.append(msg.topic)
        parts = msg.topic.split("/")
        body = orjson.loads(msg.payload)
        answer = orjson.dumps({"status": 200, "payload": {"module": parts[3],
                                                          "method": body["method"]}})
        if body["method"] == "wrong_topic":  # answers as the device, not the module
            dev.client.publish(f"devices/{device_id}/methods/{parts[5]}/res", answer, qos=1)
        else:
            dev.client.publish(msg.topic[: -len("req")] + "res", answer, qos=1)

    subscribed = threading.Event()
    dev.client.on_message = on_message
    dev.client.on_subscribe = lambda *_a: subscribed.set()
    dev.client.subscribe(f"devices/{device_id}/modules/+/methods/+/req", qos=1)
    assert subscribed.wait(10)
    try:
        called = c.post(f"/v1/devices/{device_id}/modules/relay/methods/switch",
                        json={"params": {"on": True}, "timeout_s": 10})
        assert called.status_code == 200, called.text
        assert called.json()["payload"] == {"module": "relay", "method": "switch"}
        assert requests[0].startswith(f"devices/{device_id}/modules/relay/methods/")
        wrong = c.post(f"/v1/devices/{device_id}/modules/relay/methods/wrong_topic",
                       json={"timeout_s": 1})
        assert_problem(wrong, 504, f"module {device_id}/relay did not answer")
        assert_problem(c.post(f"/v1/devices/{device_id}/modules/ghost/methods/switch",
                              json={"timeout_s": 1}), 404, f"module {device_id}/ghost not found")
    finally:
        dev.close()
        await db.execute("UPDATE device_activity SET online = false WHERE device_id = $1",
                         device_id)


async def test_the_previous_releases_reported_function_still_applies_device_patches(
    db: asyncpg.Pool[Any], uid: str
) -> None:
    """Ingest of the previous release calls the four-argument form while a deployment
    rolls over: it applies to the device's own twin."""
    device_id = f"{uid}-old"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    refused = await db.fetch(
        "SELECT * FROM fleetline_apply_reported($1::text[], $2::jsonb[], $3::timestamptz[], $4)",
        [device_id, f"{uid}-nobody"], ['{"fw": "1.0"}', '{"fw": "2.0"}'],
        [datetime.now(UTC)] * 2, 1000,
    )
    assert [(r["idx"], r["reason"]) for r in refused] == [
        (2, "twin patch for a device that is not registered")]
    assert await db.fetchval(
        "SELECT reported ->> 'fw' FROM twin_reported WHERE device_id = $1 AND module_id = ''",
        device_id) == "1.0"


async def test_deleting_a_device_clears_its_modules_retained_documents(
    api: ApiProcess, make_key: Callable[..., Any], broker: LocalMosquitto, uid: str
) -> None:
    device_id = f"{uid}-gone"
    c = await _registered(api, make_key, device_id)
    for module in ("a", "b"):
        assert c.put(f"/v1/devices/{device_id}/modules/{module}").status_code == 201
        patched = c.patch(f"/v1/devices/{device_id}/modules/{module}/twin", content=b'{"x": 1}',
                          headers=MERGE_PATCH)
        assert patched.status_code == 200, patched.text
    assert c.delete(f"/v1/devices/{device_id}").status_code == 204
    topics = [f"devices/{device_id}/modules/{m}/twin/desired" for m in ("a", "b")]
    late = Device(broker.url, device_id)
    try:
        inbox = Listener(late, *topics)
        time.sleep(1)
        assert not [m for t in topics for m in inbox.on(t) if m.payload]
    finally:
        late.close()


async def test_a_modules_readings_are_series_of_its_device_named_after_it(
    api: ApiProcess, make_key: Callable[..., Any], start_ingest: Callable[..., IngestProcess],
    broker: LocalMosquitto, db: asyncpg.Pool[Any], uid: str,
) -> None:
    """devices/{id}/modules/{m}/telemetry: stored as the device's series "{m}/{metric}",
    read over REST like any other; a bad reading is dead-lettered with the reason, and a
    module's unknown topic kind too."""
    start_ingest()
    c = await _registered(api, make_key, uid)
    c.headers["Authorization"] = f"Bearer {await make_key('telemetry:read', 'devices:read')}"
    dev = Device(broker.url, uid)
    ts = int(time.time() * 1000)
    dev.publish_all([{"ts": ts, "values": {"temperature": 4.5, "door": True}}],
                    kind="modules/fridge/telemetry")
    dev.publish_all([{"ts": ts, "values": {"temperature": 21.0}}])
    dev.publish_all([{"ts": ts, "values": {"bad name": 1}}, b"{not json"],
                    kind="modules/fridge/telemetry")
    dev.publish_all([b"{}"], kind="modules/fridge/colour")
    wait_until(lambda: len(c.get(f"/v1/devices/{uid}/latest").json()["metrics"]) == 3,
               what="the module's series")
    latest = c.get(f"/v1/devices/{uid}/latest").json()["metrics"]
    assert {m: p["value"] for m, p in latest.items()} == {
        "temperature": 21.0, "fridge/temperature": 4.5, "fridge/door": 1.0}
    points = c.get(f"/v1/devices/{uid}/telemetry", params={"metric": "fridge/temperature"})
    assert [p["value"] for p in points.json()["items"]] == [4.5]
    rows = await wait_for_rows(db, uid, 3)
    reasons = {r["topic"].removeprefix(f"devices/{uid}/"): r["reason"] for r in rows
               if r["reason"].startswith("unknown topic")}
    assert "unknown topic kind 'modules/fridge/colour'" in reasons["modules/fridge/colour"]
    bad = sorted(r["reason"] for r in rows if r["topic"].endswith("/fridge/telemetry"))
    assert bad[0].startswith("not JSON") and "metric name 'bad name' is not" in bad[1], bad
    dev.close()


async def wait_for_rows(db: asyncpg.Pool[Any], device_id: str, count: int) -> list[Any]:
    deadline = time.monotonic() + 20
    while True:
        rows = await db.fetch(
            "SELECT topic, reason FROM dead_letters WHERE device_id = $1", device_id)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)
