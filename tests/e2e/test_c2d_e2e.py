"""Cloud-to-device messages end to end: the API (its dispatcher), ingest (status and
acks) and paho devices on the real broker. A message queued while its device is
offline is delivered when the device comes online and completed by its ack; one whose
time to live runs out first expires; a device that went away without acknowledging gets
the message again when it comes back."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import paho.mqtt.client as paho
import pytest

from fleetline.settings import parse_mqtt_url
from fleetline_dev.embedded import LocalMosquitto
from fleetline_dev.simulator import device_ids, run_fleet
from tests.integration.test_api import client
from tests.support import ApiProcess, Device, IngestProcess, wait_until

pytestmark = pytest.mark.integration


class C2dDevice:
    """A device as docs/protocol.md asks: it subscribes to devices/{id}/c2d,
    then publishes ``online``; it answers each message with ``outcome`` (None: never),
    and keeps what it received."""

    def __init__(self, broker_url: str, device_id: str, *, outcome: str | None) -> None:
        self.device_id = device_id
        self.outcome = outcome
        self._lock = threading.Lock()
        self._received: list[dict[str, Any]] = []
        self.device = Device(broker_url, device_id)
        c = self.device.client
        subscribed = threading.Event()
        c.on_subscribe = lambda *_a: subscribed.set()

        def on_message(_c: Any, _u: Any, message: paho.MQTTMessage) -> None:
            doc = orjson.loads(message.payload)
            with self._lock:
                self._received.append(doc)
            if self.outcome is not None:
                ack = {"id": doc["id"], "outcome": self.outcome}
                c.publish(f"devices/{device_id}/c2d/ack", orjson.dumps(ack), qos=1)

        c.on_message = on_message
        c.subscribe(f"devices/{device_id}/c2d", qos=1)
        assert subscribed.wait(10), "the device's subscription was not acknowledged"
        self.device.publish(b"online", kind="status").wait_for_publish(10)

    @property
    def received(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._received)

    def go_offline(self) -> None:
        """Say offline (the broker would publish the Last Will) and disconnect."""
        self.device.publish(b"offline", kind="status").wait_for_publish(10)
        self.device.close()


@pytest.fixture
def c2d_devices(broker: LocalMosquitto) -> Iterator[Callable[..., C2dDevice]]:
    made: list[C2dDevice] = []

    def make(device_id: str, *, outcome: str | None = "complete") -> C2dDevice:
        made.append(C2dDevice(broker.url, device_id, outcome=outcome))
        return made[-1]

    yield make
    for dev in made:
        if dev.device.connected.is_set():
            dev.device.close()


@pytest.fixture
async def offline_afterwards(db: asyncpg.Pool[Any]) -> Any:
    """Devices marked offline after the test: no other test may find them "online"."""
    ids: list[str] = []
    yield ids
    await db.execute("UPDATE device_activity SET online = false WHERE device_id = ANY($1)", ids)


async def _register(api: ApiProcess, make_key: Callable[..., Any], device_id: str) -> httpx.Client:
    c = client(api, await make_key("devices:read", "devices:write", "commands:write"))
    assert c.post("/v1/devices", json={"id": device_id}).status_code == 201
    return c


def _message(c: httpx.Client, device_id: str, message_id: str) -> dict[str, Any]:
    resp = c.get(f"/v1/devices/{device_id}/messages/{message_id}")
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


def _wait_state(c: httpx.Client, device_id: str, message_id: str, state: str) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: (m := _message(c, device_id, message_id))["state"] == state and m,
        timeout=30,
        what=f"message {message_id} to be {state}",
    )
    return found


def _ts(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _events(message: dict[str, Any]) -> list[str]:
    return [e["event"] for e in message["history"]]


async def test_queued_while_offline_delivered_on_connect_and_completed_by_ack(
    api: ApiProcess,
    make_key: Callable[..., Any],
    start_ingest: Callable[..., IngestProcess],
    c2d_devices: Callable[..., C2dDevice],
    offline_afterwards: list[str],
    uid: str,
) -> None:
    ingest = start_ingest()
    device_id = f"{uid}-d"
    offline_afterwards.append(device_id)
    c = await _register(api, make_key, device_id)
    posted = [
        c.post(
            f"/v1/devices/{device_id}/messages",
            json={"body": {"cmd": "open", "n": n}, "properties": {"kind": "valve"}},
        )
        for n in range(3)
    ]
    assert [p.status_code for p in posted] == [201] * 3
    ids = [p.json()["id"] for p in posted]
    time.sleep(1.5)  # a sweep or more: nothing goes to a device that is not online
    assert all(_message(c, device_id, i)["state"] == "queued" for i in ids)

    dev = c2d_devices(device_id)
    for message_id in ids:
        done = _wait_state(c, device_id, message_id, "completed")
        assert _events(done) == ["queued", "sent", "completed"]
        assert done["deliveries"] == 1 and done["sent_at"] is not None
        assert done["history"][1]["detail"] == "delivery 1"
        assert _ts(done["finished_at"]) >= _ts(done["sent_at"])
    # What the device got, in the order queued, as docs/protocol.md has it.
    assert dev.received == [
        {"id": i, "body": {"cmd": "open", "n": n}, "properties": {"kind": "valve"}}
        for n, i in enumerate(ids)
    ]
    # Queued while online: sent at once.
    live = c.post(f"/v1/devices/{device_id}/messages", json={"body": "now"}).json()
    done = _wait_state(c, device_id, live["id"], "completed")
    assert dev.received[-1] == {"id": live["id"], "body": "now", "properties": {}}
    assert ingest.metric("fleetline_ingest_c2d_acks_total") == 4
    assert api.metric("fleetline_api_c2d_messages_total") > 0
    dev.go_offline()


async def test_a_message_whose_ttl_runs_out_while_offline_expires(
    api: ApiProcess,
    make_key: Callable[..., Any],
    start_ingest: Callable[..., IngestProcess],
    c2d_devices: Callable[..., C2dDevice],
    offline_afterwards: list[str],
    uid: str,
) -> None:
    start_ingest()
    device_id = f"{uid}-d"
    offline_afterwards.append(device_id)
    c = await _register(api, make_key, device_id)
    short = c.post(f"/v1/devices/{device_id}/messages", json={"body": "stale", "ttl_s": 2})
    assert short.status_code == 201
    kept = c.post(f"/v1/devices/{device_id}/messages", json={"body": "fresh"}).json()
    expired = _wait_state(c, device_id, short.json()["id"], "expired")
    assert _events(expired) == ["queued", "expired"]
    assert "ran out before the device was online" in expired["history"][1]["detail"]
    assert expired["deliveries"] == 0 and expired["finished_at"] is not None
    assert _ts(expired["finished_at"]) >= _ts(expired["expires_at"])

    # The device comes online: it gets the live message only.
    dev = c2d_devices(device_id)
    _wait_state(c, device_id, kept["id"], "completed")
    time.sleep(1.0)
    assert [m["body"] for m in dev.received] == ["fresh"]
    assert _message(c, device_id, short.json()["id"])["state"] == "expired"
    listed = c.get(f"/v1/devices/{device_id}/messages", params={"state": "expired"}).json()
    assert [m["id"] for m in listed["items"]] == [short.json()["id"]]
    dev.go_offline()


async def test_a_reject_ack_rejects_the_message(
    api: ApiProcess,
    make_key: Callable[..., Any],
    start_ingest: Callable[..., IngestProcess],
    c2d_devices: Callable[..., C2dDevice],
    offline_afterwards: list[str],
    uid: str,
) -> None:
    start_ingest()
    device_id = f"{uid}-d"
    offline_afterwards.append(device_id)
    c = await _register(api, make_key, device_id)
    dev = c2d_devices(device_id, outcome="reject")
    # The device is online once ingest has stored its status; then the message goes at once.
    posted = c.post(f"/v1/devices/{device_id}/messages", json={"body": {"fw": "9.9"}}).json()
    rejected = _wait_state(c, device_id, posted["id"], "rejected")
    assert _events(rejected) == ["queued", "sent", "rejected"]
    assert rejected["history"][-1]["detail"] == "the device rejected it"
    assert [m["id"] for m in dev.received] == [posted["id"]]
    dev.go_offline()


async def test_a_device_that_left_without_acking_gets_the_message_again_on_reconnect(
    api: ApiProcess,
    make_key: Callable[..., Any],
    start_ingest: Callable[..., IngestProcess],
    c2d_devices: Callable[..., C2dDevice],
    offline_afterwards: list[str],
    uid: str,
) -> None:
    start_ingest()
    device_id = f"{uid}-d"
    offline_afterwards.append(device_id)
    c = await _register(api, make_key, device_id)
    message_id = c.post(
        f"/v1/devices/{device_id}/messages", json={"body": {"cmd": "reboot"}}
    ).json()["id"]

    silent = c2d_devices(device_id, outcome=None)  # receives, never acknowledges
    wait_until(lambda: silent.received, what="the first delivery")
    # Marked sent after the broker's PUBACK (which may come after the device has it).
    _wait_state(c, device_id, message_id, "sent")
    silent.go_offline()
    time.sleep(1.0)
    assert _message(c, device_id, message_id)["deliveries"] == 1  # nothing sent while away

    # Back with a clean session: the message comes again, with the same id.
    back = c2d_devices(device_id)
    done = _wait_state(c, device_id, message_id, "completed")
    assert [m["id"] for m in back.received] == [message_id]
    assert _events(done) == ["queued", "sent", "sent", "completed"]
    assert done["deliveries"] == 2
    assert done["history"][2]["detail"] == "delivery 2 (the device came online again)"
    back.go_offline()


async def test_unacked_messages_are_resent_then_expire_and_two_replicas_send_once(
    api: ApiProcess,
    make_key: Callable[..., Any],
    database_url: str,
    broker: LocalMosquitto,
    artifacts: Path,
    start_ingest: Callable[..., IngestProcess],
    c2d_devices: Callable[..., C2dDevice],
    offline_afterwards: list[str],
    uid: str,
) -> None:
    """A second API replica with a short ack timeout beside the session's: a message is
    sent once when the device comes online (both replicas hear of it), then re-sent while
    unacknowledged, at most FLEETLINE_API_C2D_MAX_DELIVERIES times, then it expires."""
    start_ingest()
    replica = ApiProcess(
        database_url=database_url,
        mqtt_url=broker.url,
        log_dir=artifacts,
        name=f"{uid}-replica",
        env={"FLEETLINE_API_C2D_ACK_TIMEOUT_S": "2", "FLEETLINE_API_C2D_MAX_DELIVERIES": "3",
             # A message sent again 2.0-2.2 s after it went, not 2-3 s.
             "FLEETLINE_API_C2D_SWEEP_S": "0.2"},
    )
    replica.start()
    try:
        device_id = f"{uid}-d"
        offline_afterwards.append(device_id)
        c = await _register(api, make_key, device_id)
        acked = c.post(f"/v1/devices/{device_id}/messages", json={"body": 1}).json()["id"]
        dev = c2d_devices(device_id)
        _wait_state(c, device_id, acked, "completed")
        time.sleep(2.5)  # longer than the replica's ack timeout and its next sweep
        assert [m["id"] for m in dev.received] == [acked]  # once, by one replica
        assert _message(c, device_id, acked)["deliveries"] == 1
        dev.go_offline()

        other_id = f"{uid}-silent"
        offline_afterwards.append(other_id)
        r = await _register(replica, make_key, other_id)
        ignored = r.post(f"/v1/devices/{other_id}/messages", json={"body": 2}).json()["id"]
        silent = c2d_devices(other_id, outcome=None)
        expired = _wait_state(r, other_id, ignored, "expired")
        assert _events(expired) == ["queued", "sent", "sent", "sent", "expired"]
        assert expired["deliveries"] == 3
        assert expired["history"][2]["detail"] == (
            "delivery 2 (no acknowledgement within 2 s)"
        )
        assert expired["history"][-1]["detail"] == (
            "no acknowledgement after 3 deliveries (the most allowed)"
        )
        assert [m["id"] for m in silent.received] == [ignored] * 3
        silent.go_offline()
    finally:
        replica.stop()


async def test_the_simulator_completes_messages(
    api: ApiProcess,
    make_key: Callable[..., Any],
    broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess],
    offline_afterwards: list[str],
    uid: str,
) -> None:
    """`fleetline up`'s simulated devices take C2D messages and complete them."""
    start_ingest()
    prefix = f"{uid}-sim-"
    [device_id] = device_ids(1, prefix)
    offline_afterwards.append(device_id)
    c = await _register(api, make_key, device_id)
    queued = c.post(f"/v1/devices/{device_id}/messages", json={"body": "before"}).json()
    stop = asyncio.Event()
    fleet = asyncio.create_task(
        run_fleet(parse_mqtt_url(broker.url), devices=1, interval_seconds=0.5, prefix=prefix,
                  stop=stop),
        name="test.simulator",
    )
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        for message_id in (queued["id"], None):
            if message_id is None:  # and one sent while it is online
                message_id = c.post(
                    f"/v1/devices/{device_id}/messages", json={"body": {"later": True}}
                ).json()["id"]
            while _message(c, device_id, message_id)["state"] != "completed":
                assert loop.time() < deadline, f"message {message_id} was not completed"
                await asyncio.sleep(0.2)
            assert _events(_message(c, device_id, message_id)) == ["queued", "sent", "completed"]
    finally:
        stop.set()
        await asyncio.wait_for(fleet, 20)
