"""Rollups: readings_1m and readings_1h equal the raw aggregates, on plain PostgreSQL
(tables kept as readings are written) and on TimescaleDB (continuous aggregates, once
their refresh has run for readings written into minutes already materialized)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from fleetline_dev.embedded import LocalMosquitto
from tests.conftest import wait_rows
from tests.support import Device, IngestProcess, settle_rollups

pytestmark = pytest.mark.integration

RAW = """
SELECT date_bin($2::text::interval, time, TIMESTAMPTZ '2000-01-01 00:00+00') AS bucket,
       device_id, metric, avg(value) AS avg, min(value) AS min, max(value) AS max,
       count(*) AS count,
       (array_agg(value ORDER BY time DESC) FILTER (WHERE value IS NOT NULL))[1] AS last
FROM readings WHERE device_id LIKE $1 || '%'
GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
"""
ROLLED = """
SELECT bucket, device_id, metric, avg, min, max, count, last FROM {view}
WHERE device_id LIKE $1 || '%' ORDER BY 1, 2, 3
"""


async def assert_rollups_equal_raw(db: asyncpg.Pool[Any], prefix: str) -> int:
    compared = 0
    await settle_rollups(db)
    for view, width in (("readings_1m", "1 minute"), ("readings_1h", "1 hour")):
        raw = [dict(r) for r in await db.fetch(RAW, prefix, width)]
        rolled = [dict(r) for r in await db.fetch(ROLLED.format(view=view), prefix)]
        assert len(rolled) == len(raw) > 0, (view, len(rolled), len(raw))
        for want, got in zip(raw, rolled, strict=True):
            avg_want, avg_got = want.pop("avg"), got.pop("avg")
            assert got == want, view
            assert (avg_want is None and avg_got is None) or math.isclose(avg_got, avg_want)
        compared += len(raw)
    return compared


@pytest.mark.storage
async def test_rollups_equal_raw_including_late_text_and_duplicate_readings(
    db: asyncpg.Pool[Any], uid: str
) -> None:
    base = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=5)
    ids = {}
    for device in ("a", "b"):
        for metric in ("temp", "state"):
            ids[device, metric] = await db.fetchval(
                "INSERT INTO series (device_id, metric) VALUES ($1, $2) RETURNING id",
                f"{uid}-{device}", metric)
    rows = []
    for i in range(600):  # 4 hours, a reading every 24 s per series
        ts = base + timedelta(seconds=24 * i)
        for (device, metric), sid in ids.items():
            if metric == "state":
                rows.append((sid, ts, None, "open" if i % 3 else "shut"))
            else:
                rows.append((sid, ts, float((i * 37 + ord(device)) % 101) - 50.0, None))
    # In statements of several sizes, as batches arrive.
    for start, size in ((0, 1), (1, 7), (8, 500), (508, len(rows) - 508)):
        await db.executemany(
            "INSERT INTO telemetry (series_id, ts, value, value_text) VALUES ($1, $2, $3, $4)",
            rows[start:start + size])
    assert await assert_rollups_equal_raw(db, uid) > 0
    # Late readings into an old hour, one earlier than its minute's last value (it must
    # not become `last`) and two later, plus a re-sent one (stored once, counted once).
    sid = ids["a", "temp"]
    late = [(sid, base + timedelta(minutes=7, seconds=s), 1000.0 + s, None) for s in (1, 50, 55)]
    async with db.acquire() as con:
        await con.copy_records_to_table("telemetry", records=late,
                                        columns=["series_id", "ts", "value", "value_text"])
        await con.execute(
            "INSERT INTO telemetry (series_id, ts, value) VALUES ($1, $2, 5) ON CONFLICT DO "
            "NOTHING", sid, base)
    assert await assert_rollups_equal_raw(db, uid) > 0
    peak = await db.fetchval(
        "SELECT max FROM readings_1h WHERE device_id = $1 AND metric = 'temp' AND bucket = $2",
        f"{uid}-a", base)
    assert peak == 1055.0


@pytest.mark.storage
async def test_ingest_keeps_rollups_current(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    start_ingest()
    base = datetime.now(UTC) - timedelta(hours=3)
    dev = Device(broker.url, f"{uid}-d")
    dev.publish_all([{"ts": (base + timedelta(seconds=30 * i)).isoformat(),
                      "values": {"t": i % 13, "fw": "1.0"}} for i in range(300)])
    assert await wait_rows(db, uid, 600) == 600
    # Committed readings are in their rollups at once on plain PostgreSQL, after the
    # refresh on TimescaleDB (settle_rollups).
    assert await assert_rollups_equal_raw(db, uid) > 0
    dev.close()


async def test_concurrent_writers_into_one_minute_both_count_and_a_rollback_adds_nothing(
    db: asyncpg.Pool[Any], uid: str
) -> None:
    """Two transactions writing into the same minutes (two ingest writers or replicas)
    take the rollup rows in one order: the second waits for the first, no deadlock, and
    both are counted; a transaction that rolls back leaves the rollups as they were.
    Plain PostgreSQL only: TimescaleDB's writers share no rollup rows."""
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=2)
    sids = [await db.fetchval(
        "INSERT INTO series (device_id, metric) VALUES ($1, $2) RETURNING id", f"{uid}-c", m)
        for m in ("x", "y")]
    insert = "INSERT INTO telemetry (series_id, ts, value) SELECT unnest($1::int[]), $2, $3"
    async with db.acquire() as first, db.acquire() as second:
        tx1, tx2 = first.transaction(), second.transaction()
        await tx1.start()
        await tx2.start()
        await first.execute(insert, sids, minute + timedelta(seconds=1), 1.0)
        # The second writes the same series in the other order, into the same minute.
        blocked = asyncio.ensure_future(
            second.execute(insert, sids[::-1], minute + timedelta(seconds=2), 2.0))
        await asyncio.sleep(0.3)
        assert not blocked.done(), "the second writer should wait for the first's rows"
        await first.execute(insert, sids, minute + timedelta(seconds=3), 3.0)
        await tx1.commit()
        await asyncio.wait_for(blocked, 10)
        await tx2.commit()
    async with db.acquire() as con:
        tx = con.transaction()
        await tx.start()
        await con.execute(insert, sids, minute + timedelta(seconds=4), 100.0)
        await tx.rollback()
    for sid in sids:
        row = await db.fetchrow(
            "SELECT count, sum, max, last FROM telemetry_1m WHERE series_id = $1 AND bucket = $2",
            sid, minute)
        assert dict(row) == {"count": 3, "sum": 6.0, "max": 3.0, "last": 3.0}
    assert await assert_rollups_equal_raw(db, f"{uid}-c") > 0
