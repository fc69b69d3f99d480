"""The Grafana dashboards (fleetline_dev/grafana, deploy/grafana/dashboards) against the
real database, on plain PostgreSQL and on TimescaleDB.

No Grafana server can run here, so each panel's SQL is expanded as Grafana's PostgreSQL
data source expands it (template variables, then $__interval and $__unixEpochFrom/To,
then the macros of Grafana's postgres macro engine with its `timescaledb: false`
setting, as provisioned) and run as the read-only role fleetline_reader, for a range
that reads raw readings, one that reads the minute rollups and one that reads the hourly
ones. Each query must return rows in the shape its panel expects, and the rollup
branches must give what the raw readings give.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard as SdkDashboard

from fleetline_dev.grafana import DASHBOARDS, render, write
from fleetline_dev.grafana.common import DAY, by_range
from fleetline_dev.grafana.expand import expand, go_number, rfc3339, seconds
from tests.conftest import Backend, migrated_database
from tests.support import settle_rollups

pytestmark = [pytest.mark.integration, pytest.mark.storage]

DASHBOARD_DIR = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards"
NOW = datetime.now(UTC).replace(microsecond=0)
DEVICES = ("gf-a", "gf-b", "gf-c")
# (name, width, $__interval as Grafana picks it for a panel about 1,000 points wide)
RANGES = (("1 hour: raw", timedelta(hours=1), "5s"),
          ("2 days: minute rollups", timedelta(days=2), "5m"),
          ("30 days: hourly rollups", timedelta(days=30), "1h"))


@dataclass
class Target:
    dashboard: str
    panel: str
    sql: str
    format: str
    repeat: str | None


def targets(dashboard: dict[str, Any], name: str) -> Iterator[Target]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield Target(name, panel["title"], target["rawSql"], target["format"],
                         panel.get("repeat"))


@pytest.fixture(scope="module")
async def grafana_db(backend: Backend) -> AsyncIterator[asyncpg.Pool[Any]]:
    """A database of its own with 30 days of three devices, alarms, dead letters and
    refusals, its rollups settled."""
    async with migrated_database(backend.admin_url, "fleetline_grafana", backend.storage) as url:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)
        assert pool is not None
        await seed(pool)
        await settle_rollups(pool)
        yield pool
        await pool.close()


async def seed(pool: asyncpg.Pool[Any]) -> None:
    rows = []
    for n, device in enumerate(DEVICES):
        await pool.execute(
            "INSERT INTO devices (id, tags) VALUES ($1, $2::jsonb)", device,
            json.dumps({"site": "north" if n else "south"}))
        await pool.execute(
            "INSERT INTO device_activity (device_id, online, last_seen, status_changed_at)"
            " VALUES ($1, $2, $3, $3)", device, n != 2, NOW - timedelta(minutes=n * 10))
        temp, hum, state = [await pool.fetchval(
            "INSERT INTO series (device_id, metric) VALUES ($1, $2) RETURNING id", device, m)
            for m in ("temp", "humidity", "state")]
        # Every 10 minutes for 31 days, and every 10 seconds for the last 2 hours.
        times = [NOW - timedelta(minutes=10 * i) for i in range(31 * 144)]
        times += [NOW - timedelta(seconds=10 * i + 5) for i in range(720)]
        for i, ts in enumerate(times):
            rows.append((temp, ts, 20.0 + n + (i % 13) / 2, None))
            rows.append((hum, ts, 40.0 + (i % 7), None))
            if i % 50 == 0:
                rows.append((state, ts, None, "open" if i % 100 else "shut"))
    async with pool.acquire() as con:
        await con.execute("SELECT fleetline_ensure_partition(now() - make_interval(days => d))"
                          " FROM generate_series(0, 32) d")
        await con.copy_records_to_table("telemetry", records=rows,
                                        columns=["series_id", "ts", "value", "value_text"])
        await con.execute("""
            INSERT INTO series_latest (series_id, ts, value, value_text)
            SELECT DISTINCT ON (series_id) series_id, ts, value, value_text
            FROM telemetry ORDER BY series_id, ts DESC""")
        await con.executemany(
            "INSERT INTO ingest_dead_letter (received_at, topic, device_id, reason, payload)"
            " VALUES ($1, $2, $3, $4, $5)",
            [(NOW - timedelta(minutes=m), f"devices/{DEVICES[0]}/telemetry", DEVICES[0],
              reason, b"{not json") for m, reason in
             ((3, "not JSON: unexpected character: line 1 column 2 (char 1)"),
              (20, "payload of 300000 bytes exceeds 262144"))])
        await con.executemany(
            "INSERT INTO rule_alarms (rule_id, rule_name, device_id, metric, severity, state,"
            " raised_at, cleared_at, value, peak) VALUES (1, $1, $2, 'temp', $3, $4, $5, $6,"
            " 30, 31)",
            [("hot", DEVICES[0], "major", "active", NOW - timedelta(minutes=30), None),
             ("hot", DEVICES[1], "warning", "cleared", NOW - timedelta(minutes=40),
              NOW - timedelta(minutes=10))])
        await con.execute(
            "INSERT INTO device_limit_refusals (device_id, messages, bytes, first_refused_at,"
            " last_refused_at) VALUES ($1, 120, 64000, $2, $3)",
            DEVICES[2], NOW - timedelta(minutes=15), NOW - timedelta(minutes=1))


async def run_as_reader(pool: asyncpg.Pool[Any], sql: str) -> list[asyncpg.Record]:
    """``sql`` as Grafana's role runs it: granted fleetline_reader and nothing else."""
    async with pool.acquire() as con, con.transaction():
        await con.execute("SET LOCAL ROLE fleetline_reader")
        return list(await con.fetch(sql))


async def variable_values(pool: asyncpg.Pool[Any], dashboard: dict[str, Any]
                          ) -> dict[str, list[str]]:
    """Each variable's values as the dashboard loads them: its query's first value (the
    one Grafana selects), or every value of a custom variable (All)."""
    values: dict[str, list[str]] = {}
    start = NOW - timedelta(hours=6)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "custom":
            values[variable["name"]] = variable["query"].split(",")
            continue
        rows = await run_as_reader(pool, expand(variable["query"], start, NOW, "5s", values))
        found = sorted(r[0] for r in rows)
        assert found, f"variable {variable['name']} has no values"
        values[variable["name"]] = found[:1]
    return values


NUMBERS = (int, float, Decimal)


def assert_shape(target: Target, rows: list[asyncpg.Record]) -> None:
    where = f"{target.dashboard}: {target.panel}"
    assert rows, f"{where}: no rows"
    if target.format == "time_series":
        columns = list(rows[0].keys())
        assert columns[0] == "time", where
        times = [r["time"] for r in rows]
        assert times == sorted(times), f"{where}: not sorted by time"
        for row in rows:
            for name, value in row.items():
                if name == "metric":
                    assert isinstance(value, str), where
                elif value is not None:
                    assert isinstance(value, NUMBERS), f"{where}: {name} is {value!r}"


def dashboards() -> dict[str, dict[str, Any]]:
    return {name: json.loads(render(build)) for name, build in DASHBOARDS.items()}


async def test_every_panel_returns_rows_of_its_shape_as_the_read_only_role(
    grafana_db: asyncpg.Pool[Any],
) -> None:
    checked = 0
    for name, dashboard in dashboards().items():
        values = await variable_values(grafana_db, dashboard)
        for target in targets(dashboard, name):
            for label, width, interval in RANGES:
                sql = expand(target.sql, NOW - width, NOW, interval, values)
                assert "$" not in sql, sql
                try:
                    rows = await run_as_reader(grafana_db, sql)
                except asyncpg.PostgresError as exc:
                    raise AssertionError(f"{name}: {target.panel} ({label}): {exc}\n{sql}") from exc
                assert_shape(target, rows)
                checked += 1
    assert checked >= 3 * 30


@pytest.mark.parametrize(("dashboard", "panel", "where"), [
    ("device.json", "$metric", "device_id = 'gf-a' AND metric = 'temp'"),
    ("fleet.json", "$metric across the fleet", "metric = 'temp'"),
])
async def test_rollup_branches_give_what_the_raw_readings_give(
    grafana_db: asyncpg.Pool[Any], dashboard: str, panel: str, where: str,
) -> None:
    """Wide ranges read the rollups: per interval, the same average, lowest and highest
    value as the raw readings of those intervals."""
    target = next(t for t in targets(dashboards()[dashboard], dashboard) if t.panel == panel)
    values = {"device": ["gf-a"], "metric": ["temp"]}
    # The 2-day range reads minute rollups, the 30-day one hourly rollups: the raw
    # readings compared are those of the buckets the panel's time filter takes.
    for (_, width, interval), bucket in zip(RANGES[1:], ("1 minute", "1 hour"), strict=True):
        end = NOW.replace(minute=0, second=0)
        start = end - width
        rolled = await run_as_reader(grafana_db, expand(target.sql, start, end, interval, values))
        step = go_number(seconds(interval))
        raw = await grafana_db.fetch(f"""
            SELECT floor(extract(epoch from time)/{step})*{step} AS "time",
                   avg(value) AS avg, min(value) AS min, max(value) AS max
            FROM readings
            WHERE {where} AND value IS NOT NULL
              AND date_bin('{bucket}', time, TIMESTAMPTZ '2000-01-01 00:00+00')
                  BETWEEN '{rfc3339(start)}' AND '{rfc3339(end)}'
            GROUP BY 1 ORDER BY 1""")
        assert len(rolled) == len(raw) > 10
        for got, want in zip(rolled, raw, strict=True):
            assert got["time"] == want["time"]
            assert math.isclose(got["avg"], want["avg"])
            assert (got["min"], got["max"]) == (want["min"], want["max"])


@pytest.mark.parametrize(("width", "expected"), [
    (timedelta(hours=1), ("readings", "readings_1m")),
    (timedelta(days=1), ("readings", "readings_1m")),
    (timedelta(days=1, seconds=1), ("readings_1m", "readings_1m")),
    (timedelta(days=2), ("readings_1m", "readings_1m")),
    (timedelta(days=2, seconds=1), ("readings_1m", "readings_1h")),
    (timedelta(days=7), ("readings_1m", "readings_1h")),
    (timedelta(days=7, seconds=1), ("readings_1h", "readings_1h")),
    (timedelta(days=30), ("readings_1h", "readings_1h")),
])
async def test_the_width_of_the_range_picks_one_source(
    grafana_db: asyncpg.Pool[Any], width: timedelta, expected: tuple[str, str],
) -> None:
    """One device's graphs (raw up to a day, minutes up to a week) and the fleet's (minutes
    up to two days): each range reads from one source only."""
    rolled = "SELECT '{view}'::text AS source FROM {view} WHERE $__timeFilter(bucket)"
    raw = "SELECT 'readings'::text AS source FROM readings WHERE $__timeFilter(time)"
    device_like = by_range(rolled, raw=raw, raw_until=DAY, minute_until=7 * DAY)
    fleet_like = by_range(rolled, minute_until=2 * DAY)
    for sql, want in zip((device_like, fleet_like), expected, strict=True):
        expanded = expand(sql, NOW - width, NOW, "1m", {})
        assert {r["source"] for r in await run_as_reader(grafana_db, expanded)} == {want}


def test_variables_read_no_readings_and_no_dashboard_opens_on_all_devices() -> None:
    """The metric variable once ran DISTINCT over the raw readings on every load (350 ms
    at 30 days and growing), and the device variable opened on All devices."""
    for name, dashboard in dashboards().items():
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable["type"] == "query":
                assert not re.search(r"\breadings(_1[mh])?\b", variable["query"]), (name, variable)
            if variable["name"] == "device":
                assert not variable.get("includeAll") and not variable.get("multi"), name
            assert "current" not in variable or not variable["current"], (name, variable)


def test_the_files_are_what_the_code_renders_and_read_back_through_the_sdk() -> None:
    assert write(DASHBOARD_DIR, check=True) == [], (
        "deploy/grafana/dashboards is out of date: run python -m fleetline_dev.grafana")
    for name in DASHBOARDS:
        text = json.loads((DASHBOARD_DIR / name).read_text())
        model = SdkDashboard.from_json(text)
        assert json.loads(json.dumps(model, cls=JSONEncoder)) == text, name
        assert model.uid and model.uid.startswith("fleetline-"), name
