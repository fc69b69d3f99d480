"""bench/storage.py: 30 days of a fleet on TimescaleDB against plain PostgreSQL partitions.

Starts its own embedded PostgreSQL with TimescaleDB built in and preloaded, makes two
databases with the project's migrations (one on TimescaleDB, one on plain partitions),
and fills each with the same readings (``--devices`` devices, one metric, a reading every
``--every`` seconds for ``--days`` days) through the same SQL ingest uses to move rows
(``INSERT ... ON CONFLICT DO NOTHING`` into ``telemetry``: the rollups follow as they do
for ingest). Then it measures, on both:
- the size of the raw readings (TimescaleDB: before and after compressing every chunk
  older than a day);
- the API's queries: one device's 30 days in hourly buckets from the hourly rollup (the
  API's own query) and from raw rows; the whole fleet's 30 days in daily buckets from the
  hourly rollup and from raw rows (medians of ``--repeat`` runs, warm cache);
- Grafana's: the 30-day graphs of the shipped dashboards (fleetline_dev/grafana), one
  device's metric and a metric across the fleet, expanded as Grafana expands them,
  against the raw-readings query of the dashboard shipped before them (every device's
  average per interval).

    .venv/bin/python bench/storage.py                  # 1,000 devices, 30 days, every 10 min
    .venv/bin/python bench/storage.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from measure import log

from fleetline.migrate import migrate
from fleetline.settings import StorageSettings
from fleetline_api.queries.telemetry import buckets_from_rollup
from fleetline_dev.embedded import LocalPostgres, ensure_timescaledb
from fleetline_dev.grafana import device, fleet, panel_sql
from fleetline_dev.grafana.expand import expand

RESULTS = Path(__file__).with_name("results")

FILL = """
WITH s AS (
    INSERT INTO series (device_id, metric)
    SELECT 'dev-' || lpad(d::text, 5, '0'), 'temperature' FROM generate_series(0, $1 - 1) d
    ON CONFLICT DO NOTHING RETURNING id
)
SELECT count(*) FROM s
"""
# One day of readings for every series: the rollups are added to by the same statement
# (plain PostgreSQL: its trigger; TimescaleDB: continuous aggregates refreshed after).
FILL_DAY = """
INSERT INTO telemetry (series_id, ts, value)
SELECT s.id, t, 20 + 5 * sin(extract(epoch FROM t) / 3600 + s.id) + (s.id % 7)
FROM series s,
     generate_series($1::timestamptz, $1::timestamptz + interval '1 day' - $2::interval,
                     $2::interval) t
ON CONFLICT DO NOTHING
"""
# The API's: GET /v1/devices/{id}/telemetry?bucket=1h.
ONE_DEVICE_ROLLUP = buckets_from_rollup("telemetry_1h")
ONE_DEVICE_ARGS = ("dev-00001", ["temperature"])
ORIGIN = datetime(2000, 1, 1, tzinfo=UTC)
ONE_DEVICE_RAW = """
SELECT date_bin('1 hour', time, TIMESTAMPTZ '2000-01-01') AS bucket, avg(value)
FROM readings WHERE device_id = 'dev-00001' AND metric = 'temperature'
  AND time >= $1 AND time < $2 GROUP BY 1 ORDER BY 1
"""
FLEET_ROLLUP = """
SELECT date_bin('1 day', bucket, TIMESTAMPTZ '2000-01-01') AS day,
       sum(avg * count) / sum(count) AS avg
FROM readings_1h WHERE metric = 'temperature' AND bucket >= $1 AND bucket < $2
GROUP BY 1 ORDER BY 1
"""
FLEET_RAW = """
SELECT date_bin('1 day', time, TIMESTAMPTZ '2000-01-01') AS day, avg(value)
FROM readings WHERE metric = 'temperature' AND time >= $1 AND time < $2 GROUP BY 1 ORDER BY 1
"""


# The graph of the Grafana dashboard shipped before the rollups: every selected device's
# average from raw readings (the device variable on All).
OLD_DASHBOARD_GRAPH = """
SELECT $__timeGroupAlias(time, $__interval), device_id AS metric, avg(value) AS value
FROM readings
WHERE $__timeFilter(time) AND metric = ${metric:sqlstring}
  AND device_id IN (${device:sqlstring}) AND value IS NOT NULL
GROUP BY 1, 2 ORDER BY 1, 2
"""


async def grafana_timings(con: asyncpg.Connection[Any], start: datetime, end: datetime,
                          devices: int, repeat: int) -> dict[str, float]:
    """The 30-day graphs as Grafana runs them ($__interval 1h, as for about 700 points)."""
    everyone = [f"dev-{d:05d}" for d in range(devices)]
    variables = {"metric": ["temperature"], "device": ["dev-00001"]}
    queries = {
        "grafana_old_all_devices_raw_ms": expand(
            OLD_DASHBOARD_GRAPH, start, end, "1h", variables | {"device": everyone}),
        "grafana_fleet_metric_ms": expand(
            panel_sql(fleet.build, "$metric across the fleet"), start, end, "1h", variables),
        "grafana_device_metric_ms": expand(
            panel_sql(device.build, "$metric"), start, end, "1h", variables),
    }
    return {name: await timed(con, sql, repeat=repeat) for name, sql in queries.items()}


async def timed(con: asyncpg.Connection[Any], sql: str, *args: Any, repeat: int) -> float:
    """Median milliseconds of ``repeat`` runs, after one that warms the cache."""
    await con.fetch(sql, *args)
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        await con.fetch(sql, *args)
        runs.append((time.perf_counter() - started) * 1000)
    return statistics.median(runs)


async def fill(url: str, args: argparse.Namespace, timescale: bool) -> dict[str, Any]:
    storage = StorageSettings(timescale="on" if timescale else "off",
                              raw_retention="400 days", compress_after="1 day")
    await migrate(url, storage, create_database=True)
    con = await asyncpg.connect(url, command_timeout=3600)
    try:
        await con.fetchval(FILL, args.devices)
        if timescale:
            # The refresh is timed below as one statement; the policies (every 10 s and
            # 1 min, migration 0026) would run it meanwhile, and two refreshes of one
            # window do not run at once.
            await con.execute(
                "SELECT alter_job(job_id, scheduled => false) FROM timescaledb_information.jobs"
                " WHERE proc_name = 'policy_refresh_continuous_aggregate'")
        end = await con.fetchval("SELECT date_trunc('day', now())")
        start = end - timedelta(days=args.days)
        every = timedelta(seconds=args.every)
        started = time.perf_counter()
        for day in range(args.days):
            at = start + timedelta(days=day)
            if not timescale:
                await con.execute("SELECT fleetline_ensure_partition($1)", at)
            await con.execute(FILL_DAY, at, every)
        fill_s = time.perf_counter() - started
        rows = await con.fetchval("SELECT count(*) FROM telemetry")
        refresh_s = 0.0
        if timescale:
            # The rollups of TimescaleDB are continuous aggregates, refreshed after the
            # writes (by their policy in production); plain PostgreSQL's were kept as the
            # rows went in, inside fill_s.
            started = time.perf_counter()
            for view in ("telemetry_1m", "telemetry_1h"):
                await con.execute(f"CALL refresh_continuous_aggregate('{view}', NULL, NULL)")
            refresh_s = time.perf_counter() - started
            before = await con.fetchval("SELECT hypertable_size('telemetry')")
            await con.execute(
                "SELECT compress_chunk(c, if_not_compressed => true)"
                " FROM show_chunks('telemetry', older_than => now() - interval '1 day') c")
            after = await con.fetchval("SELECT hypertable_size('telemetry')")
        else:
            before = after = await con.fetchval(
                "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_inherits i"
                " JOIN pg_class c ON c.oid = i.inhrelid"
                " WHERE i.inhparent = 'telemetry'::regclass")
        await con.execute("ANALYZE")
        result = {
            "rows": rows, "fill_s": fill_s, "rows_per_s": rows / fill_s,
            "rollup_refresh_s": refresh_s,
            "rows_per_s_with_rollups": rows / (fill_s + refresh_s),
            "bytes_before": int(before), "bytes_after": int(after),
            "one_device_30d_hourly_rollup_ms": await timed(
                con, ONE_DEVICE_ROLLUP, *ONE_DEVICE_ARGS, start, end, timedelta(hours=1),
                ORIGIN, repeat=args.repeat),
            "one_device_30d_hourly_raw_ms": await timed(con, ONE_DEVICE_RAW, start, end,
                                                        repeat=args.repeat),
            "fleet_30d_daily_rollup_ms": await timed(con, FLEET_ROLLUP, start, end,
                                                     repeat=args.repeat),
            "fleet_30d_daily_raw_ms": await timed(con, FLEET_RAW, start, end, repeat=args.repeat),
        } | await grafana_timings(con, start, end, args.devices, args.repeat)
    finally:
        await con.close()
    log(f"{'TimescaleDB' if timescale else 'plain'}: {json.dumps(result, default=str)}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--every", type=int, default=600, help="seconds between readings")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.days, args.every, args.repeat = 50, 3, 600, 3
    ensure_timescaledb(log)
    with tempfile.TemporaryDirectory(prefix="flb-storage-") as tmp_name:
        with LocalPostgres(Path(tmp_name) / "pg", timescaledb=True) as pg:
            results = {
                "timescaledb": asyncio.run(fill(pg.url_for("bench_tsdb"), args, True)),
                "plain": asyncio.run(fill(pg.url_for("bench_plain"), args, False)),
            }
    ts, plain = results["timescaledb"], results["plain"]
    mib = 1024 * 1024
    print()
    print(f"{args.devices:,} devices, one reading every {args.every} s for {args.days} days: "
          f"{ts['rows']:,} readings")
    print(f"  raw readings: plain {plain['bytes_before'] / mib:,.0f} MiB; TimescaleDB "
          f"{ts['bytes_before'] / mib:,.0f} MiB, compressed {ts['bytes_after'] / mib:,.1f} MiB "
          f"({ts['bytes_before'] / max(ts['bytes_after'], 1):.1f}x smaller; "
          f"{plain['bytes_before'] / max(ts['bytes_after'], 1):.1f}x against plain)")
    print(f"  writing (INSERT ... ON CONFLICT, a day at a time, rollups included): plain "
          f"{plain['rows_per_s_with_rollups']:,.0f} rows/s, TimescaleDB "
          f"{ts['rows_per_s_with_rollups']:,.0f} rows/s ({ts['rows_per_s']:,.0f} before "
          f"refreshing its continuous aggregates, {ts['rollup_refresh_s']:.1f} s)")
    for name, label in (("one_device_30d_hourly", f"one device, {args.days} days hourly"),
                        ("fleet_30d_daily", f"the fleet, {args.days} days daily")):
        print(f"  {label}: TimescaleDB {ts[name + '_rollup_ms']:,.1f} ms from the rollup, "
              f"{ts[name + '_raw_ms']:,.1f} ms from raw (compressed); plain "
              f"{plain[name + '_rollup_ms']:,.1f} ms from the rollup, "
              f"{plain[name + '_raw_ms']:,.1f} ms from raw")
    print(f"  Grafana, {args.days} days ($__interval 1h): the dashboard shipped before, every "
          f"device's average from raw readings: TimescaleDB "
          f"{ts['grafana_old_all_devices_raw_ms']:,.0f} ms, plain "
          f"{plain['grafana_old_all_devices_raw_ms']:,.0f} ms; now, a metric across the fleet "
          f"{ts['grafana_fleet_metric_ms']:,.1f} / {plain['grafana_fleet_metric_ms']:,.1f} ms "
          f"and one device's metric {ts['grafana_device_metric_ms']:,.1f} / "
          f"{plain['grafana_device_metric_ms']:,.1f} ms (TimescaleDB / plain)")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"storage-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    print(f"results: {out.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
