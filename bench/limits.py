"""bench/limits.py: what one flooding device does to the others, with and without limits.

Starts its own PostgreSQL, Mosquitto (the project's config and auth plugin) and one
fleetline ingest, registers well-behaved devices and one flooding device, then runs three
phases of the same length:
- calm: the well-behaved devices publish at a steady rate (the baseline);
- flood, limits on: the same, while the flooding device publishes MQTT 5 QoS 1 readings
  of many values as fast as the broker answers, under the default per-device limits;
- flood, limits off: the same, with the flooding device's limit raised out of reach.
For each phase: the well-behaved readings' rate from their first publish to the last one
stored, and how long after the phase the last one was stored (queued behind the flood);
the flood's accepted and refused publishes and its rows stored. Ratios against the calm
phase of the same run.

    .venv/bin/python bench/limits.py                 # 20 s phases, 40 devices at 10/s
    .venv/bin/python bench/limits.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt
from measure import log

from fleetline import devicekeys
from fleetline.migrate import migrate
from fleetline.settings import StorageSettings
from fleetline_dev.embedded import BrokerAuth, LocalMosquitto, LocalPostgres, free_port

SECRET = b"bench-secret-" + b"x" * 32
INGEST_PASSWORD = secrets.token_urlsafe(16)
RESULTS = Path(__file__).with_name("results")
FLOOD = "flood-0"
FLOOD_VALUES = 50  # values per flood reading: rows for ingest to write


async def register(url: str, calm: int) -> dict[str, str]:
    await migrate(url, StorageSettings(timescale="off"), create_database=True)
    con = await asyncpg.connect(url)
    try:
        ids = [f"calm-{i:04d}" for i in range(calm)] + [FLOOD]
        await con.executemany("INSERT INTO devices (id, key_version) VALUES ($1, 1)",
                              [(i,) for i in ids])
        return {i: devicekeys.derive_key(SECRET, i, 1) for i in ids}
    finally:
        await con.close()


def connect(port: int, device_id: str, key: str, protocol: int) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id, protocol=protocol)
    c.username_pw_set(device_id, key)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    up = threading.Event()
    c.on_connect = lambda *_a: up.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    if not up.wait(10):
        raise RuntimeError(f"{device_id} did not connect")
    return c


def calm_devices(port: int, keys: dict[str, str], metric: str, rate: float, seconds: float,
                 stop: threading.Event) -> int:
    """Each calm device publishes ``rate`` readings a second for ``seconds``; the count."""
    clients = [connect(port, d, k, mqtt.MQTTv311) for d, k in keys.items()]
    sent = 0
    started = time.monotonic()
    tick = 1.0 / rate
    n = 0
    try:
        while time.monotonic() - started < seconds and not stop.is_set():
            ts = int(time.time() * 1000)
            for device_id, c in zip(keys, clients, strict=True):
                body = json.dumps({"ts": ts, "values": {metric: n}}).encode()
                c.publish(f"devices/{device_id}/telemetry", body, qos=1)
                sent += 1
            n += 1
            time.sleep(max(0.0, started + n * tick - time.monotonic()))
    finally:
        for c in clients:
            c.disconnect()
            c.loop_stop()
    return sent


def flood_device(port: int, key: str, seconds: float, out: dict[str, int]) -> None:
    """Publish as fast as the broker answers (1000 in flight), MQTT 5: count what it
    accepted and refused."""
    c = connect(port, FLOOD, key, mqtt.MQTTv5)
    accepted = refused = 0
    window = threading.Semaphore(1000)

    def on_publish(_c: Any, _u: Any, _mid: int, reason: Any, _p: Any) -> None:
        nonlocal accepted, refused
        if reason.value >= 0x80:
            refused += 1
        else:
            accepted += 1
        window.release()

    c.on_publish = on_publish
    values = {f"v{i}": float(i) for i in range(FLOOD_VALUES)}
    first_ts = int(time.time() * 1000) - 3_000_000 + out.get("offset", 0)
    started = time.monotonic()
    n = 0
    try:
        while time.monotonic() - started < seconds:
            if not window.acquire(timeout=5):
                break
            # A distinct millisecond per reading (in the past hour: no clock question).
            body = json.dumps({"ts": first_ts + n, "values": values}).encode()
            c.publish(f"devices/{FLOOD}/telemetry", body, qos=1)
            n += 1
    finally:
        time.sleep(1)
        c.disconnect()
        c.loop_stop()
    out.pop("offset", None)
    out.update(published=n, accepted=accepted, refused=refused)


async def count(url: str, metric: str) -> int:
    con = await asyncpg.connect(url)
    try:
        return int(await con.fetchval(
            "SELECT count(*) FROM readings WHERE metric = $1 AND device_id LIKE 'calm-%'",
            metric))
    finally:
        await con.close()


async def flood_rows(url: str) -> int:
    con = await asyncpg.connect(url)
    try:
        return int(await con.fetchval(
            "SELECT count(*) FROM readings WHERE device_id = $1", FLOOD))
    finally:
        await con.close()


def phase(name: str, url: str, port: int, keys: dict[str, str], args: argparse.Namespace,
          flood: bool) -> dict[str, Any]:
    metric = name.replace(" ", "_").replace(",", "")
    calm_keys = {d: k for d, k in keys.items() if d != FLOOD}
    flood_out: dict[str, int] = {"offset": 1_000_000 if "off" in name else 0}
    flood_before = asyncio.run(flood_rows(url))
    flooder = threading.Thread(target=flood_device,
                               args=(port, keys[FLOOD], args.seconds, flood_out))
    if flood:
        flooder.start()
        time.sleep(1)  # the flood is on before the calm devices start
    started = time.monotonic()
    sent = calm_devices(port, calm_keys, metric, args.rate, args.seconds, threading.Event())
    ended = time.monotonic()
    deadline = ended + args.drain_timeout
    stored = 0
    while time.monotonic() < deadline:
        stored = asyncio.run(count(url, metric))
        if stored >= sent:
            break
        time.sleep(0.2)
    done = time.monotonic()
    if flood:
        flooder.join()
        # Let ingest drain the flood before the next phase.
        last, same = -1, 0
        while same < 5 and time.monotonic() < done + args.drain_timeout:
            rows = asyncio.run(flood_rows(url))
            same = same + 1 if rows == last else 0
            last = rows
            time.sleep(1)
    flood_out.pop("offset", None)
    result = {
        "calm_sent": sent,
        "calm_stored": stored,
        "calm_rate": stored / (done - started),
        "calm_offered_rate": sent / (ended - started),
        "lag_after_phase_s": done - ended,
        "flood": flood_out,
        "flood_rows": asyncio.run(flood_rows(url)) - flood_before,
    }
    log(f"{name}: calm {stored:,}/{sent:,} stored, {result['calm_rate']:,.0f} readings/s, "
        f"last stored {result['lag_after_phase_s']:.1f} s after the phase; flood {flood_out}, "
        f"{result['flood_rows']:,} flood rows")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=40, help="well-behaved devices")
    parser.add_argument("--rate", type=float, default=10.0, help="readings/s per device")
    parser.add_argument("--seconds", type=float, default=20.0, help="each phase")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.devices, args.seconds = 10, 5.0
    with tempfile.TemporaryDirectory(prefix="flb-limits-") as tmp_name:
        tmp = Path(tmp_name)
        with LocalPostgres(tmp / "pg") as pg:
            url = pg.url_for("bench_limits")
            keys = asyncio.run(register(url, args.devices))
            auth = BrokerAuth(url, SECRET, services={"ingest": INGEST_PASSWORD})
            with LocalMosquitto(tmp / "mq", auth=auth) as broker:
                env = {**os.environ, "FLEETLINE_DATABASE_URL": url,
                       "FLEETLINE_MQTT_URL":
                           f"mqtt://ingest:{INGEST_PASSWORD}@127.0.0.1:{broker.port}",
                       "FLEETLINE_INGEST_HTTP_HOST": "127.0.0.1",
                       "FLEETLINE_INGEST_HTTP_PORT": str(free_port()),
                       "FLEETLINE_LOG_LEVEL": "WARNING", "FLEETLINE_STORAGE_TIMESCALE": "off"}
                ingest = subprocess.Popen([sys.executable, "-m", "fleetline_cli", "ingest"],
                                          env=env)
                try:
                    time.sleep(3)
                    results = {"calm": phase("calm", url, broker.port, keys, args, False)}
                    results["flood, limits on"] = phase("flood limits on", url, broker.port,
                                                        keys, args, True)
                    asyncio.run(unlimit(url))
                    time.sleep(1)
                    results["flood, limits off"] = phase("flood limits off", url, broker.port,
                                                         keys, args, True)
                finally:
                    ingest.terminate()
                    ingest.wait(60)
    base = results["calm"]["calm_rate"]
    print()
    print(f"One device flooding ({FLOOD_VALUES} values a reading, MQTT 5 QoS 1, 1000 in "
          f"flight) beside {args.devices} devices at {args.rate:g}/s, {args.seconds:g} s phases")
    for name, r in results.items():
        flood = r["flood"]
        print(f"  {name:18} well-behaved {r['calm_rate']:7,.0f} readings/s "
              f"({r['calm_rate'] / base:.2f}x calm), last stored {r['lag_after_phase_s']:5.1f} s "
              f"after; flood accepted {flood.get('accepted', 0):,}, refused "
              f"{flood.get('refused', 0):,}, {r['flood_rows']:,} rows")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"limits-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"results: {out.relative_to(RESULTS.parent.parent)}")


async def unlimit(url: str) -> None:
    con = await asyncpg.connect(url)
    try:
        await con.execute(
            "INSERT INTO device_limits (selector, device_id, messages_per_second, "
            "burst_messages, bytes_per_second, burst_bytes) "
            "VALUES ($1, $2, 1e6, 1e8, 1e12, 1e12)", f"device:{FLOOD}", FLOOD)
    finally:
        await con.close()


if __name__ == "__main__":
    main()
