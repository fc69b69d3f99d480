"""Alarms: list and filter, acknowledge, clear, history, action deliveries.

The rules service raises, updates and clears alarms; these routes move them on a
person's decision: ``active → acknowledged``, and ``active|acknowledged → cleared``,
each recorded with who (the API key) and when, announced on ``/v1/stream``, and
answered 409 when the alarm is not in a state that allows it. A manual clear also
tells the rules service (NOTIFY fleetline_rules), which starts that (rule, device) over:
if the condition still holds, a new alarm is raised after the rule's ``for_s``.

Reading needs ``rules:write`` or ``telemetry:read`` (see routes/rules.py); moving an
alarm needs ``rules:write``.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, HTTPException, Path, Query

from fleetline import db, rules_engine, streamevents
from fleetline_api.deps import PoolDep, RulesRead, RulesWrite, actor
from fleetline_api.openapi import links
from fleetline_api.problems import NOT_FOUND, RESPONSES, Problem
from fleetline_api.queries import alarms as sql
from fleetline_api.schemas.common import DeviceId
from fleetline_api.schemas.rules import (
    AlarmEvent,
    AlarmPage,
    AlarmPublic,
    AlarmState,
    Delivery,
    Severity,
    masked,
)

router = APIRouter(prefix="/v1/alarms", tags=["alarms"], responses=RESPONSES)

AlarmId = Annotated[int, Path(ge=1, le=2**63 - 1)]
CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": Problem, "description": "The alarm's state does not allow this"}
}


@router.get(
    "",
    summary="List alarms",
    response_model=AlarmPage,
    responses={
        200: {
            "description": "A page of alarms",
            "links": links(
                "/items/0/id",
                "GetAlarm:alarms-get_alarm:alarm_id",
                "AcknowledgeAlarm:alarms-acknowledge_alarm:alarm_id",
                "ClearAlarm:alarms-clear_alarm:alarm_id",
                "AlarmHistory:alarms-alarm_history:alarm_id",
                "AlarmDeliveries:alarms-alarm_deliveries:alarm_id",
            ),
        }
    },
)
async def list_alarms(
    pool: PoolDep,
    _key: RulesRead,
    state: Annotated[AlarmState | None, Query()] = None,
    device_id: Annotated[DeviceId | None, Query()] = None,
    rule_id: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
    severity: Annotated[Severity | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=1, le=2**63 - 1)] = None,
) -> AlarmPage:
    """Newest first, filtered by state, device, rule and severity."""
    rows = await pool.fetch(
        sql.LIST_ALARMS,
        state,
        device_id,
        rule_id,
        severity,
        cursor,
        limit + 1,
    )
    items = [AlarmPublic(**dict(r)) for r in rows[:limit]]
    return AlarmPage(items=items, next_cursor=str(items[-1].id) if len(rows) > limit else None)


async def _get(con: db.Queryable, alarm_id: int) -> AlarmPublic:
    row = await con.fetchrow(sql.SELECT_ALARM, alarm_id)
    if row is None:
        raise HTTPException(404, f"alarm {alarm_id} not found")
    return AlarmPublic(**dict(row))


@router.get("/{alarm_id}", summary="Get an alarm", response_model=AlarmPublic, responses=NOT_FOUND)
async def get_alarm(alarm_id: AlarmId, pool: PoolDep, _key: RulesRead) -> AlarmPublic:
    """One alarm."""
    return await _get(pool, alarm_id)


async def _move(
    pool: Any, alarm_id: int, statement: str, event: str, actor: str, allowed: str
) -> AlarmPublic:

    async def work(con: db.Connection, notices: db.Notices) -> AlarmPublic:
        row = await con.fetchrow(statement, alarm_id, actor)
        if row is None:
            current = await _get(con, alarm_id)  # 404 when there is none
            raise HTTPException(
                409, f"alarm {alarm_id} is {current.state}: only {allowed} alarms can be {event}"
            )
        alarm = AlarmPublic(**dict(row))
        at = alarm.acknowledged_at if event == "acknowledged" else alarm.cleared_at
        await con.execute(sql.RECORD_HISTORY, alarm.id, at, event, actor, alarm.value)
        notices.add(
            streamevents.CHANNEL,
            *streamevents.pack([streamevents.alarm_event(alarm.model_dump(), at)]),
        )
        if event == "cleared":
            notices.add(
                rules_engine.RULES_CHANNEL,
                orjson.dumps({"cleared": [alarm.rule_id, alarm.device_id]}).decode(),
            )
        return alarm

    return await db.notifying(pool, work, what=f"alarm {alarm_id} {event}")


@router.post(
    "/{alarm_id}/ack",
    summary="Acknowledge an alarm",
    response_model=AlarmPublic,
    responses={**NOT_FOUND, **CONFLICT},
)
async def acknowledge_alarm(alarm_id: AlarmId, pool: PoolDep, key: RulesWrite) -> AlarmPublic:
    """Acknowledge an active alarm (409 if it is acknowledged or cleared already). It
    stays open, and clears when its rule's clear condition holds."""
    return await _move(pool, alarm_id, sql.ACK, "acknowledged", actor(key), "active")


@router.post(
    "/{alarm_id}/clear",
    summary="Clear an alarm",
    response_model=AlarmPublic,
    responses={**NOT_FOUND, **CONFLICT},
)
async def clear_alarm(alarm_id: AlarmId, pool: PoolDep, key: RulesWrite) -> AlarmPublic:
    """Clear an active or acknowledged alarm by hand (409 if it is cleared already)."""
    return await _move(pool, alarm_id, sql.CLEAR, "cleared", actor(key), "active or acknowledged")


@router.get(
    "/{alarm_id}/history",
    summary="An alarm's history",
    response_model=list[AlarmEvent],
    responses=NOT_FOUND,
)
async def alarm_history(alarm_id: AlarmId, pool: PoolDep, _key: RulesRead) -> list[AlarmEvent]:
    """Every move of the alarm, oldest first: raised, acknowledged, cleared, with who."""
    async with pool.acquire() as con:
        await _get(con, alarm_id)
        rows = await con.fetch(sql.ALARM_HISTORY, alarm_id)
    return [AlarmEvent(**dict(r)) for r in rows]


@router.get(
    "/{alarm_id}/deliveries",
    summary="An alarm's notifications",
    response_model=list[Delivery],
    responses=NOT_FOUND,
)
async def alarm_deliveries(alarm_id: AlarmId, pool: PoolDep, _key: RulesRead) -> list[Delivery]:
    """The actions the alarm's moves ran: status, attempts, last error, next retry
    (the delivery log; secrets masked)."""
    async with pool.acquire() as con:
        await _get(con, alarm_id)
        rows = await con.fetch(sql.ALARM_DELIVERIES, alarm_id)
    return [Delivery(**{**dict(r), "action": masked([r["action"]])[0]}) for r in rows]
