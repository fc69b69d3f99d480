"""The whole system under faults: the full stack on free ports (tests/chaos/cluster.py), a
fleet of 510 devices in a process of its own (tests/chaos/fleet.py), an operator's REST
traffic (workload.py), and every kind of fault at times drawn from a printed seed
(faults.py); then the promises checked with exact counts (invariants.py) and a report.

The short form (one round of faults, TimescaleDB) runs in `make test`; `make chaos` runs
the long form. Settings, all optional:

- FLEETLINE_CHAOS_SEED: replay a run (its report prints the seed);
- FLEETLINE_CHAOS_ROUNDS: rounds of faults, each fault once per round (1);
- FLEETLINE_CHAOS_BACKENDS: timescaledb, postgres or both, comma-separated (timescaledb).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from fleetline import apikeys, releases
from fleetline_dev.embedded import EmbeddedError, ensure_timescaledb
from fleetline_dev.simulated_gateways import child_ids, gateway_ids, register_gateways
from fleetline_dev.simulator import MODEL, device_ids, register_fleet
from tests.chaos import invariants
from tests.chaos.cluster import Cluster
from tests.chaos.faults import Injector, schedule
from tests.chaos.workload import METHOD_TIMEOUT_S, Api, Record, Workload
from tests.support import DEVICE_KEY_SECRET, SUMMARY_PROPERTY, release_key_file, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

T = TypeVar("T")

SEED = int(os.environ.get("FLEETLINE_CHAOS_SEED") or secrets.randbits(32))
ROUNDS = int(os.environ.get("FLEETLINE_CHAOS_ROUNDS") or 1)
BACKENDS = (os.environ.get("FLEETLINE_CHAOS_BACKENDS") or "timescaledb").split(",")

DIRECT, PROVISIONED, GATEWAYS, CHILDREN, ALARM = 400, 50, 5, 10, 5
PREFIX = {"direct": "chaos-d-", "provisioned": "chaos-p-", "gateway": "chaos-gw-",
          "alarm": "chaos-a-"}
INTERVAL_S = 5.0
# A device goes offline on about one reading in 300 (every 25 minutes on average), for
# 5 to 25 s, and sends what it kept when back.
OFFLINE_PROBABILITY = 1 / 300
OFFLINE_SECONDS = (5.0, 25.0)
PHASE_TIMEOUT_S = 120
SETTLE_TIMEOUT_S = 180.0
IMAGE_BYTES = 16 * 1024
# A method call answers within its timeout and this: the API counts the timeout from the
# request's arrival, its key check included, and does not send a call left with too
# little of it (503).
METHOD_SLACK_S = 2.0
# Rollout devices may fail (a download that failed every attempt, a phase past its
# timeout while a fault lasted), up to this share of them.
MAX_ROLLOUT_FAILED_SHARE = 0.02


async def _db(url: str, query: str, *args: Any) -> list[Any]:
    con = await asyncpg.connect(url)
    try:
        return list(await con.fetch(query, *args))
    finally:
        await con.close()


def db(url: str, query: str, *args: Any) -> list[Any]:
    return asyncio.run(_db(url, query, *args))


async def _register(url: str) -> dict[str, Any]:
    """The fleet's registry: keys for the direct, gateway and alarm devices (the alarm
    devices tagged role=alarm, the rule's match), and an admin key."""
    key_secret = DEVICE_KEY_SECRET.encode()
    direct = await register_fleet(url, device_ids(DIRECT, PREFIX["direct"]), key_secret)
    alarm_ids = device_ids(ALARM, PREFIX["alarm"])
    con = await asyncpg.connect(url)
    try:
        await con.execute("INSERT INTO devices (id, tags) SELECT d, '{\"role\": \"alarm\"}' "
                          "FROM unnest($1::text[]) d", alarm_ids)
        admin = (await apikeys.create_key(con, name="chaos", scopes=["admin"])).token
    finally:
        await con.close()
    alarm = await register_fleet(url, alarm_ids, key_secret)
    gateways = await register_gateways(url, gateway_ids(GATEWAYS, PREFIX["gateway"]),
                                       key_secret, children=CHILDREN)
    return {"direct": direct, "alarm": alarm, "gateways": gateways, "admin": admin}


def _release(api: Api) -> int:
    image = os.urandom(IMAGE_BYTES)
    made = api.request("POST", "/v1/firmware", json={
        "version": "2.0.0", "target": MODEL, "kind": "image", "size": len(image),
        "sha256": hashlib.sha256(image).hexdigest()})
    assert made is not None and made.status_code == 201, made and made.text
    fid = int(made.json()["id"])
    done = api.request("PUT", f"/v1/firmware/{fid}/content", content=image, headers={
        "Content-Range": f"bytes 0-{len(image) - 1}/{len(image)}",
        "Content-Type": "application/octet-stream"})
    assert done is not None and done.json().get("status") == "released", done and done.text
    return fid


def _setup_rest(api: Api) -> str:
    """The enrollment group (its key) and the alarm rule."""
    group = api.request("POST", "/v1/enrollments", json={
        "id": "chaos-group", "kind": "group", "attestation": "symmetric_key",
        "registration_pattern": f"{PREFIX['provisioned']}[0-9]+",
        "initial_tags": {"source": "enrolled"}})
    assert group is not None and group.status_code == 201, group and group.text
    rule = api.request("POST", "/v1/rules", json={
        "name": "chaos: hot", "match": {"tags": {"role": "alarm"}}, "metric": "temperature",
        "raise": {"op": ">", "value": 50}, "clear": {"op": "<", "value": 30},
        "severity": "major"})
    assert rule is not None and rule.status_code == 201, rule and rule.text
    key: str = group.json()["key"]
    return key


def _jobs(api: Api, fid: int) -> list[int]:
    """A twin update of the gateways and their children, a method on the provisioned
    devices, a rollout to the direct devices."""
    bodies = [
        {"type": "twin", "query": "tags.source = 'simulated-gateway'",
         "patch": {"chaos_job": 1}, "batch_size": 10},
        {"type": "method", "query": "tags.source = 'enrolled'",
         "method": {"name": "ping", "params": {}, "timeout_s": METHOD_TIMEOUT_S},
         "batch_size": 10},
        {"type": "rollout", "query": "tags.source = 'simulator'", "firmware_id": fid,
         "canary": 5, "wave_size": 100, "batch_size": 50, "failure_threshold_percent": 100,
         "on_failure": "pause",
         "timeouts": dict.fromkeys(("notified", "downloading", "verifying", "applying",
                                    "rebooting"), PHASE_TIMEOUT_S)},
    ]
    ids = []
    for body in bodies:
        made = api.request("POST", "/v1/jobs", json=body)
        assert made is not None and made.status_code in (201, 202), made and made.text
        ids.append(int(made.json()["id"]))
    return ids


def _finals(url: str, c2d_ids: list[str], job_ids: list[int]) -> dict[str, Any]:
    c2d = Counter(r["state"] for r in db(
        url, "SELECT state FROM c2d_messages WHERE id = ANY($1::uuid[])", c2d_ids))
    jobs = Counter(r["state"] for r in db(url, "SELECT state FROM jobs WHERE id = ANY($1)",
                                          job_ids))
    devices = Counter(f"{r['type']} {r['state']}" for r in db(
        url, "SELECT j.type, d.state FROM job_devices d JOIN jobs j ON j.id = d.job_id "
        "WHERE d.job_id = ANY($1)", job_ids))
    reasons = Counter(f"{r['type']}: {r['reason']} ({(r['error'] or '')[:100]})" for r in db(
        url, "SELECT j.type, d.reason, d.error FROM job_devices d JOIN jobs j ON j.id = d.job_id "
        "WHERE d.job_id = ANY($1) AND d.state = 'failed'", job_ids))
    return {"c2d": dict(c2d), "jobs": dict(jobs), "job_devices": dict(devices),
            "failed": dict(reasons)}


def _all_final(f: dict[str, Any]) -> bool:
    return (not set(f["c2d"]) & {"queued", "sent"}
            and not set(f["jobs"]) & {"queued", "running", "paused"}
            and not any(k.endswith((" pending", " running")) for k in f["job_devices"]))


def _fleet_spec(cluster: Cluster, registry: dict[str, Any], group_key: str,
                ledger: Path) -> Path:
    """What the fleet's process is told (with the devices' keys: readable by its owner
    only)."""
    assert cluster.broker is not None
    spec = cluster.root / "fleet.json"
    spec.touch(mode=0o600)
    spec.write_text(json.dumps({
        "mqtt_url": cluster.broker.tls_url, "ca_file": str(cluster.tls.ca_cert),
        "interval_s": INTERVAL_S, "offline_probability": OFFLINE_PROBABILITY,
        "offline_seconds": OFFLINE_SECONDS,
        "release_key": releases.public_point(releases.load_key(release_key_file())).hex(),
        "direct_prefix": PREFIX["direct"], "direct_keys": registry["direct"],
        "provisioned": PROVISIONED, "provisioned_prefix": PREFIX["provisioned"],
        "enrollment": "chaos-group", "group_key": group_key,
        "provision_urls": [cluster.api_device_url(i) for i in range(len(cluster.apis))],
        "gateway_prefix": PREFIX["gateway"], "gateway_keys": registry["gateways"],
        "children": CHILDREN, "alarm_prefix": PREFIX["alarm"], "alarm_keys": registry["alarm"],
        "seed": SEED, "ledger": str(ledger)}))
    return spec


@pytest.fixture(params=BACKENDS)
def cluster(request: pytest.FixtureRequest, tmp_path: Path, artifacts: Path
            ) -> Any:
    timescale = request.param == "timescaledb"
    if timescale:
        try:
            ensure_timescaledb()
        except EmbeddedError as exc:
            pytest.fail(f"TimescaleDB could not be built: {exc}", pytrace=False)
    logs = artifacts / f"chaos-{request.param}"
    logs.mkdir(parents=True, exist_ok=True)
    c = Cluster(tmp_path, logs, timescaledb=timescale)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def children() -> list[str]:
    return [c for g in gateway_ids(GATEWAYS, PREFIX["gateway"]) for c in child_ids(g, CHILDREN)]


def fleet_ids() -> list[str]:
    """The devices that publish readings: all but the gateways themselves."""
    return (device_ids(DIRECT, PREFIX["direct"])
            + device_ids(PROVISIONED, PREFIX["provisioned"]) + children()
            + device_ids(ALARM, PREFIX["alarm"]))


TEMPERATURES = ("SELECT device_id, time, value FROM readings WHERE metric = 'temperature' "
                "AND device_id LIKE $1 || '%'")


class Run:
    """One run: what it set up, what it did, what it found."""

    def __init__(self, cluster: Cluster, root: Path, say: Any) -> None:
        self.cluster = cluster
        self.root = root
        self.say = say
        self.faults = schedule(SEED, ROUNDS)
        self.record = Record()
        self.t0 = time.time()
        self.job_ids: list[int] = []
        self.finals: dict[str, Any] = {}
        self.fleet: subprocess.Popen[bytes] | None = None
        self.fleet_out: dict[str, Any] = {}
        self.api: Api | None = None
        self.injector: Injector | None = None
        self.workload: Workload | None = None
        self.faults_over = 0.0

    def start(self) -> None:
        """The registry, the release, the enrollment group, the rule, the fleet."""
        registry = asyncio.run(_register(self.cluster.url))
        self.api = Api([a.url for a in self.cluster.apis], registry["admin"], self.record)
        fid = _release(self.api)
        group_key = _setup_rest(self.api)
        spec = _fleet_spec(self.cluster, registry, group_key, self.root / "ledger.json")
        log = (self.cluster.log_dir / "fleet.log").open("ab")
        self.fleet = subprocess.Popen([sys.executable, "-m", "tests.chaos.fleet", str(spec)],
                                      stdout=log, stderr=subprocess.STDOUT)
        log.close()
        total = DIRECT + PROVISIONED + GATEWAYS * (CHILDREN + 1) + ALARM

        def connected() -> bool:
            if self.fleet is not None and self.fleet.poll() is not None:
                raise AssertionError(f"the fleet exited with {self.fleet.returncode} "
                                     f"(fleet.log in {self.cluster.log_dir})")
            # Each device's first status: offline periods start soon after.
            return bool(db(self.cluster.url, "SELECT count(*) AS n FROM device_activity "
                           "WHERE device_id LIKE 'chaos-%' AND status_changed_at IS NOT NULL"
                           )[0]["n"] >= total)

        wait_until(connected, timeout=ONLINE_TIMEOUT_S, interval=1,
                   what=f"{total} devices connected")
        self.say(f"chaos: {total} devices connected")
        self.job_ids = _jobs(self.api, fid)

    def exercise(self) -> None:
        """The operator's traffic and the faults; then every service ready again, the work
        ended, and the fleet publishing again before it stops."""
        assert self.api is not None
        targets = (device_ids(DIRECT, PREFIX["direct"])
                   + device_ids(PROVISIONED, PREFIX["provisioned"]) + children())
        self.workload = Workload(self.api, targets, SEED)
        self.injector = Injector(self.cluster, self.faults,
                                 lambda line: self.say(f"chaos: {line}"))
        self.t0 = time.time()
        self.workload.start()
        self.injector.start()
        self.injector.join()
        self.workload.stop()
        assert self.injector.error is None, f"a fault failed: {self.injector.error!r}"
        assert self.workload.error is None, f"the workload failed: {self.workload.error!r}"
        self.faults_over = time.time()
        self.cluster.wait_ready()
        self.say("chaos: faults over, every service ready; waiting for the work to end")
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        self.finals = _finals(self.cluster.url, list(self.record.c2d_ids), self.job_ids)
        while not _all_final(self.finals) and time.monotonic() < deadline:
            time.sleep(2)
            self.finals = _finals(self.cluster.url, list(self.record.c2d_ids), self.job_ids)
        # Long enough after the last fault for every device to be back and publishing
        # (offline periods end within 25 s; a reconnection after one fault waits about
        # a second).
        time.sleep(max(0.0, self.faults_over + QUIET_AFTER_FAULTS_S - time.time()))

    def stop(self) -> None:
        """Whatever happened: the faults and the traffic stopped, the fleet stopped (its
        log written), the API clients closed."""
        if self.injector is not None:
            self.injector.stop()
        if self.workload is not None:
            self.workload.stop()
        if self.fleet is not None:
            self.fleet.send_signal(signal.SIGTERM)
            try:
                self.fleet.wait(FLEET_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.fleet.kill()
                self.fleet.wait()
        ledger = self.root / "ledger.json"
        if ledger.exists():
            self.fleet_out = json.loads(ledger.read_text())
        if self.api is not None:
            self.api.close()

    def stored(self, prefix: str = "chaos-") -> list[Any]:
        return db(self.cluster.url, TEMPERATURES, prefix)

    def settled_rows(self) -> list[Any]:
        """The fleet's stored readings once ingest has written what it still held: until
        no acknowledged reading is missing, or the missing ones stop changing."""
        acked = self.fleet_out.get("acked", {})
        return settle(self.stored, lambda rows: invariants.missing(acked, rows))

    def settled_alarms(self) -> invariants.Alarms:
        """The alarms once the rules service has evaluated the last readings: until they
        match the hot spells, or stop changing."""
        rows = self.stored(PREFIX["alarm"])
        query = "SELECT device_id, state FROM rule_alarms"
        return settle(lambda: invariants.check_alarms(rows, db(self.cluster.url, query)),
                      lambda alarms: alarms.wrong)


def settle(look: Callable[[], T], problems: Callable[[T], Any]) -> T:
    """``look()`` each second until it shows no ``problems``, or the same ones for
    SETTLE_ROWS_S (another service still catching up changes them): the last look."""
    seen = look()
    last, since = problems(seen), time.monotonic()
    while last and time.monotonic() - since < SETTLE_ROWS_S:
        time.sleep(1)
        seen = look()
        now = problems(seen)
        if now != last:
            last, since = now, time.monotonic()
    return seen


# The run's own waits, within the test's timeout (a round of faults takes about 2
# minutes): the fleet connected, every service ready (each), the work ended, the quiet
# after the faults, the fleet stopped, ingest and rules caught up.
ONLINE_TIMEOUT_S = 120.0
QUIET_AFTER_FAULTS_S = 45.0
FLEET_STOP_TIMEOUT_S = 30.0
SETTLE_ROWS_S = 15.0


@pytest.mark.timeout(480 + 150 * ROUNDS)
def test_the_whole_system_keeps_its_promises_through_faults(
    cluster: Cluster, tmp_path: Path, record_property: Any,
) -> None:
    backend = "TimescaleDB" if cluster.timescaledb else "PostgreSQL"
    say = print
    say(f"\nchaos: seed {SEED} ({backend}); replay with FLEETLINE_CHAOS_SEED={SEED}")
    run = Run(cluster, tmp_path, say)
    for f in run.faults:
        say(f"  planned t={f.at:6.1f} s  {f.describe()}")
    try:
        run.start()
        run.exercise()
    finally:
        run.stop()
        acked: dict[str, list[list[Any]]] = run.fleet_out.get("acked", {})
        rows = run.settled_rows() if acked else []
        telemetry = invariants.check_telemetry(acked, rows, run.faults)
        alarms = run.settled_alarms()
        quiet = invariants.check_liveness(acked, fleet_ids(), run.faults_over)
        wrong_answers = invariants.check_answers(run.record, run.faults)
        finals = run.finals
        finals["rollout"] = {k.split()[1]: n for k, n in finals.get("job_devices", {}).items()
                             if k.startswith("rollout")}
        finals["method_timeout"] = METHOD_TIMEOUT_S
        text = invariants.report(
            seed=SEED, backend=backend,
            devices={"direct": DIRECT, "provisioned": PROVISIONED, "gateways": GATEWAYS,
                     "children": GATEWAYS * CHILDREN, "alarm": ALARM},
            faults=run.faults, t0=run.t0, telemetry=telemetry, alarms=alarms,
            record=run.record, samples=cluster.samples, finals=finals, fleet=run.fleet_out)
        say(text)
        (cluster.log_dir / "report.txt").write_text(text + "\n")
        for line in text.splitlines():
            record_property(SUMMARY_PROPERTY, ("chaos", line))

    assert run.fleet is not None and run.fleet.returncode == 0, "the fleet failed (fleet.log)"
    assert telemetry.acked > 0 and not telemetry.lost, (
        f"acknowledged readings lost: {telemetry.lost[:10]}")
    assert telemetry.wrong_value == 0
    assert not quiet, f"devices not publishing after the faults: {quiet[:10]}"
    assert not alarms.wrong, alarms.wrong
    assert _all_final(finals), f"not ended {SETTLE_TIMEOUT_S:g} s after the faults: {finals}"
    assert set(finals["c2d"]) == {"completed"}, finals["c2d"]
    rollout = finals["rollout"]
    assert rollout.get("failed", 0) <= MAX_ROLLOUT_FAILED_SHARE * DIRECT, finals["failed"]
    slow = [a for a in run.record.methods if a.seconds > METHOD_TIMEOUT_S + METHOD_SLACK_S]
    assert not slow, [f"{a.status} after {a.seconds:.1f} s" for a in slow]
    assert not wrong_answers, wrong_answers
    for name, peak in cluster.samples.peak_rss.items():
        limit = invariants.MAX_RSS_MB.get(name.split("-")[0])
        if limit is None:  # the broker: reported, not a service of fleetline's
            continue
        assert peak < limit * 2**20, f"{name} reached {peak / 2**20:.0f} MB (limit {limit})"
