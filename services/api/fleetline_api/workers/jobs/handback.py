"""The job runner's shutdown (see the package's docstring): running devices may finish
for a while, then those cut short are recorded or handed back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from fleetline_api.queries import jobs_runner as sql
from fleetline_api.workers.jobs.outcomes import JOB_DEVICES, Outcome, finish, write_outcome

# One logger for the package's modules: fleetline_api.workers.jobs.
log = logging.getLogger(__package__)

# On shutdown (SIGTERM): how long running devices may still finish; a call ends by itself
# at its own timeout, so this cuts only the longer ones. The budget: Kubernetes kills the
# pod 30 s after SIGTERM (deploy/k8s terminationGracePeriodSeconds); uvicorn first waits
# up to 10 s for open HTTP requests (main.py timeout_graceful_shutdown) before the
# lifespan stops the runner (app.py); then this, then HANDBACK_SECONDS to record the
# devices cut short, and 3 s left to close the pools.
SHUTDOWN_GRACE_SECONDS = 12.0
HANDBACK_SECONDS = 5.0

# The runner's count and progress line for an outcome recorded: (job id, job type, outcome).
Counted = Callable[[int, str, Outcome], None]


@dataclass(frozen=True, slots=True)
class Interrupted:
    """A device whose task was cancelled at shutdown, to be recorded or handed back."""

    job_id: int
    job_type: str
    device_id: str
    attempt: int
    acting: bool  # its request may have been sent (its patch applied)
    outcome: Outcome | None  # known, perhaps not yet recorded


async def let_finish(tasks: list[asyncio.Task[None]]) -> None:
    """Let the running devices' ``tasks`` finish (each ends at its own timeout) for up to
    SHUTDOWN_GRACE_SECONDS, then cut the rest short: each notes itself as
    :class:`Interrupted` with the runner."""
    if tasks:
        log.info("job runner stopping", extra={"devices": len(tasks)})
        _done, late = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_SECONDS)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)


async def hand_back(pool: Any, cut: list[Interrupted], counted: Counted) -> None:
    """Record or hand back the devices ``cut`` short, within HANDBACK_SECONDS; never
    hangs or fails (whatever is left waits for its lease to run out)."""
    if not cut:
        return
    try:
        async with asyncio.timeout(HANDBACK_SECONDS):
            await _hand_back(pool, cut, counted)
    except Exception as exc:  # shutting down: never hang or fail on it
        log.warning(
            "job devices cut short not all recorded (%r); their leases run out",
            exc,
            extra={"devices": len(cut)},
        )


async def _hand_back(pool: Any, cut: list[Interrupted], counted: Counted) -> None:
    """Devices cut short at shutdown: an outcome already known is recorded. A method
    whose request was sent fails as ``interrupted`` rather than being sent again by
    the next runner (it may have been carried out). A twin patch goes back to pending
    (applying it again changes nothing more; the start counts), and so does anything
    not yet sent, its start taken back."""
    by_job: dict[int, list[Interrupted]] = {}
    for item in cut:
        by_job.setdefault(item.job_id, []).append(item)
    for job_id, items in by_job.items():
        job_type = items[0].job_type
        for c in items:
            if c.outcome is None:
                continue
            try:
                status = await write_outcome(pool, job_id, c.device_id, c.attempt, c.outcome)
            except asyncpg.DataError as exc:  # rare (see JobRunner._record): its lease runs out
                log.error("job device outcome refused: %r", exc, extra={"job_id": job_id})
                continue
            if status == "UPDATE 1":
                counted(job_id, job_type, c.outcome)
        rest = [c for c in items if c.outcome is None]
        interrupted = [c for c in rest if c.acting and job_type == "method"]
        again = [c for c in rest if c.acting and job_type != "method"]
        untouched = [c for c in rest if not c.acting]
        if interrupted:
            status = await pool.execute(
                sql.INTERRUPT,
                job_id,
                [c.device_id for c in interrupted],
                [c.attempt for c in interrupted],
                f"the API process shut down while waiting for the answer (at most "
                f"{SHUTDOWN_GRACE_SECONDS:g} s); the request was sent and may have been "
                "carried out, so it is not sent again",
            )
            JOB_DEVICES.labels(job_type, "failed").inc(int(status.rsplit(" ", 1)[-1]))
        for devices, taken_back in ((again, 0), (untouched, 1)):
            if devices:
                await pool.execute(
                    sql.RELEASE,
                    job_id,
                    [c.device_id for c in devices],
                    [c.attempt for c in devices],
                    taken_back,
                )
                JOB_DEVICES.labels(job_type, "released").inc(len(devices))
        log.info(
            "job devices cut short at shutdown",
            extra={
                "job_id": job_id,
                "interrupted": len(interrupted),
                "handed_back": len(again) + len(untouched),
                "recorded": len(items) - len(rest),
            },
        )
        await finish(pool, job_id)
