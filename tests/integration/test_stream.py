"""/v1/stream: readings written by the real ingest reach WebSocket clients once stored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from fleetline.embedded import LocalMosquitto
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
    api: ApiProcess, make_key: Callable[..., Any]
) -> None:
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


async def test_ingest_announces_batches_only_while_someone_listens(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto, db: asyncpg.Pool[Any],
    database_url: str, uid: str,
) -> None:
    start_ingest()
    device_id = f"{uid}-quiet"
    heard: list[str] = []
    con = await asyncpg.connect(database_url)
    await con.add_listener("fleetline_stream",
                           lambda *args: heard.append(args[3]) if device_id in args[3] else None)
    dev = Device(broker.url, device_id)
    try:
        # Another test's API may still hold a presence row; this test's own is the only
        # one that counts, so start from none.
        await db.execute("DELETE FROM stream_listeners")
        await asyncio.sleep(1.5)  # ingest polls presence every second
        dev.publish_all([{"values": {"v": 1}}])
        await asyncio.sleep(1.0)
        assert await db.fetchval(
            "SELECT count(*) FROM readings WHERE device_id = $1", device_id) == 1
        assert heard == []
        await db.execute("INSERT INTO stream_listeners VALUES ($1, now() + interval '1 minute')",
                         uid)
        await asyncio.sleep(1.5)
        dev.publish_all([{"values": {"v": 2}}])
        async with asyncio.timeout(10):
            while not heard:
                await asyncio.sleep(0.05)
        assert '"v":2' in heard[0]
    finally:
        dev.close()
        await db.execute("DELETE FROM stream_listeners WHERE listener_id = $1", uid)
        await con.close()


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
