"""Rollups (plain PostgreSQL): readings_1m and readings_1h equal the raw aggregates."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from fleetline_dev.embedded import LocalMosquitto
from tests.conftest import wait_rows
from tests.support import Device, IngestProcess, wait_until

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


async def roll_up(db: asyncpg.Pool[Any]) -> None:
    while await db.fetchval("SELECT fleetline_roll_up(100000)"):
        pass


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
    await db.executemany(
        "INSERT INTO telemetry (series_id, ts, value, value_text) VALUES ($1, $2, $3, $4)", rows)
    await roll_up(db)
    assert await assert_rollups_equal_raw(db, uid) > 0
    # Late readings into an old, rolled-up hour, plus a re-sent one (stored once).
    late = [(ids["a", "temp"], base + timedelta(minutes=7, seconds=s), 1000.0 + s, None)
            for s in (1, 2, 3)]
    async with db.acquire() as con:
        await con.copy_records_to_table("telemetry", records=late,
                                        columns=["series_id", "ts", "value", "value_text"])
        await con.execute(
            "INSERT INTO telemetry (series_id, ts, value) VALUES ($1, $2, 5) ON CONFLICT DO "
            "NOTHING", ids["a", "temp"], base)
    mine = ("SELECT count(*) FROM rollup_pending p JOIN series s ON s.id = p.series_id "
            "WHERE s.device_id LIKE $1 || '%'")
    assert await db.fetchval(mine, uid) >= 1
    await roll_up(db)
    assert await db.fetchval(mine, uid) == 0
    assert await assert_rollups_equal_raw(db, uid) > 0
    peak = await db.fetchval(
        "SELECT max FROM readings_1h WHERE device_id = $1 AND metric = 'temp' AND bucket = $2",
        f"{uid}-a", base)
    assert peak == 1003.0


async def test_ingest_keeps_rollups_current(
    start_ingest: Callable[..., IngestProcess], broker: LocalMosquitto,
    db: asyncpg.Pool[Any], uid: str,
) -> None:
    ingest = start_ingest(env={"FLEETLINE_INGEST_ROLLUP_INTERVAL_SECONDS": "0.2"})
    base = datetime.now(UTC) - timedelta(hours=3)
    dev = Device(broker.url, f"{uid}-d")
    dev.publish_all([{"ts": (base + timedelta(seconds=30 * i)).isoformat(),
                      "values": {"t": i % 13, "fw": "1.0"}} for i in range(300)])
    assert await wait_rows(db, uid, 600) == 600
    wait_until(lambda: ingest.metric("fleetline_ingest_rollup_minutes_total") >= 150,
               what="rollups recomputed")
    deadline = time.monotonic() + 20
    # (Other tests' minutes of the last few seconds may still be pending: they settle.)
    while await db.fetchval("SELECT count(*) FROM rollup_pending p JOIN series s "
                            "ON s.id = p.series_id WHERE s.device_id LIKE $1 || '%'", uid):
        assert time.monotonic() < deadline, "rollups never caught up"
        await asyncio.sleep(0.1)
    assert await assert_rollups_equal_raw(db, uid) > 0
    dev.close()


async def test_a_roll_up_does_not_consume_the_mark_of_an_uncommitted_batch(
    db: asyncpg.Pool[Any], uid: str
) -> None:
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
    sid = await db.fetchval(
        "INSERT INTO series (device_id, metric) VALUES ($1, 'v') RETURNING id", f"{uid}-m")
    await db.execute("INSERT INTO telemetry (series_id, ts, value) VALUES ($1, $2, 1)",
                     sid, hour)  # the hour is marked, not rolled up yet
    async with db.acquire() as writer:
        tx = writer.transaction()
        await tx.start()
        await writer.execute("INSERT INTO telemetry (series_id, ts, value) VALUES ($1, $2, 2)",
                             sid, hour + timedelta(seconds=30))  # the same minute: one mark
        # A roll-up while that batch is open must leave the hour's mark for later.
        await db.fetchval("SELECT fleetline_roll_up(100000)")
        await tx.commit()
    await roll_up(db)
    count = await db.fetchval(
        "SELECT count FROM readings_1h WHERE device_id = $1 AND bucket = $2", f"{uid}-m", hour)
    assert count == 2


async def test_a_roll_up_leaves_the_minutes_still_being_written(
    db: asyncpg.Pool[Any], uid: str
) -> None:
    """Ingest's roll-ups take only settled minutes, so a batch writing into the current
    minute never waits for one (it did: a stall at every roll-up under live load)."""
    sid = await db.fetchval(
        "INSERT INTO series (device_id, metric) VALUES ($1, 'v') RETURNING id", f"{uid}-s")
    now = datetime.now(UTC)
    old = now - timedelta(hours=2)
    await db.execute("INSERT INTO telemetry (series_id, ts, value) VALUES ($1, $2, 1), "
                     "($1, $3, 2)", sid, old, now)
    async with db.acquire() as roller:
        tx = roller.transaction()
        await tx.start()
        await roller.fetchval("SELECT fleetline_roll_up(100000, interval '10 seconds')")
        # The roll-up holds what it took until it commits; the current minute is not among
        # it, so this write does not wait.
        await asyncio.wait_for(db.execute(
            "INSERT INTO telemetry (series_id, ts, value) VALUES ($1, $2, 3)",
            sid, now + timedelta(milliseconds=1)), 5)
        await tx.commit()
    marks = [r["minute"] for r in await db.fetch(
        "SELECT minute FROM rollup_pending WHERE series_id = $1", sid)]
    current = now.replace(second=0, microsecond=0)
    assert marks and all(m >= current for m in marks), marks
    assert await db.fetchval(
        "SELECT count FROM readings_1m WHERE device_id = $1 AND bucket = $2",
        f"{uid}-s", old.replace(second=0, microsecond=0)) == 1
