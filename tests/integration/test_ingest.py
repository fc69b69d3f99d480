"""Ingest against the real broker and database: what goes in, what is stored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from fleetline_dev.embedded import LocalMosquitto
from tests.conftest import count_rows, wait_rows
from tests.support import Device, IngestProcess, reading, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.storage]

NOW_MS = int(time.time() * 1000)


async def test_single_reading_is_stored_with_its_types(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest()
    dev = Device(broker.url, f"{uid}-d1")
    dev.publish_all([{"ts": "2026-11-24T10:00:00.123Z",
                      "values": {"temperature": 21.5, "door_open": True, "fw": "1.2.0"}}])
    assert await wait_rows(db, uid, 3) == 3
    rows = {r["metric"]: r for r in await db.fetch(
        "SELECT * FROM readings WHERE device_id = $1", dev.device_id)}
    assert rows["temperature"]["value"] == 21.5
    assert rows["door_open"]["value"] == 1.0
    assert rows["fw"]["value"] is None and rows["fw"]["value_text"] == "1.2.0"
    assert rows["fw"]["time"] == datetime(2026, 11, 24, 10, 0, 0, 123000, tzinfo=UTC)
    dev.close()


async def test_batch_payload_and_receive_time(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest()
    dev = Device(broker.url, f"{uid}-d1")
    before = datetime.now(UTC)
    batch = [reading(NOW_MS - 1000 * i, t=float(i), h=50 + i) for i in range(50)]
    dev.publish_all([batch, {"values": {"no_ts": 7}}])
    assert await wait_rows(db, uid, 101) == 101
    received = await db.fetchval(
        "SELECT time FROM readings WHERE device_id = $1 AND metric = 'no_ts'", dev.device_id)
    assert before - timedelta(seconds=1) <= received <= datetime.now(UTC)
    dev.close()


async def test_duplicates_are_stored_once(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    ingest = start_ingest()
    dev = Device(broker.url, f"{uid}-d1")
    one = reading(NOW_MS, t=1.0)
    # The same reading three times, and again inside a batch with a new one.
    dev.publish_all([one, one, one, [one, reading(NOW_MS + 1, t=2.0)]])
    wait_until(lambda: ingest.metric("fleetline_ingest_messages_total") >= 4, what="4 messages")
    assert await count_rows(db, uid) == 2
    assert ingest.metric("fleetline_ingest_duplicate_rows_total") == 3
    dev.close()


MALFORMED = [
    (b"not json", "not JSON"),
    (b"[1, 2]", "reading[0]: a reading must be a JSON object"),
    (b'{"values": {}}', "'values' must be a non-empty object"),
    (b'{"values": {"bad name!": 1}}', "metric name 'bad name!'"),
    (b'{"ts": "yesterday", "values": {"t": 1}}', "is not an RFC 3339 time"),
    (b'{"ts": "2026-11-24T10:00:00", "values": {"t": 1}}', "has no time zone offset"),
    (orjson.dumps({"ts": NOW_MS + 3_600_000, "values": {"t": 1}}), "s ahead"),
    (b'{"ts": 1, "values": {"t": 1}}', "is older than the retention (90 days)"),
    (b'{"ts": 1e300, "values": {"t": 1}}', "is out of range"),
    (b'{"values": {"t": [1, 2]}}', "must be a number, boolean or string"),
    (b'{"values": {"t": "a\\u0000b"}}', "NUL character"),
    (b"[]", "empty batch"),
    (b'{"values": {"t": 1}}' + b" " * 3000, "exceeds 2048"),
    (b"\xff\xfe", "not JSON"),
]


async def test_malformed_messages_are_dead_lettered_with_reason(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    ingest = start_ingest(env={"FLEETLINE_INGEST_MAX_PAYLOAD_BYTES": "2048"})
    dev = Device(broker.url, f"{uid}-d1")
    dev.publish_all([payload for payload, _ in MALFORMED])
    wait_until(lambda: ingest.metric("fleetline_ingest_dead_letters_total") >= len(MALFORMED),
               what="all dead letters")
    dead = await db.fetch(
        "SELECT reason, payload, topic FROM dead_letters WHERE device_id = $1", dev.device_id)
    assert len(dead) == len(MALFORMED)
    by_payload = {bytes(r["payload"]): r["reason"] for r in dead}
    for payload, reason in MALFORMED:
        assert reason in by_payload[payload], (payload, by_payload[payload])
    assert {r["topic"] for r in dead} == {f"devices/{dev.device_id}/telemetry"}
    assert await count_rows(db, uid) == 0
    assert ingest.ready(), "a bad message must not hurt the service"
    dev.close()


async def test_every_message_on_a_device_topic_is_stored_dead_lettered_or_left_alone(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    """Nothing a device publishes under devices/ is acknowledged and then dropped: a kind
    ingest does not know is dead-lettered with the reason; what the cloud sends devices,
    and method answers (the API's), are acknowledged and left alone."""
    ingest = start_ingest()
    dev = Device(broker.url, f"{uid}-d1")
    unknown = ["telemetry/extra", "Telemetry", "foo", "twin/reported/x", "modules/./twin/reported"]
    others = ["twin/desired", "c2d", "methods/r1/req", "methods/r1/res",
              "modules/m1/twin/desired", "modules/m1/methods/r2/res"]
    dev.publish_all([b'{"values": {"t": 1}}'] * len(unknown + others), kind="telemetry")
    for kind in unknown + others:
        dev.publish_all([b'{"values": {"t": 1}}'], kind=kind)
    for bad_id in (".", ".."):
        dev.client.publish(f"devices/{bad_id}/telemetry", b'{"values": {"t": 1}}',
                           qos=1).wait_for_publish(10)
    mine = ("SELECT topic, device_id, reason FROM dead_letters "
            "WHERE topic LIKE 'devices/' || $1 || '%' OR topic IN "
            "('devices/./telemetry', 'devices/../telemetry')")
    await wait_until_async(lambda: db.fetchval(f"SELECT count(*) FROM ({mine}) d",
                                               dev.device_id), len(unknown) + 2)
    wait_until(lambda: ingest.metric('fleetline_ingest_messages_total{kind="not_ingested"}')
               >= len(others), what="the others acknowledged")
    await asyncio.sleep(0.5)  # nothing more may come of them
    dead = await db.fetch(mine, dev.device_id)
    by_topic = {r["topic"]: r for r in dead}
    assert set(by_topic) == {f"devices/{dev.device_id}/{k}" for k in unknown} | {
        "devices/./telemetry", "devices/../telemetry"}
    assert "unknown topic kind 'telemetry/extra'" in by_topic[
        f"devices/{dev.device_id}/telemetry/extra"]["reason"]
    assert "device id is not" in by_topic["devices/./telemetry"]["reason"]
    # (At least: the session's API may send devices of other tests something meanwhile.)
    assert ingest.metric("fleetline_ingest_messages_total{kind=\"not_ingested\"}") >= len(others)
    assert await count_rows(db, uid) == len(unknown + others)
    dev.close()


async def test_mixed_batch_keeps_the_valid_readings(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest(env={"FLEETLINE_INGEST_BATCH_MS": "500"})
    dev = Device(broker.url, f"{uid}-d1")
    mixed = [reading(NOW_MS, a=1), {"values": {"bad/name": 2, "b": 3}}, "oops",
             reading(NOW_MS + 1, a=4)]
    dev.publish_all([reading(NOW_MS - 5, a=0), mixed, b"{", reading(NOW_MS - 6, a=9)])
    assert await wait_rows(db, uid, 5) == 5
    await wait_until_async(
        lambda: db.fetchval("SELECT count(*) FROM dead_letters WHERE device_id = $1",
                            dev.device_id), 2)
    reasons = sorted(r["reason"] for r in await db.fetch(
        "SELECT reason FROM dead_letters WHERE device_id = $1", dev.device_id))
    assert reasons[1].startswith("reading[1]: metric name 'bad/name'")
    assert "reading[2]: a reading must be a JSON object" in reasons[1]
    assert reasons[0].startswith("not JSON")
    dev.close()


async def wait_until_async(query: Callable[[], Any], expected: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while await query() < expected:
        assert time.monotonic() < deadline, f"timed out waiting for {expected}"
        await asyncio.sleep(0.1)


async def test_status_and_last_seen(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest()
    dev = Device(broker.url, f"{uid}-d1")
    dev.publish_all([b"online"], kind="status")
    dev.publish_all([reading(NOW_MS, t=1)])

    async def status() -> Any:
        return await db.fetchrow("SELECT * FROM device_status WHERE device_id = $1",
                                 dev.device_id)

    await wait_until_async(lambda: _truthy(status()), 1)
    row = await status()
    assert row["online"] is True and row["last_seen"] is not None
    dev.publish_all([b"offline"], kind="status")
    deadline = time.monotonic() + 20
    while (await status())["online"]:
        assert time.monotonic() < deadline, "offline status was not stored"
    dev.publish_all([b"sleeping"], kind="status")
    await wait_until_async(
        lambda: db.fetchval("SELECT count(*) FROM dead_letters WHERE device_id = $1",
                            dev.device_id), 1)
    dev.close()


async def _truthy(value: Any) -> int:
    return 1 if await value else 0


async def test_mqtt_311_single_replica_mode(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest(env={"FLEETLINE_MQTT_PROTOCOL": "3.1.1"})
    dev = Device(broker.url, f"{uid}-d1")
    dev.publish_all([reading(NOW_MS + i, t=i) for i in range(20)])
    assert await wait_rows(db, uid, 20) == 20
    dev.close()


async def test_sigterm_writes_and_acknowledges_the_batch_in_flight(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    # Batches that would not be written for a minute: only the shutdown flush writes them.
    ingest = start_ingest(env={"FLEETLINE_INGEST_BATCH_MS": "60000",
                               "FLEETLINE_INGEST_BATCH_ROWS": "100000",
                               "FLEETLINE_INGEST_BATCH_MESSAGES": "60000"})
    dev = Device(broker.url, f"{uid}-d1")
    dev.publish_all([reading(NOW_MS + i, t=i) for i in range(300)])
    time.sleep(1.0)
    assert await count_rows(db, uid) == 0
    assert ingest.terminate() == 0
    assert await count_rows(db, uid) == 300
    # Acknowledged: a new replica with the same session gets nothing again.
    again = start_ingest()
    time.sleep(1.5)
    # (It takes every topic under devices/, where other tests' services may publish.)
    assert again.metric('fleetline_ingest_messages_total{kind="telemetry"}') == 0
    assert await count_rows(db, uid) == 300
    dev.close()


async def test_backpressure_pauses_reading_while_the_database_is_blocked(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    """The gauges tell the truth throughout, and a pause longer than the keepalive keeps
    the connection (a lost one would make the broker send everything again)."""
    keepalive = 2
    ingest = start_ingest(env={"FLEETLINE_INGEST_MAX_PENDING_MESSAGES": "200",
                               "FLEETLINE_INGEST_BATCH_MESSAGES": "50",
                               "FLEETLINE_MQTT_KEEPALIVE_SECONDS": str(keepalive)})
    dev = Device(broker.url, f"{uid}-d1")
    async with db.acquire() as con:
        tx = con.transaction()
        await tx.start()
        # Writes wait for this lock (reads do not): the database looks stalled to ingest.
        await con.execute("LOCK TABLE telemetry IN EXCLUSIVE MODE")
        dev.publish_all([reading(NOW_MS + i, t=i) for i in range(2000)])
        wait_until(lambda: ingest.metric("fleetline_ingest_paused") == 1, what="reads paused")
        held = ingest.metric("fleetline_ingest_pending_messages")
        assert 200 <= held < 2000, held
        # Three keepalives: twice the silence after which the broker drops a client.
        deadline = time.monotonic() + 3 * keepalive
        while time.monotonic() < deadline:
            assert ingest.metric("fleetline_ingest_mqtt_connected") == 1
            assert ingest.metric("fleetline_ingest_paused") == 1
            assert ingest.metric("fleetline_ingest_pending_messages") == held
            await asyncio.sleep(0.25)
        assert await count_rows(db, uid) == 0
        await tx.rollback()
    assert await wait_rows(db, uid, 2000) == 2000
    wait_until(lambda: ingest.metric("fleetline_ingest_paused") == 0, what="reads resumed")
    wait_until(lambda: ingest.metric("fleetline_ingest_pending_messages") == 0,
               what="nothing held")
    assert "connection lost" not in ingest.log_path.read_text()
    dev.close()


async def test_mqtt5_publish_properties_and_qos0_are_decoded(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    start_ingest()
    device_id = f"{uid}-d1"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id,
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = "application/json"
    props.UserProperty = [("fw", "1.2.3"), ("x" * 200, "y" * 300)]  # a multi-byte length
    topic = f"devices/{device_id}/telemetry"
    client.publish(topic, orjson.dumps(reading(NOW_MS, a=1.5)), qos=1,
                   properties=props).wait_for_publish(10)
    client.publish(topic, orjson.dumps(reading(NOW_MS + 1, a=2.5)), qos=0).wait_for_publish(10)
    assert await wait_rows(db, uid, 2) == 2
    values = await db.fetch("SELECT value FROM readings WHERE device_id = $1 ORDER BY time",
                            device_id)
    assert [r["value"] for r in values] == [1.5, 2.5]
    client.disconnect()
    client.loop_stop()


async def test_pending_bytes_bound_pauses_reading(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    mib = 1024 * 1024
    ingest = start_ingest(env={"FLEETLINE_INGEST_MAX_PENDING_BYTES": str(mib)})
    dev = Device(broker.url, f"{uid}-d1")
    padding = b" " * (100 * 1024)  # valid JSON: trailing white space
    async with db.acquire() as con:
        tx = con.transaction()
        await tx.start()
        await con.execute("LOCK TABLE telemetry IN EXCLUSIVE MODE")
        dev.publish_all([orjson.dumps(reading(NOW_MS + i, t=i)) + padding for i in range(40)])
        wait_until(lambda: ingest.metric("fleetline_ingest_paused") == 1, what="reads paused")
        await tx.rollback()
    assert await wait_rows(db, uid, 40) == 40
    dev.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_retained_status_replays_do_not_refresh_last_seen(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str, protocol: str,
) -> None:
    """A new session gets no retained replay on MQTT 5 (Retain Handling 2); on 3.1.1 it
    gets every retained message again, which ingest acknowledges and ignores."""
    env = {"FLEETLINE_MQTT_PROTOCOL": protocol}
    ingest = start_ingest(env=env, name=f"{uid}-a")
    dev = Device(broker.url, f"{uid}-d1")
    dev.publish(b"online", kind="status", retain=True).wait_for_publish(10)
    await wait_until_async(
        lambda: db.fetchval("SELECT count(*) FROM device_activity WHERE device_id = $1",
                            dev.device_id), 1)
    before = await db.fetchrow("SELECT * FROM device_activity WHERE device_id = $1",
                               dev.device_id)
    dev.close()
    assert ingest.terminate() == 0
    time.sleep(1.1)
    replayed = start_ingest(env=env, name=f"{uid}-b")  # a new session
    if protocol == "3.1.1":
        wait_until(lambda: replayed.metric("fleetline_ingest_batches_total") >= 1,
                   what="the replay acknowledged")
    else:
        time.sleep(1.5)  # (the consumer's own test shows no replay comes)
    after = await db.fetchrow("SELECT * FROM device_activity WHERE device_id = $1",
                              dev.device_id)
    assert after == before


async def test_reading_in_a_new_partition_with_a_half_hour_offset(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest()
    dev = Device(broker.url, f"{uid}-d1")
    # 00:15 UTC, 20 days ago: 05:45 at +05:30 is still the same UTC day's partition.
    day = (datetime.now(UTC) - timedelta(days=20)).date()
    dev.publish_all([{"ts": f"{day.isoformat()}T05:45:00+05:30", "values": {"t": 1}}])
    assert await wait_rows(db, uid, 1) == 1
    dev.close()


async def test_readings_without_ts_are_stored_once_across_a_broker_restart_mid_write(
    start_ingest: Callable[..., IngestProcess], db: asyncpg.Pool[Any], uid: str,
    tmp_path: Any,
) -> None:
    with LocalMosquitto(tmp_path / "mq") as mq:
        ingest = start_ingest(mqtt_url=mq.url, env={"FLEETLINE_INGEST_SHARE_GROUP": ""})
        dev = Device(mq.url, f"{uid}-d1", persistent=True)
        async with db.acquire() as con:
            tx = con.transaction()
            await tx.start()
            await con.execute("LOCK TABLE telemetry IN EXCLUSIVE MODE")
            dev.publish_all([{"values": {"n": i}} for i in range(200)])
            # Received, in a batch whose write waits on the lock; then the connection goes.
            wait_until(lambda: ingest.metric("fleetline_ingest_pending_messages") >= 200,
                       what="batch sealed")
            mq.stop()
            mq.start()
            wait_until(lambda: ingest.metric("fleetline_ingest_mqtt_connected") == 1,
                       what="ingest reconnected")
            time.sleep(0.5)
            await tx.rollback()
        assert await wait_rows(db, uid, 200) == 200
        time.sleep(1.0)
        assert await count_rows(db, uid) == 200
        values = await db.fetch("SELECT DISTINCT value FROM readings WHERE device_id = $1",
                                dev.device_id)
        assert len(values) == 200
        dev.close()
