"""bench/rollout.py: a firmware rollout over a simulated fleet, and the API's load meanwhile.

    .venv/bin/python bench/rollout.py            # 1,000 devices, 3 rollouts (~3 min)
    .venv/bin/python bench/rollout.py --quick    # 200 devices, 1 rollout (~30 s)
    .venv/bin/python bench/rollout.py --devices 2000 --wave-size 500 --batch-size 200

Starts its own PostgreSQL (fleetline_dev.embedded.LocalPostgres) and Mosquitto
(LocalMosquitto, the project's broker config) with the auth plugin (BrokerAuth: devices
log in with their keys) and a TLS listener (a local CA, fleetline_dev.certs), and runs
`python -m fleetline_cli ingest` and `python -m fleetline_cli api` as production runs
them, the API with a release key and its devices' HTTPS listener. N devices are
registered with their keys (`register_fleet`) and brought online by the simulator
(fleetline_dev/simulator.py, `run_fleet` with an UpdatePolicy) in a child process: they
take a rollout as a device does (the manifest checked against the release key, a URL
asked for over MQTT, the image downloaded over HTTPS, every state reported).

Then, `--repeat` times: the fleet idle for `--idle-seconds` (the baseline), then a
release uploaded (POST /v1/firmware + PUT content) and rolled out to every device (a job
of type `rollout`, timed from its POST to its `finished_at`). In both windows another
client probes the API (GET /v1/devices?limit=100 and GET /v1/jobs/{id}, each every
100 ms) and the API process's CPU time and memory are read. Every device's outcome is
checked; the benchmark exits 1 if any device did not end as expected. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # type: ignore[import-untyped]  # noqa: E402
from measure import CpuWindow, log, pct, proc_cpu, tree_cpu  # noqa: E402
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
    query_value,
    serve_fleet,
    service_env,
    workdir,
)

from fleetline import releases  # noqa: E402
from fleetline.migrate import migrate  # noqa: E402
from fleetline.settings import StorageSettings, parse_mqtt_url  # noqa: E402
from fleetline_dev.certs import ensure_local_ca  # noqa: E402
from fleetline_dev.embedded import BrokerAuth, LocalMosquitto, LocalPostgres, free_port  # noqa: E402
from fleetline_dev.simulated_updates import UpdatePolicy  # noqa: E402
from fleetline_dev.simulator import MODEL, device_ids, register_fleet, run_fleet  # noqa: E402

PREFIX = "bench-fw-"
QUERY = "tags.source = 'simulator'"  # the tag register_fleet gives every device
INGEST_USER = "fleetline-ingest"
API_USER = "fleetline-api"
FIRST_VERSION = "2.0"  # releases 2.0.1, 2.0.2, ...: each newer than the last (and 1.0.3)
PART_BYTES = 512 * 1024  # upload parts, within the API's 1 MiB body limit (docs/ota.md)
RSS_INTERVAL_SECONDS = 0.2
DEVICES_PATH = "/v1/devices?limit=100"
ONLINE_TIMEOUT_SECONDS = 120.0
SETTLE_SECONDS = 2.0
MIB = 1024 * 1024


# -- the simulated fleet (a child process) --------------------------------------------


def serve_devices(spec_file: Path) -> None:
    """The child process of the devices: the simulator, taking rollouts, until SIGTERM."""
    spec = json.loads(spec_file.read_text())
    policy = UpdatePolicy(
        release_key=bytes.fromhex(spec["release_key"]),
        ca_file=Path(spec["ca_file"]),
        fail_share=spec["fail_share"],
        reboot_seconds=spec["reboot_seconds"],
    )
    serve_fleet(
        lambda stop: run_fleet(
            parse_mqtt_url(spec["mqtt_url"]),
            devices=len(spec["keys"]),
            interval_seconds=spec["interval_seconds"],
            prefix=PREFIX,
            stop=stop,
            keys=spec["keys"],
            updates=policy,
        )
    )


def count_running(url: str, version: str) -> int:
    """Devices whose reported twin says they run ``version`` (ingest wrote it)."""
    return int(query_value(
        url,
        "SELECT count(*) FROM twin_reported WHERE reported ->> 'fw' = $1 AND device_id LIKE $2",
        version,
        PREFIX + "%",
    ))


# -- measuring ------------------------------------------------------------------------


def vm_hwm(pid: int) -> int:
    """The process's peak resident memory since it started (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Window:
    """What one stretch of time (idle, or a rollout) cost and looked like."""

    what: str  # idle | rollout
    seconds: float
    devices_ms: list[float] = field(repr=False)
    job_ms: list[float] = field(repr=False)
    probe_errors: int
    api_cpu_s: float
    api_rss_start: int
    api_rss_peak: int  # sampled every RSS_INTERVAL_SECONDS
    api_hwm_start: int
    api_hwm_end: int
    cpu_s: dict[str, float]  # per process (tree) over the window
    other_cores: float

    @property
    def api_cores(self) -> float:
        return self.api_cpu_s / self.seconds if self.seconds > 0 else float("nan")


class Watch:
    """The probes, the processes' CPU time and the API's memory over one window."""

    def __init__(
        self, what: str, *, client: Callable[[], httpx.Client], api_pid: int,
        pids: dict[str, int | None],
    ) -> None:
        self.what = what
        self.pids = pids
        self.api = psutil.Process(api_pid)
        self.devices = Prober(client(), DEVICES_PATH)
        self.job = Prober(client(), "", keep=True)
        self.rss_peak = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, name="bench-rss", daemon=True)

    def probe_job(self, job_id: int) -> None:
        """Start probing GET /v1/jobs/{job_id} (a rollout's, once it has been created)."""
        self.job.path = f"/v1/jobs/{job_id}"
        self.job.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.rss_peak = max(self.rss_peak, self.api.memory_info().rss)
            self._stop.wait(RSS_INTERVAL_SECONDS)

    def _cpu(self) -> dict[str, float]:
        times = {name: tree_cpu(pid) for name, pid in self.pids.items() if name != "bench"}
        times["bench"] = proc_cpu(psutil.Process(), children_reaped=False)
        return times

    def __enter__(self) -> Watch:
        self.cpu = CpuWindow()
        self.cpu0 = self._cpu()
        self.api_cpu0 = proc_cpu(self.api)
        self.rss_start = self.api.memory_info().rss
        self.hwm_start = vm_hwm(self.api.pid)
        self.t0 = time.monotonic()
        self._sampler.start()
        self.devices.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.seconds = time.monotonic() - self.t0
        self.api_cpu_s = proc_cpu(self.api) - self.api_cpu0
        self.cpu_s = {k: v - self.cpu0[k] for k, v in self._cpu().items()}
        self.other_cores = self.cpu.other_cores()
        self.hwm_end = vm_hwm(self.api.pid)
        self._stop.set()
        self._sampler.join(10)
        for probe in (self.devices, self.job):
            probe.stop()
            probe.client.close()

    def result(self) -> Window:
        return Window(
            what=self.what,
            seconds=self.seconds,
            devices_ms=self.devices.ms,
            job_ms=self.job.ms,
            probe_errors=self.devices.errors + self.job.errors,
            api_cpu_s=self.api_cpu_s,
            api_rss_start=self.rss_start,
            api_rss_peak=max(self.rss_peak, self.rss_start),
            api_hwm_start=self.hwm_start,
            api_hwm_end=self.hwm_end,
            cpu_s=self.cpu_s,
            other_cores=self.other_cores,
        )


@dataclass
class Rollout:
    run: int
    version: str
    job_id: int
    state: str
    devices: int  # the job's total
    succeeded: int
    failed: int  # failed or rolled back
    unexpected: int  # devices that did not end as the simulator chose
    create_ms: float
    wall_s: float  # POST /v1/jobs -> the job's finished_at
    first_s: float  # POST -> the first device finished
    canary_s: float  # POST -> the canary wave's last device finished
    device_s: list[float] = field(repr=False)  # each device: started -> finished
    waves: list[dict[str, Any]] = field(default_factory=list)
    running_new: int = 0  # devices whose reported twin names the new version

    @property
    def rate(self) -> float:
        return self.devices / self.wall_s if self.wall_s > 0 else float("nan")


def at(stamp: str | None) -> float:
    return datetime.fromisoformat(stamp).timestamp() if stamp else float("nan")


class Bench(JobsBench):
    def __init__(
        self, args: argparse.Namespace, *, api_url: str, key: str, db_url: str, stack: Stack,
        api_pid: int, pids: dict[str, int | None],
    ) -> None:
        super().__init__(args, api_url=api_url, key=key, db_url=db_url, stack=stack)
        self.api_pid = api_pid
        self.pids = pids

    def watch(self, what: str) -> Watch:
        return Watch(what, client=self.api_client, api_pid=self.api_pid, pids=self.pids)

    def warm_up(self) -> int:
        """A ping job over the whole fleet: connections, caches, the job runner. Its job
        (finished, as many devices as a rollout) is what the idle windows' job probe reads."""
        job, _, _ = self.create_job({
            "type": "method", "query": QUERY, "batch_size": self.args.batch_size,
            "method": {"name": "ping", "timeout_s": 10},
        })
        job = self.wait_job(int(job["id"]), job=job)
        if job["progress"]["succeeded"] != self.args.devices:
            raise RuntimeError(f"warm-up ping job: {job['state']} {job['progress']}")
        for _ in range(20):
            self.client.get(DEVICES_PATH).raise_for_status()
        return int(job["id"])

    def release(self, version: str) -> int:
        """Upload an image of --image-kb random bytes as ``version``; the release's id."""
        image = os.urandom(self.args.image_kb * 1024)
        made = self.client.post("/v1/firmware", json={
            "version": version, "target": MODEL, "kind": "image", "size": len(image),
            "sha256": hashlib.sha256(image).hexdigest(),
        })
        if made.status_code != 201:
            raise RuntimeError(f"POST /v1/firmware: {made.status_code} {made.text}")
        fid = int(made.json()["id"])
        done: dict[str, Any] = {}
        for start in range(0, len(image), PART_BYTES):
            end = min(len(image), start + PART_BYTES) - 1
            r = self.client.put(
                f"/v1/firmware/{fid}/content",
                content=image[start:end + 1],
                headers={"Content-Range": f"bytes {start}-{end}/{len(image)}",
                         "Content-Type": "application/octet-stream"},
            )
            if r.status_code != 200:
                raise RuntimeError(f"PUT /v1/firmware/{fid}/content: {r.status_code} {r.text}")
            done = r.json()
        if done.get("status") != "released":
            raise RuntimeError(f"release {version} not released: {done}")
        return fid

    def rollout(self, run: int, warm_job: int) -> tuple[Rollout, Window, Window]:
        args = self.args
        version = f"{FIRST_VERSION}.{run}"
        fid = self.release(version)
        time.sleep(SETTLE_SECONDS)
        log(f"[{run}/{args.repeat}] fleet idle for {args.idle_seconds:g} s (baseline)")
        with self.watch("idle") as idle:
            idle.probe_job(warm_job)
            time.sleep(args.idle_seconds)
        log(f"[{run}/{args.repeat}] rollout of {version} to {args.devices:,} devices")
        body = {
            "type": "rollout", "query": QUERY, "firmware_id": fid, "canary": args.canary,
            "wave_size": args.wave_size, "batch_size": args.batch_size,
            "failure_threshold_percent": args.threshold, "on_failure": "pause",
        }
        if args.max_per_second:
            body["max_per_second"] = args.max_per_second
        # The window opens just before the POST; its job probe starts right after it.
        with self.watch("rollout") as watch:
            job, t0, create_ms = self.create_job(body)
            job_id = int(job["id"])
            watch.probe_job(job_id)
            job = self.wait_job(job_id, probe=watch.job)
        if job["state"] == "paused":
            # At its failure threshold: its pending devices must not stay in a rollout
            # while the next run's rollout takes them.
            self.client.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
        rows = self.job_devices(job_id)
        running_new = count_running(self.db_url, version)
        res = self.outcome(run, version, job, rows, t0=t0, create_ms=create_ms)
        res.running_new = running_new
        if running_new != res.succeeded:
            self.problem(f"{version}: {running_new} devices report running it, "
                         f"{res.succeeded} succeeded")
        time.sleep(SETTLE_SECONDS)
        return res, idle.result(), watch.result()

    def outcome(
        self, run: int, version: str, job: dict[str, Any], rows: list[dict[str, Any]], *,
        t0: float, create_ms: float,
    ) -> Rollout:
        """The rollout's figures, and a problem for each device that did not end as the
        simulator chose (it fails `--fail-share` of them, by device and rollout)."""
        job_id = int(job["id"])
        progress = job["progress"]
        unexpected = []
        for row in rows:
            chosen = random.Random(f"{row['device_id']}/{job_id}").random() < self.args.fail_share
            want = "failed" if chosen else "succeeded"
            if (row["state"], row["phase"]) != (want, want):
                unexpected.append(row)
        if job["state"] != "completed" or progress["total"] != self.args.devices:
            self.problem(f"{version}: job {job_id} {job['state']} "
                         f"({job['paused_by'] or job['error'] or ''}), progress {progress}")
        for row in unexpected[:5]:
            self.problem(f"{version}: {row['device_id']} {row['state']}/{row['phase']} "
                         f"{row['reason']}: {row['error']}")
        if len(unexpected) > 5:
            self.problem(f"{version}: {len(unexpected) - 5} more devices did not end as expected")
        finished = [at(r["finished_at"]) for r in rows if r["finished_at"]]
        waves = []
        for wave in sorted({r["wave"] for r in rows}):
            members = [r for r in rows if r["wave"] == wave]
            starts = [at(r["started_at"]) for r in members if r["started_at"]]
            ends = [at(r["finished_at"]) for r in members if r["finished_at"]]
            waves.append({
                "wave": wave,
                "devices": len(members),
                "start_s": min(starts) - t0 if starts else float("nan"),
                "end_s": max(ends) - t0 if ends else float("nan"),
            })
        return Rollout(
            run=run,
            version=version,
            job_id=job_id,
            state=job["state"],
            devices=progress["total"],
            succeeded=progress["succeeded"],
            failed=progress["failed"] + progress["rolled_back"],
            unexpected=len(unexpected),
            create_ms=create_ms,
            wall_s=at(job["finished_at"]) - t0,
            first_s=min(finished) - t0 if finished else float("nan"),
            canary_s=waves[0]["end_s"] if waves else float("nan"),
            device_s=[
                at(r["finished_at"]) - at(r["started_at"])
                for r in rows
                if r["finished_at"] and r["started_at"]
            ],
            waves=waves,
        )

    def run(self) -> dict[str, Any]:
        warm_job = self.warm_up()
        rollouts: list[Rollout] = []
        windows: list[Window] = []
        for run in range(1, self.args.repeat + 1):
            res, idle, busy = self.rollout(run, warm_job)
            log(
                f"  {res.state}: {res.succeeded:,} succeeded, {res.failed} failed in "
                f"{res.wall_s:.1f} s ({res.rate:,.1f} devices/s); API CPU "
                f"{busy.api_cores:.2f} cores (idle {idle.api_cores:.2f})"
            )
            rollouts.append(res)
            windows += [idle, busy]
        return {"rollouts": rollouts, "windows": windows}


# -- report ---------------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if b > 0 else "-"


def report(args: argparse.Namespace, measured: dict[str, Any], env: dict[str, Any]) -> str:
    rollouts: list[Rollout] = measured["rollouts"]
    windows: list[Window] = measured["windows"]
    idle = [w for w in windows if w.what == "idle"]
    busy = [w for w in windows if w.what == "rollout"]
    median = sorted(rollouts, key=lambda r: r.rate)[len(rollouts) // 2]
    lines = [
        f"fleetline rollout benchmark -- {args.devices:,} simulated devices (one child "
        f"process, MQTT with their keys, downloads over HTTPS); PostgreSQL {env['postgres']}, "
        f"{env['mosquitto']}, Python {env['python']}, {env['cpus']} CPUs shared by everything",
        f"rollout: canary {args.canary}, wave_size {args.wave_size}, batch_size "
        f"{args.batch_size}, failure threshold {args.threshold:g}% (pause), max_per_second "
        f"{args.max_per_second or 'none'}; image {args.image_kb} KiB; devices reboot in "
        f"{args.reboot_seconds:g} s, {args.fail_share:.0%} fail",
    ]
    if args.api_env:
        lines.append(f"extra settings: {' '.join(args.api_env)}")
    lines.append("")
    hdr = (
        f"{'run':<3} {'version':<7} {'state':<9} {'devices':>7} {'failed':>6} {'unexp.':>6} "
        f"{'create ms':>9} {'first s':>7} {'canary s':>8} {'wall s':>7} {'devices/s':>9} "
        f"{'device s p50/p99':>16} {'other load':>10}"
    )
    lines += [f"(a) the rollout over {QUERY}, POST /v1/jobs -> finished_at", hdr,
              "-" * len(hdr)]
    for r, w in zip(rollouts, busy, strict=True):
        dev = f"{pct(r.device_s, 50):.2f}/{pct(r.device_s, 99):.2f}"
        lines.append(
            f"{r.run:<3} {r.version:<7} {r.state:<9} {r.devices:>7,} {r.failed:>6} "
            f"{r.unexpected:>6} {r.create_ms:>9.0f} {r.first_s:>7.2f} {r.canary_s:>8.2f} "
            f"{r.wall_s:>7.2f} {r.rate:>9.1f} {dev:>16} {w.other_cores:>7.2f} cr"
        )
    if len(rollouts) > 1:
        rates = [r.rate for r in rollouts]
        lines.append(f"median run {median.run}: {median.wall_s:.2f} s, {median.rate:.1f} "
                     f"devices/s (runs {min(rates):.1f}-{max(rates):.1f})")
    waves = ", ".join(
        f"{w['wave']}: {w['devices']} {w['start_s']:.1f}-{w['end_s']:.1f}"
        for w in median.waves
    )
    lines += [f"waves of run {median.run} (wave: devices start-end s): {waves}", ""]

    def pooled(ws: list[Window], attr: str) -> list[float]:
        return [x for w in ws for x in getattr(w, attr)]

    def p50_99(values: list[float]) -> str:
        return f"{pct(values, 50):.1f}/{pct(values, 99):.1f}"

    lines += [
        f"(b) the API meanwhile: another client's GET {DEVICES_PATH} and GET /v1/jobs/{{id}}, "
        f"each every {PROBE_INTERVAL_SECONDS * 1000:.0f} ms, and the API process",
    ]
    hdr = (
        f"{'window':<10} {'s':>5} {'devices p50/p99 ms':>18} {'job p50/p99 ms':>15} "
        f"{'API CPU s':>9} {'API cores':>9} {'RSS MB start/peak':>17} {'other load':>10}"
    )
    lines += [hdr, "-" * len(hdr)]
    for w in windows:
        run = 1 + sum(1 for x in windows[: windows.index(w)] if x.what == w.what)
        rss = f"{w.api_rss_start / MIB:.0f}/{w.api_rss_peak / MIB:.0f}"
        lines.append(
            f"{f'{w.what} {run}':<10} {w.seconds:>5.1f} {p50_99(w.devices_ms):>18} "
            f"{p50_99(w.job_ms):>15} {w.api_cpu_s:>9.1f} {w.api_cores:>9.3f} {rss:>17} "
            f"{w.other_cores:>7.2f} cr"
        )
    lines += ["", "pooled over the runs (x: rollout / idle):"]
    hdr = (
        f"{'probe':<26} {'idle p50/p99 ms':>16} {'rollout p50/p99':>16} {'x p50':>6} "
        f"{'x p99':>6} {'max ms':>7} {'n idle/rollout':>14}"
    )
    lines += [hdr, "-" * len(hdr)]
    for label, attr in (("GET " + DEVICES_PATH, "devices_ms"),
                        ("GET /v1/jobs/{id}", "job_ms")):
        a, b = pooled(idle, attr), pooled(busy, attr)
        lines.append(
            f"{label:<26} {p50_99(a):>16} {p50_99(b):>16} {ratio(pct(b, 50), pct(a, 50)):>6} "
            f"{ratio(pct(b, 99), pct(a, 99)):>6} {max(b, default=0):>7.0f} "
            f"{f'{len(a)}/{len(b)}':>14}"
        )
    errors = sum(w.probe_errors for w in windows)
    if errors:
        lines.append(f"probe errors (not 200, or no answer): {errors}")
    idle_s, busy_s = sum(w.seconds for w in idle), sum(w.seconds for w in busy)
    idle_cpu, busy_cpu = sum(w.api_cpu_s for w in idle), sum(w.api_cpu_s for w in busy)
    idle_cores, busy_cores = idle_cpu / idle_s, busy_cpu / busy_s
    devices = sum(r.devices for r in rollouts)
    above = (busy_cpu - idle_cores * busy_s) / devices * 1000
    before = idle[0].api_rss_peak
    peak = max(w.api_rss_peak for w in busy)
    lines += [
        "",
        f"API CPU: {busy_cpu:.1f} s over {busy_s:.1f} s of rollout = {busy_cores:.2f} cores, "
        f"idle {idle_cores:.3f} cores ({ratio(busy_cores, idle_cores)}); "
        f"{busy_cpu / devices * 1000:.1f} ms per device ({above:.1f} ms above idle)",
        f"API RSS: {before / MIB:.0f} MB idle before the first rollout, peak {peak / MIB:.0f} MB "
        f"during the rollouts ({ratio(peak, before)}; sampled every "
        f"{RSS_INTERVAL_SECONDS * 1000:.0f} ms); VmHWM {busy[0].api_hwm_start / MIB:.0f} MB "
        f"before the first rollout, {busy[-1].api_hwm_end / MIB:.0f} MB after the last",
    ]
    names = ["api", "ingest", "postgres", "mosquitto", "devices", "bench"]
    share = ", ".join(
        f"{n} {sum(w.cpu_s.get(n, 0.0) for w in busy) / busy_s:.2f}" for n in names
    )
    other = sum(w.other_cores * w.seconds for w in busy) / busy_s
    lines += [
        f"CPU cores during the rollouts, by process tree: {share}, others {other:.2f}",
        "",
        "wall s: from the POST /v1/jobs to the job's finished_at; devices/s = devices / wall s; "
        "first s / canary s: to the first device finished",
        "  and to the canary wave's last one; device s: each device from its notification "
        "(started_at) to its outcome (finished_at).",
        "unexp.: devices that did not end as the simulator chose (--fail-share of them fail); "
        "other load: cores used meanwhile by",
        "  processes outside this benchmark (above ~0.3 a run is suspect).",
        "idle: the same probes with the fleet connected and idle, in the same run just "
        "before each rollout (the job probe reads a finished",
        f"  ping job over the same {args.devices:,} devices); x: rollout / idle.",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, help="simulated devices (default 1000; quick 200)")
    p.add_argument("--canary", type=int, default=10, help="the first wave (default 10)")
    p.add_argument("--wave-size", type=int, default=250, help="later waves (default 250)")
    p.add_argument("--batch-size", type=int, default=100,
                   help="devices updating at once at most (default 100)")
    p.add_argument("--threshold", type=float, default=10.0,
                   help="failure_threshold_percent, on_failure pause (default 10)")
    p.add_argument("--max-per-second", type=float, help="notifications a second (default none)")
    p.add_argument("--reboot-seconds", type=float, default=0.2,
                   help="a device's simulated reboot (default 0.2)")
    p.add_argument("--fail-share", type=float, default=0.0,
                   help="share of devices failing to apply (default 0)")
    p.add_argument("--image-kb", type=int, default=256, help="image size in KiB (default 256)")
    p.add_argument("--telemetry-interval", type=float, default=3600.0,
                   help="seconds between a device's readings (default 3600: one at connect)")
    p.add_argument("--idle-seconds", type=float, help="the baseline window (default 20; quick 5)")
    p.add_argument("--repeat", type=int, help="rollouts, median reported (default 3; quick 1)")
    add_api_env(p)
    p.add_argument("--quick", action="store_true", help="smoke run, about 30 s")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--serve-fleet", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.serve_fleet:
        return a
    if a.devices is None:
        a.devices = 200 if a.quick else 1000
    if a.idle_seconds is None:
        a.idle_seconds = 5.0 if a.quick else 20.0
    if a.repeat is None:
        a.repeat = 1 if a.quick else 3
    if a.repeat < 1 or a.devices < 1 or a.idle_seconds <= 0:
        p.error("--repeat and --devices must be at least 1, --idle-seconds positive")
    if not 0 <= a.fail_share < 1:
        p.error("--fail-share must be in [0, 1)")
    if a.image_kb < 1:
        p.error("--image-kb must be at least 1")
    return a


def main() -> None:
    args = parse_args()
    if args.serve_fleet:
        serve_devices(args.serve_fleet)
        return
    started = time.time()
    key_secret = secrets.token_hex(32)
    accounts = {INGEST_USER: secrets.token_urlsafe(16), API_USER: secrets.token_urlsafe(16)}
    with (
        workdir("flbench-rollout-", keep=args.keep) as tmp,
        Stack(tmp) as stack,
        LocalPostgres(tmp / "pg") as pg,
    ):
        url = pg.url_for("bench")
        asyncio.run(migrate(url, StorageSettings(timescale="off")))
        tls = ensure_local_ca(tmp / "tls", ["127.0.0.1", "localhost"])
        release_key = tmp / "release-key.pem"
        releases.write_key(release_key, releases.generate_key())
        auth = BrokerAuth(database_url=url, key_secret=key_secret.encode(), services=accounts)
        with LocalMosquitto(tmp / "mq", auth=auth, tls=tls) as broker:
            ids = device_ids(args.devices, PREFIX)
            keys = asyncio.run(register_fleet(url, ids, key_secret.encode()))
            key = admin_key(url)
            env = environment(pg, url)

            def mqtt_url(user: str) -> str:
                return f"mqtt://{user}:{accounts[user]}@127.0.0.1:{broker.port}"

            common = service_env(url)
            ingest = ingest_service(tmp, {**common, "FLEETLINE_MQTT_URL": mqtt_url(INGEST_USER)},
                                    client_id="bench-rollout-ingest")
            api = api_service(tmp, {
                **common,
                "FLEETLINE_MQTT_URL": mqtt_url(API_USER),
                "FLEETLINE_API_RELEASE_KEY_FILE": str(release_key),
                "FLEETLINE_API_DEVICE_MQTT_URL": broker.tls_url,
                "FLEETLINE_API_DEVICE_PORT": str(free_port()),
                "FLEETLINE_API_DEVICE_TLS_CERT_FILE": str(tls.server_cert),
                "FLEETLINE_API_DEVICE_TLS_KEY_FILE": str(tls.server_key),
            }, key_secret=key_secret, settings=args.api_env)
            stack.start(ingest, api)
            log(f"{args.devices:,} devices registered with their keys; ingest and api ready")
            spec = tmp / "fleet.json"
            spec.write_text(json.dumps({
                "mqtt_url": broker.url,
                "keys": keys,
                "release_key": releases.public_point(releases.load_key(release_key)).hex(),
                "ca_file": str(tls.ca_cert),
                "fail_share": args.fail_share,
                "reboot_seconds": args.reboot_seconds,
                "interval_seconds": args.telemetry_interval,
            }))
            spec.chmod(0o600)
            fleet = stack.start_fleet(__file__, "--serve-fleet", str(spec))
            stack.wait_online(url, prefix=PREFIX, devices=args.devices,
                              timeout_seconds=ONLINE_TIMEOUT_SECONDS)
            assert ingest.proc is not None and api.proc is not None
            pids: dict[str, int | None] = {"api": api.proc.pid, "ingest": ingest.proc.pid,
                    "postgres": pg.pid, "mosquitto": broker.pid,
                    "devices": fleet.pid, "bench": os.getpid()}
            bench = Bench(args, api_url=api.url, key=key, db_url=url, stack=stack,
                          api_pid=api.proc.pid, pids=pids)
            measured = bench.run()
            stack.check_alive()
            stack.stop()  # while the database and the broker still run
    env["loadavg_end"] = tuple(round(x, 2) for x in os.getloadavg())
    figures = {
        "rollouts": [asdict(r) | {"rate": r.rate} for r in measured["rollouts"]],
        "windows": [asdict(w) | {"api_cores": w.api_cores} for w in measured["windows"]],
    }
    bench.finish("rollout", report(args, measured, env), figures, env=env, started=started)


if __name__ == "__main__":
    main()
