"""What must hold at the end of a chaos run, checked with exact counts, and the report."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleetline.files import project_path
from tests.chaos.faults import Fault
from tests.chaos.fleet import HOT
from tests.chaos.workload import Record

# A device's ack is recorded a little after the broker accepted the reading: the margin
# allowed around a broker crash's window.
ACK_MARGIN_SECONDS = 2.0
# What a service's memory may reach during a run (MB of RSS).
MAX_RSS_MB = {"ingest": 200, "api": 300, "rules": 200}
# 5xx answers: 504 is a method call's timeout (the device did not answer in time), 503
# the answer while the database or the broker cannot be reached: both documented, with
# problem+json. Neither may come outside those cases; nothing else may come at all.
FAULTS_FOR_503 = ("broker", "database", "relay")
AFTER_FAULT_SECONDS = 15.0


def autosave_seconds() -> float:
    """The broker's autosave interval in the project's config: what a crash may lose."""
    text = project_path("deploy/mosquitto/fleetline.conf").read_text()
    match = re.search(r"^autosave_interval\s+(\d+)", text, re.M)
    assert match, "deploy/mosquitto/fleetline.conf sets no autosave_interval"
    return float(match.group(1))


def epoch_ms(ts: str | datetime) -> int:
    if isinstance(ts, str):
        ts = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    return round(ts.timestamp() * 1000)


@dataclass
class Telemetry:
    acked: int = 0
    stored: int = 0  # of the acked readings
    stored_rows: int = 0  # temperature rows of the fleet's devices
    duplicates: int = 0
    wrong_value: int = 0
    lost_in_crash: int = 0  # acked, missing, within a broker crash's stated window
    lost: list[tuple[str, str, float]] = field(default_factory=list)  # beyond it


def check_telemetry(acked: dict[str, list[list[Any]]], rows: list[Any],
                    faults: list[Fault]) -> Telemetry:
    """Every acknowledged reading stored once with its value; the missing ones only
    those a broker crash may lose (acknowledged within the autosave interval before it)."""
    stored: dict[tuple[str, int], list[Any]] = {}
    for r in rows:
        stored.setdefault((r["device_id"], epoch_ms(r["time"])), []).append(r["value"])
    out = Telemetry(stored_rows=len(rows))
    out.duplicates = sum(len(v) - 1 for v in stored.values())
    window = autosave_seconds()
    crashes = [f.started for f in faults if f.kind == "broker kill -9" and f.started]
    for device, readings in acked.items():
        for ts, value, acked_at in readings:
            out.acked += 1
            values = stored.get((device, epoch_ms(ts)))
            if values is None:
                if any(c - window - ACK_MARGIN_SECONDS <= acked_at <= c + ACK_MARGIN_SECONDS
                       for c in crashes):
                    out.lost_in_crash += 1
                else:
                    out.lost.append((device, ts, acked_at))
                continue
            out.stored += 1
            if value is not None and values[0] != value:
                out.wrong_value += 1
    return out


@dataclass
class Alarms:
    spells: int = 0  # hot spells the alarm devices' acknowledged readings show
    ended: int = 0  # of which a normal reading followed
    raised: int = 0
    cleared: int = 0
    wrong: list[str] = field(default_factory=list)


def check_alarms(acked: dict[str, list[list[Any]]], prefix: str,
                 alarms: list[Any]) -> Alarms:
    """One alarm per hot spell of each alarm device; cleared when normal readings
    followed it (the last spell may still be open)."""
    out = Alarms()
    per_device: dict[str, list[Any]] = {}
    for a in alarms:
        per_device.setdefault(a["device_id"], []).append(a)
    for device, readings in acked.items():
        if not device.startswith(prefix):
            continue
        hot = [value == HOT for _ts, value, _at in sorted(readings, key=lambda r: r[0])]
        spells = sum(1 for i, h in enumerate(hot) if h and (i == 0 or not hot[i - 1]))
        open_at_end = bool(hot) and hot[-1]
        got = per_device.get(device, [])
        cleared = sum(1 for a in got if a["state"] == "cleared")
        out.spells += spells
        out.ended += spells - open_at_end
        out.raised += len(got)
        out.cleared += cleared
        if len(got) != spells or cleared != spells - open_at_end:
            out.wrong.append(f"{device}: {spells} hot spells ({int(open_at_end)} still hot), "
                             f"{len(got)} alarms, {cleared} cleared")
    return out


def check_answers(record: Record, faults: list[Fault]) -> list[str]:
    """The API's 5xx answers that are not what the docs say (see FAULTS_FOR_503)."""
    windows = [(f.started or 0, (f.ended or 0) + AFTER_FAULT_SECONDS) for f in faults
               if f.kind.split()[0] in FAULTS_FOR_503]
    wrong = []
    for a in record.answers:
        if a.status < 500:
            continue
        if a.status == 504 and "/methods/" in a.path:
            continue
        if a.status == 503 and any(lo <= a.at <= hi for lo, hi in windows):
            continue
        wrong.append(f"{a.method} {a.path}: {a.status} {a.body}")
    return wrong


def report(*, seed: int, backend: str, devices: dict[str, int], faults: list[Fault],
           t0: float, telemetry: Telemetry, alarms: Alarms, record: Record,
           samples: Any, finals: dict[str, Any], provision: dict[int, int],
           published: tuple[int, int], batches: tuple[int, int]) -> str:
    lines = [f"chaos run: seed {seed}, {backend}; replay with FLEETLINE_CHAOS_SEED={seed}",
             "devices: " + ", ".join(f"{n} {k}" for k, n in devices.items())
             + f" ({sum(devices.values())} in all)",
             "faults:"]
    for f in faults:
        took = (f.ended or 0) - (f.started or 0)
        lines.append(f"  t={(f.started or t0) - t0:6.1f} s  {f.describe()}  ({took:.1f} s)")
    lines += [
        f"readings: {published[0]} published ({published[1]} with re-sends), "
        f"{telemetry.acked} acknowledged to devices, {telemetry.stored} of them "
        f"stored, {telemetry.stored_rows} temperature rows in all, {telemetry.duplicates} "
        f"duplicates, {telemetry.wrong_value} with another value; lost in a broker crash "
        f"(acknowledged in the {autosave_seconds():g} s before it): {telemetry.lost_in_crash};"
        f" lost otherwise: {len(telemetry.lost)}",
        f"backlogs: {batches[0]} batches of several readings acknowledged, the largest "
        f"{batches[1]} readings",
        f"alarms: {alarms.spells} hot spells, {alarms.raised} alarms raised, "
        f"{alarms.cleared} cleared ({alarms.ended} spells ended)",
        f"cloud-to-device messages: {finals['c2d']}",
        f"jobs: {finals['jobs']}",
        f"rollout devices: {finals['rollout']}",
        f"job devices that failed, by reason: {finals['failed']}",
        f"method calls: {len(record.methods)}, the longest answered in "
        f"{max((a.seconds for a in record.methods), default=0):.2f} s "
        f"(timeout {finals['method_timeout']} s)",
        "API answers: " + ", ".join(f"{s}: {n}" for s, n in sorted(record.statuses().items()))
        + f"; {record.unreachable} requests found neither API process up",
        "provisioning answers: " + ", ".join(f"{s}: {n}" for s, n in sorted(provision.items())),
        f"max broker store: {samples.max_store} messages",
        "peak RSS: " + ", ".join(f"{name} {rss / 2**20:.0f} MB"
                                 for name, rss in sorted(samples.peak_rss.items())),
    ]
    return "\n".join(lines)
