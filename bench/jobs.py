"""bench/jobs.py: fleetline's /v1/jobs against a client that calls the devices one by one.

    .venv/bin/python bench/jobs.py            # 2,000 devices, 200 online, 3 runs (~2.5 min)
    .venv/bin/python bench/jobs.py --quick    # 500 devices, 100 online, 1 run (~45 s)
    .venv/bin/python bench/jobs.py --devices 10000 --online 500 --batch-size 500

Starts its own PostgreSQL (fleetline_dev.embedded.LocalPostgres) and Mosquitto
(LocalMosquitto, the project's broker config), `python -m fleetline_cli ingest` and
`python -m fleetline_cli api` as production runs them, registers N devices (tagged
run=bench), and brings K of them online as real MQTT devices: the simulator of
fleetline_dev/simulator.py (`run_fleet`) in a child process, which answers `ping` and reports
each desired document back; ingest records their `online` status. Then, in the same run:

(a) a desired-twin patch on every device (`tags.run = 'bench'`, N devices);
(b) a direct method, `ping`, on the online ones (`tags.run = 'bench' AND status =
    'online'`, K devices);

each done four ways, `--repeat` times (median reported): what a user without jobs does
(list the matches with `/v1/query`, then `PATCH /v1/devices/{id}/twin` or
`POST /v1/devices/{id}/methods/ping` one device at a time, and the same from a pool of
`--threads` threads), and a job with the default batch_size and with `--batch-size`.
Every device's outcome is checked (a job's through `/v1/jobs/{id}/devices`, the online
devices' reported twins through `/v1/query`); the benchmark exits 1 if any device did not
end as expected. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import orjson  # noqa: E402
from measure import CpuWindow, log, pct  # noqa: E402
from stack import (  # noqa: E402
    PROBE_INTERVAL_SECONDS,
    JobsBench,
    Prober,
    Stack,
    add_api_env,
    admin_key,
    api_service,
    environment,
    ingest_service,
    serve_fleet,
    service_env,
    workdir,
)

from fleetline.migrate import migrate  # noqa: E402
from fleetline.settings import StorageSettings, parse_mqtt_url  # noqa: E402
from fleetline_dev.embedded import LocalMosquitto, LocalPostgres  # noqa: E402
from fleetline_dev.simulator import device_ids, run_fleet  # noqa: E402

ONLINE_PREFIX = "bench-on-"
OFFLINE_PREFIX = "bench-off-"
TWIN_QUERY = "tags.run = 'bench'"
METHOD_QUERY = "tags.run = 'bench' AND status = 'online'"
DEFAULT_BATCH_SIZE = 10  # the job's own default (fleetline_api/schemas/jobs.py)
METHOD_TIMEOUT_S = 10
# The simulated devices send one reading when they connect and the next after this long:
# no telemetry load during the measurements.
FLEET_INTERVAL_SECONDS = 3600.0
JOB_POLL_SECONDS = 0.05
ONLINE_TIMEOUT_SECONDS = 60.0
SETTLE_SECONDS = 1.0


# -- services -------------------------------------------------------------------------


def serve_devices(count: int, mqtt_url: str) -> None:
    """The child process of the online devices: the simulator until SIGTERM."""
    serve_fleet(
        lambda stop: run_fleet(
            parse_mqtt_url(mqtt_url),
            devices=count,
            interval_seconds=FLEET_INTERVAL_SECONDS,
            prefix=ONLINE_PREFIX,
            stop=stop,
        )
    )


async def setup_db(url: str, online: list[str], offline: list[str]) -> None:
    """Register the devices (COPY into the registry, as the other benches do)."""
    con = await asyncpg.connect(url)
    try:
        records = [(d, json.dumps({"run": "bench", "group": "online"})) for d in online] + [
            (d, json.dumps({"run": "bench", "group": "offline"})) for d in offline
        ]
        await con.copy_records_to_table("devices", records=records, columns=["id", "tags"])
        await con.execute("ANALYZE devices")
    finally:
        await con.close()


# -- measuring ------------------------------------------------------------------------


@dataclass
class Result:
    kind: str  # twin | method
    how: str  # sequential | threads | job
    width: int  # threads or batch_size (1 for sequential)
    devices: int
    failed: int
    first_s: float  # start -> first device done
    last_s: float  # start -> last device done
    get_ms: list[float] = field(repr=False)
    get_errors: int = 0
    job_get_ms: list[float] = field(default_factory=list, repr=False)
    create_ms: float | None = None
    other_cores: float = 0.0

    @property
    def label(self) -> str:
        if self.how == "sequential":
            return "client, sequential"
        if self.how == "threads":
            return f"client, {self.width} threads"
        return f"job, batch_size {self.width}"

    @property
    def rate(self) -> float:
        return self.devices / self.last_s if self.last_s > 0 else float("nan")


class Bench(JobsBench):
    def __init__(
        self, args: argparse.Namespace, *, api_url: str, key: str, db_url: str, stack: Stack
    ) -> None:
        limits = httpx.Limits(max_connections=max(16, args.threads * 2))
        super().__init__(args, api_url=api_url, key=key, db_url=db_url, stack=stack, limits=limits)
        self.probe_client = self.api_client()
        self.online = device_ids(args.online, ONLINE_PREFIX)
        self.probe_path = f"/v1/devices/{self.online[0]}"

    # -- the four ways --

    def twin_call(self, device_id: str, patch: dict[str, Any]) -> str | None:
        r = self.client.patch(
            f"/v1/devices/{device_id}/twin",
            content=orjson.dumps(patch),
            headers={"content-type": "application/merge-patch+json"},
        )
        if r.status_code != 200:
            return f"{device_id}: {r.status_code} {r.text[:200]}"
        twin = r.json()
        if twin["desired_published_version"] != twin["desired_version"]:
            return f"{device_id}: desired version {twin['desired_version']} not published"
        if twin["desired"].get("bench") != patch["bench"]:
            return f"{device_id}: desired is {twin['desired']}"
        return None

    def method_call(self, device_id: str, params: dict[str, Any]) -> str | None:
        r = self.client.post(
            f"/v1/devices/{device_id}/methods/ping",
            json={"params": params, "timeout_s": METHOD_TIMEOUT_S},
        )
        if r.status_code != 200:
            return f"{device_id}: {r.status_code} {r.text[:200]}"
        answer = r.json()
        if answer["status"] != 200 or answer["payload"] != {"pong": True, "params": params}:
            return f"{device_id}: answered {answer['status']} {answer['payload']}"
        return None

    def client_run(self, kind: str, threads: int, expected: int, tag: str) -> Result:
        """What a user without jobs does: list the matches, then call each device."""
        patch = {"bench": {"run": tag}}
        params = {"run": tag}
        query = TWIN_QUERY if kind == "twin" else METHOD_QUERY
        done: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def one(device_id: str) -> None:
            try:
                error = (
                    self.twin_call(device_id, patch)
                    if kind == "twin"
                    else self.method_call(device_id, params)
                )
            except httpx.HTTPError as exc:
                error = f"{device_id}: {exc!r}"
            with lock:
                done.append(time.time())
                if error:
                    errors.append(error)

        cpu = CpuWindow()
        with Prober(self.probe_client, self.probe_path) as probe:
            t0 = time.time()
            ids = [m["device_id"] for m in self.matches(query)]
            if threads <= 1:
                for device_id in ids:
                    one(device_id)
            else:
                with ThreadPoolExecutor(threads, thread_name_prefix="bench-client") as pool:
                    list(pool.map(one, ids))
        if len(ids) != expected:
            self.problem(f"{kind}: /v1/query matched {len(ids)} devices, not {expected}")
        for error in errors[:5]:
            self.problem(f"{kind}, {threads} thread(s): {error}")
        if len(errors) > 5:
            self.problem(f"{kind}, {threads} thread(s): {len(errors) - 5} more devices failed")
        return Result(
            kind=kind,
            how="sequential" if threads <= 1 else "threads",
            width=max(1, threads),
            devices=len(ids) - len(errors),
            failed=len(errors) + max(0, expected - len(ids)),
            first_s=min(done) - t0 if done else float("nan"),
            last_s=max(done) - t0 if done else float("nan"),
            get_ms=probe.ms,
            get_errors=probe.errors,
            other_cores=cpu.other_cores(),
        )

    def job_run(self, kind: str, batch_size: int, expected: int, tag: str) -> Result:
        """POST /v1/jobs, follow it with GET /v1/jobs/{id}, then check every device."""
        body: dict[str, Any] = {"type": kind, "batch_size": batch_size}
        if kind == "twin":
            body |= {"query": TWIN_QUERY, "patch": {"bench": {"run": tag}}}
        else:
            body |= {
                "query": METHOD_QUERY,
                "method": {"name": "ping", "params": {"run": tag}, "timeout_s": METHOD_TIMEOUT_S},
            }
        job_get_ms: list[float] = []
        cpu = CpuWindow()
        with Prober(self.probe_client, self.probe_path) as probe:
            job, t0, create_ms = self.create_job(body)
            job = self.wait_job(
                job["id"], job=job, poll_seconds=JOB_POLL_SECONDS, get_ms=job_get_ms
            )
        rows = self.job_devices(job["id"])
        bad = [row for row in rows if not self.job_outcome_ok(kind, row, tag)]
        if job["state"] != "completed" or job["progress"]["total"] != expected:
            self.problem(
                f"{kind} job {job['id']}: {job['state']}, progress {job['progress']}, "
                f"expected {expected} devices"
            )
        for row in bad[:5]:
            self.problem(
                f"{kind} job {job['id']}, batch_size {batch_size}: {row['device_id']} "
                f"{row['state']}, {row['status']} {row['reason']}: {row['error'] or row['result']}"
            )
        if len(bad) > 5:
            self.problem(f"{kind} job {job['id']}: {len(bad) - 5} more devices failed")
        finished = [datetime.fromisoformat(r["finished_at"]).timestamp() for r in rows]
        return Result(
            kind=kind,
            how="job",
            width=batch_size,
            devices=len(rows) - len(bad),
            failed=len(bad) + max(0, expected - len(rows)),
            first_s=min(finished) - t0 if finished else float("nan"),
            last_s=max(finished) - t0 if finished else float("nan"),
            get_ms=probe.ms,
            get_errors=probe.errors,
            job_get_ms=job_get_ms,
            create_ms=create_ms,
            other_cores=cpu.other_cores(),
        )

    def job_outcome_ok(self, kind: str, row: dict[str, Any], tag: str) -> bool:
        if row["state"] != "succeeded" or row["status"] != 200 or not row["finished_at"]:
            return False
        if kind == "twin":
            result = row["result"] or {}
            return bool(result.get("published") is True and row["reason"] == "applied")
        payload = (row["result"] or {}).get("payload")
        return bool(payload == {"pong": True, "params": {"run": tag}})

    def check_twins(self, tag: str) -> None:
        """After a twin run: every device's desired document holds the patch, and every
        online device got it (retained) and reported it back through ingest."""
        desired = self.matches(f"{TWIN_QUERY} AND desired.bench.run = '{tag}'")
        if len(desired) != self.args.devices:
            self.problem(f"twin {tag}: {len(desired)} of {self.args.devices} devices have it")
        deadline = time.monotonic() + 60
        while True:
            reported = self.matches(f"tags.group = 'online' AND reported.bench.run = '{tag}'")
            if len(reported) == self.args.online:
                break
            if time.monotonic() > deadline:
                self.problem(
                    f"twin {tag}: {len(reported)} of {self.args.online} online devices "
                    "reported the desired document back within 60 s"
                )
                break
            time.sleep(0.2)
        time.sleep(SETTLE_SECONDS)

    def warm_up(self) -> None:
        """One call of each kind, and a one-device job of each: connections, caches."""
        device = self.online[0]
        for kind in ("twin", "method"):
            body: dict[str, Any] = {"type": kind, "query": f"id = '{device}'"}
            if kind == "twin":
                body["patch"] = {"warm": True}
            else:
                body["method"] = {"name": "ping", "timeout_s": METHOD_TIMEOUT_S}
            job, _, _ = self.create_job(body)
            job = self.wait_job(job["id"], job=job, poll_seconds=0.1, timeout_seconds=30)
            if job["progress"]["succeeded"] != 1:
                raise RuntimeError(f"warm-up {kind} job: {job['state']} {job['progress']}")
        r = self.client.post(f"/v1/devices/{device}/methods/ping", json={"timeout_s": 10})
        r.raise_for_status()
        r = self.client.patch(
            f"/v1/devices/{device}/twin",
            content=b'{"warm": null}',
            headers={"content-type": "application/merge-patch+json"},
        )
        r.raise_for_status()

    def idle_probe(self, seconds: float) -> list[float]:
        with Prober(self.probe_client, self.probe_path) as probe:
            time.sleep(seconds)
        return probe.ms

    def run(self) -> dict[str, Any]:
        args = self.args
        self.warm_up()
        idle = self.idle_probe(3.0)
        results: list[Result] = []
        plan = [("twin", args.devices), ("method", args.online)]
        ways: list[tuple[str, int]] = [("sequential", 1)]
        if args.threads > 1:
            ways.append(("threads", args.threads))
        ways += [("job", DEFAULT_BATCH_SIZE), ("job", args.batch_size)]
        for rep in range(1, args.repeat + 1):
            for kind, expected in plan:
                for how, width in ways:
                    tag = f"{kind}-{how}-{width}-{rep}"
                    log(f"[{rep}/{args.repeat}] {kind} over {expected:,} devices: {how} {width}")
                    if how == "job":
                        res = self.job_run(kind, width, expected, tag)
                    else:
                        res = self.client_run(kind, width, expected, tag)
                    log(
                        f"  {res.devices:,} done, {res.failed} failed, last outcome after "
                        f"{res.last_s:.2f} s: {res.rate:,.0f} devices/s"
                    )
                    results.append(res)
                    if kind == "twin":
                        self.check_twins(tag)
                    else:
                        time.sleep(SETTLE_SECONDS)
        return {"idle_get_ms": idle, "results": results}


# -- report ---------------------------------------------------------------------------


def report(args: argparse.Namespace, measured: dict[str, Any], env: dict[str, Any]) -> str:
    results: list[Result] = measured["results"]
    idle = measured["idle_get_ms"]
    lines = [
        f"fleetline jobs benchmark -- {args.devices:,} devices, {args.online:,} online "
        f"(simulated, one child process); PostgreSQL {env['postgres']}, {env['mosquitto']}, "
        f"Python {env['python']}, {env['cpus']} CPUs shared by everything",
        f"GET /v1/devices/{{id}} every {PROBE_INTERVAL_SECONDS * 1000:.0f} ms from another "
        f"client; idle: p50 {pct(idle, 50):.1f} ms, max {max(idle, default=0):.1f} ms",
    ]
    if args.api_env or args.broker_conf:
        lines.append(f"extra settings: {' '.join(args.api_env)} broker: {args.broker_conf}")
    lines.append("")
    hdr = (
        f"{'run':<24} {'devices':>7} {'failed':>6} {'first ms':>8} {'last s':>7} "
        f"{'devices/s':>9} {'runs min-max':>11} {'GET p50/p95/max ms':>19} {'job GET p50/max':>15} "
        f"{'other load':>10}"
    )
    titles = {
        "twin": f"(a) twin patch, {TWIN_QUERY} ({args.devices:,} devices)",
        "method": f"(b) method ping, {METHOD_QUERY} ({args.online:,} devices)",
    }
    for kind in ("twin", "method"):
        groups: dict[tuple[str, int], list[Result]] = {}
        for r in results:
            if r.kind == kind:
                groups.setdefault((r.how, r.width), []).append(r)
        # Each way's median run by devices/s (the upper one of an even count).
        rows = [sorted(g, key=lambda r: r.rate)[len(g) // 2] for g in groups.values()]
        lines += [titles[kind], hdr, "-" * len(hdr)]
        for r, g in zip(rows, groups.values(), strict=True):
            gets = f"{pct(r.get_ms, 50):.1f}/{pct(r.get_ms, 95):.1f}/{max(r.get_ms, default=0):.0f}"
            if r.get_errors:
                gets += f" e{r.get_errors}"
            jg = f"{pct(r.job_get_ms, 50):.1f}/{max(r.job_get_ms):.0f}" if r.job_get_ms else "-"
            rates = [x.rate for x in g]
            spread = f"{min(rates):,.0f}-{max(rates):,.0f}" if len(rates) > 1 else "-"
            lines.append(
                f"{r.label:<24} {r.devices:>7,} {sum(x.failed for x in g):>6} "
                f"{r.first_s * 1000:>8.0f} {r.last_s:>7.2f} {r.rate:>9,.0f} {spread:>11} "
                f"{gets:>19} {jg:>15} {r.other_cores:>7.2f} cr"
            )
        base = [r for r in rows if r.how != "job"]
        for r in (r for r in rows if r.how == "job"):
            ratios = ", ".join(f"x{r.rate / b.rate:.2f} {b.label}" for b in base)
            lines.append(f"  job, batch_size {r.width}: {ratios}")
        lines.append("")
    lines += [
        f"Each row: the median of {args.repeat} run(s) by devices/s ('runs min-max': all "
        "of them; 'failed': over all runs); ratios of medians.",
        "first ms / last s: from the start (the POST /v1/jobs; for the client, its first "
        "/v1/query page) to the first / last device",
        "  done (a job: the devices' finished_at; the client: each response). devices/s = "
        "devices / last s. The client lists the matches",
        "  with /v1/query (1,000 a page), then calls each device; a job's time includes "
        "creating it (snapshot of the matches).",
        "GET: another client's GET /v1/devices/{id} during the run; job GET: the "
        "benchmark's GET /v1/jobs/{id} progress polls (every "
        f"{JOB_POLL_SECONDS * 1000:.0f} ms).",
        "other load: CPU cores used during the run by processes outside this benchmark "
        "(other people's work on the same cores).",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, help="registered devices (default 2000; quick 500)")
    p.add_argument("--online", type=int, help="of them online (default 200; quick 100)")
    p.add_argument(
        "--batch-size", type=int, default=100, help="the larger job batch_size (default 100)"
    )
    p.add_argument(
        "--threads", type=int, default=8, help="the client's thread pool (default 8; 0 skips)"
    )
    add_api_env(p)
    p.add_argument(
        "--broker-conf",
        action="append",
        default=[],
        metavar="LINE",
        help="an extra line for the broker's config, e.g. 'set_tcp_nodelay true' (repeatable)",
    )
    p.add_argument("--repeat", type=int, help="runs of each way, median reported (default 3)")
    p.add_argument("--quick", action="store_true", help="smoke run, about a minute")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--serve-devices", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mqtt-url", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.devices is None:
        a.devices = 500 if a.quick else 2000
    if a.online is None:
        a.online = 100 if a.quick else 200
    if a.repeat is None:
        a.repeat = 1 if a.quick else 3
    if a.repeat < 1:
        p.error("--repeat must be at least 1")
    if not 1 <= a.online <= a.devices:
        p.error("--online must be between 1 and --devices")
    if not DEFAULT_BATCH_SIZE < a.batch_size <= 1000:
        p.error(f"--batch-size must be above the default {DEFAULT_BATCH_SIZE}, at most 1000")
    return a


def main() -> None:
    args = parse_args()
    if args.serve_devices:
        serve_devices(args.serve_devices, args.mqtt_url)
        return
    started = time.time()
    with (
        workdir("flbench-jobs-", keep=args.keep) as tmp,
        Stack(tmp) as stack,
        LocalPostgres(tmp / "pg") as pg,
        LocalMosquitto(tmp / "mq", extra_config="\n".join(args.broker_conf)) as broker,
    ):
        url = pg.url_for("bench")
        asyncio.run(migrate(url, StorageSettings(timescale="off")))
        online = device_ids(args.online, ONLINE_PREFIX)
        offline = device_ids(args.devices - args.online, OFFLINE_PREFIX)
        asyncio.run(setup_db(url, online, offline))
        key = admin_key(url)
        env = environment(pg, url)
        common = {**service_env(url), "FLEETLINE_MQTT_URL": broker.url}
        ingest = ingest_service(tmp, common, client_id="bench-jobs-ingest")
        api = api_service(tmp, common, key_secret=secrets.token_hex(32), settings=args.api_env)
        stack.start(ingest, api)
        log(f"{args.devices:,} devices registered; ingest and api ready")
        stack.start_fleet(__file__, "--serve-devices", str(args.online), "--mqtt-url", broker.url)
        stack.wait_online(
            url, prefix=ONLINE_PREFIX, devices=args.online, timeout_seconds=ONLINE_TIMEOUT_SECONDS
        )
        bench = Bench(args, api_url=api.url, key=key, db_url=url, stack=stack)
        measured = bench.run()
        stack.check_alive()
    env["loadavg_end"] = tuple(round(x, 2) for x in os.getloadavg())
    figures = {
        "idle_get_ms": measured["idle_get_ms"],
        "results": [asdict(r) | {"rate": r.rate} for r in measured["results"]],
    }
    bench.finish("jobs", report(args, measured, env), figures, env=env, started=started)


if __name__ == "__main__":
    main()
