"""Storage on a real TimescaleDB server: the embedded PostgreSQL with TimescaleDB built
into it and preloaded (scripts/build-timescaledb.sh), ingest writing into it through the
real broker.

What TimescaleDB adds is proven here on the server itself: the runner picks it on its
own (``auto``), ``telemetry`` is a hypertable chunked by the partition interval with its
compression and retention policies, chunks compress, a late reading into a compressed
chunk is stored exactly once (and a re-sent one not twice), the rollups equal the raw
aggregates (and the API's buckets read from them), and retention drops whole chunks.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from fleetline import apikeys
from fleetline.settings import StorageSettings
from fleetline_dev.embedded import LocalMosquitto, LocalPostgres
from tests.conftest import migrated_database
from tests.support import ApiProcess, Device, IngestProcess, reading, settle_rollups

pytestmark = [pytest.mark.integration, pytest.mark.timescale]


@pytest.fixture
async def tsdb(timescale_server: LocalPostgres) -> AsyncIterator[str]:
    """A database of its own on the TimescaleDB server, migrated as `fleetline migrate`
    does by default (FLEETLINE_STORAGE_TIMESCALE=auto)."""
    storage = StorageSettings(timescale="auto", raw_retention="10 days",
                              compress_after="2 days")
    async with migrated_database(timescale_server.url, "fleetline_tsdb", storage) as url:
        yield url


@pytest.fixture
async def pool(tsdb: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    p = await asyncpg.create_pool(tsdb, min_size=1, max_size=2)
    assert p is not None
    yield p
    await p.close()


async def stored(pool: asyncpg.Pool[Any], device_id: str) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM readings WHERE device_id = $1",
                                   device_id))


async def test_auto_picks_timescaledb_with_its_policies(pool: asyncpg.Pool[Any]) -> None:
    assert await pool.fetchval("SELECT timescale FROM storage_config") is True
    hypertable = await pool.fetchrow(
        "SELECT h.compression_enabled, d.time_interval FROM timescaledb_information.hypertables h"
        " JOIN timescaledb_information.dimensions d USING (hypertable_name)"
        " WHERE h.hypertable_name = 'telemetry'")
    assert hypertable is not None and hypertable["compression_enabled"]
    assert hypertable["time_interval"] == timedelta(days=1)
    jobs = {r["proc_name"]: json.loads(r["config"]) for r in await pool.fetch(
        "SELECT proc_name, config FROM timescaledb_information.jobs"
        " WHERE hypertable_name = 'telemetry'")}
    assert jobs["policy_compression"]["compress_after"] == "2 days"
    assert jobs["policy_retention"]["drop_after"] == "10 days"
    refresh = {r["hypertable_name"]: r["schedule_interval"] for r in await pool.fetch(
        "SELECT hypertable_name, schedule_interval FROM timescaledb_information.jobs"
        " WHERE proc_name = 'policy_refresh_continuous_aggregate'")}
    assert refresh == {"telemetry_1m": timedelta(seconds=10), "telemetry_1h": timedelta(minutes=1)}


async def test_a_late_reading_into_a_materialized_minute_shows_within_the_refresh(
    pool: asyncpg.Pool[Any], uid: str,
) -> None:
    """Real-time aggregation covers what is newer than the last refresh; a reading written
    into a minute already materialized shows at the next refresh, which the scheduler
    runs every 10 seconds (migration 0026)."""
    sid = await pool.fetchval(
        "INSERT INTO series (device_id, metric) VALUES ($1, 't') RETURNING id", uid)
    minute = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=3)
    await pool.execute("INSERT INTO telemetry (series_id, ts, value) VALUES ($1, $2, 1)",
                       sid, minute)
    await settle_rollups(pool)
    count = "SELECT count FROM readings_1m WHERE device_id = $1 AND bucket = $2"
    async with pool.acquire() as con, con.transaction():
        # Read before the commit, so no scheduled refresh can have taken the late one.
        await con.execute("INSERT INTO telemetry (series_id, ts, value) VALUES ($1, $2, 5)",
                          sid, minute + timedelta(seconds=30))
        assert await con.fetchval(count, uid, minute) == 1, "materialized before the late one"
    deadline = time.monotonic() + 25
    while await pool.fetchval(count, uid, minute) != 2:
        assert time.monotonic() < deadline, "the late reading never reached its minute"
        await asyncio.sleep(0.5)


async def test_ingest_writes_into_the_hypertable_and_rollups_equal_raw(
    pool: asyncpg.Pool[Any], tsdb: str, broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess], uid: str,
) -> None:
    start_ingest(database=tsdb)
    dev = Device(broker.url, f"{uid}-d")
    now_ms = int(time.time() * 1000)
    batch = [reading(now_ms - 10_000 * i, t=float(i), label=f"v{i}") for i in range(200)]
    dev.publish_all([batch, batch[:50]])  # the second is re-sent: stored once
    await wait_until_async(lambda: stored(pool, dev.device_id), 400)
    assert await stored(pool, dev.device_id) == 400
    chunks = await pool.fetchval("SELECT count(*) FROM show_chunks('telemetry')")
    assert chunks >= 1
    raw = await pool.fetch(
        "SELECT date_trunc('minute', time) AS minute, count(*), avg(value), min(value),"
        " max(value) FROM readings WHERE device_id = $1 AND metric = 't' GROUP BY 1 ORDER BY 1",
        dev.device_id)
    rolled = await pool.fetch(
        "SELECT bucket AS minute, count, avg, min, max FROM readings_1m"
        " WHERE device_id = $1 AND metric = 't' ORDER BY 1", dev.device_id)
    assert [tuple(r) for r in rolled] == [tuple(r) for r in raw]
    dev.close()


async def test_late_readings_into_a_compressed_chunk_are_stored_once(
    pool: asyncpg.Pool[Any], tsdb: str, broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess], uid: str,
) -> None:
    start_ingest(database=tsdb)
    dev = Device(broker.url, f"{uid}-d")
    three_days_ago = int((datetime.now(UTC) - timedelta(days=3)).timestamp() * 1000)
    old = [reading(three_days_ago + 60_000 * i, t=float(i)) for i in range(100)]
    dev.publish_all([old])
    await wait_until_async(lambda: stored(pool, dev.device_id), 100)
    compressed = await pool.fetch(
        "SELECT compress_chunk(c, if_not_compressed => true)"
        " FROM show_chunks('telemetry', older_than => now() - interval '2 days') c")
    assert compressed, "no chunk old enough to compress"
    assert await pool.fetchval(
        "SELECT count(*) FROM timescaledb_information.chunks"
        " WHERE hypertable_name = 'telemetry' AND is_compressed") >= 1
    # Late: the same readings again (a device re-sending its backlog) and new ones, into
    # the compressed chunk.
    late = [reading(three_days_ago + 60_000 * i + 30_000, t=1000.0 + i) for i in range(20)]
    dev.publish_all([old[:30], late])
    await wait_until_async(lambda: stored(pool, dev.device_id), 120)
    time.sleep(0.5)  # anything more would have landed by now
    assert await stored(pool, dev.device_id) == 120
    values = await pool.fetch(
        "SELECT time, count(*) FROM readings WHERE device_id = $1 GROUP BY 1 HAVING count(*) > 1",
        dev.device_id)
    assert values == []
    dev.close()


async def test_retention_drops_whole_chunks(
    pool: asyncpg.Pool[Any], tsdb: str, broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess], uid: str,
) -> None:
    start_ingest(database=tsdb)
    dev = Device(broker.url, f"{uid}-d")
    now = datetime.now(UTC)
    old_ms = int((now - timedelta(days=12)).timestamp() * 1000)
    new_ms = int((now - timedelta(hours=1)).timestamp() * 1000)
    dev.publish_all([[reading(old_ms + i * 1000, t=1.0) for i in range(10)],
                     [reading(new_ms + i * 1000, t=2.0) for i in range(10)]])
    await wait_until_async(lambda: stored(pool, dev.device_id), 20)
    before = await pool.fetchval("SELECT count(*) FROM show_chunks('telemetry')")
    job = await pool.fetchval("SELECT job_id FROM timescaledb_information.jobs"
                              " WHERE proc_name = 'policy_retention'")
    await pool.execute(f"CALL run_job({int(job)})")
    assert await pool.fetchval("SELECT count(*) FROM show_chunks('telemetry')") == before - 1
    assert await stored(pool, dev.device_id) == 10
    dev.close()


async def wait_until_async(count: Callable[[], Any], expected: int, timeout: float = 30) -> None:
    """Until ``await count()`` reaches ``expected``."""
    deadline = time.monotonic() + timeout
    while (n := await count()) < expected:
        assert time.monotonic() < deadline, f"{n} of {expected} stored"
        await asyncio.sleep(0.1)


async def test_the_apis_buckets_come_from_the_aggregates_equal_to_raw(
    pool: asyncpg.Pool[Any], tsdb: str, broker: LocalMosquitto,
    start_ingest: Callable[..., IngestProcess], artifacts: Path, uid: str,
) -> None:
    start_ingest(database=tsdb)
    dev = Device(broker.url, f"{uid}-d")
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=30)
    start_ms = int(start.timestamp() * 1000)
    dev.publish_all([[reading(start_ms + 7_000 * i, t=float(i % 17)) for i in range(240)]])
    await wait_until_async(lambda: stored(pool, dev.device_id), 240)
    await pool.execute("INSERT INTO devices (id) VALUES ($1)", dev.device_id)
    async with pool.acquire() as con:
        key = (await apikeys.create_key(con, name="t", scopes=["admin"])).token
    api = ApiProcess(database_url=tsdb, mqtt_url=broker.url, log_dir=artifacts,
                     name=f"{uid}-tsdb").start()
    try:
        answer = httpx.get(
            f"{api.url}/v1/devices/{dev.device_id}/telemetry", timeout=10,
            headers={"Authorization": f"Bearer {key}"},
            params={"metric": "t", "bucket": "5m", "agg": "avg,min,max,count",
                    "from": start.isoformat(), "to": (start + timedelta(minutes=30)).isoformat()},
        ).json()
    finally:
        api.stop()
    assert answer.get("source") == "telemetry_1m", answer
    raw = await pool.fetch(
        "SELECT date_bin('5 minutes', time, TIMESTAMPTZ '2000-01-01') AS bucket, avg(value),"
        " min(value), max(value), count(*) FROM readings WHERE device_id = $1 AND metric = 't'"
        " AND time >= $2 AND time < $3 GROUP BY 1 ORDER BY 1",
        dev.device_id, start, start + timedelta(minutes=30))
    assert len(answer["items"]) == len(raw) >= 6
    for item, row in zip(answer["items"], raw, strict=True):
        assert datetime.fromisoformat(item["bucket"]) == row["bucket"]
        assert (item["min"], item["max"], item["count"]) == (row["min"], row["max"], row["count"])
        assert abs(item["avg"] - row["avg"]) < 1e-9
    dev.close()
