"""Device twins end to end: desired set over REST reaches a real device through the
broker (retained), reported patches from the device are applied by the real ingest."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
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


class Inbox:
    """What a device receives on its desired topic."""

    def __init__(self, device: Device) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self._lock = threading.Lock()

        def on_message(_c: Any, _u: Any, message: paho.MQTTMessage) -> None:
            with self._lock:
                self.messages.append(message)

        device.client.on_message = on_message
        device.client.subscribe(f"devices/{device.device_id}/twin/desired", qos=1)

    def versions(self) -> list[int]:
        with self._lock:
            return [orjson.loads(m.payload)["version"] for m in self.messages]

    def wait_for(self, version: int) -> tuple[dict[str, Any], bool]:
        """The document of ``version`` and whether it came as a retained message."""

        def find() -> tuple[dict[str, Any], bool] | None:
            with self._lock:
                for m in self.messages:
                    doc = orjson.loads(m.payload)
                    if doc["version"] == version:
                        return doc, bool(m.retain)
            return None

        found: tuple[dict[str, Any], bool] = wait_until(find, what=f"desired version {version}")
        return found


async def _device(api: ApiProcess, make_key: Callable[..., Any], device_id: str) -> Any:
    c = client(api, await make_key("devices:read", "devices:write"))
    assert c.post("/v1/devices", json={"id": device_id, "tags": {"site": "A"}}).status_code == 201
    return c


def _patch(c: Any, device_id: str, body: Any, **headers: str) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return c.patch(f"/v1/devices/{device_id}/twin", content=raw, headers={**MERGE_PATCH, **headers})


async def test_desired_reaches_a_connected_and_a_later_device(
    api: ApiProcess, make_key: Callable[..., Any], broker: LocalMosquitto, uid: str
) -> None:
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    empty = c.get(f"/v1/devices/{device_id}/twin")
    assert empty.status_code == 200 and empty.headers["etag"] == '"0"'
    assert empty.json()["desired"] == {} and empty.json()["desired_version"] == 0
    assert empty.json()["tags"] == {"site": "A"}

    online = Device(broker.url, device_id)
    inbox = Inbox(online)
    time.sleep(0.3)  # the SUBACK
    resp = _patch(c, device_id, {"fw": {"version": "1.2", "url": "http://x/fw"}, "period": 10})
    assert resp.status_code == 200, resp.text
    assert resp.headers["etag"] == '"1"'
    body = resp.json()
    assert body["desired_version"] == 1 and body["desired_published_version"] == 1
    assert body["desired_updated_at"] is not None
    doc, retained = inbox.wait_for(1)
    assert doc == {
        "version": 1,
        "desired": {"fw": {"version": "1.2", "url": "http://x/fw"}, "period": 10},
    }
    assert not retained  # delivered live
    online.close()

    # A device that connects afterwards gets the current document, retained.
    _patch(c, device_id, {"period": 30})
    later = Device(broker.url, device_id)
    doc, retained = Inbox(later).wait_for(2)
    assert retained and doc["desired"]["period"] == 30
    later.close()


async def test_merge_patch_semantics_and_if_match(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    first = _patch(c, device_id, {"fw": {"version": "1", "url": "u"}, "a": 1, "list": [1, 2]})
    assert first.json()["desired_version"] == 1
    # null deletes, objects merge, anything else (arrays too) replaces.
    resp = _patch(
        c,
        device_id,
        {"fw": {"url": None, "ch": "beta"}, "a": None, "list": [3], "new": {"x": True}},
        **{"If-Match": '"1"'},
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["desired"] == {
        "fw": {"version": "1", "ch": "beta"},
        "list": [3],
        "new": {"x": True},
    }
    assert resp.json()["desired_version"] == 2
    # Plain application/json is accepted too.
    plain = c.patch(f"/v1/devices/{device_id}/twin", json={"b": 2})
    assert plain.status_code == 200 and plain.json()["desired_version"] == 3

    stale = _patch(c, device_id, {"a": 5}, **{"If-Match": '"2"'})
    assert_problem(stale, 412, "version 3")
    assert stale.headers["etag"] == '"3"'
    assert_problem(_patch(c, device_id, {"a": 5}, **{"If-Match": 'W/"3"'}), 412)
    assert _patch(c, device_id, {"a": 5}, **{"If-Match": '"3"'}).status_code == 200
    assert _patch(c, device_id, {"a": 6}, **{"If-Match": "*"}).json()["desired_version"] == 5
    # A patch that changes nothing keeps the version (and publishes again).
    same = _patch(c, device_id, {"a": 6})
    assert same.status_code == 200 and same.json()["desired_version"] == 5
    assert _patch(c, device_id, {}).json()["desired_version"] == 5

    reader = client(api, await make_key("devices:read"))
    assert reader.get(f"/v1/devices/{device_id}/twin").status_code == 200
    assert_problem(_patch(reader, device_id, {"a": 1}), 403, "devices:write")
    assert_problem(c.get(f"/v1/devices/{uid}-nope/twin"), 404)
    assert_problem(_patch(c, f"{uid}-nope", {"a": 1}), 404)


async def test_desired_limits_give_clear_4xx(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    assert_problem(_patch(c, device_id, {"blob": "x" * 40_000}), 413, "more than 32768")
    deep: dict[str, Any] = {"leaf": 1}
    for _ in range(8):
        deep = {"n": deep}
    assert_problem(_patch(c, device_id, deep), 400, "nested more than 8 levels")
    assert_problem(_patch(c, device_id, {"a.b": 1}), 400, "member name 'a.b'")
    assert_problem(_patch(c, device_id, {"a": {"$x": 1}}), 400, "member name a.'$x'")
    assert_problem(_patch(c, device_id, {"a": "nul\x00"}), 400, "NUL")
    assert_problem(_patch(c, device_id, [1, 2]), 422, "JSON object")
    assert_problem(_patch(c, device_id, b"{nope"), 422, "not JSON")
    assert_problem(
        c.patch(
            f"/v1/devices/{device_id}/twin", content=b"{}", headers={"Content-Type": "text/plain"}
        ),
        415,
    )
    # Each patch fits, their sum does not.
    assert _patch(c, device_id, {"a": "x" * 20_000}).status_code == 200
    assert_problem(_patch(c, device_id, {"b": "y" * 20_000}), 413, "desired document would be")
    twin = c.get(f"/v1/devices/{device_id}/twin").json()
    assert list(twin["desired"]) == ["a"] and twin["desired_version"] == 1


async def test_reported_patches_from_the_device_update_the_twin(
    api: ApiProcess,
    make_key: Callable[..., Any],
    broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess],
    uid: str,
) -> None:
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    _patch(c, device_id, {"fw": {"version": "1.2"}, "period": 10, "mode": "eco"})
    ingest = start_ingest()
    dev = Device(broker.url, device_id)
    dev.publish_all(
        [
            {"fw": {"version": "1.1", "vendor": "acme"}, "battery": 80, "period": 10},
            {"battery": None, "mode": "turbo"},
            {"fw": {"vendor": None}},
        ],
        kind="twin/reported",
    )

    def twin() -> dict[str, Any]:
        body: dict[str, Any] = c.get(f"/v1/devices/{device_id}/twin").json()
        return body

    wait_until(lambda: twin()["reported_version"] == 3, what="three reported patches")
    body = twin()
    assert body["reported"] == {"fw": {"version": "1.1"}, "period": 10, "mode": "turbo"}
    assert body["reported_updated_at"] is not None
    assert body["delta"] == {"fw": {"version": "1.2"}, "mode": "eco"}
    assert body["desired_version"] == 1  # the two sides are versioned apart
    # The device catches up: the delta empties.
    dev.publish_all([{"fw": {"version": "1.2"}, "mode": "eco"}], kind="twin/reported")
    wait_until(lambda: twin()["reported_version"] == 4, what="the fourth patch")
    assert twin()["delta"] == {}
    assert ingest.metric("fleetline_ingest_twin_patches_total") == 4
    dev.close()


async def test_reported_patches_apply_in_order_across_concurrent_writers(
    api: ApiProcess,
    make_key: Callable[..., Any],
    broker: LocalMosquitto,
    db: asyncpg.Pool[Any],
    start_ingest: Callable[..., IngestProcess],
    uid: str,
) -> None:
    """Ingest writes batches on two connections at once; a device's reported patches
    still apply in the order it sent them. The first batch is held up (its new metric
    waits for the series table, which the test locks) while the next, with later
    patches only, could commit first: it must wait its turn."""
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    start_ingest(env={"FLEETLINE_INGEST_BATCH_MESSAGES": "2", "FLEETLINE_INGEST_WRITERS": "2"})
    dev = Device(broker.url, device_id)

    def twin() -> dict[str, Any]:
        body: dict[str, Any] = c.get(f"/v1/devices/{device_id}/twin").json()
        return body

    async with db.acquire() as con:
        tx = con.transaction()
        await tx.start()
        await con.execute("LOCK TABLE series IN EXCLUSIVE MODE")
        dev.publish_all([{"n": 1}], kind="twin/reported")  # batch 1: a patch and a
        dev.publish_all([{"values": {f"new_{uid[-6:]}": 1}}])  # reading of a new metric
        dev.publish_all([{"n": 2}, {"n": 3}], kind="twin/reported")  # batch 2
        await asyncio.sleep(1.5)
        assert twin()["reported_version"] == 0, "a later batch's patches came first"
        await tx.rollback()
    wait_until(lambda: twin()["reported_version"] == 3, what="three reported patches")
    assert twin()["reported"] == {"n": 3}
    dev.close()


async def test_bad_reported_patches_are_dead_lettered_with_reason(
    api: ApiProcess,
    make_key: Callable[..., Any],
    broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess],
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    deep: dict[str, Any] = {"x": 1}
    for _ in range(8):
        deep = {"n": deep}
    bad = [
        (b"{nope", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"a.b": 1}', "member name 'a.b'"),
        (orjson.dumps(deep), "nested more than 8 levels"),
        (orjson.dumps({"blob": "x" * 40_000}), "exceeds 32768"),
        (orjson.dumps({"s": "a\x00b"}), "NUL"),
    ]
    ingest = start_ingest()
    dev = Device(broker.url, device_id)
    # Each fits alone; the second would make the document too large.
    dev.publish_all(
        [orjson.dumps({"big": "x" * 20_000}), orjson.dumps({"big2": "y" * 20_000})],
        kind="twin/reported",
    )
    dev.publish_all([p for p, _ in bad], kind="twin/reported")
    stranger = Device(broker.url, f"{uid}-unregistered")
    stranger.publish_all([b'{"a": 1}'], kind="twin/reported")
    expected = len(bad) + 2
    wait_until(
        lambda: ingest.metric("fleetline_ingest_dead_letters_total") >= expected,
        what="all dead letters",
    )
    rows = await db.fetch(
        "SELECT device_id, reason, payload, topic FROM dead_letters WHERE device_id LIKE $1",
        f"{uid}-%",
    )
    assert len(rows) == expected
    by_payload = {bytes(r["payload"]): r["reason"] for r in rows}
    for payload, reason in bad:
        assert reason in by_payload[payload], (payload[:40], by_payload[payload])
    assert "reported document would be" in by_payload[orjson.dumps({"big2": "y" * 20_000})]
    assert "not registered" in by_payload[b'{"a": 1}']
    twin = c.get(f"/v1/devices/{device_id}/twin").json()
    assert list(twin["reported"]) == ["big"] and twin["reported_version"] == 1
    assert ingest.ready()
    dev.close()
    stranger.close()


async def test_a_deleted_device_takes_its_twin_along(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any],
    broker: LocalMosquitto, uid: str,
) -> None:
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    assert _patch(c, device_id, {"a": 1}).status_code == 200
    assert c.delete(f"/v1/devices/{device_id}").status_code == 204
    # The broker no longer retains the desired document for that id.
    again = Device(broker.url, device_id)
    inbox = Inbox(again)
    time.sleep(1.0)
    assert inbox.versions() == []
    again.close()
    assert (
        await db.fetchval("SELECT count(*) FROM twin_desired WHERE device_id = $1", device_id) == 0
    )
