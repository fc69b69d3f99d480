"""Jobs: a direct method, a desired-properties patch or a firmware rollout for every device
a query matches.

``POST /v1/jobs`` compiles the device query (a 400 with ``position`` when it does not
compile), evaluates it once and snapshots the matching device ids into ``job_devices``
in the transaction that creates the job, so the target set is fixed and visible from
the start. The job runner of every API replica (fleetline_api/workers/jobs/) then runs the
devices, ``batch_size`` at a time and at most ``max_per_second``, and records each
device's outcome.

Scopes: creating and cancelling a job needs ``commands:write``; a twin job changes the
desired properties of every device it targets, which ``PATCH /v1/devices/{id}/twin``
allows only with ``devices:write``, so it needs that scope as well; a rollout puts a
release on devices, so it needs ``firmware:write`` as well. Pausing, resuming and
cancelling need ``commands:write``. Reading jobs needs ``devices:read`` (or
``commands:write``, so whoever starts jobs can follow them).

A rollout (docs/ota.md) is a job whose devices are notified of a release and then move
through the phases they report (workers/jobs/rollouts.py); its first wave is a canary.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request

from fleetline import db, devicequery, protocol
from fleetline.apikeys import KeyInfo
from fleetline_api.deps import CommandsWrite, PoolDep, SettingsDep, actor, require
from fleetline_api.openapi import links
from fleetline_api.problems import NOT_FOUND, RESPONSES, Problem
from fleetline_api.queries import jobs as sql
from fleetline_api.schemas.jobs import (
    DEVICE_STATES,
    FINAL_STATES,
    DeviceState,
    JobCreate,
    JobDevicePage,
    JobDevicePublic,
    JobPage,
    JobProgress,
    JobPublic,
    JobState,
    MethodJobCreate,
    MethodSpec,
    RolloutJobCreate,
    TwinJobCreate,
)
from fleetline_api.schemas.methods import params_problem
from fleetline_api.schemas.rollouts import PHASES, RolloutOptions, RolloutPublic, RolloutSpec
from fleetline_api.workers import jobs

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=RESPONSES)

JobsRead = Annotated[KeyInfo, Depends(require("devices:read", "commands:write"))]
JobId = Annotated[int, Path(ge=1, le=2**63 - 1)]

JOB_LINKS = (
    "GetJob:jobs-get_job:job_id",
    "JobDevices:jobs-list_job_devices:job_id",
    "CancelJob:jobs-cancel_job:job_id",
    "PauseJob:jobs-pause_job:job_id",
    "ResumeJob:jobs-resume_job:job_id",
)


def _progress(total: int, counts: dict[str, int]) -> JobProgress:
    by_state = {state: int(counts.get(state, 0)) for state in DEVICE_STATES}
    done = sum(by_state[state] for state in FINAL_STATES)
    percent = round(100.0 * done / total, 1) if total else 100.0
    return JobProgress(total=total, percent=percent, **by_state)


def _rollout(spec: dict[str, Any], phases: dict[str, int]) -> RolloutPublic:
    stored = RolloutSpec.model_validate(spec)
    return RolloutPublic(
        **stored.model_dump(include=set(RolloutPublic.model_fields)),
        phases={phase: phases.get(phase, 0) for phase in PHASES},
    )


def _public(row: Any, live: dict[str, int] | None, phases: dict[str, int]) -> JobPublic:
    spec: dict[str, Any] = json.loads(row["spec"])
    counts = row["counts"] if row["counts"] is not None else (live or {})
    return JobPublic(
        id=row["id"],
        type=row["type"],
        query=row["query"],
        method=MethodSpec.model_validate(spec) if row["type"] == "method" else None,
        patch=spec.get("patch") if row["type"] == "twin" else None,
        rollout=_rollout(spec, phases) if row["type"] == "rollout" else None,
        batch_size=row["batch_size"],
        max_per_second=row["max_per_second"],
        state=row["state"],
        progress=_progress(row["total"], counts),
        created_at=row["created_at"],
        created_by=row["created_by"],
        started_at=row["started_at"],
        cancelled_at=row["cancelled_at"],
        cancelled_by=row["cancelled_by"],
        paused_at=row["paused_at"],
        paused_by=row["paused_by"],
        finished_at=row["finished_at"],
        error=row["error"],
    )


async def _publics(con: db.Queryable, rows: list[Any]) -> list[JobPublic]:
    """The jobs with their progress: stored counts once finished, counted live before."""
    live_ids = [r["id"] for r in rows if r["counts"] is None]
    live: dict[int, dict[str, int]] = {}
    phases: dict[int, dict[str, int]] = {}
    if live_ids:
        for c in await con.fetch(sql.LIVE_COUNTS, live_ids):
            live.setdefault(c["job_id"], {})[c["state"]] = c["n"]
        rollouts = [r["id"] for r in rows if r["counts"] is None and r["type"] == "rollout"]
        if rollouts:
            for c in await con.fetch(sql.PHASE_COUNTS, rollouts):
                phases.setdefault(c["job_id"], {})[c["phase"]] = c["n"]
    return [_public(r, live.get(r["id"]), phases.get(r["id"], {})) for r in rows]


async def _get(con: db.Queryable, job_id: int) -> JobPublic:
    row = await con.fetchrow(sql.SELECT_JOB, job_id)
    if row is None:
        raise HTTPException(404, f"job {job_id} not found")
    return (await _publics(con, [row]))[0]


def _spec(body: MethodJobCreate | TwinJobCreate | RolloutJobCreate, key: KeyInfo) -> str:
    """The job's spec as JSON text (the standard library keeps integers of any size); a
    rollout's is completed with its release once the job has its devices (_rollout_spec)."""
    if isinstance(body, RolloutJobCreate):
        if "admin" not in key.scopes and "firmware:write" not in key.scopes:
            raise HTTPException(403, "a rollout needs the firmware:write scope as well")
        return "{}"
    if isinstance(body, MethodJobCreate):
        # What the direct method route refuses (400), and jsonb could not store.
        problem = params_problem(body.method.params)
        if problem:
            raise HTTPException(400, problem)
        return json.dumps(body.method.model_dump(), allow_nan=False)
    if "admin" not in key.scopes and "devices:write" not in key.scopes:
        raise HTTPException(403, "a twin job needs the devices:write scope as well")
    problem = protocol.twin_patch_problem(body.patch)
    if problem:
        raise HTTPException(400, problem)
    size = len(orjson.dumps(body.patch))
    if size > protocol.MAX_TWIN_BYTES:
        raise HTTPException(413, f"the patch is {size} bytes, more than {protocol.MAX_TWIN_BYTES}")
    return json.dumps({"patch": body.patch}, allow_nan=False)


@router.post(
    "",
    summary="Create a job over the devices a query matches",
    status_code=201,
    response_model=JobPublic,
    responses={
        201: {"description": "The job, queued", "links": links("/id", *JOB_LINKS)},
        400: {
            "model": Problem,
            "description": "The query does not compile (`position` points at the offending "
            "text), matches too many devices, the patch is not a valid twin patch, the "
            "params hold a NUL character, or a rollout's window starts when it ends",
        },
        404: {"model": Problem, "description": "A rollout's firmware does not exist"},
        409: {
            "model": Problem,
            "description": "A rollout's firmware is still being uploaded, or some of its "
            "devices are in another rollout not finished",
        },
        413: {"model": Problem, "description": "The patch is too large"},
    },
)
async def create_job(
    body: JobCreate, request: Request, pool: PoolDep, settings: SettingsDep, key: CommandsWrite
) -> JobPublic:
    """Run a method (`type: method`), a desired-properties patch (`type: twin`) or a
    firmware rollout (`type: rollout`) on every device the query matches now. The devices
    are fixed when the job is created; the job runs in the background: follow it with
    `GET /v1/jobs/{id}`."""
    spec = _spec(body, key)
    compiled = devicequery.compile_query(body.query, first_param=3)
    cap = settings.jobs_max_devices
    snapshot = sql.snapshot(compiled.where)
    async with pool.acquire() as con, con.transaction():
        job_id = await con.fetchval(
            sql.INSERT_JOB,
            body.type,
            body.query,
            spec,
            body.batch_size,
            body.max_per_second,
            actor(key),
        )
        status = await con.execute(snapshot, job_id, cap + 1, *compiled.params)
        total = int(status.rsplit(" ", 1)[-1])
        if total > cap:
            raise HTTPException(
                400, f"the query matches more than {cap} devices, the most one job may target"
            )
        await con.execute(sql.SET_TOTAL, job_id, total)
        if isinstance(body, RolloutJobCreate):
            await _rollout_spec(con, job_id, body, total)
        if total == 0:
            await jobs.finish(con, job_id)
    jobs.JOBS.labels("created").inc()
    log.info(
        "job created",
        extra={
            "job_id": job_id,
            "type": body.type,
            "total": total,
            "batch_size": body.batch_size,
            "max_per_second": body.max_per_second,
            "key_id": key.id,
        },
    )
    request.state.jobs.wake()
    return await _get(pool, job_id)


async def _rollout_spec(
    con: db.Connection, job_id: int, body: RolloutJobCreate, total: int
) -> None:
    """Store a rollout's release (404 unknown, 409 still uploading) and its canary as a
    count in its spec; set its devices' waves."""
    if body.window is not None and body.window.start == body.window.end:
        raise HTTPException(400, "the window's start and end are the same time")
    release = await con.fetchrow(sql.RELEASED_FIRMWARE, body.firmware_id)
    if release is None:
        if await con.fetchval(sql.FIRMWARE_EXISTS, body.firmware_id) is None:
            raise HTTPException(404, f"firmware {body.firmware_id} not found")
        raise HTTPException(409, f"firmware {body.firmware_id} is still being uploaded")
    busy = await con.fetchrow(sql.BUSY_IN_ROLLOUT, job_id)
    if busy is not None:
        raise HTTPException(
            409,
            f"{busy['devices']} of the devices are in rollout {busy['rollout']}, which has not "
            "finished: wait for it, or cancel it",
        )
    canary = body.canary
    if body.canary_percent is not None:
        canary = max(1, math.ceil(total * body.canary_percent / 100))
    options = body.model_dump(include=set(RolloutOptions.model_fields))
    options.update(canary=canary, canary_percent=None)
    spec = RolloutSpec(
        **options,
        version=release["version"],
        kind=release["kind"],
        size=release["size"],
        manifest=release["manifest"],
        signature=release["signature"],
    )
    await con.execute(sql.SET_WAVES, job_id, canary, body.wave_size or max(total, 1))
    await con.execute(sql.SET_SPEC, job_id, spec.model_dump_json())


@router.get(
    "",
    summary="List jobs",
    response_model=JobPage,
    responses={200: {"description": "A page of jobs", "links": links("/items/0/id", *JOB_LINKS)}},
)
async def list_jobs(
    pool: PoolDep,
    _key: JobsRead,
    state: Annotated[JobState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> JobPage:
    """Jobs, newest first, with their progress; `state` filters."""
    async with pool.acquire() as con:
        rows = await con.fetch(sql.LIST_JOBS, state, cursor, limit + 1)
        items = await _publics(con, rows[:limit])
    return JobPage(items=items, next_cursor=str(items[-1].id) if len(rows) > limit else None)


@router.get(
    "/{job_id}", summary="Get a job and its progress", response_model=JobPublic, responses=NOT_FOUND
)
async def get_job(job_id: JobId, pool: PoolDep, _key: JobsRead) -> JobPublic:
    """One job and its progress: devices per state, total, percent finished."""
    async with pool.acquire() as con:
        return await _get(con, job_id)


@router.get(
    "/{job_id}/devices",
    summary="A job's devices and their outcomes",
    response_model=JobDevicePage,
    responses=NOT_FOUND,
)
async def list_job_devices(
    job_id: JobId,
    pool: PoolDep,
    _key: JobsRead,
    state: Annotated[DeviceState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> JobDevicePage:
    """The job's devices by id, each with its outcome; `state` filters."""
    async with pool.acquire() as con:
        if await con.fetchval(sql.JOB_EXISTS, job_id) is None:
            raise HTTPException(404, f"job {job_id} not found")
        rows = await con.fetch(sql.LIST_DEVICES, job_id, state, cursor, limit + 1)
    items = [JobDevicePublic(**dict(r)) for r in rows[:limit]]
    more = len(rows) > limit
    return JobDevicePage(items=items, next_cursor=items[-1].device_id if more else None)


@router.post(
    "/{job_id}/cancel",
    summary="Cancel a job",
    response_model=JobPublic,
    responses={
        **NOT_FOUND,
        409: {"model": Problem, "description": "The job has finished already"},
    },
)
async def cancel_job(job_id: JobId, pool: PoolDep, key: CommandsWrite) -> JobPublic:
    """Cancel a job: its pending devices are cancelled, the ones running finish (a rollout's
    devices already notified go on with their update)."""
    async with pool.acquire() as con:
        async with con.transaction():
            cancelled = await con.fetchval(sql.CANCEL_JOB, job_id, actor(key))
            if cancelled is None:
                await _not_in(con, job_id, " already")
            dropped = await jobs.cancel_pending(con, job_id)
        await jobs.finish(con, job_id)
        log.info(
            "job cancelled",
            extra={"job_id": job_id, "devices_cancelled": dropped, "key_id": key.id},
        )
        return await _get(con, job_id)


@router.post(
    "/{job_id}/pause",
    summary="Pause a job",
    response_model=JobPublic,
    responses={
        **NOT_FOUND,
        409: {"model": Problem, "description": "The job is not queued or running"},
    },
)
async def pause_job(job_id: JobId, pool: PoolDep, key: CommandsWrite) -> JobPublic:
    """Pause a job: no more of its devices start until it is resumed; those running go
    on (a rollout's devices already notified finish their update)."""
    async with pool.acquire() as con:
        if await con.fetchval(sql.PAUSE_JOB, job_id, actor(key)) is None:
            await _not_in(con, job_id, ": only a queued or running job pauses")
        log.info("job paused", extra={"job_id": job_id, "key_id": key.id})
        return await _get(con, job_id)


@router.post(
    "/{job_id}/resume",
    summary="Resume a paused job",
    response_model=JobPublic,
    responses={**NOT_FOUND, 409: {"model": Problem, "description": "The job is not paused"}},
)
async def resume_job(
    job_id: JobId, request: Request, pool: PoolDep, key: CommandsWrite
) -> JobPublic:
    """Resume a paused job. A rollout's failure threshold then counts the devices that
    finish from now on."""
    async with pool.acquire() as con:
        if await con.fetchval(sql.RESUME_JOB, job_id) is None:
            await _not_in(con, job_id, ": only a paused job resumes")
        log.info("job resumed", extra={"job_id": job_id, "key_id": key.id})
        request.state.jobs.wake()
        return await _get(con, job_id)


async def _not_in(con: db.Connection, job_id: int, why: str) -> None:
    """404 for a job that does not exist, else 409 saying its state, then ``why``."""
    state = await con.fetchval(sql.JOB_STATE, job_id)
    if state is None:
        raise HTTPException(404, f"job {job_id} not found")
    raise HTTPException(409, f"job {job_id} is {state}{why}")
