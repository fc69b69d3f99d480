"""The job runner's loop (see the package's docstring): it claims job devices, runs them
through commands.py, records their outcomes (outcomes.py), sweeps, and at shutdown hands
back what it cut short (handback.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import Counter as Tally
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
from prometheus_client import Gauge
from pydantic import BaseModel, ValidationError

from fleetline import db, mqtt
from fleetline_api import commands
from fleetline_api.queries import jobs_runner as sql
from fleetline_api.schemas.jobs import MethodSpec, TwinSpec
from fleetline_api.schemas.rollouts import RolloutSpec, notification
from fleetline_api.settings import ApiSettings
from fleetline_api.workers.broker import BrokerLink
from fleetline_api.workers.jobs import rollouts
from fleetline_api.workers.jobs.handback import Interrupted, hand_back, let_finish
from fleetline_api.workers.jobs.outcomes import (
    DB_ERRORS,
    JOB_DEVICES,
    JOBS,
    Outcome,
    finish,
    write_outcome,
)

# One logger for the package's modules: fleetline_api.workers.jobs.
log = logging.getLogger(__package__)

IN_FLIGHT = Gauge("fleetline_api_job_devices_in_flight", "Job devices this process runs now")

# A device's answer larger than this (as JSON) is not kept in the job's results.
MAX_RESULT_BYTES = 16 * 1024
RETENTION_INTERVAL_SECONDS = 300.0
RETENTION_BATCH = 100
PROGRESS_LOG_SECONDS = 5.0
# Claiming pauses this long after a device could not be started (broker gone, too many
# calls in flight): the device went back to pending untouched.
PAUSE_SECONDS = 2.0
# A twin patch: the database round trips and the publish (commands.PUBLISH_TIMEOUT_SECONDS).
TWIN_WORK_SECONDS = 15.0
RECORD_ATTEMPTS = 3
# Jobs whose devices each hold a connection while they are started: a twin patch, and
# a rollout's notification (a twin patch too).
PATCHING = ("twin", "rollout")


@dataclass(frozen=True, slots=True)
class _Job:
    id: int
    type: str
    spec: dict[str, Any]
    rollout: RolloutSpec | None = None


class _LeaseLostError(Exception):
    """The start no longer holds the device (its lease ran out and it was taken back)."""


@dataclass(slots=True)
class _Progress:
    """Outcomes this process recorded for one job since its last progress line."""

    tally: Tally[str] = field(default_factory=Tally)
    logged_at: float = field(default_factory=time.monotonic)


def _parse(row: Any) -> _Job:
    """The job as the runner needs it; ValueError when its spec cannot be run. The spec
    is checked by the models it was made with, and kept as parsed by the standard
    library, which keeps integers of any size."""
    spec = json.loads(row["spec"])
    models: dict[str, type[BaseModel]] = {
        "method": MethodSpec,
        "twin": TwinSpec,
        "rollout": RolloutSpec,
    }
    model = models.get(row["type"])
    if model is None:
        raise ValueError(f"unknown job type {row['type']!r}")
    try:
        parsed = model.model_validate(spec)
    except ValidationError as exc:
        raise ValueError(f"a {row['type']} job's spec cannot be run: {exc}") from None
    rollout = parsed if isinstance(parsed, RolloutSpec) else None
    if rollout is not None:
        spec = {"patch": notification(row["id"], rollout)}
    return _Job(row["id"], row["type"], spec, rollout)


def _stored_result(answer: commands.MethodAnswer) -> tuple[str, str | None]:
    """The method result to store, as JSON text, and a note when the payload was dropped."""
    result = json.dumps({"request_id": answer.request_id, "payload": answer.payload})
    if len(result) <= MAX_RESULT_BYTES:
        return result, None
    note = (
        f"the answer's payload ({len(result)} bytes as JSON) is larger than "
        f"{MAX_RESULT_BYTES} bytes and was not kept"
    )
    return json.dumps({"request_id": answer.request_id, "payload": None}), note


class JobRunner:
    def __init__(self, settings: ApiSettings, broker: BrokerLink) -> None:
        self._settings = settings
        # Its own connections (run() opens them): devices waiting for one must not queue
        # ahead of REST requests in the routes' pool.
        self._pool: Any = None
        self._broker = broker
        self.identifier = broker.identifier
        self._wake = asyncio.Event()
        # Device tasks of this process: (job id, device id, attempt); those of twin jobs.
        self._running: dict[asyncio.Task[None], tuple[int, str, int]] = {}
        self._twins: set[asyncio.Task[None]] = set()
        # Each twin device holds a connection through its transaction and its publish:
        # one connection is left for claims, outcomes and method devices' queries.
        self._twin_slots = max(1, settings.jobs_pool_size - 1)
        # Starts that confirmed their hold and may have sent (applied): (job, device, attempt).
        self._acting: set[tuple[int, str, int]] = set()
        # Devices cut short at shutdown, to record or hand back.
        self._interrupted: list[Interrupted] = []
        self._progress: dict[int, _Progress] = {}
        self._paused_until = 0.0
        self._stopping = False

    def wake(self) -> None:
        """Look for work now (a job was created here)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop claiming: :meth:`run` lets running devices finish for a while, hands the
        rest back and returns. (Stopping by cancellation instead could cut a claim
        between its commit and starting its devices, which would then wait for their
        leases.)"""
        self._stopping = True
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def run(self) -> None:
        """Claim and run job devices until stopped (or cancelled)."""
        failures = 0
        while self._pool is None and not self._stopping:
            try:
                self._pool = await db.create_pool(
                    self._settings.dsn,
                    min_size=1,
                    max_size=self._settings.jobs_pool_size,
                    command_timeout=30,
                )
            except DB_ERRORS as exc:
                delay = mqtt.backoff_seconds(failures)
                failures += 1
                log.warning("job runner: database unavailable (%r); again in %.1f s", exc, delay)
                await self._pause(delay)
        if self._pool is None:
            return
        try:
            await self._serve()
        finally:
            await db.close_pool(self._pool)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = next_retention = 0.0
        failures = 0
        try:
            while not self._stopping:
                self._wake.clear()
                try:
                    if loop.time() >= next_sweep:
                        await self._sweep()
                        next_sweep = loop.time() + self._settings.jobs_sweep_interval_seconds
                    if self._settings.jobs_retention_days and loop.time() >= next_retention:
                        await self._expire_jobs()
                        next_retention = loop.time() + RETENTION_INTERVAL_SECONDS
                    while self._may_claim() and await self._claim():
                        pass
                    failures = 0
                except DB_ERRORS as exc:
                    delay = mqtt.backoff_seconds(failures)
                    failures += 1
                    log.warning(
                        "job runner: database unavailable (%r); again in %.1f s", exc, delay
                    )
                    await self._pause(delay)
                    continue
                except Exception:  # a bug must not stop every job of this replica for good
                    delay = mqtt.backoff_seconds(failures)
                    failures += 1
                    log.exception("job runner failed; again in %.1f s", delay)
                    await self._pause(delay)
                    continue
                # Until the next poll, or the next sweep when that comes first.
                await self._pause(
                    min(
                        self._settings.jobs_poll_interval_seconds,
                        max(0.0, next_sweep - loop.time()),
                    )
                )
        finally:
            await self._shutdown()

    async def _pause(self, seconds: float) -> None:
        """Sleep until woken (a job created here, a slot freed, stop) or ``seconds``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    def _may_claim(self) -> bool:
        return (
            not self._stopping
            and self._broker.connected
            and len(self._running) < self._settings.jobs_max_in_flight
            and time.monotonic() >= self._paused_until
        )

    async def _sweep(self) -> None:
        async with self._pool.acquire() as con:
            expired = await con.fetch(sql.EXPIRE, self._settings.jobs_max_attempts)
            for row in expired:
                log.warning(
                    "job device's lease ran out",
                    extra={
                        "job_id": row["job_id"],
                        "device_id": row["device_id"],
                        "state": row["state"],
                        "runner": row["claimed_by"],
                    },
                )
            await con.execute(sql.CANCEL_LEFTOVERS)
            await finish(con)
            await rollouts.sweep(con)

    async def _expire_jobs(self) -> None:
        status = await self._pool.execute(
            sql.EXPIRED_JOBS, self._settings.jobs_retention_days, RETENTION_BATCH
        )
        deleted = int(status.rsplit(" ", 1)[-1])
        if deleted:
            log.info("finished jobs past their retention deleted", extra={"jobs": deleted})

    def _lease_seconds(self, job: _Job) -> float:
        work = float(job.spec["timeout_s"]) + 5 if job.type == "method" else TWIN_WORK_SECONDS
        return work + self._settings.jobs_lease_grace_seconds

    async def _claim(self) -> bool:
        """Start the next devices of one runnable job; False when there is none. Only as
        many as start at once are claimed: a claimed device never waits here for a slot
        (or a connection) while its lease runs."""
        free = self._settings.jobs_max_in_flight - len(self._running)
        twin_free = self._twin_slots - len(self._twins)
        # Before the transaction, whose start time the leases count from: see _confirm_lease.
        claimed_at = time.monotonic()
        async with self._pool.acquire() as con, con.transaction():
            row = await con.fetchrow(sql.PICK_JOB, twin_free > 0)
            if row is None:
                return False
            try:
                job = _parse(row)
                # A savepoint: what the database refuses as data fails this job, not the
                # runner's every poll (and with it every other job).
                async with con.transaction():
                    claimed = await self._claim_devices(con, job, row, free, twin_free)
            except (ValueError, asyncpg.DataError) as exc:
                log.error("job cannot run: %s", exc, extra={"job_id": row["id"]})
                await con.execute(sql.FAIL_JOB, row["id"], f"the job cannot run: {exc}")
                JOBS.labels("failed").inc()
                return True
            if isinstance(claimed, bool):
                return claimed
        if row["state"] == "queued":
            JOBS.labels("started").inc()
            log.info("job started", extra={"job_id": job.id, "type": job.type})
        log.debug("job devices claimed", extra={"job_id": job.id, "devices": len(claimed)})
        for device in claimed:
            self._start(job, device["device_id"], device["attempts"], claimed_at)
        return True

    async def _claim_devices(
        self, con: db.Connection, job: _Job, row: asyncpg.Record, free: int, twin_free: int
    ) -> list[asyncpg.Record] | bool:
        """Under the job's lock: the devices claimed to start now, or, when there are
        none, whether the job was dealt with (True: it waits for its window, or stopped at
        its threshold) or has no room (False)."""
        # Failures the runner itself recorded (a device deleted, a patch refused, a
        # lease abandoned) count too: checked here, under the job's lock, before a
        # device of the next wave can start.
        if job.rollout is not None and await rollouts.check_threshold(con, job.id):
            return True
        window = job.rollout.window if job.rollout is not None else None
        now = datetime.now(UTC)
        if window is not None and not rollouts.in_window(now, window):
            opens = rollouts.window_opens(now, window)
            await con.execute(sql.WAIT_UNTIL, job.id, opens)
            log.info("rollout waits for its window", extra={"job_id": job.id, "opens": opens})
            return True
        room = row["batch_size"] - await con.fetchval(sql.COUNT_RUNNING, job.id)
        count = min(free, room, twin_free if job.type in PATCHING else free)
        rate = row["max_per_second"]
        if rate is not None:
            # Spread the starts over the poll interval rather than bursting a batch.
            per_poll = math.ceil(rate * self._settings.jobs_poll_interval_seconds)
            count = min(count, max(1, per_poll))
        if count <= 0:
            return False
        claimed = await con.fetch(
            sql.CLAIM, job.id, count, self._lease_seconds(job), self.identifier
        )
        await con.execute(sql.ADVANCE, job.id, float(len(claimed)))
        return list(claimed)

    def _start(self, job: _Job, device_id: str, attempt: int, claimed_at: float) -> None:
        task = asyncio.create_task(
            self._device(job, device_id, attempt, claimed_at),
            name=f"api.jobs[{job.id}].{device_id}",
        )
        self._running[task] = (job.id, device_id, attempt)
        if job.type in PATCHING:
            self._twins.add(task)
        IN_FLIGHT.set(len(self._running))
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._twins.discard(task)
        IN_FLIGHT.set(len(self._running))
        self._wake.set()  # a slot is free

    async def _confirm_lease(
        self,
        job: _Job,
        device_id: str,
        attempt: int,
        claimed_at: float,
        con: db.Connection | None = None,
    ) -> None:
        """Just before acting on the device: confirm this start still holds it and renew
        its lease; _LeaseLostError when it does not (nothing is sent or changed).

        A start younger than half the lease grace skips the round trip: only a lease
        that ran out is taken back, and the claim's own lease (counted from a moment
        after ``claimed_at``) still has the whole work ahead plus half the grace."""
        if time.monotonic() - claimed_at >= self._settings.jobs_lease_grace_seconds / 2:
            status = await (con or self._pool).execute(
                sql.CONFIRM, job.id, device_id, attempt, self._lease_seconds(job)
            )
            if status != "UPDATE 1":
                raise _LeaseLostError(f"job {job.id}: device {device_id} was taken back")
        self._acting.add((job.id, device_id, attempt))

    async def _execute(
        self, job: _Job, device_id: str, attempt: int, claimed_at: float
    ) -> Outcome | None:
        """The device's outcome; None when it was not started (nothing sent, nothing
        changed) and should go back to pending."""
        spec = job.spec
        try:
            if job.type == "method":
                answer = await commands.invoke_method(
                    self._pool,
                    self._broker,
                    device_id,
                    spec["name"],
                    spec["params"],
                    timeout_s=spec["timeout_s"],
                    before_send=lambda: self._confirm_lease(job, device_id, attempt, claimed_at),
                )
                result, note = _stored_result(answer)
                # A device that answers with an error code did not do what was asked.
                if answer.status >= 400:
                    error = f"device answered with status {answer.status}"
                    return Outcome("failed", answer.status, "answered", result, error)
                return Outcome("succeeded", answer.status, "answered", result, note)
            notifying = job.type == "rollout"
            applied = await commands.apply_desired(
                self._pool,
                self._broker,
                device_id,
                spec["patch"],
                before_apply=lambda con: self._confirm_lease(
                    job, device_id, attempt, claimed_at, con
                ),
            )
            result = json.dumps({"version": applied.version, "published": applied.published})
            if applied.published:
                if notifying:
                    return Outcome("notified", 200, "notified", result)
                return Outcome("succeeded", 200, "applied", result)
            return Outcome(
                "failed",
                503,
                "unpublished",
                result,
                f"stored as desired version {applied.version} but not published "
                f"({applied.publish_error}); the next patch of the device publishes it",
            )
        except commands.CommandError as exc:
            if exc.retryable:
                log.info(
                    "job device not sent, to be started again: %s",
                    exc,
                    extra={"job_id": job.id, "device_id": device_id, "attempt": attempt},
                )
                return None
            return Outcome("failed", exc.status, exc.reason, None, str(exc))

    async def _device(self, job: _Job, device_id: str, attempt: int, claimed_at: float) -> None:
        key = (job.id, device_id, attempt)
        fields = {"job_id": job.id, "device_id": device_id, "attempt": attempt}
        outcome: Outcome | None = None
        try:
            try:
                outcome = await self._execute(job, device_id, attempt, claimed_at)
            except _LeaseLostError:
                # It waited too long: another start holds it now (or it was abandoned).
                log.warning("job device not sent: its lease ran out before", extra=fields)
                return
            except asyncpg.DataError as exc:  # refused whatever the database's state
                log.error("job device failed: the database refused a value: %r", exc, extra=fields)
                outcome = Outcome(
                    "failed", 500, "error", None, f"the database refused a value ({exc.sqlstate})"
                )
            except DB_ERRORS as exc:
                # Leave it running: its lease runs out and a runner starts it again.
                log.warning("job device interrupted: %r", exc, extra=fields)
                return
            except Exception as exc:  # a bug must not end the runner, nor retry for ever
                log.exception("job device failed unexpectedly", extra=fields)
                outcome = Outcome("failed", 500, "error", None, f"unexpected error: {exc!r}"[:500])
            if outcome is None:
                self._acting.discard(key)  # nothing was sent
                self._paused_until = time.monotonic() + PAUSE_SECONDS
                await self._release(job, [(device_id, attempt)], taken_back=True)
                return
            await self._record(job, device_id, attempt, outcome)
        except asyncio.CancelledError:
            # Shutdown: recorded or handed back by _shutdown (a no-op once its outcome
            # is in: the statements match only a running device of this attempt).
            acting = key in self._acting
            self._interrupted.append(
                Interrupted(job.id, job.type, device_id, attempt, acting, outcome)
            )
            raise
        finally:
            self._acting.discard(key)

    async def _release(
        self, job: _Job, devices: list[tuple[str, int]], *, taken_back: bool
    ) -> None:
        try:
            await self._pool.execute(
                sql.RELEASE,
                job.id,
                [d for d, _ in devices],
                [a for _, a in devices],
                1 if taken_back else 0,
            )
        except DB_ERRORS as exc:
            log.warning("job devices not handed back: %r", exc, extra={"job_id": job.id})
            return
        JOB_DEVICES.labels(job.type, "released").inc(len(devices))

    async def _record(self, job: _Job, device_id: str, attempt: int, outcome: Outcome) -> None:
        fields = {"job_id": job.id, "device_id": device_id, "attempt": attempt}
        failures = refused = 0
        while True:
            try:
                status = await write_outcome(self._pool, job.id, device_id, attempt, outcome)
                break
            except asyncpg.DataError as exc:
                # A value the database cannot store: not an outage (trying again changes
                # nothing, and a lease running out would start the device again), so the
                # outcome is kept without it: first the result, then any text of ours.
                log.error("job device outcome refused: %r", exc, extra=fields)
                refused += 1
                if refused == 1 and outcome.result is not None:
                    note = f"the database refused to store the result ({exc.sqlstate})"
                    error = "; ".join(filter(None, [outcome.error, note]))
                elif refused <= 2:
                    error = f"the database refused to store this outcome's details ({exc.sqlstate})"
                else:
                    return
                outcome = replace(outcome, result=None, error=error)
            except DB_ERRORS as exc:
                failures += 1
                if failures == RECORD_ATTEMPTS:
                    log.error(
                        "job device outcome not recorded (%r); it runs again after its lease",
                        exc,
                        extra=fields,
                    )
                    return
                await asyncio.sleep(failures)
        if status == "UPDATE 0":
            log.warning(
                "job device outcome dropped: its lease ran out and it was taken back",
                extra=fields,
            )
            return
        self._counted(job.id, job.type, outcome)
        try:
            await finish(self._pool, job.id)
        except DB_ERRORS as exc:  # the sweep finishes it
            log.warning("job not finished yet: %r", exc, extra=fields)

    def _counted(self, job_id: int, job_type: str, outcome: Outcome) -> None:
        JOB_DEVICES.labels(job_type, outcome.state).inc()
        self._log_progress(job_id, job_type, outcome)

    def _log_progress(self, job_id: int, job_type: str, outcome: Outcome) -> None:
        """A progress line per job at most every PROGRESS_LOG_SECONDS."""
        progress = self._progress.setdefault(job_id, _Progress())
        progress.tally[outcome.state] += 1
        now = time.monotonic()
        if now - progress.logged_at < PROGRESS_LOG_SECONDS:
            return
        running_here = sum(1 for j, _, _ in self._running.values() if j == job_id)
        log.info(
            "job progress",
            extra={
                "job_id": job_id,
                "type": job_type,
                "succeeded": progress.tally["succeeded"],
                "failed": progress.tally["failed"],
                "running_here": running_here,
                "since_s": round(now - progress.logged_at, 1),
            },
        )
        self._progress[job_id] = _Progress()
        if len(self._progress) > 1000:  # bounded: forget the jobs noted longest ago
            for stale in sorted(self._progress, key=lambda k: self._progress[k].logged_at)[:500]:
                del self._progress[stale]

    async def _shutdown(self) -> None:
        """Let running devices finish for up to SHUTDOWN_GRACE_SECONDS, then record or
        hand back the rest (handback.py)."""
        await let_finish(list(self._running))
        cut, self._interrupted = self._interrupted, []
        await hand_back(self._pool, cut, self._counted)
