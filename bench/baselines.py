"""Baseline MQTT -> PostgreSQL consumers that bench/ingest.py compares fleetline ingest to.

    python bench/baselines.py naive    --mqtt-host H --mqtt-port P --dsn URL --client-id ID
    python bench/baselines.py telegraf --mqtt-host H --mqtt-port P --dsn URL --client-id ID \
        [--queue-limit 10000]

Both subscribe to ``devices/+/telemetry`` (QoS 1) with a persistent MQTT 3.1.1 session
(clean_session False) under ``--client-id``, write into fleetline's schema (``series`` +
``telemetry``) and run until SIGTERM/SIGINT.

naive
    paho, one ``INSERT ... ON CONFLICT DO NOTHING`` per reading in autocommit mode from
    ``on_message``; series ids come from a dict cache (INSERT ... RETURNING on a miss).
    paho sends the PUBACK when ``on_message`` returns, i.e. after the row is committed.
    asyncpg is driven synchronously (``run_until_complete`` on a private event loop): the
    project has no synchronous driver, and the loop overhead (~tens of us) is small next
    to a commit.

telegraf
    What Telegraf's mqtt_consumer + postgresql output do: aiomqtt with automatic
    acknowledgement (paho acknowledges on receipt), ``json.loads``, a buffer flushed at
    5000 rows or every 1 s, then binary COPY (asyncpg ``copy_records_to_table``) into a
    temporary staging table and ``INSERT ... ON CONFLICT DO NOTHING`` into telemetry, in
    one transaction. aiomqtt's incoming queue is bounded by ``--queue-limit``
    (``max_queued_incoming_messages``; 0 = unbounded): when it is full aiomqtt discards
    messages paho has already acknowledged, i.e. they are lost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import asyncpg
import paho.mqtt.client as paho

# The same (device, metric) -> series id resolution as ingest: same schema, same cost.
from fleetline_ingest.writer import RESOLVE_SERIES

TOPIC = "devices/+/telemetry"
FLUSH_ROWS = 5000
FLUSH_SECONDS = 1.0

INSERT_ONE = (
    "INSERT INTO telemetry (series_id, ts, value) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
)
SERIES_ONE = """
WITH ins AS (
    INSERT INTO series (device_id, metric) VALUES ($1, $2)
    ON CONFLICT (device_id, metric) DO NOTHING RETURNING id
)
SELECT id FROM ins UNION ALL SELECT id FROM series WHERE device_id = $1 AND metric = $2
LIMIT 1
"""
STAGING_DDL = """
CREATE TEMPORARY TABLE IF NOT EXISTS bench_staging (
    series_id INTEGER, ts TIMESTAMPTZ, value DOUBLE PRECISION
) ON COMMIT DELETE ROWS
"""
MOVE_STAGED = """
INSERT INTO telemetry (series_id, ts, value)
SELECT series_id, ts, value FROM bench_staging ON CONFLICT DO NOTHING
"""


def _readings(payload: bytes) -> list[dict[str, Any]]:
    doc = json.loads(payload)
    return doc if isinstance(doc, list) else [doc]


def _ts(ms: float) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


# -- naive ----------------------------------------------------------------------------


def run_naive(args: argparse.Namespace) -> None:
    loop = asyncio.new_event_loop()
    run = loop.run_until_complete
    con: asyncpg.Connection[Any] = run(asyncpg.connect(args.dsn))
    series: dict[tuple[str, str], int] = {}

    def series_id(device: str, metric: str) -> int:
        key = (device, metric)
        sid = series.get(key)
        if sid is None:
            sid = int(run(con.fetchval(SERIES_ONE, device, metric)))
            series[key] = sid
        return sid

    def on_message(_c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        device = msg.topic.split("/", 2)[1]
        for reading in _readings(msg.payload):
            ts = _ts(reading["ts"])
            for metric, value in reading["values"].items():
                run(con.execute(INSERT_ONE, series_id(device, metric), ts, float(value)))

    client = paho.Client(
        paho.CallbackAPIVersion.VERSION2, client_id=args.client_id, protocol=paho.MQTTv311,
        clean_session=False,
    )
    client.on_message = on_message
    client.on_connect = lambda c, *_a: c.subscribe(TOPIC, qos=1)
    client.on_subscribe = lambda *_a: print("subscribed", flush=True)

    def stop(*_a: Any) -> None:
        client.disconnect()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    client.connect(args.mqtt_host, args.mqtt_port, keepalive=60)
    client.loop_forever()
    run(con.close())


# -- Telegraf-style -------------------------------------------------------------------


class TelegrafStyle:
    def __init__(self, con: asyncpg.Connection[Any]) -> None:
        self.con = con
        self.buffer: list[tuple[str, str, datetime, float]] = []
        self.first_at = 0.0
        self.series: dict[tuple[str, str], int] = {}
        self.lock = asyncio.Lock()

    def add(self, topic: str, payload: bytes) -> None:
        device = topic.split("/", 2)[1]
        if not self.buffer:
            self.first_at = time.monotonic()
        for reading in _readings(payload):
            ts = _ts(reading["ts"])
            for metric, value in reading["values"].items():
                self.buffer.append((device, metric, ts, float(value)))

    async def flush(self) -> None:
        async with self.lock:
            rows, self.buffer = self.buffer, []
            if not rows:
                return
            missing = list({(d, m) for d, m, _, _ in rows} - self.series.keys())
            if missing:
                found = await self.con.fetch(
                    RESOLVE_SERIES, [k[0] for k in missing], [k[1] for k in missing]
                )
                for r in found:
                    self.series[(r["device_id"], r["metric"])] = r["id"]
            series = self.series
            records = [(series[(d, m)], ts, v) for d, m, ts, v in rows]
            async with self.con.transaction():
                await self.con.copy_records_to_table(
                    "bench_staging", records=records, columns=("series_id", "ts", "value")
                )
                await self.con.execute(MOVE_STAGED)

    async def timer(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            if self.buffer and time.monotonic() - self.first_at >= FLUSH_SECONDS:
                await self.flush()


async def run_telegraf(args: argparse.Namespace) -> None:
    con = await asyncpg.connect(args.dsn)
    await con.execute(STAGING_DDL)
    sink = TelegrafStyle(con)
    client = aiomqtt.Client(
        args.mqtt_host,
        args.mqtt_port,
        identifier=args.client_id,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=False,
        max_queued_incoming_messages=args.queue_limit or None,
    )
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async def consume() -> None:
        async with client:
            await client.subscribe(TOPIC, qos=1)
            print("subscribed", flush=True)
            async for msg in client.messages:
                sink.add(str(msg.topic), msg.payload)  # type: ignore[arg-type]
                if len(sink.buffer) >= FLUSH_ROWS:
                    await sink.flush()

    tasks = [asyncio.create_task(consume()), asyncio.create_task(sink.timer())]
    waiter = asyncio.create_task(stopping.wait())
    await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        t.cancel()
    for t in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await t
    await sink.flush()
    await con.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("naive", "telegraf"))
    parser.add_argument("--mqtt-host", default="127.0.0.1")
    parser.add_argument("--mqtt-port", type=int, required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--queue-limit", type=int, default=10_000,
                        help="telegraf: aiomqtt max_queued_incoming_messages (0 = unbounded)")
    args = parser.parse_args()
    if args.kind == "naive":
        run_naive(args)
    else:
        asyncio.run(run_telegraf(args))


if __name__ == "__main__":
    main()
