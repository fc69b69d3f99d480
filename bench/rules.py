"""bench/rules.py: how fast the rules service evaluates, and how soon an alarm follows a reading.

    .venv/bin/python bench/rules.py            # 1k rules, 10k devices, 100k readings
    .venv/bin/python bench/rules.py --quick    # smaller, about 30 s

Three measurements, in one run:

(a) Evaluation core, in this process: the same readings through the rules service's
    indexed evaluator (per-device map metric -> matching rules, built once per device)
    and through the naive approach (every rule checked against every reading: match,
    metric, then evaluate). Same rules, same readings, same transitions (checked equal).
(b) The service end to end: its own PostgreSQL (fleetline_dev.embedded.LocalPostgres) and
    Mosquitto (LocalMosquitto), `python -m fleetline_cli rules` as production runs it. A
    backlog of single-reading QoS 1 messages is queued for its persistent session while
    it is stopped; then it is started and the drain is timed (messages counted by its
    /metrics), start-up excluded.
(c) Publish -> alarm latency, live: one reading over the threshold (for_s 0) published,
    timed until the alarm's stream notification (LISTEN fleetline_stream) arrives, i.e.
    until the alarm is committed.

Rules: device i is tagged site=s{i % 100}; rule j matches site s{j % 100} on metric
m{(j // 100) % 5}, threshold 90 (for_s 0, clear below 80). So each device is matched by
10 rules, 2 per metric, and a reading of 3 metrics evaluates 6 (rule, device) states;
values stay below the threshold except where (c) raises.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import paho.mqtt.client as paho
from measure import log

from fleetline import rules_engine
from fleetline.migrate import migrate
from fleetline.protocol import Row
from fleetline.settings import StorageSettings
from fleetline_dev.embedded import LocalMosquitto, LocalPostgres, free_port
from fleetline_rules.evaluator import Evaluator, RuleSet

METRICS = 5
SITES = 100


def rule_rows(n_rules: int) -> list[dict[str, Any]]:
    return [
        {
            "id": j + 1,
            "name": f"bench {j}",
            "kind": "threshold",
            "metric": f"m{(j // SITES) % METRICS}",
            "match": {"tags": {"site": f"s{j % SITES}"}},
            "raise_condition": {"op": ">", "value": 90, "for_s": 0},
            "clear_condition": {"op": "<", "value": 80, "for_s": 0},
            "severity": "major",
            "message": "",
            "actions": [],
        }
        for j in range(n_rules)
    ]


def device_id(i: int) -> str:
    return f"bench-{i:05d}"


# -- (a) the evaluation core ------------------------------------------------------------


def naive(
    rules: list[rules_engine.Rule],
    tags: dict[str, dict[str, Any]],
    readings: list[tuple[str, list[Row]]],
) -> tuple[int, float]:
    states: dict[tuple[int, str], rules_engine.State] = {}
    transitions = 0
    t0 = time.perf_counter()
    for dev, rows in readings:
        device_tags = tags.get(dev, {})
        for rule in rules:
            if not rule.matches(dev, device_tags):
                continue
            for _d, metric, ts, value, _t in rows:
                if metric != rule.metric or value is None:
                    continue
                state = states.setdefault((rule.id, dev), rules_engine.State())
                transitions += len(rules_engine.evaluate(rule, state, ts, value))
    return transitions, time.perf_counter() - t0


def indexed(
    rules: list[rules_engine.Rule],
    tags: dict[str, dict[str, Any]],
    readings: list[tuple[str, list[Row]]],
) -> tuple[int, float]:
    ev = Evaluator(RuleSet(rules, tags))
    transitions = 0
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    for dev, rows in readings:
        transitions += len(ev.reading(dev, rows, now))
    transitions += len(ev.dirty)  # updates are coalesced; none expected here
    return transitions, time.perf_counter() - t0


def core(n_rules: int, n_devices: int, n_readings: int) -> dict[str, float]:
    rules = [rules_engine.Rule.from_row(r) for r in rule_rows(n_rules)]
    tags = {device_id(i): {"site": f"s{i % SITES}"} for i in range(n_devices)}
    start = datetime.now(UTC) - timedelta(hours=1)
    rng = random.Random(1)
    readings: list[tuple[str, list[Row]]] = []
    for k in range(n_readings):
        dev = device_id(k % n_devices)
        ts = start + timedelta(milliseconds=k)
        readings.append((dev, [(dev, f"m{m}", ts, rng.uniform(0, 85), None) for m in range(3)]))
    t_naive, s_naive = naive(rules, tags, readings)
    t_indexed, s_indexed = indexed(rules, tags, readings)
    assert t_naive == t_indexed, (t_naive, t_indexed)
    return {"naive": n_readings / s_naive, "indexed": n_readings / s_indexed}


# -- (b), (c) the service ---------------------------------------------------------------


class Service:
    def __init__(self, dsn: str, mqtt_url: str, workdir: Path) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "FLEETLINE_DATABASE_URL": dsn,
            "FLEETLINE_MQTT_URL": mqtt_url,
            "FLEETLINE_LOG_LEVEL": "WARNING",
            "FLEETLINE_LOG_FORMAT": "json",
            "FLEETLINE_RULES_HTTP_HOST": "127.0.0.1",
            "FLEETLINE_RULES_HTTP_PORT": str(self.port),
            "FLEETLINE_RULES_CLIENT_ID": "bench-rules",
            "FLEETLINE_RULES_SHARE_GROUP": "",
            "FLEETLINE_RULES_MAX_PENDING_MESSAGES": "20000",
        }
        self.log = workdir / "rules.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> None:
        self.body = ""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleetline_cli", "rules"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def start(self) -> float:
        t0 = time.perf_counter()
        self.spawn()
        assert self.proc is not None
        while self.get("/readyz") != 200:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.02)
        return time.perf_counter() - t0

    def get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                self.body = r.read().decode()
                return int(r.status)
        except OSError:
            self.body = ""
            return 0

    def metric(self, name: str) -> float:
        self.get("/metrics")
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in self.body.splitlines()
            if line.startswith(name) and not line.startswith("#")
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)


def publish(mqtt_port: int, messages: list[tuple[str, bytes]]) -> float:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{os.getpid()}")
    client.max_inflight_messages_set(2000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", mqtt_port)
    client.loop_start()
    t0 = time.perf_counter()
    # In chunks: paho's message ids wrap at 65,535, and an id still in flight cannot be
    # reused (the publish would fail with ERR_QUEUE_SIZE).
    for first in range(0, len(messages), 20_000):
        infos = [client.publish(t, p, qos=1) for t, p in messages[first : first + 20_000]]
        for info in infos:
            info.wait_for_publish(60)
    elapsed = time.perf_counter() - t0
    client.loop_stop()
    client.disconnect()
    return elapsed


async def setup_db(dsn: str, n_rules: int, n_devices: int) -> None:
    con = await asyncpg.connect(dsn)
    try:
        await con.executemany(
            "INSERT INTO devices (id, tags) VALUES ($1, $2::jsonb)",
            [
                (device_id(i), orjson.dumps({"site": f"s{i % SITES}"}).decode())
                for i in range(n_devices)
            ],
        )
        await con.executemany(
            "INSERT INTO rules (name, kind, metric, match, raise_condition, clear_condition, "
            "severity) VALUES ($1, 'threshold', $2, $3::jsonb, $4::jsonb, $5::jsonb, 'major')",
            [
                (
                    r["name"],
                    r["metric"],
                    orjson.dumps(r["match"]).decode(),
                    orjson.dumps(r["raise_condition"]).decode(),
                    orjson.dumps(r["clear_condition"]).decode(),
                )
                for r in rule_rows(n_rules)
            ],
        )
    finally:
        await con.close()


async def latency(dsn: str, mqtt_port: int, samples: int) -> list[float]:
    """Publish one reading over the threshold and wait for its alarm's NOTIFY."""
    con = await asyncpg.connect(dsn)
    arrived: asyncio.Queue[str] = asyncio.Queue()
    await con.add_listener("fleetline_stream", lambda *a: arrived.put_nowait(a[3]))
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-latency")
    client.connect("127.0.0.1", mqtt_port)
    client.loop_start()
    out = []
    try:
        for k in range(samples):
            dev = device_id(k)  # site s{k}: its m0 rules raise at > 90
            t0 = time.perf_counter()
            client.publish(
                f"devices/{dev}/telemetry", orjson.dumps({"values": {"m0": 95.0}}), qos=1
            )
            while True:
                payload = await asyncio.wait_for(arrived.get(), 10)
                if dev in payload and '"active"' in payload:
                    break
            out.append(time.perf_counter() - t0)
            await asyncio.sleep(0.05)
    finally:
        client.loop_stop()
        client.disconnect()
        await con.close()
    return out


def service_run(n_rules: int, n_devices: int, n_messages: int, samples: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-rules-") as tmp:
        work = Path(tmp)
        with LocalPostgres(work / "pg") as pg, LocalMosquitto(work / "mqtt") as broker:
            dsn = pg.url_for("bench")
            asyncio.run(migrate(dsn, StorageSettings(timescale="off")))
            asyncio.run(setup_db(dsn, n_rules, n_devices))
            svc = Service(dsn, broker.url, work)
            startup = svc.start()  # creates the persistent session; start-up without backlog
            svc.stop()
            rng = random.Random(2)
            base = int(time.time() * 1000) - n_messages
            messages = []
            for k in range(n_messages):
                values = {f"m{m}": round(rng.uniform(0, 85), 2) for m in range(3)}
                messages.append(
                    (
                        f"devices/{device_id(k % n_devices)}/telemetry",
                        orjson.dumps({"ts": base + k, "values": values}),
                    )
                )
            log(f"publishing a backlog of {n_messages} messages")
            publish(broker.port, messages)
            # The backlog arrives right after the CONNACK, while the service starts: time
            # from spawn, less the start-up measured without a backlog.
            t0 = time.perf_counter()
            svc.spawn()
            while svc.metric("fleetline_rules_messages_total") < n_messages:
                assert svc.proc is not None and svc.proc.poll() is None, "the service died"
                assert time.perf_counter() - t0 < 600, "the drain stalled"
                time.sleep(0.02)
            drain = time.perf_counter() - t0 - startup
            evaluations = svc.metric("fleetline_rules_evaluations_total")
            log(f"drained in {drain:.2f} s; measuring publish -> alarm latency")
            lat = asyncio.run(latency(dsn, broker.port, samples))
            svc.stop()
    return {
        "startup_s": startup,
        "drain_s": drain,
        "messages_per_s": n_messages / drain,
        "evaluations_per_s": evaluations / drain,
        "latency": lat,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rules", type=int, default=1000)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--core-readings", type=int, default=100_000)
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.core_readings, args.latency_samples = 20_000, 20_000, 20
    log(
        f"(a) evaluation core: {args.rules} rules, {args.devices} devices, "
        f"{args.core_readings} readings of 3 metrics"
    )
    c = core(args.rules, args.devices, args.core_readings)
    log("(b), (c) the service")
    s = service_run(args.rules, args.devices, args.messages, args.latency_samples)
    lat = sorted(s["latency"])
    p95 = lat[min(len(lat) - 1, int(len(lat) * 0.95))]
    print()
    print(f"rules {args.rules}, devices {args.devices}, 3 metrics per reading")
    print("(a) evaluation core, readings/s (one process, no I/O):")
    print(f"    naive (every rule per reading)  {c['naive']:>12,.0f}")
    print(
        f"    indexed (fleetline_rules)       {c['indexed']:>12,.0f}   "
        f"x{c['indexed'] / c['naive']:.1f} naive"
    )
    print(
        f"(b) service backlog drain: {args.messages} messages in {s['drain_s']:.2f} s = "
        f"{s['messages_per_s']:,.0f} readings/s ({s['evaluations_per_s']:,.0f} "
        f"rule evaluations/s), start-up {s['startup_s']:.2f} s; core share "
        f"{s['messages_per_s'] / c['indexed']:.0%} of (a)"
    )
    print(
        f"(c) publish -> alarm committed: median {statistics.median(lat) * 1000:.1f} ms, "
        f"p95 {p95 * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms ({len(lat)} samples)"
    )


if __name__ == "__main__":
    main()
