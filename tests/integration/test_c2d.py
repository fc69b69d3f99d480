"""Cloud-to-device messages: the REST queue against the API process, and device acks
applied by the real ingest (published by paho devices on the real broker)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import paho.mqtt.client as paho
import pytest

from fleetline import db as fleetline_db
from fleetline_api.settings import ApiSettings
from fleetline_api.workers.broker import BrokerLink
from fleetline_api.workers.c2d import C2dDispatcher
from fleetline_dev.embedded import LocalMosquitto
from tests.conftest import migrated_database
from tests.integration.test_api import assert_problem, client
from tests.support import (
    DEVICE_KEY_SECRET,
    ApiProcess,
    Device,
    IngestProcess,
    full_notify_queue,
    wait_until,
)

pytestmark = pytest.mark.integration
QUEUE_FULL = "urn:fleetline:problem:c2d-queue-full"


async def _device(api: ApiProcess, make_key: Callable[..., Any], device_id: str) -> httpx.Client:
    """Register ``device_id``; a client with the scopes these routes need."""
    c = client(api, await make_key("devices:read", "devices:write", "commands:write"))
    assert c.post("/v1/devices", json={"id": device_id}).status_code == 201
    return c


def _post(c: httpx.Client, device_id: str, body: Any) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return c.post(
        f"/v1/devices/{device_id}/messages",
        content=raw,
        headers={"Content-Type": "application/json"},
    )


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def test_a_message_is_queued_listed_and_read_with_its_history(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    body = {"cmd": "reboot", "delay": 5, "big": 2**70, "nested": {"a": [1, 2.5, None, "ü"]}}
    resp = _post(c, device_id, {"body": body, "properties": {"type": "cmd"}, "ttl_s": 600})
    assert resp.status_code == 201, resp.text
    message = resp.json()
    message_id = message["id"]
    assert str(uuid.UUID(message_id)) == message_id
    assert resp.headers["location"] == f"/v1/devices/{device_id}/messages/{message_id}"
    assert message["state"] == "queued" and message["device_id"] == device_id
    assert message["body"] == body  # integers of any size come back exactly
    assert message["properties"] == {"type": "cmd"}
    assert message["deliveries"] == 0 and message["sent_at"] is None
    assert message["finished_at"] is None and "key" in message["created_by"]
    ttl = _ts(message["expires_at"]) - _ts(message["created_at"])
    assert timedelta(seconds=599) < ttl <= timedelta(seconds=600), ttl
    [event] = message["history"]
    assert event["event"] == "queued" and "queued by test" in event["detail"]

    # The default time to live, a body that is not an object, no properties.
    plain = _post(c, device_id, {"body": "hello"})
    assert plain.status_code == 201, plain.text
    default_ttl = _ts(plain.json()["expires_at"]) - _ts(plain.json()["created_at"])
    assert timedelta(seconds=3599) < default_ttl <= timedelta(seconds=3600)
    assert plain.json()["body"] == "hello" and plain.json()["properties"] == {}
    assert _post(c, device_id, {"body": None}).json()["body"] is None

    got = c.get(f"/v1/devices/{device_id}/messages/{message_id}")
    assert got.status_code == 200 and got.json() == message
    listed = c.get(f"/v1/devices/{device_id}/messages").json()
    assert [m["body"] for m in listed["items"]] == [None, "hello", body]  # newest first
    assert listed["items"][2] == message and listed["next_cursor"] is None

    # Scopes: posting needs commands:write, reading devices:read.
    reader = client(api, await make_key("devices:read"))
    assert reader.get(f"/v1/devices/{device_id}/messages").status_code == 200
    assert_problem(_post(reader, device_id, {"body": 1}), 403, "commands:write")
    writer = client(api, await make_key("commands:write"))
    assert_problem(writer.get(f"/v1/devices/{device_id}/messages"), 403, "devices:read")
    # Unknown device or message.
    assert_problem(_post(c, f"{uid}-nobody", {"body": 1}), 404, "not found")
    assert_problem(c.get(f"/v1/devices/{uid}-nobody/messages"), 404, "not found")
    assert_problem(c.get(f"/v1/devices/{uid}-nobody/messages/{message_id}"), 404)
    assert_problem(
        c.get(f"/v1/devices/{device_id}/messages/{uuid.uuid4()}"), 404, "has no message"
    )
    # Another device's message is not found under this one.
    other = f"{uid}-other"
    assert c.post("/v1/devices", json={"id": other}).status_code == 201
    assert_problem(c.get(f"/v1/devices/{other}/messages/{message_id}"), 404)
    assert_problem(c.get(f"/v1/devices/{device_id}/messages/not-a-uuid"), 422)


async def test_bad_messages_get_a_clear_4xx(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    deep: Any = 1
    for _ in range(33):
        deep = [deep]
    for body, status, detail in [
        ({"body": "x" * 70_000}, 413, "more than 65536"),
        ({"body": {"a": "nul\x00"}}, 400, "NUL"),
        ({"body": {"k\x00": 1}}, 400, "NUL"),
        ({"body": deep}, 400, "nested more than 32 levels"),
        (b'{"body": NaN}', 400, "cannot be sent as JSON"),
        (b'{"body": 1e400}', 400, "cannot be sent as JSON"),
        ({}, 422, "body"),
        ({"body": 1, "ttl_s": 0}, 422, "ttl_s"),
        ({"body": 1, "ttl_s": 172_801}, 422, "ttl_s"),
        ({"body": 1, "ttl_s": "60"}, 422, "ttl_s"),
        ({"body": 1, "properties": {"n": 1}}, 422, "properties"),
        ({"body": 1, "properties": {"bad name": "v"}}, 422, "properties"),
        ({"body": 1, "properties": {"n": "line\nbreak"}}, 422, "properties"),
        ({"body": 1, "properties": {f"p{i}": "v" for i in range(33)}}, 422, "properties"),
        ({"body": 1, "extra": True}, 422, "extra"),
        (b"{nope", 422, ""),
        (b"[1]", 422, ""),
        (b'{"body": ' + b"[" * 300 + b"]" * 300 + b"}", 422, ""),
    ]:
        assert_problem(_post(c, device_id, body), status, detail)
    assert_problem(c.post(f"/v1/devices/{device_id}/messages", content=b"x" * 200_000), 415)
    assert_problem(
        c.post(
            f"/v1/devices/{device_id}/messages",
            content=b"{}",
            headers={"Content-Type": "text/plain"},
        ),
        415,
    )
    too_big = b'{"body": "' + b"y" * 100_000 + b'"}'
    assert_problem(_post(c, device_id, too_big), 413, "more than")
    # None of them was queued; the largest body that fits is.
    assert c.get(f"/v1/devices/{device_id}/messages").json()["items"] == []
    fits = _post(c, device_id, {"body": "z" * (65_536 - 2)})
    assert fits.status_code == 201, fits.text[:300]
    assert _post(c, device_id, {"body": 1, "ttl_s": 172_800}).status_code == 201


async def test_a_full_queue_refuses_with_409_even_under_concurrent_posts(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    token = await make_key("commands:write")
    async with httpx.AsyncClient(
        base_url=api.url, timeout=30, headers={"Authorization": f"Bearer {token}"}
    ) as ac:
        responses = await asyncio.gather(
            *(
                ac.post(f"/v1/devices/{device_id}/messages", json={"body": {"n": n}})
                for n in range(60)
            )
        )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * 50 + [409] * 10, statuses
    refused = assert_problem(next(r for r in responses if r.status_code == 409), 409, "full")
    assert refused["type"] == QUEUE_FULL and "50 messages" in refused["detail"]
    assert (
        await db.fetchval("SELECT count(*) FROM c2d_messages WHERE device_id = $1", device_id)
        == 50
    )

    # A slot frees when a message is final: cancelled here, or expired.
    first = next(r.json()["id"] for r in responses if r.status_code == 201)
    assert c.post(f"/v1/devices/{device_id}/messages/{first}/cancel").status_code == 200
    assert _post(c, device_id, {"body": "one more"}).status_code == 201
    assert_problem(_post(c, device_id, {"body": "too many"}), 409, "queue is full")
    await db.execute(
        "UPDATE c2d_messages SET expires_at = now() - interval '1 s' WHERE id = ("
        "SELECT id FROM c2d_messages WHERE device_id = $1 AND state = 'queued' LIMIT 1)",
        device_id,
    )
    assert _post(c, device_id, {"body": "after expiry"}).status_code == 201


async def test_listing_pages_filters_and_cancels(
    api: ApiProcess, make_key: Callable[..., Any], uid: str
) -> None:
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    ids = [_post(c, device_id, {"body": n}).json()["id"] for n in range(5)]
    path = f"/v1/devices/{device_id}/messages"

    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = c.get(path, params=params).json()
        seen += [m["id"] for m in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(page["items"]) == 2
    assert seen == ids[::-1]

    cancelled = c.post(f"{path}/{ids[1]}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    body = cancelled.json()
    assert body["state"] == "cancelled" and body["finished_at"] is not None
    assert [e["event"] for e in body["history"]] == ["queued", "cancelled"]
    assert "cancelled by test" in body["history"][1]["detail"]
    assert_problem(c.post(f"{path}/{ids[1]}/cancel"), 409, "is cancelled")
    assert_problem(c.post(f"{path}/{uuid.uuid4()}/cancel"), 404)
    reader = client(api, await make_key("devices:read"))
    assert_problem(reader.post(f"{path}/{ids[2]}/cancel"), 403, "commands:write")

    only = c.get(path, params={"state": "cancelled"}).json()["items"]
    assert [m["id"] for m in only] == [ids[1]]
    queued = c.get(path, params={"state": "queued"}).json()["items"]
    assert [m["id"] for m in queued] == [ids[4], ids[3], ids[2], ids[0]]
    assert c.get(path, params={"state": "completed"}).json()["items"] == []
    assert_problem(c.get(path, params={"state": "bogus"}), 422)
    assert_problem(c.get(path, params={"limit": 0}), 422)


async def test_a_deleted_device_takes_its_messages_along(
    api: ApiProcess, make_key: Callable[..., Any], db: asyncpg.Pool[Any], uid: str
) -> None:
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    message_id = _post(c, device_id, {"body": 1}).json()["id"]
    assert c.delete(f"/v1/devices/{device_id}").status_code == 204
    assert await db.fetchval("SELECT count(*) FROM c2d_messages WHERE id = $1", message_id) == 0
    assert (
        await db.fetchval(
            "SELECT count(*) FROM c2d_message_events WHERE message_id = $1", message_id
        )
        == 0
    )


async def test_ingest_applies_acks_and_dead_letters_bad_ones(
    api: ApiProcess,
    make_key: Callable[..., Any],
    broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess],
    db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    """Acks as devices publish them on devices/{id}/c2d/ack (the dispatcher is not
    involved: the device never says it is online, so nothing is sent to it)."""
    device_id = f"{uid}-d"
    c = await _device(api, make_key, device_id)
    path = f"/v1/devices/{device_id}/messages"
    done, refused, twice, cancelled = (
        _post(c, device_id, {"body": n}).json()["id"] for n in range(4)
    )
    assert c.post(f"{path}/{cancelled}/cancel").status_code == 200
    ingest = start_ingest()
    dev = Device(broker.url, device_id)
    stranger = f"{uid}-stranger"
    assert c.post("/v1/devices", json={"id": stranger}).status_code == 201
    other = Device(broker.url, stranger)

    unknown_id = str(uuid.uuid4())
    bad = [
        (b"{nope", "not JSON"),
        (b'["x"]', "must be a JSON object"),
        (b'{"outcome": "complete"}', "'id' must be the message id"),
        (b'{"id": "abc", "outcome": "complete"}', "is not a message id (a UUID)"),
        (orjson.dumps({"id": done, "outcome": "done"}), "'outcome' must be 'complete' or 'reject'"),
        (orjson.dumps({"id": done, "outcome": "complete", "pad": "x" * 2000}), "exceeds 1024"),
        (orjson.dumps({"id": unknown_id, "outcome": "complete"}), "which device"),
    ]
    dev.publish_all(
        [
            orjson.dumps({"id": done, "outcome": "complete"}),
            # Upper case and without hyphens is the same UUID.
            orjson.dumps({"id": uuid.UUID(refused).hex.upper(), "outcome": "reject"}),
            orjson.dumps({"id": twice, "outcome": "complete"}),
            # A redelivery or a change of mind: the message is final, the ack is ignored.
            orjson.dumps({"id": twice, "outcome": "reject"}),
            orjson.dumps({"id": cancelled, "outcome": "complete"}),
            *(p for p, _ in bad),
        ],
        kind="c2d/ack",
    )
    # Another device cannot acknowledge this device's message.
    other.publish_all([orjson.dumps({"id": done, "outcome": "reject"})], kind="c2d/ack")

    def state(message_id: str) -> str:
        return str(c.get(f"{path}/{message_id}").json()["state"])

    wait_until(lambda: state(twice) == "completed", what="the acks to be applied")
    expected_dead = len(bad) + 1
    wait_until(
        lambda: ingest.metric("fleetline_ingest_dead_letters_total") >= expected_dead,
        what="the dead letters",
    )
    assert ingest.metric("fleetline_ingest_c2d_acks_total") == 5
    assert ingest.metric("fleetline_ingest_dead_letters_total") == expected_dead
    assert (state(done), state(refused), state(twice), state(cancelled)) == (
        "completed",
        "rejected",
        "completed",
        "cancelled",
    )
    completed = c.get(f"{path}/{done}").json()
    assert completed["finished_at"] is not None
    assert [(e["event"], e["detail"]) for e in completed["history"]] == [
        ("queued", completed["history"][0]["detail"]),
        ("completed", "the device completed it"),
    ]
    history = c.get(f"{path}/{twice}").json()["history"]
    assert [e["event"] for e in history] == ["queued", "completed"]
    assert c.get(f"{path}/{refused}").json()["history"][-1]["detail"] == "the device rejected it"

    rows = await db.fetch(
        "SELECT device_id, reason, payload, topic FROM dead_letters WHERE device_id LIKE $1",
        f"{uid}-%",
    )
    by_payload = {bytes(r["payload"]): r for r in rows}
    assert len(rows) == expected_dead
    for payload, reason in bad:
        assert reason in by_payload[payload]["reason"], (payload[:60], by_payload[payload])
        assert by_payload[payload]["topic"] == f"devices/{device_id}/c2d/ack"
    assert f"c2d ack for message {unknown_id}" in by_payload[bad[-1][0]]["reason"]
    from_stranger = [r for r in rows if r["device_id"] == stranger]
    assert len(from_stranger) == 1
    assert f"which device {stranger} does not have" in from_stranger[0]["reason"]
    assert ingest.ready()
    dev.close()
    other.close()


class _V5Inbox:
    """An MQTT 5 subscriber on devices/{id}/c2d: the payloads and message expiry."""

    def __init__(self, broker_url: str, device_id: str) -> None:
        host, port = broker_url.removeprefix("mqtt://").split(":")
        self.messages: list[tuple[dict[str, Any], int | None]] = []
        self._lock = threading.Lock()
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=paho.MQTTv5
        )
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_a: subscribed.set()

        def on_message(_c: Any, _u: Any, message: paho.MQTTMessage) -> None:
            expiry = getattr(message.properties, "MessageExpiryInterval", None)
            with self._lock:
                self.messages.append((orjson.loads(message.payload), expiry))

        self.client.on_message = on_message
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.client.subscribe(f"devices/{device_id}/c2d", qos=1)
        assert subscribed.wait(10), "no SUBACK"

    def received(self) -> list[tuple[dict[str, Any], int | None]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
async def fresh_database(admin_url: str) -> AsyncIterator[str]:
    """A database of its own: no API process's dispatcher sends from it."""
    async with migrated_database(admin_url, "fleetline_c2d") as url:
        yield url


async def test_dispatcher_rounds_resend_once_per_online_moment_and_expire(
    fresh_database: str, broker: LocalMosquitto, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two dispatchers (two API replicas) driven by hand: a message is sent once for one
    online moment whichever replica handles it, again for a later one; nothing goes to an
    offline device or without a broker connection; the sweep expires by TTL and after the
    last allowed delivery. Published with the message's remaining TTL as MQTT 5 expiry."""
    monkeypatch.setenv("FLEETLINE_DATABASE_URL", fresh_database)
    monkeypatch.setenv("FLEETLINE_MQTT_URL", broker.url)
    monkeypatch.setenv("FLEETLINE_DEVICE_KEY_SECRET", DEVICE_KEY_SECRET)
    monkeypatch.setenv("FLEETLINE_API_C2D_MAX_DELIVERIES", "3")
    monkeypatch.setenv("FLEETLINE_API_C2D_ACK_TIMEOUT_S", "0.5")
    settings = ApiSettings()
    pool = await fleetline_db.create_pool(fresh_database)
    link = BrokerLink(settings)
    runner = asyncio.create_task(link.run(), name="test.c2d.broker")
    device_id = f"{uid}-d"
    inbox = _V5Inbox(broker.url, device_id)
    try:
        while not link.connected:
            await asyncio.sleep(0.05)
        first, second = C2dDispatcher(settings, pool, link), C2dDispatcher(settings, pool, link)
        await pool.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
        message_id = uuid.uuid4()
        await pool.execute(
            "INSERT INTO c2d_messages (id, device_id, body, properties, expires_at) "
            "VALUES ($1, $2, $3::text::jsonb, $4, now() + interval '100 s')",
            message_id,
            device_id,
            '{"x": [1, 2]}',
            {"p": "v"},
        )

        async def deliveries() -> int:
            return int(
                await pool.fetchval(
                    "SELECT deliveries FROM c2d_messages WHERE id = $1", message_id
                )
            )

        async def set_online(online: bool) -> str:
            await pool.execute(
                "INSERT INTO device_activity (device_id, last_seen, online, status_changed_at) "
                "VALUES ($1, now(), $2, now()) ON CONFLICT (device_id) DO UPDATE "
                "SET online = $2, status_changed_at = now()",
                device_id,
                online,
            )
            return str(await pool.fetchval("SELECT now()::text"))

        # Not online (never seen, then offline): nothing is sent.
        await first.deliver_device(device_id, None)
        await set_online(False)
        assert not await first.sweep()
        assert await deliveries() == 0
        at = await set_online(True)
        # No broker connection: nothing is claimed.
        unlinked = C2dDispatcher(settings, pool, BrokerLink(settings))
        assert await unlinked.deliver_device(device_id, at) is False
        assert await deliveries() == 0

        # Both replicas get the notification and claim at the same moment: one sends.
        await asyncio.gather(
            first.deliver_device(device_id, at), second.deliver_device(device_id, at)
        )
        assert await deliveries() == 1
        wait_until(lambda: len(inbox.received()) == 1, what="the message")
        payload, expiry = inbox.received()[0]
        assert payload == {"id": str(message_id), "body": {"x": [1, 2]}, "properties": {"p": "v"}}
        assert expiry is not None and 95 <= expiry <= 100, expiry
        # A later online moment: sent again (by whichever replica), once.
        later = await set_online(True)
        await asyncio.gather(
            second.deliver_device(device_id, later), first.deliver_device(device_id, later)
        )
        assert await deliveries() == 2
        assert await pool.fetchval(
            "SELECT claimed_until FROM c2d_messages WHERE id = $1", message_id
        ) is None  # the lease ended with the mark
        # The ack timeout (0.5 s) passes while online: the sweep sends it the third time,
        # the last allowed; once the timeout passes again it expires.
        await asyncio.sleep(0.6)
        await first.sweep()
        assert await deliveries() == 3
        await second.deliver_device(device_id, await set_online(True))
        assert await deliveries() == 3
        await asyncio.sleep(0.6)
        await second.sweep()
        row = await pool.fetchrow(
            "SELECT state, finished_at FROM c2d_messages WHERE id = $1", message_id
        )
        assert row["state"] == "expired" and row["finished_at"] is not None
        events = await pool.fetch(
            "SELECT event, detail FROM c2d_message_events WHERE message_id = $1 ORDER BY id",
            message_id,
        )
        assert [(e["event"], e["detail"]) for e in events] == [
            ("sent", "delivery 1"),
            ("sent", "delivery 2 (the device came online again)"),
            ("sent", "delivery 3 (no acknowledgement within 0.5 s)"),
            ("expired", "no acknowledgement after 3 deliveries (the most allowed)"),
        ]
        wait_until(lambda: len(inbox.received()) == 3, what="three deliveries")

        # Time to live: expired by the sweep whether the device is online or not.
        short = uuid.uuid4()
        await pool.execute(
            "INSERT INTO c2d_messages (id, device_id, body, expires_at) "
            "VALUES ($1, $2, '1', now() - interval '1 ms')",
            short,
            device_id,
        )
        await first.sweep()
        assert (
            await pool.fetchval("SELECT state FROM c2d_messages WHERE id = $1", short) == "expired"
        )
        time.sleep(0.3)
        assert len(inbox.received()) == 3  # the expired one was never sent
    finally:
        inbox.close()
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await fleetline_db.close_pool(pool)


async def test_a_full_notify_queue_costs_no_status_of_a_device_with_messages(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto, db: asyncpg.Pool[Any],
    database_url: str, uid: str,
) -> None:
    """The online trigger notifies from ingest's batch: while PostgreSQL's NOTIFY queue is
    full, ingest quiets it (the dispatchers' sweep finds the device) rather than losing the
    status."""
    device_id = f"{uid}-quiet"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    await db.execute(
        "INSERT INTO c2d_messages (id, device_id, body, expires_at) "
        "VALUES ($1, $2, '1', now() + interval '1 hour')",
        uuid.uuid4(), device_id,
    )
    # As a full queue does: fail the commit with 54000 unless ingest has quieted its triggers.
    undo = await full_notify_queue(db, uid, "device_activity", f"NEW.device_id = '{device_id}'")
    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener("fleetline_c2d", lambda *args: heard.append(args[-1]))
    try:
        ingest = start_ingest()
        dev = Device(broker.url, device_id)
        dev.publish("online", kind="status", retain=True)
        async with asyncio.timeout(15):
            while not await db.fetchval(
                    "SELECT online FROM device_activity WHERE device_id = $1", device_id):
                await asyncio.sleep(0.1)
        dev.close()
        assert await db.fetchval(
            "SELECT count(*) FROM dead_letters WHERE device_id = $1", device_id) == 0
        assert "NOTIFY queue is full" in ingest.log_tail(200)
        await asyncio.sleep(0.5)
        assert not [h for h in heard if device_id in h]
    finally:
        await listener.close()
        await undo()


async def _eventually(
    check: Callable[[], Awaitable[Any]], *, what: str, timeout: float = 20.0
) -> Any:
    """wait_until for checks that need the event loop (a dispatcher runs in it)."""
    try:
        async with asyncio.timeout(timeout):
            while not (value := await check()):
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}") from None
    return value


async def test_a_post_while_the_notify_queue_is_full_queues_without_notifying(
    api: ApiProcess,
    make_key: Callable[..., Any],
    db: asyncpg.Pool[Any],
    database_url: str,
    uid: str,
) -> None:
    """The POST's notification is a shortcut: when the NOTIFY queue is full (54000 at
    COMMIT), the message is queued anyway, for the sweep, instead of a 500."""
    device_id, control = f"{uid}-full", f"{uid}-control"
    c = await _device(api, make_key, device_id)
    assert c.post("/v1/devices", json={"id": control}).status_code == 201
    # As a full queue does: a transaction that notifies fails at COMMIT, for this device.
    undo = await full_notify_queue(
        db, uid, "c2d_messages", f"NEW.device_id = '{device_id}'", on="INSERT",
    )
    heard: list[str] = []
    listener = await asyncpg.connect(database_url)
    await listener.add_listener("fleetline_c2d", lambda *args: heard.append(args[-1]))
    try:
        # Another device's POST notifies as usual: the listener hears POSTs.
        assert _post(c, control, {"body": 0}).status_code == 201
        await _eventually(lambda: _true(any(control in h for h in heard)), what="a notification")

        resp = _post(c, device_id, {"body": {"cmd": "x"}})
        assert resp.status_code == 201, resp.text
        message = resp.json()
        assert message["state"] == "queued"
        assert [e["event"] for e in message["history"]] == ["queued"]
        assert c.get(f"/v1/devices/{device_id}/messages/{message['id']}").json() == message
        assert (
            await db.fetchval("SELECT count(*) FROM c2d_messages WHERE device_id = $1", device_id)
            == 1
        )
        assert "NOTIFY queue is full" in api.log_tail(200)
        await asyncio.sleep(0.5)
        assert not [h for h in heard if device_id in h]
    finally:
        await listener.close()
        await undo()


async def _true(value: bool) -> bool:
    return value


@contextlib.asynccontextmanager
async def _dispatching(
    database_url: str, broker_url: str, monkeypatch: pytest.MonkeyPatch, **env: str
) -> AsyncIterator[tuple[ApiSettings, asyncpg.Pool[Any], BrokerLink]]:
    """Settings, a pool and a (not yet running) broker link for dispatchers under test."""
    monkeypatch.setenv("FLEETLINE_DATABASE_URL", database_url)
    monkeypatch.setenv("FLEETLINE_MQTT_URL", broker_url)
    monkeypatch.setenv("FLEETLINE_DEVICE_KEY_SECRET", DEVICE_KEY_SECRET)
    for name, value in env.items():
        monkeypatch.setenv(f"FLEETLINE_API_{name.upper()}", value)
    settings = ApiSettings()
    pool = await fleetline_db.create_pool(database_url)
    try:
        yield settings, pool, BrokerLink(settings)
    finally:
        await fleetline_db.close_pool(pool)


@contextlib.asynccontextmanager
async def _running(*coros: Awaitable[None]) -> AsyncIterator[None]:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _online_device(pool: asyncpg.Pool[Any], device_id: str) -> None:
    await pool.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    await pool.execute(
        "INSERT INTO device_activity (device_id, last_seen, online, status_changed_at) "
        "VALUES ($1, now(), true, now())",
        device_id,
    )


async def _queue_message(pool: asyncpg.Pool[Any], device_id: str, body: str = "1") -> uuid.UUID:
    message_id = uuid.uuid4()
    await pool.execute(
        "INSERT INTO c2d_messages (id, device_id, body, expires_at) "
        "VALUES ($1, $2, $3::text::jsonb, now() + interval '1 hour')",
        message_id,
        device_id,
        body,
    )
    return message_id


async def test_a_claim_holds_no_lock_while_publishing_so_an_early_ack_wins(
    fresh_database: str, tmp_path: Path, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker is stopped (SIGSTOP) while the dispatcher publishes: ingest's ack
    function, with a lock timeout, completes the message meanwhile. The PUBACK then
    comes while that (ingest-like) transaction is still open: the mark waits for it, and
    records the delivery without moving the message back to sent."""
    with LocalMosquitto(tmp_path / "mq") as mq:
        async with _dispatching(fresh_database, mq.url, monkeypatch) as (settings, pool, link):
            device_id = f"{uid}-d"
            await _online_device(pool, device_id)
            message_id = await _queue_message(pool, device_id)
            async with _running(link.run()):
                await _eventually(lambda: _true(link.connected), what="the broker link")
                dispatcher = C2dDispatcher(settings, pool, link)
                assert mq.pid is not None
                os.kill(mq.pid, signal.SIGSTOP)
                try:
                    delivery = asyncio.ensure_future(dispatcher.deliver_device(device_id, None))
                    await _eventually(
                        lambda: pool.fetchval(
                            "SELECT claimed_until IS NOT NULL FROM c2d_messages WHERE id = $1",
                            message_id,
                        ),
                        what="the claim",
                    )
                    async with pool.acquire() as con, con.transaction():
                        await con.execute("SET LOCAL lock_timeout = '2s'")
                        unknown = await con.fetch(
                            "SELECT * FROM fleetline_apply_c2d_acks($1, $2, $3, $4)",
                            [device_id],
                            [message_id],
                            ["complete"],
                            [datetime.now(UTC)],
                        )
                        assert unknown == []
                        assert not delivery.done()  # still waiting for the PUBACK
                        os.kill(mq.pid, signal.SIGCONT)
                        await _eventually(
                            lambda: pool.fetchval(
                                "SELECT count(*) > 0 FROM pg_stat_activity "
                                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                            ),
                            what="the mark to wait for the ack's transaction",
                        )
                        assert not delivery.done()
                finally:
                    os.kill(mq.pid, signal.SIGCONT)
                assert await asyncio.wait_for(delivery, 15) is True
            row = await pool.fetchrow("SELECT * FROM c2d_messages WHERE id = $1", message_id)
            assert row["state"] == "completed" and row["finished_at"] is not None
            assert row["deliveries"] == 1 and row["sent_at"] is not None
            assert row["claimed_until"] is None
            events = await pool.fetch(
                "SELECT event, detail FROM c2d_message_events WHERE message_id = $1 "
                "ORDER BY at, id",
                message_id,
            )
            assert [(e["event"], e["detail"]) for e in events] == [
                ("sent", "delivery 1"),
                ("completed", "the device completed it"),
            ]


async def test_notifications_taken_while_the_broker_link_is_down_are_sent_once_it_is_up(
    fresh_database: str, broker: LocalMosquitto, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device comes online and a message is queued while the API has no broker
    connection: both go out when it connects, not at the next sweep (a minute away here)
    or after the ack timeout (an hour)."""
    async with _dispatching(
        fresh_database, broker.url, monkeypatch, c2d_sweep_s="60", c2d_ack_timeout_s="3600"
    ) as (settings, pool, link):
        device_id = f"{uid}-d"
        await _online_device(pool, device_id)
        unacked = await _queue_message(pool, device_id, '"unacked"')
        await pool.execute(
            "UPDATE c2d_messages SET state = 'sent', deliveries = 1, "
            "sent_at = now() - interval '1 minute', last_sent_at = now() - interval '1 minute' "
            "WHERE id = $1",
            unacked,
        )
        inbox = _V5Inbox(broker.url, device_id)
        dispatcher = C2dDispatcher(settings, pool, link)
        try:
            async with _running(dispatcher.run()):
                fresh: uuid.UUID | None = None

                async def heard_both() -> bool:
                    nonlocal fresh
                    # The device says online again (the trigger notifies); a POST notifies.
                    await pool.execute(
                        "UPDATE device_activity SET status_changed_at = now() "
                        "WHERE device_id = $1",
                        device_id,
                    )
                    if fresh is None:
                        fresh = await _queue_message(pool, device_id, '"fresh"')
                    await pool.execute(
                        "SELECT pg_notify('fleetline_c2d', $1)",
                        orjson.dumps({"queued": device_id}).decode(),
                    )
                    await asyncio.sleep(0.2)
                    return dispatcher.pending_devices == 2

                await _eventually(heard_both, what="the notifications")
                assert inbox.received() == []
                async with _running(link.run()):
                    await _eventually(
                        lambda: _true(len(inbox.received()) == 2), what="both messages"
                    )
                    await _eventually(
                        lambda: pool.fetchval(
                            "SELECT bool_and(state = 'sent') FROM c2d_messages "
                            "WHERE device_id = $1",
                            device_id,
                        ),
                        what="both marked sent",
                    )
            assert [m["body"] for m, _expiry in inbox.received()] == ["unacked", "fresh"]
            rows = await pool.fetch(
                "SELECT id, deliveries FROM c2d_messages WHERE device_id = $1", device_id
            )
            assert {r["id"]: r["deliveries"] for r in rows} == {unacked: 2, fresh: 1}
            assert dispatcher.pending_devices == 0
        finally:
            inbox.close()
