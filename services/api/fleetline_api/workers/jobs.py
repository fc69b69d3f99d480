"""The job runner: every API replica runs one, and together they carry out ``/v1/jobs``.

A job's devices were snapshotted into ``job_devices`` when it was created
(routes/jobs.py). The runner loops: it locks one runnable job row with
``FOR UPDATE SKIP LOCKED`` (runnable: queued or running, ``next_batch_at`` reached, a
pending device, fewer running devices than its ``batch_size``), moves up to its free
slots of pending devices to ``running`` with a lease (the device's own timeout plus
``FLEETLINE_API_JOBS_LEASE_GRACE_SECONDS``), pushes ``next_batch_at`` out by the rate
limit, and commits; then it runs those devices concurrently through the same code as
the REST routes (fleetline_api/commands.py) and writes each outcome. Claims of one job
serialise on its row, so ``batch_size`` bounds the job's running devices over all
replicas, and replicas share a job's devices without running one twice.

A process claims no more devices than it starts at once: every claimed device runs at
once, and twin devices (each holds a database connection through its transaction and
the retained publish) at most one fewer than the runner's connections, so none waits
behind the others for a connection while its lease runs. Just before a method request
is published, and first thing in the transaction applying a twin patch, the device's
start confirms that it still holds the device (``running``, ``attempts`` unchanged) and
renews the lease, unless its claim is too recent for the lease to have run out; a start
that lost it sends and changes nothing.

Surviving a restart: a device whose lease ran out (its API process died, or lost the
database for that long) goes back to pending and is started again, by any replica;
after ``FLEETLINE_API_JOBS_MAX_ATTEMPTS`` starts it fails as ``abandoned``. An outcome is
written only by the start that holds the device (``attempts`` matches), so each device
ends in exactly one final state. A method whose process died mid-call may therefore
reach the device twice (at least once). On SIGTERM the runner stops claiming and lets
running devices finish (each call ends at its own timeout) for up to
SHUTDOWN_GRACE_SECONDS; a method cut short then ends ``failed`` (``interrupted``) once
its request was sent, so a planned restart never sends a method twice; anything else
cut short goes back to pending.

A job is finished (``completed``, or ``cancelled`` once its running devices are done)
by whoever records its last outcome, or by the sweep each runner makes every second,
which also takes back expired leases and deletes finished jobs past their retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import Counter as Tally
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ValidationError

from fleetline import db, mqtt
from fleetline_api import commands
from fleetline_api.schemas.jobs import MethodSpec, TwinSpec
from fleetline_api.settings import ApiSettings
from fleetline_api.workers.broker import BrokerLink

log = logging.getLogger(__name__)

JOBS = Counter(
    "fleetline_api_jobs_total",
    "Jobs by event (created, started here, finished here as completed / cancelled / failed)",
    ["event"],
)
for _event in ("created", "started", "completed", "cancelled", "failed"):
    JOBS.labels(_event)
JOB_DEVICES = Counter(
    "fleetline_api_job_devices_total",
    "Job devices this process finished (succeeded, failed) or handed back (released)",
    ["type", "state"],
)
for _type in ("method", "twin"):
    for _state in ("succeeded", "failed", "released"):
        JOB_DEVICES.labels(_type, _state)
IN_FLIGHT = Gauge("fleetline_api_job_devices_in_flight", "Job devices this process runs now")

# A device's answer larger than this (as JSON) is not kept in the job's results.
MAX_RESULT_BYTES = 16 * 1024
MAINTAIN_INTERVAL_SECONDS = 1.0
RETENTION_INTERVAL_SECONDS = 300.0
RETENTION_BATCH = 100
PROGRESS_LOG_SECONDS = 5.0
# On shutdown (SIGTERM): how long running devices may still finish; a call ends by itself
# at its own timeout, so this cuts only the longer ones. The budget: Kubernetes kills the
# pod 30 s after SIGTERM (deploy/k8s terminationGracePeriodSeconds); uvicorn first waits
# up to 10 s for open HTTP requests (main.py timeout_graceful_shutdown) before the
# lifespan stops the runner (app.py); then this, then HANDBACK_SECONDS to record the
# devices cut short, and 3 s left to close the pools.
SHUTDOWN_GRACE_SECONDS = 12.0
HANDBACK_SECONDS = 5.0
# Claiming pauses this long after a device could not be started (broker gone, too many
# calls in flight): the device went back to pending untouched.
PAUSE_SECONDS = 2.0
# A twin patch: the database round trips and the publish (commands.PUBLISH_TIMEOUT_SECONDS).
TWIN_WORK_SECONDS = 15.0
RECORD_ATTEMPTS = 3

# $1: whether this process may start twin devices now.
PICK_JOB = """
SELECT j.id, j.type, j.spec::text AS spec, j.batch_size, j.max_per_second, j.state
FROM jobs j
WHERE j.state IN ('queued', 'running') AND j.next_batch_at <= now()
  AND ($1::boolean OR j.type <> 'twin')
  AND EXISTS (SELECT 1 FROM job_devices p WHERE p.job_id = j.id AND p.state = 'pending')
  AND (SELECT count(*) FROM job_devices r WHERE r.job_id = j.id AND r.state = 'running')
      < j.batch_size
ORDER BY j.next_batch_at, j.id
LIMIT 1
FOR UPDATE OF j SKIP LOCKED
"""
RUNNING = "SELECT count(*) FROM job_devices WHERE job_id = $1 AND state = 'running'"
CLAIM = """
UPDATE job_devices jd
SET state = 'running', attempts = jd.attempts + 1, started_at = now(), finished_at = NULL,
    lease_until = now() + make_interval(secs => $3), claimed_by = $4
FROM (SELECT device_id FROM job_devices
      WHERE job_id = $1 AND state = 'pending' ORDER BY device_id LIMIT $2) p
WHERE jd.job_id = $1 AND jd.device_id = p.device_id
RETURNING jd.device_id, jd.attempts
"""
# $2 devices just started: the next start of this job waits $2 / max_per_second.
ADVANCE = """
UPDATE jobs SET state = 'running', started_at = coalesce(started_at, now()),
    next_batch_at = CASE WHEN max_per_second IS NULL THEN now()
                         ELSE now() + make_interval(secs => $2 / max_per_second) END
WHERE id = $1
"""
# The start still holds the device: its lease renewed from now.
CONFIRM = """
UPDATE job_devices SET lease_until = now() + make_interval(secs => $4)
WHERE job_id = $1 AND device_id = $2 AND state = 'running' AND attempts = $3
"""
RECORD = """
UPDATE job_devices
SET state = $4, status = $5, reason = $6, result = $7::text::jsonb, error = $8,
    finished_at = now(), lease_until = NULL
WHERE job_id = $1 AND device_id = $2 AND state = 'running' AND attempts = $3
"""
# Back to pending (cancelled, if the job was cancelled meanwhile) without an outcome;
# $4: take the start back (nothing was sent) or not.
RELEASE = """
UPDATE job_devices jd
SET state = CASE WHEN j.state = 'cancelled' THEN 'cancelled' ELSE 'pending' END,
    reason = CASE WHEN j.state = 'cancelled' THEN 'cancelled' END,
    finished_at = CASE WHEN j.state = 'cancelled' THEN now() END,
    attempts = jd.attempts - $4, lease_until = NULL, started_at = NULL
FROM jobs j, unnest($2::text[], $3::int[]) AS u(device_id, attempts)
WHERE j.id = $1 AND jd.job_id = $1 AND jd.device_id = u.device_id
  AND jd.attempts = u.attempts AND jd.state = 'running'
"""
# Method devices cut short at shutdown after their request was sent.
INTERRUPT = """
UPDATE job_devices jd
SET state = 'failed', status = 503, reason = 'interrupted', error = $4, result = NULL,
    finished_at = now(), lease_until = NULL
FROM unnest($2::text[], $3::int[]) AS u(device_id, attempts)
WHERE jd.job_id = $1 AND jd.device_id = u.device_id AND jd.attempts = u.attempts
  AND jd.state = 'running'
"""
EXPIRE = """
UPDATE job_devices jd
SET state = CASE WHEN j.state = 'cancelled' THEN 'cancelled'
                 WHEN jd.attempts >= $1 THEN 'failed' ELSE 'pending' END,
    reason = CASE WHEN j.state = 'cancelled' THEN 'cancelled'
                  WHEN jd.attempts >= $1 THEN 'abandoned' END,
    error = CASE WHEN j.state <> 'cancelled' AND jd.attempts >= $1
                 THEN format('started %s times; each time its runner stopped before an '
                             'outcome was recorded', jd.attempts) END,
    finished_at = CASE WHEN j.state = 'cancelled' OR jd.attempts >= $1 THEN now() END,
    lease_until = NULL
FROM jobs j
WHERE jd.state = 'running' AND jd.lease_until < now() AND j.id = jd.job_id
RETURNING jd.job_id, jd.device_id, jd.state, jd.claimed_by
"""
CANCEL_PENDING = """
UPDATE job_devices SET state = 'cancelled', reason = 'cancelled', finished_at = now()
WHERE job_id = $1 AND state = 'pending'
"""
# Pending devices of cancelled jobs: a device handed back while its job was being
# cancelled (RELEASE read the job before the cancel committed).
CANCEL_LEFTOVERS = """
UPDATE job_devices jd SET state = 'cancelled', reason = 'cancelled', finished_at = now()
FROM jobs j
WHERE j.finished_at IS NULL AND j.state = 'cancelled' AND jd.job_id = j.id
  AND jd.state = 'pending'
"""
# A job with no device pending or running is finished; $1: that job only (NULL: all).
FINISH = """
UPDATE jobs j
SET state = CASE WHEN j.state IN ('queued', 'running') THEN 'completed' ELSE j.state END,
    finished_at = now(),
    counts = (SELECT coalesce(jsonb_object_agg(s.state, s.n), '{}'::jsonb)
              FROM (SELECT state, count(*) AS n FROM job_devices
                    WHERE job_id = j.id GROUP BY state) s)
WHERE j.finished_at IS NULL AND j.state IN ('queued', 'running', 'cancelled')
  AND ($1::bigint IS NULL OR j.id = $1)
  AND NOT EXISTS (SELECT 1 FROM job_devices x
                  WHERE x.job_id = j.id AND x.state IN ('pending', 'running'))
RETURNING j.id, j.type, j.state, j.total, j.counts, j.created_at, j.started_at,
          j.finished_at
"""
FAIL_JOB = """
WITH failed AS (
    UPDATE jobs SET state = 'failed', error = $2, finished_at = now(),
        counts = jsonb_build_object('cancelled', total)
    WHERE id = $1 AND state IN ('queued', 'running')
    RETURNING id
)
UPDATE job_devices SET state = 'cancelled', reason = 'cancelled', finished_at = now()
WHERE job_id IN (SELECT id FROM failed) AND state = 'pending'
"""
EXPIRED_JOBS = """
DELETE FROM jobs WHERE id IN (
    SELECT id FROM jobs WHERE finished_at < now() - make_interval(days => $1)
    ORDER BY finished_at LIMIT $2
)
"""

DB_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(frozen=True, slots=True)
class _Job:
    id: int
    type: str
    spec: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Outcome:
    state: str  # succeeded | failed
    status: int | None
    reason: str
    result: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Interrupted:
    """A device whose task was cancelled at shutdown, to be recorded or handed back."""

    job_id: int
    job_type: str
    device_id: str
    attempt: int
    acting: bool  # its request may have been sent (its patch applied)
    outcome: _Outcome | None  # known, perhaps not yet recorded


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
    models: dict[str, type[BaseModel]] = {"method": MethodSpec, "twin": TwinSpec}
    model = models.get(row["type"])
    if model is None:
        raise ValueError(f"unknown job type {row['type']!r}")
    try:
        model.model_validate(spec)
    except ValidationError as exc:
        raise ValueError(f"a {row['type']} job's spec cannot be run: {exc}") from None
    return _Job(row["id"], row["type"], spec)


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


async def finish(con: db.Connection, job_id: int | None = None) -> list[Any]:
    """Finish the job (or every job) with no device left pending or running; the jobs
    finished, logged and counted here."""
    rows: list[Any] = await con.fetch(FINISH, job_id)
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
    status: str = await con.execute(CANCEL_PENDING, job_id)
    return int(status.rsplit(" ", 1)[-1])


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
        self._interrupted: list[_Interrupted] = []
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
                        next_sweep = loop.time() + MAINTAIN_INTERVAL_SECONDS
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
                await self._pause(self._settings.jobs_poll_interval_seconds)
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
            expired = await con.fetch(EXPIRE, self._settings.jobs_max_attempts)
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
            await con.execute(CANCEL_LEFTOVERS)
            await finish(con)

    async def _expire_jobs(self) -> None:
        status = await self._pool.execute(
            EXPIRED_JOBS, self._settings.jobs_retention_days, RETENTION_BATCH
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
            row = await con.fetchrow(PICK_JOB, twin_free > 0)
            if row is None:
                return False
            try:
                job = _parse(row)
            except ValueError as exc:
                log.error("job cannot run: %s", exc, extra={"job_id": row["id"]})
                await con.execute(FAIL_JOB, row["id"], f"the job cannot run: {exc}")
                JOBS.labels("failed").inc()
                return True
            room = row["batch_size"] - await con.fetchval(RUNNING, job.id)
            count = min(free, room, twin_free if job.type == "twin" else free)
            rate = row["max_per_second"]
            if rate is not None:
                # Spread the starts over the poll interval rather than bursting a batch.
                per_poll = math.ceil(rate * self._settings.jobs_poll_interval_seconds)
                count = min(count, max(1, per_poll))
            if count <= 0:
                return False
            claimed = await con.fetch(
                CLAIM, job.id, count, self._lease_seconds(job), self.identifier
            )
            await con.execute(ADVANCE, job.id, float(len(claimed)))
        if row["state"] == "queued":
            JOBS.labels("started").inc()
            log.info("job started", extra={"job_id": job.id, "type": job.type})
        log.debug("job devices claimed", extra={"job_id": job.id, "devices": len(claimed)})
        for device in claimed:
            self._start(job, device["device_id"], device["attempts"], claimed_at)
        return True

    def _start(self, job: _Job, device_id: str, attempt: int, claimed_at: float) -> None:
        task = asyncio.create_task(
            self._device(job, device_id, attempt, claimed_at),
            name=f"api.jobs[{job.id}].{device_id}",
        )
        self._running[task] = (job.id, device_id, attempt)
        if job.type == "twin":
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
                CONFIRM, job.id, device_id, attempt, self._lease_seconds(job)
            )
            if status != "UPDATE 1":
                raise _LeaseLostError(f"job {job.id}: device {device_id} was taken back")
        self._acting.add((job.id, device_id, attempt))

    async def _execute(
        self, job: _Job, device_id: str, attempt: int, claimed_at: float
    ) -> _Outcome | None:
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
                    return _Outcome("failed", answer.status, "answered", result, error)
                return _Outcome("succeeded", answer.status, "answered", result, note)
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
                return _Outcome("succeeded", 200, "applied", result)
            return _Outcome(
                "failed",
                503,
                "unpublished",
                result,
                f"stored as desired version {applied.version} but not published "
                f"({applied.publish_error}); the next patch of the device publishes it",
            )
        except commands.CommandError as exc:
            if exc.retryable:
                return None
            return _Outcome("failed", exc.status, exc.reason, None, str(exc))

    async def _device(self, job: _Job, device_id: str, attempt: int, claimed_at: float) -> None:
        key = (job.id, device_id, attempt)
        fields = {"job_id": job.id, "device_id": device_id, "attempt": attempt}
        outcome: _Outcome | None = None
        try:
            try:
                outcome = await self._execute(job, device_id, attempt, claimed_at)
            except _LeaseLostError:
                # It waited too long: another start holds it now (or it was abandoned).
                log.warning("job device not sent: its lease ran out before", extra=fields)
                return
            except asyncpg.DataError as exc:  # refused whatever the database's state
                log.error("job device failed: the database refused a value: %r", exc, extra=fields)
                outcome = _Outcome(
                    "failed", 500, "error", None, f"the database refused a value ({exc.sqlstate})"
                )
            except DB_ERRORS as exc:
                # Leave it running: its lease runs out and a runner starts it again.
                log.warning("job device interrupted: %r", exc, extra=fields)
                return
            except Exception as exc:  # a bug must not end the runner, nor retry for ever
                log.exception("job device failed unexpectedly", extra=fields)
                outcome = _Outcome("failed", 500, "error", None, f"unexpected error: {exc!r}"[:500])
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
                _Interrupted(job.id, job.type, device_id, attempt, acting, outcome)
            )
            raise
        finally:
            self._acting.discard(key)

    async def _release(
        self, job: _Job, devices: list[tuple[str, int]], *, taken_back: bool
    ) -> None:
        try:
            await self._pool.execute(
                RELEASE,
                job.id,
                [d for d, _ in devices],
                [a for _, a in devices],
                1 if taken_back else 0,
            )
        except DB_ERRORS as exc:
            log.warning("job devices not handed back: %r", exc, extra={"job_id": job.id})
            return
        JOB_DEVICES.labels(job.type, "released").inc(len(devices))

    async def _record(self, job: _Job, device_id: str, attempt: int, outcome: _Outcome) -> None:
        fields = {"job_id": job.id, "device_id": device_id, "attempt": attempt}
        failures = refused = 0
        while True:
            try:
                status = await self._write(job.id, device_id, attempt, outcome)
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

    async def _write(self, job_id: int, device_id: str, attempt: int, outcome: _Outcome) -> str:
        status: str = await self._pool.execute(
            RECORD,
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

    def _counted(self, job_id: int, job_type: str, outcome: _Outcome) -> None:
        JOB_DEVICES.labels(job_type, outcome.state).inc()
        self._log_progress(job_id, job_type, outcome)

    def _log_progress(self, job_id: int, job_type: str, outcome: _Outcome) -> None:
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
        """Let running devices finish (each ends at its own timeout) for up to
        SHUTDOWN_GRACE_SECONDS, then cut the rest short and record them."""
        tasks = list(self._running)
        if tasks:
            log.info("job runner stopping", extra={"devices": len(tasks)})
            _done, late = await asyncio.wait(tasks, timeout=SHUTDOWN_GRACE_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        cut, self._interrupted = self._interrupted, []
        if not cut:
            return
        try:
            async with asyncio.timeout(HANDBACK_SECONDS):
                await self._hand_back(cut)
        except Exception as exc:  # shutting down: never hang or fail on it
            log.warning(
                "job devices cut short not all recorded (%r); their leases run out",
                exc,
                extra={"devices": len(cut)},
            )

    async def _hand_back(self, cut: list[_Interrupted]) -> None:
        """Devices cut short at shutdown: an outcome already known is recorded. A method
        whose request was sent fails as ``interrupted`` rather than being sent again by
        the next runner (it may have been carried out). A twin patch goes back to pending
        (applying it again changes nothing more; the start counts), and so does anything
        not yet sent, its start taken back."""
        by_job: dict[int, list[_Interrupted]] = {}
        for item in cut:
            by_job.setdefault(item.job_id, []).append(item)
        for job_id, items in by_job.items():
            job_type = items[0].job_type
            for c in items:
                if c.outcome is None:
                    continue
                try:
                    status = await self._write(job_id, c.device_id, c.attempt, c.outcome)
                except asyncpg.DataError as exc:  # rare (see _record): its lease runs out
                    log.error("job device outcome refused: %r", exc, extra={"job_id": job_id})
                    continue
                if status == "UPDATE 1":
                    self._counted(job_id, job_type, c.outcome)
            rest = [c for c in items if c.outcome is None]
            interrupted = [c for c in rest if c.acting and job_type == "method"]
            again = [c for c in rest if c.acting and job_type != "method"]
            untouched = [c for c in rest if not c.acting]
            if interrupted:
                status = await self._pool.execute(
                    INTERRUPT,
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
                    await self._pool.execute(
                        RELEASE,
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
            await finish(self._pool, job_id)
