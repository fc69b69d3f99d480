"""Rollouts (docs/ota.md): what the job runner adds for a job of type ``rollout``.

A rollout device is claimed and notified as a twin job's device is patched (runner.py):
its desired ``firmware`` names the release. From then on its own reports drive it, not
a lease: the sweep (every runner, every ``jobs_sweep_interval_seconds``, a second)
reads the reported ``firmware`` of the devices being updated whose twin changed or whose
phase ran past its timeout, and moves each through its phases (:func:`advance`):
``{"rollout": <job id>, "state": "downloading", "progress": 40}``, then verifying,
applying, rebooting, and at last ``succeeded`` (with ``"running": <the release's
version>``), ``failed`` or ``rolled_back`` (each with a ``reason``). A report of another
rollout is not this one's; a report that cannot be taken (an unknown state, a step back,
success on another version) is counted and kept with the device, and changes nothing.
Rows are locked with ``SKIP LOCKED``, so replicas sweeping at once take each report
once.

Then the failure threshold: once at least the canary's count of devices has finished
since the rollout was last resumed, more failed or rolled-back devices than its
percentage pauses the rollout or aborts it. It is checked where a device's end is
recorded by a report, and by the runner before it starts any device of the rollout
(failures the runner records itself count: a device deleted, a patch refused). Waves
and the time window are the runner's claims: a device of a later wave starts only when
every device before it has finished (queries/jobs_runner.py), and outside its window a
rollout is not picked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter

from fleetline import db
from fleetline_api.queries import rollouts as sql
from fleetline_api.schemas.rollouts import FINALS, PHASES, Window
from fleetline_api.workers.jobs.outcomes import JOB_DEVICES, cancel_pending, finish

# One logger for the package's modules: fleetline_api.workers.jobs.
log = logging.getLogger(__package__)

REFUSED_REPORTS = Counter(
    "fleetline_api_rollout_reports_refused_total",
    "Rollout reports of devices that could not be taken (unknown state, step back...)",
)
MAX_REASON_CHARS = 500
THRESHOLD = "failure threshold"


@dataclass(frozen=True, slots=True)
class Step:
    """What a sweep writes for one device."""

    phase: str
    progress: int | None
    state: str  # running, or its final state
    reason: str | None = None
    error: str | None = None
    refused: str | None = None  # why its report could not be taken


def _text(value: Any) -> str | None:
    return value[:MAX_REASON_CHARS] if isinstance(value, str) and value else None


def _from_report(phase: str, progress: int | None, report: Any, version: str) -> Step | None:
    """The step a report of this rollout makes (None: nothing new)."""
    state = report.get("state")
    if state in PHASES:
        if PHASES.index(state) < PHASES.index(phase):
            return Step(phase, progress, "running", refused=f"{state} after {phase}")
        reported = report.get("progress")
        now = progress if state == phase else None
        if state == "downloading" and type(reported) is int and 0 <= reported <= 100:
            now = reported
        if state == phase and now == progress:
            return None
        return Step(state, now, "running")
    if state == "succeeded":
        running = report.get("running")
        if running != version:
            shown = repr(running)[:80]
            return Step(phase, progress, "running", refused=f"succeeded, running {shown}")
        return Step("succeeded", None, "succeeded", "updated")
    if state in FINALS:
        why = _text(report.get("reason")) or "the device gave no reason"
        word = "rolled_back" if state == "rolled_back" else "device"
        return Step(state, None, state, word, why)
    return Step(phase, progress, "running", refused=f"unknown state {repr(state)[:80]}")


def advance(
    job_id: int,
    phase: str,
    progress: int | None,
    report: Any,
    version: str,
    in_phase_s: float,
    timeouts: dict[str, Any],
) -> Step | None:
    """Where a device being updated goes, given the reported ``firmware`` member of its
    twin and how long it has been in ``phase``; None when nothing changes."""
    step = None
    if isinstance(report, dict) and report.get("rollout") == job_id:
        step = _from_report(phase, progress, report, version)
    now_in = step.phase if step is not None and step.state == "running" else None
    if step is not None and (step.state != "running" or now_in != phase):
        return step  # finished, or a new phase whose clock starts now
    limit = timeouts.get(phase)
    if isinstance(limit, int | float) and in_phase_s > limit:
        return Step(
            phase,
            progress,
            "failed",
            "timeout",
            f"no report past {phase} within {limit:g} s",
            step.refused if step is not None else None,
        )
    return step


def in_window(now: datetime, window: Window) -> bool:
    """Whether ``now`` (UTC) is inside the window."""
    t = now.time().replace(tzinfo=None)
    if window.opens < window.closes:
        return window.opens <= t < window.closes
    return t >= window.opens or t < window.closes


def window_opens(now: datetime, window: Window) -> datetime:
    """The next time the window opens after ``now``."""
    opens = datetime.combine(now.date(), window.opens, tzinfo=now.tzinfo)
    return opens if opens > now else opens + timedelta(days=1)


async def sweep(con: db.Connection) -> None:
    """Move the devices being updated by what they reported (or their timeouts), then
    stop the rollouts past their failure threshold and finish those with no device left."""
    finished: set[int] = set()
    async with con.transaction():
        rows = await con.fetch(sql.REPORTS)
        for row in rows:
            step = advance(
                row["job_id"],
                row["phase"],
                row["progress"],
                row["report"],
                row["version"],
                row["in_phase_s"],
                row["timeouts"] or {},
            )
            await con.execute(
                sql.STEP,
                row["job_id"],
                row["device_id"],
                step.phase if step else row["phase"],
                step.progress if step else row["progress"],
                step.state if step else "running",
                step.reason if step else None,
                step.error if step else None,
                row["twin_version"] or 0,
                step.refused if step else None,
            )
            if step is None:
                continue
            if step.refused:
                REFUSED_REPORTS.inc()
                log.warning(
                    "rollout report refused: %s",
                    step.refused,
                    extra={"job_id": row["job_id"], "device_id": row["device_id"]},
                )
            if step.state != "running":
                JOB_DEVICES.labels("rollout", step.state).inc()
                finished.add(row["job_id"])
        # In the same transaction: no runner starts the next wave of a rollout whose
        # last devices just took it past its threshold.
        for job_id in sorted(finished):
            await check_threshold(con, job_id)
    if finished:
        await finish(con)


async def check_threshold(con: db.Connection, job_id: int) -> bool:
    """Pause or abort the rollout (in the caller's transaction) if it is past its failure
    threshold; whether it was."""
    row = await con.fetchrow(sql.LOCK_RUNNING_ROLLOUT, job_id)
    if row is None:
        return False
    counts: Any = await con.fetchrow(sql.FINISHED, job_id)
    failed = counts["failed"] - row["failed_before_resume"]
    done = counts["finished"] - row["finished_before_resume"]
    threshold = row["threshold"]
    if done < max(1, row["canary"]) or failed * 100 <= threshold * done:
        return False
    why = (
        f"failure threshold reached: {failed} of {done} devices failed or rolled back "
        f"({100 * failed / done:.1f}% > {threshold:g}%)"
    )
    if row["on_failure"] == "abort":
        await con.execute(sql.ABORT, job_id, why)
        await cancel_pending(con, job_id)
    else:
        await con.execute(sql.PAUSE_AT_THRESHOLD, job_id, why, THRESHOLD)
    log.warning(
        "rollout stopped at its failure threshold",
        extra={"job_id": job_id, "action": row["on_failure"], "failed": failed, "finished": done},
    )
    return True
