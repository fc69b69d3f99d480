"""bench/soak.py: the whole stack at half its maximum ingest rate for a long time.

    .venv/bin/python bench/soak.py                # measure the maximum, then 30 minutes
    .venv/bin/python bench/soak.py --minutes 1    # smoke run, about 2.5 minutes
    .venv/bin/python bench/soak.py --rate 8000    # skip the measurement, soak at 8,000 rows/s
    .venv/bin/python bench/soak.py --analyse bench/results/soak-<timestamp>.json
                                                  # run nothing: judge a saved run again

Starts its own PostgreSQL (fleetline_dev.embedded.LocalPostgres, fsync on) and Mosquitto
(LocalMosquitto, the project's deploy/mosquitto/fleetline.conf) with the auth plugin
(BrokerAuth: the services and the publishers log in with service accounts), and runs
`python -m fleetline_cli ingest`, `api` and `rules` as production runs them
(bench/stack.py). One threshold rule on every device's temperature keeps rules working.

1. The maximum, two ways. (a) A backlog drain, ingest's own rate: ingest is stopped,
   its persistent session queues `--max-messages` single-reading QoS 1 messages from
   `--devices` devices (bench/publish.py, 2 processes), ingest is started again and its
   `fleetline_ingest_rows_total` is polled every 100 ms: rate = rows stored after it
   answered /readyz / time from /readyz to the last row (median of `--max-repeat`).
   (b) A ramp, the rate the whole machine sustains with the publishers running: live
   publishing (as in 2.) for `--ramp-seconds` a step, from `--ramp-start` up by
   `--ramp-factor`; a step holds when the publishers achieved 95% of it and ingest had
   stored every reading within 3 s of the end; a step that does not hold is tried once
   more. The maximum is the lower of the two: on 2 shared cores, the ramp's.
2. The soak: bench/publish.py's live publishers (QoS 1, ts = send time) at half that rate
   in all for `--minutes`, among them `--probes` probes a second on the devices
   `bench-probe-N`; a poller in this process records poll time - ts of each probe when
   it first becomes visible (every 10 ms), as bench/ingest.py's live phase does.
3. Every `--interval` (10) s a sample: RSS of every process (psutil), the probes' latency
   p50/p99 of the window, the broker's $SYS counters (store/messages/count: what the
   broker holds, queued and in flight; heap/current: its own heap; publish/messages/
   received: the achieved publish rate), ingest's and rules' /metrics (pending messages,
   rows stored, error counters), the API's answer time to GET /v1/devices?limit=100, and
   the CPU cores of each process and of others (processes outside the benchmark).
4. At the end: every published reading stored (count(*) after the tail), no error counter
   risen during the soak (ingest's dead letters, failed writes and duplicate rows, the
   broker's dropped messages, rules' failed writes), and per series a least-squares slope
   and the first-third against the last-third mean of the judged samples: those after
   the first `--warmup` seconds, inside `--window` if given, and without the samples in
   which other work used more than `--max-other-load` cores. "Growth" when both the
   thirds' difference and the slope over the judged span exceed the series' threshold.
   The report names the judged samples and gives the whole run's table for reference.
   Raw samples go to bench/results/soak-<timestamp>.json, plots to
   docs/images/soak-*.png (`--plots`). `--analyse FILE` does all of this step again from
   a saved file, without running anything.
Exit 1 when a reading was lost, the publishers fell short, an error counter rose, a
series grew or too few samples were left to judge.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import paho.mqtt.client as paho  # noqa: E402
import psutil  # type: ignore[import-untyped]  # noqa: E402
import publish as pub  # noqa: E402
from ingest import LATENCY_QUERY, PROBE_SERIES  # noqa: E402
from measure import CpuWindow, log, pct, proc_cpu, tree_cpu, tree_rss  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from stack import (  # noqa: E402
    Service,
    Stack,
    add_api_env,
    admin_key,
    api_service,
    environment,
    ingest_service,
    query_value,
    rules_service,
    service_env,
    workdir,
)

from fleetline.migrate import migrate  # noqa: E402
from fleetline.settings import StorageSettings  # noqa: E402
from fleetline_dev.embedded import BrokerAuth, LocalMosquitto, LocalPostgres  # noqa: E402

INGEST_USER = "fleetline-ingest"
API_USER = "fleetline-api"
RULES_USER = "fleetline-rules"
BENCH_USER = "fleetline-bench"
IMAGES_DIR = ROOT / "docs" / "images"
RESULTS_DIR = BENCH_DIR / "results"
MB = 1024 * 1024
DRAIN_POLL_SECONDS = 0.1
DRAIN_TIMEOUT_SECONDS = 300.0
# A ramp step holds when ingest has stored every reading this soon after the publishers
# stopped (it writes a batch every 50 ms when it keeps up).
RAMP_MAX_LAG_SECONDS = 3.0
RAMP_WAIT_SECONDS = 30.0
RAMP_MAX_STEPS = 24
LATENCY_POLL_SECONDS = 0.01
TAIL_TIMEOUT_SECONDS = 120.0
# Publisher processes (bench/publish.py, one paho client each, the devices split between
# them). One process is bound near 4,000-12,000 messages/s by its own core, depending on
# what else runs; with two the bound is the machine's.
PUBLISHERS = 2
# A publish rate achieved below this share of the target fails the run.
MIN_RATE_SHARE = 0.95
SYS_TOPICS = (
    "$SYS/broker/store/messages/count",
    "$SYS/broker/store/messages/bytes",
    "$SYS/broker/messages/stored",
    "$SYS/broker/publish/messages/received",
    "$SYS/broker/publish/messages/dropped",
    "$SYS/broker/messages/received",
    "$SYS/broker/clients/connected",
    "$SYS/broker/heap/current",
)
RECEIVED = "$SYS/broker/publish/messages/received"
INGEST_METRICS = (
    "fleetline_ingest_pending_messages",
    "fleetline_ingest_paused",
    "fleetline_ingest_rows_total",
    "fleetline_ingest_messages_total",
    "fleetline_ingest_duplicate_rows_total",
    "fleetline_ingest_dead_letters_total",
    "fleetline_ingest_write_errors_total",
    "fleetline_ingest_batches_total",
    "fleetline_broker_stored_messages",
    "fleetline_broker_dropped_messages",
    "fleetline_ingest_broker_drops_seen_total",
)
RULES_METRICS = (
    "fleetline_rules_pending_messages",
    "fleetline_rules_paused",
    "fleetline_rules_messages_total",
    "fleetline_rules_evaluations_total",
    "fleetline_rules_transitions_total",
    "fleetline_rules_write_errors_total",
)
# One threshold rule on every device: it raises on about 1 reading in 1,000 (the
# publishers' temperatures cycle through 20.0-119.6) and clears below 100.
RULE = (
    "INSERT INTO rules (name, kind, metric, match, raise_condition, clear_condition, severity) "
    "VALUES ('soak: hot', 'threshold', 'temperature', '{}'::jsonb, "
    """'{"op": ">", "value": 119.5, "for_s": 0}'::jsonb, """
    """'{"op": "<", "value": 100, "for_s": 0}'::jsonb, 'minor')"""
)


@dataclass(frozen=True)
class Series:
    """A sampled quantity and the rise over the judged window that counts as growth: the
    larger of ``rel`` times its first-third mean and ``floor`` (in its own unit)."""

    key: str
    label: str
    unit: str
    rel: float
    floor: float


SERIES = (
    Series("rss_mb.ingest", "RSS ingest", "MB", 0.05, 5.0),
    Series("rss_mb.api", "RSS api", "MB", 0.05, 5.0),
    Series("rss_mb.rules", "RSS rules", "MB", 0.05, 5.0),
    # Mosquitto's RSS keeps what the allocator got during the drain's backlog (over
    # 100 MB), which hides a rise; its own count of its heap does not.
    Series("rss_mb.mosquitto", "RSS mosquitto", "MB", 0.05, 5.0),
    Series("broker.heap_mb", "mosquitto heap/current ($SYS)", "MB", 0.25, 0.25),
    Series("rss_mb.postgres_uss", "USS postgres (all its processes)", "MB", 0.10, 10.0),
    Series("latency_ms.p50", "latency p50", "ms", 0.50, 20.0),
    Series("latency_ms.p99", "latency p99", "ms", 0.50, 50.0),
    Series("broker.store_count", "broker store/messages/count", "msgs", 0.50, 1000.0),
    Series("ingest.pending", "ingest pending messages", "msgs", 0.50, 1000.0),
    Series("rules.pending", "rules pending messages", "msgs", 0.50, 1000.0),
    Series("api_ms", "API GET /v1/devices?limit=100", "ms", 0.50, 20.0),
)
# Reported with the others, not judged: rates follow the target, not time.
INFO_SERIES = (
    Series("rss_mb.postgres", "RSS postgres (sum of its processes)", "MB", 0.0, 0.0),
    Series("rss_mb.postgres_pss", "PSS postgres (all its processes)", "MB", 0.0, 0.0),
    Series("rate.published", "publish rate (broker)", "msg/s", 0.0, 0.0),
    Series("rate.stored", "rows stored per second", "rows/s", 0.0, 0.0),
    Series("cpu_cores.other", "other load", "cores", 0.0, 0.0),
)


@dataclass(frozen=True)
class ServiceCounter:
    """A counter of ingest's or rules' /metrics (``source``): an error counter fails the
    verdict when it rises during the soak; an activity counter is reported as its rise
    (the totals also count the drain and the ramp before the soak)."""

    source: str
    metric: str
    label: str


ERROR_COUNTERS = (
    ServiceCounter("ingest", "fleetline_ingest_dead_letters_total", "ingest dead letters"),
    ServiceCounter("ingest", "fleetline_ingest_write_errors_total", "ingest failed batch writes"),
    ServiceCounter("ingest", "fleetline_ingest_duplicate_rows_total", "ingest duplicate rows"),
    ServiceCounter(
        "ingest", "fleetline_broker_dropped_messages", "broker dropped messages ($SYS, via ingest)"
    ),
    ServiceCounter(
        "ingest", "fleetline_ingest_broker_drops_seen_total", "broker drops seen by ingest"
    ),
    ServiceCounter("rules", "fleetline_rules_write_errors_total", "rules failed writes"),
)
ACTIVITY_COUNTERS = (
    ServiceCounter("ingest", "fleetline_ingest_rows_total", "ingest rows stored"),
    ServiceCounter("rules", "fleetline_rules_messages_total", "rules messages received"),
    ServiceCounter(
        "rules", "fleetline_rules_evaluations_total", "rules evaluations (rule x reading)"
    ),
    ServiceCounter("rules", "fleetline_rules_transitions_total", "rules alarm transitions"),
)
# Samples whose "other load" (CPU of processes outside the benchmark, over the sample's
# window) was above this many cores are left out of the verdict by default.
MAX_OTHER_LOAD = 0.3
# Fewer judged samples than this and the run is not judged (the verdict fails).
MIN_JUDGED_SAMPLES = 3


@dataclass(frozen=True)
class Login:
    """The publishers' service account (bench/publish.py's Plan.username/password)."""

    username: str
    password: str


# -- the broker's $SYS ------------------------------------------------------------------


class SysWatcher:
    """A client subscribed to the broker's $SYS topics: the last value of each, and the
    history of publish/messages/received (the broker publishes them every sys_interval,
    10 s by default)."""

    def __init__(self, port: int, username: str, password: str) -> None:
        self.values: dict[str, float] = {}
        self.received: list[tuple[float, float]] = []
        self.lock = threading.Lock()
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"bench-soak-sys-{os.getpid()}",
            protocol=paho.MQTTv311,
        )
        self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_connect(self, client: paho.Client, *_args: Any) -> None:
        client.subscribe([(t, 0) for t in SYS_TOPICS])

    def _on_message(self, _client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        try:
            value = float(msg.payload.decode().split()[0])
        except (ValueError, IndexError, UnicodeDecodeError):
            return
        with self.lock:
            self.values[msg.topic] = value
            if msg.topic == RECEIVED:
                self.received.append((time.time(), value))

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return dict(self.values)

    def publish_rate(self) -> float | None:
        """Messages received by the broker per second between its last two reports."""
        with self.lock:
            if len(self.received) < 2:
                return None
            (t0, v0), (t1, v1) = self.received[-2], self.received[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- processes --------------------------------------------------------------------------


def rss_of(pid: int | None, tree: bool = False) -> float | None:
    if pid is None:
        return None
    try:
        if tree:
            return tree_rss(pid) / MB
        return float(psutil.Process(pid).memory_info().rss) / MB
    except psutil.Error:
        return None


def private_mb(pid: int | None) -> tuple[float | None, float | None]:
    """USS and PSS of ``pid`` and its descendants (PostgreSQL: every backend counts the
    pages of shared_buffers it has touched in its RSS; USS leaves shared pages out, PSS
    shares them out between the processes)."""
    if pid is None:
        return None, None
    uss = pss = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None, None
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            uss += info.uss
            pss += info.pss
    return uss / MB, pss / MB


def cpu_of(pid: int | None, tree: bool = False) -> float:
    if pid is None:
        return 0.0
    if tree:
        return tree_cpu(pid)
    try:
        return proc_cpu(psutil.Process(pid))
    except psutil.Error:
        return 0.0


class Processes:
    """The pids a sample reads: the services, the servers, this process, and the
    publishers (this process's other children)."""

    def __init__(self, services: list[Service], pg: LocalPostgres, broker: LocalMosquitto) -> None:
        self.pids: dict[str, int | None] = {
            svc.name: svc.proc.pid if svc.proc else None for svc in services
        }
        self.pids["mosquitto"] = broker.pid
        self.pids["postgres"] = pg.pid
        self.trees = {"postgres"}

    def publishers(self) -> list[int]:
        known = {p for p in self.pids.values() if p is not None}
        with contextlib.suppress(psutil.Error):
            return [c.pid for c in psutil.Process().children() if c.pid not in known]
        return []

    def rss_mb(self) -> dict[str, float | None]:
        out = {name: rss_of(pid, name in self.trees) for name, pid in self.pids.items()}
        out["postgres_uss"], out["postgres_pss"] = private_mb(self.pids["postgres"])
        out["publishers"] = sum(rss_of(p, True) or 0.0 for p in self.publishers())
        out["bench"] = rss_of(os.getpid())
        return out

    def cpu_seconds(self) -> dict[str, float]:
        out = {name: cpu_of(pid, name in self.trees) for name, pid in self.pids.items()}
        out["publishers"] = sum(cpu_of(p, True) for p in self.publishers())
        out["bench"] = cpu_of(os.getpid())
        return out


# -- the maximum ------------------------------------------------------------------------


def drain_once(
    args: argparse.Namespace,
    ingest: Service,
    broker: LocalMosquitto,
    url: str,
    rep: int,
    login: Login,
) -> dict[str, Any]:
    """Stop ingest, queue a backlog in its session, start it, time the rows stored."""
    n = args.max_messages
    before = int(query_value(url, "SELECT count(*) FROM telemetry"))
    ingest.stop()
    plan = pub.Plan(
        kind="single",
        host="127.0.0.1",
        port=broker.port,
        devices=args.devices,
        messages=n,
        base_ms=int(time.time() * 1000),
        tag=f"max{rep}",
        username=login.username,
        password=login.password,
    )
    published = pub.publish(plan, 2)
    log(f"  backlog of {n:,} messages queued at {published['rate']:,.0f} msg/s; starting ingest")
    ingest.start()
    t_ready = time.time()
    at_ready = ingest.metrics().get("fleetline_ingest_rows_total", 0.0)
    deadline = t_ready + DRAIN_TIMEOUT_SECONDS
    stored = at_ready
    while stored < n:
        if time.time() > deadline:
            raise RuntimeError(f"ingest stored {stored:,.0f} of {n:,} rows in time")
        ingest.check_alive()
        time.sleep(DRAIN_POLL_SECONDS)
        stored = ingest.metrics().get("fleetline_ingest_rows_total", stored)
    t_done = time.time()
    counted = int(query_value(url, "SELECT count(*) FROM telemetry")) - before
    rate = (n - at_ready) / (t_done - t_ready)
    log(
        f"  drain {rep + 1}: {n - at_ready:,.0f} rows in {t_done - t_ready:.2f} s after /readyz "
        f"({at_ready:,.0f} stored before it): {rate:,.0f} rows/s; count(*) +{counted:,}"
    )
    if counted != n:
        raise RuntimeError(f"the drain stored {counted:,} of {n:,} rows")
    return {
        "messages": n,
        "publish_rate": published["rate"],
        "rows_before_ready": at_ready,
        "seconds_after_ready": t_done - t_ready,
        "rows_per_second": rate,
    }


def ramp_step(
    args: argparse.Namespace, ingest: Service, broker: LocalMosquitto, rate: float, login: Login
) -> dict[str, Any]:
    """Publish ``rate`` readings/s live for --ramp-seconds; it holds when the publishers
    kept the rate and ingest stored every reading within RAMP_MAX_LAG_SECONDS of the end."""
    seconds = args.ramp_seconds
    rows0 = ingest.metrics().get("fleetline_ingest_rows_total", 0.0)
    plan = pub.Plan(
        kind="live",
        host="127.0.0.1",
        port=broker.port,
        devices=args.devices,
        rate=rate,
        seconds=seconds,
        tag=f"ramp{int(rate)}",
        username=login.username,
        password=login.password,
    )
    workers = PUBLISHERS
    cpu = CpuWindow()
    published = pub.publish(plan, workers)
    t_end = time.time()
    sent = int(published["sent"])
    stored = 0.0
    while time.time() < t_end + RAMP_WAIT_SECONDS:
        stored = ingest.metrics().get("fleetline_ingest_rows_total", rows0) - rows0
        if stored >= sent:
            break
        time.sleep(DRAIN_POLL_SECONDS)
    lag = time.time() - t_end
    achieved = sent / float(published["seconds"])
    held = (
        achieved >= MIN_RATE_SHARE * rate
        and float(published["seconds"]) <= seconds * 1.05 + 1
        and stored >= sent
        and lag <= RAMP_MAX_LAG_SECONDS
    )
    step = {
        "rate": rate,
        "publisher_processes": workers,
        "sent": sent,
        "publish_seconds": published["seconds"],
        "achieved_rate": achieved,
        "stored": stored,
        "catch_up_seconds": lag,
        "held": held,
        "other_cores": cpu.other_cores(),
    }
    log(
        f"  ramp {rate:,.0f}/s: achieved {achieved:,.0f}/s in {published['seconds']:.1f} s, "
        f"stored {stored:,.0f}/{sent:,} {lag:.1f} s after the end: "
        f"{'holds' if held else 'does not hold'} (other load {step['other_cores']:.2f} cores)"
    )
    return step


def ramp(
    args: argparse.Namespace, ingest: Service, broker: LocalMosquitto, login: Login
) -> dict[str, Any]:
    """Rates from --ramp-start up by --ramp-factor until one does not hold twice in a row
    (a step that fails is tried once more: other work on the machine); the maximum is the
    highest rate that held."""
    steps: list[dict[str, Any]] = []
    rate = args.ramp_start
    best = 0.0
    while len(steps) < RAMP_MAX_STEPS:
        step = ramp_step(args, ingest, broker, rate, login)
        steps.append(step)
        if not step["held"]:
            step = ramp_step(args, ingest, broker, rate, login)
            steps.append(step)
        if not step["held"]:
            break
        best = rate
        rate *= args.ramp_factor
    return {"rows_per_second": best, "steps": steps}


def measure_max(
    args: argparse.Namespace, ingest: Service, broker: LocalMosquitto, url: str, login: Login
) -> dict[str, Any]:
    runs = []
    for rep in range(args.max_repeat):
        cpu = CpuWindow()
        run = drain_once(args, ingest, broker, url, rep, login)
        run["other_cores"] = cpu.other_cores()
        runs.append(run)
    rates = sorted(r["rows_per_second"] for r in runs)
    drain = {"rows_per_second": statistics.median(rates), "runs": runs}
    log(
        f"drain: {drain['rows_per_second']:,.0f} rows/s; ramp from {args.ramp_start:,.0f}/s "
        f"by x{args.ramp_factor:g}, {args.ramp_seconds:g} s a step"
    )
    ramped = ramp(args, ingest, broker, login)
    return {
        "rows_per_second": min(ramped["rows_per_second"], drain["rows_per_second"]),
        "drain": drain,
        "ramp": ramped,
    }


# -- the soak ---------------------------------------------------------------------------


class LatencyPoller:
    """Each probe's poll time - ts when it first becomes visible (bench/ingest.py's
    live-phase query), with the time it was seen."""

    def __init__(self, url: str, since: float, until: float, probe_series: int) -> None:
        self.url = url
        self.lo = datetime.fromtimestamp(since, UTC)
        self.hi = datetime.fromtimestamp(until, UTC)
        self.probe_series = probe_series
        self.seen: list[tuple[float, float]] = []  # (poll time, latency ms)
        self.polls = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        con = await asyncpg.connect(self.url)
        try:
            stmt = await con.prepare(LATENCY_QUERY)
            since: dict[int, datetime] = {}
            while True:
                if len(since) < self.probe_series:
                    for r in await con.fetch(PROBE_SERIES):
                        since.setdefault(r["id"], self.lo)
                t = time.time()
                rows = await stmt.fetch(list(since), list(since.values()), self.lo, self.hi)
                self.polls += 1
                for sid, ts_ms in rows:
                    self.seen.append((t, t * 1000 - ts_ms))
                    ts = datetime.fromtimestamp(ts_ms / 1000, UTC)
                    if ts > since[sid]:
                        since[sid] = ts
                if self.stop.is_set():
                    return
                await asyncio.sleep(max(0.0, LATENCY_POLL_SECONDS - (time.time() - t)))
        finally:
            await con.close()


def get(sample: dict[str, Any], key: str) -> float | None:
    value: Any = sample
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) else None


class Soak:
    def __init__(
        self,
        args: argparse.Namespace,
        *,
        url: str,
        broker: LocalMosquitto,
        stack: Stack,
        ingest: Service,
        rules: Service,
        api: Service,
        api_key: str,
        procs: Processes,
        sys_watch: SysWatcher,
        login: Login,
    ) -> None:
        self.args = args
        self.login = login
        self.url = url
        self.broker = broker
        self.stack = stack
        self.ingest = ingest
        self.rules = rules
        self.api = api
        self.api_client = httpx.Client(
            base_url=api.url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
        )
        self.procs = procs
        self.sys_watch = sys_watch
        self.samples: list[dict[str, Any]] = []

    def api_ms(self) -> float | None:
        t = time.perf_counter()
        try:
            r = self.api_client.get("/v1/devices", params={"limit": 100})
        except httpx.HTTPError:
            return None
        return (time.perf_counter() - t) * 1000 if r.status_code == 200 else None

    def sample(
        self,
        t0: float,
        lat: list[float],
        prev: dict[str, Any] | None,
        cpu0: dict[str, float],
        window: CpuWindow,
    ) -> dict[str, Any]:
        now = time.time()
        im = self.ingest.metrics()
        rm = self.rules.metrics()
        sysv = self.sys_watch.snapshot()
        cpu = self.procs.cpu_seconds()
        wall = now - (prev["time"] if prev else t0)
        rows = im.get("fleetline_ingest_rows_total", 0.0)
        s: dict[str, Any] = {
            "t": round(now - t0, 2),
            "time": now,
            "rss_mb": self.procs.rss_mb(),
            "latency_ms": {
                "count": len(lat),
                "p50": pct(lat, 50) if lat else None,
                "p99": pct(lat, 99) if lat else None,
                "max": max(lat) if lat else None,
            },
            "broker": {
                "store_count": sysv.get("$SYS/broker/store/messages/count"),
                "store_mb": (sysv.get("$SYS/broker/store/messages/bytes") or 0.0) / MB,
                "heap_mb": (
                    sysv["$SYS/broker/heap/current"] / MB
                    if "$SYS/broker/heap/current" in sysv
                    else None
                ),
                "sys": sysv,
            },
            "ingest": {
                "pending": im.get("fleetline_ingest_pending_messages"),
                "metrics": {k: im[k] for k in INGEST_METRICS if k in im},
            },
            "rules": {
                "pending": rm.get("fleetline_rules_pending_messages"),
                "metrics": {k: rm[k] for k in RULES_METRICS if k in rm},
            },
            "rows_stored": rows - self.rows0,
            "rate": {
                "published": self.sys_watch.publish_rate(),
                "stored": (rows - (prev["rows_total"] if prev else self.rows0)) / wall,
            },
            "rows_total": rows,
            "api_ms": self.api_ms(),
            "cpu_cores": {
                k: (v - (prev["cpu_seconds"][k] if prev else cpu0.get(k, v))) / wall
                for k, v in cpu.items()
            },
            "cpu_seconds": cpu,
        }
        s["cpu_cores"]["other"] = window.other_cores()
        return s

    async def run(self) -> dict[str, Any]:
        a = self.args
        seconds = a.minutes * 60
        # Every metric of ingest and rules at the start: the counters' soak-only deltas
        # (they also count the drain and the ramp) and the error counters' baseline.
        ingest_start = self.ingest.metrics()
        rules_start = self.rules.metrics()
        self.rows0 = ingest_start.get("fleetline_ingest_rows_total", 0.0)
        count0 = int(
            await asyncio.to_thread(query_value, self.url, "SELECT count(*) FROM telemetry")
        )
        load_rate = a.target_rate - a.probes
        workers = PUBLISHERS
        t0 = time.time()
        poller = LatencyPoller(self.url, t0 - 0.001, t0 + seconds + 3600, workers)
        plan = pub.Plan(
            kind="live",
            host="127.0.0.1",
            port=self.broker.port,
            devices=a.devices,
            rate=load_rate,
            seconds=seconds,
            probes_per_second=a.probes,
            tag="soak",
            username=self.login.username,
            password=self.login.password,
        )
        log(
            f"soak: {a.target_rate:,.0f} rows/s ({load_rate:,.0f} readings + {a.probes:g} probes) "
            f"from {a.devices:,} devices, {workers} publisher process(es), {a.minutes:g} min, "
            f"a sample every {a.interval:g} s"
        )
        poll_task = asyncio.create_task(poller.run())
        pub_task = asyncio.create_task(asyncio.to_thread(pub.publish, plan, workers))
        cpu0 = self.procs.cpu_seconds()
        prev: dict[str, Any] | None = None
        taken = 0
        next_at = t0 + a.interval
        window = CpuWindow()
        while not pub_task.done():
            await asyncio.sleep(min(0.5, max(0.0, next_at - time.time())))
            if time.time() < next_at or pub_task.done():
                continue
            next_at += a.interval
            upto = len(poller.seen)
            latencies = [ms for _, ms in poller.seen[taken:upto]]
            taken = upto
            s = await asyncio.to_thread(self.sample, t0, latencies, prev, cpu0, window)
            window = CpuWindow()
            self.samples.append(s)
            prev = s
            self.stack.check_alive()
            if poll_task.done():
                poll_task.result()  # raises what stopped the poller
                raise RuntimeError("the latency poller stopped")
            lat = s["latency_ms"]
            rss = s["rss_mb"]
            log(
                f"  {s['t'] / 60:5.1f} min: published {s['rate']['published'] or 0:,.0f}/s, "
                f"stored {s['rate']['stored']:,.0f}/s, latency p50 {lat['p50'] or 0:.0f} "
                f"p99 {lat['p99'] or 0:.0f} ms, broker store {s['broker']['store_count']}, "
                f"ingest pending {s['ingest']['pending']}, RSS MB ingest "
                f"{rss['ingest'] or 0:.0f} api {rss['api'] or 0:.0f} rules {rss['rules'] or 0:.0f} "
                f"mosquitto {rss['mosquitto'] or 0:.0f} postgres {rss['postgres'] or 0:.0f}, "
                f"other load {s['cpu_cores']['other']:.2f}"
            )
        published = pub_task.result()
        t_end = time.time()
        sent = int(published["sent"]) + int(published["probes"])
        log(
            f"published {sent:,} readings ({published['probes']:,.0f} probes), all acknowledged,"
            f" {published['rate']:,.0f} readings/s of load; waiting for the tail"
        )
        deadline = time.time() + TAIL_TIMEOUT_SECONDS
        while self.ingest.metrics().get("fleetline_ingest_rows_total", 0.0) - self.rows0 < sent:
            if time.time() > deadline:
                break
            await asyncio.sleep(0.2)
        tail_seconds = time.time() - t_end
        while len(poller.seen) < published["probes"] and time.time() < deadline:
            await asyncio.sleep(0.1)
        poller.stop.set()
        await poll_task
        count = int(
            await asyncio.to_thread(query_value, self.url, "SELECT count(*) FROM telemetry")
        )
        stored = count - count0
        latencies = [ms for _, ms in poller.seen]
        log(
            f"stored {stored:,} of {sent:,} readings (count(*)), the tail took {tail_seconds:.1f} s"
        )
        return {
            "target_rate": a.target_rate,
            "load_rate": load_rate,
            "probes_per_second": a.probes,
            "publisher_processes": workers,
            "seconds": seconds,
            "published": published,
            "sent_rows": sent,
            "stored_rows": stored,
            "lost_rows": sent - stored,
            "tail_seconds": tail_seconds,
            "achieved_rate": (published["rate"] * (sent / max(1, int(published["sent"])))),
            "probes_observed": len(latencies),
            "latency_ms": {
                "p50": pct(latencies, 50),
                "p99": pct(latencies, 99),
                "max": max(latencies) if latencies else None,
            },
            "latency_polls": poller.polls,
            "ingest_metrics_start": ingest_start,
            "rules_metrics_start": rules_start,
            "samples": self.samples,
        }


# -- the verdict ------------------------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The samples a verdict judges: from ``warmup`` seconds on, inside ``start_s`` ..
    ``end_s`` when given, and, with ``max_other``, only those whose other load (CPU of
    processes outside the benchmark over the sample's window) was at most that many
    cores."""

    warmup: float
    max_other: float | None = None
    start_s: float | None = None
    end_s: float | None = None

    def split(self, samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The judged samples, and how many were left out for each reason."""
        kept: list[dict[str, Any]] = []
        left = {"warmup": 0, "window": 0, "load": 0}
        for s in samples:
            t = float(s["t"])
            other = get(s, "cpu_cores.other")
            if t < self.warmup:
                left["warmup"] += 1
            elif (self.start_s is not None and t < self.start_s) or (
                self.end_s is not None and t > self.end_s
            ):
                left["window"] += 1
            elif self.max_other is not None and other is not None and other > self.max_other:
                left["load"] += 1
            else:
                kept.append(s)
        return kept, left

    def describe(self, kept: list[dict[str, Any]], total: int, left: dict[str, int]) -> str:
        if not kept:
            span = "no samples"
        else:
            span = (
                f"{len(kept)} of {total} samples, at {kept[0]['t'] / 60:.1f}-"
                f"{kept[-1]['t'] / 60:.1f} min"
            )
        rules = [f"from {self.warmup:g} s on"]
        if self.start_s is not None or self.end_s is not None:
            if self.end_s is None:
                rules.append(f"window from minute {(self.start_s or 0.0) / 60:g}")
            else:
                rules.append(f"window minutes {(self.start_s or 0.0) / 60:g}-{self.end_s / 60:g}")
        if self.max_other is not None:
            rules.append(f"other load <= {self.max_other:g} cores")
        out = [
            f"{n} {what}"
            for n, what in (
                (left["warmup"], f"in the {self.warmup:g} s warm-up"),
                (left["window"], "outside the window"),
                (left["load"], f"with other load above {self.max_other or 0:g} cores"),
            )
            if n
        ]
        return f"{span} ({', '.join(rules)})" + (f"; left out: {', '.join(out)}" if out else "")


def slope_per_hour(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), per hour."""
    n = len(ts)
    if n < 2:
        return 0.0
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    if den == 0:
        return 0.0
    return sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den * 3600


def trend(samples: list[dict[str, Any]], series: Series) -> dict[str, Any] | None:
    """Growth of ``series`` over ``samples`` (the judged ones): the last third's mean
    against the first third's, and the least-squares slope times the samples' span; both
    must exceed the threshold.

    ``detectable_per_hour``: the smallest steady rise the rule flags over these samples.
    A rise of g per hour moves the thirds' means apart by g times the time between their
    centres, and the slope times the span by g times the span, which is longer: the
    thirds decide, so g must exceed threshold / (time between the thirds' centres)."""
    points = [(float(s["t"]), y) for s in samples if (y := get(s, series.key)) is not None]
    if not points:
        return None
    ts = [t for t, _ in points]
    ys = [y for _, y in points]
    third = max(1, len(ys) // 3)
    first, last = statistics.fmean(ys[:third]), statistics.fmean(ys[-third:])
    slope = slope_per_hour(ts, ys)
    span_h = (ts[-1] - ts[0]) / 3600 if len(ts) > 1 else 0.0
    apart_h = (statistics.fmean(ts[-third:]) - statistics.fmean(ts[:third])) / 3600
    judged = series.rel > 0 or series.floor > 0
    threshold = max(series.rel * abs(first), series.floor)
    grows = judged and (last - first) > threshold and slope * span_h > threshold
    return {
        "label": series.label,
        "unit": series.unit,
        "samples": len(ys),
        "start": ys[0],
        "end": ys[-1],
        "min": min(ys),
        "max": max(ys),
        "mean": statistics.fmean(ys),
        "first_third_mean": first,
        "last_third_mean": last,
        "slope_per_hour": slope,
        "span_hours": span_h,
        "rise_over_run": slope * span_h,
        "thirds_apart_hours": apart_h,
        "threshold": threshold if judged else None,
        "detectable_per_hour": threshold / apart_h if judged and apart_h > 0 else None,
        "rule": f"max({series.rel:.0%} of first third, {series.floor:g} {series.unit})"
        if judged
        else None,
        "growth": grows if judged else None,
    }


def _metrics_at(soak: dict[str, Any], source: str, when: str) -> dict[str, float] | None:
    """All of a service's metrics at the start or the end of the soak, when recorded (a
    labelled counter that never counted is absent from them: 0)."""
    found = soak.get(f"{source}_metrics_{when}")
    return found if isinstance(found, dict) and found else None


def counter_change(soak: dict[str, Any], counter: ServiceCounter) -> dict[str, Any]:
    """A counter's value at the start of the soak (or its first sample, for runs that did
    not record the start) and at the end, its rise, and its highest value meanwhile."""
    samples = soak["samples"]
    seen = [
        (float(s["t"]), v)
        for s in samples
        if (v := get(s, f"{counter.source}.metrics.{counter.metric}")) is not None
    ]
    start: float | None = None
    start_at = "not recorded"
    full = _metrics_at(soak, counter.source, "start")
    if full is not None:
        start, start_at = full.get(counter.metric, 0.0), "start of the soak"
    elif counter.metric == "fleetline_ingest_rows_total" and samples:
        # A sample's rows_stored is rows_total minus its value at the start.
        start, start_at = samples[0]["rows_total"] - samples[0]["rows_stored"], "start of the soak"
    elif seen:
        start, start_at = seen[0][1], f"first sample, {seen[0][0]:g} s in"
    end: float | None = None
    end_at = "not recorded"
    full = _metrics_at(soak, counter.source, "end")
    if full is not None:
        end, end_at = full.get(counter.metric, 0.0), "end, after the tail"
    elif seen:
        end, end_at = seen[-1][1], f"last sample, {seen[-1][0]:g} s in"
    known = [v for _, v in seen] + [v for v in (start, end) if v is not None]
    peak = max(known) if known else None
    rose: bool | None
    if start is not None and end is not None and peak is not None:
        rise: float | None = end - start
        rose = end > start or peak > start
    elif end == 0.0:
        # A counter never goes down: 0 at the end, 0 all along.
        rise, rose, start_at = 0.0, False, "not recorded; 0 at the end"
    else:
        rise, rose = None, None
    return {
        "label": counter.label,
        "metric": counter.metric,
        "start": start,
        "start_at": start_at,
        "end": end,
        "end_at": end_at,
        "peak": peak,
        "rise": rise,
        "rose": rose,
    }


def per_window(samples: list[dict[str, Any]], key: str) -> dict[str, float] | None:
    ys = [y for s in samples if (y := get(s, key)) is not None]
    if not ys:
        return None
    return {"mean": statistics.fmean(ys), "min": min(ys), "max": max(ys)}


def analyse(soak: dict[str, Any], sel: Selection) -> dict[str, Any]:
    samples = soak["samples"]
    kept, left = sel.split(samples)
    whole_sel = Selection(sel.warmup)
    whole, whole_left = whole_sel.split(samples)
    trends = {s.key: trend(kept, s) for s in (*SERIES, *INFO_SERIES)}
    whole_trends = {s.key: trend(whole, s) for s in (*SERIES, *INFO_SERIES)}
    enough = len(kept) >= MIN_JUDGED_SAMPLES
    grew = [k for k, v in trends.items() if enough and v and v["growth"]]
    errors = [counter_change(soak, c) for c in ERROR_COUNTERS]
    activity = [counter_change(soak, c) for c in ACTIVITY_COUNTERS]
    rates = [r for s in samples if (r := get(s, "rate.published")) is not None and s["t"] > 15]
    problems = []
    if soak["lost_rows"] != 0:
        problems.append(f"{soak['lost_rows']:,} of {soak['sent_rows']:,} readings not stored")
    if soak["achieved_rate"] < MIN_RATE_SHARE * soak["target_rate"]:
        problems.append(
            f"the publishers achieved {soak['achieved_rate']:,.0f} of "
            f"{soak['target_rate']:,.0f} rows/s"
        )
    if not enough:
        problems.append(
            f"not judged: {len(kept)} samples left to judge (at least {MIN_JUDGED_SAMPLES}); "
            "a longer run, a quieter machine, or a higher --max-other-load"
        )
    for k in grew:
        problems.append(f"growth: {(trends[k] or {}).get('label', k)}")
    for c in errors:
        if c["rose"] is None and c["end"] is None:
            problems.append(f"{c['label']} ({c['metric']}) could not be read at the end")
        elif c["rose"] is None:
            problems.append(
                f"{c['label']} ({c['metric']}) was {fmt(c['end'])} at the end and its value at "
                "the start was not recorded: it may have risen during the soak"
            )
        elif c["rose"]:
            problems.append(
                f"{c['label']} rose during the soak: {fmt(c['start'])} ({c['start_at']}) -> "
                f"{fmt(c['end'])} ({c['end_at']})"
            )
    verdict = "not judged" if not enough else ("growth" if grew else "no growth")
    return {
        "warmup_seconds": sel.warmup,
        "selection": {
            "warmup_seconds": sel.warmup,
            "max_other_cores": sel.max_other,
            "start_seconds": sel.start_s,
            "end_seconds": sel.end_s,
        },
        "judged": {
            "description": sel.describe(kept, len(samples), left),
            "samples": len(kept),
            "left_out": left,
            "times": [s["t"] for s in kept],
            "other_cores": per_window(kept, "cpu_cores.other"),
            "latency_p99_per_window": per_window(kept, "latency_ms.p99"),
        },
        "trends": trends,
        "whole_run": {
            "description": whole_sel.describe(whole, len(samples), whole_left),
            "samples": len(whole),
            "other_cores": per_window(whole, "cpu_cores.other"),
            "latency_p99_per_window": per_window(whole, "latency_ms.p99"),
            "trends": whole_trends,
        },
        "error_counters": errors,
        "activity": activity,
        "growing": grew,
        "verdict": verdict,
        "result": "fail" if problems else "pass",
        "published_rate_mean": statistics.fmean(rates) if rates else None,
        "problems": problems,
    }


# -- plots ------------------------------------------------------------------------------


def plots(soak: dict[str, Any], verdict: dict[str, Any], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes

    samples = soak["samples"]
    minutes = [s["t"] / 60 for s in samples]
    warm = verdict["warmup_seconds"] / 60
    judged = set(verdict["judged"]["times"])
    max_other = verdict["selection"]["max_other_cores"]
    windowed = (
        verdict["selection"]["start_seconds"] is not None
        or verdict["selection"]["end_seconds"] is not None
    )
    # Each sample covers the time since the one before it.
    spans = [
        (prev / 60, s["t"] / 60, s)
        for prev, s in zip([0.0] + [x["t"] for x in samples[:-1]], samples, strict=True)
    ]
    left_out = [(a, b) for a, b, s in spans if s["t"] not in judged and s["t"] >= warm * 60]
    out_dir.mkdir(parents=True, exist_ok=True)
    made: list[Path] = []

    def shade(ax: Axes) -> None:
        ax.axvspan(0, warm, color="0.88", label="warm-up (not judged)")
        reasons = [f"other load > {max_other:g} cores"] if max_other is not None else []
        if windowed:
            reasons.append("outside --window")
        label = f"left out of the verdict ({' or '.join(reasons)})"
        for a, b in left_out:
            ax.axvspan(a, b, color="#f4c7c3", alpha=0.7, linewidth=0, label=label)
            label = "_nolegend_"

    def figure(
        name: str,
        ylabel: str,
        lines: list[tuple[str, str]],
        subtitle: str,
        log_y: bool = False,
        hline: tuple[float, str] | None = None,
    ) -> None:
        fig, ax = plt.subplots(figsize=(9, 4.2), dpi=110)
        shade(ax)
        for key, label in lines:
            ys = [get(s, key) for s in samples]
            xs = [x for x, y in zip(minutes, ys, strict=True) if y is not None]
            other = key == "cpu_cores.other"
            ax.plot(
                xs,
                [y for y in ys if y is not None],
                label=label,
                linewidth=1.8 if other else 1.4,
                color="black" if other else None,
            )
        if hline is not None:
            ax.axhline(hline[0], color="0.3", linestyle="--", linewidth=1, label=hline[1])
        ax.set_xlabel("minutes into the soak")
        ax.set_ylabel(ylabel)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlim(left=0)
        if not log_y:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        ax.set_title(f"{subtitle}\n{title}", fontsize=9)
        fig.tight_layout()
        path = out_dir / f"soak-{name}.png"
        fig.savefig(path)
        plt.close(fig)
        made.append(path)

    figure(
        "rss",
        "resident memory (MB)",
        [
            ("rss_mb.ingest", "ingest"),
            ("rss_mb.api", "api"),
            ("rss_mb.rules", "rules"),
            ("rss_mb.mosquitto", "mosquitto"),
            ("rss_mb.postgres_pss", "postgres, PSS of all its processes"),
            ("rss_mb.postgres_uss", "postgres, USS (private) of all its processes"),
        ],
        "RSS of each process (psutil; postgres: PSS and USS summed over its processes)",
    )
    figure(
        "heap",
        "MB",
        [("broker.heap_mb", "mosquitto $SYS/broker/heap/current")],
        "the broker's own count of its heap (its RSS keeps what the drain's backlog took)",
    )
    figure(
        "latency",
        "publish -> row visible (ms)",
        [("latency_ms.p50", "p50"), ("latency_ms.p99", "p99"), ("latency_ms.max", "max")],
        "end-to-end latency of the probes, per sample window",
        log_y=True,
    )
    figure(
        "queue",
        "messages",
        [
            ("broker.store_count", "broker $SYS store/messages/count"),
            ("ingest.pending", "ingest pending_messages"),
            ("rules.pending", "rules pending_messages"),
        ],
        "queue depth: what the broker holds, what ingest and rules hold unwritten",
    )
    figure(
        "rate",
        "per second",
        [
            ("rate.published", "published (broker $SYS, messages/s)"),
            ("rate.stored", "stored (ingest rows_total, rows/s)"),
        ],
        f"rates; target {soak['target_rate']:,.0f} rows/s",
    )
    figure(
        "cpu",
        "cores (mean over each sample's window)",
        [
            ("cpu_cores.publishers", "publishers"),
            ("cpu_cores.rules", "rules"),
            ("cpu_cores.ingest", "ingest"),
            ("cpu_cores.mosquitto", "mosquitto"),
            ("cpu_cores.postgres", "postgres"),
            ("cpu_cores.bench", "latency poller (this process)"),
            ("cpu_cores.api", "api"),
            ("cpu_cores.other", "other load (processes outside the benchmark)"),
        ],
        "CPU of each process, and of other work on the machine",
        hline=(max_other, f"other load limit of the verdict ({max_other:g} cores)")
        if max_other is not None
        else None,
    )
    return made


# -- report -----------------------------------------------------------------------------


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10 or v == 0:
        return f"{v:,.1f}"
    return f"{v:,.2f}"


TABLE_COLUMNS = (
    ("start", "start"),
    ("end", "end"),
    ("max", "max"),
    ("first_third_mean", "1st 3rd"),
    ("last_third_mean", "last 3rd"),
    ("slope_per_hour", "slope/h"),
    ("threshold", "threshold"),
    ("detectable_per_hour", "flags/h"),
)


def growth_mark(v: dict[str, Any]) -> str:
    return "-" if v["growth"] is None else ("YES" if v["growth"] else "no")


def trend_table(trends: dict[str, dict[str, Any] | None]) -> list[str]:
    hdr = f"{'series':<34} {'unit':>6} " + " ".join(f"{h:>9}" for _, h in TABLE_COLUMNS)
    hdr += f" {'growth':>7}"
    lines = [hdr, "-" * len(hdr)]
    for v in trends.values():
        if not v:
            continue
        cells = " ".join(f"{fmt(v[k]):>9}" for k, _ in TABLE_COLUMNS)
        lines.append(f"{v['label']:<34} {v['unit']:>6} {cells} {growth_mark(v):>7}")
    return lines


def verdict_line(verdict: dict[str, Any]) -> str:
    head = f"VERDICT: {verdict['verdict'].upper()}" + (
        f" ({', '.join(verdict['growing'])})" if verdict["growing"] else ""
    )
    rose = [c["label"] for c in verdict["error_counters"] if c["rose"] is not False]
    counters = (
        f"error counters rose or unread: {', '.join(rose)}" if rose else "no error counter rose"
    )
    return (
        f"{head}; {counters}; {verdict['result'].upper()}. Judged: "
        f"{verdict['judged']['description']}"
    )


def report(
    args: argparse.Namespace,
    env: dict[str, Any],
    maximum: dict[str, Any] | None,
    soak: dict[str, Any],
    verdict: dict[str, Any],
) -> str:
    lines = [
        f"fleetline soak -- PostgreSQL {env['postgres']}, {env['mosquitto']}, Python "
        f"{env['python']}, {env['cpus']} CPUs, load average at start {env['loadavg_start']}",
    ]
    if maximum and "drain" not in maximum:
        # Files from before the ramp: the drain alone.
        lines.append(f"maximum (backlog drain): {maximum['rows_per_second']:,.0f} rows/s")
    elif maximum:
        drain = maximum["drain"]
        runs = ", ".join(f"{r['rows_per_second']:,.0f}" for r in drain["runs"])
        others = ", ".join(f"{r['other_cores']:.2f}" for r in drain["runs"])
        lines.append(
            f"backlog drain (ingest alone on a queued backlog of {args.max_messages:,} messages): "
            f"{drain['rows_per_second']:,.0f} rows/s ({runs}; other load {others} cores)"
        )
        steps = maximum["ramp"]["steps"]
        lines.append(
            "ramp (live publishing, "
            f"{args.ramp_seconds:g} s a step): "
            + ", ".join(f"{st['rate']:,.0f}{'' if st['held'] else ' (no)'}" for st in steps)
        )
        lines.append(
            f"maximum sustained: {maximum['rows_per_second']:,.0f} rows/s (the highest ramp step "
            "that held: publishers kept the rate, every reading stored within "
            f"{RAMP_MAX_LAG_SECONDS:g} s of the end)"
        )
    lines.append(
        f"soak: {soak['target_rate']:,.0f} rows/s for {soak['seconds'] / 60:g} min from "
        f"{args.devices:,} devices (QoS 1), achieved {soak['achieved_rate']:,.0f}/s; "
        f"{soak['sent_rows']:,} readings sent, {soak['stored_rows']:,} stored, "
        f"{soak['lost_rows']:,} lost; tail {soak['tail_seconds']:.1f} s"
    )
    lat = soak["latency_ms"]
    lines.append(
        f"latency over the whole run, loaded minutes included ({soak['probes_observed']:,} "
        f"probes): p50 {fmt(lat['p50'])} ms, p99 {fmt(lat['p99'])} ms, max {fmt(lat['max'])} ms"
    )
    for name, part in (("judged samples", verdict["judged"]), ("whole run", verdict["whole_run"])):
        p99 = part["latency_p99_per_window"]
        other = part["other_cores"]
        if p99 and other:
            lines.append(
                f"{name}: per-window p99 mean {fmt(p99['mean'])} ms, max {fmt(p99['max'])} ms; "
                f"other load mean {other['mean']:.2f} cores, max {other['max']:.2f}"
            )
    lines += ["", f"JUDGED (the verdict): {verdict['judged']['description']}"]
    lines += trend_table(verdict["trends"])
    whole = verdict["whole_run"]
    lines += [
        "",
        f"WHOLE RUN, for reference (not the verdict): {whole['description']}",
        *trend_table(whole["trends"]),
        "",
        "error counters (any rise fails the verdict):",
    ]
    for c in verdict["error_counters"]:
        state = {None: "UNREAD", True: "ROSE", False: "flat"}[c["rose"]]
        lines.append(
            f"  {c['label']:<44} {fmt(c['start']):>5} ({c['start_at']}) -> "
            f"{fmt(c['end'])} ({c['end_at']}): {state}"
        )
    lines.append(
        "activity during the soak (the totals also count the drain and the ramp; a service "
        "still working through their messages at the start counts those in its rise too):"
    )
    for c in verdict["activity"]:
        lines.append(
            f"  {c['label']:<44} +{fmt(c['rise'])} from the {c['start_at']} to the "
            f"{c['end_at']} (total at the end {fmt(c['end'])})"
        )
    lines += [
        "",
        "growth = the last third's mean above the first third's by more than the threshold AND "
        "the least-squares slope times the judged span above it too;",
        "  threshold = max(rel x first-third mean, floor): "
        + "; ".join(f"{s.label} {s.rel:.0%} / {s.floor:g} {s.unit}" for s in SERIES),
        "  flags/h = the smallest steady rise per hour the rule flags over those samples "
        "(threshold / time between the thirds' centres).",
        verdict_line(verdict),
    ]
    return "\n".join(lines)


def markdown(verdict: dict[str, Any]) -> str:
    """The tables of docs/soak.md, from an analysis."""
    cols = (
        "| series | unit | start | end | max | first-third mean | last-third mean | "
        "slope per hour | threshold | smallest steady rise flagged, per hour | growth |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    )

    def esc(text: str) -> str:
        return text.replace("$", "\\$")

    def table(trends: dict[str, dict[str, Any] | None]) -> list[str]:
        rows = [cols]
        for v in trends.values():
            if not v:
                continue
            judged = v["growth"] is not None
            label = esc(v["label"] if judged else f"{v['label']} (not judged)")
            cells = " | ".join(fmt(v[k]) for k, _ in TABLE_COLUMNS)
            rows.append(f"| {label} | {v['unit']} | {cells} | {growth_mark(v)} |")
        return rows

    whole = verdict["whole_run"]
    out = [
        f"**Judged (the verdict):** {verdict['judged']['description']}.",
        "",
        *table(verdict["trends"]),
        "",
        f"**Whole run, for reference (not the verdict):** {whole['description']}.",
        "",
        *table(whole["trends"]),
        "",
        "| error counter | start | end | rise |",
        "|---|---:|---:|---|",
    ]
    for c in verdict["error_counters"]:
        rise = {None: "could not be read", True: "**rose**", False: "none"}[c["rose"]]
        out.append(
            f"| {esc(c['label'])} (`{c['metric']}`) | {fmt(c['start'])} ({c['start_at']}) | "
            f"{fmt(c['end'])} ({c['end_at']}) | {rise} |"
        )
    out += ["", "| counter | rise during the soak | from | to | total at the end |"]
    out.append("|---|---:|---|---|---:|")
    for c in verdict["activity"]:
        out.append(
            f"| {c['label']} (`{c['metric']}`) | {c['rise']:,.0f} | {c['start_at']} | "
            f"{c['end_at']} | {c['end']:,.0f} |"
            if c["rise"] is not None and c["end"] is not None
            else f"| {c['label']} (`{c['metric']}`) | - | - | - | - |"
        )
    out += ["", verdict_line(verdict)]
    return "\n".join(out)


def plot_title(soak: dict[str, Any], env: dict[str, Any], verdict: dict[str, Any]) -> str:
    j = verdict["judged"]
    times = j["times"]
    where = f"{times[0] / 60:.1f}-{times[-1] / 60:.1f} min" if times else "nothing"
    cap = verdict["selection"]["max_other_cores"]
    return (
        f"{soak['target_rate']:,.0f} rows/s for {soak['seconds'] / 60:g} min, {env['cpus']} CPUs;"
        f" verdict: {verdict['verdict']}, judged {j['samples']} samples at {where}"
        + (f" with other load <= {cap:g} cores" if cap is not None else "")
    )


# -- main -------------------------------------------------------------------------------


def window_arg(text: str) -> tuple[float | None, float | None]:
    """--window FROM-TO in minutes; either side may be left empty."""
    lo, sep, hi = text.partition("-")
    if not sep:
        raise argparse.ArgumentTypeError("expected FROM-TO in minutes, e.g. 9.5-30 or 10-")
    try:
        start = float(lo) * 60 if lo.strip() else None
        end = float(hi) * 60 if hi.strip() else None
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if start is not None and end is not None and end <= start:
        raise argparse.ArgumentTypeError("the window ends before it starts")
    return start, end


def selection(args: argparse.Namespace, warmup: float) -> Selection:
    start, end = args.window or (None, None)
    cap = args.max_other_load
    return Selection(
        warmup=warmup,
        max_other=None if cap is None or math.isinf(cap) else cap,
        start_s=start,
        end_s=end,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Soak the stack at half its maximum ingest rate")
    p.add_argument("--minutes", type=float, default=30.0, help="soak length (default 30)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    p.add_argument("--devices", type=int, default=1000, help="simulated devices (default 1000)")
    p.add_argument(
        "--rate", type=float, help="rows/s to soak at, skipping the measurement of the maximum"
    )
    p.add_argument(
        "--share", type=float, default=0.5, help="share of the maximum to soak at (default 0.5)"
    )
    p.add_argument(
        "--max-messages", type=int, help="backlog per drain (default 200000; short runs 50000)"
    )
    p.add_argument("--max-repeat", type=int, default=1, help="drains, median used (default 1)")
    p.add_argument("--ramp-start", type=float, default=2000.0, help="first ramp rate (rows/s)")
    p.add_argument("--ramp-factor", type=float, default=1.25, help="ramp step factor")
    p.add_argument("--ramp-seconds", type=float, help="seconds a ramp step (default 15; short 8)")
    p.add_argument("--probes", type=float, default=100.0, help="latency probes a second")
    p.add_argument(
        "--warmup",
        type=float,
        help="seconds left out of the verdict (default min(60, run/6); --analyse: the run's)",
    )
    p.add_argument(
        "--max-other-load",
        type=float,
        default=MAX_OTHER_LOAD,
        metavar="CORES",
        help="leave out of the verdict the samples in which processes outside the benchmark "
        f"used more CPU than this (default {MAX_OTHER_LOAD:g}; inf judges every sample)",
    )
    p.add_argument(
        "--window",
        type=window_arg,
        metavar="FROM-TO",
        help="judge only the samples in these minutes of the soak, e.g. 10-30 or 10-",
    )
    p.add_argument("--plots", type=Path, default=IMAGES_DIR, help="where the PNGs go")
    p.add_argument(
        "--analyse",
        type=Path,
        metavar="RESULTS_JSON",
        help="run nothing: judge a saved bench/results/soak-*.json again (with --warmup, "
        "--max-other-load, --window), print the report, redraw the plots in --plots",
    )
    p.add_argument(
        "--markdown", action="store_true", help="also print the tables as Markdown (docs/soak.md)"
    )
    add_api_env(p)
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = p.parse_args(argv)
    if a.max_other_load is not None and a.max_other_load < 0:
        p.error("--max-other-load must not be negative")
    if a.analyse is not None:
        return a
    short = a.minutes < 5
    if a.max_messages is None:
        a.max_messages = 50_000 if short else 200_000
    if a.ramp_seconds is None:
        a.ramp_seconds = 8.0 if short else 15.0
    if a.ramp_factor <= 1:
        p.error("--ramp-factor must be above 1")
    if a.warmup is None:
        a.warmup = min(60.0, a.minutes * 60 / 6)
    if a.minutes <= 0 or a.interval <= 0 or a.devices < 1 or a.max_repeat < 1:
        p.error("--minutes, --interval, --devices and --max-repeat must be positive")
    a.devices = min(a.devices, a.max_messages)
    return a


def analyse_saved(args: argparse.Namespace) -> None:
    """--analyse: the verdict, report and plots of a saved run, from its samples alone."""
    record = json.loads(args.analyse.read_text())
    saved = argparse.Namespace(**record["args"])
    warmup = args.warmup if args.warmup is not None else float(saved.warmup)
    soak = record["soak"]
    verdict = analyse(soak, selection(args, warmup))
    env = record["environment"]
    text = report(saved, env, record.get("maximum"), soak, verdict)
    made = plots(soak, verdict, args.plots, plot_title(soak, env, verdict))
    print(f"{args.analyse}: {record['command']}")
    print()
    print(text)
    if args.markdown:
        print()
        print(markdown(verdict))
    print(f"\nplots: {', '.join(str(p) for p in made)}")
    if verdict["problems"]:
        print(f"\n{len(verdict['problems'])} PROBLEM(S):")
        for problem in verdict["problems"]:
            print(f"  {problem}")
        sys.exit(1)


def main() -> None:
    args = parse_args()
    if args.analyse is not None:
        analyse_saved(args)
        return
    started = time.time()
    key_secret = secrets.token_hex(32)
    accounts = {
        u: secrets.token_urlsafe(16) for u in (INGEST_USER, API_USER, RULES_USER, BENCH_USER)
    }
    maximum: dict[str, Any] | None = None
    with (
        workdir("flbench-soak-", keep=args.keep) as tmp,
        Stack(tmp) as stack,
        LocalPostgres(tmp / "pg") as pg,
    ):
        url = pg.url_for("bench")
        asyncio.run(migrate(url, StorageSettings(timescale="off")))
        query_value(url, RULE)
        now = datetime.now(UTC)
        for hours in range(-1, int(args.minutes / 60) + 3):
            query_value(url, "SELECT fleetline_ensure_partition($1)", now + timedelta(hours=hours))
        auth = BrokerAuth(database_url=url, key_secret=key_secret.encode(), services=accounts)
        with LocalMosquitto(tmp / "mq", auth=auth) as broker:
            key = admin_key(url)
            env = environment(pg, url)

            def mqtt_url(user: str) -> str:
                return f"mqtt://{user}:{accounts[user]}@127.0.0.1:{broker.port}"

            common = service_env(url)
            ingest = ingest_service(
                tmp,
                {**common, "FLEETLINE_MQTT_URL": mqtt_url(INGEST_USER)},
                client_id="soak-ingest",
            )
            api = api_service(
                tmp,
                {**common, "FLEETLINE_MQTT_URL": mqtt_url(API_USER)},
                key_secret=key_secret,
                settings=args.api_env,
            )
            rules = rules_service(
                tmp, {**common, "FLEETLINE_MQTT_URL": mqtt_url(RULES_USER)}, client_id="soak-rules"
            )
            stack.start(ingest, api, rules)
            # The publishers log in with a service account: the broker checks every login.
            login = Login(BENCH_USER, accounts[BENCH_USER])
            log("ingest, api and rules ready; broker with the auth plugin")
            if args.rate is None:
                log(f"measuring the maximum: {args.max_repeat} backlog drain(s)")
                maximum = measure_max(args, ingest, broker, url, login)
                args.target_rate = maximum["rows_per_second"] * args.share
                log(
                    f"maximum {maximum['rows_per_second']:,.0f} rows/s; soaking at "
                    f"{args.target_rate:,.0f}"
                )
            else:
                args.target_rate = args.rate
            sys_watch = SysWatcher(broker.port, BENCH_USER, accounts[BENCH_USER])
            try:
                procs = Processes([ingest, api, rules], pg, broker)
                soak = Soak(
                    args,
                    url=url,
                    broker=broker,
                    stack=stack,
                    ingest=ingest,
                    rules=rules,
                    api=api,
                    api_key=key,
                    procs=procs,
                    sys_watch=sys_watch,
                    login=login,
                )
                result = asyncio.run(soak.run())
                result["ingest_metrics_end"] = ingest.metrics()
                result["rules_metrics_end"] = rules.metrics()
            finally:
                sys_watch.close()
            stack.check_alive()
            stack.stop()
    env["loadavg_end"] = tuple(round(x, 2) for x in os.getloadavg())
    env["memory_total_mb"] = psutil.virtual_memory().total / MB
    verdict = analyse(result, selection(args, args.warmup))
    text = report(args, env, maximum, result, verdict)
    made = plots(result, verdict, args.plots, plot_title(result, env, verdict))
    print()
    print(text)
    if args.markdown:
        print()
        print(markdown(verdict))
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": env,
        "maximum": maximum,
        "soak": result,
        "verdict": verdict,
        "plots": [str(p) for p in made],
        "report": text,
        "total_seconds": time.time() - started,
    }
    out.write_text(json.dumps(record, indent=1, default=str))
    print(f"\nplots: {', '.join(str(p) for p in made)}")
    print(f"total {time.time() - started:.0f} s; results: {out.relative_to(ROOT)}")
    if verdict["problems"]:
        print(f"\n{len(verdict['problems'])} PROBLEM(S):")
        for problem in verdict["problems"]:
            print(f"  {problem}")
        sys.exit(1)


if __name__ == "__main__":
    main()
