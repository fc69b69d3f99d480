"""Cloud-to-device messages: a persistent queue per device, with each message's history.

``POST`` queues a message (whether the device is online or not) with a time to live;
the dispatcher (fleetline_api/workers/c2d.py) sends it on ``devices/{id}/c2d`` when the device
is online, again when it comes back online without having acknowledged it, and the
device's ack on ``devices/{id}/c2d/ack`` (applied by ingest) completes or rejects it:
``queued → sent → completed | rejected | expired`` (or ``cancelled`` here).

A device holds at most ``FLEETLINE_API_C2D_MAX_DEPTH`` messages not yet final; more are
refused with 409 (problem type ``QUEUE_FULL``). The device's row is locked while its
queue is counted, so concurrent POSTs cannot overshoot.

The POST notifies the dispatchers in its transaction, which is only a shortcut (their
sweep finds the message within ``FLEETLINE_API_C2D_SWEEP_S``): when PostgreSQL's NOTIFY
queue is full, the commit fails (SQLSTATE 54000) and the POST queues the message again
without notifying, rather than failing.

Posting and cancelling need ``commands:write``; reading needs ``devices:read``. Bodies
are never logged: they may hold secrets.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from fleetline import db
from fleetline_api.deps import (
    CommandsWrite,
    DevicesRead,
    PoolDep,
    SettingsDep,
    actor,
    require_device,
)
from fleetline_api.problems import MEDIA_TYPE, NOT_FOUND, RESPONSES, Problem
from fleetline_api.queries import messages as sql
from fleetline_api.schemas.bodies import read_body
from fleetline_api.schemas.common import DeviceId
from fleetline_api.schemas.messages import (
    MAX_REQUEST_BYTES,
    BodyError,
    BodyTooLargeError,
    MessageCreate,
    MessageEvent,
    MessagePage,
    MessagePublic,
    MessageState,
    encode_body,
)
from fleetline_api.workers import c2d

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/devices", tags=["messages"], responses=RESPONSES)

# RFC 9457 problem type of a refused POST: the device's queue is full.
QUEUE_FULL = "urn:fleetline:problem:c2d-queue-full"
MessageId = Annotated[uuid.UUID, Path(description="The message's id")]


async def _messages(con: db.Queryable, rows: list[asyncpg.Record]) -> list[MessagePublic]:
    """The rows as messages, each with its history (one query for all of them)."""
    history: dict[uuid.UUID, list[MessageEvent]] = {r["id"]: [] for r in rows}
    if rows:
        for e in await con.fetch(sql.HISTORY, list(history)):
            history[e["message_id"]].append(
                MessageEvent(at=e["at"], event=e["event"], detail=e["detail"])
            )
    out = []
    for r in rows:
        fields = dict(r)
        del fields["seq"]
        # Read as text and parsed here: integers of any size come back exactly.
        fields["body"] = json.loads(fields["body"])
        out.append(MessagePublic(**fields, history=history[r["id"]]))
    return out


async def _get(con: db.Queryable, device_id: str, message_id: uuid.UUID) -> MessagePublic:
    row = await con.fetchrow(sql.SELECT_MESSAGE, message_id, device_id)
    if row is None:
        await require_device(con, device_id)
        raise HTTPException(404, f"device {device_id} has no message {message_id}")
    return (await _messages(con, [row]))[0]


async def _read_message(request: Request) -> MessageCreate:
    """The request body, read with a bound before it is parsed (by pydantic, from the
    bytes: integers of any size stay exact)."""
    raw = await read_body(
        request, max_bytes=MAX_REQUEST_BYTES, media_types=("application/json",), what="message"
    )
    try:
        return MessageCreate.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


async def _queue(
    con: db.Connection,
    notices: db.Notices,
    *,
    device_id: str,
    message_id: uuid.UUID,
    body: str,
    properties: dict[str, str],
    ttl: int,
    created_by: str,
    max_depth: int,
) -> int:
    """Queue the message unless the device's queue is full; the depth found before."""
    if await con.fetchval(sql.LOCK_DEVICE, device_id) is None:
        raise HTTPException(404, f"device {device_id} not found")
    depth: int = await con.fetchval(sql.DEPTH, device_id)
    if depth < max_depth:
        await con.execute(
            sql.INSERT_MESSAGE, message_id, device_id, body, properties, ttl, created_by
        )
        await con.execute(sql.RECORD_EVENT, message_id, "queued", f"queued by {created_by}")
        # The dispatchers hear of it at commit (and send at once if it is online).
        notices.add(c2d.CHANNEL, c2d.queued_notification(device_id))
    return depth


def _queue_full(request: Request, device_id: str, depth: int) -> JSONResponse:
    problem = Problem(
        type=QUEUE_FULL,
        title="Conflict",
        status=409,
        detail=f"device {device_id}'s queue is full: {depth} messages are queued or sent "
        "and not yet acknowledged (the most allowed); try again once some are completed, "
        "rejected, expired or cancelled",
        instance=request.url.path,
    )
    return JSONResponse(
        problem.model_dump(exclude_none=True), status_code=409, media_type=MEDIA_TYPE
    )


@router.post(
    "/{device_id}/messages",
    summary="Queue a cloud-to-device message",
    status_code=201,
    response_model=MessagePublic,
    responses={
        **NOT_FOUND,
        409: {
            "model": Problem,
            "description": f"The device's queue is full (problem type {QUEUE_FULL})",
        },
        413: {"model": Problem, "description": "The body is too large"},
        415: {"model": Problem, "description": "Not application/json"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": MessageCreate.model_json_schema()}},
        }
    },
)
async def send_message(
    device_id: DeviceId,
    request: Request,
    response: Response,
    pool: PoolDep,
    settings: SettingsDep,
    key: CommandsWrite,
) -> Any:
    """Queue a message for the device: it is sent on ``devices/{id}/c2d`` as
    ``{"id", "body", "properties"}`` when the device is online (at once if it is), and
    sent again until the device acknowledges it or ``ttl_s`` runs out."""
    message = await _read_message(request)
    try:
        body = encode_body(message.body)
    except BodyTooLargeError as exc:
        raise HTTPException(413, str(exc)) from None
    except BodyError as exc:
        raise HTTPException(400, str(exc)) from None
    ttl = message.ttl_s or settings.c2d_default_ttl_s
    message_id = uuid.uuid4()
    queue = functools.partial(
        _queue,
        device_id=device_id,
        message_id=message_id,
        body=body,
        properties=message.properties,
        ttl=ttl,
        created_by=actor(key),
        max_depth=settings.c2d_max_depth,
    )
    depth = await db.notifying(pool, queue, what=f"c2d message {message_id} for {device_id}")
    if depth >= settings.c2d_max_depth:
        log.info("c2d message refused: queue full", extra={"device_id": device_id})
        return _queue_full(request, device_id, depth)
    created = await _get(pool, device_id, message_id)
    c2d.EVENTS.labels("queued").inc()
    log.info(
        "c2d message queued",
        extra={"device_id": device_id, "message_id": str(message_id), "ttl_s": ttl},
    )
    response.headers["Location"] = f"/v1/devices/{device_id}/messages/{message_id}"
    return created


@router.get(
    "/{device_id}/messages",
    summary="List a device's cloud-to-device messages",
    response_model=MessagePage,
    responses=NOT_FOUND,
)
async def list_messages(
    device_id: DeviceId,
    pool: PoolDep,
    _key: DevicesRead,
    state: Annotated[MessageState | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> MessagePage:
    """The device's messages, newest first, each with its state and history; filter by
    ``state``. Finished messages are kept for ``FLEETLINE_API_C2D_RETENTION_S``."""
    async with pool.acquire() as con:
        await require_device(con, device_id)
        rows = await con.fetch(sql.LIST_MESSAGES, device_id, state, cursor, limit + 1)
        items = await _messages(con, rows[:limit])
    return MessagePage(
        items=items, next_cursor=str(rows[limit - 1]["seq"]) if len(rows) > limit else None
    )


@router.get(
    "/{device_id}/messages/{message_id}",
    summary="Get a cloud-to-device message",
    response_model=MessagePublic,
    responses=NOT_FOUND,
)
async def get_message(
    device_id: DeviceId, message_id: MessageId, pool: PoolDep, _key: DevicesRead
) -> MessagePublic:
    """One message with its state and history."""
    async with pool.acquire() as con:
        return await _get(con, device_id, message_id)


@router.post(
    "/{device_id}/messages/{message_id}/cancel",
    summary="Cancel a cloud-to-device message",
    response_model=MessagePublic,
    responses={
        **NOT_FOUND,
        409: {"model": Problem, "description": "It is completed, rejected, expired or cancelled"},
    },
)
async def cancel_message(
    device_id: DeviceId, message_id: MessageId, pool: PoolDep, key: CommandsWrite
) -> MessagePublic:
    """Cancel a queued or sent message: it is not sent (again), and the device's ack, if
    one comes, is ignored. A device that received it already may still act on it."""
    async with pool.acquire() as con:
        async with con.transaction():
            cancelled = await con.fetchval(sql.CANCEL_MESSAGE, message_id, device_id)
            if cancelled is not None:
                await con.execute(
                    sql.RECORD_EVENT, message_id, "cancelled", f"cancelled by {actor(key)}"
                )
        message = await _get(con, device_id, message_id)  # 404 when there is none
    if cancelled is None:
        raise HTTPException(
            409,
            f"message {message_id} is {message.state}: only queued or sent messages can be "
            "cancelled",
        )
    c2d.EVENTS.labels("cancelled").inc()
    log.info("c2d message cancelled", extra={"device_id": device_id, "message_id": str(message_id)})
    return message
