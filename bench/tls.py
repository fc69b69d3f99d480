"""bench/tls.py: what TLS costs devices, against plain MQTT on the same broker, same run.

Starts its own PostgreSQL and Mosquitto with the project's config, the auth plugin and a
TLS listener with a certificate from a local CA (ECDSA P-256, as `fleetline up` makes),
registers devices with their keys, then alternates plain and TLS rounds:
- logins: devices connect one after another (TCP, TLS handshake verifying the CA, CONNECT
  with the device's key checked by the plugin, CONNACK), then disconnect; logins/s;
- publishing: one device publishes QoS 1 readings as fast as the broker acknowledges
  them (1000 in flight); messages/s.
Medians over the rounds, and TLS / plain ratios.

    .venv/bin/python bench/tls.py                   # 3 rounds, 300 logins, 20,000 messages
    .venv/bin/python bench/tls.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as mqtt

from fleetline import devicekeys
from fleetline.migrate import migrate
from fleetline.settings import StorageSettings
from fleetline_dev.certs import ensure_local_ca
from fleetline_dev.embedded import BrokerAuth, LocalMosquitto, LocalPostgres

SECRET = b"bench-secret-" + b"x" * 32
RESULTS = Path(__file__).with_name("results")


def log(text: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {text}", flush=True)


async def register(url: str, devices: int) -> dict[str, str]:
    await migrate(url, StorageSettings(timescale="off"), create_database=True)
    con = await asyncpg.connect(url)
    try:
        ids = [f"tls-{i:05d}" for i in range(devices)]
        await con.executemany("INSERT INTO devices (id, key_version) VALUES ($1, 1)",
                              [(i,) for i in ids])
        # This measures TLS, not the per-device limits: one device publishes flat out.
        await con.execute("UPDATE device_limits SET messages_per_second = 1e6, "
                          "burst_messages = 1e8, bytes_per_second = 1e12, burst_bytes = 1e12 "
                          "WHERE selector = 'default'")
        return {i: devicekeys.derive_key(SECRET, i, 1) for i in ids}
    finally:
        await con.close()


def client(device_id: str, key: str, tls: ssl.SSLContext | None) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device_id,
                    protocol=mqtt.MQTTv311)
    c.username_pw_set(device_id, key)
    if tls is not None:
        c.tls_set_context(tls)
    return c


def logins(port: int, keys: dict[str, str], tls: ssl.SSLContext | None) -> float:
    """Logins per second, one after another."""
    started = time.perf_counter()
    for device_id, key in keys.items():
        c = client(device_id, key, tls)
        done = threading.Event()
        refused: list[Any] = []

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any,
                       refused: list[Any] = refused, done: threading.Event = done) -> None:
            if reason.is_failure:
                refused.append(reason)
            done.set()

        c.on_connect = on_connect
        c.connect("127.0.0.1", port)
        while not done.is_set():
            c.loop(0.1)
        if refused:
            raise RuntimeError(f"{device_id} refused: {refused[0]}")
        c.disconnect()
        c.loop(0.01)
    return len(keys) / (time.perf_counter() - started)


def publish(port: int, device_id: str, key: str, messages: int,
            tls: ssl.SSLContext | None) -> float:
    """QoS 1 messages per second, acknowledged by the broker."""
    c = client(device_id, key, tls)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    acked = threading.Event()
    count = [0]

    def on_publish(*_args: Any) -> None:
        count[0] += 1
        if count[0] == messages:
            acked.set()

    c.on_publish = on_publish
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        topic = f"devices/{device_id}/telemetry"
        payload = json.dumps({"values": {"temperature": 21.5}}).encode()
        started = time.perf_counter()
        for _ in range(messages):
            c.publish(topic, payload, qos=1)
        if not acked.wait(300):
            raise RuntimeError(f"only {count[0]} of {messages} acknowledged")
        return messages / (time.perf_counter() - started)
    finally:
        c.disconnect()
        c.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--logins", type=int, default=300)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.logins, args.messages = 1, 30, 1000
    with tempfile.TemporaryDirectory(prefix="flb-tls-") as tmp_name:
        tmp = Path(tmp_name)
        with LocalPostgres(tmp / "pg") as pg:
            url = pg.url_for("bench_tls")
            keys = asyncio.run(register(url, args.logins + 1))
            publisher, *loggers = keys
            tls_files = ensure_local_ca(tmp / "tls", ["127.0.0.1"])
            context = ssl.create_default_context(cafile=str(tls_files.ca_cert))
            auth = BrokerAuth(url, SECRET)
            with LocalMosquitto(tmp / "mq", auth=auth, tls=tls_files) as broker:
                log(f"mosquitto on :{broker.port} (plain) and :{broker.tls_port} (TLS), "
                    f"{len(loggers)} devices")
                results: dict[str, list[float]] = {k: [] for k in
                                                   ("login_plain", "login_tls", "pub_plain",
                                                    "pub_tls")}
                login_keys = {d: keys[d] for d in loggers}
                for n in range(args.rounds):
                    for mode, port, tls in (("plain", broker.port, None),
                                            ("tls", broker.tls_port or 0, context)):
                        rate = logins(port, login_keys, tls)
                        results[f"login_{mode}"].append(rate)
                        rate_pub = publish(port, publisher, keys[publisher], args.messages, tls)
                        results[f"pub_{mode}"].append(rate_pub)
                        log(f"round {n + 1} {mode}: {rate:,.0f} logins/s, "
                            f"{rate_pub:,.0f} messages/s")
    med = {k: statistics.median(v) for k, v in results.items()}
    print()
    print(f"TLS against plain MQTT, Mosquitto with the auth plugin, medians of {args.rounds}")
    print(f"  logins (key checked, one after another): plain {med['login_plain']:,.0f}/s, "
          f"TLS {med['login_tls']:,.0f}/s, TLS / plain = "
          f"{med['login_tls'] / med['login_plain']:.2f}")
    print(f"  QoS 1 publishes, one device:            plain {med['pub_plain']:,.0f}/s, "
          f"TLS {med['pub_tls']:,.0f}/s, TLS / plain = {med['pub_tls'] / med['pub_plain']:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"tls-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({"args": vars(args), "runs": results, "medians": med}, indent=2))
    print(f"results: {out.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
