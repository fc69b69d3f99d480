"""/v1/stream: readings written by the real ingest reach WebSocket clients once stored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import paho.mqtt.client as paho
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fleetline import streamevents
from fleetline_dev.embedded import LocalMosquitto
from tests.support import ApiProcess, Device, IngestProcess

pytestmark = pytest.mark.integration


def ws_url(api: ApiProcess, **params: Any) -> str:
    from urllib.parse import urlencode

    query = urlencode(params, doseq=True)
    return f"ws://127.0.0.1:{api.port}/v1/stream" + (f"?{query}" if query else "")


async def subscribed(ws: ClientConnection) -> dict[str, Any]:
    first: dict[str, Any] = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    assert first["type"] == "subscribed", first
    return first


async def next_events(ws: ClientConnection, count: int, timeout: float = 15) -> list[Any]:
    events: list[Any] = []
    async with asyncio.timeout(timeout):
        while len(events) < count:
            events.append(orjson.loads(await ws.recv()))
    return events


async def close_code(ws: ClientConnection, timeout: float = 10) -> tuple[int | None, str]:
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, "the server closed without a close frame"
        return exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("unreachable")


async def test_stream_sends_stored_readings_and_status_filtered_by_device_and_metric(
    api: ApiProcess, make_key: Callable[..., Any], start_ingest: Callable[..., IngestProcess],
    broker: LocalMosquitto, db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest()
    mine, other, unregistered = f"{uid}-a", f"{uid}-b", f"{uid}-u"
    await db.execute("INSERT INTO devices (id, tags) SELECT unnest($1::text[]), $2::jsonb",
                     [mine, other], '{"site": "A"}')
    token = await make_key("telemetry:read")
    headers = {"Authorization": f"Bearer {token}"}
    async with connect(ws_url(api, device=[mine, unregistered], metric="temp"),
                       additional_headers=headers) as ws_one, \
            connect(ws_url(api, tag="site=A"), additional_headers=headers) as ws_site:
        hello = await subscribed(ws_one)
        assert hello["devices"] == sorted([mine, unregistered]) and hello["metrics"] == ["temp"]
        await subscribed(ws_site)
        devices = {d: Device(broker.url, d) for d in (mine, other, unregistered)}
        ts = int(time.time() * 1000)
        for dev in devices.values():
            dev.publish_all([{"ts": ts, "values": {"temp": 21.5, "hum": 40, "fw": "1.2"}}])
        devices[mine].publish(b"online", kind="status")

        one = await next_events(ws_one, 2)
        telemetry = next(e for e in one if e["type"] == "telemetry")
        assert telemetry["device_id"] == mine and telemetry["values"] == {"temp": 21.5}
        assert telemetry["ts"].endswith("Z")
        status = next(e for e in one if e["type"] == "status")
        assert status["device_id"] == mine and status["online"] is True
        # The readings are in the database by the time they are announced.
        assert await db.fetchval(
            "SELECT count(*) FROM readings WHERE device_id = $1", mine) == 3

        site = await next_events(ws_site, 3)
        seen = {(e["device_id"], e["type"]) for e in site}
        assert seen == {(mine, "telemetry"), (other, "telemetry"), (mine, "status")}
        full = next(e for e in site if e["device_id"] == other)
        assert full["values"] == {"temp": 21.5, "hum": 40, "fw": "1.2"}
        # Nothing from the unregistered device, on either stream.
        with pytest.raises(TimeoutError):
            await next_events(ws_one, 1, timeout=1.5)
        for dev in devices.values():
            dev.close()


async def test_stream_authentication_and_bad_parameters(
    api: ApiProcess, make_key: Callable[..., Any], start_ingest: Callable[..., IngestProcess],
) -> None:
    # Ingest answers the API's presence, as it does wherever the API runs: a client is
    # subscribed once it has, not after the API's wait for an answer (5 s) ran out.
    start_ingest()
    async with connect(ws_url(api)) as ws:
        assert (await close_code(ws))[0] == 4401
    async with connect(ws_url(api), additional_headers={"Authorization": "Bearer flk_x"}) as ws:
        assert (await close_code(ws))[0] == 4401
    reader = await make_key("devices:read")
    async with connect(ws_url(api), additional_headers={"Authorization": f"Bearer {reader}"}) as ws:
        code, reason = await close_code(ws)
        assert code == 4403 and "telemetry:read" in reason
    # Browsers pass the key as a subprotocol; the server answers with fleetline.v1.
    token = await make_key("telemetry:read")
    async with connect(ws_url(api), subprotocols=["fleetline.v1", f"bearer.{token}"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "fleetline.v1"
        await subscribed(ws)
    headers = {"Authorization": f"Bearer {token}"}
    for bad in ({"events": "alarms"}, {"device": "bad id"}, {"tag": "noequals"}):
        try:
            async with connect(ws_url(api, **bad), additional_headers=headers) as ws:
                assert (await close_code(ws))[0] == 1008, bad
        except InvalidStatus as exc:  # refused before the handshake completes
            assert exc.response.status_code == 403, bad


async def test_a_client_that_falls_behind_is_dropped_with_1013(
    make_key: Callable[..., Any], start_ingest: Callable[..., IngestProcess],
    broker: LocalMosquitto, db: asyncpg.Pool[Any], database_url: str, artifacts: Path, uid: str,
) -> None:
    small = ApiProcess(database_url=database_url, mqtt_url=broker.url, log_dir=artifacts,
                       name=f"{uid}-small", env={"FLEETLINE_API_STREAM_QUEUE_SIZE": "10"})
    small.start()
    try:
        start_ingest()
        device_id = f"{uid}-fast"
        await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
        token = await make_key("telemetry:read")
        async with connect(ws_url(small, device=device_id),
                           additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            await subscribed(ws)
            dev = Device(broker.url, device_id)
            ts = int(time.time() * 1000) - 10_000
            # One message of 500 readings: one batch, 500 events at once for a queue of 10.
            dev.publish_all([[{"ts": ts + i, "values": {"v": i}} for i in range(500)]])
            code, reason = await close_code(ws)
            assert code == 1013 and "too slow" in reason
            dev.close()
        assert small.metric("fleetline_api_stream_dropped_clients_total") >= 1
        # The API process is unharmed and serves the next client.
        headers = {"Authorization": f"Bearer {token}"}
        async with connect(ws_url(small), additional_headers=headers) as ws:
            await subscribed(ws)
    finally:
        small.stop()


class Service:
    """A backend MQTT client (MQTT 5): what ingest and the API see of the stream's topics."""

    def __init__(self, broker: LocalMosquitto, client_id: str, *topics: str) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=paho.MQTTv5)
        self.client.on_message = lambda _c, _u, m: self.messages.append(
            (m.topic, m.payload, m.retain))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        for topic in topics:
            self.client.subscribe(topic, qos=1)
        self.publish("fleetline/test/ping", b"")  # once through, the subscriptions hold

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        assert info.is_published()

    def events(self, publisher: str) -> list[dict[str, Any]]:
        """The events ``publisher`` published, checking its sequence has no gap."""
        read = [streamevents.read_message(p) for t, p, _ in list(self.messages)
                if t == "fleetline/stream/events"]
        assert None not in read
        mine = [m for m in read if m is not None and m[0] == publisher]
        seqs = [seq for _, seq, _ in mine]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) if seqs else True, seqs
        return [e for _, _, events in mine for e in events]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_ingest_publishes_stored_batches_only_while_someone_listens(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto, db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    ingest = start_ingest()
    # Other tests' API processes withdraw their presence when they stop; this test's own
    # presence is the only one that counts, so clear whatever is retained.
    old = Service(broker, f"{uid}-old", "fleetline/stream/listeners/+")
    await asyncio.sleep(0.3)
    for topic, _, retained in list(old.messages):
        if retained:
            old.publish(topic, b"", retain=True)
    old.close()
    watcher = Service(broker, f"{uid}-watch", "fleetline/stream/events",
                      f"fleetline/stream/heard/{uid}")
    device_id = f"{uid}-quiet"
    dev = Device(broker.url, device_id)
    publisher = f"test-ingest-{uid}"  # the test ingest's client id (tests/support.py)

    async def stored(v: int) -> None:
        async with asyncio.timeout(15):
            while not await db.fetchval(
                    "SELECT count(*) FROM readings WHERE device_id = $1 AND value = $2",
                    device_id, v):
                await asyncio.sleep(0.05)

    try:
        dev.publish_all([{"values": {"v": 1}}])
        await stored(1)
        await asyncio.sleep(0.5)
        assert watcher.events(publisher) == []
        # A listener appears: ingest answers it, then publishes what it stores.
        watcher.publish(f"fleetline/stream/listeners/{uid}", b"1", retain=True)
        async with asyncio.timeout(10):
            while not (answers := [p for t, p, _ in list(watcher.messages)
                                   if t.endswith(f"/heard/{uid}")]):
                await asyncio.sleep(0.05)
        answer = streamevents.read_heard(answers[0])
        assert answer is not None and answer[0] == publisher and answer[2] == "1"
        dev.publish_all([{"values": {"v": 2}}])
        dev.publish(b"online", kind="status")
        async with asyncio.timeout(10):
            while len(watcher.events(publisher)) < 2:
                await asyncio.sleep(0.05)
        telemetry, status = watcher.events(publisher)
        assert telemetry["device_id"] == device_id and telemetry["values"] == {"v": 2}
        assert status["type"] == "status" and status["online"] is True
        assert ingest.metric("fleetline_ingest_stream_listeners") >= 1
        # Withdrawn (an empty retained message): nothing more is published.
        watcher.publish(f"fleetline/stream/listeners/{uid}", b"", retain=True)
        await asyncio.sleep(0.3)
        dev.publish_all([{"values": {"v": 3}}])
        await stored(3)
        await asyncio.sleep(0.5)
        assert len(watcher.events(publisher)) == 2
    finally:
        dev.close()
        watcher.publish(f"fleetline/stream/listeners/{uid}", b"", retain=True)
        watcher.close()


async def test_events_lost_on_the_way_close_the_stream_with_1013(
    api: ApiProcess, make_key: Callable[..., Any], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], start_ingest: Callable[..., IngestProcess], uid: str,
) -> None:
    # Ingest answers the API's presence (with the numbers of its own messages, not the
    # stand-in publisher's below): each client is subscribed without waiting out the
    # API's wait for an answer (5 s).
    start_ingest()
    device_id = f"{uid}-gap"
    await db.execute("INSERT INTO devices (id) VALUES ($1)", device_id)
    token = await make_key("telemetry:read")
    publisher = Service(broker, f"{uid}-pub")

    def message(seq: int) -> bytes:
        row = [device_id, "v", "2026-01-01T00:00:00Z", seq, None]
        return orjson.dumps({"publisher": uid, "seq": seq, "rows": [row], "status": []})

    try:
        async with connect(ws_url(api, device=device_id),
                           additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            await subscribed(ws)
            for seq in (7, 8):
                publisher.publish("fleetline/stream/events", message(seq))
            assert [e["values"]["v"] for e in await next_events(ws, 2)] == [7, 8]
            publisher.publish("fleetline/stream/events", b"not json")  # ignored
            publisher.publish("fleetline/stream/events", message(10))  # 9 never came
            code, reason = await close_code(ws)
            assert code == 1013 and "missed events" in reason
        # Messages passed over while no client listened are no gap for the next client.
        for seq in (11, 12):
            publisher.publish("fleetline/stream/events", message(seq))
        async with connect(ws_url(api, device=device_id),
                           additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            await subscribed(ws)
            publisher.publish("fleetline/stream/events", message(20))
            assert [e["values"]["v"] for e in await next_events(ws, 1)] == [20]
            with pytest.raises(TimeoutError):
                await next_events(ws, 1, timeout=1)
            # A publisher counting from 0 again started again: what it held may be lost.
            publisher.publish("fleetline/stream/events", message(0))
            code, reason = await close_code(ws)
            assert code == 1013 and "missed events" in reason
        assert api.metric('fleetline_api_stream_dropped_clients_total{reason="gap"}') >= 1
    finally:
        publisher.close()


async def test_a_full_notify_queue_costs_announcements_not_rows(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto, db: asyncpg.Pool[Any],
    uid: str,
) -> None:
    device_id = f"{uid}-full"
    # PostgreSQL raises "too many notifications in the NOTIFY queue" (54000) at COMMIT;
    # a deferred trigger raises the same at the first commit touching this device.
    seq, fn, trigger = (f'"{uid}-{name}"' for name in ("seq", "fn", "trg"))
    await db.execute(f"""
        CREATE SEQUENCE {seq};
        CREATE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.device_id = '{device_id}' AND nextval('{seq}') = 1 THEN
                RAISE EXCEPTION 'too many notifications in the NOTIFY queue'
                    USING ERRCODE = '54000';
            END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER {trigger} AFTER INSERT OR UPDATE ON device_activity
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {fn}();
    """)
    try:
        ingest = start_ingest()
        dev = Device(broker.url, device_id)
        dev.publish_all([{"values": {"v": i}} for i in range(5)])
        async with asyncio.timeout(15):
            while await db.fetchval(
                    "SELECT count(*) FROM readings WHERE device_id = $1", device_id) < 5:
                await asyncio.sleep(0.1)
        dev.close()
        assert await db.fetchval(
            "SELECT count(*) FROM dead_letters WHERE device_id = $1", device_id) == 0
        assert ingest.metric("fleetline_ingest_write_errors_total") >= 1
        assert "NOTIFY queue is full" in ingest.log_tail(200)
    finally:
        await db.execute(f"DROP TRIGGER {trigger} ON device_activity; DROP FUNCTION {fn}();"
                         f" DROP SEQUENCE {seq}")
