"""What the job runner records (see the package's docstring): a device's outcome, the
jobs it finishes, and the metrics counting both."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
from prometheus_client import Counter

from fleetline import db
from fleetline_api.queries import jobs_runner as sql

# One logger for the package's modules: fleetline_api.workers.jobs.
log = logging.getLogger(__package__)

JOBS = Counter(
    "fleetline_api_jobs_total",
    "Jobs by event (created, started here, finished here as completed / cancelled / failed)",
    ["event"],
)
for _event in ("created", "started", "completed", "cancelled", "failed"):
    JOBS.labels(_event)
JOB_DEVICES = Counter(
    "fleetline_api_job_devices_total",
    "Job devices this process finished (succeeded, failed, rolled_back), handed back "
    "(released) or, a rollout's, notified",
    ["type", "state"],
)
for _type in ("method", "twin", "rollout"):
    for _state in ("succeeded", "failed", "released"):
        JOB_DEVICES.labels(_type, _state)
JOB_DEVICES.labels("rollout", "notified")
JOB_DEVICES.labels("rollout", "rolled_back")

DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class Outcome:
    state: str  # succeeded | failed, or notified (a rollout device, still running)
    status: int | None
    reason: str
    result: Any = None
    error: str | None = None


async def write_outcome(
    pool: db.Queryable, job_id: int, device_id: str, attempt: int, outcome: Outcome
) -> str:
    """Record the outcome of the device's start ``attempt``; the status is ``UPDATE 0``
    when that start no longer holds the device."""
    if outcome.state == "notified":
        args: tuple[Any, ...] = (outcome.status, outcome.reason, outcome.result, outcome.error)
        status: str = await pool.execute(sql.NOTIFIED, job_id, device_id, attempt, *args)
        return status
    status = await pool.execute(
        sql.RECORD,
        job_id,
        device_id,
        attempt,
        outcome.state,
        outcome.status,
        outcome.reason,
        outcome.result,
        outcome.error,
    )
    return status


async def finish(con: db.Connection, job_id: int | None = None) -> list[Any]:
    """Finish the job (or every job) with no device left pending or running; the jobs
    finished, logged and counted here."""
    rows: list[Any] = await con.fetch(sql.FINISH, job_id)
    for row in rows:
        JOBS.labels(row["state"]).inc()
        took = (
            round((row["finished_at"] - row["started_at"]).total_seconds(), 3)
            if row["started_at"]
            else 0.0
        )
        log.info(
            "job finished",
            extra={
                "job_id": row["id"],
                "type": row["type"],
                "state": row["state"],
                "total": row["total"],
                "counts": row["counts"],
                "duration_s": took,
            },
        )
    return rows


async def cancel_pending(con: db.Connection, job_id: int) -> int:
    """Pending devices of a job that was just cancelled: cancelled."""
    status: str = await con.execute(sql.CANCEL_PENDING, job_id)
    return int(status.rsplit(" ", 1)[-1])
