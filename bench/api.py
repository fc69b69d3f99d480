"""bench/api.py: a 30-day hourly aggregate for one device, from rollups and from raw rows.

Starts its own PostgreSQL (fleetline_dev.embedded.LocalPostgres) and the real API service
(`python -m fleetline_cli api`), writes N days of readings for one device with binary COPY
(the rollup trigger adds them to their minutes and hours as ingest's writes would), then
times GET /v1/devices/{id}/telemetry?bucket=1h over the whole
range: aligned to the hour (answered from telemetry_1h) and shifted by one second
(answered from raw rows). Both answers are checked equal before any timing is believed.

    .venv/bin/python bench/api.py                     # 30 days, one reading every 5 s
    .venv/bin/python bench/api.py --days 7 --every 10 # smaller
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from fleetline import apikeys
from fleetline.migrate import migrate
from fleetline.settings import StorageSettings
from fleetline_dev.embedded import LocalPostgres, free_port

DEVICE = "bench-device"


def log(text: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {text}", flush=True)


async def load(url: str, days: int, every: float) -> int:
    con = await asyncpg.connect(url)
    try:
        await con.execute("INSERT INTO devices (id) VALUES ($1)", DEVICE)
        sid = await con.fetchval(
            "INSERT INTO series (device_id, metric) VALUES ($1, 'temperature') RETURNING id",
            DEVICE,
        )
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        start = end - timedelta(days=days)
        n = int(days * 86400 / every)
        await con.execute(
            "SELECT fleetline_ensure_partition(t) FROM generate_series("
            "$1::timestamptz, $2::timestamptz, interval '1 hour') t",
            start,
            end,
        )
        step = timedelta(seconds=every)
        chunk = 200_000
        for first in range(0, n, chunk):
            records = [
                (sid, start + step * i, 20 + 5 * math.sin(i / 500) + (i % 7) / 10, None)
                for i in range(first, min(n, first + chunk))
            ]
            await con.copy_records_to_table(
                "telemetry", records=records, columns=["series_id", "ts", "value", "value_text"]
            )
        await con.execute("VACUUM ANALYZE")
        return n
    finally:
        await con.close()


async def load_fleet(url: str, devices: int) -> None:
    """`devices` registered devices with a temperature series, ten readings each, and
    their latest values (as ingest writes them)."""
    con = await asyncpg.connect(url)
    try:
        ids = [f"fleet-{i:05d}" for i in range(devices)]
        await con.copy_records_to_table(
            "devices",
            records=[(d, f'{{"site": "s{int(d[-5:]) % 10}"}}') for d in ids],
            columns=["id", "tags"],
        )
        sids = await con.fetch(
            "INSERT INTO series (device_id, metric) "
            "SELECT d, 'temperature' FROM unnest($1::text[]) d RETURNING id",
            ids,
        )
        now = datetime.now(UTC)
        records = [
            (r["id"], now - timedelta(minutes=k), 20.0 + k, None) for r in sids for k in range(10)
        ]
        await con.copy_records_to_table(
            "telemetry", records=records, columns=["series_id", "ts", "value", "value_text"]
        )
        await con.execute(
            "INSERT INTO series_latest SELECT DISTINCT ON (series_id) series_id, ts, value, "
            "value_text FROM telemetry ORDER BY series_id, ts DESC "
            "ON CONFLICT (series_id) DO NOTHING"
        )
        await con.execute("VACUUM ANALYZE")
    finally:
        await con.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--every", type=float, default=5.0, help="seconds between readings")
    parser.add_argument("--requests", type=int, default=15)
    parser.add_argument("--fleet", type=int, default=10_000, help="devices for the fleet table")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="flbench-api-") as tmp:
        os.chmod(tmp, 0o755)
        with LocalPostgres(Path(tmp) / "pg") as pg:
            url = pg.url_for("bench")
            await migrate(url, StorageSettings(timescale="off"))
            rows = await load(url, args.days, args.every)
            log(f"{rows:,} readings over {args.days} days for one device")
            await load_fleet(url, args.fleet)
            log(f"{args.fleet:,} devices with a temperature series")
            con = await asyncpg.connect(url)
            key = (await apikeys.create_key(con, name="bench", scopes=["admin"])).token
            await con.close()
            port = free_port()
            env = {
                **os.environ,
                "FLEETLINE_DATABASE_URL": url,
                "FLEETLINE_API_PORT": str(port),
                "FLEETLINE_API_METRICS_PORT": str(free_port()),
                "FLEETLINE_API_RATE_PER_KEY": "0",  # the bench is the one client
                "FLEETLINE_API_HOST": "127.0.0.1",
                "FLEETLINE_LOG_LEVEL": "WARNING",
                # Required by the API; device keys play no part in these queries.
                "FLEETLINE_DEVICE_KEY_SECRET": secrets.token_hex(32),
            }
            api = subprocess.Popen([sys.executable, "-m", "fleetline_cli", "api"], env=env)
            try:
                await run_queries(f"http://127.0.0.1:{port}", key, args)
            finally:
                api.terminate()
                api.wait(20)


async def run_queries(base: str, key: str, args: argparse.Namespace) -> None:
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120)
    for _ in range(100):
        try:
            if client.get("/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(days=args.days)
    url = f"/v1/devices/{DEVICE}/telemetry"

    def ask(begin: datetime) -> tuple[float, dict[str, Any]]:
        t0 = time.perf_counter()
        resp = client.get(
            url, params={"bucket": "1h", "from": begin.isoformat(), "to": end.isoformat()}
        )
        elapsed = time.perf_counter() - t0
        assert resp.status_code == 200, resp.text
        return elapsed, resp.json()

    _, rolled = ask(start)
    _, raw = ask(start + timedelta(seconds=1))
    assert rolled["source"] == "telemetry_1h" and raw["source"] == "telemetry"
    # The shifted range misses the first reading only; every other bucket is equal.
    for a, b in zip(rolled["items"][1:], raw["items"][1:], strict=True):
        assert a["count"] == b["count"] and a["max"] == b["max"] and a["last"] == b["last"]
        assert math.isclose(a["avg"], b["avg"], rel_tol=1e-9)
    times = {"rollup": [], "raw": []}
    for _ in range(args.requests):
        times["rollup"].append(ask(start)[0])
        times["raw"].append(ask(start + timedelta(seconds=1))[0])
    fleet: list[float] = []
    for _ in range(args.requests):
        t0 = time.perf_counter()
        resp = client.get("/v1/latest", params={"metric": "temperature", "limit": 10_000})
        fleet.append(time.perf_counter() - t0)
        assert resp.status_code == 200, resp.text
        # The fleet, and the one device of the aggregate (it has a temperature too).
        assert len(resp.json()["items"]) == min(args.fleet + 1, 10_000), len(resp.json()["items"])
    p50 = {k: statistics.median(v) * 1000 for k, v in times.items()}
    print()
    print(
        f"{args.days}-day hourly aggregate, {len(rolled['items'])} buckets, one device, "
        f"{args.requests} requests each over HTTP (median):"
    )
    print(f"  from rollups (telemetry_1h): {p50['rollup']:8.1f} ms")
    print(f"  from raw rows:               {p50['raw']:8.1f} ms")
    print(f"  rollup speed-up:             {p50['raw'] / p50['rollup']:8.1f}x")
    print(
        f"latest temperature of {min(args.fleet, 10_000):,} devices in one response "
        f"(GET /v1/latest, median): {statistics.median(fleet) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    asyncio.run(main())
