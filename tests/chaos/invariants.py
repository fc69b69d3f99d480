"""What must hold at the end of a chaos run, checked with exact counts, and the report."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from fleetline.files import project_path
from tests.chaos.faults import Fault
from tests.chaos.fleet import HOT
from tests.chaos.workload import Record

# A device's ack is recorded a little after the broker accepted the reading: the margin
# allowed after a broker crash (and before its window).
ACK_MARGIN_SECONDS = 2.0
# What a service's memory may reach during a run (MB of RSS).
MAX_RSS_MB = {"ingest": 200, "api": 300, "rules": 200}
# 5xx answers: 504 is a method call's timeout (the device did not answer in time), 503
# the answer while the database or the broker cannot be reached (a direct method, a twin
# update, any request needing the database): both documented, with problem+json. 503
# only during those faults (and just after, while connections come back).
FAULTS_FOR_503 = ("broker", "database")
AFTER_FAULT_SECONDS = 15.0
# 4xx answers the operator's requests may get: a method call to a device that is offline
# (between its offline periods, or a gateway's child while the gateway reconnects).
EXPECTED_4XX = {("POST", "methods", 409)}
# How long before and after a kill -9 of an API process a request it had taken may be
# lost with it.
API_KILL_MARGIN_SECONDS = 2.0


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


def crash_window(kill_at: float) -> tuple[float, float]:
    """When a reading must have been acknowledged for a broker crash at ``kill_at`` to
    have lost it: since the broker's last save (at most autosave_interval before)."""
    return kill_at - autosave_seconds() - ACK_MARGIN_SECONDS, kill_at + ACK_MARGIN_SECONDS


@dataclass
class Telemetry:
    acked: int = 0
    stored: int = 0  # of the acked readings
    stored_rows: int = 0  # temperature rows of the fleet's devices
    wrong_value: int = 0
    lost_in_crash: int = 0  # acked, missing, within a broker crash's stated window
    lost: list[tuple[str, str, float]] = field(default_factory=list)  # beyond it


def missing(acked: dict[str, list[list[Any]]], rows: list[Any]) -> set[tuple[str, int]]:
    """The acknowledged readings (device, epoch ms) not among ``rows``."""
    stored = {(r["device_id"], epoch_ms(r["time"])) for r in rows}
    return {(d, epoch_ms(ts)) for d, readings in acked.items() for ts, _v, _at in readings
            } - stored


def check_telemetry(acked: dict[str, list[list[Any]]], rows: list[Any],
                    faults: list[Fault]) -> Telemetry:
    """Every acknowledged reading stored with its value (the primary key (series, ts)
    makes a second copy impossible to store); the missing ones only those a broker crash
    may lose (acknowledged since its last save)."""
    stored = {(r["device_id"], epoch_ms(r["time"])): r["value"] for r in rows}
    out = Telemetry(stored_rows=len(rows))
    windows = [crash_window(f.started) for f in faults
               if f.kind == "broker kill -9" and f.started]
    for device, readings in acked.items():
        for ts, value, acked_at in readings:
            out.acked += 1
            key = (device, epoch_ms(ts))
            if key not in stored:
                if any(lo <= acked_at <= hi for lo, hi in windows):
                    out.lost_in_crash += 1
                else:
                    out.lost.append((device, ts, acked_at))
                continue
            out.stored += 1
            if value is not None and stored[key] != value:
                out.wrong_value += 1
    return out


def check_liveness(acked: dict[str, list[list[Any]]], devices: list[str],
                   after: float) -> list[str]:
    """The devices that got no reading acknowledged after ``after`` (the last fault's
    end): each must be publishing again."""
    return [d for d in devices if not any(at > after for _ts, _v, at in acked.get(d, []))]


@dataclass
class Alarms:
    spells: int = 0  # hot spells among the alarm devices' stored readings
    ended: int = 0  # of which a normal reading followed
    raised: int = 0
    cleared: int = 0
    wrong: list[str] = field(default_factory=list)


def check_alarms(rows: list[Any], alarms: list[Any]) -> Alarms:
    """One alarm per hot spell in each alarm device's stored readings (what the rules
    service was given), cleared when normal readings followed it (the last spell may
    still be open)."""
    out = Alarms()
    per_device: dict[str, list[Any]] = {}
    for a in alarms:
        per_device.setdefault(a["device_id"], []).append(a)
    readings: dict[str, list[Any]] = {}
    for r in rows:
        readings.setdefault(r["device_id"], []).append(r)
    for device in sorted(readings.keys() | per_device.keys()):
        hot = [r["value"] == HOT for r in sorted(readings.get(device, []),
                                                  key=lambda r: r["time"])]
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
    """The API's answers that are not what the docs say: a 5xx other than those of
    FAULTS_FOR_503 and a method's 504, a 4xx other than EXPECTED_4XX, a request lost
    other than with a killed API process, a request neither process took."""
    unavailable = [((f.started or 0), (f.ended or 0) + AFTER_FAULT_SECONDS) for f in faults
                   if f.started and f.kind.split()[0] in FAULTS_FOR_503]
    api_kills = [((f.started or 0) - API_KILL_MARGIN_SECONDS,
                  (f.ended or 0) + API_KILL_MARGIN_SECONDS)
                 for f in faults if f.kind == "kill -9 api" and f.started]
    wrong = []
    for a in record.answers:
        if a.status < 400:
            continue
        kind = "methods" if "/methods/" in a.path else a.path.rsplit("/", 1)[-1]
        if a.status < 500 and (a.method, kind, a.status) in EXPECTED_4XX:
            continue
        if a.status == 504 and kind == "methods":
            continue
        if a.status == 503 and any(lo <= a.at <= hi for lo, hi in unavailable):
            continue
        wrong.append(f"{a.method} {a.path}: {a.status} {a.body}")
    for at, what in record.interrupted:
        if not any(lo <= at <= hi for lo, hi in api_kills):
            wrong.append(f"lost without an API kill: {what}")
    if record.unreachable:
        wrong.append(f"{record.unreachable} requests found neither API process up")
    return wrong


def report(*, seed: int, backend: str, devices: dict[str, int], faults: list[Fault],
           t0: float, telemetry: Telemetry, alarms: Alarms, record: Record,
           samples: Any, finals: dict[str, Any], fleet: dict[str, Any]) -> str:
    offline = fleet.get("offline", [])
    lines = [f"chaos run: seed {seed}, {backend}; replay with FLEETLINE_CHAOS_SEED={seed}",
             "devices: " + ", ".join(f"{n} {k}" for k, n in devices.items())
             + f" ({sum(devices.values())} in all)",
             "faults:"]
    for f in faults:
        took = (f.ended or 0) - (f.started or 0)
        at = f"t={f.started - t0:6.1f} s" if f.started else "not injected"
        lines.append(f"  {at}  {f.describe()}  ({took:.1f} s)")
    lines += [
        f"readings: {fleet.get('published', 0)} published "
        f"({fleet.get('publishes', 0)} with re-sends), {telemetry.acked} acknowledged to "
        f"devices, {telemetry.stored} of them stored with their value "
        f"({telemetry.wrong_value} with another), {telemetry.stored_rows} temperature rows "
        f"in all; lost in a broker crash (acknowledged from {autosave_seconds():g} + "
        f"{ACK_MARGIN_SECONDS:g} s before it to {ACK_MARGIN_SECONDS:g} s after): "
        f"{telemetry.lost_in_crash}; lost otherwise: {len(telemetry.lost)}",
        f"offline periods: {len(offline)} of {len({d for d, _s in offline})} devices, "
        f"{sum(s for _d, s in offline):.0f} s in all; the largest batch acknowledged "
        f"{fleet.get('largest_batch', 0)} readings",
        f"alarms: {alarms.spells} hot spells, {alarms.raised} alarms raised, "
        f"{alarms.cleared} cleared ({alarms.ended} spells ended)",
        f"cloud-to-device messages: {finals.get('c2d')}",
        f"jobs: {finals.get('jobs')}",
        f"rollout devices: {finals.get('rollout')}",
        f"job devices that failed, by reason: {finals.get('failed')}",
        f"method calls: {len(record.methods)}, the longest answered in "
        f"{max((a.seconds for a in record.methods), default=0):.2f} s "
        f"(timeout {finals.get('method_timeout')} s)",
        "API answers: " + ", ".join(f"{s}: {n}" for s, n in sorted(record.statuses().items()))
        + f"; {len(record.interrupted)} lost with a killed API process, "
        f"{record.unreachable} found neither process up",
        "provisioning answers: " + ", ".join(
            f"{s}: {n}" for s, n in sorted(Counter(fleet.get("provision_statuses", [])).items())),
        f"max broker store: {samples.max_store} messages",
        "peak RSS: " + ", ".join(f"{name} {rss / 2**20:.0f} MB"
                                 for name, rss in sorted(samples.peak_rss.items())),
    ]
    return "\n".join(lines)
