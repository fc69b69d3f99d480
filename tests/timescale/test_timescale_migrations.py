"""The TimescaleDB branch of the migrations, on a real TimescaleDB (conftest.py): the
SQL driven directly, statement by statement. Ingest itself writing into this server
through the broker is tests/integration/test_timescaledb.py.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from fleetline.migrate import Migration, apply_migrations, load_migrations, timescale_problem
from fleetline.settings import StorageSettings
from fleetline_ingest.writer import MOVE_STAGED, RESOLVE_SERIES, UPSERT_ACTIVITY

pytestmark = pytest.mark.timescale

# Rows per INSERT and bytes per statement: batches of a realistic size.
MAX_ROWS_PER_STATEMENT = 500
MAX_STATEMENT_BYTES = 48 * 1024

# Ingest fills its staging table with binary COPY; here the same rows arrive as arrays in
# one INSERT. The rest is ingest's own SQL (fleetline_ingest.writer): resolve series ids,
# then move the staged rows with INSERT ... SELECT ... ON CONFLICT DO NOTHING, so a
# re-sent reading is stored once.
STAGE_ROWS = """
INSERT INTO telemetry_staging (series_id, ts, value, value_text)
SELECT * FROM unnest($1::integer[], $2::timestamptz[], $3::float8[], $4::text[])
"""

Reading = tuple[str, str, datetime, bool | float | str]


def stored(value: bool | float | str) -> tuple[float | None, str | None]:
    """(value, value_text) as ingest stores a reading: booleans as 0/1, strings as text."""
    if isinstance(value, str):
        return None, value
    return float(value), None


async def write_readings(con: asyncpg.Connection[Any], readings: Sequence[Reading]) -> int:
    """Write one batch the way BatchWriter.write does; return how many rows were new."""
    assert len(readings) <= MAX_ROWS_PER_STATEMENT
    values = [stored(r[3]) for r in readings]
    # STAGE_ROWS's Bind message: per row four 4-byte lengths, an integer, a timestamp,
    # a double and the text.
    size = sum(32 + len((v[1] or "").encode()) for v in values)
    assert size <= MAX_STATEMENT_BYTES, f"batch of ~{size} bytes would crash the server"
    keys = sorted({(r[0], r[1]) for r in readings})
    async with con.transaction():
        resolved = await con.fetch(RESOLVE_SERIES, [k[0] for k in keys], [k[1] for k in keys])
        series = {(row["device_id"], row["metric"]): row["id"] for row in resolved}
        await con.execute(
            STAGE_ROWS,
            [series[(r[0], r[1])] for r in readings],
            [r[2] for r in readings],
            [v[0] for v in values],
            [v[1] for v in values],
        )
        status = await con.execute(MOVE_STAGED)
    return int(status.split()[-1])  # "INSERT 0 <rows>"


async def fetch_readings(
    con: asyncpg.Connection[Any], device_id: str
) -> list[tuple[str, datetime, float | None, str | None]]:
    rows = await con.fetch(
        "SELECT metric, time, value, value_text FROM readings WHERE device_id = $1 "
        "ORDER BY metric, time",
        device_id,
    )
    return [(r["metric"], r["time"], r["value"], r["value_text"]) for r in rows]


def expected_rows(
    readings: Sequence[Reading],
) -> list[tuple[str, datetime, float | None, str | None]]:
    return sorted((r[1], r[2], *stored(r[3])) for r in readings)


@pytest.fixture
def device_id(request: pytest.FixtureRequest) -> str:
    return f"{request.node.name[:60]}-{secrets.token_hex(4)}"


def hour_floor(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def sample_readings(device_id: str, start: datetime, count: int) -> list[Reading]:
    """`count` timestamps a minute apart, each with a number, a boolean and a string."""
    readings: list[Reading] = []
    for i in range(count):
        ts = start + timedelta(minutes=i)
        readings.append((device_id, "temperature", ts, 20.0 + i / 4))
        readings.append((device_id, "door_open", ts, i % 3 == 0))
        readings.append((device_id, "firmware", ts, f"1.{i // 10}.0"))
    return readings


# --- the schema -----------------------------------------------------------------------


async def test_first_run_applies_every_migration(applied: list[Migration]) -> None:
    assert [m.name for m in applied] == [m.name for m in load_migrations()]


async def test_second_run_applies_nothing(
    con: asyncpg.Connection[Any], storage: StorageSettings
) -> None:
    assert await apply_migrations(con, storage) == []


async def test_timescaledb_extension_is_installed(con: asyncpg.Connection[Any]) -> None:
    version = await con.fetchval(
        "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
    )
    assert version is not None
    # FLEETLINE_STORAGE_TIMESCALE=auto would pick TimescaleDB on this server too.
    assert await timescale_problem(con) is None


async def test_telemetry_is_a_hypertable_chunked_by_the_partition_interval(
    con: asyncpg.Connection[Any],
) -> None:
    hypertable = await con.fetchrow(
        "SELECT * FROM timescaledb_information.hypertables WHERE hypertable_name = 'telemetry'"
    )
    assert hypertable is not None
    assert hypertable["primary_dimension"] == "ts"
    assert hypertable["num_dimensions"] == 1
    assert hypertable["compression_enabled"] is True
    interval = await con.fetchval(
        "SELECT time_interval FROM timescaledb_information.dimensions "
        "WHERE hypertable_name = 'telemetry' AND column_name = 'ts'"
    )
    assert interval == timedelta(hours=12)  # the partition_interval setting
    # create_default_indexes => false: the primary key is the only index.
    indexes = await con.fetch(
        "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' AND tablename = 'telemetry'"
    )
    assert [r["indexname"] for r in indexes] == ["telemetry_pkey"]


async def test_compression_is_segmented_by_series(con: asyncpg.Connection[Any]) -> None:
    row = await con.fetchrow(
        "SELECT segmentby, orderby FROM timescaledb_information.hypertable_compression_settings "
        "WHERE hypertable = 'telemetry'::regclass"
    )
    assert row is not None
    assert (row["segmentby"], row["orderby"]) == ("series_id", "ts DESC")


async def test_policies_take_their_intervals_from_settings(
    con: asyncpg.Connection[Any], storage: StorageSettings
) -> None:
    jobs = await con.fetch(
        "SELECT proc_name, config FROM timescaledb_information.jobs "
        "WHERE hypertable_name = 'telemetry' ORDER BY proc_name"
    )
    configs = {j["proc_name"]: j["config"] for j in jobs}
    assert set(configs) == {"policy_compression", "policy_retention"}
    # Compare as intervals, whatever text form TimescaleDB stores them in.
    same = await con.fetchrow(
        "SELECT $1::text::interval = $2::text::interval AS compress, "
        "       $3::text::interval = $4::text::interval AS retain",
        configs["policy_compression"]["compress_after"],
        storage.compress_after,
        configs["policy_retention"]["drop_after"],
        storage.raw_retention,
    )
    assert same is not None
    assert (same["compress"], same["retain"]) == (True, True), configs


async def test_storage_config_records_timescale(con: asyncpg.Connection[Any]) -> None:
    row = await con.fetchrow("SELECT timescale, partition_interval FROM storage_config")
    assert row is not None
    assert row["timescale"] is True
    assert row["partition_interval"] == timedelta(hours=12)  # the partition_interval setting


async def test_partition_functions_are_noops(
    con: asyncpg.Connection[Any], storage: StorageSettings
) -> None:
    await con.execute("SELECT fleetline_ensure_partition(now())")
    dropped = await con.fetchval(
        "SELECT fleetline_maintain($1::text::interval, $2)",
        storage.raw_retention,
        storage.partitions_ahead,
    )
    assert dropped == 0
    created = await con.fetchval(
        "SELECT count(*) FROM pg_class WHERE relname ~ '^telemetry_p[0-9]{8}t[0-9]{4}$'"
    )
    assert created == 0
    chunks = await con.fetchval("SELECT count(*) FROM show_chunks('telemetry')")
    assert chunks == 0


# --- the SQL surface (docs/protocol.md) -----------------------------------------------


async def test_readings_view_returns_what_was_written_once(
    con: asyncpg.Connection[Any], device_id: str
) -> None:
    start = hour_floor(datetime.now(UTC)) - timedelta(hours=2)
    readings = sample_readings(device_id, start, 60)  # 180 rows
    assert await write_readings(con, readings) == len(readings)

    # QoS 1 redelivery: the same batch again, and one reading re-sent with another value
    # inside a batch that also carries a new one. Only the new reading is stored.
    assert await write_readings(con, readings) == 0
    late = start + timedelta(hours=1, minutes=30)
    assert (
        await write_readings(
            con, [(device_id, "temperature", start, 99.0), (device_id, "temperature", late, 21.5)]
        )
        == 1
    )

    assert await fetch_readings(con, device_id) == expected_rows(
        [*readings, (device_id, "temperature", late, 21.5)]
    )
    booleans = await con.fetch(
        "SELECT DISTINCT value, value_text FROM readings "
        "WHERE device_id = $1 AND metric = 'door_open'",
        device_id,
    )
    assert sorted((r["value"], r["value_text"]) for r in booleans) == [(0.0, None), (1.0, None)]


async def test_device_status_view_joins_registry_and_activity(
    con: asyncpg.Connection[Any], device_id: str
) -> None:
    seen = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    registered, active, unknown = f"{device_id}-reg", f"{device_id}-act", f"{device_id}-unk"
    await con.execute(
        "INSERT INTO devices (id, tags) VALUES ($1, $2), ($3, $4)",
        registered,
        {"site": "north"},
        active,
        {"site": "south", "floor": 2},
    )
    # Ingest's upsert: `active` reports online, `unknown` (never registered) sends a
    # reading; then a later reading from `active` moves last_seen but not the status.
    later = seen + timedelta(minutes=5)
    await con.execute(UPSERT_ACTIVITY, [active, unknown], [seen, seen], [True, None], [seen, None])
    await con.execute(UPSERT_ACTIVITY, [active], [later], [None], [None])
    rows = await con.fetch(
        "SELECT device_id, online, last_seen, tags, status_changed_at FROM device_status "
        "WHERE device_id = ANY($1::text[]) ORDER BY device_id",
        [registered, active, unknown],
    )
    assert [tuple(r) for r in rows] == [
        (active, True, later, {"site": "south", "floor": 2}, seen),
        (registered, False, None, {"site": "north"}, None),
        (unknown, False, seen, {}, None),
    ]


async def test_dead_letters_view_keeps_raw_payload(
    con: asyncpg.Connection[Any], device_id: str
) -> None:
    payload = b'{"temperature": \xff\xfe}'  # not UTF-8: the bytes are kept as received
    topic = f"devices/{device_id}/telemetry"
    await con.execute(
        "INSERT INTO ingest_dead_letter (topic, device_id, reason, payload) "
        "VALUES ($1, $2, $3, $4)",
        topic,
        device_id,
        "invalid JSON",
        payload,
    )
    rows = await con.fetch(
        "SELECT topic, reason, payload, device_id, received_at FROM dead_letters "
        "WHERE device_id = $1",
        device_id,
    )
    assert [tuple(r)[:4] for r in rows] == [(topic, "invalid JSON", payload, device_id)]
    assert rows[0]["received_at"] is not None


# --- compression ----------------------------------------------------------------------


async def test_compressed_chunks_keep_readings_and_ignore_duplicates(
    con: asyncpg.Connection[Any], storage: StorageSettings, device_id: str
) -> None:
    # Older than compress_after (3 days), younger than raw_retention (45 days).
    start = hour_floor(datetime.now(UTC)) - timedelta(days=10)
    readings = sample_readings(device_id, start, 100)  # 300 rows
    assert await write_readings(con, readings) == len(readings)
    before = await fetch_readings(con, device_id)
    assert before == expected_rows(readings)

    compressed = await con.fetch(
        "SELECT compress_chunk(c) "
        "FROM show_chunks('telemetry', older_than => $1::text::interval) AS c",
        storage.compress_after,
    )
    assert compressed
    states = await con.fetch(
        "SELECT is_compressed FROM timescaledb_information.chunks "
        "WHERE hypertable_name = 'telemetry'"
    )
    assert [r["is_compressed"] for r in states] == [True] * len(states)

    assert await fetch_readings(con, device_id) == before

    # A late redelivery into the compressed range is ignored, not stored twice...
    duplicate: Reading = (device_id, "temperature", start + timedelta(minutes=5), -1.0)
    assert await write_readings(con, [duplicate]) == 0
    # ...while a new reading there is still accepted.
    gap: Reading = (device_id, "temperature", start + timedelta(seconds=30), 19.0)
    assert await write_readings(con, [gap]) == 1
    assert await fetch_readings(con, device_id) == expected_rows([*readings, gap])


# --- rollups ------------------------------------------------------------------------------

ROLLUP_VS_RAW = """
SELECT r.bucket, r.metric, r.count, r.min, r.max, r.last, r.avg,
       w.count AS raw_count, w.min AS raw_min, w.max AS raw_max, w.last AS raw_last,
       w.avg AS raw_avg
FROM {view} r
FULL JOIN (
    SELECT time_bucket($2::text::interval, time) AS bucket, metric, count(*) AS count,
           min(value) AS min, max(value) AS max, avg(value) AS avg,
           (array_agg(value ORDER BY time DESC) FILTER (WHERE value IS NOT NULL))[1] AS last
    FROM readings WHERE device_id = $1 GROUP BY 1, 2
) w USING (bucket, metric)
WHERE r.device_id = $1 OR r.device_id IS NULL
"""


async def assert_rollups_match(con: asyncpg.Connection[Any], device_id: str) -> None:
    for view, width in (("readings_1m", "1 minute"), ("readings_1h", "1 hour")):
        rows = await con.fetch(ROLLUP_VS_RAW.format(view=view), device_id, width)
        assert rows, view
        for r in rows:
            assert (r["count"], r["min"], r["max"], r["last"]) == (
                r["raw_count"],
                r["raw_min"],
                r["raw_max"],
                r["raw_last"],
            ), (view, dict(r))
            assert (r["avg"] is None and r["raw_avg"] is None) or r["avg"] == pytest.approx(
                r["raw_avg"]
            ), (view, dict(r))


async def test_rollups_are_continuous_aggregates_equal_to_raw(
    con: asyncpg.Connection[Any], device_id: str, storage: StorageSettings
) -> None:
    kinds = {
        r["view_name"]: r["materialized_only"]
        for r in await con.fetch(
            "SELECT view_name, materialized_only FROM timescaledb_information.continuous_aggregates"
        )
    }
    assert kinds == {"telemetry_1m": False, "telemetry_1h": False}
    start = hour_floor(datetime.now(UTC)) - timedelta(hours=3)
    readings = sample_readings(device_id, start, 150)
    for i in range(0, len(readings), 150):
        await write_readings(con, readings[i : i + 150])
    # Real-time aggregation: right before any refresh.
    await assert_rollups_match(con, device_id)
    await con.execute("CALL refresh_continuous_aggregate('telemetry_1m', NULL, NULL)")
    await con.execute("CALL refresh_continuous_aggregate('telemetry_1h', NULL, NULL)")
    await assert_rollups_match(con, device_id)
    # A late reading into a refreshed hour, then a refresh: still equal.
    await write_readings(con, [(device_id, "temperature", start + timedelta(seconds=30), 99.5)])
    await con.execute("CALL refresh_continuous_aggregate('telemetry_1m', NULL, NULL)")
    await con.execute("CALL refresh_continuous_aggregate('telemetry_1h', NULL, NULL)")
    await assert_rollups_match(con, device_id)
    assert await con.fetchval("SELECT to_regprocedure('fleetline_add_to_rollups()')") is None
    retention = {
        r["hypertable_name"]: r["config"]["drop_after"]
        for r in await con.fetch(
            "SELECT hypertable_name, config FROM timescaledb_information.jobs "
            "WHERE proc_name = 'policy_retention' AND hypertable_name LIKE 'telemetry_1%'"
        )
    }
    same = await con.fetchrow(
        "SELECT $1::text::interval = $2::text::interval AS a, "
        "$3::text::interval = $4::text::interval AS b",
        retention["telemetry_1m"],
        storage.rollup_1m_retention,
        retention["telemetry_1h"],
        storage.rollup_1h_retention,
    )
    assert same is not None and (same["a"], same["b"]) == (True, True), retention
